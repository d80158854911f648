"""Prompt sharing in the training passes: the samples of one prompt feed it once (``SharedPrompts``), and every
response token's attention output, hidden state, value and gradient equals the one it has after its own copy of
the prompt (``PackedSegments``) — at the attention, the model and the micro-batch level."""

import numpy as np
import pytest
import torch
from test_models_lm_head import ODD_QWEN2  # GQA (4 query, 2 K/V heads), H 64

from orz_fast import parallel
from orz_fast.models import build_model
from orz_fast.models.attention import PackedSegments, SharedPrompts
from orz_fast.ppo.experience import from_completions, gather_actions, step_prompts
from orz_fast.rollout import Completion


@pytest.fixture(scope="module", autouse=True)
def single_process():
    parallel.initialize(1, 1)


def separate_layout(prompt_lens, response_lens):
    """Rows of the shared stream that each row of the one-segment-per-response stream copies, that stream's
    ``cu_seqlens``, and per shared row the separate row standing for it (a prompt row: its first copy)."""
    rows, cu, stands_for, start = [], [0], {}, 0
    for p, lens in zip(prompt_lens, response_lens, strict=True):
        prompt = list(range(start, start + p))
        r0 = start + p
        for n, length in enumerate(lens):
            if n == 0:
                stands_for.update({row: len(rows) + j for j, row in enumerate(prompt)})
            own = list(range(r0, r0 + length))
            stands_for.update({row: len(rows) + p + j for j, row in enumerate(own)})
            rows += prompt + own
            cu.append(len(rows))
            r0 += length
        start = r0
    return torch.tensor(rows), torch.tensor(cu), torch.tensor([stands_for[i] for i in range(start)])


@pytest.mark.parametrize(
    "prompt_lens, response_lens",
    [
        ([5, 3], [[4, 4, 3, 0], [2]]),  # similar lengths: one padded call per group (an empty response too)
        ([6, 2], [[1, 30, 2], [9, 1]]),  # very unequal: one call per response
    ],
    ids=["padded", "per-response"],
)
def test_attention_equals_one_segment_per_response(prompt_lens, response_lens):
    g = torch.Generator().manual_seed(0)
    flat = [x for lens in response_lens for x in lens]
    group = np.repeat(np.arange(len(prompt_lens)), [len(lens) for lens in response_lens])
    ctx = SharedPrompts.from_lengths(np.array(prompt_lens), np.array(flat), group, "cpu")
    t = sum(prompt_lens) + sum(flat)
    assert ctx.num_rows == t
    q0 = torch.randn(t, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k0 = torch.randn(t, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v0 = torch.randn(t, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    rows, cu, stands_for = separate_layout(prompt_lens, response_lens)
    segs = PackedSegments.from_cu_seqlens(cu, rows.numel())
    # positions continue the prompt's in every response
    torch.testing.assert_close(ctx.positions(t), segs.positions(rows.numel())[stands_for])

    shared = ctx.attend(0, q0, k0, v0)
    separate = segs.attend(0, q0[rows], k0[rows], v0[rows])
    torch.testing.assert_close(shared, separate[stands_for], rtol=0, atol=1e-12)

    cot = torch.randn(shared.shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad(separate, (q0, k0, v0), torch.zeros_like(separate).index_copy(0, stands_for, cot))
    got = torch.autograd.grad(shared, (q0, k0, v0), cot)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_bad_layouts_are_named():
    with pytest.raises(ValueError, match="group must be non-decreasing"):
        SharedPrompts.from_lengths(np.array([2, 2]), np.array([1, 1]), np.array([1, 0]), "cpu")
    with pytest.raises(ValueError, match=r"prompts of \[0\] tokens"):
        SharedPrompts.from_lengths(np.array([0]), np.array([1]), np.array([0]), "cpu")
    ctx = SharedPrompts.from_lengths(np.array([2]), np.array([3]), np.array([0]), "cpu")
    with pytest.raises(ValueError, match="has 5 tokens, got 6"):
        ctx.positions(6)


def experience(samples_per_prompt=(4, 1, 3), seed=0):
    """Prompts of 3..7 tokens, each with its samples of 1..9 tokens."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 97, size=int(rng.integers(3, 8))).tolist() for _ in samples_per_prompt]
    tokens, offsets = step_prompts(prompts, torch.device("cpu"))
    completions, scores = [], []
    for n in samples_per_prompt:
        group = []
        for _ in range(n):
            ids = rng.integers(0, 97, size=int(rng.integers(1, 10)))
            group.append(Completion(token_ids=ids, logprobs=np.zeros(len(ids), np.float32), finish_reason="stop"))
            scores.append(float(rng.integers(0, 2)))
        completions.append(group)
    return from_completions(completions, range(len(samples_per_prompt)), tokens, offsets, scores)


def test_micro_batches_feed_each_prompt_once_and_point_at_the_predicting_rows():
    exp = experience((5, 2, 3, 1))
    order = np.random.default_rng(1).permutation(len(exp.table))
    mbs = exp.micro_batches(order, 24, {"extra": torch.arange(exp.num_actions) * 1.0}, share_prompts=True)
    seen = []
    for b, tokens in zip(mbs, mbs.tokens, strict=True):
        ids = b["input_ids"]
        assert ids.numel() == tokens <= 24
        slots = exp.table.slot[b["samples"]].tolist()
        # each prompt slot's samples form one run
        runs = [s for k, s in enumerate(slots) if k == 0 or s != slots[k - 1]]
        assert len(runs) == len(set(runs))
        assert (
            sum(len(exp.prompt(int(i))) for i in b["samples"][np.r_[True, np.diff(slots) != 0]])
            + sum(len(exp.response(int(i))) - 1 for i in b["samples"])
            == ids.numel()
        )
        # the row predicting each action holds the token before it: the prompt's last, then the response's own
        picked = ids[gather_actions(torch.arange(ids.numel()), b)]
        want = torch.cat([torch.cat([exp.prompt(int(i))[-1:], exp.response(int(i))[:-1]]) for i in b["samples"]])
        assert picked.tolist() == want.tolist()
        assert b["targets"].tolist() == torch.cat([exp.response(int(i)) for i in b["samples"]]).tolist()
        assert b["extra"].tolist() == exp.actions_of(torch.arange(exp.num_actions) * 1.0, b["samples"]).tolist()
        seen += b["samples"].tolist()
    assert sorted(seen) == list(range(len(exp.table)))
    with pytest.raises(ValueError, match="more than max_tokens=4"):
        exp.micro_batches(np.arange(len(exp.table)), 4, {}, share_prompts=True)


@pytest.mark.parametrize("role", ["policy", "critic"])
def test_model_outputs_and_gradients_equal_the_unshared_passes(role):
    """Hidden states (policy) or values (critic) at every action, and every parameter's gradient of a loss on
    them, from shared micro-batches equal those of one segment per sample."""
    exp = experience((4, 1, 3), seed=2)
    model = build_model(ODD_QWEN2, role=role, seed=3, device="cpu", dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    weights = torch.randn(exp.num_actions, *(() if role == "critic" else (64,)), generator=g, dtype=torch.float64)

    def run(share):
        model.zero_grad(set_to_none=True)
        outs = []
        mbs = exp.micro_batches(np.arange(len(exp.table)), 128, {"w": weights}, share_prompts=share)
        for b in mbs:
            kwargs = {"attention": b["attention"]} if share else {"cu_seqlens": b["cu_seqlens"]}
            out = gather_actions(model(b["input_ids"], **kwargs), b)
            (out * b["w"]).sum().backward()
            outs.append((b["samples"], out.detach()))
        assert len(mbs) == 1 and ("attention" in next(iter(mbs))) == share
        return outs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (shared, shared_grads), (separate, separate_grads) = run(True), run(False)
    assert shared[0][0].tolist() != separate[0][0].tolist()  # grouped by prompt, not longest first
    by_sample = {
        int(i): v
        for rows, out in separate
        for i, v in zip(rows, out.split(exp.table.response_len[rows].tolist()), strict=True)
    }
    for rows, out in shared:
        for i, v in zip(rows, out.split(exp.table.response_len[rows].tolist()), strict=True):
            torch.testing.assert_close(v, by_sample[int(i)], rtol=0, atol=1e-10)
    assert shared_grads.keys() == separate_grads.keys() and len(separate_grads) > 10
    for name, grad in separate_grads.items():
        # float64 but for RMSNorm, which normalises in float32 as Hugging Face's does
        torch.testing.assert_close(shared_grads[name], grad, rtol=0, atol=1e-6 * float(grad.abs().max()), msg=name)
