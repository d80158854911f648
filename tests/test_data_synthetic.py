"""Synthetic verifiable tasks: seeded, difficulty-controlled, and scored correctly by the reward."""

import random
import re

import pytest

from orz_fast.data import FAMILIES, synthetic_problems
from orz_fast.data.synthetic import countdown_problem
from orz_fast.reward import RewardScorer, countdown

_ARITH = re.compile(r"^Compute (-?\d+) ([-+*]) (-?\d+)\.$")


def test_same_seed_same_problems_other_seed_other_problems():
    for family in FAMILIES:
        a = synthetic_problems(family, 50, difficulty=2, seed=7)
        assert a == synthetic_problems(family, 50, difficulty=2, seed=7)
        assert a != synthetic_problems(family, 50, difficulty=2, seed=8)
        assert len(a) == 50 and len({p.prompt for p in a}) > 40


@pytest.mark.parametrize("difficulty", [1, 2, 3, 6])
def test_arithmetic_difficulty_and_answers(difficulty):
    problems = synthetic_problems("arithmetic", 200, difficulty=difficulty, seed=0)
    ops = set()
    for p in problems:
        m = _ARITH.match(p.prompt)
        assert m, p.prompt
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        ops.add(op)
        assert len(str(a)) == len(str(b)) == difficulty or difficulty == 1 and a < 10 and b < 10
        assert int(p.answer) == {"+": a + b, "-": a - b, "*": a * b}[op]
    assert ops == {"+", "-", "*"}


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_countdown_problems_are_solvable(difficulty):
    rng = random.Random(difficulty)
    for _ in range(100):
        question, truth, solution = countdown_problem(rng, difficulty)
        numbers, target = countdown.parse_target(truth)
        assert len(numbers) == min(2 + difficulty, 6)
        assert f"equals {target}." in question and all(str(n) in question for n in numbers)
        assert countdown.check(solution, numbers, target), (truth, solution)


def test_mixed_alternates_families():
    problems = synthetic_problems("mixed", 10, difficulty=2, seed=3)
    assert [p.source for p in problems[:4]] == ["synthetic:arithmetic", "synthetic:countdown"] * 2


@pytest.mark.parametrize(
    "answer, ok",
    [
        ("(25 - 7) * 3", True),
        ("3 \\times (25 - 7)", True),
        ("(25-7)*3 = 54", True),
        ("54", False),  # numbers not used
        ("(25 - 7) * 3 + 0", False),  # a number that was not given
        ("(25 - 7) * 3 * 1", False),
        ("(25 - 3) * 7", False),  # wrong value
        ("25 / (7 - 7) * 3", False),
        ("__import__('os')", False),
        ("(" * 40 + "25 - 7" + ")" * 40 + " * 3", False),  # nested too deep
        ("1" * 300, False),
        ("(25 - 7) * 3)", False),
        ("", False),
    ],
)
def test_countdown_checker(answer, ok):
    assert countdown.check(answer, [3, 7, 25], 54) is ok


def test_reward_scores_synthetic_problems():
    problems = synthetic_problems("mixed", 20, difficulty=2, seed=1)
    responses, wrong = [], []
    for p in problems:
        if p.source.endswith("arithmetic"):
            right, bad = p.answer, str(int(p.answer) + 1)
        else:
            numbers, target = countdown.parse_target(p.answer)
            right = _solve(numbers, target)
            assert right is not None, p
            bad = " + ".join(str(n) for n in numbers) + " + 1"
        responses.append(f"<think>...</think> <answer>\\boxed{{{right}}}</answer>")
        wrong.append(f"<answer>\\boxed{{{bad}}}</answer>")
    truths = [p.answer for p in problems]
    with RewardScorer(workers=1) as scorer:
        assert scorer.score_batch(responses, truths) == [1.0] * len(problems)
        assert scorer.score_batch(wrong, truths) == [0.0] * len(problems)
        assert scorer.pool.alive_pids() == []  # integers and countdown never need the symbolic workers


def _solve(numbers, target):
    """Exhaustive search (small inputs): an expression over ``numbers`` equal to ``target``, or None."""
    from fractions import Fraction

    def search(items):
        if len(items) == 1:
            return items[0][1] if items[0][0] == target else None
        for i in range(len(items)):
            for j in range(len(items)):
                if i == j:
                    continue
                (a, ea), (b, eb) = items[i], items[j]
                rest = [items[k] for k in range(len(items)) if k not in (i, j)]
                options = [(a + b, f"({ea} + {eb})"), (a - b, f"({ea} - {eb})"), (a * b, f"({ea} * {eb})")]
                if b != 0:
                    options.append((a / b, f"({ea} / {eb})"))
                for value, expr in options:
                    found = search([*rest, (value, expr)])
                    if found:
                        return found
        return None

    return search([(Fraction(n), str(n)) for n in numbers])


def test_invalid_arguments():
    with pytest.raises(ValueError, match="synthetic"):
        synthetic_problems("sudoku", 1)
    with pytest.raises(ValueError, match="difficulty"):
        synthetic_problems("arithmetic", 1, difficulty=0)
