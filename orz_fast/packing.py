"""Sequence packing and data-parallel balancing.

The fast paths live in C++ (``csrc/packing.cpp``, built into ``orz_fast._C``);
this module is their typed wrapper and holds the pure-Python references the
tests compare them against. Both follow the same deterministic algorithm, tie
for tie, so the C++ and Python results are identical.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from orz_fast import _C

DEFAULT_LINEAR_COEF = 1.0
"""Workload per token from the dense matmuls (the unit of the workload)."""

DEFAULT_QUADRATIC_COEF = 1.0 / 24576
"""Workload per token pair from causal attention, relative to the linear term.

Per layer, a token costs about ``24·H²`` FLOPs of dense matmuls and ``4·H·len``
of attention scores and values (over the tokens before it, half of ``len`` on
average), so attention's share per token grows like ``len / (6·H)``; 1/24576
matches a hidden size near 4096 (7B-class models), where a 24k-token response
costs about twice a short one per token.
"""


def _as_lengths(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"lengths must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        i = int(np.argmin(arr))
        raise ValueError(f"sample {i} has negative length {int(arr[i])}")
    return np.ascontiguousarray(arr)


def workloads(
    lengths: Sequence[int] | np.ndarray,
    linear_coef: float = DEFAULT_LINEAR_COEF,
    quadratic_coef: float = DEFAULT_QUADRATIC_COEF,
) -> np.ndarray:
    """Per-sample compute estimate ``a·len + b·len²`` as float64 [N]."""
    lens = _as_lengths(lengths).astype(np.float64)
    return linear_coef * lens + quadratic_coef * lens * lens


def _check_budget(lengths: np.ndarray, max_tokens: int) -> None:
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    if lengths.size and lengths.max() > max_tokens:
        i = int(np.argmax(lengths))
        raise ValueError(f"sample {i} has {int(lengths[i])} tokens, more than max_tokens={max_tokens}")


def pack_by_token_budget(lengths: Sequence[int] | np.ndarray, max_tokens: int) -> list[list[int]]:
    """Pack samples into bins of at most ``max_tokens`` tokens (first-fit decreasing).

    Args:
        lengths: [N] token counts.
        max_tokens: capacity of one bin (a micro-batch's token budget).
    Returns:
        Bins of sample indices, in the order they were opened; within a bin,
        longest sample first. A sample longer than ``max_tokens`` is an error.
    """
    lens = _as_lengths(lengths)
    _check_budget(lens, max_tokens)
    return _C.pack_by_token_budget(lens, int(max_tokens))


def pack_by_token_budget_ref(lengths: Sequence[int] | np.ndarray, max_tokens: int) -> list[list[int]]:
    """Pure-Python reference of :func:`pack_by_token_budget` (same output)."""
    lens = _as_lengths(lengths).tolist()
    _check_budget(np.asarray(lens, dtype=np.int64), max_tokens)
    order = sorted(range(len(lens)), key=lambda i: -lens[i])
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        b = next((j for j, room in enumerate(free) if room >= lens[i]), len(bins))
        if b == len(bins):
            bins.append([])
            free.append(max_tokens)
        bins[b].append(i)
        free[b] -= lens[i]
    return bins


def pack_shared_prompts(
    own: Sequence[int] | np.ndarray,
    group: Sequence[int] | np.ndarray,
    prompt: Sequence[int] | np.ndarray,
    max_tokens: int,
) -> list[list[int]]:
    """Pack samples into bins of at most ``max_tokens`` tokens where the samples of one prompt in a bin feed that
    prompt once (first-fit decreasing).

    Args:
        own: [N] each sample's own tokens (its response's inputs).
        group: [N] its prompt's id; samples with one id share one prompt of ``prompt`` tokens.
        prompt: [N] its prompt's tokens.
        max_tokens: capacity of one bin: its samples' own tokens plus each of its prompts once.
    Returns:
        Bins of sample indices, in the order they were opened. Samples go in decreasing order of ``own +
        prompt`` (ties keep index order) to the first bin that already holds their prompt and has room for
        their own tokens, else to the first bin with room for both; within a bin the samples of one prompt are
        consecutive, prompts in order of arrival. A sample whose ``own + prompt`` exceeds ``max_tokens`` is an error.
    """
    own_, prompt_ = _as_lengths(own), _as_lengths(prompt)
    group_ = np.ascontiguousarray(np.asarray(group, dtype=np.int64))
    if not (len(own_) == len(group_) == len(prompt_)):
        raise ValueError(
            f"own, group and prompt need one entry per sample, got {len(own_)}, {len(group_)}, {len(prompt_)}"
        )
    _check_budget(own_ + prompt_, max_tokens)
    return _C.pack_shared_prompts(own_, group_, prompt_, int(max_tokens))


def pack_shared_prompts_ref(
    own: Sequence[int] | np.ndarray,
    group: Sequence[int] | np.ndarray,
    prompt: Sequence[int] | np.ndarray,
    max_tokens: int,
) -> list[list[int]]:
    """Pure-Python reference of :func:`pack_shared_prompts` (same output)."""
    own_, prompt_ = _as_lengths(own).tolist(), _as_lengths(prompt).tolist()
    group_ = [int(g) for g in group]
    _check_budget(np.asarray(own_, dtype=np.int64) + np.asarray(prompt_, dtype=np.int64), max_tokens)
    order = sorted(range(len(own_)), key=lambda i: -(own_[i] + prompt_[i]))
    bins: list[dict[int, list[int]]] = []  # per bin: group -> samples, in order of arrival
    free: list[int] = []
    for i in order:
        have = [b for b, runs in enumerate(bins) if group_[i] in runs and free[b] >= own_[i]]
        if have:
            b, cost = have[0], own_[i]
        else:
            cost = own_[i] + prompt_[i]
            b = next((j for j, room in enumerate(free) if room >= cost), len(bins))
            if b == len(bins):
                bins.append({})
                free.append(max_tokens)
            bins[b][group_[i]] = []
        bins[b][group_[i]].append(i)
        free[b] -= cost
    return [[i for run in runs.values() for i in run] for runs in bins]


def balance(
    lengths: Sequence[int] | np.ndarray,
    k: int,
    equal_size: bool = False,
    *,
    linear_coef: float = DEFAULT_LINEAR_COEF,
    quadratic_coef: float = DEFAULT_QUADRATIC_COEF,
) -> list[list[int]]:
    """Split samples into ``k`` groups of near-equal workload (Karmarkar–Karp).

    The workload of a sample is ``linear_coef·len + quadratic_coef·len²``
    (dense matmuls plus causal attention). Used to give every data-parallel
    rank the same amount of compute.

    Args:
        lengths: [N] token counts.
        k: number of groups (data-parallel ranks), >= 1.
        equal_size: also make the groups' sample counts differ by at most one.
    Returns:
        ``k`` lists of sample indices (each sorted ascending), heaviest group first.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    w = workloads(lengths, linear_coef, quadratic_coef)
    return _C.balance(w, int(k), bool(equal_size))


def balance_ref(
    lengths: Sequence[int] | np.ndarray,
    k: int,
    equal_size: bool = False,
    *,
    linear_coef: float = DEFAULT_LINEAR_COEF,
    quadratic_coef: float = DEFAULT_QUADRATIC_COEF,
) -> list[list[int]]:
    """Pure-Python reference of :func:`balance` (same output)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    w = workloads(lengths, linear_coef, quadratic_coef).tolist()
    n = len(w)
    order = sorted(range(n), key=lambda i: -w[i])

    heap: list[tuple[float, int]] = []
    pool: list[tuple[list[float], list[list[int]]] | None] = []

    def push(sums: list[float], groups: list[list[int]]) -> None:
        by_load = sorted(range(k), key=lambda j: -sums[j])
        sums = [sums[j] for j in by_load]
        groups = [groups[j] for j in by_load]
        heapq.heappush(heap, (-(sums[0] - sums[-1]), len(pool)))
        pool.append((sums, groups))

    if equal_size:
        for start in range(0, n, k):
            chunk = order[start : start + k]
            sums = [w[i] for i in chunk] + [0.0] * (k - len(chunk))
            push(sums, [[i] for i in chunk] + [[] for _ in range(k - len(chunk))])
    else:
        for i in order:
            push([w[i]] + [0.0] * (k - 1), [[i]] + [[] for _ in range(k - 1)])
    if not heap:
        return [[] for _ in range(k)]
    while len(heap) > 1:
        _, a = heapq.heappop(heap)
        _, b = heapq.heappop(heap)
        sums_a, groups_a = pool[a]
        sums_b, groups_b = pool[b]
        pool[a] = pool[b] = None
        push(
            [sums_a[j] + sums_b[k - 1 - j] for j in range(k)],
            [groups_a[j] + groups_b[k - 1 - j] for j in range(k)],
        )
    _, groups = pool[heap[0][1]]
    return [sorted(g) for g in groups]
