"""What a run repeats step after step: the prompt order, the learning rate, and the step's memory report."""

from __future__ import annotations

import numpy as np
import torch


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


@torch.no_grad()
def copy_trunk(policy: torch.nn.Module, critic: torch.nn.Module) -> None:
    """Copy the policy's trunk parameters (embedding, layers, final norm: same names, same shards) into
    the critic; the critic's value head keeps its own initialisation."""
    source = dict(policy.named_parameters())
    for name, p in critic.named_parameters():
        if name in source:
            p.copy_(source[name])


def peak_memory_gb() -> dict[str, float]:
    """Peak accelerator memory since the last call (CUDA), or the process's peak RSS (CPU)."""
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        return {"peak_gpu_memory_gb": peak}
    import resource

    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
