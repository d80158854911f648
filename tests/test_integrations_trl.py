"""orz_fast.integrations.trl: a tiny TRL GRPO run on CPU with and without the patch, the patched log-probs
against TRL's own fused head (three-run rule, float64 reference), and the peak memory of the log-prob
computation measured from the profiler's allocation records."""

import tempfile

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed, so the TRL patch is untested")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from torch._C._profiler import _EventType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from orz_fast.integrations import trl as orz_trl  # noqa: E402

VOCAB = 4096
STEPS = 4
ATOL = 1e-6


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins the words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left")


def _model(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    return Qwen2ForCausalLM(config).float()


def _reward(completions, **kwargs):
    return [sum(w.endswith("7") for w in c.split()) + 0.01 * len(c) for c in completions]


def _grpo_trainer(patched: bool) -> "trl.GRPOTrainer":
    prompts = [" ".join(f"t{(7 * i + 3 * j) % (VOCAB - 2) + 2}" for j in range(6 + i % 5)) for i in range(16)]
    args = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        max_steps=STEPS,
        num_iterations=2,  # the second pass over a batch has ratio != 1, so the loss is not 0
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = trl.GRPOTrainer(
        model=_model(),
        reward_funcs=_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=_tokenizer(),
    )
    if patched:
        assert orz_trl.patch(trainer) is trainer
    return trainer


@pytest.fixture(scope="module")
def grpo_runs():
    runs = {}
    for patched in (False, True):
        trainer = _grpo_trainer(patched)
        trainer.train()
        runs[patched] = [h for h in trainer.state.log_history if "loss" in h]
    return runs


def test_grpo_same_loss_with_and_without_patch(grpo_runs):
    plain, patched = grpo_runs[False], grpo_runs[True]
    assert len(plain) == len(patched) == STEPS
    print("\nstep  loss (TRL)          loss (patched)      grad_norm (TRL)  grad_norm (patched)")
    for i, (a, b) in enumerate(zip(plain, patched, strict=True)):
        print(f"{i + 1:>4}  {a['loss']:<+.12e}  {b['loss']:<+.12e}  {a['grad_norm']:.9f}      {b['grad_norm']:.9f}")
        # fp32 rounding of the log-probs, carried through up to four optimizer steps
        for key in {"loss", "grad_norm", "entropy", "reward"} & a.keys():
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (i, key, a[key], b[key])
    assert abs(plain[1]["loss"]) > 1e-3 and abs(plain[3]["loss"]) > 1e-3  # the compared losses are not 0


def _scoring_batch(B=8, P=48, K=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (B, P + K), generator=gen)
    attention = torch.ones_like(ids)
    attention[: B // 2, :10] = 0  # left-padded prompts
    attention[2, -5:] = 0  # a completion that stopped early
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :-K] = -100  # only completion tokens are scored, as GRPO does
    return ids, attention, labels, K


def _score(model, ids, attention, labels, K):
    out = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
    logp, entropy = out.log_probs[:, -K:], out.entropy[:, -K:]
    # a loss using both outputs, so both backward paths run
    (logp.sum() + 0.1 * entropy.sum()).backward()
    return logp.detach(), entropy.detach()


def _score_reference_fp64(model, ids, attention, labels, K):
    """Float64 plain-logits reference: the [B, T, V] log-softmax, in a float64 copy of the model."""
    model = model.double()
    logits = model(input_ids=ids, attention_mask=attention).logits[:, -K - 1 : -1]
    logp_all = torch.log_softmax(logits, dim=-1)
    mask = labels[:, -K:] != -100
    logp = logp_all.gather(-1, ids[:, -K:, None]).squeeze(-1) * mask
    entropy = -(logp_all.exp() * logp_all).sum(-1) * mask
    (logp.sum() + 0.1 * entropy.sum()).backward()
    return logp.detach(), entropy.detach()


def _grads(model):
    return {
        "lm_head": model.lm_head.weight.grad.clone(),
        "last_mlp": model.model.layers[-1].mlp.down_proj.weight.grad.clone(),
    }


def _err(a, ref):
    return (a.double() - ref.double()).abs().max().item()


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_patched_logprobs_match_trl_fused_head(autocast):
    batch = _scoring_batch()
    results = {}
    for name in ("trl", "orz", "fp64"):
        model = _model(seed=1)
        if name in ("trl", "orz"):
            if name == "trl":
                add_fused_lm_head(model, outputs=("log_probs", "entropy"))
            else:
                orz_trl.linear_logprobs_forward(model)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = _score(model, *batch)
        else:
            out = _score_reference_fp64(model, *batch)
        results[name] = (*out, _grads(model))
    (lp_t, ent_t, g_t), (lp_o, ent_o, g_o), (lp_r, ent_r, g_r) = results["trl"], results["orz"], results["fp64"]
    assert _err(lp_o, lp_r) <= 2 * _err(lp_t, lp_r) + ATOL
    assert _err(ent_o, ent_r) <= 2 * _err(ent_t, ent_r) + ATOL
    for key in g_r:
        assert _err(g_o[key], g_r[key]) <= 3 * _err(g_t[key], g_r[key]) + ATOL, key
    _, _, labels, K = batch
    assert (lp_o[labels[:, -K:] != -100] < 0).all()


def peak_allocated_bytes(fn) -> int:
    """Peak of live CPU tensor bytes allocated inside ``fn`` (allocation records of the profiler)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            records.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    live = peak = 0
    for _, size in sorted(records):
        live += size
        peak = max(peak, live)
    return peak


def test_patched_logprob_peak_memory_is_lower():
    ids, attention, labels, K = _scoring_batch()
    model = _model(seed=2)

    def plain_logits():
        # what the issue replaces: [B, T, V] logits, then log-softmax (TRL before its fused head)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, -K - 1 : -1]
        logp_all = torch.log_softmax(logits.float(), dim=-1)
        logp = logp_all.gather(-1, ids[:, -K:, None]).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        (logp.sum() + 0.1 * entropy.sum()).backward()

    peaks = {"plain [B, T, V] logits": peak_allocated_bytes(plain_logits)}
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    peaks["TRL fused head"] = peak_allocated_bytes(lambda: _score(model, ids, attention, labels, K))
    orz_trl.linear_logprobs_forward(model)
    peaks["orz_fast patch"] = peak_allocated_bytes(lambda: _score(model, ids, attention, labels, K))
    scored = int((labels[:, 1:] != -100).sum())
    print(f"\nlog-prob forward + backward, B={ids.shape[0]} T={ids.shape[1]} V={VOCAB}, {scored} scored tokens:")
    for name, peak in peaks.items():
        print(f"  {name:<24} peak {peak / 2**20:8.2f} MiB")
    assert peaks["orz_fast patch"] < peaks["TRL fused head"]
    assert peaks["orz_fast patch"] < peaks["plain [B, T, V] logits"]


def test_patch_refuses_unsupported_heads():
    model = _model()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        orz_trl.linear_logprobs_forward(model)
