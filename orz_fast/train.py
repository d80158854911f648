"""Entry point: ``python -m orz_fast.train --preset NAME [--set a.b=VALUE ...] [--config F.yaml] [--out DIR]``."""

from __future__ import annotations

import argparse
import json
import sys

from orz_fast.config import PRESETS, ConfigError, resolve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m orz_fast.train", description=__doc__)
    parser.add_argument("--preset", required=True, help=f"one of: {', '.join(PRESETS)}")
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of overrides (nested sections)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="a.b=VALUE", help="override one config key"
    )
    parser.add_argument("--out", default="runs/default", help="run directory (metrics, checkpoints)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
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
    print(
        "orz_fast.train: training is not available yet (the PPO trainer has not landed); "
        "only --print-config works in this version.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
