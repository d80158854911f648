"""Continuous-batching scheduler of the native engine: host-only bookkeeping, no model and no tensors.

Each step it picks what one forward computes, within a token budget (``max_num_batched_tokens``)
and a seat budget (``max_num_seqs``):

- one token of every running sequence (decode), after giving each the KV block its next token
  goes to; when the blocks run out the youngest running sequence is preempted (its blocks freed;
  it is later recomputed: prompt plus the tokens it already has);
- then, as blocks and budget allow, preempted sequences (oldest first) and new prompts in order
  (prefill). A prompt is prefilled once for all the samples admitted with it: its full blocks
  are shared (ref-counted) and each sample gets its own copy of the partial last block.

The engine runs the step (:class:`~orz_fast.rollout.model_runner.ModelRunner`), then calls
:meth:`Scheduler.update` with the sampled tokens; a stop rule (:mod:`orz_fast.rollout.stopping`)
says which sequences are finished, and their blocks are released. The scheduler keeps the tokens
(the next step's inputs, a preempted sequence's recompute, the stop rule's); the log-probs never
pass through it (the engine keeps each step's as one array).
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from orz_fast.rollout.kv_cache import BlockAllocator
from orz_fast.rollout.sampling import SamplingParams

_INT64_WRAP = 1 << 64


def as_int64(x: int) -> int:
    """Wrap a Python int into int64 range (seeds are counters; ``seed + j`` may cross 2**63)."""
    return (x + (1 << 63)) % _INT64_WRAP - (1 << 63)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(eq=False)
class Request:
    """One prompt with its sampling parameters and its ``n`` samples once they are finished."""

    prompt: list[int]
    params: SamplingParams
    seed: int
    max_len: int
    """Prompt plus generated tokens at which a sample stops: min(prompt + max_tokens, context)."""
    stop_ids: frozenset[int] = frozenset()
    max_stop_chars: int = 0
    finished: list[Sequence | None] = field(default_factory=list)
    """Per sample, its :class:`Sequence` once a stop rule ended it (None before)."""

    def __post_init__(self) -> None:
        if not self.finished:
            self.finished = [None] * self.params.n


@dataclass(eq=False)
class Sequence:
    """One sample of a request. All its tokens but the last have their K/V in ``blocks`` while it runs."""

    request: Request
    sample: int
    order: int
    """Admission order: preemption takes the youngest (largest) first."""
    blocks: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    """Detokenised output so far (kept only when the request has stop strings); the whole output once finished
    (when the engine has a tokenizer)."""
    finish_reason: Literal["stop", "length"] | None = None
    """Set by the stop rule that ends the sequence."""
    prefix_offset: int = 0
    read_offset: int = 0

    @property
    def length(self) -> int:
        return len(self.request.prompt) + len(self.tokens)

    @property
    def seed(self) -> int:
        return as_int64(self.request.seed + self.sample)


@dataclass(eq=False)
class Prefill:
    """Tokens whose K/V a step computes from scratch, for one or more sequences sharing them."""

    seqs: list[Sequence]
    token_ids: list[int]
    copies: list[tuple[int, int]]
    """(source, destination) blocks: the prompt's partial last block copied for samples 1..m-1."""


@dataclass
class ScheduledStep:
    """What one forward computes: prefills first (packed), then one decode token per running sequence."""

    prefills: list[Prefill]
    decodes: list[Sequence]

    @property
    def sequences(self) -> list[Sequence]:
        """The sequences a token is sampled for, in row order (a prefill's samples share its last row)."""
        return [s for pf in self.prefills for s in pf.seqs] + self.decodes


class Scheduler:
    """Admission, KV block allocation and preemption over ``requests`` (see the module docstring)."""

    def __init__(
        self,
        requests: list[Request],
        *,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.alloc = BlockAllocator(num_blocks)
        self.waiting: deque[tuple[Request, int, int]] = deque((r, 0, r.params.n) for r in requests)
        """Requests not (fully) admitted yet: (request, first sample not admitted, samples left)."""
        self.preempted: list[Sequence] = []
        self.running: list[Sequence] = []
        self.preemptions = 0
        self._order = itertools.count()
        self._watermark = max(1, num_blocks // 100)  # headroom so a new admission is not preempted at once

    @property
    def done(self) -> bool:
        return not (self.waiting or self.preempted or self.running)

    def schedule(self) -> ScheduledStep:
        """The next step; RuntimeError when nothing can run (the engine sizes the cache so that one can)."""
        self._reserve_decode_blocks()
        decodes = list(self.running)
        prefills = self._admit(len(decodes))
        if not decodes and not prefills:
            raise RuntimeError(
                f"scheduler stalled with {len(self.waiting)} waiting and {len(self.preempted)} preempted "
                f"requests and {self.alloc.num_free}/{self.alloc.num_blocks} free blocks"
            )
        return ScheduledStep(prefills, decodes)

    def update(self, step: ScheduledStep, tokens: list[int], finished: Callable[[Sequence], bool]) -> None:
        """Append each sequence's sampled token; ``finished(seq)`` (after the append) retires it into
        ``request.finished`` and frees its blocks."""
        still = []
        for seq, token in zip(step.sequences, tokens, strict=True):
            seq.tokens.append(token)
            if finished(seq):
                self.alloc.release(seq.blocks)
                seq.blocks = []
                seq.request.finished[seq.sample] = seq
            else:
                still.append(seq)
        self.running = sorted(still, key=lambda s: s.order)

    def _reserve_decode_blocks(self) -> None:
        """Give every running sequence the block its next token's K/V goes to, preempting the youngest if needed."""
        running, alloc = self.running, self.alloc
        i = 0
        while i < len(running):
            seq = running[i]
            if (seq.length - 1) // self.block_size < len(seq.blocks):
                i += 1
                continue
            while alloc.num_free == 0 and running[-1] is not seq:
                self._preempt(running.pop())
            if alloc.num_free == 0:  # seq itself is the youngest
                self._preempt(running.pop())
                break
            seq.blocks.append(alloc.allocate())
            i += 1

    def _preempt(self, seq: Sequence) -> None:
        self.preemptions += 1
        self.alloc.release(seq.blocks)
        seq.blocks = []
        bisect.insort(self.preempted, seq, key=lambda s: s.order)

    def _admit(self, num_decodes: int) -> list[Prefill]:
        """Prefills joining this step: preempted sequences first (oldest first), then new prompts in order."""
        bs, alloc, waiting, preempted = self.block_size, self.alloc, self.waiting, self.preempted
        budget = self.max_num_batched_tokens - num_decodes
        seats = self.max_num_seqs - num_decodes
        prefills: list[Prefill] = []
        while seats > 0 and (preempted or waiting):
            idle = num_decodes == 0 and not prefills  # then anything that fits the whole cache may run
            reserve = 0 if idle else self._watermark
            if preempted:
                seq = preempted[0]
                length = seq.length
                need = cdiv(length, bs)
                if (length > budget and not idle) or alloc.num_free - need < reserve:
                    break
                preempted.pop(0)
                seq.blocks = [alloc.allocate() for _ in range(need)]
                prefills.append(Prefill([seq], seq.request.prompt + seq.tokens, []))
                budget -= length
                seats -= 1
                continue
            req, first, count = waiting[0]
            length = len(req.prompt)
            need = cdiv(length, bs)
            spare = alloc.num_free - reserve - need
            if (length > budget and not idle) or spare < 0:
                break
            full, partial = length // bs, length % bs != 0
            m = min(count, seats, 1 + spare if partial else count)
            # full prompt blocks several samples share come from the low ids, owned blocks from the high ones
            prompt_blocks = [alloc.allocate(shared=m > 1) for _ in range(full)]
            if partial:
                prompt_blocks.append(alloc.allocate())
            seqs = [Sequence(req, first, next(self._order), prompt_blocks)]
            copies = []
            for j in range(first + 1, first + m):
                blocks = [alloc.share(b) for b in prompt_blocks[:full]]
                if partial:
                    blocks.append(alloc.allocate())
                    copies.append((prompt_blocks[-1], blocks[-1]))
                seqs.append(Sequence(req, j, next(self._order), blocks))
            if m < count:
                waiting[0] = (req, first + m, count - m)
            else:
                waiting.popleft()
            prefills.append(Prefill(seqs, req.prompt, copies))
            budget -= length
            seats -= m
        return prefills
