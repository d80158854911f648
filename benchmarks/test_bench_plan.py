"""plan's predicted peak memory against one real PPO step measured on this machine (CPU: peak RSS).

A measurement, so it lives with the benchmarks: the subprocess's resident-set peak depends on what
else the machine runs, which made it unreliable inside the full unit-test suite.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_plan import MEASURED_OVERRIDES  # noqa: E402

from orz_fast.plan import plan  # noqa: E402

WORKER = Path(__file__).resolve().parents[1] / "tests" / "plan_peak_worker.py"


def test_predicted_peak_matches_a_measured_cpu_step(tmp_path):
    # A clean environment: what earlier tests left in os.environ must not change the measured process.
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "TMPDIR") if k in os.environ}
    env = {**keep, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-W", "ignore", str(WORKER), str(tmp_path / "run"), *MEASURED_OVERRIDES],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["truncated_fraction"] == 1.0  # the worst-case lengths the planner assumes
    measured = result["peak_bytes"] - result["baseline_bytes"]
    predicted = plan("tiny", 1, device="cpu", overrides=MEASURED_OVERRIDES).layouts[0].peak
    assert abs(predicted - measured) <= 0.2 * measured, (predicted, measured)
