"""Single-process model tests: logits / gradient parity with transformers, checkpoint I/O, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import smollm2_gguf
from dist_models_worker import (
    LLAMA_ARCH,
    ODD_VOCAB_ARCHS,
    QWEN2_ARCH,
    make_hf_checkpoint,
    packed_batches,
    rel_err,
)
from safetensors.torch import load_file

from orz_fast import parallel
from orz_fast.models import (
    CheckpointError,
    CriticModel,
    ModelSpec,
    PolicyModel,
    UnsupportedModelError,
    build_model,
    gather_hf_state_dict,
    load_pretrained,
    model_from_config,
    save_pretrained,
)
from orz_fast.models.spec import VOCAB_PAD_MULTIPLE, padded_vocab_size

TOL = 1e-4
LENS = [5, 9, 3]


@pytest.fixture(scope="module", autouse=True)
def _single_process():
    parallel.initialize(1, 1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    archs = {"qwen2": QWEN2_ARCH, "llama": LLAMA_ARCH, **ODD_VOCAB_ARCHS}
    hf = {name: make_hf_checkpoint(arch, root / name) for name, arch in archs.items()}
    return root, hf


ALL = ["qwen2", "llama", *ODD_VOCAB_ARCHS]


def _packed(vocab: int, lens: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sum(lens),), generator=g)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return ids, cu


def _hf_logits_per_sequence(hf, ids, cu):
    with torch.no_grad():
        return torch.cat([hf(ids[a:b][None]).logits[0] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)])


def _check_logits_parity(model: PolicyModel, hf, lens: list[int]) -> None:
    ids, cu = _packed(model.spec.vocab_size, lens)
    ref = _hf_logits_per_sequence(hf, ids, cu)
    with torch.no_grad():
        packed = model.logits(model(ids, cu))
        assert rel_err(packed, ref) <= TOL
        # One sequence at a time gives the same logits as the packed stream (no cross-segment attention).
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            alone = model.logits(model(ids[a:b], torch.tensor([0, b - a], dtype=torch.int32)))
            assert rel_err(alone, ref[a:b]) <= TOL


@pytest.mark.parametrize("name", ALL)
def test_logits_match_transformers(checkpoints, name):
    root, hf = checkpoints
    model = load_pretrained(root / name)
    spec = model.spec
    llama = name.startswith("llama")
    assert spec.tie_word_embeddings == llama
    assert spec.qkv_bias == (not llama)
    assert spec.rope_theta == (LLAMA_ARCH if llama else QWEN2_ARCH)["rope_theta"]
    if llama:
        assert model.output_weight is model.embed.weight
    _check_logits_parity(model, hf[name], LENS)


@pytest.mark.parametrize("name", ODD_VOCAB_ARCHS)
def test_odd_vocabulary_is_padded_with_zero_rows(checkpoints, name):
    root, hf = checkpoints
    model = load_pretrained(root / name)
    v, vp = model.spec.vocab_size, model.padded_vocab_size
    assert v == ODD_VOCAB_ARCHS[name]["vocab_size"] and vp % VOCAB_PAD_MULTIPLE == 0 and vp - v < VOCAB_PAD_MULTIPLE
    assert model.embed.weight.shape == model.output_weight.shape == (vp, model.spec.hidden_size)
    assert not model.embed.weight[v:].any() and not model.output_weight[v:].any()
    assert torch.equal(model.output_weight[:v], hf[name].lm_head.weight)
    # log-probs of the padded head with the real vocabulary equal the logits' log-softmax
    from orz_fast import ops

    ids, cu = _packed(v, LENS)
    with torch.no_grad():
        hidden = model(ids, cu)
        want = torch.log_softmax(model.logits(hidden), dim=-1).gather(1, ids[:, None]).squeeze(1)
        got = ops.linear_logprobs(hidden, model.output_weight, ids, vocab_size=v)
    assert rel_err(got, want) <= TOL
    # a random model's real rows do not depend on the padding; its padding rows are zero too
    arch = ODD_VOCAB_ARCHS[name]
    a, b = build_model(arch, seed=3), build_model(arch, seed=3, vocab_pad_multiple=1)
    assert b.padded_vocab_size == v and torch.equal(a.embed.weight[:v], b.embed.weight)
    assert not a.embed.weight[v:].any()


def test_padded_vocab_size():
    assert padded_vocab_size(127, 1) == 128 and padded_vocab_size(127, 2) == 256
    assert padded_vocab_size(50257, 1) == 50304 and padded_vocab_size(50257, 2) == 50432
    assert padded_vocab_size(151665, 8) == 152576 and padded_vocab_size(152064, 2) == 152064
    assert padded_vocab_size(50257, 2, 1) == 50258 and padded_vocab_size(128, 1) == 128
    for bad in ((0, 1), (127, 0), (127, 1, 0), (127.0, 1)):
        with pytest.raises(ValueError, match="must be an int >= 1"):
            padded_vocab_size(*bad)
    # any vocabulary splits at any TP size that divides the heads
    ModelSpec.from_hf_config(ODD_VOCAB_ARCHS["llama-v50257"]).check_layout(tp=2, pp=1)


@pytest.mark.parametrize("name", ALL)
def test_gradients_match_transformers(checkpoints, name):
    root, hf = checkpoints
    hf_model = hf[name]
    model = load_pretrained(root / name, activation_checkpointing=True)
    batch = packed_batches(model.spec.vocab_size)[0]
    ids, cu, targets = batch["input_ids"], batch["cu_seqlens"], batch["targets"]

    loss = F.cross_entropy(model.logits(model(ids, cu)), targets)
    loss.backward()
    ours = gather_hf_state_dict(model, grads=True)

    hf_model.zero_grad()
    bounds = cu.tolist()
    logits = torch.cat([hf_model(ids[a:b][None]).logits[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    ref_loss = F.cross_entropy(logits, targets)
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item())
    ref = {n: p.grad for n, p in hf_model.named_parameters()}
    assert set(ours) == set(ref)
    for n in ref:
        assert rel_err(ours[n], ref[n]) <= TOL, n


def test_smollm2_gguf_logits_match_transformers():
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf()
    model = load_pretrained(path)
    assert model.spec.model_type == "llama" and model.spec.tie_word_embeddings
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    _check_logits_parity(model, hf, [6, 11, 4])


def test_save_load_round_trip_and_transformers_loads(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    root, hf = checkpoints
    for name in ALL:
        model = load_pretrained(root / name)
        out = save_pretrained(model, tmp_path / name)
        saved, source = load_file(out / "model.safetensors"), load_file(root / name / "model.safetensors")
        assert saved.keys() == source.keys()
        assert all(torch.equal(saved[k], source[k]) for k in saved)
        reloaded = load_pretrained(out)
        for (n, a), (_, b) in zip(model.named_parameters(), reloaded.named_parameters(), strict=True):
            assert torch.equal(a, b), n
        hf_loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        ids, cu = _packed(model.spec.vocab_size, LENS)
        assert torch.equal(_hf_logits_per_sequence(hf_loaded, ids, cu), _hf_logits_per_sequence(hf[name], ids, cu))


def test_sharded_save_and_load(checkpoints, tmp_path):
    root, _ = checkpoints
    model = load_pretrained(root / "qwen2")
    out = save_pretrained(model, tmp_path / "sharded", max_shard_bytes=16_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = load_pretrained(out)
    for (n, a), (_, b) in zip(model.named_parameters(), reloaded.named_parameters(), strict=True):
        assert torch.equal(a, b), n


def test_critic_from_policy_checkpoint_gets_fresh_value_head(checkpoints, tmp_path):
    root, hf = checkpoints
    critic = load_pretrained(root / "qwen2", role="critic", value_head_seed=3)
    assert isinstance(critic, CriticModel)
    head = critic.value_head.weight
    h = critic.spec.hidden_size
    assert head.shape == (1, h) and head.abs().sum() > 0
    assert abs(head.std().item() - 1 / (h + 1)) < 0.5 / (h + 1)
    ids, cu = _packed(critic.spec.vocab_size, LENS)
    with torch.no_grad():
        values = critic(ids, cu)
        bounds = cu.tolist()
        hidden = torch.cat(
            [
                hf["qwen2"].model(ids[a:b][None]).last_hidden_state[0]
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            ]
        )
    assert values.shape == (ids.numel(),)
    assert rel_err(values, hidden @ head[0]) <= TOL
    # Saving a critic keeps its value head; loading it back restores the head exactly.
    out = save_pretrained(critic, tmp_path / "critic")
    again = load_pretrained(out, role="critic", value_head_seed=99)
    assert torch.equal(again.value_head.weight, head)


def test_random_model_from_arch_is_seeded_and_round_trips(tmp_path):
    a = build_model(QWEN2_ARCH, seed=5)
    b = build_model(QWEN2_ARCH, seed=5)
    c = build_model(QWEN2_ARCH, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.layers[0].qkv.weight, c.layers[0].qkv.weight)
    out = save_pretrained(a, tmp_path / "random")
    back = load_pretrained(out)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), back.parameters(), strict=True))


def test_activation_checkpointing_gives_same_gradients():
    batch = packed_batches(QWEN2_ARCH["vocab_size"])[0]
    grads = []
    for ckpt in (False, True):
        model = build_model(QWEN2_ARCH, seed=1, activation_checkpointing=ckpt)
        F.cross_entropy(model.logits(model(batch["input_ids"], batch["cu_seqlens"])), batch["targets"]).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(x, y) for x, y in zip(*grads, strict=True))


def test_forward_backward_averages_micro_batches():
    batches = packed_batches(QWEN2_ARCH["vocab_size"])
    model = build_model(QWEN2_ARCH, seed=2)

    def loss_fn(hidden, batch):
        loss = F.cross_entropy(model.logits(hidden), batch["targets"])
        return loss, {"loss": loss.detach()}

    stats = parallel.forward_backward(model, batches, loss_fn)
    assert len(stats) == 2
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for batch in batches:
        (loss_fn(model(batch["input_ids"], batch["cu_seqlens"]), batch)[0] / len(batches)).backward()
    for x, y in zip(got, (p.grad for p in model.parameters()), strict=True):
        assert rel_err(x, y) <= 1e-6
    outs = parallel.forward_backward(model, batches, lambda h, b: h.shape, forward_only=True)
    assert outs == [torch.Size([17, 32]), torch.Size([11, 32])]


def test_unsupported_architecture(tmp_path):
    with pytest.raises(UnsupportedModelError, match="unsupported architecture.*gpt2"):
        ModelSpec.from_hf_config({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_pretrained(d)
    with pytest.raises(UnsupportedModelError, match="rope type 'yarn'"):
        ModelSpec.from_hf_config({**QWEN2_ARCH, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_heads_not_divisible_by_tp():
    spec = ModelSpec.from_hf_config({**QWEN2_ARCH, "num_key_value_heads": 1})
    with pytest.raises(ValueError, match="num_key_value_heads=1 is not divisible by tensor-parallel size tp=2"):
        spec.check_layout(tp=2, pp=1)
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by tensor-parallel size tp=3"):
        ModelSpec.from_hf_config(QWEN2_ARCH).check_layout(tp=3, pp=1)


def test_missing_shard_and_shape_mismatch(checkpoints, tmp_path):
    root, _ = checkpoints
    model = load_pretrained(root / "qwen2")
    sharded = save_pretrained(model, tmp_path / "sharded", max_shard_bytes=16_000)
    missing = sorted(sharded.glob("model-*.safetensors"))[-1]
    missing.unlink()
    with pytest.raises(CheckpointError, match=f"missing.*{missing.name}"):
        load_pretrained(sharded)

    bad = tmp_path / "bad"
    shutil.copytree(root / "qwen2", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape mismatch for tensor 'model\.layers\.0\.mlp\.gate_proj\.weight'"):
        load_pretrained(bad)

    tensors = load_file(root / "qwen2" / "model.safetensors")
    del tensors["model.norm.weight"]
    from safetensors.torch import save_file

    save_file(tensors, str(bad / "model.safetensors"))
    (bad / "config.json").write_text((root / "qwen2" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no tensor 'model.norm.weight'"):
        load_pretrained(bad)


def test_bad_cu_seqlens_raise():
    model = build_model(QWEN2_ARCH)
    ids = torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to T=6"):
        model(ids, torch.tensor([0, 4, 5]))
    with pytest.raises(ValueError, match="input_ids must be a 1-D"):
        model(ids[None], torch.tensor([0, 6]))


def test_model_from_config(checkpoints):
    from orz_fast.config import ModelConfig

    root, _ = checkpoints
    policy = model_from_config(ModelConfig(arch=dict(QWEN2_ARCH), dtype="bfloat16"), device="cpu")
    assert isinstance(policy, PolicyModel) and policy.output_weight.dtype == torch.float32
    critic = model_from_config(ModelConfig(path=str(root / "llama")), role="critic", device="cpu")
    assert isinstance(critic, CriticModel)
    assert torch.equal(critic.embed.weight, load_pretrained(root / "llama").embed.weight)
