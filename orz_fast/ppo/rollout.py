"""The rollout side of a step: the engine, the prompt sets and their samplers, and the reward.

:meth:`Rollout.generate` takes the step's prompts from the seeded sampler of the step's stage (the
training set, or the annealing stage's prompts once ``train.steps`` are done), generates this rollout
rank's share (the native engine: each data-parallel replica, with the policy's own tensors; vLLM:
every rank, after the new weights are pushed), scores it (a truncated response scores 0) and
returns it as an :class:`~orz_fast.ppo.experience.Experience` on the compute device. What the
trainer records of the step besides (its collapse signals, a sample of responses) is left in
:attr:`Rollout.last`.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from orz_fast.config import Config
from orz_fast.data import EncodedPrompt
from orz_fast.eval import evaluate
from orz_fast.parallel import collectives
from orz_fast.ppo.experience import Experience, from_completions, step_prompts
from orz_fast.ppo.records import answer_stats
from orz_fast.ppo.schedule import PromptSampler
from orz_fast.reward import RewardScorer, extract_answer
from orz_fast.rollout import NativeEngine, SamplingParams, VllmEngine
from orz_fast.rollout.kv_budget import kv_cache_bytes
from orz_fast.rollout.vllm_model_dir import write_vllm_model_dir


@dataclass
class StepRecord:
    """What :meth:`Rollout.generate` leaves for the trainer's records of a step."""

    stage: str
    """``train`` or ``anneal``: which prompt set the step drew from."""
    rows: list[int]
    """The prompt-set row of each prompt slot."""
    metrics: dict[str, float]
    """The collapse signals (:func:`~orz_fast.ppo.records.answer_stats`), the same on every rank."""
    top_answers: list[tuple[str, int]]
    """The step's most common extracted answers and their counts."""
    samples: list[dict[str, Any]] = field(default_factory=list)
    """Responses for ``samples.jsonl`` (only on steps that write one, on rollout rank 0)."""


class Rollout:
    """Engine, prompt sets, samplers and scorer of a run.

    Args:
        prompts: the training set; anneal_prompts: the annealing stage's (``None`` without the stage).

    Attributes:
        group: the rollout group (the ranks whose generations make up the step; None: this rank alone).
        dp_ranks: the data-parallel rank of every member of ``group`` (who trains on what it generated).
        sampler, anneal_sampler: the seeded samplers over ``prompts`` and ``anneal_prompts``; their
            positions are checkpointed.
        last: the :class:`StepRecord` of the latest :meth:`generate`.
    """

    def __init__(
        self,
        cfg: Config,
        policy: torch.nn.Module,
        tokenizer,
        *,
        device: torch.device,
        dp_rank: int,
        dp_size: int,
        dp_group: collectives.Group,
        prompts: list[EncodedPrompt],
        anneal_prompts: list[EncodedPrompt] | None = None,
    ) -> None:
        self.cfg, self.policy, self.tokenizer, self.device = cfg, policy, tokenizer, device
        if cfg.rollout.engine == "vllm":
            # One engine per GPU, each generating its share of the step's prompts (shared over all ranks).
            self.engine = self._build_vllm_engine()
            self.rank, self.size = dist.get_rank(), dist.get_world_size()
            self.group = dist.group.WORLD if self.size > 1 else None
        else:
            # The native engine decodes with the model's own shards: each data-parallel replica generates.
            self.engine = NativeEngine(policy, tokenizer=tokenizer, kv_cache_bytes=kv_cache_bytes(cfg.rollout, device))
            self.rank, self.size, self.group = dp_rank, dp_size, dp_group
        mine = torch.tensor([dp_rank], device=collectives.device(self.group))
        self.dp_ranks = [int(t) for t in collectives.all_gather_varlen(mine, self.group)]

        self.prompts, self.anneal_prompts = prompts, anneal_prompts
        self.sampler = PromptSampler(len(prompts), cfg.train.seed)
        # A seed of its own: the stage's order does not depend on how many training prompts were drawn.
        self.anneal_sampler = PromptSampler(len(anneal_prompts), cfg.train.seed + 1) if anneal_prompts else None
        self.scorer = RewardScorer(mode=cfg.reward.mode, timeout=cfg.reward.timeout, workers=cfg.reward.workers)
        self.last: StepRecord | None = None

    def _build_vllm_engine(self) -> VllmEngine:
        """This rank's vLLM engine, serving the policy's architecture (weights come from the pushes)."""
        cfg, spec = self.cfg, self.policy.spec
        model_dir = cfg.model.path
        if model_dir is None:  # random weights: vLLM reads the config and the tokenizer from a directory
            self._vllm_dir = tempfile.TemporaryDirectory(prefix="orz_fast-vllm-")
            model_dir = write_vllm_model_dir(spec.hf_config, self.tokenizer, self._vllm_dir.name)
        max_model_len = cfg.data.max_prompt_tokens + cfg.rollout.max_tokens
        if spec.hf_config.get("max_position_embeddings"):
            max_model_len = min(max_model_len, int(spec.hf_config["max_position_embeddings"]))
        # vLLM allocates its whole budget when it starts: no more than the step's samples can fill.
        seqs = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
        dtype = next(self.policy.parameters()).dtype
        per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * dtype.itemsize
        budget = min(kv_cache_bytes(cfg.rollout, self.device), seqs * (max_model_len + 16) * per_token)
        return VllmEngine(
            model_dir,
            kv_cache_bytes=budget,
            dtype=str(dtype).removeprefix("torch."),
            max_model_len=max_model_len,
            seed=cfg.train.seed,
        )

    def close(self) -> None:
        """Release the scorer's workers and the vLLM engine (its worker process and shared memory)."""
        self.scorer.close()
        if isinstance(self.engine, VllmEngine):
            self.engine.shutdown()

    def stage(self, step: int) -> str:
        """``anneal`` for the steps after ``train.steps`` when the annealing stage is on, else ``train``."""
        return "anneal" if self.anneal_sampler is not None and step >= self.cfg.train.steps else "train"

    def prompt_set(self, stage: str) -> tuple[list[EncodedPrompt], PromptSampler]:
        """The prompts and the sampler of ``stage``."""
        return (self.anneal_prompts, self.anneal_sampler) if stage == "anneal" else (self.prompts, self.sampler)

    def generate(self, step: int) -> Experience:
        """Generate and score this rollout rank's share of step ``step``'s prompts (0-based step), drawn from the
        step's stage's prompt set; :attr:`last` gets the step's record."""
        r = self.cfg.rollout
        stage = self.stage(step)
        prompt_set, sampler = self.prompt_set(stage)
        chosen = sampler.take(r.prompts_per_step)
        mine = list(range(self.rank, len(chosen), self.size))
        n = r.samples_per_prompt
        stop_ids = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        params = [
            SamplingParams(
                n=n,
                temperature=r.temperature,
                top_p=r.top_p,
                top_k=r.top_k,
                max_tokens=r.max_tokens,
                stop=list(r.stop),
                stop_token_ids=stop_ids,
                # Seeds depend only on (run seed, step, prompt slot): a resumed run samples the same tokens.
                seed=((self.cfg.train.seed * 1_000_003 + step) * r.prompts_per_step + g) * n,
            )
            for g in mine
        ]
        with self.engine_ready():
            outputs = self.engine.generate([prompt_set[chosen[g]].token_ids for g in mine], params)
        texts = [c.text for group in outputs for c in group]
        reasons = [c.finish_reason for group in outputs for c in group]
        truths = [prompt_set[chosen[g]].problem.answer for g, group in zip(mine, outputs, strict=True) for _ in group]
        scores = self.scorer.score_batch(texts, truths, finish_reasons=reasons)
        answers = [extract_answer(t) if t is not None else None for t in texts]
        groups = [[c.text if c.text is not None else c.token_ids for c in group] for group in outputs]
        metrics, top = answer_stats(groups, answers, self.group)
        self.last = StepRecord(stage, chosen, metrics, top)
        every = self.cfg.logging.samples_every
        if self.rank == 0 and every and (step + 1) % every == 0:
            self.last.samples = self._sample_responses(
                [prompt_set[chosen[g]] for g in mine], outputs, [chosen[g] for g in mine], scores, answers
            )
        tokens, offsets = step_prompts([prompt_set[i].token_ids for i in chosen], self.device)
        return from_completions(outputs, mine, tokens, offsets, scores, prompt_rows=chosen)

    def _sample_responses(
        self,
        prompts: Sequence[EncodedPrompt],
        outputs: Sequence[Sequence],
        rows: Sequence[int],
        scores: Sequence[float],
        answers: Sequence[str | None],
    ) -> list[dict[str, Any]]:
        """``logging.samples_shown`` of this rank's responses, the first sample of each prompt first."""
        n = self.cfg.rollout.samples_per_prompt
        picks = [(g, j) for j in range(n) for g in range(len(prompts))][: self.cfg.logging.samples_shown]
        out = []
        for g, j in picks:
            c, k = outputs[g][j], g * n + j
            out.append(
                {
                    "row": rows[g],
                    "source": prompts[g].problem.source,
                    "index": prompts[g].problem.index,
                    "sample": j,
                    "problem": prompts[g].problem.prompt,
                    "ground_truth": prompts[g].problem.answer,
                    "response": c.text if c.text is not None else self.tokenizer.decode(c.token_ids),
                    "answer": answers[k],
                    "score": float(scores[k]),
                    "response_tokens": len(c.token_ids),
                    "finish_reason": c.finish_reason,
                }
            )
        return out

    @contextlib.contextmanager
    def engine_ready(self) -> Iterator[None]:
        """The rollout engine ready to generate with the current policy, for the duration of the block.

        Native engine: the policy in eval mode (same tensors, nothing to copy). vLLM: the new weights
        pushed (bucketed: CUDA IPC on GPU, shared memory on CPU), then the KV cache woken; afterwards
        the engine sleeps so training gets the memory back (where vLLM has sleep mode). On CUDA the
        allocator's cached blocks are returned first, so the KV cache is sized from all the memory
        training is not holding.
        """
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if isinstance(self.engine, VllmEngine):
            self.engine.update_weights(self.policy, bucket_bytes=self.cfg.rollout.weight_sync_bucket_mb << 20)
            self.engine.wake_up(("kv_cache",))
        self.policy.eval()
        try:
            yield
        finally:
            self.policy.train()
            if isinstance(self.engine, VllmEngine):
                self.engine.sleep()

    def evaluate(self, eval_sets: Sequence, *, step: int, out_dir: Path | None) -> dict[str, float]:
        """The policy on every ``(name, problems)`` eval set (all ranks run it; data-parallel replicas repeat it):
        ``eval/<set>/...`` metrics; with ``out_dir``, the per-problem results are written there."""
        r, metrics = self.cfg.rollout, {}
        with self.engine_ready():
            for name, problems in eval_sets:
                report = evaluate(
                    self.engine,
                    self.tokenizer,
                    problems,
                    samples=self.cfg.eval.samples,
                    max_tokens=r.max_tokens,
                    temperature=r.temperature,
                    top_p=r.top_p,
                    stop=r.stop,
                    template=self.cfg.data.template,
                    seed=self.cfg.train.seed * 1_000_003 + step,
                    scorer=self.scorer,
                    dataset=name,
                    out_dir=out_dir,
                )
                metrics |= report.metrics()
        return metrics
