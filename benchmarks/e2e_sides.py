"""The two sides of ``test_bench_e2e.py``, each run in its own process on one workload spec.

``python benchmarks/e2e_sides.py {orz_fast|trl} SPEC.json OUT_DIR`` trains the checkpoint
``SPEC["checkpoint"]`` (a Hugging Face directory with its tokenizer) for ``warmup_steps +
timed_steps`` steps and writes ``OUT_DIR/steps.json``: per optimizer step its wall and process CPU
seconds, the same two for the rollout phase (generation, decoding, reward, advantages), the
generated (completion) tokens, the trained tokens (prompt + completion tokens of every sample,
padding not counted) and each sample's response length.

- ``orz_fast``: :class:`orz_fast.ppo.trainer.Trainer` built from the ``tiny`` preset with the
  overrides of :func:`orz_fast_overrides`, exactly as ``python -m orz_fast.train --preset tiny
  --set ...`` builds it, then ``Trainer.run()``. The figures come from its ``metrics.jsonl`` (phase
  times and token rates); the only additions are the CPU seconds of the step and of its rollout,
  which wrappers around ``train_step`` and ``rollout`` add to the logged metrics.
- ``trl``: TRL's ``GRPOTrainer`` with its own transformers generation, no KL term (no reference
  model), one optimizer step per generation batch (so, as in orz_fast, the sampling-time log-probs
  are the old ones, with no extra forward pass), the prompts in the order orz_fast's sampler takes
  them, rewards from ``orz_fast.reward.score``. Measuring wraps TRL's methods without changing
  what they do: the times and token counts of each ``_generate_and_score_completions`` call
  (generation, decoding, reward, advantages) and the clocks at each optimizer step's end.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch


def orz_fast_overrides(spec: dict[str, Any]) -> dict[str, Any]:
    """``--set`` overrides of the ``tiny`` preset that give orz_fast the spec's workload."""
    family, difficulty = spec["task"]
    return {
        "model.path": spec["checkpoint"],
        "model.dtype": spec["dtype"],
        "model.activation_checkpointing": False,
        "rollout.prompts_per_step": spec["prompts_per_step"],
        "rollout.samples_per_prompt": spec["samples_per_prompt"],
        "rollout.max_tokens": spec["max_new_tokens"],
        "rollout.temperature": spec["temperature"],
        "rollout.top_p": 1.0,
        "rollout.top_k": -1,
        "rollout.stop": [],
        "ppo.advantage": "grpo",
        "ppo.policy_updates_per_step": 1,
        "ppo.micro_batch_tokens": spec["micro_batch_samples"] * (spec["max_prompt_tokens"] + spec["max_new_tokens"]),
        "optim.policy_lr": spec["lr"],
        "optim.warmup_steps": 0,
        "optim.betas": spec["betas"],
        "optim.eps": spec["eps"],
        "optim.weight_decay": spec["weight_decay"],
        "optim.grad_clip": spec["grad_clip"],
        "data.template": "plain",
        "data.synthetic": family,
        "data.difficulty": difficulty,
        "data.synthetic_size": spec["problems"],
        "data.max_prompt_tokens": spec["max_prompt_tokens"],
        "train.seed": spec["seed"],
        "train.steps": spec["warmup_steps"] + spec["timed_steps"],
        "train.deterministic": False,
        "train.format_warmup_steps": 0,
        "ckpt.every": 0,
        "logging.progress": False,
    }


def run_orz_fast(spec: dict[str, Any], out: Path) -> list[dict[str, float]]:
    from orz_fast.config import resolve

    for message in ("Transformer Engine and Apex are not installed", "Apex is not installed", "Warning: tp_group"):
        warnings.filterwarnings("ignore", message=message)  # as orz_fast.train does
    from orz_fast.ppo.trainer import Trainer

    sets = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in orz_fast_overrides(spec).items()]
    trainer = Trainer(resolve("tiny", overrides=sets), out)
    train_step, rollout = trainer.train_step, trainer.rollout
    rollout_cpu: list[float] = []

    def timed_rollout():
        cpu0 = time.process_time()
        result = rollout()
        rollout_cpu.append(time.process_time() - cpu0)
        return result

    def timed_train_step():
        cpu0 = time.process_time()
        metrics = train_step()
        return metrics | {"cpu_seconds": time.process_time() - cpu0, "rollout_cpu_seconds": rollout_cpu[-1]}

    trainer.rollout, trainer.train_step = timed_rollout, timed_train_step
    trainer.run()
    samples = spec["prompts_per_step"] * spec["samples_per_prompt"]
    lengths: dict[int, list[int]] = {}
    for line in (out / "rollouts.jsonl").read_text().splitlines():
        r = json.loads(line)
        lengths.setdefault(r["step"], []).extend(r["response_tokens"])
    records = []
    for i, line in enumerate((out / "metrics.jsonl").read_text().splitlines()):
        m = json.loads(line)
        update_s = m["time_policy"] + m["time_critic"]
        # The trainer logs rates; tokens = rate x phase time. Its trained-token count is prompt +
        # response - 1 per sample (the last response token is never an input): add the one back so
        # both sides count prompt + completion tokens.
        records.append(
            {
                "step_seconds": m["time_rollout"] + m["time_prepare"] + update_s,
                "cpu_seconds": m["cpu_seconds"],
                "rollout_seconds": m["time_rollout"],
                "rollout_cpu_seconds": m["rollout_cpu_seconds"],
                "generated_tokens": round(m["generated_tokens_per_s"] * m["time_rollout"]),
                "trained_tokens": round(m["trained_tokens_per_s"] * update_s) + samples,
                "response_lengths": lengths[i + 1],  # rollouts.jsonl counts steps from 1
            }
        )
    return records


def run_trl(spec: dict[str, Any], out: Path) -> list[dict[str, float]]:
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from orz_fast.reward import score

    gpu = spec["dtype"] != "float32"
    dtype = getattr(torch, spec["dtype"])
    steps = spec["warmup_steps"] + spec["timed_steps"]
    batch = spec["prompts_per_step"] * spec["samples_per_prompt"]

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[tuple[float, float]] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append((time.perf_counter(), time.process_time()))

    def reward_fn(completions, answer, **kwargs) -> list[float]:
        return [score(text, truth) for text, truth in zip(completions, answer, strict=True)]

    args = trl.GRPOConfig(
        output_dir=str(out / "trl_output"),
        per_device_train_batch_size=spec["micro_batch_samples"],
        gradient_accumulation_steps=batch // spec["micro_batch_samples"],
        num_generations=spec["samples_per_prompt"],
        max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"],
        top_p=1.0,
        top_k=0,
        beta=0.0,
        num_iterations=1,
        loss_type="dapo",  # token mean over the whole step's tokens, as orz_fast's policy loss
        gradient_checkpointing=False,  # TRL's default is on; orz_fast runs with model.activation_checkpointing=false
        max_steps=steps,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        adam_beta1=spec["betas"][0],
        adam_beta2=spec["betas"][1],
        adam_epsilon=spec["eps"],
        weight_decay=spec["weight_decay"],
        max_grad_norm=spec["grad_clip"],
        shuffle_dataset=False,  # the prompts in the order orz_fast's sampler takes them
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=not gpu,
        bf16=dtype == torch.bfloat16,
        fp16=False,
        seed=spec["seed"],
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    clock = StepClock()
    trainer = trl.GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(spec["checkpoint"], dtype=dtype),
        reward_funcs=reward_fn,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": spec["prompts"], "answer": spec["answers"]}),
        processing_class=AutoTokenizer.from_pretrained(spec["checkpoint"]),
        callbacks=[clock],
    )
    rollouts: list[dict[str, float]] = []
    generate_and_score = trainer._generate_and_score_completions

    def timed_generate_and_score(inputs):
        if gpu:
            torch.cuda.synchronize()
        t0, cpu0 = time.perf_counter(), time.process_time()
        result = generate_and_score(inputs)
        if gpu:
            torch.cuda.synchronize()
        rollouts.append(
            {
                "rollout_seconds": time.perf_counter() - t0,
                "rollout_cpu_seconds": time.process_time() - cpu0,
                "generated_tokens": int(result["completion_mask"].sum()),
                "trained_tokens": int(result["prompt_mask"].sum() + result["completion_mask"].sum()),
                "response_lengths": result["completion_mask"].sum(1).tolist(),
            }
        )
        return result

    trainer._generate_and_score_completions = timed_generate_and_score
    start = (time.perf_counter(), time.process_time())
    trainer.train()
    if len(clock.ends) != steps or len(rollouts) != steps:
        raise RuntimeError(f"expected {steps} steps and generations, got {len(clock.ends)} and {len(rollouts)}")
    records = []
    for i, (rollout, end) in enumerate(zip(rollouts, clock.ends, strict=True)):
        begin = clock.ends[i - 1] if i else start
        records.append({"step_seconds": end[0] - begin[0], "cpu_seconds": end[1] - begin[1], **rollout})
    return records


def main(side: str, spec_path: str, out_dir: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runners = {"orz_fast": run_orz_fast, "trl": run_trl}
    if side not in runners:
        raise SystemExit(f"side must be one of {sorted(runners)}, got {side!r}")
    records = runners[side](spec, out)
    (out / "steps.json").write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
