"""Paged KV cache: fixed-size blocks and a ref-counted block allocator.

A sequence's K/V live in the blocks named by its block table (token ``p`` in slot
``p % block_size`` of block ``table[p // block_size]``). Blocks are ref-counted so the
full blocks of a prompt are shared by its ``n`` samples; a block is written only by
the one sequence that holds it alone. Attention over the cache is the model's
(:class:`orz_fast.models.paged.PagedAttention`).
"""

from __future__ import annotations

import heapq

import torch


class BlockAllocator:
    """Free list and reference counts of ``num_blocks`` KV blocks (host-side bookkeeping only).

    Two-ended: blocks that several sequences will share (a prompt's full blocks, for its samples)
    come from the low ids, blocks one sequence owns from the high ids. A decode step's shared and
    private blocks then form two compact runs of ids, which the CPU decode attention reads as two
    views of the cache (see :func:`orz_fast.kernels.paged_attention.plan_block_runs`); the GPU
    kernels read through the block tables and do not care.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._low = list(range(num_blocks))  # min-heap of free ids (may hold stale, allocated ones)
        self._high = [-b for b in range(num_blocks - 1, -1, -1)]  # max-heap, negated
        heapq.heapify(self._high)
        self._num_free = num_blocks

    @property
    def num_free(self) -> int:
        return self._num_free

    def allocate(self, *, shared: bool = False) -> int:
        """A free block with one holder: the lowest free id when ``shared``, else the highest."""
        if self._num_free == 0:
            raise RuntimeError("KV cache out of blocks (the scheduler must reserve before allocating)")
        while True:
            block = heapq.heappop(self._low) if shared else -heapq.heappop(self._high)
            if self._refs[block] == 0:  # entries of blocks allocated from the other end are stale
                break
        self._refs[block] = 1
        self._num_free -= 1
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
            if self._refs[block] < 1:
                raise RuntimeError(f"block {block} released more often than allocated")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._num_free += 1
                heapq.heappush(self._low, block)
                heapq.heappush(self._high, -block)

    def refs(self, block: int) -> int:
        """Holders of ``block`` (0 when free)."""
        return self._refs[block]


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
