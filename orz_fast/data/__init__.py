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
from orz_fast.data.template import ORZ_PROMPT_TEMPLATE, render_chat, render_orz, render_prompt

__all__ = [
    "FAMILIES",
    "ORZ_PROMPT_TEMPLATE",
    "DataError",
    "EncodedPrompt",
    "LoadStats",
    "Problem",
    "encode_prompts",
    "load_file",
    "load_files",
    "load_problems",
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
