"""A bad sample on one data-parallel rank, for tests/test_trainer.py:
``torchrun --nproc_per_node 2 tests/bad_sample_worker.py OUT {nan,long}``.

Builds the ``tiny`` preset's trainer (DP = 2: each rank generates one prompt's samples) and spoils
rank 1's second sample: a NaN score (``nan``) or three tokens past ``rollout.max_tokens`` (``long``).
Each rank runs one ``train_step`` and writes ``OUT/rank-R.json`` with the error it raised and the
seconds it took.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import torch.distributed as dist

from orz_fast.config import resolve
from orz_fast.ppo.trainer import Trainer


def main(out: Path, case: str) -> None:
    warnings.filterwarnings("ignore")
    trainer = Trainer(resolve("tiny", overrides=["logging.progress=false", "reward.workers=1"]), out / "run")
    rank = dist.get_rank()
    if rank == 1 and case == "nan":
        score_batch = trainer.scorer.score_batch
        trainer.scorer.score_batch = lambda *a, **k: [
            s if i != 1 else float("nan") for i, s in enumerate(score_batch(*a, **k))
        ]
    if rank == 1 and case == "long":
        generate = trainer.rollouts.engine.generate

        def too_long(prompts, params):
            outputs = generate(prompts, params)
            n = params[0].max_tokens + 3
            outputs[0][1].token_ids, outputs[0][1].logprobs = [1] * n, [-1.0] * n
            return outputs

        trainer.rollouts.engine.generate = too_long
    t0 = time.perf_counter()
    try:
        trainer.train_step()
        error = None
    except ValueError as e:
        error = f"{type(e).__name__}: {e}"
    finally:
        trainer.scorer.close()
    (out / f"rank-{rank}.json").write_text(json.dumps({"error": error, "seconds": time.perf_counter() - t0}))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2]))
