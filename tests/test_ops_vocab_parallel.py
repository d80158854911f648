"""Vocab-parallel linear_logprobs / linear_ppo_loss: 2 gloo processes with half the vocab each
give the same log-probs, entropy, loss and gradients as one process holding the whole vocab.

Padded vocabularies too: a weight of ``2 * 512`` rows whose rows past the real vocabulary are
padding (filled with large values, which would dominate any softmax they entered), with
``vocab_size`` 1001 (rank 1 holds 489 real rows) and 300 (rank 1 holds padding only), against one
process holding just the real rows.

Each rank is this file run as a script (``python test_ops_vocab_parallel.py RANK PORT OUT``);
it writes its results to ``OUT/rank{RANK}.pt`` and the test compares them with a single-process
run in the test itself.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORLD = 2
T, H, V = 23, 16, 2 * 501
TEMPERATURE = 0.8
BACKENDS = ("torch", "triton")
PADDED_ROWS = 2 * 512
PADDED_VOCABS = (1001, 300)


def _inputs(vocab: int = V):
    gen = torch.Generator().manual_seed(1234)
    hidden = torch.randn(T, H, generator=gen)
    weight = torch.randn(vocab, H, generator=gen) / H**0.5 * 2
    targets = torch.randint(0, vocab, (T,), generator=gen)
    g_logp, g_ent = torch.randn(T, generator=gen), torch.randn(T, generator=gen)
    old = torch.randn(T, generator=gen) * 0.3 - 6.5
    adv = torch.randn(T, generator=gen)
    mask = torch.rand(T, generator=gen) < 0.7
    return hidden, weight, targets, g_logp, g_ent, old, adv, mask


def _padded_weight(vocab: int) -> torch.Tensor:
    """The real rows of ``_inputs(vocab)`` then padding rows of large values, ``PADDED_ROWS`` in all."""
    _, weight, *_ = _inputs(vocab)
    return torch.cat([weight, torch.full((PADDED_ROWS - vocab, H), 3.0)])


def _compute(weight_part, tp_group, backend, vocab=V, vocab_size=None):
    """Everything compared: per backend, log-probs, entropy, loss and the gradients behind them."""
    from orz_fast import ops

    hidden, _, targets, g_logp, g_ent, old, adv, mask = _inputs(vocab)
    out = {}
    for b in BACKENDS if backend is None else (backend,):
        h = hidden.clone().requires_grad_()
        w = weight_part.clone().requires_grad_()
        logp, ent = ops.linear_logprobs(
            h,
            w,
            targets,
            temperature=TEMPERATURE,
            tp_group=tp_group,
            return_entropy=True,
            vocab_size=vocab_size,
            backend=b,
        )
        (logp * g_logp + ent * g_ent).sum().backward()
        out[b] = {"logp": logp.detach(), "entropy": ent.detach(), "dhidden": h.grad, "dweight": w.grad}
        h = hidden.clone().requires_grad_()
        w = weight_part.clone().requires_grad_()
        loss, stats = ops.linear_ppo_loss(
            h,
            w,
            targets,
            old,
            adv,
            mask,
            temperature=TEMPERATURE,
            tp_group=tp_group,
            return_entropy=True,
            vocab_size=vocab_size,
            backend=b,
        )
        loss.backward()
        out[b].update(
            loss=loss.detach(),
            clipfrac=stats["clipfrac"],
            ppo_entropy=stats["entropy"],
            ppo_dhidden=h.grad,
            ppo_dweight=w.grad,
        )
    return out


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        _, weight, *_ = _inputs()
        shard = weight.chunk(WORLD, dim=0)[rank].contiguous()
        results = {"whole": _compute(shard, dist.group.WORLD, None)}
        for vocab in PADDED_VOCABS:
            padded = _padded_weight(vocab).chunk(WORLD, dim=0)[rank].contiguous()
            results[f"padded{vocab}"] = _compute(padded, dist.group.WORLD, None, vocab=vocab, vocab_size=vocab)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab_parallel")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, __file__, str(r), str(port), str(out)], env=env, stderr=subprocess.PIPE)
        for r in range(WORLD)
    ]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err.decode()[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _check_against_one_process(ranks, case: str, backend: str, vocab: int, rows: int) -> None:
    _, weight, *_ = _inputs(vocab)
    whole = _compute(weight, None, backend, vocab=vocab)[backend]
    tol = dict(rtol=1e-5, atol=1e-5)
    for r, res in enumerate(ranks):
        got = res[case][backend]
        for name in ("logp", "entropy", "dhidden", "loss", "clipfrac", "ppo_entropy", "ppo_dhidden"):
            torch.testing.assert_close(got[name], whole[name], **tol, msg=f"rank {r} {name}")
        for name in ("dweight", "ppo_dweight"):
            # the padding rows' gradient is zero
            want = torch.cat([whole[name], whole[name].new_zeros(rows - vocab, H)]).chunk(WORLD, dim=0)[r]
            torch.testing.assert_close(got[name], want, **tol, msg=f"rank {r} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_parallel_matches_whole_vocab(ranks, backend):
    _check_against_one_process(ranks, "whole", backend, V, V)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", PADDED_VOCABS)
def test_padded_vocab_parallel_matches_the_real_rows(ranks, backend, vocab):
    _check_against_one_process(ranks, f"padded{vocab}", backend, vocab, PADDED_ROWS)


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
