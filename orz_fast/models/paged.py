"""The rollout's attention context: prompts attend to themselves, decode tokens to a paged KV cache.

One step of the native engine packs whole prompts (prefill) and one token of every running
sequence (decode) into one forward of the model's layers, in that order. Each layer's keys and
values go to the cache (token ``i`` to flat slot ``slots[i]`` of the layer's
[num_blocks * block_size] slots); prefill tokens then attend causally within their prompt
(:func:`~orz_fast.models.attention.packed_causal_attention`) and decode tokens to their sequence's
cached context, which includes the K/V just written.

Decode attention reads each cached block once, never a padded copy of the cache:

- ``flash_attn_with_kvcache`` on CUDA when flash-attn is installed, the cache is 16-bit and the
  block size a multiple of 256 (flash-attn's paged-KV requirement);
- otherwise on CUDA, the Triton kernel :func:`~orz_fast.kernels.paged_attention.paged_decode_triton`;
- on CPU, :func:`~orz_fast.kernels.paged_attention.paged_decode_torch` (SDPA over views of runs of
  blocks; a block several sequences share is read once for all of them).

The context counts the K/V bytes its decode attention reads (``kv_bytes_read``) beside the least
that attention reading each sequence's context once must read (``kv_bytes_min``): host integers,
no device sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from orz_fast.kernels.paged_attention import paged_decode_torch, paged_decode_triton, plan_block_runs
from orz_fast.models.attention import PackedSegments, packed_causal_attention

try:
    from flash_attn import flash_attn_with_kvcache
except ImportError:
    flash_attn_with_kvcache = None

FLASH_ATTN_PAGE_MULTIPLE = 256
"""flash-attn's paged KV cache takes block sizes that are multiples of this."""

DecodeBackend = Literal["flash_attn", "triton", "torch"]


@dataclass
class DecodeRows:
    """The decode tokens of a step: one query per sequence, attending to its cached context."""

    tables: list[list[int]]
    """Each sequence's block table (host)."""
    context_lens: list[int]
    """Tokens each sequence attends to, its new one included (host)."""


def decode_backend(device: torch.device, dtype: torch.dtype, block_size: int) -> DecodeBackend:
    """The decode attention used for a cache of ``dtype`` blocks of ``block_size`` on ``device``."""
    if device.type != "cuda":
        return "torch"
    if flash_attn_with_kvcache is not None and dtype in (torch.float16, torch.bfloat16):
        if block_size % FLASH_ATTN_PAGE_MULTIPLE == 0:
            return "flash_attn"
    return "triton"


class PagedAttention:
    """Attention context of one rollout step (see the module docstring).

    Args:
        kv: the cache of this pipeline stage's layers, [layers, 2, num_blocks, block_size, Hkv, D].
        positions: int64 [T] RoPE position of every token.
        slots: int64 [T] flat cache slot (``block * block_size + offset``) each token's K/V goes to.
        prefill: segments of the first ``prefill.bounds[-1]`` tokens (whole prompts), or None.
        decode: the decode tokens (the rest), or None.
        output_rows: int64 [R] rows whose hidden states the step samples from.
        backend: decode attention implementation; default :func:`decode_backend`'s choice.
    """

    def __init__(
        self,
        kv: torch.Tensor,
        *,
        positions: torch.Tensor,
        slots: torch.Tensor,
        prefill: PackedSegments | None,
        decode: DecodeRows | None,
        output_rows: torch.Tensor | None,
        backend: DecodeBackend | None = None,
    ) -> None:
        self.kv = kv
        self._positions = positions
        self.slots = slots
        self.prefill = prefill
        self.num_prefill = 0 if prefill is None else prefill.bounds[-1]
        self.decode = decode
        self.output_rows = output_rows
        block_size, kv_heads, head_dim = kv.shape[3:]
        self.backend = backend or decode_backend(kv.device, kv.dtype, block_size)
        self.kv_bytes_read = 0
        """K/V bytes the decode attention of the layers run so far read from the cache."""
        self.kv_bytes_min = 0
        """The least those layers could read: each decode sequence's context once."""
        self._token_bytes = 2 * kv_heads * head_dim * kv.element_size()
        self._plan = None
        self._tables = self._lens = None
        if decode is not None:
            if self.backend == "torch":
                self._plan = plan_block_runs(decode.tables, decode.context_lens, block_size)
            else:
                width = max(len(t) for t in decode.tables)
                padded = [t + [0] * (width - len(t)) for t in decode.tables]
                host = torch.tensor(padded, dtype=torch.int32)
                self._tables = host.to(kv.device, non_blocking=True)
                self._lens = torch.tensor(decode.context_lens, dtype=torch.int32).to(kv.device, non_blocking=True)

    def positions(self, num_tokens: int) -> torch.Tensor:
        return self._positions

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.kv[layer, 0], self.kv[layer, 1]
        k_cache.flatten(0, 1).index_copy_(0, self.slots, k)
        v_cache.flatten(0, 1).index_copy_(0, self.slots, v)
        n = self.num_prefill
        parts = []
        if n:
            parts.append(packed_causal_attention(q[:n], k[:n], v[:n], self.prefill))
        if self.decode is not None:
            parts.append(self._decode_attention(q[n:], k_cache, v_cache))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        block_size = k_cache.shape[1]
        live = sum(self.decode.context_lens)
        self.kv_bytes_min += live * self._token_bytes
        if self.backend == "torch":
            self.kv_bytes_read += self._plan.blocks_read * block_size * self._token_bytes
            return paged_decode_torch(q, k_cache, v_cache, self._plan)
        # both GPU kernels load only the positions below each context length
        self.kv_bytes_read += live * self._token_bytes
        if self.backend == "flash_attn":
            out = flash_attn_with_kvcache(
                q.unsqueeze(1), k_cache, v_cache, cache_seqlens=self._lens, block_table=self._tables, causal=True
            )
            return out.squeeze(1)
        return paged_decode_triton(q, k_cache, v_cache, self._tables, self._lens)
