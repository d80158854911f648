"""What a run records of its rollouts: rollouts.jsonl, samples.jsonl, the collapse signals (one and two ranks),
the resume cut, and a record at ORZ's step size."""

import json

import numpy as np
from two_process import run_two

from orz_fast.data import EncodedPrompt, Problem
from orz_fast.ppo.experience import SampleTable
from orz_fast.ppo.records import RolloutLog, answer_stats, format_sample


def table(slots, samples, scores, lengths, truncated):
    n = len(slots)
    return SampleTable(
        slot=np.asarray(slots, dtype=np.int64),
        sample=np.asarray(samples, dtype=np.int64),
        prompt_len=np.full(n, 4, dtype=np.int64),
        response_len=np.asarray(lengths, dtype=np.int64),
        score=np.asarray(scores, dtype=np.float64),
        truncated=np.asarray(truncated, dtype=bool),
    )


def prompts(k, source="data/train.jsonl"):
    return [EncodedPrompt(Problem(f"q{i}", str(i), source=source, index=100 + i), f"q{i}", [1, 2]) for i in range(k)]


def test_rollouts_jsonl_has_one_line_per_prompt_in_sample_order(tmp_path):
    log = RolloutLog(tmp_path)
    # Rank-major order as balance returns it: slot 1's samples come first, and out of order.
    t = table([1, 1, 0, 0], [1, 0, 0, 1], [1.0, 0.0, 0.5, 1.0], [3, 8, 2, 5], [False, True, False, False])
    log.record_step(7, "train", t, prompts(5), rows=[4, 2])
    lines = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert lines == [
        {
            "step": 7,
            "stage": "train",
            "row": 4,
            "source": str((tmp_path.cwd() / "data/train.jsonl").resolve()),
            "index": 104,
            "scores": [0.5, 1],
            "response_tokens": [2, 5],
            "finish_reasons": ["stop", "stop"],
        },
        {
            "step": 7,
            "stage": "train",
            "row": 2,
            "source": str((tmp_path.cwd() / "data/train.jsonl").resolve()),
            "index": 102,
            "scores": [0, 1],
            "response_tokens": [8, 3],
            "finish_reasons": ["length", "stop"],
        },
    ]
    synthetic = prompts(1, source="synthetic:comparison")
    log.record_step(8, "anneal", table([0], [0], [0.0], [1], [False]), synthetic, rows=[0])
    assert json.loads((tmp_path / "rollouts.jsonl").read_text().splitlines()[-1])["source"] == "synthetic:comparison"


def test_resume_cuts_both_files_back_to_the_checkpoint(tmp_path):
    log = RolloutLog(tmp_path)
    for step in (1, 2, 3):
        log.record_step(step, "train", table([0], [0], [1.0], [2], [False]), prompts(1), rows=[0])
        log.record_samples(step, "train", [{"response": "r"}], [("7", 1)])
    with open(tmp_path / "rollouts.jsonl", "a") as f:
        f.write('{"step": 4, "sta')  # torn by a crash
    RolloutLog(tmp_path, resume_step=2)
    for name in ("rollouts.jsonl", "samples.jsonl"):
        assert [json.loads(line)["step"] for line in (tmp_path / name).read_text().splitlines()] == [1, 2], name
    RolloutLog(tmp_path)  # a fresh run starts both over
    assert (tmp_path / "rollouts.jsonl").read_text() == (tmp_path / "samples.jsonl").read_text() == ""
    RolloutLog(tmp_path / "other", enabled=False)
    assert not (tmp_path / "other").exists()


def test_answer_stats_on_one_rank():
    groups = [["<answer>yes</answer>"] * 3, ["a <answer>no</answer>", "b", "<answer>yes</answer>"]]
    answers = ["yes", "yes", "yes", "no", None, "yes"]
    metrics, top = answer_stats(groups, answers, None)
    assert metrics == {
        "rollout/answered": 5 / 6,
        "rollout/top_answer_share": 4 / 6,
        "rollout/identical_groups": 0.5,
    }
    assert top == [("yes", 4), ("no", 1)]
    # Token ids when the engine decodes nothing; one sample per prompt has no identical-group signal.
    metrics, top = answer_stats([[[1, 2]], [[3]]], [None, None], None)
    assert metrics == {"rollout/answered": 0.0, "rollout/top_answer_share": 0.0} and top == []
    metrics, _ = answer_stats([[np.array([1, 2]), np.array([1, 2])]], [None, None], None)
    assert metrics["rollout/identical_groups"] == 1.0


def _two_rank_stats(rank):
    import torch.distributed as dist

    if rank == 0:
        groups, answers = [["x", "x"]], ["42", "42"]
    else:  # a long answer is compared on its first MAX_ANSWER_BYTES bytes
        groups, answers = [["y", "z"], ["w", "w"]], ["é" * 200, "42", None, None]
    return answer_stats(groups, answers, dist.group.WORLD)


def test_answer_stats_over_two_ranks_count_the_whole_step():
    results = run_two(_two_rank_stats)
    assert [status for status, _ in results] == ["ok", "ok"], results
    (m0, top0), (m1, top1) = (value for _, value in results)
    assert m0 == m1 and top0 == top1
    assert m0 == {"rollout/answered": 4 / 6, "rollout/top_answer_share": 3 / 6, "rollout/identical_groups": 2 / 3}
    assert top0[0] == ("42", 3) and top0[1] == ("é" * 128, 1)


def test_format_sample_shows_the_tail_and_the_top_answers():
    sample = {"row": 3, "ground_truth": "yes", "answer": "no", "score": 0.0, "response": "x " * 200 + "<answer>no"}
    text = format_sample(5, sample, [("no", 6), ("yes", 2)], width=40)
    first, second = text.splitlines()
    assert first.startswith("step 5 sample (row 3, truth 'yes', answer 'no', score 0): ...") and "<answer>no" in first
    assert second == "  most common answers: 'no' x6, 'yes' x2"


def test_a_step_record_at_orz_size(tmp_path):
    """128 prompts x 64 samples in rank-major order: 128 lines holding all 8,192 samples, in sample order."""
    rng = np.random.default_rng(0)
    n, slots, samples = 8192, np.repeat(np.arange(128), 64), np.tile(np.arange(64), 128)
    perm = rng.permutation(n)
    lengths = rng.integers(1, 8000, n)
    t = table(slots[perm], samples[perm], rng.random(n) < 0.3, lengths[perm], rng.random(n) < 0.05)
    RolloutLog(tmp_path).record_step(1, "train", t, prompts(1000), rng.permutation(1000)[:128].tolist())
    lines = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert len(lines) == 128 and all(len(line["scores"]) == 64 for line in lines)
    assert [x for line in lines for x in line["response_tokens"]] == lengths.tolist()
