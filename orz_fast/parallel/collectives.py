"""Every collective of the training step, on the device its group's backend requires.

NCCL moves CUDA tensors only and gloo CPU tensors, so a tensor built on the host and
all-reduced over a data-parallel group works in every CPU test and fails at the first step on
GPUs. The step's code therefore never calls ``torch.distributed`` itself: it calls the
functions here, which take tensors wherever they live, move them to :func:`device` of the
group when they are elsewhere (a no-op for the step's tensors, which already sit on the compute
device: CUDA under NCCL, CPU under gloo) and hand results back on the caller's device.

A ``group`` of ``None`` or of one rank means no communication: the functions return their
input unchanged. Sizes travel first, as small integer tensors, then flat buffers; scalar
statistics travel as one small tensor per reduction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def size(group: Group) -> int:
    """Ranks in ``group`` (1 for ``None``: never the default world)."""
    return dist.get_world_size(group) if group is not None else 1


def rank(group: Group) -> int:
    """This process's rank in ``group`` (0 for ``None``)."""
    return dist.get_rank(group) if group is not None else 0


def device(group: Group) -> torch.device:
    """The device ``group``'s backend moves tensors on: this process's CUDA device for NCCL, else the CPU."""
    if group is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _on(tensor: torch.Tensor, target: torch.device) -> torch.Tensor:
    return tensor if tensor.device == target else tensor.to(target)


def all_reduce(tensor: torch.Tensor, group: Group, op: str = "sum") -> torch.Tensor:
    """``op`` ("sum", "max" or "min") of ``tensor`` over ``group``, on ``tensor``'s device (in place when
    ``tensor`` is already on the group's device)."""
    if size(group) == 1:
        return tensor
    buf = _on(tensor, device(group))
    dist.all_reduce(buf, op=_OPS[op], group=group)
    return buf if buf is tensor else buf.to(tensor.device)


def broadcast(tensor: torch.Tensor, src: int, group: Group) -> torch.Tensor:
    """``tensor`` of global rank ``src`` on every rank of ``group`` (same shape and dtype everywhere)."""
    if size(group) == 1:
        return tensor
    buf = _on(tensor, device(group))
    dist.broadcast(buf, src=src, group=group)
    return buf if buf is tensor else buf.to(tensor.device)


def all_gather_varlen(tensor: torch.Tensor, group: Group) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (any length along dim 0, the same trailing shape and dtype), in rank order.

    Two collectives: the lengths, then one flat buffer padded to the longest.
    """
    if size(group) == 1:
        return [tensor]
    target, n = device(group), size(group)
    lengths = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=target)
    gathered = torch.empty(n, dtype=torch.int64, device=target)
    all_gather_into(gathered, lengths, group)
    sizes = gathered.tolist()  # host read: the sizes shape the buffers
    longest = max(sizes)
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=target)
    padded[: tensor.shape[0]] = tensor
    out = torch.empty((n * longest, *tensor.shape[1:]), dtype=tensor.dtype, device=target)
    all_gather_into(out, padded, group)
    return [out[r * longest : r * longest + s].to(tensor.device) for r, s in enumerate(sizes)]


def all_to_all_varlen(
    tensor: torch.Tensor,
    send_counts: Sequence[int],
    recv_counts: Sequence[int],
    group: Group,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows ``tensor[sum(send_counts[:r]) : ...]`` go to rank ``r``; returns the rows received, in rank order
    (written into ``out`` when given: [sum(recv_counts), ...], contiguous, on ``tensor``'s device).

    Both count lists are known to the caller (they come from sizes every rank has), so this is one collective.
    """
    if size(group) == 1:
        return tensor if out is None else out.copy_(tensor)
    target = device(group)
    buf = _on(tensor.contiguous(), target)
    shape = (sum(recv_counts), *tensor.shape[1:])
    received = (
        out if out is not None and out.device == target else torch.empty(shape, dtype=tensor.dtype, device=target)
    )
    dist.all_to_all_single(received, buf, list(recv_counts), list(send_counts), group=group)
    if out is not None:
        return received if received is out else out.copy_(received)
    return received if received.device == tensor.device else received.to(tensor.device)


def _require_on_group_device(name: str, tensors: Sequence[torch.Tensor], group: Group) -> None:
    want = device(group)
    for t in tensors:
        if t.device != want:
            raise ValueError(
                f"{name}: tensor of shape {tuple(t.shape)} is on {t.device} but the group's backend "
                f"({dist.get_backend(group)}) moves tensors on {want}"
            )


def reduce_scatter(output: torch.Tensor, input: torch.Tensor, group: Group, *, async_op: bool = False):
    """Sum of every rank's ``input`` [size * k], chunk ``rank`` of it into ``output`` [k]; both must already be
    on the group's device (asynchronous buffers cannot be moved back). Returns a work handle when ``async_op``."""
    _require_on_group_device("reduce_scatter", (output, input), group)
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # the newer name where it exists
    return fn(output, input, group=group, async_op=async_op)


def all_gather_into(output: torch.Tensor, input: torch.Tensor, group: Group, *, async_op: bool = False):
    """Every rank's ``input`` [k] into ``output`` [size * k] in rank order; both on the group's device."""
    _require_on_group_device("all_gather_into", (output, input), group)
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, input, group=group, async_op=async_op)
