"""Answer extraction (default mode) and ORZ's extraction semantics."""

import random
import re

import pytest

from orz_fast.reward import extract_answer
from orz_fast.reward.extract import last_boxed, sanitize_text
from orz_fast.reward.orz_rules import answer_of, extract_answer_orz


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<think>so</think> <answer>\\boxed{42}</answer>", "42"),
        ("<answer> The answer is \\boxed{\\frac{1}{2}}. </answer>", "\\frac{1}{2}"),
        ("<answer>  7 apples </answer>", "7 apples"),
        ("<answer>\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}</answer>", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("<answer>\\boxed{1} or maybe \\boxed{2}</answer>", "2"),
        ("<answer>\\fbox{9}</answer>", "9"),
        ("<answer>\\boxed {5}</answer>", "5"),
    ],
)
def test_extracts_boxed_or_block_text(response, expected):
    assert extract_answer(response) == expected


def test_last_complete_answer_block_wins():
    response = "<answer>\\boxed{1}</answer> wait, no. <answer>\\boxed{2}</answer>"
    assert extract_answer(response) == "2"
    assert extract_answer("<answer>3</answer> then <answer>4</answer> and <answer>5") == "4"


@pytest.mark.parametrize(
    "response",
    [
        "",
        "The answer is \\boxed{5}.",
        "<answer>\\boxed{5}",
        "\\boxed{5}</answer>",
        "<answer></answer>",
        "<answer>   </answer>",
        "<answer>\\boxed{5</answer>",
        "<answer>\\boxed{}</answer>",
        "<answer>\\boxed{3} and \\boxed{4</answer>",
    ],
)
def test_missing_unclosed_or_empty_gives_none(response):
    assert extract_answer(response) is None


def test_bytes_and_invalid_utf8_are_decoded_not_raised():
    assert extract_answer(b"<answer>\\boxed{12}</answer>") == "12"
    assert extract_answer(b"<answer>\\boxed{\xff\xfe}</answer>") == "\ufffd\ufffd"
    assert sanitize_text("a\udcffb") == "a\ufffdb"


def test_last_boxed_matches_nested_braces():
    assert last_boxed("x \\boxed{\\frac{a}{b}} y") == "\\frac{a}{b}"
    assert last_boxed("no box") is None
    assert last_boxed("\\boxed{unclosed") is None


_ORZ_REGEX = re.compile(r"<answer>.*?(\\boxed{.*}).*?</answer>", re.DOTALL)


def _orz_oracle(text: str) -> str:
    matches = _ORZ_REGEX.findall(text)
    return matches[-1] if matches else ""


def test_orz_extraction_matches_the_orz_regex_on_random_responses():
    pieces = ["<answer>", "</answer>", "\\boxed{", "}", "{", "x", " ", "\n", "7", "<think>"]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        assert extract_answer_orz(text) == _orz_oracle(text), text


def test_orz_extraction_differs_from_default_where_orz_does():
    response = "<answer>\\boxed{1}</answer> retry <answer>\\boxed{2}</answer>"
    span = extract_answer_orz(response)
    assert span == "\\boxed{1}</answer> retry <answer>\\boxed{2}"
    assert answer_of(span) == "2"
    assert extract_answer_orz("<answer>42</answer>") == ""  # ORZ needs a box
    assert answer_of("\\boxed{ABC}") == "abc"  # ORZ lower-cases
    assert answer_of("No box Here") == "no box here"
