"""The scale planner: layouts, the memory model against hand counts and a measured CPU step, the ORZ plans."""

import dataclasses
import json

import pytest

from orz_fast.plan import (
    GIB,
    QWEN25_SHAPES,
    Layout,
    PlanError,
    candidate_layouts,
    layout_error,
    main,
    parse_memory,
    plan,
    resolve_model,
    stage_param_numels,
)


def test_layouts_of_8_gpus_multiply_to_8():
    layouts = candidate_layouts(8)
    assert all(lay.tp * lay.pp * lay.dp == 8 for lay in layouts)
    assert len(layouts) == len(set(layouts)) == 10  # ordered factorisations of 2**3 into three factors
    assert Layout(2, 2, 2) in layouts and Layout(8, 1, 1) in layouts and Layout(1, 1, 8) in layouts


def test_invalid_layouts_are_rejected():
    spec, _ = resolve_model("Qwen/Qwen2.5-7B")
    assert "num_attention_heads=28" in layout_error(spec, Layout(8, 1, 1))
    assert layout_error(spec, Layout(4, 1, 2)) is None
    small, _ = resolve_model("tiny")  # 4 heads, 2 KV heads, 2 layers
    assert "num_key_value_heads=2" in layout_error(small, Layout(4, 1, 1))
    assert "num_hidden_layers=2" in layout_error(small, Layout(1, 4, 1))
    p = plan("tiny", 8, device="cpu")
    assert {"TP4xPP1xDP2", "TP8xPP1xDP1", "TP1xPP4xDP2", "TP1xPP8xDP1", "TP2xPP4xDP1"} <= set(p.rejected)
    assert not set(p.rejected) & {r.layout for r in p.layouts}


def test_tiny_weights_bytes_by_hand():
    # tiny: V 128, H 64, I 128, 2 layers, 4 heads x 16, 2 KV heads, untied, QKV bias.
    layer = 64 + 64 * (4 + 2 * 2) * 16 + (4 + 2 * 2) * 16 + 64 * 64 + 64 + 64 * 2 * 128 + 128 * 64
    policy = 2 * layer + 128 * 64 + 64 + 128 * 64  # embedding, final norm, LM head
    critic = 2 * layer + 128 * 64 + 64 + 64  # value head instead of the LM head
    spec, _ = resolve_model("tiny")
    assert sum(stage_param_numels(spec, 1, 1, 0, "policy")) == policy == 90688
    assert sum(stage_param_numels(spec, 1, 1, 0, "critic")) == critic
    cpu = plan("tiny", 1, device="cpu").layouts[0]
    assert cpu.weights == 4 * (policy + critic)
    assert cpu.optimizer == 8 * (policy + critic)  # fp32 parameters: moments only, no master copy
    gpu = plan("tiny", 1, overrides=["model.dtype=bfloat16"]).layouts[0]
    assert gpu.weights == 2 * (policy + critic)
    assert gpu.optimizer == 12 * (policy + critic)  # bf16 parameters: fp32 moments + fp32 master
    dp2 = plan("tiny", 2, overrides=["model.dtype=bfloat16"]).layouts
    assert next(r for r in dp2 if r.layout == "TP1xPP1xDP2").optimizer < gpu.optimizer


def test_tp_shards_the_weights():
    rows = {r.layout: r for r in plan("orz-7b", 8).layouts}
    assert rows["TP4xPP1xDP2"].weights < rows["TP2xPP1xDP4"].weights < rows["TP1xPP1xDP8"].weights


@pytest.mark.parametrize(
    ("model", "gpus"),
    [("orz-7b", 8), ("orz-32b", 32), ("Qwen/Qwen2.5-72B", 128)],
)
def test_orz_scale_plans_fit_80gb(model, gpus):
    p = plan(model, gpus, gpu_memory=parse_memory("80GB"))
    assert p.recommended is not None
    best = p.layouts[0]
    assert best.layout == p.recommended and best.fits and best.peak <= 80 * GIB
    assert best.decode_batch >= 1
    assert all(r.step_seconds >= best.step_seconds for r in p.layouts if r.fits)


def test_trainer_verdict_per_layout():
    p = plan("orz-7b", 8)
    assert p.recommended_runnable == next(r.layout for r in p.layouts if r.fits and r.trainer_error is None)
    vllm = plan("orz-7b", 8, overrides=["rollout.engine=vllm"])
    assert vllm.recommended is not None and vllm.recommended_runnable is None
    assert all("rollout.engine" in r.trainer_error for r in vllm.layouts)


def test_72b_needs_pipeline_parallelism_on_80gb():
    # One 10k-token sample's activations (80 layers) leave no PP = 1 layout within 80 GB; 141 GB GPUs hold one.
    rows = plan("Qwen/Qwen2.5-72B", 128).layouts
    assert not any(r.fits for r in rows if r.pp == 1)
    big = plan("Qwen/Qwen2.5-72B", 128, gpu_memory=parse_memory("141GB")).layouts
    assert any(r.fits for r in big if r.pp == 1)


def test_model_sources(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_SHAPES["Qwen/Qwen2.5-0.5B"]))
    by_dir, _ = resolve_model(str(tmp_path))
    by_file, _ = resolve_model(str(tmp_path / "config.json"))
    by_preset, cfg = resolve_model("orz-0.5b")
    assert by_dir.hidden_size == by_file.hidden_size == by_preset.hidden_size == 896
    assert cfg.rollout.samples_per_prompt == 64


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "no-such-model", "--gpus", "8"], "no-such-model"),
        (["--model", "orz-7b", "--gpus", "0"], "--gpus 0"),
        (["--model", "orz-7b", "--gpus", "8", "--gpu-memory", "lots"], "--gpu-memory 'lots'"),
        (["--model", "orz-7b", "--gpus", "8", "--set", "ppo.micro_batch_tokens=4096"], "ppo.micro_batch_tokens"),
        (["--model", "orz-7b", "--gpus", "8", "--set", "rollout.bogus=1"], "rollout.bogus"),
    ],
)
def test_bad_inputs_name_themselves(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_parse_memory():
    assert parse_memory("80GB") == parse_memory("80GiB") == parse_memory("80") == 80 * GIB
    assert parse_memory("81559MiB") == 81559 << 20
    with pytest.raises(PlanError):
        parse_memory("-3GB")


def test_cli_table_and_json(capsys):
    assert main(["--model", "orz-7b", "--gpus", "8"]) == 0
    text = capsys.readouterr().out
    assert "recommendation: " in text and "| TP2xPP1xDP4 |" in text
    assert main(["--model", "orz-7b", "--gpus", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["recommended"] == data["layouts"][0]["layout"]


def test_odd_vocabulary_151665_at_tp8_counts_the_padded_rows(tmp_path):
    shape = {**QWEN25_SHAPES["Qwen/Qwen2.5-32B"], "vocab_size": 151665}
    (tmp_path / "config.json").write_text(json.dumps(shape))
    spec, _ = resolve_model(str(tmp_path))
    assert layout_error(spec, Layout(8, 1, 1)) is None
    # the model pads 151,665 to a multiple of 128 x TP: 152,576 rows at TP 8, 151,680 at TP 1
    for tp, padded in ((8, 152576), (1, 151680)):
        aligned = dataclasses.replace(spec, vocab_size=padded)
        for role in ("policy", "critic"):
            assert stage_param_numels(spec, tp, 1, 0, role) == stage_param_numels(aligned, tp, 1, 0, role)
    assert stage_param_numels(spec, 8, 1, 0, "policy")[-1] == 152576 // 8 * 5120
    assert stage_param_numels(spec, 8, 1, 0, "policy", vocab_pad_multiple=1)[-1] == 151672 // 8 * 5120
    rows = {r.layout: r for r in plan(str(tmp_path), 8).layouts}
    assert "TP8xPP1xDP1" in rows
    numels = sum(stage_param_numels(spec, 8, 1, 0, "policy")) + sum(stage_param_numels(spec, 8, 1, 0, "critic"))
    assert rows["TP8xPP1xDP1"].weights == 2 * numels  # bf16


def test_kv_budget_is_the_fraction_of_memory_left_after_the_resident_state(capsys):
    bf16 = "model.dtype=bfloat16"
    kv_tok = 2 * 2 * 2 * 16 * 2  # K and V, 2 layers, 2 KV heads, head dim 16, bf16: the tiny preset
    block = 16 * kv_tok
    row = plan("tiny", 1, overrides=[bf16]).layouts[0]
    free = 80 * GIB - 2 * GIB - row.weights  # the optimizer states are offloaded for the rollout
    assert row.kv_budget == int(0.9 * free) // block * block
    assert row.kv_tokens == row.kv_budget // kv_tok
    assert 0 < row.kv_cache <= row.kv_budget  # capped at what the step's requests can use
    half = plan("tiny", 1, overrides=[bf16, "rollout.kv_cache_fraction=0.45"]).layouts[0]
    assert half.kv_budget == int(0.45 * free) // block * block
    fixed = plan("tiny", 1, overrides=[bf16, "rollout.kv_cache_bytes=1048576"]).layouts[0]
    assert fixed.kv_budget == 1048576 and fixed.kv_tokens == 1048576 // kv_tok
    cpu = plan("tiny", 1, device="cpu").layouts[0]
    assert cpu.kv_budget == GIB and cpu.kv_tokens == GIB // (2 * kv_tok)  # fp32 on CPU
    # the rollout's own work must fit beside the KV cache: all of the free memory for KV fits no layout
    assert plan("orz-7b", 8).recommended is not None
    assert plan("orz-7b", 8, overrides=["rollout.kv_cache_fraction=1.0"]).recommended is None
    assert main(["--model", "tiny", "--gpus", "1", "--set", "rollout.kv_cache_bytes=1048576"]) == 0
    assert "| KV budget (tokens) |" in capsys.readouterr().out.splitlines()[2]
