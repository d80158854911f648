"""ShardedAdamW against torch.optim.AdamW + clip_grad_norm_, DP sharding over gloo (bucketed reduce-scatter and
all-gather, sent during the last backward), bad-step skipping."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from two_process import run_two

from orz_fast.ppo.optim import ShardedAdamW, assign_owners


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 7), (1,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def grads_for(step, rank=0):
    g = torch.Generator().manual_seed(100 * step + rank)
    shapes = [(7, 5), (5,), (3, 7), (1,)]
    return [torch.randn(s, generator=g) * (3.0 if step % 2 else 0.1) for s in shapes]


def reference_run(steps, grads_fn, lr=1e-2, clip=1.0, wd=0.0):
    params = make_params()
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
    for s in range(steps):
        for p, g in zip(params, grads_fn(s), strict=True):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
    return params


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_matches_torch_adamw_with_clipping(wd):
    params = make_params()
    opt = ShardedAdamW(params, lr=1e-2, weight_decay=wd, grad_clip=1.0)
    for s in range(6):
        for p, g in zip(params, grads_for(s), strict=True):
            p.grad = g.clone()
        out = opt.step()
        assert not out["skipped"]
    for p, r in zip(params, reference_run(6, grads_for, wd=wd), strict=True):
        torch.testing.assert_close(p.data, r.data, rtol=1e-6, atol=1e-7)


def test_bf16_params_keep_fp32_masters():
    params = make_params(torch.bfloat16)
    opt = ShardedAdamW(params, lr=1e-3, grad_clip=0.0)
    masters = [p.detach().float().clone().requires_grad_() for p in params]
    ref = torch.optim.AdamW(masters, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for s in range(20):
        for p, m, g in zip(params, masters, grads_for(s), strict=True):
            p.grad = g.to(torch.bfloat16)
            m.grad = g.to(torch.bfloat16).float()
        opt.step()
        ref.step()
    for i, (p, m) in enumerate(zip(params, masters, strict=True)):
        torch.testing.assert_close(opt.state[i]["master"], m.data, rtol=1e-6, atol=1e-7)
        assert torch.equal(p.data, m.data.to(torch.bfloat16))  # bf16 weights are the rounded masters


def test_nan_step_is_skipped_and_training_continues():
    params = make_params()
    opt = ShardedAdamW(params, lr=1e-2)
    for p, g in zip(params, grads_for(0), strict=True):
        p.grad = g
    opt.step()
    before = [p.detach().clone() for p in params]
    moments = {i: {k: v.clone() for k, v in s.items()} for i, s in opt.state.items()}
    for p, g in zip(params, grads_for(1), strict=True):
        p.grad = g
    params[2].grad[1, 3] = float("nan")
    out = opt.step()
    assert out["skipped"] and opt.steps == 1
    assert all(torch.equal(a, p) for a, p in zip(before, params, strict=True))
    assert all(torch.equal(moments[i][k], v) for i, s in opt.state.items() for k, v in s.items())
    assert all(p.grad is None for p in params)
    for p, g in zip(params, grads_for(2), strict=True):
        p.grad = g
    assert not opt.step()["skipped"] and opt.steps == 2


def test_owner_assignment_balances():
    owners = assign_owners([100, 60, 50, 10, 10], 2)
    load = [sum(n for n, o in zip([100, 60, 50, 10, 10], owners, strict=True) if o == r) for r in range(2)]
    assert sorted(load) == [110, 120]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dp_worker(rank, world, port, queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    params = make_params()
    opt = ShardedAdamW(params, lr=1e-2, grad_clip=1.0, dp_group=dist.group.WORLD)
    for s in range(5):
        for p, g in zip(params, grads_for(s, rank), strict=True):
            p.grad = g.clone()
        opt.step()
    # numpy arrays pickle by value; torch tensors would go through shared-memory file descriptors that
    # vanish when this process exits before the parent has read them.
    queue.put((rank, [p.detach().numpy().copy() for p in params], sorted(opt.state)))
    dist.destroy_process_group()


def test_data_parallel_equals_single_process_with_averaged_grads():
    world = 2
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_dp_worker, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {r: (params, owned) for r, params, owned in (queue.get(timeout=120) for _ in range(world))}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    def averaged(s):
        return [(a + b) / 2 for a, b in zip(grads_for(s, 0), grads_for(s, 1), strict=True)]

    ref = reference_run(5, averaged)
    for r in range(world):
        for p, q in zip(results[r][0], ref, strict=True):
            torch.testing.assert_close(torch.from_numpy(p), q.data, rtol=1e-6, atol=1e-7)
    owned = [results[r][1] for r in range(world)]
    assert sorted(owned[0] + owned[1]) == [0, 1, 2, 3] and owned[0] and owned[1]


def _bucketed_worker(rank, bucket_numel):
    """DP=2 steps with small buckets (parameters straddling them); counts the collectives of each step."""
    params = make_params()
    opt = ShardedAdamW(params, lr=1e-2, grad_clip=1.0, dp_group=dist.group.WORLD, bucket_numel=bucket_numel)
    counts = {}
    names = ("reduce_scatter_single", "reduce_scatter_tensor", "all_gather_single", "all_gather_into_tensor")
    real = {name: getattr(dist, name) for name in (*names, "all_reduce") if hasattr(dist, name)}

    def counted(name):
        kind = name.split("_")[0] + "_" + name.split("_")[1]  # reduce_scatter / all_gather / all_reduce

        def call(*a, **k):
            counts[kind] = counts.get(kind, 0) + 1
            return real[name](*a, **k)

        return call

    for name in real:
        setattr(dist, name, counted(name))
    try:
        for s in range(5):
            for p, g in zip(params, grads_for(s, rank), strict=True):
                p.grad = g.clone()
            opt.step()
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
    owned = {}
    for b in opt.buckets:
        for i, start, length, _ in b.pieces[rank]:
            owned.setdefault(i, []).append((start, length))
    return {
        "params": [p.detach().numpy().copy() for p in params],
        "counts": counts,
        "buckets": len(opt.buckets),
        "chunks": sorted({b.chunk for b in opt.buckets}),
        "owned": {i: sorted(v) for i, v in owned.items()},
        "state": sorted(opt.state),
    }


def averaged(s):
    return [(a + b) / 2 for a, b in zip(grads_for(s, 0), grads_for(s, 1), strict=True)]


def test_gradients_and_weights_move_in_flat_buckets_not_per_parameter():
    results = run_two(_bucketed_worker, 16)  # 8 elements of each rank's owned space per bucket
    assert [s for s, _ in results] == ["ok", "ok"], results
    ref = reference_run(5, averaged)
    for _, r in results:
        for p, q in zip(r["params"], ref, strict=True):
            torch.testing.assert_close(torch.from_numpy(p), q.data, rtol=1e-6, atol=1e-7)
        assert r["buckets"] > 2 and len(r["chunks"]) == 1
        # One reduce-scatter and one all-gather per bucket, one all-reduce for the norm: nothing per parameter.
        assert r["counts"] == {"reduce_scatter": 5 * r["buckets"], "all_gather": 5 * r["buckets"], "all_reduce": 5}
        # A rank's pieces cover exactly the elements of the parameters it owns, each once.
        numels = [p.numel() for p in make_params()]
        for i, pieces in r["owned"].items():
            assert i in r["state"]
            covered = [e for start, length in pieces for e in range(start, start + length)]
            assert covered == list(range(numels[int(i)]))
    assert sorted(results[0][1]["state"] + results[1][1]["state"]) == [0, 1, 2, 3]


def _overlap_worker(rank):
    """Two micro-batches: the first's backward under no_sync, the second's sends every bucket while backward runs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    opt = ShardedAdamW(model.parameters(), lr=1e-2, grad_clip=0.0, dp_group=dist.group.WORLD, bucket_numel=20)
    data = torch.randn(2, 2, 4, 6, generator=torch.Generator().manual_seed(10 + rank))
    with opt.overlap_grad_reduce():
        with opt.no_sync():
            model(data[0]).square().mean().backward()
        assert all(not b.work for b in opt.buckets), "a bucket was sent before the last backward"
        model(data[1]).square().mean().backward()
        launched = [bool(b.work) for b in opt.buckets]
    opt.step()
    params = [p.detach().numpy().copy() for p in model.parameters()]
    return {"launched": launched, "params": params, "data": data.numpy()}


def test_buckets_are_sent_during_the_last_backward():
    results = run_two(_overlap_worker)
    assert [s for s, _ in results] == ["ok", "ok"], results
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    ref = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for _, r in results:
        for mb in torch.from_numpy(r["data"]):
            (model(mb).square().mean() / 2).backward()  # the data-parallel mean of the two ranks' sums
    ref.step()
    for _, r in results:
        assert all(r["launched"]) and len(r["launched"]) > 1
        for p, q in zip(r["params"], model.parameters(), strict=True):
            torch.testing.assert_close(torch.from_numpy(p), q.detach(), rtol=1e-5, atol=1e-6)
