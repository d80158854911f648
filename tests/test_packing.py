"""C++ packing and balancing against the pure-Python references."""

import numpy as np
import pytest

from orz_fast import packing


def rl_lengths(n: int, seed: int, cap: int = 8000) -> np.ndarray:
    """Response lengths shaped like RL rollouts: log-normal body, a spike at the cap (truncated)."""
    rng = np.random.default_rng(seed)
    lens = np.clip(rng.lognormal(mean=6.5, sigma=0.9, size=n), 1, cap).astype(np.int64)
    lens[rng.random(n) < 0.05] = cap
    return lens


def check_bins(bins: list[list[int]], lens: np.ndarray, budget: int) -> None:
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lens))), "every sample in exactly one bin"
    assert all(len(b) > 0 for b in bins)
    assert all(lens[b].sum() <= budget for b in bins)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("budget", [8000, 16384])
def test_pack_matches_reference(seed, budget):
    lens = rl_lengths(300, seed)
    got = packing.pack_by_token_budget(lens, budget)
    ref = packing.pack_by_token_budget_ref(lens, budget)
    check_bins(got, lens, budget)
    assert got == ref


def test_pack_ties_and_zero_lengths():
    lens = np.array([5, 5, 0, 10, 5, 0, 10])
    got = packing.pack_by_token_budget(lens, 10)
    assert got == packing.pack_by_token_budget_ref(lens, 10)
    assert got == [[3, 2, 5], [6], [0, 1], [4]]  # empty samples fit a full bin


def test_pack_first_fit_decreasing_is_near_optimal():
    lens = rl_lengths(4000, 7)
    bins = packing.pack_by_token_budget(lens, 16384)
    lower_bound = int(np.ceil(lens.sum() / 16384))
    assert len(bins) <= lower_bound * 1.05 + 1


def test_pack_errors_name_the_sample():
    with pytest.raises(ValueError, match="sample 2 has 9 tokens, more than max_tokens=8"):
        packing.pack_by_token_budget([1, 2, 9], 8)
    with pytest.raises(ValueError, match="sample 1 has negative length -3"):
        packing.pack_by_token_budget([1, -3], 8)
    with pytest.raises(ValueError, match="max_tokens must be > 0"):
        packing.pack_by_token_budget([1], 0)
    with pytest.raises(ValueError, match="1-D"):
        packing.pack_by_token_budget([[1]], 8)
    assert packing.pack_by_token_budget([], 8) == []


def shared_bin_tokens(b, own, group, prompt):
    """A bin's tokens when each of its prompts counts once; its samples of one prompt must be consecutive."""
    runs = [group[i] for k, i in enumerate(b) if k == 0 or group[i] != group[b[k - 1]]]
    assert len(runs) == len(set(runs)), f"a prompt's samples are split within bin {b}"
    return int(own[b].sum()) + sum(int(prompt[b][[group[i] == g for i in b]][0]) for g in runs)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("budget, samples_per_prompt", [(16384, 64), (2048, 8), (600, 3)])
def test_pack_shared_prompts_matches_reference(seed, budget, samples_per_prompt):
    """ORZ-like steps (prompts of 16..2048 tokens, responses log-normal to 8000) and short demo-like ones: the C++
    packing equals the reference, every bin fits with one prompt per group, and it needs no more bins than
    packing every sample with its own prompt."""
    rng = np.random.default_rng(seed)
    groups = 40
    prompt_of = np.clip(rng.lognormal(5.3, 0.7, groups), 16, min(2048, budget // 4)).astype(np.int64)
    group = np.repeat(np.arange(groups), samples_per_prompt)
    rng.shuffle(group)
    own = np.minimum(rl_lengths(len(group), seed, cap=8000), budget - prompt_of[group])
    if budget < 16384:
        own = rng.integers(1, 12, size=len(group)) * (budget // 600 + 1)
    prompt = prompt_of[group]
    got = packing.pack_shared_prompts(own, group, prompt, budget)
    assert got == packing.pack_shared_prompts_ref(own, group, prompt, budget)
    assert sorted(i for b in got for i in b) == list(range(len(group)))
    assert all(0 < shared_bin_tokens(b, own, group, prompt) <= budget for b in got)
    assert len(got) <= len(packing.pack_by_token_budget(own + prompt, budget))


def test_pack_shared_prompts_small_cases_and_errors():
    # sample 3 (group 0) no longer fits bin 0 beside it, nor bin 1 with its prompt: a third bin
    assert packing.pack_shared_prompts([5, 5, 5, 3], [0, 0, 1, 0], [4, 4, 4, 4], 15) == [[0, 1], [2], [3]]
    # one prompt, many small samples: all share one bin that per-sample packing would need 3 of
    assert packing.pack_shared_prompts([1] * 6, [7] * 6, [4] * 6, 10) == [[0, 1, 2, 3, 4, 5]]
    assert len(packing.pack_by_token_budget([5] * 6, 10)) == 3
    with pytest.raises(ValueError, match="sample 1 has 9 tokens, more than max_tokens=8"):
        packing.pack_shared_prompts([1, 5], [0, 1], [3, 4], 8)
    with pytest.raises(ValueError, match="one entry per sample"):
        packing.pack_shared_prompts([1, 5], [0], [3, 4], 8)
    assert packing.pack_shared_prompts([], [], [], 8) == []


def max_load(groups, lens):
    w = packing.workloads(lens)
    return max(w[g].sum() if g else 0.0 for g in groups)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 2, 3, 8])
@pytest.mark.parametrize("equal_size", [False, True])
def test_balance_matches_reference(seed, k, equal_size):
    lens = rl_lengths(203, seed)
    got = packing.balance(lens, k, equal_size)
    ref = packing.balance_ref(lens, k, equal_size)
    assert len(got) == k
    assert sorted(i for g in got for i in g) == list(range(len(lens)))
    assert all(g == sorted(g) for g in got)
    if equal_size:
        sizes = [len(g) for g in got]
        assert max(sizes) - min(sizes) <= 1
    assert got == ref
    assert max_load(got, lens) <= max_load(ref, lens) * (1 + 1e-12)


def test_balance_quality_beats_round_robin():
    lens = rl_lengths(2048, 3)
    k = 8
    kk = max_load(packing.balance(lens, k), lens)
    round_robin = max_load([list(range(j, len(lens), k)) for j in range(k)], lens)
    ideal = packing.workloads(lens).sum() / k
    assert kk < round_robin
    assert kk <= ideal * 1.001


def test_balance_small_and_degenerate_inputs():
    assert packing.balance([], 3) == [[], [], []]
    assert packing.balance([7], 2) == [[0], []]
    groups = packing.balance([4, 4, 4, 4], 2, equal_size=True)
    assert sorted(len(g) for g in groups) == [2, 2]
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        packing.balance([1, 2], 0)
    with pytest.raises(ValueError, match="integers"):
        packing.balance([1.5, 2.0], 2)


def test_workload_coefficients():
    w = packing.workloads([0, 10, 100], linear_coef=2.0, quadratic_coef=0.5)
    np.testing.assert_array_equal(w, [0.0, 70.0, 5200.0])
    groups = packing.balance([100, 10, 10, 10, 10, 10], 2, linear_coef=1.0, quadratic_coef=0.0)
    assert groups[0] == [0]
