"""Triton kernels of orz_fast, one op per file, each beside its plain-torch reference.

Installed as the package ``orz_fast.kernels``. Importing the package first imports
``orz_fast.kernels.utils``, which turns Triton's interpreter on when there is no CUDA device
(Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, so this must precede every kernel).
"""

from orz_fast.kernels import utils  # noqa: F401  (sets TRITON_INTERPRET before any kernel is defined)
