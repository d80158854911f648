"""A TP=2 policy on two gloo processes pushes into one vLLM engine of TP 1; run by tests/test_vllm_engine.py.

As ``torchrun --nproc_per_node 2 tests/vllm_tp_worker.py CKPT OUT``: both ranks load ``CKPT``
with tensor parallelism 2; rank 0 owns a vLLM engine and pushes (every rank takes part in the
gathers of ``iter_hf_tensors``; rank 1 walks the stream without an engine), then generates
greedily and writes ``OUT/report.json`` with the tokens and log-probs.

It also holds the random-weight architectures the vLLM tests share: head sizes that vLLM's CPU
attention serves (32), a vocabulary that is no multiple of 64, GQA down to one KV head, tied
and untied LM heads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

QWEN2_GQA1 = {
    "model_type": "qwen2",
    "vocab_size": 131,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "rope_theta": 5000.0,
    "tie_word_embeddings": False,
    "max_position_embeddings": 128,
    "initializer_range": 0.2,
}
"""Untied head, QKV bias, one KV head for two query heads."""

LLAMA_TIED = {
    "model_type": "llama",
    "vocab_size": 130,
    "hidden_size": 128,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "max_position_embeddings": 128,
    "initializer_range": 0.2,
}
"""Tied embeddings, no bias, GQA 4 / 2 (splits over TP=2)."""

PROMPTS = [[3, 17, 42, 99, 5], [100, 1], [7] * 9, [64]]
ENGINE_KWARGS = {"kv_cache_bytes": 16 << 20, "dtype": "float32", "enforce_eager": True, "max_model_len": 128}


def main(ckpt: Path, out: Path) -> None:
    import torch.distributed as dist

    from orz_fast import parallel
    from orz_fast.models import load_pretrained
    from orz_fast.rollout import SamplingParams, VllmEngine
    from orz_fast.rollout.weight_sync import iter_hf_tensors

    parallel.initialize(2, 1)
    model = load_pretrained(ckpt)
    if dist.get_rank() == 0:
        engine = VllmEngine(ckpt, skip_tokenizer_init=True, **ENGINE_KWARGS)
        buckets = engine.update_weights(model, bucket_bytes=1 << 15)
        outs = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=8))
        report = {
            "buckets": buckets,
            "tokens": [o[0].token_ids.tolist() for o in outs],
            "logprobs": [o[0].logprobs.tolist() for o in outs],
        }
        (out / "report.json").write_text(json.dumps(report))
        engine.shutdown()
    else:
        for _ in iter_hf_tensors(model):
            pass
    dist.barrier()
    parallel.destroy()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
