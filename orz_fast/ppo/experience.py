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
``len(prompt) - 1 + j``. :class:`MicroBatches` packs any subset of samples into such inputs,
with the matching ``targets`` and per-token slices, by concatenating per-sample views on the
device (no per-token Python); :func:`gather_actions` picks the action rows of a model output.

With ``share_prompts`` the samples of one prompt in a micro-batch feed that prompt once, followed by
each one's ``response[:-1]`` (the :class:`~orz_fast.models.attention.SharedPrompts` layout): their first
action is predicted by the prompt's last row, and the prompt's forward is shared by all of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

import numpy as np
import torch

from orz_fast import packing
from orz_fast.models.attention import SharedPrompts, shared_prompt_layout

PerAction = torch.Tensor | tuple[torch.Tensor, ...]
"""A per-token [A] tensor, or its per-sample views (:meth:`Experience.per_sample`)."""


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

    def per_sample(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Views of a per-token [A] ``tensor`` (e.g. ``response_ids``), one per sample (a single split)."""
        return tensor.split(self.table.response_len.tolist())

    @cached_property
    def token_views(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Per prompt slot its tokens, per sample its response but the last token (a model input), and per sample
        its response: views made once (splitting costs a tensor object per piece)."""
        table = self.table
        prompts = self.tokens[: self.num_prompt_tokens].split(np.diff(self.prompt_offsets).tolist())
        ends = np.stack([table.response_len - 1, np.ones_like(table.response_len)], 1).reshape(-1)
        return prompts, self.response_ids.split(ends.tolist())[0::2], self.per_sample(self.response_ids)

    def actions_of(self, tensor: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """The parts of a per-token [A] ``tensor`` belonging to samples ``rows``, end to end in that order."""
        views = self.per_sample(tensor)
        return torch.cat([views[i] for i in rows.tolist()] or [tensor[:0]])

    def micro_batches(
        self,
        indices: np.ndarray,
        max_tokens: int,
        per_action: dict[str, PerAction],
        *,
        targets: bool = True,
        share_prompts: bool = False,
    ) -> MicroBatches:
        """Samples ``indices`` in micro-batches of at most ``max_tokens`` input tokens (first-fit decreasing).
        ``per_action``: [A] tensors, or their :meth:`per_sample` views (split once for many calls).
        ``share_prompts``: the samples of one prompt in a micro-batch feed it once, and packing counts it once
        (:func:`orz_fast.packing.pack_shared_prompts`: a sample goes first to a micro-batch holding its prompt)."""
        idx = np.asarray(indices, dtype=np.int64)
        if not share_prompts:
            bins = packing.pack_by_token_budget(self.table.num_inputs[idx], max_tokens)
            return MicroBatches(self, [idx[np.asarray(b, dtype=np.int64)] for b in bins], per_action, targets=targets)
        table = self.table
        bins = packing.pack_shared_prompts(
            np.maximum(table.response_len[idx] - 1, 0), table.slot[idx], table.prompt_len[idx], max_tokens
        )
        return MicroBatches(
            self, [idx[np.asarray(b, dtype=np.int64)] for b in bins], per_action, targets=targets, shared=True
        )


def gather_actions(output: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """The rows of a micro-batch's model output (hidden states [T, H] or values [T]) that predict its response
    tokens, end to end in sample order: [A_mb, ...]. Differentiable (rows a shared prompt gives several samples
    receive the sum of their gradients)."""
    parts = output.split(batch["action_splits"])
    picks = batch.get("action_picks")
    return torch.cat(parts[1::2] if picks is None else [parts[i] for i in picks])


class MicroBatches:
    """Micro-batches of an :class:`Experience`, each built when the schedule asks for it (never the whole step's
    inputs at once), by concatenating per-sample views (one split per tensor for all of them).

    A micro-batch holds ``input_ids`` int32 [T] (each sample's prompt, then its response but the last token),
    ``cu_seqlens`` int32 [n+1], ``action_splits`` (host: per sample, the input positions before its first
    action, then its actions; see :func:`gather_actions`), ``targets`` int64 [A_mb] (unless ``targets=False``:
    a value head needs none), ``mask`` [A_mb] (all true), ``samples`` (its indices, host) and the slices of
    each ``per_action`` [A] tensor under the same keys. With ``shared`` (:meth:`Experience.micro_batches` with
    ``share_prompts``), ``input_ids`` holds each run of one prompt's samples as that prompt, then their
    responses but the last token, ``attention`` (their :class:`~orz_fast.models.attention.SharedPrompts`)
    replaces ``cu_seqlens``, and ``action_picks`` lists the ``action_splits`` pieces that are actions, in order
    (a prompt's last row once per sample of its run).

    Attributes:
        bins: the sample indices of each micro-batch.
        max_tokens: the longest micro-batch's input tokens.
    """

    def __init__(
        self,
        exp: Experience,
        bins: list[np.ndarray],
        per_action: dict[str, PerAction],
        *,
        targets: bool = True,
        shared: bool = False,
    ) -> None:
        self.exp, self.bins, self.per_action, self.targets, self.shared = exp, bins, per_action, targets, shared
        if shared:
            self.tokens = self._plan_shared()
        else:
            self.tokens = [int(exp.table.num_inputs[b].sum()) for b in bins]
        self.max_tokens = max(self.tokens, default=0)

    def _plan_shared(self) -> list[int]:
        """The shared-prompt layout of every micro-batch at once (host arithmetic over the samples, vectorised):
        per sample its prompt length, rows, whether it opens its prompt's run, its :func:`shared_prompt_layout`
        pieces (each micro-batch copies its slice to the device) and its actions' pieces. Returns the
        micro-batches' token counts."""
        table = self.exp.table
        sizes = np.array([len(b) for b in self.bins], dtype=np.int64)
        self._bounds = _offsets(sizes)
        order = np.concatenate(self.bins) if self.bins else np.zeros(0, dtype=np.int64)
        slot, rl, pl = table.slot[order], table.response_len[order], table.prompt_len[order]
        if len(rl) and rl.min() < 1:
            i = int(order[np.argmin(rl)])
            raise ValueError(f"sample {i} has an empty response: prompt sharing needs at least one response token")
        opens = np.empty(len(order), dtype=bool)
        opens[:1] = True
        np.not_equal(slot[1:], slot[:-1], out=opens[1:])
        opens[self._bounds[:-1][sizes > 0]] = True  # every micro-batch opens with a prompt
        rin = rl - 1
        bin_of = np.repeat(np.arange(len(sizes)), sizes)
        firsts = self._bounds[:-1][sizes > 0]
        rows = np.zeros(len(sizes), dtype=np.int64)
        if len(order):
            rows[sizes > 0] = np.add.reduceat(rin + pl * opens, firsts)
        self._pieces = shared_prompt_layout(pl, rin, opens, _offsets(rows)[:-1][bin_of])
        # The actions' rows as pieces of the stream (see gather_actions): per sample its prompt's head and last row
        # (empty unless it opens its prompt's run), then its own rows; its actions are its prompt's last row
        # (the one its run's first sample holds) followed by its own rows.
        self._splits = np.stack([opens * (pl - 1), opens.astype(np.int64), rin], 1).reshape(-1)
        run_first = np.maximum.accumulate(np.where(opens, np.arange(len(order)), 0))
        self._picks = np.stack([3 * run_first + 1, 3 * np.arange(len(order)) + 2], 1).reshape(-1)
        self._opens, self._rin, self._pl = opens, rin, pl
        return rows.tolist()

    def __len__(self) -> int:
        return len(self.bins)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        exp, table, device = self.exp, self.exp.table, self.exp.device
        prompts, inputs, responses = exp.token_views
        per_action = {k: v if isinstance(v, tuple) else exp.per_sample(v) for k, v in self.per_action.items()}
        slots = table.slot.tolist()
        for k, b in enumerate(self.bins):
            rows = b.tolist()
            rl = table.response_len[b]
            if self.shared:
                batch = self._shared_layout(k, b, prompts, inputs)
            else:
                pl = table.prompt_len[b]
                batch = {
                    "input_ids": torch.cat([t for i in rows for t in (prompts[slots[i]], inputs[i])]),
                    "cu_seqlens": torch.as_tensor(_offsets(pl + rl - 1), dtype=torch.int32, device=device),
                    "action_splits": np.stack([pl - 1, rl], 1).reshape(-1).tolist(),
                }
            batch |= {
                "mask": torch.ones(int(rl.sum()), dtype=torch.bool, device=device),
                "samples": b,
                **{k: torch.cat([views[i] for i in rows]) for k, views in per_action.items()},
            }
            if self.targets:
                batch["targets"] = torch.cat([responses[i] for i in rows]).long()
            yield batch

    def _shared_layout(self, k: int, b: np.ndarray, prompts, inputs) -> dict[str, Any]:
        """``input_ids``, ``attention`` (:class:`SharedPrompts`), ``action_splits`` and ``action_picks`` of
        micro-batch ``k`` (samples ``b``): slices of the planned layout, one host-to-device copy."""
        lo, hi = self._bounds[k], self._bounds[k + 1]
        pieces = torch.from_numpy(self._pieces[lo:hi]).to(self.exp.device)
        opens, slots = self._opens[lo:hi], self.exp.table.slot[b].tolist()
        ids = [
            t for j, i in enumerate(b.tolist()) for t in ((prompts[slots[j]], inputs[i]) if opens[j] else (inputs[i],))
        ]
        return {
            "input_ids": torch.cat(ids),
            "attention": SharedPrompts(self._pl[lo:hi], self._rin[lo:hi], opens, pieces, self.tokens[k]),
            "action_splits": self._splits[3 * lo : 3 * hi].tolist(),
            "action_picks": (self._picks[2 * lo : 2 * hi] - 3 * lo).tolist(),
        }


def step_prompts(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    """The step's prompts end to end, int32 on ``device``, and their offsets [G+1]."""
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)
    flat = np.fromiter((t for p in prompts for t in p), dtype=np.int32, count=int(lengths.sum()))
    return torch.from_numpy(flat).to(device), _offsets(lengths)


def _flat_into(out: torch.Tensor, pieces: Sequence) -> None:
    """Concatenate per-response sequences (lists, numpy arrays or 1-D tensors) into ``out``."""
    if not pieces:
        return
    if all(isinstance(p, torch.Tensor) for p in pieces):
        torch.cat([p.to(device=out.device, dtype=out.dtype) for p in pieces], out=out)
    elif out.device.type == "cpu":
        np.concatenate(pieces, out=out.numpy(), casting="same_kind")
    else:
        host = torch.empty(out.shape, dtype=out.dtype)
        np.concatenate(pieces, out=host.numpy(), casting="same_kind")
        out.copy_(host)


def _with_responses(prompt_tokens: torch.Tensor, table: SampleTable, responses: Sequence) -> torch.Tensor:
    """One int32 buffer: the step's prompts, then every response's tokens."""
    tokens = torch.empty(
        prompt_tokens.numel() + int(table.response_len.sum()), dtype=torch.int32, device=prompt_tokens.device
    )
    tokens[: prompt_tokens.numel()] = prompt_tokens
    _flat_into(tokens[prompt_tokens.numel() :], responses)
    return tokens


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
            ``finish_reason``), as the rollout engines return them: numpy arrays, concatenated into the step's
            buffers in one pass (Python lists and 1-D tensors are taken too; lists cost a per-token conversion).
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
    tokens = _with_responses(prompt_tokens, table, [c.token_ids for c in flat])
    logprobs = torch.empty(tokens.numel() - prompt_tokens.numel(), dtype=torch.float32, device=prompt_tokens.device)
    _flat_into(logprobs, [c.logprobs for c in flat])
    rows = None if prompt_rows is None else np.asarray(prompt_rows, dtype=np.int64)
    return Experience(table, tokens, prompt_offsets, logprobs, prompt_rows=rows)


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
    tokens = _with_responses(tokens, table, list(responses))
    logprobs = torch.zeros(int(table.response_len.sum()), dtype=torch.float32, device=device)
    return Experience(table, tokens, offsets, logprobs)
