"""The PPO updates: micro-batches, forward-only passes, mini-batch optimizer steps and the two losses.

Every update works on one :class:`~orz_fast.ppo.experience.Experience` (this data-parallel rank's
samples) and keeps per-token data on the device. Mini-batches are drawn over the whole step in its
canonical order (prompt slot, then sample number), each rank training on its own samples of each
mini-batch, so a data-parallel run takes the same optimizer steps as a one-process run. Losses are
token means over the mini-batch's tokens on all ranks. Statistics accumulate in one device tensor
per update and reduction kind (sums, maxima) and cross ranks once, at its end.

The rollout–trainer log-prob gap is measured on every step without an extra forward, over the
response tokens whose trainer log-probs come from the rollout's weights: with one policy update per
step the loss's own forward gives them (the one mini-batch), with more the recompute pass that makes
the old log-probs. ``ppo.rollout_correction`` says what the loss does with the rollout's log-probs
(``none``: they are the old ones; ``recompute``: the trainer's own are; ``tis``: those, with truncated
importance weights ``min(π_old / π_rollout, ppo.tis_cap)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from orz_fast import ops, parallel
from orz_fast.config import Config
from orz_fast.kernels.ppo_policy_loss import rollout_gap_sums
from orz_fast.parallel import collectives
from orz_fast.ppo.experience import Experience, gather_actions
from orz_fast.ppo.optim import ShardedAdamW

POLICY_STATS = ("policy_loss_sum", "clipfrac_sum", "approx_kl_sum", "entropy_sum", "tokens")
GAP_SUM_STATS = ("logprob_diff_sum",)
GAP_MAX_STATS = ("logprob_diff_max", "ratio_max")
GAP_METRICS = ("rollout/logprob_diff_mean", "rollout/logprob_diff_max", "rollout/ratio_max")
VALUE_STATS = (
    "value_loss_sum",
    "value_clipfrac_sum",
    "returns_sum",
    "returns_sq_sum",
    "error_sum",
    "error_sq_sum",
    "tokens",
)


def explained_variance(sums: dict[str, float], tokens: float) -> float:
    """``1 - Var(R - V) / Var(R)`` over the step's tokens from the value loss's sums; 0 (never NaN) when the
    returns do not vary beyond float32 rounding, e.g. when every reward of the step is equal (as the value
    loss's own statistic is 0 when Var(R) is 0)."""
    mean_r = sums["returns_sum"] / tokens
    var_r = sums["returns_sq_sum"] / tokens - mean_r**2
    var_e = sums["error_sq_sum"] / tokens - (sums["error_sum"] / tokens) ** 2
    # GAE's returns are A + V in float32: equal rewards give returns equal only up to a few ulps.
    if var_r <= 1e-12 * max(1.0, mean_r**2):
        return 0.0
    return 1.0 - var_e / var_r


def gap_metrics(diff_sum: float, diff_max: float, ratio_max: float, tokens: float) -> dict[str, float]:
    """:data:`GAP_METRICS` from the step's reduced sum and maxima (0 over no token). A NaN log-prob makes the
    sum NaN on every rank; the maxima are made NaN with it, as a max reduction need not carry a NaN through."""
    if tokens <= 0:
        return dict.fromkeys(GAP_METRICS, 0.0)
    mean = diff_sum / tokens
    if math.isnan(mean):
        diff_max = ratio_max = math.nan
    return dict(zip(GAP_METRICS, (mean, diff_max, ratio_max), strict=True))


class Updater:
    """Forward-only passes and optimizer steps of the policy and the critic over an experience."""

    def __init__(
        self,
        cfg: Config,
        policy: torch.nn.Module,
        critic: torch.nn.Module,
        policy_opt: ShardedAdamW,
        critic_opt: ShardedAdamW,
        *,
        dp_group: collectives.Group,
        tp_group: collectives.Group,
    ) -> None:
        self.cfg, self.policy, self.critic = cfg, policy, critic
        self.policy_opt, self.critic_opt = policy_opt, critic_opt
        self.dp_group, self.tp_group = dp_group, tp_group
        self.dp = collectives.size(dp_group)
        self.temperature = cfg.rollout.temperature or 1.0
        if cfg.ppo.rollout_correction is None:
            raise ValueError("ppo.rollout_correction is unset: build the config with orz_fast.config.resolve/validate")

    # ------------------------------------------------------------------ forward-only passes

    def per_action_forward(self, model: torch.nn.Module, exp: Experience, fn, *, targets: bool) -> torch.Tensor:
        """``fn(output, batch)`` -> [A_mb] per micro-batch, forward only, in this experience's order: float32 [A].
        ``targets``: the batches carry the response tokens (a value head needs none)."""
        out = torch.zeros(exp.num_actions, dtype=torch.float32, device=exp.device)
        out_views = exp.per_sample(out)
        p = self.cfg.ppo
        mbs = exp.micro_batches(
            np.arange(len(exp.table)), p.micro_batch_tokens, {}, targets=targets, share_prompts=p.share_prompts
        )

        def into_out(output, b):
            values = fn(output, b).float().split(exp.table.response_len[b["samples"]].tolist())
            for i, v in zip(b["samples"].tolist(), values, strict=True):
                out_views[i].copy_(v)

        if len(mbs):
            model.eval()
            with torch.no_grad():
                parallel.forward_backward(model, mbs, into_out, forward_only=True)
            model.train()
        if parallel.pp_size() > 1:  # the last stage computed them; every stage needs them for GAE and the update
            out = collectives.broadcast(out, parallel.last_stage_rank(), parallel.pp_group())
        return out

    def critic_values(self, exp: Experience) -> torch.Tensor:
        """Critic values at every action: float32 [A]."""
        return self.per_action_forward(self.critic, exp, gather_actions, targets=False)

    def recompute_logprobs(self, exp: Experience) -> torch.Tensor:
        """Current-policy log-probs at every action: float32 [A]."""

        def logp_fn(hidden, b):
            return ops.linear_logprobs(
                gather_actions(hidden, b),
                self.policy.output_weight,
                b["targets"],
                temperature=self.temperature,
                tp_group=self.tp_group,
                vocab_size=self.policy.spec.vocab_size,
            )

        return self.per_action_forward(self.policy, exp, logp_fn, targets=True)

    # ------------------------------------------------------------------ losses

    def policy_loss_fn(self, scale: float):
        """The policy's micro-batch loss: the one place where current log-probs and the rollout's meet.

        The batches carry ``old_logprobs`` unless the old log-probs are this forward's own (detached),
        and ``rollout_logprobs``. With one update per step every micro-batch is still at the rollout's
        weights, so its stats include the rollout–trainer gap (:data:`GAP_SUM_STATS`, :data:`GAP_MAX_STATS`);
        with ``ppo.rollout_correction = tis`` the loss weights tokens by ``min(π_old / π_rollout, tis_cap)``."""
        p = self.cfg.ppo
        tis_cap = p.tis_cap if p.rollout_correction == "tis" else None
        measure_gap = p.policy_updates_per_step == 1

        def loss_fn(hidden: torch.Tensor, b: dict[str, torch.Tensor]):
            h = gather_actions(hidden, b)
            weight = self.policy.output_weight
            old, rollout = b.get("old_logprobs"), b.get("rollout_logprobs")
            if p.fused_loss:
                loss, stats = ops.linear_ppo_loss(
                    h,
                    weight,
                    b["targets"],
                    old,
                    b["advantages"],
                    b["mask"],
                    temperature=self.temperature,
                    clip_eps=p.clip_eps,
                    clip_eps_high=p.clip_eps_high,
                    tp_group=self.tp_group,
                    return_entropy=True,
                    vocab_size=self.policy.spec.vocab_size,
                    rollout_logprobs=rollout,
                    tis_cap=tis_cap,
                )
                entropy_sum = stats["entropy"] * h.shape[0]
            else:
                logp, entropy = ops.linear_logprobs(
                    h,
                    weight,
                    b["targets"],
                    temperature=self.temperature,
                    tp_group=self.tp_group,
                    return_entropy=True,
                    vocab_size=self.policy.spec.vocab_size,
                )
                loss, stats = ops.ppo_policy_loss(
                    logp,
                    logp.detach() if old is None else old,
                    b["advantages"],
                    b["mask"],
                    clip_eps=p.clip_eps,
                    clip_eps_high=p.clip_eps_high,
                    rollout_logprobs=rollout,
                    tis_cap=tis_cap,
                )
                entropy_sum = entropy.detach().sum()
            n = b["targets"].numel()
            out = {
                "policy_loss_sum": loss.detach() * n,
                "clipfrac_sum": stats["clipfrac"] * n,
                "approx_kl_sum": stats["approx_kl"] * n,
                "entropy_sum": entropy_sum,
                "tokens": stats["num_tokens"],
            }
            if measure_gap:
                out["logprob_diff_sum"] = stats["rollout_diff_mean"] * stats["num_tokens"]
                out["logprob_diff_max"] = stats["rollout_diff_max"]
                out["ratio_max"] = stats["rollout_ratio_max"]
            return loss * (n * scale), out

        return loss_fn

    def value_loss_fn(self, scale: float):
        clip = self.cfg.ppo.value_clip

        def loss_fn(values: torch.Tensor, b: dict[str, torch.Tensor]):
            loss, stats = ops.ppo_value_loss(
                gather_actions(values, b), b["old_values"], b["returns"], b["mask"], clip=clip
            )
            n = b["mask"].numel()
            keys = ("returns_sum", "returns_sq_sum", "error_sum", "error_sq_sum")
            return loss * (n * scale), {
                "value_loss_sum": loss.detach() * n,
                "value_clipfrac_sum": stats["clipfrac"] * n,
                "tokens": stats["num_tokens"],
                **{k: stats[k] for k in keys},
            }

        return loss_fn

    # ------------------------------------------------------------------ optimizer steps

    def mini_batches(self, exp: Experience, k: int, *, step: int, salt: int) -> list[np.ndarray]:
        """This rank's samples of each of the step's ``k`` mini-batches. The step's samples (``G`` prompts x ``n``,
        canonical id ``slot * n + sample``) are shuffled from (seed, step, salt), so a resumed run repeats them and
        every rank agrees; ``k = 1`` keeps this rank's order."""
        if k == 1:
            return [np.arange(len(exp.table))]
        r = self.cfg.rollout
        n = r.samples_per_prompt
        total = r.prompts_per_step * n
        gen = torch.Generator().manual_seed((self.cfg.train.seed * 1_000_003 + step) * 31 + salt)
        order = torch.randperm(total, generator=gen).numpy()
        local = np.full(total, -1, dtype=np.int64)
        local[exp.table.slot * n + exp.table.sample] = np.arange(len(exp.table))
        chunks = [local[order[i::k]] for i in range(min(k, total))]
        return [c[c >= 0] for c in chunks]

    def optimizer_steps(
        self,
        model: torch.nn.Module,
        opt: ShardedAdamW,
        exp: Experience,
        chunks: list[np.ndarray],
        per_action: dict[str, torch.Tensor],
        make_loss_fn: Callable[[float], Callable],
        keys: tuple[str, ...],
        lr: float,
        *,
        targets: bool,
        max_keys: tuple[str, ...] = (),
    ) -> tuple[dict[str, float], float, float]:
        """One optimizer step per mini-batch; returns (stats summed over the step's tokens, and the ``max_keys``
        stats' maxima over them (-inf over no token), mean grad norm, skipped)."""
        p = self.cfg.ppo
        views = {k: exp.per_sample(v) for k, v in per_action.items()}  # split once for all mini-batches
        tokens = [float(exp.table.response_len[c].sum()) for c in chunks]
        totals_per_chunk = collectives.all_reduce(
            torch.tensor(tokens, dtype=torch.float64, device=exp.device), self.dp_group
        )
        totals_per_chunk = totals_per_chunk.tolist()  # host read: one per update, the loss scales need it
        sums = torch.zeros(len(keys), dtype=torch.float64, device=exp.device)
        maxes = torch.full((len(max_keys),), -torch.inf, dtype=torch.float64, device=exp.device)
        norms, skipped = [], 0
        for chunk, total in zip(chunks, totals_per_chunk, strict=True):
            if len(chunk):
                mbs = exp.micro_batches(
                    chunk, p.micro_batch_tokens, views, targets=targets, share_prompts=p.share_prompts
                )
                # forward_backward divides by the micro-batch count and the optimizer's data-parallel mean by dp:
                # undo both so the gradient is the token mean over the mini-batch on all ranks.
                stats = parallel.forward_backward(
                    model, mbs, make_loss_fn(len(mbs) * self.dp / max(total, 1.0)), grad_sync=opt
                )
                if stats:  # the last pipeline stage
                    sums += torch.stack([torch.stack([s[k] for k in keys]) for s in stats]).double().sum(0)
                    if max_keys:
                        per_mb = torch.stack([torch.stack([s[k] for k in max_keys]) for s in stats]).double()
                        maxes = torch.maximum(maxes, per_mb.amax(0))
            parallel.finalize_model_grads(model)
            res = opt.step(lr)
            norms.append(res["grad_norm"])
            skipped += int(res["skipped"])
        sums = collectives.all_reduce(sums, self.dp_group)
        if max_keys:
            maxes = collectives.all_reduce(maxes, self.dp_group, "max")
        stats = torch.cat([sums, maxes])
        if parallel.pp_size() > 1:  # the losses' stats exist on the last stage only
            stats = collectives.broadcast(stats, parallel.last_stage_rank(), parallel.pp_group())
        return dict(zip(keys + max_keys, stats.tolist(), strict=True)), float(np.mean(norms)), float(skipped)

    def update_policy(self, exp: Experience, lr: float, *, step: int) -> dict[str, float]:
        """``policy_updates_per_step`` optimizer steps over shuffled mini-batches (1: the whole step's samples),
        with the rollout–trainer gap (:data:`GAP_METRICS`) over the step's response tokens.

        One update: the old log-probs are the rollout's own (``ppo.rollout_correction = none``: strictly
        on-policy) or the loss's own forward's (``recompute``, ``tis``). More: they are recomputed once, before
        the first update, for every mode.
        """
        p = self.cfg.ppo
        k = p.policy_updates_per_step
        per_action = {"advantages": exp.advantages.float()}
        if k == 1:
            if p.rollout_correction == "none":
                per_action["old_logprobs"] = exp.logprobs
            per_action["rollout_logprobs"] = exp.logprobs
            keys, max_keys = POLICY_STATS + GAP_SUM_STATS, GAP_MAX_STATS
        else:
            old = self.recompute_logprobs(exp)
            gap = self.gap_stats(old, exp)
            per_action["old_logprobs"] = old
            if p.rollout_correction == "tis":
                per_action["rollout_logprobs"] = exp.logprobs
            keys, max_keys = POLICY_STATS, ()
        chunks = self.mini_batches(exp, k, step=step, salt=1)
        totals, norm, skipped = self.optimizer_steps(
            self.policy,
            self.policy_opt,
            exp,
            chunks,
            per_action,
            self.policy_loss_fn,
            keys,
            lr,
            targets=True,
            max_keys=max_keys,
        )
        tokens = max(totals["tokens"], 1.0)
        if k == 1:
            gap = gap_metrics(*(totals.pop(key) for key in GAP_SUM_STATS + GAP_MAX_STATS), totals["tokens"])
        out = {k.removesuffix("_sum"): v / tokens for k, v in totals.items() if k.endswith("_sum")}
        return out | gap | {"policy_grad_norm": norm, "policy_steps_skipped": skipped}

    def gap_stats(self, trainer_logprobs: torch.Tensor, exp: Experience) -> dict[str, float]:
        """:data:`GAP_METRICS` of the trainer's log-probs at every action of this rank against the rollout's,
        over the data-parallel group: one sum and one max all-reduce."""
        local = rollout_gap_sums(trainer_logprobs, exp.logprobs, None).double()  # every action counts
        count = torch.tensor(float(exp.logprobs.numel()), dtype=torch.float64, device=local.device)
        sums = collectives.all_reduce(torch.stack([local[0], count]), self.dp_group)
        maxes = collectives.all_reduce(local[1:].clone(), self.dp_group, "max")
        diff_sum, tokens, diff_max, ratio_max = torch.cat([sums, maxes]).tolist()  # host read: one per step
        return gap_metrics(diff_sum, diff_max, ratio_max, tokens)

    def update_critic(self, exp: Experience, lr: float, *, step: int) -> dict[str, float]:
        """``critic_updates_per_step`` optimizer steps over shuffled mini-batches."""
        chunks = self.mini_batches(exp, self.cfg.ppo.critic_updates_per_step, step=step, salt=2)
        per_action = {"old_values": exp.values, "returns": exp.returns}
        out, norm, skipped = self.optimizer_steps(
            self.critic, self.critic_opt, exp, chunks, per_action, self.value_loss_fn, VALUE_STATS, lr, targets=False
        )
        tokens = max(out["tokens"], 1.0)
        return {
            "value_loss": out["value_loss_sum"] / tokens,
            "value_clipfrac": out["value_clipfrac_sum"] / tokens,
            "explained_variance": explained_variance(out, tokens),
            "critic_grad_norm": norm,
            "critic_steps_skipped": skipped,
        }
