"""The rollout's KV-cache budget: ``rollout.kv_cache_fraction`` / ``rollout.kv_cache_bytes`` -> bytes per rank.

One meaning everywhere (native engine, vLLM engine, planner): the KV cache gets
``kv_cache_fraction`` of the accelerator memory that is free when the rollout starts, after the
trainer's resident tensors; ``kv_cache_bytes`` fixes the bytes instead. The engines take the
resolved bytes (``NativeEngine(kv_cache_bytes=...)``, ``VllmEngine(kv_cache_bytes=...)``, which
hands them to vLLM as ``kv_cache_memory_bytes``).
"""

from __future__ import annotations

import torch

from orz_fast.config import RolloutConfig

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
"""KV budget on CPU when ``kv_cache_bytes`` is not set: host memory has no "free when the rollout starts"
that the trainer owns, so a fixed default stands in (only what the requests can use is allocated)."""


def kv_cache_bytes(rollout: RolloutConfig, device: torch.device | str, *, free_bytes: int | None = None) -> int:
    """KV cache bytes per rank for a rollout on ``device``.

    Args:
        rollout: the run's rollout config (``kv_cache_bytes`` wins over ``kv_cache_fraction``).
        device: the rank's compute device. On CUDA the free memory is read now
            (``torch.cuda.mem_get_info``), so call this when the rollout's resident state is in place.
        free_bytes: the free memory to take the fraction of, instead of reading it (the planner's
            modelled memory); any device type.
    Returns:
        ``rollout.kv_cache_bytes`` if set; else ``kv_cache_fraction`` x the free memory on CUDA (or
        of ``free_bytes``); else :data:`DEFAULT_CPU_KV_CACHE_BYTES`.
    """
    if rollout.kv_cache_bytes is not None:
        if rollout.kv_cache_bytes < 1:
            raise ValueError(f"rollout.kv_cache_bytes must be >= 1, got {rollout.kv_cache_bytes}")
        return int(rollout.kv_cache_bytes)
    if not 0 < rollout.kv_cache_fraction <= 1:
        raise ValueError(f"rollout.kv_cache_fraction must be in (0, 1], got {rollout.kv_cache_fraction}")
    if free_bytes is None:
        device = torch.device(device)
        if device.type != "cuda":
            return DEFAULT_CPU_KV_CACHE_BYTES
        free_bytes, _ = torch.cuda.mem_get_info(device)
    return int(max(0, free_bytes) * rollout.kv_cache_fraction)
