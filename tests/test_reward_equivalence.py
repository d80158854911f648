"""Equivalence rules of the default reward (fast path + math-verify), and the MATH500 acceptance checks."""

import json
import random
from pathlib import Path

import pytest

from orz_fast.reward import VerifierPool, shared_scorer
from orz_fast.reward.normalize import fast_equivalent

EVAL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "orz_eval"


def _eval_set(name):
    path = EVAL_DIR / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"ORZ eval data not found at {path} (expected the shared checkout beside the repo)")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def scorer():
    return shared_scorer("default", timeout=2.0)  # one pool for the test session (stopped at exit)


# (pred, ground truth) pairs that must be equivalent / must not be, one group per rule of the issue.
RULES = {
    "whitespace and left/right": (
        [("\\left( 1, 2 \\right)", "(1,2)"), ("x  +  1", "x+1"), ("\\left[ 0, 1 \\right)", "[0,1)")],
        [("(1, 3)", "\\left( 1, 2 \\right)"), ("x+2", "x + 1")],
    ),
    "dfrac tfrac": (
        [("\\dfrac{3}{4}", "\\frac{3}{4}"), ("\\tfrac{\\pi}{2}", "\\frac{\\pi}{2}")],
        [("\\dfrac{4}{3}", "\\frac{3}{4}")],
    ),
    "frac shorthand": (
        [("\\frac12", "\\frac{1}{2}"), ("\\frac1{72}", "\\frac{1}{72}"), ("\\sqrt3", "\\sqrt{3}")],
        [("\\frac13", "\\frac{1}{2}")],
    ),
    "a/b": ([("3/4", "\\frac{3}{4}"), ("-1/2", "-\\frac{1}{2}")], [("4/3", "\\frac{3}{4}")]),
    "decimals and fractions": (
        [("0.5", "\\frac{1}{2}"), (".75", "\\frac34"), ("2.50", "2.5"), ("-0.25", "-\\frac{1}{4}")],
        [("0.51", "\\frac{1}{2}"), ("0.3", "\\frac{1}{3}")],
    ),
    "degrees": ([("30^\\circ", "30"), ("45^{\\circ}", "45"), ("90", "90^\\circ")], [("60^\\circ", "30^\\circ")]),
    "percent": ([("25\\%", "25"), ("12.5%", "12.5")], [("25\\%", "0.25")]),
    "dollars": ([("\\$18.90", "18.90"), ("\\$5", "5")], [("\\$6", "5")]),
    "text units": (
        [("10\\text{ inches}", "10"), ("4 \\text{ cm}^2", "4"), ("12 cm", "12"), ("\\text{5 units}", "5")],
        [("11\\text{ inches}", "10"), ("2n", "2"), ("3 x", "3")],
    ),
    "text answers": ([("\\text{Evelyn}", "Evelyn"), ("monday", "\\text{Monday}")], [("\\text{Tuesday}", "Monday")]),
    "variable prefix": (
        [("x = 5", "5"), ("k=\\frac{1}{2}", "0.5"), ("\\theta = \\frac{\\pi}{4}", "\\frac{\\pi}{4}")],
        [("x = 6", "5")],
    ),
    "thousands separators": ([("1,000", "1000"), ("10{,}000", "10000"), ("1\\,000", "1000")], [("1,001", "1000")]),
    "ordered tuples": (
        [("(1, 2)", "(1,2)"), ("\\left(3, \\frac{\\pi}{2}\\right)", "\\left( 3, \\frac{\\pi}{2} \\right)")],
        [("(2, 1)", "(1, 2)"), ("(1, 2, 3)", "(1, 2)"), ("(1,2)", "3")],
    ),
    "intervals and unions": (
        [("(-\\infty, 2] \\cup [3, \\infty)", "(-\\infty,2]\\cup[3,\\infty)"), ("[1, 5)", "[1,5)")],
        [("(1, 5]", "[1, 5)"), ("(-\\infty, 2) \\cup [3, \\infty)", "(-\\infty,2]\\cup[3,\\infty)")],
    ),
    "matrices": (
        [
            ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"),
            ("\\begin{pmatrix} \\frac{1}{2} \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 0.5 \\\\ 2 \\end{pmatrix}"),
        ],
        [("\\begin{pmatrix} 1 & 2 \\\\ 4 & 3 \\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}")],
    ),
    "symbolic": (
        [
            ("\\sqrt{20}", "2\\sqrt{5}"),
            ("x^2+2x+1", "(x+1)^2"),
            ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}"),
            ("2^{10}", "1024"),
            ("\\pi r^2", "r^2 \\pi"),
            ("e^{0}", "1"),
            ("\\log_2 8", "3"),
        ],
        [("\\sqrt{21}", "2\\sqrt{5}"), ("x^2+2x+2", "(x+1)^2"), ("2^{11}", "1024"), ("2k+2", "4")],
    ),
    "multiple choice": (
        [("C", "C"), ("(C)", "C"), ("\\text{(C)}", "C"), ("\\textbf{(B)}", "\\text{(B)}"), ("D", "(D)")],
        [("B", "C"), ("(A)", "\\text{(C)}"), ("5", "C")],
    ),
}
POSITIVES = [(rule, p, g) for rule, (pos, _) in RULES.items() for p, g in pos]
NEGATIVES = [(rule, p, g) for rule, (_, neg) in RULES.items() for p, g in neg]


@pytest.mark.parametrize("rule, pred, truth", POSITIVES)
def test_equivalent(scorer, rule, pred, truth):
    assert scorer.is_equivalent(pred, truth), rule


@pytest.mark.parametrize("rule, pred, truth", NEGATIVES)
def test_not_equivalent(scorer, rule, pred, truth):
    assert not scorer.is_equivalent(pred, truth), rule


def test_fast_path_settles_common_cases_without_sympy():
    assert fast_equivalent("\\dfrac{1}{2}", "0.5") is True
    assert fast_equivalent("12", "13") is False
    assert fast_equivalent("x = 12", "12") is True
    assert fast_equivalent("(C)", "C") is True
    assert fast_equivalent("(1,2)", "3") is False
    assert fast_equivalent("2k + 2", "4") is False  # a free variable is never a constant
    assert fast_equivalent("e^{0}", "1") is None  # e and i are constants
    assert fast_equivalent("\\sqrt{20}", "2\\sqrt{5}") is None  # needs the symbolic check


def test_score_batch_matches_single_scores(scorer):
    responses = [
        "<think>a</think> <answer>\\boxed{\\sqrt{20}}</answer>",
        "<answer>\\boxed{5}</answer>",
        "<answer>(C)</answer>",
        "no tags \\boxed{5}",
    ]
    truths = ["2\\sqrt{5}", "6", "C", "5"]
    assert scorer.score_batch(responses, truths) == [1.0, 0.0, 1.0, 0.0]
    assert [scorer.score(r, t) for r, t in zip(responses, truths, strict=True)] == [1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize(
    "response",
    ["\\boxed{4}", "<answer>\\boxed{4}", "\\boxed{4}</answer>", "<answer>\\boxed{4</answer>", "<answer></answer>"],
)
def test_missing_or_unclosed_tags_score_zero(scorer, response):
    assert scorer.score(response, "4") == 0.0


def test_last_answer_wins(scorer):
    assert scorer.score("<answer>\\boxed{4}</answer> no wait <answer>\\boxed{5}</answer>", "5") == 1.0
    assert scorer.score("<answer>\\boxed{5}</answer> no wait <answer>\\boxed{4}</answer>", "5") == 0.0


def test_truncated_responses_score_zero(scorer):
    response = "<answer>\\boxed{4}</answer>"
    assert scorer.score(response, "4") == 1.0
    assert scorer.score(response, "4", finish_reason="length") == 0.0
    assert scorer.score(response, "4", truncated=True) == 0.0
    assert scorer.score_batch([response] * 3, ["4"] * 3, finish_reasons=["stop", "length", None]) == [1.0, 0.0, 1.0]
    assert scorer.score_batch([response] * 2, ["4"] * 2, truncated=[True, False]) == [0.0, 1.0]
    with pytest.raises(ValueError, match="2 responses but 1"):
        scorer.score_batch([response] * 2, ["4"])


def test_math500_ground_truths_match_themselves(scorer):
    truths = [row["final_answer"] for row in _eval_set("math500")]
    scores = scorer.score_batch([f"<answer>\\boxed{{{t}}}</answer>" for t in truths], truths)
    assert sum(scores) == 500


def test_math500_ground_truths_match_themselves_symbolically():
    """The same check with the fast path bypassed: every answer parses and verifies against itself.
    A generous timeout: this is about parsing, and the CPUs may be shared."""
    from orz_fast.reward.normalize import normalize

    truths = [row["final_answer"] for row in _eval_set("math500")]
    latex = [normalize(t).latex for t in truths]
    with VerifierPool(workers=2, timeout=10.0) as pool:
        verdicts = pool.run([("math", x, x) for x in latex])
        counts = {"timeouts": pool.timeouts, "failures": pool.failures, "restarts": pool.restarts}
    failed = [(t, v) for t, v in zip(truths, verdicts, strict=True) if not v]
    assert not failed, counts


def test_math500_false_positive_rate_against_other_answers(scorer):
    truths = [row["final_answer"] for row in _eval_set("math500")]
    rng = random.Random(0)
    pairs = []
    for i, truth in enumerate(truths):
        j = rng.choice([k for k in range(len(truths)) if truths[k].strip() != truth.strip() and k != i])
        pairs.append((truths[j], truth))
    scores = scorer.score_batch([f"<answer>\\boxed{{{p}}}</answer>" for p, _ in pairs], [t for _, t in pairs])
    false_positives = [pair for pair, s in zip(pairs, scores, strict=True) if s]
    assert len(false_positives) <= 5, false_positives


def test_gpqa_and_aime_answers(scorer):
    gpqa = _eval_set("gpqa_diamond")
    letters = [row["final_answer"] for row in gpqa]
    assert set(letters) <= set("ABCD")
    right = scorer.score_batch([f"<answer>\\boxed{{({x})}}</answer>" for x in letters], letters)
    wrong = scorer.score_batch([f"<answer>{'ABCD'[('ABCD'.index(x) + 1) % 4]}</answer>" for x in letters], letters)
    assert sum(right) == len(gpqa) and sum(wrong) == 0
    aime = [row["final_answer"] for row in _eval_set("aime2024")]
    assert sum(scorer.score_batch([f"<answer>{a}</answer>" for a in aime], aime)) == len(aime)
    assert sum(scorer.score_batch([f"<answer>{int(a) + 1}</answer>" for a in aime], aime)) == 0
