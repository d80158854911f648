"""orz_fast.ops.ppo_policy_loss and ppo_value_loss against float64 torch, on both backends.

Three-run rule (shared/STYLE.md): err(kernel) <= 2 * err(torch in the input dtype) + atol for the
loss, 3x for the gradient, errors measured against float64 on the same (rounded) inputs.
"""

import pytest
import torch

from orz_fast import ops
from orz_fast.kernels.ppo_policy_loss import ppo_policy_loss_ref
from orz_fast.kernels.ppo_value_loss import ppo_value_loss_ref

ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-4}
BACKENDS = ["torch", "triton"]
SIZES = [1, 2047, 4099]


def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def _mask(T: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "random":
        return torch.rand(T, generator=gen) < 0.7
    if kind == "empty":
        return torch.zeros(T, dtype=torch.bool)
    return (torch.rand(T, generator=gen) < 0.7).float()


def _grad_of(fn, x: torch.Tensor, *rest):
    x = x.detach().clone().requires_grad_()
    loss, stats = fn(x, *rest)
    loss.backward()
    return loss.detach(), stats, x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", SIZES)
@pytest.mark.parametrize("mask_kind", ["random", "empty", "float"])
def test_policy_loss(backend, dtype, T, mask_kind):
    gen = torch.Generator().manual_seed(T + 17 * len(mask_kind))
    logp = (torch.randn(T, generator=gen) * 0.5 - 1).to(dtype)
    old = (logp.float() + torch.randn(T, generator=gen) * 0.3).to(dtype)
    adv = torch.randn(T, generator=gen).to(dtype)
    mask = _mask(T, mask_kind, gen)
    kw = dict(clip_eps=0.2, clip_eps_high=0.28)

    loss, stats, grad = _grad_of(lambda x, *a: ops.ppo_policy_loss(x, *a, **kw, backend=backend), logp, old, adv, mask)
    ref_loss, ref_stats, ref_grad = _grad_of(
        lambda x, *a: ppo_policy_loss_ref(x, *a, 0.2, 0.28), logp.double(), old.double(), adv.double(), mask
    )
    same_loss, _, same_grad = _grad_of(lambda x, *a: ppo_policy_loss_ref(x, *a, 0.2, 0.28), logp, old, adv, mask)

    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert _err(loss, ref_loss) <= 2 * _err(same_loss, ref_loss) + ATOL[dtype]
    assert _err(grad, ref_grad) <= 3 * _err(same_grad, ref_grad) + ATOL[dtype]
    for name in ("clipfrac", "approx_kl", "ratio_mean", "ratio_min", "ratio_max", "num_tokens"):
        torch.testing.assert_close(stats[name].double(), ref_stats[name].double(), rtol=1e-5, atol=1e-5)
    if mask_kind == "empty":
        assert loss.item() == 0.0 and not grad.any() and stats["ratio_max"].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", SIZES)
@pytest.mark.parametrize("mask_kind", ["random", "empty", "float"])
def test_value_loss(backend, dtype, T, mask_kind):
    gen = torch.Generator().manual_seed(2 * T + len(mask_kind))
    values = torch.randn(T, generator=gen).to(dtype)
    old = (values.float() + torch.randn(T, generator=gen) * 0.3).to(dtype)
    returns = (torch.rand(T, generator=gen) < 0.3).to(dtype)
    mask = _mask(T, mask_kind, gen)

    loss, stats, grad = _grad_of(
        lambda x, *a: ops.ppo_value_loss(x, *a, clip=0.2, backend=backend), values, old, returns, mask
    )
    ref_loss, ref_stats, ref_grad = _grad_of(
        lambda x, *a: ppo_value_loss_ref(x, *a, 0.2), values.double(), old.double(), returns.double(), mask
    )
    same_loss, _, same_grad = _grad_of(lambda x, *a: ppo_value_loss_ref(x, *a, 0.2), values, old, returns, mask)

    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert _err(loss, ref_loss) <= 2 * _err(same_loss, ref_loss) + ATOL[dtype]
    assert _err(grad, ref_grad) <= 3 * _err(same_grad, ref_grad) + ATOL[dtype]
    for name in ("clipfrac", "returns_sum", "returns_sq_sum", "error_sum", "error_sq_sum", "num_tokens"):
        torch.testing.assert_close(stats[name].double(), ref_stats[name].double(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(
        stats["explained_variance"].double(), ref_stats["explained_variance"].double(), rtol=1e-4, atol=1e-4
    )
    if mask_kind == "empty":
        assert loss.item() == 0.0 and not grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_clipping_by_hand(backend):
    """Hand-made tokens: in range, clipped above with A > 0, clipped below with A < 0, unclipped side."""
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.1, 1.5, 0.5, 1.5])).requires_grad_()
    adv = torch.tensor([1.0, 2.0, -1.0, -1.0])
    loss, stats = ops.ppo_policy_loss(logp, old, adv, torch.ones(4, dtype=torch.bool), clip_eps=0.2, backend=backend)
    expected = torch.tensor([-1.1, -2 * 1.2, 0.8, 1.5]).mean()
    torch.testing.assert_close(loss, expected)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-1.1, 0.0, 0.0, 1.5]) / 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_losses_without_grad_match(backend):
    """Inputs that need no gradient take the kernels' stats-only path; same loss and stats."""
    gen = torch.Generator().manual_seed(3)
    a, b, c = (torch.randn(3000, generator=gen) for _ in range(3))
    mask = torch.rand(3000, generator=gen) < 0.5
    for fn in (ops.ppo_policy_loss, ops.ppo_value_loss):
        loss, stats = fn(a.clone().requires_grad_(), b, c, mask, backend=backend)
        with torch.no_grad():
            loss_ng, stats_ng = fn(a, b, c, mask, backend=backend)
        torch.testing.assert_close(loss_ng, loss.detach())
        for name, value in stats.items():
            torch.testing.assert_close(stats_ng[name], value, msg=name)


def test_losses_reject_bad_shapes():
    x = torch.zeros(5)
    with pytest.raises(ValueError, match=r"\(4,\)"):
        ops.ppo_policy_loss(x, x, torch.zeros(4), x)
    with pytest.raises(ValueError, match=r"\(5, 1\)"):
        ops.ppo_value_loss(x, x, x, torch.zeros(5, 1))
    with pytest.raises(ValueError, match="float"):
        ops.ppo_value_loss(torch.zeros(5, dtype=torch.long), x, x, x)


# Non-finite inputs: the Triton kernels and the torch path give the same loss, statistics and gradient.
# A GPU's max.f32/min.f32 (what tl.maximum/tl.minimum and tl.max/tl.min compile to) return the other
# operand for a NaN, and the interpreter models that (np.fmax), so these tests catch a NaN dropped there.
NONFINITE = [float("nan"), float("inf"), float("-inf")]
NONFINITE_T = 4099  # three blocks of 2048: the bad token sits in the middle one
BAD_AT = 2050
# numpy, under Triton's interpreter, warns about the NaN and inf arithmetic these tests are about
quiet_numpy = pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")


def _assert_same(a: torch.Tensor | None, b: torch.Tensor | None, what: str):
    torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def _nonfinite_inputs(which: int, bad: float, masked_out: bool, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    T = NONFINITE_T
    a = torch.randn(T, generator=gen) * 0.5 - 1
    inputs = [a, a + torch.randn(T, generator=gen) * 0.3, torch.randn(T, generator=gen)]
    inputs[which][BAD_AT] = bad
    mask = torch.rand(T, generator=gen) < 0.7
    mask[BAD_AT] = not masked_out
    return inputs, mask


@quiet_numpy
@pytest.mark.parametrize("masked_out", [False, True], ids=["counted", "masked_out"])
@pytest.mark.parametrize("bad", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("which", [0, 1, 2], ids=["logprobs", "old_logprobs", "advantages"])
def test_policy_loss_nonfinite_inputs_agree(which, bad, masked_out):
    (logp, old, adv), mask = _nonfinite_inputs(which, bad, masked_out, seed=which)
    runs = {
        b: _grad_of(lambda x, *a, b=b: ops.ppo_policy_loss(x, *a, backend=b), logp, old, adv, mask) for b in BACKENDS
    }
    (loss, stats, grad), (t_loss, t_stats, t_grad) = runs["torch"], runs["triton"]
    _assert_same(t_loss, loss, "loss")
    _assert_same(t_grad, grad, "gradient")
    for name in stats:
        _assert_same(t_stats[name], stats[name], name)
    if bad != bad:  # NaN in: NaN loss, and NaN in the ratio statistics when the NaN is in a log-prob
        assert t_loss.isnan()
        if which != 2:
            assert t_stats["approx_kl"].isnan() and t_stats["ratio_mean"].isnan()
            assert t_stats["ratio_max"].isnan() == (not masked_out)


@quiet_numpy
@pytest.mark.parametrize("masked_out", [False, True], ids=["counted", "masked_out"])
@pytest.mark.parametrize("bad", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("which", [0, 1, 2], ids=["values", "old_values", "returns"])
def test_value_loss_nonfinite_inputs_agree(which, bad, masked_out):
    (values, old, returns), mask = _nonfinite_inputs(which, bad, masked_out, seed=10 + which)
    runs = {
        b: _grad_of(lambda x, *a, b=b: ops.ppo_value_loss(x, *a, backend=b), values, old, returns, mask)
        for b in BACKENDS
    }
    (loss, stats, grad), (t_loss, t_stats, t_grad) = runs["torch"], runs["triton"]
    _assert_same(t_loss, loss, "loss")
    _assert_same(t_grad, grad, "gradient")
    for name in stats:
        _assert_same(t_stats[name], stats[name], name)
    if bad != bad:
        assert t_loss.isnan()


@quiet_numpy
def test_nan_through_one_clip_bound_is_not_dropped():
    """The case GPUs got wrong: a NaN ratio against a finite clip bound (max.f32 returned the bound)."""
    logp = torch.tensor([float("nan"), -1.0])
    old = torch.tensor([-1.0, -1.0])
    for backend in BACKENDS:
        loss, stats = ops.ppo_policy_loss(logp, old, torch.ones(2), torch.ones(2, dtype=torch.bool), backend=backend)
        assert loss.isnan() and stats["ratio_max"].isnan() and stats["ratio_min"].isnan(), backend
        v_loss, _ = ops.ppo_value_loss(
            torch.tensor([float("nan")]), torch.zeros(1), torch.zeros(1), torch.ones(1), backend=backend
        )
        assert v_loss.isnan(), backend


@quiet_numpy
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["old_logprobs", "advantages", "hidden"])
def test_linear_ppo_loss_nonfinite_inputs_agree(where, bad):
    """The fused loss: Triton and torch backends agree, and agree with ppo_policy_loss on the log-probs."""
    T, H, V, bad_at = 37, 16, 67, 11
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H**0.5
    targets = torch.randint(0, V, (T,), generator=gen)
    old = torch.randn(T, generator=gen) * 0.3 - 4
    adv = torch.randn(T, generator=gen)
    mask = torch.rand(T, generator=gen) < 0.7
    mask[bad_at] = True
    {"old_logprobs": old, "advantages": adv, "hidden": hidden}[where][bad_at] = bad

    def run(backend):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, stats = ops.linear_ppo_loss(h, w, targets, old, adv, mask, return_entropy=True, backend=backend)
        loss.backward()
        return loss.detach(), stats, h.grad, w.grad

    (loss, stats, dh, dw), (t_loss, t_stats, t_dh, t_dw) = run("torch"), run("triton")
    _assert_same(t_loss, loss, "loss")
    for name in stats:
        _assert_same(t_stats[name], stats[name], name)
    _assert_same(t_dh, dh, "dhidden")
    _assert_same(t_dw, dw, "dweight")
    logp = ops.linear_logprobs(hidden, weight, targets, backend="torch")
    unfused, unfused_stats = ops.ppo_policy_loss(logp, old, adv, mask, backend="triton")
    _assert_same(t_loss, unfused, "loss vs ppo_policy_loss")
    _assert_same(t_stats["ratio_max"], unfused_stats["ratio_max"], "ratio_max vs ppo_policy_loss")
    if bad != bad:
        assert t_loss.isnan()
