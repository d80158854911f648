"""Process groups (megatron-core ``parallel_state``), device-correct collectives and the pipeline-parallel
training step."""

from orz_fast.parallel import collectives
from orz_fast.parallel.pipeline import finalize_model_grads, forward_backward, tied_embedding_copy
from orz_fast.parallel.state import (
    destroy,
    dp_group,
    dp_rank,
    dp_size,
    initialize,
    is_first_stage,
    is_initialized,
    is_last_stage,
    last_stage_rank,
    mp_group,
    pp_group,
    pp_rank,
    pp_size,
    stage_rank,
    tp_group,
    tp_rank,
    tp_size,
)

__all__ = [
    "collectives",
    "destroy",
    "dp_group",
    "dp_rank",
    "dp_size",
    "finalize_model_grads",
    "forward_backward",
    "initialize",
    "is_first_stage",
    "is_initialized",
    "is_last_stage",
    "last_stage_rank",
    "mp_group",
    "pp_group",
    "pp_rank",
    "pp_size",
    "stage_rank",
    "tp_group",
    "tp_rank",
    "tied_embedding_copy",
    "tp_size",
]
