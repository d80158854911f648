"""orz_fast.integrations.verl against veRL's own functions and against a reference of veRL's documented
semantics, by the three-run rule: the adapter, the reference (or veRL) in the inputs' dtype, and the
reference (or veRL) in float64.

The reference tests always run. The tests against veRL itself run where veRL imports: ``make
test-frameworks`` (CI) installs the tested veRL into ``.venv-frameworks`` and runs this file there,
with ``ORZ_FAST_REQUIRE_FRAMEWORKS=1`` so that a veRL that fails to import is an error, not skips;
elsewhere they skip, naming the import error. The plugin path (``VERL_USE_EXTERNAL_MODULES``) runs in
a subprocess, so that registering with veRL never changes what the other tests compare against.
"""

import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from orz_fast.integrations import verl as orz_verl


def _import_verl():
    try:
        return importlib.import_module("verl.trainer.ppo.core_algos"), None
    except Exception as exc:  # noqa: BLE001 (any import-time failure means veRL is unusable here)
        return None, f"{type(exc).__name__}: {exc}"


CORE_ALGOS, VERL_IMPORT_ERROR = _import_verl()
if CORE_ALGOS is None and os.environ.get("ORZ_FAST_REQUIRE_FRAMEWORKS"):
    raise RuntimeError(
        f"ORZ_FAST_REQUIRE_FRAMEWORKS is set (make test-frameworks) but veRL does not import: {VERL_IMPORT_ERROR}"
    )
needs_verl = pytest.mark.skipif(
    CORE_ALGOS is None,
    reason=f"veRL cannot be imported here ({VERL_IMPORT_ERROR}); `make test-frameworks` installs it and runs "
    "the comparison against veRL itself",
)

ATOL = 1e-6
MODES = orz_verl.SUPPORTED_LOSS_AGG_MODES
CLIP = 0.25  # value clip range: with values on a 1/8 grid, V = old +- CLIP is exact in bf16, fp32 and fp64
GLOBAL_BATCH = dict(dp_size=2, batch_num_tokens=150, global_batch_size=9, loss_scale_factor=40)


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


def agg_reference(
    loss_mat, mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None
):
    """veRL's ``agg_loss`` as documented (same torch ops, so the same result dtype)."""
    masked = torch.where(mask.bool(), loss_mat, 0.0) * mask
    if mode == "token-mean":
        return masked.sum() / (mask.sum() if batch_num_tokens is None else batch_num_tokens) * dp_size
    if mode == "token-sum":
        return masked.sum() * dp_size
    counts = mask.sum(dim=-1)
    seq = (loss_mat * mask).sum(dim=-1)
    if mode == "seq-mean-token-mean":
        seq = seq / (counts + 1e-8)
    nonempty = (counts > 0).float()
    n_seq = nonempty.sum() if global_batch_size is None else global_batch_size
    loss = (torch.where(nonempty.bool(), seq, 0.0) * nonempty).sum() / n_seq * dp_size
    if mode == "seq-mean-token-sum-norm":
        loss = loss / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss


def _masked_mean(x, mask):
    return (torch.where(mask.bool(), x, 0.0) * mask).sum() / (mask.sum() + 1e-8)


def policy_loss_reference(old, logp, adv, mask, clip_low, clip_high, clip_c, weights=None, mode="token-mean", **info):
    """veRL's vanilla dual-clip PPO loss and metrics, written from its documentation."""
    neg_kl = (logp - old).clamp(-20, 20)
    ratio = neg_kl.exp()
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    clipped_loss = torch.maximum(loss1, loss2)
    dual = torch.minimum(-adv * clip_c, clipped_loss)
    per_token = torch.where(adv < 0, dual, clipped_loss)
    if weights is not None:
        per_token = per_token * weights
    loss = agg_reference(per_token, mask, mode, **info)
    lower = ((clipped_loss > -adv * clip_c) & (adv < 0)).float()
    return loss, {
        "clipfrac": _masked_mean((loss2 > loss1).float(), mask),
        "ppo_kl": _masked_mean(-neg_kl, mask),
        "lower": _masked_mean(lower, mask),
    }


def value_loss_reference(vpreds, returns, values, mask, clip, mode="token-mean", **info):
    """veRL's clipped value loss as documented, with its clipping form ``max(min(V, old + c), old - c)``."""
    clipped = torch.max(torch.min(vpreds, values + clip), values - clip)
    l1 = (vpreds - returns) ** 2
    l2 = (clipped - returns) ** 2
    loss = 0.5 * agg_reference(torch.max(l1, l2), mask, mode, **info)
    return loss, _masked_mean(torch.gt(l2, l1).float(), mask)


def _err(a, ref):
    return (a.double() - ref.double()).abs().max().item()


def _assert_three_run(name, ours, same_dtype, fp64, factor=2.0):
    e_ours, e_ref = _err(ours, fp64), _err(same_dtype, fp64)
    assert e_ours <= factor * e_ref + ATOL, f"{name}: adapter error {e_ours:.3g} vs reference error {e_ref:.3g}"


def _grad_run(fn, x, cast):
    """``fn(x, cast)`` with ``x`` cast to ``cast`` and differentiable; returns (outputs, x.grad)."""
    x = x.to(cast).clone().requires_grad_(True)
    out = fn(x, cast)
    out[0].backward()
    return out, x.grad


@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gae_matches_reference(holes, gamma, lam, dtype):
    rewards, values, mask = _batch(7, 37, seed=1, dtype=dtype, holes=holes)
    adv, ret = orz_verl.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    adv_ref, ret_ref = gae_reference(rewards, values, mask, gamma, lam)
    adv_64, ret_64 = gae_reference(rewards.double(), values.double(), mask, gamma, lam)
    assert adv.shape == rewards.shape and adv.dtype == adv_ref.dtype and ret.dtype == ret_ref.dtype
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
    mask[4] = False  # an empty row
    weights = torch.rand(B, T, generator=gen) * 2
    weights[1, :4] = 0.0
    return old.to(dtype), logp.to(dtype), adv.to(dtype), mask, weights.to(dtype)


def _actor_config(**batch_info):
    return SimpleNamespace(
        clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, global_batch_info=batch_info
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_weights", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_loss_matches_reference(dtype, with_weights, mode):
    old, logp, adv, mask, weights = _policy_inputs(dtype)
    w = weights if with_weights else None
    info = GLOBAL_BATCH if with_weights else {}
    config = _actor_config(**info)
    (loss, metrics), grad = _grad_run(
        lambda x, c: orz_verl.compute_policy_loss_vanilla(old, x, adv, mask, mode, config, w), logp, dtype
    )

    def ref(x, c):
        cast_w = None if w is None else w.to(c)
        return policy_loss_reference(old.to(c), x, adv.to(c), mask, 0.2, 0.28, 3.0, cast_w, mode, **info)

    (loss_r, stats_r), grad_r = _grad_run(ref, logp, dtype)
    (loss_64, stats_64), grad_64 = _grad_run(ref, logp, torch.float64)
    assert loss.dtype == loss_r.dtype, f"loss dtype {loss.dtype}, veRL's documented ops give {loss_r.dtype}"
    _assert_three_run("loss", loss, loss_r, loss_64)
    _assert_three_run("grad", grad, grad_r, grad_64, factor=3.0)
    for key, ref_key in [("pg_clipfrac", "clipfrac"), ("pg_clipfrac_lower", "lower"), ("ppo_kl", "ppo_kl")]:
        ours = torch.tensor(metrics[f"actor/{key}"])
        _assert_three_run(key, ours, stats_r[ref_key], stats_64[ref_key])
    assert stats_64["lower"].item() > 0 and stats_64["clipfrac"].item() > 0  # both clips are exercised


def _value_inputs(dtype, seed=5, B=6, T=31):
    """Old values on a 1/8 grid and tokens exactly at each clip bound (exact in every dtype); a one-token row
    and an empty row."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(-16, 17, (B, T), generator=gen) / 8
    vpreds = values + torch.randn(B, T, generator=gen) * 0.4
    returns = torch.randn(B, T, generator=gen)
    vpreds[0, :4] = values[0, :4] + torch.tensor([CLIP, -CLIP, CLIP, -CLIP])
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0], lengths[2], lengths[3] = T, 1, 0
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return vpreds.to(dtype), returns.to(dtype), values.to(dtype), mask


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("global_batch", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_loss_matches_reference(dtype, global_batch, mode):
    vpreds, returns, values, mask = _value_inputs(dtype)
    info = GLOBAL_BATCH if global_batch else {}
    (loss, clipfrac), grad = _grad_run(
        lambda x, c: orz_verl.compute_value_loss(x, returns, values, mask, CLIP, mode, **info), vpreds, dtype
    )

    def ref(x, c):
        return value_loss_reference(x, returns.to(c), values.to(c), mask, CLIP, mode, **info)

    (loss_r, clipfrac_r), grad_r = _grad_run(ref, vpreds, dtype)
    (loss_64, clipfrac_64), grad_64 = _grad_run(ref, vpreds, torch.float64)
    assert (loss.dtype, clipfrac.dtype) == (loss_r.dtype, clipfrac_r.dtype)
    _assert_three_run("value loss", loss, loss_r, loss_64)
    _assert_three_run("value grad", grad, grad_r, grad_64, factor=3.0)
    assert 0 < clipfrac_64.item() < 1
    _assert_three_run("clipfrac", clipfrac, clipfrac_r, clipfrac_64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_value_loss_gradient_on_clip_ties(dtype):
    """Where V is exactly at a clip bound veRL's min / max split the gradient: 0.75 (V - R) per token there,
    where a clamp gives 1.0 (V - R)."""
    vpreds, returns, values, mask = _value_inputs(dtype)
    _, grad = _grad_run(lambda x, c: orz_verl.compute_value_loss(x, returns, values, mask, CLIP), vpreds, dtype)
    expected = 0.75 * (vpreds[0, :4].double() - returns[0, :4].double()) / mask.sum()
    rtol = 8e-3 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(grad[0, :4].double(), expected, rtol=rtol, atol=0)


def test_config_checks_name_the_option():
    with pytest.raises(ValueError, match=r"critic\.loss_agg_mode='seq-mean'.*seq-mean-token-mean"):
        orz_verl.check_critic_config(SimpleNamespace(loss_agg_mode="seq-mean", cliprange_value=0.5))
    with pytest.raises(ValueError, match=r"critic\.cliprange_value=-0\.1"):
        orz_verl.check_critic_config(SimpleNamespace(loss_agg_mode="token-mean", cliprange_value=-0.1))
    with pytest.raises(ValueError, match=r"actor\.loss_agg_mode='mean'.*token-sum"):
        orz_verl.check_actor_config(SimpleNamespace(loss_agg_mode="mean", clip_ratio_c=3.0))
    with pytest.raises(ValueError, match=r"actor\.clip_ratio_c=1\.0.*> 1\.0"):
        orz_verl.check_actor_config(SimpleNamespace(loss_agg_mode="token-mean", clip_ratio_c=1.0))
    for mode in MODES:
        orz_verl.check_actor_config(SimpleNamespace(loss_agg_mode=mode, clip_ratio_c=3.0))
        orz_verl.check_critic_config(SimpleNamespace(loss_agg_mode=mode, cliprange_value=0.0))
    vpreds, returns, values, mask = _value_inputs(torch.float32)
    with pytest.raises(ValueError, match=r"loss_agg_mode='seq-mean'.*token-mean"):
        orz_verl.compute_value_loss(vpreds, returns, values, mask, CLIP, "seq-mean")
    old, logp, adv, mask, _ = _policy_inputs(torch.float32)
    with pytest.raises(ValueError, match=r"loss_agg_mode='seq-mean'.*token-mean"):
        orz_verl.compute_policy_loss_vanilla(old, logp, adv, mask, "seq-mean", _actor_config())


# ---- against veRL itself ----


def _verl_actor_config(**batch_info):
    from verl.workers.config import ActorConfig

    config = ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio=0.2,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=3.0,
    )
    config.global_batch_info.update(batch_info)
    return config


@needs_verl
@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gae_matches_verl(holes, dtype):
    rewards, values, mask = _batch(7, 37, seed=11, dtype=dtype, holes=holes)
    adv, ret = orz_verl.compute_gae_advantage_return(rewards, values, mask, 0.99, 0.95)
    adv_v, ret_v = CORE_ALGOS.compute_gae_advantage_return(rewards, values, mask, 0.99, 0.95)
    adv_64, ret_64 = CORE_ALGOS.compute_gae_advantage_return(rewards.double(), values.double(), mask, 0.99, 0.95)
    assert (adv.dtype, ret.dtype) == (adv_v.dtype, ret_v.dtype)
    _assert_three_run("advantages", adv, adv_v, adv_64)
    _assert_three_run("returns", ret, ret_v, ret_64)


@needs_verl
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_loss_matches_verl(dtype, mode):
    old, logp, adv, mask, weights = _policy_inputs(dtype)
    runs = {}
    for name, fn, cast in [
        ("ours", orz_verl.compute_policy_loss_vanilla, dtype),
        ("verl", CORE_ALGOS.compute_policy_loss_vanilla, dtype),
        ("fp64", CORE_ALGOS.compute_policy_loss_vanilla, torch.float64),
    ]:
        config = _verl_actor_config(**GLOBAL_BATCH)
        runs[name] = _grad_run(
            lambda x, c, fn=fn, config=config: fn(old.to(c), x, adv.to(c), mask, mode, config, weights.to(c)),
            logp,
            cast,
        )
    (loss, metrics), grad = runs["ours"]
    assert loss.dtype == runs["verl"][0][0].dtype
    _assert_three_run("loss", loss, runs["verl"][0][0], runs["fp64"][0][0])
    _assert_three_run("grad", grad, runs["verl"][1], runs["fp64"][1], factor=3.0)
    for key in ("actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl"):
        ours, theirs, fp64 = (torch.tensor(runs[k][0][1][key]) for k in ("ours", "verl", "fp64"))
        _assert_three_run(key, ours, theirs, fp64)


@needs_verl
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("global_batch", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_loss_matches_verl(dtype, global_batch, mode):
    vpreds, returns, values, mask = _value_inputs(dtype)
    info = GLOBAL_BATCH if global_batch else {}
    runs = {
        name: _grad_run(lambda x, c, fn=fn: fn(x, returns.to(c), values.to(c), mask, CLIP, mode, **info), vpreds, cast)
        for name, fn, cast in [
            ("ours", orz_verl.compute_value_loss, dtype),
            ("verl", CORE_ALGOS.compute_value_loss, dtype),
            ("fp64", CORE_ALGOS.compute_value_loss, torch.float64),
        ]
    }
    (loss, clipfrac), grad = runs["ours"]
    assert (loss.dtype, clipfrac.dtype) == tuple(t.dtype for t in runs["verl"][0])
    _assert_three_run("value loss", loss, runs["verl"][0][0], runs["fp64"][0][0])
    _assert_three_run("value grad", grad, runs["verl"][1], runs["fp64"][1], factor=3.0)
    _assert_three_run("clipfrac", clipfrac, runs["verl"][0][1], runs["fp64"][0][1])
    if dtype == torch.float32:  # same arithmetic as veRL: equal up to summation order, clip ties included
        torch.testing.assert_close(grad, runs["verl"][1], rtol=1e-5, atol=1e-8)


@needs_verl
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_output_dtypes_match_verl(dtype, mask_dtype):
    old, logp, adv, mask, weights = _policy_inputs(dtype)
    vpreds, returns, values, vmask = _value_inputs(dtype)
    mask, vmask = mask.to(mask_dtype), vmask.to(mask_dtype)
    divisors = dict(dp_size=1, batch_num_tokens=torch.tensor(150.0), global_batch_size=torch.tensor(9.0))
    for mode in MODES:
        for info in ({}, divisors):
            ours, _ = orz_verl.compute_policy_loss_vanilla(old, logp, adv, mask, mode, _verl_actor_config(**info))
            theirs, _ = CORE_ALGOS.compute_policy_loss_vanilla(old, logp, adv, mask, mode, _verl_actor_config(**info))
            assert ours.dtype == theirs.dtype, f"policy loss, {mode}, {info}"
            ours = orz_verl.compute_value_loss(vpreds, returns, values, vmask, CLIP, mode, **info)
            theirs = CORE_ALGOS.compute_value_loss(vpreds, returns, values, vmask, CLIP, mode, **info)
            assert [t.dtype for t in ours] == [t.dtype for t in theirs], f"value loss, {mode}, {info}"
    if mask_dtype != torch.bool:  # veRL's GAE computes 1 - mask, which bool masks do not support
        rewards, values, gae_mask = _batch(5, 9, seed=2, dtype=dtype, holes=True)
        ours = orz_verl.compute_gae_advantage_return(rewards, values, gae_mask.to(mask_dtype), 1.0, 1.0)
        theirs = CORE_ALGOS.compute_gae_advantage_return(rewards, values, gae_mask.to(mask_dtype), 1.0, 1.0)
        assert [t.dtype for t in ours] == [t.dtype for t in theirs]


def verl_trainer_path(out_path: str) -> None:
    """Run veRL's own GAE call, actor loss and critic loss (``verl.workers.utils.losses``) on a fixed batch,
    as veRL's trainer and workers call them, and save the results to ``out_path``.

    Run in a fresh process: with ``VERL_USE_EXTERNAL_MODULES=orz_fast.integrations.verl_plugin`` the
    names resolve to orz_fast's functions (and the actor selects ``orz_vanilla``), without it to veRL's.
    """
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import ActorConfig, CriticConfig, PolicyLossConfig
    from verl.workers.utils import losses

    plugin = "orz_fast.integrations.verl_plugin" in os.environ.get("VERL_USE_EXTERNAL_MODULES", "")
    vpreds, returns, values, mask = _value_inputs(torch.float32, B=5, T=12)
    old, logp, adv, _, _ = _policy_inputs(torch.float32, B=5, T=12)
    rewards, _, _ = _batch(5, 12, seed=4, dtype=torch.float32, holes=False)
    B, P = mask.shape[0], 3
    mask[:, 0] = True  # veRL's padding helper needs a token in every row
    adv_out, returns_out = CORE_ALGOS.compute_gae_advantage_return(
        token_level_rewards=rewards, values=values, response_mask=mask.long(), gamma=1.0, lam=1.0
    )
    attention = torch.cat([torch.ones(B, P, dtype=torch.int64), mask.long()], dim=1)
    data = TensorDict(
        {
            "prompts": torch.ones(B, P, dtype=torch.int64),
            "responses": torch.ones_like(mask, dtype=torch.int64),
            "attention_mask": attention,
            "response_mask": mask.long(),
            "values": values,
            "returns": returns,
            "old_log_probs": old,
            "advantages": adv,
        },
        batch_size=[B],
    )
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)

    def flat(x):  # the model's outputs: one row per (prompt + response) token, shifted left by one
        rows = [torch.cat([torch.zeros(P - 1), x[b, : int(mask[b].sum())], torch.zeros(1)]) for b in range(B)]
        return torch.cat(rows).requires_grad_(True)

    critic = CriticConfig(
        strategy="fsdp", ppo_micro_batch_size_per_gpu=1, cliprange_value=CLIP, loss_agg_mode="seq-mean-token-mean"
    )
    vf_in = flat(vpreds)
    vf_loss, vf_metrics = losses.value_loss(critic, {"values": vf_in}, data)
    vf_loss.backward()
    actor = ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio_high=0.28,
        loss_agg_mode="seq-mean-token-mean",
        policy_loss=PolicyLossConfig(loss_mode=orz_verl.POLICY_LOSS_NAME if plugin else "vanilla"),
    )
    pg_in = flat(logp)
    pg_loss, pg_metrics = losses.ppo_loss(actor, {"log_probs": pg_in}, data)
    pg_loss.backward()
    rejected = []
    if plugin:  # configs the adapter cannot compute fail where veRL builds them
        for build in (
            lambda: CriticConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, loss_agg_mode="seq-mean"),
            lambda: CriticConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, cliprange_value=-0.5),
            lambda: ActorConfig(
                strategy="fsdp",
                rollout_n=1,
                ppo_micro_batch_size_per_gpu=1,
                clip_ratio_c=1.0,
                policy_loss=PolicyLossConfig(loss_mode=orz_verl.POLICY_LOSS_NAME),
            ),
        ):
            try:
                build()
                rejected.append("")
            except ValueError as exc:
                rejected.append(str(exc))
    results = {
        "registered": torch.tensor(
            [
                CORE_ALGOS.compute_value_loss is orz_verl.compute_value_loss,
                losses.compute_value_loss is orz_verl.compute_value_loss,
                CORE_ALGOS.compute_gae_advantage_return is orz_verl.compute_gae_advantage_return,
                CORE_ALGOS.get_adv_estimator_fn("gae") is orz_verl.compute_gae_advantage_return,
                CORE_ALGOS.get_policy_loss_fn(orz_verl.POLICY_LOSS_NAME) is orz_verl.compute_policy_loss_vanilla
                if plugin
                else False,
            ]
        ),
        "advantages": adv_out,
        "returns": returns_out,
        "vf_loss": vf_loss.detach(),
        "vf_grad": vf_in.grad,
        "vf_clipfrac": torch.tensor(vf_metrics["critic/vf_clipfrac"]),
        "pg_loss": pg_loss.detach(),
        "pg_grad": pg_in.grad,
        "pg_metrics": torch.tensor([pg_metrics[k].values for k in sorted(pg_metrics) if k != "actor/pg_loss"]),
    }
    torch.save({"tensors": results, "rejected": rejected}, out_path)


def _run_trainer_path(tmp_path: Path, plugin: bool) -> dict:
    out = tmp_path / f"plugin_{plugin}.pt"
    env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_MODULES"}
    if plugin:
        env["VERL_USE_EXTERNAL_MODULES"] = "orz_fast.integrations.verl_plugin"
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import {Path(__file__).stem} as t; "
    code += f"t.verl_trainer_path({str(out)!r})"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=True)


@needs_verl
def test_plugin_in_verl_trainer_path(tmp_path):
    """``import verl`` with the plugin named in ``VERL_USE_EXTERNAL_MODULES`` swaps in orz_fast's GAE, value
    loss and ``orz_vanilla``; called as veRL's trainer and workers call them, they give veRL's results
    (per-sequence token means, the mode the critic inherits from the actor, and clip-bound ties included)."""
    ours, theirs = _run_trainer_path(tmp_path, True), _run_trainer_path(tmp_path, False)
    assert ours["tensors"]["registered"].all() and not theirs["tensors"]["registered"].any()
    for key, value in theirs["tensors"].items():
        if key != "registered":
            torch.testing.assert_close(ours["tensors"][key], value, rtol=2e-6, atol=1e-7, msg=key)
    for message, option in zip(
        ours["rejected"], ["critic.loss_agg_mode", "critic.cliprange_value", "actor.clip_ratio_c"], strict=True
    ):
        assert option in message, f"expected a ValueError naming {option}, got {message!r}"
