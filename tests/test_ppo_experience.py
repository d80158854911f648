"""The step's experience as flat tensors: building it from engine outputs, packing micro-batches against a
per-sample reference, checking samples, and re-splitting them over two data-parallel ranks."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
from two_process import run_two

from orz_fast import packing
from orz_fast.ppo.balance import BadSampleError, balance, check_samples
from orz_fast.ppo.experience import SampleTable, from_completions, gather_actions, step_prompts
from orz_fast.rollout import Completion

SAMPLES = 3


def prompt_tokens(slot):
    return [(7 * slot + j) % 50 for j in range(2 + slot % 4)]


def response(slot, sample, long=()):
    """A deterministic response: its length, tokens and log-probs depend only on (slot, sample)."""
    n = 25 if (slot, sample) in long else 1 + (5 * slot + 3 * sample) % 6
    tokens = [(100 + 11 * slot + 3 * sample + j) % 997 for j in range(n)]
    return tokens, [-0.01 * (t % 13) for t in tokens], (slot * 7 + sample) % 2


def generate(slots, kind=list, long=(), nan=()):
    """What a rollout rank holds for its prompt slots: engine completions (token ids as ``kind``) and scores."""
    outputs, scores = [], []
    for g in slots:
        group = []
        for j in range(SAMPLES):
            tokens, logprobs, correct = response(g, j, long)
            group.append(
                Completion(
                    token_ids=kind(tokens),
                    logprobs=kind(logprobs),
                    finish_reason="length" if j == 2 else "stop",
                )
            )
            scores.append(float("nan") if (g, j) in nan else float(correct))
        outputs.append(group)
    return outputs, scores


def build(slots, num_slots, **kwargs):
    tokens, offsets = step_prompts([prompt_tokens(g) for g in range(num_slots)], torch.device("cpu"))
    outputs, scores = generate(slots, **kwargs.pop("gen", {}))
    return from_completions(outputs, slots, tokens, offsets, scores, prompt_rows=[1000 + g for g in range(num_slots)])


@pytest.mark.parametrize("kind", [list, np.array, torch.tensor], ids=["lists", "arrays", "tensors"])
def test_from_completions_packs_every_response(kind):
    exp = build([0, 2, 3], 4, gen={"kind": kind})
    assert exp.table.slot.tolist() == [0, 0, 0, 2, 2, 2, 3, 3, 3]
    assert exp.table.sample.tolist() == [0, 1, 2] * 3
    assert exp.table.truncated.tolist() == [False, False, True] * 3
    assert exp.tokens.dtype == torch.int32 and exp.logprobs.dtype == torch.float32
    for i, (g, j) in enumerate(zip(exp.table.slot, exp.table.sample, strict=True)):
        tokens, logprobs, correct = response(int(g), int(j))
        assert exp.prompt(i).tolist() == prompt_tokens(int(g))
        assert exp.response(i).tolist() == tokens
        torch.testing.assert_close(
            exp.logprobs[exp.response_offsets[i] : exp.response_offsets[i + 1]], torch.tensor(logprobs)
        )
        assert exp.table.score[i] == correct and exp.table.prompt_len[i] == len(prompt_tokens(int(g)))
    assert exp.num_actions == sum(
        len(response(int(g), int(j))[0]) for g, j in zip(exp.table.slot, exp.table.sample, strict=True)
    )


def test_micro_batches_match_a_per_sample_reference():
    exp = build([0, 1, 2, 3, 4, 5], 6)
    extra = torch.arange(exp.num_actions, dtype=torch.float32) * 0.5
    mbs = exp.micro_batches(np.arange(len(exp.table))[::-1], 16, {"extra": extra})
    assert len(mbs) == len(mbs.bins) and mbs.max_tokens <= 16
    seen = []
    for b, bin_ in zip(mbs, mbs.bins, strict=True):
        assert b["samples"].tolist() == bin_.tolist()
        ids, actions, targets, extras, cu = [], [], [], [], [0]
        for i in bin_:
            p, r = exp.prompt(i).tolist(), exp.response(i).tolist()
            actions += [len(ids) + len(p) - 1 + j for j in range(len(r))]
            ids += p + r[:-1]
            cu.append(len(ids))
            targets += r
            extras += extra[exp.response_offsets[i] : exp.response_offsets[i + 1]].tolist()
        assert b["input_ids"].tolist() == ids and len(ids) <= 16
        assert b["cu_seqlens"].tolist() == cu and b["cu_seqlens"].dtype == torch.int32
        positions = torch.arange(len(ids), dtype=torch.float32)[:, None].expand(-1, 3)  # a stand-in for hidden [T, H]
        assert gather_actions(positions, b)[:, 0].tolist() == actions
        assert b["targets"].tolist() == targets and b["targets"].dtype == torch.int64
        assert b["extra"].tolist() == extras and bool(b["mask"].all()) and b["mask"].numel() == len(targets)
        seen += bin_.tolist()
    assert sorted(seen) == list(range(len(exp.table)))
    assert "targets" not in next(iter(exp.micro_batches(np.arange(3), 16, {}, targets=False)))


def test_actions_of_samples_in_any_order():
    exp = build([1, 3], 4)
    rows = np.array([4, 0, 2])
    want = torch.cat([exp.logprobs[exp.response_offsets[i] : exp.response_offsets[i + 1]] for i in rows])
    torch.testing.assert_close(exp.actions_of(exp.logprobs, rows), want)
    assert [v.tolist() for v in exp.per_sample(exp.response_ids)] == [exp.response(i).tolist() for i in range(6)]


def test_sample_table_round_trips_through_one_tensor():
    exp = build([0, 1], 2, gen={"nan": {(1, 2)}})
    back = SampleTable.from_tensor(exp.table.to_tensor())
    for name in ("slot", "sample", "prompt_len", "response_len", "truncated"):
        assert getattr(back, name).tolist() == getattr(exp.table, name).tolist()
    assert np.isnan(back.score[5]) and back.score[:5].tolist() == exp.table.score[:5].tolist()
    summary = exp.table.summary()
    assert summary["truncated_fraction"] == pytest.approx(1 / 3) and summary["response_length_max"] >= 1


def check(table, budget=64):
    check_samples(table, max_tokens=20, micro_batch_tokens=budget, dataset_rows=[1000 + g for g in range(8)])


def test_bad_samples_are_named_with_their_value():
    check(build(range(4), 4).table)
    with pytest.raises(BadSampleError, match=r"sample 1 of prompt 2 \(training-set row 1002\) has score nan"):
        check(build(range(4), 4, gen={"nan": {(3, 0), (2, 1)}}).table)
    with pytest.raises(
        BadSampleError,
        match=r"sample 0 of prompt 3 \(training-set row 1003\) has 25 response tokens, more than rollout.max_tokens=20",
    ):
        check(build(range(4), 4, gen={"long": {(3, 0)}}).table)
    budget = r"needs 8 input tokens \(prompt 3 \+ response 6 - 1\), more than ppo.micro_batch_tokens=7"
    with pytest.raises(BadSampleError, match=r"sample 0 of prompt 1 \(training-set row 1001\) " + budget):
        check(build(range(4), 4).table, budget=7)
    empty = build([0], 1)
    empty.table.response_len[1] = 0
    with pytest.raises(BadSampleError, match=r"sample 1 of prompt 0 \(training-set row 1000\) has an empty response"):
        check(empty.table)


NUM_SLOTS = 7


def _balance(rank, gen):
    """Rank r generated slots r, r + 2, ...; returns what it trains on after balancing."""
    local = build(list(range(rank, NUM_SLOTS, 2)), NUM_SLOTS, gen=gen)
    exp, step = balance(local, group=dist.group.WORLD, dest_dp=[0, 1], dp_size=2, dp_rank=rank, check=check)
    samples = [
        (
            int(g),
            int(j),
            exp.response(i).tolist(),
            exp.logprobs[exp.response_offsets[i] : exp.response_offsets[i + 1]].tolist(),
        )
        for i, (g, j) in enumerate(zip(exp.table.slot, exp.table.sample, strict=True))
    ]
    return {
        "samples": samples,
        "step_slots": step.slot.tolist(),
        "prompts": exp.tokens[: exp.num_prompt_tokens].tolist(),
    }


def test_balance_moves_each_sample_to_the_rank_that_trains_on_it():
    results = run_two(_balance, {})
    assert [s for s, _ in results] == ["ok", "ok"], results
    (_, r0), (_, r1) = results
    # Every rank got the whole step's table and the same prompts; the split is packing.balance's, in canonical order.
    assert sorted(r0["step_slots"]) == sorted(g for g in range(NUM_SLOTS) for _ in range(SAMPLES))
    assert r0["step_slots"] == r1["step_slots"] and r0["prompts"] == r1["prompts"]
    canonical = [(g, j) for g in range(NUM_SLOTS) for j in range(SAMPLES)]
    inputs = [len(prompt_tokens(g)) + len(response(g, j)[0]) - 1 for g, j in canonical]
    groups = packing.balance(inputs, 2, equal_size=True)
    for rank, r in enumerate((r0, r1)):
        assert sorted((g, j) for g, j, *_ in r["samples"]) == sorted(canonical[k] for k in groups[rank])
        for g, j, tokens, logprobs in r["samples"]:
            want_tokens, want_logprobs, _ = response(g, j)
            assert tokens == want_tokens
            assert logprobs == pytest.approx(want_logprobs)


def test_a_bad_sample_on_one_rank_stops_both_before_the_tokens_move():
    results = run_two(_balance, {"nan": {(5, 1)}}, timeout=120)
    assert [s for s, _ in results] == ["error", "error"], results
    for _, message in results:
        assert message.startswith("BadSampleError: sample 1 of prompt 5 (training-set row 1005) has score nan")
