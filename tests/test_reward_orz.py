"""reward.mode = "orz": ORZ's own rules, side by side with the default mode."""

import json
import random
from pathlib import Path

import pytest

from orz_fast.reward import shared_scorer
from orz_fast.reward.orz_rules import (
    is_equiv_string,
    is_repetitive,
    normalize_final_answer,
    repetition_score,
    strip_math_string,
)

EVAL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "orz_eval"


@pytest.fixture(scope="module")
def orz():
    return shared_scorer("orz", timeout=2.0)


@pytest.fixture(scope="module")
def default():
    return shared_scorer("default", timeout=2.0)


@pytest.mark.parametrize(
    "raw, stripped",
    [
        ("\\frac12", "\\frac{1}{2}"),
        ("\\dfrac{3}{4}", "\\frac{3}{4}"),
        ("0.5", "\\frac{1}{2}"),
        ("3/4", "\\frac{3}{4}"),
        ("k = 7", "7"),
        ("\\sqrt3", "\\sqrt{3}"),
        ("10\\text{ cm}", "10"),
        ("\\$1,000", "1000"),
        ("\\left( 1, 2 \\right)", "(12)"),
        ("45^\\circ", "45"),
        ("50\\%", "50"),
        (".5", "\\frac{1}{2}"),
    ],
)
def test_math_string_rewriting(raw, stripped):
    assert strip_math_string(raw) == stripped


def test_string_check_and_its_fallbacks():
    assert is_equiv_string("\\dfrac{1}{2}", "0.5")
    assert is_equiv_string("1.0", "1")
    assert not is_equiv_string("abc", "abd")
    # rewriting errors fall back to raw equality
    assert is_equiv_string("2\\sqrt", "2\\sqrt") and not is_equiv_string("2\\sqrt", "2 \\sqrt")
    assert not is_equiv_string("\\text{ a}\\text{ b}", "\\text{ a}")


def test_minerva_normalisation():
    assert normalize_final_answer("5 \\text{ dollars}") == "5"
    assert normalize_final_answer("$\\frac12$") == "\\frac{1}{2}"
    assert normalize_final_answer("1,000") == "1000"
    assert normalize_final_answer("\\boxed{x}") == "x"


def _naive_repetition(text):
    suffixes = sorted(text[i:] for i in range(len(text)))

    def lcp(a, b):
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        return k

    total = sum(lcp(a, b) for a, b in zip(suffixes, suffixes[1:], strict=False))
    return total * 2 / (len(text) * (len(text) + 1))


def test_repetition_score_matches_naive_definition():
    rng = random.Random(0)
    for _ in range(200):
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(2, 60)))
        assert repetition_score(text) == pytest.approx(_naive_repetition(text))
    assert is_repetitive("ab" * 100)
    assert not is_repetitive("".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(300)))
    assert not is_repetitive("ab" * 60)  # too short to be judged


@pytest.mark.parametrize(
    "response, truth, orz_score, default_score",
    [
        ("<answer>\\boxed{\\frac{1}{2}}</answer>", "0.5", 1.0, 1.0),
        ("<answer>\\boxed{\\sqrt{20}}</answer>", "2\\sqrt{5}", 1.0, 1.0),
        ("<answer>\\boxed{\\sqrt{21}}</answer>", "2\\sqrt{5}", 0.0, 0.0),
        ("<answer>42</answer>", "42", 0.0, 1.0),  # ORZ extracts only boxed answers
        ("<answer>\\boxed{TRUE}</answer>", "true", 1.0, 1.0),  # ORZ lower-cases; default compares words
        ("<answer>\\boxed{(1, 2)}</answer>", "(2, 1)", 0.0, 0.0),
        ("<answer>\\boxed{x=3}</answer>", "3", 1.0, 1.0),
        ("<answer>\\boxed{7}</answer> <answer>\\boxed{8}</answer>", "8", 1.0, 1.0),
        ("<answer>\\boxed{9}</answer>", "\\boxed{9}", 1.0, 1.0),
    ],
)
def test_orz_mode_side_by_side_with_default(orz, default, response, truth, orz_score, default_score):
    assert orz.score(response, truth) == orz_score
    assert default.score(response, truth) == default_score
    assert orz.score(response, truth, finish_reason="length") == 0.0


def test_orz_mode_on_math500(orz):
    path = EVAL_DIR / "math500.json"
    if not path.is_file():
        pytest.skip(f"ORZ eval data not found at {path}")
    truths = [row["final_answer"] for row in json.loads(path.read_text())]
    assert sum(orz.score_batch([f"<answer>\\boxed{{{t}}}</answer>" for t in truths], truths)) == 500
    rng = random.Random(1)
    sample = rng.sample(range(len(truths)), 100)
    others = [rng.choice([k for k in range(len(truths)) if truths[k] != truths[i]]) for i in sample]
    scores = orz.score_batch([f"<answer>\\boxed{{{truths[j]}}}</answer>" for j in others], [truths[i] for i in sample])
    assert sum(scores) <= 2


def test_dollar_span_rule_matches_the_minerva_regex():
    import re

    from orz_fast.reward.orz_rules import _DOLLAR_SPAN

    oracle = re.compile(r"(.*?)(\$)(.*?)(\$)(.*)")
    rng = random.Random(2)
    for _ in range(2000):
        text = "".join(rng.choice(["$", "a", "\n", " ", "1"]) for _ in range(rng.randint(0, 12)))
        assert _DOLLAR_SPAN.sub(r"$\1$", text) == oracle.sub(r"$\3$", text), repr(text)
