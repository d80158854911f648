"""orz_fast.ops kernels against torch eager, torch.compile and Liger-Kernel, against the physical floor.

On a GPU (issue 3 sizes): log-probs T=16,384, H in {3584, 5120}, V=152,064 bf16; GAE 16M tokens
in 8,192 segments; losses 16M tokens. Each op reports median ms (Triton's ``do_bench``),
GB/s or TFLOP/s, % of the measured floor (the three bare bf16 GEMMs for log-probs; a device
copy of the same bytes for the others) and peak memory. Targets: log-probs fwd+bwd <= 1.25x the
GEMM floor with <= 1/8 of eager's peak memory; GAE and losses >= 70% of copy bandwidth; GAE >= 100x
the per-position Python loop that ORZ / OpenRLHF / veRL run.

On CPU the sizes are small and only the torch paths are timed (Triton's interpreter is not a
speed reference): the run checks the harness and writes ``results/kernels_*.cpu.json``, and
measures the vectorised CPU GAE against Python loops, which is meaningful anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from harness import median_time, write_result

from orz_fast import ops
from orz_fast.kernels.gae import gae_ref
from orz_fast.kernels.linear_logprobs import linear_logprobs_ref
from orz_fast.kernels.ppo_policy_loss import ppo_policy_loss_ref
from orz_fast.kernels.ppo_value_loss import ppo_value_loss_ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BACKENDS = ("triton", "torch") if CUDA else ("torch",)
OURS = BACKENDS[0]  # the orz_fast.ops path a benchmark's guarded ratios are taken from
LOOP_TOKENS = 2**20 if CUDA else 2**18


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def bench(fn: Callable[[], object]) -> float:
    """Median seconds of ``fn`` (Triton's do_bench on a GPU, the harness' median timer on CPU)."""
    if CUDA:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    return median_time(fn, warmup=1, reps=3)


def peak_bytes(fn: Callable[[], object]) -> int | None:
    """Peak device memory allocated by ``fn`` above what was allocated before (GPU only)."""
    if not CUDA:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def copy_seconds(nbytes: int) -> float:
    """Time of a device copy moving ``nbytes`` in all (half read, half written): the bandwidth floor."""
    src = torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return bench(lambda: dst.copy_(src))


def compiled(fn: Callable) -> Callable | None:
    """torch.compile'd ``fn`` on a GPU; None on CPU (inductor's C++ build is too slow for 2 cores)."""
    return torch.compile(fn) if CUDA else None


def run_variants(variants: dict[str, Callable[[], object] | None], floor_s: float, work: float, unit: str):
    """Time each variant; returns {name: {ms, <unit>, pct_of_floor, peak_mib}} (errors recorded, not raised)."""
    out = {}
    for name, fn in variants.items():
        if fn is None:
            continue
        try:
            t = bench(fn)
            peak = peak_bytes(fn)
        except Exception as exc:  # a baseline that fails to build (e.g. torch.compile) is reported, not fatal
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        out[name] = {
            "ms": t * 1e3,
            unit: work / t / 1e9 if unit == "GB/s" else work / t / 1e12,
            "pct_of_floor": 100 * floor_s / t,
            "peak_mib": None if peak is None else peak / 2**20,
        }
    return out


def report(name: str, figures: dict, ratios: dict[str, str]) -> None:
    path = write_result(name, figures, ratios=ratios)
    print(f"\n{name} -> {path}\n{json.dumps(figures, indent=1)}")
    assert json.loads(path.read_text())["benchmark"] == name


# --------------------------------------------------------------------------- GAE


def gae_padded_loop(rewards, values, cu_seqlens, gamma, lam):
    """The usual PPO-trainer GAE: pad to [N, L] and loop over the L positions from the end."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    n, length = lengths.numel(), int(lengths.max())
    pos = torch.arange(length, device=rewards.device)
    valid = pos[None, :] < lengths[:, None]
    idx = (cu_seqlens[:-1].long()[:, None] + pos[None, :]).clamp(max=rewards.numel() - 1)
    r = torch.where(valid, rewards[idx], 0.0)
    v = torch.where(valid, values[idx], 0.0)
    last = torch.zeros(n, device=rewards.device)
    out = []
    for t in reversed(range(length)):
        v_next = v[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        last = r[:, t] + gamma * v_next - v[:, t] + gamma * lam * last
        out.append(last)
    adv = torch.stack(out[::-1], dim=1)
    return adv[valid], (adv + v)[valid]


def test_bench_gae():
    n_seg, seg_len = (8192, 2048) if CUDA else (128, 2048)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(seg_len // 2, seg_len * 3 // 2 + 1, (n_seg,), generator=gen)
    T = int(lengths.sum())  # about n_seg * seg_len: 16M tokens on a GPU
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32).to(DEVICE)
    rewards = (torch.rand(T, generator=gen) < 1 / seg_len).float().to(DEVICE)
    values = torch.rand(T, generator=gen).to(DEVICE)
    nbytes = T * 4 * 4  # read rewards and values, write advantages and returns (fp32)
    floor = copy_seconds(nbytes)
    figures = {"tokens": T, "segments": n_seg, "bytes": nbytes, "copy_floor_ms": floor * 1e3}
    for gamma, lam in ((1.0, 1.0), (0.99, 0.95)):
        key = f"gamma{gamma}_lam{lam}"
        variants = {b: (lambda b=b, g=gamma, la=lam: ops.gae(rewards, values, cu, g, la, backend=b)) for b in BACKENDS}
        variants["padded_position_loop"] = lambda g=gamma, la=lam: gae_padded_loop(rewards, values, cu, g, la)
        res = run_variants(variants, floor, nbytes, "GB/s")
        best = res["triton" if CUDA else "torch"]["ms"]
        res["speedup_vs_padded_position_loop"] = res["padded_position_loop"]["ms"] / best
        figures[key] = res
    # the pure per-token Python loop, on the leading segments that fit in LOOP_TOKENS
    cu_small = cu[cu <= LOOP_TOKENS]
    t_small = int(cu_small[-1])
    r_s, v_s = rewards[:t_small], values[:t_small]
    t_loop = median_time(lambda: gae_ref(r_s, v_s, cu_small, 0.99, 0.95), warmup=0, reps=1)
    t_vec = bench(lambda: ops.gae(r_s, v_s, cu_small, 0.99, 0.95))
    figures["per_token_python_loop"] = {
        "tokens": t_small,
        "python_loop_ms": t_loop * 1e3,
        "ops_gae_ms": t_vec * 1e3,
        "speedup": t_loop / t_vec,
    }
    ratios = {"per_token_python_loop/speedup": "higher"}
    for key in ("gamma1.0_lam1.0", "gamma0.99_lam0.95"):
        ratios |= {f"{key}/speedup_vs_padded_position_loop": "higher", f"{key}/{OURS}/pct_of_floor": "higher"}
    report("kernels_gae", figures, ratios)
    assert figures["per_token_python_loop"]["speedup"] > 1


# --------------------------------------------------------------------------- PPO losses


@pytest.mark.parametrize("loss_name", ["ppo_policy_loss", "ppo_value_loss"])
def test_bench_losses(loss_name):
    T = 16 * 2**20 if CUDA else 2**18
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(T, generator=gen) * 0.1 - 1).to(DEVICE)
    old = (x + torch.randn(T, generator=gen).to(DEVICE) * 0.1).contiguous()
    third = torch.randn(T, generator=gen).to(DEVICE)
    mask = (torch.rand(T, generator=gen) < 0.8).to(DEVICE)
    if loss_name == "ppo_policy_loss":
        op = lambda x_, b: ops.ppo_policy_loss(x_, old, third, mask, backend=b)
        eager = lambda x_: ppo_policy_loss_ref(x_, old, third, mask, 0.2, 0.2)
    else:
        op = lambda x_, b: ops.ppo_value_loss(x_, old, third, mask, backend=b)
        eager = lambda x_: ppo_value_loss_ref(x_, old, third, mask, 0.2)
    eager_c = compiled(eager)
    x_req = x.clone().requires_grad_()

    def fwd_bwd(f):
        def run():
            x_req.grad = None
            f(x_req)[0].backward()

        return run

    # forward: 3 fp32 reads + 1 byte mask; fwd+bwd adds the stored per-token slope and the gradient
    bytes_fwd, bytes_both = T * 13, T * (13 + 4 + 4 + 4)
    floor_fwd, floor_both = copy_seconds(bytes_fwd), copy_seconds(bytes_both)
    figures = {"tokens": T, "copy_floor_fwd_ms": floor_fwd * 1e3, "copy_floor_fwd_bwd_ms": floor_both * 1e3}
    fwd = {b: (lambda b=b: op(x, b)) for b in BACKENDS}
    fwd.update(eager=lambda: eager(x), compile=None if eager_c is None else (lambda: eager_c(x)))
    both = {b: fwd_bwd(lambda x_, b=b: op(x_, b)) for b in BACKENDS}
    both.update(eager=fwd_bwd(eager), compile=None if eager_c is None else fwd_bwd(eager_c))
    figures["forward"] = run_variants(fwd, floor_fwd, bytes_fwd, "GB/s")
    figures["forward_backward"] = run_variants(both, floor_both, bytes_both, "GB/s")
    ratios = {f"{phase}/{OURS}/pct_of_floor": "higher" for phase in ("forward", "forward_backward")}
    report(f"kernels_{loss_name}", figures, ratios)


# --------------------------------------------------------------------------- fused linear log-probs


def _liger_loss() -> Callable | None:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(reduction="mean")


def gemm_floor(h: torch.Tensor, w: torch.Tensor) -> tuple[float, float, float]:
    """Seconds of the three bare GEMMs the math needs: logits = h @ w.T, dh = dz @ w, dw = dz.T @ h."""
    dz = torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=h.device)
    return bench(lambda: h @ w.T), bench(lambda: dz @ w), bench(lambda: dz.T @ h)


@pytest.mark.parametrize("H", [3584, 5120] if CUDA else [128])
def test_bench_linear_logprobs(H):
    T, V = (16_384, 152_064) if CUDA else (512, 8192)
    dtype = torch.bfloat16 if CUDA else torch.float32
    gen = torch.Generator().manual_seed(2)
    hidden = (torch.randn(T, H, generator=gen) * 0.5).to(dtype).to(DEVICE).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H**0.5).to(dtype).to(DEVICE).requires_grad_()
    targets = torch.randint(0, V, (T,), generator=gen).to(DEVICE)
    old = torch.full((T,), -3.0, device=DEVICE)
    adv = torch.randn(T, generator=gen).to(DEVICE)
    mask = torch.ones(T, dtype=torch.bool, device=DEVICE)

    t_logits, t_dh, t_dw = gemm_floor(hidden.detach(), weight.detach())
    floor_fwd, floor_both = t_logits, t_logits + t_dh + t_dw
    flops_fwd, flops_both = 2 * T * V * H, 6 * T * V * H
    figures = {
        "T": T,
        "H": H,
        "V": V,
        "dtype": str(dtype),
        "gemm_floor_fwd_ms": floor_fwd * 1e3,
        "gemm_floor_fwd_bwd_ms": floor_both * 1e3,
        "gemm_tflops": flops_both / floor_both / 1e12,
    }

    def grads_of(loss_fn):
        def run():
            hidden.grad = weight.grad = None
            loss_fn().backward()

        return run

    eager = lambda: linear_logprobs_ref(hidden, weight, targets)
    eager_c = compiled(linear_logprobs_ref)
    liger = _liger_loss()
    fwd = {b: (lambda b=b: ops.linear_logprobs(hidden, weight, targets, backend=b)) for b in BACKENDS}
    fwd.update(eager=eager, compile=None if eager_c is None else (lambda: eager_c(hidden, weight, targets)))
    both = {b: grads_of(lambda b=b: ops.linear_logprobs(hidden, weight, targets, backend=b).sum()) for b in BACKENDS}
    both.update(
        {
            f"linear_ppo_loss_{b}": grads_of(
                lambda b=b: ops.linear_ppo_loss(hidden, weight, targets, old, adv, mask, backend=b)[0]
            )
            for b in BACKENDS
        }
    )
    both["eager"] = grads_of(lambda: eager().sum())
    if eager_c is not None:
        both["compile"] = grads_of(lambda: eager_c(hidden, weight, targets).sum())
    if liger is not None:
        both["liger_fused_linear_cross_entropy"] = grads_of(lambda: liger(weight, hidden, targets))
    figures["liger"] = "installed" if liger is not None else "not installed"
    figures["forward"] = run_variants(fwd, floor_fwd, flops_fwd, "TFLOP/s")
    figures["forward_backward"] = run_variants(both, floor_both, flops_both, "TFLOP/s")
    if CUDA:
        ours, ref = figures["forward_backward"]["triton"], figures["forward_backward"]["eager"]
        figures["fwd_bwd_over_gemm_floor"] = ours["ms"] / (floor_both * 1e3)
        if "peak_mib" in ref and "peak_mib" in ours:
            figures["peak_memory_fraction_of_eager"] = ours["peak_mib"] / ref["peak_mib"]
    ratios = {f"{phase}/{OURS}/pct_of_floor": "higher" for phase in ("forward", "forward_backward")}
    if "peak_memory_fraction_of_eager" in figures:
        ratios["peak_memory_fraction_of_eager"] = "lower"
    report(f"kernels_linear_logprobs_h{H}", figures, ratios)
