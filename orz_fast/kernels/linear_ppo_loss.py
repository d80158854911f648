"""PPO policy loss straight from hidden states: no [T, V] tensor and no separate loss pass.

The per-token PPO gradient ``dloss/dlogp_t`` depends only on the token's own log-prob,
advantage, old log-prob and mask, all known once that token's logits are reduced. So in the
forward, per chunk of tokens: one GEMM makes the chunk's logits, the log-prob row kernel
reduces them (combined across the TP group), the PPO terms give ``g_t``, the gradient row
kernel turns the logits in place into ``dz``, and two GEMMs give ``dhidden`` for the chunk
and add the chunk's part of ``dweight`` (fp32). That is the three GEMMs the math needs and no
recomputation; backward only scales the stored gradients by ``grad_out``. Normalising by the
number of masked tokens uses ``mask.sum()`` computed up front as a tensor (no host sync).
A padded vocabulary (``vocab_size``) is narrowed as in ``linear_logprobs``: padding ids never
enter the softmax, the entropy or the gradient.

``old_logprobs=None`` takes the old log-probs to be this forward's own (detached): the ratio is 1 and
the gradient ``-A * dlogp``, what one optimizer step per rollout gives with recomputed old log-probs,
without the recompute pass. ``rollout_logprobs`` (the sampler's) add the rollout–trainer gap
statistics and, with ``tis_cap``, the truncated importance weights, as in ``ppo_policy_loss``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from orz_fast.kernels.linear_logprobs import (
    accumulate_linear_grads,
    chunk_tokens_for,
    combine_vocab_stats,
    row_grads_,
    row_stats,
    shard_columns,
    vocab_start_of,
)
from orz_fast.kernels.ppo_policy_loss import (
    ROLLOUT_STAT_NAMES,
    STAT_NAMES,
    policy_loss_terms,
    rollout_gap_stats,
    rollout_gap_sums,
    tis_weights,
)


class LinearPPOLossFunction(torch.autograd.Function):
    """Forward computes the loss and, when needed, dhidden and dweight; backward scales them."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        targets,
        old_logprobs,
        advantages,
        mask,
        temperature,
        clip_low,
        clip_high,
        tp_group,
        use_triton,
        chunk_tokens,
        entropy,
        vocab_size,
        rollout_logprobs,
        tis_cap,
    ):
        T, H = hidden.shape
        targets = targets.contiguous()
        inv_temp = 1.0 / temperature
        vocab_start = vocab_start_of(weight, tp_group)
        valid, cols = shard_columns(weight.shape[0], vocab_start, vocab_size)
        w = weight[:cols]
        Tc = chunk_tokens or chunk_tokens_for(T, cols, hidden.dtype)
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        tp = tp_group is not None and dist.get_world_size(tp_group) > 1
        mask_f = mask.to(torch.float32)
        count = mask_f.sum()
        inv_count = 1.0 / count.clamp(min=1.0)
        dhidden = (
            torch.empty(T, H, dtype=torch.float32 if tp else hidden.dtype, device=hidden.device) if need_dh else None
        )
        dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        # sums of: loss, clipped, approx KL, ratio, entropy; then ratio min and max
        sums = torch.zeros(5, dtype=torch.float32, device=hidden.device)
        ratio_min = torch.full((), torch.inf, dtype=torch.float32, device=hidden.device)
        ratio_max = torch.full((), -torch.inf, dtype=torch.float32, device=hidden.device)
        has_rollout = rollout_logprobs is not None
        # rollout gap: sum of |logp - rollout|, its max, max of exp(logp - rollout)
        gap = torch.tensor([0.0, -torch.inf, -torch.inf], dtype=torch.float32, device=hidden.device)
        for t0 in range(0, T, Tc):
            sl = slice(t0, t0 + Tc)
            logits = (hidden[sl] @ w.T)[:, :valid]
            lse, mu, logp = combine_vocab_stats(
                row_stats(logits, targets[sl], vocab_start, inv_temp, entropy, use_triton), tp_group
            )
            old = logp if old_logprobs is None else old_logprobs[sl].float()
            rollout = rollout_logprobs[sl].float() if has_rollout else None
            weights = tis_weights(old, rollout, tis_cap) if tis_cap is not None else None
            loss_t, grad_t, is_clipped, kl_t, ratio = policy_loss_terms(
                logp, old, advantages[sl].float(), clip_low, clip_high, weights
            )
            m = mask_f[sl]
            if has_rollout:
                part = rollout_gap_sums(logp, rollout, m)
                gap = torch.cat([gap[:1] + part[:1], torch.maximum(gap[1:], part[1:])])
            on = m != 0
            ent_sum = ((lse - mu) * m).sum() if entropy else torch.zeros_like(count)
            sums += torch.stack(
                [(loss_t * m).sum(), (is_clipped * m).sum(), (kl_t * m).sum(), (ratio * m).sum(), ent_sum]
            )
            ratio_min = torch.minimum(ratio_min, torch.where(on, ratio, torch.inf).amin())
            ratio_max = torch.maximum(ratio_max, torch.where(on, ratio, -torch.inf).amax())
            if need_dh or need_dw:
                dz = row_grads_(
                    logits, targets[sl], vocab_start, inv_temp, lse, mu, grad_t * m * inv_count, None, use_triton
                )
                accumulate_linear_grads(
                    dz, hidden[sl], w[:valid], dhidden[sl] if need_dh else None, dweight[:valid] if need_dw else None
                )
        if need_dh and tp:
            dist.all_reduce(dhidden, group=tp_group)
        ctx.save_for_backward(dhidden if need_dh else None, dweight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        has = count > 0
        zero = torch.zeros_like(count)
        stats = (
            sums[1] * inv_count,
            sums[2] * inv_count,
            sums[3] * inv_count,
            torch.where(has, ratio_min, zero),
            torch.where(has, ratio_max, zero),
            count,
            sums[4] * inv_count,
        )
        if has_rollout:
            stats += tuple(rollout_gap_stats(gap, count).values())
        ctx.mark_non_differentiable(*stats)
        return sums[0] * inv_count, *stats

    @staticmethod
    def backward(ctx, grad_loss, *grad_stats):
        dhidden, dweight = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        dh = (dhidden.float() * grad_loss).to(h_dtype) if dhidden is not None else None
        dw = (dweight * grad_loss).to(w_dtype) if dweight is not None else None
        return dh, dw, *(None,) * 14


def linear_ppo_loss_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    tp_group: dist.ProcessGroup | None = None,
    use_triton: bool = True,
    chunk_tokens: int | None = None,
    return_entropy: bool = False,
    vocab_size: int | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    tis_cap: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped loss (0-dim fp32) and stats from ``hidden [T, H]``, ``weight [V, H]``, ``targets [T]``;
    with ``return_entropy`` the stats also hold ``entropy``, the masked token mean of the policy's
    entropy (a metric: no gradient flows through it), from the same pass over the logits.
    ``vocab_size``: the real vocabulary; ids from it on (padding rows) are left out. ``old_logprobs``
    None: this forward's own; ``rollout_logprobs``: add :data:`ROLLOUT_STAT_NAMES`; ``tis_cap``: weight
    each token's term by ``min(exp(old - rollout), tis_cap)``."""
    loss, *stats = LinearPPOLossFunction.apply(
        hidden,
        weight,
        targets,
        old_logprobs,
        advantages,
        mask,
        float(temperature),
        float(clip_low),
        float(clip_high),
        tp_group,
        use_triton,
        chunk_tokens,
        return_entropy,
        vocab_size,
        rollout_logprobs,
        None if tis_cap is None else float(tis_cap),
    )
    rollout_stats = stats[len(STAT_NAMES) + 1 :]
    stats, entropy = stats[: len(STAT_NAMES)], stats[len(STAT_NAMES)]
    out = dict(zip(STAT_NAMES, stats, strict=True))
    if rollout_logprobs is not None:
        out.update(zip(ROLLOUT_STAT_NAMES, rollout_stats, strict=True))
    if return_entropy:
        out["entropy"] = entropy
    return loss, out
