"""Padded ``[B, T]`` helpers shared by the veRL and OpenRLHF adapters.

Both frameworks hold per-token quantities as padded ``[B, T]`` tensors with a mask and reduce a
per-token loss either over tokens or per sequence. ``orz_fast.ops`` losses take flat tokens and
return a masked token mean; a per-sequence mean is the token sum of the loss scaled by
``1 / (tokens in its row)``, and because that weight is positive it can be folded into the
advantage (``w * max(-A r, -A clip(r)) = max(-(w A) r, -(w A) clip(r))``).
"""

from __future__ import annotations

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
