"""AdamW with fp32 master weights, optimizer states sharded over data parallelism, and bad-step skipping.

Each data-parallel rank owns a share of the parameters (whole parameters, balanced by element
count); only the owner keeps that parameter's fp32 master copy and Adam moments (ZeRO stage 1).
Gradients and updated weights move in flat buckets, never one collective per parameter:

- every rank lays its owned parameters end to end (last layers first, the order backward makes
  their gradients) in an "owned space" padded to the longest rank's; bucket ``b`` is the slice
  ``[b·C, (b+1)·C)`` of every rank's space, ``C = bucket_numel / dp``;
- a bucket's gradients are reduce-scattered: each rank receives the data-parallel mean of its own
  slice, written back into its owned parameters' ``.grad``. Inside
  :func:`orz_fast.parallel.forward_backward` with ``grad_sync=`` this optimizer, a bucket is sent
  as soon as backward has made the last micro-batch's gradient of every parameter in it, while
  backward goes on (megatron-core's schedule marks the other micro-batches with ``no_sync``);
- after the update each bucket's owned slices are all-gathered back into every rank's parameters.

A step then computes the global gradient norm over the model-parallel ranks (tensor-parallel
shards counted once each, replicated parameters such as norms on tensor rank 0 only, pipeline
stages summed, the last stage's copy of a tied embedding (``shared``) skipped), skips the step
— weights, moments and step count untouched — when it is NaN or inf, clips, and updates.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from orz_fast.parallel import collectives


def assign_owners(numels: list[int], world: int) -> list[int]:
    """Owner rank of each parameter: largest first onto the least-loaded rank (deterministic)."""
    load = [0] * world
    owners = [0] * len(numels)
    for i in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += numels[i]
    return owners


@dataclass
class _Bucket:
    """Slice ``[start, start + chunk)`` of every rank's owned space of one dtype."""

    dtype: torch.dtype
    chunk: int
    pieces: list[list[tuple[int, int, int, int]]]
    """Per rank: (parameter index, start in the flat parameter, length, offset in the rank's chunk)."""
    params: set[int]
    deferred: bool
    ready: int = 0
    work: list = field(default_factory=list)
    """In-flight reduce-scatter: (handle, input buffer kept alive, output shard)."""


class ShardedAdamW:
    """AdamW over ``params`` (this rank's model shard), states sharded over ``dp_group``.

    Args:
        params: parameters with ``.grad`` set by backward; megatron-core marks tensor-parallel
            shards with ``tensor_model_parallel=True``.
        lr, betas, eps, weight_decay: AdamW hyper-parameters (decoupled weight decay).
        grad_clip: global norm clip; 0 disables.
        dp_group: data-parallel group (None: no data parallelism); gradients are averaged over it.
        mp_group: model-parallel group (tensor x pipeline) for the global norm (None: none).
        tp_rank: this rank's tensor-parallel rank (replicated parameters count on rank 0 only).
        bucket_numel: elements of one gradient bucket over all data-parallel ranks.
        deferred: parameters whose gradient is completed after backward (the copies of an embedding
            tied across pipeline stages, summed by ``finalize_model_grads``): their buckets are
            reduced in :meth:`step`, never from a backward hook.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        grad_clip: float = 1.0,
        dp_group: collectives.Group = None,
        mp_group: collectives.Group = None,
        tp_rank: int = 0,
        bucket_numel: int = 1 << 25,
        deferred: Iterable[torch.nn.Parameter] = (),
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("ShardedAdamW got no trainable parameters")
        if bucket_numel < 1:
            raise ValueError(f"bucket_numel must be >= 1, got {bucket_numel}")
        self.lr, self.betas, self.eps, self.weight_decay, self.grad_clip = lr, betas, eps, weight_decay, grad_clip
        self.dp_group, self.mp_group, self.tp_rank = dp_group, mp_group, tp_rank
        self.dp_world, self.dp_rank = collectives.size(dp_group), collectives.rank(dp_group)
        self.owners = assign_owners([p.numel() for p in self.params], self.dp_world)
        self.steps = 0
        self.state: dict[int, dict[str, torch.Tensor]] = {}
        for i, p in enumerate(self.params):
            if self.owners[i] == self.dp_rank:
                master = p.detach().float().clone() if p.dtype != torch.float32 else None
                self.state[i] = {
                    "exp_avg": torch.zeros_like(p, dtype=torch.float32),
                    "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32),
                    **({"master": master} if master is not None else {}),
                }
        deferred_ids = {id(p) for p in deferred}
        self.buckets = self._layout(bucket_numel, {i for i, p in enumerate(self.params) if id(p) in deferred_ids})
        self._launch_from_hooks = False
        self._next_bucket = 0

    def _layout(self, bucket_numel: int, deferred: set[int]) -> list[_Bucket]:
        """Buckets over each dtype's owned spaces: parameters in reverse order (as backward makes their
        gradients), the deferred ones last so that they hold back no other bucket."""
        buckets = []
        dtypes = list(dict.fromkeys(p.dtype for p in self.params))
        max_chunk = max(1, bucket_numel // self.dp_world)
        order = [i for i in reversed(range(len(self.params))) if i not in deferred] + sorted(deferred, reverse=True)
        for dtype in dtypes:
            spaces: list[list[tuple[int, int]]] = [[] for _ in range(self.dp_world)]  # (param, offset in space)
            used = [0] * self.dp_world
            for i in order:
                if self.params[i].dtype == dtype:
                    r = self.owners[i]
                    spaces[r].append((i, used[r]))
                    used[r] += self.params[i].numel()
            # Equal chunks no longer than max_chunk: the last bucket is not mostly padding.
            chunk = -(-max(used) // -(-max(used) // max_chunk))
            for start in range(0, max(used), chunk):
                pieces: list[list[tuple[int, int, int, int]]] = [[] for _ in range(self.dp_world)]
                for r, space in enumerate(spaces):
                    for i, offset in space:
                        lo, hi = max(offset, start), min(offset + self.params[i].numel(), start + chunk)
                        if lo < hi:
                            pieces[r].append((i, lo - offset, hi - lo, lo - start))
                params = {i for rank_pieces in pieces for i, *_ in rank_pieces}
                buckets.append(_Bucket(dtype, chunk, pieces, params, deferred=bool(params & deferred)))
        return buckets

    # ------------------------------------------------------------------ gradient reduction

    def _grad_hook(self, buckets: list[_Bucket]):
        def hook(_: torch.Tensor) -> None:
            if not self._launch_from_hooks:
                return
            for b in buckets:
                b.ready += 1
            # In bucket order only, as every rank must issue its collectives in the same order.
            while self._next_bucket < len(self.buckets):
                b = self.buckets[self._next_bucket]
                if b.deferred or b.ready < len(b.params):
                    break
                self._launch(b)
                self._next_bucket += 1

        return hook

    @contextlib.contextmanager
    def overlap_grad_reduce(self) -> Iterator[None]:
        """Within the block, backward sends each bucket as soon as its gradients are final; megatron-core's
        schedule wraps every backward but the last micro-batch's in :meth:`no_sync`."""
        if self.dp_world == 1:
            yield
            return
        by_param: dict[int, list[_Bucket]] = {}
        for b in self.buckets:
            for i in b.params:
                by_param.setdefault(i, []).append(b)
        hooks = [
            p.register_post_accumulate_grad_hook(self._grad_hook(by_param.get(i, [])))
            for i, p in enumerate(self.params)
        ]
        self._launch_from_hooks = True
        try:
            yield
        finally:
            self._launch_from_hooks = False
            for h in hooks:
                h.remove()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Gradients made within the block are not final yet: no bucket is sent."""
        saved, self._launch_from_hooks = self._launch_from_hooks, False
        try:
            yield
        finally:
            self._launch_from_hooks = saved

    def _launch(self, b: _Bucket) -> None:
        """Start the reduce-scatter of bucket ``b``: every rank's owned slice, padded to the chunk, end to end."""
        device = self.params[next(iter(b.params))].device
        parts = []
        for rank_pieces in b.pieces:
            filled = 0
            for i, start, length, _ in rank_pieces:
                p = self.params[i]
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                parts.append(grad.reshape(-1)[start : start + length])
                filled += length
            if filled < b.chunk:
                parts.append(torch.zeros(b.chunk - filled, dtype=b.dtype, device=device))
        flat = torch.cat(parts)
        out = torch.empty(b.chunk, dtype=b.dtype, device=device)
        handle = collectives.reduce_scatter(out, flat, self.dp_group, async_op=True)
        b.work = [(handle, flat, out)]

    def _finish_grad_reduce(self) -> None:
        """Wait for (or send) every bucket; the owned parameters' ``.grad`` become the data-parallel mean."""
        for b in self.buckets:
            if not b.work:
                self._launch(b)
            handle, _, out = b.work[0]
            handle.wait()
            out.div_(self.dp_world)
            for i, start, length, pos in b.pieces[self.dp_rank]:
                p = self.params[i]
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.view(-1)[start : start + length].copy_(out[pos : pos + length])
            b.work, b.ready = [], 0
        self._next_bucket = 0

    def _gather_params(self) -> None:
        """Every rank's updated owned slices into every rank's parameters, one all-gather per bucket."""
        for b in self.buckets:
            device = self.params[next(iter(b.params))].device
            mine = torch.zeros(b.chunk, dtype=b.dtype, device=device)
            for i, start, length, pos in b.pieces[self.dp_rank]:
                mine[pos : pos + length] = self.params[i].detach().reshape(-1)[start : start + length]
            out = torch.empty(self.dp_world * b.chunk, dtype=b.dtype, device=device)
            collectives.all_gather_into(out, mine, self.dp_group)
            for r, rank_pieces in enumerate(b.pieces):
                if r == self.dp_rank:
                    continue
                for i, start, length, pos in rank_pieces:
                    base = r * b.chunk + pos
                    self.params[i].data.view(-1)[start : start + length].copy_(out[base : base + length])

    # ------------------------------------------------------------------ step

    def zero_grad(self) -> None:
        for b in self.buckets:
            for handle, *_ in b.work:
                handle.wait()
            b.work, b.ready = [], 0
        for p in self.params:
            p.grad = None
        self._next_bucket = 0

    def _owned_grads(self) -> dict[int, torch.Tensor]:
        return {
            i: p.grad if p.grad is not None else torch.zeros_like(p)
            for i, p in enumerate(self.params)
            if self.owners[i] == self.dp_rank
        }

    def grad_norm(self, grads: dict[int, torch.Tensor]) -> torch.Tensor:
        """Global L2 norm of the (data-parallel mean) gradients ``grads`` (this rank's owned parameters) over
        all data- and model-parallel ranks, as a 0-dim fp32 tensor."""
        device = self.params[0].device
        total = torch.zeros(1, dtype=torch.float32, device=device)
        for i, g in grads.items():
            p = self.params[i]
            if getattr(p, "shared", False):  # a pipeline stage's copy of a tied weight, counted where it lives
                continue
            if getattr(p, "tensor_model_parallel", False) or self.tp_rank == 0:
                total += g.float().pow(2).sum()
        total = collectives.all_reduce(total, self.dp_group)
        total = collectives.all_reduce(total, self.mp_group)
        return total[0].sqrt()

    @torch.no_grad()
    def step(self, lr: float | None = None) -> dict[str, float | bool]:
        """One optimizer step at ``lr`` (default: the constructor's); returns grad norm and whether it was skipped."""
        lr = self.lr if lr is None else lr
        if self.dp_world > 1:
            self._finish_grad_reduce()
        grads = self._owned_grads()
        norm_value = float(self.grad_norm(grads))  # host sync: the skip decision and the log need it once per step
        if not math.isfinite(norm_value):
            self.zero_grad()
            return {"grad_norm": norm_value, "skipped": True}
        scale = 1.0
        if self.grad_clip > 0 and norm_value > self.grad_clip:
            scale = self.grad_clip / (norm_value + 1e-6)
        self.steps += 1
        b1, b2 = self.betas
        bias1 = 1 - b1**self.steps
        bias2 = 1 - b2**self.steps
        for i, g in grads.items():
            p, st = self.params[i], self.state[i]
            w = st.get("master", p.data)
            g32 = g.float() * scale
            st["exp_avg"].mul_(b1).add_(g32, alpha=1 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(g32, g32, value=1 - b2)
            if self.weight_decay:
                w.mul_(1 - lr * self.weight_decay)
            denom = (st["exp_avg_sq"] / bias2).sqrt_().add_(self.eps)
            w.addcdiv_(st["exp_avg"], denom, value=-lr / bias1)
            if "master" in st:
                p.data.copy_(w)
        if self.dp_world > 1:
            self._gather_params()
        self.zero_grad()
        return {"grad_norm": norm_value, "skipped": False}

    # ------------------------------------------------------------------ memory and checkpoints

    def offload(self) -> None:
        """Move the moments and masters to (pinned) CPU memory, e.g. while the rollout needs the GPU."""
        self._move(torch.device("cpu"))

    def onload(self) -> None:
        """Bring the moments and masters back next to their parameters."""
        self._move(None)

    def _move(self, device: torch.device | None) -> None:
        for i, st in self.state.items():
            target = device if device is not None else self.params[i].device
            if target.type == "cpu" and self.params[i].device.type == "cpu":
                continue
            for k, v in st.items():
                moved = v.to(target, non_blocking=True)
                st[k] = moved.pin_memory() if target.type == "cpu" else moved

    def state_dict(self) -> dict:
        """This rank's shard: step count and the owned parameters' moments (and fp32 masters)."""
        return {"steps": self.steps, "owners": list(self.owners), "state": {i: dict(s) for i, s in self.state.items()}}

    def load_state_dict(self, sd: dict) -> None:
        if list(sd["owners"]) != self.owners:
            raise ValueError("optimizer checkpoint was sharded differently (another data-parallel size or model)")
        self.steps = int(sd["steps"])
        for i, st in sd["state"].items():
            for k, v in st.items():
                self.state[int(i)][k].copy_(v)
