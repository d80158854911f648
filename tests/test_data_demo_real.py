"""The ``demo-real`` task's files: this module's output, correct answers, disjoint sets, the prompt's format."""

import json
import re

import pytest

from orz_fast.data import demo_real, load_file, render_prompt
from orz_fast.reward import extract_answer


def _numbers(row):
    last = row["prompt"].rsplit("User: ", 1)[1]
    return [int(n) for n in re.findall(r"\d+", last)]


def test_committed_files_are_the_generators_output(tmp_path):
    written = demo_real.write_sets(tmp_path)
    for path in written:
        assert path.read_bytes() == (demo_real.DEMO_REAL_DIR / path.name).read_bytes(), path.name
    problems, _ = load_file(demo_real.DEMO_REAL_DIR / "heldout.jsonl")
    assert len(problems) == demo_real.HELDOUT_SIZE >= 100


def test_answers_sets_and_examples():
    train, heldout = demo_real.demo_real_sets()
    assert len(train) == demo_real.TRAIN_SIZE and len(heldout) == demo_real.HELDOUT_SIZE
    keys = [frozenset(_numbers(r)) for r in train + heldout]
    assert len(set(keys)) == len(keys)  # no set of numbers twice, so held-out problems are never trained on
    assert not set(keys) & {frozenset(ex) for ex in demo_real.EXAMPLES}
    for row in train + heldout:
        numbers = _numbers(row)
        assert len(set(numbers)) == 3 and all(10 <= n <= 99 for n in numbers)
        assert row["answer"] == str(max(numbers))
    # The largest number sits in each position about a third of the time, in the examples never twice in one.
    positions = [_numbers(r).index(int(r["answer"])) for r in heldout]
    assert all(25 <= positions.count(i) <= 60 for i in range(3))
    assert len({ex.index(max(ex)) for ex in demo_real.EXAMPLES}) == len(demo_real.EXAMPLES)
    # Smaller sets are the first rows of the same stream (held-out rows come first).
    assert demo_real.demo_real_sets(5, 3)[1] == heldout[:3]
    with pytest.raises(ValueError, match="train_size=-1"):
        demo_real.demo_real_sets(-1, 3)


def test_prompt_examples_parse_and_end_before_the_answer():
    text = render_prompt(demo_real.prompt((12, 99, 40)), "plain")
    turns = text.split("\n")
    assert turns[-2] == "User: Largest of 12, 99, 40?" and turns[-1] == "Assistant: "
    answers = [extract_answer(t) for t in turns if t.startswith("Assistant:  <answer>")]
    assert answers == [str(max(ex)) for ex in demo_real.EXAMPLES]
    assert json.loads(json.dumps(demo_real.demo_real_sets(1, 0)[0][0]))["answer"].isdigit()
