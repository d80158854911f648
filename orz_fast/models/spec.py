"""Architecture description of a Qwen2 / Llama-family decoder, parsed from a Hugging Face config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
}
"""``model_type`` -> the transformers class a saved checkpoint names in ``architectures``."""


VOCAB_PAD_MULTIPLE = 128
"""Megatron's default ``make_vocab_size_divisible_by``: the vocabulary is padded to a multiple of this times TP."""


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """Rows of the embedding and LM head: ``vocab_size`` rounded up to a multiple of ``multiple * tp``.

    As Megatron pads it, so that any vocabulary splits into ``tp`` equal shards whose sizes are
    multiples of ``multiple`` (aligned GEMMs). The extra rows are zero and never used as a token.
    """
    for name, value in (("vocab_size", vocab_size), ("tp", tp), ("vocab_pad_multiple", multiple)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    step = multiple * tp
    return -(-vocab_size // step) * step


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not implemented here."""


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    model_type: str
    """``qwen2`` or ``llama``."""
    vocab_size: int
    """The real vocabulary (the checkpoint's rows); the model's embedding and LM head are padded
    beyond it (:func:`padded_vocab_size`)."""
    hidden_size: int
    """Residual width H."""
    intermediate_size: int
    """SwiGLU inner width."""
    num_layers: int
    """Decoder layers."""
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (grouped-query attention when smaller than ``num_heads``)."""
    head_dim: int
    """Per-head width."""
    rms_norm_eps: float
    """RMSNorm epsilon."""
    rope_theta: float
    """RoPE base frequency."""
    tie_word_embeddings: bool
    """LM head shares the input embedding."""
    qkv_bias: bool
    """Q, K and V projections carry a bias (Qwen2; Llama with ``attention_bias``)."""
    o_bias: bool
    """The attention output projection carries a bias (Llama with ``attention_bias``)."""
    hf_config: dict[str, Any]
    """The Hugging Face config fields, written back by ``save_pretrained``."""

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelSpec:
        """Validate a Hugging Face config dict; raises :class:`UnsupportedModelError` naming what is unsupported."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            archs = cfg.get("architectures")
            raise UnsupportedModelError(
                f"unsupported architecture: model_type={model_type!r} (architectures={archs}); "
                f"supported model types: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{model_type}: hidden_act={act!r} is not supported (only 'silu' / SwiGLU)")
        if cfg.get("mlp_bias", False):
            raise UnsupportedModelError(f"{model_type}: mlp_bias=True is not supported")
        if cfg.get("use_sliding_window", False):
            raise UnsupportedModelError(f"{model_type}: use_sliding_window=True is not supported")
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type not in (None, "default"):
            raise UnsupportedModelError(f"{model_type}: rope type {rope_type!r} is not supported (only 'default')")
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type == "llama" and attention_bias,
            hf_config=dict(cfg),
        )

    def check_layout(self, tp: int, pp: int) -> None:
        """Raise ``ValueError`` when the heads or layers cannot be split ``tp`` x ``pp`` ways (any vocabulary
        can: it is padded)."""
        for what, n in (
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("intermediate_size", self.intermediate_size),
        ):
            if n % tp != 0:
                raise ValueError(f"{what}={n} is not divisible by tensor-parallel size tp={tp}")
        if self.num_layers < pp:
            raise ValueError(f"num_hidden_layers={self.num_layers} is smaller than pipeline-parallel size pp={pp}")

    def stage_layers(self, pp_rank: int, pp: int) -> range:
        """Global indices of the decoder layers held by pipeline stage ``pp_rank`` (earlier stages take the extra)."""
        base, extra = divmod(self.num_layers, pp)
        start = pp_rank * base + min(pp_rank, extra)
        return range(start, start + base + (1 if pp_rank < extra else 0))
