"""Reward throughput: 8,192 MATH-style responses (half correct) scored with ``score_batch`` on 2 workers.

The batch has the shape of one ORZ rollout step (128 prompts x 64 samples). Ground truths are MATH500's;
correct responses write the ground truth in one of several equivalent surface forms, wrong ones give
one of a few wrong answers per prompt (other problems' answers, or an off-by-one number), as sampled
responses to one prompt do. Every timed run starts with empty verdict and parse caches (warm workers),
so the figure is what a training step sees. Target: >= 1,000 responses/s.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest
from harness import median_time, write_result

from orz_fast.reward import RewardScorer
from orz_fast.reward.normalize import normalize

EVAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "orz_eval" / "math500.json"
PROMPTS, SAMPLES = 128, 64
WRONG_ANSWERS_PER_PROMPT = 6
TARGET = 1000.0


def _equivalent_form(truth: str, rng: random.Random) -> str:
    """The ground truth as a model might write it: spacing, \\dfrac, a variable prefix, a decimal."""
    forms = [truth, f" {truth} ", truth.replace("\\frac", "\\dfrac"), truth.replace(",", ", ")]
    if truth.lstrip("-").isdigit():
        forms += [f"x = {truth}", f"{truth}.0"]
    if truth == "\\frac{1}{2}":
        forms.append("0.5")
    return rng.choice(forms)


def _wrong_answer(truth: str, truths: list[str], rng: random.Random) -> str:
    if truth.lstrip("-").isdigit() and rng.random() < 0.3:
        return str(int(truth) + rng.choice((-1, 1)))
    while True:
        other = rng.choice(truths)
        if normalize(other).key != normalize(truth).key:  # e.g. "90" and "90^\\circ" are the same answer
            return other


def build_batch(
    seed: int = 0, wrong_per_prompt: int = WRONG_ANSWERS_PER_PROMPT
) -> tuple[list[str], list[str], list[bool]]:
    truths = [row["final_answer"] for row in json.loads(EVAL.read_text())]
    rng = random.Random(seed)
    responses, ground_truths, correct = [], [], []
    for _ in range(PROMPTS):
        truth = rng.choice(truths)
        wrong = [_wrong_answer(truth, truths, rng) for _ in range(wrong_per_prompt)]
        for s in range(SAMPLES):
            ok = s % 2 == 0
            answer = _equivalent_form(truth, rng) if ok else rng.choice(wrong)
            reasoning = " ".join(rng.choice(("so", "thus", "we", "get", "x", "=", "2", "then")) for _ in range(60))
            responses.append(f"<think> {reasoning} </think> <answer> The answer is \\boxed{{{answer}}}. </answer>")
            ground_truths.append(truth)
            correct.append(ok)
    return responses, ground_truths, correct


@pytest.mark.skipif(not EVAL.is_file(), reason=f"MATH500 not found at {EVAL}")
def test_bench_reward_throughput():
    responses, truths, correct = build_batch()
    n = len(responses)
    assert n == 8192
    with RewardScorer("default", timeout=1.0, workers=2) as scorer:
        scorer.pool.start()

        def cold_run():
            scorer.clear_cache()
            return scorer.score_batch(responses, truths)

        scores = cold_run()
        stats_one_run = dict(scorer.stats)
        seconds = median_time(cold_run, warmup=1, reps=3)
        warm_seconds = median_time(lambda: scorer.score_batch(responses, truths), warmup=1, reps=3)
        # harsher: every wrong sample of a prompt gives its own answer (32 distinct), far more symbolic checks
        hard_responses, hard_truths, hard_correct = build_batch(seed=1, wrong_per_prompt=SAMPLES // 2)
        scorer.clear_cache()
        start = time.perf_counter()
        hard_scores = scorer.score_batch(hard_responses, hard_truths)
        hard_seconds = time.perf_counter() - start
        timeouts = scorer.pool.timeouts
    # every correct form must score 1 and every wrong answer 0
    mismatches = sum(1 for s, ok in zip(scores, correct, strict=True) if (s == 1.0) != ok)
    mismatches += sum(1 for s, ok in zip(hard_scores, hard_correct, strict=True) if (s == 1.0) != ok)
    throughput = n / seconds
    figures = {
        "responses": n,
        "correct_fraction": sum(correct) / n,
        "workers": 2,
        "cpu_count": os.cpu_count(),
        "seconds_cold": round(seconds, 4),
        "responses_per_s_cold": round(throughput, 1),
        "responses_per_s_warm_cache": round(n / warm_seconds, 1),
        "responses_per_s_cold_32_distinct_wrong_per_prompt": round(n / hard_seconds, 1),
        "fast_path_fraction": round(stats_one_run["fast"] / n, 4),
        "symbolic_checks_per_batch": stats_one_run["symbolic"],
        "timeouts": timeouts,
        "label_mismatches": mismatches,
        "target_responses_per_s": TARGET,
    }
    path = write_result("reward_score_batch", figures)
    print(f"\nreward: {throughput:.0f} responses/s cold ({n / warm_seconds:.0f} warm) -> {path}")
    assert mismatches == 0
    assert throughput >= TARGET
