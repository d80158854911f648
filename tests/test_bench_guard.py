"""The benchmark regression guard (benchmarks/regression_guard.py), without running a benchmark: ratio
declarations, the 15 % comparison in both directions, the failure message, and the baseline file's
create / check / record / update paths."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from regression_guard import (  # noqa: E402
    TOLERANCE,
    check_baseline,
    compare,
    resolve_ratios,
)

PROVENANCE = {"device": "test-cpu", "commit": "abc1234", "date": "2026-01-01"}


def ratio(value, better="higher"):
    return {"value": value, "better": better}


# --------------------------------------------------------------------------- declarations


def test_resolve_ratios_follows_slash_paths_through_dotted_names():
    figures = {"speedup_vs_trl": 2.5, "gamma1.0_lam1.0": {"torch": {"pct_of_floor": 7}}, "label": "x"}
    declared = {"speedup_vs_trl": "higher", "gamma1.0_lam1.0/torch/pct_of_floor": "higher"}
    assert resolve_ratios(figures, declared) == {
        "speedup_vs_trl": ratio(2.5),
        "gamma1.0_lam1.0/torch/pct_of_floor": ratio(7.0),
    }
    assert resolve_ratios(figures, {}) == {}


@pytest.mark.parametrize(
    "declared, match",
    [
        ({"speedup": "higher"}, "no figure 'speedup'"),
        ({"gamma1.0_lam1.0/triton/pct_of_floor": "higher"}, "no figure 'triton'"),
        ({"label": "higher"}, "expected a number"),
        ({"flag": "higher"}, "expected a number"),
        ({"speedup_vs_trl": "up"}, "direction must be 'higher' or 'lower'"),
    ],
)
def test_resolve_ratios_rejects_bad_declarations(declared, match):
    figures = {"speedup_vs_trl": 2.5, "gamma1.0_lam1.0": {"torch": {"pct_of_floor": 7}}, "label": "x", "flag": True}
    with pytest.raises(ValueError, match=match):
        resolve_ratios(figures, declared)


# --------------------------------------------------------------------------- comparison


def test_compare_allows_drops_up_to_the_tolerance():
    assert TOLERANCE == 0.15
    baseline = {"speedup": ratio(2.0)}
    for value in (2.0, 3.0, 1.71, 2.0 * 0.85):
        assert compare("b", {"speedup": ratio(value)}, baseline) == [], value
    (reg,) = compare("b", {"speedup": ratio(1.69)}, baseline)
    assert (reg.benchmark, reg.ratio, reg.measured, reg.baseline, reg.better) == ("b", "speedup", 1.69, 2.0, "higher")


def test_compare_lower_is_better():
    baseline = {"peak_fraction": ratio(0.10, "lower")}
    assert compare("b", {"peak_fraction": ratio(0.05, "lower")}, baseline) == []
    assert compare("b", {"peak_fraction": ratio(0.10 / 0.85 - 1e-9, "lower")}, baseline) == []
    (reg,) = compare("b", {"peak_fraction": ratio(0.12, "lower")}, baseline)
    assert reg.better == "lower"


@pytest.mark.parametrize("value", [math.nan, math.inf, 0.0, -1.0])
def test_compare_fails_a_ratio_that_is_not_a_finite_positive_number(value):
    (reg,) = compare("b", {"speedup": ratio(value)}, {"speedup": ratio(2.0)})
    assert "speedup" in reg.message() and "2" in reg.message()


def test_compare_skips_ratios_without_a_baseline_and_rejects_a_bad_baseline():
    assert compare("b", {"new": ratio(0.1)}, {"old": ratio(5.0)}) == []
    with pytest.raises(ValueError, match="baseline of speedup"):
        compare("b", {"speedup": ratio(1.0)}, {"speedup": ratio(0.0)})


def test_regression_message_names_ratio_baseline_and_measured():
    (reg,) = compare("e2e_grpo_vs_trl", {"speedup_vs_trl": ratio(1.2)}, {"speedup_vs_trl": ratio(2.0)})
    msg = reg.message()
    assert msg.startswith("e2e_grpo_vs_trl: speedup_vs_trl = 1.2, baseline 2 ")
    assert "-40.0%" in msg and "higher is better" in msg and "below 1.7 fails" in msg
    (reg,) = compare("k", {"mem": ratio(0.2, "lower")}, {"mem": ratio(0.1, "lower")})
    assert "mem = 0.2, baseline 0.1" in reg.message() and "above 0.1176 fails" in reg.message()


# --------------------------------------------------------------------------- baseline files


def check(tmp_path, measured, **kw):
    return check_baseline("bench", "cpu", measured, baseline_dir=tmp_path, provenance=PROVENANCE, **kw)


def stored(tmp_path):
    return json.loads((tmp_path / "bench.cpu.json").read_text())


def test_missing_baseline_is_created_and_passes(tmp_path):
    result = check(tmp_path, {"speedup": ratio(2.0)})
    assert result.status == "created" and result.recorded == ["speedup"] and not result.regressions
    assert result.baseline_path == tmp_path / "bench.cpu.json"
    data = stored(tmp_path)
    assert data["benchmark"] == "bench" and data["hardware"] == "cpu"
    assert data["ratios"] == {"speedup": {**ratio(2.0), **PROVENANCE}}
    assert "no baseline yet: recorded" in result.lines()[0]


def test_normal_run_checks_and_never_overwrites(tmp_path):
    check(tmp_path, {"speedup": ratio(2.0)})
    before = stored(tmp_path)
    better = check(tmp_path, {"speedup": ratio(2.4)})
    assert better.status == "passed" and better.recorded == []
    assert "baseline 2 (+20.0%) ok" in better.lines()[0]
    worse = check(tmp_path, {"speedup": ratio(1.0)})
    assert worse.status == "failed" and [r.ratio for r in worse.regressions] == ["speedup"]
    assert "REGRESSED" in worse.lines()[0]
    message = worse.failure_message()
    assert "speedup = 1, baseline 2" in message and "--update-baseline" in message and "bench.cpu.json" in message
    assert stored(tmp_path) == before


def test_new_ratios_are_recorded_unless_the_run_regressed(tmp_path):
    check(tmp_path, {"a": ratio(2.0)})
    failed = check(tmp_path, {"a": ratio(1.0), "b": ratio(5.0)})
    assert failed.status == "failed" and "b" not in stored(tmp_path)["ratios"]
    passed = check(tmp_path, {"a": ratio(2.0), "b": ratio(5.0)})
    assert passed.status == "passed" and passed.recorded == ["b"]
    assert stored(tmp_path)["ratios"]["b"]["value"] == 5.0
    assert stored(tmp_path)["ratios"]["a"]["value"] == 2.0


def test_ratios_no_longer_measured_are_reported_not_failed(tmp_path):
    check(tmp_path, {"a": ratio(2.0), "gone": ratio(3.0)})
    result = check(tmp_path, {"a": ratio(2.0)})
    assert result.status == "passed" and result.not_measured == ["gone"]
    assert any("gone is in the baseline but was not measured" in line for line in result.lines())


def test_update_rewrites_the_baseline_even_on_a_drop(tmp_path):
    check(tmp_path, {"a": ratio(2.0), "gone": ratio(3.0)})
    result = check(tmp_path, {"a": ratio(1.0)}, update=True)
    assert result.status == "updated" and not result.regressions
    assert stored(tmp_path)["ratios"] == {"a": {**ratio(1.0), **PROVENANCE}}
    assert check(tmp_path, {"a": ratio(0.9)}).status == "passed"


def test_hardware_classes_have_separate_baselines(tmp_path):
    check(tmp_path, {"a": ratio(2.0)})
    gpu = check_baseline("bench", "h100", {"a": ratio(10.0)}, baseline_dir=tmp_path, provenance=PROVENANCE)
    assert gpu.status == "created"
    assert check(tmp_path, {"a": ratio(1.0)}).status == "failed"


def test_committed_baselines_are_well_formed():
    for path in sorted((BENCHMARKS / "results" / "baselines").glob("*.json")):
        data = json.loads(path.read_text())
        assert path.name == f"{data['benchmark']}.{data['hardware']}.json"
        for name, entry in data["ratios"].items():
            assert entry["better"] in ("higher", "lower"), (path.name, name)
            assert math.isfinite(entry["value"]) and entry["value"] > 0, (path.name, name)


def test_update_baseline_is_a_benchmarks_option():
    out = subprocess.run(
        [sys.executable, "-m", "pytest", str(BENCHMARKS), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--update-baseline" in out
