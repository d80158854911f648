"""Checks a run passes before any model is built: the parallel layout against the model and the engine, the
tokenizer against the stop settings. Each names the setting or file at fault, so a bad run fails in seconds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orz_fast.config import Config
from orz_fast.models import ModelSpec
from orz_fast.rollout.vllm_engine import check_vllm_can_serve

__all__ = ["check_layout", "check_tokenizer", "model_spec"]


def model_spec(cfg: Config) -> ModelSpec:
    """The policy architecture from the checkpoint's config (or ``model.arch``), read without loading weights."""
    path = cfg.model.path
    if path is None:
        return ModelSpec.from_hf_config(cfg.model.arch)
    p = Path(path)
    if p.suffix == ".gguf":
        from transformers import AutoConfig

        return ModelSpec.from_hf_config(AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name).to_dict())
    return ModelSpec.from_hf_config(json.loads((p / "config.json").read_text()))


def check_layout(cfg: Config, world_size: int) -> None:
    """Reject a parallel layout that cannot work, before any model is built."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if world_size % (tp * pp) != 0:
        raise ValueError(f"world size {world_size} is not divisible by parallel.tp * parallel.pp = {tp} * {pp}")
    if cfg.rollout.engine == "vllm":
        path = cfg.model.path
        if path is not None and (Path(path).suffix == ".gguf" or not (Path(path) / "config.json").is_file()):
            raise ValueError(
                f"rollout.engine='vllm' needs model.path to be a Hugging Face directory (config.json + "
                f"tokenizer) or unset (random weights from model.arch), got {path!r}; GGUF models use 'native'"
            )
        # Imports vLLM: a missing install, an untested version or an architecture it cannot serve shows here.
        check_vllm_can_serve(model_spec(cfg).hf_config)
    if cfg.ppo.kl_coef != 0 or cfg.ppo.entropy_coef != 0:
        raise ValueError(
            f"ppo.kl_coef={cfg.ppo.kl_coef}, ppo.entropy_coef={cfg.ppo.entropy_coef}: only the ORZ objective "
            "(no KL, no entropy bonus) is implemented"
        )
    model_spec(cfg).check_layout(tp, pp)


def check_tokenizer(cfg: Config, tokenizer: Any) -> None:
    """Reject a tokenizer the rollout cannot stop with: no EOS token, or a stop string (``rollout.stop``) that it
    encodes to nothing or to its unknown token (such a string never appears in decoded text)."""
    where = cfg.model.path or "the character tokenizer"
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError(
            f"the tokenizer of {where} has no EOS token: responses could only end by a stop string or "
            f"rollout.max_tokens; give a tokenizer with an eos_token"
        )
    unk = getattr(tokenizer, "unk_token_id", None)
    for stop in cfg.rollout.stop:
        ids = list(tokenizer.encode(stop, add_special_tokens=False))
        if not ids or (unk is not None and unk in ids):
            raise ValueError(
                f"rollout.stop: the tokenizer of {where} cannot encode the stop string {stop!r} "
                f"(it gives {ids}{', with the unknown token' if ids else ''}), so it could never be matched"
            )
