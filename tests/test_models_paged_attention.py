"""Paged decode attention: the Triton kernel (interpreted on CPU) and the CPU SDPA path against a float64
reference, odd sizes (block sizes 1 / 5 / 16, group sizes 1 / 3 / 7, head dims not a power of two, one-token
contexts, blocks shared by several sequences, unused blocks between the used ones); and what the rollout's
attention context reads: each cached block once, never a padded copy."""

import random

import pytest
import torch

from orz_fast.kernels.paged_attention import (
    MAX_GAP_BLOCKS,
    paged_decode_ref,
    paged_decode_torch,
    paged_decode_triton,
    plan_block_runs,
)
from orz_fast.models.attention import PackedSegments
from orz_fast.models.paged import DecodeRows, PagedAttention

ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3}


def paged_layout(seed: int, block_size: int, num_seqs: int, num_blocks: int, shared: int):
    """Block tables over a shuffled cache: the first sequences share ``shared`` leading blocks (a prompt's
    samples), one sequence has a one-token context, and some blocks are never used."""
    rng = random.Random(seed)
    free = list(range(num_blocks))
    rng.shuffle(free)
    prefix = [free.pop() for _ in range(shared)]
    tables, lens = [], []
    for b in range(num_seqs):
        n = 1 if b == num_seqs - 1 else rng.randint(1, 6 * block_size + 3)
        need = -(-n // block_size)
        if b < 3 and need > shared:
            table = prefix + [free.pop() for _ in range(need - shared)]
        else:
            table = [free.pop() for _ in range(need)]
        tables.append(table + [free[-1]] * rng.randint(0, 2))  # tables may be longer than the context needs
        lens.append(n)
    return tables, lens


def padded_tables(tables):
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "block_size, kv_heads, group, head_dim", [(16, 2, 4, 32), (5, 3, 1, 8), (1, 1, 7, 24), (16, 1, 3, 64)]
)
def test_paged_decode_matches_reference(dtype, block_size, kv_heads, group, head_dim):
    torch.manual_seed(0)
    tables, lens = paged_layout(block_size, block_size, num_seqs=7, num_blocks=120, shared=2)
    k_cache = torch.randn(120, block_size, kv_heads, head_dim).to(dtype)
    v_cache = torch.randn(120, block_size, kv_heads, head_dim).to(dtype)
    q = torch.randn(len(tables), kv_heads * group, head_dim).to(dtype)
    bt, cl = padded_tables(tables), torch.tensor(lens, dtype=torch.int32)
    ref = paged_decode_ref(q.double(), k_cache.double(), v_cache.double(), bt, cl)

    def err(x):
        return float((x.double() - ref).abs().max())

    same_dtype = paged_decode_ref(q, k_cache, v_cache, bt, cl)
    triton = paged_decode_triton(q, k_cache, v_cache, bt, cl)
    torch_path = paged_decode_torch(q, k_cache, v_cache, plan_block_runs(tables, lens, block_size))
    assert triton.dtype == torch_path.dtype == dtype
    bound = 2 * err(same_dtype) + ATOL[dtype]
    assert err(triton) <= bound, (err(triton), bound)
    assert err(torch_path) <= bound, (err(torch_path), bound)


def test_block_runs_read_each_used_block_once():
    """Shared blocks low, owned blocks high (the allocator's layout): two runs, each block in exactly one, a
    shared block read once for all its sequences, gaps up to MAX_GAP_BLOCKS merged and longer ones split."""
    shared = [0, 1, 2]
    owned_start = 50
    tables = [shared + [owned_start + i] for i in range(4)] + [[70, 71]]
    lens = [3 * 4 + 2] * 4 + [5]
    plan = plan_block_runs(tables, lens, 4)
    runs = sorted((r.lo, r.hi, r.width) for r in plan.runs)
    assert runs == [(0, 3, 4), (50, 54, 1), (70, 72, 1)]  # 54..69 is a gap of 16 > MAX_GAP_BLOCKS: split
    assert plan.blocks_read == 3 + 4 + 2
    near = plan_block_runs([[0], [MAX_GAP_BLOCKS + 1]], [1, 1], 4)
    assert [(r.lo, r.hi) for r in near.runs] == [(0, MAX_GAP_BLOCKS + 2)]
    with pytest.raises(ValueError, match="each context needs 1 .. len\\(table\\) blocks of 4"):
        plan_block_runs([[0]], [5], 4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_attention_context_writes_the_cache_and_counts_the_bytes_it_reads(backend):
    """A mixed step: one prompt (prefill) and two decode sequences sharing a prompt block. The decode rows equal
    causal attention over their full sequences; the context reports the K/V bytes read against the minimum."""
    torch.manual_seed(1)
    bs, hkv, g, d = 4, 2, 2, 8
    kv = torch.zeros(1, 2, 16, bs, hkv, d)
    # two decode sequences: context 7 (blocks 0, 15) and 6 (blocks 0, 14), prefix block 0 shared
    contexts = {0: ([0, 15], 7), 1: ([0, 14], 6)}
    full_k = {i: torch.randn(n, hkv, d) for i, (_, n) in contexts.items()}
    full_v = {i: torch.randn(n, hkv, d) for i, (_, n) in contexts.items()}
    full_k[1][:4], full_v[1][:4] = full_k[0][:4], full_v[0][:4]
    for i, (table, n) in contexts.items():
        for p in range(n - 1):  # all but the newest token are cached
            kv[0, 0, table[p // bs], p % bs] = full_k[i][p]
            kv[0, 1, table[p // bs], p % bs] = full_v[i][p]
    prompt = 5
    qp, kp, vp = torch.randn(prompt, hkv * g, d), torch.randn(prompt, hkv, d), torch.randn(prompt, hkv, d)
    qd = torch.randn(2, hkv * g, d)
    q = torch.cat([qp, qd])
    k = torch.cat([kp, full_k[0][-1:], full_k[1][-1:]])
    v = torch.cat([vp, full_v[0][-1:], full_v[1][-1:]])
    slots = [4 * 4 + p for p in range(4)] + [5 * 4] + [15 * 4 + 2, 14 * 4 + 1]  # prompt in blocks 4, 5
    ctx = PagedAttention(
        kv,
        positions=torch.tensor(list(range(prompt)) + [6, 5]),
        slots=torch.tensor(slots),
        prefill=PackedSegments.from_cu_seqlens(torch.tensor([0, prompt]), prompt),
        decode=DecodeRows(tables=[c[0] for c in contexts.values()], context_lens=[c[1] for c in contexts.values()]),
        output_rows=None,
        backend=backend,
    )
    out = ctx.attend(0, q, k, v)
    assert torch.equal(kv[0, 0, 4], kp[:4]) and torch.equal(kv[0, 1, 5, 0], vp[4])

    def causal_last(qrow, keys, values):
        keys, values = keys.repeat_interleave(g, 1), values.repeat_interleave(g, 1)
        scores = torch.einsum("hd,nhd->hn", qrow, keys) / d**0.5
        return torch.einsum("hn,nhd->hd", scores.softmax(-1), values)

    for row, i in ((prompt, 0), (prompt + 1, 1)):
        torch.testing.assert_close(out[row], causal_last(q[row], full_k[i], full_v[i]), rtol=0, atol=1e-5)
    token_bytes = 2 * hkv * d * 4
    assert ctx.kv_bytes_min == (7 + 6) * token_bytes
    if backend == "torch":  # shared block 0 read once; owned blocks 14, 15 read whole
        assert ctx.kv_bytes_read == 3 * bs * token_bytes
    else:  # each sequence's context, exactly
        assert ctx.kv_bytes_read == (7 + 6) * token_bytes
