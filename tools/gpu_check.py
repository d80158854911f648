"""The short GPU check: ``make gpu-check`` on one H100/H200 with no network, in at most 8 minutes.

    python3 tools/gpu_check.py [--out runs/gpu-check] [--wheels .gpu-wheels] [--budget 480]

Steps, in order, each under its own timeout and all under ``--budget`` seconds (a step gets at
most what is left; one that fails or times out is reported and the next still runs):

1. environment: the GPU, torch, Triton and transformers versions (fails without CUDA);
2. install the wheels ``make gpu-wheels`` packed into ``.gpu-wheels/`` (``pip --no-index --target``);
3. build the C++ extension ``orz_fast._C`` in place;
4. the GPU tests (``tests/test_gpu.py``: kernels against float64, bf16 decoder against
   transformers, native-engine greedy, one PPO step with optimizer offload; and the CUDA-IPC
   weight push);
5. the headline benchmarks: log-probs against the GEMM floor and Liger-Kernel, GAE and losses
   against copy bandwidth; decoder forward+backward MFU; decode tokens/s against transformers.

The benchmarks write ``benchmarks/results/<name>.<gpu>.json`` (and a first baseline for the
regression guard under ``results/baselines/``). Written to ``--out``: ``summary.txt`` (the table
printed last), ``summary.json`` and ``gpu-check.tar.gz`` holding the result and baseline files of
this run, every step's log and the pytest JUnit reports, to unpack at the repository root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SITE = Path("/tmp/orz_fast_gpu_site")
"""Where the carried wheels are installed (on the PYTHONPATH of every later step)."""

ENVIRONMENT_PROBE = """
import sys, torch, triton, transformers
assert torch.cuda.is_available(), "no CUDA device visible: the GPU check runs on a GPU machine"
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, "
      f"transformers {transformers.__version__}")
"""


@dataclass
class Step:
    name: str
    args: list[str]
    """The command; for pytest steps, the arguments after ``python -m pytest``."""
    timeout_s: float
    pytest: bool = False


def python() -> str:
    return sys.executable


STEPS = [
    Step("environment", [python(), "-c", ENVIRONMENT_PROBE], 60),
    Step(
        "install wheels",
        [python(), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
        + ["--upgrade", "--target", str(SITE)],
        60,
    ),
    Step("build C++ extension", [python(), "setup.py", "-q", "build_ext", "--inplace"], 120),
    Step(
        "GPU tests",
        ["tests/test_gpu.py", "tests/test_weight_sync.py::test_ipc_push_between_two_processes_loads_every_tensor"],
        180,
        pytest=True,
    ),
    Step(
        "bench: kernels",
        ["benchmarks/test_bench_kernels.py", "-k", "not test_bench_linear_logprobs or 3584"],
        170,
        pytest=True,
    ),
    Step("bench: decoder MFU", ["benchmarks/test_bench_model.py"], 70, pytest=True),
    Step(
        "bench: decode",
        ["benchmarks/test_bench_rollout.py::test_rollout_gpu_vs_transformers[qwen2.5-0.5b-shape]"],
        120,
        pytest=True,
    ),
]

HEADLINES = [
    # (result file stem, path in its JSON, label)
    ("kernels_linear_logprobs_h3584", "fwd_bwd_over_gemm_floor", "log-probs fwd+bwd / GEMM floor (H 3584)"),
    ("kernels_linear_logprobs_h3584", "forward_backward/triton/ms", "log-probs fwd+bwd ms"),
    ("kernels_linear_logprobs_h3584", "forward_backward/liger_fused_linear_cross_entropy/ms", "Liger FLCE fwd+bwd ms"),
    ("kernels_linear_logprobs_h3584", "peak_memory_fraction_of_eager", "log-probs peak memory / eager"),
    ("kernels_gae", "gamma1.0_lam1.0/triton/pct_of_floor", "GAE % of copy bandwidth (16M tokens)"),
    ("kernels_gae", "per_token_python_loop/speedup", "GAE vs per-token Python loop"),
    ("kernels_ppo_policy_loss", "forward_backward/triton/pct_of_floor", "policy loss fwd+bwd % of copy"),
    ("kernels_ppo_value_loss", "forward_backward/triton/pct_of_floor", "value loss fwd+bwd % of copy"),
    ("model_fwd_bwd", "mfu", "decoder fwd+bwd MFU (1.5B shape)"),
    ("model_fwd_bwd", "speedup_vs_transformers", "decoder fwd+bwd vs transformers"),
    ("rollout_qwen2.5-0.5b-shape", "engine_tokens_per_s", "decode tokens/s (0.5B, 256 seqs)"),
    ("rollout_qwen2.5-0.5b-shape", "ratio", "decode vs transformers generate"),
    ("rollout_qwen2.5-0.5b-shape", "roofline_fraction", "decode fraction of roofline"),
]


@dataclass
class StepResult:
    name: str
    status: str = "not run"
    """ok, failed (exit code), timeout, or not run (no time left)."""
    seconds: float = 0.0
    tests: dict[str, int] = field(default_factory=dict)
    """pytest steps: passed, failed, errors, skipped."""
    log: str = ""


def step_command(step: Step, out: Path, wheels: Path) -> list[str]:
    if step.pytest:
        junit = out / "logs" / f"{slug(step.name)}.xml"
        return [python(), "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}", *step.args]
    if step.name == "install wheels":
        return [*step.args, *sorted(str(p) for p in wheels.glob("*.whl"))]
    return step.args


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def run_step(step: Step, command: list[str], timeout_s: float, log_path: Path, env: dict) -> StepResult:
    """Run ``command`` in its own process group, output to ``log_path`` (and echoed); kill the group at
    ``timeout_s``. Output is read in chunks, so a step that hangs mid-line (pytest's dots) still times out."""
    result = StepResult(step.name, log=f"{log_path.parent.name}/{log_path.name}")
    if timeout_s <= 1:
        return result
    start = time.monotonic()
    deadline = start + timeout_s
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not selector.select(timeout=min(1.0, max(0.0, deadline - time.monotonic()))):
                    if proc.poll() is not None:
                        break  # exited; a process it started may still hold the pipe open
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                log.write(chunk)
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
        try:
            code = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            result.status = "ok" if code == 0 else f"failed ({code})"
        except subprocess.TimeoutExpired:
            result.status = "timeout"
        # whatever is left of the step's process group (workers it started) goes, freeing the GPU
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    result.seconds = time.monotonic() - start
    return result


def junit_counts(path: Path) -> dict[str, int]:
    """passed / failed / errors / skipped from a pytest JUnit XML report ({} when absent)."""
    if not path.is_file():
        return {}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    total, failed, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    return {"passed": total - failed - errors - skipped, "failed": failed, "errors": errors, "skipped": skipped}


def figure(payload: dict, path: str):
    value = payload
    for key in path.split("/"):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def headline_rows(results: dict[str, dict]) -> list[tuple[str, str]]:
    """(label, value) of each headline figure found in this run's result files."""
    rows = []
    for stem, path, label in HEADLINES:
        value = figure(results.get(stem, {}), path)
        if isinstance(value, int | float):
            rows.append((label, f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"))
        elif stem in results:
            rows.append((label, "-"))
    return rows


def summary_table(steps: list[StepResult], results: dict[str, dict], device: str) -> str:
    lines = [f"GPU check on {device}", "", f"{'step':24} {'status':12} {'s':>6}  tests"]
    for r in steps:
        tests = ", ".join(f"{v} {k}" for k, v in r.tests.items() if v) if r.tests else ""
        lines.append(f"{r.name:24} {r.status:12} {r.seconds:6.1f}  {tests}")
    rows = headline_rows(results)
    if rows:
        lines += ["", f"{'headline figure':44} value"]
        lines += [f"{label:44} {value}" for label, value in rows]
    ratios = [(stem, k, v) for stem, p in sorted(results.items()) for k, v in p.get("ratios", {}).items()]
    if ratios:
        lines += ["", "guarded ratios (benchmarks/results/*.json)"]
        lines += [f"  {stem}: {k} = {v:.4g}" for stem, k, v in ratios if isinstance(v, int | float)]
    return "\n".join(lines)


def collect_results(since: float) -> dict[str, dict]:
    """Result files the benchmarks wrote during this run, by benchmark name."""
    out = {}
    for path in sorted((REPO / "benchmarks" / "results").glob("*.json")):
        if path.stat().st_mtime >= since:
            payload = json.loads(path.read_text())
            out[payload.get("benchmark", path.stem)] = payload
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu-check", help="summary and archive folder")
    parser.add_argument("--wheels", type=Path, default=REPO / ".gpu-wheels", help="wheels from make gpu-wheels")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all steps together (default 480)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    if not any(args.wheels.glob("*.whl")):
        print(f"FAIL: no wheels in {args.wheels}: run `make gpu-wheels` on a machine with network first")
        return 2
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SITE), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("TRITON_INTERPRET", None)
    start_wall, start = time.time(), time.monotonic()
    done: list[StepResult] = []
    for step in STEPS:
        left = args.budget - (time.monotonic() - start)
        print(f"\n== {step.name} (timeout {min(step.timeout_s, left):.0f} s)", flush=True)
        log_path = out / "logs" / f"{slug(step.name)}.log"
        result = run_step(step, step_command(step, out, args.wheels), min(step.timeout_s, left), log_path, env)
        if step.pytest:
            result.tests = junit_counts(out / "logs" / f"{slug(step.name)}.xml")
        done.append(result)
        if step.name == "environment" and result.status != "ok":
            break  # no GPU, or no torch: nothing else can run
    results = collect_results(start_wall)
    env_log = out / "logs" / "environment.log"
    lines = env_log.read_text(errors="replace").splitlines() if env_log.is_file() else []
    device = next((line.removeprefix("GPU: ") for line in lines if line.startswith("GPU: ")), "no GPU found")
    table = summary_table(done, results, device)
    (out / "summary.txt").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps({"steps": [asdict(r) for r in done], "results": results}, indent=1))
    with tarfile.open(out / "gpu-check.tar.gz", "w:gz") as tar:
        for path in sorted((REPO / "benchmarks" / "results").rglob("*.json")):
            if path.stat().st_mtime >= start_wall:
                tar.add(path, arcname=str(path.relative_to(REPO)))
        tar.add(out / "logs", arcname="runs/gpu-check/logs")
    print("\n" + table)
    return 0 if done and all(r.status == "ok" for r in done) and len(done) == len(STEPS) else 1


if __name__ == "__main__":
    sys.exit(main())
