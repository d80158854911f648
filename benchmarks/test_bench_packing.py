"""Packing and DP balancing at RL-rollout scale: C++ vs the pure-Python reference.

Targets (issue: foundation): at 65,536 samples with RL-like lengths (long
tail up to 8k), C++ ``balance`` >= 20x the Python reference, and first-fit
decreasing into 16k-token bins fills >= 95% of the bins' capacity.
"""

import numpy as np
from harness import median_time, write_result

from orz_fast import packing

N_SAMPLES = 65_536
BIN_TOKENS = 16_384
DP_RANKS = 8


def rl_lengths(n: int, seed: int = 0, cap: int = 8000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lens = np.clip(rng.lognormal(mean=6.5, sigma=0.9, size=n), 1, cap).astype(np.int64)
    lens[rng.random(n) < 0.05] = cap  # truncated responses pile up at the cap
    return lens


def test_packing_speed_and_fill():
    lens = rl_lengths(N_SAMPLES)

    t_cpp = median_time(lambda: packing.balance(lens, DP_RANKS), warmup=1, reps=5)
    t_py = median_time(lambda: packing.balance_ref(lens, DP_RANKS), warmup=0, reps=1)
    t_cpp_eq = median_time(lambda: packing.balance(lens, DP_RANKS, equal_size=True), warmup=1, reps=5)
    t_py_eq = median_time(lambda: packing.balance_ref(lens, DP_RANKS, equal_size=True), warmup=0, reps=1)
    groups = packing.balance(lens, DP_RANKS)
    w = packing.workloads(lens)
    loads = np.array([w[g].sum() for g in groups])
    imbalance = loads.max() / loads.mean() - 1

    t_pack = median_time(lambda: packing.pack_by_token_budget(lens, BIN_TOKENS), warmup=1, reps=5)
    bins = packing.pack_by_token_budget(lens, BIN_TOKENS)
    fill = lens.sum() / (len(bins) * BIN_TOKENS)

    figures = {
        "samples": N_SAMPLES,
        "tokens": int(lens.sum()),
        "max_length": int(lens.max()),
        "balance_k": DP_RANKS,
        "balance_cpp_ms": t_cpp * 1e3,
        "balance_python_ms": t_py * 1e3,
        "balance_speedup": t_py / t_cpp,
        "balance_equal_size_cpp_ms": t_cpp_eq * 1e3,
        "balance_equal_size_python_ms": t_py_eq * 1e3,
        "balance_equal_size_speedup": t_py_eq / t_cpp_eq,
        "balance_max_over_mean_minus_1": float(imbalance),
        "pack_bin_tokens": BIN_TOKENS,
        "pack_cpp_ms": t_pack * 1e3,
        "pack_bins": len(bins),
        "pack_fill": float(fill),
    }
    ratios = {"balance_speedup": "higher", "balance_equal_size_speedup": "higher", "pack_fill": "higher"}
    path = write_result("packing", figures, ratios=ratios)
    print(f"\npacking -> {path}")
    for k, v in figures.items():
        print(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")
    assert t_py / t_cpp >= 20, f"C++ balance only {t_py / t_cpp:.1f}x the Python reference"
    assert fill >= 0.95, f"16k bins filled to {fill:.3f}"
