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

Given the sampler's log-probs ``rollout_logp``, the same pass measures the rollout–trainer gap over
the counted tokens: ``rollout_diff_mean`` and ``rollout_diff_max`` of ``|logp - rollout_logp|`` and
``rollout_ratio_max``, the largest ``exp(logp - rollout_logp)`` (NaN in, NaN out, as above). With
``tis_cap`` each token's loss term is also weighted by the truncated importance weight
``w_t = min(exp(old_logp - rollout_logp), tis_cap)`` (a constant: no gradient flows through it), the
token-level rollout correction of Yao et al. 2025 (veRL's token-level rollout IS).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from orz_fast.kernels.utils import check_triton_device, loadable_mask, maximum_nan, minimum_nan

_N_PARTIALS = 10
STAT_NAMES = ("clipfrac", "approx_kl", "ratio_mean", "ratio_min", "ratio_max", "num_tokens")
ROLLOUT_STAT_NAMES = ("rollout_diff_mean", "rollout_diff_max", "rollout_ratio_max")


@triton.jit
def _ppo_policy_loss_fwd_kernel(
    logp_ptr,
    old_ptr,
    adv_ptr,
    mask_ptr,
    rollout_ptr,
    dlogp_ptr,
    partial_ptr,
    T,
    clip_low,
    clip_high,
    tis_cap,
    BT: tl.constexpr,
    N_PARTIALS: tl.constexpr,
    STORE_GRAD: tl.constexpr,
    HAS_ROLLOUT: tl.constexpr,
    USE_TIS: tl.constexpr,
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
    # the clipped branch wins only when r is outside the clip range, where its slope is 0
    b_slope = tl.where(b_is_clipped, 0.0, b_loss_raw)
    if HAS_ROLLOUT:
        # [BT]
        b_rollout = tl.load(rollout_ptr + o_t, mask=m_t, other=0).to(tl.float32)
        b_gap = b_logp - b_rollout
        b_gap_abs = tl.abs(b_gap)
        if USE_TIS:
            b_w = minimum_nan(tl.exp(b_old - b_rollout), tis_cap)
            b_loss = b_loss * b_w
            b_slope = b_slope * b_w
    if STORE_GRAD:
        tl.store(dlogp_ptr + o_t, b_slope * b_mask, mask=m_t)
    b_kl = (b_ratio - 1.0) - b_log_ratio
    p_out = partial_ptr + i_b * N_PARTIALS
    tl.store(p_out + 0, tl.sum(b_loss * b_mask, axis=0))
    tl.store(p_out + 1, tl.sum(b_mask, axis=0))
    tl.store(p_out + 2, tl.sum(tl.where(b_is_clipped, b_mask, 0.0), axis=0))
    tl.store(p_out + 3, tl.sum(b_kl * b_mask, axis=0))
    tl.store(p_out + 4, tl.sum(b_ratio * b_mask, axis=0))
    tl.store(p_out + 5, tl.reduce(tl.where(b_on, b_ratio, float("inf")), 0, minimum_nan))
    tl.store(p_out + 6, tl.reduce(tl.where(b_on, b_ratio, float("-inf")), 0, maximum_nan))
    if HAS_ROLLOUT:
        tl.store(p_out + 7, tl.sum(b_gap_abs * b_mask, axis=0))
        tl.store(p_out + 8, tl.reduce(tl.where(b_on, b_gap_abs, float("-inf")), 0, maximum_nan))
        tl.store(p_out + 9, tl.reduce(tl.where(b_on, tl.exp(b_gap), float("-inf")), 0, maximum_nan))


def _stats_from_partials(partials: torch.Tensor, has_rollout: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reduce [n_blocks, 10] partials to (loss, stats); all 0-dim fp32 tensors, no host sync."""
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
    if has_rollout:
        gap = torch.stack([partials[:, 7].sum(), partials[:, 8].max(), partials[:, 9].max()])
        stats.update(rollout_gap_stats(gap, sums[1]))
    return sums[0] / count, stats


def ppo_policy_loss_fwd(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    store_grad: bool,
    rollout_logprobs: torch.Tensor | None = None,
    tis_cap: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """Launch the forward kernel. Returns (loss, stats, ``mask * dloss_t/dlogp`` [T] fp32 or None)."""
    has_rollout = rollout_logprobs is not None
    extra = (rollout_logprobs,) if has_rollout else ()
    check_triton_device(logprobs, old_logprobs, advantages, mask, *extra, kernel=_ppo_policy_loss_fwd_kernel)
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
        rollout_logprobs.contiguous() if has_rollout else partials,
        dlogp if store_grad else partials,
        partials,
        T,
        float(clip_low),
        float(clip_high),
        float(tis_cap) if tis_cap is not None else 0.0,
        BT=BT,
        N_PARTIALS=_N_PARTIALS,
        STORE_GRAD=store_grad,
        HAS_ROLLOUT=has_rollout,
        USE_TIS=tis_cap is not None,
        num_warps=8,
    )
    loss, stats = _stats_from_partials(partials, has_rollout)
    return loss, stats, dlogp


class PPOPolicyLossFunction(torch.autograd.Function):
    """Autograd wrapper: the forward kernel stores the per-token slope, backward scales it."""

    @staticmethod
    def forward(ctx, logprobs, old_logprobs, advantages, mask, clip_low, clip_high, rollout_logprobs, tis_cap):
        loss, stats, dlogp = ppo_policy_loss_fwd(
            logprobs,
            old_logprobs,
            advantages,
            mask,
            clip_low,
            clip_high,
            store_grad=ctx.needs_input_grad[0],
            rollout_logprobs=rollout_logprobs,
            tis_cap=tis_cap,
        )
        ctx.save_for_backward(dlogp, stats["num_tokens"])
        ctx.logp_dtype = logprobs.dtype
        ctx.mark_non_differentiable(*stats.values())
        return loss, *stats.values()

    @staticmethod
    def backward(ctx, grad_loss, *grad_stats):
        dlogp, count = ctx.saved_tensors
        if dlogp is None:
            return (None,) * 8
        grad = dlogp * (grad_loss / count.clamp(min=1.0))
        return grad.to(ctx.logp_dtype), *(None,) * 7


def ppo_policy_loss_triton(
    logprobs, old_logprobs, advantages, mask, clip_low, clip_high, rollout_logprobs=None, tis_cap=None
):
    """Triton PPO policy loss: (loss 0-dim fp32, stats dict of 0-dim fp32 tensors)."""
    loss, *stats = PPOPolicyLossFunction.apply(
        logprobs, old_logprobs, advantages, mask, clip_low, clip_high, rollout_logprobs, tis_cap
    )
    names = STAT_NAMES + (ROLLOUT_STAT_NAMES if rollout_logprobs is not None else ())
    return loss, dict(zip(names, stats, strict=True))


def policy_loss_terms(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token terms in the inputs' dtype: (loss_t, dloss_t/dlogp, is_clipped, kl_t, ratio), each [T];
    ``weights`` (constants, e.g. :func:`tis_weights`) multiply ``loss_t`` and its slope."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    loss_raw = -advantages * ratio
    loss_clip = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    is_clipped = loss_clip > loss_raw
    loss_t = torch.maximum(loss_raw, loss_clip)
    grad_t = torch.where(is_clipped, torch.zeros_like(loss_raw), loss_raw)
    if weights is not None:
        loss_t, grad_t = loss_t * weights, grad_t * weights
    kl_t = (ratio - 1.0) - log_ratio
    return loss_t, grad_t, is_clipped, kl_t, ratio


def tis_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights ``min(exp(old - rollout), cap)`` [T] (NaN in, NaN out); no gradient."""
    return torch.exp(old_logprobs.detach() - rollout_logprobs).clamp(max=cap)


def rollout_gap_sums(logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[3] in the inputs' dtype: the sum of ``|logp - rollout|`` over counted tokens (``mask`` float; None:
    every token), its max, and the max of ``exp(logp - rollout)``; the maxima are -inf over no token. Parts
    combine by sum, max, max."""
    gap = logprobs.detach() - rollout_logprobs
    abs_gap = gap.abs()
    if not gap.numel():
        lowest = torch.full((), -torch.inf, dtype=gap.dtype, device=gap.device)
        return torch.stack([abs_gap.sum(), lowest, lowest])
    if mask is None:
        return torch.stack([abs_gap.sum(), abs_gap.amax(), torch.exp(gap.amax())])
    on = mask != 0
    return torch.stack(
        [
            (abs_gap * mask).sum(),
            torch.where(on, abs_gap, -torch.inf).amax(),
            torch.where(on, torch.exp(gap), -torch.inf).amax(),
        ]
    )


def rollout_gap_stats(gap_sums: torch.Tensor, count: torch.Tensor) -> dict[str, torch.Tensor]:
    """:data:`ROLLOUT_STAT_NAMES` from combined :func:`rollout_gap_sums` over ``count`` counted tokens (0 when
    none counts)."""
    has = count > 0
    zero = torch.zeros((), dtype=gap_sums.dtype, device=gap_sums.device)
    return {
        "rollout_diff_mean": gap_sums[0] / count.clamp(min=1.0),
        "rollout_diff_max": torch.where(has, gap_sums[1], zero),
        "rollout_ratio_max": torch.where(has, gap_sums[2], zero),
    }


def ppo_policy_loss_ref(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    rollout_logprobs: torch.Tensor | None = None,
    tis_cap: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain torch PPO policy loss computed in the inputs' dtype; differentiable through autograd."""
    weights = tis_weights(old_logprobs, rollout_logprobs, tis_cap) if tis_cap is not None else None
    loss_t, _, is_clipped, kl_t, ratio = policy_loss_terms(
        logprobs, old_logprobs, advantages, clip_low, clip_high, weights
    )
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
    if rollout_logprobs is not None:
        stats.update(rollout_gap_stats(rollout_gap_sums(logprobs, rollout_logprobs, m), n))
    return (loss_t * m).sum() / count, stats
