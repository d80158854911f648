"""The veRL-signature GAE of ``orz_fast.integrations.verl`` against veRL's own, at 8,192 x 8,192.

veRL computes GAE over padded [B, T] responses with a loop over the T positions, each step a few
vectorised ops across the batch. ``orz_fast.integrations.verl.compute_gae_advantage_return`` takes
the same arguments, packs the responses with scatter / gather and calls ``orz_fast.ops.gae``
(Triton on CUDA, the vectorised torch path on CPU). When veRL imports (as in ``make
test-frameworks``' ``.venv-frameworks``), its function is the baseline; otherwise (``.venv`` does not
install veRL, whose transformers pin is older) the baseline is a per-position loop with veRL's
semantics, written here. Both outputs are checked against each other, then timed
in the same process; the result is the ratio, with GB/s against a device copy of the same bytes.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from harness import median_time, write_result

from orz_fast.integrations.verl import compute_gae_advantage_return

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
B = T = 8192


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _verl_gae():
    try:
        return importlib.import_module("verl.trainer.ppo.core_algos").compute_gae_advantage_return, "verl"
    except Exception as exc:  # noqa: BLE001 (any import-time failure means veRL is unusable here)
        return gae_position_loop, f"per-position loop with veRL's semantics (veRL unavailable: {exc})"


def gae_position_loop(token_level_rewards, values, response_mask, gamma, lam):
    """veRL's algorithm: walk the positions from the end, updating all rows at once; masked-out
    positions leave the next value and the running advantage unchanged; whiten over the mask."""
    m = response_mask.to(values.dtype)
    next_value = torch.zeros(values.shape[0], dtype=values.dtype, device=values.device)
    running = torch.zeros_like(next_value)
    columns = []
    for t in range(values.shape[1] - 1, -1, -1):
        delta = token_level_rewards[:, t] + gamma * next_value - values[:, t]
        step = m[:, t]
        running = (delta + gamma * lam * running) * step + (1 - step) * running
        next_value = values[:, t] * step + (1 - step) * next_value
        columns.append(running)
    advantages = torch.stack(columns[::-1], dim=1)
    returns = advantages + values
    n = m.sum()
    mean = (advantages * m).sum() / (n + 1e-8)
    var = (((advantages - mean) ** 2) * m).sum() / (n + 1e-8) * n / (n - 1)
    return (advantages - mean) * torch.rsqrt(var + 1e-8), returns


def _batch():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.int64)
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), lengths - 1] = (torch.rand(B, generator=gen) < 0.5).float()  # ORZ: 0/1 at the end
    values = torch.randn(B, T, generator=gen) * 0.1
    return rewards.to(DEVICE), values.to(DEVICE), mask.to(DEVICE)


def _peak_mib(fn) -> float | None:
    if not CUDA:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95)])
def test_bench_verl_gae(gamma, lam):
    rewards, values, mask = _batch()
    baseline, baseline_name = _verl_gae()
    ours_out = compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    ref_out = baseline(rewards, values, mask, gamma, lam)
    max_err = max((a.double() - b.double()).abs().max().item() for a, b in zip(ours_out, ref_out, strict=True))
    del ours_out, ref_out

    t_ours = median_time(lambda: compute_gae_advantage_return(rewards, values, mask, gamma, lam), warmup=1, reps=3)
    t_base = median_time(lambda: baseline(rewards, values, mask, gamma, lam), warmup=0, reps=1)
    nbytes = sum(x.numel() * x.element_size() for x in (rewards, values, mask)) + 2 * rewards.numel() * 4
    buffer = torch.empty(nbytes // 2, dtype=torch.uint8, device=DEVICE)
    t_copy = median_time(buffer.clone, warmup=1, reps=3)  # reads and writes nbytes / 2 each

    figures = {
        "shape": [B, T],
        "gamma": gamma,
        "lam": lam,
        "response_tokens": int(mask.sum()),
        "bytes": nbytes,
        "baseline": baseline_name,
        "max_abs_diff_vs_baseline": max_err,
        "orz_ms": t_ours * 1e3,
        "orz_GB/s": nbytes / t_ours / 1e9,
        "orz_pct_of_copy": 100 * t_copy / t_ours,
        "orz_peak_mib": _peak_mib(lambda: compute_gae_advantage_return(rewards, values, mask, gamma, lam)),
        "baseline_ms": t_base * 1e3,
        "speedup_vs_baseline": t_base / t_ours,
        "copy_ms": t_copy * 1e3,
    }
    path = write_result(
        f"integrations_verl_gae_g{gamma}_l{lam}",
        figures,
        ratios={"speedup_vs_baseline": "higher", "orz_pct_of_copy": "higher"},
    )
    print(f"\nverl GAE {B}x{T} gamma={gamma} lam={lam} -> {path}")
    for k, v in figures.items():
        print(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")
    assert max_err < 1e-3, f"orz_fast and {baseline_name} disagree by {max_err}"
    assert t_base / t_ours > 1, f"orz_fast GAE is {t_ours / t_base:.2f}x slower than {baseline_name}"
