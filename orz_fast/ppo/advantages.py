"""Advantages for the PPO step: ORZ's GAE with batch whitening, and the critic-free GRPO variant.

All tensors use the packed response layout: the N responses of a step concatenated,
T tokens in all, segment offsets ``cu_seqlens`` [N+1].
"""

from __future__ import annotations

import torch

from orz_fast import ops


def _segment_ids(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Response index of every token: int64 [T]."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(
        torch.arange(lengths.numel(), device=cu_seqlens.device), lengths, output_size=num_tokens
    )


def terminal_rewards(scores: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Per-token rewards [T]: each response's score [N] on its last token, 0 elsewhere.

    Responses must be non-empty (an empty response has no token to carry its score).
    """
    if scores.dim() != 1 or cu_seqlens.dim() != 1 or scores.numel() + 1 != cu_seqlens.numel():
        raise ValueError(
            f"scores must be [N] and cu_seqlens [N+1], got {tuple(scores.shape)} and {tuple(cu_seqlens.shape)}"
        )
    ends = cu_seqlens[1:].long() - 1
    if cu_seqlens.device.type == "cpu" and bool((cu_seqlens[1:] <= cu_seqlens[:-1]).any()):
        raise ValueError(f"every response needs at least one token, got cu_seqlens {cu_seqlens.tolist()}")
    num_tokens = int(cu_seqlens[-1])  # host read: T sizes the output
    rewards = torch.zeros(num_tokens, dtype=torch.float32, device=scores.device)
    rewards[ends] = scores.float()
    return rewards


def whiten(advantages: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Batch-level normalisation over all response tokens: ``(A - mean) / (std + eps)``."""
    mean = advantages.mean()
    std = advantages.std(unbiased=False)
    return (advantages - mean) / (std + eps)


def gae_advantages(
    scores: torch.Tensor,
    values: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ORZ's advantages: terminal 0/1 rewards, GAE (``orz_fast.ops.gae``), then batch whitening.

    Args:
        scores: [N] response scores. values: [T] critic values (detached). cu_seqlens: [N+1].
    Returns:
        (advantages [T], returns [T]); returns are the critic's targets and are not whitened.
    """
    rewards = terminal_rewards(scores, cu_seqlens)
    advantages, returns = ops.gae(rewards, values.float(), cu_seqlens, gamma, lam)
    return (whiten(advantages) if normalize else advantages), returns


def grpo_advantages(
    scores: torch.Tensor,
    group_size: int,
    cu_seqlens: torch.Tensor,
    *,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Critic-free advantages: each response's score normalised within its prompt's group, on every token.

    Args:
        scores: [N] with N = prompts * group_size, groups contiguous (prompt-major order).
        group_size: samples per prompt.
        cu_seqlens: [N+1].
    Returns:
        advantages [T]: ``(score - group mean) / (group std + eps)`` broadcast to the response's tokens.
    """
    if group_size < 1 or scores.numel() % group_size != 0:
        raise ValueError(f"{scores.numel()} scores do not split into groups of group_size={group_size}")
    grouped = scores.float().view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, unbiased=False, keepdim=True)
    per_response = ((grouped - mean) / (std + eps)).reshape(-1)
    num_tokens = int(cu_seqlens[-1])  # host read: T sizes the output
    return per_response[_segment_ids(cu_seqlens, num_tokens)]
