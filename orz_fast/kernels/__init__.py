"""Triton kernels of orz_fast, one op per file, each beside its plain-torch reference.

Installed as the package ``orz_fast.kernels``. Whether the kernels are compiled for a GPU or run
in Triton's interpreter follows ``TRITON_INTERPRET`` when their modules are first imported
(``orz_fast.kernels.utils`` explains); importing orz_fast never sets it. Test setups on machines
without CUDA call :func:`use_interpreter` first.
"""

import os
import sys


def _compiled_jit_functions(prefixes: tuple[str, ...]) -> list[str]:
    """``@triton.jit`` objects already defined compiled (not interpreted) in modules under ``prefixes``."""
    jit = sys.modules.get("triton.runtime.jit")
    if jit is None:
        return []
    return [
        f"{name}.{attr}"
        for name, module in list(sys.modules.items())
        if name.startswith(prefixes) and module is not None
        for attr, value in vars(module).items()
        if isinstance(value, jit.JITFunction)
    ]


def use_interpreter() -> None:
    """Make the kernels of this package run in Triton's interpreter, for CPU tensors (test setup).

    Triton fixes a function's mode when its ``@triton.jit`` decorator runs: Triton's own
    ``triton.language`` helpers (``tl.sum``, ``tl.cdiv``, ...) when Triton is imported, a kernel
    when its module is. So call this before anything imports Triton: it sets
    ``TRITON_INTERPRET=1`` (child processes inherit it) and Triton's knob (which a program may
    assign). Raises ``RuntimeError`` naming them when Triton's helpers or a kernel of this package
    were already defined compiled; their mode cannot change in this process, and the fix is
    ``TRITON_INTERPRET=1`` in the environment before Python starts.
    """
    compiled = _compiled_jit_functions(("triton.language.", f"{__name__}."))
    if compiled:
        shown = ", ".join(compiled[:4]) + (f" and {len(compiled) - 4} more" if len(compiled) > 4 else "")
        raise RuntimeError(
            f"Triton was imported compiled before the interpreter could be switched on ({shown} are compiled "
            f"@triton.jit functions); set TRITON_INTERPRET=1 in the environment, or call "
            f"orz_fast.kernels.use_interpreter() before anything imports triton"
        )
    os.environ["TRITON_INTERPRET"] = "1"
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        knobs.runtime.interpret = True
