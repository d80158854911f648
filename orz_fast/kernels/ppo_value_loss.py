"""Clipped PPO value loss over packed tokens, with its statistics, in one pass.

Per token, with ``V_clip = old + clamp(V - old, -c, c)`` (computed as ``clamp(V, old - c, old + c)``
so that unclipped tokens keep ``V_clip == V`` exactly and never count as clipped)::

    loss_t = 0.5 * max((V - R)^2, (V_clip - R)^2)

and ``loss = sum(mask * loss_t) / max(sum(mask), 1)``. The forward kernel reads the four inputs
once and writes per-block partial sums (loss, token count, clipped count, and the sums behind
explained variance: R, R^2, E = R - V, E^2) plus, when a gradient is needed,
``mask * dloss_t/dV`` per token; backward is one scale by ``grad_out / count``. The raw sums are
returned too so data-parallel ranks can all-reduce them and combine exactly. A NaN input gives
a NaN loss and NaN in the sums it enters, as in the torch path (min/max propagate NaN).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from orz_fast.kernels.utils import check_triton_device, loadable_mask, maximum_nan, minimum_nan

_N_PARTIALS = 7
_STAT_NAMES = (
    "clipfrac",
    "explained_variance",
    "returns_sum",
    "returns_sq_sum",
    "error_sum",
    "error_sq_sum",
    "num_tokens",
)


@triton.jit
def _ppo_value_loss_fwd_kernel(
    values_ptr,
    old_ptr,
    returns_ptr,
    mask_ptr,
    dvalues_ptr,
    partial_ptr,
    T,
    clip,
    BT: tl.constexpr,
    N_PARTIALS: tl.constexpr,
    STORE_GRAD: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_t = i_b * BT + tl.arange(0, BT)
    m_t = o_t < T
    # [BT]
    b_v = tl.load(values_ptr + o_t, mask=m_t, other=0).to(tl.float32)
    # [BT]
    b_old = tl.load(old_ptr + o_t, mask=m_t, other=0).to(tl.float32)
    # [BT]
    b_ret = tl.load(returns_ptr + o_t, mask=m_t, other=0).to(tl.float32)
    # [BT]
    b_mask = tl.load(mask_ptr + o_t, mask=m_t, other=0).to(tl.float32)
    # clamp V itself (not old + clamp(V - old)) so an unclipped token keeps V bit for bit;
    # NaN-propagating min/max, as torch's clamp: a NaN input gives a NaN loss
    b_v_clip = minimum_nan(maximum_nan(b_v, b_old - clip), b_old + clip)
    b_err_raw = b_v - b_ret
    b_err_clip = b_v_clip - b_ret
    b_sq_raw = b_err_raw * b_err_raw
    b_sq_clip = b_err_clip * b_err_clip
    b_is_clipped = b_sq_clip > b_sq_raw
    b_loss = 0.5 * maximum_nan(b_sq_raw, b_sq_clip)
    if STORE_GRAD:
        # the clipped branch wins only when V - old is outside [-c, c], where its slope is 0
        b_grad = tl.where(b_is_clipped, 0.0, b_err_raw) * b_mask
        tl.store(dvalues_ptr + o_t, b_grad, mask=m_t)
    b_e = -b_err_raw
    p_out = partial_ptr + i_b * N_PARTIALS
    tl.store(p_out + 0, tl.sum(b_loss * b_mask, axis=0))
    tl.store(p_out + 1, tl.sum(b_mask, axis=0))
    tl.store(p_out + 2, tl.sum(tl.where(b_is_clipped, b_mask, 0.0), axis=0))
    tl.store(p_out + 3, tl.sum(b_ret * b_mask, axis=0))
    tl.store(p_out + 4, tl.sum(b_ret * b_ret * b_mask, axis=0))
    tl.store(p_out + 5, tl.sum(b_e * b_mask, axis=0))
    tl.store(p_out + 6, tl.sum(b_e * b_e * b_mask, axis=0))


def explained_variance(
    returns_sum: torch.Tensor,
    returns_sq_sum: torch.Tensor,
    error_sum: torch.Tensor,
    error_sq_sum: torch.Tensor,
    count: torch.Tensor,
) -> torch.Tensor:
    """``1 - Var(R - V) / Var(R)`` from masked sums (0 where Var(R) is 0); tensors, no host sync."""
    n = count.clamp(min=1.0)
    var_ret = returns_sq_sum / n - (returns_sum / n) ** 2
    var_err = error_sq_sum / n - (error_sum / n) ** 2
    safe = var_ret > 0
    return torch.where(safe, 1.0 - var_err / torch.where(safe, var_ret, torch.ones_like(var_ret)), 0.0)


def _stats_from_sums(sums: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, stats) from the 7 masked sums, as 0-dim tensors."""
    count = sums[1].clamp(min=1.0)
    stats = {
        "clipfrac": sums[2] / count,
        "explained_variance": explained_variance(sums[3], sums[4], sums[5], sums[6], sums[1]),
        "returns_sum": sums[3],
        "returns_sq_sum": sums[4],
        "error_sum": sums[5],
        "error_sq_sum": sums[6],
        "num_tokens": sums[1],
    }
    return sums[0] / count, stats


def ppo_value_loss_fwd(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    store_grad: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """Launch the forward kernel. Returns (loss, stats, ``mask * dloss_t/dV`` [T] fp32 or None)."""
    check_triton_device(values, old_values, returns, mask, kernel=_ppo_value_loss_fwd_kernel)
    T = values.numel()
    BT = 2048
    n_blocks = max(1, triton.cdiv(T, BT))
    partials = torch.empty(n_blocks, _N_PARTIALS, dtype=torch.float32, device=values.device)
    dvalues = torch.empty(T, dtype=torch.float32, device=values.device) if store_grad else None
    _ppo_value_loss_fwd_kernel[(n_blocks,)](
        values.contiguous(),
        old_values.contiguous(),
        returns.contiguous(),
        loadable_mask(mask.contiguous()),
        dvalues if store_grad else partials,
        partials,
        T,
        float(clip),
        BT=BT,
        N_PARTIALS=_N_PARTIALS,
        STORE_GRAD=store_grad,
        num_warps=8,
    )
    loss, stats = _stats_from_sums(partials.sum(0))
    return loss, stats, dvalues


class PPOValueLossFunction(torch.autograd.Function):
    """Autograd wrapper: the forward kernel stores the per-token slope, backward scales it."""

    @staticmethod
    def forward(ctx, values, old_values, returns, mask, clip):
        loss, stats, dvalues = ppo_value_loss_fwd(
            values, old_values, returns, mask, clip, store_grad=ctx.needs_input_grad[0]
        )
        ctx.save_for_backward(dvalues, stats["num_tokens"])
        ctx.values_dtype = values.dtype
        ctx.mark_non_differentiable(*stats.values())
        return loss, *stats.values()

    @staticmethod
    def backward(ctx, grad_loss, *grad_stats):
        dvalues, count = ctx.saved_tensors
        if dvalues is None:
            return None, None, None, None, None
        grad = dvalues * (grad_loss / count.clamp(min=1.0))
        return grad.to(ctx.values_dtype), None, None, None, None


def ppo_value_loss_triton(values, old_values, returns, mask, clip):
    """Triton PPO value loss: (loss 0-dim fp32, stats dict of 0-dim fp32 tensors)."""
    loss, *stats = PPOValueLossFunction.apply(values, old_values, returns, mask, clip)
    return loss, dict(zip(_STAT_NAMES, stats, strict=True))


def ppo_value_loss_ref(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain torch clipped value loss in the inputs' dtype; differentiable through autograd."""
    v_clip = torch.clamp(values, old_values - clip, old_values + clip)
    sq_raw = (values - returns) ** 2
    sq_clip = (v_clip - returns) ** 2
    loss_t = 0.5 * torch.maximum(sq_raw, sq_clip)
    m = mask.to(loss_t.dtype)
    err = (returns - values).detach()
    sums = torch.stack(
        [
            (loss_t * m).sum(),
            m.sum(),
            ((sq_clip > sq_raw).to(m.dtype) * m).sum(),
            (returns * m).sum(),
            (returns * returns * m).sum(),
            (err * m).sum(),
            (err * err * m).sum(),
        ]
    )
    _, stats = _stats_from_sums(sums.detach())
    return (loss_t * m).sum() / m.sum().clamp(min=1.0), stats
