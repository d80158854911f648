"""ORZ advantages (terminal reward, GAE with lambda = gamma = 1, batch whitening over every data-parallel rank)
and GRPO's group normalisation over the whole step: the one implementation the trainer uses."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
from two_process import run_two

from orz_fast.config import PPOConfig
from orz_fast.ppo.advantages import compute_advantages, gae_advantages, grpo_advantages, terminal_rewards, whiten
from orz_fast.ppo.experience import Experience, SampleTable


def packed(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])


def test_terminal_rewards_on_last_tokens():
    cu = packed([3, 1, 2])
    r = terminal_rewards(torch.tensor([1.0, 0.0, 1.0]), cu)
    assert r.tolist() == [0, 0, 1, 0, 0, 1]
    assert terminal_rewards(torch.tensor([1.0, 0.0, 1.0]), cu, 6).tolist() == r.tolist()
    with pytest.raises(ValueError, match="at least one token"):
        terminal_rewards(torch.tensor([1.0, 1.0]), packed([2, 0]))
    with pytest.raises(ValueError, match=r"scores must be \[N\] and cu_seqlens \[N\+1\]"):
        terminal_rewards(torch.tensor([1.0]), packed([2, 2]))


def test_orz_gae_is_score_minus_value_then_whitened():
    torch.manual_seed(0)
    lengths = [5, 1, 7, 3]
    cu = packed(lengths)
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0])
    values = torch.randn(sum(lengths))
    adv, ret = gae_advantages(scores, values, cu, normalize=False)
    # gamma = lambda = 1: the return of every token is its response's score.
    expected_ret = torch.repeat_interleave(scores, torch.tensor(lengths))
    torch.testing.assert_close(ret, expected_ret)
    torch.testing.assert_close(adv, expected_ret - values)
    white, ret2 = gae_advantages(scores, values, cu)
    a = (expected_ret - values).double()
    torch.testing.assert_close(white, ((a - a.mean()) / (a.std(unbiased=False) + 1e-8)).float())
    torch.testing.assert_close(ret2, expected_ret)
    assert abs(float(white.mean())) < 1e-6 and abs(float(white.std(unbiased=False)) - 1) < 1e-5


def test_gae_discounted_matches_recurrence():
    torch.manual_seed(1)
    lengths = [4, 2]
    cu = packed(lengths)
    scores = torch.tensor([1.0, 1.0])
    values = torch.randn(6)
    gamma, lam = 0.9, 0.8
    adv, _ = gae_advantages(scores, values, cu, gamma=gamma, lam=lam, normalize=False)
    rewards = terminal_rewards(scores, cu)
    ref = torch.zeros(6)
    for s, e in [(0, 4), (4, 6)]:
        last = 0.0
        for t in reversed(range(s, e)):
            nv = values[t + 1] if t + 1 < e else 0.0
            last = rewards[t] + gamma * nv - values[t] + gamma * lam * last
            ref[t] = last
    torch.testing.assert_close(adv, ref)


def test_grpo_group_normalisation():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # two prompts x 4 samples
    slots = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    lengths = [2, 1, 3, 1, 1, 2, 1, 1]
    adv = grpo_advantages(scores, slots, packed(lengths))
    g0 = (scores[:4] - scores[:4].mean()) / (scores[:4].std(unbiased=False) + 1e-6)
    expected = torch.repeat_interleave(torch.cat([g0, torch.zeros(4)]), torch.tensor(lengths))
    torch.testing.assert_close(adv, expected)
    with pytest.raises(ValueError, match="disagree"):
        grpo_advantages(scores, slots[:5], packed(lengths))


def test_grpo_over_the_step_when_a_rank_holds_part_of_each_group():
    """Balancing may split a prompt's samples over ranks: the group statistics are the whole step's."""
    gen = torch.Generator().manual_seed(3)
    scores = (torch.rand(12, generator=gen) < 0.5).float()
    slots = np.repeat(np.arange(3), 4)
    lengths = torch.randint(1, 5, (12,), generator=gen).tolist()
    whole = grpo_advantages(scores, slots, packed(lengths))
    part = np.array([0, 3, 5, 6, 11])
    got = grpo_advantages(
        scores[part],
        slots[part],
        packed([lengths[i] for i in part]),
        step_scores=scores.double().numpy(),
        step_slots=slots,
    )
    cu = packed(lengths)
    torch.testing.assert_close(got, torch.cat([whole[cu[i] : cu[i + 1]] for i in part]))


def _whiten_half(rank, values):
    mine = torch.tensor(values[rank])
    return whiten(mine, dist.group.WORLD).tolist()


def test_whitening_spans_every_data_parallel_rank():
    gen = torch.Generator().manual_seed(5)
    halves = [(torch.randn(7, generator=gen) * 3 + 1).tolist(), (torch.randn(4, generator=gen) - 2).tolist()]
    results = run_two(_whiten_half, halves)
    whole = whiten(torch.tensor(halves[0] + halves[1]))
    assert [s for s, _ in results] == ["ok", "ok"], results
    got = torch.tensor(results[0][1] + results[1][1])
    torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-6)


def experience(lengths, scores, slots):
    n = len(lengths)
    table = SampleTable(
        slot=np.asarray(slots),
        sample=np.arange(n),
        prompt_len=np.full(n, 2),
        response_len=np.asarray(lengths),
        score=np.asarray(scores, dtype=np.float64),
        truncated=np.zeros(n, dtype=bool),
    )
    prompts = torch.zeros(2 * (max(slots) + 1), dtype=torch.int32)
    tokens = torch.cat([prompts, torch.arange(sum(lengths), dtype=torch.int32)])
    return Experience(table, tokens, np.arange(0, 2 * (max(slots) + 2), 2), torch.zeros(sum(lengths))), table


def test_compute_advantages_sets_the_experience():
    exp, table = experience([3, 2, 4], [1.0, 0.0, 1.0], [0, 0, 1])
    exp.values = torch.linspace(-1, 1, 9)
    compute_advantages(exp, table, PPOConfig(), None)
    adv, ret = gae_advantages(exp.scores(), exp.values, exp.cu_seqlens())
    torch.testing.assert_close(exp.advantages, adv)
    torch.testing.assert_close(exp.returns, ret)

    exp, table = experience([3, 2, 4], [1.0, 0.0, 1.0], [0, 0, 1])
    with pytest.raises(ValueError, match="GAE needs the critic's values"):
        compute_advantages(exp, table, PPOConfig(), None)
    compute_advantages(exp, table, PPOConfig(advantage="grpo"), None)
    torch.testing.assert_close(exp.advantages, grpo_advantages(exp.scores(), table.slot, exp.cu_seqlens()))
    assert exp.returns is None


def test_gae_on_cpu_runs_in_whole_response_pieces(monkeypatch):
    from orz_fast.ppo import advantages

    gen = torch.Generator().manual_seed(7)
    lengths = torch.randint(1, 9, (40,), generator=gen).tolist()
    cu = packed(lengths)
    scores = (torch.rand(40, generator=gen) < 0.5).float()
    values = torch.randn(sum(lengths), generator=gen)
    for gamma, lam in ((1.0, 1.0), (0.9, 0.8)):
        want = gae_advantages(scores, values, cu, gamma=gamma, lam=lam, normalize=False)
        monkeypatch.setattr(advantages, "CPU_GAE_TOKENS", 10)  # pieces of a few responses, one longer than 10
        got = gae_advantages(scores, values, cu, gamma=gamma, lam=lam, normalize=False)
        monkeypatch.undo()
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
