"""The rollout sampler: distributions, truncation, greedy rows, counter-based seeding."""

import math

import pytest
import torch

from orz_fast.rollout import SamplingParams
from orz_fast.rollout.sampling import counter_uniform, find_stop, sample_tokens

CHI2_999 = {3: 16.266, 5: 20.515, 7: 24.322}  # chi-square 99.9% quantiles by degrees of freedom


def draw(logits_row, n, *, temperature=1.0, top_p=1.0, top_k=-1, seed0=0, position=0):
    logits = logits_row.expand(n, -1).contiguous()
    return sample_tokens(
        logits,
        torch.full((n,), float(temperature)),
        torch.full((n,), float(top_p)),
        torch.full((n,), top_k, dtype=torch.long),
        torch.arange(seed0, seed0 + n),
        torch.full((n,), position, dtype=torch.long),
    )


def chi_square(tokens, probs):
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * n
    support = expected > 0
    assert counts[~support].sum() == 0, "sampled a token outside the support"
    return float(((counts[support] - expected[support]) ** 2 / expected[support]).sum()), int(support.sum()) - 1


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_distribution_matches_softmax(temperature):
    logits = torch.tensor([1.5, -0.3, 0.2, 2.1, -1.0, 0.0])
    tokens = draw(logits, 40_000, temperature=temperature)
    stat, df = chi_square(tokens, torch.softmax(logits / temperature, -1))
    assert stat < CHI2_999[df], stat


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()
    for top_p, support in [(0.7, [1, 3]), (0.8, [1, 3]), (0.81, [1, 3, 2]), (0.4, [1])]:
        tokens = draw(logits, 20_000, top_p=top_p)
        expected = torch.zeros(4)
        expected[support] = probs[support] / probs[support].sum()
        stat, df = chi_square(tokens, expected)
        assert df == 0 or stat < CHI2_999.get(df, 16.266), (top_p, stat)
        assert set(tokens.unique().tolist()) == set(support)


def test_top_k_and_top_p_together():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    tokens = draw(probs.log(), 5000, top_k=3, top_p=0.95)
    assert set(tokens.unique().tolist()) == {0, 1, 2}
    tokens = draw(probs.log(), 5000, top_k=1)
    assert set(tokens.unique().tolist()) == {0}


def test_greedy_rows_take_the_argmax():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    temps = torch.tensor([0.0, 1.0, 0.7, 0.0, 2.0])
    tokens = sample_tokens(
        logits, temps, torch.ones(5), torch.full((5,), -1), torch.arange(5), torch.zeros(5, dtype=torch.long)
    )
    assert tokens[0] == logits[0].argmax() and tokens[3] == logits[3].argmax()
    # the hot rows are draws, not the argmax, for these seeds
    assert any(tokens[i] != logits[i].argmax() for i in (1, 2, 4))


def test_rows_are_independent_of_batch_composition():
    torch.manual_seed(1)
    logits = torch.randn(8, 100)
    args = (torch.ones(8), torch.full((8,), 0.9), torch.full((8,), 50), torch.arange(100, 108))
    pos = torch.arange(8)
    batched = sample_tokens(logits, *args, pos)
    for i in range(8):
        alone = sample_tokens(logits[i : i + 1], *(a[i : i + 1] for a in args), pos[i : i + 1])
        assert alone.item() == batched[i].item()
    again = sample_tokens(logits, *args, pos)
    assert torch.equal(batched, again)


def test_counter_uniform_is_uniform_and_seed_sensitive():
    u = counter_uniform(torch.arange(200_000), torch.zeros(200_000, dtype=torch.long))
    assert u.dtype == torch.float64 and float(u.min()) >= 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005
    hist = torch.histc(u.float(), bins=10, min=0, max=1)
    assert float(((hist - 20_000) ** 2 / 20_000).sum()) < 27.877  # chi-square df=9 at 99.9%
    a = counter_uniform(torch.tensor([7, 7, 8]), torch.tensor([0, 1, 0]))
    assert len(set(a.tolist())) == 3


def test_shape_errors():
    with pytest.raises(ValueError, match=r"logits must be \[B, V\], got shape \(4,\)"):
        sample_tokens(torch.zeros(4), *(torch.zeros(4),) * 5)
    with pytest.raises(ValueError, match=r"top_p must be \[2\], got shape \(3,\)"):
        sample_tokens(torch.zeros(2, 4), torch.ones(2), torch.ones(3), torch.ones(2), torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="logits must be float32 .* got torch.bfloat16"):
        sample_tokens(torch.zeros(2, 4, dtype=torch.bfloat16), *(torch.ones(2),) * 5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "n must be an int >= 1, got 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"temperature": -1.0}, "temperature must be finite and >= 0, got -1.0"),
        ({"temperature": math.nan}, "temperature must be finite"),
        ({"top_k": 0}, "top_k must be -1 \\(off\\) or >= 1, got 0"),
        ({"max_tokens": 0}, "max_tokens must be an int >= 1, got 0"),
        ({"stop": [""]}, "stop must hold non-empty strings"),
        ({"stop_token_ids": [-2]}, "stop_token_ids must hold ids >= 0"),
    ],
)
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_find_stop():
    stops = ["User:", "</answer>"]
    assert find_stop("abc </answer> User:", stops) == len("abc </answer>")
    assert find_stop("x User: y </answer>", stops) == len("x User:")
    assert find_stop("no stop here", stops) == -1
    assert find_stop("User: then </answer>", stops, start=1) == len("User: then </answer>")
