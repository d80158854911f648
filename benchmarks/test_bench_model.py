"""Decoder trunk forward+backward throughput against transformers' model of the same shape.

On CUDA: a Qwen2.5-1.5B-shaped model (random weights, bf16) on one packed 16k-token
micro-batch (8 x 2048), SDPA / flash-attn path, no activation checkpointing; reported as
tokens/s, TFLOP/s, MFU and the ratio to transformers' ``Qwen2Model`` (SDPA) on the same
tokens as a [8, 2048] batch. On CPU: a small model in fp32, tokens/s and the same ratio.

FLOPs counted: 6 x (trunk matmul parameters) x tokens + 3 x causal attention forward
(2 x 2 x L^2 / 2 x heads x head_dim per layer and sequence); the embedding lookup and the
LM head are excluded (the policy's head runs in ``ops.linear_logprobs``).
"""

from __future__ import annotations

import statistics

import torch
from harness import QWEN25_1P5B, hardware_class, median_time, write_result

from orz_fast import parallel
from orz_fast.models import load_pretrained

PEAK_BF16_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0}

SMALL_CPU = {
    "model_type": "qwen2",
    "vocab_size": 2048,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "max_position_embeddings": 1024,
}


def trunk_flops(arch: dict, seq_lens: list[int]) -> float:
    h, i, n_layers = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]
    heads, kv = arch["num_attention_heads"], arch["num_key_value_heads"]
    d = h // heads
    per_layer = h * (heads + 2 * kv) * d + heads * d * h + 3 * h * i
    tokens = sum(seq_lens)
    attn_fwd = sum(4 * (seq_len**2) / 2 * heads * d for seq_len in seq_lens) * n_layers
    return 6.0 * per_layer * n_layers * tokens + 3.0 * attn_fwd


def _hf_model(arch: dict, dtype: torch.dtype, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in arch.items() if k != "model_type"}
    cfg = AutoConfig.for_model(arch["model_type"], **fields, attn_implementation="sdpa")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device)


def test_bench_decoder_fwd_bwd(tmp_path):
    parallel.initialize(1, 1)
    on_cuda = torch.cuda.is_available()
    device = "cuda" if on_cuda else "cpu"
    arch, dtype = (QWEN25_1P5B, torch.bfloat16) if on_cuda else (SMALL_CPU, torch.float32)
    n_seq, seq_len = (8, 2048) if on_cuda else (4, 256)
    reps = 5

    hf = _hf_model(arch, dtype, device)
    hf.save_pretrained(tmp_path / "ckpt")
    model = load_pretrained(tmp_path / "ckpt", dtype=dtype, device=device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, arch["vocab_size"], (n_seq, seq_len), generator=g).to(device)
    flat = ids.reshape(-1)
    cu = torch.arange(0, n_seq * seq_len + 1, seq_len, dtype=torch.int32, device=device)

    def hf_step():
        hf.model(input_ids=ids).last_hidden_state.float().square().mean().backward()

    def our_step():
        model(flat, cu).float().square().mean().backward()

    # Interleaved rounds, so both see the same machine state (shared CPUs, GPU clocks).
    hf_times, our_times = [], []
    for _ in range(reps):
        hf_times.append(median_time(hf_step, warmup=1 if not hf_times else 0, reps=1))
        our_times.append(median_time(our_step, warmup=1 if not our_times else 0, reps=1))
    t_hf, t_ours = statistics.median(hf_times), statistics.median(our_times)
    tokens = n_seq * seq_len
    flops = trunk_flops(arch, [seq_len] * n_seq)
    figures = {
        "model": "qwen2.5-1.5b-shape" if on_cuda else "qwen2-small",
        "dtype": str(dtype).removeprefix("torch."),
        "tokens_per_micro_batch": tokens,
        "sequences": n_seq,
        "tokens_per_s": tokens / t_ours,
        "hf_tokens_per_s": tokens / t_hf,
        "speedup_vs_transformers": t_hf / t_ours,
        "tflops": flops / t_ours / 1e12,
        "hf_tflops": flops / t_hf / 1e12,
    }
    if on_cuda:
        peak = PEAK_BF16_TFLOPS.get(hardware_class())
        figures["peak_memory_gib_both_models"] = torch.cuda.max_memory_allocated() / 2**30
        if peak is not None:
            figures["mfu"] = figures["tflops"] / peak
            figures["hf_mfu"] = figures["hf_tflops"] / peak
    path = write_result("model_fwd_bwd", figures, ratios={"speedup_vs_transformers": "higher"})
    print(path, figures)
    assert figures["tokens_per_s"] > 0
