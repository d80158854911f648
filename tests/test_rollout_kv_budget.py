"""One meaning for the KV budget: ``rollout.kv_cache_fraction`` / ``kv_cache_bytes`` resolved to bytes by one
function, which the trainer hands to its engine."""

import pytest
import torch

from orz_fast.config import RolloutConfig, resolve
from orz_fast.rollout import kv_budget
from orz_fast.rollout.kv_budget import DEFAULT_CPU_KV_CACHE_BYTES, kv_cache_bytes

GIB = 1 << 30


def test_fixed_bytes_override_the_fraction_on_any_device():
    rollout = RolloutConfig(kv_cache_fraction=0.5, kv_cache_bytes=123_456)
    assert kv_cache_bytes(rollout, "cpu") == 123_456
    assert kv_cache_bytes(rollout, "cuda", free_bytes=80 * GIB) == 123_456


def test_fraction_of_the_free_memory():
    assert kv_cache_bytes(RolloutConfig(kv_cache_fraction=0.25), "cuda", free_bytes=40 * GIB) == 10 * GIB
    assert kv_cache_bytes(RolloutConfig(), "cpu", free_bytes=10 * GIB) == int(0.9 * 10 * GIB)
    assert kv_cache_bytes(RolloutConfig(), "cuda", free_bytes=-5) == 0


def test_cpu_default():
    assert kv_cache_bytes(RolloutConfig(), "cpu") == DEFAULT_CPU_KV_CACHE_BYTES == GIB


def test_cuda_reads_the_free_memory_now(monkeypatch):
    calls = []

    def mem_get_info(device):
        calls.append(device)
        return 30 * GIB, 80 * GIB

    monkeypatch.setattr(kv_budget.torch.cuda, "mem_get_info", mem_get_info)
    assert kv_cache_bytes(RolloutConfig(kv_cache_fraction=0.5), "cuda:1") == 15 * GIB
    assert calls == [torch.device("cuda:1")]


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="rollout.kv_cache_fraction must be in \\(0, 1\\], got 1.5"):
        kv_cache_bytes(RolloutConfig(kv_cache_fraction=1.5), "cpu")
    with pytest.raises(ValueError, match="rollout.kv_cache_bytes must be >= 1, got 0"):
        kv_cache_bytes(RolloutConfig(kv_cache_bytes=0), "cpu")


def test_trainer_gives_the_engine_the_resolved_bytes(tmp_path):
    from orz_fast.ppo.trainer import Trainer

    block = 2 * 2 * 16 * 2 * 16 * 4  # K and V, 2 layers, 16 tokens, 2 KV heads, head dim 16, fp32: the tiny preset
    overrides = ["logging.progress=false", f"rollout.kv_cache_bytes={block}"]
    trainer = Trainer(resolve("tiny", overrides=overrides), tmp_path / "fixed")
    try:
        assert trainer.rollouts.engine.kv_cache_bytes == block
        # one block of 16 tokens cannot hold a prompt plus 8 new tokens: the budget is the one the engine uses
        with pytest.raises(ValueError, match=f"KV cache budget of {block} bytes holds 1 blocks of 16 tokens"):
            trainer.rollout()
    finally:
        trainer.scorer.close()
    default = Trainer(resolve("tiny", overrides=["logging.progress=false"]), tmp_path / "default")
    try:
        assert default.rollouts.engine.kv_cache_bytes == DEFAULT_CPU_KV_CACHE_BYTES
    finally:
        default.scorer.close()
