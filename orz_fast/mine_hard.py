"""Mine hard prompts for the annealing stage: those a trained policy solves at most K times in N.

``python -m orz_fast.mine_hard --run DIR [--max-pass 3/64] [--since-step S] --out hard.jsonl``
reads a training run's ``rollouts.jsonl`` (each prompt's scores, every step); ``python -m
orz_fast.mine_hard --eval FILE.jsonl [FILE.jsonl ...] --out hard.jsonl`` reads the per-problem
files of ``python -m orz_fast.eval`` (a checkpoint's avg@k over a prompt file) instead.

A sample passes when its score is positive (the reward is 0/1). A prompt is hard when its passes over
its samples are at most K/N: ``passes * N <= K * samples`` (ORZ's 32B recipe: solved fewer than 4
times in 64, ``--max-pass 3/64``). From a run, each prompt counts at the last step it was drawn (the
most trained policy that saw it), or, with ``--since-step S``, over every step from S on.

The output is JSONL with ``prompt`` and ``answer`` (what ``data.train`` and ``optim.anneal.data``
read), plus ``source``, ``index``, ``passes`` and ``samples``. A run's prompt texts are read back from
the files its ``rollouts.jsonl`` names (absolute paths), or regenerated from its ``config.json`` for
a synthetic task.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from orz_fast.data import DataError, Problem, load_file, synthetic_problems


@dataclass
class PromptRecord:
    """One prompt's passes and samples."""

    source: str
    index: int
    passes: int = 0
    samples: int = 0
    step: int = -1
    """The last step counted (``--run``)."""
    prompt: str | None = None
    answer: str | None = None


def parse_max_pass(text: str) -> Fraction:
    """``K/N`` (e.g. ``3/64``) as a fraction in [0, 1]; ValueError naming the text otherwise."""
    k, sep, n = text.partition("/")
    try:
        value = Fraction(int(k), int(n)) if sep else Fraction(text)
    except (ValueError, ZeroDivisionError) as e:
        raise ValueError(f"--max-pass {text!r}: expected K/N, e.g. 3/64") from e
    if not 0 <= value <= 1:
        raise ValueError(f"--max-pass {text!r}: must be between 0 and 1")
    return value


def is_hard(passes: int, samples: int, max_pass: Fraction) -> bool:
    """``passes / samples <= max_pass``, exactly (integers, no rounding)."""
    return samples > 0 and passes * max_pass.denominator <= max_pass.numerator * samples


def _jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of every line; a torn last line (a run killed mid-write) is skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                continue
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: line {i + 1} is not a JSON object")
        out.append((i + 1, obj))
    return out


def run_records(run: Path, *, since_step: int | None = None) -> list[PromptRecord]:
    """Every prompt of a run's ``rollouts.jsonl`` with its passes and samples: at its last step, or pooled over the
    steps from ``since_step`` on."""
    path = run / "rollouts.jsonl"
    records: dict[tuple[str, int], PromptRecord] = {}
    for line, obj in _jsonl(path):
        try:
            key, step, scores = (str(obj["source"]), int(obj["index"])), int(obj["step"]), obj["scores"]
            passes = sum(float(s) > 0 for s in scores)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: line {line} is not a rollout record ({type(e).__name__}: {e})") from e
        if since_step is not None and step < since_step:
            continue
        rec = records.setdefault(key, PromptRecord(*key))
        if since_step is None:  # only the prompt's last step counts
            if step < rec.step:
                continue
            if step > rec.step:
                rec.passes, rec.samples = 0, 0
        rec.passes, rec.samples, rec.step = rec.passes + passes, rec.samples + len(scores), max(rec.step, step)
    if not records:
        raise ValueError(f"{path}: no rollout records" + (f" from step {since_step} on" if since_step else ""))
    return list(records.values())


def _fill_problems(run: Path, records: list[PromptRecord]) -> None:
    """Read each record's prompt and answer back from its source file, or regenerate a synthetic task from the run's
    config.json."""
    by_source: dict[str, dict[int, Problem]] = {}
    for rec in records:
        if rec.source not in by_source:
            by_source[rec.source] = _problems_of(run, rec.source)
        problem = by_source[rec.source].get(rec.index)
        if problem is None:
            raise DataError(f"{rec.source}: no row {rec.index}, which the run trained on (was the file changed?)")
        rec.prompt, rec.answer = problem.prompt, problem.answer


def _problems_of(run: Path, source: str) -> dict[int, Problem]:
    if not source.startswith("synthetic:"):
        problems, _ = load_file(source, skip_bad_rows=True)
        return {p.index: p for p in problems}
    config_path = run / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: needed to regenerate the run's synthetic prompts ({source})")
    cfg = json.loads(config_path.read_text())
    data = cfg["data"]
    problems = synthetic_problems(
        data["synthetic"], data["synthetic_size"], difficulty=data["difficulty"], seed=cfg["train"]["seed"]
    )
    return {p.index: p for p in problems if p.source == source}


def eval_records(paths: list[Path]) -> list[PromptRecord]:
    """Every problem of ``python -m orz_fast.eval``'s per-problem files (``problem``, ``answer``, ``scores``)."""
    out = []
    for path in paths:
        rows = _jsonl(path)
        if not rows:
            raise ValueError(f"{path}: no problems")
        for line, obj in rows:
            try:
                rec = PromptRecord(str(path.resolve()), int(obj["index"]), prompt=obj["problem"], answer=obj["answer"])
                rec.passes, rec.samples = sum(float(s) > 0 for s in obj["scores"]), len(obj["scores"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}: line {line} is not an eval record ({type(e).__name__}: {e})") from e
            out.append(rec)
    return out


def write_hard(records: list[PromptRecord], out: Path) -> None:
    """The records as JSONL rows the data loaders read (``prompt``, ``answer``, then where they came from)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for r in records:
            row = {
                "prompt": r.prompt,
                "answer": r.answer,
                "source": r.source,
                "index": r.index,
                "passes": r.passes,
                "samples": r.samples,
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def mine(
    *, run: Path | None = None, evals: list[Path] | None = None, max_pass: Fraction, since_step: int | None = None
) -> tuple[list[PromptRecord], int]:
    """The hard prompts (sorted by source and index) of a run or of eval files, and how many prompts were seen."""
    if (run is None) == (not evals):
        raise ValueError("give --run DIR or --eval FILE (one of them)")
    records = run_records(run, since_step=since_step) if run is not None else eval_records(evals)
    hard = sorted((r for r in records if is_hard(r.passes, r.samples, max_pass)), key=lambda r: (r.source, r.index))
    if run is not None:
        _fill_problems(run, hard)
    return hard, len(records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orz_fast.mine_hard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a training run's directory (reads its rollouts.jsonl)")
    parser.add_argument("--eval", type=Path, nargs="+", help="per-problem files of python -m orz_fast.eval")
    parser.add_argument("--max-pass", default="3/64", help="K/N: keep prompts solved at most K times in N (3/64)")
    parser.add_argument("--since-step", type=int, default=None, help="--run: pool every step from this one on")
    parser.add_argument("--out", type=Path, required=True, help="output JSONL (prompt, answer, ...)")
    args = parser.parse_args(argv)
    try:
        max_pass = parse_max_pass(args.max_pass)
        hard, seen = mine(run=args.run, evals=args.eval, max_pass=max_pass, since_step=args.since_step)
    except (ValueError, FileNotFoundError) as e:
        print(f"orz_fast.mine_hard: {e}", file=sys.stderr)
        return 2
    write_hard(hard, args.out)
    print(f"{len(hard)} of {seen} prompts solved at most {max_pass} of the time: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
