"""Attention contexts of the decoder, and causal attention over a packed 1-D token stream.

Every decoder forward (training, prefill, decode) runs the same layers; what differs is the
*attention context* it is given, an object with three members (:class:`AttentionContext`):

- ``positions(T)``: the RoPE position of each of the T tokens;
- ``attend(layer, q, k, v)``: attention output for the tokens' queries, keys and values at the
  stage's ``layer``-th layer (a context may also store the keys and values, as the paged one does);
- ``output_rows``: the rows whose final hidden state the caller wants (``None``: all).

:class:`PackedSegments` is the training / scoring context: causal attention within each segment
of a packed stream (flash-attn ``cu_seqlens`` layout), positions restarting at every segment.
:class:`orz_fast.models.paged.PagedAttention` is the rollout context: prompts attend causally to
themselves, decode tokens to a paged KV cache, both in one step.

Segments never attend to each other. On CUDA with flash-attn installed the varlen
kernel runs the whole stream in one call; otherwise PyTorch SDPA runs once per
segment with ``is_causal=True`` (its flash / memory-efficient backends on GPU, the
math backend on CPU), which is the per-segment causal mask without materialising a
[T, T] mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None


PADDED_BATCH_MAX_WASTE = 2
"""Segments run as one padded batch when that computes at most this many times the attention scores
that per-segment calls would (``N * L_max^2 <= waste * sum(L_i^2)``); otherwise one call per segment."""


class AttentionContext(Protocol):
    """What a decoder forward needs to know about its tokens' attention (see the module docstring)."""

    output_rows: torch.Tensor | None

    def positions(self, num_tokens: int) -> torch.Tensor: ...

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class PackedSegments:
    """Segment boundaries of one packed micro-batch, prepared once per forward and shared by all layers:
    the attention context of training and scoring passes (causal within each segment)."""

    output_rows: ClassVar[None] = None
    """Every token's hidden state is returned."""

    cu_seqlens: torch.Tensor
    """int32 [N+1] boundaries on the tokens' device."""
    bounds: tuple[int, ...]
    """The same boundaries on the host (SDPA slices segments by them)."""
    max_seqlen: int
    """Longest segment (flash-attn's ``max_seqlen``)."""

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, num_tokens: int) -> PackedSegments:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
        # One host copy per forward (not per layer): SDPA needs Python slice bounds and flash-attn a host max.
        bounds = tuple(int(b) for b in cu_seqlens.tolist())
        if bounds[0] != 0 or bounds[-1] != num_tokens or any(a > b for a, b in zip(bounds, bounds[1:], strict=False)):
            raise ValueError(f"cu_seqlens must rise from 0 to T={num_tokens}, got {list(bounds)}")
        max_seqlen = max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
        return cls(cu_seqlens.to(torch.int32), bounds, max_seqlen)

    def positions(self, num_tokens: int) -> torch.Tensor:
        return segment_positions(self.cu_seqlens, num_tokens)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return packed_causal_attention(q, k, v, self)


def segment_positions(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Position of each token inside its own segment: int64 [T], restarting at 0 at every boundary."""
    idx = torch.arange(num_tokens, device=cu_seqlens.device)
    seg = torch.searchsorted(cu_seqlens[1:].to(torch.int64), idx, right=True)
    return idx - cu_seqlens.to(torch.int64)[seg]


def packed_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segs: PackedSegments) -> torch.Tensor:
    """Causal attention within each segment.

    q: [T, Hq, D]; k, v: [T, Hkv, D] with Hq a multiple of Hkv. Returns [T, Hq, D].
    """
    if flash_attn_varlen_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        cu = segs.cu_seqlens
        return flash_attn_varlen_func(q, k, v, cu, cu, segs.max_seqlen, segs.max_seqlen, causal=True)
    if q.shape[1] != k.shape[1]:
        # Expanded K/V keep SDPA on its fused kernels (enable_gqa=True falls back to the math kernel on CPU).
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    lengths = [end - start for start, end in zip(segs.bounds[:-1], segs.bounds[1:], strict=True)]
    n, longest = len(lengths), segs.max_seqlen
    if n > 1 and n * longest * longest <= PADDED_BATCH_MAX_WASTE * sum(x * x for x in lengths):
        # Many segments of similar length (RL responses): pad them into one [N, L] batch and run one causal
        # SDPA call. Padding sits after each segment's last token, so causality alone keeps real queries
        # off padded keys; padded query rows are dropped.
        seg = torch.repeat_interleave(torch.arange(n, device=q.device), torch.tensor(lengths, device=q.device))
        pos = segment_positions(segs.cu_seqlens, q.shape[0])
        padded = []
        for x in (q, k, v):
            buf = x.new_zeros(n, longest, *x.shape[1:])
            buf[seg, pos] = x
            padded.append(buf.transpose(1, 2))  # [N, H, L, D]
        out = F.scaled_dot_product_attention(*padded, is_causal=True)
        return out.transpose(1, 2)[seg, pos]
    # split (not per-segment slicing): its backward is one concatenation instead of a zero-filled [T, H, D] per segment
    outs = []
    for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths), strict=True):
        if qs.shape[0] == 0:
            continue
        # [1, H, L, D] per segment (the fused SDPA kernels want a batch dimension)
        qs, ks, vs = (x.transpose(0, 1).unsqueeze(0) for x in (qs, ks, vs))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)[0].transpose(0, 1))
    if len(outs) == 1:
        return outs[0]
    return torch.cat(outs) if outs else torch.zeros_like(q)
