"""Dataset loaders: ORZ train/eval JSON, JSONL, Parquet through datasets, bad rows, prompt-length filter."""

import json
from pathlib import Path

import pytest

from orz_fast.config import DataConfig
from orz_fast.data import (
    DataError,
    LoadStats,
    Problem,
    encode_prompts,
    load_file,
    load_files,
    load_problems,
    load_prompt_set,
    render_orz,
)

EVAL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "orz_eval"


def _eval_path(name):
    path = EVAL_DIR / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"ORZ eval data not found at {path} (expected the shared checkout beside the repo)")
    return path


def _orz_item(q, a):
    return [{"from": "human", "value": q}, {"from": "assistant", "ground_truth": {"value": a}}]


def test_orz_train_json(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([_orz_item("1+1?", "2"), _orz_item("Half of 1?", "\\frac{1}{2}"), _orz_item("n?", 7)]))
    problems, stats = load_file(path)
    assert [(p.prompt, p.answer) for p in problems] == [("1+1?", "2"), ("Half of 1?", "\\frac{1}{2}"), ("n?", "7")]
    assert problems[2] == Problem(prompt="n?", answer="7", source=str(path), index=2)
    assert (stats.rows, stats.kept, stats.bad_rows) == (3, 3, 0)


@pytest.mark.parametrize("name, count", [("math500", 500), ("aime2024", 30), ("gpqa_diamond", 198)])
def test_orz_eval_json(name, count):
    path = _eval_path(name)
    raw = json.loads(path.read_text())
    problems, stats = load_file(path)
    assert len(problems) == stats.kept == count
    assert problems[0].prompt == raw[0]["prompt"][0]["value"]
    assert [p.answer for p in problems] == [str(r["final_answer"]) for r in raw]


def test_jsonl_and_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": "What is 2+3?", "answer": "5"}, {"problem": "Is 7 prime?", "final_answer": "yes"}]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows[:1]) + "\n\n" + json.dumps(rows[1]) + "\n")
    problems, _ = load_file(jsonl)
    assert [(p.prompt, p.answer) for p in problems] == [("What is 2+3?", "5"), ("Is 7 prime?", "yes")]

    parquet = tmp_path / "train.parquet"
    datasets.Dataset.from_dict({"question": ["2*4?", "3*3?"], "answer": ["8", "9"], "level": [1, 2]}).to_parquet(
        str(parquet)
    )
    problems, stats = load_file(parquet)
    assert [(p.prompt, p.answer, p.index) for p in problems] == [("2*4?", "8", 0), ("3*3?", "9", 1)]
    both, stats = load_files([jsonl, parquet])
    assert len(both) == stats.kept == stats.rows == 4


def test_malformed_rows_name_file_and_row(tmp_path):
    train = tmp_path / "train.json"
    train.write_text(json.dumps([_orz_item("ok", "1"), [{"from": "human", "value": "no truth"}], _orz_item("", "2")]))
    with pytest.raises(DataError, match=rf"{train}: row 1: expected a list of two messages"):
        load_file(train)
    problems, stats = load_file(train, skip_bad_rows=True)
    assert len(problems) == 1 and stats.bad_rows == 2 and stats.rows == 3
    assert stats.errors[1].startswith(f"{train}: row 2: question is empty")

    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": null}\n{not json\n{"answer": "3"}\n')
    with pytest.raises(DataError, match=rf"{jsonl}: row 1: answer must be a string"):
        load_file(jsonl)
    problems, stats = load_file(jsonl, skip_bad_rows=True)
    assert [p.prompt for p in problems] == ["a"] and stats.bad_rows == 3
    assert "row 2: not valid JSON" in stats.errors[1] and "row 3: no prompt column" in stats.errors[2]


def test_bad_rows_in_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    parquet = tmp_path / "t.parquet"
    datasets.Dataset.from_dict({"prompt": ["p0", "p1", "p2"], "answer": ["0", None, "2"]}).to_parquet(str(parquet))
    with pytest.raises(DataError, match=rf"{parquet}: row 1: answer must be a string, got None"):
        load_file(parquet)
    problems, stats = load_file(parquet, skip_bad_rows=True)
    assert [p.prompt for p in problems] == ["p0", "p2"] and stats.bad_rows == 1


def test_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_file(tmp_path / "missing.json")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_file(tmp_path / "x.txt")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        load_file(tmp_path / "broken.json")
    (tmp_path / "obj.json").write_text("{}")
    with pytest.raises(DataError, match="expected a JSON list"):
        load_file(tmp_path / "obj.json")


class _WordTokenizer:
    """One token per whitespace-separated word; a BOS token it puts before plain text itself (as Llama's do)."""

    bos_token = "<s>"
    bos_token_id = 1
    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return [1] * add_special_tokens + [hash(w) % 1000 + 2 for w in text.split()]


def test_long_prompts_are_dropped_and_counted():
    problems = [Problem(prompt=" ".join(["w"] * n), answer="1", index=n) for n in (1, 50, 10, 200)]
    tok = _WordTokenizer()
    base = len(tok.encode(render_orz("", bos_token="<s>"), False))  # template tokens; each prompt word adds one
    stats = LoadStats(rows=4, kept=4)
    kept = encode_prompts(problems, tok, template="orz", max_prompt_tokens=base + 20, stats=stats)
    assert [e.problem.index for e in kept] == [1, 10]
    assert stats.too_long == 2 and stats.kept == 2
    assert (stats.shortest_prompt_tokens, stats.longest_prompt_tokens) == (base + 1, base + 200)
    assert kept[0].text.startswith("<s>A conversation") and len(kept[0].token_ids) <= base + 20
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        encode_prompts(problems, tok, max_prompt_tokens=0)


def test_prompt_sets_name_the_setting_the_file_and_the_row(tmp_path):
    """A missing, empty or malformed prompt file, and a set whose every prompt is too long, fail naming the setting,
    the file (and row), or data.max_prompt_tokens and the prompts' lengths."""
    tok = _WordTokenizer()
    data = DataConfig(template="plain", max_prompt_tokens=8)
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a b", "answer": "1"}\n{"prompt": "' + "w " * 30 + '", "answer": "2"}\n')
    prompts, stats = load_prompt_set(data, tok, files=[str(good)], setting="optim.anneal.data")
    assert [p.problem.index for p in prompts] == [0] and (stats.rows, stats.kept, stats.too_long) == (2, 1, 1)
    assert (stats.shortest_prompt_tokens, stats.longest_prompt_tokens) == (3, 31)  # words + "Assistant:", no bos
    empty, bad = tmp_path / "empty.jsonl", tmp_path / "bad.jsonl"
    empty.write_text("\n")
    bad.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n')
    cases = [
        ([str(tmp_path / "missing.jsonl")], f"optim.anneal.data: {tmp_path / 'missing.jsonl'}: no such file"),
        ([str(good), str(empty)], f"optim.anneal.data: {empty}: no problems \\(0 rows\\)"),
        ([str(bad)], f"optim.anneal.data: {bad}: row 1: no answer column"),
    ]
    for files, message in cases:
        with pytest.raises(DataError, match=message):
            load_prompt_set(data, tok, files=files, setting="optim.anneal.data")
    tight = DataConfig(template="plain", max_prompt_tokens=2, train=[str(good)])
    with pytest.raises(
        DataError, match="data.train: every one of its 2 prompts is longer than data.max_prompt_tokens=2 "
    ):
        load_prompt_set(tight, tok)
    with pytest.raises(DataError, match=r"they have 3 to 31 tokens\): raise data.max_prompt_tokens"):
        load_prompt_set(tight, tok)
    synthetic = DataConfig(template="plain", max_prompt_tokens=1, synthetic="comparison", synthetic_size=5)
    with pytest.raises(
        DataError, match="data.train: every one of its 5 prompts is longer than data.max_prompt_tokens=1"
    ):
        load_prompt_set(synthetic, tok)


def test_load_problems_from_config(tmp_path):
    problems, stats = load_problems(DataConfig(synthetic="countdown", synthetic_size=12, difficulty=2), seed=5)
    assert len(problems) == stats.kept == 12 and problems[0].answer.startswith("countdown:")
    train = tmp_path / "t.jsonl"
    train.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n')
    with pytest.raises(DataError, match="row 1"):
        load_problems(DataConfig(train=[str(train)]))
    problems, stats = load_problems(DataConfig(train=[str(train)], skip_bad_rows=True))
    assert len(problems) == 1 and stats.bad_rows == 1
