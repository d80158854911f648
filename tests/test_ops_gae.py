"""orz_fast.ops.gae against a direct per-token recurrence, on both backends (Triton runs interpreted on CPU)."""

import pytest
import torch

from orz_fast import ops
from orz_fast.kernels.gae import gae_ref

GAMMA_LAMBDA = [(1.0, 1.0), (0.99, 0.95), (1.0, 0.9)]
ATOL = 1e-5


def _layout(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor(lengths).cumsum(0)]).to(torch.int32)


def _random_lengths(gen: torch.Generator) -> list[int]:
    # one-token segments, an empty one, mid-size ones and one longer than two kernel blocks
    mids = torch.randint(2, 300, (6,), generator=gen).tolist()
    return [1, *mids[:3], 1, 0, 2500, 1, *mids[3:], 1]


def _gae_fp32_recurrence(rewards, values, cu, gamma, lam):
    """Torch in the inputs' working precision (fp32): the recurrence vectorised across segments."""
    lengths = (cu[1:] - cu[:-1]).long()
    n, lmax = lengths.numel(), int(lengths.max())
    pos = torch.arange(lmax)
    valid = pos[None, :] < lengths[:, None]
    idx = (cu[:-1].long()[:, None] + pos[None, :]).clamp(max=max(rewards.numel() - 1, 0))
    r = torch.where(valid, rewards.float()[idx], 0.0)
    v = torch.where(valid, values.float()[idx], 0.0)
    adv = torch.zeros(n, lmax + 1)
    v_next = torch.cat([v[:, 1:], torch.zeros(n, 1)], dim=1)
    for j in range(lmax - 1, -1, -1):
        adv[:, j] = torch.where(valid[:, j], r[:, j] + gamma * v_next[:, j] - v[:, j] + gamma * lam * adv[:, j + 1], 0)
    return adv[:, :lmax][valid]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gamma,lam", GAMMA_LAMBDA)
def test_gae_matches_recurrence(backend, dtype, gamma, lam):
    gen = torch.Generator().manual_seed(int(1000 * gamma + 100 * lam) + (dtype == torch.bfloat16))
    cu = _layout(_random_lengths(gen))
    T = int(cu[-1])
    rewards = (torch.rand(T, generator=gen) < 0.05).to(dtype)
    values = torch.randn(T, generator=gen).to(dtype)
    adv, ret = ops.gae(rewards, values, cu, gamma, lam, backend=backend)
    assert adv.shape == ret.shape == (T,) and adv.dtype == ret.dtype == torch.float32
    ref_adv, ref_ret = gae_ref(rewards, values, cu, gamma, lam)
    same = _gae_fp32_recurrence(rewards, values, cu, gamma, lam).double()
    err_same = (same - ref_adv).abs().max().item()
    assert (adv.double() - ref_adv).abs().max().item() <= 2 * err_same + ATOL
    assert (ret.double() - ref_ret).abs().max().item() <= 2 * err_same + ATOL


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gae_float64_and_one_token_segments(backend):
    gen = torch.Generator().manual_seed(7)
    cu = _layout([1] * 9)
    rewards = torch.randn(9, generator=gen, dtype=torch.float64)
    values = torch.randn(9, generator=gen, dtype=torch.float64)
    adv, ret = ops.gae(rewards, values, cu, 0.9, 0.5, backend=backend)
    assert adv.dtype == torch.float64
    # one-token segments: the advantage is r - V exactly, whatever gamma and lambda
    torch.testing.assert_close(adv, rewards - values, rtol=0, atol=1e-6 if backend == "triton" else 1e-12)
    torch.testing.assert_close(ret, rewards, rtol=0, atol=1e-6 if backend == "triton" else 1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gae_empty_batch(backend):
    adv, ret = ops.gae(torch.zeros(0), torch.zeros(0), torch.zeros(1, dtype=torch.int32), backend=backend)
    assert adv.shape == ret.shape == (0,)


def test_gae_rejects_bad_inputs():
    r, v = torch.zeros(5), torch.zeros(5)
    with pytest.raises(ValueError, match=r"\(5,\)"):
        ops.gae(r, torch.zeros(4), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        ops.gae(r, v, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        ops.gae(r, v, torch.tensor([0.0, 5.0]))
    with pytest.raises(ValueError, match="backend"):
        ops.gae(r, v, torch.tensor([0, 5]), backend="cuda")


def test_gae_torch_long_stream():
    """A 100k-token stream goes through the recursive chunked scan (three levels)."""
    gen = torch.Generator().manual_seed(3)
    cu = _layout([70_000, 1, 30_000])
    T = int(cu[-1])
    rewards, values = torch.randn(T, generator=gen), torch.randn(T, generator=gen)
    adv, _ = ops.gae(rewards, values, cu, 0.999, 0.97, backend="torch")
    ref_adv, _ = gae_ref(rewards, values, cu, 0.999, 0.97)
    torch.testing.assert_close(adv.double(), ref_adv, rtol=1e-5, atol=1e-4)
