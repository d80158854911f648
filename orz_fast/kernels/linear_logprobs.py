"""Fused linear log-probs: ``log_softmax(hidden @ weight.T / temperature)[t, targets[t]]`` and entropy.

The [T, V] logits are never held: tokens go in chunks of ``Tc`` rows (``Tc * V`` logits fit
in ``_CHUNK_BYTES``). Per chunk one GEMM makes the chunk's logits in the input dtype and a
row kernel reads them once, in vocab blocks of ``BV``, keeping in fp32 the online row max ``m``,
``s = sum exp(z - m)``, ``w = sum exp(z - m) * z`` (entropy) and the target logit ``z_tgt``.
From these four [T] vectors::

    lse = m + log s,   logp = z_tgt - lse,   entropy = lse - w / s

With a tensor-parallel group the weight is this rank's vocab shard ``[V/tp, H]`` (equal shards,
rank r holding ids ``[r * V/tp, (r + 1) * V/tp)``) and the four vectors are combined across
ranks with one MAX and one SUM all-reduce of [T]-sized tensors.

A padded vocabulary (``vocab_size`` below the weight's rows, or below ``tp * V/tp``): ids from
``vocab_size`` on are excluded from the softmax by narrowing, not masking. Each rank keeps the
first ``valid`` rows of its shard (the ids below ``vocab_size``; possibly none), the logits GEMM
runs over ``valid`` rounded up to a multiple of 64 rows (an aligned row stride for the GEMM
output) and the row kernels read only the first ``valid`` columns, so the hot loops are the
unpadded ones. The gradient of the padding rows is zero.

Backward recomputes each chunk's logits, turns them in place into
``dz = (g_logp * (onehot - p) - g_ent * p * (z - w/s)) / temperature`` with a second row
kernel, then ``dhidden = dz @ weight`` and ``dweight += dz.T @ hidden`` (dweight accumulated
in fp32 across chunks; with a TP group dhidden is all-reduced, so callers must not add their
own all-reduce of the LM head input's gradient). The GEMMs are cuBLAS (torch.matmul); the
softmax / entropy / gradient epilogues are the Triton kernels below, or the equivalent torch
ops on the CPU path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from orz_fast.kernels.utils import check_triton_device, next_power_of_2

_CHUNK_BYTES = 1 << 30
_MAX_BV = 4096
_ALIGN_COLS = 64


@triton.jit
def _linear_logprobs_fwd_kernel(
    logits_ptr,
    targets_ptr,
    stats_ptr,
    stride_t,
    T,
    V,
    vocab_start,
    inv_temp,
    BV: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    p_row = logits_ptr + i_t * stride_t
    o_1 = tl.arange(0, 1)
    b_m = tl.full([1], float("-inf"), dtype=tl.float32)
    b_s = tl.zeros([1], dtype=tl.float32)
    b_w = tl.zeros([1], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        # [BV]
        b_z = tl.load(p_row + o_v, mask=m_v, other=float("-inf")).to(tl.float32) * inv_temp
        b_m_new = tl.maximum(b_m, tl.max(b_z, axis=0, keep_dims=True))
        b_scale = tl.exp(b_m - b_m_new)
        b_p = tl.exp(b_z - b_m_new)
        b_s = b_s * b_scale + tl.sum(b_p, axis=0, keep_dims=True)
        if HAS_ENTROPY:
            b_w = b_w * b_scale + tl.sum(b_p * tl.where(m_v, b_z, 0.0), axis=0, keep_dims=True)
        b_m = b_m_new
    # [1]: this row's target id within the shard; other ranks hold it when out of range
    o_tgt = tl.load(targets_ptr + i_t + o_1).to(tl.int64) - vocab_start
    m_tgt = (o_tgt >= 0) & (o_tgt < V)
    b_z_tgt = tl.load(p_row + tl.where(m_tgt, o_tgt, 0), mask=m_tgt, other=0.0).to(tl.float32) * inv_temp
    tl.store(stats_ptr + i_t + o_1, b_m)
    tl.store(stats_ptr + T + i_t + o_1, b_s)
    tl.store(stats_ptr + 2 * T + i_t + o_1, b_w)
    tl.store(stats_ptr + 3 * T + i_t + o_1, b_z_tgt)


@triton.jit
def _linear_logprobs_bwd_kernel(
    logits_ptr,
    targets_ptr,
    lse_ptr,
    mu_ptr,
    dlogp_ptr,
    dent_ptr,
    stride_t,
    V,
    vocab_start,
    inv_temp,
    BV: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    p_row = logits_ptr + i_t * stride_t
    b_lse = tl.load(lse_ptr + i_t)
    b_g = tl.load(dlogp_ptr + i_t)
    if HAS_ENTROPY:
        b_ge = tl.load(dent_ptr + i_t)
        b_mu = tl.load(mu_ptr + i_t)
    i_tgt = tl.load(targets_ptr + i_t).to(tl.int64) - vocab_start
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        # [BV]
        b_z = tl.load(p_row + o_v, mask=m_v, other=0.0).to(tl.float32) * inv_temp
        b_p = tl.exp(b_z - b_lse)
        b_dz = tl.where(o_v == i_tgt, b_g, 0.0) - b_g * b_p
        if HAS_ENTROPY:
            b_dz -= b_ge * b_p * (b_z - b_mu)
        tl.store(p_row + o_v, (b_dz * inv_temp).to(logits_ptr.dtype.element_ty), mask=m_v)


def chunk_tokens_for(T: int, V: int, dtype: torch.dtype) -> int:
    """Rows per chunk so that one chunk of [rows, V] logits in ``dtype`` fits in ``_CHUNK_BYTES``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, min(T, _CHUNK_BYTES // max(1, V * itemsize)))


def row_stats(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int,
    inv_temp: float,
    entropy: bool,
    use_triton: bool,
) -> torch.Tensor:
    """Per-row (max, sum-exp, sum-exp * z, target logit) of ``logits * inv_temp``: fp32 [4, Tc]."""
    Tc, V = logits.shape
    if use_triton:
        check_triton_device(logits, targets)
        stats = torch.empty(4, Tc, dtype=torch.float32, device=logits.device)
        if Tc > 0:
            _linear_logprobs_fwd_kernel[(Tc,)](
                logits,
                targets,
                stats,
                logits.stride(0),
                Tc,
                V,
                vocab_start,
                inv_temp,
                BV=min(next_power_of_2(V), _MAX_BV),
                HAS_ENTROPY=entropy,
                num_warps=8,
            )
        return stats
    z = logits.float() * inv_temp if inv_temp != 1.0 else logits.float()
    # (m, s) only matter through m + log s, so the torch path stores (lse, 1); an empty shard gives lse = -inf
    lse = torch.logsumexp(z, dim=1)
    if V == 0:
        zeros = torch.zeros_like(lse)
        return torch.stack([lse, torch.ones_like(lse), zeros, zeros])
    w = torch.exp(z - lse[:, None]).mul_(z).sum(dim=1) if entropy else torch.zeros_like(lse)
    local = targets.to(torch.int64) - vocab_start
    in_shard = (local >= 0) & (local < V)
    z_tgt = z.gather(1, local.clamp(0, V - 1)[:, None]).squeeze(1) * in_shard
    return torch.stack([lse, torch.ones_like(lse), w, z_tgt])


def row_grads_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int,
    inv_temp: float,
    lse: torch.Tensor,
    mu: torch.Tensor,
    dlogp: torch.Tensor,
    dent: torch.Tensor | None,
    use_triton: bool,
) -> torch.Tensor:
    """Overwrite ``logits`` [Tc, V] with the gradient of the loss w.r.t. ``hidden @ weight.T``; returns it.

    ``lse``, ``mu`` (= w / s), ``dlogp`` and ``dent`` are fp32 [Tc], combined over the vocab.
    """
    Tc, V = logits.shape
    if use_triton:
        check_triton_device(logits, targets, lse, mu, dlogp)
        if Tc > 0:
            _linear_logprobs_bwd_kernel[(Tc,)](
                logits,
                targets,
                lse,
                mu,
                dlogp,
                dent if dent is not None else dlogp,
                logits.stride(0),
                V,
                vocab_start,
                inv_temp,
                BV=min(next_power_of_2(V), _MAX_BV),
                HAS_ENTROPY=dent is not None,
                num_warps=8,
            )
        return logits
    if V == 0:
        return logits
    z = logits.float() * inv_temp if inv_temp != 1.0 else logits.float()
    p = torch.exp(z - lse[:, None])
    if dent is not None:
        dz = z.sub(mu[:, None]).mul_(dent[:, None]).add_(dlogp[:, None]).mul_(p).neg_()
    else:
        dz = p.mul_(-dlogp[:, None])
    local = targets.to(torch.int64) - vocab_start
    in_shard = (local >= 0) & (local < V)
    dz.scatter_add_(1, local.clamp(0, V - 1)[:, None], (dlogp * in_shard)[:, None])
    if inv_temp != 1.0:
        dz.mul_(inv_temp)
    return logits.copy_(dz)


def combine_vocab_stats(
    stats: torch.Tensor, tp_group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine per-shard [4, T] row statistics over ``tp_group``. Returns (lse, mu, logp), fp32 [T].

    ``mu = sum softmax * z`` so that ``entropy = lse - mu``.
    """
    m, s, w, z_tgt = stats.unbind(0)
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        m_all = m.clone()
        dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=tp_group)
        scale = torch.exp(m - m_all)
        summed = torch.stack([s * scale, w * scale, z_tgt])
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=tp_group)
        m = m_all
        s, w, z_tgt = summed.unbind(0)
    lse = m + torch.log(s)
    return lse, w / s, z_tgt - lse


def vocab_start_of(weight: torch.Tensor, tp_group: dist.ProcessGroup | None) -> int:
    """First global vocab id of this rank's shard (equal shards in rank order)."""
    if tp_group is None:
        return 0
    return dist.get_rank(tp_group) * weight.shape[0]


def shard_columns(rows: int, vocab_start: int, vocab_size: int | None) -> tuple[int, int]:
    """``(valid, cols)`` of a vocab shard of ``rows`` rows whose first id is ``vocab_start``.

    ``valid``: its rows with an id below ``vocab_size`` (all of them when ``vocab_size`` is None;
    0 for a shard of padding only). ``cols``: the rows the logits GEMM covers, ``valid`` rounded up
    to a multiple of 64 within the shard, so the [Tc, cols] logits keep an aligned row stride.
    """
    if vocab_size is None:
        return rows, rows
    valid = min(rows, max(0, vocab_size - vocab_start))
    return valid, min(rows, -(-valid // _ALIGN_COLS) * _ALIGN_COLS)


class LinearLogprobsFunction(torch.autograd.Function):
    """Chunked log-probs (and entropy) of a linear head; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(
        ctx, hidden, weight, targets, temperature, tp_group, return_entropy, use_triton, chunk_tokens, vocab_size
    ):
        T = hidden.shape[0]
        targets = targets.contiguous()
        inv_temp = 1.0 / temperature
        vocab_start = vocab_start_of(weight, tp_group)
        valid, cols = shard_columns(weight.shape[0], vocab_start, vocab_size)
        w = weight[:cols]
        Tc = chunk_tokens or chunk_tokens_for(T, cols, hidden.dtype)
        stats = torch.empty(4, T, dtype=torch.float32, device=hidden.device)
        for t0 in range(0, T, Tc):
            logits = (hidden[t0 : t0 + Tc] @ w.T)[:, :valid]
            stats[:, t0 : t0 + Tc] = row_stats(
                logits, targets[t0 : t0 + Tc], vocab_start, inv_temp, return_entropy, use_triton
            )
        lse, mu, logp = combine_vocab_stats(stats, tp_group)
        ctx.save_for_backward(hidden, weight, targets, lse, mu)
        ctx.config = (inv_temp, tp_group, return_entropy, use_triton, Tc, vocab_start, valid, cols)
        if return_entropy:
            return logp, lse - mu
        return logp

    @staticmethod
    def backward(ctx, grad_logp, *grad_rest):
        hidden, weight, targets, lse, mu = ctx.saved_tensors
        inv_temp, tp_group, return_entropy, use_triton, Tc, vocab_start, valid, cols = ctx.config
        T, H = hidden.shape
        # incoming gradients may be stride-0 expansions (from .sum()); the kernels index them densely
        dlogp = grad_logp.float().contiguous() if grad_logp is not None else torch.zeros_like(lse)
        dent = None
        if return_entropy and grad_rest and grad_rest[0] is not None:
            dent = grad_rest[0].float().contiguous()
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        tp = tp_group is not None and dist.get_world_size(tp_group) > 1
        dhidden = (
            torch.empty(T, H, dtype=torch.float32 if tp else hidden.dtype, device=hidden.device) if need_dh else None
        )
        dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        w = weight[:cols]
        for t0 in range(0, T, Tc):
            sl = slice(t0, t0 + Tc)
            dz = row_grads_(
                (hidden[sl] @ w.T)[:, :valid],
                targets[sl],
                vocab_start,
                inv_temp,
                lse[sl],
                mu[sl],
                dlogp[sl],
                dent[sl] if dent is not None else None,
                use_triton,
            )
            accumulate_linear_grads(
                dz, hidden[sl], w[:valid], dhidden[sl] if need_dh else None, dweight[:valid] if need_dw else None
            )
        if need_dh and tp:
            dist.all_reduce(dhidden, group=tp_group)
        return (
            dhidden.to(hidden.dtype) if need_dh else None,
            dweight.to(weight.dtype) if need_dw else None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def accumulate_linear_grads(
    dz: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    dhidden_out: torch.Tensor | None,
    dweight_acc: torch.Tensor | None,
) -> None:
    """``dhidden_out = dz @ weight`` and ``dweight_acc += dz.T @ hidden`` (fp32 accumulator; ``dz`` may be
    a column slice of a wider buffer)."""
    if dhidden_out is not None:
        if dhidden_out.dtype == dz.dtype:
            torch.matmul(dz, weight, out=dhidden_out)
        else:
            dhidden_out.copy_(dz @ weight)
    if dweight_acc is not None:
        if dz.dtype == torch.float32:
            dweight_acc.addmm_(dz.T, hidden)
        else:
            dweight_acc += dz.T @ hidden


def linear_logprobs_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    return_entropy: bool = False,
    use_triton: bool = True,
    chunk_tokens: int | None = None,
    vocab_size: int | None = None,
):
    """Log-probs fp32 [T] (and entropy fp32 [T]) of ``hidden [T, H] @ weight [V, H].T / temperature``.

    ``vocab_size``: the real vocabulary; ids from it on (padding rows of ``weight``, on any TP rank)
    are left out of the softmax. ``chunk_tokens`` overrides the rows per chunk (tests use it to
    force several chunks).
    """
    return LinearLogprobsFunction.apply(
        hidden, weight, targets, float(temperature), tp_group, return_entropy, use_triton, chunk_tokens, vocab_size
    )


def linear_logprobs_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    upcast: bool = True,
):
    """Plain torch reference holding the [T, V] logits. ``upcast`` does the softmax in fp32 at least."""
    logits = (hidden @ weight.T) / temperature
    if upcast and logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    logprobs_all = torch.log_softmax(logits, dim=-1)
    logp = logprobs_all.gather(1, targets.long()[:, None]).squeeze(1)
    if not return_entropy:
        return logp
    return logp, -(logprobs_all.exp() * logprobs_all).sum(-1)
