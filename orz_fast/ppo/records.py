"""What a run records of its rollouts: every prompt's scores each step, a readable sample of responses, and
signals of an answer collapse.

Two files in the run directory, one JSON object per line, each with the ``step`` it belongs to (the step
numbering of ``metrics.jsonl``), cut back to the checkpoint's step on ``--resume``:

- ``rollouts.jsonl``, every step, one line per prompt: ``stage`` (``train`` or ``anneal``), ``row`` (the
  prompt's row in the stage's prompt set, as errors name it), ``source`` and ``index`` (its file, as an
  absolute path, or ``synthetic:<family>``, and its row there), then per sample, in sample order, ``scores``,
  ``response_tokens`` and ``finish_reasons`` (``stop`` / ``length``). ``python -m orz_fast.mine_hard`` reads
  it. Built from the step's sample table, which every rank already holds: no collective, a few
  milliseconds at ORZ's 8,192 samples per step.
- ``samples.jsonl``, every ``logging.samples_every`` steps: ``logging.samples_shown`` of the step's responses
  with their prompt, ground truth, extracted answer and score, and the step's most common answers.

The collapse signals (:func:`answer_stats`) are step metrics: ``rollout/identical_groups``, the fraction of
prompts whose ``n`` responses are all the same text; ``rollout/top_answer_share``, the share of the step's
responses whose extracted answer is the step's most common one; ``rollout/answered``, the share with an
answer at all.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orz_fast.data import EncodedPrompt
from orz_fast.metrics import start_jsonl
from orz_fast.parallel import collectives
from orz_fast.ppo.experience import SampleTable

MAX_ANSWER_BYTES = 256
"""Extracted answers are compared on their first this many UTF-8 bytes (they cross ranks for the step's
answer counts; real answers are far shorter)."""
TOP_ANSWERS = 5
"""Most common answers written with each sample of responses."""


def answer_stats(
    groups: Sequence[Sequence[Any]], answers: Sequence[str | None], group: collectives.Group
) -> tuple[dict[str, float], list[tuple[str, int]]]:
    """The step's collapse signals and its :data:`TOP_ANSWERS` most common answers with their counts.

    Args:
        groups: this rollout rank's responses, one sequence per prompt (texts, or token-id sequences when
            the engine decodes nothing); each rank holds whole prompts.
        answers: the extracted answer of each of those responses (prompt-major), None without one.
        group: the rollout group; the answers travel in two all-gathers (sizes first), the counts with them.
    """
    identical = sum(len(g) > 1 and all(_same(r, g[0]) for r in g[1:]) for g in groups)
    encoded = [a.encode("utf-8")[:MAX_ANSWER_BYTES] if a is not None else b"" for a in answers]
    header = [len(groups), identical, max((len(g) for g in groups), default=0)]
    sizes = torch.tensor(header + [len(e) if a is not None else -1 for e, a in zip(encoded, answers, strict=True)])
    data = torch.frombuffer(bytearray(b"".join(encoded) or b"\0"), dtype=torch.uint8)
    all_sizes = collectives.all_gather_varlen(sizes, group)
    all_data = collectives.all_gather_varlen(data, group)
    prompts = identical_total = n = 0
    counts: Counter[str] = Counter()
    responses = answered = 0
    for rank_sizes, rank_data in zip(all_sizes, all_data, strict=True):
        head, lengths = rank_sizes[:3].tolist(), rank_sizes[3:].numpy()
        prompts, identical_total, n = prompts + head[0], identical_total + head[1], max(n, head[2])
        raw = rank_data.numpy().tobytes()
        ends = np.cumsum(np.maximum(lengths, 0))
        responses += len(lengths)
        for length, end in zip(lengths.tolist(), ends.tolist(), strict=True):
            if length >= 0:
                answered += 1
                counts[raw[end - length : end].decode("utf-8", errors="ignore")] += 1
    top = counts.most_common(TOP_ANSWERS)
    metrics = {
        "rollout/answered": answered / max(responses, 1),
        "rollout/top_answer_share": top[0][1] / max(responses, 1) if top else 0.0,
    }
    if n > 1:  # one response per prompt is trivially "identical"
        metrics["rollout/identical_groups"] = identical_total / max(prompts, 1)
    return metrics, top


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    return len(a) == len(b) and bool(np.array_equal(np.asarray(a), np.asarray(b)))


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


class RolloutLog:
    """Writes ``rollouts.jsonl`` and ``samples.jsonl`` (see the module docstring) on the logging rank.

    Args:
        out_dir: the run directory.
        resume_step: when resuming from the checkpoint of this step, later lines are dropped first.
        enabled: False on ranks other than the logging one (nothing is written).
    """

    def __init__(self, out_dir: str | os.PathLike, *, resume_step: int | None = None, enabled: bool = True) -> None:
        self.rollouts_path = Path(out_dir) / "rollouts.jsonl"
        self.samples_path = Path(out_dir) / "samples.jsonl"
        self.enabled = enabled
        self._sources: dict[str, str] = {}
        if enabled:
            self.rollouts_path.parent.mkdir(parents=True, exist_ok=True)
            start_jsonl(self.rollouts_path, resume_step)
            start_jsonl(self.samples_path, resume_step)

    def _source(self, source: str) -> str:
        """A prompt file's absolute path (mining may run elsewhere); ``synthetic:...`` as it is."""
        if source not in self._sources:
            self._sources[source] = source if source.startswith("synthetic:") else os.path.abspath(source)
        return self._sources[source]

    def record_step(
        self, step: int, stage: str, table: SampleTable, prompts: Sequence[EncodedPrompt], rows: Sequence[int]
    ) -> None:
        """One line per prompt slot of the step: its identity and its samples' scores, lengths and finish reasons.

        Args:
            step: the step's number in metrics.jsonl. stage: ``train`` or ``anneal``.
            table: the whole step's samples (any order). prompts: the stage's prompt set.
            rows: the prompt-set row of each prompt slot.
        """
        if not self.enabled:
            return
        order = np.lexsort((table.sample, table.slot))
        slots = table.slot[order]
        bounds = np.flatnonzero(np.diff(slots)) + 1
        scores = [_number(s) for s in table.score[order].tolist()]
        lengths = table.response_len[order].tolist()
        reasons = np.where(table.truncated[order], "length", "stop").tolist()
        lines = []
        for lo, hi in zip([0, *bounds.tolist()], [*bounds.tolist(), len(order)], strict=True):
            if hi == lo:
                continue
            row = int(rows[int(slots[lo])])
            problem = prompts[row].problem
            record = {
                "step": step,
                "stage": stage,
                "row": row,
                "source": self._source(problem.source),
                "index": problem.index,
                "scores": scores[lo:hi],
                "response_tokens": lengths[lo:hi],
                "finish_reasons": reasons[lo:hi],
            }
            lines.append(json.dumps(record, separators=(",", ":")))
        with open(self.rollouts_path, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    def record_samples(
        self, step: int, stage: str, samples: Sequence[dict[str, Any]], top_answers: Sequence[tuple[str, int]]
    ) -> None:
        """One ``samples.jsonl`` line: the sampled responses (:meth:`Rollout.sample_responses`) and the step's most
        common answers as ``[answer, count]`` pairs."""
        if not self.enabled:
            return
        record = {"step": step, "stage": stage, "top_answers": [list(a) for a in top_answers], "samples": samples}
        with open(self.samples_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def format_sample(step: int, sample: dict[str, Any], top_answers: Sequence[tuple[str, int]], width: int = 160) -> str:
    """Two lines for the progress output: a response's tail with its score, and the step's most common answers."""
    text = " ".join(sample["response"].split())
    if len(text) > width:
        text = "..." + text[-(width - 3) :]
    top = ", ".join(f"{a!r} x{c}" for a, c in top_answers[:3]) or "none"
    return (
        f"step {step} sample (row {sample['row']}, truth {sample['ground_truth']!r}, answer {sample['answer']!r}, "
        f"score {sample['score']:g}): {text}\n  most common answers: {top}"
    )
