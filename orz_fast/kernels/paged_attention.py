"""Decode attention over a paged KV cache: one query token per sequence, each cached K/V read once.

The cache of one layer is ``k_cache``, ``v_cache`` [num_blocks, block_size, Hkv, D]; sequence ``b``
holds token ``p`` in slot ``p % block_size`` of block ``block_tables[b, p // block_size]`` and
attends to its first ``context_lens[b]`` tokens. Query head ``h`` reads K/V head ``h // G``
(``G = Hq / Hkv``, grouped-query attention). Two implementations, neither of which copies the cache:

- ``paged_decode_triton``: one program per (sequence, K/V head) walks the sequence's context in
  tiles of ``BS`` positions, loads each position's K and V row once (its block looked up in the
  block table), and keeps an online softmax for the ``G`` query heads of the group (flash-decoding
  without the split). It reads exactly the sequence's context.
- ``paged_decode_torch`` (CPU): PyTorch has no gather-free paged attention, so the work is turned
  around: a run of consecutive physical blocks is a strided *view* of the cache, and one SDPA call
  (batch = the blocks of the run) attends every query that uses a block to that block alone, with
  each block's log-sum-exp; the per-block results of a sequence are then merged by their
  log-sum-exps. A block held by ``r`` sequences (a prompt shared by ``r`` samples) is read once for
  all of them. :func:`plan_block_runs` builds the runs and indices once per step (all layers share
  them). What it reads is the blocks of its runs: the live ones, plus free blocks inside a run
  (runs merge across gaps of at most ``MAX_GAP_BLOCKS``).

``paged_decode_ref`` is the plain reference (a per-sequence gather and softmax), for tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from orz_fast.kernels.utils import check_triton_device, next_power_of_2

MAX_GAP_BLOCKS = 8
"""Runs of used blocks closer than this many unused blocks are read as one run (one SDPA call)."""
_MIN_DOT = 16


@triton.jit
def _paged_decode_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    tables_ptr,
    lens_ptr,
    stride_qb,
    stride_qh,
    stride_kn,
    stride_ks,
    stride_kh,
    stride_vn,
    stride_vs,
    stride_vh,
    stride_ob,
    stride_oh,
    stride_tb,
    qk_scale,
    G: tl.constexpr,
    S: tl.constexpr,
    D: tl.constexpr,
    BG: tl.constexpr,
    BS: tl.constexpr,
    BD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    ctx = tl.load(lens_ptr + i_b).to(tl.int64)
    o_g = tl.arange(0, BG)
    o_s = tl.arange(0, BS)
    o_d = tl.arange(0, BD)
    m_g = o_g < G
    m_d = o_d < D
    # [BG, BD]: the group's query heads, rows past G are zero and never stored
    p_q = q_ptr + i_b * stride_qb + (i_h * G + o_g)[:, None] * stride_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_g[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    b_m = tl.full([BG], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BG], dtype=tl.float32)
    b_acc = tl.zeros([BG, BD], dtype=tl.float32)
    for i_t in range(0, tl.cdiv(ctx, BS)):
        p_pos = i_t * BS + o_s
        m_pos = p_pos < ctx
        # [BS]: the physical block and slot of each position
        b_blk = tl.load(tables_ptr + i_b * stride_tb + p_pos // S, mask=m_pos, other=0).to(tl.int64)
        b_slot = (p_pos % S).to(tl.int64)
        m_kv = m_pos[:, None] & m_d[None, :]
        # [BS, BD]
        b_k = tl.load(
            k_ptr + b_blk[:, None] * stride_kn + b_slot[:, None] * stride_ks + i_h * stride_kh + o_d[None, :],
            mask=m_kv,
            other=0.0,
        ).to(tl.float32)
        # [BS, BD]
        b_v = tl.load(
            v_ptr + b_blk[:, None] * stride_vn + b_slot[:, None] * stride_vs + i_h * stride_vh + o_d[None, :],
            mask=m_kv,
            other=0.0,
        ).to(tl.float32)
        # [BG, BS], in log2 units
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
        b_s = tl.where(m_pos[None, :], b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
        b_alpha = tl.exp2(b_m - b_m_new)
        b_p = tl.exp2(b_s - b_m_new[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p, b_v, input_precision=PRECISION)
        b_m = b_m_new
    b_o = b_acc / b_l[:, None]
    p_o = o_ptr + i_b * stride_ob + (i_h * G + o_g)[:, None] * stride_oh + o_d[None, :]
    tl.store(p_o, b_o, mask=m_g[:, None] & m_d[None, :])


def _check_shapes(q, k_cache, v_cache, block_tables, context_lens) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"paged decode attention: expected q [B, Hq, D] and k_cache, v_cache [num_blocks, block_size, Hkv, D], "
            f"got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    if k_cache.shape[3] != D or Hq % Hkv != 0:
        raise ValueError(
            f"paged decode attention: q {tuple(q.shape)} needs a head dim equal to the cache's and Hq a multiple "
            f"of Hkv, got k_cache {tuple(k_cache.shape)}"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != B or tuple(context_lens.shape) != (B,):
        raise ValueError(
            f"paged decode attention: block_tables [B, M] and context_lens [B] must match q's B={B}, "
            f"got {tuple(block_tables.shape)} and {tuple(context_lens.shape)}"
        )


def paged_decode_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> torch.Tensor:
    """Launch ``_paged_decode_fwd_kernel``, one program per (sequence, K/V head). Returns [B, Hq, D].

    ``block_tables`` int [B, M] and ``context_lens`` int [B] (each >= 1) on the cache's device. The dot
    products take fp32 operands: exact IEEE ones for an fp32 cache; TF32 for a 16-bit cache, which holds
    bf16/fp16 values exactly (only the softmax weights are rounded, to TF32's 10 mantissa bits)."""
    _check_shapes(q, k_cache, v_cache, block_tables, context_lens)
    check_triton_device(q, k_cache, v_cache, block_tables, context_lens, kernel=_paged_decode_fwd_kernel)
    B, Hq, D = q.shape
    _, S, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    q = q if q.stride(-1) == 1 else q.contiguous()
    # fp32 out, rounded by torch: [B, Hq, D] is small, and Triton's interpreter truncates a float -> bf16 store
    out = torch.empty(B, Hq, D, dtype=torch.float32, device=q.device)
    if B == 0:
        return out.to(q.dtype)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("paged decode attention: the KV cache's last dimension must be contiguous")
    block_tables = block_tables.contiguous()
    _paged_decode_fwd_kernel[(B, Hkv)](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        context_lens.contiguous(),
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        math.log2(math.e) / math.sqrt(D),
        G=G,
        S=S,
        D=D,
        BG=max(_MIN_DOT, next_power_of_2(G)),
        BS=32,
        BD=max(_MIN_DOT, next_power_of_2(D)),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    return out.to(q.dtype)


@dataclass
class BlockRun:
    """One SDPA call of the CPU path: blocks ``lo .. hi - 1`` and the (sequence, block) pairs that read them."""

    lo: int
    hi: int
    width: int
    """Query slots per block: the most sequences that read one block of the run."""
    q_block: torch.Tensor
    """int64 [P]: each pair's block, ``block - lo``."""
    q_slot: torch.Tensor
    """int64 [P]: each pair's query slot in its block (its rank among the block's readers)."""
    q_rows: torch.Tensor
    """int64 [P]: each pair's sequence (row of q)."""
    out_index: torch.Tensor
    """int64 [P]: where each pair's partial result goes, ``row * max_blocks + position of the block in the row``."""
    live: torch.Tensor
    """int64 [P]: tokens of the block the pair attends to (its context's share of the block)."""

    def head_rows(self, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices, pair-major then K/V head, into q viewed [B * Hkv, G * D] and into the run's queries viewed
        [(hi - lo) * Hkv * width, G * D]: the gathers that place and pick the pairs' query groups."""
        h = torch.arange(kv_heads)
        src = (self.q_rows[:, None] * kv_heads + h).flatten()
        dst = ((self.q_block[:, None] * kv_heads + h) * self.width + self.q_slot[:, None]).flatten()
        return src, dst

    def bias(self, group: int, block_size: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [hi - lo, 1, width * group, block_size]: 0 on a slot's live tokens, -inf after (slots no
        pair uses see the whole block: finite results nobody reads)."""
        n = self.hi - self.lo
        live = torch.full((n, self.width), block_size, dtype=torch.int64)
        live[self.q_block, self.q_slot] = self.live
        dead = torch.arange(block_size) >= live[:, :, None]
        bias = torch.zeros(dead.shape, dtype=dtype).masked_fill_(dead, float("-inf"))
        return bias[:, :, None, :].expand(n, self.width, group, block_size).reshape(n, 1, self.width * group, -1)


@dataclass
class BlockPlan:
    """The runs of one decode step (shared by every layer), from :func:`plan_block_runs`."""

    runs: list[BlockRun]
    num_rows: int
    max_blocks: int
    block_size: int
    _buffers: dict = field(default_factory=dict)

    @property
    def blocks_read(self) -> int:
        """Blocks the step's SDPA calls read per layer (each K and V block once)."""
        return sum(r.hi - r.lo for r in self.runs)

    def buffers(self, dtype: torch.dtype, kv_heads: int, group: int, head_dim: int):
        """Per-step work buffers, made at the first layer and reused by the others (every layer writes the same
        positions): per run its queries [n, Hkv, width, G * D] (zero where no pair is) and additive mask; the
        partial results [B * M, Hq, D] and their log-sum-exps [B * M, Hq] (-inf where a row has no block)."""
        key = (dtype, kv_heads, group, head_dim)
        if key not in self._buffers:
            B, M, Hq = self.num_rows, self.max_blocks, kv_heads * group
            queries = [torch.zeros(r.hi - r.lo, kv_heads, r.width, group * head_dim, dtype=dtype) for r in self.runs]
            masks = [r.bias(group, self.block_size, dtype) for r in self.runs]
            indices = [r.head_rows(kv_heads) for r in self.runs]
            out = torch.zeros(B * M, Hq * head_dim, dtype=torch.promote_types(dtype, torch.float32))
            lse = torch.full((B * M, Hq), float("-inf"), dtype=torch.float32)
            self._buffers[key] = (queries, masks, indices, out, lse)
        return self._buffers[key]


def plan_block_runs(block_tables: list[list[int]], context_lens: list[int], block_size: int) -> BlockPlan:
    """Group the blocks a decode step reads into runs of consecutive physical ids, one SDPA call each.

    Blocks read by several sequences and blocks read by one are planned separately (a run's query
    slots per block are its most-shared block's readers), each as runs that merge across gaps of at
    most :data:`MAX_GAP_BLOCKS` unused blocks. Host tensors only.
    """
    counts = [-(-n // block_size) for n in context_lens]
    if any(c < 1 or c > len(t) for c, t in zip(counts, block_tables, strict=True)):
        raise ValueError(
            f"paged decode plan: each context needs 1 .. len(table) blocks of {block_size}, got context lens "
            f"{context_lens} for tables of {[len(t) for t in block_tables]} blocks"
        )
    # one (sequence, block) pair per block a context uses: its row, position in the row, block id, live tokens
    rows = torch.tensor([i for i, c in enumerate(counts) for _ in range(c)], dtype=torch.int64)
    pos = torch.tensor([j for c in counts for j in range(c)], dtype=torch.int64)
    blocks = torch.tensor([b for t, c in zip(block_tables, counts, strict=True) for b in t[:c]], dtype=torch.int64)
    live = torch.tensor(
        [min(block_size, n - j * block_size) for n, c in zip(context_lens, counts, strict=True) for j in range(c)],
        dtype=torch.int64,
    )
    max_blocks = max(counts)
    readers = torch.bincount(blocks)
    runs = []
    for shared in (True, False):
        sel = torch.nonzero((readers[blocks] > 1) == shared).flatten()
        if sel.numel() == 0:
            continue
        ids = torch.unique(blocks[sel])  # sorted
        cuts = torch.nonzero(ids[1:] - ids[:-1] > MAX_GAP_BLOCKS + 1).flatten() + 1
        bounds = [0, *cuts.tolist(), ids.numel()]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            lo, hi = int(ids[a]), int(ids[b - 1]) + 1
            pick = sel[(blocks[sel] >= lo) & (blocks[sel] < hi)]
            blk = blocks[pick] - lo
            if shared:
                order = torch.argsort(blk, stable=True)
                sorted_blk = blk[order]
                slot = torch.empty_like(blk)
                slot[order] = torch.arange(blk.numel()) - torch.searchsorted(sorted_blk, sorted_blk)
            else:
                slot = torch.zeros_like(blk)
            runs.append(
                BlockRun(
                    lo=lo,
                    hi=hi,
                    width=int(slot.max()) + 1,
                    q_block=blk,
                    q_slot=slot,
                    q_rows=rows[pick],
                    out_index=rows[pick] * max_blocks + pos[pick],
                    live=live[pick],
                )
            )
    return BlockPlan(runs=runs, num_rows=len(counts), max_blocks=max_blocks, block_size=block_size)


def paged_decode_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """CPU paged decode attention over ``plan``'s block runs (no copy of the cache). Returns [B, Hq, D]."""
    B, Hq, D = q.shape
    _, S, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    if plan.num_rows != B or plan.block_size != S:
        raise ValueError(
            f"paged decode attention: the plan is for {plan.num_rows} rows of blocks of {plan.block_size}, "
            f"got q {tuple(q.shape)} and a cache of blocks of {S}"
        )
    queries, masks, indices, out_rows, lse_rows = plan.buffers(q.dtype, Hkv, G, D)
    q_groups = q.reshape(B * Hkv, G * D)
    for run, qb, mask, (src, dst) in zip(plan.runs, queries, masks, indices, strict=True):
        n, w = run.hi - run.lo, run.width
        qb.view(-1, G * D).index_copy_(0, dst, q_groups.index_select(0, src))
        # [n, Hkv, w * G, D]: the queries of each block's readers; the blocks are a view of the cache
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qb.view(n, Hkv, w * G, D),
            k_cache[run.lo : run.hi].transpose(1, 2),
            v_cache[run.lo : run.hi].transpose(1, 2),
            attn_mask=mask,
        )
        picked = out.view(-1, G * D).index_select(0, dst).view(-1, Hq * D)  # [P, Hq * D]
        out_rows.index_copy_(0, run.out_index, picked.to(out_rows.dtype))
        lse_rows.index_copy_(0, run.out_index, lse.reshape(-1, G).index_select(0, dst).view(-1, Hq))
    # merge each row's per-block results in fp32: weights softmax(lse) over its blocks
    M = plan.max_blocks
    weights = torch.softmax(lse_rows.view(B, M, Hq), dim=1)
    return torch.einsum("bmh,bmhd->bhd", weights, out_rows.view(B, M, Hq, D)).to(q.dtype)


def paged_decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> torch.Tensor:
    """Reference: each sequence's context gathered from its blocks, softmax attention in q's dtype."""
    _check_shapes(q, k_cache, v_cache, block_tables, context_lens)
    B, Hq, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    for b in range(B):
        n = int(context_lens[b])
        blocks = block_tables[b, : -(-n // S)].long()
        k = k_cache[blocks].reshape(-1, Hkv, D)[:n].repeat_interleave(Hq // Hkv, dim=1)  # [n, Hq, D]
        v = v_cache[blocks].reshape(-1, Hkv, D)[:n].repeat_interleave(Hq // Hkv, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b], k) / math.sqrt(D)
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), v)
    return out
