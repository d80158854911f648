"""Symbolic equivalence checks. Imported and run only inside :class:`orz_fast.reward.verify.VerifierPool`
worker processes, which bound each call with a timeout and are killed when a call hangs.

Answers reach sympy only through LaTeX parsers (math-verify's LaTeX extraction, latex2sympy2_extended),
never through ``sympify``/``parse_expr`` on strings: math-verify's expression extraction, which does,
is not enabled.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from latex2sympy2_extended import latex2sympy
from math_verify import LatexExtractionConfig, parse, verify

from orz_fast.reward.orz_rules import is_repetitive, normalize_final_answer

# math-verify warns once that its own signal-based timeout is off; the worker pool provides the timeout.
logging.getLogger("math_verify").setLevel(logging.ERROR)

_LATEX_ONLY = (LatexExtractionConfig(),)


@lru_cache(maxsize=8192)
def parse_latex_answer(latex: str) -> tuple:
    """math-verify's parse of one answer, as if it were boxed; empty when nothing parses."""
    return tuple(parse("\\boxed{" + latex + "}", extraction_config=list(_LATEX_ONLY), parsing_timeout=None))


def check_math_verify(pred: str, ground_truth: str) -> bool:
    """Default mode: math-verify's ``verify(gold, target)`` on the two parsed answers."""
    gold = parse_latex_answer(ground_truth)
    target = parse_latex_answer(pred)
    if not gold or not target:
        return False
    if gold[0] == target[0]:  # structurally identical: equal, and math-verify can take seconds to agree
        return True
    return bool(verify(list(gold), list(target), timeout_seconds=None))


def _parse_and_evaluate(latex: str):
    expr = latex2sympy(latex, normalization_config=None)
    return expr, expr.evalf()


def _symbolically_equal(a: str, b: str) -> bool:
    ea, va = _parse_and_evaluate(a)
    eb, vb = _parse_and_evaluate(b)
    return bool(ea == eb or va == vb)


def check_orz(label: str, pred: str) -> bool:
    """ORZ mode, symbolic step (see :mod:`orz_fast.reward.orz_rules`, step 4)."""
    if is_repetitive(label) or is_repetitive(pred):
        return False
    try:
        if _symbolically_equal(label, pred):
            return True
        raise ValueError("not equal before normalisation")
    except Exception:
        norm_label, norm_pred = normalize_final_answer(label), normalize_final_answer(pred)
        try:
            return _symbolically_equal(norm_label, norm_pred)
        except Exception:
            return norm_label == norm_pred


def warm_up() -> None:
    """Run representative checks once so sympy's lazy initialisation is not charged to a timed check."""
    check_math_verify("\\frac{\\sqrt{20}}{2}", "\\sqrt{5}")
    check_math_verify("(1, 2]", "x^2 + 1")
    check_orz("\\frac{1}{2}", "0.5")
    clear_caches()


def clear_caches() -> None:
    """Drop cached parses."""
    parse_latex_answer.cache_clear()


CHECKS = {"math": check_math_verify, "orz": check_orz}
"""Check kind -> function(a, b) -> bool, as named in pool tasks."""
