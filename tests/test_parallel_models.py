"""TP=2 and PP=2 equal TP=1, PP=1: logits / values, losses, log-probs and gathered gradients (2 processes, gloo),
odd (padded) vocabularies included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dist_models_worker import LLAMA_ARCH, ODD_VOCAB_ARCHS, QWEN2_ARCH, TOL, make_hf_checkpoint

from orz_fast import parallel

WORKER = Path(__file__).resolve().parent / "dist_models_worker.py"


def test_tp2_and_pp2_match_tp1(tmp_path):
    ckpts, work = tmp_path / "ckpt", tmp_path / "work"
    work.mkdir()
    make_hf_checkpoint(QWEN2_ARCH, ckpts / "qwen2")
    make_hf_checkpoint(LLAMA_ARCH, ckpts / "llama")
    for name, arch in ODD_VOCAB_ARCHS.items():
        make_hf_checkpoint(arch, ckpts / name)
    # torchrun sets the rendezvous variables itself; drop any a single-process initialize() left behind.
    rendezvous = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(WORKER), str(ckpts), str(work)], env=env, capture_output=True, text=True, timeout=480
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    report = json.loads((work / "report.json").read_text())
    runs = [(m, r) for m in ("qwen2", "llama") for r in ("policy", "critic")] + [(m, "policy") for m in ODD_VOCAB_ARCHS]
    expected = {f"{m}/{r}/{lay}" for m, r in runs for lay in ("tp2pp1", "tp1pp2")}
    assert set(report) == expected
    for key, errs in report.items():
        assert set(errs) == {"loss", "out", "fwd", "grad"} | ({"logp"} if "/policy/" in key else set())
        assert all(v <= TOL for v in errs.values()), (key, errs)


def test_initialize_rejects_a_layout_larger_than_the_world():
    parallel.initialize(1, 1)
    parallel.initialize(1, 1)  # idempotent
    assert (parallel.tp_size(), parallel.pp_size(), parallel.dp_size()) == (1, 1, 1)
    with pytest.raises(ValueError, match="not divisible by tp \\* pp"):
        parallel.initialize(2, 1)
    with pytest.raises(ValueError, match="tp and pp must be >= 1"):
        parallel.initialize(0, 1)
