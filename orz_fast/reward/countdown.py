"""Countdown-style tasks: combine given numbers with + - * / and parentheses to reach a target.

A countdown ground truth is the string ``"countdown: 3 7 25 -> 46"``; the answer is correct when it
is an arithmetic expression that uses each given number exactly once and equals the target. The
expression is parsed by a small recursive-descent parser over exact fractions (no ``eval``), with
bounded length and nesting, so any input is checked in microseconds.
"""

from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction

PREFIX = "countdown:"
MAX_EXPRESSION_CHARS = 256
MAX_NESTING = 32
_TOKEN = re.compile(r"\s*(\d+|[-+*/()])")
_SPELLINGS = (("\\times", "*"), ("\\cdot", "*"), ("×", "*"), ("·", "*"), ("\\div", "/"), ("÷", "/"), ("−", "-"))


def format_target(numbers: list[int], target: int) -> str:
    """The ground-truth string of a countdown problem."""
    return f"{PREFIX} {' '.join(str(n) for n in numbers)} -> {target}"


def parse_target(ground_truth: str) -> tuple[list[int], int] | None:
    """``(numbers, target)`` of a countdown ground truth, or None when it is not one."""
    if not ground_truth.startswith(PREFIX):
        return None
    body = ground_truth[len(PREFIX) :]
    left, sep, right = body.partition("->")
    try:
        numbers = [int(x) for x in left.split()]
        target = int(right)
    except ValueError:
        return None
    if not sep or not numbers:
        return None
    return numbers, target


class _Parser:
    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.pos = 0
        self.literals: list[int] = []

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def expression(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self._peek() in ("+", "-"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self.term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self._peek() in ("*", "/"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self.factor(depth)
            if op == "*":
                value = value * rhs
            else:
                value = value / rhs  # ZeroDivisionError is caught by the caller
        return value

    def factor(self, depth: int) -> Fraction:
        tok = self._peek()
        if tok is None:
            raise ValueError("unexpected end")
        self.pos += 1
        if tok == "(":
            if depth >= MAX_NESTING:
                raise ValueError("too deeply nested")
            value = self.expression(depth + 1)
            if self._peek() != ")":
                raise ValueError("unclosed parenthesis")
            self.pos += 1
            return value
        if tok.isdigit():
            self.literals.append(int(tok))
            return Fraction(int(tok))
        raise ValueError(f"unexpected {tok!r}")


def evaluate(expression: str) -> tuple[Fraction, list[int]] | None:
    """Exact value of an arithmetic expression and the integer literals it uses; None if it is not one."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        return None
    for spelled, op in _SPELLINGS:
        expression = expression.replace(spelled, op)
    expression = expression.replace("\\left", "").replace("\\right", "").replace("{", "(").replace("}", ")")
    expression = expression.strip()
    tokens = []
    pos = 0
    while pos < len(expression):
        m = _TOKEN.match(expression, pos)
        if not m:
            if expression[pos:].strip():
                return None
            break
        tokens.append(m.group(1))
        pos = m.end()
    if any(t.isdigit() and len(t) > 12 for t in tokens):
        return None
    parser = _Parser(tokens)
    try:
        value = parser.expression(0)
    except (ValueError, ZeroDivisionError):
        return None
    if parser.pos != len(tokens):
        return None
    return value, parser.literals


def check(answer: str, numbers: list[int], target: int) -> bool:
    """True when ``answer`` (optionally ending in ``= target``) uses each number once and equals ``target``."""
    expression = answer.split("=")[0] if answer.count("=") == 1 else answer
    result = evaluate(expression)
    if result is None:
        return False
    value, literals = result
    return value == target and Counter(literals) == Counter(numbers)
