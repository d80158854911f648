"""Let megatron-core's pipeline schedule run on CPU tensors over gloo (tests, CPU demo).

megatron-core 0.16's ``pipeline_parallel.schedules`` and ``pipeline_parallel.p2p_communication``
hard-code CUDA in four places that matter off-GPU: receive buffers are allocated on
``torch.cuda.current_device()``, tensor shapes are exchanged in buffers on that device,
``torch.cuda.synchronize()`` guards ``batch_isend_irecv``, and the token counter is created
with ``device="cuda"``. Everything else (the 1F1B order, the p2p ops themselves, backward)
is device-agnostic.

:func:`cpu_pipeline_compat` swaps the ``torch`` name inside those two modules, for the
duration of one schedule call, for a proxy that forwards everything to ``torch`` except that
a CUDA device resolves to the CPU and ``torch.cuda.synchronize`` does nothing. On a CUDA
machine it is a no-op, so the GPU path is megatron-core's own, unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from megatron.core.pipeline_parallel import p2p_communication, schedules

_PATCHED_MODULES = (schedules, p2p_communication)


class _CudaOnCPU:
    """``torch.cuda`` with the current device being the CPU and synchronisation a no-op."""

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def synchronize(*_: Any, **__: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _TorchOnCPU:
    """``torch`` whose ``zeros(device="cuda")`` and ``cuda.current_device()`` land on the CPU."""

    cuda = _CudaOnCPU()

    @staticmethod
    def zeros(*args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        if device is not None and torch.device(device).type == "cuda":
            device = "cpu"
        return torch.zeros(*args, device=device, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


@contextlib.contextmanager
def cpu_pipeline_compat(enabled: bool) -> Iterator[None]:
    """Within the block, megatron-core's pipeline schedule allocates on the CPU (when ``enabled``)."""
    if not enabled:
        yield
        return
    saved = [m.torch for m in _PATCHED_MODULES]
    proxy = _TorchOnCPU()
    for m in _PATCHED_MODULES:
        m.torch = proxy
    try:
        yield
    finally:
        for m, original in zip(_PATCHED_MODULES, saved, strict=True):
            m.torch = original
