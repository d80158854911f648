"""The ORZ PPO loop: build everything from a :class:`Config`, then one step after another.

One step (every rank runs the same code; tensor- and pipeline-parallel ranks of a replica hold
identical data):

1. rollout: take ``prompts_per_step`` prompts from the seeded sampler and generate
   ``samples_per_prompt`` responses for this rank's share (the native engine: each data-parallel
   replica with the policy's own parameters; vLLM: every rank, after the new weights are pushed);
   score them (a truncated response scores 0); the result is an
   :class:`~orz_fast.ppo.experience.Experience`, flat tensors plus offsets on the device;
2. balance: every rank checks every sample of the step, and the samples are re-split over
   data-parallel ranks by workload with tensor collectives (:mod:`orz_fast.ppo.balance`);
3. critic values at every action (forward only), then GAE and whitening over the whole step on
   the device (:mod:`orz_fast.ppo.advantages`);
4. one policy optimizer step over token-budget micro-batches, the old log-probs being the
   rollout's own or the trainer's (``ppo.rollout_correction``; recomputed only when
   ``policy_updates_per_step`` > 1), measuring the rollout–trainer log-prob gap in the same pass, then
   ``critic_updates_per_step`` critic steps over shuffled mini-batches (:mod:`orz_fast.ppo.update`).

A step whose gradient norm is NaN or inf is skipped (weights and moments untouched) and logged.

With ``optim.anneal.enabled`` the run goes on for ``optim.anneal.steps`` steps after ``train.steps``,
drawing every prompt from ``optim.anneal.data`` with the policy lr decaying linearly to
``optim.anneal.final_policy_lr``. Every step appends its prompts' scores to ``rollouts.jsonl`` (and
every ``logging.samples_every`` steps a sample of responses to ``samples.jsonl``: :mod:`orz_fast.ppo.records`).

Everything a run reads is checked before any model is built: the checkpoint files (``model.path``,
``model.critic_path``), the tokenizer (an EOS token; every stop string encodable), and the prompt sets
(:func:`orz_fast.data.load_prompt_set`), so a bad input fails in seconds with the file or setting named.
"""

from __future__ import annotations

import json
import os
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from orz_fast import parallel
from orz_fast.config import Config
from orz_fast.data import load_prompt_set
from orz_fast.data.char_tokenizer import CharTokenizer
from orz_fast.data.tokenizer import load_tokenizer
from orz_fast.eval import load_eval_set
from orz_fast.metrics import MetricsLogger
from orz_fast.models import save_pretrained
from orz_fast.models.checkpoint import check_checkpoint, model_from_config
from orz_fast.ppo.advantages import compute_advantages
from orz_fast.ppo.balance import balance, check_samples
from orz_fast.ppo.checkpointing import CheckpointManager, rng_state, set_rng_state
from orz_fast.ppo.checks import check_layout, check_tokenizer, model_spec
from orz_fast.ppo.experience import Experience
from orz_fast.ppo.optim import ShardedAdamW
from orz_fast.ppo.records import RolloutLog, format_sample
from orz_fast.ppo.rollout import Rollout
from orz_fast.ppo.schedule import PromptSampler, copy_trunk, lr_at, peak_memory_gb
from orz_fast.ppo.update import Updater
from orz_fast.ppo.warmup import format_warmup
from orz_fast.rollout.vllm_model_dir import char_tokenizer_as_hf

__all__ = ["PromptSampler", "Trainer", "check_layout", "check_tokenizer", "lr_at", "model_spec"]


class Trainer:
    """Builds the models, engine, optimizers and data from a :class:`Config` and runs the PPO loop."""

    def __init__(self, cfg: Config, out_dir: str | Path, *, resume: bool = False) -> None:
        self.cfg = cfg
        self.out = Path(out_dir)
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        check_checkpoint(cfg.model.path, "model.path")
        check_checkpoint(cfg.model.critic_path, "model.critic_path")
        check_layout(cfg, world)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(cfg.train.seed)
        parallel.initialize(cfg.parallel.tp, cfg.parallel.pp)
        self.rank = dist.get_rank()
        self.dp, self.dp_rank = parallel.dp_size(), parallel.dp_rank()
        self.dp_group = parallel.dp_group() if self.dp > 1 else None
        self.tp_group = parallel.tp_group() if parallel.tp_size() > 1 else None
        self.is_logger = self.rank == 0

        # Random-weight models (no model.path) use the character tokenizer.
        self.tokenizer = load_tokenizer(cfg.model.path or "char")
        check_tokenizer(cfg, self.tokenizer)
        vocab = model_spec(cfg).vocab_size
        if len(self.tokenizer) > vocab:
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens but the model's vocab_size is {vocab}")
        # The prompt sets and eval sets are read before any model: a bad file fails in seconds.
        prompts, train_stats = load_prompt_set(cfg.data, self.tokenizer, seed=cfg.train.seed)
        self.data_stats = {"train": train_stats}
        anneal, anneal_prompts = cfg.optim.anneal, None
        if anneal.enabled:
            anneal_prompts, self.data_stats["anneal"] = load_prompt_set(
                cfg.data, self.tokenizer, files=anneal.data, setting="optim.anneal.data"
            )
        if self.is_logger:
            self._print_data_stats()
        self.eval_sets = [load_eval_set(d, limit=cfg.eval.limit) for d in cfg.eval.data] if cfg.eval.every else []

        self.policy = model_from_config(cfg.model, role="policy", seed=cfg.train.seed)
        # GRPO needs no critic: none is built, none is trained, none is checkpointed.
        gae = cfg.ppo.advantage == "gae"
        self.critic = model_from_config(cfg.model, role="critic", seed=cfg.train.seed + 1) if gae else None
        self.device = next(self.policy.parameters()).device
        self.rollouts = Rollout(
            cfg,
            self.policy,
            self.tokenizer,
            device=self.device,
            dp_rank=self.dp_rank,
            dp_size=self.dp,
            dp_group=self.dp_group,
            prompts=prompts,
            anneal_prompts=anneal_prompts,
        )
        self.prompts, self.scorer = self.rollouts.prompts, self.rollouts.scorer

        self.ckpt = CheckpointManager(
            self.out, keep=cfg.ckpt.keep, rank=self.rank, world_size=dist.get_world_size(), barrier=dist.barrier
        )
        self.step = 0
        resuming = resume and self.ckpt.latest() is not None
        if cfg.model.path is None and not resuming:
            if cfg.train.format_warmup_steps:
                format_warmup(
                    self.policy,
                    self.tokenizer,
                    self.prompts,
                    steps=cfg.train.format_warmup_steps,
                    lr=cfg.train.format_warmup_lr,
                    batch_size=cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt,
                    micro_batch_tokens=cfg.ppo.micro_batch_tokens,
                    seed=cfg.train.seed,
                    tp_group=self.tp_group,
                )
            # As in ORZ, where both start from the same base model: the critic's trunk is the policy's.
            if self.critic is not None:
                copy_trunk(self.policy, self.critic)
        # Built after the warm-up, so the fp32 master weights start from the warmed-up parameters.
        self.policy_opt = self._optimizer(self.policy, cfg.optim.policy_lr)
        self.critic_opt = self._optimizer(self.critic, cfg.optim.critic_lr) if self.critic is not None else None
        self.update = Updater(
            cfg,
            self.policy,
            self.critic,
            self.policy_opt,
            self.critic_opt,
            dp_group=self.dp_group,
            tp_group=self.tp_group,
        )
        resume_step = self._restore() if resuming else None
        self.metrics = MetricsLogger(
            self.out,
            resume_step=resume_step,
            tensorboard=cfg.logging.tensorboard,
            wandb_project=cfg.logging.wandb_project,
            config=cfg.to_dict(),
            enabled=self.is_logger,
        )
        self.records = RolloutLog(self.out, resume_step=resume_step, enabled=self.is_logger)
        if self.is_logger:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
            stats = {k: v.to_json() for k, v in self.data_stats.items()}
            (self.out / "data_stats.json").write_text(json.dumps(stats, indent=2) + "\n")

    def _print_data_stats(self) -> None:
        """One line per prompt set at start: what was kept, dropped for length and skipped as malformed."""
        d = self.cfg.data
        for name, st in self.data_stats.items():
            print(
                f"orz_fast.train: {name} prompts: {st.kept} of {st.rows} rows kept; {st.too_long} dropped as longer "
                f"than data.max_prompt_tokens={d.max_prompt_tokens} (prompts have {st.shortest_prompt_tokens} to "
                f"{st.longest_prompt_tokens} tokens with the {d.template!r} template); {st.bad_rows} malformed rows "
                "skipped",
                flush=True,
            )

    def _optimizer(self, model: torch.nn.Module, lr: float) -> ShardedAdamW:
        o = self.cfg.optim
        tied = parallel.tied_embedding_copy(model)
        return ShardedAdamW(
            model.parameters(),
            lr=lr,
            betas=o.betas,
            eps=o.eps,
            weight_decay=o.weight_decay,
            grad_clip=o.grad_clip,
            dp_group=self.dp_group,
            mp_group=parallel.mp_group() if parallel.tp_size() * parallel.pp_size() > 1 else None,
            tp_rank=parallel.tp_rank(),
            deferred=[tied] if tied is not None else [],
        )

    # ------------------------------------------------------------------ checkpoints

    def _state(self) -> dict[str, Any]:
        state = {
            "policy": self.policy.state_dict(),
            "policy_opt": self.policy_opt.state_dict(),
            "rng": rng_state(),
            "sampler_position": self.rollouts.sampler.position,
            "step": self.step,
        }
        if self.critic is not None:
            state |= {"critic": self.critic.state_dict(), "critic_opt": self.critic_opt.state_dict()}
        if self.rollouts.anneal_sampler is not None:
            state["anneal_sampler_position"] = self.rollouts.anneal_sampler.position
        return state

    def save_checkpoint(self) -> None:
        self.ckpt.save(self.step, self._state(), {"config": self.cfg.to_dict()})

    def _restore(self) -> int:
        state, meta = self.ckpt.load()
        self.policy.load_state_dict(state["policy"])
        self.policy_opt.load_state_dict(state["policy_opt"])
        if self.critic is not None:
            if "critic" not in state:
                raise ValueError(
                    f"{self.ckpt.latest()[1]}: this checkpoint has no critic (a GRPO run): it cannot resume with "
                    "ppo.advantage=gae"
                )
            self.critic.load_state_dict(state["critic"])
            self.critic_opt.load_state_dict(state["critic_opt"])
        set_rng_state(state["rng"])
        self.rollouts.sampler.position = int(state["sampler_position"])
        if self.rollouts.anneal_sampler is not None:
            self.rollouts.anneal_sampler.position = int(state.get("anneal_sampler_position", 0))
        self.step = int(state["step"])
        return self.step

    # ------------------------------------------------------------------ rollout

    def rollout(self) -> Experience:
        """Generate and score this rollout rank's share of the step's prompts (:meth:`Rollout.generate`)."""
        return self.rollouts.generate(self.step)

    # ------------------------------------------------------------------ loop

    def train_step(self) -> dict[str, Any]:
        cfg, step = self.cfg, self.step
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        optimizers = [o for o in (self.policy_opt, self.critic_opt) if o is not None]
        for opt in optimizers:
            opt.offload()
        local = self.rollout()
        for opt in optimizers:
            opt.onload()
        timings["time_rollout"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        r = self.rollouts
        check = partial(
            check_samples,
            max_tokens=cfg.rollout.max_tokens,
            micro_batch_tokens=cfg.ppo.micro_batch_tokens,
            dataset_rows=local.prompt_rows,
            prompt_set="annealing-set" if self.rollouts.last.stage == "anneal" else "training-set",
        )
        exp, table = balance(
            local, group=r.group, dest_dp=r.dp_ranks, dp_size=self.dp, dp_rank=self.dp_rank, check=check
        )
        del local
        if self.critic is not None:
            exp.values = self.update.critic_values(exp)
        compute_advantages(exp, table, cfg.ppo, self.dp_group)
        timings["time_prepare"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        anneal = cfg.optim.anneal
        decay = (cfg.train.steps, anneal.steps, anneal.final_policy_lr) if anneal.enabled else None
        policy_lr = lr_at(step, cfg.optim.policy_lr, cfg.optim.warmup_steps, decay)
        critic_lr = lr_at(step, cfg.optim.critic_lr, cfg.optim.warmup_steps)
        metrics = self.update.update_policy(exp, policy_lr, step=step)
        timings["time_policy"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if self.critic is not None:
            metrics |= self.update.update_critic(exp, critic_lr, step=step)
        timings["time_critic"] = time.perf_counter() - t0

        summary = table.summary()
        train_s = max(timings["time_policy"] + timings["time_critic"], 1e-9)
        metrics |= {k: v for k, v in summary.items() if not k.endswith("_tokens")}
        metrics |= {
            "policy_lr": policy_lr,
            "generated_tokens_per_s": summary["generated_tokens"] / max(timings["time_rollout"], 1e-9),
            "trained_tokens_per_s": summary["trained_tokens"] / train_s,
            **timings,
        }
        if self.critic is not None:
            metrics["critic_lr"] = critic_lr
        record = self.rollouts.last
        metrics |= record.metrics
        prompts, _ = self.rollouts.prompt_set(record.stage)
        self.records.record_step(step + 1, record.stage, table, prompts, record.rows)
        if record.samples:
            self.records.record_samples(step + 1, record.stage, record.samples, record.top_answers)
        return metrics | peak_memory_gb()

    def evaluate(self) -> dict[str, float]:
        """The policy on every ``eval.data`` set: ``eval/<set>/...`` metrics (:meth:`Rollout.evaluate`)."""
        out_dir = self.out / "eval" / f"step-{self.step:08d}" if self.is_logger else None
        return self.rollouts.evaluate(self.eval_sets, step=self.step, out_dir=out_dir)

    def export_hf(self, path: Path) -> None:
        """The policy as a Hugging Face directory, with its tokenizer (``python -m orz_fast.eval --model PATH``
        reads both); the character tokenizer is written as its Hugging Face equivalent."""
        save_pretrained(self.policy, path)
        if self.is_logger:
            tokenizer = self.tokenizer
            if isinstance(tokenizer, CharTokenizer):
                tokenizer = char_tokenizer_as_hf(tokenizer, self.policy.spec.vocab_size)
            tokenizer.save_pretrained(str(path))

    def run(self) -> None:
        """Train until ``train.steps`` (plus the annealing stage), checkpointing every ``ckpt.every`` steps and after
        the last (unless ``ckpt.every`` is 0), then export the policy to ``policy_hf/``."""
        cfg = self.cfg
        total = cfg.train.steps + (cfg.optim.anneal.steps if cfg.optim.anneal.enabled else 0)
        bar = None
        if self.is_logger and cfg.logging.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.step, desc="ppo", unit="step", dynamic_ncols=True)
        try:
            while self.step < total:
                metrics = self.train_step()
                self.step += 1
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    metrics |= self.evaluate()
                self.metrics.log(self.step, metrics)
                if bar is not None:
                    self._show_progress(bar, metrics)
                if cfg.ckpt.every and self.step % cfg.ckpt.every == 0:
                    self.save_checkpoint()
                if cfg.ckpt.export_hf_every and self.step % cfg.ckpt.export_hf_every == 0:
                    self.export_hf(self.out / f"policy_hf-step-{self.step:08d}")
            if cfg.ckpt.every and self.step % cfg.ckpt.every != 0:
                self.save_checkpoint()
            self.export_hf(self.out / "policy_hf")
        finally:
            if bar is not None:
                bar.close()
            self.metrics.close()
            self.rollouts.close()

    def _show_progress(self, bar, metrics: dict[str, Any]) -> None:
        """The bar's figures, and on steps that sampled responses one of them and the most common answers."""
        bar.update(1)
        bar.set_postfix(
            reward=f"{metrics['reward_mean']:.3f}",
            len=f"{metrics['response_length_mean']:.0f}",
            top=f"{metrics['rollout/top_answer_share']:.2f}",
            stage=self.rollouts.last.stage,
        )
        record = self.rollouts.last
        if record.samples:
            bar.write(format_sample(self.step, record.samples[0], record.top_answers))
