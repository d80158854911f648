"""Answer-format warm-up for random-weight models (the CPU demo).

A random-weight model never writes ``<answer>…</answer>`` by chance, so RL would see no reward
at all. This warm-up teaches it the format only: for a batch of training prompts it fits the
response ``<answer>X</answer>`` where X is the answer of a *different*, randomly drawn problem.
The model learns to emit an answer-shaped string from the answer distribution, not the answer
to its prompt, so RL starts at chance accuracy and any gain afterwards is learned from reward.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from orz_fast import ops, parallel
from orz_fast.data import EncodedPrompt
from orz_fast.ppo.experience import from_sequences, gather_actions
from orz_fast.ppo.optim import ShardedAdamW


def format_warmup(
    policy: torch.nn.Module,
    tokenizer,
    prompts: Sequence[EncodedPrompt],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    micro_batch_tokens: int,
    seed: int,
    tp_group=None,
) -> list[float]:
    """Supervised steps on ``prompt -> <answer>{random other answer}</answer>``; returns the losses."""
    if steps <= 0:
        return []
    rng = np.random.default_rng([seed, 17])
    answers = [p.problem.answer for p in prompts]
    device = next(policy.parameters()).device
    tied = parallel.tied_embedding_copy(policy)
    opt = ShardedAdamW(
        policy.parameters(),
        lr=lr,
        grad_clip=1.0,
        dp_group=parallel.dp_group() if parallel.dp_size() > 1 else None,
        deferred=[tied] if tied is not None else [],
    )
    encoded = {}
    losses = []
    for _ in range(steps):
        picks = rng.integers(len(prompts), size=batch_size)
        fakes = rng.integers(len(prompts), size=batch_size)
        responses = []
        for j in fakes:
            if answers[j] not in encoded:
                text = f"<answer>{answers[j]}</answer>"
                encoded[answers[j]] = list(tokenizer.encode(text, add_special_tokens=False))
            responses.append(encoded[answers[j]])
        exp = from_sequences([prompts[i].token_ids for i in picks], responses, device)
        mbs = exp.micro_batches(np.arange(batch_size), micro_batch_tokens, {})
        scale = len(mbs) / exp.num_actions

        def loss_fn(hidden, b, scale=scale):
            logp = ops.linear_logprobs(
                gather_actions(hidden, b),
                policy.output_weight,
                b["targets"],
                tp_group=tp_group,
                vocab_size=policy.spec.vocab_size,
            )
            nll = -logp.sum()
            return nll * scale, {"nll": nll.detach()}

        stats = parallel.forward_backward(policy, mbs, loss_fn, grad_sync=opt)
        parallel.finalize_model_grads(policy)
        opt.step()
        losses.append(float(sum(s["nll"] for s in stats)) / exp.num_actions)
    return losses
