"""TRL drop-in: GRPO completion log-probs from hidden states with ``orz_fast.ops.linear_logprobs``.

TRL's ``GRPOTrainer`` (TRL 1.x) scores completions by calling its model with
``fused_lm_head=True``, a forward that TRL installs: the backbone's hidden states go through the
LM head in tiles and come back as per-token log-probs and entropies. ``patch(trainer)`` installs
a forward with the same calling convention and outputs that instead takes the hidden states of
the scored tokens only (labels ``!= -100``: the completion tokens) and calls
``orz_fast.ops.linear_logprobs`` on them, which never holds more than one chunk of logits (the
fused Triton kernel on CUDA, the chunked torch path on CPU)::

    trainer = GRPOTrainer(model=..., args=..., ...)
    orz_fast.integrations.trl.patch(trainer)
    trainer.train()

Without ``fused_lm_head`` the model's own forward runs, so generation is unchanged. Models whose
logits TRL post-processes (soft-capping, logit scaling), LM heads with a bias, sharded heads
(FSDP2 DTensor, DeepSpeed ZeRO-3) and MoE auxiliary losses are refused with ``ValueError`` (at
patch time, or at the call for a head sharded after patching) rather than scored differently.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch

from orz_fast import ops

__all__ = ["patch", "linear_logprobs_forward"]

# config fields with which TRL's fused head transforms the logits before the softmax
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def _check_supported(model: Any) -> None:
    config = model.config.get_text_config()
    transforms = {name: getattr(config, name) for name in _LOGIT_TRANSFORMS if getattr(config, name, None) is not None}
    if transforms:
        raise ValueError(f"orz_fast TRL patch: logit transforms are not supported, model config has {transforms}")
    if getattr(config, "output_router_logits", False):
        raise ValueError("orz_fast TRL patch: MoE router auxiliary losses are not supported (output_router_logits)")
    _lm_head_weight(model)


def _lm_head_weight(model: Any) -> torch.Tensor:
    """The LM head's [V, H] weight, looked up per call (FSDP and PEFT replace modules after patching)."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ValueError(f"orz_fast TRL patch: needs a bias-free linear LM head, got {head!r}")
    weight = head.weight
    if type(weight).__name__ == "DTensor":
        raise ValueError("orz_fast TRL patch: sharded (FSDP2 DTensor) LM heads are not supported")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(
            f"orz_fast TRL patch: LM head weight has shape {tuple(weight.shape)}; partitioned heads "
            "(DeepSpeed ZeRO-3) are not supported"
        )
    return weight


def linear_logprobs_forward(
    model: Any,
    *,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
) -> None:
    """Give ``model`` a ``fused_lm_head=True`` forward backed by ``ops.linear_logprobs``.

    ``model(..., labels=labels, fused_lm_head=True)`` returns TRL's ``FusedCausalLMOutput`` with
    ``log_probs`` and ``entropy`` of shape [B, L - 1] (or [B, L] with ``shift_labels``), zero where
    the label is -100, ``label_mask`` and the mean negative log-likelihood as ``loss``. Any other
    call runs the model class's own forward.
    """
    from trl.trainer.utils import FusedCausalLMOutput

    _check_supported(model)
    class_forward = type(model).forward

    @functools.wraps(class_forward)  # keeps the signature that ``generate`` validates kwargs against
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return class_forward(self, *args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        weight = _lm_head_weight(self)
        labels = labels.to(weight.device)
        mask = labels != -100
        # boolean indexing syncs the device for the count; it is what keeps prompt and padding
        # positions (most of the sequence in GRPO) out of the vocab projection
        scored = hidden.to(weight.device)[mask]
        device_type = scored.device.type
        if cast_lm_head_to_fp32:
            scored, weight = scored.float(), weight.float()
        elif torch.is_autocast_enabled(device_type):
            # the dtype the head's matmul would run in under the trainer's autocast
            dtype = torch.get_autocast_dtype(device_type)
            scored, weight = scored.to(dtype), weight.to(dtype)
        elif scored.dtype != weight.dtype:
            scored = scored.to(weight.dtype)
        logp, entropy = ops.linear_logprobs(scored, weight, labels[mask], temperature=temperature, return_entropy=True)
        # masked_scatter keeps an all-masked microbatch connected to the graph (a zero loss, not an error)
        log_probs = logp.new_zeros(mask.shape).masked_scatter(mask, logp)
        entropies = entropy.new_zeros(mask.shape).masked_scatter(mask, entropy)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropies, label_mask=mask
        )

    model.forward = types.MethodType(forward, model)


def patch(trainer: Any) -> Any:
    """Make a TRL ``GRPOTrainer`` compute completion log-probs with ``orz_fast.ops.linear_logprobs``.

    Re-installs the fused forward on the policy (the base model under a PEFT wrapper) and on the
    reference model, with the trainer's sampling temperature and ``cast_lm_head_to_fp32``.
    Returns the trainer.
    """
    temperature = trainer.temperature
    cast = bool(getattr(trainer.args, "cast_lm_head_to_fp32", False))
    model = trainer.model
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    linear_logprobs_forward(model, temperature=temperature, cast_lm_head_to_fp32=cast)
    if getattr(trainer, "ref_model", None) is not None:
        linear_logprobs_forward(trainer.ref_model, temperature=temperature, cast_lm_head_to_fp32=cast)
    return trainer
