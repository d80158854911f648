"""Native rollout engine on random-weight Qwen2 / Llama models (CPU, fp32).

Greedy output is checked token for token against transformers ``generate``; sampling
against the model's own full (uncached) forward: log-probs, top-p support, the first-token
distribution (chi-square), and the counter-based seeding that makes ``n`` shared-prompt
samples equal ``n`` independent requests. Also: continuous batching and preemption leave
outputs unchanged, stop ids / context limit, weight updates seen with no copy, bad inputs.
"""

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from orz_fast import parallel
from orz_fast.models import build_model, load_pretrained
from orz_fast.rollout import NativeEngine, SamplingParams
from orz_fast.rollout.kv_cache import PagedKVCache

QWEN2 = {
    "model_type": "qwen2",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "initializer_range": 0.2,
    "tie_word_embeddings": False,
}
LLAMA = {
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "max_position_embeddings": 256,
    "rope_theta": 50000.0,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.2,
    "tie_word_embeddings": True,
}
NEW_TOKENS = 48
CHI2_999_DF7 = 24.322


def make_prompts(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


PROMPTS = make_prompts([5, 31, 12, 1, 20], 256)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def single_process():
    parallel.initialize(1, 1)


def hf_and_orz(arch, tmp_path):
    """A transformers model with random weights (biases too) and the same checkpoint loaded by orz_fast."""
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(**arch)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    hf.save_pretrained(tmp_path)
    return hf, load_pretrained(tmp_path, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def models(request, tmp_path_factory):
    arch = QWEN2 if request.param == "qwen2" else LLAMA
    return hf_and_orz(arch, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return hf_and_orz(QWEN2, tmp_path_factory.mktemp("qwen"))[1]


def hf_greedy(hf, prompt, max_new_tokens):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


@torch.no_grad()
def full_logits(model, prompt, tokens):
    """fp32 logits [len(tokens), V] predicting each of ``tokens`` from an uncached forward."""
    ids = torch.tensor(prompt + tokens)
    hidden = model(ids, torch.tensor([0, len(ids)]))
    return model.logits(hidden).float()[len(prompt) - 1 : -1]


def test_greedy_matches_transformers(models):
    hf, model = models
    refs = [hf_greedy(hf, p, NEW_TOKENS) for p in PROMPTS]
    engine = NativeEngine(model)
    out = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
    assert [[c.token_ids.tolist() for c in cs] for cs in out] == [[r] for r in refs]
    assert all(c.finish_reason == "length" and c.text is None for cs in out for c in cs)
    assert all(c.token_ids.dtype == np.int64 and c.logprobs.dtype == np.float32 for cs in out for c in cs)
    assert len({tuple(r) for r in refs}) == len(refs)

    # Continuous batching: 2 seats, tiny blocks and token budget, staggered lengths -> same tokens.
    small = NativeEngine(model, block_size=4, max_num_seqs=2, max_num_batched_tokens=40)
    lengths = [48, 7, 30, 1, 19]
    out = small.generate(PROMPTS, [SamplingParams(temperature=0, max_tokens=n) for n in lengths])
    assert [cs[0].token_ids.tolist() for cs in out] == [r[:n] for r, n in zip(refs, lengths, strict=True)]
    assert small.last_stats["steps"] > max(lengths) + 1


def test_odd_vocabulary_never_samples_padding(tmp_path):
    """131 ids padded to 256 rows: greedy equals transformers, and hot sampling over the real ids only (the
    zero padding rows would be about half the draws if they were not masked)."""
    hf, model = hf_and_orz({**QWEN2, "vocab_size": 131}, tmp_path)
    assert model.padded_vocab_size == 256
    prompts = make_prompts([5, 12, 20], 131, seed=1)
    engine = NativeEngine(model)
    out = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=24))
    assert [cs[0].token_ids.tolist() for cs in out] == [hf_greedy(hf, p, 24) for p in prompts]
    hot = engine.generate(prompts, SamplingParams(n=8, temperature=2.0, seed=3, max_tokens=24))
    ids = [t for cs in hot for c in cs for t in c.token_ids.tolist()]
    assert max(ids) < 131 and len(set(ids)) > 60
    c = hot[0][0]
    want = torch.log_softmax(full_logits(model, prompts[0], c.token_ids.tolist()) / 2.0, dim=-1)
    got = want.gather(1, torch.tensor(c.token_ids.tolist())[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(c.logprobs), got, rtol=0, atol=1e-4)


def test_logprobs_equal_full_forward_log_softmax(qwen):
    params = SamplingParams(n=3, temperature=0.7, top_p=0.95, top_k=50, seed=1234, max_tokens=24)
    out = NativeEngine(qwen, block_size=8).generate(PROMPTS[:3], params)
    for prompt, cs in zip(PROMPTS, out, strict=False):
        for c in cs:
            logp = torch.log_softmax(full_logits(qwen, prompt, c.token_ids.tolist()) / 0.7, dim=-1)
            want = logp.gather(1, torch.tensor(c.token_ids.tolist())[:, None]).squeeze(1)
            torch.testing.assert_close(torch.tensor(c.logprobs), want, rtol=0, atol=1e-4)
    greedy = NativeEngine(qwen).generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=8))[0][0]
    want = torch.log_softmax(full_logits(qwen, PROMPTS[0], greedy.token_ids.tolist()), dim=-1).max(dim=-1).values
    torch.testing.assert_close(torch.tensor(greedy.logprobs), want, rtol=0, atol=1e-4)


def test_fixed_seed_reproducible_and_n_samples_equal_independent_requests(qwen):
    engine = NativeEngine(qwen, block_size=4)
    params = SamplingParams(n=4, temperature=1.0, seed=99, max_tokens=20)
    a = engine.generate(PROMPTS, params)
    shared_prefill = engine.last_stats["prefill_tokens"]
    b = engine.generate(PROMPTS, params)
    assert [[c.token_ids.tolist() for c in cs] for cs in a] == [[c.token_ids.tolist() for c in cs] for cs in b]
    # The prompt's KV is computed once for its 4 samples.
    assert shared_prefill == sum(len(p) for p in PROMPTS)
    samples = {tuple(c.token_ids.tolist()) for cs in a for c in cs}
    assert len(samples) == 4 * len(PROMPTS)

    singles = [SamplingParams(temperature=1.0, seed=99 + j, max_tokens=20) for j in range(4)]
    for prompt, cs in zip(PROMPTS, a, strict=True):
        alone = engine.generate([prompt] * 4, singles)
        assert [c.token_ids.tolist() for c in cs] == [s[0].token_ids.tolist() for s in alone]
        for c, s in zip(cs, alone, strict=True):
            torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(s[0].logprobs), rtol=0, atol=1e-5)
    other = engine.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, seed=100, max_tokens=20))
    assert [cs[0].token_ids.tolist() for cs in other] == [cs[1].token_ids.tolist() for cs in a]


def nucleus_violations(model, prompt, tokens, temperature, top_p):
    """Positions whose token lies outside the smallest set of top tokens reaching mass ``top_p``."""
    probs = torch.softmax(full_logits(model, prompt, tokens) / temperature, dim=-1)
    p_tok = probs.gather(1, torch.tensor(tokens)[:, None])
    mass_above = (probs * (probs > p_tok)).sum(dim=-1)
    return int((mass_above >= top_p + 1e-5).sum())


def test_top_p_restricts_to_the_nucleus(qwen):
    engine = NativeEngine(qwen)
    kw = {"n": 8, "temperature": 1.5, "seed": 5, "max_tokens": 24}
    truncated = engine.generate(PROMPTS[:2], SamplingParams(top_p=0.3, **kw))
    full = engine.generate(PROMPTS[:2], SamplingParams(top_p=1.0, **kw))
    for prompt, cs_t, cs_f in zip(PROMPTS, truncated, full, strict=False):
        assert sum(nucleus_violations(qwen, prompt, c.token_ids.tolist(), 1.5, 0.3) for c in cs_t) == 0
        # Without top-p the same check fails: the test can tell truncation from none.
        assert sum(nucleus_violations(qwen, prompt, c.token_ids.tolist(), 1.5, 0.3) for c in cs_f) > 0


def test_first_token_distribution_matches_softmax():
    arch = {**QWEN2, "vocab_size": 8, "num_hidden_layers": 1, "initializer_range": 0.1}
    model = build_model(arch, seed=3, device="cpu")
    prompt = [1, 2, 3, 4, 5]
    n = 3000
    engine = NativeEngine(model, max_num_seqs=256)
    out = engine.generate([prompt], SamplingParams(n=n, temperature=1.0, seed=0, max_tokens=1))[0]
    counts = torch.bincount(torch.tensor([int(c.token_ids[0]) for c in out]), minlength=8).double()
    probs = torch.softmax(full_logits(model, prompt, [0])[0].double(), dim=-1)
    assert probs.min() > 0.01  # every bin has a usable expected count
    chi2 = float(((counts - n * probs) ** 2 / (n * probs)).sum())
    assert chi2 < CHI2_999_DF7, (chi2, counts.tolist(), (n * probs).tolist())
    assert engine.last_stats["steps"] == -(-n // 256)  # 256 seats: the group is admitted in parts


def test_small_kv_budget_preempts_without_changing_outputs(qwen):
    per_block = PagedKVCache.bytes_per_block(num_layers=2, block_size=4, kv_heads=2, head_dim=16, dtype=torch.float32)
    longest = max(len(p) for p in PROMPTS) + 40
    tight = NativeEngine(qwen, block_size=4, kv_cache_bytes=per_block * (-(-longest // 4) + 3))
    roomy = NativeEngine(qwen, block_size=4)
    for params in (
        SamplingParams(temperature=0, max_tokens=40),
        SamplingParams(n=3, temperature=1.0, seed=8, max_tokens=40),
    ):
        want = roomy.generate(PROMPTS, params)
        got = tight.generate(PROMPTS, params)
        assert tight.last_stats["preemptions"] > 0
        assert roomy.last_stats["preemptions"] == 0
        assert [[c.token_ids.tolist() for c in cs] for cs in got] == [[c.token_ids.tolist() for c in cs] for cs in want]
        # each sequence's log-probs land in its own slice, in order, across preemptions and recomputes
        for cs_got, cs_want in zip(got, want, strict=True):
            for a, b in zip(cs_got, cs_want, strict=True):
                np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-5)


def test_stop_token_ids_and_context_limit(qwen):
    engine = NativeEngine(qwen)
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
    ref = greedy[1][0].token_ids.tolist()
    stop = ref[10]
    first = ref.index(stop)
    out = engine.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=NEW_TOKENS, stop_token_ids=[stop]))
    assert out[0][0].token_ids.tolist() == ref[: first + 1]
    assert out[0][0].finish_reason == "stop"
    assert len(out[0][0].logprobs) == first + 1

    limited = NativeEngine(qwen, max_model_len=len(PROMPTS[1]) + 5)
    out = limited.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
    assert out[0][0].token_ids.tolist() == ref[:5]
    assert out[0][0].finish_reason == "length"


def test_optimizer_update_is_seen_without_a_copy(tmp_path):
    _, model = hf_and_orz(QWEN2, tmp_path)
    engine = NativeEngine(model)
    prompt = PROMPTS[1]
    params = SamplingParams(temperature=0, max_tokens=16)
    before = engine.generate([prompt], params)[0][0].token_ids.tolist()
    ptrs = {name: p.data_ptr() for name, p in model.named_parameters()}

    # One optimizer step that makes token 7 the model's favourite continuation.
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ids = torch.tensor(prompt + before)
    logits = model.logits(model(ids, torch.tensor([0, len(ids)])))
    loss = torch.nn.functional.cross_entropy(logits[len(prompt) - 1 :], torch.full((len(before) + 1,), 7))
    loss.backward()
    opt.step()

    after = engine.generate([prompt], params)[0][0].token_ids.tolist()
    assert after != before
    ref = []
    for _ in range(16):
        ref.append(int(full_logits(model, prompt, ref + [0])[-1].argmax()))
    assert after == ref
    assert engine.model is model
    assert {name: p.data_ptr() for name, p in engine.model.named_parameters()} == ptrs


def test_bad_inputs_raise(qwen):
    engine = NativeEngine(qwen)
    ok = SamplingParams(max_tokens=4)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1, 2], []], ok)
    with pytest.raises(ValueError, match="256 tokens.*max_model_len=256"):
        engine.generate([[1] * 256], ok)
    with pytest.raises(ValueError, match="token id 256 outside"):
        engine.generate([[1, 256]], ok)
    with pytest.raises(ValueError, match=r"n must be an int >= 1, got 0"):
        SamplingParams(n=0)
    for top_p in (0.0, 1.5):
        with pytest.raises(ValueError, match=rf"top_p must be in \(0, 1\], got {top_p}"):
            SamplingParams(top_p=top_p)
    with pytest.raises(ValueError, match="stop strings"):
        engine.generate([[1, 2]], SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="list of 2"):
        engine.generate([[1], [2]], [ok])
    with pytest.raises(ValueError, match="list of token ids"):
        engine.generate(["hello"], ok)
    per_block = PagedKVCache.bytes_per_block(num_layers=2, block_size=16, kv_heads=2, head_dim=16, dtype=torch.float32)
    small = NativeEngine(qwen, kv_cache_bytes=per_block * 2)
    with pytest.raises(ValueError, match=r"budget of 16384 bytes holds 2 blocks.*prompt 30 \+ max_tokens 10.*needs 3"):
        small.generate([[1] * 30], SamplingParams(max_tokens=10))
    assert small.generate([[1] * 20], SamplingParams(max_tokens=10))[0][0].finish_reason == "length"
    with pytest.raises(ValueError, match="block_size"):
        NativeEngine(qwen, block_size=0)
    with pytest.raises(TypeError, match="PolicyModel"):
        NativeEngine(build_model(QWEN2, role="critic", device="cpu"))
    other = build_model(QWEN2, device="cpu")
    other.layers[1].o_proj.skip_bias_add = True
    with pytest.raises(ValueError, match=r"layers\.1\.o_proj"):
        NativeEngine(other)
