"""Rollout: sampling parameters, completions, the batched sampler and the native paged-KV engine."""

from orz_fast.rollout.native import NativeEngine
from orz_fast.rollout.sampling import Completion, SamplingParams

__all__ = ["Completion", "NativeEngine", "SamplingParams"]
