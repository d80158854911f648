"""The native engine's sampling log-probs are the trainer's log-probs of the sampled tokens.

The trainer's side is ``orz_fast.models.lm_head.packed_token_logprobs``: one packed forward of prompt plus
response and ``ops.linear_logprobs``. In fp32 the two agree to 1e-6 on every response token (random Qwen2 and
Llama at the Hugging Face default initialisation; TP = 2 and PP = 2 in ``test_rollout_engine_tp.py``); in bf16
the gap is measured. Also: the decode attention's Triton kernel (interpreted) runs the engine end to end, and
the engine reports the K/V bytes its decode attention read against the minimum.
"""

import pytest
import torch
from test_rollout_engine import LLAMA, PROMPTS, QWEN2

from orz_fast import parallel
from orz_fast.models import build_model
from orz_fast.models.lm_head import packed_token_logprobs
from orz_fast.rollout import NativeEngine, SamplingParams

# The engine tests' 0.2 makes logits of tens, where the fp32 rounding of two differently scheduled forwards
# (one token at a time against the whole sequence at once) alone reaches 1e-5.
ARCHS = {"qwen2": {**QWEN2, "initializer_range": 0.02}, "llama": {**LLAMA, "initializer_range": 0.02}}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def single_process():
    parallel.initialize(1, 1)


def trainer_logprobs(model, prompts, completions, temperature):
    """(trainer log-probs, rollout log-probs) of every response token, all sequences packed in one batch."""
    ids, bounds, rows, targets, rollout = [], [0], [], [], []
    for prompt, cs in zip(prompts, completions, strict=True):
        for c in cs:
            start = len(ids)
            ids += prompt + c.token_ids.tolist()
            bounds.append(len(ids))
            rows += [start + len(prompt) - 1 + t for t in range(len(c.token_ids))]
            targets += c.token_ids.tolist()
            rollout += c.logprobs.tolist()
    want = packed_token_logprobs(
        model,
        torch.tensor(ids),
        torch.tensor(bounds),
        torch.tensor(rows),
        torch.tensor(targets),
        temperature=temperature,
    )
    return want, torch.tensor(rollout)


@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_fp32_rollout_logprobs_equal_the_trainers(name, temperature, top_p):
    model = build_model(ARCHS[name], seed=0, device="cpu")
    params = SamplingParams(n=3, temperature=temperature, top_p=top_p, seed=4, max_tokens=40)
    out = NativeEngine(model, block_size=8).generate(PROMPTS, params)
    want, got = trainer_logprobs(model, PROMPTS, out, temperature)
    gap = (want - got).abs()
    assert gap.numel() == 5 * 3 * 40
    assert float(gap.max()) <= 1e-6, (float(gap.mean()), float(gap.max()))


def test_bf16_gap_is_measured_and_small():
    model = build_model(ARCHS["qwen2"], seed=0, device="cpu", dtype=torch.bfloat16)
    out = NativeEngine(model).generate(PROMPTS, SamplingParams(n=3, temperature=1.0, seed=4, max_tokens=40))
    want, got = trainer_logprobs(model, PROMPTS, out, 1.0)
    gap = (want - got).abs()
    print(f"\nbf16 rollout-trainer log-prob gap: mean {float(gap.mean()):.2e}, max {float(gap.max()):.2e}")
    assert float(gap.mean()) <= 1e-2


def test_triton_decode_attention_runs_the_engine():
    """The GPU decode kernel, in Triton's interpreter: the default engine's greedy tokens, and log-probs equal to
    the trainer's to the same 1e-6."""
    model = build_model(ARCHS["llama"], seed=1, device="cpu")
    prompts = PROMPTS[:3]
    params = SamplingParams(temperature=0, max_tokens=12)
    want = NativeEngine(model, block_size=4).generate(prompts, params)
    got = NativeEngine(model, block_size=4, decode_attention="triton").generate(prompts, params)
    assert [cs[0].token_ids.tolist() for cs in got] == [cs[0].token_ids.tolist() for cs in want]
    trainer, rollout = trainer_logprobs(model, prompts, got, 1.0)
    assert float((trainer - rollout).abs().max()) <= 1e-6
    with pytest.raises(ValueError, match="decode_attention must be None or one of"):
        NativeEngine(model, decode_attention="sdpa")


def test_kv_bytes_read_against_the_minimum():
    """Shared prompts are read once for all their samples (below the per-sequence minimum); without sharing the
    reads are each context plus its last block's unused slots."""
    model = build_model(ARCHS["qwen2"], seed=0, device="cpu")
    engine = NativeEngine(model, block_size=8)
    engine.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, seed=0, max_tokens=24))
    shared = dict(engine.last_stats)
    assert 0 < shared["kv_bytes_read"] < shared["kv_bytes_min"]
    engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24))
    alone = dict(engine.last_stats)
    assert alone["kv_bytes_min"] <= alone["kv_bytes_read"] <= 1.2 * alone["kv_bytes_min"]
    # per token: 2 (K, V) x layers x kv heads x head dim x 4 bytes, summed over each decode step's contexts
    per_token = 2 * 2 * 2 * 16 * 4
    contexts = sum(len(p) + t for p in PROMPTS for t in range(1, 24))
    assert alone["kv_bytes_min"] == contexts * per_token
