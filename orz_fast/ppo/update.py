"""The PPO updates: micro-batches, forward-only passes, mini-batch optimizer steps and the two losses.

Every update works on one :class:`~orz_fast.ppo.experience.Experience` (this data-parallel rank's
samples) and keeps per-token data on the device. Mini-batches are drawn over the whole step in its
canonical order (prompt slot, then sample number), each rank training on its own samples of each
mini-batch, so a data-parallel run takes the same optimizer steps as a one-process run. Losses are
token means over the mini-batch's tokens on all ranks. Statistics accumulate in one device tensor
per update and cross ranks once, at its end.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from orz_fast import ops, parallel
from orz_fast.config import Config
from orz_fast.parallel import collectives
from orz_fast.ppo.experience import Experience, gather_actions
from orz_fast.ppo.optim import ShardedAdamW

POLICY_STATS = ("policy_loss_sum", "clipfrac_sum", "approx_kl_sum", "entropy_sum", "tokens")
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

    # ------------------------------------------------------------------ forward-only passes

    def per_action_forward(self, model: torch.nn.Module, exp: Experience, fn, *, targets: bool) -> torch.Tensor:
        """``fn(output, batch)`` -> [A_mb] per micro-batch, forward only, in this experience's order: float32 [A].
        ``targets``: the batches carry the response tokens (a value head needs none)."""
        out = torch.zeros(exp.num_actions, dtype=torch.float32, device=exp.device)
        out_views = exp.per_sample(out)
        mbs = exp.micro_batches(np.arange(len(exp.table)), self.cfg.ppo.micro_batch_tokens, {}, targets=targets)

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
        """The policy's micro-batch loss: the one place where current log-probs and the rollout's
        (``old_logprobs``) meet."""
        p = self.cfg.ppo

        def loss_fn(hidden: torch.Tensor, b: dict[str, torch.Tensor]):
            h = gather_actions(hidden, b)
            weight = self.policy.output_weight
            if p.fused_loss:
                loss, stats = ops.linear_ppo_loss(
                    h,
                    weight,
                    b["targets"],
                    b["old_logprobs"],
                    b["advantages"],
                    b["mask"],
                    temperature=self.temperature,
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
                    temperature=self.temperature,
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
                "entropy_sum": entropy_sum,
                "tokens": stats["num_tokens"],
            }
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
    ) -> tuple[dict[str, float], float, float]:
        """One optimizer step per mini-batch; returns (stats summed over the step's tokens, mean grad norm, skipped)."""
        views = {k: exp.per_sample(v) for k, v in per_action.items()}  # split once for all mini-batches
        tokens = [float(exp.table.response_len[c].sum()) for c in chunks]
        totals_per_chunk = collectives.all_reduce(
            torch.tensor(tokens, dtype=torch.float64, device=exp.device), self.dp_group
        )
        totals_per_chunk = totals_per_chunk.tolist()  # host read: one per update, the loss scales need it
        sums = torch.zeros(len(keys), dtype=torch.float64, device=exp.device)
        norms, skipped = [], 0
        for chunk, total in zip(chunks, totals_per_chunk, strict=True):
            if len(chunk):
                mbs = exp.micro_batches(chunk, self.cfg.ppo.micro_batch_tokens, views, targets=targets)
                # forward_backward divides by the micro-batch count and the optimizer's data-parallel mean by dp:
                # undo both so the gradient is the token mean over the mini-batch on all ranks.
                stats = parallel.forward_backward(
                    model, mbs, make_loss_fn(len(mbs) * self.dp / max(total, 1.0)), grad_sync=opt
                )
                if stats:  # the last pipeline stage
                    sums += torch.stack([torch.stack([s[k] for k in keys]) for s in stats]).double().sum(0)
            parallel.finalize_model_grads(model)
            res = opt.step(lr)
            norms.append(res["grad_norm"])
            skipped += int(res["skipped"])
        sums = collectives.all_reduce(sums, self.dp_group)
        if parallel.pp_size() > 1:  # the losses' stats exist on the last stage only
            sums = collectives.broadcast(sums, parallel.last_stage_rank(), parallel.pp_group())
        return dict(zip(keys, sums.tolist(), strict=True)), float(np.mean(norms)), float(skipped)

    def update_policy(self, exp: Experience, lr: float, *, step: int) -> dict[str, float]:
        """``policy_updates_per_step`` optimizer steps over shuffled mini-batches (1: the whole step's samples).

        The old log-probs are the rollout's own (strictly on-policy), recomputed once with more than one update.
        """
        k = self.cfg.ppo.policy_updates_per_step
        old = exp.logprobs if k == 1 else self.recompute_logprobs(exp)
        per_action = {"old_logprobs": old, "advantages": exp.advantages.float()}
        chunks = self.mini_batches(exp, k, step=step, salt=1)
        totals, norm, skipped = self.optimizer_steps(
            self.policy, self.policy_opt, exp, chunks, per_action, self.policy_loss_fn, POLICY_STATS, lr, targets=True
        )
        tokens = max(totals["tokens"], 1.0)
        out = {k.removesuffix("_sum"): v / tokens for k, v in totals.items() if k.endswith("_sum")}
        return out | {"policy_grad_norm": norm, "policy_steps_skipped": skipped}

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
