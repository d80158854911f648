"""orz_fast.parallel.collectives: results on 2 gloo processes, the device each backend needs, and that every
collective of a training step goes through it (the NCCL regression: a CPU tensor all-reduced over a
data-parallel group passes on gloo and fails on NCCL at the first step)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from two_process import run_two

from orz_fast.parallel import collectives

WORKER = Path(__file__).with_name("step_collectives_worker.py")


def _exchange(rank):
    group = dist.group.WORLD
    summed = collectives.all_reduce(torch.tensor([1.0, rank + 1.0], dtype=torch.float64), group)
    biggest = collectives.all_reduce(torch.tensor([rank * 5]), group, op="max")
    # Rank 0 has 3 rows, rank 1 has 1 row: sizes first, then one padded buffer.
    rows = torch.arange(6, dtype=torch.float32).view(3, 2) + 10 * rank if rank == 0 else torch.tensor([[7.0, 8.0]])
    gathered = collectives.all_gather_varlen(rows, group)
    # Rank 0 sends 1 element to itself and 2 to rank 1; rank 1 sends 3 to rank 0 and none to itself.
    send = torch.tensor([0, 1, 2]) if rank == 0 else torch.tensor([10, 11, 12])
    counts = {0: ([1, 2], [1, 3]), 1: ([3, 0], [2, 0])}[rank]
    moved = collectives.all_to_all_varlen(send, *counts, group)
    src = collectives.broadcast(torch.tensor([rank + 100]), 1, group)
    shard = torch.empty(2)
    collectives.reduce_scatter(shard, torch.arange(4, dtype=torch.float32) * (rank + 1), group)
    whole = torch.empty(4)
    collectives.all_gather_into(whole, shard, group)
    return {
        "summed": summed.tolist(),
        "max": biggest.tolist(),
        "gathered": [g.tolist() for g in gathered],
        "moved": moved.tolist(),
        "broadcast": src.tolist(),
        "whole": whole.tolist(),
    }


def test_collectives_on_two_processes():
    (s0, r0), (s1, r1) = run_two(_exchange)
    assert s0 == s1 == "ok", (r0, r1)
    for r in (r0, r1):
        assert r["summed"] == [2.0, 3.0] and r["max"] == [5]
        assert r["gathered"] == [[[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]], [[7.0, 8.0]]]
        assert r["broadcast"] == [101]
        assert r["whole"] == [0.0, 3.0, 6.0, 9.0]
    assert r0["moved"] == [0, 10, 11, 12] and r1["moved"] == [1, 2]


def test_no_group_means_no_communication():
    t = torch.tensor([3.0])
    assert collectives.all_reduce(t, None) is t
    assert collectives.all_gather_varlen(t, None) == [t]
    assert collectives.all_to_all_varlen(t, [1], [1], None) is t
    assert collectives.size(None) == 1 and collectives.rank(None) == 0
    assert collectives.device(None) == torch.device("cpu")


def _reported_as_nccl(rank):
    """With the group's backend reported as NCCL, the step's tensors are moved to CUDA before any communication."""
    group = dist.group.WORLD
    calls = []
    real_backend, real_all_reduce = dist.get_backend, dist.all_reduce
    dist.get_backend = lambda g=None: "nccl"
    dist.all_reduce = lambda *a, **k: calls.append("all_reduce")
    torch.cuda.current_device = lambda: rank
    try:
        out = {"device": str(collectives.device(group))}
        try:
            collectives.all_reduce(torch.ones(2), group)
            out["all_reduce"] = "ran"
        except (AssertionError, RuntimeError) as e:  # a CPU-only build cannot make the CUDA tensor NCCL needs
            out["all_reduce"] = f"{type(e).__name__}: {e}"
        try:
            collectives.reduce_scatter(torch.empty(1), torch.ones(2), group)
        except ValueError as e:
            out["reduce_scatter"] = str(e)
        out["calls"] = calls
        return out
    finally:
        dist.get_backend, dist.all_reduce = real_backend, real_all_reduce


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CUDA move on a CPU-only build")
def test_nccl_group_gets_cuda_tensors():
    for status, r in run_two(_reported_as_nccl):
        assert status == "ok", r
        assert r["device"].startswith("cuda:")
        assert "CUDA" in r["all_reduce"], r["all_reduce"]  # it tried to put the tensor on the GPU
        assert r["calls"] == []  # and failed before any communication
        assert "is on cpu but the group's backend (nccl) moves tensors on cuda" in r["reduce_scatter"]


@pytest.mark.parametrize("layout", [[], ["parallel.pp=2"]], ids=["dp2", "pp2"])
def test_every_collective_of_a_step_goes_through_the_device_aware_module(tmp_path, layout):
    """Every torch.distributed call made during ``train_step`` (rollout, balancing, forward-only passes,
    advantages, updates, optimizer, metrics) comes from orz_fast.parallel.collectives, so each gets
    tensors on its group's device; megatron-core's pipeline p2p (its own device handling) is exempt."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sets = [a for o in layout for a in ("--set", o)]
    cmd = [sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    out = subprocess.run(
        [*cmd, str(WORKER), str(tmp_path), *sets], capture_output=True, text=True, timeout=600, env=env
    )
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads((tmp_path / "collectives.json").read_text())
    assert report["calls"] > 0
    assert report["outside"] == [], report["outside"][:10]
