"""The ``demo-real`` task: the largest of three two-digit numbers, asked with two worked examples.

``python -m orz_fast.data.demo_real [OUT_DIR]`` writes ``train.jsonl`` and ``heldout.jsonl`` (JSONL rows with
``prompt`` and ``answer``, what ``data.train`` and ``python -m orz_fast.eval --data`` read) into ``OUT_DIR``
(default: :data:`DEMO_REAL_DIR`, the copies the ``demo-real`` preset trains on; the tests check that they are
this module's output).

Why this task and this prompt (README, "Real-model demo"): SmolLM2-135M-Instruct scores 0 with ORZ's long
template at 16-24 new tokens (it rarely writes ``<answer>``). Worked examples in ``User:``/``Assistant:``
turns teach it the answer format from the prompt (about 98 % of its answers are well formed), so what RL
can still gain is the task itself: the base model answers the largest number about a quarter of the time
(a third if it picked one of the three at random) and the answers are spread over 90 numbers, so a
format-only policy that repeats one answer scores about 2 %.

The examples end ``Assistant:`` with *two* spaces before ``<answer>``: the plain template ends the prompt
with ``"Assistant: "``, a lone space token, and SmolLM2's tokenizer writes ``" <answer>"`` with the space
inside ``" <"``; with one space in the examples the model continues a space token with a number, as it
does after ``": "`` in its pre-training text, and almost never writes the tag.

Every set of three numbers appears at most once over the examples, the training set and the held-out set
(compared as sets: a reordering of a held-out problem is not trained on).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

DEMO_REAL_DIR = Path(__file__).resolve().parent / "demo_real"
"""Where the ``demo-real`` preset's training and held-out files live (``train.jsonl``, ``heldout.jsonl``)."""
EXAMPLES = ((31, 84, 52), (47, 19, 63))
"""The worked examples in every prompt (two: every prompt token is trained on, and on 2 cores the step's time
is its tokens); the largest comes second, then third."""
TRAIN_SIZE = 1000
HELDOUT_SIZE = 128
SEED = 0


def question(numbers: tuple[int, ...]) -> str:
    """``Largest of a, b, c?``"""
    return f"Largest of {', '.join(map(str, numbers))}?"


def prompt(numbers: tuple[int, ...]) -> str:
    """The problem text: the :data:`EXAMPLES` as answered ``User:``/``Assistant:`` turns, then the question as
    a ``User:`` turn (the plain template adds ``"\\nAssistant: "``)."""
    turns = "".join(f"User: {question(ex)}\nAssistant:  <answer>{max(ex)}</answer>\n" for ex in EXAMPLES)
    return f"{turns}User: {question(numbers)}"


def demo_real_sets(
    train_size: int = TRAIN_SIZE, heldout_size: int = HELDOUT_SIZE, seed: int = SEED
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """``(train, heldout)`` rows (``prompt``, ``answer``): distinct sets of three different numbers in 10..99,
    none of them an example's; held-out rows first from one random stream, so ``heldout_size`` fixes them."""
    if train_size < 0 or heldout_size < 0:
        raise ValueError(f"set sizes must be >= 0, got train_size={train_size}, heldout_size={heldout_size}")
    rng = random.Random(f"demo-real:{seed}")
    seen = {frozenset(ex) for ex in EXAMPLES}
    rows: list[dict[str, str]] = []
    while len(rows) < heldout_size + train_size:
        numbers = tuple(rng.sample(range(10, 100), 3))
        if frozenset(numbers) in seen:
            continue
        seen.add(frozenset(numbers))
        rows.append({"prompt": prompt(numbers), "answer": str(max(numbers))})
    return rows[heldout_size:], rows[:heldout_size]


def write_sets(out_dir: str | Path = DEMO_REAL_DIR) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``heldout.jsonl`` (:func:`demo_real_sets` with its defaults) under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.jsonl", out / "heldout.jsonl"
    for path, rows in zip(paths, demo_real_sets(), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths


if __name__ == "__main__":
    for written in write_sets(*sys.argv[1:2]):
        print(f"wrote {written}")
