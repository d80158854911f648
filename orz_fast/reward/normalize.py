"""The fast path of the default reward: answer normalisation and exact-number equality, cached.

Most rollouts are settled here without sympy. Normalisation removes spacing, ``\\left``/``\\right``,
degrees, percent and dollar signs, trailing units, ``x =`` prefixes and thousands separators, unwraps
``\\text{}``, and rewrites ``\\dfrac``/``\\tfrac``/``\\frac12``/``\\sqrt3``. Then: equal keys are
equivalent; two exact rationals (integers, decimals, ``\\frac{a}{b}``, ``a/b``) compare exactly;
multiple-choice letters (``C``, ``(C)``, ``\\text{(C)}``) compare as letters; plain words compare
case-insensitively; a number never equals words, a tuple, or an expression in a free variable.
Everything else goes to math-verify in the worker pool (:mod:`orz_fast.reward.verify`). Every function
here is plain string work, linear in the input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

from orz_fast.reward.extract import matching_brace

MAX_NUMBER_CHARS = 64
"""Longer digit strings are not parsed as numbers (they go to the slow path, which bounds them)."""

_TEXT_COMMANDS = ("\\text", "\\textbf", "\\textit", "\\textrm", "\\mathrm", "\\mathbf", "\\mbox", "\\textnormal")
_DROP = (
    "\\displaystyle",
    "\\left",
    "\\right",
    "\\bigl",
    "\\bigr",
    "\\Bigl",
    "\\Bigr",
    "^{\\circ}",
    "^\\circ",
    "\\circ",
    "\\%",
    "%",
    "\\$",
    "$",
    "\\!",
    "\\,",
    "\\;",
    "\\:",
    "\\qquad",
    "\\quad",
    "{,}",
)
_UNIT_WORDS = (
    "units?|square units|sq units|cm|centimeters?|mm|m|meters?|km|kilometers?|inches|inch|in|feet|foot|ft|"
    "yards?|miles?|mph|degrees?|deg|radians?|dollars?|cents?|hours?|hrs?|minutes?|mins?|seconds?|secs?|days?|"
    "weeks?|months?|years?|grams?|g|kg|pounds?|lbs?|ounces?|oz|liters?|l|ml|gallons?|points?|ways|people|students"
)
_TRAILING_UNIT = re.compile(rf"^(.*?[0-9}}])(?:\s+|\s*\\text\{{\s*)(?:{_UNIT_WORDS})(?:\^?\{{?[23]\}}?)?\}}?\.?$")
_PREFIX = re.compile(r"^(?:[a-zA-Z](?:_\{?[a-zA-Z0-9]+\}?)?|\\[a-zA-Z]+)\s*=(?!=)")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_INT = re.compile(r"^[+-]?\d+$")
_DECIMAL = re.compile(r"^[+-]?(?:\d+\.\d*|\.\d+)$")
_SLASH = re.compile(r"^([+-]?\d+(?:\.\d+)?)/([+-]?\d+(?:\.\d+)?)$")
_FRAC = re.compile(r"^([+-]?)\\frac\{([+-]?\d+(?:\.\d+)?)\}\{([+-]?\d+(?:\.\d+)?)\}$")
_FRAC_SHORT = re.compile(r"\\frac(\d)(\d)")
_FRAC_HALF = re.compile(r"\\frac(\d)\{")
_FRAC_HALF2 = re.compile(r"\\frac(\{[^{}]*\})(\d)")
_SQRT_SHORT = re.compile(r"\\sqrt(\d)")
_CHOICE = re.compile(r"^\(?([A-J])\)?[.:]?$")
_ESCAPED_SPACE = re.compile(r"(?<!\\)\\ ")
_WORDS = re.compile(r"^[A-Za-z][A-Za-z ]*[A-Za-z]$")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_VARIABLE = re.compile(r"[a-df-hj-zA-Z]")


@dataclass(frozen=True)
class Normalized:
    """A normalised answer: ``key`` for string equality, ``latex`` for math-verify, and what it is."""

    key: str
    """Whitespace-free canonical string; equal keys mean equivalent answers."""
    latex: str
    """Cleaned LaTeX (spaces kept, units/prefix/delimiters removed) handed to the symbolic check."""
    number: Fraction | None
    """The exact value when the answer is a plain rational number."""
    choice: str | None
    """The letter when the answer is a multiple-choice option (A-J)."""
    words: str | None
    """Lower-cased text when the answer is plain words (e.g. a day of the week)."""
    is_tuple: bool
    """Several comma-separated items at the top level (a tuple, interval, list or set), never one number."""
    has_variable: bool
    """A letter outside LaTeX commands other than ``e`` and ``i`` (a free variable): never a constant."""


def _unwrap_text_commands(s: str) -> str:
    """Replace ``\\text{...}`` and its relatives by their content (brace-matched, linear)."""
    out = []
    i = 0
    while True:
        j = s.find("\\", i)
        if j < 0:
            out.append(s[i:])
            break
        cmd = next((c for c in _TEXT_COMMANDS if s.startswith(c + "{", j)), None)
        if cmd is None:
            out.append(s[i : j + 1])
            i = j + 1
            continue
        brace = j + len(cmd)
        end = matching_brace(s, brace)
        if end < 0:
            out.append(s[i:])
            break
        out.append(s[i:j])
        out.append(s[brace + 1 : end])
        i = end + 1
    return "".join(out)


def _strip_trailing_text_unit(s: str) -> str:
    """``5\\text{ cm}`` -> ``5``: a ``\\text`` group after a value is a unit, not part of the answer."""
    stripped = s.rstrip()
    if not stripped.endswith("}"):
        return s
    for cmd in ("\\text{", "\\mbox{", "\\mathrm{"):
        j = stripped.rfind(cmd)
        if j <= 0:
            continue
        end = matching_brace(stripped, j + len(cmd) - 1)
        body = stripped[j + len(cmd) : end]
        head = stripped[:j].rstrip()
        if end == len(stripped) - 1 and head and body.strip() and re.fullmatch(r"[A-Za-z .^{}0-9]*", body):
            if head[-1].isdigit() or head[-1] in "})":
                return head
    return s


def _fix_shorthand(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{x}`` -> ``\\frac{1}{x}``, ``\\sqrt3`` -> ``\\sqrt{3}``."""
    if "\\frac" in s:
        s = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", s)
        s = _FRAC_HALF.sub(r"\\frac{\1}{", s)
        s = _FRAC_HALF2.sub(r"\\frac\1{\2}", s)
    if "\\sqrt" in s:
        s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
    return s


def _exact_number(key: str) -> Fraction | None:
    if len(key) > MAX_NUMBER_CHARS:
        return None
    try:
        if _INT.match(key) or _DECIMAL.match(key):
            return Fraction(key)
        m = _SLASH.match(key)
        if m:
            return Fraction(m.group(1)) / Fraction(m.group(2))
        m = _FRAC.match(key)
        if m:
            value = Fraction(m.group(2)) / Fraction(m.group(3))
            return -value if m.group(1) == "-" else value
    except (ZeroDivisionError, ValueError):
        return None
    return None


def _has_top_comma(key: str) -> bool:
    """A comma outside any brace group, e.g. ``(1,2)`` or ``[0,\\infty)``, but not ``\\frac{1,2}{3}``."""
    depth = 0
    for c in key:
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif c == "," and depth == 0:
            return True
    return False


@lru_cache(maxsize=1 << 16)
def normalize(answer: str) -> Normalized:
    """Normalise an extracted answer or a ground truth (cached; inputs are short in practice)."""
    s = answer.strip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\cfrac", "\\frac")
    s = _strip_trailing_text_unit(s)
    for token in _DROP:
        if token in s:
            s = s.replace(token, "")
    s = _ESCAPED_SPACE.sub(" ", s).replace("~", " ").replace("\n", " ")
    s = _unwrap_text_commands(s).strip()
    m = _TRAILING_UNIT.match(s)
    if m:
        s = m.group(1)
    m = _PREFIX.match(s)
    if m and s.count("=") == 1:
        s = s[m.end() :]
    s = s.strip().rstrip(".").strip()
    latex = s
    key = "".join(s.split())
    if _THOUSANDS.match(key):
        key = key.replace(",", "")
        latex = key
    key = _fix_shorthand(key)
    if key.startswith("+"):
        key = key[1:]
    if key.startswith("-0") and _exact_number(key) == 0:
        key = key[1:]
    number = _exact_number(key)
    m = _CHOICE.match(key)
    choice = m.group(1) if m else None
    words = " ".join(s.split()).lower() if _WORDS.match(s) else None
    return Normalized(
        key=key,
        latex=latex,
        number=number,
        choice=choice,
        words=words,
        is_tuple=_has_top_comma(key),
        has_variable=_VARIABLE.search(_COMMAND.sub("", key)) is not None,
    )


def fast_equivalent(pred: str, ground_truth: str) -> bool | None:
    """Settle equivalence without sympy when possible: True, False, or None (needs the symbolic check)."""
    p, g = normalize(pred), normalize(ground_truth)
    if p.key == g.key:
        return True
    if p.number is not None and g.number is not None:
        return p.number == g.number
    if g.choice is not None or p.choice is not None:
        return p.choice is not None and p.choice == g.choice
    if p.words is not None and g.words is not None:
        return p.words == g.words
    if (p.number is not None and (g.words is not None or g.is_tuple or g.has_variable)) or (
        g.number is not None and (p.words is not None or p.is_tuple or p.has_variable)
    ):
        return False
    return None
