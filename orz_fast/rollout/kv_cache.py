"""Paged KV cache: fixed-size blocks, a ref-counted block allocator and paged decode attention.

A sequence's K/V live in the blocks named by its block table (token ``p`` in slot
``p % block_size`` of block ``table[p // block_size]``). Blocks are ref-counted so the
full blocks of a prompt are shared by its ``n`` samples; a block is written only by
the one sequence that holds it alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class BlockAllocator:
    """Free list and reference counts of ``num_blocks`` KV blocks (host-side bookkeeping only)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("KV cache out of blocks (the scheduler must reserve before allocating)")
        block = self._free.pop()
        self._refs[block] = 1
        return block

    def share(self, block: int) -> int:
        """One more holder of an allocated ``block``; returns it."""
        if self._refs[block] < 1:
            raise RuntimeError(f"block {block} is not allocated")
        self._refs[block] += 1
        return block

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each of ``blocks``; a block nobody holds returns to the free list."""
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free.append(block)
            elif self._refs[block] < 0:
                raise RuntimeError(f"block {block} released more often than allocated")


class PagedKVCache:
    """K and V of every layer: ``k(layer)`` / ``v(layer)`` are [num_blocks, block_size, kv_heads, head_dim].

    One zero-filled tensor (unwritten slots read as finite zeros, so masked-out scores never
    meet NaN garbage); dropping the object releases it.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.data = torch.zeros(num_layers, 2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_block(*, num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def k(self, layer: int) -> torch.Tensor:
        return self.data[layer, 0]

    def v(self, layer: int) -> torch.Tensor:
        return self.data[layer, 1]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store k, v [T, kv_heads, head_dim] at flat slots int64 [T] (``block * block_size + offset``)."""
        self.data[layer, 0].flatten(0, 1).index_copy_(0, slots, k)
        self.data[layer, 1].flatten(0, 1).index_copy_(0, slots, v)

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy blocks ``src[i]`` to ``dst[i]`` in every layer (int64 [N] on the cache's device)."""
        self.data[:, :, dst] = self.data[:, :, src]


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> torch.Tensor:
    """One query token per sequence attending to its cached K/V.

    Args:
        q: [B, Hq, D] queries (Hq a multiple of Hkv; query head h reads K/V head ``h // (Hq / Hkv)``).
        k_cache, v_cache: [num_blocks, block_size, Hkv, D].
        block_tables: int64 [B, M] block ids per sequence (padding entries may name any block).
        context_lens: int64 [B] tokens to attend to (the query's own K/V already written), 1..M*block_size.
    Returns:
        [B, Hq, D].
    """
    B, Hq, D = q.shape
    M = block_tables.shape[1]
    _, bs, Hkv, _ = k_cache.shape
    if block_tables.shape[0] != B or context_lens.shape != (B,):
        raise ValueError(
            f"block_tables [B, M] and context_lens [B] must match q's B={B}, "
            f"got {tuple(block_tables.shape)} and {tuple(context_lens.shape)}"
        )
    flat = block_tables.flatten()
    k = k_cache.index_select(0, flat).view(B, M * bs, Hkv, D).transpose(1, 2)  # [B, Hkv, L, D]
    v = v_cache.index_select(0, flat).view(B, M * bs, Hkv, D).transpose(1, 2)
    mask = torch.arange(M * bs, device=q.device)[None, :] < context_lens[:, None]  # [B, L]
    # The G = Hq / Hkv query heads of a group act as G query rows against their shared K/V head,
    # so grouped-query attention needs no repeated K/V.
    out = F.scaled_dot_product_attention(q.view(B, Hkv, Hq // Hkv, D), k, v, attn_mask=mask[:, None, None, :])
    return out.reshape(B, Hq, D)
