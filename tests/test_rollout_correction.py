"""The rollout–trainer log-prob gap (measured every step) and ``ppo.rollout_correction``.

Losses on a hand-made batch against the formulas in float64; the gap statistics of both loss ops and
both backends against float64; tiny trainer runs (fp32, bf16, every mode, DP = 2 against 1 process).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orz_fast import ops
from orz_fast.config import ConfigError, resolve
from orz_fast.kernels.linear_ppo_loss import linear_ppo_loss_chunked
from orz_fast.metrics import read_metrics

BACKENDS = ["torch", "triton"]
GAP = ("rollout/logprob_diff_mean", "rollout/logprob_diff_max", "rollout/ratio_max")
EPS, EPS_HIGH, CAP = 0.2, 0.28, 2.0

# a constructed batch: tokens inside and outside the clip range, both advantage signs, importance weights
# below 1, between 1 and the cap and above it, and one token masked out
LOGP = torch.tensor([-1.0, -0.5, -2.0, -1.2, -0.3, -3.0, -0.9, -1.5, -2.2], dtype=torch.float64)
OLD = torch.tensor([-1.1, -0.9, -1.6, -1.2, -0.5, -2.5, -1.0, -1.0, -2.0], dtype=torch.float64)
ROLLOUT = torch.tensor([-1.0, -1.9, -1.3, -1.25, -0.2, -2.0, -1.05, -2.3, -2.1], dtype=torch.float64)
ADV = torch.tensor([1.0, -0.7, 0.4, -1.3, 2.0, -0.2, 0.9, 1.5, -1.1], dtype=torch.float64)
MASK = torch.tensor([1, 1, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)


def surrogate_ref(logp, old, adv):
    """PPO clip term per token, float64, written out: max(-A r, -A clip(r, 1 - eps, 1 + eps_high))."""
    r = torch.exp(logp - old)
    return torch.maximum(-adv * r, -adv * r.clamp(1 - EPS, 1 + EPS_HIGH))


def loss_ref(logp, old, rollout, adv, mask, mode):
    """The three modes' losses in float64: ``none`` clips pi/pi_rollout; ``recompute`` pi/pi_old; ``tis``
    min(pi_old/pi_rollout, C) x clip(pi/pi_old), the weight a constant."""
    m = mask.double()
    if mode == "none":
        per_token = surrogate_ref(logp, rollout, adv)
    else:
        per_token = surrogate_ref(logp, old, adv)
        if mode == "tis":
            per_token = per_token * torch.exp(old - rollout).clamp(max=CAP).detach()
    return (per_token * m).sum() / m.sum().clamp(min=1)


def assert_gap(stats, logp, rollout, mask, *, rtol, atol):
    """The op's gap statistics against float64: mean and max of |logp - rollout|, max of exp(logp - rollout)."""
    d = (logp.double() - rollout.double())[mask.bool()]
    want = {"rollout_diff_mean": d.abs().mean(), "rollout_diff_max": d.abs().max(), "rollout_ratio_max": d.exp().max()}
    for name, value in want.items():
        torch.testing.assert_close(stats[name].double(), value, rtol=rtol, atol=atol, msg=name)


def grad_of(fn, x):
    x = x.detach().clone().requires_grad_()
    loss, stats = fn(x)
    loss.backward()
    return loss.detach(), stats, x.grad


def test_constructed_batch_exercises_every_branch():
    w = torch.exp(OLD - ROLLOUT)[MASK]
    r = torch.exp(LOGP - OLD)[MASK]
    assert (w < 1).any() and ((w > 1) & (w < CAP)).any() and (w > CAP).any()
    assert (r < 1 - EPS).any() and (r > 1 + EPS_HIGH).any() and ((r > 1 - EPS) & (r < 1 + EPS_HIGH)).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["none", "recompute", "tis"])
def test_policy_loss_modes_match_their_formulas(backend, mode):
    """ppo_policy_loss with each mode's inputs (as the trainer passes them) against the float64 formula."""
    logp, old, rollout, adv = (t.float() for t in (LOGP, OLD, ROLLOUT, ADV))
    kw = dict(clip_eps=EPS, clip_eps_high=EPS_HIGH, backend=backend, rollout_logprobs=rollout)
    old_in = rollout if mode == "none" else old
    tis = CAP if mode == "tis" else None
    loss, stats, grad = grad_of(lambda x: ops.ppo_policy_loss(x, old_in, adv, MASK, tis_cap=tis, **kw), logp)
    ref_loss, _, ref_grad = grad_of(lambda x: (loss_ref(x, OLD, ROLLOUT, ADV, MASK, mode), {}), LOGP)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-6, atol=1e-7)
    assert_gap(stats, LOGP, ROLLOUT, MASK, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_none_is_todays_loss(backend):
    """Passing the rollout's log-probs for the gap changes nothing else: same loss, gradient and stats, bit for bit."""
    logp, rollout, adv = LOGP.float(), ROLLOUT.float(), ADV.float()
    fn = ops.ppo_policy_loss
    today = grad_of(lambda x: fn(x, rollout, adv, MASK, backend=backend), logp)
    now = grad_of(lambda x: fn(x, rollout, adv, MASK, rollout_logprobs=rollout, backend=backend), logp)
    assert torch.equal(today[0], now[0]) and torch.equal(today[2], now[2])
    assert all(torch.equal(v, now[1][k]) for k, v in today[1].items())
    assert set(now[1]) - set(today[1]) == {"rollout_diff_mean", "rollout_diff_max", "rollout_ratio_max"}


def _lm_batch(T=9, H=8, V=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) / H**0.5
    targets = torch.randint(0, V, (T,), generator=gen)
    return hidden, weight, targets


def _lm_logp(hidden, weight, targets, temperature=0.7):
    return torch.log_softmax(hidden @ weight.T / temperature, -1).gather(1, targets[:, None])[:, 0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["recompute", "tis"])
@pytest.mark.parametrize("fused", [True, False])
def test_one_update_old_is_the_same_forward(backend, mode, fused):
    """One update per step: pi_old is the loss forward's own detached log-prob, so r == 1 exactly and the
    gradient is -A * w * grad log pi (w = 1 for recompute), against float64 through the LM head."""
    hidden, weight, targets = _lm_batch()
    logp64 = _lm_logp(hidden, weight, targets).detach()
    rollout = (logp64 + torch.tensor([0.3, -0.5, 0.02, 1.2, -0.01, 0.0, 0.9, -2.0, 0.1], dtype=torch.float64)).float()
    adv, tis = ADV.float(), (CAP if mode == "tis" else None)

    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = _lm_logp(h64, w64, targets)
    ref = loss_ref(logp, logp.detach(), rollout.double(), ADV, MASK, mode)
    ref.backward()

    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    kw = dict(clip_eps=EPS, clip_eps_high=EPS_HIGH, rollout_logprobs=rollout, tis_cap=tis, backend=backend)
    if fused:
        loss, stats = ops.linear_ppo_loss(h, w, targets, None, adv, MASK, temperature=0.7, **kw)
    else:
        lp = ops.linear_logprobs(h, w, targets, temperature=0.7, backend=backend)
        loss, stats = ops.ppo_policy_loss(lp, lp.detach(), adv, MASK, **kw)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
    assert stats["ratio_max"] == 1 and stats["ratio_min"] == 1 and stats["clipfrac"] == 0 and stats["approx_kl"] == 0
    assert_gap(stats, logp64, rollout, MASK, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("chunk_tokens", [None, 2, 4])
def test_fused_gap_and_tis_over_chunks(use_triton, chunk_tokens):
    """linear_ppo_loss's gap statistics and TIS loss combine over token chunks (sum / max / max)."""
    hidden, weight, targets = _lm_batch(T=9, seed=3)
    logp64 = _lm_logp(hidden, weight, targets, temperature=1.0).detach()
    old = (logp64 + (OLD - LOGP)).float()
    rollout = (logp64 + (ROLLOUT - LOGP)).float()
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    loss, stats = linear_ppo_loss_chunked(
        h, w, targets, old, ADV.float(), MASK, clip_low=EPS, clip_high=EPS_HIGH, use_triton=use_triton,
        chunk_tokens=chunk_tokens, rollout_logprobs=rollout, tis_cap=CAP,
    )  # fmt: skip
    loss.backward()
    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = loss_ref(_lm_logp(h64, w64, targets, 1.0), old.double(), rollout.double(), ADV, MASK, "tis")
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
    assert_gap(stats, logp64, rollout, MASK, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gap_over_no_token_is_zero(backend):
    none = torch.zeros(9, dtype=torch.bool)
    _, stats = ops.ppo_policy_loss(LOGP.float(), OLD.float(), ADV.float(), none, rollout_logprobs=ROLLOUT.float(),
                                   backend=backend)  # fmt: skip
    assert all(stats[k] == 0 for k in ("rollout_diff_mean", "rollout_diff_max", "rollout_ratio_max"))


@pytest.mark.parametrize("masked_out", [False, True], ids=["counted", "masked_out"])
@pytest.mark.parametrize("tis", [None, CAP], ids=["no_tis", "tis"])
def test_nan_rollout_logprob_gives_nan(masked_out, tis):
    """NaN in, NaN out, the same on both backends and in the fused op: a NaN rollout log-prob makes the mean
    NaN (NaN * 0 too), the maxima NaN when the token counts, and the TIS loss NaN."""
    rollout = ROLLOUT.float().clone()
    mask = MASK.clone()
    rollout[2], mask[2] = float("nan"), not masked_out
    hidden, weight, targets = _lm_batch()
    logp = ops.linear_logprobs(hidden.float(), weight.float(), targets, backend="torch")
    kw = dict(rollout_logprobs=rollout, tis_cap=tis)
    runs = [ops.ppo_policy_loss(logp, OLD.float(), ADV.float(), mask, **kw, backend=b) for b in BACKENDS]
    runs += [
        ops.linear_ppo_loss(hidden.float(), weight.float(), targets, OLD.float(), ADV.float(), mask, **kw, backend=b)
        for b in BACKENDS
    ]
    for loss, stats in runs:
        assert stats["rollout_diff_mean"].isnan()
        assert stats["rollout_diff_max"].isnan() == (not masked_out)
        assert stats["rollout_ratio_max"].isnan() == (not masked_out)
        assert loss.isnan() == (tis is not None)


def test_bad_correction_inputs_are_named():
    logp, old, adv = LOGP.float(), OLD.float(), ADV.float()
    with pytest.raises(ValueError, match="tis_cap=2.0 .* needs rollout_logprobs"):
        ops.ppo_policy_loss(logp, old, adv, MASK, tis_cap=2.0)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="tis_cap must be a finite number > 0"):
            ops.ppo_policy_loss(logp, old, adv, MASK, rollout_logprobs=old, tis_cap=bad)
    with pytest.raises(ValueError, match=r"rollout_logprobs.*\(8,\)"):
        ops.ppo_policy_loss(logp, old, adv, MASK, rollout_logprobs=old[:8])
    h, w, t = _lm_batch()
    with pytest.raises(ValueError, match="linear_ppo_loss: tis_cap"):
        ops.linear_ppo_loss(h.float(), w.float(), t, None, adv, MASK, tis_cap=2.0)


def test_config_resolves_and_validates_rollout_correction():
    assert resolve("tiny").ppo.rollout_correction == "none"
    vllm = resolve("tiny", overrides=["rollout.engine=vllm"])
    assert vllm.ppo.rollout_correction == "tis" and vllm.to_dict()["ppo"]["rollout_correction"] == "tis"
    assert resolve("tiny", overrides=["rollout.engine=vllm", "ppo.rollout_correction=none"]).ppo.rollout_correction
    assert resolve("tiny").ppo.tis_cap == 2.0
    with pytest.raises(ConfigError, match=r"ppo.rollout_correction: expected one of \['none', 'tis', 'recompute'\]"):
        resolve("tiny", overrides=["ppo.rollout_correction=is"])
    for bad, why in (("0", "must be > 0"), ("-2", "must be > 0"), ("Infinity", "must be finite")):
        with pytest.raises(ConfigError, match=f"ppo.tis_cap=.*{why}"):
            resolve("tiny", overrides=[f"ppo.tis_cap={bad}"])
    out = subprocess.run(
        [sys.executable, "-m", "orz_fast.train", "--preset", "tiny", "--set", "rollout.engine=vllm", "--print-config"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert json.loads(out.stdout)["ppo"]["rollout_correction"] == "tis"


# ----------------------------------------------------------------------------- trainer runs


def _train(out, *overrides, bf16=False):
    """A tiny run in this process (metrics.jsonl under ``out``); ``bf16``: policy and critic in bfloat16 (CPU
    runs are fp32 otherwise)."""
    import orz_fast.ppo.trainer as trainer_mod

    cfg = resolve("tiny", overrides=["logging.progress=false", "reward.workers=1", "ckpt.every=0", *overrides])
    build = trainer_mod.model_from_config
    if bf16:
        trainer_mod.model_from_config = lambda *a, **k: build(*a, **k).to(torch.bfloat16)
    try:
        trainer = trainer_mod.Trainer(cfg, out)
        if bf16:
            assert next(trainer.policy.parameters()).dtype == torch.bfloat16
        trainer.run()
    finally:
        trainer_mod.model_from_config = build
    return read_metrics(out / "metrics.jsonl")


@pytest.mark.parametrize(
    "overrides",
    [
        ["ppo.rollout_correction=none"],
        ["ppo.rollout_correction=recompute"],
        ["ppo.rollout_correction=tis"],
        ["ppo.rollout_correction=tis", "ppo.fused_loss=false"],
        ["ppo.rollout_correction=recompute", "ppo.policy_updates_per_step=2"],
        ["ppo.rollout_correction=tis", "ppo.policy_updates_per_step=2", "ppo.fused_loss=false"],
    ],
    ids=["none", "recompute", "tis", "tis-unfused", "recompute-2-updates", "tis-2-updates-unfused"],
)
def test_fp32_run_logs_the_gap_and_trains(tmp_path, overrides):
    records = _train(tmp_path, "train.steps=2", *overrides)
    assert len(records) == 2
    for r in records:
        assert all(k in r for k in GAP), r.keys()
        assert 0 <= r["rollout/logprob_diff_mean"] <= r["rollout/logprob_diff_max"] <= 1e-5
        assert r["rollout/ratio_max"] == pytest.approx(1.0, abs=1e-5)
        assert math.isfinite(r["policy_loss"]) and r["policy_steps_skipped"] == 0 and r["policy_grad_norm"] > 0
    if overrides == ["ppo.rollout_correction=recompute"]:  # one forward: pi_old == pi exactly
        assert all(r["approx_kl"] == 0 and r["clipfrac"] == 0 for r in records)


def test_bf16_run_gap(tmp_path, capsys):
    """The gap of a bf16 policy on CPU (engine decode vs trainer forward, both bf16), over 2 steps of 8 x 4
    responses of up to 24 tokens. Measured over 4 seeds: mean 4.7e-4 to 5.4e-4, max 2e-3 to 4e-3 (README)."""
    sizes = ["rollout.prompts_per_step=8", "rollout.samples_per_prompt=4", "rollout.max_tokens=24"]
    records = _train(tmp_path, "train.steps=2", *sizes, bf16=True)
    for r in records:
        assert 0 < r["rollout/logprob_diff_mean"] <= 1e-2
        assert r["rollout/logprob_diff_max"] >= r["rollout/logprob_diff_mean"]
        assert r["rollout/ratio_max"] == pytest.approx(1.0, abs=0.1)
        with capsys.disabled():
            print("\nbf16 gap: " + ", ".join(f"{k.removeprefix('rollout/')}={r[k]:.6g}" for k in GAP))


WORKER = Path(__file__).resolve().parent / "rollout_gap_worker.py"


def _gap_run(out, *overrides, nproc):
    cmd = [sys.executable, "-W", "ignore"]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    cmd += [str(WORKER), str(out), *(a for o in ("train.steps=2", *overrides) for a in ("--set", o))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return read_metrics(out / "metrics.jsonl")


@pytest.mark.parametrize("updates", [1, 2], ids=["loss-pass", "recompute-pass"])
def test_dp2_gap_equals_one_process(tmp_path, updates):
    """DP = 2 (gloo): each rank measures its own samples; the sum and max all-reduces give the 1-process figures.
    The worker shifts every rollout log-prob by 1 % of itself, so each token's gap is far above the layouts'
    fp32 rounding (which differs between a DP = 2 and a 1-process rollout) and the same on any rank."""
    overrides = [f"ppo.policy_updates_per_step={updates}"]
    one = _gap_run(tmp_path / "one", *overrides, nproc=1)
    two = _gap_run(tmp_path / "two", *overrides, nproc=2)
    assert len(one) == len(two) == 2
    for a, b in zip(two, one, strict=True):
        assert a["response_length_mean"] == b["response_length_mean"]
        assert b["rollout/logprob_diff_mean"] > 1e-3
        for key in GAP:
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
