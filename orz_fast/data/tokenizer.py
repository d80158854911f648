"""Loading the tokenizer that goes with a model: Hugging Face directory, GGUF file, or the character tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orz_fast.data.char_tokenizer import CharTokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""Files of which a Hugging Face directory holds at least one when it carries a tokenizer."""


def load_tokenizer(spec: str) -> Any:
    """``char``: the character tokenizer of random-weight runs; else a Hugging Face directory or a ``.gguf``."""
    if spec == "char":
        return CharTokenizer()
    from transformers import AutoTokenizer

    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{path}: no tokenizer in this directory (none of {', '.join(TOKENIZER_FILES)}); give the tokenizer's "
            "directory or .gguf file, or 'char' for a model trained with the character tokenizer"
        )
    try:
        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(
            f"{path}: no tokenizer could be loaded ({type(e).__name__}: {e}); give a tokenizer directory or "
            ".gguf file, or 'char' for a model trained with the character tokenizer (random-weight presets)"
        ) from e
