"""Checkpoint import / export: Hugging Face safetensors directories and GGUF files <-> TP x PP shards.

Every parameter of a stage module has a :class:`ParamLayout`: the Hugging Face tensors it is
made of ("pieces") and the dimension the tensor-parallel split runs along. Rank ``r`` of
``tp`` holds, concatenated along dim 0, the ``r``-th of ``tp`` equal chunks of each piece
along the split dimension (fused Q/K/V = [q | k | v] chunks, fused gate/up = [gate | up]).
Loading reads exactly those chunks (safetensors slices, so a rank never materialises
another rank's rows). Export goes the other way, one tensor at a time (:func:`iter_hf_tensors`,
shared by saving and by the rollout engines' weight sync): each parameter's shard is broadcast
over PP, all-gathered over TP and un-fused; for saving, global rank 0 collects them and writes
the directory.

The embedding and LM head are the exception to equal chunks of the checkpoint tensor: the
model pads the vocabulary to ``padded_vocab_size`` rows (see ``decoder.py``), so their layout
carries ``padded_rows``. Loading reads each rank's rows that exist in the checkpoint and fills
the rest with zeros (a rank may hold padding only); export drops the padding rows, so every
exported tensor has the checkpoint's ``vocab_size`` rows.
"""

from __future__ import annotations

import abc
import functools
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from orz_fast import parallel
from orz_fast.models.decoder import CriticModel, DecoderStage, PolicyModel
from orz_fast.models.spec import SUPPORTED_ARCHITECTURES, VOCAB_PAD_MULTIPLE, ModelSpec

Role = Literal["policy", "critic"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint is incomplete or does not match the model (the message names the file or tensor)."""


@dataclass(frozen=True)
class ParamLayout:
    pieces: tuple[str, ...]
    """Hugging Face tensor names, concatenated (per TP chunk) along dim 0 in this order."""
    split_dim: int | None
    """Dimension split over TP ranks; ``None`` for a replicated parameter."""
    padded_rows: int | None = None
    """The vocabulary's padded size (embedding, LM head): dim 0 is zero-padded to it before the TP
    split. ``None``: the pieces split as they are."""


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) shape of every Hugging Face tensor of the model, ``value_head.weight`` included."""
    h, d, i_size = spec.hidden_size, spec.head_dim, spec.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (spec.vocab_size, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (spec.vocab_size, h),
        "value_head.weight": (1, h),
    }
    for g in range(spec.num_layers):
        p = f"model.layers.{g}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        for name, rows in (("q", spec.num_heads * d), ("k", spec.num_kv_heads * d), ("v", spec.num_kv_heads * d)):
            shapes[p + f"self_attn.{name}_proj.weight"] = (rows, h)
            shapes[p + f"self_attn.{name}_proj.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (h, spec.num_heads * d)
        shapes[p + "self_attn.o_proj.bias"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (i_size, h)
        shapes[p + "mlp.up_proj.weight"] = (i_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i_size)
    return shapes


def stage_layouts(
    spec: ModelSpec, *, role: Role | None, stage: int, pp: int, padded_vocab: int
) -> dict[str, ParamLayout]:
    """Layout of every parameter of pipeline stage ``stage`` of ``pp``, keyed by its module name on that stage.

    ``role`` is the head on the last stage (``None``: the bare trunk); ``padded_vocab`` the model's
    embedding / LM-head rows (``DecoderStage.padded_vocab_size``). Every rank can compute any
    stage's layouts, which is how stages that do not hold a parameter know what to receive.
    """
    first, last = stage == 0, stage == pp - 1
    out: dict[str, ParamLayout] = {}
    if first:
        out["embed.weight"] = ParamLayout(("model.embed_tokens.weight",), 0, padded_vocab)
    for local, g in enumerate(spec.stage_layers(stage, pp)):
        m, p = f"layers.{local}.", f"model.layers.{g}."
        attn = p + "self_attn."
        out[m + "input_layernorm.weight"] = ParamLayout((p + "input_layernorm.weight",), None)
        out[m + "post_attention_layernorm.weight"] = ParamLayout((p + "post_attention_layernorm.weight",), None)
        out[m + "qkv.weight"] = ParamLayout(tuple(attn + f"{x}_proj.weight" for x in "qkv"), 0)
        if spec.qkv_bias:
            out[m + "qkv.bias"] = ParamLayout(tuple(attn + f"{x}_proj.bias" for x in "qkv"), 0)
        out[m + "o_proj.weight"] = ParamLayout((attn + "o_proj.weight",), 1)
        if spec.o_bias:
            out[m + "o_proj.bias"] = ParamLayout((attn + "o_proj.bias",), None)
        out[m + "gate_up.weight"] = ParamLayout((p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"), 0)
        out[m + "down.weight"] = ParamLayout((p + "mlp.down_proj.weight",), 1)
    if last:
        out["norm.weight"] = ParamLayout(("model.norm.weight",), None)
        # A tied head on the embedding's own stage reuses the embedding's shard (no parameter of its own).
        if role == "policy" and not (spec.tie_word_embeddings and first):
            head = "model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
            out["output_layer.weight"] = ParamLayout((head,), 0, padded_vocab)
        if role == "critic":
            out["value_head.weight"] = ParamLayout(("value_head.weight",), None)
    return out


def _role(model: DecoderStage) -> Role | None:
    if isinstance(model, PolicyModel):
        return "policy"
    return "critic" if isinstance(model, CriticModel) else None


def param_layouts(model: DecoderStage) -> dict[str, ParamLayout]:
    """Layout of every parameter of ``model`` (one stage, one TP rank), keyed by its module name."""
    out = stage_layouts(
        model.spec,
        role=_role(model),
        stage=parallel.pp_rank(),
        pp=parallel.pp_size(),
        padded_vocab=model.padded_vocab_size,
    )
    names = {n for n, _ in model.named_parameters()}
    if names != set(out):
        raise RuntimeError(f"parameter layout out of sync with the module: {sorted(names ^ set(out))}")
    return out


# ---------------------------------------------------------------------------
# Tensor sources


class TensorSource(abc.ABC):
    """Full-size Hugging Face tensors by name, read one TP chunk at a time."""

    @abc.abstractmethod
    def has(self, name: str) -> bool:
        """Whether the source holds tensor ``name``."""

    @abc.abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """The full shape of tensor ``name``."""

    @abc.abstractmethod
    def chunk(self, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        """``tensor[start:stop]`` along ``dim`` (the whole tensor when ``dim`` is None)."""


class SafetensorsSource(TensorSource):
    """A Hugging Face directory: ``model.safetensors`` or sharded files with ``model.safetensors.index.json``."""

    def __init__(self, path: Path) -> None:
        index = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            missing = sorted({f for f in weight_map.values() if not (path / f).exists()})
            if missing:
                raise CheckpointError(f"{path}: shard file(s) listed in {index.name} are missing: {missing}")
        elif single.exists():
            with safe_open(single, framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), single.name)
        else:
            raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
        self.path = path
        self.weight_map = weight_map
        self._files: dict[str, object] = {}

    def _file(self, name: str):
        fname = self.weight_map[name]
        if fname not in self._files:
            self._files[fname] = safe_open(self.path / fname, framework="pt")
        return self._files[fname]

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).get_slice(name).get_shape())

    def chunk(self, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        sl = self._file(name).get_slice(name)
        if dim is None:
            return sl[:]
        return sl[(slice(None),) * dim + (slice(start, stop),)]


class DictSource(TensorSource):
    """Tensors already in memory (a dequantised GGUF file)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def chunk(self, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        t = self.tensors[name]
        return t if dim is None else t.narrow(dim, start, stop - start)


class RandomSource(TensorSource):
    """Seeded random weights, generated per tensor name so every TP x PP layout gets the same model.

    Linear and embedding weights ~ N(0, initializer_range), norms = 1, biases = 0, and the
    value head ~ N(0, 1 / (H + 1)) as ORZ (OpenRLHF) initialises it.
    """

    def __init__(self, spec: ModelSpec, seed: int, names: set[str] | None = None) -> None:
        self.shapes = expected_shapes(spec)
        self.std = float(spec.hf_config.get("initializer_range", 0.02))
        self.value_std = 1.0 / (spec.hidden_size + 1)
        self.seed = seed
        self.names = names

    def has(self, name: str) -> bool:
        return name in self.shapes and (self.names is None or name in self.names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def chunk(self, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        shape = self.shapes[name]
        if name.endswith("norm.weight"):
            full = torch.ones(shape)
        elif name.endswith(".bias"):
            full = torch.zeros(shape)
        else:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
            std = self.value_std if name == "value_head.weight" else self.std
            full = torch.randn(shape, generator=gen) * std
        return full if dim is None else full.narrow(dim, start, stop - start)


def _read_param(source: TensorSource, layout: ParamLayout, shapes: dict[str, tuple[int, ...]], tp: int, rank: int):
    parts = []
    for name in layout.pieces:
        if not source.has(name):
            raise CheckpointError(f"checkpoint has no tensor {name!r}")
        got = source.shape(name)
        if got != shapes[name]:
            raise CheckpointError(
                f"shape mismatch for tensor {name!r}: checkpoint has {got}, model expects {shapes[name]}"
            )
        if layout.split_dim is None:
            parts.append(source.chunk(name, None, 0, 0))
        elif layout.padded_rows is None:
            n = got[layout.split_dim] // tp
            parts.append(source.chunk(name, layout.split_dim, rank * n, (rank + 1) * n))
        else:
            parts.append(_padded_chunk(source, name, got, layout.padded_rows // tp, rank))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _padded_chunk(source: TensorSource, name: str, shape: tuple[int, ...], rows: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s ``rows`` rows of tensor ``name`` zero-padded past its ``shape[0]`` rows (the vocabulary)."""
    start, stop = rank * rows, min((rank + 1) * rows, shape[0])
    if stop >= start + rows:
        return source.chunk(name, 0, start, stop)
    real = source.chunk(name, 0, start, stop) if stop > start else None
    out = torch.zeros((rows, *shape[1:]), dtype=real.dtype if real is not None else torch.float32)
    if real is not None:
        out[: stop - start] = real
    return out


@torch.no_grad()
def load_weights(model: DecoderStage, source: TensorSource, *, fresh_value_head_seed: int | None = None) -> None:
    """Fill ``model``'s parameters with this rank's chunks from ``source``.

    With ``fresh_value_head_seed`` set, a critic whose source lacks ``value_head.weight``
    (a policy checkpoint) gets a freshly initialised value head instead of an error.
    """
    tp, rank = parallel.tp_size(), parallel.tp_rank()
    shapes = expected_shapes(model.spec)
    params = dict(model.named_parameters())
    for pname, layout in param_layouts(model).items():
        src = source
        if pname == "value_head.weight" and not source.has("value_head.weight") and fresh_value_head_seed is not None:
            src = RandomSource(model.spec, fresh_value_head_seed)
        value = _read_param(src, layout, shapes, tp, rank)
        param = params[pname]
        if value.shape != param.shape:
            raise CheckpointError(f"{pname}: assembled shard {tuple(value.shape)} != parameter {tuple(param.shape)}")
        param.copy_(value.to(param.dtype))


# ---------------------------------------------------------------------------
# Building and loading models


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _model_class(role: Role) -> type[DecoderStage]:
    if role not in ("policy", "critic"):
        raise ValueError(f"role must be 'policy' or 'critic', got {role!r}")
    return PolicyModel if role == "policy" else CriticModel


@functools.cache
def _dequantisable(qtype: int) -> bool:
    """Whether ``gguf.dequantize`` (what transformers' GGUF reader calls per tensor) handles this GGML type:
    tried on one block of zeros."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

    _, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    try:
        dequantize(np.zeros((1, type_size), dtype=np.uint8), GGMLQuantizationType(qtype))
    except NotImplementedError:
        return False
    return True


def check_gguf(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` naming the file, the first such tensor and its type when a GGUF file holds a
    quantisation type transformers cannot dequantise; reads the header only (no weights)."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    for tensor in reader.tensors:
        if not _dequantisable(int(tensor.tensor_type)):
            raise CheckpointError(
                f"{path}: tensor {tensor.name!r} is quantised as {tensor.tensor_type.name}, which transformers "
                "cannot dequantise (its GGUF reader handles F32, F16, BF16, Q4_0 ... Q8_0, the K and IQ types); "
                "convert the file to a supported type, e.g. with llama.cpp's llama-quantize"
            )


def check_checkpoint(path: str | os.PathLike | None, setting: str = "model.path") -> None:
    """Raise naming ``setting`` and the file when ``path`` cannot be loaded, before any weights are read: a
    missing path, a directory without config.json or safetensors weights, a GGUF file with a type transformers
    cannot dequantise (:func:`check_gguf`). ``None`` (a random-weight model) passes."""
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        kind = "GGUF file" if p.suffix == ".gguf" else "Hugging Face directory"
        raise CheckpointError(f"{setting}={str(path)!r}: no such {kind}")
    try:
        if p.suffix == ".gguf":
            if not p.is_file():
                raise CheckpointError(f"{p}: not a file")
            check_gguf(p)
            return
        if not p.is_dir():
            raise CheckpointError(f"{p}: neither a Hugging Face directory nor a .gguf file")
        _read_hf_config(p)
        if not (p / "model.safetensors").is_file() and not (p / "model.safetensors.index.json").is_file():
            raise CheckpointError(f"{p}: no model.safetensors or model.safetensors.index.json")
    except CheckpointError as e:
        raise CheckpointError(f"{setting}: {e}") from e


def _gguf_config_and_tensors(path: Path, dtype: torch.dtype) -> tuple[dict, dict[str, torch.Tensor]]:
    """Config and dequantised tensors of a GGUF file, through transformers' GGUF reader (whole file in memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    check_gguf(path)
    hf_config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    ModelSpec.from_hf_config(hf_config.to_dict())  # reject an unsupported architecture before dequantising
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton, torch_dtype=dtype)
    return hf_config.to_dict(), parsed["tensors"]


def _read_hf_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no config.json")
    return json.loads(cfg_file.read_text())


def load_pretrained(
    path: str | os.PathLike,
    *,
    role: Role = "policy",
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str | None = None,
    activation_checkpointing: bool = False,
    value_head_seed: int = 0,
    vocab_pad_multiple: int = VOCAB_PAD_MULTIPLE,
) -> PolicyModel | CriticModel:
    """This rank's TP x PP shard of a Qwen2 / Llama-family checkpoint.

    ``path`` is a Hugging Face directory (config.json + single or sharded safetensors) or a
    ``.gguf`` file. ``role="critic"`` loads the trunk and the value head when the checkpoint
    has one (a saved critic), else a fresh value head seeded by ``value_head_seed``. The
    vocabulary is padded to a multiple of ``vocab_pad_multiple * tp`` rows (zeros).
    Requires :func:`orz_fast.parallel.initialize`; the default device is CUDA when available.
    """
    path = Path(path)
    dtype = _as_dtype(dtype)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".gguf":
        cfg, tensors = _gguf_config_and_tensors(path, dtype)
        source: TensorSource = DictSource(tensors)
    else:
        cfg = _read_hf_config(path)
        ModelSpec.from_hf_config(cfg)  # reject an unsupported architecture before opening the weights
        source = SafetensorsSource(path)
    spec = ModelSpec.from_hf_config(cfg)
    model = _model_class(role)(
        spec,
        dtype=dtype,
        device=device,
        activation_checkpointing=activation_checkpointing,
        vocab_pad_multiple=vocab_pad_multiple,
    )
    load_weights(model, source, fresh_value_head_seed=value_head_seed)
    return model


def build_model(
    arch: dict,
    *,
    role: Role = "policy",
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str | None = None,
    activation_checkpointing: bool = False,
    seed: int = 0,
    vocab_pad_multiple: int = VOCAB_PAD_MULTIPLE,
) -> PolicyModel | CriticModel:
    """A random-weight model from Hugging Face config fields (``ModelConfig.arch``), identical in every layout
    (the real vocabulary rows too; padding rows are zero)."""
    spec = ModelSpec.from_hf_config(arch)
    model = _model_class(role)(
        spec,
        dtype=dtype,
        device=device,
        activation_checkpointing=activation_checkpointing,
        vocab_pad_multiple=vocab_pad_multiple,
    )
    load_weights(model, RandomSource(spec, seed))
    return model


def model_from_config(
    model_cfg, *, role: Role = "policy", device: torch.device | str | None = None, seed: int = 0
) -> PolicyModel | CriticModel:
    """The policy or critic a run's :class:`orz_fast.config.ModelConfig` describes.

    The critic loads ``critic_path`` when set, else the policy's ``path`` with a fresh value
    head; with no path both are random-weight models from ``arch`` (the critic's value head
    seeded apart from the trunk). ``dtype`` applies on CUDA; CPU runs use float32.
    """
    on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    dtype = _as_dtype(model_cfg.dtype) if on_cuda else torch.float32
    path = model_cfg.critic_path if role == "critic" and model_cfg.critic_path else model_cfg.path
    kwargs = {
        "role": role,
        "dtype": dtype,
        "device": device,
        "activation_checkpointing": model_cfg.activation_checkpointing,
        "vocab_pad_multiple": model_cfg.vocab_pad_multiple,
    }
    if path is not None:
        return load_pretrained(path, value_head_seed=seed, **kwargs)
    return build_model(model_cfg.arch, seed=seed, **kwargs)


# ---------------------------------------------------------------------------
# Export


def _shard_shape(layout: ParamLayout, shapes: dict[str, tuple[int, ...]], tp: int) -> tuple[int, ...]:
    """Shape of one TP rank's parameter: each piece's chunk along the split dimension, concatenated along dim 0."""
    chunks = []
    for name in layout.pieces:
        shape = list(shapes[name])
        if layout.padded_rows is not None:
            shape[0] = layout.padded_rows
        if layout.split_dim is not None:
            shape[layout.split_dim] //= tp
        chunks.append(shape)
    return (sum(c[0] for c in chunks), *chunks[0][1:])


def _gather_tp(tensor: torch.Tensor, layout: ParamLayout, shapes: dict[str, tuple[int, ...]]) -> Iterator:
    """(hf_name, full tensor) pairs of one parameter (or its gradient), all-gathered over the TP group;
    vocabulary padding rows are dropped."""
    tp = parallel.tp_size()
    if layout.split_dim is None or tp == 1:
        shards = [tensor]
    else:
        shards = [torch.empty_like(tensor) for _ in range(tp)]
        dist.all_gather(shards, tensor.contiguous(), group=parallel.tp_group())
    rows = [layout.padded_rows or shapes[n][0] for n in layout.pieces]
    sizes = [r // tp if layout.split_dim == 0 else r for r in rows]
    per_rank = [s.split(sizes, dim=0) for s in shards]
    for i, name in enumerate(layout.pieces):
        chunks = [r[i] for r in per_rank]
        full = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=layout.split_dim)
        if layout.padded_rows is not None:
            full = full[: shapes[name][0]]
        yield name, full.contiguous()


@torch.no_grad()
def iter_hf_tensors(model: DecoderStage, *, grads: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Every Hugging Face tensor of the whole model as ``(hf_name, full tensor)``, one at a time, on every rank.

    Collective over this rank's TP and PP groups: all their ranks iterate it to the end in step
    (data-parallel replicas are independent). Each parameter's TP shard is broadcast from the
    stage holding it to the other stages, all-gathered over TP and split into its Hugging Face
    pieces (fused QKV into q/k/v per query group, fused gate/up into gate and up per TP chunk),
    so every rank yields the same sequence: the shapes of :func:`expected_shapes` (vocab rows
    exactly ``vocab_size``: the padding rows are dropped), the parameters' dtype, the model's
    device. A tied LM head is not yielded (``model.embed_tokens.weight`` is). With ``grads``
    the gradients are yielded instead, zeros where a gradient is missing. Extra memory: one
    parameter's shards and its full tensor. With TP = PP = 1 the tensors alias the parameters:
    copy before modifying.
    """
    spec = model.spec
    shapes = expected_shapes(spec)
    tp, pp, my_stage = parallel.tp_size(), parallel.pp_size(), parallel.pp_rank()
    params = dict(model.named_parameters())
    ref = next(iter(params.values()))
    for stage in range(pp):
        layouts = stage_layouts(spec, role=_role(model), stage=stage, pp=pp, padded_vocab=model.padded_vocab_size)
        for pname, layout in layouts.items():
            if pname == "output_layer.weight" and spec.tie_word_embeddings:
                continue  # the last stage's copy of a tied embedding (pp > 1); the first stage yields it
            if stage == my_stage:
                p = params[pname]
                shard = (p.grad if p.grad is not None else torch.zeros_like(p)) if grads else p.detach()
                shard = shard.to(ref.dtype)
            else:
                shard = torch.empty(_shard_shape(layout, shapes, tp), dtype=ref.dtype, device=ref.device)
            if pp > 1:
                group = parallel.pp_group()
                shard = shard.contiguous()
                dist.broadcast(shard, src=dist.get_global_rank(group, stage), group=group)
            yield from _gather_tp(shard, layout, shapes)


@torch.no_grad()
def gather_hf_state_dict(model: DecoderStage, *, grads: bool = False) -> dict[str, torch.Tensor] | None:
    """The full Hugging Face-named state dict (or, with ``grads``, the gradients) on global rank 0, on CPU.

    Collective: every rank calls it; non-zero ranks get ``None``. A missing gradient is zeros.
    The tensors are copies (never the parameters themselves).
    """
    if parallel.dp_rank() != 0:
        return None  # only data-parallel replica 0, which holds global rank 0, has to gather
    keep = dist.get_rank() == 0
    state: dict[str, torch.Tensor] = {}
    for name, tensor in iter_hf_tensors(model, grads=grads):
        if keep:
            state[name] = tensor.to("cpu", copy=True)
    return state if keep else None


def save_pretrained(model: DecoderStage, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write ``model`` (all ranks call this) as a Hugging Face directory that transformers loads.

    Tensors are gathered over TP and PP to global rank 0, which writes ``config.json`` and
    ``model.safetensors`` (or ``model-XXXXX-of-YYYYY.safetensors`` shards plus an index when
    larger than ``max_shard_bytes``). A critic also writes ``value_head.weight``.
    """
    path = Path(path)
    state = gather_hf_state_dict(model)
    if state is not None:
        path.mkdir(parents=True, exist_ok=True)
        dtype = next(model.parameters()).dtype
        cfg = dict(model.spec.hf_config)
        cfg["architectures"] = [SUPPORTED_ARCHITECTURES[model.spec.model_type]]
        cfg["dtype"] = str(dtype).removeprefix("torch.")
        cfg.pop("torch_dtype", None)
        if isinstance(model, CriticModel):
            cfg["orz_fast_role"] = "critic"
        (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name in sorted(state):
            nbytes = state[name].numel() * state[name].element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = state[name]
            size += nbytes
        if len(shards) == 1:
            save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(path / fname), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    dist.barrier()
    return path
