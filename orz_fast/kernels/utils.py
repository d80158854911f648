"""Helpers shared by the Triton kernels in ``orz_fast.kernels``.

Compiled or interpreted. Triton decides when a kernel is decorated (``@triton.jit``, at the
import of its module) whether it is compiled for a GPU or run by Triton's interpreter on CPU
tensors, from ``TRITON_INTERPRET`` as it is at that moment (Triton 3.4+ reads it through
``triton.knobs.runtime.interpret``, which looks at the environment on every access unless a
program assigned the knob). orz_fast never sets it: the caller does, before the first import of
a kernel module (the test suites do, on machines without CUDA: see
``orz_fast.kernels.use_interpreter``).
Which mode the kernels got is fixed from then on, so each launch checks that its tensors are on
a device that mode can run on and raises a ``ValueError`` saying what to do otherwise.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


def _interpret_flag() -> bool:
    """Whether a kernel decorated now would run in Triton's interpreter."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


INTERPRETED = _interpret_flag()
"""Whether the kernels of this package run in Triton's interpreter: every kernel module imports
this one just before it defines its kernels, and this module's own helpers below are decorated
now, so the flag is read as they are all decorated."""


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` (a ``@triton.jit`` object) runs in Triton's interpreter rather than compiled."""
    return isinstance(kernel, InterpretedFunction)


def triton_device_problem(tensors: tuple[torch.Tensor, ...], *, interpreted: bool) -> str | None:
    """Why Triton kernels in this mode cannot take ``tensors`` (None when they can)."""
    devices = sorted({t.device.type for t in tensors})
    want = "cpu" if interpreted else "cuda"
    if devices == [want]:
        return None
    if interpreted:
        return (
            f"orz_fast's Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1 when orz_fast.kernels "
            f"was imported), which takes cpu tensors, got devices {devices}; use backend=None or 'torch', or "
            f"import orz_fast.kernels without TRITON_INTERPRET=1 to compile them for the GPU"
        )
    return (
        f"orz_fast's Triton kernels are compiled for CUDA GPUs (TRITON_INTERPRET was not 1 when orz_fast.kernels "
        f"was imported) and take cuda tensors, got devices {devices}; use backend=None or 'torch' for CPU "
        f"tensors, or set TRITON_INTERPRET=1 before the first import of orz_fast.kernels to run the kernels in "
        f"Triton's interpreter"
    )


def check_triton_device(*tensors: torch.Tensor, kernel=None) -> None:
    """Raise ``ValueError`` when Triton cannot run on these tensors' device.

    Compiled kernels need CUDA tensors, interpreted ones CPU tensors; ``kernel`` (the kernel about
    to be launched) says which, else the mode the package's kernels were defined in.
    """
    interpreted = INTERPRETED if kernel is None else is_interpreted(kernel)
    problem = triton_device_problem(tensors, interpreted=interpreted)
    if problem is not None:
        raise ValueError(problem)


def triton_runs_on(tensor: torch.Tensor) -> bool:
    """Whether the package's kernels can take ``tensor`` (CUDA when compiled, CPU when interpreted)."""
    return triton_device_problem((tensor,), interpreted=INTERPRETED) is None


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (and >= 1)."""
    return triton.next_power_of_2(max(1, int(n)))


def loadable_mask(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` as a tensor Triton can load: bool masks are viewed as uint8 (no copy)."""
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8)
    return mask


@triton.jit
def maximum_nan(a, b):
    """Elementwise max that returns NaN when either input is NaN (``tl.maximum`` alone drops it on GPUs)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def minimum_nan(a, b):
    """Elementwise min that returns NaN when either input is NaN."""
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)
