"""The native engine's scheduler and block allocator, without a model: prefix sharing across ``n``, the
partial-block copies, preemption and recompute, mixed prefill + decode steps, the token and seat budgets."""

import pytest

from orz_fast.rollout import SamplingParams
from orz_fast.rollout.kv_cache import BlockAllocator
from orz_fast.rollout.scheduler import Request, Scheduler
from orz_fast.rollout.stopping import StopChecker


def request(prompt_len: int, *, n: int = 1, max_tokens: int = 8) -> Request:
    return Request(
        prompt=list(range(1, prompt_len + 1)),
        params=SamplingParams(n=n, max_tokens=max_tokens),
        seed=0,
        max_len=prompt_len + max_tokens,
    )


STOP = StopChecker()  # no tokenizer: stop ids and lengths only, no text


def check_blocks(sched: Scheduler) -> None:
    """Every running sequence holds the blocks for all its tokens; reference counts match the holders."""
    holders: dict[int, int] = {}
    for seq in sched.running:
        assert len(seq.blocks) >= -(-(seq.length - 1) // sched.block_size)
        for b in seq.blocks:
            holders[b] = holders.get(b, 0) + 1
    for b, count in holders.items():
        assert sched.alloc.refs(b) == count
    assert sched.alloc.num_free == sched.alloc.num_blocks - len(holders)


def run(sched: Scheduler, token: int = 7) -> list:
    """Drive ``sched`` to the end with a fixed sampled token; returns its steps."""
    steps = []
    while not sched.done:
        step = sched.schedule()
        steps.append(step)
        rows = step.sequences
        sched.update(step, [token] * len(rows), STOP)
        check_blocks(sched)
    return steps


def test_prompt_is_prefilled_once_and_shared_across_n():
    req = request(37, n=4, max_tokens=5)  # 2 full blocks of 16 and a partial one
    sched = Scheduler([req], num_blocks=64, block_size=16, max_num_seqs=8, max_num_batched_tokens=512)
    first = sched.schedule()
    assert len(first.prefills) == 1 and not first.decodes
    (pf,) = first.prefills
    assert pf.token_ids == req.prompt and [s.sample for s in pf.seqs] == [0, 1, 2, 3]
    full = pf.seqs[0].blocks[:2]
    for s in pf.seqs:
        assert s.blocks[:2] == full  # shared full blocks
    assert all(sched.alloc.refs(b) == 4 for b in full)
    partials = [s.blocks[2] for s in pf.seqs]
    assert len(set(partials)) == 4
    assert pf.copies == [(partials[0], p) for p in partials[1:]]
    # two-ended allocation: the shared blocks are the lowest ids, the owned ones the highest
    assert full == [0, 1] and sorted(partials) == [60, 61, 62, 63]
    sched.update(first, [5] * 4, STOP)
    second = sched.schedule()
    assert not second.prefills and [s.sample for s in second.decodes] == [0, 1, 2, 3]
    run(sched)
    assert sched.alloc.num_free == 64


def test_mixed_prefill_and_decode_steps_within_the_token_budget():
    reqs = [request(20), request(30), request(25)]
    sched = Scheduler(reqs, num_blocks=64, block_size=8, max_num_seqs=8, max_num_batched_tokens=52)
    steps = run(sched)
    # step 1: prompts 0 and 1 (50 tokens); step 2: decodes of 0 and 1 plus prompt 2 (2 + 25 <= 52)
    assert [[pf.seqs[0].request for pf in s.prefills] for s in steps[:2]] == [[reqs[0], reqs[1]], [reqs[2]]]
    assert len(steps[1].decodes) == 2
    for s in steps:
        assert sum(len(pf.token_ids) for pf in s.prefills) + len(s.decodes) <= 52
    assert all(s.finish_reason == "length" and len(s.tokens) == 8 for r in reqs for s in r.finished)


def test_seats_split_a_request_across_steps():
    req = request(10, n=5, max_tokens=3)
    sched = Scheduler([req], num_blocks=64, block_size=4, max_num_seqs=2, max_num_batched_tokens=100)
    steps = run(sched)
    admitted = [s.sample for step in steps for pf in step.prefills for s in pf.seqs]
    assert admitted == [0, 1, 2, 3, 4]
    assert all(len(step.sequences) <= 2 for step in steps)
    # each part of the request is prefilled separately (it shares only within the part)
    assert sum(len(pf.token_ids) for step in steps for pf in step.prefills) == 3 * 10


def test_preemption_takes_the_youngest_and_recomputes_its_tokens():
    # 3 sequences of prompt 8 growing to 16 tokens with blocks of 4: each needs 4 blocks, 9 exist
    reqs = [request(8, max_tokens=8) for _ in range(3)]
    sched = Scheduler(reqs, num_blocks=9, block_size=4, max_num_seqs=8, max_num_batched_tokens=100)
    steps = []
    recomputed = []
    while not sched.done:
        step = sched.schedule()
        steps.append(step)
        for pf in step.prefills:
            seq = pf.seqs[0]
            if seq.tokens:  # a preempted sequence: prompt plus what it had generated
                recomputed.append((seq.order, list(pf.token_ids)))
                assert pf.token_ids == seq.request.prompt + seq.tokens
        sched.update(step, [3] * len(step.sequences), STOP)
        check_blocks(sched)
    assert sched.preemptions > 0
    assert recomputed and all(order == 2 for order, _ in recomputed)  # the youngest admitted
    assert all(s is not None and len(s.tokens) == 8 for r in reqs for s in r.finished)
    assert sched.alloc.num_free == 9


def test_stalled_scheduler_says_why():
    sched = Scheduler([request(20)], num_blocks=2, block_size=4, max_num_seqs=8, max_num_batched_tokens=100)
    with pytest.raises(RuntimeError, match="stalled with 1 waiting and 0 preempted requests and 2/2 free blocks"):
        sched.schedule()


def test_allocator_two_ends_and_reference_counts():
    alloc = BlockAllocator(6)
    got = [alloc.allocate(shared=True), alloc.allocate(), alloc.allocate(shared=True), alloc.allocate()]
    assert got == [0, 5, 1, 4]
    assert alloc.share(0) == 0 and alloc.refs(0) == 2
    alloc.release([0, 5])
    assert alloc.refs(0) == 1 and alloc.num_free == 3
    assert alloc.allocate() == 5  # freed high block comes back first from the high end
    alloc.release([0])
    assert alloc.allocate(shared=True) == 0
    with pytest.raises(RuntimeError, match="block 3 is not allocated"):
        alloc.share(3)
    alloc.release([1])
    with pytest.raises(RuntimeError, match="block 1 released more often"):
        alloc.release([1])
    while alloc.num_free:
        alloc.allocate()
    with pytest.raises(RuntimeError, match="out of blocks"):
        alloc.allocate()
