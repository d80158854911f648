"""Native rollout engine: paged-KV continuous batching on the policy module's own parameters.

Three small pieces, one per job:

- :class:`~orz_fast.rollout.scheduler.Scheduler` (host only): admission, KV blocks, prefix sharing
  across a prompt's ``n`` samples, preemption, mixed prefill + decode steps;
- :class:`~orz_fast.rollout.model_runner.ModelRunner`: runs a step through the policy's own
  forward (the training code, under a paged attention context; it reads the very parameter
  tensors the optimizer updates: no copy, no resharding, any TP x PP layout) and samples from the
  trainer's LM-head path, so the sampling log-probs are the trainer's log-probs of the sampled
  tokens (:mod:`orz_fast.models.lm_head`);
- :class:`~orz_fast.rollout.stopping.StopChecker`: stop token ids, stop strings (incremental
  detokenisation), ``max_tokens`` and the context limit.

One ``generate`` call sizes a paged KV cache from a memory budget (``kv_cache_bytes``, see
:mod:`orz_fast.rollout.kv_budget`; capped at what the requests can use), allocates it, runs steps
until every request is done and releases the cache. Sampling is counter-based (a hash of the
sequence's seed and position), so a sequence's tokens do not depend on its batch, its admission
order or a preemption, up to floating-point rounding; a padding id of a padded vocabulary is never
sampled (the LM head's logits cover the real vocabulary only).

Decode attention reads each cached K/V block once per step (flash-attn's paged call, a Triton
kernel or, on CPU, SDPA over views of the cache: :mod:`orz_fast.models.paged`); ``last_stats``
reports the bytes it read beside the per-sequence minimum. Not done: CUDA-graph capture of decode
steps.
"""

from __future__ import annotations

from typing import get_args

import numpy as np
import torch
import torch.distributed as dist

from orz_fast import parallel
from orz_fast.config import RolloutConfig
from orz_fast.models.decoder import PolicyModel
from orz_fast.models.paged import DecodeBackend
from orz_fast.rollout.kv_budget import kv_cache_bytes as resolve_kv_cache_bytes
from orz_fast.rollout.model_runner import ModelRunner
from orz_fast.rollout.sampling import Completion, SamplingParams, params_per_prompt
from orz_fast.rollout.scheduler import Request, Scheduler, Sequence, cdiv
from orz_fast.rollout.stopping import StopChecker


class StepOutputs:
    """Every step's sampled tokens and log-probs, kept as that step's arrays on the device, with the sequence
    (admission order) and output position of each row on the host. At the end of ``generate`` one copy to the
    host and one scatter lay every sequence's outputs end to end in two flat buffers (int64 ids, fp32
    log-probs); each :class:`Completion` holds views of its slice.

    A preempted sequence keeps the tokens it had (it is recomputed, not resampled), so each sequence's rows
    over the steps are exactly its outputs, at positions 0, 1, ... in step order: a row's position is the
    count of its sequence's earlier rows (one vectorised update per step)."""

    def __init__(self, num_seqs: int) -> None:
        self.counts = np.zeros(num_seqs, dtype=np.int64)
        """Rows recorded so far per sequence (admission order); at the end, each sequence's output length."""
        self.orders: list[np.ndarray] = []
        self.positions: list[np.ndarray] = []
        self.tokens: list[torch.Tensor] = []
        self.logprobs: list[torch.Tensor] = []

    def add(self, seqs: list[Sequence], tokens: torch.Tensor, logprobs: torch.Tensor) -> None:
        """One step's rows (``seqs`` distinct, in row order)."""
        orders = np.fromiter((s.order for s in seqs), dtype=np.int64, count=len(seqs))
        self.orders.append(orders)
        self.positions.append(self.counts[orders])
        self.counts[orders] += 1
        self.tokens.append(tokens)
        self.logprobs.append(logprobs)

    def completions(self, requests: list[Request], *, with_text: bool) -> list[list[Completion]]:
        """Per request, the completions of its finished samples in sample order."""
        for r in requests:
            for s in r.finished:
                if s is None:
                    raise RuntimeError("generate ended with an unfinished sample")
                if len(s.tokens) != self.counts[s.order]:
                    raise RuntimeError(f"a sample has {len(s.tokens)} tokens but {self.counts[s.order]} sampled rows")
        starts = np.zeros(len(self.counts) + 1, dtype=np.int64)
        np.cumsum(self.counts, out=starts[1:])
        dest = starts[np.concatenate(self.orders)] + np.concatenate(self.positions)
        token_ids = np.empty(len(dest), dtype=np.int64)
        logprobs = np.empty(len(dest), dtype=np.float32)
        token_ids[dest] = torch.cat(self.tokens).cpu().numpy()
        logprobs[dest] = torch.cat(self.logprobs).cpu().numpy()
        out = []
        for r in requests:
            group = []
            for s in r.finished:
                a, b = starts[s.order], starts[s.order + 1]
                group.append(
                    Completion(
                        token_ids=token_ids[a:b],
                        logprobs=logprobs[a:b],
                        finish_reason=s.finish_reason,
                        text=s.text if with_text else None,
                    )
                )
            out.append(group)
        return out


def _check_plain_tp_linears(model: PolicyModel) -> None:
    """Without autograd the layers apply their TP linears as plain GEMMs (+ all-reduce); refuse other megatron
    modes."""
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
        decode_attention: ``"flash_attn"``, ``"triton"`` or ``"torch"``; ``None`` picks per step
            (:func:`orz_fast.models.paged.decode_backend`: flash-attn's paged call on CUDA when it
            applies, else the Triton kernel; the SDPA path on CPU). ``"triton"`` on CPU tensors needs
            the kernels in Triton's interpreter (tests).
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
        decode_attention: DecodeBackend | None = None,
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
        if decode_attention not in (None, *get_args(DecodeBackend)):
            raise ValueError(
                f"decode_attention must be None or one of {get_args(DecodeBackend)}, got {decode_attention!r}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.kv_cache_bytes = kv_cache_bytes
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = int(max_model_len)
        # Every rank of the replica (all TP ranks of all stages) runs the same scheduler on the same
        # tokens; the last stage samples them and broadcasts them along the pipeline.
        self._mp_group = parallel.mp_group() if parallel.tp_size() * parallel.pp_size() > 1 else None
        self.runner = ModelRunner(model, decode_attention=decode_attention)
        self.device = self.runner.device
        self.last_stats: dict[str, int] = {}
        """Counters of the last ``generate``: steps, prefill / decode tokens, preemptions, KV blocks and block size,
        and the K/V bytes this rank's decode attention read (``kv_bytes_read``) beside the least that reading each
        decode sequence's context once per layer would (``kv_bytes_min``)."""

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
        scheduler = Scheduler(
            requests,
            num_blocks=num_blocks,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
        )
        stop = StopChecker(self.tokenizer)
        runner = self.runner
        runner.kv_bytes_read = runner.kv_bytes_min = 0
        stats = dict.fromkeys(("steps", "prefill_tokens", "decode_tokens"), 0)
        outputs = StepOutputs(sum(r.params.n for r in requests))
        cache = runner.new_cache(num_blocks, self.block_size)
        try:
            while not scheduler.done:
                step = scheduler.schedule()
                tokens, logprobs = runner.run(cache, step)
                outputs.add(step.sequences, tokens, logprobs)
                stats["steps"] += 1
                stats["prefill_tokens"] += sum(len(pf.token_ids) for pf in step.prefills)
                stats["decode_tokens"] += len(step.decodes)
                # One host sync per step: the scheduler needs the tokens to decide who stops.
                scheduler.update(step, tokens.tolist(), stop)
        finally:
            del cache  # the cache is the rollout's alone: training gets the memory back
        self.last_stats = {
            **stats,
            "preemptions": scheduler.preemptions,
            "kv_blocks": num_blocks,
            "block_size": self.block_size,
            "kv_bytes_read": runner.kv_bytes_read,
            "kv_bytes_min": runner.kv_bytes_min,
        }
        return outputs.completions(requests, with_text=self.tokenizer is not None)

    # ------------------------------------------------------------------ setup

    def _make_requests(self, prompts, params) -> list[Request]:
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
                Request(
                    prompt=ids,
                    params=p,
                    seed=0,
                    max_len=min(len(ids) + p.max_tokens, self.max_model_len),
                    stop_ids=frozenset(p.stop_token_ids),
                    max_stop_chars=max((len(s) for s in p.stop), default=0),
                )
            )
        self._assign_seeds(requests)
        return requests

    def _assign_seeds(self, requests: list[Request]) -> None:
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

    def _num_blocks(self, requests: list[Request]) -> int:
        """Blocks to allocate: the budget's, capped at the requests' peak; ValueError when one sequence can't fit."""
        bs = self.block_size
        per_block = self.runner.bytes_per_block(bs)
        budget = self.kv_cache_bytes
        if budget is None:
            budget = resolve_kv_cache_bytes(RolloutConfig(), self.device)
        budget_blocks = budget // per_block
        if self._mp_group is not None:  # every rank must schedule identically, so all use the smallest budget
            t = torch.tensor([budget_blocks], dtype=torch.int64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self._mp_group)
            budget_blocks = int(t.item())
        longest = max(requests, key=lambda r: r.max_len)
        need_one = cdiv(longest.max_len, bs)
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
            peak += shared + r.params.n * (cdiv(r.max_len, bs) - shared)
        return min(budget_blocks, peak)
