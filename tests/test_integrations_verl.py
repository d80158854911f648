"""orz_fast.integrations.verl against veRL's own functions (when veRL imports) and against a per-token
reference of veRL's documented semantics (always), by the three-run rule: the adapter, the reference in
the inputs' dtype and the reference in float64."""

import importlib
import math
from types import SimpleNamespace

import pytest
import torch

from orz_fast.integrations import verl as orz_verl


def _import_verl_core_algos():
    try:
        return importlib.import_module("verl.trainer.ppo.core_algos"), None
    except Exception as exc:  # noqa: BLE001 (any import-time failure means veRL is unusable here)
        return None, f"{type(exc).__name__}: {exc}"


CORE_ALGOS, VERL_IMPORT_ERROR = _import_verl_core_algos()
needs_verl = pytest.mark.skipif(
    CORE_ALGOS is None,
    reason=f"veRL cannot be imported here ({VERL_IMPORT_ERROR}), so the adapter is untested against veRL itself",
)

ATOL = 1e-6


def _batch(B: int, T: int, seed: int, dtype: torch.dtype, holes: bool):
    """Random padded batch: right padding, a row with one token, an empty row, optional interior holes."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (B,), generator=gen)
    lengths[0], lengths[1], lengths[2] = T, 1, 0
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if holes:  # multi-turn observation tokens inside responses
        mask &= torch.rand(B, T, generator=gen) > 0.25
        mask[0, 0] = True
    rewards = torch.where(torch.rand(B, T, generator=gen) < 0.1, torch.randn(B, T, generator=gen), 0.0)
    values = torch.randn(B, T, generator=gen)
    return rewards.to(dtype), values.to(dtype), mask.to(torch.int64)


def gae_reference(rewards, values, mask, gamma, lam):
    """veRL's GAE semantics, one token at a time: masked-out tokens leave the next value and the running
    advantage unchanged and take the running advantage; then whitening over the mask (unbiased)."""
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=dtype)
    for b in range(B):
        next_value = torch.zeros((), dtype=dtype)
        running = torch.zeros((), dtype=dtype)
        for t in range(T - 1, -1, -1):
            if mask[b, t]:
                delta = rewards[b, t] + gamma * next_value - values[b, t]
                running = delta + gamma * lam * running
                next_value = values[b, t]
            adv[b, t] = running
    returns = adv + values
    m = mask.to(dtype)
    n = m.sum()
    mean = (adv * m).sum() / (n + 1e-8)
    var = (((adv - mean) ** 2) * m).sum() / (n + 1e-8) * n / (n - 1)
    return (adv - mean) * torch.rsqrt(var + 1e-8), returns


def policy_loss_reference(old, logp, adv, mask, clip_low, clip_high, clip_c, weights=None):
    """veRL's vanilla dual-clip PPO loss and metrics, token-mean, written from its documentation."""
    neg_kl = (logp - old).clamp(-20, 20)
    ratio = neg_kl.exp()
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    clipped_loss = torch.maximum(loss1, loss2)
    dual = torch.minimum(-adv * clip_c, clipped_loss)
    per_token = torch.where(adv < 0, dual, clipped_loss)
    if weights is not None:
        per_token = per_token * weights
    m = mask.to(per_token.dtype)
    loss = (per_token * m).sum() / m.sum()
    clipfrac = ((loss2 > loss1).to(m.dtype) * m).sum() / (m.sum() + 1e-8)
    ppo_kl = (-neg_kl * m).sum() / (m.sum() + 1e-8)
    lower = ((clipped_loss > -adv * clip_c) & (adv < 0)).to(m.dtype)
    return loss, {"clipfrac": clipfrac, "ppo_kl": ppo_kl, "lower": (lower * m).sum() / (m.sum() + 1e-8)}


def value_loss_reference(vpreds, returns, values, mask, clip):
    clipped = torch.minimum(torch.maximum(vpreds, values - clip), values + clip)
    l1 = (vpreds - returns) ** 2
    l2 = (clipped - returns) ** 2
    m = mask.to(l1.dtype)
    return 0.5 * (torch.maximum(l1, l2) * m).sum() / m.sum(), ((l2 > l1).to(m.dtype) * m).sum() / (m.sum() + 1e-8)


def _err(a, ref):
    return (a.double() - ref.double()).abs().max().item()


def _assert_three_run(name, ours, same_dtype, fp64, factor=2.0):
    e_ours, e_ref = _err(ours, fp64), _err(same_dtype, fp64)
    assert e_ours <= factor * e_ref + ATOL, f"{name}: adapter error {e_ours:.3g} vs reference error {e_ref:.3g}"


@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gae_matches_reference(holes, gamma, lam, dtype):
    rewards, values, mask = _batch(7, 37, seed=1, dtype=dtype, holes=holes)
    adv, ret = orz_verl.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    adv_ref, ret_ref = gae_reference(rewards, values, mask, gamma, lam)
    adv_64, ret_64 = gae_reference(rewards.double(), values.double(), mask, gamma, lam)
    assert adv.shape == rewards.shape and adv.dtype == adv_ref.dtype
    _assert_three_run("advantages", adv, adv_ref, adv_64)
    _assert_three_run("returns", ret, ret_ref, ret_64)


def test_gae_rejects_bad_input():
    rewards, values, mask = _batch(3, 5, seed=0, dtype=torch.float32, holes=False)
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        orz_verl.compute_gae_advantage_return(rewards, values[:, :4], mask, 1.0, 1.0)
    one_token = torch.zeros_like(mask)
    one_token[0, 0] = 1
    with pytest.raises(ValueError, match="one token"):
        orz_verl.compute_gae_advantage_return(rewards, values, one_token, 1.0, 1.0)


def _policy_inputs(dtype, seed=3, B=6, T=29):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=gen) * 3
    logp = old + torch.randn(B, T, generator=gen) * 0.6
    logp[0, :3] = old[0, :3] + torch.tensor([25.0, -25.0, 2.0])  # outside the [-20, 20] clamp, and past clip_c
    adv = torch.randn(B, T, generator=gen)
    adv[0, :3] = torch.tensor([1.0, 1.0, -1.0])
    mask = torch.arange(T)[None, :] < torch.randint(1, T + 1, (B,), generator=gen)[:, None]
    mask[0, :3] = True
    weights = torch.rand(B, T, generator=gen) * 2
    weights[1, :4] = 0.0
    return old.to(dtype), logp.to(dtype), adv.to(dtype), mask, weights.to(dtype)


@pytest.mark.parametrize("with_weights", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_loss_matches_reference(dtype, with_weights):
    old, logp, adv, mask, weights = _policy_inputs(dtype)
    w = weights if with_weights else None
    config = SimpleNamespace(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)

    def run(fn, cast):
        x = logp.to(cast).clone().requires_grad_(True)
        out = fn(x, cast)
        out[0].backward()
        return out, x.grad

    (loss, metrics), grad = run(
        lambda x, c: orz_verl.compute_policy_loss_vanilla(old, x, adv, mask, "token-mean", config, w), dtype
    )

    def ref(x, c):
        return policy_loss_reference(old.to(c), x, adv.to(c), mask, 0.2, 0.28, 3.0, None if w is None else w.to(c))

    (loss_r, stats_r), grad_r = run(ref, dtype)
    (loss_64, stats_64), grad_64 = run(ref, torch.float64)
    _assert_three_run("loss", loss, loss_r, loss_64)
    _assert_three_run("grad", grad, grad_r, grad_64, factor=3.0)
    for key, ref_key in [("pg_clipfrac", "clipfrac"), ("pg_clipfrac_lower", "lower"), ("ppo_kl", "ppo_kl")]:
        ours = torch.tensor(metrics[f"actor/{key}"])
        _assert_three_run(key, ours, stats_r[ref_key], stats_64[ref_key])
    assert stats_64["lower"].item() > 0 and stats_64["clipfrac"].item() > 0  # both clips are exercised


@pytest.mark.parametrize("mode", ["token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"])
def test_policy_loss_aggregation_modes(mode):
    old, logp, adv, mask, _ = _policy_inputs(torch.float64)
    config = SimpleNamespace(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None)
    loss, _ = orz_verl.compute_policy_loss_vanilla(old, logp, adv, mask, mode, config)
    per_token = torch.zeros_like(logp, requires_grad=True)
    # per-token losses from the reference: the gradient of its summed loss w.r.t. per-token weights
    loss_ref_sum, _ = policy_loss_reference(old, logp, adv, mask, 0.2, 0.2, 3.0, per_token + 1)
    (grad,) = torch.autograd.grad(loss_ref_sum * mask.sum(), per_token)
    m = mask.double()
    rows = m.sum(-1)
    n_rows = (rows > 0).double().sum()
    expected = {
        "token-sum": (grad * m).sum(),
        "seq-mean-token-sum": (grad * m).sum() / n_rows,
        "seq-mean-token-sum-norm": (grad * m).sum() / n_rows / mask.shape[-1],
        "seq-mean-token-mean": ((grad * m).sum(-1) / (rows + 1e-8)).sum() / n_rows,
    }[mode]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_loss_matches_reference(dtype):
    gen = torch.Generator().manual_seed(5)
    B, T = 5, 31
    values = torch.randn(B, T, generator=gen).to(dtype)
    vpreds = (values.float() + torch.randn(B, T, generator=gen) * 0.5).to(dtype)
    returns = torch.randn(B, T, generator=gen).to(dtype)
    mask = torch.arange(T)[None, :] < torch.randint(1, T + 1, (B,), generator=gen)[:, None]

    def run(fn, cast):
        x = vpreds.to(cast).clone().requires_grad_(True)
        loss, clipfrac = fn(x, cast)
        loss.backward()
        return loss, clipfrac, x.grad

    loss, clipfrac, grad = run(lambda x, c: orz_verl.compute_value_loss(x, returns, values, mask, 0.2), dtype)
    ref = lambda x, c: value_loss_reference(x, returns.to(c), values.to(c), mask, 0.2)  # noqa: E731
    loss_r, _, grad_r = run(ref, dtype)
    loss_64, clipfrac_64, grad_64 = run(ref, torch.float64)
    _assert_three_run("value loss", loss, loss_r, loss_64)
    _assert_three_run("value grad", grad, grad_r, grad_64, factor=3.0)
    assert 0 < clipfrac_64.item() < 1
    assert clipfrac.item() == pytest.approx(clipfrac_64.item(), abs=1e-6)
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        orz_verl.compute_value_loss(vpreds, returns, values, mask, 0.2, "seq-mean-token-mean")


# ---- against veRL itself ----


def _verl_actor_config():
    from verl.workers.config import ActorConfig

    return ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio=0.2,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=3.0,
    )


@needs_verl
@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gae_matches_verl(holes, dtype):
    rewards, values, mask = _batch(7, 37, seed=11, dtype=dtype, holes=holes)
    adv, ret = orz_verl.compute_gae_advantage_return(rewards, values, mask, 0.99, 0.95)
    adv_v, ret_v = CORE_ALGOS.compute_gae_advantage_return(rewards, values, mask, 0.99, 0.95)
    adv_64, ret_64 = CORE_ALGOS.compute_gae_advantage_return(rewards.double(), values.double(), mask, 0.99, 0.95)
    _assert_three_run("advantages", adv, adv_v, adv_64)
    _assert_three_run("returns", ret, ret_v, ret_64)


@needs_verl
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_and_value_loss_match_verl(dtype):
    old, logp, adv, mask, weights = _policy_inputs(dtype)
    config = _verl_actor_config()
    results = {}
    for name, fn, cast in [
        ("ours", orz_verl.compute_policy_loss_vanilla, dtype),
        ("verl", CORE_ALGOS.compute_policy_loss_vanilla, dtype),
        ("fp64", CORE_ALGOS.compute_policy_loss_vanilla, torch.float64),
    ]:
        x = logp.to(cast).clone().requires_grad_(True)
        loss, metrics = fn(old.to(cast), x, adv.to(cast), mask, "token-mean", config, weights.to(cast))
        loss.backward()
        results[name] = (loss, metrics, x.grad)
    _assert_three_run("loss", results["ours"][0], results["verl"][0], results["fp64"][0])
    _assert_three_run("grad", results["ours"][2], results["verl"][2], results["fp64"][2], factor=3.0)
    for key in ("actor/pg_clipfrac", "actor/pg_clipfrac_lower"):
        assert results["ours"][1][key] == pytest.approx(results["fp64"][1][key], abs=1e-6)

    vpreds = logp.float().clone().requires_grad_(True)
    ours = orz_verl.compute_value_loss(vpreds, adv.float(), old.float(), mask, 0.2)
    theirs = CORE_ALGOS.compute_value_loss(vpreds.double(), adv.double(), old.double(), mask, 0.2)
    assert ours[0].item() == pytest.approx(theirs[0].item(), rel=1e-6)
    assert ours[1].item() == pytest.approx(theirs[1].item(), abs=1e-6)


@needs_verl
def test_register_selects_by_name():
    orz_verl.register()
    assert CORE_ALGOS.get_policy_loss_fn(orz_verl.POLICY_LOSS_NAME) is orz_verl.compute_policy_loss_vanilla
    assert CORE_ALGOS.get_adv_estimator_fn("gae") is orz_verl.compute_gae_advantage_return
    assert CORE_ALGOS.compute_gae_advantage_return is orz_verl.compute_gae_advantage_return
    assert math.isfinite(
        orz_verl.compute_gae_advantage_return(*_batch(3, 5, 0, torch.float32, False), 1.0, 1.0)[0].sum().item()
    )
