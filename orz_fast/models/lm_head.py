"""The policy's LM head as the trainer and the rollout both use it: one log-prob computation.

The trainer's log-probs come from ``ops.linear_logprobs`` / ``ops.linear_ppo_loss`` on the last
stage's hidden states and the (vocab-parallel, padded) head weight. Per chunk of tokens they take
this rank's logits with one GEMM in the model's dtype over the shard's real rows, read them in
fp32 as ``z = logits * (1 / temperature)``, reduce each row to its (max, sum of exp, target logit)
and combine those over the tensor-parallel shards; ``logp = z_target - logsumexp(z)``.

The native engine samples from the very same numbers. :func:`lm_head_shard` is that GEMM, and
:meth:`LogitShard.logprobs` that reduction: the same kernel functions the trainer's ops call
(``row_stats``, ``combine_vocab_stats``; the Triton row kernel on GPU, torch on CPU). The sampler
draws from the fp32 logits (:meth:`LogitShard.fp32_logits`: gathered over TP, real vocabulary
only) divided by the temperature, and the sampled token's log-prob is :meth:`LogitShard.logprobs`
of it. So in fp32 the rollout's log-prob of a token and
:func:`token_logprobs` (the trainer's) differ only by how the two forwards' hidden states differ.

:func:`packed_token_logprobs` is the trainer-side function for a whole packed batch (any TP / PP
layout): what the rollout–trainer gap is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from orz_fast import ops, parallel
from orz_fast.kernels.linear_logprobs import combine_vocab_stats, row_stats, shard_columns, vocab_start_of
from orz_fast.kernels.utils import triton_runs_on
from orz_fast.models.decoder import PolicyModel


def _tp_group():
    return parallel.tp_group() if parallel.tp_size() > 1 else None


@dataclass
class LogitShard:
    """This TP rank's LM-head logits of some rows: the columns of its real vocabulary ids."""

    logits: torch.Tensor
    """[R, valid] in the model's dtype (``valid`` may be 0 on a rank holding only padding rows)."""
    vocab_start: int
    """Global id of column 0."""
    shard_rows: int
    """Rows of this rank's head shard (padding included): the width every rank's shard is gathered at."""
    vocab_size: int
    """The real vocabulary."""

    def logprobs(self, targets: torch.Tensor, temperature: float) -> torch.Tensor:
        """fp32 [R] ``log_softmax(logits / temperature)`` at global ids ``targets`` [R], combined over TP.
        Exactly the reduction of ``ops.linear_logprobs`` (same functions, same device path)."""
        use_triton = self.logits.is_cuda and triton_runs_on(self.logits)
        stats = row_stats(self.logits, targets, self.vocab_start, 1.0 / float(temperature), False, use_triton)
        return combine_vocab_stats(stats, _tp_group())[2]

    def fp32_logits(self) -> torch.Tensor:
        """fp32 [R, V] logits over the whole real vocabulary (gathered over TP): what the sampler draws from."""
        z = self.logits.float()
        group = _tp_group()
        if group is None:
            return z
        rows, valid = z.shape
        shard = z.new_full((rows, self.shard_rows), float("-inf"))
        shard[:, :valid] = z
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, shard, group=group)
        return torch.cat(parts, dim=1)[:, : self.vocab_size]

    def rows(self, index: torch.Tensor) -> LogitShard:
        """The shard of the rows ``index`` [R'] only."""
        return LogitShard(self.logits[index], self.vocab_start, self.shard_rows, self.vocab_size)


def lm_head_shard(model: PolicyModel, hidden: torch.Tensor) -> LogitShard:
    """This rank's logits of ``hidden`` [R, H]: the GEMM ``ops.linear_logprobs`` runs per chunk (model dtype,
    over the shard's real rows only, so a padding id is never a column). Last stage only."""
    weight = model.output_weight
    vocab_start = vocab_start_of(weight, _tp_group())
    valid, cols = shard_columns(weight.shape[0], vocab_start, model.spec.vocab_size)
    logits = (hidden @ weight[:cols].T)[:, :valid]
    return LogitShard(logits, vocab_start, weight.shape[0], model.spec.vocab_size)


def token_logprobs(model: PolicyModel, hidden: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0):
    """The trainer's log-probs: fp32 [T] ``log_softmax(hidden @ W.T / temperature)`` at ``targets`` [T] over the
    real vocabulary, from ``ops.linear_logprobs`` with this model's head shard and TP group (differentiable)."""
    return ops.linear_logprobs(
        hidden,
        model.output_weight,
        targets,
        temperature=temperature,
        tp_group=_tp_group(),
        vocab_size=model.spec.vocab_size,
    )


@torch.no_grad()
def packed_token_logprobs(
    model: PolicyModel,
    input_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Trainer log-probs of a packed batch: fp32 [N], entry ``i`` the log-prob of ``targets[i]`` given the
    tokens of its segment up to packed position ``rows[i]`` (a response token ``t`` of a sequence packed at
    ``start``: ``rows = start + t - 1``). One forward-only pass through the pipeline schedule, then
    :func:`token_logprobs`; every rank of the model-parallel group gets the result.

    Args:
        input_ids: int [T] packed prompt + response tokens; cu_seqlens: int [N_seq + 1] their boundaries.
        rows: int64 [N] packed positions; targets: int64 [N] the next tokens there.
    """
    if rows.shape != targets.shape or rows.dim() != 1:
        raise ValueError(
            f"rows and targets must be 1-D of one length, got {tuple(rows.shape)} and {tuple(targets.shape)}"
        )
    device = next(model.parameters()).device
    batch = {"input_ids": input_ids.to(device), "cu_seqlens": cu_seqlens.to(device)}

    def logprobs_of(hidden: torch.Tensor, _batch) -> torch.Tensor:
        return token_logprobs(model, hidden[rows.to(device)], targets.to(device), temperature=temperature)

    was_training = model.training
    model.eval()
    try:
        out = parallel.forward_backward(model, [batch], logprobs_of, forward_only=True)
    finally:
        model.train(was_training)
    result = out[0].float() if out else torch.empty(rows.shape[0], dtype=torch.float32, device=device)
    if parallel.pp_size() > 1:
        dist.broadcast(result, src=parallel.last_stage_rank(), group=parallel.pp_group())
    return result
