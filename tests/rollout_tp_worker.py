"""Native engine under tensor parallelism, run by tests/test_rollout_engine_tp.py as
``torchrun --standalone --nproc_per_node 2 tests/rollout_tp_worker.py OUT_JSON``.

With TP=2 it generates greedy, seeded-sampled (n=2) and unseeded outputs from the random
model every layout builds identically (``build_model(TP_ARCH, seed=TP_SEED)``); the test
compares them with TP=1 in its own process. Each rank seeds torch's generator differently,
so the unseeded run only agrees across ranks if the engine shares its drawn seeds. Then it
repeats the generations with PP=2 (two stages passing activations; rank 0, the first stage,
only sees the tokens the last stage broadcasts). It also generates at TP=2 from a model with
an odd vocabulary (:data:`ODD_TP_ARCH`, 131 ids padded to 256: the second shard holds 3 real
rows), which must give the TP=1 tokens and never a padding id. At TP=2 and at PP=2 it also
measures the largest gap between the engine's sampling log-probs and the trainer's
(``packed_token_logprobs``) on random Qwen2 and Llama models (:data:`GAP_ARCHS`, fp32). Rank 0
writes the results to OUT_JSON.

It also holds the arch and prompts the single-process test reuses.
"""

from __future__ import annotations

import json
import sys

TP_ARCH = {
    "model_type": "qwen2",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "initializer_range": 0.2,
    "tie_word_embeddings": False,
}
TP_SEED = 7
TP_PROMPTS = [[5, 17, 99, 3], list(range(40, 61)), [200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
ODD_TP_ARCH = {**TP_ARCH, "vocab_size": 131}
ODD_TP_PROMPTS = [[t % 131 for t in p] for p in TP_PROMPTS]
GAP_ARCHS = {
    "qwen2": {**TP_ARCH, "initializer_range": 0.02},
    "llama": {
        **TP_ARCH,
        "model_type": "llama",
        "head_dim": 32,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "vocab_size": 131,
    },
}


def max_logprob_gap(arch: dict) -> float:
    """Largest |rollout - trainer| log-prob over the response tokens of a sampled run (every rank returns it)."""
    from test_rollout_logprobs import trainer_logprobs

    from orz_fast.models import build_model
    from orz_fast.rollout import NativeEngine, SamplingParams

    model = build_model(arch, seed=TP_SEED, device="cpu")
    prompts = [[t % arch["vocab_size"] for t in p] for p in TP_PROMPTS]
    out = NativeEngine(model, block_size=4).generate(
        prompts, SamplingParams(n=2, temperature=0.8, seed=5, max_tokens=24)
    )
    trainer, rollout = trainer_logprobs(model, prompts, out, 0.8)
    return float((trainer - rollout).abs().max())


def run_engine(arch: dict = TP_ARCH, prompts: list[list[int]] = TP_PROMPTS) -> dict:
    from orz_fast.models import build_model
    from orz_fast.rollout import NativeEngine, SamplingParams

    model = build_model(arch, seed=TP_SEED, device="cpu")
    engine = NativeEngine(model, block_size=4)
    greedy = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=24))
    sampled = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, top_p=0.9, seed=11, max_tokens=24))
    return {
        "greedy": [[c.token_ids.tolist() for c in cs] for cs in greedy],
        "sampled": [[c.token_ids.tolist() for c in cs] for cs in sampled],
        "sampled_logprobs": [[c.logprobs.tolist() for c in cs] for cs in sampled],
    }


def main(out_path: str) -> None:
    import torch
    import torch.distributed as dist

    from orz_fast import parallel
    from orz_fast.models import build_model
    from orz_fast.rollout import NativeEngine, SamplingParams

    parallel.initialize(tp=2, pp=1)
    rank = dist.get_rank()
    result = run_engine()
    result["odd_vocab"] = run_engine(ODD_TP_ARCH, ODD_TP_PROMPTS)

    torch.manual_seed(1000 + rank)
    engine = NativeEngine(build_model(TP_ARCH, seed=TP_SEED, device="cpu"))
    unseeded = engine.generate(TP_PROMPTS, SamplingParams(temperature=1.0, max_tokens=12))
    tokens = [[c.token_ids.tolist() for c in cs] for cs in unseeded]
    per_rank = [None, None]
    dist.all_gather_object(per_rank, tokens)
    result["unseeded_ranks_agree"] = per_rank[0] == per_rank[1]
    result["tp2_gap"] = {name: max_logprob_gap(arch) for name, arch in GAP_ARCHS.items()}

    parallel.initialize(tp=1, pp=2)
    result["pp2"] = run_engine()
    torch.manual_seed(1000 + rank)
    engine = NativeEngine(build_model(TP_ARCH, seed=TP_SEED, device="cpu"))
    unseeded = engine.generate(TP_PROMPTS, SamplingParams(temperature=1.0, max_tokens=12))
    per_rank = [None, None]
    dist.all_gather_object(per_rank, [[c.token_ids.tolist() for c in cs] for cs in unseeded])
    result["pp2_unseeded_stages_agree"] = per_rank[0] == per_rank[1]
    result["pp2_gap"] = {name: max_logprob_gap(arch) for name, arch in GAP_ARCHS.items()}

    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    parallel.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
