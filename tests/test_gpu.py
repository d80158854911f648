"""Checks that need a CUDA GPU (skipped without one; ``make gpu-check`` runs them on a lent GPU).

- the compiled Triton kernels against float64 references with the three-run rule of the CPU
  tests (the kernel, torch in the input dtype, float64 torch on the same rounded inputs), at
  sizes past the interpreter's reach, and the NaN semantics with the GPU's real min/max;
- a bf16 Qwen2.5-shaped decoder, forward and backward, against transformers in bf16, both
  measured against transformers in fp32;
- native-engine greedy decoding against transformers ``generate`` (fp32: token for token;
  bf16: a difference only where the fp32 model's two candidates are a near tie);
- one PPO step of a Qwen2.5-0.5B-shaped random model in bf16 with the optimizer states offloaded
  to pinned CPU memory during the rollout.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from dist_models_worker import rel_err
from test_ops_gae import _gae_fp32_recurrence, _layout, _random_lengths
from test_ops_linear_logprobs import _check_three_runs, _run
from test_ops_losses import NONFINITE, _nonfinite_inputs
from transformers import AutoConfig, AutoModelForCausalLM

from orz_fast import ops, parallel
from orz_fast.config import resolve
from orz_fast.kernels.gae import gae_ref
from orz_fast.kernels.linear_logprobs import linear_logprobs_ref
from orz_fast.kernels.ppo_policy_loss import ppo_policy_loss_ref
from orz_fast.kernels.ppo_value_loss import ppo_value_loss_ref
from orz_fast.models import gather_hf_state_dict, load_pretrained
from orz_fast.plan import QWEN25_SHAPES
from orz_fast.ppo.trainer import Trainer
from orz_fast.rollout import NativeEngine, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)")
DEVICE = torch.device("cuda")
QWEN25_0P5B = QWEN25_SHAPES["Qwen/Qwen2.5-0.5B"]
LOSS_SIZES = [1, 2047, (1 << 20) + 3]
LOGPROB_CASES = [(1000, 896, 151_936 + 7, 0.7), (333, 128, 4096, 1.0)]  # T, H, V, temperature
MODEL_LAYERS = 4
PACKED_LENS = [300, 17, 1000, 64]


@pytest.fixture(scope="module", autouse=True)
def _single_process():
    parallel.initialize(1, 1)


# --------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95)])
def test_gae_kernel(gamma, lam):
    gen = torch.Generator().manual_seed(int(100 * gamma + 10 * lam))
    cu = _layout(_random_lengths(gen) + [5000, 1])
    T = int(cu[-1])
    rewards = (torch.rand(T, generator=gen) < 0.05).float()
    values = torch.randn(T, generator=gen)
    adv, ret = ops.gae(rewards.to(DEVICE), values.to(DEVICE), cu.to(DEVICE), gamma, lam, backend="triton")
    ref_adv, ref_ret = gae_ref(rewards, values, cu, gamma, lam)
    err_same = (_gae_fp32_recurrence(rewards, values, cu, gamma, lam).double() - ref_adv).abs().max().item()
    assert (adv.cpu().double() - ref_adv).abs().max().item() <= 2 * err_same + 1e-5
    assert (ret.cpu().double() - ref_ret).abs().max().item() <= 2 * err_same + 1e-5


def test_gae_kernel_at_orz_size():
    """16M tokens in 8,192 segments: the kernel against the torch path (fp64 prefix sums for gamma*lam = 1)."""
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(1024, 3073, (8192,), generator=gen)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32).to(DEVICE)
    T = int(lengths.sum())
    rewards = (torch.rand(T, generator=gen) < 1 / 2048).float().to(DEVICE)
    values = torch.rand(T, generator=gen).to(DEVICE)
    adv, ret = ops.gae(rewards, values, cu, backend="triton")
    ref_adv, ref_ret = ops.gae(rewards, values, cu, backend="torch")
    # fp32 scans over segments of up to 3,072 tokens against exact sums: a bug is off by O(1)
    scale = max(ref_adv.abs().max().item(), 1.0)
    assert (adv - ref_adv).abs().max().item() <= 1e-3 * scale
    assert (ret - ref_ret).abs().max().item() <= 1e-3 * scale


def _loss_run(fn, x, *rest):
    x = x.detach().clone().requires_grad_()
    loss, stats = fn(x, *rest)
    loss.backward()
    return loss.detach().double().cpu(), {k: v.double().cpu() for k, v in stats.items()}, x.grad.double().cpu()


@pytest.mark.parametrize("which", ["policy", "value"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", LOSS_SIZES)
def test_loss_kernels(which, dtype, T):
    gen = torch.Generator().manual_seed(T + 7 * (dtype == torch.bfloat16))
    a = (torch.randn(T, generator=gen) * 0.5 - 1).to(dtype)
    b = (a.float() + torch.randn(T, generator=gen) * 0.3).to(dtype)
    c = torch.randn(T, generator=gen).to(dtype)
    mask = torch.rand(T, generator=gen) < 0.7
    if which == "policy":
        op = lambda x, *r: ops.ppo_policy_loss(x, *r, clip_eps=0.2, clip_eps_high=0.28, backend="triton")
        ref = lambda x, *r: ppo_policy_loss_ref(x, *r, 0.2, 0.28)
    else:
        op = lambda x, *r: ops.ppo_value_loss(x, *r, clip=0.2, backend="triton")
        ref = lambda x, *r: ppo_value_loss_ref(x, *r, 0.2)
    on = [t.to(DEVICE) for t in (a, b, c, mask)]
    loss, stats, grad = _loss_run(op, *on)
    ref_loss, ref_stats, ref_grad = _loss_run(ref, *(t.double() if t.is_floating_point() else t for t in on))
    same_loss, _, same_grad = _loss_run(ref, *on)
    atol = 1e-6 if dtype == torch.float32 else 1e-4
    assert (loss - ref_loss).abs().item() <= 2 * (same_loss - ref_loss).abs().item() + atol
    assert (grad - ref_grad).abs().max().item() <= 3 * (same_grad - ref_grad).abs().max().item() + atol
    for name in ref_stats:
        torch.testing.assert_close(stats[name], ref_stats[name], rtol=1e-4, atol=1e-3, msg=name)


@pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")
@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("bad", NONFINITE, ids=["nan", "inf", "-inf"])
def test_loss_kernels_nonfinite_inputs_on_the_gpu(which, bad):
    """Compiled max.f32/min.f32 drop NaN: the kernels use NaN-propagating forms and agree with torch."""
    for op in (ops.ppo_policy_loss, ops.ppo_value_loss):
        inputs, mask = _nonfinite_inputs(which, bad, masked_out=False, seed=which)
        on = [t.to(DEVICE) for t in (*inputs, mask)]
        got = _loss_run(lambda x, *r, op=op: op(x, *r, backend="triton"), *on)
        want = _loss_run(lambda x, *r, op=op: op(x, *r, backend="torch"), *on)
        torch.testing.assert_close(got[0], want[0], equal_nan=True, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[2], want[2], equal_nan=True, rtol=1e-5, atol=1e-6)
        for name in want[1]:
            torch.testing.assert_close(got[1][name], want[1][name], equal_nan=True, rtol=1e-5, atol=1e-5, msg=name)
        if bad != bad:
            assert got[0].isnan()


def _logprob_inputs(T, H, V, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=gen).to(dtype).to(DEVICE)
    weight = (torch.randn(V, H, generator=gen) / H**0.5 * 2).to(dtype).to(DEVICE)
    targets = torch.randint(0, V, (T,), generator=gen).to(DEVICE)
    return hidden, weight, targets, gen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,H,V,temperature", LOGPROB_CASES)
def test_linear_logprobs_kernel(dtype, T, H, V, temperature):
    hidden, weight, targets, gen = _logprob_inputs(T, H, V, dtype, seed=T)
    g_logp, g_ent = torch.randn(T, generator=gen).to(DEVICE), torch.randn(T, generator=gen).to(DEVICE)
    kw = dict(temperature=temperature, return_entropy=True)
    got = _run(lambda h, w: ops.linear_logprobs(h, w, targets, **kw, backend="triton"), hidden, weight, g_logp, g_ent)
    same = _run(lambda h, w: linear_logprobs_ref(h, w, targets, temperature, True), hidden, weight, g_logp, g_ent)
    ref = _run(
        lambda h, w: linear_logprobs_ref(h, w, targets, temperature, True),
        hidden.double(),
        weight.double(),
        g_logp,
        g_ent,
    )
    _check_three_runs(got, same, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_ppo_loss_kernel(dtype):
    T, H, V, temperature = LOGPROB_CASES[0]
    hidden, weight, targets, gen = _logprob_inputs(T, H, V, dtype, seed=11)
    with torch.no_grad():
        logp = linear_logprobs_ref(hidden.float(), weight.float(), targets, temperature)
        old = logp + torch.randn(T, generator=gen).to(DEVICE) * 0.3
    adv = torch.randn(T, generator=gen).to(DEVICE)
    mask = (torch.rand(T, generator=gen) < 0.6).to(DEVICE)

    def fused(h, w):
        loss, stats = ops.linear_ppo_loss(h, w, targets, old, adv, mask, temperature=temperature, backend="triton")
        return loss[None], stats["clipfrac"][None]

    def eager(h, w):
        lp = linear_logprobs_ref(h, w, targets, temperature)
        loss, stats = ppo_policy_loss_ref(lp, old.to(lp.dtype), adv.to(lp.dtype), mask, 0.2, 0.2)
        return loss[None], stats["clipfrac"][None]

    got = _run(fused, hidden, weight, 1.0, 0.0)
    same = _run(eager, hidden, weight, 1.0, 0.0)
    ref = _run(eager, hidden.double(), weight.double(), 1.0, 0.0)
    _check_three_runs(got[:1] + got[2:], same[:1] + same[2:], ref[:1] + ref[2:], dtype)


# --------------------------------------------------------------------------- model and engine


def _random_hf(arch: dict, path, seed: int = 0):
    """A transformers model with random weights (biases and norms too), saved to ``path``; fp32 on the GPU."""
    torch.manual_seed(seed)
    fields = {k: v for k, v in arch.items() if k != "model_type"}
    cfg = AutoConfig.for_model(arch["model_type"], **fields, attn_implementation="sdpa")
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(path)
    return hf.to(DEVICE)


def _hf_loss_and_grads(hf, ids, cu, targets):
    hf.zero_grad(set_to_none=True)
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True))
    logits = torch.cat([hf(ids[a:b][None]).logits[0] for a, b in bounds]).float()
    F.cross_entropy(logits, targets).backward()
    return logits.detach(), {n: p.grad.detach().float().cpu() for n, p in hf.named_parameters()}


def test_bf16_decoder_forward_backward_against_transformers(tmp_path):
    """Logits and every gradient of a bf16 Qwen2.5-0.5B-shaped decoder (4 layers), against transformers in
    bf16, both measured against transformers in fp32: ours may be at most 2x (3x for gradients) further off."""
    torch.backends.cuda.matmul.allow_tf32 = False
    arch = {**QWEN25_0P5B, "num_hidden_layers": MODEL_LAYERS}
    hf32 = _random_hf(arch, tmp_path / "ckpt")
    hf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16).to(DEVICE)
    model = load_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16, device=DEVICE)
    gen = torch.Generator().manual_seed(0)
    T = sum(PACKED_LENS)
    ids = torch.randint(0, arch["vocab_size"], (T,), generator=gen).to(DEVICE)
    targets = torch.randint(0, arch["vocab_size"], (T,), generator=gen).to(DEVICE)
    cu = torch.tensor([0, *torch.tensor(PACKED_LENS).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)

    ref_logits, ref_grads = _hf_loss_and_grads(hf32, ids, cu, targets)
    hf_logits, hf_grads = _hf_loss_and_grads(hf16, ids, cu, targets)
    logits = model.logits(model(ids, cu)).float()
    F.cross_entropy(logits, targets).backward()
    logits = logits.detach()
    grads = gather_hf_state_dict(model, grads=True)

    err, err_hf = rel_err(logits, ref_logits), rel_err(hf_logits, ref_logits)
    assert err <= 2 * err_hf + 1e-3, (err, err_hf)
    assert set(grads) <= set(ref_grads)
    for name, g in grads.items():
        e, e_hf = rel_err(g.float(), ref_grads[name]), rel_err(hf_grads[name], ref_grads[name])
        assert e <= 3 * e_hf + 2e-3, (name, e, e_hf)


def _hf_greedy(hf, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt], device=DEVICE)
    with torch.no_grad():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


ENGINE_ARCH = {
    "model_type": "qwen2",
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
    "initializer_range": 0.2,
    "tie_word_embeddings": False,
}
ENGINE_PROMPTS = [[(7 * i + 3 * j) % 4096 for j in range(n)] for i, n in enumerate([5, 130, 31, 1, 257, 64])]
ENGINE_NEW_TOKENS = 64


def test_native_engine_greedy_matches_transformers(tmp_path):
    """fp32: token for token. bf16: the first difference, if any, is a near tie of the fp32 model."""
    torch.backends.cuda.matmul.allow_tf32 = False
    hf32 = _random_hf(ENGINE_ARCH, tmp_path / "ckpt")
    params = SamplingParams(temperature=0, max_tokens=ENGINE_NEW_TOKENS)

    model32 = load_pretrained(tmp_path / "ckpt", dtype=torch.float32, device=DEVICE)
    out = NativeEngine(model32).generate(ENGINE_PROMPTS, params)
    refs = [_hf_greedy(hf32, p, ENGINE_NEW_TOKENS) for p in ENGINE_PROMPTS]
    assert [cs[0].token_ids for cs in out] == refs

    hf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16).to(DEVICE).eval()
    model16 = load_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16, device=DEVICE)
    out16 = NativeEngine(model16).generate(ENGINE_PROMPTS, params)
    for prompt, cs in zip(ENGINE_PROMPTS, out16, strict=True):
        ours, theirs = cs[0].token_ids, _hf_greedy(hf16, prompt, ENGINE_NEW_TOKENS)
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)
        if first is None:
            continue
        with torch.no_grad():
            z = hf32(torch.tensor([prompt + ours[:first]], device=DEVICE)).logits[0, -1].float()
        gap = (z[ours[first]] - z[theirs[first]]).abs().item()
        assert gap <= 0.02 * z.abs().max().item(), (len(prompt), first, gap)


def test_ppo_step_of_a_qwen25_0p5b_shaped_model_with_optimizer_offload(tmp_path):
    """One whole train_step (rollout, reward, critic values, GAE, policy and critic updates) in bf16; during
    the rollout every optimizer state is in pinned CPU memory, and after it back on the GPU."""
    cfg = resolve(
        "tiny",
        overrides=[
            "model.dtype=bfloat16",
            "model.activation_checkpointing=true",
            "rollout.prompts_per_step=8",
            "rollout.samples_per_prompt=4",
            "rollout.max_tokens=64",
            "rollout.temperature=1.0",
            "logging.progress=false",
            "reward.workers=1",
            "train.deterministic=false",
        ],
    )
    cfg.model.arch = dict(QWEN25_0P5B)
    trainer = Trainer(cfg, tmp_path)
    optimizers = (trainer.policy_opt, trainer.critic_opt)
    states = lambda: [v for opt in optimizers for st in opt.state.values() for v in st.values()]
    seen = []
    generate = trainer.rollouts.engine.generate

    def watched_generate(*args, **kwargs):
        seen.extend((v.device.type, v.is_pinned()) for v in states())
        return generate(*args, **kwargs)

    trainer.rollouts.engine.generate = watched_generate
    before = trainer.policy.output_weight.detach().float().clone()
    try:
        metrics = trainer.train_step()
    finally:
        trainer.scorer.close()
    assert seen and set(seen) == {("cpu", True)}
    assert all(v.is_cuda for v in states())
    assert next(trainer.policy.parameters()).dtype == torch.bfloat16
    for name in ("policy_loss", "value_loss", "policy_grad_norm", "critic_grad_norm", "response_length_mean"):
        assert math.isfinite(metrics[name]), (name, metrics[name])
    assert metrics["policy_steps_skipped"] == 0 and metrics["critic_steps_skipped"] == 0
    assert not torch.equal(trainer.policy.output_weight.detach().float(), before), "the policy did not change"
