"""Model runner of the native engine: one scheduled step through the policy's own forward, then sampling.

A step's tokens (whole prompts, then one token per decoding sequence) go through the policy
model's forward under a :class:`~orz_fast.models.paged.PagedAttention` context: the same layers,
weights and code as training, with the K/V written to and read from the paged cache. The last
stage's hidden states of the sampled rows go through the LM head as the trainer's log-prob ops take
it (:mod:`orz_fast.models.lm_head`): the fp32 logits are sampled from, and each sampled token's
log-prob is the trainer's reduction of the same logits.

Tensor parallelism: every rank computes with its shards (row-parallel outputs all-reduced inside
the layers, the fp32 logits gathered over TP for sampling, which is counter-seeded and so the same
on every rank). Pipeline parallelism: each stage runs its layers on the activation [T, H] received
from the previous stage and sends its output on; the last stage samples and broadcasts the tokens
and log-probs along the pipeline. The stages take turns (no micro-batch overlap within a step).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from orz_fast import parallel
from orz_fast.models.attention import PackedSegments
from orz_fast.models.decoder import PolicyModel
from orz_fast.models.lm_head import lm_head_shard
from orz_fast.models.paged import DecodeBackend, DecodeRows, PagedAttention
from orz_fast.rollout.kv_cache import PagedKVCache
from orz_fast.rollout.sampling import sample_tokens
from orz_fast.rollout.scheduler import ScheduledStep


class ModelRunner:
    """Runs :class:`~orz_fast.rollout.scheduler.ScheduledStep` s on ``model`` (this rank's TP / PP shard);
    ``decode_attention`` forces a decode attention implementation (``PagedAttention``'s ``backend``)."""

    def __init__(self, model: PolicyModel, *, decode_attention: DecodeBackend | None = None) -> None:
        self.model = model
        self.decode_attention = decode_attention
        self.pp = parallel.pp_size()
        first_param = next(model.layers[0].parameters())
        self.dtype = first_param.dtype
        self.device = first_param.device
        self.kv_heads = model.layers[0].kv_heads
        self.num_layers = len(model.layers)
        self.kv_bytes_read = 0
        """K/V bytes this rank's decode attention read since the counters were reset."""
        self.kv_bytes_min = 0
        """The least it could have read: each decode sequence's context once per layer."""

    def bytes_per_block(self, block_size: int) -> int:
        return PagedKVCache.bytes_per_block(
            num_layers=self.num_layers,
            block_size=block_size,
            kv_heads=self.kv_heads,
            head_dim=self.model.spec.head_dim,
            dtype=self.dtype,
        )

    def new_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        return PagedKVCache(
            num_layers=self.num_layers,
            num_blocks=num_blocks,
            block_size=block_size,
            kv_heads=self.kv_heads,
            head_dim=self.model.spec.head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    @torch.inference_mode()
    def run(self, cache: PagedKVCache, step: ScheduledStep) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over the step's packed tokens; returns the sampled tokens (int64 [R]) and their log-probs
        (fp32 [R]), one per sequence in ``step.sequences`` order, on the model's device (no host sync here)."""
        attention, input_ids = self._attention_context(cache, step)
        hidden = self._forward(input_ids, attention)
        self.kv_bytes_read += attention.kv_bytes_read
        self.kv_bytes_min += attention.kv_bytes_min
        copies = [c for pf in step.prefills for c in pf.copies]
        if copies:
            src, dst = torch.tensor(copies, dtype=torch.int64, device=self.device).unbind(1)
            cache.copy_blocks(src, dst)
        seqs = step.sequences
        if hidden is None:  # an earlier pipeline stage: the last one samples
            return self._receive_samples(len(seqs))
        if len(seqs) != hidden.shape[0]:  # a prefill's last row serves each of its sequences
            row_of = [i for i, pf in enumerate(step.prefills) for _ in pf.seqs]
            row_of += range(len(step.prefills), hidden.shape[0])
            hidden = hidden[torch.tensor(row_of, device=self.device)]
        tokens, logprobs = self._sample(hidden, seqs)
        if self.pp > 1:
            self._send_samples(tokens, logprobs)
        return tokens, logprobs

    def _attention_context(self, cache: PagedKVCache, step: ScheduledStep) -> tuple[PagedAttention, torch.Tensor]:
        bs, dev = cache.block_size, self.device
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        bounds = [0]
        for pf in step.prefills:
            n = len(pf.token_ids)
            ids.extend(pf.token_ids)
            positions.extend(range(n))
            blocks = pf.seqs[0].blocks
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(n))
            bounds.append(bounds[-1] + n)
        num_prefill = bounds[-1]
        for seq in step.decodes:
            p = seq.length - 1
            ids.append(seq.tokens[-1])
            positions.append(p)
            slots.append(seq.blocks[p // bs] * bs + p % bs)
        rows = [b - 1 for b in bounds[1:]] + list(range(num_prefill, num_prefill + len(step.decodes)))
        host = torch.tensor([ids, positions, slots], dtype=torch.int64)
        input_ids, pos, slot_t = host.to(dev, non_blocking=True)
        prefill = None
        if step.prefills:
            longest = max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
            cu = torch.tensor(bounds, dtype=torch.int32).to(dev, non_blocking=True)
            prefill = PackedSegments(cu_seqlens=cu, bounds=tuple(bounds), max_seqlen=longest)
        decode = None
        if step.decodes:
            decode = DecodeRows(tables=[s.blocks for s in step.decodes], context_lens=[s.length for s in step.decodes])
        attention = PagedAttention(
            cache.data,
            positions=pos,
            slots=slot_t,
            prefill=prefill,
            decode=decode,
            output_rows=torch.tensor(rows, dtype=torch.int64).to(dev, non_blocking=True),
            backend=self.decode_attention,
        )
        return attention, input_ids

    def _forward(self, input_ids: torch.Tensor, attention: PagedAttention) -> torch.Tensor | None:
        """Hidden states [R, H] of the sampled rows on the last stage (None elsewhere); K/V written to the cache."""
        model = self.model
        if model.is_first_stage:
            out = model(input_ids, attention=attention)
        else:
            x = torch.empty(input_ids.shape[0], model.spec.hidden_size, dtype=self.dtype, device=self.device)
            dist.recv(x, src=parallel.stage_rank(-1))
            model.set_input_tensor(x)
            try:
                out = model(None, attention=attention)
            finally:
                model.set_input_tensor(None)
        if not model.is_last_stage:
            dist.send(out.contiguous(), dst=parallel.stage_rank(1))
            return None
        return out

    def _sample(self, hidden: torch.Tensor, seqs) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (int64 [R]) drawn from the fp32 LM-head logits, and their log-probs (fp32 [R]) from the trainer's
        reduction of those logits at the row's temperature (1 for greedy rows)."""
        dev = self.device
        params = [s.request.params for s in seqs]
        temps = [p.temperature for p in params]
        shard = lm_head_shard(self.model, hidden)
        full = shard.fp32_logits()
        if all(t == 0 for t in temps):
            # All rows greedy (known on the host): argmax, skipping the sampler's CDF over the vocabulary.
            tokens = full.argmax(dim=-1)
        else:
            tokens = sample_tokens(
                full,
                torch.tensor(temps, device=dev),
                torch.tensor([p.top_p for p in params], device=dev),
                torch.tensor([p.top_k for p in params], dtype=torch.int64, device=dev),
                torch.tensor([s.seed for s in seqs], dtype=torch.int64, device=dev),
                torch.tensor([len(s.tokens) for s in seqs], dtype=torch.int64, device=dev),
            )
        scoring = [t if t > 0 else 1.0 for t in temps]
        groups = sorted(set(scoring))
        if len(groups) == 1:
            return tokens, shard.logprobs(tokens, groups[0])
        logprobs = torch.empty(len(seqs), dtype=torch.float32, device=dev)
        for t in groups:
            idx = torch.tensor([i for i, s in enumerate(scoring) if s == t], device=dev)
            logprobs[idx] = shard.rows(idx).logprobs(tokens[idx], t)
        return tokens, logprobs

    def _send_samples(self, tokens: torch.Tensor, logprobs: torch.Tensor) -> None:
        """Last stage: broadcast the step's tokens and log-probs (float64 [2, R]; ids < 2**53 are exact)."""
        both = torch.stack((tokens.double(), logprobs.double()))
        dist.broadcast(both, src=parallel.last_stage_rank(), group=parallel.pp_group())

    def _receive_samples(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Earlier stages: the last stage's tokens (int64) and log-probs (fp32, exact: they were fp32) of this step."""
        both = torch.empty(2, rows, dtype=torch.float64, device=self.device)
        dist.broadcast(both, src=parallel.last_stage_rank(), group=parallel.pp_group())
        return both[0].long(), both[1].float()
