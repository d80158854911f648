"""Evaluation: avg@k accuracy on MATH500 / AIME 2024 / GPQA Diamond (or any problem file).

``python -m orz_fast.eval --model PATH --data math500|aime2024|gpqa_diamond|FILE [--samples k]
[--max-tokens N] [--limit N] [--out DIR]``

Each problem is rendered with the training prompt template (ORZ's by default), completed ``k`` times
by the native rollout engine and scored by the rule-based reward (a response cut by ``max_tokens``
scores 0). Reported: avg@k accuracy (the mean score over all ``k`` samples of every problem; ORZ
reports avg@16), pass@k (problems with at least one correct sample), mean response length in
tokens and the truncation rate. GPQA Diamond's ground truths are choice letters, compared as
letters (``D``, ``(D)``, ``\\boxed{D}``), as ORZ compares them.

Sampling follows ORZ's evaluation: temperature 1.0, top-p 1.0, stop strings ``User:``,
``Human:``, ``Assistant:``, ``</answer>`` (kept in the output) plus the tokenizer's EOS. Sample
``j`` of problem ``i`` uses seed ``seed * 2**32 + i * k + j``, so a problem's responses do not
depend on ``--limit`` or on how the problems are batched.

The trainer calls :func:`evaluate` with its own engine, tokenizer and scorer. Model text is never
executed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from orz_fast.data import DataError, Problem, bos_prefix, load_file, render_prompt
from orz_fast.data.template import Template
from orz_fast.data.tokenizer import load_tokenizer
from orz_fast.reward import MODES, RewardScorer, extract_answer
from orz_fast.rollout import SamplingParams

EVAL_SETS = {"math500": "math500.json", "aime2024": "aime2024.json", "gpqa_diamond": "gpqa_diamond.json"}
"""Named eval sets (ORZ's eval JSON files) -> file name in the eval data directory."""
EVAL_DATA_ENV = "ORZ_FAST_EVAL_DATA"
"""Environment variable naming the directory that holds the :data:`EVAL_SETS` files."""
DEFAULT_EVAL_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "orz_eval"
"""Where the named sets are looked for when :data:`EVAL_DATA_ENV` is unset: ``../shared/data/orz_eval``
next to the repository."""
ORZ_EVAL_STOP = ["User:", "Human:", "Assistant:", "</answer>"]
"""ORZ's stop strings (the same in training and evaluation)."""
NO_ANSWER = "(no answer)"
"""The key of :meth:`EvalReport.answer_distribution` for responses without a complete ``<answer>`` block."""


def eval_data_dir() -> Path:
    """The directory of the named eval sets: ``$ORZ_FAST_EVAL_DATA`` if set, else :data:`DEFAULT_EVAL_DATA`."""
    env = os.environ.get(EVAL_DATA_ENV)
    return Path(env) if env else DEFAULT_EVAL_DATA


def resolve_eval_set(data: str) -> tuple[str, Path]:
    """``(name, path)`` of ``data``: a name in :data:`EVAL_SETS` or a problem file (name = its stem).

    Raises ``FileNotFoundError`` naming the missing path, or ``ValueError`` for an unknown name.
    """
    if data in EVAL_SETS:
        path = eval_data_dir() / EVAL_SETS[data]
        if not path.is_file():
            raise FileNotFoundError(
                f"eval set {data!r}: {path} not found (set {EVAL_DATA_ENV} to the directory holding "
                f"{', '.join(EVAL_SETS.values())}, or pass the file path)"
            )
        return data, path
    path = Path(data)
    if path.is_file():
        return path.stem, path
    raise ValueError(
        f"--data {data!r} is neither a named eval set ({', '.join(EVAL_SETS)}) nor an existing file ({path.resolve()})"
    )


def load_eval_set(data: str, *, limit: int | None = None) -> tuple[str, list[Problem]]:
    """The name and problems of an eval set (see :func:`resolve_eval_set`), the first ``limit`` only if given."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    name, path = resolve_eval_set(data)
    problems, _ = load_file(path)
    if not problems:
        raise DataError(f"{path}: no problems")
    return name, problems[:limit] if limit is not None else problems


@dataclass
class ProblemResult:
    """One problem's ``k`` responses and their scores."""

    index: int
    """Row of the problem in its eval set."""
    problem: str
    answer: str
    """Ground truth."""
    responses: list[str]
    scores: list[float]
    """Reward of each response (1.0 or 0.0)."""
    response_tokens: list[int]
    """Generated tokens of each response."""
    finish_reasons: list[str]
    """``stop`` or ``length`` (truncated) per response."""

    @property
    def accuracy(self) -> float:
        """Mean score over this problem's samples."""
        return sum(self.scores) / len(self.scores)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "problem": self.problem,
            "answer": self.answer,
            "accuracy": self.accuracy,
            "scores": self.scores,
            "response_tokens": self.response_tokens,
            "finish_reasons": self.finish_reasons,
            "responses": self.responses,
        }


@dataclass
class EvalReport:
    """Per-problem results of one eval set and the figures computed from them."""

    dataset: str
    records: list[ProblemResult]
    samples: int
    """``k``: responses per problem."""
    settings: dict[str, Any]
    """Sampling and scoring settings, written into the summary."""
    wall_time_s: float = 0.0
    """Seconds spent generating and scoring."""

    @property
    def num_problems(self) -> int:
        return len(self.records)

    @property
    def accuracy(self) -> float:
        """avg@k: the mean over problems of each problem's mean score over its ``k`` samples."""
        return sum(r.accuracy for r in self.records) / len(self.records)

    @property
    def pass_at_k(self) -> float:
        """The fraction of problems with at least one correct sample among ``k``."""
        return sum(any(s > 0 for s in r.scores) for r in self.records) / len(self.records)

    @property
    def num_responses(self) -> int:
        return sum(len(r.scores) for r in self.records)

    @property
    def generated_tokens(self) -> int:
        return sum(sum(r.response_tokens) for r in self.records)

    @property
    def mean_response_tokens(self) -> float:
        return self.generated_tokens / self.num_responses

    @property
    def truncated(self) -> int:
        """Responses cut by ``max_tokens`` (or the context)."""
        return sum(f == "length" for r in self.records for f in r.finish_reasons)

    @property
    def truncation_rate(self) -> float:
        return self.truncated / self.num_responses

    def best_constant(self) -> tuple[str, float]:
        """The answer that, given to every problem, scores best, and its accuracy: the most common ground
        truth (ground truths compared as written, stripped; ties go to the first seen) and the fraction of
        problems it answers. A model that learned only the answer format can reach this without reading
        the problems."""
        counts = Counter(r.answer.strip() for r in self.records)
        answer, count = counts.most_common(1)[0]
        return answer, count / len(self.records)

    def answer_distribution(self) -> Counter[str]:
        """How often each final answer was given over all responses: the text of the last complete
        ``<answer>`` block (its last ``\\boxed{}`` if any, as the default reward extracts it), or
        :data:`NO_ANSWER`."""
        return Counter(extract_answer(text) or NO_ANSWER for r in self.records for text in r.responses)

    def format_constant(self, top: int = 8) -> str:
        """Two lines: the best constant answer beside avg@k, and the ``top`` most common final answers with
        their shares of all responses."""
        answer, accuracy = self.best_constant()
        answers = self.answer_distribution()
        shown = ", ".join(f"{a!r} {n / self.num_responses:.1%}" for a, n in answers.most_common(top))
        more = len(answers) - min(top, len(answers))
        return (
            f"{self.dataset}: avg@{self.samples} {self.accuracy:.4f} | best constant answer {answer!r}: "
            f"{accuracy:.4f} | margin {self.accuracy - accuracy:+.4f}\n"
            f"{self.dataset}: final answers ({len(answers)} distinct): {shown}" + (f", {more} more" if more else "")
        )

    def summary(self) -> dict[str, Any]:
        """The figures and settings as one JSON-ready dict (``<dataset>_summary.json``)."""
        return {
            "dataset": self.dataset,
            "num_problems": self.num_problems,
            "samples": self.samples,
            "accuracy": self.accuracy,
            f"avg@{self.samples}": self.accuracy,
            f"pass@{self.samples}": self.pass_at_k,
            "mean_response_tokens": self.mean_response_tokens,
            "truncation_rate": self.truncation_rate,
            "truncated": self.truncated,
            "generated_tokens": self.generated_tokens,
            "wall_time_s": self.wall_time_s,
            "generated_tokens_per_s": self.generated_tokens / self.wall_time_s if self.wall_time_s > 0 else None,
            "best_constant_answer": self.best_constant()[0],
            "best_constant_accuracy": self.best_constant()[1],
            "answer_distribution": dict(self.answer_distribution().most_common()),
            **self.settings,
        }

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """Flat scalars for ``metrics.jsonl``: ``{prefix}{dataset}/accuracy`` (avg@k), ``pass@k``,
        ``response_tokens`` (mean) and ``truncated`` (rate)."""
        p = f"{prefix}{self.dataset}/"
        return {
            f"{p}accuracy": self.accuracy,
            f"{p}pass@{self.samples}": self.pass_at_k,
            f"{p}response_tokens": self.mean_response_tokens,
            f"{p}truncated": self.truncation_rate,
        }

    def write(self, out_dir: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``<dataset>.jsonl`` (one problem per line) and ``<dataset>_summary.json`` under ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        records_path, summary_path = out / f"{self.dataset}.jsonl", out / f"{self.dataset}_summary.json"
        with open(records_path, "w", encoding="utf-8") as f:
            for r in self.records:
                f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
        summary_path.write_text(json.dumps(self.summary(), indent=2) + "\n", encoding="utf-8")
        return records_path, summary_path

    def format(self) -> str:
        """One human-readable line."""
        k = self.samples
        return (
            f"{self.dataset}: avg@{k} {self.accuracy:.4f} | pass@{k} {self.pass_at_k:.4f} | "
            f"mean response {self.mean_response_tokens:.1f} tokens | truncated {self.truncation_rate:.1%} | "
            f"{self.num_problems} problems x {k} samples | {self.wall_time_s:.1f} s"
        )


def evaluate(
    engine: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    *,
    samples: int,
    max_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop: Sequence[str] = ORZ_EVAL_STOP,
    template: Template = "orz",
    seed: int = 0,
    scorer: RewardScorer | None = None,
    dataset: str = "eval",
    out_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> EvalReport:
    """Generate ``samples`` responses per problem with ``engine`` and score them.

    Args:
        engine: a rollout engine (``generate(prompts, params)``, e.g. :class:`~orz_fast.rollout.NativeEngine`;
            every rank of its model-parallel group calls this with the same arguments and gets the same
            report). When it has ``max_model_len``, a prompt that leaves no room to answer is an error;
            when it has ``max_num_seqs``, prompts go in chunks of ``max_num_seqs // samples``.
        tokenizer: renders and tokenizes the prompts (and decodes when the engine has no tokenizer).
        problems: the problems, e.g. from :func:`load_eval_set`; a problem keeps its ``index``.
        samples: ``k`` of avg@k, >= 1.
        max_tokens, temperature, top_p, stop: sampling (ORZ: 8000, 1.0, 1.0, :data:`ORZ_EVAL_STOP`);
            the tokenizer's EOS also stops.
        template: ``orz``, ``chat`` or ``plain`` (see :mod:`orz_fast.data.template`).
        seed: sample ``j`` of problem ``i`` uses seed ``seed * 2**32 + i * samples + j``.
        scorer: the reward; ``None`` builds a default-mode :class:`RewardScorer` for this call.
        dataset: name used in the report, its metrics and its file names.
        out_dir: when given, :meth:`EvalReport.write` writes the results there.
        progress: show a tqdm bar (problems done) on stderr.
    Returns:
        the :class:`EvalReport`.
    """
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    if not problems:
        raise ValueError("no problems to evaluate")
    context = getattr(engine, "max_model_len", None)
    bos = bos_prefix(tokenizer) if template == "orz" else None
    encoded = []
    for p in problems:
        ids = list(tokenizer.encode(render_prompt(p.prompt, template, tokenizer, bos=bos), add_special_tokens=False))
        if context is not None and len(ids) >= context:
            raise ValueError(
                f"{dataset} problem {p.index}: its prompt has {len(ids)} tokens but the model's context is "
                f"{context} tokens, leaving no room to answer"
            )
        encoded.append(ids)
    stop_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    params = [
        SamplingParams(
            n=samples,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            stop=list(stop),
            stop_token_ids=stop_ids,
            seed=(seed << 32) + p.index * samples,
        )
        for p in problems
    ]
    own_scorer = scorer is None
    if own_scorer:
        scorer = RewardScorer()
    # As many prompts per generate call as the engine decodes at once: full batches, and a progress tick per call.
    max_num_seqs = getattr(engine, "max_num_seqs", None)
    chunk = max(1, max_num_seqs // samples) if max_num_seqs is not None else len(problems)
    records: list[ProblemResult] = []
    start = time.perf_counter()
    try:
        with tqdm(total=len(problems), desc=dataset, unit="problem", disable=not progress, file=sys.stderr) as bar:
            for lo in range(0, len(problems), chunk):
                hi = min(lo + chunk, len(problems))
                outputs = engine.generate(encoded[lo:hi], params[lo:hi])
                texts, answers, reasons = [], [], []
                for p, completions in zip(problems[lo:hi], outputs, strict=True):
                    for c in completions:
                        texts.append(c.text if c.text is not None else tokenizer.decode(c.token_ids))
                        answers.append(p.answer)
                        reasons.append(c.finish_reason)
                scores = scorer.score_batch(texts, answers, finish_reasons=reasons)
                for i, (p, completions) in enumerate(zip(problems[lo:hi], outputs, strict=True)):
                    span = slice(i * samples, (i + 1) * samples)
                    records.append(
                        ProblemResult(
                            index=p.index,
                            problem=p.prompt,
                            answer=p.answer,
                            responses=texts[span],
                            scores=[float(s) for s in scores[span]],
                            response_tokens=[len(c.token_ids) for c in completions],
                            finish_reasons=list(reasons[span]),
                        )
                    )
                bar.update(hi - lo)
    finally:
        if own_scorer:
            scorer.close()
    settings = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "stop": list(stop),
        "template": template,
        "seed": seed,
        "reward_mode": scorer.mode,
    }
    report = EvalReport(dataset, records, samples, settings, wall_time_s=time.perf_counter() - start)
    if out_dir is not None:
        report.write(out_dir)
    return report


# ---------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m orz_fast.eval",
        description="avg@k accuracy of a model on an eval set, with ORZ's prompt template, sampling and reward.",
    )
    parser.add_argument("--model", required=True, help="Hugging Face directory (config.json + safetensors) or .gguf")
    parser.add_argument(
        "--data",
        required=True,
        help=f"one of {', '.join(EVAL_SETS)} (from ${EVAL_DATA_ENV}, default {DEFAULT_EVAL_DATA}) or a problem file",
    )
    parser.add_argument("--samples", type=int, default=16, help="k: responses per problem (default 16, ORZ's avg@16)")
    parser.add_argument("--max-tokens", type=int, default=8000, help="generated tokens per response (default 8000)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0; 0 greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1] (default 1.0)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N problems only")
    parser.add_argument("--out", default="runs/eval", help="writes OUT/<dataset>.jsonl and OUT/<dataset>_summary.json")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--template", choices=["orz", "chat", "plain"], default="orz", help="prompt format")
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer directory, .gguf or 'char' (default: the model's own)"
    )
    parser.add_argument("--reward-mode", choices=MODES, default="default", help="reward rules (see orz_fast.reward)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--dtype", choices=["bfloat16", "float16", "float32"], default=None, help="bfloat16 on CUDA, float32 on CPU"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--report-constant",
        action="store_true",
        help="also print the best constant answer's accuracy (the most common ground truth) and the distribution "
        "of final answers (both are in the summary file either way)",
    )
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if not (args.temperature >= 0 and args.temperature != float("inf")):
        raise ValueError(f"--temperature must be finite and >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not Path(args.model).exists():
        raise FileNotFoundError(f"--model: {args.model} not found")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        name, problems = load_eval_set(args.data, limit=args.limit)
        tokenizer = load_tokenizer(args.tokenizer or args.model)
    except (ValueError, FileNotFoundError) as e:
        print(f"orz_fast.eval: {e}", file=sys.stderr)
        return 2
    for message in ("Transformer Engine and Apex are not installed", "Apex is not installed", "Warning: tp_group"):
        warnings.filterwarnings("ignore", message=message)
    import torch

    from orz_fast import parallel
    from orz_fast.models import load_pretrained
    from orz_fast.rollout import NativeEngine

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    parallel.initialize(1, 1)
    policy = load_pretrained(args.model, dtype=dtype, device=device)
    policy.eval()
    if len(tokenizer) > policy.spec.vocab_size:
        print(
            f"orz_fast.eval: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{policy.spec.vocab_size}; pass the model's own tokenizer with --tokenizer",
            file=sys.stderr,
        )
        return 2
    engine = NativeEngine(policy, tokenizer=tokenizer)
    try:
        with RewardScorer(args.reward_mode) as scorer:
            report = evaluate(
                engine,
                tokenizer,
                problems,
                samples=args.samples,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                template=args.template,
                seed=args.seed,
                scorer=scorer,
                dataset=name,
                progress=not args.no_progress,
            )
    except ValueError as e:
        print(f"orz_fast.eval: {e}", file=sys.stderr)
        return 2
    report.settings.update(model=str(args.model), device=str(device), dtype=dtype)
    records_path, summary_path = report.write(args.out)
    print(report.format())
    if args.report_constant:
        print(report.format_constant())
    print(f"wrote {records_path} and {summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
