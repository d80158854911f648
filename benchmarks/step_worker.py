"""One ORZ-sized PPO step on the host, for ``benchmarks/test_bench_step.py`` (run under torchrun, gloo).

``torchrun --nproc_per_node 2 benchmarks/step_worker.py OUT_DIR --scale 1.0 --steps 3`` builds the
trainer of the ``tiny`` preset at ORZ's step size (128 prompts x 64 samples, prompts up to 2,048
tokens, responses up to 8,000) and runs ``--steps`` steps through everything the step does except
model math and the reward's math checks:

- the rollout engine is a stand-in that draws ORZ-like response lengths (log-normal, median about
  2,300 tokens, 5 % cut at 8,000: about 25M response tokens per step) and random token ids, and
  hands them back in ``Completion`` objects holding numpy arrays (``--engine-output arrays``: views
  of one buffer, as the native and vLLM engines do) or Python lists (``lists``, as the engines did
  before they returned arrays);
- the policy and critic are the real models with their decoder layers removed (embedding, final
  norm and heads of width 2 over a 16-token vocabulary): every micro-batch, forward-only pass,
  loss, backward and optimizer step runs, on outputs of the right shapes ([T, H] hidden states,
  [T] values) at a negligible cost per token;
- the reward scorer returns the stand-in engine's verdicts (no math checking).

The model math of the stand-ins is timed apart (:class:`ModelMathClock`: the models' forward, the
log-prob and loss ops, the schedule's backward), so that what remains of a step's wall time is
the host's: data movement, collectives, packing, GAE and whitening, optimizer steps.

Rank 0 prints one JSON line: per-step wall and CPU seconds, those of the stand-in engine and of
the model math, the phase times the trainer logs, the step's token counts, and each rank's
resident set before the first step and its peak (``ru_maxrss``, with glibc's default allocator:
the memory a run really holds).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import schedules

from orz_fast import ops
from orz_fast.config import resolve
from orz_fast.data.loaders import EncodedPrompt, Problem
from orz_fast.models.checkpoint import model_from_config
from orz_fast.ppo import rollout as rollout_module
from orz_fast.ppo import trainer as trainer_module
from orz_fast.rollout import Completion

VOCAB = 16
PROMPT_POOL = 1024
STAND_IN_ARCH = {
    "model_type": "qwen2",
    "vocab_size": VOCAB,
    "hidden_size": 2,
    "intermediate_size": 2,
    "num_hidden_layers": 1,
    "num_attention_heads": 1,
    "num_key_value_heads": 1,
    "max_position_embeddings": 16384,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def response_lengths(rng: np.random.Generator, n: int, max_tokens: int) -> np.ndarray:
    """ORZ-like response lengths: log-normal (median ~2,200), 5 % truncated at ``max_tokens``."""
    lengths = np.clip(rng.lognormal(7.7, 0.8, n), 1, max_tokens).astype(np.int64)
    lengths[rng.random(n) < 0.05] = max_tokens
    return lengths


class StandInTokenizer:
    """Enough of a tokenizer for the trainer's build: 16 ids, the last one EOS."""

    eos_token_id = VOCAB - 1

    def __len__(self) -> int:
        return VOCAB

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % (VOCAB - 1) for c in text]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(97 + int(i)) for i in ids)


class StandInEngine:
    """Generates ORZ-like completions without a model: lengths and tokens from each request's seed."""

    output = "arrays"

    def __init__(self, *args, **kwargs) -> None:
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.response_tokens = 0
        self.prompt_tokens = 0

    def generate(self, prompts, params):
        t0, c0 = time.perf_counter(), time.process_time()
        out = []
        for prompt, p in zip(prompts, params, strict=True):
            rng = np.random.default_rng(p.seed)
            lengths = response_lengths(rng, p.n, p.max_tokens)
            tokens = rng.integers(0, VOCAB, size=int(lengths.sum()))
            logprobs = -rng.random(int(lengths.sum()), dtype=np.float32)
            correct = rng.random(p.n) < 0.5
            ends = np.cumsum(lengths)
            completions = []
            as_lists = self.output == "lists"
            for j in range(p.n):
                lo, hi = int(ends[j] - lengths[j]), int(ends[j])
                completions.append(
                    Completion(
                        token_ids=tokens[lo:hi].tolist() if as_lists else tokens[lo:hi],
                        logprobs=logprobs[lo:hi].tolist() if as_lists else logprobs[lo:hi],
                        finish_reason="length" if lengths[j] == p.max_tokens else "stop",
                        text="1" if correct[j] else "0",
                    )
                )
            out.append(completions)
            self.response_tokens += int(lengths.sum())
            self.prompt_tokens += len(prompt) * p.n
        self.seconds += time.perf_counter() - t0
        self.cpu_seconds += time.process_time() - c0
        return out


class StandInScorer:
    """The stand-in engine's verdict as the score (0 when truncated): no math checking."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def score_batch(self, responses, ground_truths, *, finish_reasons=None, truncated=None):
        cut = finish_reasons or [None] * len(responses)
        return [1.0 if r == "1" and c != "length" else 0.0 for r, c in zip(responses, cut, strict=True)]

    def close(self) -> None:
        pass


class ModelMathClock:
    """Wall and CPU seconds spent in model math: the models' forward, the log-prob and loss ops, and backward."""

    seconds = 0.0
    cpu_seconds = 0.0

    @classmethod
    def timed(cls, fn):
        def wrapper(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                cls.seconds += time.perf_counter() - t0
                cls.cpu_seconds += time.process_time() - c0

        return wrapper

    @classmethod
    def install(cls) -> None:
        for name in ("linear_ppo_loss", "linear_logprobs", "ppo_policy_loss", "ppo_value_loss"):
            setattr(ops, name, cls.timed(getattr(ops, name)))
        schedules.backward_step = cls.timed(schedules.backward_step)


def stand_in_model(model_cfg, *, role="policy", device=None, seed=0):
    """The real policy / critic with its decoder layers removed: embedding -> final norm -> head."""
    model = model_from_config(model_cfg, role=role, device=device, seed=seed)
    model.layers = torch.nn.ModuleList()
    model.layer_ids = range(0)
    model.forward = ModelMathClock.timed(model.forward)
    return model


def synthetic_prompts(max_prompt_tokens: int) -> list[EncodedPrompt]:
    rng = np.random.default_rng(1234)
    lengths = np.clip(rng.lognormal(5.3, 0.7, PROMPT_POOL), 16, max_prompt_tokens).astype(np.int64)
    lengths[0] = max_prompt_tokens
    return [
        EncodedPrompt(
            problem=Problem(prompt=f"problem {i}", answer="1", source="synthetic", index=i),
            text=f"problem {i}",
            token_ids=rng.integers(0, VOCAB - 1, size=int(n)).tolist(),
        )
        for i, n in enumerate(lengths)
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of ORZ's 128 prompts per step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--engine-output", choices=["arrays", "lists"], default="arrays")
    parser.add_argument("--share-prompts", choices=["true", "false"], default="true", help="ppo.share_prompts")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    prompts_per_step = max(2, round(128 * args.scale))
    cfg = resolve(
        "tiny",
        overrides=[
            "logging.progress=false",
            "model.arch=" + json.dumps(STAND_IN_ARCH),
            f"rollout.prompts_per_step={prompts_per_step}",
            "rollout.samples_per_prompt=64",
            "rollout.max_tokens=8000",
            "data.max_prompt_tokens=2048",
            "data.synthetic_size=64",
            "ppo.micro_batch_tokens=16384",
            "ppo.critic_updates_per_step=12",
            "ckpt.every=0",
            f"ppo.share_prompts={args.share_prompts}",
        ],
    )
    StandInEngine.output = args.engine_output
    ModelMathClock.install()
    trainer_module.model_from_config = stand_in_model
    trainer_module.load_tokenizer = lambda path: StandInTokenizer()
    rollout_module.NativeEngine = StandInEngine
    rollout_module.RewardScorer = StandInScorer

    trainer = trainer_module.Trainer(cfg, args.out)
    rollouts = trainer.rollouts
    rollouts.prompts = synthetic_prompts(cfg.data.max_prompt_tokens)
    rollouts.sampler = trainer_module.PromptSampler(len(rollouts.prompts), cfg.train.seed)
    engine = rollouts.engine

    baseline = resident_bytes()
    steps = []
    for _ in range(args.steps):
        before = (engine.seconds, engine.cpu_seconds, ModelMathClock.seconds, ModelMathClock.cpu_seconds)
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = trainer.train_step()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        trainer.step += 1
        phases = {k: v for k, v in metrics.items() if k.startswith("time_")}
        steps.append(
            {
                "wall_s": wall,
                "cpu_s": cpu,
                "engine_stand_in_s": engine.seconds - before[0],
                "engine_stand_in_cpu_s": engine.cpu_seconds - before[1],
                "model_math_s": ModelMathClock.seconds - before[2],
                "model_math_cpu_s": ModelMathClock.cpu_seconds - before[3],
                **phases,
            }
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    counts = torch.tensor([engine.response_tokens, engine.prompt_tokens], dtype=torch.float64)
    dist.all_reduce(counts)
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, {"baseline_rss": baseline, "peak_rss": peak, "steps": steps})
    if dist.get_rank() == 0:
        result = {
            "engine_output": args.engine_output,
            "world_size": dist.get_world_size(),
            "prompts_per_step": prompts_per_step,
            "samples_per_step": prompts_per_step * 64,
            "response_tokens_per_step": counts[0].item() / args.steps,
            "prompt_tokens_per_step": counts[1].item() / args.steps,
            "ranks": per_rank,
        }
        print(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
