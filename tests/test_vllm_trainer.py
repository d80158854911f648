"""The PPO trainer with ``rollout.engine=vllm`` on the real vLLM (``make test-vllm``).

Three steps of the ``tiny`` preset (with two attention heads: vLLM's CPU attention serves head
size 32, not the preset's 16) run end to end; the rollout's log-probs are the trainer's own
(approx_kl ~ 0, nothing clipped), so the weights vLLM served are the policy's at every step.
The preset as it is fails in ``check_layout`` naming the head size, before any model is built.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("ORZ_FAST_REQUIRE_VLLM") == "1":
        raise ImportError("ORZ_FAST_REQUIRE_VLLM=1 but vllm is not importable")
    pytest.skip("vLLM is not installed; `make test-vllm` runs these tests in .venv-vllm", allow_module_level=True)

from orz_fast.config import _TINY_ARCH, resolve
from orz_fast.metrics import read_metrics
from orz_fast.ppo.checks import check_layout

TWO_HEADS = json.dumps({**_TINY_ARCH, "num_attention_heads": 2, "num_key_value_heads": 1})


def test_tiny_preset_trains_three_steps_on_vllm(tmp_path):
    cmd = [sys.executable, "-W", "ignore", "-m", "orz_fast.train", "--preset", "tiny", "--out", str(tmp_path)]
    sets = ["rollout.engine=vllm", f"model.arch={TWO_HEADS}", "train.steps=3", "logging.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert 0.0 <= r["reward_mean"] <= 1.0
        assert 0 < r["response_length_mean"] <= 8  # tiny: max_tokens 8
        assert r["generated_tokens_per_s"] > 0
        # The rollout's log-probs (vLLM) against the trainer's for the same tokens, before the update.
        assert abs(r["approx_kl"]) < 1e-6 and r["clipfrac"] == 0.0
    assert (tmp_path / "policy_hf" / "config.json").is_file()


def test_an_architecture_vllm_cannot_serve_fails_before_any_model_is_built():
    cfg = resolve("tiny", overrides=["rollout.engine=vllm"])
    with pytest.raises(ValueError, match=r"head size 16 .* supports head sizes \[32"):
        check_layout(cfg, 1)
