"""Padded ``[B, T]`` helpers shared by the veRL and OpenRLHF adapters.

Both frameworks hold per-token quantities as padded ``[B, T]`` tensors with a mask and reduce a
per-token loss either over tokens or per sequence. ``orz_fast.ops`` losses take flat tokens and
return a masked token mean; a per-sequence mean is the token sum of the loss scaled by
``1 / (tokens in its row)``. Because that weight is positive it can be folded into the policy
loss's advantage (``w * max(-A r, -A clip(r)) = max(-(w A) r, -(w A) clip(r))``), and into the
value loss's mask (the ops losses take a float mask as per-token weights).
"""

from __future__ import annotations

from typing import Any

import torch


def check_padded(name: str, **tensors: torch.Tensor | None) -> tuple[int, ...]:
    """All given tensors share one shape with at least one dimension; returns it."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if v is not None}
    if len(set(shapes.values())) != 1 or any(len(s) == 0 for s in shapes.values()):
        raise ValueError(f"{name}: expected tensors of one shape [B, T], got shapes {shapes}")
    return next(iter(shapes.values()))


def token_sum(mean_loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Undo the ops losses' ``/ max(count, 1)``: the masked token sum of the per-token loss."""
    return mean_loss * stats["num_tokens"].clamp(min=1.0)


def row_token_counts(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Tokens per row (last dimension) of ``mask``, as ``[..., 1]`` in ``dtype`` for broadcasting."""
    return mask.to(dtype).sum(dim=-1, keepdim=True)


def per_row_weights(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``mask / (tokens in the row + 1e-8)`` in ``dtype``: token weights whose masked sum is the sum of
    the rows' token means (the ``+ 1e-8`` is veRL's and OpenRLHF's; it keeps an empty row at 0, not 0/0)."""
    return mask.to(dtype) / (row_token_counts(mask, dtype) + 1e-8)


def host_dtype(
    loss_dtype: torch.dtype, mask: torch.Tensor | None, per_sequence: bool, divisor: Any = None
) -> torch.dtype:
    """The dtype veRL's ``agg_loss`` and OpenRLHF's ``aggregate_loss`` return for a per-token loss in
    ``loss_dtype``: promoted with a floating mask, with float32 in the per-sequence modes (their
    ``(counts > 0).float()`` row mask, or the ``counts + 1e-8`` of an integer mask), and with a
    floating 0-dim tensor the reduced loss is divided by (a global token or sequence count)."""
    dtype = loss_dtype
    if mask is not None and mask.is_floating_point():
        dtype = torch.promote_types(dtype, mask.dtype)
    if per_sequence:
        dtype = torch.promote_types(dtype, torch.float32)
    if isinstance(divisor, torch.Tensor) and divisor.is_floating_point():
        dtype = torch.promote_types(dtype, divisor.dtype)
    return dtype
