"""orz_fast.ops.linear_logprobs and linear_ppo_loss against float64 torch, on both backends.

Three runs per case: the op, eager torch in the input dtype (bf16 GEMM, fp32 log-softmax, as
users write it), and float64 torch on the same rounded inputs as the truth. Rule: err(op) <=
2 * err(eager same dtype) + atol for values, 3x for gradients (errors relative to the largest
reference gradient).
"""

import pytest
import torch

from orz_fast import ops
from orz_fast.kernels.linear_logprobs import linear_logprobs_chunked, linear_logprobs_ref
from orz_fast.kernels.ppo_policy_loss import ppo_policy_loss_ref

ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3}
BACKENDS = ["torch", "triton"]


def _inputs(T: int, H: int, V: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) / H**0.5 * 2).to(dtype)
    targets = torch.randint(0, V, (T,), generator=gen)
    return hidden, weight, targets, gen


def _run(fn, hidden, weight, g_logp, g_ent):
    """fn(hidden, weight) -> (logp, entropy); returns values and gradients of sum(g_logp*logp + g_ent*ent)."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logp, ent = fn(h, w)
    (logp.double() * g_logp + ent.double() * g_ent).sum().backward()
    return logp.detach().double(), ent.detach().double(), h.grad.double(), w.grad.double()


def _check_three_runs(got, same, ref, dtype):
    for i, (g, s, r) in enumerate(zip(got, same, ref, strict=True)):
        if i < 2:
            err_got, err_same = (g - r).abs().max().item(), (s - r).abs().max().item()
            assert err_got <= 2 * err_same + ATOL[dtype], (i, err_got, err_same)
        else:
            scale = r.abs().max().item() or 1.0
            err_got, err_same = (g - r).abs().max().item() / scale, (s - r).abs().max().item() / scale
            assert err_got <= 3 * err_same + ATOL[dtype], (i, err_got, err_same)


CASES = [
    # T, H, V, temperature
    (37, 24, 1000, 1.0),
    (37, 24, 1000, 0.7),
    (3, 8, 151936 + 7, 1.3),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,H,V,temperature", CASES)
def test_linear_logprobs(backend, dtype, T, H, V, temperature):
    hidden, weight, targets, gen = _inputs(T, H, V, dtype, seed=V + T)
    g_logp = torch.randn(T, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(T, generator=gen, dtype=torch.float64)

    def op(h, w):
        return ops.linear_logprobs(h, w, targets, temperature=temperature, return_entropy=True, backend=backend)

    def eager(h, w):
        return linear_logprobs_ref(h, w, targets, temperature, return_entropy=True)

    got = _run(op, hidden, weight, g_logp, g_ent)
    same = _run(eager, hidden, weight, g_logp, g_ent)
    ref = _run(eager, hidden.double(), weight.double(), g_logp, g_ent)
    assert ops.linear_logprobs(hidden, weight, targets, backend=backend).dtype == torch.float32
    _check_three_runs(got, same, ref, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_logprobs_many_chunks_and_logp_only(backend, dtype):
    """Chunks of 8 rows over T=37 (last chunk partial), gradient through log-probs alone."""
    T, H, V = 37, 16, 1000
    hidden, weight, targets, gen = _inputs(T, H, V, dtype, seed=5)
    g_logp = torch.randn(T, generator=gen, dtype=torch.float64)
    use_triton = backend == "triton"

    def op(h, w):
        logp = linear_logprobs_chunked(h, w, targets, temperature=0.9, use_triton=use_triton, chunk_tokens=8)
        return logp, torch.zeros_like(logp)

    def eager(h, w):
        logp = linear_logprobs_ref(h, w, targets, 0.9)
        return logp, torch.zeros_like(logp)

    got = _run(op, hidden, weight, g_logp, 0.0)
    same = _run(eager, hidden, weight, g_logp, 0.0)
    ref = _run(eager, hidden.double(), weight.double(), g_logp, 0.0)
    _check_three_runs(got, same, ref, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["random", "empty"])
def test_linear_ppo_loss(backend, dtype, mask_kind):
    T, H, V = 29, 16, 1000
    hidden, weight, targets, gen = _inputs(T, H, V, dtype, seed=11)
    with torch.no_grad():
        old = linear_logprobs_ref(hidden.float(), weight.float(), targets, 0.8) + torch.randn(T, generator=gen) * 0.3
    adv = torch.randn(T, generator=gen)
    mask = torch.rand(T, generator=gen) < 0.6 if mask_kind == "random" else torch.zeros(T, dtype=torch.bool)
    kw = dict(clip_eps=0.2, clip_eps_high=0.28)

    def op(h, w):
        loss, stats = ops.linear_ppo_loss(h, w, targets, old, adv, mask, temperature=0.8, **kw, backend=backend)
        return loss[None], stats["clipfrac"][None]

    def eager(h, w):
        logp = linear_logprobs_ref(h, w, targets, 0.8)
        loss, stats = ppo_policy_loss_ref(logp, old.to(logp.dtype), adv.to(logp.dtype), mask, 0.2, 0.28)
        return loss[None], stats["clipfrac"][None]

    got = _run(op, hidden, weight, 1.7, 0.0)
    same = _run(eager, hidden, weight, 1.7, 0.0)
    ref = _run(eager, hidden.double(), weight.double(), 1.7, 0.0)
    _check_three_runs(got[:1] + got[2:], same[:1] + same[2:], ref[:1] + ref[2:], dtype)
    if mask_kind == "empty":
        assert got[0].item() == 0.0 and not got[2].any() and not got[3].any()

    # the same loss as ops.ppo_policy_loss on top of ops.linear_logprobs, stats included
    loss, stats = ops.linear_ppo_loss(
        hidden, weight, targets, old, adv, mask, temperature=0.8, **kw, return_entropy=True, backend=backend
    )
    logp, ent = ops.linear_logprobs(hidden, weight, targets, temperature=0.8, return_entropy=True, backend=backend)
    loss2, stats2 = ops.ppo_policy_loss(logp, old, adv, mask, **kw, backend=backend)
    torch.testing.assert_close(loss, loss2.float(), rtol=1e-5, atol=1e-6)
    for name, value in stats2.items():
        torch.testing.assert_close(stats[name], value.float(), rtol=1e-5, atol=1e-6)
    # the entropy metric: the masked token mean of linear_logprobs' entropy (0 with an empty mask),
    # and in fp32 of the float64 reference's
    m = mask.double()
    torch.testing.assert_close(
        stats["entropy"].double(), (ent.double() * m).sum() / m.sum().clamp(min=1.0), rtol=1e-5, atol=1e-6
    )
    if dtype == torch.float32:
        ref_ent = linear_logprobs_ref(hidden.double(), weight.double(), targets, 0.8, return_entropy=True)[1]
        want = (ref_ent * m).sum() / m.sum().clamp(min=1.0)
        torch.testing.assert_close(stats["entropy"].double(), want, rtol=1e-5, atol=1e-6)
    assert mask_kind == "empty" or stats["entropy"] > 0.1
    assert "entropy" not in ops.linear_ppo_loss(hidden, weight, targets, old, adv, mask, backend=backend)[1]


def test_linear_logprobs_strided_inputs_and_expanded_grads():
    """Non-contiguous hidden and targets, and ``.sum().backward()`` (stride-0 incoming gradients)."""
    hidden, weight, _, gen = _inputs(2 * 13, 16, 300, torch.float32, seed=9)
    targets = torch.randint(0, 300, (2 * 13,), generator=gen)[::2]
    grads = {}
    for backend in BACKENDS:
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        logp, ent = ops.linear_logprobs(h[::2], w, targets, return_entropy=True, backend=backend)
        (logp.sum() + ent.sum()).backward()
        grads[backend] = (logp, ent, h.grad, w.grad)
    ref = linear_logprobs_ref(hidden[::2].double(), weight.double(), targets, return_entropy=True)
    for backend, (logp, ent, dh, dw) in grads.items():
        torch.testing.assert_close(logp.double(), ref[0], rtol=1e-5, atol=1e-5, msg=backend)
        torch.testing.assert_close(ent.double(), ref[1], rtol=1e-5, atol=1e-5, msg=backend)
        torch.testing.assert_close(dh, grads["torch"][2], rtol=1e-5, atol=1e-5, msg=backend)
        torch.testing.assert_close(dw, grads["torch"][3], rtol=1e-5, atol=1e-5, msg=backend)
    assert not grads["torch"][2][1::2].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_of_one_input_only(backend):
    """Only hidden, or only weight, requiring grad gives the same gradient as both."""
    hidden, weight, targets, gen = _inputs(5, 8, 300, torch.float32, seed=4)
    old, adv, mask = torch.randn(5, generator=gen) - 6, torch.randn(5, generator=gen), torch.ones(5, dtype=torch.bool)
    fns = {
        "logprobs": lambda h, w: ops.linear_logprobs(h, w, targets, temperature=0.9, backend=backend).sum(),
        "ppo": lambda h, w: ops.linear_ppo_loss(h, w, targets, old, adv, mask, backend=backend)[0],
    }
    for name, fn in fns.items():
        both = torch.autograd.grad(fn(hidden.requires_grad_(), weight.requires_grad_()), (hidden, weight))
        (dh,) = torch.autograd.grad(fn(hidden, weight.detach()), (hidden,))
        (dw,) = torch.autograd.grad(fn(hidden.detach(), weight), (weight,))
        torch.testing.assert_close(dh, both[0], msg=name)
        torch.testing.assert_close(dw, both[1], msg=name)


def test_linear_logprobs_no_grad_and_bad_inputs():
    hidden, weight, targets, _ = _inputs(4, 8, 50, torch.float32, seed=1)
    with torch.no_grad():
        logp = ops.linear_logprobs(hidden, weight, targets, backend="torch")
    torch.testing.assert_close(logp, linear_logprobs_ref(hidden, weight, targets))
    with pytest.raises(ValueError, match=r"\(4, 8\).*\(50, 7\)"):
        ops.linear_logprobs(hidden, weight[:, :7], targets)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        ops.linear_logprobs(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="temperature"):
        ops.linear_logprobs(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="dtype"):
        ops.linear_logprobs(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match=r"vocab_size must be an int in \[1, 50\].*got 51"):
        ops.linear_logprobs(hidden, weight, targets, vocab_size=51)
    with pytest.raises(ValueError, match=r"vocab_size must be an int in \[1, 50\].*got 0"):
        ops.linear_logprobs(hidden, weight, targets, vocab_size=0)
    with pytest.raises(ValueError, match=r"targets must be ids in \[0, 40\), got 4[0-9]"):
        ops.linear_logprobs(hidden, weight, torch.tensor([1, 2, 3, 45]), vocab_size=40)
    with pytest.raises(ValueError, match=r"targets must be ids in \[0, 50\), got -1"):
        ops.linear_logprobs(hidden, weight, torch.tensor([1, 2, 3, -1]))
    old, adv, mask = torch.zeros(4), torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match=r"linear_ppo_loss: targets must be ids in \[0, 40\)"):
        ops.linear_ppo_loss(hidden, weight, torch.tensor([1, 2, 3, 45]), old, adv, mask, vocab_size=40)


PAD_CASES = [
    # real vocabulary, weight rows (padded): logits over all rows / a 64-aligned prefix / a short shard
    (1000, 1024),
    (1001, 1152),
    (7, 128),
]


def _padded(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` with padding rows of large logits appended: any of them taken into the softmax would show."""
    pad = torch.full((rows - weight.shape[0], weight.shape[1]), 4.0).to(weight.dtype)
    return torch.cat([weight, pad])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V,rows", PAD_CASES)
def test_padded_vocab_is_outside_logprobs_and_entropy(backend, dtype, V, rows):
    """``vocab_size=V`` on a padded weight equals the op on its first V rows; the padding gets no gradient."""
    T, H = 19, 16
    hidden, weight, targets, gen = _inputs(T, H, V, dtype, seed=V)
    g_logp = torch.randn(T, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(T, generator=gen, dtype=torch.float64)

    def op(h, w):
        kw = dict(temperature=0.9, return_entropy=True, vocab_size=V, chunk_tokens=8)
        return linear_logprobs_chunked(h, w, targets, use_triton=backend == "triton", **kw)

    def eager(h, w):
        return linear_logprobs_ref(h, w, targets, 0.9, return_entropy=True)

    got = _run(op, hidden, _padded(weight, rows), g_logp, g_ent)
    assert got[3].shape == (rows, H) and not got[3][V:].any()
    same = _run(eager, hidden, weight, g_logp, g_ent)
    ref = _run(eager, hidden.double(), weight.double(), g_logp, g_ent)
    _check_three_runs((*got[:3], got[3][:V]), same, ref, dtype)
    whole = ops.linear_logprobs(hidden, _padded(weight, rows), targets, temperature=0.9, vocab_size=V, backend=backend)
    torch.testing.assert_close(whole, got[0].float())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V,rows", PAD_CASES)
def test_padded_vocab_is_outside_the_fused_ppo_loss(backend, V, rows):
    T, H = 23, 16
    hidden, weight, targets, gen = _inputs(T, H, V, torch.float32, seed=V + 1)
    old = torch.randn(T, generator=gen) * 0.3 - 2.0
    adv = torch.randn(T, generator=gen)
    mask = torch.rand(T, generator=gen) < 0.7
    padded = _padded(weight, rows)
    runs = {}
    for name, w, vocab in (("padded", padded, V), ("real", weight, None)):
        h, w = hidden.clone().requires_grad_(), w.clone().requires_grad_()
        loss, stats = ops.linear_ppo_loss(
            h, w, targets, old, adv, mask, return_entropy=True, vocab_size=vocab, backend=backend
        )
        loss.backward()
        runs[name] = (loss, stats, h.grad, w.grad)
    (loss, stats, dh, dw), (loss_r, stats_r, dh_r, dw_r) = runs["padded"], runs["real"]
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, loss_r, **tol)
    for key in ("clipfrac", "approx_kl", "entropy", "ratio_max"):
        torch.testing.assert_close(stats[key], stats_r[key], **tol, msg=key)
    torch.testing.assert_close(dh, dh_r, **tol)
    torch.testing.assert_close(dw[:V], dw_r, **tol)
    assert not dw[V:].any()
