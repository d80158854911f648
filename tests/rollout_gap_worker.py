"""A tiny run whose rollout log-probs are off by a known, layout-independent amount, for
tests/test_rollout_correction.py: ``[torchrun --nproc_per_node N] tests/rollout_gap_worker.py OUT [--set k=v]``.

Every sampling log-prob is scaled by ``1 + SHIFT`` as the rollout hands it over, so each token's gap to the
trainer is ``SHIFT * |logp|`` plus rounding: a per-token figure that does not depend on which rank holds the
token, so a data-parallel run's reduced gap metrics must equal a one-process run's. Writes ``OUT/metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from orz_fast.config import resolve
from orz_fast.ppo.trainer import Trainer

SHIFT = 0.01


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    overrides = ["logging.progress=false", "reward.workers=1", "ckpt.every=0", *args.overrides]
    trainer = Trainer(resolve("tiny", overrides=overrides), args.out)
    generate = trainer.rollout

    def shifted_rollout():
        exp = generate()
        exp.logprobs.mul_(1.0 + SHIFT)
        return exp

    trainer.rollout = shifted_rollout
    trainer.run()


if __name__ == "__main__":
    sys.exit(main())
