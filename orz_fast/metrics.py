"""Per-step metrics: one JSON line per step in ``<out>/metrics.jsonl``, plus optional TensorBoard / W&B."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so a bad step stays visible in the log."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Appends ``{"step": ..., **metrics}`` lines; on resume, drops lines past the resumed step first.

    Args:
        out_dir: run directory (created if needed).
        resume_step: when resuming from the checkpoint of this step, lines with a larger step (written
            after that checkpoint by the crashed run) are removed, so the file matches an uninterrupted run.
        tensorboard: also write scalars with ``torch.utils.tensorboard`` under ``<out>/tensorboard``.
        wandb_project: also log to this Weights & Biases project.
        enabled: False on non-zero ranks (nothing is written).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        resume_step: int | None = None,
        tensorboard: bool = False,
        wandb_project: str | None = None,
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
        enabled: bool = True,
    ) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        start_jsonl(self.path, resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError(
                    "logging.tensorboard=true needs the tensorboard package (pip install tensorboard)"
                ) from e
            self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("logging.wandb_project is set but wandb is not installed (pip install wandb)") from e
            self._wandb = wandb.init(project=wandb_project, name=run_name, config=config, resume="allow")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def start_jsonl(path: Path, resume_step: int | None) -> None:
    """Prepare a per-step JSONL file of a run (lines with a ``step``): empty it for a new run; on a resume from
    the checkpoint of ``resume_step``, keep only lines up to that step (a crashed run may have written later
    ones, and a torn last line)."""
    if resume_step is None:
        path.write_text("")
    elif path.exists():
        kept = [line for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf  # a torn last line from a crash is dropped


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete records of a metrics.jsonl (a torn last line is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
