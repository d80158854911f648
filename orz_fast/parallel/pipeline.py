"""One training (or inference) pass over packed micro-batches through megatron-core's schedule.

With ``pp > 1`` megatron-core's non-interleaved 1F1B schedule runs the micro-batches
(activations travel between stages as [T, 1, H] with their shapes exchanged, since
packed micro-batches differ in length); with ``pp == 1`` its no-pipelining schedule
accumulates gradients over them. On CPU the schedule runs under
:func:`orz_fast.parallel.cpu_compat.cpu_pipeline_compat`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from orz_fast.parallel.cpu_compat import cpu_pipeline_compat

MicroBatch = dict[str, Any]
"""A packed micro-batch: at least ``input_ids`` int [T] and ``cu_seqlens`` int [N+1]; any other keys
(targets, advantages, masks, ...) are passed through to ``loss_fn``."""


def forward_backward(
    model: torch.nn.Module,
    micro_batches: Sequence[MicroBatch],
    loss_fn: Callable[[torch.Tensor, MicroBatch], Any],
    *,
    forward_only: bool = False,
) -> list[Any]:
    """Run ``micro_batches`` through ``model`` (this rank's stage), backward included unless ``forward_only``.

    ``loss_fn(output, batch)`` runs on the last stage with the model's output (policy:
    hidden [T, H]; critic: values [T]). For training it returns ``(loss, stats)``: the
    scalar ``loss`` is divided by ``len(micro_batches)`` (Megatron's convention, so the
    gradients are the mean over micro-batches) and back-propagated through all stages;
    gradients accumulate into ``.grad``. With ``forward_only`` it may return anything.

    Returns, on the last stage, the list of ``stats`` (training) or of ``loss_fn``
    results (forward only), one per micro-batch; an empty list on other stages.
    """
    if not micro_batches:
        raise ValueError("micro_batches is empty")
    first_stage = parallel_state.is_pipeline_first_stage()

    def step(data_iterator, stage_model):
        batch = next(data_iterator)
        output = stage_model(batch["input_ids"] if first_stage else None, batch["cu_seqlens"])

        def reduce(out: torch.Tensor, non_loss_data: bool = False):
            return loss_fn(out, batch)

        return output, reduce

    on_cpu = not next(model.parameters()).is_cuda
    with cpu_pipeline_compat(on_cpu):
        result = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter(micro_batches),
            model=[model],
            num_microbatches=len(micro_batches),
            seq_length=max(b["input_ids"].shape[0] for b in micro_batches),
            micro_batch_size=1,
            forward_only=forward_only,
            collect_non_loss_data=forward_only,
        )
    return list(result) if parallel_state.is_pipeline_last_stage() else []


def finalize_model_grads(model: torch.nn.Module) -> None:
    """Make the accumulated gradients step-ready; call once per optimizer step, after the last backward.

    1. Tied embeddings with ``pp > 1``: the first stage's embedding and the last stage's
       head copy receive the sum of both gradients (all-reduce over the embedding group),
       so the two copies stay equal.
    2. Data parallelism: every gradient is averaged over the data-parallel group.
    """
    if getattr(model, "ties_embedding_across_stages", False) and parallel_state.is_rank_in_embedding_group():
        weight = model.embed.weight if model.is_first_stage else model.output_layer.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        dist.all_reduce(weight.grad, group=parallel_state.get_embedding_group())
    dp = parallel_state.get_data_parallel_world_size()
    if dp > 1:
        group = parallel_state.get_data_parallel_group()
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=group)
                p.grad.div_(dp)
