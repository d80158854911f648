"""orz_fast.integrations.openrlhf against OpenRLHF's own modules and against a reference of OpenRLHF's
documented semantics, by the three-run rule: the adapter, the reference (or OpenRLHF) in the inputs'
dtype, and the reference (or OpenRLHF) in float64.

The reference tests always run. The tests against OpenRLHF itself run where ``openrlhf.models.loss``
imports: ``make test-frameworks`` (CI) installs the tested OpenRLHF (without its dependencies, which
need CUDA) and deepspeed into ``.venv-frameworks`` and runs this file there, with
``ORZ_FAST_REQUIRE_FRAMEWORKS=1`` so that an OpenRLHF that fails to import is an error, not skips;
elsewhere they skip, naming the import error.
"""

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types

import pytest
import torch

from orz_fast.integrations.openrlhf import PolicyLoss, ValueLoss

# What ``openrlhf.models`` imports from flash-attn at load time (``models/__init__`` -> ``actor`` ->
# ``ring_attn_utils``). flash-attn only builds against CUDA; the loss code never calls these names.
FLASH_ATTN_IMPORTS = {
    "flash_attn": (),
    "flash_attn.bert_padding": ("index_first_axis", "pad_input", "rearrange", "unpad_input"),
    "flash_attn.utils": (),
    "flash_attn.utils.distributed": ("all_gather",),
}


def _flash_attn_unavailable(*args, **kwargs):
    raise RuntimeError("flash_attn stand-in: flash-attn is not installed, and the code under test must not call it")


def _flash_attn_standin() -> dict[str, types.ModuleType]:
    """Stand-in modules satisfying only the flash_attn imports above: each name is a function that raises.
    They carry a module spec without a distribution, so transformers' availability checks still report
    flash-attn as absent."""
    modules = {}
    for name, attrs in FLASH_ATTN_IMPORTS.items():
        module = types.ModuleType(name, "orz_fast test stand-in for a flash-attn module (see FLASH_ATTN_IMPORTS)")
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        module.__path__ = []
        for attr in attrs:
            setattr(module, attr, _flash_attn_unavailable)
        modules[name] = module
    return modules


def _import_openrlhf_loss():
    """``openrlhf.models.loss``; where flash-attn is absent the stand-in is in ``sys.modules`` only while
    OpenRLHF's modules import (they keep their references to it), then removed again."""
    standin = {} if importlib.util.find_spec("flash_attn") is not None else _flash_attn_standin()
    try:
        sys.modules.update(standin)
        return importlib.import_module("openrlhf.models.loss"), None
    except Exception as exc:  # noqa: BLE001 (any import-time failure means OpenRLHF is unusable here)
        return None, f"{type(exc).__name__}: {exc}"
    finally:
        for name in standin:
            sys.modules.pop(name, None)


OPENRLHF_LOSS, OPENRLHF_IMPORT_ERROR = _import_openrlhf_loss()
if OPENRLHF_LOSS is None and os.environ.get("ORZ_FAST_REQUIRE_FRAMEWORKS"):
    raise RuntimeError(
        f"ORZ_FAST_REQUIRE_FRAMEWORKS is set (make test-frameworks) but openrlhf.models.loss does not import: "
        f"{OPENRLHF_IMPORT_ERROR}"
    )
needs_openrlhf = pytest.mark.skipif(
    OPENRLHF_LOSS is None,
    reason=f"openrlhf.models.loss cannot be imported here ({OPENRLHF_IMPORT_ERROR}); `make test-frameworks` "
    "installs it and runs the comparison against OpenRLHF itself",
)

ATOL = 1e-6


def masked_mean_reference(x, mask):
    return x.mean() if mask is None else (x * mask).sum() / mask.sum()


def aggregate_reference(loss, mask, token_level, dp=1, bnt=None, gbs=None):
    """OpenRLHF's ``aggregate_loss`` as documented (same torch ops, so the same result dtype); a missing
    mask counts every token, also per sequence."""
    if token_level:
        return masked_mean_reference(loss, mask) if bnt is None else (loss * mask).sum() / bnt * dp
    mask = torch.ones_like(loss, dtype=torch.bool) if mask is None else mask
    counts = mask.sum(dim=-1)
    seq = (loss * mask).sum(dim=-1) / (counts + 1e-8)
    nonempty = (counts > 0).float()
    return masked_mean_reference(seq, nonempty) if gbs is None else (seq * nonempty).sum() / gbs * dp


def policy_reference(logp, old, adv, mask, clip_low, clip_high, dual_clip, token_level, bnt=None, gbs=None, dp=1):
    """OpenRLHF's PPO policy loss, written from its documentation: (loss, clip_ratio, ppo_kl)."""
    raw = logp - old
    ratio = raw.clamp(-20, 20).exp()
    surr1 = ratio * adv
    surr2 = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    best = torch.min(surr1, surr2)
    if dual_clip is not None:
        best = torch.where(adv < 0, torch.max(best, dual_clip * adv), best)
    loss = aggregate_reference(-best, mask, token_level, dp, bnt, gbs)
    return loss, masked_mean_reference(torch.lt(surr2, surr1).float(), mask), masked_mean_reference(-raw.detach(), mask)


def value_reference(values, old, returns, mask, clip, token_level=True, bnt=None, gbs=None, dp=1):
    """OpenRLHF's value loss, written from its documentation."""
    if clip is None:
        per_token = (values - returns) ** 2
    else:
        clipped = old + (values - old).clamp(-clip, clip)
        per_token = torch.max((clipped - returns) ** 2, (values - returns) ** 2)
    return 0.5 * aggregate_reference(per_token, mask, token_level, dp, bnt, gbs)


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
    mask[4, 1:] = False  # a one-token row
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
    dict(dual_clip=None, token_level_loss=False, global_batch=False, with_mask=False),
]
VALUE_CASES = [
    dict(clip_eps=clip_eps, token_level_loss=token_level, global_batch=global_batch)
    for clip_eps in (None, 0.2)
    for token_level in (True, False)
    for global_batch in (False, True)
]


def _case_id(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


def _global(case):
    """(batch_num_tokens, global_batch_size, dp_size) of a case."""
    return (100.0, 4.0, 2) if case["global_batch"] else (None, None, 1)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_loss_matches_reference(case, dtype):
    old, logp, adv, mask = _inputs(dtype)
    mask = mask if case["with_mask"] else None
    bnt, gbs, dp = _global(case)
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
    assert [t.dtype for t in (loss, clip_ratio, ppo_kl)] == [t.dtype for t in (loss_r, clip_r, kl_r)]
    _assert_three_run("loss", loss, loss_r, loss_64)
    _assert_three_run("grad", grad, grad_r, grad_64, factor=3.0)
    _assert_three_run("clip_ratio", clip_ratio, clip_r, clip_64)
    _assert_three_run("ppo_kl", ppo_kl, kl_r, kl_64)
    assert 0 < clip_64.item() < 1


@pytest.mark.parametrize("case", VALUE_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_loss_matches_reference(case, dtype):
    old, values, returns, mask = _inputs(dtype, seed=9)
    bnt, gbs, dp = _global(case)
    module = ValueLoss(case["clip_eps"], token_level_loss=case["token_level_loss"])
    loss, grad = _run(
        lambda x, c: module(x, old, returns, mask, dp_size=dp, batch_num_tokens=bnt, global_batch_size=gbs),
        values,
        dtype,
    )

    def ref(x, c):
        return value_reference(
            x, old.to(c), returns.to(c), mask, case["clip_eps"], case["token_level_loss"], bnt, gbs, dp
        )

    loss_r, grad_r = _run(ref, values, dtype)
    loss_64, grad_64 = _run(ref, values, torch.float64)
    assert loss.dtype == loss_r.dtype
    _assert_three_run("value loss", loss, loss_r, loss_64)
    _assert_three_run("value grad", grad, grad_r, grad_64, factor=3.0)


def test_unsupported_options_raise_when_built():
    with pytest.raises(ValueError, match=r"policy_loss_type='gspo' is not supported; supported values: 'ppo'"):
        PolicyLoss(policy_loss_type="gspo")
    with pytest.raises(ValueError, match=r"is_correction_level='token' is not supported; supported values: 'off'"):
        PolicyLoss(is_correction_level="token")
    with pytest.raises(ValueError, match=r"is_correction_mode='drop'.*'mask', 'clip'"):
        PolicyLoss(is_correction_mode="drop")
    with pytest.raises(ValueError, match=r"is_correction_gating='kl'.*'ratio', 'binary_kl', 'tv'"):
        PolicyLoss(is_correction_gating="kl")
    with pytest.raises(ValueError, match=r"dual_clip=0\.5.*None or > 1\.0"):
        PolicyLoss(dual_clip=0.5)
    with pytest.raises(ValueError, match=r"ValueLoss: token_level_loss='no'.*True, False"):
        ValueLoss(0.2, token_level_loss="no")
    old, logp, adv, mask = _inputs(torch.float32)
    with pytest.raises(ValueError, match=r"\(6, 32\)"):
        PolicyLoss()(logp, old, adv[:, :32], mask)


# ---- against OpenRLHF itself ----


@needs_openrlhf
@pytest.mark.parametrize("case", CASES[:4], ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_loss_matches_openrlhf(case, dtype):
    old, logp, adv, mask = _inputs(dtype)
    bnt, gbs, dp = _global(case)
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
        assert runs["ours"][0][i].dtype == runs["openrlhf"][0][i].dtype, name
        _assert_three_run(name, runs["ours"][0][i], runs["openrlhf"][0][i], runs["fp64"][0][i])
    _assert_three_run("grad", runs["ours"][1], runs["openrlhf"][1], runs["fp64"][1], factor=3.0)


@needs_openrlhf
@pytest.mark.parametrize("case", VALUE_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_loss_matches_openrlhf(case, dtype):
    old, values, returns, mask = _inputs(dtype, seed=9)
    bnt, gbs, dp = _global(case)
    runs = {}
    for name, cls, cast in [
        ("ours", ValueLoss, dtype),
        ("openrlhf", OPENRLHF_LOSS.ValueLoss, dtype),
        ("fp64", OPENRLHF_LOSS.ValueLoss, torch.float64),
    ]:
        module = cls(case["clip_eps"], token_level_loss=case["token_level_loss"])
        runs[name] = _run(
            lambda x, c, m=module: m(
                x, old.to(c), returns.to(c), mask, dp_size=dp, batch_num_tokens=bnt, global_batch_size=gbs
            ),
            values,
            cast,
        )
    assert runs["ours"][0].dtype == runs["openrlhf"][0].dtype
    _assert_three_run("value loss", runs["ours"][0], runs["openrlhf"][0], runs["fp64"][0])
    _assert_three_run("value grad", runs["ours"][1], runs["openrlhf"][1], runs["fp64"][1], factor=3.0)


@needs_openrlhf
@pytest.mark.parametrize("mask_dtype", [None, torch.bool, torch.int64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_output_dtypes_match_openrlhf(dtype, mask_dtype):
    old, logp, adv, mask = _inputs(dtype)
    mask = None if mask_dtype is None else mask.to(mask_dtype)
    # without a mask OpenRLHF reduces over all tokens only, with no global batch sizes
    for token_level in (True, False) if mask is not None else (True,):
        for bnt, gbs in ((None, None), (torch.tensor(100.0), torch.tensor(4.0)))[: 2 if mask is not None else 1]:
            args = (logp, old, adv, mask)
            kwargs = dict(batch_num_tokens=bnt, global_batch_size=gbs)
            ours = PolicyLoss(dual_clip=3.0, token_level_loss=token_level)(*args, **kwargs)[:3]
            theirs = OPENRLHF_LOSS.PolicyLoss(dual_clip=3.0, token_level_loss=token_level)(*args, **kwargs)[:3]
            assert [t.dtype for t in ours] == [t.dtype for t in theirs], f"policy, {token_level}, {bnt}"
            for clip_eps in (None, 0.2):
                ours = ValueLoss(clip_eps, token_level_loss=token_level)(adv, old, logp, mask, **kwargs)
                theirs = OPENRLHF_LOSS.ValueLoss(clip_eps, token_level_loss=token_level)(adv, old, logp, mask, **kwargs)
                assert ours.dtype == theirs.dtype, f"value, {clip_eps}, {token_level}, {bnt}"
