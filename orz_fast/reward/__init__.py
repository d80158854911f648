"""Rule-based 0/1 reward: answer extraction and safe math equivalence (DESIGN.md, "Reward").

Two modes (``reward.mode``):

- ``default``: :func:`extract_answer` (last ``<answer>`` block, its last ``\\boxed{}`` or its text),
  then a cached fast path (:mod:`~orz_fast.reward.normalize`: normalised strings, exact rationals,
  choice letters), then math-verify's LaTeX parse + verify in worker processes under a hard timeout.
- ``orz``: Open-Reasoner-Zero's own extraction and checking rules (:mod:`~orz_fast.reward.orz_rules`),
  with its symbolic step in the same worker pool.

Countdown ground truths (``"countdown: 3 7 25 -> 46"``, from :mod:`orz_fast.data.synthetic`) are checked
in both modes by :mod:`~orz_fast.reward.countdown`. Model text is never evaluated as code.
"""

from __future__ import annotations

from collections.abc import Sequence

from orz_fast.reward.extract import extract_answer
from orz_fast.reward.scorer import MODES, Mode, RewardScorer, shared_scorer, shutdown
from orz_fast.reward.verify import VerifierPool

__all__ = [
    "MODES",
    "Mode",
    "RewardScorer",
    "VerifierPool",
    "extract_answer",
    "is_equivalent",
    "score",
    "score_batch",
    "shared_scorer",
    "shutdown",
]


def is_equivalent(pred: str, ground_truth: str, *, timeout: float = 1.0, mode: Mode = "default") -> bool:
    """Whether the extracted answer ``pred`` equals ``ground_truth``; symbolic checks past ``timeout``
    seconds count as not equal."""
    return shared_scorer(mode, timeout=timeout).is_equivalent(pred, ground_truth)


def score(
    response: str | bytes,
    ground_truth: str,
    *,
    finish_reason: str | None = None,
    truncated: bool = False,
    mode: Mode = "default",
    timeout: float = 1.0,
) -> float:
    """1.0 when the response's answer equals ``ground_truth``, else 0.0 (also when it ended by length)."""
    return shared_scorer(mode, timeout=timeout).score(
        response, ground_truth, finish_reason=finish_reason, truncated=truncated
    )


def score_batch(
    responses: Sequence[str | bytes],
    ground_truths: Sequence[str],
    *,
    finish_reasons: Sequence[str | None] | None = None,
    truncated: Sequence[bool] | None = None,
    mode: Mode = "default",
    timeout: float = 1.0,
    workers: int = 2,
) -> list[float]:
    """Score many responses, spreading symbolic checks over ``workers`` processes; one float each."""
    return shared_scorer(mode, timeout=timeout, workers=workers).score_batch(
        responses, ground_truths, finish_reasons=finish_reasons, truncated=truncated
    )
