"""Synthetic verifiable tasks generated from a seed: what the CPU demo trains on.

- ``arithmetic``: ``a op b`` with ``difficulty`` digits per operand (op in + - *); the answer is the integer.
- ``countdown``: reach a target from given numbers with + - * / (each number once); the ground truth is
  a ``countdown:`` string checked by :mod:`orz_fast.reward.countdown` (any correct expression scores).
- ``addition``: ``a + b`` with ``difficulty`` digits per operand.
- ``maximum``: the largest of ``difficulty + 1`` digits.
- ``comparison``: ``a>b?`` for two different ``difficulty``-digit numbers, answered ``yes`` or ``no`` (the CPU
  demo's task: a coin flip at first, learnable by attending to the prompt).
- ``mixed``: arithmetic and countdown alternating.
"""

from __future__ import annotations

import random
from typing import Literal

from orz_fast.data.loaders import Problem
from orz_fast.reward import countdown

Family = Literal["arithmetic", "addition", "maximum", "comparison", "countdown", "mixed"]
FAMILIES = ("arithmetic", "addition", "maximum", "comparison", "countdown", "mixed")
_OPS = ("+", "-", "*")


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


def arithmetic_problem(rng: random.Random, difficulty: int) -> tuple[str, str]:
    """One ``a op b`` question and its integer answer; ``difficulty`` digits per operand."""
    a, b = _operand(rng, difficulty), _operand(rng, difficulty)
    op = rng.choice(_OPS)
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return f"Compute {a} {op} {b}.", str(value)


def addition_problem(rng: random.Random, difficulty: int) -> tuple[str, str]:
    """One ``a + b`` question and its answer; ``difficulty`` digits per operand."""
    a, b = _operand(rng, difficulty), _operand(rng, difficulty)
    return f"{a}+{b}=", str(a + b)


def maximum_problem(rng: random.Random, difficulty: int) -> tuple[str, str]:
    """``max(d1,...,dk)=`` over ``difficulty + 1`` random digits, and the largest."""
    digits = [rng.randint(0, 9) for _ in range(difficulty + 1)]
    return f"max({','.join(map(str, digits))})=", str(max(digits))


def comparison_problem(rng: random.Random, difficulty: int) -> tuple[str, str]:
    """``a>b?`` for two different ``difficulty``-digit numbers, and ``yes`` or ``no``."""
    a = _operand(rng, difficulty)
    b = a
    while b == a:
        b = _operand(rng, difficulty)
    return f"{a}>{b}?", "yes" if a > b else "no"


def _countdown_numbers(difficulty: int) -> tuple[int, int]:
    """(how many numbers, largest number) at a difficulty: 3 numbers up to 10 at 1, up to 6 up to 100."""
    return min(2 + difficulty, 6), (10 if difficulty <= 1 else 25 if difficulty <= 2 else 100)


def countdown_problem(rng: random.Random, difficulty: int) -> tuple[str, str, str]:
    """One solvable countdown question, its ground truth, and a solution expression: the target is the
    value of a random expression over the numbers (positive integer intermediates, exact divisions)."""
    count, largest = _countdown_numbers(difficulty)
    while True:
        numbers = [rng.randint(1, largest) for _ in range(count)]
        items = [(n, str(n)) for n in numbers]
        while len(items) > 1:
            x = items.pop(rng.randrange(len(items)))
            y = items.pop(rng.randrange(len(items)))
            (a, ea), (b, eb) = max(x, y), min(x, y)
            ops = ["+", "*"] + (["-"] if a > b else []) + (["/"] if b > 1 and a % b == 0 else [])
            op = rng.choice(ops)
            value = a + b if op == "+" else a * b if op == "*" else a - b if op == "-" else a // b
            items.append((value, f"({ea} {op} {eb})"))
        target, solution = items[0]
        if 1 <= target <= 10 * largest * count and target not in numbers:
            break
    listed = ", ".join(str(n) for n in numbers)
    question = (
        f"Using the numbers [{listed}], write an arithmetic expression that equals {target}. "
        "You may use +, -, *, / and parentheses, and must use each number exactly once. "
        "Give the expression as your final answer."
    )
    return question, countdown.format_target(numbers, target), solution[1:-1]


def synthetic_problems(family: Family, n: int, *, difficulty: int = 3, seed: int = 0) -> list[Problem]:
    """``n`` problems of ``family`` from ``seed`` (same seed, same problems)."""
    if family not in FAMILIES:
        raise ValueError(f"data.synthetic must be one of {FAMILIES}, got {family!r}")
    if difficulty < 1:
        raise ValueError(f"difficulty must be >= 1, got {difficulty}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{family}:{difficulty}:{seed}")
    problems = []
    for i in range(n):
        kind = family if family != "mixed" else ("arithmetic", "countdown")[i % 2]
        make = {
            "arithmetic": arithmetic_problem,
            "addition": addition_problem,
            "maximum": maximum_problem,
            "comparison": comparison_problem,
            "countdown": countdown_problem,
        }[kind]
        question, answer = make(rng, difficulty)[:2]
        problems.append(Problem(prompt=question, answer=answer, source=f"synthetic:{kind}", index=i))
    return problems
