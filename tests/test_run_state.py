"""Run checkpoints (atomic, resumable, weights_only), metrics.jsonl and the curves plot."""

import json
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from orz_fast.metrics import MetricsLogger, read_metrics
from orz_fast.plot import plot_run
from orz_fast.ppo.checkpointing import CheckpointManager, rng_state, set_rng_state


def model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, opt


def test_save_load_round_trip(tmp_path):
    model, opt = model_and_optimizer()
    mgr = CheckpointManager(tmp_path, keep=2)
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "rng": rng_state(), "data_position": 17}
    path = mgr.save(10, state, {"config": {"a": 1}})
    assert path.name == "step-00000010" and (path / "COMPLETE").is_file()
    loaded, meta = mgr.load()
    assert meta == {"step": 10, "world_size": 1, "config": {"a": 1}}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded["model"][k], v)
    fresh, fresh_opt = model_and_optimizer(seed=1)
    fresh_opt.load_state_dict(loaded["optim"])
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert loaded["data_position"] == 17


def test_rng_state_restores_every_generator():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_keep_prunes_old_and_latest_wins(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (5, 10, 15):
        mgr.save(step, {"x": torch.tensor(step)}, {})
    assert [s for s, _ in mgr.complete()] == [10, 15]
    state, meta = mgr.load()
    assert meta["step"] == 15 and state["x"].item() == 15


def test_interrupted_write_leaves_previous_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save(5, {"x": torch.tensor(5)}, {})
    # A crash mid-write: a temp dir with a partial rank file and no COMPLETE marker,
    # and a renamed-looking dir without the marker (never produced by save, still ignored).
    partial = mgr.root / ".tmp-step-00000010"
    partial.mkdir()
    (partial / "rank-00000.pt").write_bytes(b"\x00partial")
    (mgr.root / "step-00000011").mkdir()
    state, meta = mgr.load()
    assert meta["step"] == 5 and state["x"].item() == 5
    mgr.save(15, {"x": torch.tensor(15)}, {})
    assert not partial.exists(), "the next save clears stale temp dirs"


def test_kill_during_write_keeps_last_good(tmp_path):
    """SIGKILL a process while it writes a large checkpoint: the previous one stays loadable."""
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save(1, {"w": torch.ones(3)}, {})
    script = (
        "import sys, torch; from orz_fast.ppo.checkpointing import CheckpointManager; "
        "m = CheckpointManager(sys.argv[1], keep=3); print('start', flush=True); "
        "m.save(2, {'w': torch.randn(64, 1024, 1024)}, {})"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "start"
    tmp_dir = mgr.root / ".tmp-step-00000002"
    deadline = time.monotonic() + 60
    while not any(tmp_dir.glob("rank-*.pt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    state, meta = mgr.load()
    assert meta["step"] in (1, 2)
    if meta["step"] == 1:
        assert torch.equal(state["w"], torch.ones(3))


def test_world_size_mismatch_is_an_error(tmp_path):
    CheckpointManager(tmp_path).save(3, {"x": torch.zeros(1)}, {})
    with pytest.raises(ValueError, match="written by 1 processes, this run has 2"):
        CheckpointManager(tmp_path, rank=0, world_size=2).load()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        CheckpointManager(tmp_path / "other").load()


def test_checkpoints_refuse_pickled_objects(tmp_path):
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(1, {"x": torch.zeros(1)}, {})
    torch.save({"evil": object.__new__(CheckpointManager)}, path / "rank-00000.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        mgr.load()


def test_metrics_resume_drops_lines_after_the_checkpoint(tmp_path):
    log = MetricsLogger(tmp_path)
    for step in range(1, 8):
        log.log(step, {"reward_mean": step / 10, "loss": float("nan") if step == 3 else 0.5})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "rew')  # torn line from a crash
    resumed = MetricsLogger(tmp_path, resume_step=5)
    resumed.log(6, {"reward_mean": 0.6, "loss": 0.5})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[2]["loss"] == "nan"


def test_plot_writes_png(tmp_path):
    log = MetricsLogger(tmp_path)
    for step in range(1, 6):
        log.log(step, {"reward_mean": step / 10, "response_length_mean": 10 + step, "value_loss": 1 / step})
    path = plot_run(tmp_path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = subprocess.run(
        [sys.executable, "-m", "orz_fast.plot", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert out.returncode == 2 and "no metrics.jsonl" in out.stderr
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
