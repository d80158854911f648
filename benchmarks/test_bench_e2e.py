"""End to end: orz_fast's trainer against TRL's ``GRPOTrainer`` on the same RL workload.

Both sides train the same checkpoint (random weights, a Qwen2 architecture, saved once with a
character-level tokenizer padded with filler tokens to the model's vocabulary) on the same prompts
(``orz_fast.data.synthetic`` arithmetic in the ``plain`` template, in the order orz_fast's sampler
takes them), with the same samples per prompt, temperature 1, the same maximum of new tokens (no
stop strings; EOS, which a random model rarely samples, ends a response on both sides), the same
per-step batch and micro-batch size, and the same optimizer (AdamW, betas (0.9, 0.95), eps 1e-8,
no weight decay, grad clip 1.0, constant lr). orz_fast runs its ``Trainer`` as ``python -m
orz_fast.train --preset tiny --set ...`` builds it, with ``ppo.advantage=grpo`` (critic-free, one
model trained, as TRL's GRPO); TRL runs its own transformers generation, no KL term, one optimizer
step per generation batch. TRL 1.16 has no PPO trainer (``PPOTrainer`` was removed, and is not in
``trl.experimental``), so orz_fast's GAE path has no TRL counterpart to race.

Two workloads (``WORKLOADS``), each with its own result file: ``fixed_length`` (4 prompts x 8 samples on CPU;
EOS, which a random model rarely samples, almost never ends a response, so every response runs to the
maximum) and ``orz_shaped`` (16 samples per prompt; the checkpoint's EOS logit is biased (:func:`bias_eos`)
so that responses end at EOS with lengths from a few tokens to the maximum, roughly geometric; the measured
length distribution of each side is in the result).

Each side runs in its own process (``e2e_sides.py``; on CPU with one intra-op thread) for one
warm-up step and ``timed_steps`` timed steps; the sides alternate for ``rounds`` rounds so a load
change hits both. Counted per step, identically on both sides: generated tokens (completion
tokens), trained tokens (prompt + completion tokens of every sample, padding not counted), and the
wall-clock and process CPU seconds of the step and of its rollout phase (generation, decoding,
reward, advantages); the update phase is the rest of the step.

Reported per side: generated tokens/s over the rollout phase, trained tokens/s over the whole step
and over the update phase, and seconds per step, each per wall-clock second and per CPU second.
``speedup_vs_trl`` is orz_fast's trained tokens/s over TRL's for the whole step (the median of
the rounds' ratios): per wall-clock second on a GPU; on CPU per second of process CPU time, which
for a one-thread process is its wall-clock rate on a core of its own. The CPU machine is shared:
there, the wall-clock ratios of single rounds have ranged from 1.2x to 4.5x
(``wall_clock_speedup_vs_trl``, reported beside it), the CPU-time ones from 1.25x to 1.8x.
Targets: >= 2x TRL on CPU (not met: recorded in ``meets_target``, not asserted), >= 3x on a GPU
(Qwen2.5-0.5B-shaped, bf16; asserted).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import QWEN25_0P5B, SMALL_QWEN2, write_result

from orz_fast.data import render_prompt, synthetic_problems

CUDA = torch.cuda.is_available()
BENCH_DIR = Path(__file__).resolve().parent

CPU_ARCH = SMALL_QWEN2
FIXED_LENGTH = {
    # the model, batch and lengths of one PPO step; a micro-batch holds micro_batch_samples samples
    "arch": QWEN25_0P5B if CUDA else CPU_ARCH,
    "dtype": "bfloat16" if CUDA else "float32",
    "prompts_per_step": 16 if CUDA else 4,
    "samples_per_prompt": 8,
    "max_new_tokens": 512 if CUDA else 64,
    "micro_batch_samples": 32,
    "temperature": 1.0,
    "lr": 1e-5,
    "betas": [0.9, 0.95],
    "eps": 1e-8,
    "weight_decay": 0.0,
    "grad_clip": 1.0,
    "seed": 42,
    "task": ("arithmetic", 2),  # synthetic family, difficulty
    "warmup_steps": 1,
    "timed_steps": 4,
    "rounds": 3,
    "threads": 1,
    "eos_hazard": None,  # a random model rarely samples EOS: nearly every response runs to max_new_tokens
}
ORZ_SHAPED = {
    **FIXED_LENGTH,
    # ORZ's shape: 16 samples per prompt, responses ending at EOS with lengths spread from a few tokens to the
    # maximum (the EOS row of the LM head biased: see bias_eos), so both sides see ragged batches
    "prompts_per_step": 8 if CUDA else 2,
    "samples_per_prompt": 16,
    "max_new_tokens": 2048 if CUDA else 256,
    "eos_hazard": 1 / 40,
    "timed_steps": 3,
}
WORKLOADS = {"fixed_length": FIXED_LENGTH, "orz_shaped": ORZ_SHAPED}
RESULT_NAMES = {"fixed_length": "e2e_grpo_vs_trl", "orz_shaped": "e2e_grpo_vs_trl_orz_shaped"}
TARGET = 3.0 if CUDA else 2.0
SIDES = ("orz_fast", "trl")

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # the sides' thread count, in the result's device line


def char_tokenizer(vocab_size: int):
    """A character-level fast tokenizer (printable ASCII and newline) padded with filler tokens to
    ``vocab_size``, so every id a random model samples decodes on both sides."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    tokens = ["<pad>", "<eos>", "<unk>", "\n", *(chr(c) for c in range(32, 127))]
    tokens += [f"<t{i}>" for i in range(len(tokens), vocab_size)]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_checkpoint(path: Path, arch: dict, dtype: str, *, eos_hazard: float | None = None, prompt=None) -> None:
    """A random-weight checkpoint of ``arch`` and its tokenizer, which both trainers load; with ``eos_hazard``
    its EOS logit biased (:func:`bias_eos`, calibrated on continuations of ``prompt``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = char_tokenizer(arch["vocab_size"])
    fields = {k: v for k, v in arch.items() if k != "model_type"}
    config = AutoConfig.for_model(
        arch["model_type"], **fields, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    if eos_hazard is not None:
        bias_eos(model, tokenizer.encode(prompt, add_special_tokens=False), tokenizer.eos_token_id, eos_hazard)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


@torch.no_grad()
def bias_eos(model, prompt: list[int], eos: int, hazard: float) -> None:
    """Point the LM head's EOS row along the mean final hidden state of the model's own sampled continuations of
    ``prompt``, scaled so that EOS has probability ``hazard`` on average there.

    The projection of a random model's hidden states on their mean direction is nearly constant, so each token
    ends the response with about the same probability: lengths roughly geometric (a few tokens to the
    maximum, a long tail). A tied head moves the EOS input embedding too; EOS is never an input before a
    response ends."""
    samples = 16
    ids = torch.tensor([prompt]).repeat(samples, 1)
    seqs = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        top_k=0,
        max_new_tokens=96,
        min_new_tokens=96,
        pad_token_id=eos,
    )
    hidden = model.model(seqs).last_hidden_state[:, len(prompt) - 1 : -1].flatten(0, 1).float()
    head = model.get_output_embeddings().weight
    logits = hidden @ head.float().T
    logits[:, eos] = -float("inf")
    others = torch.logsumexp(logits, dim=-1)
    direction = hidden.mean(0) / hidden.mean(0).norm()
    projection = hidden @ direction
    lo, hi = 0.0, 1e3  # the mean EOS probability grows with the scale: bisect
    for _ in range(60):
        scale = (lo + hi) / 2
        lo, hi = (scale, hi) if torch.sigmoid(scale * projection - others).mean() < hazard else (lo, scale)
    head[eos] = (scale * direction).to(head.dtype)


def step_prompts(w: dict) -> tuple[list[str], list[str], int]:
    """The prompts (rendered), answers and problem count, in the order orz_fast's sampler takes them."""
    from orz_fast.ppo.trainer import PromptSampler

    family, difficulty = w["task"]
    size = 256
    problems = synthetic_problems(family, size, difficulty=difficulty, seed=w["seed"])
    steps = w["warmup_steps"] + w["timed_steps"]
    order = PromptSampler(size, w["seed"]).take(steps * w["prompts_per_step"])
    return [render_prompt(problems[i].prompt, "plain") for i in order], [problems[i].answer for i in order], size


def side_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRL_EXPERIMENTAL_SILENCE="1",
    )
    return env


def run_side(side: str, spec_path: Path, out: Path, threads: int) -> list[dict[str, float]]:
    """One side's per-step records (``e2e_sides.py`` in its own process)."""
    cmd = [sys.executable, str(BENCH_DIR / "e2e_sides.py"), side, str(spec_path), str(out)]
    subprocess.run(cmd, check=True, env=side_env(threads), cwd=BENCH_DIR.parent)
    return json.loads((out / "steps.json").read_text())


def length_distribution(records: list[dict], max_new_tokens: int) -> dict[str, float]:
    """Percentiles of the response lengths of the timed steps, their mean and the share cut at the maximum."""
    lengths = np.array([n for r in records for n in r["response_lengths"]], dtype=np.int64)
    pct = (0, 10, 25, 50, 75, 90, 100)
    return {
        **{f"p{p}": float(v) for p, v in zip(pct, np.percentile(lengths, pct), strict=True)},
        "mean": float(lengths.mean()),
        "at_max_new_tokens": float((lengths >= max_new_tokens).mean()),
        "samples": len(lengths),
    }


def summarize(records: list[dict]) -> dict[str, float]:
    """Rates over the timed steps (sums of tokens over sums of seconds, wall and CPU) and median step times."""
    wall, cpu = sum(r["step_seconds"] for r in records), sum(r["cpu_seconds"] for r in records)
    wall_rollout = sum(r["rollout_seconds"] for r in records)
    cpu_rollout = sum(r["rollout_cpu_seconds"] for r in records)
    generated = sum(r["generated_tokens"] for r in records)
    trained = sum(r["trained_tokens"] for r in records)
    return {
        "seconds_per_step": statistics.median(r["step_seconds"] for r in records),
        "cpu_seconds_per_step": statistics.median(r["cpu_seconds"] for r in records),
        "generated_tokens_per_step": generated / len(records),
        "trained_tokens_per_step": trained / len(records),
        "generated_tokens_per_s": generated / wall_rollout,
        "trained_tokens_per_s": trained / wall,
        "update_trained_tokens_per_s": trained / (wall - wall_rollout),
        "generated_tokens_per_cpu_s": generated / cpu_rollout,
        "trained_tokens_per_cpu_s": trained / cpu,
        "update_trained_tokens_per_cpu_s": trained / (cpu - cpu_rollout),
        "rollout_fraction_of_step": wall_rollout / wall,
        "rollout_fraction_of_step_cpu": cpu_rollout / cpu,
    }


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_bench_e2e_vs_trl_grpo(tmp_path, workload):
    trl = pytest.importorskip("trl", reason="TRL is not installed")
    w = WORKLOADS[workload]
    ckpt = tmp_path / "checkpoint"
    prompts, answers, problems = step_prompts(w)
    build_checkpoint(ckpt, w["arch"], w["dtype"], eos_hazard=w["eos_hazard"], prompt=prompts[0])
    tokenizer = char_tokenizer(w["arch"]["vocab_size"])
    max_prompt_tokens = max(len(tokenizer.encode(p, add_special_tokens=False)) for p in prompts)
    spec = {**w, "checkpoint": str(ckpt), "prompts": prompts, "answers": answers, "problems": problems}
    spec["max_prompt_tokens"] = max_prompt_tokens
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))

    rounds: list[dict[str, list[dict]]] = []
    for r in range(w["rounds"]):
        steps = {side: run_side(side, spec_path, tmp_path / f"{side}{r}", w["threads"]) for side in SIDES}
        rounds.append({side: records[w["warmup_steps"] :] for side, records in steps.items()})

    sides = {side: summarize([s for rnd in rounds for s in rnd[side]]) for side in SIDES}
    per_round = [{side: summarize(records) for side, records in rnd.items()} for rnd in rounds]
    suffix = "_per_s" if CUDA else "_per_cpu_s"  # the basis of the headline ratios

    def ratio(key: str, f: dict = sides) -> float:
        return f["orz_fast"][key] / f["trl"][key]

    figures = {
        "trainers": {
            "orz_fast": "orz_fast.ppo.trainer.Trainer, ppo.advantage=grpo",
            "trl": f"trl.GRPOTrainer {trl.__version__}",
        },
        "model": w["arch"],
        "workload_name": workload,
        "workload": {k: v for k, v in w.items() if k != "arch"},
        "response_lengths": {
            side: length_distribution([s for rnd in rounds for s in rnd[side]], w["max_new_tokens"]) for side in SIDES
        },
        "max_prompt_tokens": max_prompt_tokens,
        "speedup_basis": "wall_clock" if CUDA else "process_cpu_time",
        "speedup_vs_trl": statistics.median(ratio(f"trained_tokens{suffix}", f) for f in per_round),
        "speedup_vs_trl_per_round": [ratio(f"trained_tokens{suffix}", f) for f in per_round],
        "generation_speedup_vs_trl": ratio(f"generated_tokens{suffix}"),
        "update_speedup_vs_trl": ratio(f"update_trained_tokens{suffix}"),
        "wall_clock_speedup_vs_trl": statistics.median(ratio("trained_tokens_per_s", f) for f in per_round),
        "wall_clock_speedup_vs_trl_per_round": [ratio("trained_tokens_per_s", f) for f in per_round],
        "target": TARGET,
        "orz_fast": sides["orz_fast"],
        "trl": sides["trl"],
    }
    figures["meets_target"] = figures["speedup_vs_trl"] >= TARGET
    basis = "CPU-time" if not CUDA else "wall-clock"
    print(
        f"\ne2e GRPO step ({workload}), orz_fast vs TRL: {w['prompts_per_step']} prompts x "
        f"{w['samples_per_prompt']} samples, up to {w['max_new_tokens']} new tokens"
    )
    for side in SIDES:
        print(f"  {side} response lengths: {figures['response_lengths'][side]}")
    print(f"  {'':<10}{'gen tok/s':>10}{'trained tok/s':>15}{'s/step':>8}  |{'(per CPU second)':>20}{'cpu s/step':>12}")
    for side in SIDES:
        f = sides[side]
        print(
            f"  {side:<10}{f['generated_tokens_per_s']:>10.0f}{f['trained_tokens_per_s']:>15.0f}"
            f"{f['seconds_per_step']:>8.2f}  |{f['generated_tokens_per_cpu_s']:>8.0f}"
            f"{f['trained_tokens_per_cpu_s']:>12.0f}{f['cpu_seconds_per_step']:>12.2f}"
        )
    print(
        f"  orz_fast / TRL ({basis}): {figures['speedup_vs_trl']:.2f}x trained tokens/s (target {TARGET}x); "
        f"generation {figures['generation_speedup_vs_trl']:.2f}x, update {figures['update_speedup_vs_trl']:.2f}x; "
        f"wall clock {figures['wall_clock_speedup_vs_trl']:.2f}x"
    )
    path = write_result(RESULT_NAMES[workload], figures, ratios={"speedup_vs_trl": "higher"})
    print(f"  -> {path}")
    assert figures["speedup_vs_trl"] > 1.0, "orz_fast trains fewer tokens per second than TRL"
    if CUDA:
        assert figures["meets_target"], f"orz_fast is {figures['speedup_vs_trl']:.2f}x TRL, target {TARGET}x"
