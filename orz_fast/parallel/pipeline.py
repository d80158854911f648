"""One training (or inference) pass over packed micro-batches through megatron-core's schedule.

With ``pp > 1`` megatron-core's non-interleaved 1F1B schedule runs the micro-batches
(activations travel between stages as [T, 1, H] with their shapes exchanged, since
packed micro-batches differ in length). On CPU the schedule runs under
:func:`orz_fast.parallel.cpu_compat.cpu_pipeline_compat`. With ``pp == 1`` a plain loop
accumulates gradients over them, the steps of megatron-core's no-pipelining schedule
(forward, loss divided by the micro-batch count, its ``backward_step``; every backward
but the last under ``no_sync``) without its per-micro-batch bookkeeping, which cost
50-150 us of CPU per micro-batch on the development machine, paid thousands of times
in an ORZ-sized step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func, schedules

from orz_fast.parallel import collectives
from orz_fast.parallel.cpu_compat import cpu_pipeline_compat


class GradSync(Protocol):
    """What overlaps the data-parallel gradient reduction with backward (``ShardedAdamW``)."""

    def overlap_grad_reduce(self) -> contextlib.AbstractContextManager: ...

    def no_sync(self) -> contextlib.AbstractContextManager: ...


MicroBatch = dict[str, Any]
"""A packed micro-batch: at least ``input_ids`` int [T] and either ``cu_seqlens`` int [N+1] (packed causal
segments) or ``attention`` (an attention context, e.g. ``SharedPrompts``); any other keys
(targets, advantages, masks, ...) are passed through to ``loss_fn``."""


class LazyMicroBatches(Protocol):
    """Micro-batches built one at a time as the schedule iterates (e.g. ``orz_fast.ppo.experience.MicroBatches``):
    their count and the longest one's token count are known up front."""

    max_tokens: int

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[MicroBatch]: ...


def forward_backward(
    model: torch.nn.Module,
    micro_batches: Sequence[MicroBatch] | LazyMicroBatches,
    loss_fn: Callable[[torch.Tensor, MicroBatch], Any],
    *,
    forward_only: bool = False,
    grad_sync: GradSync | None = None,
) -> list[Any]:
    """Run ``micro_batches`` through ``model`` (this rank's stage), backward included unless ``forward_only``.

    ``loss_fn(output, batch)`` runs on the last stage with the model's output (policy:
    hidden [T, H]; critic: values [T]). For training it returns ``(loss, stats)``: the
    scalar ``loss`` is divided by ``len(micro_batches)`` (Megatron's convention, so the
    gradients are the mean over micro-batches) and back-propagated through all stages;
    gradients accumulate into ``.grad``. With ``forward_only`` it may return anything.

    With ``grad_sync`` (the optimizer), the data-parallel gradient reduction starts during the
    last micro-batch's backward, bucket by bucket: megatron-core's schedule runs every other
    backward inside ``grad_sync.no_sync()``.

    Returns, on the last stage, the list of ``stats`` (training) or of ``loss_fn``
    results (forward only), one per micro-batch; an empty list on other stages.
    """
    if not micro_batches:
        raise ValueError("micro_batches is empty")
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return _no_pipelining(model, micro_batches, loss_fn, forward_only=forward_only, grad_sync=grad_sync)
    first_stage = parallel_state.is_pipeline_first_stage()

    def step(data_iterator, stage_model):
        batch = next(data_iterator)
        output = _forward(stage_model, batch, first_stage)

        def reduce(out: torch.Tensor, non_loss_data: bool = False):
            return loss_fn(out, batch)

        return output, reduce

    on_cpu = not next(model.parameters()).is_cuda
    overlap = grad_sync is not None and not forward_only
    saved_no_sync = model.config.no_sync_func
    if overlap:
        model.config.no_sync_func = grad_sync.no_sync
    try:
        with cpu_pipeline_compat(on_cpu), grad_sync.overlap_grad_reduce() if overlap else contextlib.nullcontext():
            result = get_forward_backward_func()(
                forward_step_func=step,
                data_iterator=iter(micro_batches),
                model=[model],
                num_microbatches=len(micro_batches),
                seq_length=getattr(micro_batches, "max_tokens", None)
                or max(b["input_ids"].shape[0] for b in micro_batches),
                micro_batch_size=1,
                forward_only=forward_only,
                collect_non_loss_data=forward_only,
            )
    finally:
        model.config.no_sync_func = saved_no_sync
    return list(result) if parallel_state.is_pipeline_last_stage() else []


def _forward(model: torch.nn.Module, batch: MicroBatch, first_stage: bool) -> torch.Tensor:
    ids = batch["input_ids"] if first_stage else None
    return model(ids, batch.get("cu_seqlens"), attention=batch.get("attention"))


def _no_pipelining(
    model: torch.nn.Module,
    micro_batches: Sequence[MicroBatch] | LazyMicroBatches,
    loss_fn: Callable[[torch.Tensor, MicroBatch], Any],
    *,
    forward_only: bool,
    grad_sync: GradSync | None,
) -> list[Any]:
    """:func:`forward_backward` with one pipeline stage: megatron-core's no-pipelining schedule, step for step."""
    n = len(micro_batches)
    results = []
    if forward_only:
        for batch in micro_batches:
            results.append(loss_fn(_forward(model, batch, True), batch))
        return results
    overlap = grad_sync.overlap_grad_reduce() if grad_sync is not None else contextlib.nullcontext()
    with overlap:
        for i, batch in enumerate(micro_batches):
            # the data-parallel reduction starts in the last micro-batch's backward
            sync = grad_sync.no_sync() if grad_sync is not None and i < n - 1 else contextlib.nullcontext()
            with sync:
                loss, stats = loss_fn(_forward(model, batch, True), batch)
                loss /= n  # in place, as megatron-core's schedules do: a stat aliasing the loss sees it too
                results.append(stats)
                schedules.backward_step(None, loss, None, model.model_type, model.config)
    return results


def tied_embedding_copy(model: torch.nn.Module) -> torch.nn.Parameter | None:
    """This stage's copy of an embedding tied across pipeline stages (its gradient is completed by
    :func:`finalize_model_grads`), or None."""
    if not getattr(model, "ties_embedding_across_stages", False):
        return None
    return model.embed.weight if model.is_first_stage else model.output_layer.weight


def finalize_model_grads(model: torch.nn.Module) -> None:
    """Complete the gradients that cross pipeline stages; call once per optimizer step, after the last backward.

    Tied embeddings with ``pp > 1``: the first stage's embedding and the last stage's head copy
    receive the sum of both gradients (all-reduce over the embedding group), so the two copies
    stay equal. The data-parallel mean is the optimizer's (``ShardedAdamW``: bucketed
    reduce-scatter).
    """
    weight = tied_embedding_copy(model)
    if weight is not None and parallel_state.is_rank_in_embedding_group():
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        weight.grad = collectives.all_reduce(weight.grad, parallel_state.get_embedding_group())
