"""Sampling parameters, completions and the batched token sampler of the rollout engines.

Randomness is counter-based: the uniform number that picks sample ``j`` of a
request at generated position ``t`` is a hash of ``(seed + j, t)``. So a
sequence's tokens do not depend on which other sequences share its batch or in
what order they finished — ``n`` samples of one request equal ``n`` requests
with seeds ``seed, seed + 1, ...`` — and the sampler needs one random number
per row, not a ``[B, V]`` noise tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch


@dataclass(kw_only=True)
class SamplingParams:
    """How to sample one request's completions."""

    n: int = 1
    """Completions per prompt; they share the prompt's KV cache."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability mass reaches ``top_p``; in (0, 1]."""
    top_k: int = -1
    """Keep the ``top_k`` most likely tokens; -1 keeps all."""
    max_tokens: int = 16
    """Maximum generated tokens; a completion cut here has ``finish_reason == "length"``."""
    stop: list[str] = field(default_factory=list)
    """Stop strings (need a tokenizer); the matched string is kept at the end of the output."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end a completion (kept as its last token)."""
    seed: int | None = None
    """Seed of sample 0; sample ``j`` uses ``seed + j``. ``None`` draws one from torch's global generator."""

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"SamplingParams.n must be an int >= 1, got {self.n!r}")
        if not (self.temperature >= 0 and self.temperature != float("inf")):
            raise ValueError(f"SamplingParams.temperature must be finite and >= 0, got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or (self.top_k != -1 and self.top_k < 1):
            raise ValueError(f"SamplingParams.top_k must be -1 (off) or >= 1, got {self.top_k!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"SamplingParams.stop must hold non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"SamplingParams.stop_token_ids must hold ids >= 0, got {self.stop_token_ids!r}")


@dataclass
class Completion:
    """One generated response. The engines hand back numpy arrays, often views of one buffer per ``generate``
    call (the trainer concatenates them without per-token Python work)."""

    token_ids: np.ndarray
    """int64 [L]: generated tokens (a stop token or the token completing a stop string is included)."""
    logprobs: np.ndarray
    """float32 [L]: sampling log-probs, ``log_softmax(logits / temperature)`` at each token (temperature 1 when
    greedy)."""
    finish_reason: Literal["stop", "length"]
    """``stop``: a stop token or string ended it; ``length``: ``max_tokens`` (or the context) ran out."""
    text: str | None = None
    """Decoded text, cut right after the stop string, when the engine has a tokenizer."""


_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    z = x + _GOLDEN  # int64 arithmetic wraps, as the mix needs
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def counter_uniform(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Uniform float64 in [0, 1) for each ``(seed, position)`` pair; int64 [B] -> float64 [B]."""
    z = _splitmix64(_splitmix64(seeds.long()) + positions.long())
    return _shr(z, 11).double() * (1.0 / (1 << 53))


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Sample one token per row from ``softmax(logits / temperature)`` (argmax where the temperature is 0).

    Args:
        logits: [B, V] fp32 next-token logits (the engine's come from the trainer's LM-head path).
        temperature: [B] float; 0 is greedy.
        top_p: [B] float in (0, 1].
        top_k: [B] int64; <= 0 keeps all.
        seeds: [B] int64 per-sequence seeds.
        positions: [B] int64 index of the token being generated (the RNG counter).
    Returns:
        tokens [B] int64. (Their log-probs are the LM head's: ``orz_fast.models.lm_head``.)
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    if logits.dtype != torch.float32:
        raise ValueError(f"logits must be float32 (sampling is done in fp32), got {logits.dtype}")
    B, V = logits.shape
    for name, t in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seeds", seeds)):
        if t.shape != (B,):
            raise ValueError(f"{name} must be [{B}], got shape {tuple(t.shape)}")
    greedy = temperature <= 0
    truncate = (top_p < 1) | ((top_k > 0) & (top_k < V))
    # host sync: three bools per step decide whether the division, the sort and the argmax are needed at all
    unit, any_truncate, any_greedy = torch.stack(((temperature == 1).all(), truncate.any(), greedy.any())).tolist()
    z = logits
    if not unit:
        z = logits / torch.where(greedy, torch.ones_like(temperature), temperature).float()[:, None]  # [B, V]
    u = counter_uniform(seeds, positions).to(z.device)
    # Inverse-CDF sampling; the row's total mass rescales u, so no row needs normalising.
    if any_truncate:
        sorted_z, order = z.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        rank = torch.arange(V, device=z.device)
        k = torch.where(top_k > 0, top_k, V).clamp(max=V)
        keep = (mass_before < top_p[:, None].float()) & (rank[None, :] < k[:, None])
        probs = probs * keep
        cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=V - 1)
        pick = torch.minimum(pick, keep.sum(dim=-1, keepdim=True) - 1)
        sampled = order.gather(1, pick).squeeze(1)
    else:
        cdf = torch.cumsum(torch.softmax(z, dim=-1), dim=-1, dtype=torch.float64)
        sampled = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=V - 1).squeeze(1)
    if any_greedy:
        return torch.where(greedy.to(z.device), logits.argmax(dim=-1), sampled)
    return sampled


def find_stop(text: str, stops: list[str], start: int = 0) -> int:
    """End index (exclusive) of the earliest stop string in ``text[start:]``, or -1 when none occurs."""
    best_begin, best_end = -1, -1
    for s in stops:
        i = text.find(s, start)
        if i != -1 and (best_begin == -1 or i < best_begin):
            best_begin, best_end = i, i + len(s)
    return best_end


def params_per_prompt(prompts: Any, params: Any) -> list[SamplingParams]:
    """Check an engine's ``generate(prompts, params)`` arguments; returns one :class:`SamplingParams` per
    prompt (``params`` may be one for all). Raises ValueError naming what is wrong."""
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    if isinstance(params, SamplingParams):
        return [params] * len(prompts)
    if not isinstance(params, (list, tuple)) or len(params) != len(prompts):
        got = len(params) if isinstance(params, (list, tuple)) else type(params).__name__
        raise ValueError(f"params must be a SamplingParams or a list of {len(prompts)} of them, got {got}")
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise ValueError(f"params[{i}] must be a SamplingParams, got {type(p).__name__}")
    return list(params)
