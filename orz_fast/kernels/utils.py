"""Helpers shared by the Triton kernels in ``orz_fast.kernels``.

Triton decides whether a kernel is compiled or run by its interpreter from ``TRITON_INTERPRET``.
A machine without CUDA has no compiled backend at all; there ``orz_fast/__init__.py`` switches
the interpreter on when the package is first imported (this package is ``orz_fast.kernels``, so
that always happens before any kernel is defined). An explicit ``TRITON_INTERPRET`` is kept.
"""

from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (CPU tensors) instead of compiled."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_triton_device(*tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` when Triton cannot run on these tensors' device.

    Compiled Triton needs CUDA tensors; the interpreter needs CPU tensors.
    """
    devices = {t.device.type for t in tensors}
    want = "cpu" if interpreting() else "cuda"
    if devices != {want}:
        raise ValueError(
            f"the Triton backend needs {want} tensors here (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}), "
            f"got devices {sorted(devices)}"
        )


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (and >= 1)."""
    return triton.next_power_of_2(max(1, int(n)))


def loadable_mask(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` as a tensor Triton can load: bool masks are viewed as uint8 (no copy)."""
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8)
    return mask
