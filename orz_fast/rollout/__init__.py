"""Rollout: sampling parameters, completions and the batched sampler."""

from orz_fast.rollout.sampling import Completion, SamplingParams

__all__ = ["Completion", "SamplingParams"]
