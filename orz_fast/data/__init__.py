"""Prompts: ORZ's template, dataset loaders, synthetic verifiable tasks."""

from __future__ import annotations

from typing import Any

from orz_fast.data.loaders import (
    DataError,
    EncodedPrompt,
    LoadStats,
    Problem,
    encode_prompts,
    load_file,
    load_files,
)
from orz_fast.data.synthetic import FAMILIES, synthetic_problems
from orz_fast.data.template import ORZ_PROMPT_TEMPLATE, bos_prefix, render_chat, render_orz, render_prompt

__all__ = [
    "FAMILIES",
    "ORZ_PROMPT_TEMPLATE",
    "DataError",
    "EncodedPrompt",
    "LoadStats",
    "Problem",
    "bos_prefix",
    "encode_prompts",
    "load_file",
    "load_files",
    "load_problems",
    "load_prompt_set",
    "render_chat",
    "render_orz",
    "render_prompt",
    "synthetic_problems",
]


def load_problems(data: Any, *, seed: int = 0) -> tuple[list[Problem], LoadStats]:
    """The problems a :class:`orz_fast.config.DataConfig` names: its ``train`` files, or when that is
    empty ``synthetic_size`` problems of the ``synthetic`` family at ``difficulty`` from ``seed``."""
    if data.train:
        return load_files(data.train, skip_bad_rows=data.skip_bad_rows)
    problems = synthetic_problems(data.synthetic, data.synthetic_size, difficulty=data.difficulty, seed=seed)
    return problems, LoadStats(rows=len(problems), kept=len(problems))


def load_prompt_set(
    data: Any, tokenizer: Any, *, files: list[str] | None = None, setting: str = "data.train", seed: int = 0
) -> tuple[list[EncodedPrompt], LoadStats]:
    """A run's prompts, rendered with ``data.template``, tokenized, and filtered by ``data.max_prompt_tokens``.

    ``files=None``: the training set (``data.train``, or the synthetic task when that is empty, from ``seed``);
    else those prompt files (e.g. ``optim.anneal.data``), named ``setting`` in errors. Raises :class:`DataError`
    naming ``setting`` and the file for a missing or unreadable file, a malformed row (with its index; unless
    ``data.skip_bad_rows``) and a file without a problem; and naming ``data.max_prompt_tokens`` and the prompt
    lengths when every prompt is too long.
    """
    if files is None and not data.train:
        problems, stats = load_problems(data, seed=seed)
    else:
        problems, stats = [], LoadStats()
        for path in data.train if files is None else files:
            try:
                got, file_stats = load_file(path, skip_bad_rows=data.skip_bad_rows)
            except DataError as e:
                raise DataError(f"{setting}: {e}") from e
            if not got:
                skipped = f", {file_stats.bad_rows} malformed and skipped" if file_stats.bad_rows else ""
                raise DataError(f"{setting}: {path}: no problems ({file_stats.rows} rows{skipped})")
            problems.extend(got)
            stats.merge(file_stats)
    prompts = encode_prompts(
        problems, tokenizer, template=data.template, max_prompt_tokens=data.max_prompt_tokens, stats=stats
    )
    if not prompts:
        raise DataError(
            f"{setting}: every one of its {len(problems)} prompts is longer than data.max_prompt_tokens="
            f"{data.max_prompt_tokens} with the {data.template!r} template (they have {stats.shortest_prompt_tokens} "
            f"to {stats.longest_prompt_tokens} tokens): raise data.max_prompt_tokens"
        )
    return prompts, stats
