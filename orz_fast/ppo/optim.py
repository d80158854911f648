"""AdamW with fp32 master weights, optimizer states sharded over data parallelism, and bad-step skipping.

Each data-parallel rank owns a share of the parameters (balanced by element count); only
the owner keeps that parameter's fp32 master copy and Adam moments (ZeRO stage 1). A step:

1. averages gradients over the data-parallel group (one all-reduce per flat bucket);
2. computes the global gradient norm over the model-parallel ranks (tensor-parallel shards
   counted once each, replicated parameters such as norms counted on tensor rank 0 only,
   pipeline stages summed, the last stage's copy of a tied embedding (``shared``) skipped);
3. skips the step — weights, moments and step count untouched — when the norm is NaN or inf;
4. clips, updates the owned parameters in fp32, and broadcasts each updated parameter from
   its owner to the other data-parallel ranks (in the parameter's own dtype, e.g. bf16).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist


def _world(group: dist.ProcessGroup | None) -> int:
    """Size of ``group``; ``None`` means no group (1), never the default world."""
    return dist.get_world_size(group) if group is not None else 1


def _rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if group is not None else 0


def assign_owners(numels: list[int], world: int) -> list[int]:
    """Owner rank of each parameter: largest first onto the least-loaded rank (deterministic)."""
    load = [0] * world
    owners = [0] * len(numels)
    for i in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += numels[i]
    return owners


class ShardedAdamW:
    """AdamW over ``params`` (this rank's model shard), states sharded over ``dp_group``.

    Args:
        params: parameters with ``.grad`` set by backward; megatron-core marks tensor-parallel
            shards with ``tensor_model_parallel=True``.
        lr, betas, eps, weight_decay: AdamW hyper-parameters (decoupled weight decay).
        grad_clip: global norm clip; 0 disables.
        dp_group: data-parallel group (None: no data parallelism).
        mp_group: model-parallel group (tensor x pipeline) for the global norm (None: none).
        tp_rank: this rank's tensor-parallel rank (replicated parameters count on rank 0 only).
        average_grads: average gradients over ``dp_group`` in :meth:`step`; False when the caller
            already did (``orz_fast.parallel.finalize_model_grads``).
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
        dp_group: dist.ProcessGroup | None = None,
        mp_group: dist.ProcessGroup | None = None,
        tp_rank: int = 0,
        average_grads: bool = True,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("ShardedAdamW got no trainable parameters")
        self.lr, self.betas, self.eps, self.weight_decay, self.grad_clip = lr, betas, eps, weight_decay, grad_clip
        self.dp_group, self.mp_group, self.tp_rank = dp_group, mp_group, tp_rank
        self.average_grads = average_grads
        self.dp_world, self.dp_rank = _world(dp_group), _rank(dp_group)
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

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def _average_over_dp(self, grads: list[torch.Tensor]) -> None:
        if self.dp_world == 1:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for group in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in group])
            dist.all_reduce(flat, group=self.dp_group)
            flat /= self.dp_world
            offset = 0
            for g in group:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Global L2 norm of the (DP-averaged) gradients over all model-parallel ranks, as a 0-dim fp32 tensor."""
        device = grads[0].device
        total = torch.zeros((), dtype=torch.float32, device=device)
        for p, g in zip(self.params, grads, strict=True):
            if getattr(p, "shared", False):  # a pipeline stage's copy of a tied weight, counted where it lives
                continue
            if getattr(p, "tensor_model_parallel", False) or self.tp_rank == 0:
                total += g.float().pow(2).sum()
        if self.mp_group is not None and _world(self.mp_group) > 1:
            dist.all_reduce(total, group=self.mp_group)
        return total.sqrt()

    @torch.no_grad()
    def step(self, lr: float | None = None) -> dict[str, float | bool]:
        """One optimizer step at ``lr`` (default: the constructor's); returns grad norm and whether it was skipped."""
        lr = self.lr if lr is None else lr
        grads = self._grads()
        if self.average_grads:
            self._average_over_dp(grads)
        norm = self.grad_norm(grads)
        norm_value = float(norm)  # host sync: the skip decision and the log need the norm once per step
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
        for i, (p, g) in enumerate(zip(self.params, grads, strict=True)):
            if self.owners[i] != self.dp_rank:
                continue
            st = self.state[i]
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
            ranks = dist.get_process_group_ranks(self.dp_group) if self.dp_group is not None else None
            for i, p in enumerate(self.params):
                src = ranks[self.owners[i]] if ranks is not None else self.owners[i]
                dist.broadcast(p.data, src=src, group=self.dp_group)
        self.zero_grad()
        return {"grad_norm": norm_value, "skipped": False}

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
