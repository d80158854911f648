"""``python -m orz_fast.plot OUT``: training curves from ``OUT/metrics.jsonl`` into ``OUT/curves.png``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orz_fast.metrics import read_metrics

PANELS = [
    ("reward_mean", "mean reward"),
    ("response_length_mean", "mean response length (tokens)"),
    ("entropy", "policy entropy"),
    ("value_loss", "value loss"),
]
"""(metric key, panel title) of the four panels."""


def plot_run(out_dir: str | Path) -> Path:
    """Write ``curves.png`` beside the run's metrics.jsonl and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    metrics_path = out_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {out_dir}")
    records = read_metrics(metrics_path)
    if not records:
        raise ValueError(f"{metrics_path} holds no complete record")
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title) in zip(axes.flat, PANELS, strict=True):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="." if len(points) < 50 else None)
        else:
            ax.text(0.5, 0.5, f"no '{key}' logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(str(out_dir))
    fig.tight_layout()
    path = out_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orz_fast.plot", description=__doc__)
    parser.add_argument("out", help="run directory holding metrics.jsonl")
    args = parser.parse_args(argv)
    try:
        path = plot_run(args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"orz_fast.plot: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
