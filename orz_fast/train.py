"""Entry point: ``[torchrun ...] python -m orz_fast.train --preset NAME [--set a.b=V ...] [--out DIR] [--resume]``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from orz_fast.config import PRESETS, ConfigError, resolve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m orz_fast.train", description=__doc__)
    parser.add_argument("--preset", required=True, help=f"one of: {', '.join(PRESETS)}")
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of overrides (nested sections)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="a.b=VALUE", help="override one config key"
    )
    parser.add_argument("--out", default="runs/default", help="run directory (metrics, checkpoints, exports)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    return parser


def default_threads(environ: dict[str, str] | None = None) -> int | None:
    """Torch intra-op threads for one training process: the cores available to it divided by the processes on its
    node (torchrun's ``LOCAL_WORLD_SIZE``), at least 1; None when ``OMP_NUM_THREADS`` is set (the user's choice;
    torchrun sets it to 1 itself when it starts several processes). More threads than that oversubscribe the cores:
    on 2 shared cores a decode-sized matmul took 100x longer with 2 threads than with 1."""
    environ = os.environ if environ is None else environ
    if "OMP_NUM_THREADS" in environ:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(environ.get("LOCAL_WORLD_SIZE", "1"))))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve(args.preset, yaml_file=args.config, overrides=args.overrides)
    except ConfigError as e:
        print(f"orz_fast.train: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    # megatron-core warns on import and on every layer call about optional fused kernels it does not need here.
    for message in ("Transformer Engine and Apex are not installed", "Apex is not installed", "Warning: tp_group"):
        warnings.filterwarnings("ignore", message=message)
    threads = default_threads()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
        if os.environ.get("RANK", "0") == "0":
            print(f"orz_fast.train: {threads} torch thread(s) per process (set OMP_NUM_THREADS to choose)", flush=True)
    from orz_fast.ppo.trainer import Trainer

    try:
        trainer = Trainer(cfg, args.out, resume=args.resume)
    except ValueError as e:
        print(f"orz_fast.train: {e}", file=sys.stderr)
        return 2
    trainer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
