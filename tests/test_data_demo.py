"""The pieces the CPU demo and the tiny preset use: character tokenizer, addition family, plain template."""

import pytest

from orz_fast.data import render_prompt, synthetic_problems
from orz_fast.data.char_tokenizer import CharTokenizer
from orz_fast.reward import score


def test_char_tokenizer_round_trip_and_tags():
    tok = CharTokenizer()
    text = "3+4=\nAssistant: <think> x </think> <answer>\\boxed{7}</answer>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode("<answer>") == [tok.vocab.index("<answer>")]
    assert len(tok.encode("<answe")) == 6  # an incomplete tag is plain characters
    assert tok.encode("é") == [tok.unk_token_id]
    assert tok.decode([tok.eos_token_id, *tok.encode("ok")], skip_special_tokens=True) == "ok"
    assert tok.decode([*tok.encode("a"), len(tok) + 5]) == "a"  # padded-vocab ids decode to nothing
    with pytest.raises(ValueError, match="token id -1 is negative"):
        tok.decode([-1])
    assert len(tok) == tok.vocab_size < 128


def test_addition_family_is_seeded_and_correct():
    problems = synthetic_problems("addition", 50, difficulty=2, seed=3)
    assert problems == synthetic_problems("addition", 50, difficulty=2, seed=3)
    for p in problems:
        a, b = p.prompt.removesuffix("=").split("+")
        assert 10 <= int(a) <= 99 and 10 <= int(b) <= 99
        assert int(p.answer) == int(a) + int(b)
        assert score(f"<answer>{p.answer}</answer>", p.answer) == 1.0


def test_maximum_family():
    problems = synthetic_problems("maximum", 200, difficulty=2, seed=0)
    for p in problems:
        digits = [int(d) for d in p.prompt.removeprefix("max(").removesuffix(")=").split(",")]
        assert len(digits) == 3 and p.answer == str(max(digits))
    assert len({p.prompt for p in problems}) > 100


def test_comparison_family():
    problems = synthetic_problems("comparison", 300, difficulty=1, seed=1)
    for p in problems:
        a, b = p.prompt.removesuffix("?").split(">")
        assert a != b and p.answer == ("yes" if int(a) > int(b) else "no")
    share = sum(p.answer == "yes" for p in problems) / len(problems)
    assert 0.4 < share < 0.6  # a coin flip for a model that ignores the prompt


def test_plain_template():
    assert render_prompt("3+4=", "plain") == "3+4=\nAssistant: "
    with pytest.raises(ValueError, match="'orz', 'chat' or 'plain'"):
        render_prompt("x", "fancy")
