"""ORZ advantages (terminal reward, GAE with lambda = gamma = 1, batch whitening) and GRPO's group normalisation."""

import pytest
import torch

from orz_fast.ppo.advantages import gae_advantages, grpo_advantages, terminal_rewards, whiten


def packed(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])


def test_terminal_rewards_on_last_tokens():
    cu = packed([3, 1, 2])
    r = terminal_rewards(torch.tensor([1.0, 0.0, 1.0]), cu)
    assert r.tolist() == [0, 0, 1, 0, 0, 1]
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
    torch.testing.assert_close(white, whiten(expected_ret - values))
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
    lengths = [2, 1, 3, 1, 1, 2, 1, 1]
    adv = grpo_advantages(scores, 4, packed(lengths))
    g0 = (scores[:4] - scores[:4].mean()) / (scores[:4].std(unbiased=False) + 1e-6)
    expected = torch.repeat_interleave(torch.cat([g0, torch.zeros(4)]), torch.tensor(lengths))
    torch.testing.assert_close(adv, expected)
    with pytest.raises(ValueError, match="do not split into groups of group_size=3"):
        grpo_advantages(scores, 3, packed(lengths))
