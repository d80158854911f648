"""``reward.mode = "orz"``: Open-Reasoner-Zero's own answer checking, re-implemented for faithful reproduction.

How ORZ scores a response (and what this module does, step by step):

1. Extraction: the regex ``<answer>.*?(\\boxed{.*}).*?</answer>`` (DOTALL) over the response. Its
   single match starts at the first ``\\boxed{`` after the first ``<answer>`` and ends at the last
   ``}`` that is followed somewhere by ``</answer>``; :func:`extract_answer_orz` computes exactly
   that span with string searches (no regex backtracking on long responses).
2. Both that span and the ground truth are lower-cased and reduced to the content of their last
   ``\\boxed{...}`` (the whole string when there is none): :func:`answer_of`.
3. String check, the MATH-dataset rules (:func:`strip_math_string`): drop line breaks, ``\\!``,
   ``\\left``/``\\right``, degrees, dollars, commas, a right ``\\text{ unit}``, ``\\%``; ``dfrac``/``tfrac``
   -> ``frac``; ``k = `` prefixes of at most two characters; ``\\sqrt3``, ``\\frac12``, ``a/b`` and
   ``0.5`` rewritten to canonical forms; spaces removed. Equal when both parse to the same float, or
   the strings are equal. Any error in the rewriting falls back to comparing the raw strings.
4. Symbolic check (worker process, hard timeout): answers longer than 128 characters that are
   highly repetitive are unequal; otherwise both are parsed as LaTeX and are equal when the
   expressions or their numeric values are equal; on failure the same is retried after the
   Minerva normalisation (:func:`normalize_final_answer`), and if parsing still fails the
   normalised strings are compared.
5. A response that did not end by a stop (``finish_reason == "length"``) scores 0.

Differences from ORZ, all deliberate: ORZ parses with ``sympy.parsing.latex.parse_latex``, whose
ANTLR runtime pin (4.11) conflicts with math-verify's, so the symbolic step uses
``latex2sympy2_extended`` (the same grammar lineage) instead; ORZ's checks run in a thread pool
whose timed-out threads keep running, here they run in worker processes that are killed; an
empty extraction scores 0 without being compared; and an answer over 10,000 characters that fails the
string check scores 0 without the symbolic step (in ORZ it would reach the parser and time out).
Countdown ground truths (synthetic tasks, which ORZ does not have) use the countdown checker in both modes.

The default mode (:mod:`orz_fast.reward.normalize` + math-verify) differs mainly in extraction (the
last ``<answer>`` block, whose last box or plain text is the answer; ORZ requires a box), in not
lower-casing, and in handling tuples, intervals, matrices, units and choices that ORZ's rules miss.
"""

from __future__ import annotations

import re

from orz_fast.reward.extract import ANSWER_CLOSE, ANSWER_OPEN, matching_brace, sanitize_text

REPETITION_MIN_CHARS = 128
REPETITION_THRESHOLD = 0.2


class _RewriteError(Exception):
    """A MATH-rule rewrite met a shape it cannot handle; ORZ then compares the raw strings."""


def extract_answer_orz(response: str | bytes) -> str:
    """The span ORZ's extraction regex captures (``""`` when it does not match)."""
    text = sanitize_text(response)
    first_open = text.find(ANSWER_OPEN)
    if first_open < 0:
        return ""
    box = text.find("\\boxed{", first_open + len(ANSWER_OPEN))
    if box < 0:
        return ""
    last_close = text.rfind(ANSWER_CLOSE)
    if last_close < 0:
        return ""
    end = text.rfind("}", box + len("\\boxed{"), last_close)
    if end < 0:
        return ""
    return text[box : end + 1]


def answer_of(solution: str) -> str:
    """Lower-case, then the content of the last ``\\boxed{...}``; the whole string when there is none."""
    s = solution.lower()
    idx = s.rfind("\\boxed")
    if idx < 0:
        idx = s.rfind("\\fbox")
        if idx < 0:
            return s
    brace = s.find("{", idx)
    if brace < 0:
        return s
    end = matching_brace(s, brace)
    if end < 0:
        return s
    boxed = s[idx : end + 1]
    if boxed.startswith("\\boxed{"):
        return boxed[len("\\boxed{") : -1]
    return s


def _fix_sqrt(s: str) -> str:
    parts = s.split("\\sqrt")
    out = [parts[0]]
    for part in parts[1:]:
        if not part:
            raise _RewriteError("\\sqrt at the end")
        out.append("\\sqrt" + part if part[0] == "{" else "\\sqrt{" + part[0] + "}" + part[1:])
    return "".join(out)


def _fix_fracs(s: str) -> str:
    parts = s.split("\\frac")
    out = [parts[0]]
    for part in parts[1:]:
        if not part:
            raise _RewriteError("\\frac at the end")
        if part[0] == "{":
            out.append("\\frac" + part)
            continue
        if len(part) < 2:
            return s
        a, b, rest = part[0], part[1], part[2:]
        out.append("\\frac{" + a + "}{" + b + "}" + rest if b != "{" else "\\frac{" + a + "}" + b + rest)
    return "".join(out)


def _fix_slash(s: str) -> str:
    pieces = s.split("/")
    if len(pieces) != 2:
        return s
    try:
        a, b = int(pieces[0]), int(pieces[1])
    except ValueError:
        return s
    if s != f"{a}/{b}":
        return s
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


def strip_math_string(s: str) -> str:
    """The MATH-dataset answer rewriting ORZ applies before its string comparison."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "").replace(",", "")
    if "\\text{ " in s:
        pieces = s.split("\\text{ ")
        if len(pieces) != 2:
            raise _RewriteError("several \\text{ units")
        s = pieces[0]
    s = s.replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        s = sides[1]
    if "\\sqrt" in s:
        s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_slash(s)


def is_equiv_string(a: str, b: str) -> bool:
    """ORZ's first check: MATH-rule rewriting, then float or string equality."""
    try:
        sa, sb = strip_math_string(a), strip_math_string(b)
    except _RewriteError:
        return a == b
    try:
        return float(sa) == float(sb)
    except (ValueError, OverflowError):
        return sa == sb


_MINERVA_SUBSTITUTIONS = (
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    ("\\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
)
_MINERVA_REMOVED = (
    "square",
    "ways",
    "integers",
    "dollars",
    "mph",
    "inches",
    "ft",
    "hours",
    "km",
    "units",
    "\\ldots",
    "sue",
    "points",
    "feet",
    "minutes",
    "digits",
    "cents",
    "degrees",
    "cm",
    "gm",
    "pounds",
    "meters",
    "meals",
    "edges",
    "students",
    "childrentickets",
    "multiples",
    "\\text{s}",
    "\\text{.}",
    "\\text{\ns}",
    "\\text{}^2",
    "\\text{}^3",
    "\\text{\n}",
    "\\text{}",
    "\\mathrm{th}",
    "^\\circ",
    "^{\\circ}",
    "\\;",
    ",\\!",
    "{,}",
    '"',
    "\\dots",
)
_DOLLAR_SPAN = re.compile(r"[^\n$]*\$([^\n$]*)\$[^\n]*")
_TEXT_LIKE = [re.compile(r"\\" + name + r"\{(.*?)\}") for name in ("text", "textbf", "overline")]
_BOXED_GREEDY = re.compile(r"\\boxed\{(.*)\}")
_FRAC_SHORTHAND = re.compile(r"frac([^{])(.)")
_SQRT_SHORTHAND = re.compile(r"sqrt([^{])")


def normalize_final_answer(answer: str) -> str:
    """The Minerva answer normalisation (Lewkowycz et al. 2022, appendix) ORZ retries with."""
    for before, after in _MINERVA_SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expr in _MINERVA_REMOVED:
        answer = answer.replace(expr, "")
    answer = _DOLLAR_SPAN.sub(r"$\1$", answer)  # keep only the first $...$ span of each line
    for pattern in _TEXT_LIKE:
        answer = pattern.sub(r"\1", answer)
    answer = _BOXED_GREEDY.sub(r"\1", answer)
    answer = _FRAC_SHORTHAND.sub(r"frac{\1}{\2}", answer)
    answer = _SQRT_SHORTHAND.sub(r"sqrt{\1}", answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer


def repetition_score(text: str) -> float:
    """Share of repeated substrings: (sum of LCPs of neighbouring sorted suffixes) * 2 / (n (n + 1)).

    Suffix array by prefix doubling, LCP by Kasai's algorithm: O(n log^2 n).
    """
    n = len(text)
    if n <= 1:
        return 0.0
    rank = [ord(c) for c in text]
    order = list(range(n))
    k = 1
    while True:
        keys = [(rank[i], rank[i + k] if i + k < n else -1) for i in range(n)]
        order.sort(key=keys.__getitem__)
        new_rank = [0] * n
        for pos in range(1, n):
            new_rank[order[pos]] = new_rank[order[pos - 1]] + (keys[order[pos]] != keys[order[pos - 1]])
        rank = new_rank
        if rank[order[-1]] == n - 1 or k >= n:
            break
        k *= 2
    total = 0
    h = 0
    for i in range(n):
        r = rank[i]
        if r == n - 1:
            h = 0
            continue
        j = order[r + 1]
        while i + h < n and j + h < n and text[i + h] == text[j + h]:
            h += 1
        total += h
        if h:
            h -= 1
    return total * 2 / (n * (n + 1))


def is_repetitive(text: str) -> bool:
    return len(text) > REPETITION_MIN_CHARS and repetition_score(text) > REPETITION_THRESHOLD
