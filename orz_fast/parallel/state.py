"""Process groups: torch.distributed plus megatron-core's TP x PP x DP ``parallel_state``.

Ranks are laid out by megatron-core's default order (``tp-cp-ep-dp-pp``): tensor-parallel
ranks are adjacent, pipeline stages are the slowest-varying dimension.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize(tp: int = 1, pp: int = 1) -> None:
    """Set up torch.distributed and megatron-core's model-parallel groups for ``tp`` x ``pp``.

    Under torchrun the rank and world size come from the environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); otherwise a
    one-process group is created on a free local port. The backend is NCCL when CUDA
    is available and gloo otherwise. The data-parallel size is ``world / (tp * pp)``.

    Idempotent: a second call with the same sizes does nothing; with other sizes the
    model-parallel groups are rebuilt (torch.distributed itself is kept).
    """
    if tp < 1 or pp < 1:
        raise ValueError(f"tp and pp must be >= 1, got tp={tp}, pp={pp}")
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ:
            dist.init_process_group(backend=backend)
        else:
            # A lone process: a private rendezvous, leaving os.environ untouched so that child
            # processes (e.g. a torchrun launched from here) do not inherit a torchrun identity.
            init = f"tcp://127.0.0.1:{_free_port()}"
            dist.init_process_group(backend=backend, init_method=init, rank=0, world_size=1)
    world = dist.get_world_size()
    if world % (tp * pp) != 0:
        raise ValueError(f"world size {world} is not divisible by tp * pp = {tp} * {pp}")
    if parallel_state.model_parallel_is_initialized():
        if (
            parallel_state.get_tensor_model_parallel_world_size() == tp
            and parallel_state.get_pipeline_model_parallel_world_size() == pp
        ):
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        create_gloo_process_groups=False,
    )


def is_initialized() -> bool:
    """True once :func:`initialize` has built the model-parallel groups."""
    return dist.is_initialized() and parallel_state.model_parallel_is_initialized()


def _require_initialized() -> None:
    if not is_initialized():
        raise RuntimeError("orz_fast.parallel.initialize(tp, pp) must be called first")


def tp_group() -> dist.ProcessGroup:
    """This rank's tensor-parallel group."""
    _require_initialized()
    return parallel_state.get_tensor_model_parallel_group()


def pp_group() -> dist.ProcessGroup:
    """This rank's pipeline-parallel group."""
    _require_initialized()
    return parallel_state.get_pipeline_model_parallel_group()


def mp_group() -> dist.ProcessGroup:
    """This rank's model-parallel group: every tensor- and pipeline-parallel rank of one replica."""
    _require_initialized()
    return parallel_state.get_model_parallel_group()


def stage_rank(offset: int) -> int:
    """Global rank of the same tensor-parallel rank ``offset`` stages later in this pipeline
    (``-1``: previous, ``1``: next; wraps around)."""
    _require_initialized()
    ranks = dist.get_process_group_ranks(pp_group())
    return ranks[(pp_rank() + offset) % len(ranks)]


def last_stage_rank() -> int:
    """Global rank of this tensor-parallel rank's copy on the last stage of this pipeline."""
    _require_initialized()
    return dist.get_process_group_ranks(pp_group())[-1]


def dp_group() -> dist.ProcessGroup:
    """This rank's data-parallel group."""
    _require_initialized()
    return parallel_state.get_data_parallel_group()


def tp_rank() -> int:
    _require_initialized()
    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    _require_initialized()
    return parallel_state.get_tensor_model_parallel_world_size()


def pp_rank() -> int:
    _require_initialized()
    return parallel_state.get_pipeline_model_parallel_rank()


def pp_size() -> int:
    _require_initialized()
    return parallel_state.get_pipeline_model_parallel_world_size()


def dp_rank() -> int:
    _require_initialized()
    return parallel_state.get_data_parallel_rank()


def dp_size() -> int:
    _require_initialized()
    return parallel_state.get_data_parallel_world_size()


def is_first_stage() -> bool:
    return pp_rank() == 0


def is_last_stage() -> bool:
    return pp_rank() == pp_size() - 1


def destroy() -> None:
    """Tear down the model-parallel groups and the default process group (end of a run or test)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
