"""The CPU side of ``make gpu-check``: what it packs (tools/gpu_wheels.py) and how it runs (tools/gpu_check.py).

The check itself needs a GPU; here: its test and benchmark selections name tests that exist, the
wheels cover what the GPU machine lacks and fit what travels with the tree, and the step runner
reports failures, kills a step at its timeout (even one hung mid-line) and writes its summary.
"""

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"orz_fast_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


gpu_check = load_tool("gpu_check")
gpu_wheels = load_tool("gpu_wheels")


@pytest.mark.parametrize("step", [s for s in gpu_check.STEPS if s.pytest], ids=lambda s: s.name)
def test_pytest_steps_select_existing_tests(step):
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *step.args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert collected, proc.stdout[-3000:]
    if step.name == "GPU tests":  # what the README promises the GPU tests check
        names = {line.split("::")[1].split("[")[0] for line in collected}
        for part in ("gae", "loss_kernels", "nonfinite", "linear_logprobs", "linear_ppo_loss", "decoder", "greedy"):
            assert any(part in n for n in names), (part, sorted(names))
        assert any("ppo_step" in n and "offload" in n for n in names) and any("ipc_push" in n for n in names)


def test_wheels_cover_the_requirements_the_gpu_image_lacks():
    needed = gpu_wheels.needed()
    assert {"megatron-core", "math-verify", "latex2sympy2-extended", "antlr4-python3-runtime"} <= set(needed)
    for name, version in needed.items():
        assert gpu_wheels.canonical(name) not in gpu_wheels.GPU_IMAGE_PACKAGES
        assert version == importlib.metadata.version(name)
    # what the image has is not carried
    assert not {"torch", "triton", "transformers", "numpy", "sympy", "safetensors"} & set(needed)


_OFFLINE = ("Failed to establish a new connection", "Temporary failure in name resolution", "Network is unreachable")


def test_wheels_download_and_fit_within_the_travel_limit(tmp_path):
    dest = tmp_path / "wheels"
    try:
        assert gpu_wheels.main(["--dest", str(dest)]) == 0
    except RuntimeError as exc:
        if any(s in str(exc) for s in _OFFLINE):
            pytest.skip(f"no package index reachable: {str(exc)[:200]}")
        raise
    manifest = json.loads((dest / "manifest.json").read_text())
    assert set(manifest["wheels"]) == set(gpu_wheels.needed()) | set(gpu_wheels.OPTIONAL)
    assert sorted(p.name for p in dest.glob("*.whl")) == sorted(w["file"] for w in manifest["wheels"].values())
    assert manifest["bytes"] <= gpu_wheels.WHEELS_BUDGET_BYTES
    assert manifest["tree_bytes"] + manifest["bytes"] <= gpu_wheels.TRAVEL_LIMIT_BYTES
    megatron = manifest["wheels"]["megatron-core"]["file"]
    assert "cp312" in megatron or "py3-none-any" in megatron, megatron


def test_runner_reports_failures_timeouts_and_pytest_counts(tmp_path, monkeypatch):
    tiny = tmp_path / "tiny_tests"
    tiny.mkdir()
    (tiny / "test_tiny.py").write_text(
        "import pytest\n\ndef test_ok():\n    pass\n\n@pytest.mark.skip(reason='x')\ndef test_skipped():\n    pass\n"
    )
    py = sys.executable
    steps = [
        gpu_check.Step("environment", [py, "-c", "print('GPU: Fake GPU, 80 GiB')"], 30),
        gpu_check.Step("fails", [py, "-c", "import sys; print('boom'); sys.exit(3)"], 30),
        gpu_check.Step(
            "hangs mid-line",
            [py, "-c", "import sys, time; sys.stdout.write('..'); sys.stdout.flush(); time.sleep(60)"],
            3,
        ),
        gpu_check.Step("tiny tests", [str(tiny / "test_tiny.py")], 120, pytest=True),
    ]
    monkeypatch.setattr(gpu_check, "STEPS", steps)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "placeholder-0-py3-none-any.whl").write_bytes(b"")
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out), "--wheels", str(wheels), "--budget", "200"]) == 1
    report = json.loads((out / "summary.json").read_text())
    by_name = {s["name"]: s for s in report["steps"]}
    assert by_name["environment"]["status"] == "ok"
    assert by_name["fails"]["status"] == "failed (3)"
    assert by_name["hangs mid-line"]["status"] == "timeout" and by_name["hangs mid-line"]["seconds"] < 15
    assert by_name["tiny tests"]["status"] == "ok"
    assert by_name["tiny tests"]["tests"] == {"passed": 1, "failed": 0, "errors": 0, "skipped": 1}
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("GPU check on Fake GPU, 80 GiB") and "timeout" in summary
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        names = tar.getnames()
    assert "runs/gpu-check/logs/fails.log" in names and "runs/gpu-check/logs/tiny-tests.xml" in names


def test_runner_stops_after_the_budget(tmp_path, monkeypatch):
    py = sys.executable
    steps = [
        gpu_check.Step("environment", [py, "-c", "import time; time.sleep(60)"], 60),
        gpu_check.Step("never reached", [py, "-c", "pass"], 60),
    ]
    monkeypatch.setattr(gpu_check, "STEPS", steps)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "placeholder-0-py3-none-any.whl").write_bytes(b"")
    assert gpu_check.main(["--out", str(tmp_path / "out"), "--wheels", str(wheels), "--budget", "3"]) == 1
    report = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [s["status"] for s in report["steps"]] == ["timeout"]  # no GPU environment: nothing else runs


def test_summary_table_shows_headline_figures_and_ratios():
    results = {
        "kernels_gae": {"gamma1.0_lam1.0": {"triton": {"pct_of_floor": 81.25}}, "ratios": {"x/pct_of_floor": 81.25}},
        "model_fwd_bwd": {"mfu": 0.41, "speedup_vs_transformers": 1.3},
        "rollout_qwen2.5-0.5b-shape": {"engine_tokens_per_s": 41234.5},
    }
    steps = [gpu_check.StepResult("GPU tests", "ok", 12.0, {"passed": 30, "failed": 0, "errors": 0, "skipped": 2})]
    table = gpu_check.summary_table(steps, results, "NVIDIA H100 80GB HBM3")
    assert "GPU tests" in table and "30 passed, 2 skipped" in table
    assert "GAE % of copy bandwidth (16M tokens)" in table and "81.25" in table
    assert "decoder fwd+bwd MFU (1.5B shape)" in table and "0.41" in table
    assert "decode tokens/s (0.5B, 256 seqs)" in table and "41,234" in table
    assert "kernels_gae: x/pct_of_floor = 81.25" in table
    assert gpu_check.junit_counts(Path("/nonexistent.xml")) == {}
