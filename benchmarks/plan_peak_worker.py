"""Measures the peak memory of one real PPO step on CPU, for ``benchmarks/test_bench_plan.py``.

``python benchmarks/plan_peak_worker.py OUT_DIR [a.b=VALUE ...]`` builds the ``tiny`` preset's
trainer with the overrides, runs one ``train_step`` and prints one JSON line with
``baseline_bytes``, ``peak_bytes``, ``response_length_mean`` and ``truncated_fraction``.
The baseline is the resident set after every import, before any model is built; the
peak is the process's high-water resident set (``ru_maxrss``) after the step. Run it with
``MALLOC_MMAP_THRESHOLD_`` set low, so freed tensors go back to the OS and the resident set
tracks live tensors.
"""

import json
import os
import resource
import sys
import warnings

import torch

from orz_fast.config import resolve
from orz_fast.ppo.trainer import Trainer


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    out_dir, overrides = sys.argv[1], sys.argv[2:]
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    cfg = resolve("tiny", overrides=["logging.progress=false", "reward.workers=1", *overrides])
    baseline = resident_bytes()
    trainer = Trainer(cfg, out_dir)
    try:
        metrics = trainer.train_step()
    finally:
        trainer.scorer.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    lengths = {k: metrics[k] for k in ("response_length_mean", "truncated_fraction")}
    print(json.dumps({"baseline_bytes": baseline, "peak_bytes": peak, **lengths}))


if __name__ == "__main__":
    main()
