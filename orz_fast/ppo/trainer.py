"""The ORZ PPO loop: rollout, reward, critic values, GAE, one policy step, K critic steps.

Per step (every rank runs the same code; tensor-parallel ranks hold identical data):

1. take ``prompts_per_step`` prompts from the seeded sampler and generate ``samples_per_prompt``
   responses for each: with the native engine each data-parallel replica generates its share
   with the policy's own parameters; with the vLLM engine (one per GPU) every rank generates
   its share after the new weights are pushed to it, and the engine sleeps afterwards;
2. score them (a truncated response scores 0); gather the samples of all generating ranks and
   re-split them with Karmarkar–Karp so each data-parallel rank gets the same compute
   (:func:`orz_fast.packing.balance`);
3. critic values at every action (forward only), GAE with γ and λ, advantages whitened over
   all response tokens of the step (all data-parallel ranks);
4. one policy optimizer step over token-budget micro-batches: ``linear_logprobs`` +
   ``ppo_policy_loss`` on the hidden states (or the fused ``linear_ppo_loss``); the old
   log-probs are the rollout's own (strictly on-policy: no extra forward pass), recomputed
   only when ``policy_updates_per_step`` > 1;
5. ``critic_updates_per_step`` critic optimizer steps over shuffled mini-batches.

Losses are token means over the whole step's (or mini-batch's) tokens across all ranks. A
step whose gradient norm is NaN or inf is skipped (weights and moments untouched) and logged.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from orz_fast import ops, packing, parallel
from orz_fast.config import Config
from orz_fast.data import encode_prompts, load_problems
from orz_fast.data.tokenizer import load_tokenizer
from orz_fast.eval import evaluate, load_eval_set
from orz_fast.metrics import MetricsLogger
from orz_fast.models import ModelSpec, save_pretrained
from orz_fast.models.checkpoint import model_from_config
from orz_fast.ppo.advantages import grpo_advantages, terminal_rewards
from orz_fast.ppo.checkpointing import CheckpointManager, rng_state, set_rng_state
from orz_fast.ppo.experience import Sample, make_micro_batch, pack_micro_batches, response_offsets
from orz_fast.ppo.optim import ShardedAdamW
from orz_fast.ppo.warmup import format_warmup
from orz_fast.reward import RewardScorer
from orz_fast.rollout import NativeEngine, SamplingParams, VllmEngine
from orz_fast.rollout.kv_budget import kv_cache_bytes
from orz_fast.rollout.vllm_engine import check_vllm_can_serve
from orz_fast.rollout.vllm_model_dir import write_vllm_model_dir


def lr_at(step: int, base_lr: float, warmup_steps: int, decay: tuple[int, int, float] | None = None) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up to ``base_lr`` over
    ``warmup_steps`` (the first step already takes ``base_lr / warmup_steps``), then constant; with
    ``decay = (start, steps, final_lr)`` a linear decay to ``final_lr`` from step ``start`` on."""
    lr = base_lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else base_lr
    if decay is not None and step >= decay[0]:
        start, steps, final = decay
        frac = min(1.0, (step - start + 1) / steps)
        lr = base_lr + (final - base_lr) * frac
    return lr


def model_spec(cfg: Config) -> ModelSpec:
    """The policy architecture from the checkpoint's config (or ``model.arch``), read without loading weights."""
    path = cfg.model.path
    if path is None:
        return ModelSpec.from_hf_config(cfg.model.arch)
    p = Path(path)
    if p.suffix == ".gguf":
        from transformers import AutoConfig

        return ModelSpec.from_hf_config(AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name).to_dict())
    return ModelSpec.from_hf_config(json.loads((p / "config.json").read_text()))


def check_layout(cfg: Config, world_size: int) -> None:
    """Reject a parallel layout that cannot work, before any model is built."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if world_size % (tp * pp) != 0:
        raise ValueError(f"world size {world_size} is not divisible by parallel.tp * parallel.pp = {tp} * {pp}")
    if cfg.rollout.engine == "vllm":
        path = cfg.model.path
        if path is not None and (Path(path).suffix == ".gguf" or not (Path(path) / "config.json").is_file()):
            raise ValueError(
                f"rollout.engine='vllm' needs model.path to be a Hugging Face directory (config.json + "
                f"tokenizer) or unset (random weights from model.arch), got {path!r}; GGUF models use 'native'"
            )
        # Imports vLLM: a missing install, an untested version or an architecture it cannot serve shows here.
        check_vllm_can_serve(model_spec(cfg).hf_config)
    if cfg.ppo.kl_coef != 0 or cfg.ppo.entropy_coef != 0:
        raise ValueError(
            f"ppo.kl_coef={cfg.ppo.kl_coef}, ppo.entropy_coef={cfg.ppo.entropy_coef}: only the ORZ objective "
            "(no KL, no entropy bonus) is implemented"
        )
    model_spec(cfg).check_layout(tp, pp)


class PromptSampler:
    """Seeded epoch-wise shuffling; its position is one integer (saved in checkpoints)."""

    def __init__(self, size: int, seed: int, position: int = 0) -> None:
        if size < 1:
            raise ValueError("the training set is empty (after dropping over-long prompts)")
        self.size, self.seed, self.position = size, seed, position

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def take(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            epoch, offset = divmod(self.position, self.size)
            out.append(int(self._order(epoch)[offset]))
            self.position += 1
        return out


def _all_reduce_sum(values: list[float], group) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t.tolist()


class Trainer:
    """Builds the models, engine, optimizers and data from a :class:`Config` and runs the PPO loop."""

    def __init__(self, cfg: Config, out_dir: str | Path, *, resume: bool = False) -> None:
        self.cfg = cfg
        self.out = Path(out_dir)
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
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
        self.policy = model_from_config(cfg.model, role="policy", seed=cfg.train.seed)
        self.critic = model_from_config(cfg.model, role="critic", seed=cfg.train.seed + 1)
        self.device = next(self.policy.parameters()).device
        vocab = self.policy.spec.vocab_size
        if len(self.tokenizer) > vocab:
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens but the model's vocab_size is {vocab}")
        if cfg.rollout.engine == "vllm":
            # One engine per GPU, each generating its share of the step's prompts (shared over all ranks).
            self.engine = self._build_vllm_engine()
            self.rollout_rank, self.rollout_size = self.rank, dist.get_world_size()
            self.rollout_group = dist.group.WORLD if self.rollout_size > 1 else None
        else:
            # The native engine decodes with the model's own shards: each data-parallel replica generates.
            self.engine = NativeEngine(
                self.policy, tokenizer=self.tokenizer, kv_cache_bytes=kv_cache_bytes(cfg.rollout, self.device)
            )
            self.rollout_rank, self.rollout_size, self.rollout_group = self.dp_rank, self.dp, self.dp_group

        problems, self.data_stats = load_problems(cfg.data, seed=cfg.train.seed)
        self.prompts = encode_prompts(
            problems,
            self.tokenizer,
            template=cfg.data.template,
            max_prompt_tokens=cfg.data.max_prompt_tokens,
            stats=self.data_stats,
        )
        self.sampler = PromptSampler(len(self.prompts), cfg.train.seed)
        self.scorer = RewardScorer(mode=cfg.reward.mode, timeout=cfg.reward.timeout, workers=cfg.reward.workers)
        # Loaded up front so a missing eval set fails before any training.
        self.eval_sets = [load_eval_set(d, limit=cfg.eval.limit) for d in cfg.eval.data] if cfg.eval.every else []

        self.ckpt = CheckpointManager(
            self.out, keep=cfg.ckpt.keep, rank=self.rank, world_size=dist.get_world_size(), barrier=dist.barrier
        )
        self.step = 0
        resume_step = None
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
            copy_trunk(self.policy, self.critic)
        # Built after the warm-up, so the fp32 master weights start from the warmed-up parameters.
        o = cfg.optim
        mp_group = parallel.mp_group() if parallel.tp_size() * parallel.pp_size() > 1 else None
        common = {"betas": o.betas, "eps": o.eps, "weight_decay": o.weight_decay, "grad_clip": o.grad_clip}
        common.update(dp_group=self.dp_group, mp_group=mp_group, tp_rank=parallel.tp_rank(), average_grads=False)
        self.policy_opt = ShardedAdamW(self.policy.parameters(), lr=o.policy_lr, **common)
        self.critic_opt = ShardedAdamW(self.critic.parameters(), lr=o.critic_lr, **common)
        if resuming:
            resume_step = self._restore()
        self.metrics = MetricsLogger(
            self.out,
            resume_step=resume_step,
            tensorboard=cfg.logging.tensorboard,
            wandb_project=cfg.logging.wandb_project,
            config=cfg.to_dict(),
            enabled=self.is_logger,
        )
        if self.is_logger:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

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

    # ------------------------------------------------------------------ checkpoints

    def _state(self) -> dict[str, Any]:
        return {
            "policy": self.policy.state_dict(),
            "critic": self.critic.state_dict(),
            "policy_opt": self.policy_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "rng": rng_state(),
            "sampler_position": self.sampler.position,
            "step": self.step,
        }

    def save_checkpoint(self) -> None:
        self.ckpt.save(self.step, self._state(), {"config": self.cfg.to_dict()})

    def _restore(self) -> int:
        state, meta = self.ckpt.load()
        self.policy.load_state_dict(state["policy"])
        self.critic.load_state_dict(state["critic"])
        self.policy_opt.load_state_dict(state["policy_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        set_rng_state(state["rng"])
        self.sampler.position = int(state["sampler_position"])
        self.step = int(state["step"])
        return self.step

    # ------------------------------------------------------------------ rollout

    def rollout(self) -> tuple[list[Sample], dict[str, float]]:
        """Generate and score this rollout rank's share of the step's prompts (a data-parallel replica's with
        the native engine, this GPU's with vLLM)."""
        r = self.cfg.rollout
        chosen = self.sampler.take(r.prompts_per_step)
        mine = list(range(self.rollout_rank, len(chosen), self.rollout_size))
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
                seed=((self.cfg.train.seed * 1_000_003 + self.step) * r.prompts_per_step + g) * n,
            )
            for g in mine
        ]
        with self.engine_ready():
            outputs = self.engine.generate([self.prompts[chosen[g]].token_ids for g in mine], params)
        texts, answers, reasons, samples = [], [], [], []
        for g, completions in zip(mine, outputs, strict=True):
            prompt = self.prompts[chosen[g]]
            for c in completions:
                texts.append(c.text)
                answers.append(prompt.problem.answer)
                reasons.append(c.finish_reason)
                samples.append(
                    Sample(
                        prompt=prompt.token_ids,
                        response=list(c.token_ids),
                        logprobs=list(c.logprobs),
                        score=0.0,
                        truncated=c.finish_reason == "length",
                        group=g,
                    )
                )
        scores = self.scorer.score_batch(texts, answers, finish_reasons=reasons)
        for s, sc in zip(samples, scores, strict=True):
            s.score = float(sc)
        if self.cfg.ppo.advantage == "grpo" and samples:
            # Each prompt's n samples are together here (before balancing may split them).
            cu = response_offsets(samples)
            adv = grpo_advantages(torch.tensor([s.score for s in samples]), n, cu)
            for s, a in zip(samples, adv[cu[:-1]].tolist(), strict=True):
                s.advantage = a
        return samples, {"generated_tokens": float(sum(len(s.response) for s in samples))}

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

    def balance(self, samples: list[Sample]) -> list[Sample]:
        """Re-split the step's samples (generated by every rollout rank) so every data-parallel rank gets
        the same workload; tensor- and pipeline-parallel ranks of one replica get the same samples."""
        if self.rollout_size == 1:
            return samples
        gathered: list[list[Sample] | None] = [None] * self.rollout_size
        dist.all_gather_object(gathered, samples, group=self.rollout_group)
        everything = [s for part in gathered for s in part]
        groups = packing.balance([s.num_inputs for s in everything], self.dp, equal_size=True)
        return [everything[i] for i in groups[self.dp_rank]]

    # ------------------------------------------------------------------ update

    def _micro_batches(self, samples, indices, offsets, per_action):
        bins = pack_micro_batches(samples, indices, self.cfg.ppo.micro_batch_tokens)
        return [make_micro_batch(samples, b, offsets, per_action, self.device) for b in bins]

    def _per_action_forward(self, model, samples, offsets, fn) -> torch.Tensor:
        """``fn(output, batch)`` -> [A_mb] per micro-batch, forward only, gathered in sample order: float32 [A]."""
        out = torch.zeros(int(offsets[-1]), dtype=torch.float32)
        mbs = self._micro_batches(samples, list(range(len(samples))), offsets, {})
        model.eval()
        with torch.no_grad():
            results = parallel.forward_backward(model, mbs, fn, forward_only=True)
        model.train()
        # The results exist on the last pipeline stage only.
        for b, r in zip(mbs if parallel.is_last_stage() else [], results, strict=True):
            out[b["rows"].cpu()] = r.float().cpu()
        if parallel.pp_size() > 1:  # the last stage computed them; every stage needs them for GAE and logging
            buf = out.to(self.device)
            dist.broadcast(buf, src=parallel.last_stage_rank(), group=parallel.pp_group())
            out = buf.cpu()
        return out

    def _critic_values(self, samples, offsets) -> torch.Tensor:
        """Critic values at every action, in sample order: float32 [A]."""
        return self._per_action_forward(self.critic, samples, offsets, lambda v, b: v[b["action_idx"]])

    def _recompute_logprobs(self, samples, offsets) -> torch.Tensor:
        """Current-policy log-probs at every action, in sample order: float32 [A]."""
        temperature = self.cfg.rollout.temperature or 1.0

        def logp_fn(hidden, b):
            h = hidden[b["action_idx"]]
            return ops.linear_logprobs(
                h,
                self.policy.output_weight,
                b["targets"],
                temperature=temperature,
                tp_group=self.tp_group,
                vocab_size=self.policy.spec.vocab_size,
            )

        return self._per_action_forward(self.policy, samples, offsets, logp_fn)

    def _shuffled_chunks(self, n: int, k: int, salt: int) -> list[list[int]]:
        """``k`` mini-batches of ``range(n)``, shuffled from (seed, step, salt) so a resumed run repeats them."""
        gen = torch.Generator().manual_seed((self.cfg.train.seed * 1_000_003 + self.step) * 31 + salt)
        order = torch.randperm(n, generator=gen).tolist()
        return [order[i::k] for i in range(min(k, n))]

    def _minibatch_steps(self, model, opt, samples, offsets, chunks, per_action, make_loss_fn, lr):
        """One optimizer step per chunk of samples; returns (summed stats, mean grad norm, skipped steps)."""
        totals: dict[str, float] = {}
        norms, skipped = [], 0
        for chunk in chunks:
            mbs = self._micro_batches(samples, chunk, offsets, per_action)
            n_local = sum(int(b["targets"].numel()) for b in mbs)
            total = _all_reduce_sum([n_local], self.dp_group)[0]
            # forward_backward divides by the micro-batch count and DP averaging by dp: undo both so
            # the gradient is the token mean over the mini-batch on all ranks.
            scale = len(mbs) * self.dp / max(total, 1.0)
            stats = parallel.forward_backward(model, mbs, make_loss_fn(scale))
            parallel.finalize_model_grads(model)
            res = opt.step(lr)
            norms.append(res["grad_norm"])
            skipped += int(res["skipped"])
            for key, val in _reduce_stats(stats, self.dp_group).items():
                totals[key] = totals.get(key, 0.0) + val
        if parallel.pp_size() > 1:  # the losses' stats exist on the last stage only
            box = [totals]
            dist.broadcast_object_list(box, src=parallel.last_stage_rank(), group=parallel.pp_group())
            totals = box[0]
        return totals, float(np.mean(norms)), float(skipped)

    def advantages(self, samples: list[Sample], offsets: torch.Tensor, values: torch.Tensor | None):
        """(advantages [A], returns [A] or None) for this rank's samples; whitening over all ranks' tokens."""
        p = self.cfg.ppo
        if p.advantage == "grpo":
            lengths = offsets[1:] - offsets[:-1]
            return torch.repeat_interleave(torch.tensor([s.advantage for s in samples]), lengths), None
        scores = torch.tensor([s.score for s in samples], dtype=torch.float32)
        rewards = terminal_rewards(scores, offsets)
        adv, ret = ops.gae(rewards, values, offsets, p.gamma, p.lam)
        if p.normalize_advantages == "batch":
            n, total, sq = _all_reduce_sum(
                [adv.numel(), float(adv.double().sum()), float(adv.double().pow(2).sum())], self.dp_group
            )
            mean = total / n
            std = math.sqrt(max(sq / n - mean * mean, 0.0))
            adv = (adv - mean) / (std + 1e-8)
        return adv, ret

    def _policy_loss_fn(self, scale: float):
        p, temperature = self.cfg.ppo, self.cfg.rollout.temperature or 1.0

        def loss_fn(hidden: torch.Tensor, b: dict[str, torch.Tensor]):
            h = hidden[b["action_idx"]]
            weight = self.policy.output_weight
            if p.fused_loss:
                loss, stats = ops.linear_ppo_loss(
                    h,
                    weight,
                    b["targets"],
                    b["old_logprobs"],
                    b["advantages"],
                    b["mask"],
                    temperature=temperature,
                    clip_eps=p.clip_eps,
                    clip_eps_high=p.clip_eps_high,
                    tp_group=self.tp_group,
                    return_entropy=True,
                    vocab_size=self.policy.spec.vocab_size,
                )
                entropy_sum = stats["entropy"] * h.shape[0]
            else:
                logp, entropy = ops.linear_logprobs(
                    h,
                    weight,
                    b["targets"],
                    temperature=temperature,
                    tp_group=self.tp_group,
                    return_entropy=True,
                    vocab_size=self.policy.spec.vocab_size,
                )
                loss, stats = ops.ppo_policy_loss(
                    logp,
                    b["old_logprobs"],
                    b["advantages"],
                    b["mask"],
                    clip_eps=p.clip_eps,
                    clip_eps_high=p.clip_eps_high,
                )
                entropy_sum = entropy.detach().sum()
            n = b["targets"].numel()
            out = {
                "policy_loss_sum": loss.detach() * n,
                "clipfrac_sum": stats["clipfrac"] * n,
                "approx_kl_sum": stats["approx_kl"] * n,
                "tokens": float(n),
                "entropy_sum": entropy_sum,
            }
            return loss * (n * scale), out

        return loss_fn

    def update_policy(self, samples, offsets, adv, lr) -> dict[str, float]:
        """``policy_updates_per_step`` optimizer steps over shuffled mini-batches (1: the whole step's samples)."""
        k = self.cfg.ppo.policy_updates_per_step
        if k == 1:
            old = torch.tensor([lp for s in samples for lp in s.logprobs], dtype=torch.float32)
            chunks = [list(range(len(samples)))]
        else:
            old = self._recompute_logprobs(samples, offsets)
            chunks = self._shuffled_chunks(len(samples), k, salt=1)
        per_action = {"old_logprobs": old, "advantages": adv.float()}
        totals, norm, skipped = self._minibatch_steps(
            self.policy, self.policy_opt, samples, offsets, chunks, per_action, self._policy_loss_fn, lr
        )
        tokens = max(totals.get("tokens", 0.0), 1.0)
        out = {k.removesuffix("_sum"): v / tokens for k, v in totals.items() if k.endswith("_sum")}
        return out | {"policy_grad_norm": norm, "policy_steps_skipped": skipped}

    def _value_loss_fn(self, scale: float):
        clip = self.cfg.ppo.value_clip

        def loss_fn(values: torch.Tensor, b: dict[str, torch.Tensor]):
            loss, stats = ops.ppo_value_loss(
                values[b["action_idx"]], b["old_values"], b["returns"], b["mask"], clip=clip
            )
            n = b["targets"].numel()
            keys = ("returns_sum", "returns_sq_sum", "error_sum", "error_sq_sum")
            return loss * (n * scale), {
                "value_loss_sum": loss.detach() * n,
                "value_clipfrac_sum": stats["clipfrac"] * n,
                "tokens": float(n),
                **{k: stats[k] for k in keys},
            }

        return loss_fn

    def update_critic(self, samples, offsets, values, returns, lr) -> dict[str, float]:
        """``critic_updates_per_step`` optimizer steps over shuffled mini-batches."""
        chunks = self._shuffled_chunks(len(samples), self.cfg.ppo.critic_updates_per_step, salt=2)
        per_action = {"old_values": values, "returns": returns}
        out, norm, skipped = self._minibatch_steps(
            self.critic, self.critic_opt, samples, offsets, chunks, per_action, self._value_loss_fn, lr
        )
        tokens = max(out.get("tokens", 0.0), 1.0)
        var_r = out["returns_sq_sum"] / tokens - (out["returns_sum"] / tokens) ** 2
        var_e = out["error_sq_sum"] / tokens - (out["error_sum"] / tokens) ** 2
        return {
            "value_loss": out["value_loss_sum"] / tokens,
            "value_clipfrac": out["value_clipfrac_sum"] / tokens,
            "explained_variance": 1.0 - var_e / var_r if var_r > 1e-12 else float("nan"),
            "critic_grad_norm": norm,
            "critic_steps_skipped": skipped,
        }

    # ------------------------------------------------------------------ loop

    def train_step(self) -> dict[str, Any]:
        cfg, step = self.cfg, self.step
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        self.policy_opt.offload()
        self.critic_opt.offload()
        local, gen_stats = self.rollout()
        self.policy_opt.onload()
        self.critic_opt.onload()
        timings["time_rollout"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        samples = self.balance(local)
        offsets = response_offsets(samples)
        values = self._critic_values(samples, offsets) if cfg.ppo.advantage == "gae" else None
        adv, returns = self.advantages(samples, offsets, values)
        timings["time_prepare"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        anneal = cfg.optim.anneal
        decay = (cfg.train.steps, anneal.steps, anneal.final_policy_lr) if anneal.enabled else None
        policy_lr = lr_at(step, cfg.optim.policy_lr, cfg.optim.warmup_steps, decay)
        critic_lr = lr_at(step, cfg.optim.critic_lr, cfg.optim.warmup_steps)
        metrics = self.update_policy(samples, offsets, adv, policy_lr)
        timings["time_policy"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if cfg.ppo.advantage == "gae":
            metrics |= self.update_critic(samples, offsets, values, returns, critic_lr)
        timings["time_critic"] = time.perf_counter() - t0

        lengths = [len(s.response) for s in samples]
        sums = _all_reduce_sum(
            [
                len(samples),
                sum(s.score for s in samples),
                sum(lengths),
                float(sum(s.truncated for s in samples)),
                gen_stats["generated_tokens"],
                sum(s.num_inputs for s in samples),
            ],
            self.dp_group,
        )
        n = max(sums[0], 1.0)
        max_len = torch.tensor([max(lengths, default=0)], dtype=torch.float64)
        if self.dp_group is not None:
            dist.all_reduce(max_len, op=dist.ReduceOp.MAX, group=self.dp_group)
        metrics |= {
            "reward_mean": sums[1] / n,
            "accuracy": sums[1] / n,
            "response_length_mean": sums[2] / n,
            "response_length_max": float(max_len.item()),
            "truncated_fraction": sums[3] / n,
            "policy_lr": policy_lr,
            "critic_lr": critic_lr,
            "generated_tokens_per_s": sums[4] / max(timings["time_rollout"], 1e-9),
            "trained_tokens_per_s": sums[5] / max(timings["time_policy"] + timings["time_critic"], 1e-9),
            **timings,
        }
        metrics |= peak_memory_gb()
        return metrics

    def evaluate(self) -> dict[str, float]:
        """The policy on every ``eval.data`` set (all ranks run it; data-parallel replicas repeat it):
        ``eval/<set>/...`` metrics; rank 0 writes the per-problem results under ``OUT/eval/step-N/``."""
        r, metrics = self.cfg.rollout, {}
        out_dir = self.out / "eval" / f"step-{self.step:08d}" if self.is_logger else None
        with self.engine_ready():
            for name, problems in self.eval_sets:
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
                    seed=self.cfg.train.seed * 1_000_003 + self.step,
                    scorer=self.scorer,
                    dataset=name,
                    out_dir=out_dir,
                )
                metrics |= report.metrics()
        return metrics

    def run(self) -> None:
        """Train until ``train.steps`` (plus the annealing stage), checkpointing every ``ckpt.every`` steps."""
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
                    bar.update(1)
                    bar.set_postfix(
                        reward=f"{metrics['reward_mean']:.3f}", len=f"{metrics['response_length_mean']:.0f}"
                    )
                if cfg.ckpt.every and self.step % cfg.ckpt.every == 0:
                    self.save_checkpoint()
                if cfg.ckpt.export_hf_every and self.step % cfg.ckpt.export_hf_every == 0:
                    save_pretrained(self.policy, self.out / f"policy_hf-step-{self.step:08d}")
            if not (cfg.ckpt.every and self.step % cfg.ckpt.every == 0):
                self.save_checkpoint()
            save_pretrained(self.policy, self.out / "policy_hf")
        finally:
            if bar is not None:
                bar.close()
            self.metrics.close()
            self.scorer.close()
            if isinstance(self.engine, VllmEngine):
                self.engine.shutdown()


@torch.no_grad()
def copy_trunk(policy: torch.nn.Module, critic: torch.nn.Module) -> None:
    """Copy the policy's trunk parameters (embedding, layers, final norm: same names, same shards) into
    the critic; the critic's value head keeps its own initialisation."""
    source = dict(policy.named_parameters())
    for name, p in critic.named_parameters():
        if name in source:
            p.copy_(source[name])


def _reduce_stats(stats: list[dict], group) -> dict[str, float]:
    """Sum per-micro-batch stats over micro-batches and data-parallel ranks."""
    keys = sorted({k for s in stats for k in s})
    sums = _all_reduce_sum([float(sum(float(s[k]) for s in stats if k in s)) for k in keys], group)
    return dict(zip(keys, sums, strict=True))


def peak_memory_gb() -> dict[str, float]:
    """Peak accelerator memory since the last call (CUDA), or the process's peak RSS (CPU)."""
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        return {"peak_gpu_memory_gb": peak}
    import resource

    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
