"""Regression guard: each benchmark's declared ratios against the baseline of the same hardware class.

A benchmark declares which of its figures are guarded ratios (kernel vs its floor, engine vs
transformers, orz_fast vs TRL, ...) when it writes its result: ``write_result(name, figures,
ratios={"speedup_vs_trl": "higher"})``. Keys are paths into ``figures`` with ``/`` between nesting
levels (figure names may contain dots, e.g. ``gamma1.0_lam1.0/speedup_vs_padded_position_loop``);
values say which direction is better. Only ratios taken side by side in one process are declared:
they carry over between runs on one hardware class, absolute rates on a shared machine do not.

The baseline of a benchmark is ``results/baselines/<name>.<hardware>.json``, committed beside the
results: per ratio its value, its direction and the device, commit and date it was measured at. A
run fails when a ratio is more than ``TOLERANCE`` (15 %) worse than its baseline (below
``0.85 x baseline`` when higher is better, above ``baseline / 0.85`` when lower is better) or is
not a finite positive number, and never writes the baseline then. A baseline file that does not
exist yet, or a ratio it does not hold yet, is recorded from the run (and reported as such);
``pytest benchmarks/ --update-baseline`` rewrites the baselines of the benchmarks it runs with
their measured ratios.

The functions here are pure apart from :func:`check_baseline`'s file I/O, and are unit-tested in
``tests/test_bench_guard.py``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

TOLERANCE = 0.15
"""Largest allowed drop of a ratio below its baseline (as a fraction of the baseline's goodness)."""

Better = Literal["higher", "lower"]


def resolve_ratios(figures: Mapping[str, Any], declared: Mapping[str, Better]) -> dict[str, dict[str, Any]]:
    """``{path: {"value": float, "better": direction}}`` for each declared path into ``figures``.

    Raises ``ValueError`` naming the path when it does not lead to a number, or the direction is
    neither ``"higher"`` nor ``"lower"``.
    """
    out = {}
    for path, better in declared.items():
        if better not in ("higher", "lower"):
            raise ValueError(f"ratio {path!r}: direction must be 'higher' or 'lower', got {better!r}")
        node: Any = figures
        for part in path.split("/"):
            if not isinstance(node, Mapping) or part not in node:
                raise ValueError(f"ratio {path!r}: no figure {part!r} in the benchmark's figures")
            node = node[part]
        if isinstance(node, bool) or not isinstance(node, (int, float)):
            raise ValueError(f"ratio {path!r}: expected a number, got {node!r}")
        out[path] = {"value": float(node), "better": better}
    return out


def goodness(measured: float, baseline: float, better: Better) -> float:
    """How good ``measured`` is relative to ``baseline``: 1 equal, < 1 worse (0.8 = 20 % worse)."""
    return measured / baseline if better == "higher" else baseline / measured


@dataclass(frozen=True)
class Regression:
    """A ratio more than the tolerance worse than its baseline (or not a finite positive number)."""

    benchmark: str
    ratio: str
    measured: float
    baseline: float
    better: Better
    tolerance: float = TOLERANCE

    def message(self) -> str:
        if not (math.isfinite(self.measured) and self.measured > 0):
            return f"{self.benchmark}: {self.ratio} measured {self.measured!r}, baseline {self.baseline:.4g}"
        limit = (
            (1 - self.tolerance) * self.baseline if self.better == "higher" else self.baseline / (1 - self.tolerance)
        )
        return (
            f"{self.benchmark}: {self.ratio} = {self.measured:.4g}, baseline {self.baseline:.4g} "
            f"({self.measured / self.baseline - 1:+.1%}; {self.better} is better, "
            f"{'below' if self.better == 'higher' else 'above'} {limit:.4g} fails)"
        )


def compare(
    benchmark: str,
    measured: Mapping[str, Mapping[str, Any]],
    baseline: Mapping[str, Mapping[str, Any]],
    tolerance: float = TOLERANCE,
) -> list[Regression]:
    """The measured ratios that are more than ``tolerance`` worse than their baseline values.

    Ratios absent from ``baseline`` are not compared. The direction is the measured one (the
    benchmark's current declaration).
    """
    regressions = []
    for name, m in measured.items():
        if name not in baseline:
            continue
        value, base, better = float(m["value"]), float(baseline[name]["value"]), m["better"]
        if not (math.isfinite(base) and base > 0):
            raise ValueError(f"{benchmark}: baseline of {name} is {base!r}; a ratio's baseline must be finite and > 0")
        bad = not (math.isfinite(value) and value > 0) or goodness(value, base, better) < 1 - tolerance
        if bad:
            regressions.append(Regression(benchmark, name, value, base, better, tolerance))
    return regressions


@dataclass
class GuardResult:
    """What :func:`check_baseline` found and did for one benchmark."""

    benchmark: str
    hardware: str
    status: Literal["passed", "failed", "created", "updated"]
    baseline_path: Path
    measured: dict[str, dict[str, Any]]
    baseline: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The baseline ratios compared against (before any were added)."""
    regressions: list[Regression] = field(default_factory=list)
    recorded: list[str] = field(default_factory=list)
    """Ratios written to the baseline by this run (all of them when created or updated)."""
    not_measured: list[str] = field(default_factory=list)
    """Baseline ratios this run did not measure (the benchmark no longer declares them)."""

    def lines(self) -> list[str]:
        """One line per ratio: measured, baseline and change, or what was recorded."""
        out = []
        for name, m in self.measured.items():
            b = self.baseline.get(name)
            if self.status in ("created", "updated") or b is None:
                note = "baseline updated" if self.status == "updated" else "no baseline yet: recorded"
                out.append(f"{self.benchmark}: {name} = {m['value']:.4g} ({note})")
            else:
                change = m["value"] / b["value"] - 1
                verdict = "REGRESSED" if any(r.ratio == name for r in self.regressions) else "ok"
                out.append(
                    f"{self.benchmark}: {name} = {m['value']:.4g}, baseline {b['value']:.4g} ({change:+.1%}) {verdict}"
                )
        out += [f"{self.benchmark}: {name} is in the baseline but was not measured" for name in self.not_measured]
        return out

    def failure_message(self) -> str:
        return (
            f"{len(self.regressions)} ratio(s) of {self.benchmark} regressed more than "
            f"{self.regressions[0].tolerance:.0%} against {self.baseline_path} ({self.hardware}):\n  "
            + "\n  ".join(r.message() for r in self.regressions)
            + "\n(if the change is deliberate, rewrite the baseline: pytest benchmarks/ --update-baseline)"
        )


def baseline_path(baseline_dir: Path, benchmark: str, hardware: str) -> Path:
    return Path(baseline_dir) / f"{benchmark}.{hardware}.json"


def _write_baseline(path: Path, benchmark: str, hardware: str, ratios: Mapping[str, Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": benchmark, "hardware": hardware, "ratios": dict(sorted(ratios.items()))}
    path.write_text(json.dumps(payload, indent=2) + "\n")


def check_baseline(
    benchmark: str,
    hardware: str,
    measured: Mapping[str, Mapping[str, Any]],
    *,
    baseline_dir: Path,
    provenance: Mapping[str, Any],
    update: bool = False,
    tolerance: float = TOLERANCE,
) -> GuardResult:
    """Compare ``measured`` (from :func:`resolve_ratios`) with the benchmark's baseline file.

    ``update`` rewrites the baseline with the measured ratios. Otherwise a missing baseline file
    is created from them, ratios it lacks are added to it, and on any regression nothing is
    written. ``provenance`` (device, commit, date) is stored beside each recorded value.
    """
    path = baseline_path(baseline_dir, benchmark, hardware)
    stamped = {name: {**m, **provenance} for name, m in measured.items()}
    result = GuardResult(benchmark, hardware, "passed", path, {k: dict(v) for k, v in measured.items()})
    if update or not path.exists():
        _write_baseline(path, benchmark, hardware, stamped)
        result.status = "updated" if update else "created"
        result.recorded = list(measured)
        return result
    stored = json.loads(path.read_text()).get("ratios", {})
    result.baseline = {k: dict(v) for k, v in stored.items()}
    result.regressions = compare(benchmark, measured, stored, tolerance)
    result.not_measured = [name for name in stored if name not in measured]
    if result.regressions:
        result.status = "failed"
        return result
    result.recorded = [name for name in measured if name not in stored]
    if result.recorded:
        _write_baseline(path, benchmark, hardware, {**stored, **{k: stamped[k] for k in result.recorded}})
    return result
