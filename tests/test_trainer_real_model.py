"""The ``demo-real`` preset end to end on the real SmolLM2-135M-Instruct GGUF (2 steps, fewer samples): its task
file, the engine's sampling log-probs equal to the trainer's on the real weights, finite losses, ORZ's template without
a chat BOS, the step's records, no NaN, and a ``policy_hf/`` that ``python -m orz_fast.eval`` loads with its own
tokenizer."""

import json
import sys

import pytest
from conftest import smollm2_gguf
from test_trainer import run

from orz_fast import eval as ev
from orz_fast.data import render_prompt
from orz_fast.data.tokenizer import load_tokenizer
from orz_fast.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    gguf = smollm2_gguf()
    out = tmp_path_factory.mktemp("demo_real")
    sets = ["train.steps=2", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "rollout.max_tokens=12"]
    cmd = [sys.executable, "-W", "ignore", "-m", "orz_fast.train", "--preset", "demo-real", "--out", str(out)]
    for s in ["logging.progress=false", *sets]:
        cmd += ["--set", s]
    return gguf, out, run(cmd, timeout=900)


def test_demo_real_trains_a_step_and_records_it(real_run):
    gguf, out, result = real_run
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["path"] == str(gguf) and config["data"]["template"] == "plain"
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        for key, value in record.items():
            assert isinstance(value, (int, float)) and value == value, (key, value)  # finite, no "nan"
        assert "explained_variance" in record and "value_loss" in record  # the critic trained (GAE)
        # The rollout's log-probs are the trainer's (fp32 on CPU): the update's own forward measures the gap.
        assert record["rollout/logprob_diff_max"] <= 1e-4, record["rollout/logprob_diff_max"]
        assert abs(record["rollout/ratio_max"] - 1) <= 1e-4
    lines = [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(x["source"].endswith("demo_real/train.jsonl") for x in lines)
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples[0]["samples"]) == 4 and all(s["response"] for s in samples[0]["samples"])
    stats = json.loads((out / "data_stats.json").read_text())["train"]
    assert stats["too_long"] == 0 and stats["longest_prompt_tokens"] <= 256
    assert "train prompts: 1000 of 1000 rows kept" in result.stdout
    assert not (out / "checkpoints").exists()  # the preset checkpoints nothing (ckpt.every=0)


def test_policy_hf_carries_the_tokenizer_and_eval_loads_it(real_run, tmp_path, capsys):
    gguf, out, _ = real_run
    exported, original = load_tokenizer(str(out / "policy_hf")), load_tokenizer(str(gguf))
    text = render_prompt("3>8?", "orz", original)
    assert text.startswith("A conversation between User and Assistant")  # no <|im_start|> opening a chat turn
    assert render_prompt("3>8?", "orz", exported) == text
    assert exported.encode(text, add_special_tokens=False) == original.encode(text, add_special_tokens=False)
    assert exported.eos_token_id == original.eos_token_id and len(exported) == len(original)
    argv = ["--model", str(out / "policy_hf"), "--data", "math500", "--limit", "1", "--samples", "1"]
    assert ev.main([*argv, "--max-tokens", "4", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "math500: avg@1 " in capsys.readouterr().out
