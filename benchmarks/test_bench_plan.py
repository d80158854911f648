"""plan's predicted peak memory against one real PPO step measured on this machine (CPU: peak RSS).

A measurement, so it lives with the benchmarks: the subprocess's resident-set peak depends on what
else the machine runs, which made it unreliable inside the full unit-test suite.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from orz_fast.plan import plan

WORKER = Path(__file__).with_name("plan_peak_worker.py")

# A model whose weights, optimizer states and activations all weigh in (fp32 on CPU), small enough
# for a PPO step in seconds; greedy sampling from random weights runs every response to max_tokens,
# and every prompt of the tiny preset's task is 16 tokens, so the planner's worst case is the real case.
MEASURED_ARCH = {
    "model_type": "qwen2",
    "vocab_size": 128,
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
MEASURED_OVERRIDES = [
    "model.arch=" + json.dumps(MEASURED_ARCH),
    "rollout.prompts_per_step=4",
    "rollout.samples_per_prompt=8",
    "rollout.max_tokens=32",
    "rollout.temperature=0",
    "data.max_prompt_tokens=16",
]


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
