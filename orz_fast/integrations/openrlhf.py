"""OpenRLHF drop-in: ``PolicyLoss`` and ``ValueLoss`` on ``orz_fast.ops``.

Same constructor arguments, ``forward`` signature, return values and reduction as
``openrlhf.models.loss`` (OpenRLHF 0.11)::

    from orz_fast.integrations.openrlhf import PolicyLoss, ValueLoss  # instead of openrlhf.models

Supported: PPO clipping with separate low / high epsilons, dual clip, token-level and
sequence-level reduction (``token_level_loss``) of both losses, the global-batch arguments
(``dp_size``, ``batch_num_tokens``, ``global_batch_size``), and the value loss with or without
value clipping. Results come back in the dtypes OpenRLHF returns for the same inputs (computed in
float32 or wider). The constructor raises ``ValueError``, naming the option and the values
supported, for what ``orz_fast.ops`` does not compute (``policy_loss_type="gspo"``, the
train / rollout importance-sampling correction) rather than computing something else.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from orz_fast import ops
from orz_fast.integrations._reduce import check_padded, host_dtype, per_row_weights, row_token_counts, token_sum

_LOG_RATIO_BOUND = 20.0  # OpenRLHF clamps log(pi / pi_old) to [-20, 20] before exponentiating

__all__ = ["PolicyLoss", "ValueLoss"]


def _check_choice(owner: str, option: str, value: object, supported: tuple, note: str = "") -> None:
    """``ValueError`` naming the option and the supported values unless ``value`` is one of them."""
    if value not in supported:
        listed = ", ".join(repr(v) for v in supported)
        raise ValueError(
            f"{owner}: {option}={value!r} is not supported; supported values: {listed}" + (f" ({note})" if note else "")
        )


def _flat_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones(like.numel(), dtype=torch.bool, device=like.device)
    if mask.dtype != torch.bool and not mask.is_floating_point():
        mask = mask.bool()
    return mask.reshape(-1)


def _row_mean_weights(mask: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] weights ``mask / (tokens in the row + 1e-8)``; every token counts when ``mask`` is None."""
    return per_row_weights(torch.ones_like(like, dtype=torch.bool) if mask is None else mask, dtype)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """OpenRLHF's ``masked_mean`` over all elements (its metrics' dtype and reduction)."""
    return values.mean() if mask is None else (values * mask).sum() / mask.sum()


def _reduce(
    token_sum_loss: torch.Tensor,
    mask: torch.Tensor | None,
    like: torch.Tensor,
    token_level_loss: bool,
    dp_size: int,
    batch_num_tokens: float | None,
    global_batch_size: float | None,
) -> torch.Tensor:
    """OpenRLHF's ``aggregate_loss`` from the masked token sum (already 1/n-weighted per row for
    the sequence-level mode)."""
    if token_level_loss:
        if batch_num_tokens is None:
            count = like.new_tensor(like.numel(), dtype=torch.float32) if mask is None else mask.sum()
            return token_sum_loss / count
        return token_sum_loss / batch_num_tokens * dp_size
    if global_batch_size is None:
        counts = (
            torch.full(like.shape[:-1], like.shape[-1], device=like.device, dtype=torch.float32)
            if mask is None
            else row_token_counts(mask).squeeze(-1)
        )
        return token_sum_loss / (counts > 0).to(torch.float32).sum()
    return token_sum_loss / global_batch_size * dp_size


class PolicyLoss(nn.Module):
    """PPO clipped policy loss, call-compatible with ``openrlhf.models.loss.PolicyLoss``.

    ``forward(log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None,
    dp_size=1, batch_num_tokens=None, global_batch_size=None)`` takes [B, T] (or packed [1, T])
    tensors and returns ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``; the last two
    are ``None`` since the importance-sampling correction is not supported here.
    """

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float | None = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        is_correction_level: str = "off",
        is_correction_mode: str = "mask",
        is_correction_gating: str = "ratio",
        is_correction_threshold: list | tuple = (0.5, 5.0),
    ) -> None:
        super().__init__()
        _check_choice(
            "PolicyLoss",
            "policy_loss_type",
            policy_loss_type,
            ("ppo",),
            "'gspo' is computed by openrlhf.models.PolicyLoss",
        )
        _check_choice(
            "PolicyLoss",
            "is_correction_level",
            is_correction_level,
            ("off",),
            "the train/rollout importance-sampling correction is computed by openrlhf.models.PolicyLoss",
        )
        # OpenRLHF validates these even when the correction is off
        _check_choice("PolicyLoss", "is_correction_mode", is_correction_mode, ("mask", "clip"))
        _check_choice("PolicyLoss", "is_correction_gating", is_correction_gating, ("ratio", "binary_kl", "tv"))
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"PolicyLoss: dual_clip={dual_clip!r} is not supported; supported values: None or > 1.0")
        _check_choice("PolicyLoss", "token_level_loss", token_level_loss, (True, False))
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.dual_clip = dual_clip
        self.token_level_loss = token_level_loss
        self.policy_loss_type = policy_loss_type
        self.is_correction_level = is_correction_level
        self.is_correction_mode = is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = is_correction_threshold

    def forward(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        action_mask: torch.Tensor | None = None,
        rollout_log_probs: torch.Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | None = None,
        global_batch_size: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        """Returns (loss 0-dim, clip_ratio 0-dim, ppo_kl 0-dim, None, None).

        ``clip_ratio`` is the masked fraction of tokens whose clipped surrogate is the smaller,
        ``ppo_kl`` the masked mean of ``old_log_probs - log_probs`` (unclamped).
        """
        check_padded(
            "PolicyLoss",
            log_probs=log_probs,
            old_log_probs=old_log_probs,
            advantages=advantages,
            action_mask=action_mask,
        )
        raw_log_ratio = log_probs - old_log_probs
        # at least fp32, as ops computes: a bf16 log(dual_clip) would move the dual-clip cap by 0.3%
        dtype = torch.promote_types(raw_log_ratio.dtype, torch.float32)
        log_ratio = (log_probs.to(dtype) - old_log_probs.to(dtype)).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
        if self.dual_clip is not None:
            # capping the ratio at dual_clip where A < 0 is the dual clip max(min(rA, clip(r)A), cA)
            cap = log_ratio.new_tensor(min(_LOG_RATIO_BOUND, math.log(self.dual_clip)))
            cap = torch.where(advantages < 0, cap, log_ratio.new_tensor(_LOG_RATIO_BOUND))
            log_ratio = log_ratio.clamp(min=log_ratio.new_tensor(-_LOG_RATIO_BOUND), max=cap)
        scaled_adv = advantages
        if not self.token_level_loss:
            scaled_adv = advantages * _row_mean_weights(action_mask, advantages, dtype)
        mask = _flat_mask(action_mask, log_probs)
        loss, stats = ops.ppo_policy_loss(
            log_ratio.reshape(-1),
            torch.zeros_like(log_ratio).reshape(-1),
            scaled_adv.reshape(-1),
            mask,
            clip_eps=self.clip_eps_low,
            clip_eps_high=self.clip_eps_high,
        )
        loss = _reduce(
            token_sum(loss, stats),
            action_mask,
            log_probs,
            self.token_level_loss,
            dp_size,
            batch_num_tokens,
            global_batch_size,
        )
        with torch.no_grad():
            ppo_kl = _masked_mean(-raw_log_ratio, action_mask)
        loss_dtype = torch.promote_types(raw_log_ratio.dtype, advantages.dtype)
        divisor = batch_num_tokens if self.token_level_loss else global_batch_size
        out_dtype = host_dtype(loss_dtype, action_mask, not self.token_level_loss, divisor)
        clip_ratio = stats["clipfrac"].to(host_dtype(torch.float32, action_mask, False))
        return loss.to(out_dtype), clip_ratio, ppo_kl, None, None


class ValueLoss(nn.Module):
    """Clipped value loss, call-compatible with ``openrlhf.models.loss.ValueLoss``.

    ``forward(values, old_values, returns, action_mask=None, dp_size=1, batch_num_tokens=None,
    global_batch_size=None)`` returns ``0.5 * aggregate(max((V_clip - R)^2, (V - R)^2))``, or
    ``0.5 * aggregate((V - R)^2)`` when ``clip_eps`` is None; ``aggregate`` is the masked token
    mean, or with ``token_level_loss=False`` the mean over non-empty rows of each row's token
    mean (the row weights go into ``ops.ppo_value_loss`` as a float mask).
    """

    def __init__(self, clip_eps: float | None = None, token_level_loss: bool = True) -> None:
        super().__init__()
        _check_choice("ValueLoss", "token_level_loss", token_level_loss, (True, False))
        self.clip_eps = clip_eps
        self.token_level_loss = token_level_loss

    def forward(
        self,
        values: torch.Tensor,
        old_values: torch.Tensor,
        returns: torch.Tensor,
        action_mask: torch.Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | None = None,
        global_batch_size: float | None = None,
    ) -> torch.Tensor:
        check_padded("ValueLoss", values=values, old_values=old_values, returns=returns, action_mask=action_mask)
        clip = math.inf if self.clip_eps is None else self.clip_eps
        loss_dtype = torch.promote_types(values.dtype, returns.dtype)
        if self.clip_eps is not None:
            loss_dtype = torch.promote_types(loss_dtype, old_values.dtype)
        if self.token_level_loss:
            weights = _flat_mask(action_mask, values)
        else:
            weights = _row_mean_weights(action_mask, values, torch.promote_types(loss_dtype, torch.float32)).reshape(-1)
        loss, stats = ops.ppo_value_loss(
            values.reshape(-1), old_values.reshape(-1), returns.reshape(-1), weights, clip=clip
        )
        loss = _reduce(
            token_sum(loss, stats),
            action_mask,
            values,
            self.token_level_loss,
            dp_size,
            batch_num_tokens,
            global_batch_size,
        )
        divisor = batch_num_tokens if self.token_level_loss else global_batch_size
        return loss.to(host_dtype(loss_dtype, action_mask, not self.token_level_loss, divisor))
