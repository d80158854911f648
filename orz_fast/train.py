"""Entry point: ``[torchrun ...] python -m orz_fast.train --preset NAME [--set a.b=V ...] [--out DIR] [--resume]``."""

from __future__ import annotations

import argparse
import json
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
