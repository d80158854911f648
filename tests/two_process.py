"""Run a function on two gloo processes (spawned) and collect what each returns or raises."""

from __future__ import annotations

import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable, rank: int, world: int, port: int, queue, args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        queue.put((rank, "ok", fn(rank, *args)))
    except Exception as e:  # reported to the test, which decides whether it was expected
        queue.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        dist.destroy_process_group()


def run_two(fn: Callable, *args: Any, timeout: float = 180) -> list[tuple[str, Any]]:
    """``fn(rank, *args)`` on ranks 0 and 1 of a fresh gloo group; returns ``[(status, value), ...]`` by rank,
    status ``"ok"`` (value: what ``fn`` returned, which must pickle by value: numpy arrays and lists, not torch
    tensors, whose shared memory can vanish with the process) or ``"error"`` (value: the message)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, 2, port, queue, args)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(2):
        rank, status, value = queue.get(timeout=timeout)
        results[rank] = (status, value)
    for p in procs:
        p.join(timeout=60)
    return [results[r] for r in range(2)]
