"""Qwen2 / Llama-family decoder on megatron-core tensor-parallel layers, over packed 1-D token streams.

One module holds one pipeline stage of one tensor-parallel rank: the embedding on the
first stage, a contiguous run of decoder layers, and the final norm plus the head
(LM head for the policy, value head for the critic) on the last stage. Activations are
[T, H] with T the packed token count; between stages they travel as [T, 1, H], the
[seq, batch, hidden] layout megatron-core's pipeline schedule sends.

The same forward serves training, prefill and decode: the layers take an *attention context*
(:mod:`orz_fast.models.attention`) that says how the tokens attend: packed causal segments for
training and scoring (built from ``cu_seqlens``), prompts plus a paged KV cache for the rollout
(:class:`orz_fast.models.paged.PagedAttention`). With autograd on, the TP linears run through
megatron-core's modules (their backward communication); with it off (forward-only passes, the
rollout) they run as plain GEMMs on the same weight shards plus the row-parallel all-reduce,
which is the same arithmetic without the wrappers' per-call cost.

Per TP rank the Q/K/V projections are one fused ``ColumnParallelLinear`` whose output is
this rank's [q heads | k heads | v heads], and gate/up are one fused column-parallel
GEMM laid out [gate | up]; ``checkpoint.py`` maps Hugging Face tensors to and from this
layout.

The embedding and the LM head have ``padded_vocab_size`` rows (the real vocabulary rounded up
to a multiple of ``vocab_pad_multiple * tp``, as Megatron pads it), split into equal TP shards.
The padding rows are zero; they are never a token: :meth:`PolicyModel.logits` drops their
columns, the log-prob ops exclude them (``vocab_size=model.spec.vocab_size``) and checkpoint
export strips them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.enums import ModelType
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    set_tensor_model_parallel_attributes,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

from orz_fast import parallel
from orz_fast.models.attention import AttentionContext, PackedSegments
from orz_fast.models.spec import VOCAB_PAD_MULTIPLE, ModelSpec, padded_vocab_size


@dataclass(kw_only=True)
class StageConfig(ModelParallelConfig):
    """megatron-core's parallel config plus the fields its pipeline schedule reads from a model config."""

    hidden_size: int = 0
    """Residual width (the schedule sizes its p2p buffers with it)."""
    fine_grained_activation_offloading: bool = False
    """Read by the schedule; activation offloading is not used."""
    calculate_per_token_loss: bool = False
    """Read by the schedule; losses are averaged over micro-batches."""


def mark_tensor_parallel_weights(module: nn.Module) -> None:
    """Tag every vocab/column/row-parallel weight as a tensor-parallel shard (``tensor_model_parallel``,
    ``partition_dim``), as megatron-core does only when it initialises the weights itself; the
    optimizer's gradient norm counts tagged shards on every rank and untagged (replicated) ones once."""
    for m in module.modules():
        if isinstance(m, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(m, RowParallelLinear):
            dim = 1
        else:
            continue
        if m.weight is not None:
            set_tensor_model_parallel_attributes(m.weight, True, dim, 1)


def _no_init(_: torch.Tensor) -> None:
    """Parameters are filled by ``checkpoint.load_weights`` (from a checkpoint or a seeded random init)."""


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and scaled in the input dtype (as the Hugging Face Qwen2/Llama models do)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin tables [T, head_dim] for rotate-half RoPE at the given positions, computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos, sin: [T, D]. Rotate-half as (x1, x2) -> (-x2, x1), done with a flip (cheap backward)."""
    half = x.shape[-1] // 2
    sign = torch.tensor([[-1.0], [1.0]], dtype=x.dtype, device=x.device)
    rotated = (x.unflatten(-1, (2, half)).flip(-2) * sign).flatten(-2)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class _GatherVocab(torch.autograd.Function):
    """All-gather vocab-sharded logits [T, V / tp] to [T, V]; backward keeps this rank's columns.

    (megatron-core's gather allocates on ``torch.cuda.current_device()``; this one follows the input.)
    """

    @staticmethod
    def forward(ctx, shard: torch.Tensor) -> torch.Tensor:
        group = parallel.tp_group()
        ctx.rank, ctx.width = dist.get_rank(group), shard.shape[-1]
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, shard.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.narrow(-1, ctx.rank * ctx.width, ctx.width)


def _column(linear: ColumnParallelLinear, x: torch.Tensor) -> torch.Tensor:
    """This rank's output columns of a column-parallel linear (``gather_output=False``). Without autograd the
    same arithmetic as megatron-core's forward (GEMM, then the bias added: not a fused addmm, whose rounding
    differs in 16-bit dtypes), minus its wrappers."""
    if torch.is_grad_enabled():
        return linear(x)[0]
    y = torch.matmul(x, linear.weight.t())
    return y if linear.bias is None else y + linear.bias


def _row(linear: RowParallelLinear, x: torch.Tensor) -> torch.Tensor:
    """A row-parallel linear of an already split input: partial sums all-reduced over TP, then the bias."""
    if torch.is_grad_enabled():
        return linear(x)[0]
    y = torch.matmul(x, linear.weight.t())
    if parallel.tp_size() > 1:
        dist.all_reduce(y, group=parallel.tp_group())
    return y if linear.bias is None else y + linear.bias


class DecoderLayer(nn.Module):
    """Pre-norm attention (GQA, RoPE) and SwiGLU MLP; this TP rank's heads and MLP columns.

    ``index`` is the layer's position within its pipeline stage (the attention context's layer id)."""

    def __init__(self, spec: ModelSpec, config: StageConfig, tp: int, index: int) -> None:
        super().__init__()
        self.spec = spec
        self.index = index
        self.q_heads = spec.num_heads // tp
        self.kv_heads = spec.num_kv_heads // tp
        d, h = spec.head_dim, spec.hidden_size
        dtype = config.params_dtype
        self.input_layernorm = RMSNorm(h, spec.rms_norm_eps, dtype)
        self.qkv = ColumnParallelLinear(
            h,
            (spec.num_heads + 2 * spec.num_kv_heads) * d,
            config=config,
            init_method=_no_init,
            bias=spec.qkv_bias,
            gather_output=False,
        )
        self.o_proj = RowParallelLinear(
            spec.num_heads * d,
            h,
            config=config,
            init_method=_no_init,
            bias=spec.o_bias,
            input_is_parallel=True,
            skip_bias_add=False,
        )
        self.post_attention_layernorm = RMSNorm(h, spec.rms_norm_eps, dtype)
        self.gate_up = ColumnParallelLinear(
            h, 2 * spec.intermediate_size, config=config, init_method=_no_init, bias=False, gather_output=False
        )
        self.down = RowParallelLinear(
            spec.intermediate_size,
            h,
            config=config,
            init_method=_no_init,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: AttentionContext
    ) -> torch.Tensor:
        t, d = x.shape[0], self.spec.head_dim
        qkv = _column(self.qkv, self.input_layernorm(x))
        q, k, v = qkv.view(t, -1, d).split([self.q_heads, self.kv_heads, self.kv_heads], dim=1)
        attn = attention.attend(self.index, apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
        x = x + _row(self.o_proj, attn.reshape(t, self.q_heads * d))
        gate, up = _column(self.gate_up, self.post_attention_layernorm(x)).chunk(2, dim=-1)
        return x + _row(self.down, F.silu(gate) * up)


class DecoderStage(nn.Module):
    """This rank's TP shard of one pipeline stage of the decoder trunk.

    ``forward(input_ids, cu_seqlens)``: ``input_ids`` int [T] (read on the first stage;
    later stages take the activation given to :meth:`set_input_tensor`), ``cu_seqlens``
    int [N+1]. Returns the final-normed hidden states [T, H] on the last stage and the
    [T, 1, H] activation for the next stage elsewhere. ``forward(input_ids, attention=ctx)``
    runs the same layers under another attention context (the rollout's paged one); the last
    stage then returns the hidden states of ``ctx.output_rows`` only, when it names rows.

    ``vocab_pad_multiple``: the embedding (and LM head) rows are ``spec.vocab_size`` rounded up
    to a multiple of ``vocab_pad_multiple * tp`` (:attr:`padded_vocab_size`).
    """

    model_type = ModelType.encoder_or_decoder

    def __init__(
        self,
        spec: ModelSpec,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        activation_checkpointing: bool = False,
        vocab_pad_multiple: int = VOCAB_PAD_MULTIPLE,
    ) -> None:
        super().__init__()
        tp, pp, pp_rank = parallel.tp_size(), parallel.pp_size(), parallel.pp_rank()
        spec.check_layout(tp, pp)
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.spec = spec
        self.padded_vocab_size = padded_vocab_size(spec.vocab_size, tp, vocab_pad_multiple)
        """Rows of the embedding and LM head over all TP ranks (``spec.vocab_size`` is the real vocabulary)."""
        self.activation_checkpointing = activation_checkpointing
        self.config = StageConfig(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            params_dtype=dtype,
            pipeline_dtype=dtype,
            use_cpu_initialization=device.type != "cuda",
            perform_initialization=False,
            variable_seq_lengths=True,
            hidden_size=spec.hidden_size,
        )
        self.is_first_stage = pp_rank == 0
        self.is_last_stage = pp_rank == pp - 1
        self.layer_ids = spec.stage_layers(pp_rank, pp)
        if self.is_first_stage:
            self.embed = VocabParallelEmbedding(
                self.padded_vocab_size, spec.hidden_size, init_method=_no_init, config=self.config
            )
        self.layers = nn.ModuleList(DecoderLayer(spec, self.config, tp, i) for i in range(len(self.layer_ids)))
        if self.is_last_stage:
            self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self._input_tensor: torch.Tensor | None = None
        self.to(device)
        mark_tensor_parallel_weights(self)

    def set_input_tensor(self, input_tensor: torch.Tensor | list[torch.Tensor] | None) -> None:
        """Activation received from the previous stage ([T, 1, H]); the pipeline schedule calls this."""
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        self._input_tensor = input_tensor

    def trunk(
        self,
        input_ids: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None = None,
        *,
        attention: AttentionContext | None = None,
    ) -> torch.Tensor:
        if (cu_seqlens is None) == (attention is None):
            raise ValueError("pass exactly one of cu_seqlens (packed segments) and attention (a context)")
        if self.is_first_stage:
            if input_ids is None or input_ids.dim() != 1:
                got = None if input_ids is None else tuple(input_ids.shape)
                raise ValueError(f"input_ids must be a 1-D packed token tensor [T], got {got}")
            x = self.embed(input_ids)
        else:
            if self._input_tensor is None:
                raise RuntimeError("a non-first pipeline stage needs set_input_tensor() before forward")
            x = self._input_tensor.view(-1, self.spec.hidden_size)
        t = x.shape[0]
        if attention is None:
            attention = PackedSegments.from_cu_seqlens(cu_seqlens, t)
        cos, sin = rope_cos_sin(attention.positions(t), self.spec.head_dim, self.spec.rope_theta, x.dtype)
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, attention, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attention)
        if self.is_last_stage:
            rows = attention.output_rows
            return self.norm(x if rows is None else x[rows])
        return x.unsqueeze(1)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None = None,
        *,
        attention: AttentionContext | None = None,
    ) -> torch.Tensor:
        return self.trunk(input_ids, cu_seqlens, attention=attention)


class PolicyModel(DecoderStage):
    """Causal LM: the trunk plus the vocab-parallel LM head (its weight is :attr:`output_weight`).

    ``forward`` returns hidden states [T, H] on the last stage; the log-probs are computed
    from them and ``output_weight`` by ``orz_fast.ops.linear_logprobs`` without holding [T, V]
    (pass ``vocab_size=model.spec.vocab_size``: the weight's padding rows are not tokens).
    """

    def __init__(self, spec: ModelSpec, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        if self.is_last_stage:
            # Tied and on one stage: the head reuses the embedding's vocab shard.
            share = spec.tie_word_embeddings and self.is_first_stage
            self.output_layer = ColumnParallelLinear(
                spec.hidden_size,
                self.padded_vocab_size,
                config=self.config,
                init_method=_no_init,
                bias=False,
                gather_output=False,
                skip_weight_param_allocation=share,
            )
            self.output_layer.to(next(self.norm.parameters()).device)
            mark_tensor_parallel_weights(self.output_layer)
            if self.ties_embedding_across_stages:
                # A copy of the first stage's embedding: the gradient norm counts the weight once (there).
                self.output_layer.weight.shared = True

    @property
    def ties_embedding_across_stages(self) -> bool:
        """Tied embeddings split over stages: the first stage's embedding and the last stage's head are copies."""
        return self.spec.tie_word_embeddings and not (self.is_first_stage and self.is_last_stage)

    @property
    def output_weight(self) -> torch.Tensor:
        """This TP rank's LM-head rows [Vp / tp, H] (vocab ids ``tp_rank * Vp/tp ...``, Vp =
        :attr:`padded_vocab_size`; ids from ``spec.vocab_size`` on are zero padding rows); last stage only."""
        if not self.is_last_stage:
            raise RuntimeError("output_weight lives on the last pipeline stage")
        return self.output_layer.weight if self.output_layer.weight is not None else self.embed.weight

    def logits(self, hidden: torch.Tensor, *, gather: bool = True) -> torch.Tensor:
        """LM-head logits [T, V] over the real vocabulary (``V = spec.vocab_size``) from hidden [T, H];
        with ``gather=False`` this rank's raw shard [T, Vp / tp], padding columns included."""
        out, _ = self.output_layer(hidden, weight=self.output_weight)
        if not gather:
            return out
        full = _GatherVocab.apply(out) if parallel.tp_size() > 1 else out
        return full[:, : self.spec.vocab_size]


class CriticModel(DecoderStage):
    """Value model: the trunk plus a value head (hidden -> 1, no bias) returning values [T] on the last stage."""

    def __init__(self, spec: ModelSpec, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        if self.is_last_stage:
            norm_weight = self.norm.weight
            self.value_head = nn.Linear(
                spec.hidden_size, 1, bias=False, dtype=norm_weight.dtype, device=norm_weight.device
            )

    def forward(
        self,
        input_ids: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None = None,
        *,
        attention: AttentionContext | None = None,
    ) -> torch.Tensor:
        out = self.trunk(input_ids, cu_seqlens, attention=attention)
        if not self.is_last_stage:
            return out
        return self.value_head(out).squeeze(-1)
