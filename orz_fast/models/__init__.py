"""Qwen2 / Llama-family policy and critic on megatron-core TP layers, with HF / GGUF checkpoint I/O."""

from orz_fast.models.checkpoint import (
    CheckpointError,
    build_model,
    gather_hf_state_dict,
    load_pretrained,
    model_from_config,
    save_pretrained,
)
from orz_fast.models.decoder import CriticModel, DecoderStage, PolicyModel
from orz_fast.models.spec import ModelSpec, UnsupportedModelError

__all__ = [
    "CheckpointError",
    "CriticModel",
    "DecoderStage",
    "ModelSpec",
    "PolicyModel",
    "UnsupportedModelError",
    "build_model",
    "gather_hf_state_dict",
    "load_pretrained",
    "model_from_config",
    "save_pretrained",
]
