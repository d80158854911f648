"""The rule-based 0/1 reward: extraction, the cached fast path, and the worker pool behind it."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

from orz_fast.reward import countdown
from orz_fast.reward.extract import extract_answer, last_boxed, sanitize_text
from orz_fast.reward.normalize import fast_equivalent, normalize
from orz_fast.reward.orz_rules import answer_of, extract_answer_orz, is_equiv_string
from orz_fast.reward.verify import VerifierPool

Mode = Literal["default", "orz"]
MODES = ("default", "orz")
MAX_ANSWER_CHARS = 1000
"""Default mode: a longer answer that does not match the ground truth string-wise scores 0 without a
symbolic check (real answers are short; long ones are degenerate)."""
MAX_ORZ_ANSWER_CHARS = 10_000
"""ORZ mode: a longer answer that fails ORZ's string check scores 0 without the symbolic step (in ORZ
such an answer reaches the LaTeX parser and times out, with the same result)."""

_Task = tuple[str, str, str]


class RewardScorer:
    """Scores responses against ground truths (1.0 correct, 0.0 otherwise).

    Args:
        mode: ``"default"`` (normalised fast path + math-verify) or ``"orz"`` (ORZ's own rules,
            :mod:`orz_fast.reward.orz_rules`).
        timeout: seconds one symbolic check may take; past it the answer scores 0.
        workers: worker processes for symbolic checks.
        cache_size: verdicts of symbolic checks remembered (by normalised pair).
        max_answer_chars: see :data:`MAX_ANSWER_CHARS` (default mode only).
    """

    def __init__(
        self,
        mode: Mode = "default",
        *,
        timeout: float = 1.0,
        workers: int = 2,
        cache_size: int = 1 << 16,
        max_answer_chars: int = MAX_ANSWER_CHARS,
    ):
        if mode not in MODES:
            raise ValueError(f"reward mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.max_answer_chars = max_answer_chars
        self.pool = VerifierPool(workers=workers, timeout=timeout)
        self._cache: OrderedDict[_Task, bool] = OrderedDict()
        self._lock = threading.RLock()  # scoring from several threads shares the cache and the pool
        self._cache_size = cache_size
        self.stats = {"scored": 0, "truncated": 0, "no_answer": 0, "fast": 0, "cached": 0, "symbolic": 0}
        """Counters: responses scored, truncated, without an answer, settled by the fast path, by the
        verdict cache, and symbolic checks run."""

    @classmethod
    def from_config(cls, cfg: Any) -> RewardScorer:
        """Build from a :class:`orz_fast.config.RewardConfig` (``mode``, ``timeout``, ``workers``)."""
        return cls(cfg.mode, timeout=cfg.timeout, workers=cfg.workers)

    def _plan(self, pred: str, ground_truth: str) -> bool | _Task:
        """Settle a pair without the pool (a bool), or return the symbolic check it needs."""
        if self.mode == "orz":
            label, answer = answer_of(ground_truth), answer_of(pred)
            if is_equiv_string(label, answer):
                return True
            if len(answer) > MAX_ORZ_ANSWER_CHARS:
                return False
            return ("orz", label, answer)
        verdict = fast_equivalent(pred, ground_truth)
        if verdict is not None:
            return verdict
        if len(pred) > self.max_answer_chars:
            return False
        return ("math", normalize(pred).latex, normalize(ground_truth).latex)

    def _plan_response(self, response: str | bytes, ground_truth: str, truncated: bool) -> bool | _Task:
        if truncated:
            self.stats["truncated"] += 1
            return False
        ground_truth = sanitize_text(ground_truth)
        target = countdown.parse_target(ground_truth)
        if target is not None:
            pred = extract_answer(response)
            return pred is not None and countdown.check(pred, *target)
        if self.mode == "orz":
            span = extract_answer_orz(response)
            if not span:
                self.stats["no_answer"] += 1
                return False
            return self._plan(span, ground_truth)
        pred = extract_answer(response)
        if pred is None:
            self.stats["no_answer"] += 1
            return False
        if "\\boxed" in ground_truth:
            ground_truth = last_boxed(ground_truth) or ground_truth
        return self._plan(pred, ground_truth)

    def is_equivalent(self, pred: str, ground_truth: str) -> bool:
        """Whether an extracted answer equals the ground truth under this scorer's rules."""
        pred, ground_truth = sanitize_text(pred), sanitize_text(ground_truth)
        target = countdown.parse_target(ground_truth)
        if target is not None:
            return countdown.check(pred, *target)
        with self._lock:
            return self._resolve([self._plan(pred, ground_truth)])[0]

    def score(
        self, response: str | bytes, ground_truth: str, *, finish_reason: str | None = None, truncated: bool = False
    ) -> float:
        """1.0 when the response's answer equals ``ground_truth``, else 0.0. A response that ended by
        length (``finish_reason == "length"`` or ``truncated``) scores 0."""
        return self.score_batch(
            [response],
            [ground_truth],
            finish_reasons=None if finish_reason is None else [finish_reason],
            truncated=[truncated],
        )[0]

    def score_batch(
        self,
        responses: Sequence[str | bytes],
        ground_truths: Sequence[str],
        *,
        finish_reasons: Sequence[str | None] | None = None,
        truncated: Sequence[bool] | None = None,
    ) -> list[float]:
        """Score many responses: the fast path here, symbolic checks deduplicated and spread over the pool.

        ``finish_reasons`` (``"stop"``/``"length"``, as in rollout ``Completion``) and ``truncated``
        are optional per-response lists; either marking a response as cut by length scores it 0.
        """
        n = len(responses)
        if len(ground_truths) != n:
            raise ValueError(f"got {n} responses but {len(ground_truths)} ground truths")
        for name, seq in (("finish_reasons", finish_reasons), ("truncated", truncated)):
            if seq is not None and len(seq) != n:
                raise ValueError(f"got {n} responses but {len(seq)} {name}")
        with self._lock:
            plans = []
            for i in range(n):
                cut = (finish_reasons is not None and finish_reasons[i] == "length") or (
                    truncated is not None and bool(truncated[i])
                )
                plans.append(self._plan_response(responses[i], ground_truths[i], cut))
            self.stats["scored"] += n
            return [1.0 if ok else 0.0 for ok in self._resolve(plans)]

    def _resolve(self, plans: list[bool | _Task]) -> list[bool]:
        """Replace each task by its verdict: from the cache, else from one pool run over the distinct tasks."""
        out: list[bool] = [False] * len(plans)
        todo: dict[_Task, list[int]] = {}
        for i, plan in enumerate(plans):
            if isinstance(plan, bool):
                out[i] = plan
                self.stats["fast"] += 1
                continue
            hit = self._cache.get(plan)
            if hit is not None:
                self._cache.move_to_end(plan)
                out[i] = hit
                self.stats["cached"] += 1
                continue
            todo.setdefault(plan, []).append(i)
        if todo:
            tasks = sorted(todo, key=lambda t: (t[0], t[2], t[1]))  # same ground truth together: parse cache hits
            self.stats["symbolic"] += len(tasks)
            for task, verdict in zip(tasks, self.pool.run(tasks), strict=True):
                if verdict is not None:  # a timeout may be transient: only definite verdicts are cached
                    self._cache[task] = verdict
                for i in todo[task]:
                    out[i] = bool(verdict)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return out

    def clear_cache(self) -> None:
        """Forget remembered verdicts and normalisations (benchmarks measure cold scoring this way)."""
        with self._lock:
            self._cache.clear()
            normalize.cache_clear()
            self.pool.clear_worker_caches()

    def close(self) -> None:
        """Stop the worker processes."""
        self.pool.close()

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_shared: dict[tuple[str, float, int], RewardScorer] = {}
_shared_lock = threading.Lock()


def shared_scorer(mode: Mode = "default", *, timeout: float = 1.0, workers: int = 2) -> RewardScorer:
    """The process-wide scorer for these settings (created on first use, stopped by :func:`shutdown`)."""
    key = (mode, float(timeout), int(workers))
    with _shared_lock:
        scorer = _shared.get(key)
        if scorer is None:
            scorer = _shared[key] = RewardScorer(mode, timeout=timeout, workers=workers)
        return scorer


def shutdown() -> None:
    """Stop the worker processes of every shared scorer."""
    with _shared_lock:
        for scorer in _shared.values():
            scorer.close()
        _shared.clear()
