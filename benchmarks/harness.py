"""Shared benchmark plumbing: timing, hardware identification, result files and the regression guard.

Every benchmark writes one JSON file per hardware class under
``benchmarks/results/`` (``<name>.<hardware>.json``) holding the device name,
the commit, the date and the measured figures, so results from CPU, H100 and
H200 runs sit side by side. The ratios it declares (``write_result(...,
ratios=...)``) are also checked against ``results/baselines/<name>.<hardware>.json``
(see ``regression_guard.py``): more than 15 % worse fails the benchmark;
``pytest benchmarks/ --update-baseline`` rewrites the baselines instead.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from regression_guard import Better, GuardResult, check_baseline, resolve_ratios

from orz_fast.plan import QWEN25_SHAPES

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BASELINE_DIR = RESULTS_DIR / "baselines"
UPDATE_BASELINE = False
"""Set by ``pytest --update-baseline`` (conftest.py): rewrite the baselines instead of checking them."""
GUARD_RESULTS: list[GuardResult] = []
"""This session's guard outcomes, listed in pytest's terminal summary (conftest.py)."""

QWEN25_0P5B = QWEN25_SHAPES["Qwen/Qwen2.5-0.5B"]
"""Qwen2.5-0.5B's architecture (random weights in the GPU benchmarks)."""
QWEN25_1P5B = QWEN25_SHAPES["Qwen/Qwen2.5-1.5B"]
"""Qwen2.5-1.5B's architecture (random weights in the GPU benchmarks)."""
SMALL_QWEN2 = {
    "model_type": "qwen2",
    "vocab_size": 8192,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}
"""The small Qwen2-shaped model of the CPU rollout and end-to-end benchmarks."""


def hardware_class() -> str:
    """``cpu``, ``h100``, ``h200`` or the lower-cased GPU name with spaces as dashes."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    for known in ("h100", "h200", "a100"):
        if known in name:
            return known
    return name.replace(" ", "-")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def median_time(fn: Callable[[], Any], *, warmup: int = 2, reps: int = 5) -> float:
    """Median wall seconds of ``fn()`` over ``reps`` runs after ``warmup`` runs (CUDA-synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_result(name: str, figures: dict[str, Any], *, ratios: Mapping[str, Better] | None = None) -> Path:
    """Write ``figures`` plus device, commit and date to ``results/<name>.<hardware>.json``, then guard
    the declared ``ratios`` (paths into ``figures``, ``/``-separated, each ``"higher"`` or ``"lower"``
    is better) against the baseline of this hardware class.

    The result file is written either way; a ratio more than 15 % worse than its baseline raises
    ``AssertionError`` naming the ratio, its baseline and the measured value.
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    hardware = hardware_class()
    provenance = {"device": device_name(), "commit": commit(), "date": _dt.date.today().isoformat()}
    measured = resolve_ratios(figures, ratios or {})
    payload = {
        "benchmark": name,
        "hardware": hardware,
        **provenance,
        "torch": torch.__version__,
        **figures,
        "ratios": measured,
    }
    path = RESULTS_DIR / f"{name}.{hardware}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    if measured:
        guard = check_baseline(
            name, hardware, measured, baseline_dir=BASELINE_DIR, provenance=provenance, update=UPDATE_BASELINE
        )
        GUARD_RESULTS.append(guard)
        print("\n".join(guard.lines()))
        if guard.status == "created" or (guard.status == "passed" and guard.recorded):
            recorded = ", ".join(guard.recorded)
            message = f"{name}: no {hardware} baseline for {recorded} yet; recorded in {guard.baseline_path}"
            warnings.warn(message, stacklevel=2)
        if guard.status == "failed":
            raise AssertionError(guard.failure_message() + f"\nmeasured figures: {path}")
    return path
