"""Triton kernels of orz_fast, one op per file, each beside its plain-torch reference.

Installed as the package ``orz_fast.kernels``.
"""
