"""PPO clipped policy loss over packed tokens, with its statistics, in one pass.

Per token, with ``r = exp(logp - old_logp)``::

    loss_t = max(-A_t * r, -A_t * clip(r, 1 - eps, 1 + eps_high))

and ``loss = sum(mask * loss_t) / max(sum(mask), 1)``. The forward kernel reads the four inputs
once and writes per-block partial sums (loss, token count, clipped count, approx KL, ratio sum,
ratio min, ratio max) plus, when a gradient is needed, ``mask * dloss_t/dlogp`` per token, so
the backward is a single scale by ``grad_out / count``. ``approx_kl`` is Schulman's
non-negative estimator ``(r - 1) - log r``; ``clipfrac`` counts tokens where the clipped term
is the larger one.

Non-finite inputs behave as in the torch path: a NaN at a token makes the loss, ``approx_kl`` and
``ratio_mean`` NaN (a masked-out token too, as ``NaN * 0`` is NaN), and ``ratio_min``/``ratio_max``
NaN when the token counts. The kernel's min/max are NaN-propagating for that (``tl.maximum``
alone compiles to ``max.f32``, which returns the other operand).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from orz_fast.kernels.utils import check_triton_device, loadable_mask, maximum_nan, minimum_nan

_N_PARTIALS = 7
STAT_NAMES = ("clipfrac", "approx_kl", "ratio_mean", "ratio_min", "ratio_max", "num_tokens")


@triton.jit
def _ppo_policy_loss_fwd_kernel(
    logp_ptr,
    old_ptr,
    adv_ptr,
    mask_ptr,
    dlogp_ptr,
    partial_ptr,
    T,
    clip_low,
    clip_high,
    BT: tl.constexpr,
    N_PARTIALS: tl.constexpr,
    STORE_GRAD: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_t = i_b * BT + tl.arange(0, BT)
    m_t = o_t < T
    # [BT]
    b_logp = tl.load(logp_ptr + o_t, mask=m_t, other=0).to(tl.float32)
    # [BT]
    b_old = tl.load(old_ptr + o_t, mask=m_t, other=0).to(tl.float32)
    # [BT]
    b_adv = tl.load(adv_ptr + o_t, mask=m_t, other=0).to(tl.float32)
    # [BT]
    b_mask = tl.load(mask_ptr + o_t, mask=m_t, other=0).to(tl.float32)
    b_log_ratio = b_logp - b_old
    b_ratio = tl.exp(b_log_ratio)
    # NaN-propagating min/max, as torch's clamp and maximum: a NaN input gives a NaN loss
    b_ratio_clip = minimum_nan(maximum_nan(b_ratio, 1.0 - clip_low), 1.0 + clip_high)
    b_loss_raw = -b_adv * b_ratio
    b_loss_clip = -b_adv * b_ratio_clip
    b_is_clipped = b_loss_clip > b_loss_raw
    b_loss = maximum_nan(b_loss_raw, b_loss_clip)
    b_on = b_mask != 0
    if STORE_GRAD:
        # the clipped branch wins only when r is outside the clip range, where its slope is 0
        b_grad = tl.where(b_is_clipped, 0.0, b_loss_raw) * b_mask
        tl.store(dlogp_ptr + o_t, b_grad, mask=m_t)
    b_kl = (b_ratio - 1.0) - b_log_ratio
    p_out = partial_ptr + i_b * N_PARTIALS
    tl.store(p_out + 0, tl.sum(b_loss * b_mask, axis=0))
    tl.store(p_out + 1, tl.sum(b_mask, axis=0))
    tl.store(p_out + 2, tl.sum(tl.where(b_is_clipped, b_mask, 0.0), axis=0))
    tl.store(p_out + 3, tl.sum(b_kl * b_mask, axis=0))
    tl.store(p_out + 4, tl.sum(b_ratio * b_mask, axis=0))
    tl.store(p_out + 5, tl.reduce(tl.where(b_on, b_ratio, float("inf")), 0, minimum_nan))
    tl.store(p_out + 6, tl.reduce(tl.where(b_on, b_ratio, float("-inf")), 0, maximum_nan))


def _stats_from_partials(partials: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reduce [n_blocks, 7] partials to (loss, stats); all 0-dim fp32 tensors, no host sync."""
    sums = partials[:, :5].sum(0)
    count = sums[1].clamp(min=1.0)
    has = sums[1] > 0
    zero = torch.zeros((), dtype=partials.dtype, device=partials.device)
    stats = {
        "clipfrac": sums[2] / count,
        "approx_kl": sums[3] / count,
        "ratio_mean": sums[4] / count,
        "ratio_min": torch.where(has, partials[:, 5].min(), zero),
        "ratio_max": torch.where(has, partials[:, 6].max(), zero),
        "num_tokens": sums[1],
    }
    return sums[0] / count, stats


def ppo_policy_loss_fwd(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    store_grad: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """Launch the forward kernel. Returns (loss, stats, ``mask * dloss_t/dlogp`` [T] fp32 or None)."""
    check_triton_device(logprobs, old_logprobs, advantages, mask, kernel=_ppo_policy_loss_fwd_kernel)
    T = logprobs.numel()
    BT = 2048
    n_blocks = max(1, triton.cdiv(T, BT))
    partials = torch.empty(n_blocks, _N_PARTIALS, dtype=torch.float32, device=logprobs.device)
    dlogp = torch.empty(T, dtype=torch.float32, device=logprobs.device) if store_grad else None
    _ppo_policy_loss_fwd_kernel[(n_blocks,)](
        logprobs.contiguous(),
        old_logprobs.contiguous(),
        advantages.contiguous(),
        loadable_mask(mask.contiguous()),
        dlogp if store_grad else partials,
        partials,
        T,
        float(clip_low),
        float(clip_high),
        BT=BT,
        N_PARTIALS=_N_PARTIALS,
        STORE_GRAD=store_grad,
        num_warps=8,
    )
    loss, stats = _stats_from_partials(partials)
    return loss, stats, dlogp


class PPOPolicyLossFunction(torch.autograd.Function):
    """Autograd wrapper: the forward kernel stores the per-token slope, backward scales it."""

    @staticmethod
    def forward(ctx, logprobs, old_logprobs, advantages, mask, clip_low, clip_high):
        loss, stats, dlogp = ppo_policy_loss_fwd(
            logprobs, old_logprobs, advantages, mask, clip_low, clip_high, store_grad=ctx.needs_input_grad[0]
        )
        ctx.save_for_backward(dlogp, stats["num_tokens"])
        ctx.logp_dtype = logprobs.dtype
        ctx.mark_non_differentiable(*stats.values())
        return loss, *stats.values()

    @staticmethod
    def backward(ctx, grad_loss, *grad_stats):
        dlogp, count = ctx.saved_tensors
        if dlogp is None:
            return None, None, None, None, None, None
        grad = dlogp * (grad_loss / count.clamp(min=1.0))
        return grad.to(ctx.logp_dtype), None, None, None, None, None


def ppo_policy_loss_triton(logprobs, old_logprobs, advantages, mask, clip_low, clip_high):
    """Triton PPO policy loss: (loss 0-dim fp32, stats dict of 0-dim fp32 tensors)."""
    loss, *stats = PPOPolicyLossFunction.apply(logprobs, old_logprobs, advantages, mask, clip_low, clip_high)
    return loss, dict(zip(STAT_NAMES, stats, strict=True))


def policy_loss_terms(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token terms in the inputs' dtype: (loss_t, dloss_t/dlogp, is_clipped, kl_t, ratio), each [T]."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    loss_raw = -advantages * ratio
    loss_clip = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    is_clipped = loss_clip > loss_raw
    loss_t = torch.maximum(loss_raw, loss_clip)
    grad_t = torch.where(is_clipped, torch.zeros_like(loss_raw), loss_raw)
    kl_t = (ratio - 1.0) - log_ratio
    return loss_t, grad_t, is_clipped, kl_t, ratio


def ppo_policy_loss_ref(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain torch PPO policy loss computed in the inputs' dtype; differentiable through autograd."""
    loss_t, _, is_clipped, kl_t, ratio = policy_loss_terms(logprobs, old_logprobs, advantages, clip_low, clip_high)
    m = mask.to(loss_t.dtype)
    n = m.sum()
    count = n.clamp(min=1.0)
    on = m != 0
    zero = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    r = ratio.detach()
    stats = {
        "clipfrac": (is_clipped.to(m.dtype) * m).sum() / count,
        "approx_kl": (kl_t.detach() * m).sum() / count,
        "ratio_mean": (r * m).sum() / count,
        "ratio_min": torch.where(n > 0, torch.where(on, r, torch.inf).min(), zero),
        "ratio_max": torch.where(n > 0, torch.where(on, r, -torch.inf).max(), zero),
        "num_tokens": n,
    }
    return (loss_t * m).sum() / count, stats
