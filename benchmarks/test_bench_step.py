"""One ORZ-sized PPO step on the host: 8,192 responses, about 25M tokens, on 2 gloo processes.

Everything the step does runs except model math and the reward's math checks (see
``step_worker.py``: a stand-in engine, the real models without decoder layers, a stand-in
scorer). Figures:

- host seconds per step: the step's CPU seconds minus those of the stand-ins (the engine drawing
  random tokens; the models' forward, log-prob and loss ops and backward), the slowest rank,
  median over the timed steps (the first step is a warm-up). CPU time, because on a shared machine
  a process's wall time counts the time it waited for a core; with 2 processes on 2 otherwise idle
  cores the two agree (the wall-clock figure is reported beside it);
- peak RSS over the step's tensor bytes, per rank: the growth of the resident set from before the
  first step to its peak, over the bytes of the rank's share of the step's tensors at their
  natural precision (int64 token ids for prompts and responses, and four fp32 numbers per response
  token: sampling log-prob, value, advantage, return); the raw peak is reported beside it.

The processes run with ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch backs large CPU tensors with transparent huge
pages): here CPU tensors stand in for device memory, and without it every fresh 50-100 MB tensor pays
~25k page faults that a GPU's caching allocator never does.

Targets (2 cores): at most 2 s of host time per step, peak RSS growth at most 3x the tensor bytes.
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from harness import write_result

WORKER = Path(__file__).with_name("step_worker.py")
STEPS = 3
HOST_SECONDS_TARGET = 2.0
RSS_RATIO_TARGET = 3.0


def test_orz_sized_step_on_the_host(tmp_path):
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "TMPDIR") if k in os.environ}
    env = {**keep, "OMP_NUM_THREADS": "1", "THP_MEM_ALLOC_ENABLE": "1"}
    cmd = [sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    out = subprocess.run(
        [*cmd, str(WORKER), str(tmp_path / "run"), "--steps", str(STEPS)],
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    world = result["world_size"]
    response_tokens, prompt_tokens = result["response_tokens_per_step"], result["prompt_tokens_per_step"]
    tensor_bytes = (response_tokens * (8 + 4 * 4) + prompt_tokens * 8) / world
    timed = range(1, STEPS)

    def slowest(key):
        return [max(key(r["steps"][s]) for r in result["ranks"]) for s in timed]

    host = slowest(lambda s: s["cpu_s"] - s["engine_stand_in_cpu_s"] - s["model_math_cpu_s"])
    host_wall = slowest(lambda s: s["wall_s"] - s["engine_stand_in_s"] - s["model_math_s"])
    phases = {k: statistics.median(slowest(lambda s, k=k: s[k])) for k in result["ranks"][0]["steps"][0]}
    growth = max(r["peak_rss"] - r["baseline_rss"] for r in result["ranks"])
    peak = max(r["peak_rss"] for r in result["ranks"])
    figures = {
        "processes": world,
        "samples_per_step": result["samples_per_step"],
        "response_tokens_per_step": response_tokens,
        "prompt_tokens_per_step": prompt_tokens,
        "engine_output": result["engine_output"],
        "host_s_per_step": statistics.median(host),
        "host_s_per_step_all": host,
        "host_wall_s_per_step": statistics.median(host_wall),
        "host_wall_s_per_step_all": host_wall,
        "phases_s": phases,
        "tensor_bytes_per_rank": tensor_bytes,
        "peak_rss_growth_bytes": growth,
        "peak_rss_bytes": peak,
        "baseline_rss_bytes": max(r["baseline_rss"] for r in result["ranks"]),
        "peak_rss_growth_over_tensor_bytes": growth / tensor_bytes,
        "peak_rss_over_tensor_bytes": peak / tensor_bytes,
    }
    path = write_result("step_host", figures, ratios={"peak_rss_growth_over_tensor_bytes": "lower"})
    print(f"\nstep_host -> {path}")
    for k, v in figures.items():
        print(f"  {k}: {v}")
    assert figures["host_s_per_step"] <= HOST_SECONDS_TARGET, figures["host_s_per_step"]
    assert figures["peak_rss_growth_over_tensor_bytes"] <= RSS_RATIO_TARGET, figures
