"""Rollout: sampling parameters, completions, the native paged-KV engine and the vLLM backend."""

from orz_fast.rollout.native import NativeEngine
from orz_fast.rollout.sampling import Completion, SamplingParams
from orz_fast.rollout.vllm_engine import VllmEngine

__all__ = ["Completion", "NativeEngine", "SamplingParams", "VllmEngine"]
