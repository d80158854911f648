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
themselves, decode tokens to a paged KV cache, both in one step. :class:`SharedPrompts` is the
training context with prompt sharing: each prompt once, followed by its samples' responses, every
response attending to that one copy.

Segments never attend to each other. On CUDA with flash-attn installed the varlen
kernel runs the whole stream in one call; otherwise PyTorch SDPA runs once per
segment with ``is_causal=True`` (its flash / memory-efficient backends on GPU, the
math backend on CPU), which is the per-segment causal mask without materialising a
[T, T] mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

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
    k, v = _repeat_kv(q, k, v)
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


def _repeat_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V heads repeated to the query heads (GQA): expanded K/V keep SDPA on its fused kernels
    (``enable_gqa=True`` falls back to the math kernel on CPU)."""
    if q.shape[1] == k.shape[1]:
        return k, v
    groups = q.shape[1] // k.shape[1]
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


@dataclass(frozen=True)
class PromptGroup:
    """One prompt and the responses that share it, as laid out in a :class:`SharedPrompts` stream."""

    prompt_len: int
    response_lens: tuple[int, ...]
    """Rows of each response (0 allowed), end to end after the prompt."""
    pad_rows: torch.Tensor
    """int64 [R]: each response row's place in the group's padded [n, L] batch of its non-empty responses."""

    @property
    def num_rows(self) -> int:
        return self.prompt_len + sum(self.response_lens)


def shared_prompt_layout(
    prompt_len: np.ndarray, response_len: np.ndarray, opens: np.ndarray, row_base: np.ndarray | int = 0
) -> np.ndarray:
    """Rows of :class:`SharedPrompts` streams from per-response host arrays (O(responses), no per-row work):
    ``prompt_len[i]`` (its prompt's tokens), ``response_len[i]`` (its rows) and ``opens[i]`` (it is the first
    response of its group, so its prompt's rows come just before its own). Several streams end to end are laid
    out at once when ``row_base[i]`` is the row where response ``i``'s stream starts (rows count from there).

    Returns ``pieces`` int64 [S, 4]: per response its prompt piece's rows (0 unless it opens its group), its own
    rows, and the shifts of both pieces (a row's RoPE position is its row minus its piece's shift)."""
    rows = response_len + prompt_len * opens
    ends = np.cumsum(rows) - row_base
    response_start = ends - response_len
    group_start = np.maximum.accumulate(np.where(opens, ends - rows + row_base, 0)) - row_base
    pieces = np.empty((len(rows), 4), dtype=np.int64)
    pieces[:, 0], pieces[:, 1] = prompt_len * opens, response_len
    # prompt rows: the offset from the group's start; response rows: the prompt's length plus the offset in it
    pieces[:, 2], pieces[:, 3] = group_start, response_start - prompt_len
    return pieces


@dataclass(frozen=True, eq=False)
class SharedPrompts:
    """Training / scoring context in which the samples of one prompt share that prompt's forward.

    The stream is a run of groups, each one prompt's tokens followed by its responses' tokens end to end
    (``[p][r1][r2]...``). Prompt tokens attend causally within the prompt; a response token attends to the
    whole prompt and causally within its own response, and its RoPE position continues the prompt's
    (``len(prompt) + j``), so every response token's output equals the one it has after the prompt in a
    separate segment (:class:`PackedSegments`), while the prompt's projections and MLPs run once per group
    instead of once per sample. Gradients of the shared prompt rows are the sums over its samples.

    Attention of a group's responses is one SDPA call over a padded [n, L] batch whose keys are the prompt's
    (the same K/V rows for every response: only K/V are repeated, never the prompt's forward) followed by the
    response's own, under a lower-right causal mask; responses too unequal for one padded batch
    (:data:`PADDED_BATCH_MAX_WASTE`) get one call each.

    The layout is per-response host arrays plus its pieces on the device (:func:`shared_prompt_layout`);
    per-row tensors (positions, padded-batch rows) are made on the device by the forward that needs them.
    """

    output_rows: ClassVar[None] = None
    """Every token's hidden state is returned."""

    prompt_len: np.ndarray
    """int64 [S]: each response's prompt tokens."""
    response_lens: np.ndarray
    """int64 [S]: each response's rows, in stream order."""
    opens: np.ndarray
    """bool [S]: the response is its group's first."""
    pieces: torch.Tensor
    """int64 [S, 4] on the tokens' device: :func:`shared_prompt_layout`'s ``pieces``."""
    num_rows: int
    """Rows T of the stream."""

    @classmethod
    def from_lengths(
        cls, prompt_lens: np.ndarray, response_lens: np.ndarray, group: np.ndarray, device: torch.device | str
    ) -> SharedPrompts:
        """Groups ``g`` of ``prompt_lens[g]`` prompt tokens followed by the responses ``i`` with ``group[i] == g``
        (``group`` non-decreasing, every group at least one response), of ``response_lens[i]`` tokens each."""
        plen = np.asarray(prompt_lens, dtype=np.int64)
        rlen = np.asarray(response_lens, dtype=np.int64)
        group = np.asarray(group, dtype=np.int64)
        num_groups = len(plen)
        if num_groups == 0 or plen.min() < 1 or (len(rlen) and rlen.min() < 0):
            raise ValueError(f"prompts of {plen.tolist()} tokens, responses of {rlen.tolist()} tokens")
        steps = np.diff(group)
        if (
            len(group) != len(rlen)
            or not len(group)
            or group[0] != 0
            or group[-1] != num_groups - 1
            or np.any((steps != 0) & (steps != 1))
        ):
            raise ValueError(
                f"group must be non-decreasing over 0..{num_groups - 1}, one per response: {group.tolist()}"
            )
        opens = np.concatenate([[True], steps != 0])
        pieces = shared_prompt_layout(plen[group], rlen, opens)
        return cls(plen[group], rlen, opens, torch.from_numpy(pieces).to(device), int(pieces[:, :2].sum()))

    @cached_property
    def positions_(self) -> torch.Tensor:
        """int64 [T] RoPE positions, on the device."""
        piece_len, piece_shift = self.pieces[:, :2].reshape(-1), self.pieces[:, 2:4].reshape(-1)
        rows = torch.arange(self.num_rows, device=self.pieces.device)
        return rows - torch.repeat_interleave(piece_shift, piece_len, output_size=self.num_rows)

    @cached_property
    def groups(self) -> tuple[PromptGroup, ...]:
        """Per group its prompt, its responses and their rows in its padded response batch (made once, on the
        pieces' device)."""
        rlen, opens = self.response_lens, self.opens
        group = np.cumsum(opens) - 1
        # Padded rows: (rank of the response among its group's non-empty ones) x (group's longest) + row within.
        nonempty = np.cumsum(rlen > 0)
        rank = nonempty - 1 - (nonempty - (rlen > 0))[opens][group]
        longest = np.maximum.reduceat(rlen, np.flatnonzero(opens))
        rows = int(rlen.sum())
        shift, counts = torch.from_numpy(np.stack([rank * longest[group] - (np.cumsum(rlen) - rlen), rlen])).to(
            self.pieces.device
        )
        pad = torch.repeat_interleave(shift, counts, output_size=rows) + torch.arange(rows, device=shift.device)
        per_group = np.bincount(group, weights=rlen, minlength=len(longest)).astype(np.int64)
        lens = np.split(rlen, np.flatnonzero(opens)[1:])
        return tuple(
            PromptGroup(int(p), tuple(x.tolist()), rows)
            for p, x, rows in zip(self.prompt_len[opens].tolist(), lens, pad.split(per_group.tolist()), strict=True)
        )

    def positions(self, num_tokens: int) -> torch.Tensor:
        if num_tokens != self.num_rows:
            raise ValueError(f"the shared-prompt layout has {self.num_rows} tokens, got {num_tokens}")
        return self.positions_

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k, v = _repeat_kv(q, k, v)
        groups = self.groups
        pieces = [n for g in groups for n in (g.prompt_len, g.num_rows - g.prompt_len)]
        qs, ks, vs = q.split(pieces), k.split(pieces), v.split(pieces)
        outs = []
        for i, g in enumerate(groups):
            qp, kp, vp = (x[2 * i].transpose(0, 1).unsqueeze(0) for x in (qs, ks, vs))  # [1, H, P, D]
            outs.append(F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)[0].transpose(0, 1))
            if g.num_rows > g.prompt_len:
                outs.append(_responses_after_prompt(g, qs[2 * i + 1], ks[2 * i + 1], vs[2 * i + 1], kp, vp))
        return torch.cat(outs) if len(outs) > 1 else outs[0]


def _responses_after_prompt(
    g: PromptGroup, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor
) -> torch.Tensor:
    """Attention output [R, H, D] of one group's response rows (q, k, v: [R, H, D]) over the group's prompt
    keys/values (``kp``, ``vp``: [1, H, P, D]) and, causally, their own response's."""
    lens = [x for x in g.response_lens if x]
    n, longest, p = len(lens), max(lens), g.prompt_len
    if n > 1 and n * longest * (p + longest) <= PADDED_BATCH_MAX_WASTE * sum(x * (p + x) for x in lens):
        padded = []
        for x in (q, k, v):
            buf = x.new_zeros(n * longest, *x.shape[1:])
            buf[g.pad_rows] = x
            padded.append(buf.view(n, longest, *x.shape[1:]).transpose(1, 2))  # [n, H, L, D]
        qr, kr, vr = padded
        # Every response sees the prompt's keys first; padding sits after each response's last token, so the
        # lower-right causal mask keeps real queries off it, and padded query rows are dropped.
        keys = torch.cat([kp.expand(n, -1, -1, -1), kr], dim=2)
        values = torch.cat([vp.expand(n, -1, -1, -1), vr], dim=2)
        out = F.scaled_dot_product_attention(qr, keys, values, attn_mask=causal_lower_right(longest, p + longest))
        return out.transpose(1, 2).reshape(n * longest, *q.shape[1:])[g.pad_rows]
    outs = []
    for qs, ks, vs in zip(q.split(lens), k.split(lens), v.split(lens), strict=True):
        qs, ks, vs = (x.transpose(0, 1).unsqueeze(0) for x in (qs, ks, vs))
        keys, values = torch.cat([kp, ks], dim=2), torch.cat([vp, vs], dim=2)
        mask = causal_lower_right(qs.shape[2], keys.shape[2])
        outs.append(F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask)[0].transpose(0, 1))
    return torch.cat(outs) if len(outs) > 1 else outs[0]
