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
