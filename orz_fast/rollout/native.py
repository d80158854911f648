"""Native rollout engine: paged-KV continuous batching on the policy module's own parameters.

The engine runs its own cached forward through the policy's submodules (embedding, the
decoder layers' norms and megatron-core TP linears, final norm, LM head), so it reads the
very parameter tensors the optimizer updates: no copy, no resharding, any TP layout (each
rank computes with its shards; row-parallel outputs are all-reduced and the logits gathered
over TP before sampling, which is counter-seeded and so identical on every rank). The TP
linears run as plain GEMMs on their weight shards: inference needs neither megatron-core's
autograd wrappers nor their per-call checks, which cost as much as a small decode GEMM.

One ``generate`` call:

1. sizes a paged KV cache from a memory budget (``kv_cache_bytes``, see
   :mod:`orz_fast.rollout.kv_budget`; capped at what the requests can use) and allocates it; it
   is released when the call returns;
2. schedules steps until every request is done. A step packs the new prompts (prefill,
   causal attention within each prompt) and one token of every running sequence (decode,
   attention over its cached blocks) into one forward, within a token budget. A prompt is
   prefilled once; its ``n`` samples share its full KV blocks and get copies of the
   partial last one. Finished sequences leave and waiting ones join as blocks free up;
   when the blocks run out, the youngest sequence is preempted and later recomputed
   (prompt plus the tokens it already has); sampling is counter-based, so its output is
   unchanged up to floating-point rounding;
3. samples every row with :func:`~orz_fast.rollout.sampling.sample_tokens` over the real
   vocabulary (the policy's padding columns are dropped from the logits first, so a padding id
   is never sampled nor the greedy argmax) and applies stop token ids, stop strings
   (incremental detokenisation), ``max_tokens`` and the context limit.

The same code runs on CPU and CUDA (flash-attn's varlen kernel for prefill when installed,
SDPA otherwise; decode gathers each sequence's blocks and runs SDPA with a length mask).
Tensor parallelism: each rank decodes with its own shards (row-parallel outputs all-reduced).
Pipeline parallelism: each stage keeps the KV cache of its own layers and passes the step's
activation [T, H] to the next stage; the last stage samples and broadcasts the tokens back, so
every rank runs the same scheduler. The stages take turns (no micro-batch overlap within a step).
Not done: CUDA-graph capture of decode steps.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from orz_fast import parallel
from orz_fast.config import RolloutConfig
from orz_fast.models.attention import PackedSegments, packed_causal_attention
from orz_fast.models.decoder import PolicyModel, apply_rope, rope_cos_sin
from orz_fast.rollout.kv_budget import kv_cache_bytes as resolve_kv_cache_bytes
from orz_fast.rollout.kv_cache import BlockAllocator, PagedKVCache, paged_decode_attention
from orz_fast.rollout.sampling import Completion, SamplingParams, find_stop, params_per_prompt, sample_tokens

_INT64_WRAP = 1 << 64


def _as_int64(x: int) -> int:
    """Wrap a Python int into int64 range (seeds are counters; ``seed + j`` may cross 2**63)."""
    return (x + (1 << 63)) % _INT64_WRAP - (1 << 63)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(eq=False)
class _Request:
    """One prompt with its sampling parameters and the completions of its ``n`` samples."""

    prompt: list[int]
    params: SamplingParams
    seed: int
    max_len: int
    """Prompt plus generated tokens at which a sample stops: min(prompt + max_tokens, context)."""
    stop_ids: frozenset[int]
    max_stop_chars: int
    completions: list[Completion | None]


@dataclass(eq=False)
class _Sequence:
    """One sample of a request. All its tokens but the last have their K/V in ``blocks`` while it runs."""

    request: _Request
    sample: int
    order: int
    """Admission order: preemption takes the youngest (largest) first."""
    blocks: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    """Detokenised output so far (kept only when the request has stop strings)."""
    prefix_offset: int = 0
    read_offset: int = 0

    @property
    def length(self) -> int:
        return len(self.request.prompt) + len(self.tokens)

    @property
    def seed(self) -> int:
        return _as_int64(self.request.seed + self.sample)


@dataclass(eq=False)
class _Prefill:
    """Tokens whose K/V a step computes from scratch, for one or more sequences sharing them."""

    seqs: list[_Sequence]
    token_ids: list[int]
    copies: list[tuple[int, int]]
    """(source, destination) blocks: the prompt's partial last block copied for samples 1..m-1."""


def _check_plain_tp_linears(model: PolicyModel) -> None:
    """The engine applies the layers' TP linears as plain GEMMs (+ all-reduce); refuse other megatron modes."""
    for i, layer in enumerate(model.layers):
        for name in ("qkv", "gate_up", "o_proj", "down"):
            lin = getattr(layer, name)
            column = name in ("qkv", "gate_up")
            odd = lin.sequence_parallel or lin.skip_bias_add
            odd = odd or (lin.gather_output if column else not lin.input_is_parallel)
            if odd:
                raise ValueError(
                    f"layers.{i}.{name}: NativeEngine supports TP linears without sequence parallelism, "
                    "skip_bias_add, gather_output or a non-split row input"
                )


def _column(linear, x: torch.Tensor) -> torch.Tensor:
    """Forward of a megatron-core ``ColumnParallelLinear`` (``gather_output=False``): this rank's output columns."""
    return F.linear(x, linear.weight, linear.bias)


def _row(linear, x: torch.Tensor, group) -> torch.Tensor:
    """Forward of a megatron-core ``RowParallelLinear`` (input already split): partial sums all-reduced over TP."""
    y = F.linear(x, linear.weight)
    if group is not None:
        dist.all_reduce(y, group=group)
    return y if linear.bias is None else y + linear.bias


class NativeEngine:
    """Generates with the policy module's own parameters through a paged KV cache.

    Args:
        model: this rank's :class:`~orz_fast.models.PolicyModel` shard (any TP x PP layout; the
            stages of one pipeline pass activations and the last one samples).
        tokenizer: Hugging Face tokenizer; needed for stop strings and for ``Completion.text``.
        kv_cache_bytes: KV cache budget per rank, e.g. ``kv_budget.kv_cache_bytes(cfg.rollout, device)``.
            ``None``: the default ``rollout`` settings resolved at the start of each ``generate``
            (``kv_cache_fraction`` 0.9 of the free CUDA memory, 1 GiB on CPU). Only the blocks
            the requests can use at once are allocated.
        block_size: tokens per KV block.
        max_num_seqs: most sequences decoding at once.
        max_num_batched_tokens: token budget of one step (decoding sequences count one each,
            a prefill its prompt); a longer prompt runs when nothing else is running.
        max_model_len: context limit (prompt plus generated tokens); defaults to the model's
            ``max_position_embeddings``.
    """

    def __init__(
        self,
        model: PolicyModel,
        *,
        tokenizer=None,
        kv_cache_bytes: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        max_model_len: int | None = None,
    ) -> None:
        if not isinstance(model, PolicyModel):
            raise TypeError(f"NativeEngine needs an orz_fast PolicyModel, got {type(model).__name__}")
        _check_plain_tp_linears(model)
        if kv_cache_bytes is not None and (not isinstance(kv_cache_bytes, int) or kv_cache_bytes < 1):
            raise ValueError(f"kv_cache_bytes must be a positive int, got {kv_cache_bytes!r}")
        for name, value in (
            ("block_size", block_size),
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", max_num_batched_tokens),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        spec = model.spec
        if max_model_len is None:
            max_model_len = spec.hf_config.get("max_position_embeddings")
            if max_model_len is None:
                raise ValueError("the model config has no max_position_embeddings; pass max_model_len")
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
        self.model = model
        self.tokenizer = tokenizer
        self.kv_cache_bytes = kv_cache_bytes
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = int(max_model_len)
        self.tp = parallel.tp_size()
        self._tp_group = parallel.tp_group() if self.tp > 1 else None
        self.pp = parallel.pp_size()
        # Every rank of the replica (all TP ranks of all stages) runs the same scheduler on the same
        # tokens; the last stage samples them and broadcasts them along the pipeline.
        self._mp_group = parallel.mp_group() if self.tp * self.pp > 1 else None
        self.kv_heads = model.layers[0].kv_heads
        first_param = next(model.layers[0].parameters())
        self.dtype = first_param.dtype
        self.device = first_param.device
        self.last_stats: dict[str, int] = {}
        """Counters of the last ``generate``: steps, prefill/decode tokens, preemptions, KV blocks."""

    # ------------------------------------------------------------------ API

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[list[Completion]]:
        """Complete every prompt ``params.n`` times.

        Args:
            prompts: token ids per prompt (non-empty, shorter than the context).
            params: one :class:`SamplingParams` for all prompts, or one per prompt.
        Returns:
            per prompt, its ``n`` completions in sample order.
        """
        requests = self._make_requests(prompts, params)
        if not requests:
            return []
        num_blocks = self._num_blocks(requests)
        cache = PagedKVCache(
            num_layers=len(self.model.layers),
            num_blocks=num_blocks,
            block_size=self.block_size,
            kv_heads=self.kv_heads,
            head_dim=self.model.spec.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self.last_stats = dict.fromkeys(("steps", "prefill_tokens", "decode_tokens", "preemptions"), 0)
        self.last_stats.update(kv_blocks=num_blocks, block_size=self.block_size)
        try:
            with torch.inference_mode():
                self._run(requests, cache, BlockAllocator(num_blocks))
        finally:
            del cache  # the cache is the rollout's alone: training gets the memory back
        return [list(r.completions) for r in requests]

    # ------------------------------------------------------------------ setup

    def _make_requests(self, prompts, params) -> list[_Request]:
        params = params_per_prompt(prompts, params)
        vocab = self.model.spec.vocab_size
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            if not isinstance(prompt, (list, tuple)):
                raise ValueError(f"prompt {i} must be a list of token ids, got {type(prompt).__name__}")
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty")
            ids = [int(t) for t in prompt]
            lo, hi = min(ids), max(ids)
            if lo < 0 or hi >= vocab:
                raise ValueError(f"prompt {i} has token id {lo if lo < 0 else hi} outside the vocabulary [0, {vocab})")
            if len(ids) >= self.max_model_len:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens; the context holds max_model_len={self.max_model_len} "
                    "tokens, leaving no room to generate"
                )
            if p.stop and self.tokenizer is None:
                raise ValueError(f"params for prompt {i} have stop strings {p.stop!r} but the engine has no tokenizer")
            requests.append(
                _Request(
                    prompt=ids,
                    params=p,
                    seed=0,
                    max_len=min(len(ids) + p.max_tokens, self.max_model_len),
                    stop_ids=frozenset(p.stop_token_ids),
                    max_stop_chars=max((len(s) for s in p.stop), default=0),
                    completions=[None] * p.n,
                )
            )
        self._assign_seeds(requests)
        return requests

    def _assign_seeds(self, requests: list[_Request]) -> None:
        """Given seeds as they are; missing ones drawn from torch's generator (on TP rank 0, broadcast)."""
        missing = [r for r in requests if r.params.seed is None]
        for r in requests:
            if r.params.seed is not None:
                r.seed = r.params.seed
        if not missing:
            return
        drawn = torch.randint(0, 1 << 62, (len(missing),), dtype=torch.int64)
        if self._mp_group is not None:
            buf = drawn.to(self.device)
            dist.broadcast(buf, src=dist.get_global_rank(self._mp_group, 0), group=self._mp_group)
            drawn = buf.cpu()
        for r, s in zip(missing, drawn.tolist(), strict=True):
            r.seed = s

    def _num_blocks(self, requests: list[_Request]) -> int:
        """Blocks to allocate: the budget's, capped at the requests' peak; ValueError when one sequence can't fit."""
        bs = self.block_size
        per_block = PagedKVCache.bytes_per_block(
            num_layers=len(self.model.layers),
            block_size=bs,
            kv_heads=self.kv_heads,
            head_dim=self.model.spec.head_dim,
            dtype=self.dtype,
        )
        budget = self.kv_cache_bytes
        if budget is None:
            budget = resolve_kv_cache_bytes(RolloutConfig(), self.device)
        budget_blocks = budget // per_block
        if self._mp_group is not None:  # every rank must schedule identically, so all use the smallest budget
            t = torch.tensor([budget_blocks], dtype=torch.int64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self._mp_group)
            budget_blocks = int(t.item())
        longest = max(requests, key=lambda r: r.max_len)
        need_one = _cdiv(longest.max_len, bs)
        if budget_blocks < need_one:
            raise ValueError(
                f"KV cache budget of {budget} bytes holds {budget_blocks} blocks of {bs} tokens "
                f"({per_block} bytes each), but one sequence of prompt {len(longest.prompt)} + max_tokens "
                f"{longest.params.max_tokens} (context {self.max_model_len}) needs {need_one} blocks "
                f"({need_one * per_block} bytes)"
            )
        peak = 0
        for r in requests:
            shared = len(r.prompt) // bs
            peak += shared + r.params.n * (_cdiv(r.max_len, bs) - shared)
        return min(budget_blocks, peak)

    # ------------------------------------------------------------------ scheduling

    def _run(self, requests: list[_Request], cache: PagedKVCache, alloc: BlockAllocator) -> None:
        waiting: deque[tuple[_Request, int, int]] = deque((r, 0, r.params.n) for r in requests)
        preempted: list[_Sequence] = []
        running: list[_Sequence] = []
        order = itertools.count()
        watermark = max(1, cache.num_blocks // 100)  # headroom so a new admission is not preempted at once
        while waiting or preempted or running:
            self._reserve_decode_blocks(running, preempted, alloc)
            decodes = list(running)
            prefills = self._admit(len(decodes), waiting, preempted, alloc, order, watermark)
            if not decodes and not prefills:
                raise RuntimeError(
                    f"scheduler stalled with {len(waiting)} waiting and {len(preempted)} preempted requests "
                    f"and {alloc.num_free}/{alloc.num_blocks} free blocks"
                )
            tokens, logprobs = self._step(cache, prefills, decodes)
            stats = self.last_stats
            stats["steps"] += 1
            stats["prefill_tokens"] += sum(len(pf.token_ids) for pf in prefills)
            stats["decode_tokens"] += len(decodes)
            sampled = [s for pf in prefills for s in pf.seqs] + decodes
            still = []
            for seq, token, logprob in zip(sampled, tokens, logprobs, strict=True):
                if self._append(seq, token, logprob):
                    alloc.release(seq.blocks)
                    seq.blocks = []
                else:
                    still.append(seq)
            running = sorted(still, key=lambda s: s.order)

    def _reserve_decode_blocks(self, running: list[_Sequence], preempted: list[_Sequence], alloc) -> None:
        """Give every running sequence the block its next token's K/V goes to, preempting the youngest if needed."""
        i = 0
        while i < len(running):
            seq = running[i]
            if (seq.length - 1) // self.block_size < len(seq.blocks):
                i += 1
                continue
            while alloc.num_free == 0 and running[-1] is not seq:
                self._preempt(running.pop(), preempted, alloc)
            if alloc.num_free == 0:  # seq itself is the youngest
                self._preempt(running.pop(), preempted, alloc)
                break
            seq.blocks.append(alloc.allocate())
            i += 1

    def _preempt(self, seq: _Sequence, preempted: list[_Sequence], alloc: BlockAllocator) -> None:
        self.last_stats["preemptions"] += 1
        alloc.release(seq.blocks)
        seq.blocks = []
        bisect.insort(preempted, seq, key=lambda s: s.order)

    def _admit(self, num_decodes, waiting, preempted, alloc, order, watermark) -> list[_Prefill]:
        """Prefills joining this step: preempted sequences first (oldest first), then new prompts in order."""
        bs = self.block_size
        budget = self.max_num_batched_tokens - num_decodes
        seats = self.max_num_seqs - num_decodes
        prefills: list[_Prefill] = []
        while seats > 0 and (preempted or waiting):
            idle = num_decodes == 0 and not prefills  # then anything that fits the whole cache may run
            reserve = 0 if idle else watermark
            if preempted:
                seq = preempted[0]
                length = seq.length
                need = _cdiv(length, bs)
                if (length > budget and not idle) or alloc.num_free - need < reserve:
                    break
                preempted.pop(0)
                seq.blocks = [alloc.allocate() for _ in range(need)]
                prefills.append(_Prefill([seq], seq.request.prompt + seq.tokens, []))
                budget -= length
                seats -= 1
                continue
            req, first, count = waiting[0]
            length = len(req.prompt)
            need = _cdiv(length, bs)
            spare = alloc.num_free - reserve - need
            if (length > budget and not idle) or spare < 0:
                break
            partial = length % bs != 0
            m = min(count, seats, 1 + spare if partial else count)
            prompt_blocks = [alloc.allocate() for _ in range(need)]
            seqs = [_Sequence(req, first, next(order), prompt_blocks)]
            copies = []
            for j in range(first + 1, first + m):
                blocks = [alloc.share(b) for b in prompt_blocks[: length // bs]]
                if partial:
                    blocks.append(alloc.allocate())
                    copies.append((prompt_blocks[-1], blocks[-1]))
                seqs.append(_Sequence(req, j, next(order), blocks))
            if m < count:
                waiting[0] = (req, first + m, count - m)
            else:
                waiting.popleft()
            prefills.append(_Prefill(seqs, req.prompt, copies))
            budget -= length
            seats -= m
        return prefills

    # ------------------------------------------------------------------ one step

    def _step(
        self, cache: PagedKVCache, prefills: list[_Prefill], decodes: list[_Sequence]
    ) -> tuple[list[int], list[float]]:
        """One forward over the packed prefills and decode tokens; returns the sampled token and log-prob per row."""
        bs, dev = self.block_size, self.device
        ids: list[int] = []
        positions: list[int] = []
        slot_parts: list[torch.Tensor] = []
        bounds = [0]
        offsets = torch.arange(bs)
        for pf in prefills:
            n = len(pf.token_ids)
            ids.extend(pf.token_ids)
            positions.extend(range(n))
            blocks = torch.tensor(pf.seqs[0].blocks, dtype=torch.int64)
            slot_parts.append((blocks[:, None] * bs + offsets).flatten()[:n])
            bounds.append(bounds[-1] + n)
        num_prefill = bounds[-1]
        tables, context = [], []
        for seq in decodes:
            p = seq.length - 1
            ids.append(seq.tokens[-1])
            positions.append(p)
            context.append(p + 1)
            tables.append(seq.blocks)
        decode_slots = [s.blocks[(s.length - 1) // bs] * bs + (s.length - 1) % bs for s in decodes]
        slot_parts.append(torch.tensor(decode_slots, dtype=torch.int64))
        host = torch.stack((torch.tensor(ids, dtype=torch.int64), torch.tensor(positions), torch.cat(slot_parts)))
        input_ids, pos, slots = host.to(dev, non_blocking=True)

        segs = None
        if prefills:
            cu = torch.tensor(bounds, dtype=torch.int32, device=dev)
            longest = max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
            segs = PackedSegments(cu_seqlens=cu, bounds=tuple(bounds), max_seqlen=longest)
        block_tables = context_lens = None
        if decodes:
            width = max(len(t) for t in tables)
            padded = [t + [0] * (width - len(t)) for t in tables]
            block_tables = torch.tensor(padded, dtype=torch.int64).to(dev, non_blocking=True)
            context_lens = torch.tensor(context, dtype=torch.int64).to(dev, non_blocking=True)
        last = [b - 1 for b in bounds[1:]] + list(range(num_prefill, num_prefill + len(decodes)))
        rows = torch.tensor(last, dtype=torch.int64).to(dev, non_blocking=True)

        logits = self._forward(cache, input_ids, pos, slots, segs, num_prefill, block_tables, context_lens, rows)

        copies = [c for pf in prefills for c in pf.copies]
        if copies:
            src, dst = torch.tensor(copies, dtype=torch.int64, device=dev).unbind(1)
            cache.copy_blocks(src, dst)
        seqs = [s for pf in prefills for s in pf.seqs] + decodes
        if logits is None:  # an earlier pipeline stage: the last one samples
            return self._receive_samples(len(seqs))

        # Sampling rows: a prefill's last logits row serves each of its sequences.
        row_of = [i for i, pf in enumerate(prefills) for _ in pf.seqs] + [
            len(prefills) + j for j in range(len(decodes))
        ]
        if len(row_of) != logits.shape[0]:
            logits = logits[torch.tensor(row_of, device=dev)]
        params = [s.request.params for s in seqs]
        if all(p.temperature == 0 for p in params):
            # All rows greedy (known on the host): argmax, skipping the sampler's CDF over the vocabulary.
            tokens = logits.argmax(dim=-1)
            logprobs = torch.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, None]).squeeze(1)
        else:
            tokens, logprobs = sample_tokens(
                logits,
                torch.tensor([p.temperature for p in params], device=dev),
                torch.tensor([p.top_p for p in params], device=dev),
                torch.tensor([p.top_k for p in params], dtype=torch.int64, device=dev),
                torch.tensor([s.seed for s in seqs], dtype=torch.int64, device=dev),
                torch.tensor([len(s.tokens) for s in seqs], dtype=torch.int64, device=dev),
            )
        if self.pp > 1:
            self._send_samples(tokens, logprobs)
        # One host sync per step: the scheduler needs the tokens to decide who stops.
        return tokens.tolist(), logprobs.tolist()

    def _send_samples(self, tokens: torch.Tensor, logprobs: torch.Tensor) -> None:
        """Last stage: broadcast the step's tokens and log-probs (float64 [2, R]; ids < 2**53 are exact)."""
        both = torch.stack((tokens.double(), logprobs.double()))
        dist.broadcast(both, src=parallel.last_stage_rank(), group=parallel.pp_group())

    def _receive_samples(self, rows: int) -> tuple[list[int], list[float]]:
        """Earlier stages: the last stage's tokens and log-probs of this step."""
        both = torch.empty(2, rows, dtype=torch.float64, device=self.device)
        dist.broadcast(both, src=parallel.last_stage_rank(), group=parallel.pp_group())
        return both[0].long().tolist(), both[1].tolist()

    def _forward(self, cache, input_ids, pos, slots, segs, num_prefill, block_tables, context_lens, rows):
        """Logits [R, V] (gathered over TP, real vocabulary only) at ``rows`` of the packed tokens; writes their
        K/V into ``cache``.

        With pipeline parallelism each stage runs its own layers on the activation [T, H] received
        from the previous stage and sends its output on; only the last stage returns logits (None
        elsewhere).
        """
        model, spec = self.model, self.model.spec
        d = spec.head_dim
        if model.is_first_stage:
            x = model.embed(input_ids)
        else:
            x = torch.empty(input_ids.shape[0], spec.hidden_size, dtype=self.dtype, device=self.device)
            dist.recv(x, src=parallel.stage_rank(-1))
        cos, sin = rope_cos_sin(pos, d, spec.rope_theta, x.dtype)
        t = x.shape[0]
        for i, layer in enumerate(model.layers):
            qkv = _column(layer.qkv, layer.input_layernorm(x))
            q, k, v = qkv.view(t, -1, d).split([layer.q_heads, layer.kv_heads, layer.kv_heads], dim=1)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            cache.write(i, k, v, slots)
            parts = []
            n = num_prefill
            if n:
                parts.append(packed_causal_attention(q[:n], k[:n], v[:n], segs))
            if n < t:
                parts.append(paged_decode_attention(q[n:], cache.k(i), cache.v(i), block_tables, context_lens))
            attn = parts[0] if len(parts) == 1 else torch.cat(parts)
            x = x + _row(layer.o_proj, attn.reshape(t, -1), self._tp_group)
            gate, up = _column(layer.gate_up, layer.post_attention_layernorm(x)).chunk(2, dim=-1)
            x = x + _row(layer.down, F.silu(gate) * up, self._tp_group)
        if not model.is_last_stage:
            dist.send(x.contiguous(), dst=parallel.stage_rank(1))
            return None
        return model.logits(model.norm(x[rows]))

    # ------------------------------------------------------------------ stopping

    def _append(self, seq: _Sequence, token: int, logprob: float) -> bool:
        """Record a sampled token; True (and the completion stored) when the sequence is finished."""
        seq.tokens.append(token)
        seq.logprobs.append(logprob)
        req = seq.request
        reason: Literal["stop", "length"] | None = None
        cut = False
        if token in req.stop_ids:
            reason = "stop"
        elif req.params.stop and self._stop_string_hit(seq):
            reason, cut = "stop", True
        elif seq.length >= req.max_len:
            reason = "length"
        if reason is None:
            return False
        text = None
        if self.tokenizer is not None:
            text = seq.text if cut else self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        req.completions[seq.sample] = Completion(
            token_ids=seq.tokens, logprobs=seq.logprobs, finish_reason=reason, text=text
        )
        return True

    def _stop_string_hit(self, seq: _Sequence) -> bool:
        """Extend ``seq.text`` by the newly decodable characters; on a stop string cut the text after it."""
        tok, ids = self.tokenizer, seq.tokens
        # Decoding a short window from the last emitted tokens keeps per-step work constant; a
        # trailing U+FFFD means an unfinished multi-byte character, emitted once complete.
        prefix = tok.decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=True)
        window = tok.decode(ids[seq.prefix_offset :], skip_special_tokens=True)
        if len(window) <= len(prefix) or window.endswith("\ufffd"):
            return False
        start = max(0, len(seq.text) - seq.request.max_stop_chars + 1)
        seq.text += window[len(prefix) :]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        end = find_stop(seq.text, seq.request.params.stop, start)
        if end == -1:
            return False
        seq.text = seq.text[:end]
        return True
