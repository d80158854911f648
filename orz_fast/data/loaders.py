"""Problem loaders: ORZ's training and eval JSON, JSONL with prompt/answer, and Parquet (or any other
format the ``datasets`` library reads) — plus the prompt-length filter.

Every row becomes a :class:`Problem`. A malformed row raises :class:`DataError` naming the file and the
0-based row index, unless ``skip_bad_rows`` is set, in which case it is skipped and counted in
:class:`LoadStats`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orz_fast.data.template import Template, bos_prefix, render_prompt

PROMPT_KEYS = ("prompt", "problem", "question")
"""Columns read as the problem text in JSONL / Parquet rows, first present wins."""
ANSWER_KEYS = ("answer", "final_answer", "ground_truth")
"""Columns read as the ground-truth answer, first present wins."""
_DATASETS_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


class DataError(ValueError):
    """A malformed dataset file or row; the message names the file and the row index."""


@dataclass(frozen=True)
class Problem:
    """One verifiable problem."""

    prompt: str
    """The problem text (without any template)."""
    answer: str
    """Ground truth for the reward (see :mod:`orz_fast.reward`)."""
    source: str = ""
    """File (or generator) it came from."""
    index: int = 0
    """Row index in ``source``."""


@dataclass
class LoadStats:
    """What loading and filtering kept and dropped."""

    rows: int = 0
    """Rows read."""
    kept: int = 0
    """Problems returned."""
    bad_rows: int = 0
    """Malformed rows skipped (``skip_bad_rows``)."""
    too_long: int = 0
    """Prompts dropped for exceeding ``max_prompt_tokens``."""
    shortest_prompt_tokens: int | None = None
    """Tokens of the shortest rendered prompt, kept or dropped (None before encoding)."""
    longest_prompt_tokens: int | None = None
    """Tokens of the longest rendered prompt, kept or dropped (None before encoding)."""
    errors: list[str] = field(default_factory=list)
    """The first few skip reasons, for logs."""

    def merge(self, other: LoadStats) -> None:
        self.rows += other.rows
        self.kept += other.kept
        self.bad_rows += other.bad_rows
        self.too_long += other.too_long
        lows = [v for v in (self.shortest_prompt_tokens, other.shortest_prompt_tokens) if v is not None]
        highs = [v for v in (self.longest_prompt_tokens, other.longest_prompt_tokens) if v is not None]
        self.shortest_prompt_tokens = min(lows, default=None)
        self.longest_prompt_tokens = max(highs, default=None)
        self.errors.extend(other.errors[: max(0, 20 - len(self.errors))])

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "kept": self.kept,
            "bad_rows": self.bad_rows,
            "too_long": self.too_long,
            "shortest_prompt_tokens": self.shortest_prompt_tokens,
            "longest_prompt_tokens": self.longest_prompt_tokens,
        }


def _text(value: Any, what: str) -> str:
    """A non-empty string field; numbers are accepted as answers (ORZ data has integer answers)."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{what} must be a string, got {value!r}")
    if isinstance(value, (int, float)):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{what} is empty")
    return value


def _message_text(messages: Any, what: str) -> str:
    """The first user turn of a message list (``{"from"/"role": ..., "value"/"content": ...}``)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{what} must be a non-empty list of messages")
    for msg in messages:
        if not isinstance(msg, dict):
            raise ValueError(f"{what}: each message must be an object, got {type(msg).__name__}")
        role = msg.get("from", msg.get("role"))
        if role in ("human", "user"):
            return _text(msg.get("value", msg.get("content")), f"{what} user message")
    raise ValueError(f"{what} has no human/user message")


def parse_orz_train_item(item: Any) -> tuple[str, str]:
    """``[{"from": "human", "value": Q}, {"from": "assistant", "ground_truth": {"value": A}}]``."""
    if not isinstance(item, list) or len(item) != 2:
        raise ValueError("expected a list of two messages (human, assistant)")
    human, assistant = item
    if not isinstance(human, dict) or human.get("from") != "human":
        raise ValueError('first message must be {"from": "human", "value": ...}')
    if not isinstance(assistant, dict) or assistant.get("from") != "assistant":
        raise ValueError('second message must be {"from": "assistant", "ground_truth": {"value": ...}}')
    truth = assistant.get("ground_truth")
    if not isinstance(truth, dict) or "value" not in truth:
        raise ValueError('assistant message needs "ground_truth": {"value": ...}')
    return _text(human.get("value"), "question"), _text(truth["value"], "ground truth")


def parse_record(item: Any) -> tuple[str, str]:
    """A row object: ORZ eval (``{"prompt": [messages], "final_answer": A}``) or prompt/answer columns."""
    if not isinstance(item, dict):
        raise ValueError(f"expected an object, got {type(item).__name__}")
    prompt_key = next((k for k in PROMPT_KEYS if k in item), None)
    answer_key = next((k for k in ANSWER_KEYS if k in item), None)
    if prompt_key is None:
        raise ValueError(f"no prompt column (one of {', '.join(PROMPT_KEYS)}); keys: {sorted(item)}")
    if answer_key is None:
        raise ValueError(f"no answer column (one of {', '.join(ANSWER_KEYS)}); keys: {sorted(item)}")
    prompt = item[prompt_key]
    prompt = _message_text(prompt, prompt_key) if isinstance(prompt, list) else _text(prompt, prompt_key)
    answer = item[answer_key]
    if isinstance(answer, dict) and "value" in answer:
        answer = answer["value"]
    return prompt, _text(answer, answer_key)


def parse_item(item: Any) -> tuple[str, str]:
    """Any supported row shape: an ORZ training pair (a list) or a record (an object)."""
    return parse_orz_train_item(item) if isinstance(item, list) else parse_record(item)


def _json_rows(path: Path) -> Iterator[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of problems, got {type(data).__name__}")
    yield from data


class _BadLine:
    def __init__(self, reason: str):
        self.reason = reason


def _jsonl_rows(path: Path) -> Iterator[Any]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                yield _BadLine(f"not valid JSON ({e.msg} at column {e.colno})")


def _datasets_rows(path: Path) -> Iterable[Any]:
    import datasets

    builder = _DATASETS_BUILDERS[path.suffix.lower()]
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True)
    except Exception as e:  # datasets raises many types for unreadable files
        raise DataError(f"{path}: datasets could not read it as {builder}: {e}") from e
    return ds


def _rows(path: Path) -> Iterable[Any]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _json_rows(path)
    if suffix == ".jsonl":
        return _jsonl_rows(path)
    if suffix in _DATASETS_BUILDERS:
        return _datasets_rows(path)
    supported = ", ".join([".json", ".jsonl", *_DATASETS_BUILDERS])
    raise DataError(f"{path}: unsupported file type {suffix!r} (supported: {supported})")


def load_file(path: str | Path, *, skip_bad_rows: bool = False) -> tuple[list[Problem], LoadStats]:
    """Read one file of problems.

    ``.json``: ORZ training data (a list of two-message dialogues), ORZ eval data (objects with a
    ``prompt`` message list and ``final_answer``) or a list of prompt/answer objects. ``.jsonl``: one
    such object per line. ``.parquet`` / ``.csv`` / ``.arrow``: through ``datasets``, with prompt/answer
    columns (see :data:`PROMPT_KEYS`, :data:`ANSWER_KEYS`).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    stats = LoadStats()
    problems: list[Problem] = []
    for index, item in enumerate(_rows(path)):
        stats.rows += 1
        try:
            if isinstance(item, _BadLine):
                raise ValueError(item.reason)
            prompt, answer = parse_item(item)
        except ValueError as e:
            if not skip_bad_rows:
                raise DataError(f"{path}: row {index}: {e}") from e
            stats.bad_rows += 1
            if len(stats.errors) < 20:
                stats.errors.append(f"{path}: row {index}: {e}")
            continue
        problems.append(Problem(prompt=prompt, answer=answer, source=str(path), index=index))
    stats.kept = len(problems)
    return problems, stats


def load_files(paths: Sequence[str | Path], *, skip_bad_rows: bool = False) -> tuple[list[Problem], LoadStats]:
    """:func:`load_file` over several files, in order, with merged stats."""
    problems: list[Problem] = []
    stats = LoadStats()
    for path in paths:
        got, file_stats = load_file(path, skip_bad_rows=skip_bad_rows)
        problems.extend(got)
        stats.merge(file_stats)
    stats.kept = len(problems)
    return problems, stats


@dataclass(frozen=True)
class EncodedPrompt:
    """A problem rendered with its template and tokenized, ready for the rollout engine."""

    problem: Problem
    text: str
    """The rendered prompt."""
    token_ids: list[int]


def encode_prompts(
    problems: Sequence[Problem],
    tokenizer: Any,
    *,
    template: Template = "orz",
    max_prompt_tokens: int,
    stats: LoadStats | None = None,
    encode: Callable[[str], list[int]] | None = None,
) -> list[EncodedPrompt]:
    """Render and tokenize every problem, dropping (and counting in ``stats.too_long``) those longer than
    ``max_prompt_tokens``; ``stats`` also gets the shortest and longest prompt's tokens. ``encode`` defaults
    to ``tokenizer.encode(text, add_special_tokens=False)`` (the template already holds the special tokens)."""
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    if encode is None:

        def encode(text: str) -> list[int]:
            return list(tokenizer.encode(text, add_special_tokens=False))

    bos = bos_prefix(tokenizer) if template == "orz" else None
    out: list[EncodedPrompt] = []
    dropped = 0
    lengths = []
    for problem in problems:
        text = render_prompt(problem.prompt, template, tokenizer, bos=bos)
        ids = encode(text)
        lengths.append(len(ids))
        if len(ids) > max_prompt_tokens:
            dropped += 1
            continue
        out.append(EncodedPrompt(problem=problem, text=text, token_ids=ids))
    if stats is not None:
        stats.too_long += dropped
        stats.kept = len(out)
        if lengths:
            stats.merge(LoadStats(shortest_prompt_tokens=min(lengths), longest_prompt_tokens=max(lengths)))
    return out
