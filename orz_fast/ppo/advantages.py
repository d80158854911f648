"""Advantages for the PPO step: ORZ's GAE with batch whitening, and the critic-free GRPO variant.

One implementation, used by the trainer and the tests. Tensors use the packed response layout
(the N responses of a rank concatenated, T tokens in all, segment offsets ``cu_seqlens`` [N+1])
and stay on their device: GAE runs through :func:`orz_fast.ops.gae` (the Triton kernel on CUDA),
and whitening over the whole step (every data-parallel rank's tokens) costs one all-reduce of
three numbers, with no value read back to the host.
"""

from __future__ import annotations

import numpy as np
import torch

from orz_fast import ops
from orz_fast.config import PPOConfig
from orz_fast.parallel import collectives
from orz_fast.ppo.experience import Experience, SampleTable


def terminal_rewards(scores: torch.Tensor, cu_seqlens: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
    """Per-token rewards [T]: each response's score [N] on its last token, 0 elsewhere.

    Responses must be non-empty (an empty response has no token to carry its score). ``num_tokens`` (T)
    spares a read of ``cu_seqlens[-1]`` from the device.
    """
    if scores.dim() != 1 or cu_seqlens.dim() != 1 or scores.numel() + 1 != cu_seqlens.numel():
        raise ValueError(
            f"scores must be [N] and cu_seqlens [N+1], got {tuple(scores.shape)} and {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device.type == "cpu" and bool((cu_seqlens[1:] <= cu_seqlens[:-1]).any()):
        raise ValueError(f"every response needs at least one token, got cu_seqlens {cu_seqlens.tolist()}")
    if num_tokens is None:
        num_tokens = int(cu_seqlens[-1])  # host read: T sizes the output
    rewards = torch.zeros(num_tokens, dtype=torch.float32, device=scores.device)
    rewards[cu_seqlens[1:].long() - 1] = scores.float()
    return rewards


def whiten(
    advantages: torch.Tensor, group: collectives.Group = None, eps: float = 1e-8, *, inplace: bool = False
) -> torch.Tensor:
    """``(A - mean) / (std + eps)`` with mean and (biased) std over the tokens of every rank of ``group``
    (in float64, one all-reduce of three numbers); ``inplace`` overwrites ``advantages``."""
    total = torch.zeros((), dtype=torch.float64, device=advantages.device)
    squares = torch.zeros((), dtype=torch.float64, device=advantages.device)
    for part in advantages.split(1 << 20):  # float64 a slice at a time: no [T] float64 copy
        part = part.double()  # (a float32 sum with dtype=float64 is a slower, unvectorised loop on CPU)
        total += part.sum()
        squares += torch.dot(part, part)
    count = torch.tensor(float(advantages.numel()), dtype=torch.float64, device=advantages.device)
    count, total, squares = collectives.all_reduce(torch.stack([count, total, squares]), group).unbind()
    mean = total / count
    std = (squares / count - mean * mean).clamp(min=0.0).sqrt()
    out = advantages if inplace else advantages.clone()
    return out.sub_(mean.to(out.dtype)).div_((std + eps).to(out.dtype))


def gae_advantages(
    scores: torch.Tensor,
    values: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    normalize: bool = True,
    group: collectives.Group = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ORZ's advantages: terminal 0/1 rewards, GAE (``orz_fast.ops.gae``), then batch whitening.

    Args:
        scores: [N] response scores. values: [T] critic values (detached). cu_seqlens: [N+1].
        normalize: whiten over every token of ``group``'s ranks (the data-parallel group: the whole step).
    Returns:
        (advantages [T], returns [T]); returns are the critic's targets and are not whitened.
    """
    rewards = terminal_rewards(scores, cu_seqlens, values.numel())
    advantages, returns = _gae(rewards, values.float(), cu_seqlens, gamma, lam)
    return (whiten(advantages, group, inplace=True) if normalize else advantages), returns


CPU_GAE_TOKENS = 1 << 20
"""Tokens per ``ops.gae`` call on CPU tensors (whole responses: segments are independent)."""


def _gae(
    rewards: torch.Tensor, values: torch.Tensor, cu_seqlens: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ops.gae`` over all responses: one call (one kernel launch) on an accelerator; on CPU tensors, runs of
    whole responses of about :data:`CPU_GAE_TOKENS` tokens, so that the torch path's [T]-sized float64
    temporaries stay cache-sized (5-9x faster at 12M tokens, and each run's prefix sums are shorter). The runs'
    advantages overwrite ``rewards`` (each run's rewards are read before its advantages are written): a [T]
    buffer fewer to allocate and fault in."""
    if rewards.device.type != "cpu" or rewards.numel() <= CPU_GAE_TOKENS:
        return ops.gae(rewards, values, cu_seqlens, gamma, lam)
    cu = cu_seqlens.numpy()
    advantages, returns = rewards, torch.empty_like(values)
    first, n = 0, len(cu) - 1
    while first < n:
        last = min(max(int(np.searchsorted(cu, cu[first] + CPU_GAE_TOKENS, side="right")) - 1, first + 1), n)
        lo, hi = int(cu[first]), int(cu[last])
        a, r = ops.gae(rewards[lo:hi], values[lo:hi], cu_seqlens[first : last + 1] - lo, gamma, lam)
        advantages[lo:hi], returns[lo:hi] = a, r
        first = last
    return advantages, returns


def grpo_advantages(
    scores: torch.Tensor,
    slots: np.ndarray,
    cu_seqlens: torch.Tensor,
    *,
    step_scores: np.ndarray | None = None,
    step_slots: np.ndarray | None = None,
    eps: float = 1e-6,
    num_tokens: int | None = None,
) -> torch.Tensor:
    """Critic-free advantages: each response's score normalised within its prompt's group, on every token.

    Args:
        scores: [N] scores of this rank's responses; slots: [N] (host) the prompt of each.
        cu_seqlens: [N+1] response offsets.
        step_scores, step_slots: every response of the step (all ranks), which the group statistics
            are taken over; by default this rank's own.
        num_tokens: T, when known (spares a device read).
    Returns:
        advantages [T]: ``(score - group mean) / (group std + eps)`` broadcast to the response's tokens.
    """
    slots = np.asarray(slots, dtype=np.int64)
    if slots.shape != (scores.numel(),) or cu_seqlens.numel() != scores.numel() + 1:
        raise ValueError(
            f"scores [N], slots [N] and cu_seqlens [N+1] disagree: {tuple(scores.shape)}, {slots.shape}, "
            f"{tuple(cu_seqlens.shape)}"
        )
    if step_scores is None or step_slots is None:
        step_scores, step_slots = scores.double().cpu().numpy(), slots
    step_slots = np.asarray(step_slots, dtype=np.int64)
    count = np.bincount(step_slots)
    mean = np.bincount(step_slots, weights=step_scores) / np.maximum(count, 1)
    var = np.bincount(step_slots, weights=(step_scores - mean[step_slots]) ** 2) / np.maximum(count, 1)
    if not set(slots.tolist()) <= set(step_slots.tolist()):
        raise ValueError("a response's prompt has no group among the step's responses")
    device = scores.device
    group_mean = torch.as_tensor(mean[slots], dtype=torch.float32, device=device)
    group_std = torch.as_tensor(np.sqrt(var[slots]), dtype=torch.float32, device=device)
    per_response = (scores.float() - group_mean) / (group_std + eps)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return torch.repeat_interleave(per_response, lengths.long(), output_size=num_tokens)


def compute_advantages(exp: Experience, step: SampleTable, cfg: PPOConfig, group: collectives.Group) -> None:
    """Set ``exp.advantages`` (and ``exp.returns`` for GAE, from ``exp.values``) for this rank's samples.

    Args:
        exp: this data-parallel rank's samples. step: the whole step's samples (GRPO's groups span ranks).
        cfg: ``ppo`` config (advantage, gamma, lam, normalize_advantages). group: the data-parallel group.
    """
    if cfg.advantage == "grpo":
        exp.advantages = grpo_advantages(
            exp.scores(),
            exp.table.slot,
            exp.cu_seqlens(),
            step_scores=step.score,
            step_slots=step.slot,
            num_tokens=exp.num_actions,
        )
        return
    if exp.values is None:
        raise ValueError("GAE needs the critic's values: set exp.values first")
    exp.advantages, exp.returns = gae_advantages(
        exp.scores(),
        exp.values,
        exp.cu_seqlens(),
        gamma=cfg.gamma,
        lam=cfg.lam,
        normalize=cfg.normalize_advantages == "batch",
        group=group,
    )
