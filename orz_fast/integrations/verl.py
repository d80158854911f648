"""veRL drop-in: GAE, the vanilla PPO policy loss and the value loss on ``orz_fast.ops``.

The three functions take and return what ``verl.trainer.ppo.core_algos`` does (veRL 0.9):
padded ``[B, T]`` response tensors with a ``response_mask``, the same keyword names, defaults,
loss-aggregation modes and metrics. Inside, the padded batch is turned into the flat token
layout of ``orz_fast.ops`` with tensor ops only (no Python loop over rows or tokens).

Switching it on in a veRL run (every veRL process imports the modules named in
``VERL_USE_EXTERNAL_MODULES`` when it imports ``verl``, Ray workers included)::

    VERL_USE_EXTERNAL_MODULES=orz_fast.integrations.verl_plugin python -m verl.trainer.main_ppo \\
        algorithm.adv_estimator=gae actor_rollout_ref.actor.policy_loss.loss_mode=orz_vanilla ...

``register()`` adds the policy loss as ``"orz_vanilla"`` to veRL's policy-loss registry. veRL's
trainer calls GAE and the value loss by their module names, not through a registry (its generic
advantage-estimator path does not pass ``values``), so ``register()`` also rebinds
``core_algos.compute_gae_advantage_return`` (and the ``"gae"`` registry entry) and the
``compute_value_loss`` that veRL's loss module imported, unless ``replace_builtin=False``.

``register()`` also makes veRL's actor config (when it selects ``orz_vanilla``) and critic config
run ``check_actor_config`` / ``check_critic_config`` when veRL builds them: an option the
adapter does not compute is a ``ValueError`` naming it and its supported values before the
first step.

Results come back in the dtypes veRL returns for the same inputs (a bf16 batch gives a bf16
token-mean loss, the per-sequence modes float32 or wider), computed in float32 or wider.
``response_mask`` must be binary (bool, or 0/1 integers or floats), as veRL's recurrence assumes.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from orz_fast import ops
from orz_fast.integrations._reduce import check_padded, host_dtype, per_row_weights, row_token_counts, token_sum

POLICY_LOSS_NAME = "orz_vanilla"
_LOG_RATIO_BOUND = 20.0  # veRL clamps log(pi / pi_old) to [-20, 20] before exponentiating
SUPPORTED_LOSS_AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "seq-mean-token-mean",
)

__all__ = [
    "POLICY_LOSS_NAME",
    "SUPPORTED_LOSS_AGG_MODES",
    "check_actor_config",
    "check_critic_config",
    "compute_gae_advantage_return",
    "compute_policy_loss_vanilla",
    "compute_value_loss",
    "register",
]


def _ops_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool or mask.is_floating_point() else mask.bool()


def _check_loss_agg_mode(option: str, loss_agg_mode: Any) -> None:
    if loss_agg_mode not in SUPPORTED_LOSS_AGG_MODES:
        raise ValueError(
            f"{option}={loss_agg_mode!r} is not supported; supported values: {', '.join(SUPPORTED_LOSS_AGG_MODES)}"
        )


def _check_cliprange_value(option: str, cliprange_value: Any) -> None:
    if not cliprange_value >= 0:
        raise ValueError(
            f"{option}={cliprange_value!r} is not supported; the value clip range must be >= 0 (veRL clips to "
            "[old + c, old - c] for c < 0, an empty range)"
        )


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """veRL's ``masked_mean``: sum over the mask divided by ``mask.sum() + 1e-8``."""
    m = mask.to(values.dtype)
    return (torch.where(mask.bool(), values, 0.0) * m).sum() / (m.sum() + 1e-8)


def compute_gae_advantage_return(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float | torch.Tensor,
    lam: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """veRL's GAE over padded responses, computed by ``orz_fast.ops.gae``; whitened advantages.

    Tokens with ``response_mask == 0`` (padding, or observation tokens inside a multi-turn
    response) are skipped by the recurrence: the next value and the running advantage pass over
    them unchanged, and such a token gets the advantage of the next response token in its row
    (0 after the last one).

    Args:
        token_level_rewards: [B, T] float, per-token rewards.
        values: [B, T] float, critic values.
        response_mask: [B, T] binary (bool, int or float), 1 on response tokens.
        gamma, lam: discount and GAE lambda (floats, or 0-dim tensors).

    Returns:
        (advantages [B, T], returns [B, T]): ``returns = advantages + values`` before the
        advantages are whitened over the masked tokens (unbiased variance, as veRL).

    Raises:
        ValueError: on mismatched shapes, or when fewer than two tokens are masked in (veRL
            raises there too: the unbiased variance is undefined).
    """
    if token_level_rewards.dim() != 2:
        raise ValueError(
            f"compute_gae_advantage_return: expected [B, T] tensors, got rewards {tuple(token_level_rewards.shape)}"
        )
    B, T = check_padded(
        "compute_gae_advantage_return",
        token_level_rewards=token_level_rewards,
        values=values,
        response_mask=response_mask,
    )
    out_dtype = torch.promote_types(token_level_rewards.dtype, values.dtype)
    if response_mask.is_floating_point():
        out_dtype = torch.promote_types(out_dtype, response_mask.dtype)
    with torch.no_grad():
        mask = response_mask.bool()
        n = mask.sum()
        # host read: veRL raises for fewer than two response tokens (its unbiased variance)
        n_host = int(n)
        if n_host < 2:
            raise ValueError(
                f"compute_gae_advantage_return: response_mask {tuple(mask.shape)} selects {n_host} token(s); "
                "whitening needs at least two (one token makes the unbiased variance divide by zero)"
            )
        # host read: right-padded masks, the usual layout, need no packing
        has_gaps = bool((mask[:, 1:] & ~mask[:, :-1]).any())
        if has_gaps:
            adv, packed = _gae_packed(token_level_rewards, values, mask, float(gamma), float(lam))
        else:
            # each row is one segment; zeroed padding gives zero advantages after the last response
            # token and a zero value after it, as the recurrence requires
            cu_seqlens = torch.arange(B + 1, device=values.device, dtype=torch.int64) * T
            adv, _ = ops.gae(
                torch.where(mask, token_level_rewards, 0).view(-1),
                torch.where(mask, values, 0).view(-1),
                cu_seqlens,
                float(gamma),
                float(lam),
            )
            adv = packed = adv.view(B, T)
        returns = (adv + values).to(out_dtype)
        # whitening statistics over the response tokens: ``packed`` holds their advantages and
        # zeros elsewhere, so plain sums are masked sums (accumulated in float64)
        n = n.to(torch.float64)
        s1 = packed.sum(dtype=torch.float64)
        s2 = packed.square().sum(dtype=torch.float64)
        mean = s1 / (n + 1e-8)
        var = (s2 - 2 * mean * s1 + n * mean * mean) / (n + 1e-8) * (n / (n - 1))
        advantages = adv.sub_(mean.to(adv.dtype)).mul_(torch.rsqrt(var + 1e-8).to(adv.dtype)).to(out_dtype)
    return advantages, returns


def _gae_packed(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE for masks with gaps: returns (advantages [B, T] in veRL's layout, packed [B, T + 1]).

    Each row's response tokens move to the row's front and the rest to a spare column T, so every
    row is one segment of T + 1 slots whose tail (spare column included) holds zero rewards and
    values: zero advantages there, and a zero value after the last response token.
    """
    B, T = mask.shape
    seen = mask.to(torch.int64).cumsum(dim=1)  # response tokens up to and including t
    dest = torch.where(mask, seen - 1, T)
    rewards_c = rewards.new_zeros(B, T + 1).scatter_(1, dest, rewards)
    values_c = values.new_zeros(B, T + 1).scatter_(1, dest, values)
    rewards_c[:, T] = 0
    values_c[:, T] = 0
    cu_seqlens = torch.arange(B + 1, device=values.device, dtype=torch.int64) * (T + 1)
    adv_c, _ = ops.gae(rewards_c.view(-1), values_c.view(-1), cu_seqlens, gamma, lam)
    adv_c = adv_c.view(B, T + 1)
    # a response token reads its own slot; any other token the slot of the next response token in
    # its row, which is a zero tail slot when none follows
    return adv_c.gather(1, seen - mask.to(torch.int64)), adv_c


def _dual_clip_cap(advantages: torch.Tensor, clip_ratio_c: float, dtype: torch.dtype) -> torch.Tensor:
    """Upper bound of the log-ratio per token: ``log(clip_ratio_c)`` where A < 0, else the clamp bound."""
    cap = advantages.new_tensor(min(_LOG_RATIO_BOUND, math.log(clip_ratio_c)), dtype=dtype)
    return torch.where(advantages < 0, cap, advantages.new_tensor(_LOG_RATIO_BOUND, dtype=dtype))


def _config_value(config: Any, name: str, default: Any) -> Any:
    if hasattr(config, "get"):
        return config.get(name, default)
    return getattr(config, name, default)


def _aggregate(
    name: str,
    token_sum_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens: int | torch.Tensor | None = None,
    global_batch_size: int | torch.Tensor | None = None,
    loss_scale_factor: int | None = None,
) -> torch.Tensor:
    """veRL's ``agg_loss`` given the (weighted, for seq-mean-token-mean) masked token sum."""
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError(f"{name}: (global) batch_num_tokens is required when dp_size > 1")
            batch_num_tokens = mask.to(token_sum_loss.dtype).sum()
        return token_sum_loss / batch_num_tokens * dp_size
    if loss_agg_mode == "token-sum":
        return token_sum_loss * dp_size
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        if global_batch_size is None:
            if dp_size > 1:
                raise ValueError(f"{name}: global_batch_size is required when dp_size > 1")
            global_batch_size = (row_token_counts(mask) > 0).to(token_sum_loss.dtype).sum()
        loss = token_sum_loss / global_batch_size * dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            loss = loss / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        return loss
    raise ValueError(
        f"{name}: loss_agg_mode={loss_agg_mode!r} is not supported; supported values: "
        f"{', '.join(SUPPORTED_LOSS_AGG_MODES)}"
    )


def _divisor(loss_agg_mode: str, batch_num_tokens: Any, global_batch_size: Any) -> Any:
    """What ``agg_loss`` divides the reduced loss by in ``loss_agg_mode`` (for its result dtype)."""
    if loss_agg_mode == "token-mean":
        return batch_num_tokens
    return None if loss_agg_mode == "token-sum" else global_batch_size


def compute_policy_loss_vanilla(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """veRL's vanilla (dual-clip) PPO policy loss, computed by ``orz_fast.ops.ppo_policy_loss``.

    Args:
        old_log_prob, log_prob, advantages: [B, T] float; ``log_prob`` carries the gradient.
        response_mask: [B, T] binary mask of the tokens in the loss.
        loss_agg_mode: any of ``SUPPORTED_LOSS_AGG_MODES`` (veRL's five).
        config: veRL's actor config (``clip_ratio``, ``clip_ratio_low``, ``clip_ratio_high``,
            ``clip_ratio_c`` (default 3.0) and ``global_batch_info``).
        rollout_is_weights: optional [B, T] non-negative per-token weights of the loss.

    Returns:
        (loss 0-dim in the dtype veRL returns, metrics) with metrics ``actor/pg_clipfrac``,
        ``actor/ppo_kl`` and ``actor/pg_clipfrac_lower`` as Python floats, as veRL returns them.

    The log-ratio is clamped to [-20, 20] and, where A < 0, to at most ``log(clip_ratio_c)``
    before ``ops.ppo_policy_loss`` sees it: capping the ratio at c for negative advantages is
    exactly the dual clip ``min(-A c, max(-A r, -A clip(r)))``, with the same zero gradient past
    the cap. Positive per-token weights (``rollout_is_weights``, the per-row ``1 / tokens`` of
    ``seq-mean-token-mean``) are folded into the advantages.
    """
    check_padded(
        "compute_policy_loss_vanilla",
        old_log_prob=old_log_prob,
        log_prob=log_prob,
        advantages=advantages,
        response_mask=response_mask,
        rollout_is_weights=rollout_is_weights,
    )
    if config is None:
        raise ValueError("compute_policy_loss_vanilla: config (veRL's actor config) is required")
    clip_ratio = config.clip_ratio
    clip_low = clip_ratio if getattr(config, "clip_ratio_low", None) is None else config.clip_ratio_low
    clip_high = clip_ratio if getattr(config, "clip_ratio_high", None) is None else config.clip_ratio_high
    clip_ratio_c = _config_value(config, "clip_ratio_c", 3.0)
    if not clip_ratio_c > 1.0:
        raise ValueError(
            f"compute_policy_loss_vanilla: clip_ratio_c={clip_ratio_c} is not supported: dual-clip PPO takes a "
            "value > 1.0"
        )
    _check_loss_agg_mode("compute_policy_loss_vanilla: loss_agg_mode", loss_agg_mode)
    batch_info = dict(getattr(config, "global_batch_info", None) or {})

    # at least fp32, as ops computes: a bf16 log(clip_ratio_c) would move the dual-clip cap by 0.3%
    dtype = torch.promote_types(torch.promote_types(log_prob.dtype, old_log_prob.dtype), torch.float32)
    negative_approx_kl = (log_prob.to(dtype) - old_log_prob.to(dtype)).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    log_ratio = negative_approx_kl.clamp(
        min=negative_approx_kl.new_tensor(-_LOG_RATIO_BOUND), max=_dual_clip_cap(advantages, clip_ratio_c, dtype)
    )

    weight = rollout_is_weights
    if loss_agg_mode == "seq-mean-token-mean":
        row_weight = per_row_weights(response_mask, dtype)
        weight = row_weight if weight is None else weight * row_weight
    scaled_adv = advantages if weight is None else advantages * weight

    mask = _ops_mask(response_mask)
    flat = (-1,)
    loss, stats = ops.ppo_policy_loss(
        log_ratio.reshape(flat),
        torch.zeros_like(log_ratio).reshape(flat),
        scaled_adv.reshape(flat),
        mask.reshape(flat),
        clip_eps=clip_low,
        clip_eps_high=clip_high,
    )
    pg_loss = _aggregate(
        "compute_policy_loss_vanilla", token_sum(loss, stats), response_mask, loss_agg_mode, **batch_info
    )

    with torch.no_grad():
        if rollout_is_weights is None:
            pg_clipfrac = stats["clipfrac"]
        else:
            # ops counted clipping on A * w, which differs where a weight is 0; count it on A
            ratio = negative_approx_kl.exp()
            clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high) > -advantages * ratio
            pg_clipfrac = _masked_mean(clipped.to(ratio.dtype), response_mask)
        ppo_kl = _masked_mean(-negative_approx_kl, response_mask)
        lower = (negative_approx_kl > math.log(clip_ratio_c)) & (advantages < 0)
        pg_clipfrac_lower = _masked_mean(lower.to(negative_approx_kl.dtype), response_mask)
    # host reads: veRL's policy losses return their metrics as Python floats
    metrics = {
        "actor/pg_clipfrac": pg_clipfrac.item(),
        "actor/ppo_kl": ppo_kl.item(),
        "actor/pg_clipfrac_lower": pg_clipfrac_lower.item(),
    }
    loss_dtype = torch.promote_types(torch.promote_types(log_prob.dtype, old_log_prob.dtype), advantages.dtype)
    if rollout_is_weights is not None:
        loss_dtype = torch.promote_types(loss_dtype, rollout_is_weights.dtype)
    divisor = _divisor(loss_agg_mode, batch_info.get("batch_num_tokens"), batch_info.get("global_batch_size"))
    return pg_loss.to(host_dtype(loss_dtype, response_mask, loss_agg_mode.startswith("seq-"), divisor)), metrics


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; the backward pass multiplies the gradient by a per-token factor."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(factor)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (factor,) = ctx.saved_tensors
        return grad * factor.to(grad.dtype), None


def _value_clip_tie_factor(
    values: torch.Tensor, old_values: torch.Tensor, clip: float, dtype: torch.dtype
) -> torch.Tensor:
    """Per-token factor from the gradient ``ops.ppo_value_loss`` gives the values to the one veRL's gives.

    veRL clips with ``max(min(V, old + c), old - c)`` and takes ``max((V - R)^2, (V_clip - R)^2)``,
    and where the two arguments of a min or max are equal autograd gives each half of the gradient.
    Inside the clip range both squares are equal, so veRL's slope there is ``(1 + s) / 2`` times
    the unclipped one, ``s`` being the slope of ``V_clip``: 1 inside, 1/2 at a bound ``V`` equals
    exactly (1/4 when ``c = 0`` puts it on both). ``ops.ppo_value_loss`` gives the unclipped slope
    there (a clamp), so the factor is 3/4 on exact clip bounds and 1 everywhere else.
    """
    with torch.no_grad():
        v, old = values.to(dtype), old_values.to(dtype)
        clip_slope = torch.where(v == old + clip, 0.5, 1.0) * torch.where(v == old - clip, 0.5, 1.0)
        return (0.5 + 0.5 * clip_slope).to(dtype)


def compute_value_loss(
    vpreds: torch.Tensor,
    returns: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float,
    loss_agg_mode: str = "token-mean",
    dp_size: int = 1,
    batch_num_tokens: int | torch.Tensor | None = None,
    global_batch_size: int | torch.Tensor | None = None,
    loss_scale_factor: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """veRL's clipped value loss, computed by ``orz_fast.ops.ppo_value_loss``.

    Args:
        vpreds: [B, T] float, current values (differentiable); values: [B, T] old values;
        returns: [B, T]; response_mask: [B, T] binary.
        cliprange_value: clip of ``vpreds`` around ``values``, >= 0.
        loss_agg_mode: any of ``SUPPORTED_LOSS_AGG_MODES``, as veRL's ``agg_loss``; the per-row
            ``1 / tokens`` weight of ``"seq-mean-token-mean"`` goes in as a float mask.
        dp_size, batch_num_tokens, global_batch_size, loss_scale_factor: veRL's global-batch
            normalisation.

    Returns:
        (vf_loss 0-dim, vf_clipfrac 0-dim tensor): ``0.5 * agg(max((V - R)^2, (V_clip - R)^2))``
        and the masked fraction of tokens where the clipped error is the larger, in the dtypes
        veRL returns. The gradient matches veRL's autograd also where ``V`` is exactly at a clip
        bound (3/4 of the unclipped slope there), judged in float32 or wider.
    """
    check_padded("compute_value_loss", vpreds=vpreds, returns=returns, values=values, response_mask=response_mask)
    _check_loss_agg_mode("compute_value_loss: loss_agg_mode", loss_agg_mode)
    _check_cliprange_value("compute_value_loss: cliprange_value", cliprange_value)
    dtype = torch.promote_types(torch.promote_types(vpreds.dtype, values.dtype), returns.dtype)
    compute_dtype = torch.promote_types(dtype, torch.float32)
    v = vpreds
    if vpreds.requires_grad and torch.is_grad_enabled():
        v = _ScaleGrad.apply(vpreds, _value_clip_tie_factor(vpreds, values, cliprange_value, compute_dtype))
    mask = _ops_mask(response_mask)
    per_row = loss_agg_mode == "seq-mean-token-mean"
    weights = per_row_weights(response_mask, compute_dtype) if per_row else mask
    loss, stats = ops.ppo_value_loss(
        v.reshape(-1), values.reshape(-1), returns.reshape(-1), weights.reshape(-1), clip=cliprange_value
    )
    if per_row:
        with torch.no_grad():  # veRL's clip fraction counts tokens, not row weights
            _, token_stats = ops.ppo_value_loss(
                vpreds.detach().reshape(-1),
                values.reshape(-1),
                returns.reshape(-1),
                mask.reshape(-1),
                clip=cliprange_value,
            )
        clipfrac = token_stats["clipfrac"]
    else:
        clipfrac = stats["clipfrac"]
    vf_loss = _aggregate(
        "compute_value_loss",
        token_sum(loss, stats),
        response_mask,
        loss_agg_mode,
        dp_size=dp_size,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
        loss_scale_factor=loss_scale_factor,
    )
    divisor = _divisor(loss_agg_mode, batch_num_tokens, global_batch_size)
    out_dtype = host_dtype(dtype, response_mask, loss_agg_mode.startswith("seq-"), divisor)
    return vf_loss.to(out_dtype), clipfrac.to(host_dtype(torch.float32, response_mask, False))


def check_actor_config(config: Any) -> None:
    """Raise ``ValueError`` naming the option and its supported values for a veRL actor config
    (``actor_rollout_ref.actor``) that ``compute_policy_loss_vanilla`` does not compute."""
    _check_loss_agg_mode("actor_rollout_ref.actor.loss_agg_mode", _config_value(config, "loss_agg_mode", "token-mean"))
    clip_ratio_c = _config_value(config, "clip_ratio_c", 3.0)
    if not clip_ratio_c > 1.0:
        raise ValueError(
            f"actor_rollout_ref.actor.clip_ratio_c={clip_ratio_c} is not supported: dual-clip PPO takes a value > 1.0"
        )


def check_critic_config(config: Any) -> None:
    """Raise ``ValueError`` naming the option and its supported values for a veRL critic config
    (``critic``) that ``compute_value_loss`` does not compute."""
    _check_loss_agg_mode("critic.loss_agg_mode", _config_value(config, "loss_agg_mode", "token-mean"))
    _check_cliprange_value("critic.cliprange_value", _config_value(config, "cliprange_value", 0.5))


def _check_when_built(config_class: type, check: Any) -> None:
    """Run ``check(config)`` first in ``config_class.__post_init__`` (which veRL's strategy-specific
    subclasses call), so a config the adapter cannot compute fails where veRL builds it."""
    original = config_class.__post_init__
    if getattr(original, "_orz_fast_check", None) is check:
        return

    @functools.wraps(original)
    def __post_init__(self):
        check(self)
        original(self)

    __post_init__._orz_fast_check = check
    config_class.__post_init__ = __post_init__


def _check_actor_config_if_selected(config: Any) -> None:
    policy_loss = _config_value(config, "policy_loss", None)
    if policy_loss is not None and _config_value(policy_loss, "loss_mode", None) == POLICY_LOSS_NAME:
        check_actor_config(config)


def register(*, replace_builtin: bool = True) -> None:
    """Register the orz_fast functions with veRL (which must be importable).

    Adds ``compute_policy_loss_vanilla`` to veRL's policy-loss registry as ``"orz_vanilla"``
    (select it with ``actor_rollout_ref.actor.policy_loss.loss_mode=orz_vanilla``). With
    ``replace_builtin``, also makes veRL's ``adv_estimator=gae`` and its critic's value loss
    use the orz_fast versions, by rebinding the names veRL's trainer calls them by.

    veRL's ``ActorConfig`` (when it selects ``orz_vanilla``) and, with ``replace_builtin``, its
    ``CriticConfig`` then run ``check_actor_config`` / ``check_critic_config`` when they are
    built, so an unsupported option fails there rather than at the first training step.
    Calling ``register`` again changes nothing.
    """
    from verl.trainer.ppo import core_algos
    from verl.workers.config import ActorConfig, CriticConfig

    core_algos.register_policy_loss(POLICY_LOSS_NAME)(compute_policy_loss_vanilla)
    _check_when_built(ActorConfig, _check_actor_config_if_selected)
    if not replace_builtin:
        return
    from verl.workers.utils import losses

    core_algos.compute_gae_advantage_return = compute_gae_advantage_return
    core_algos.ADV_ESTIMATOR_REGISTRY[core_algos.AdvantageEstimator.GAE.value] = compute_gae_advantage_return
    core_algos.compute_value_loss = compute_value_loss
    losses.compute_value_loss = compute_value_loss
    _check_when_built(CriticConfig, check_critic_config)
