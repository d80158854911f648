"""Public functional API of orz_fast: advantages, PPO losses and fused log-probs.

Every op takes the packed 1-D token layout (flash-attn ``cu_seqlens`` style: all responses of
the batch concatenated, T tokens in all) and a ``backend``:

- ``None``: the Triton kernel for CUDA tensors, the vectorised torch path for CPU tensors
  (and for CUDA tensors when the kernels were imported under ``TRITON_INTERPRET=1``);
- ``"triton"``: the kernel always: compiled on CUDA tensors, or on CPU tensors in Triton's
  interpreter when ``TRITON_INTERPRET=1`` was set before ``orz_fast.kernels`` was imported (the
  test suites set it on CPU machines); any other device is a ``ValueError`` raised before work;
- ``"torch"``: the torch path always.

No op syncs the GPU: losses and statistics come back as 0-dim tensors. Other frameworks can
import these functions as a drop-in backend for their advantage, loss and log-prob code.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

from orz_fast.kernels.gae import gae_fwd, gae_torch
from orz_fast.kernels.linear_logprobs import linear_logprobs_chunked
from orz_fast.kernels.linear_ppo_loss import linear_ppo_loss_chunked
from orz_fast.kernels.ppo_policy_loss import ppo_policy_loss_ref, ppo_policy_loss_triton
from orz_fast.kernels.ppo_value_loss import ppo_value_loss_ref, ppo_value_loss_triton
from orz_fast.kernels.utils import check_triton_device, triton_runs_on

Backend = Literal["triton", "torch"] | None

__all__ = ["gae", "ppo_policy_loss", "ppo_value_loss", "linear_logprobs", "linear_ppo_loss"]


def _use_triton(backend: Backend, *tensors: torch.Tensor) -> bool:
    """Whether this call runs the Triton kernels; raises ``ValueError`` before any work when
    ``backend="triton"`` cannot run on the tensors' device."""
    if backend is None:
        return tensors[0].is_cuda and triton_runs_on(tensors[0])
    if backend == "triton":
        check_triton_device(*tensors)
        return True
    if backend == "torch":
        return False
    raise ValueError(f"backend must be None, 'triton' or 'torch', got {backend!r}")


def _check_tokens(name: str, tensors: dict[str, torch.Tensor], *, floating: tuple[str, ...]) -> int:
    """All tensors 1-D of one length T on one device; the ``floating`` ones float. Returns T."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if any(len(s) != 1 for s in shapes.values()) or len(set(shapes.values())) != 1:
        raise ValueError(f"{name}: expected 1-D tensors of one length T, got shapes {shapes}")
    devices = {k: str(v.device) for k, v in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"{name}: expected tensors on one device, got {devices}")
    for k in floating:
        if not tensors[k].is_floating_point():
            raise ValueError(f"{name}: {k} must be a float tensor, got {tensors[k].dtype} with shape {shapes[k]}")
    return next(iter(shapes.values()))[0]


def _check_tis_cap(name: str, rollout_logprobs: torch.Tensor | None, tis_cap: float | None) -> None:
    if tis_cap is None:
        return
    if isinstance(tis_cap, bool) or not isinstance(tis_cap, (int, float)) or not 0 < tis_cap < float("inf"):
        raise ValueError(f"{name}: tis_cap must be a finite number > 0, got {tis_cap!r}")
    if rollout_logprobs is None:
        raise ValueError(f"{name}: tis_cap={tis_cap} weights tokens by pi_old / pi_rollout and needs rollout_logprobs")


def _float_out(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype results come back in: the inputs' promoted dtype, at least float32."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    cu_seqlens: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
    *,
    backend: Backend = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over packed responses.

    Args:
        rewards: [T] float, per-token reward (ORZ: the 0/1 score on each response's last token).
        values: [T] float, critic values; the value after a segment's last token is taken as 0.
        cu_seqlens: [N+1] integer, segment offsets, 0 first and T last (empty segments allowed).
        gamma, lam: discount and GAE lambda, any values (ORZ uses 1 and 1).

    Returns:
        (advantages [T], returns [T]) with ``returns = advantages + values``, in the inputs'
        promoted dtype but at least float32, accumulated in fp32 (the ``gamma * lam == 1``
        torch path sums in fp64). They are PPO targets, so they carry no gradient.
    """
    T = _check_tokens("gae", {"rewards": rewards, "values": values}, floating=("rewards", "values"))
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.is_floating_point():
        raise ValueError(
            f"gae: cu_seqlens must be a 1-D integer tensor [N+1], got {cu_seqlens.dtype} "
            f"with shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != rewards.device:
        raise ValueError(f"gae: cu_seqlens is on {cu_seqlens.device} but rewards on {rewards.device}")
    if cu_seqlens.device.type == "cpu":
        # CPU only: on a GPU this check would sync the device, so there the offsets are trusted
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError(
                f"gae: cu_seqlens must rise from 0 to T={T} (rewards shape {tuple(rewards.shape)}), "
                f"got first={int(cu_seqlens[0])} last={int(cu_seqlens[-1])}"
            )
    out_dtype = _float_out(rewards, values)
    if _use_triton(backend, rewards, values, cu_seqlens):
        return gae_fwd(rewards, values, cu_seqlens, gamma, lam, out_dtype)
    return gae_torch(rewards, values, cu_seqlens, gamma, lam, out_dtype)


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    tis_cap: float | None = None,
    backend: Backend = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss, masked token mean, with statistics in the same pass.

    ``loss = sum(mask * w * max(-A * r, -A * clip(r, 1 - eps, 1 + eps_high))) / max(sum(mask), 1)``
    with ``r = exp(logprobs - old_logprobs)``, ``eps_high = clip_eps`` unless given, and ``w = 1``
    unless ``tis_cap`` is given: then ``w = min(exp(old_logprobs - rollout_logprobs), tis_cap)``, a
    constant (truncated importance sampling, Yao et al. 2025).

    Args:
        logprobs: [T] float, current policy log-probs (differentiable).
        old_logprobs, advantages: [T] float.
        mask: [T] bool or float, 1 for tokens that count.
        rollout_logprobs: [T] float or None, the sampler's log-probs of the tokens: adds the
            rollout–trainer gap statistics.
        tis_cap: finite float > 0 or None, the truncation ``C`` of the importance weights (needs
            ``rollout_logprobs``).

    Returns:
        (loss 0-dim float32 or wider, stats) where stats holds 0-dim tensors ``clipfrac``,
        ``approx_kl`` (masked mean of ``(r - 1) - log r``), ``ratio_mean``, ``ratio_min``,
        ``ratio_max`` (0 when no token counts) and ``num_tokens``; with ``rollout_logprobs`` also
        ``rollout_diff_mean``, ``rollout_diff_max`` (of ``|logprobs - rollout_logprobs|``) and
        ``rollout_ratio_max`` (of ``exp(logprobs - rollout_logprobs)``) over counted tokens.
    """
    tokens = {"logprobs": logprobs, "old_logprobs": old_logprobs, "advantages": advantages, "mask": mask}
    floating = ("logprobs", "old_logprobs", "advantages")
    if rollout_logprobs is not None:
        tokens["rollout_logprobs"] = rollout_logprobs
        floating += ("rollout_logprobs",)
    _check_tokens("ppo_policy_loss", tokens, floating=floating)
    _check_tis_cap("ppo_policy_loss", rollout_logprobs, tis_cap)
    clip_high = clip_eps if clip_eps_high is None else clip_eps_high
    if _use_triton(backend, *tokens.values()):
        return ppo_policy_loss_triton(
            logprobs, old_logprobs, advantages, mask, clip_eps, clip_high, rollout_logprobs, tis_cap
        )
    dtype = _float_out(*(tokens[k] for k in floating))
    return ppo_policy_loss_ref(
        logprobs.to(dtype),
        old_logprobs.to(dtype),
        advantages.to(dtype),
        mask,
        clip_eps,
        clip_high,
        None if rollout_logprobs is None else rollout_logprobs.to(dtype),
        tis_cap,
    )


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float = 0.2,
    backend: Backend = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: ``0.5 * masked mean of max((V - R)^2, (old + clamp(V - old, -c, c) - R)^2)``.

    Args:
        values: [T] float, current critic values (differentiable).
        old_values, returns: [T] float.
        mask: [T] bool or float.

    Returns:
        (loss 0-dim, stats) where stats holds 0-dim tensors ``clipfrac``, ``explained_variance``
        (``1 - Var(R - V) / Var(R)`` over masked tokens) and its inputs ``returns_sum``,
        ``returns_sq_sum``, ``error_sum``, ``error_sq_sum`` (error = R - V), ``num_tokens``.
    """
    _check_tokens(
        "ppo_value_loss",
        {"values": values, "old_values": old_values, "returns": returns, "mask": mask},
        floating=("values", "old_values", "returns"),
    )
    if _use_triton(backend, values, old_values, returns, mask):
        return ppo_value_loss_triton(values, old_values, returns, mask, clip)
    dtype = _float_out(values, old_values, returns)
    return ppo_value_loss_ref(values.to(dtype), old_values.to(dtype), returns.to(dtype), mask, clip)


def _check_linear(name: str, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float):
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError(
            f"{name}: expected hidden [T, H], weight [V, H], targets [T], got hidden "
            f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}, targets {tuple(targets.shape)}"
        )
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != targets.shape[0]:
        raise ValueError(
            f"{name}: shapes disagree: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
            f"targets {tuple(targets.shape)}"
        )
    if hidden.dtype != weight.dtype or not hidden.is_floating_point():
        raise ValueError(
            f"{name}: hidden and weight must share one float dtype, got {hidden.dtype} "
            f"{tuple(hidden.shape)} and {weight.dtype} {tuple(weight.shape)}"
        )
    if targets.is_floating_point():
        raise ValueError(f"{name}: targets must be integer ids, got {targets.dtype} {tuple(targets.shape)}")
    if len({hidden.device, weight.device, targets.device}) != 1:
        raise ValueError(
            f"{name}: hidden, weight and targets must be on one device, got {hidden.device}, "
            f"{weight.device}, {targets.device}"
        )
    if not temperature > 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temperature}")


def _check_vocab(
    name: str,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int | None,
    tp_group: dist.ProcessGroup | None,
) -> None:
    """``vocab_size`` within the weight's rows (over the TP group); on CPU, every target a real id."""
    rows = weight.shape[0] * (dist.get_world_size(tp_group) if tp_group is not None else 1)
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= rows:
            raise ValueError(
                f"{name}: vocab_size must be an int in [1, {rows}] (the weight's rows {tuple(weight.shape)}"
                f" over the TP group), got {vocab_size!r}"
            )
    if targets.device.type == "cpu" and targets.numel():
        # CPU only: on a GPU this check would sync the device, so there the ids are trusted
        lo, hi, limit = int(targets.min()), int(targets.max()), vocab_size or rows
        if lo < 0 or hi >= limit:
            raise ValueError(f"{name}: targets must be ids in [0, {limit}), got {lo if lo < 0 else hi}")


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    return_entropy: bool = False,
    vocab_size: int | None = None,
    backend: Backend = None,
):
    """Log-softmax of ``hidden @ weight.T / temperature`` at ``targets``, never holding [T, V] logits.

    Args:
        hidden: [T, H] float (bf16, fp16 or fp32), differentiable.
        weight: [V, H] same dtype, differentiable; with ``tp_group`` this rank's vocab shard
            (equal shards in rank order, rank r holding ids [r * V, (r + 1) * V)).
        targets: [T] integer global vocab ids (below ``vocab_size``; checked on CPU).
        tp_group: vocab-parallel group; statistics are combined with [T]-sized all-reduces and
            the gradient of ``hidden`` is all-reduced over it (do not all-reduce it again).
        return_entropy: also return the entropy of the (tempered) distribution.
        vocab_size: the real vocabulary when ``weight`` is padded (an orz_fast policy's
            ``output_weight``: pass ``model.spec.vocab_size``); rows with a global id from it on
            are outside the softmax and the entropy and get a zero gradient. ``None``: every row
            is a token. A TP rank may hold padding rows only.

    Returns:
        logprobs [T] float32, or (logprobs [T], entropy [T]) float32 with ``return_entropy``.
    """
    _check_linear("linear_logprobs", hidden, weight, targets, temperature)
    _check_vocab("linear_logprobs", weight, targets, vocab_size, tp_group)
    return linear_logprobs_chunked(
        hidden,
        weight,
        targets,
        temperature=temperature,
        tp_group=tp_group,
        return_entropy=return_entropy,
        use_triton=_use_triton(backend, hidden, weight, targets),
        vocab_size=vocab_size,
    )


def linear_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    tp_group: dist.ProcessGroup | None = None,
    return_entropy: bool = False,
    vocab_size: int | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    tis_cap: float | None = None,
    backend: Backend = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``ppo_policy_loss(linear_logprobs(hidden, weight, targets), ...)`` fused, gradients made in the forward.

    Args:
        hidden: [T, H], weight: [V, H] (or this rank's vocab shard), targets: [T], vocab_size
            (the real vocabulary of a padded weight) as in ``linear_logprobs``; old_logprobs,
            advantages: [T] float; mask: [T] bool or float; rollout_logprobs, tis_cap as in
            ``ppo_policy_loss``. ``old_logprobs`` may be ``None``: the old log-probs are then this
            forward's own, detached (``r = 1``, gradient ``-A * w * dlogp``), which is what one
            optimizer step per rollout gets from recomputed old log-probs, without recomputing them.

    Returns:
        (loss 0-dim float32, stats) with the same stats as ``ppo_policy_loss``, plus ``entropy``
        (masked token mean, fp32, no gradient) when ``return_entropy``. Its backward needs no
        recomputation: dhidden and dweight are made in the forward (three GEMMs).
    """
    _check_linear("linear_ppo_loss", hidden, weight, targets, temperature)
    tokens = {"targets": targets, "advantages": advantages, "mask": mask}
    optional = {"old_logprobs": old_logprobs, "rollout_logprobs": rollout_logprobs}
    tokens |= {k: v for k, v in optional.items() if v is not None}
    _check_tokens("linear_ppo_loss", tokens, floating=tuple(k for k in tokens if k not in ("targets", "mask")))
    _check_tis_cap("linear_ppo_loss", rollout_logprobs, tis_cap)
    _check_vocab("linear_ppo_loss", weight, targets, vocab_size, tp_group)
    return linear_ppo_loss_chunked(
        hidden,
        weight,
        targets,
        old_logprobs,
        advantages,
        mask,
        temperature=temperature,
        clip_low=clip_eps,
        clip_high=clip_eps if clip_eps_high is None else clip_eps_high,
        tp_group=tp_group,
        use_triton=_use_triton(backend, hidden, weight, *tokens.values()),
        return_entropy=return_entropy,
        vocab_size=vocab_size,
        rollout_logprobs=rollout_logprobs,
        tis_cap=tis_cap,
    )
