"""The PPO trainer end to end: runs, multi-process layouts, crash + resume, the PG step vs a reference, NaN steps."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orz_fast.config import resolve
from orz_fast.metrics import read_metrics
from orz_fast.models import gather_hf_state_dict, save_pretrained
from orz_fast.ppo.trainer import Trainer, check_layout, lr_at

TIMING_KEYS = ("time_", "_per_s", "peak_")


def train_cmd(out, *overrides, nproc=1):
    launcher = [sys.executable, "-W", "ignore", "-m", "orz_fast.train"]
    if nproc > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "-m",
            "orz_fast.train",
        ]
    sets = [a for o in overrides for a in ("--set", o)]
    return [*launcher, "--preset", "tiny", "--out", str(out), "--set", "logging.progress=false", *sets]


def run(cmd, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def deterministic(records):
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING_KEYS)} for r in records]


def test_lr_schedule():
    assert lr_at(0, 1e-6, 50) == pytest.approx(2e-8)
    assert lr_at(49, 1e-6, 50) == pytest.approx(1e-6)
    assert lr_at(500, 1e-6, 50) == 1e-6
    assert lr_at(3, 1.0, 0) == 1.0
    decay = (100, 100, 3e-7)
    assert lr_at(99, 1e-6, 50, decay) == 1e-6
    assert lr_at(149, 1e-6, 50, decay) == pytest.approx(1e-6 + (3e-7 - 1e-6) * 0.5)
    assert lr_at(199, 1e-6, 50, decay) == pytest.approx(3e-7)


def test_tiny_run_writes_metrics_checkpoint_and_hf_export(tmp_path):
    run(train_cmd(tmp_path, "train.steps=3", "ckpt.every=2"))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in (
        "reward_mean",
        "accuracy",
        "response_length_mean",
        "response_length_max",
        "truncated_fraction",
        "policy_loss",
        "value_loss",
        "clipfrac",
        "approx_kl",
        "entropy",
        "explained_variance",
        "policy_grad_norm",
        "critic_grad_norm",
        "policy_lr",
        "time_rollout",
        "generated_tokens_per_s",
        "trained_tokens_per_s",
        "peak_rss_gb",
    ):
        assert key in records[0], key
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step-00000002", "step-00000003"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "policy_hf")
    assert model.config.vocab_size == 128


def test_periodic_eval_logs_metrics_and_writes_results(tmp_path):
    run(train_cmd(tmp_path, "train.steps=2", "eval.every=2", 'eval.data=["math500"]', "eval.limit=3"))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert "eval/math500/accuracy" not in records[0]
    assert records[1]["eval/math500/truncated"] + records[1]["eval/math500/accuracy"] <= 1.0
    assert 0 < records[1]["eval/math500/response_tokens"] <= 8  # tiny: max_tokens 8
    rows = [json.loads(line) for line in (tmp_path / "eval" / "step-00000002" / "math500.jsonl").open()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert all(len(r["responses"]) == 1 for r in rows)


@pytest.mark.parametrize("layout", [["parallel.tp=2"], []], ids=["tp2", "dp2"])
def test_two_process_runs(tmp_path, layout):
    run(train_cmd(tmp_path, "train.steps=2", *layout, nproc=2), timeout=600)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    # DP=2 splits the 2 prompts x 2 samples over the ranks; the metrics cover all 4 samples.
    assert all(r["response_length_mean"] > 0 for r in records)


def test_layout_that_does_not_fit_is_rejected_before_work(tmp_path):
    out = subprocess.run(train_cmd(tmp_path, "parallel.tp=3"), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "world size 1 is not divisible by parallel.tp * parallel.pp = 3 * 1" in out.stderr
    assert not (tmp_path / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by tensor-parallel size tp=3"):
        check_layout(resolve("tiny", overrides=["parallel.tp=3"]), world_size=3)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"")
    with pytest.raises(ValueError, match="rollout.engine='vllm' needs model.path to be a Hugging Face directory"):
        real = ["data.template=plain", "data.max_prompt_tokens=64"]
        check_layout(resolve("tiny", overrides=["rollout.engine=vllm", f"model.path={gguf}", *real]), world_size=1)
    with pytest.raises(ValueError, match="world size 2 is not divisible by parallel.tp \\* parallel.pp = 1 \\* 4"):
        check_layout(resolve("tiny", overrides=["parallel.pp=4"]), world_size=2)


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run(train_cmd(out, "train.steps=2"))
    return out


@pytest.mark.parametrize("layout", ["parallel.pp=2", "parallel.tp=2", "parallel.tp=1"], ids=["pp2", "tp2", "dp2"])
def test_model_parallel_run_equals_single_process(tmp_path, single_process_run, layout):
    """TP=2 (sharded layers), PP=2 (two stages: rollout passes activations, training runs 1F1B) and
    DP=2 (each replica generates half the prompts, samples re-split by workload, the same mini-batches
    drawn over the whole step, bucketed ZeRO-1) repeat the 1-process run: same samples, losses and
    updated weights, up to fp32 rounding."""
    run(train_cmd(tmp_path, "train.steps=2", layout, nproc=2), timeout=600)
    ref = deterministic(read_metrics(single_process_run / "metrics.jsonl"))
    got = deterministic(read_metrics(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in got] == [1, 2]
    for a, b in zip(got, ref, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(b[key], str):  # a non-finite value, e.g. "nan"
                assert a[key] == b[key], key
            else:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    want = load_file(single_process_run / "policy_hf" / "model.safetensors")
    have = load_file(tmp_path / "policy_hf" / "model.safetensors")
    assert have.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(have[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_sigkill_and_resume_equals_uninterrupted_run(tmp_path):
    steps = ["train.steps=12", "ckpt.every=2", "ckpt.keep=2"]
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    run(train_cmd(ref, *steps))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(train_cmd(crashed, *steps), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = crashed / "checkpoints" / "step-00000004" / "COMPLETE"
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (crashed / "policy_hf").exists()

    run([*train_cmd(crashed, *steps), "--resume"])
    assert deterministic(read_metrics(crashed / "metrics.jsonl")) == deterministic(read_metrics(ref / "metrics.jsonl"))
    a = load_file(ref / "policy_hf" / "model.safetensors")
    b = load_file(crashed / "policy_hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(ref / "checkpoints" / "step-00000012" / "rank-00000.pt", weights_only=True)
    sb = torch.load(crashed / "checkpoints" / "step-00000012" / "rank-00000.pt", weights_only=True)
    for k, v in sa["critic"].items():
        assert (v is None and sb["critic"][k] is None) or torch.equal(v, sb["critic"][k]), k
    assert sa["sampler_position"] == sb["sampler_position"]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    cfg = resolve("tiny", overrides=["logging.progress=false", "rollout.max_tokens=6", "rollout.samples_per_prompt=3"])
    return Trainer(cfg, tmp_path_factory.mktemp("inproc"))


def test_policy_step_equals_plain_torch_reference(trainer, tmp_path):
    """One PPO policy step (linear_logprobs + ppo_policy_loss, AdamW, clip) vs transformers + torch by hand."""
    from transformers import AutoModelForCausalLM

    exp = trainer.rollout()
    offsets = exp.response_offsets
    gen = torch.Generator().manual_seed(0)
    adv = torch.randn(exp.num_actions, generator=gen)
    save_pretrained(trainer.policy, tmp_path / "before")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "before", torch_dtype=torch.float32)

    # Reference: per-sample full logits, log-softmax at the response tokens, PPO clip loss (token mean).
    clip = trainer.cfg.ppo.clip_eps
    losses = []
    for i in range(len(exp.table)):
        prompt, response = exp.prompt(i).tolist(), exp.response(i).tolist()
        ids = torch.tensor([prompt + response])
        logits = ref(ids).logits[0, len(prompt) - 1 : -1]
        logp = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(response)[:, None]).squeeze(1)
        ratio = torch.exp(logp - exp.logprobs[offsets[i] : offsets[i + 1]])
        a = adv[offsets[i] : offsets[i + 1]]
        losses.append(torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip, 1 + clip)))
    ref_loss = torch.cat(losses).mean()
    ref_loss.backward()
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(ref_params, trainer.cfg.optim.grad_clip)
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    lr = 1e-3
    torch.optim.AdamW(
        ref_params, lr=lr, betas=trainer.cfg.optim.betas, eps=trainer.cfg.optim.eps, weight_decay=0.0
    ).step()

    captured = {}
    step = trainer.policy_opt.step

    def capturing_step(lr=None):
        captured.update(gather_hf_state_dict(trainer.policy, grads=True))
        return step(lr)

    trainer.policy_opt.step = capturing_step
    exp.advantages = adv
    try:
        stats = trainer.update.update_policy(exp, lr, step=trainer.step)
    finally:
        trainer.policy_opt.step = step
    after = gather_hf_state_dict(trainer.policy)

    assert stats["policy_loss"] == pytest.approx(float(ref_loss), rel=1e-5, abs=1e-7)
    norm = stats["policy_grad_norm"]
    scale = min(1.0, trainer.cfg.optim.grad_clip / (norm + 1e-6))
    ref_state = dict(ref.named_parameters())
    for name, g in captured.items():
        ref_name = name if name in ref_grads else "lm_head.weight"
        torch.testing.assert_close(g * scale, ref_grads[ref_name], rtol=1e-4, atol=1e-7)
        # Adam's first step moves each weight by ~lr * sign(g): compare where the gradient is not ~0.
        solid = ref_grads[ref_name].abs() > 1e-5
        torch.testing.assert_close(after[name][solid], ref_state[ref_name].detach()[solid], rtol=0, atol=lr * 1e-3)


def test_nan_step_is_skipped_and_training_continues(trainer):
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    make = trainer.update.policy_loss_fn

    def poisoned(scale):
        loss_fn = make(scale)

        def nan_loss(hidden, batch):
            loss, stats = loss_fn(hidden, batch)
            return loss * float("nan"), stats

        return nan_loss

    trainer.update.policy_loss_fn = poisoned
    try:
        metrics = trainer.train_step()
    finally:
        trainer.update.policy_loss_fn = make
    assert metrics["policy_steps_skipped"] == 1.0
    params = dict(trainer.policy.named_parameters())
    assert all(torch.equal(v, params[k]) for k, v in before.items())
    metrics = trainer.train_step()
    assert metrics["policy_steps_skipped"] == 0.0
    assert any(not torch.equal(v, params[k]) for k, v in before.items())
    json.dumps({k: v for k, v in metrics.items()})  # loggable


def test_fused_and_unfused_policy_loss_agree_over_several_updates(tmp_path):
    """``linear_ppo_loss`` (default) and ``linear_logprobs`` + ``ppo_policy_loss`` give the same run."""
    for fused in ("true", "false"):
        run(train_cmd(tmp_path / fused, "train.steps=2", "ppo.policy_updates_per_step=2", f"ppo.fused_loss={fused}"))
    fused, unfused = (deterministic(read_metrics(tmp_path / f / "metrics.jsonl")) for f in ("true", "false"))
    assert len(fused) == 2 and fused[0]["policy_steps_skipped"] == 0 and fused[0]["policy_grad_norm"] > 0
    for a, b in zip(fused, unfused, strict=True):
        assert a.keys() == b.keys() and "entropy" in a
        for key in a:
            if isinstance(b[key], str):
                assert a[key] == b[key], key
            else:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_shared_and_unshared_prompts_give_the_same_run(tmp_path):
    """Training passes feeding each prompt once for its samples (``ppo.share_prompts``, the default) repeat the
    run that feeds it once per sample: the same samples, losses and updated weights, up to fp32 rounding; with
    several policy updates (a recompute pass, shuffled mini-batches) and several critic updates."""
    sets = ("train.steps=2", "ppo.policy_updates_per_step=2", "ppo.critic_updates_per_step=2")
    for share in ("true", "false"):
        run(train_cmd(tmp_path / share, *sets, f"ppo.share_prompts={share}"))
    shared, unshared = (deterministic(read_metrics(tmp_path / s / "metrics.jsonl")) for s in ("true", "false"))
    assert len(shared) == 2 and shared[0]["policy_grad_norm"] > 0
    for a, b in zip(shared, unshared, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(b[key], str):
                assert a[key] == b[key], key
            else:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    want = load_file(tmp_path / "false" / "policy_hf" / "model.safetensors")
    have = load_file(tmp_path / "true" / "policy_hf" / "model.safetensors")
    for name in want:
        torch.testing.assert_close(have[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_grpo_variant_runs_without_critic(tmp_path):
    run(train_cmd(tmp_path, "train.steps=2", "ppo.advantage=grpo", "ckpt.every=1"))
    records = read_metrics(Path(tmp_path) / "metrics.jsonl")
    assert len(records) == 2 and "value_loss" not in records[0] and "critic_lr" not in records[0]
    state = torch.load(tmp_path / "checkpoints" / "step-00000002" / "rank-00000.pt", weights_only=True)
    assert "critic" not in state and "critic_opt" not in state and "policy" in state
    run([*train_cmd(tmp_path, "train.steps=3", "ppo.advantage=grpo", "ckpt.every=1"), "--resume"])
    assert [r["step"] for r in read_metrics(Path(tmp_path) / "metrics.jsonl")] == [1, 2, 3]
    trainer = Trainer(resolve("tiny", overrides=["logging.progress=false", "ppo.advantage=grpo"]), tmp_path / "b")
    assert trainer.critic is None and trainer.critic_opt is None  # never built
    trainer.rollouts.close()


def test_without_checkpointing_no_checkpoint_is_written(tmp_path):
    """ckpt.every=0: no checkpoint at all, not even at the end; the HF export (with its tokenizer) stays."""
    run(train_cmd(tmp_path, "train.steps=2", "ckpt.every=0"))
    assert not (tmp_path / "checkpoints").exists()
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "policy_hf").iterdir()
    }


def test_a_run_logs_no_nan_and_records_its_rollouts(tmp_path):
    """Every reward of the tiny model's steps is 0 (explained variance 0, not NaN); rollouts.jsonl and samples.jsonl
    are written, the data set's counts are printed at start and a sampled response in the progress output."""
    cmd = train_cmd(tmp_path, "train.steps=2", "logging.samples_every=2", "logging.samples_shown=3")
    out = run([*cmd, "--set", "logging.progress=true"])
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert all(r["reward_mean"] == 0.0 for r in records)  # the case that made 0/0
    for r in records:
        for key, value in r.items():
            assert isinstance(value, (int, float)) and value == value, (key, value)  # finite numbers, no "nan"
    assert records[0]["explained_variance"] == 0.0
    assert {"rollout/answered", "rollout/top_answer_share", "rollout/identical_groups"} <= records[0].keys()
    lines = [json.loads(x) for x in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 1, 2, 2] and all(len(x["scores"]) == 2 for x in lines)
    samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2] and len(samples[0]["samples"]) == 3
    first = samples[0]["samples"][0]
    assert first["row"] == lines[2]["row"] and first["score"] == lines[2]["scores"][0]
    assert "train prompts: 10000 of 10000 rows kept; 0 dropped as longer than data.max_prompt_tokens=64" in out.stdout
    assert "step 2 sample (row " in out.stdout and "most common answers:" in out.stdout  # tqdm.write: stdout
    assert json.loads((tmp_path / "data_stats.json").read_text())["train"]["too_long"] == 0


@pytest.mark.parametrize(
    "case, message",
    [
        ("nan", r"has score nan \(not a finite number\)"),
        ("long", r"has 11 response tokens, more than rollout.max_tokens=8"),
    ],
)
def test_a_bad_sample_on_one_rank_stops_every_rank_with_its_name(tmp_path, case, message):
    """Rank 1 generates a bad sample: both ranks raise the same error naming it, before any collective hangs."""
    worker = Path(__file__).with_name("bad_sample_worker.py")
    cmd = [sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    run([*cmd, str(worker), str(tmp_path), case], timeout=300)
    reports = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert reports[0]["error"] == reports[1]["error"]
    assert re.fullmatch(
        rf"BadSampleError: sample 1 of prompt 1 \(training-set row \d+\) {message}", reports[0]["error"]
    )
