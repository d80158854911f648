"""Crash-safe run checkpoints: write to a temporary directory, then rename.

Layout under ``<out>/checkpoints/``::

    step-00000010/          a complete checkpoint (renamed into place last)
        meta.json           step, world size, config, written by rank 0
        rank-00000.pt       that rank's state (model shards, optimizers, schedulers, RNG, data position)
        COMPLETE            marker written after every rank's file
    .tmp-step-00000020/     an interrupted write: ignored, removed by the next save

A crash at any point leaves the newest complete ``step-*`` directory loadable:
the rename is atomic, and a directory without ``COMPLETE`` is never loaded.
Files load with ``torch.load(weights_only=True)``; RNG states are stored as
tensors and plain ints so no pickled objects are needed.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step-(\d{8})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    with open(path, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA RNG states as tensors and plain values (``weights_only``-loadable)."""
    version, py_state, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        ("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Saves and finds run checkpoints under ``<out>/checkpoints``; every rank calls every method.

    Args:
        out_dir: the run directory.
        keep: number of newest complete checkpoints kept (older ones are deleted after a save).
        rank, world_size: this process's place; rank 0 writes metadata and renames.
        barrier: waits for all ranks (``torch.distributed.barrier`` in a multi-process run).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        keep: int = 2,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] = lambda: None,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(out_dir) / "checkpoints"
        self.keep, self.rank, self.world_size, self.barrier = keep, rank, world_size, barrier

    def complete(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as (step, directory), oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for d in self.root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and (d / "COMPLETE").is_file():
                found.append((int(m.group(1)), d))
        return sorted(found)

    def latest(self) -> tuple[int, Path] | None:
        """The newest complete checkpoint, or None."""
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Write this rank's ``state`` (and rank 0's JSON-able ``meta``) as checkpoint ``step``, atomically."""
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        self.barrier()
        _write_file(tmp / f"rank-{self.rank:05d}.pt", lambda f: torch.save(state, f))
        self.barrier()
        if self.rank == 0:
            payload = {"step": step, "world_size": self.world_size, **meta}
            _write_file(tmp / "meta.json", lambda f: f.write(json.dumps(payload, indent=2)), mode="w")
            _write_file(tmp / "COMPLETE", lambda f: f.write(""), mode="w")
            _fsync_dir(tmp)
            if final.exists():  # re-saving a step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            for _, old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()
        return final

    def load(self, directory: Path | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """This rank's state and the metadata of ``directory`` (default: the newest complete checkpoint)."""
        if directory is None:
            found = self.latest()
            if found is None:
                raise FileNotFoundError(f"no complete checkpoint under {self.root}")
            directory = found[1]
        meta = json.loads((directory / "meta.json").read_text())
        if meta["world_size"] != self.world_size:
            raise ValueError(
                f"checkpoint {directory} was written by {meta['world_size']} processes, this run has {self.world_size}"
            )
        state = torch.load(directory / f"rank-{self.rank:05d}.pt", map_location="cpu", weights_only=True)
        return state, meta
