"""orz_fast.integrations.openrlhf against OpenRLHF's own modules (when they import) and against a reference
of OpenRLHF's documented semantics (always), by the three-run rule: the adapter, the reference in the
inputs' dtype and the reference in float64."""

import importlib

import pytest
import torch

from orz_fast.integrations.openrlhf import PolicyLoss, ValueLoss


def _import_openrlhf_loss():
    try:
        return importlib.import_module("openrlhf.models.loss"), None
    except Exception as exc:  # noqa: BLE001 (any import-time failure means OpenRLHF is unusable here)
        return None, f"{type(exc).__name__}: {exc}"


OPENRLHF_LOSS, OPENRLHF_IMPORT_ERROR = _import_openrlhf_loss()
needs_openrlhf = pytest.mark.skipif(
    OPENRLHF_LOSS is None,
    reason=f"openrlhf.models.loss cannot be imported here ({OPENRLHF_IMPORT_ERROR}), "
    "so the adapter is untested against OpenRLHF itself",
)

ATOL = 1e-6


def policy_reference(logp, old, adv, mask, clip_low, clip_high, dual_clip, token_level, bnt=None, gbs=None, dp=1):
    """OpenRLHF's PPO policy loss, written from its documentation: (loss, clip_ratio, ppo_kl)."""
    ratio = (logp - old).clamp(-20, 20).exp()
    surr1 = ratio * adv
    surr2 = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    best = torch.minimum(surr1, surr2)
    if dual_clip is not None:
        best = torch.where(adv < 0, torch.maximum(best, dual_clip * adv), best)
    per_token = -best
    m = torch.ones_like(per_token) if mask is None else mask.to(per_token.dtype)
    if token_level:
        loss = (per_token * m).sum() / (m.sum() if bnt is None else bnt) * (1 if bnt is None else dp)
    else:
        rows = m.sum(-1)
        seq = (per_token * m).sum(-1) / (rows + 1e-8)
        nonempty = (rows > 0).to(seq.dtype)
        loss = (seq * nonempty).sum() / (nonempty.sum() if gbs is None else gbs) * (1 if gbs is None else dp)
    clip_ratio = ((surr2 < surr1).to(m.dtype) * m).sum() / m.sum()
    ppo_kl = (-(logp - old).detach() * m).sum() / m.sum()
    return loss, clip_ratio, ppo_kl


def value_reference(values, old, returns, mask, clip, bnt=None, dp=1):
    if clip is None:
        per_token = (values - returns) ** 2
    else:
        clipped = old + (values - old).clamp(-clip, clip)
        per_token = torch.maximum((clipped - returns) ** 2, (values - returns) ** 2)
    m = torch.ones_like(per_token) if mask is None else mask.to(per_token.dtype)
    agg = (per_token * m).sum() / m.sum() if bnt is None else (per_token * m).sum() / bnt * dp
    return 0.5 * agg


def _inputs(dtype, B=6, T=33, seed=7):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=gen) * 3
    logp = old + torch.randn(B, T, generator=gen) * 0.6
    logp[0, :3] = old[0, :3] + torch.tensor([25.0, -25.0, 2.0])  # past the [-20, 20] clamp, past dual_clip
    adv = torch.randn(B, T, generator=gen)
    adv[0, :3] = torch.tensor([1.0, 1.0, -1.0])
    mask = torch.arange(T)[None, :] < torch.randint(1, T + 1, (B,), generator=gen)[:, None]
    mask[0, :3] = True
    mask[3] = False  # an empty row
    return old.to(dtype), logp.to(dtype), adv.to(dtype), mask


def _err(a, ref):
    return (a.double() - ref.double()).abs().max().item()


def _assert_three_run(name, ours, same_dtype, fp64, factor=2.0):
    e_ours, e_ref = _err(ours, fp64), _err(same_dtype, fp64)
    assert e_ours <= factor * e_ref + ATOL, f"{name}: adapter error {e_ours:.3g} vs reference error {e_ref:.3g}"


def _run(fn, x, cast):
    x = x.to(cast).clone().requires_grad_(True)
    out = fn(x, cast)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return out, x.grad


CASES = [
    dict(dual_clip=None, token_level_loss=True, global_batch=False, with_mask=True),
    dict(dual_clip=3.0, token_level_loss=True, global_batch=True, with_mask=True),
    dict(dual_clip=3.0, token_level_loss=False, global_batch=False, with_mask=True),
    dict(dual_clip=None, token_level_loss=False, global_batch=True, with_mask=True),
    dict(dual_clip=None, token_level_loss=True, global_batch=False, with_mask=False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_loss_matches_reference(case, dtype):
    old, logp, adv, mask = _inputs(dtype)
    mask = mask if case["with_mask"] else None
    bnt, gbs, dp = (100.0, 4.0, 2) if case["global_batch"] else (None, None, 1)
    module = PolicyLoss(0.2, 0.28, dual_clip=case["dual_clip"], token_level_loss=case["token_level_loss"])
    (loss, clip_ratio, ppo_kl, vllm_kl, is_filter), grad = _run(
        lambda x, c: module(x, old, adv, mask, dp_size=dp, batch_num_tokens=bnt, global_batch_size=gbs), logp, dtype
    )
    assert vllm_kl is None and is_filter is None

    def ref(x, c):
        return policy_reference(
            x, old.to(c), adv.to(c), mask, 0.2, 0.28, case["dual_clip"], case["token_level_loss"], bnt, gbs, dp
        )

    (loss_r, clip_r, kl_r), grad_r = _run(ref, logp, dtype)
    (loss_64, clip_64, kl_64), grad_64 = _run(ref, logp, torch.float64)
    _assert_three_run("loss", loss, loss_r, loss_64)
    _assert_three_run("grad", grad, grad_r, grad_64, factor=3.0)
    _assert_three_run("clip_ratio", clip_ratio, clip_r, clip_64)
    _assert_three_run("ppo_kl", ppo_kl, kl_r, kl_64)
    assert 0 < clip_64.item() < 1


@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("global_batch", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_loss_matches_reference(clip_eps, global_batch, dtype):
    old, values, returns, mask = _inputs(dtype, seed=9)
    bnt, dp = (120.0, 2) if global_batch else (None, 1)
    module = ValueLoss(clip_eps)
    loss, grad = _run(lambda x, c: module(x, old, returns, mask, dp_size=dp, batch_num_tokens=bnt), values, dtype)
    ref = lambda x, c: value_reference(x, old.to(c), returns.to(c), mask, clip_eps, bnt, dp)  # noqa: E731
    loss_r, grad_r = _run(ref, values, dtype)
    loss_64, grad_64 = _run(ref, values, torch.float64)
    _assert_three_run("value loss", loss, loss_r, loss_64)
    _assert_three_run("value grad", grad, grad_r, grad_64, factor=3.0)


def test_unsupported_options_raise():
    with pytest.raises(ValueError, match="gspo"):
        PolicyLoss(policy_loss_type="gspo")
    with pytest.raises(ValueError, match="is_correction_level"):
        PolicyLoss(is_correction_level="token")
    with pytest.raises(ValueError, match="dual_clip"):
        PolicyLoss(dual_clip=0.5)
    with pytest.raises(ValueError, match="token_level_loss"):
        ValueLoss(0.2, token_level_loss=False)
    old, logp, adv, mask = _inputs(torch.float32)
    with pytest.raises(ValueError, match=r"\(6, 32\)"):
        PolicyLoss()(logp, old, adv[:, :32], mask)


@needs_openrlhf
@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_openrlhf(case, dtype):
    old, logp, adv, mask = _inputs(dtype)
    bnt, gbs, dp = (100.0, 4.0, 2) if case["global_batch"] else (None, None, 1)
    kwargs = dict(dual_clip=case["dual_clip"], token_level_loss=case["token_level_loss"])
    runs = {}
    for name, cls, cast in [
        ("ours", PolicyLoss, dtype),
        ("openrlhf", OPENRLHF_LOSS.PolicyLoss, dtype),
        ("fp64", OPENRLHF_LOSS.PolicyLoss, torch.float64),
    ]:
        module = cls(0.2, 0.28, **kwargs)
        runs[name] = _run(
            lambda x, c, m=module: m(
                x, old.to(c), adv.to(c), mask, dp_size=dp, batch_num_tokens=bnt, global_batch_size=gbs
            ),
            logp,
            cast,
        )
    for i, name in enumerate(["loss", "clip_ratio", "ppo_kl"]):
        _assert_three_run(name, runs["ours"][0][i], runs["openrlhf"][0][i], runs["fp64"][0][i])
    _assert_three_run("grad", runs["ours"][1], runs["openrlhf"][1], runs["fp64"][1], factor=3.0)

    vruns = {}
    for name, cls, cast in [
        ("ours", ValueLoss, dtype),
        ("openrlhf", OPENRLHF_LOSS.ValueLoss, dtype),
        ("fp64", OPENRLHF_LOSS.ValueLoss, torch.float64),
    ]:
        module = cls(0.2)
        vruns[name] = _run(lambda x, c, m=module: m(x, old.to(c), adv.to(c), mask), logp, cast)
    _assert_three_run("value loss", vruns["ours"][0], vruns["openrlhf"][0], vruns["fp64"][0])
    _assert_three_run("value grad", vruns["ours"][1], vruns["openrlhf"][1], vruns["fp64"][1], factor=3.0)
