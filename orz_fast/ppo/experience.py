"""Rollout samples and the packed micro-batches the PPO updates run on.

A sample is one response to one prompt. Training feeds ``prompt + response[:-1]`` (the last
response token is never an input), so the action for response token ``j`` is predicted by
the hidden state at position ``len(prompt) - 1 + j``: these positions are the micro-batch's
``action_idx``, and every per-action quantity (targets, old log-probs, values, advantages,
returns) is a [A] tensor aligned with them. No padding token is ever computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from orz_fast import packing


@dataclass
class Sample:
    """One response to one prompt, with what the rollout measured."""

    prompt: list[int]
    response: list[int]
    logprobs: list[float]
    """Sampling log-probs of the response tokens (the old log-probs of an on-policy update)."""
    score: float
    """0/1 reward (0 when truncated)."""
    truncated: bool
    """The response ended by length."""
    group: int
    """Index of its prompt within the step (GRPO groups)."""
    advantage: float = 0.0
    """Group-normalised score (GRPO only; GAE advantages are per token)."""

    @property
    def num_inputs(self) -> int:
        return len(self.prompt) + len(self.response) - 1


def response_offsets(samples: Sequence[Sample]) -> torch.Tensor:
    """``cu_seqlens`` of the responses in sample order: int64 [N+1]."""
    lengths = torch.tensor([len(s.response) for s in samples], dtype=torch.int64)
    return torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])


def pack_micro_batches(samples: Sequence[Sample], indices: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Split ``indices`` into bins of at most ``max_tokens`` input tokens (first-fit decreasing)."""
    lengths = np.array([samples[i].num_inputs for i in indices], dtype=np.int64)
    return [[indices[j] for j in b] for b in packing.pack_by_token_budget(lengths, max_tokens)]


def make_micro_batch(
    samples: Sequence[Sample],
    indices: Sequence[int],
    offsets: torch.Tensor,
    per_action: dict[str, torch.Tensor],
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """One packed micro-batch of ``indices``.

    Args:
        offsets: response offsets of all samples (:func:`response_offsets`).
        per_action: [A_total] tensors in sample order (old log-probs, advantages, ...), sliced
            to this micro-batch's actions under the same keys.
    Returns:
        ``input_ids`` [T], ``cu_seqlens`` int32 [n+1], ``action_idx`` [A], ``targets`` [A],
        ``mask`` [A] (all true), ``rows`` [A] (positions in the per-action tensors) and ``per_action`` slices.
    """
    pieces: list[np.ndarray] = []
    cu = [0]
    action_idx: list[np.ndarray] = []
    rows: list[torch.Tensor] = []
    for i in indices:
        s = samples[i]
        start = cu[-1]
        pieces.append(np.asarray(s.prompt + s.response[:-1], dtype=np.int64))
        cu.append(start + s.num_inputs)
        action_idx.append(np.arange(len(s.response), dtype=np.int64) + (start + len(s.prompt) - 1))
        rows.append(torch.arange(int(offsets[i]), int(offsets[i + 1])))
    row_idx = torch.cat(rows)
    batch = {
        "input_ids": torch.from_numpy(np.concatenate(pieces)).to(device),
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32, device=device),
        "action_idx": torch.from_numpy(np.concatenate(action_idx)).to(device),
        "targets": torch.from_numpy(
            np.concatenate([np.asarray(samples[i].response, dtype=np.int64) for i in indices])
        ).to(device),
        "rows": row_idx.to(device),
    }
    batch["mask"] = torch.ones_like(batch["targets"], dtype=torch.bool)
    for key, values in per_action.items():
        batch[key] = values[row_idx].to(device)
    return batch
