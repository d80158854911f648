"""Generalised advantage estimation over a packed token stream (flash-attn ``cu_seqlens`` layout).

For every segment (one response) with tokens ``bos <= t < eos``::

    delta_t = r_t + gamma * V_{t+1} - V_t        (V_eos = 0: the value after the last token)
    A_t     = delta_t + gamma * lam * A_{t+1}    (A_eos = 0)
    R_t     = A_t + V_t

The Triton kernel runs one program per segment, walking the segment from its end in blocks of
``BT`` tokens; inside a block the first-order recurrence is an associative scan, and the block's
first advantage carries into the next block. All segments, whatever their lengths, go in one
launch. The CPU path is vectorised: a segmented reverse cumsum (one prefix sum) when ``gamma * lam == 1`` and a
chunked scan otherwise (a loop over the positions of a fixed-size chunk, vectorised across all
chunks, recursing on the per-chunk carries).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from orz_fast.kernels.utils import check_triton_device

_SCAN_CHUNK = 16


@triton.jit
def _first_order_combine(a_left, x_left, a_right, x_right):
    # compose y -> a_right * (a_left * y + x_left) + x_right (left is the earlier element)
    return a_left * a_right, x_left * a_right + x_right


@triton.jit
def _gae_fwd_kernel(
    rewards_ptr,
    values_ptr,
    cu_seqlens_ptr,
    adv_ptr,
    ret_ptr,
    gamma,
    lam,
    BT: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    bos = tl.load(cu_seqlens_ptr + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens_ptr + i_n + 1).to(tl.int64)
    o_t = tl.arange(0, BT)
    b_decay_step = tl.zeros([BT], dtype=tl.float32) + gamma * lam
    b_carry = tl.zeros([1], dtype=tl.float32)
    for i_b in range(0, tl.cdiv(eos - bos, BT)):
        # tokens in reverse order: lane j is token eos - 1 - i_b * BT - j
        p_t = eos - 1 - i_b * BT - o_t
        m_t = p_t >= bos
        # [BT]
        b_r = tl.load(rewards_ptr + p_t, mask=m_t, other=0).to(tl.float32)
        # [BT]
        b_v = tl.load(values_ptr + p_t, mask=m_t, other=0).to(tl.float32)
        # [BT]
        b_v_next = tl.load(values_ptr + p_t + 1, mask=m_t & (p_t + 1 < eos), other=0).to(tl.float32)
        b_delta = b_r + gamma * b_v_next - b_v
        b_decay, b_adv = tl.associative_scan((b_decay_step, b_delta), 0, _first_order_combine)
        b_adv = b_adv + b_decay * b_carry
        tl.store(adv_ptr + p_t, b_adv.to(adv_ptr.dtype.element_ty), mask=m_t)
        tl.store(ret_ptr + p_t, (b_adv + b_v).to(ret_ptr.dtype.element_ty), mask=m_t)
        # only the segment's first block can be partial, and nothing reads its carry
        b_carry = tl.sum(tl.where(o_t == BT - 1, b_adv, 0.0), axis=0, keep_dims=True)


def gae_fwd(
    rewards: torch.Tensor, values: torch.Tensor, cu_seqlens: torch.Tensor, gamma: float, lam: float, out_dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch ``_gae_fwd_kernel``: one program per segment. Returns (advantages [T], returns [T])."""
    check_triton_device(rewards, values, cu_seqlens, kernel=_gae_fwd_kernel)
    T = rewards.numel()
    N = cu_seqlens.numel() - 1
    adv = torch.empty(T, dtype=out_dtype, device=rewards.device)
    ret = torch.empty(T, dtype=out_dtype, device=rewards.device)
    if T == 0 or N == 0:
        return adv, ret
    _gae_fwd_kernel[(N,)](
        rewards.contiguous(),
        values.contiguous(),
        cu_seqlens.contiguous(),
        adv,
        ret,
        float(gamma),
        float(lam),
        BT=1024,
        num_warps=4,
    )
    return adv, ret


def reverse_linear_scan(x: torch.Tensor, a: torch.Tensor, chunk: int = _SCAN_CHUNK) -> torch.Tensor:
    """``y_t = x_t + a_t * y_{t+1}`` with ``y_T = 0`` for 1-D ``x``, ``a`` of length T, vectorised.

    The stream is cut into chunks of ``chunk`` positions laid out as a [chunk, n_chunks] matrix;
    a loop over the ``chunk`` rows scans every chunk at once, recording the local result and the
    product of decays to the chunk's end. The chunk heads form a recurrence of length n_chunks,
    solved by recursion, and each chunk then adds its decayed carry.
    """
    T = x.numel()
    n = -(-T // chunk)
    pad = n * chunk - T
    # [chunk, n]: row j holds position j of every chunk, so each step is one contiguous vector op
    xs = F.pad(x, (0, pad)).view(n, chunk).T.contiguous()
    as_ = F.pad(a, (0, pad)).view(n, chunk).T.contiguous()
    y = torch.empty_like(xs)
    d = torch.empty_like(xs)
    y[chunk - 1] = xs[chunk - 1]
    d[chunk - 1] = as_[chunk - 1]
    for j in range(chunk - 2, -1, -1):
        torch.addcmul(xs[j], as_[j], y[j + 1], out=y[j])
        torch.mul(as_[j], d[j + 1], out=d[j])
    if n > 1:
        heads = reverse_linear_scan(y[0], d[0], chunk)
        carry = torch.cat([heads[1:], heads.new_zeros(1)])
        y.addcmul_(d, carry)
    return y.T.reshape(-1)[:T]


def gae_torch(
    rewards: torch.Tensor, values: torch.Tensor, cu_seqlens: torch.Tensor, gamma: float, lam: float, out_dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised torch GAE. Returns (advantages [T], returns [T]) in ``out_dtype``.

    Works in ``out_dtype`` (float32 or float64); the ``gamma * lam == 1`` prefix sum runs over
    the whole stream, so it is taken in float64 to keep late segments exact.
    """
    T = rewards.numel()
    if T == 0:
        empty = torch.empty(0, dtype=out_dtype, device=rewards.device)
        return empty, empty.clone()
    v = values.to(out_dtype)
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    nonempty = lengths > 0
    ends = cu[1:][nonempty]
    # delta_t = r_t + gamma * V_{t+1} - V_t, with the next value zeroed at each segment's last token
    delta = rewards.to(out_dtype) - v
    delta[:-1].add_(v[1:], alpha=gamma)
    inner = ends[ends < T]
    delta[inner - 1] -= gamma * v[inner]
    if gamma * lam == 1.0:
        # segmented reverse cumsum from one prefix sum: A_t = C[eos(t) - 1] - C[t] + delta_t
        csum = torch.cumsum(delta, 0, dtype=torch.float64)
        adv = torch.repeat_interleave(csum[ends - 1], lengths[nonempty], output_size=T)
        adv = adv.sub_(csum).add_(delta).to(out_dtype)
    else:
        decay = torch.full_like(delta, gamma * lam)
        decay[ends - 1] = 0.0
        adv = reverse_linear_scan(delta, decay)
    return adv, adv + v


def gae_ref(
    rewards: torch.Tensor, values: torch.Tensor, cu_seqlens: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct per-token recurrence in float64, a Python loop over tokens (tests and benchmarks only)."""
    r = rewards.double().tolist()
    v = values.double().tolist()
    adv = [0.0] * len(r)
    cu = cu_seqlens.tolist()
    for bos, eos in zip(cu[:-1], cu[1:], strict=True):
        last = 0.0
        for t in range(eos - 1, bos - 1, -1):
            v_next = v[t + 1] if t + 1 < eos else 0.0
            last = r[t] + gamma * v_next - v[t] + gamma * lam * last
            adv[t] = last
    adv_t = torch.tensor(adv, dtype=torch.float64)
    return adv_t, adv_t + values.double().cpu()
