"""Scale planner: ``python -m orz_fast.plan --model CONFIG --gpus N [--gpu-memory 80GB] [--json]``.

For every tensor x pipeline x data-parallel layout (TP x PP x DP = N) the planner computes
the per-GPU memory of orz_fast's colocated policy, critic and rollout engine, drops the
layouts that do not fit, ranks the rest by an estimated PPO step time and recommends the
fastest. ``--model`` is a preset name (``orz-7b``), a Qwen2.5 Hub id from
:data:`QWEN25_SHAPES` (``Qwen/Qwen2.5-72B``), a Hugging Face ``config.json`` or a directory
holding one; the run settings (batch, lengths, micro-batch budget, dtype, checkpointing) are
the preset's, or the ORZ recipe's for a bare model, with ``--set a.b=VALUE`` overrides.

Memory model (bytes per GPU; the heaviest pipeline stage is reported). It follows the code:

* weights: policy and critic, each this rank's TP shard of its stage (``DecoderStage``):
  column-parallel QKV (+ bias), gate/up, LM head / embedding sharded over TP; norms and
  row-parallel biases replicated; a tied LM head is a separate copy once PP > 1; the critic
  has a [H] value head instead of the LM head. The embedding and LM head have the padded
  vocabulary's rows (``vocab_size`` rounded up to a multiple of ``model.vocab_pad_multiple`` x
  TP, as the model builds them). ``model.dtype`` on GPU, fp32 on CPU.
* gradients: one per parameter in its dtype, alive while that model trains (the optimizer
  frees them after each step, so policy and critic gradients never coexist).
* optimizer (``ShardedAdamW``): fp32 ``exp_avg`` and ``exp_avg_sq`` plus an fp32 master when
  the parameter is not fp32, for the parameters this DP rank owns (``assign_owners``, the
  same largest-first split the optimizer makes). Both models' states are on the GPU in
  training and moved to CPU during the rollout (``offload``/``onload``); on CPU they stay.
* activations of one micro-batch of ``T`` packed tokens, ``T`` = the samples that fit
  ``ppo.micro_batch_tokens`` (worst case: every sample ``max_prompt_tokens + max_tokens``
  long), capped by the step's mini-batch. Per decoder layer and token autograd saves
  ``8H + 4bH`` (two RMSNorms: fp32 input and normed output, plus the next linear's input),
  ``4bI/tp`` (gate/up output, SiLU, product) and the attention tensors (flash-attn on GPU:
  the QKV buffer, roped q and k, output and fp32 log-sum-exp; SDPA on CPU: padded q and
  K/V expanded to the query heads, padded and unpadded output), with ``b`` the dtype's
  bytes. Without checkpointing every layer of the stage keeps that; with
  ``model.activation_checkpointing`` a layer keeps only its [T, H] input and one layer is
  recomputed at a time. The layer being back-propagated holds as much again in gradients.
  The last stage adds the final norm and the LM-head log-prob pass (one chunk of [Tc, V/tp]
  logits of at most ``chunk_tokens_for`` rows, fp32 row statistics on CPU, and the fp32
  LM-head gradient accumulator). With PP > 1 the first stage holds ``min(pp, micro-batches)``
  micro-batches in flight (1F1B).
* KV cache: the budget is ``rollout.kv_cache_fraction`` of the memory left after the
  rollout-time resident state (reserve, both models' weights; the optimizer states are
  offloaded), or ``rollout.kv_cache_bytes`` when set (1 GiB on CPU by default), resolved by
  ``orz_fast.rollout.kv_budget.kv_cache_bytes`` as the engines resolve it. The report gives
  that budget and the tokens it holds; the engine allocates it capped at what the replica's
  requests can use (prompt blocks shared by a prompt's ``n`` samples; worst-case lengths).
  The decode batch is what that cache holds, at most ``max_num_seqs``. The rollout also needs
  one step's activations (``max_num_batched_tokens``), the sampled rows' logits over the
  padded vocabulary, and one layer's K/V gathered for the decode batch (paged decode
  attention): they must fit in the rest, or the layout does not fit (lower the fraction).
* reserve: 2 GiB per GPU for the CUDA context, NCCL and cuBLAS workspaces (none on CPU).

Phases that coexist: rollout = weights + KV + rollout work (+ optimizer on CPU); critic
values = weights + optimizer + one layer's forward; policy / critic training = weights +
optimizer + that model's gradients + its activations (or the optimizer step's fp32
temporaries, whichever is larger). The peak is the largest phase. A layout fits when the
peak is within ``--gpu-memory`` and the decode batch holds at least one whole sequence.

Cost model (an estimate for ranking, not a prediction; :class:`Hardware`, H100 SXM by
default). Mean lengths: prompts ``max_prompt_tokens / 8``, responses ``max_tokens / 2``
(``--mean-response-tokens`` overrides). Per PPO step:

* rollout, per DP replica: decode is memory bound. Its ``S·R/B`` steps (S sequences, R mean
  response tokens, B decode batch) each read this rank's policy weights and the batch's KV cache at
  ``hbm_efficiency`` of the HBM bandwidth, or take the GEMM time if that is longer, plus two
  TP all-reduces per layer; with PP the stages take turns within a step (the engine does
  not overlap micro-batches), so a step reads every stage's weights and KV in sequence;
  prefill is compute at ``mfu``.
* training: FLOPs of the critic's value pass (2·N·tokens), the policy's and critic's updates
  (6·N·tokens, 8·N with recomputation) and causal attention, over ``N_gpu · peak · mfu``;
  the PP bubble multiplies it by ``1 + (pp - 1) / micro-batches``; TP adds two all-reduces of
  [T, H] per layer per pass (NVLink within a node, the network across nodes); DP adds each
  optimizer step's gradient all-reduce and parameter broadcast (13 steps per PPO step
  with the ORZ recipe).

Each layout is also put to the trainer's own check (``orz_fast.ppo.checks.check_layout``);
the report marks the layouts it rejects (with its reason) and names the fastest fitting
layout the trainer runs.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from orz_fast.config import PRESETS, Config, ConfigError, parse_value, preset, set_value, validate
from orz_fast.kernels.linear_logprobs import chunk_tokens_for
from orz_fast.models.spec import VOCAB_PAD_MULTIPLE, ModelSpec, UnsupportedModelError, padded_vocab_size
from orz_fast.ppo.checks import check_layout
from orz_fast.ppo.optim import assign_owners
from orz_fast.rollout.kv_budget import kv_cache_bytes
from orz_fast.rollout.native import NativeEngine

_QWEN25_COMMON = {
    "model_type": "qwen2",
    "hidden_act": "silu",
    "rope_theta": 1000000.0,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "vocab_size": 152064,
}
QWEN25_SHAPES: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-0.5B": {
        **_QWEN25_COMMON,
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    "Qwen/Qwen2.5-1.5B": {
        **_QWEN25_COMMON,
        "vocab_size": 151936,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    "Qwen/Qwen2.5-7B": {
        **_QWEN25_COMMON,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-6,
    },
    "Qwen/Qwen2.5-32B": {
        **_QWEN25_COMMON,
        "hidden_size": 5120,
        "intermediate_size": 27648,
        "num_hidden_layers": 64,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5,
    },
    "Qwen/Qwen2.5-72B": {
        **_QWEN25_COMMON,
        "hidden_size": 8192,
        "intermediate_size": 29568,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5,
    },
}
"""Hugging Face config fields of the Qwen2.5 base models the ORZ presets name (memory-relevant shapes)."""

_ENGINE_DEFAULTS = {k: p.default for k, p in inspect.signature(NativeEngine).parameters.items()}
GIB = 1 << 30
GPU_RESERVED_BYTES = 2 * GIB
"""Per-GPU memory outside PyTorch's tensors: CUDA context, NCCL buffers, cuBLAS workspaces."""
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


class PlanError(ValueError):
    """A planner input is invalid; the message names it."""


@dataclass(frozen=True, kw_only=True)
class Hardware:
    """Throughput figures of the cost model (per GPU); the defaults are an H100 SXM's."""

    peak_flops: float = 989e12
    """Dense bf16 tensor-core FLOP/s."""
    mfu: float = 0.4
    """Fraction of ``peak_flops`` reached by training GEMMs and prefill."""
    hbm_bandwidth: float = 3.35e12
    """HBM bytes/s."""
    hbm_efficiency: float = 0.7
    """Fraction of ``hbm_bandwidth`` a decode step reaches."""
    nvlink_bandwidth: float = 360e9
    """All-reduce bus bandwidth within a node (bytes/s)."""
    network_bandwidth: float = 45e9
    """All-reduce bus bandwidth per GPU across nodes (400 Gb/s InfiniBand)."""
    collective_latency: float = 20e-6
    """Fixed cost of one collective (s)."""
    gpus_per_node: int = 8
    """GPUs sharing NVLink; groups larger than this cross the network."""


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int

    def __str__(self) -> str:
        return f"TP{self.tp}xPP{self.pp}xDP{self.dp}"


@dataclass(frozen=True, kw_only=True)
class LayoutPlan:
    """One layout's per-GPU memory (bytes, heaviest stage), fit and estimated step time."""

    layout: str
    tp: int
    pp: int
    dp: int
    weights: int
    """Policy + critic parameters."""
    grads: int
    """The larger of the policy's and the critic's gradients (never alive together)."""
    optimizer: int
    """Both models' AdamW moments and fp32 masters (this DP rank's share)."""
    activations: int
    """The larger training phase's activations and LM-head working memory."""
    kv_cache: int
    """KV cache the engine allocates for the rollout: ``kv_budget`` capped at what the requests can use."""
    kv_budget: int
    """The KV budget per GPU (``rollout.kv_cache_fraction`` of the memory left after the rollout-time
    resident state, or ``rollout.kv_cache_bytes``), whole KV blocks."""
    kv_tokens: int
    """Tokens of context the KV budget holds (over this stage's layers)."""
    rollout_work: int
    """One rollout step's activations, logits and gathered K/V."""
    phases: dict[str, int]
    """Total per phase: ``rollout``, ``critic_values``, ``policy_train``, ``critic_train``."""
    peak: int
    peak_phase: str
    decode_batch: int
    """Sequences the KV cache decodes at once."""
    fits: bool
    trainer_error: str | None
    """Why ``orz_fast.ppo.checks.check_layout`` rejects this layout; None when the trainer runs it."""
    step_seconds: float
    """Estimated PPO step time (cost model; for ranking)."""
    time_breakdown: dict[str, float]


@dataclass(frozen=True, kw_only=True)
class Plan:
    model: str
    gpus: int
    gpu_memory: int
    device: str
    layouts: list[LayoutPlan]
    """Fitting layouts fastest first, then the others by peak memory."""
    rejected: dict[str, str]
    """Layouts whose product is ``gpus`` but that the model cannot be split into, with the reason."""
    recommended: str | None
    """Fastest fitting layout."""
    recommended_runnable: str | None
    """Fastest fitting layout the trainer accepts."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------
# Inputs


def parse_memory(text: str) -> int:
    """``"80GB"``, ``"80GiB"``, ``"80"``, ``"141G"``, ``"81559MiB"`` -> bytes.

    GB and GiB both mean 2**30 bytes: a GPU sold as "80GB" has 80 GiB (81,559 MiB usable on
    an H100). A bare number is GiB.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, flags=re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise PlanError(f"--gpu-memory {text!r}: expected a positive size such as 80GB, 141GiB or 81559MiB")
    scale = {"": GIB, "K": 1 << 10, "M": 1 << 20, "G": GIB, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def _read_config_json(path: Path) -> dict[str, Any]:
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise PlanError(f"--model {str(path)!r}: no config.json there")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise PlanError(f"--model {str(path)!r}: {file} is not valid JSON ({e})") from e


def resolve_model(model: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[ModelSpec, Config]:
    """The architecture and run config for ``--model`` (preset, Qwen2.5 Hub id, config.json or its directory)."""
    if model in PRESETS:
        cfg = preset(model)
    else:
        cfg = Config()
        cfg.model.path = model
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise PlanError(f"--set {item!r} is not of the form a.b=VALUE")
        try:
            set_value(cfg, key.strip(), parse_value(text))
        except ConfigError as e:
            raise PlanError(f"--set {item!r}: {e}") from e
    try:
        validate(cfg)
    except ConfigError as e:
        raise PlanError(str(e)) from e
    source = cfg.model.path
    if source is None:
        arch = cfg.model.arch
    elif source in QWEN25_SHAPES:
        arch = QWEN25_SHAPES[source]
    elif Path(source).exists():
        arch = _read_config_json(Path(source))
    else:
        raise PlanError(
            f"--model {model!r}: not a preset ({', '.join(PRESETS)}), a known model "
            f"({', '.join(QWEN25_SHAPES)}), nor an existing config.json or directory"
            + (f" (the preset names {source!r})" if model in PRESETS else "")
        )
    try:
        return ModelSpec.from_hf_config(arch), cfg
    except (UnsupportedModelError, KeyError) as e:
        raise PlanError(f"--model {model!r}: {e}") from e


def layout_error(spec: ModelSpec, layout: Layout) -> str | None:
    """Why the model cannot be split ``layout.tp`` x ``layout.pp`` ways (``ModelSpec.check_layout``), or None."""
    try:
        spec.check_layout(layout.tp, layout.pp)
    except ValueError as e:
        return str(e)
    return None


def trainer_error(spec: ModelSpec, cfg: Config, layout: Layout) -> str | None:
    """The trainer's own verdict on running ``layout`` (``check_layout``), or None when it accepts it."""
    run = copy.deepcopy(cfg)
    run.model.path, run.model.arch = None, dict(spec.hf_config)
    run.parallel.tp, run.parallel.pp = layout.tp, layout.pp
    try:
        check_layout(run, layout.tp * layout.pp * layout.dp)
    except ValueError as e:
        return str(e)
    return None


def candidate_layouts(gpus: int) -> list[Layout]:
    """Every (tp, pp, dp) with tp * pp * dp == gpus."""
    if gpus < 1:
        raise PlanError(f"--gpus {gpus}: must be >= 1")
    out = []
    for tp in range(1, gpus + 1):
        if gpus % tp:
            continue
        for pp in range(1, gpus // tp + 1):
            if (gpus // tp) % pp == 0:
                out.append(Layout(tp, pp, gpus // (tp * pp)))
    return out


# ---------------------------------------------------------------------------
# Memory model


@dataclass(frozen=True)
class _Runtime:
    device: Literal["gpu", "cpu"]
    param_bytes: int
    reserved: int


def _runtime(cfg: Config, device: str) -> _Runtime:
    if device == "gpu":
        return _Runtime("gpu", _DTYPE_BYTES[cfg.model.dtype], GPU_RESERVED_BYTES)
    return _Runtime("cpu", 4, 0)  # model_from_config builds fp32 models on CPU


def stage_param_numels(
    spec: ModelSpec, tp: int, pp: int, stage: int, role: str, *, vocab_pad_multiple: int = VOCAB_PAD_MULTIPLE
) -> list[int]:
    """Element counts of the parameters one TP rank of pipeline stage ``stage`` holds (``DecoderStage``,
    vocabulary padded to a multiple of ``vocab_pad_multiple * tp``)."""
    h, d, i = spec.hidden_size, spec.head_dim, spec.intermediate_size
    vocab_shard = padded_vocab_size(spec.vocab_size, tp, vocab_pad_multiple) // tp
    qkv_out = (spec.num_heads + 2 * spec.num_kv_heads) * d // tp
    layer = [h, h * qkv_out, spec.num_heads * d // tp * h, h, h * 2 * i // tp, i // tp * h]
    if spec.qkv_bias:
        layer.append(qkv_out)
    if spec.o_bias:
        layer.append(h)  # row-parallel bias: replicated
    numels = layer * len(spec.stage_layers(stage, pp))
    first, last = stage == 0, stage == pp - 1
    if first:
        numels.append(vocab_shard * h)
    if last:
        numels.append(h)
        if role == "critic":
            numels.append(h)
        elif not (spec.tie_word_embeddings and first):
            numels.append(vocab_shard * h)
    return numels


def _owned_numel(numels: list[int], dp: int) -> int:
    """Largest per-rank share of ``ShardedAdamW``'s states over the DP ranks."""
    owners = assign_owners(numels, dp)
    load = [0] * dp
    for n, r in zip(numels, owners, strict=True):
        load[r] += n
    return max(load)


def _largest_owned(numels: list[int], dp: int) -> int:
    return max(numels) if dp == 1 else max(n for n, r in zip(numels, assign_owners(numels, dp), strict=True) if r == 0)


def _layer_saved_per_token(spec: ModelSpec, tp: int, b: int, device: str) -> int:
    """Bytes autograd keeps per token for one decoder layer (see the module docstring)."""
    h, d, nh, nkv, i = spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads, spec.intermediate_size
    norms = 2 * (4 * h + 2 * b * h)
    mlp = 4 * b * i // tp
    if device == "gpu":
        attn = b * d * (nh + 2 * nkv) // tp + b * d * (nh + nkv) // tp + b * d * nh // tp
    else:
        attn = b * d * 3 * nh // tp + 2 * b * d * nh // tp
    return norms + mlp + attn + 4 * nh // tp


@dataclass(frozen=True)
class _Workload:
    seq_inputs: int
    """Worst-case input tokens of one sample (prompt + response - 1)."""
    seq_context: int
    """Worst-case context of one sample in the engine (prompt + max_tokens, capped by the context)."""
    prompts: int
    """Prompts per DP replica (the first replica's share)."""
    seqs: int
    """Samples per DP replica after balancing."""


def _workload(spec: ModelSpec, cfg: Config, dp: int) -> _Workload:
    r = cfg.rollout
    max_len = spec.hf_config.get("max_position_embeddings") or (cfg.data.max_prompt_tokens + r.max_tokens)
    context = min(cfg.data.max_prompt_tokens + r.max_tokens, max_len)
    if context - 1 > cfg.ppo.micro_batch_tokens:
        raise PlanError(
            f"ppo.micro_batch_tokens={cfg.ppo.micro_batch_tokens} is smaller than one sample of "
            f"data.max_prompt_tokens + rollout.max_tokens - 1 = {context - 1} tokens"
        )
    prompts = math.ceil(r.prompts_per_step / dp)
    return _Workload(context - 1, context, prompts, math.ceil(r.prompts_per_step * r.samples_per_prompt / dp))


def _micro_batch(w: _Workload, cfg: Config, updates: int) -> tuple[int, int]:
    """(tokens of the largest micro-batch, micro-batches per optimizer step) of one mini-batch."""
    per_bin = cfg.ppo.micro_batch_tokens // w.seq_inputs
    seqs = max(1, math.ceil(w.seqs / updates))
    return min(per_bin, seqs) * w.seq_inputs, math.ceil(seqs / per_bin)


def _kv_bytes_per_token(spec: ModelSpec, layers: int, tp: int, b: int) -> int:
    return 2 * layers * spec.num_kv_heads // tp * spec.head_dim * b


def _stage_memory(spec: ModelSpec, cfg: Config, layout: Layout, stage: int, rt: _Runtime, gpu_memory: int) -> dict:
    tp, pp, dp, b = layout.tp, layout.pp, layout.dp, rt.param_bytes
    h, v = spec.hidden_size, padded_vocab_size(spec.vocab_size, tp, cfg.model.vocab_pad_multiple)
    last = stage == pp - 1
    layers = len(spec.stage_layers(stage, pp))
    w = _workload(spec, cfg, dp)
    pad = cfg.model.vocab_pad_multiple
    numels = {
        role: stage_param_numels(spec, tp, pp, stage, role, vocab_pad_multiple=pad) for role in ("policy", "critic")
    }
    weights = {role: sum(n) * b for role, n in numels.items()}
    per_element = 8 + (4 if b != 4 else 0)
    optimizer = sum(_owned_numel(n, dp) * per_element for n in numels.values())
    # ShardedAdamW.step: an fp32 gradient copy, its square's update and the denominator of the largest parameter.
    step_tmp = max(3 * 4 * _largest_owned(n, dp) for n in numels.values())

    layer_tok = _layer_saved_per_token(spec, tp, b, rt.device)
    ckpt = cfg.model.activation_checkpointing

    def train_phase(role: str, updates: int) -> tuple[int, int]:
        """(activations + working memory, phase memory on top of weights and optimizer) of one model's update."""
        tokens, n_micro = _micro_batch(w, cfg, updates)
        stored = layers * (b * h if ckpt else layer_tok)
        in_flight = min(pp - stage, n_micro)
        act = tokens * stored * in_flight
        working = tokens * layer_tok * (2 if ckpt else 1)  # recompute (checkpointing) + gradients of one layer
        if last and role == "policy":
            act += tokens * (4 * h + 3 * b * h)
            rows = min(tokens, cfg.ppo.micro_batch_tokens)
            chunk_rows = chunk_tokens_for(rows, v // tp, torch.float32 if b == 4 else torch.bfloat16)
            chunk = chunk_rows * v // tp * b + (2 * chunk_rows * v // tp * 4 if rt.device == "cpu" else 0)
            working = max(working, chunk + v // tp * h * 4 + rows * h * b)
        elif last:
            act += tokens * (4 * h + 2 * b * h)
        grads = weights[role]
        if n_micro > 1:  # the next micro-batch's forward runs beside the gradients the first one accumulated
            extra = grads + act + working
        else:  # backward allocates the gradients while it frees the activations
            extra = max(act + working, grads + working)
        return act + working, max(extra, grads + step_tmp)

    policy_act, policy_phase = train_phase("policy", cfg.ppo.policy_updates_per_step)
    critic_act, critic_phase = train_phase("critic", cfg.ppo.critic_updates_per_step)
    values_tokens, _ = _micro_batch(w, cfg, 1)
    values_work = values_tokens * layer_tok

    # Rollout: the engine's KV cache, one step's activations, the sampled rows' logits, one layer's gathered K/V.
    block = _ENGINE_DEFAULTS["block_size"]
    kv_tok = _kv_bytes_per_token(spec, layers, tp, b)
    shared = cfg.data.max_prompt_tokens // block
    blocks = w.prompts * (shared + cfg.rollout.samples_per_prompt * (math.ceil(w.seq_context / block) - shared))
    demand = blocks * block * kv_tok
    seq_kv = math.ceil(w.seq_context / block) * block * kv_tok
    batch = min(_ENGINE_DEFAULTS["max_num_seqs"], w.seqs)
    step_tokens = min(_ENGINE_DEFAULTS["max_num_batched_tokens"], w.prompts * cfg.data.max_prompt_tokens + batch)
    inter = (spec.num_heads + 2 * spec.num_kv_heads + spec.num_heads) * spec.head_dim + 3 * spec.intermediate_size
    rollout_work = (
        step_tokens * (2 * h + inter // tp) * b
        + batch * v * (b + 12)
        + 2 * batch * math.ceil(w.seq_context / block) * block * spec.num_kv_heads // tp * spec.head_dim * b
    )
    rollout_static = weights["policy"] + weights["critic"] + (optimizer if rt.device == "cpu" else 0)
    if rt.device == "gpu":
        budget = kv_cache_bytes(cfg.rollout, "cuda", free_bytes=gpu_memory - rt.reserved - rollout_static)
    else:
        budget = kv_cache_bytes(cfg.rollout, "cpu")
    kv_blocks = budget // max(1, block * kv_tok)
    kv = min(kv_blocks * block * kv_tok, demand)
    decode_batch = min(batch, kv // seq_kv) if seq_kv else batch

    both = weights["policy"] + weights["critic"] + optimizer + rt.reserved
    phases = {
        "rollout": rollout_static + rt.reserved + kv + rollout_work,
        "critic_values": both + values_work,
        "policy_train": both + policy_phase,
        "critic_train": both + critic_phase,
    }
    return {
        "weights": weights["policy"] + weights["critic"],
        "grads": max(weights.values()),
        "optimizer": optimizer,
        "activations": max(policy_act, critic_act),
        "kv_cache": kv,
        "kv_budget": kv_blocks * block * kv_tok,
        "kv_tokens": kv_blocks * block,
        "rollout_work": rollout_work,
        "phases": phases,
        "decode_batch": decode_batch,
        "policy_weights": weights["policy"],
        "kv_per_token": kv_tok,
    }


# ---------------------------------------------------------------------------
# Cost model


def _allreduce_seconds(nbytes: float, ranks: int, bandwidth: float, hw: Hardware) -> float:
    if ranks == 1:
        return 0.0
    return hw.collective_latency + 2 * (ranks - 1) / ranks * nbytes / bandwidth


def _step_time(
    spec: ModelSpec, cfg: Config, layout: Layout, mem: dict, hw: Hardware, mean_response: float
) -> dict[str, float]:
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    gpus, b = tp * pp * dp, 2
    h, layers = spec.hidden_size, spec.num_layers
    w = _workload(spec, cfg, dp)
    mean_prompt = cfg.data.max_prompt_tokens / 8
    pad = cfg.model.vocab_pad_multiple
    n_params = sum(stage_param_numels(spec, 1, 1, 0, "policy", vocab_pad_multiple=pad))
    n_trunk = n_params - padded_vocab_size(spec.vocab_size, 1, pad) * h * (1 if spec.tie_word_embeddings else 2)
    tp_bw = hw.nvlink_bandwidth if tp <= hw.gpus_per_node else hw.network_bandwidth
    dp_bw = hw.nvlink_bandwidth if tp * dp <= hw.gpus_per_node else hw.network_bandwidth

    # Rollout (per replica; replicas run in parallel).
    batch = max(1, mem["decode_batch"])
    context = mean_prompt + mean_response / 2
    step_bytes = pp * (mem["policy_weights"] + batch * context * mem["kv_per_token"])
    step_mem = step_bytes / (hw.hbm_bandwidth * hw.hbm_efficiency)
    step_compute = 2 * n_params / tp * batch / (hw.peak_flops * hw.mfu)
    step_comm = 2 * layers * _allreduce_seconds(batch * h * b, tp, tp_bw, hw)
    decode = w.seqs * mean_response / batch * (max(step_mem, step_compute) + step_comm)
    prefill = 2 * n_params * w.prompts * mean_prompt / (tp * pp * hw.peak_flops * hw.mfu)

    # Training (all GPUs).
    tokens = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt * (mean_prompt + mean_response)
    attn_fwd = 2 * layers * spec.num_heads * spec.head_dim * (mean_prompt + mean_response)  # per token, causal
    fwd = 2 * n_trunk + attn_fwd
    passes = 4 if cfg.model.activation_checkpointing else 3  # forward, backward (2x), recomputed forward
    updates = cfg.ppo.critic_updates_per_step
    policy_flops = tokens * (passes * fwd + 8 * spec.vocab_size * h)  # LM head: logits recomputed in backward
    critic_flops = tokens * fwd * (1 + passes)
    per_gpu_rate = hw.peak_flops * hw.mfu
    _, m_policy = _micro_batch(w, cfg, cfg.ppo.policy_updates_per_step)
    _, m_critic = _micro_batch(w, cfg, updates)
    bubble_p = 1 + (pp - 1) / m_policy
    bubble_c = 1 + (pp - 1) / m_critic
    compute = (policy_flops * bubble_p + critic_flops * bubble_c) / (gpus * per_gpu_rate)
    # Two all-reduces of [T, H] per layer and pass, on this replica's tokens; each stage holds layers / pp.
    replica_tokens = tokens / dp
    tp_passes = 2 * passes + 1  # policy passes + critic values + critic passes
    tp_comm = tp_passes * 2 * layers / pp * _allreduce_seconds(replica_tokens * h * b, tp, tp_bw, hw) if tp > 1 else 0
    dp_bytes = mem["policy_weights"]
    opt_steps = cfg.ppo.policy_updates_per_step + updates
    dp_comm = opt_steps * (
        _allreduce_seconds(dp_bytes, dp, dp_bw, hw) + _allreduce_seconds(dp_bytes / 2, dp, dp_bw, hw)
    )
    return {
        "rollout": prefill + decode,
        "train_compute": compute,
        "tp_comm": tp_comm,
        "dp_comm": dp_comm,
    }


# ---------------------------------------------------------------------------
# Planning


def plan(
    model: str,
    gpus: int,
    *,
    gpu_memory: int = 80 * GIB,
    overrides: list[str] | tuple[str, ...] = (),
    device: Literal["gpu", "cpu"] = "gpu",
    mean_response_tokens: float | None = None,
    hardware: Hardware | None = None,
) -> Plan:
    """Memory and estimated step time of every layout of ``gpus`` devices; see the module docstring."""
    if not isinstance(gpus, int) or gpus < 1:
        raise PlanError(f"--gpus {gpus!r}: must be an integer >= 1")
    if gpu_memory <= 0:
        raise PlanError(f"--gpu-memory {gpu_memory}: must be positive")
    if device not in ("gpu", "cpu"):
        raise PlanError(f"--device {device!r}: expected 'gpu' or 'cpu'")
    spec, cfg = resolve_model(model, overrides)
    hw = hardware or Hardware()
    rt = _runtime(cfg, device)
    mean_response = cfg.rollout.max_tokens / 2 if mean_response_tokens is None else mean_response_tokens
    if not 0 < mean_response <= cfg.rollout.max_tokens:
        raise PlanError(f"--mean-response-tokens {mean_response}: must be in (0, rollout.max_tokens]")
    rows, rejected = [], {}
    for layout in candidate_layouts(gpus):
        why = layout_error(spec, layout)
        if why is not None:
            rejected[str(layout)] = why
            continue
        stages = [_stage_memory(spec, cfg, layout, s, rt, gpu_memory) for s in range(layout.pp)]
        mem = max(stages, key=lambda m: max(m["phases"].values()))
        phase = max(mem["phases"], key=mem["phases"].get)
        peak = mem["phases"][phase]
        times = _step_time(spec, cfg, layout, mem, hw, mean_response)
        rows.append(
            LayoutPlan(
                layout=str(layout),
                tp=layout.tp,
                pp=layout.pp,
                dp=layout.dp,
                weights=mem["weights"],
                grads=mem["grads"],
                optimizer=mem["optimizer"],
                activations=mem["activations"],
                kv_cache=mem["kv_cache"],
                kv_budget=mem["kv_budget"],
                kv_tokens=mem["kv_tokens"],
                rollout_work=mem["rollout_work"],
                phases=mem["phases"],
                peak=peak,
                peak_phase=phase,
                decode_batch=min(s["decode_batch"] for s in stages),
                fits=peak <= gpu_memory and min(s["decode_batch"] for s in stages) >= 1,
                trainer_error=trainer_error(spec, cfg, layout),
                step_seconds=sum(times.values()),
                time_breakdown=times,
            )
        )
    rows.sort(key=lambda r: (not r.fits, r.step_seconds if r.fits else r.peak))
    fitting = [r for r in rows if r.fits]
    return Plan(
        model=model,
        gpus=gpus,
        gpu_memory=gpu_memory,
        device=device,
        layouts=rows,
        rejected=rejected,
        recommended=fitting[0].layout if fitting else None,
        recommended_runnable=next((r.layout for r in fitting if r.trainer_error is None), None),
    )


def format_plan(p: Plan) -> str:
    """The human-readable table and recommendation."""

    def gib(x: int) -> str:
        return f"{x / GIB:.1f}"

    def train_peak(r: LayoutPlan) -> int:
        return max(v for k, v in r.phases.items() if k != "rollout")

    best = next((r.step_seconds for r in p.layouts if r.fits), None)
    head = (
        "| layout | weights | grads | optim | activ. | train peak | KV budget (tokens) | KV cache | peak (phase) "
        "| decode batch | fits | est. step | rel. |"
    )
    lines = [
        f"{p.model} on {p.gpus} x {gib(p.gpu_memory)} GiB ({p.device}); GiB per GPU, heaviest pipeline stage",
        "",
        head,
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|---:|",
    ]
    for r in p.layouts:
        fits = ("yes" if r.trainer_error is None else "yes, trainer: no") if r.fits else "no"
        rel = f"{r.step_seconds / best:.2f}x" if r.fits and best else "-"
        lines.append(
            f"| {r.layout} | {gib(r.weights)} | {gib(r.grads)} | {gib(r.optimizer)} | {gib(r.activations)} "
            f"| {gib(train_peak(r))} | {gib(r.kv_budget)} ({r.kv_tokens:,}) | {gib(r.kv_cache)} "
            f"| {gib(r.peak)} ({r.peak_phase}) | {r.decode_batch} | {fits} "
            f"| {r.step_seconds:.0f} s | {rel} |"
        )
    for name, why in p.rejected.items():
        lines.append(f"rejected {name}: {why}")
    for why in sorted({r.trainer_error for r in p.layouts if r.fits and r.trainer_error}):
        lines.append(f"trainer: no = orz_fast.ppo.checks.check_layout says: {why}")
    lines.append("")
    if p.recommended is None:
        lines.append("recommendation: no layout fits; add GPUs, use larger ones, or lower ppo.micro_batch_tokens")
    else:
        lines.append(f"recommendation: {p.recommended}")
        if p.recommended_runnable != p.recommended:
            runnable = p.recommended_runnable or "none fits"
            lines.append(f"fastest the trainer accepts: {runnable}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m orz_fast.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="preset, Qwen2.5 Hub id, config.json or its directory")
    parser.add_argument("--gpus", required=True, type=int, help="total GPUs (TP x PP x DP)")
    parser.add_argument("--gpu-memory", default="80GB", help="memory per GPU, e.g. 80GB, 141GB (GB = GiB)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="a.b=VALUE", help="override one config key"
    )
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu", help="model a GPU run or a CPU run")
    parser.add_argument("--mean-response-tokens", type=float, help="mean response length (default max_tokens / 2)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = plan(
            args.model,
            args.gpus,
            gpu_memory=parse_memory(args.gpu_memory),
            overrides=args.overrides,
            device=args.device,
            mean_response_tokens=args.mean_response_tokens,
        )
    except PlanError as e:
        print(f"orz_fast.plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
