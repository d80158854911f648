"""Multi-process weight-sync checks, run by tests/test_weight_sync.py.

As ``torchrun --nproc_per_node 2 tests/weight_sync_worker.py CKPT_ROOT OUT_DIR``: for each
checkpoint under CKPT_ROOT it walks ``iter_hf_tensors`` in three layouts of the two processes
-- TP=1 PP=1 (the reference), TP=2, PP=2 -- and checks on *every* rank that the names, order,
dtypes and values equal the reference exactly; each rank writes OUT_DIR/report-RANK.json and
any mismatch exits non-zero.

It also holds what the single-process tests share: loading named tensors into a transformers
model, and the receiving ends of the two-process CUDA-IPC and shared-memory tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def load_into_hf(hf_model: torch.nn.Module, weights: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Copy each ``(hf_name, tensor)`` into ``hf_model``'s state; raises on an unknown name or shape; returns names."""
    state = hf_model.state_dict()
    names = []
    with torch.no_grad():
        for name, tensor in weights:
            if name not in state:
                raise KeyError(f"transformers model has no tensor {name!r}")
            if state[name].shape != tensor.shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != model's {tuple(state[name].shape)}")
            state[name].copy_(tensor)
            names.append(name)
    return names


def zeroed_hf_model(ckpt: Path, device: str) -> torch.nn.Module:
    """A transformers model with ``ckpt``'s config and every tensor zero (so a tensor never loaded shows)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt)).to(device).eval()
    with torch.no_grad():
        for t in model.state_dict().values():
            t.zero_()
    return model


def ipc_receiver(conn, ckpt: str) -> None:
    """Receiving process of the CUDA-IPC test: load every pushed bucket, ack it, then compare with ``ckpt``.

    Sends back ``("ok", loaded names)`` or ``("error", message)``.
    """
    from safetensors.torch import load_file

    from orz_fast.rollout.weight_sync import load_ipc_bucket

    try:
        model = zeroed_hf_model(Path(ckpt), "cuda")
        loaded: list[str] = []
        while (payload := conn.recv()) is not None:
            load_ipc_bucket(payload, lambda w: loaded.extend(load_into_hf(model, w)))
            conn.send("loaded")
        ref = load_file(str(Path(ckpt) / "model.safetensors"))
        state = model.state_dict()
        bad = [k for k in ref if not torch.equal(state[k].cpu(), ref[k])]
        if bad:
            raise AssertionError(f"tensors differ after the IPC push: {bad}")
        conn.send(("ok", loaded))
    except Exception as e:  # reported to the test process, which fails with the message
        conn.send(("error", f"{type(e).__name__}: {e}"))


def shm_receiver(conn, ckpt: str) -> None:
    """Receiving process of the shared-memory test: load every delivered bucket, ack it, then compare with ``ckpt``.

    Sends back ``("ok", loaded names)`` or ``("error", message)``.
    """
    from safetensors.torch import load_file

    from orz_fast.rollout.shm_transport import ShmBucketReceiver

    try:
        model = zeroed_hf_model(Path(ckpt), "cpu")
        receiver = ShmBucketReceiver()
        loaded: list[str] = []
        while (message := conn.recv()) is not None:
            loaded += load_into_hf(model, receiver.open(message))
            conn.send("loaded")
        receiver.close()
        ref = load_file(str(Path(ckpt) / "model.safetensors"))
        state = model.state_dict()
        bad = [k for k in ref if not torch.equal(state[k], ref[k])]
        if bad:
            raise AssertionError(f"tensors differ after the shared-memory push: {bad}")
        conn.send(("ok", loaded))
    except Exception as e:  # reported to the test process, which fails with the message
        conn.send(("error", f"{type(e).__name__}: {e}"))


def _walk(ckpt: Path, tp: int, pp: int) -> list[tuple[str, torch.Tensor]]:
    from orz_fast import parallel
    from orz_fast.models import load_pretrained
    from orz_fast.rollout.weight_sync import iter_hf_tensors

    parallel.initialize(tp, pp)
    model = load_pretrained(ckpt)
    return [(name, t.clone()) for name, t in iter_hf_tensors(model)]


def main(ckpt_root: Path, out: Path) -> None:
    import torch.distributed as dist

    rank = dist.get_rank()
    report: dict = {}
    for ckpt in sorted(p for p in ckpt_root.iterdir() if p.is_dir()):
        ref = _walk(ckpt, 1, 1)
        for tp, pp in ((2, 1), (1, 2)):
            got = _walk(ckpt, tp, pp)
            names, ref_names = [n for n, _ in got], [n for n, _ in ref]
            if names != ref_names:
                raise AssertionError(f"{ckpt.name} tp={tp} pp={pp} rank {rank}: names {names} != {ref_names}")
            for (name, a), (_, b) in zip(got, ref, strict=True):
                if a.dtype != b.dtype or not torch.equal(a, b):
                    raise AssertionError(f"{ckpt.name} tp={tp} pp={pp} rank {rank}: tensor {name} differs from tp=1")
            report[f"{ckpt.name}/tp{tp}pp{pp}"] = {"tensors": len(got), "names": names}
    (out / f"report-{rank}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    from orz_fast import parallel

    parallel.initialize(1, 1)
    try:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
    finally:
        parallel.destroy()
