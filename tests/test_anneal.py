"""The annealing stage whole: hard prompts mined from a run's rollouts.jsonl (or an evaluation), the stage drawing
only from them with the decaying lr, resume inside the stage, and bad anneal files refused before training."""

import json
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import pytest
from test_trainer import deterministic, run, train_cmd

from orz_fast import mine_hard
from orz_fast.config import resolve
from orz_fast.data import DataError, load_file, synthetic_problems
from orz_fast.metrics import read_metrics
from orz_fast.ppo.trainer import Trainer, lr_at

ANNEAL_PROBLEMS = [(f"{a}+{b}=", str(a + b)) for a, b in [(1, 2), (3, 4), (5, 1), (2, 2), (7, 1), (4, 4), (9, 0)]]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rollouts(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------- mining


def test_mining_a_constructed_run_picks_exactly_the_prompts_under_the_threshold(tmp_path):
    """Passes per prompt at its last step: 3/64 and 0/64 are hard, 4/64 is not; a prompt hard at an early step but not
    at its last is not; ``--since-step`` pools the steps from there on; synthetic prompts come back from config.json."""
    problems = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "answer": str(i)} for i in range(6)])
    src = str(problems.resolve())

    def line(step, index, passes, n=64, source=src):
        return {"step": step, "stage": "train", "row": index, "source": source, "index": index,
                "scores": [1] * passes + [0] * (n - passes), "response_tokens": [5] * n,
                "finish_reasons": ["stop"] * n}  # fmt: skip

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    synthetic = synthetic_problems("comparison", 50, difficulty=1, seed=7)
    (run_dir / "config.json").write_text(
        json.dumps({"data": {"synthetic": "comparison", "synthetic_size": 50, "difficulty": 1}, "train": {"seed": 7}})
    )
    records = [
        line(1, 0, 3),
        line(1, 1, 4),
        line(1, 2, 0),
        line(1, 3, 1),  # hard at step 1 ...
        line(2, 3, 10),  # ... not at its last step
        line(2, 4, 2, n=32),  # 2/32 = 4/64: not hard
        line(2, 5, 1, n=32),  # 1/32 = 2/64: hard
        line(2, 17, 0, n=8, source="synthetic:comparison"),
    ]
    rollouts_path = write_jsonl(run_dir / "rollouts.jsonl", records)
    with open(rollouts_path, "a") as f:
        f.write('{"step": 3, "sta')  # a torn last line from a killed run
    out = tmp_path / "hard.jsonl"
    assert mine_hard.main(["--run", str(run_dir), "--max-pass", "3/64", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["source"], r["index"], r["passes"], r["samples"]) for r in rows] == [
        (src, 0, 3, 64),
        (src, 2, 0, 64),
        (src, 5, 1, 32),
        ("synthetic:comparison", 17, 0, 8),
    ]
    assert rows[0]["prompt"] == "q0" and rows[0]["answer"] == "0"
    assert (rows[3]["prompt"], rows[3]["answer"]) == (synthetic[17].prompt, synthetic[17].answer)
    loaded, _ = load_file(out)  # the loaders read what mining writes
    assert [p.prompt for p in loaded] == ["q0", "q2", "q5", synthetic[17].prompt]

    pooled, seen = mine_hard.mine(run=run_dir, max_pass=Fraction(3, 64), since_step=1)
    assert seen == 7 and [r.index for r in pooled] == [0, 2, 5, 17]  # prompt 3: 11 of 128
    later, seen = mine_hard.mine(run=run_dir, max_pass=Fraction(3, 64), since_step=2)
    assert seen == 4 and [r.index for r in later] == [5, 17]

    problems.write_text('{"prompt": "q0", "answer": "0"}\n')  # the file changed since training
    with pytest.raises(DataError, match="no row 2, which the run trained on"):
        mine_hard.mine(run=run_dir, max_pass=Fraction(3, 64))


def test_mining_an_evaluation(tmp_path):
    lines = [
        {"index": 4, "problem": "p4", "answer": "a", "scores": [1.0, 0.0, 0.0, 0.0]},
        {"index": 9, "problem": "p9", "answer": "b", "scores": [1.0, 1.0, 0.0, 0.0]},
    ]
    evals = write_jsonl(tmp_path / "math500.jsonl", lines)
    out = tmp_path / "hard.jsonl"
    assert mine_hard.main(["--eval", str(evals), "--max-pass", "1/4", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["prompt"], r["answer"], r["index"], r["passes"]) for r in rows] == [("p4", "a", 4, 1)]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-pass", "3/0"], "--max-pass '3/0': expected K/N"),
        (["--max-pass", "5/4"], "must be between 0 and 1"),
        ([], "give --run DIR or --eval FILE"),
        (["--run", "{tmp}/nowhere"], "nowhere/rollouts.jsonl: no such file"),
    ],
)
def test_mining_bad_arguments(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert mine_hard.main([*argv, "--out", str(tmp_path / "o.jsonl")]) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def anneal_run(tmp_path_factory):
    """2 training steps, then 3 annealing steps over 7 prompts, checkpoints at step 4 and after the last."""
    tmp = tmp_path_factory.mktemp("anneal")
    data = write_jsonl(tmp / "hard.jsonl", [{"prompt": p, "answer": a} for p, a in ANNEAL_PROBLEMS])
    sets = [
        "train.steps=2",
        "optim.anneal.enabled=true",
        "optim.anneal.steps=3",
        f'optim.anneal.data=["{data}"]',
        "optim.anneal.final_policy_lr=1e-4",
        "optim.warmup_steps=2",
        "ckpt.every=4",
    ]
    run(train_cmd(tmp / "run", *sets))
    return tmp, data, sets


def test_the_stage_samples_only_the_anneal_data_with_the_decaying_lr(anneal_run):
    tmp, data, _ = anneal_run
    lines = rollouts(tmp / "run" / "rollouts.jsonl")
    assert [x["step"] for x in lines] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    train, stage = lines[:4], lines[4:]
    assert {x["stage"] for x in train} == {"train"} and {x["source"] for x in train} == {"synthetic:addition"}
    assert {x["stage"] for x in stage} == {"anneal"} and {x["source"] for x in stage} == {str(data.resolve())}
    assert all(x["index"] == x["row"] for x in stage)  # the file's rows are the stage's prompt set
    assert len({x["index"] for x in stage[:6]}) == 6  # one epoch's order: no prompt twice before all are drawn
    cfg = resolve("tiny")
    lrs = [r["policy_lr"] for r in read_metrics(tmp / "run" / "metrics.jsonl")]
    want = [lr_at(s, cfg.optim.policy_lr, 2, (2, 3, 1e-4)) for s in range(5)]
    assert lrs == pytest.approx(want) and lrs[-1] == pytest.approx(1e-4) and lrs[1] == cfg.optim.policy_lr
    assert lrs[2] > lrs[3] > lrs[4]


def test_resume_inside_the_stage_continues_the_anneal_order(anneal_run):
    """Resuming from step 4 (inside the stage) draws step 5's prompts at the anneal sampler's saved position."""
    tmp, _, sets = anneal_run
    resumed = tmp / "resumed"
    shutil.copytree(tmp / "run", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000005")
    shutil.rmtree(resumed / "policy_hf")
    run([*train_cmd(resumed, *sets), "--resume"])
    want, got = rollouts(tmp / "run" / "rollouts.jsonl"), rollouts(resumed / "rollouts.jsonl")
    assert got == want
    assert {x["row"] for x in got if x["step"] == 5}.isdisjoint({x["row"] for x in got if x["step"] == 3})
    ref = deterministic(read_metrics(tmp / "run" / "metrics.jsonl"))
    assert deterministic(read_metrics(resumed / "metrics.jsonl")) == ref


@pytest.mark.parametrize("case", ["missing", "empty", "malformed"])
def test_a_bad_anneal_file_is_refused_before_training(tmp_path, case):
    path = tmp_path / "hard.jsonl"
    if case == "empty":
        path.write_text("")
    if case == "malformed":
        path.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n')
    cfg = resolve(
        "tiny", overrides=["logging.progress=false", "optim.anneal.enabled=true", f'optim.anneal.data=["{path}"]']
    )
    message = {
        "missing": f"optim.anneal.data: {path}: no such file",
        "empty": f"optim.anneal.data: {path}: no problems (0 rows)",
        "malformed": f"optim.anneal.data: {path}: row 1: no answer column",
    }[case]
    with pytest.raises(DataError) as err:
        Trainer(cfg, tmp_path / "run")
    assert str(err.value).startswith(message)
    assert not (tmp_path / "run").exists()  # nothing was written: no model built, no step run


def test_the_cli_names_the_bad_anneal_row(tmp_path):
    path = tmp_path / "hard.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\nnot json\n')
    sets = ["optim.anneal.enabled=true", f'optim.anneal.data=["{path}"]']
    out = subprocess.run(train_cmd(tmp_path / "run", *sets), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert f"optim.anneal.data: {path}: row 1: not valid JSON" in out.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
