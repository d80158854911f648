"""The step's experience: its samples as flat tensors plus offsets on the compute device.

A sample is one response to one prompt. A step has ``G`` prompt slots (its prompts, in the
order the sampler took them) and ``n`` samples per slot; every rank builds the same prompt
tokens, so only responses travel between ranks. This rank's part of the step is an
:class:`Experience`:

- ``tokens`` int32 [P + A]: the step's ``G`` prompts end to end (``prompt_offsets`` [G+1]),
  then this rank's responses end to end (``response_offsets`` [N+1], flash-attn ``cu_seqlens``
  style); ``logprobs`` float32 [A] are the sampling log-probs of the response tokens;
- ``table``: one host row per sample (prompt slot, sample number, lengths, score, truncation),
  the only per-sample data kept on the host (packing and balancing read lengths there, so no
  device value is ever read back to plan work);
- per-token results of later stages (``values``, ``advantages``, ``returns``) are [A] tensors
  beside ``logprobs``.

Training feeds ``prompt + response[:-1]`` (the last response token is never an input), so the
action for response token ``j`` is predicted by the hidden state at position
``len(prompt) - 1 + j``; :meth:`Experience.micro_batch` packs any subset of samples into one
such input with the matching ``action_idx``, ``targets`` and per-token slices, by index
arithmetic on the device (no per-token Python).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from orz_fast import packing


@dataclass
class SampleTable:
    """One row per sample, host numpy arrays of length N."""

    slot: np.ndarray
    """int64: prompt slot in the step (0 .. G-1)."""
    sample: np.ndarray
    """int64: sample number within its prompt (0 .. n-1)."""
    prompt_len: np.ndarray
    """int64: prompt tokens."""
    response_len: np.ndarray
    """int64: response tokens."""
    score: np.ndarray
    """float64: reward (0/1; 0 when truncated)."""
    truncated: np.ndarray
    """bool: the response ended by length."""

    def __len__(self) -> int:
        return len(self.slot)

    @property
    def num_inputs(self) -> np.ndarray:
        """Tokens each sample feeds the model: ``prompt + response - 1``."""
        return self.prompt_len + self.response_len - 1

    def take(self, rows: np.ndarray) -> SampleTable:
        return SampleTable(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    @staticmethod
    def concat(tables: Sequence[SampleTable]) -> SampleTable:
        return SampleTable(
            **{f.name: np.concatenate([getattr(t, f.name) for t in tables]) for f in fields(SampleTable)}
        )

    def summary(self) -> dict[str, float]:
        """The step's sample metrics: reward, lengths, truncation, generated and trained token counts."""
        n = max(len(self), 1)
        return {
            "reward_mean": float(self.score.sum()) / n,
            "accuracy": float(self.score.sum()) / n,
            "response_length_mean": float(self.response_len.sum()) / n,
            "response_length_max": float(self.response_len.max(initial=0)),
            "truncated_fraction": float(self.truncated.sum()) / n,
            "generated_tokens": float(self.response_len.sum()),
            "trained_tokens": float(self.num_inputs.sum()),
        }

    def to_tensor(self) -> torch.Tensor:
        """float64 [N, 6] (every integer here is far below 2**53), for one collective."""
        return torch.from_numpy(np.stack([getattr(self, f.name).astype(np.float64) for f in fields(self)], axis=1))

    @staticmethod
    def from_tensor(t: torch.Tensor) -> SampleTable:
        cols = t.cpu().numpy()
        ints = {f.name: cols[:, k].astype(np.int64) for k, f in enumerate(fields(SampleTable)[:4])}
        return SampleTable(**ints, score=cols[:, 4].copy(), truncated=cols[:, 5] != 0)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


@dataclass
class Experience:
    """This rank's samples of one step (see the module docstring for the layout)."""

    table: SampleTable
    tokens: torch.Tensor
    prompt_offsets: np.ndarray
    logprobs: torch.Tensor
    values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    prompt_rows: np.ndarray | None = None
    """Training-set row of each prompt slot (names a sample in errors)."""
    response_offsets: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.response_offsets = _offsets(self.table.response_len)

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    @property
    def num_prompt_tokens(self) -> int:
        return int(self.prompt_offsets[-1])

    @property
    def num_actions(self) -> int:
        """Response tokens A of this rank's samples."""
        return int(self.response_offsets[-1])

    @property
    def response_ids(self) -> torch.Tensor:
        return self.tokens[self.num_prompt_tokens :]

    def cu_seqlens(self) -> torch.Tensor:
        """Response offsets [N+1] int64 on the device."""
        return torch.as_tensor(self.response_offsets, device=self.device)

    def scores(self) -> torch.Tensor:
        """Per-sample scores [N] float32 on the device."""
        return torch.as_tensor(self.table.score, dtype=torch.float32, device=self.device)

    def prompt(self, i: int) -> torch.Tensor:
        """Sample ``i``'s prompt tokens."""
        slot = int(self.table.slot[i])
        return self.tokens[self.prompt_offsets[slot] : self.prompt_offsets[slot + 1]]

    def response(self, i: int) -> torch.Tensor:
        """Sample ``i``'s response tokens."""
        return self.response_ids[self.response_offsets[i] : self.response_offsets[i + 1]]

    def actions_of(self, tensor: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """The slices of a per-token [A] ``tensor`` (or of ``response_ids``) belonging to samples ``rows``, end
        to end in that order."""
        starts, lengths = self.response_offsets[rows].tolist(), self.table.response_len[rows].tolist()
        return torch.cat([tensor[s : s + n] for s, n in zip(starts, lengths, strict=True)] or [tensor[:0]])

    def put_actions(self, out: torch.Tensor, rows: np.ndarray, values: torch.Tensor) -> None:
        """Write ``values`` (samples ``rows``' response tokens end to end) into their places in the [A] ``out``."""
        starts, lengths = self.response_offsets[rows].tolist(), self.table.response_len[rows].tolist()
        at = 0
        for s, n in zip(starts, lengths, strict=True):
            out[s : s + n] = values[at : at + n]
            at += n

    def micro_batch(self, indices: np.ndarray, per_action: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Samples ``indices`` packed into one model input (see :meth:`micro_batch_group`)."""
        return self.micro_batch_group([np.asarray(indices, dtype=np.int64)], per_action)[0]

    def micro_batch_group(
        self, bins: list[np.ndarray], per_action: dict[str, torch.Tensor], *, targets: bool = True
    ) -> list[dict[str, Any]]:
        """Micro-batches of samples ``bins[i]``, built together (one gather per tensor for the whole group).

        Args:
            per_action: [A] tensors of this experience (old log-probs, advantages, ...), sliced to each
                micro-batch's actions under the same keys.
        Returns:
            Per bin: ``input_ids`` int32 [T], ``cu_seqlens`` int32 [n+1], ``action_idx`` int64 [A_mb] (positions
            in the input predicting each response token), ``targets`` int64 [A_mb] (unless ``targets=False``: a
            value head needs none), ``mask`` [A_mb] (all true), ``samples`` (the bin's indices, host) and the
            ``per_action`` slices.
        """
        idx = np.concatenate(bins)
        first = np.cumsum([0] + [len(b) for b in bins[:-1]])
        pl, rl = self.table.prompt_len[idx], self.table.response_len[idx]
        ni = pl + rl - 1
        starts = _offsets(ni)[:-1]
        in_mb = starts - np.repeat(starts[first], [len(b) for b in bins])  # each sample's start in its micro-batch
        # Each sample's input: its prompt (from the step's prompts), then its response but the last token.
        pieces, responses = [], self.response_ids
        prompt_starts = self.prompt_offsets[self.table.slot[idx]].tolist()
        response_starts = self.response_offsets[idx].tolist()
        for p0, p, r0, r in zip(prompt_starts, pl.tolist(), response_starts, rl.tolist(), strict=True):
            pieces += (self.tokens[p0 : p0 + p], responses[r0 : r0 + r - 1])
        tokens_per_mb = np.add.reduceat(ni, first).tolist()
        actions_per_mb = np.add.reduceat(rl, first).tolist()
        # Action j of a sample sits at position (its start in the micro-batch) + len(prompt) - 1 + j.
        shift = in_mb + pl - 1 - _offsets(rl)[:-1]
        action_idx = _repeat(shift, rl, self.device) + torch.arange(int(rl.sum()), device=self.device)
        columns = {
            "input_ids": torch.cat(pieces).split(tokens_per_mb),
            "action_idx": action_idx.split(actions_per_mb),
            "mask": torch.ones(int(rl.sum()), dtype=torch.bool, device=self.device).split(actions_per_mb),
            **{key: self.actions_of(values, idx).split(actions_per_mb) for key, values in per_action.items()},
        }
        if targets:
            columns["targets"] = self.actions_of(responses, idx).long().split(actions_per_mb)
        batches = []
        for i, b in enumerate(bins):
            cu = np.append(in_mb[first[i] : first[i] + len(b)], tokens_per_mb[i])
            batch = {k: v[i] for k, v in columns.items()}
            batch |= {"cu_seqlens": torch.as_tensor(cu, dtype=torch.int32, device=self.device), "samples": b}
            batches.append(batch)
        return batches

    def micro_batches(
        self, indices: np.ndarray, max_tokens: int, per_action: dict[str, torch.Tensor], *, targets: bool = True
    ) -> MicroBatches:
        """Samples ``indices`` in micro-batches of at most ``max_tokens`` input tokens (first-fit decreasing)."""
        idx = np.asarray(indices, dtype=np.int64)
        bins = packing.pack_by_token_budget(self.table.num_inputs[idx], max_tokens)
        return MicroBatches(self, [idx[np.asarray(b, dtype=np.int64)] for b in bins], per_action, targets=targets)


class MicroBatches:
    """Micro-batches of an :class:`Experience`, built a group at a time as the schedule asks for them (never the
    whole step's inputs at once; one gather per tensor for a group of about :attr:`GROUP_TOKENS` tokens).

    Attributes:
        bins: the sample indices of each micro-batch.
        max_tokens: the longest micro-batch's input tokens.
    """

    GROUP_TOKENS = 1 << 20

    def __init__(
        self, exp: Experience, bins: list[np.ndarray], per_action: dict[str, torch.Tensor], *, targets: bool = True
    ) -> None:
        self.exp, self.bins, self.per_action, self.targets = exp, bins, per_action, targets
        self.tokens = [int(exp.table.num_inputs[b].sum()) for b in bins]
        self.max_tokens = max(self.tokens, default=0)

    def __len__(self) -> int:
        return len(self.bins)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        group, size = [], 0
        for b, n in zip(self.bins, self.tokens, strict=True):
            group.append(b)
            size += n
            if size >= self.GROUP_TOKENS:
                yield from self.exp.micro_batch_group(group, self.per_action, targets=self.targets)
                group, size = [], 0
        if group:
            yield from self.exp.micro_batch_group(group, self.per_action, targets=self.targets)


def _repeat(values: np.ndarray, counts: np.ndarray, device: torch.device) -> torch.Tensor:
    """``values[i]`` repeated ``counts[i]`` times, int64 on ``device`` (numpy on the host, torch on accelerators)."""
    if device.type == "cpu":
        return torch.from_numpy(np.repeat(values, counts))
    total = int(counts.sum())
    return torch.repeat_interleave(
        torch.as_tensor(values, device=device), torch.as_tensor(counts, device=device), output_size=total
    )


def step_prompts(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    """The step's prompts end to end, int32 on ``device``, and their offsets [G+1]."""
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)
    flat = np.fromiter((t for p in prompts for t in p), dtype=np.int32, count=int(lengths.sum()))
    return torch.from_numpy(flat).to(device), _offsets(lengths)


def _flat(pieces: Sequence, dtype: np.dtype, torch_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Concatenate per-response sequences (lists, numpy arrays or 1-D tensors) into one tensor on ``device``."""
    if pieces and all(isinstance(p, torch.Tensor) for p in pieces):
        return torch.cat([p.to(device=device, dtype=torch_dtype) for p in pieces])
    if not pieces:
        return torch.empty(0, dtype=torch_dtype, device=device)
    return torch.from_numpy(np.concatenate(pieces, dtype=dtype, casting="same_kind")).to(device)


def from_completions(
    completions: Sequence[Sequence],
    slots: Sequence[int],
    prompt_tokens: torch.Tensor,
    prompt_offsets: np.ndarray,
    scores: Sequence[float],
    prompt_rows: Sequence[int] | None = None,
) -> Experience:
    """This rank's generated samples as an :class:`Experience` on ``prompt_tokens``' device.

    Args:
        completions: per prompt of this rank, its ``n`` completions (``token_ids``, ``logprobs``,
            ``finish_reason``), as the rollout engines return them.
        slots: the step's prompt slot of each of those prompts.
        prompt_tokens, prompt_offsets: the step's prompts (:func:`step_prompts`).
        scores: one score per completion, prompt-major.
        prompt_rows: the training-set row of each prompt slot.
    """
    flat = [c for group in completions for c in group]
    slot = np.repeat(np.asarray(slots, dtype=np.int64), [len(g) for g in completions])
    plens = np.diff(prompt_offsets)
    table = SampleTable(
        slot=slot,
        sample=np.concatenate([np.arange(len(g), dtype=np.int64) for g in completions]) if flat else slot.copy(),
        prompt_len=plens[slot],
        response_len=np.array([len(c.token_ids) for c in flat], dtype=np.int64),
        score=np.asarray(scores, dtype=np.float64).reshape(-1),
        truncated=np.array([c.finish_reason == "length" for c in flat], dtype=bool),
    )
    if len(table.score) != len(flat):
        raise ValueError(f"got {len(table.score)} scores for {len(flat)} completions")
    device = prompt_tokens.device
    ids = _flat([c.token_ids for c in flat], np.int32, torch.int32, device)
    logprobs = _flat([c.logprobs for c in flat], np.float32, torch.float32, device)
    rows = None if prompt_rows is None else np.asarray(prompt_rows, dtype=np.int64)
    return Experience(table, torch.cat([prompt_tokens, ids]), prompt_offsets, logprobs, prompt_rows=rows)


def from_sequences(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], device: torch.device
) -> Experience:
    """Prompt/response pairs (each pair its own prompt slot, zero log-probs and scores) as an :class:`Experience`,
    e.g. for supervised steps."""
    tokens, offsets = step_prompts(prompts, device)
    n = len(prompts)
    table = SampleTable(
        slot=np.arange(n, dtype=np.int64),
        sample=np.zeros(n, dtype=np.int64),
        prompt_len=np.diff(offsets),
        response_len=np.array([len(r) for r in responses], dtype=np.int64),
        score=np.zeros(n),
        truncated=np.zeros(n, dtype=bool),
    )
    ids = _flat(list(responses), np.int32, torch.int32, device)
    logprobs = torch.zeros(ids.numel(), dtype=torch.float32, device=device)
    return Experience(table, torch.cat([tokens, ids]), offsets, logprobs)
