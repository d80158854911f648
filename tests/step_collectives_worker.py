"""Records who issues each torch.distributed call during one training step, for
tests/test_parallel_collectives.py: ``torchrun --nproc_per_node 2 tests/step_collectives_worker.py OUT [--set k=v]``.

Builds the ``tiny`` preset's trainer, wraps every torch.distributed communication function, runs one
``train_step`` and writes ``OUT/collectives.json`` (rank 0): the number of calls and those whose
caller -- the first frame outside torch -- is neither ``orz_fast/parallel/collectives.py``, nor
megatron-core (whose pipeline p2p allocates its own buffers on the right device), nor the native
rollout engine (``rollout/native.py`` and its model runner, ``rollout/model_runner.py``) decoding across
pipeline stages (its activations and samples live on the model's device). ``isend`` and
``irecv`` stay unwrapped: ``P2POp`` checks their identity (megatron-core's p2p goes through
``batch_isend_irecv``, which is recorded).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
import warnings
from pathlib import Path

import torch.distributed as dist

from orz_fast.config import resolve
from orz_fast.ppo.trainer import Trainer

WRAPPED = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "gather_object",
    "scatter",
    "reduce",
    "send",
    "recv",
    "batch_isend_irecv",
    "barrier",
)
ALLOWED = (
    "orz_fast/parallel/collectives.py",
    "/megatron/",
    "orz_fast/rollout/native.py",
    "orz_fast/rollout/model_runner.py",
)


def caller() -> str:
    """``file:line`` of the first frame that is not torch's own."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename:
            return f"{frame.filename}:{frame.lineno}"
    return "?"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    cfg = resolve("tiny", overrides=["logging.progress=false", "reward.workers=1", *args.overrides])
    trainer = Trainer(cfg, Path(args.out) / "run")
    calls: list[str] = []
    originals = {name: getattr(dist, name) for name in WRAPPED if hasattr(dist, name)}

    def wrap(name, fn):
        def recorded(*a, **k):
            calls.append(f"{name} from {caller()}")
            return fn(*a, **k)

        return recorded

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        trainer.train_step()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        trainer.scorer.close()
    outside = [c for c in calls if not any(a in c for a in ALLOWED)]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"calls": len(calls), "outside": outside})
    if dist.get_rank() == 0:
        report = {"calls": sum(g["calls"] for g in gathered), "outside": [c for g in gathered for c in g["outside"]]}
        (Path(args.out) / "collectives.json").write_text(json.dumps(report, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
