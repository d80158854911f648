"""Multi-process model checks, run by tests/test_parallel_models.py as
``torchrun --nproc_per_node 2 tests/dist_models_worker.py CKPT_ROOT WORK_DIR``.

For each checkpoint (a Qwen2 with QKV bias, untied; a Llama, tied) and role (policy,
critic) it runs the same two packed micro-batches through megatron-core's schedule in
three layouts of the two processes -- TP=1 PP=1 (DP=2), TP=2, PP=2 -- and compares the
last-stage outputs, the losses and the gathered gradients of TP=2 and PP=2 with TP=1.
The TP=1 run saves a sharded checkpoint that the other layouts load, and every layout
saves again; rank 0 checks each save is bit-exact with the source. Rank 0 writes the
measured errors to WORK_DIR/report.json; any check failing exits non-zero.

Two more policies have odd vocabularies (:data:`ODD_VOCAB_ARCHS`: a prime, 127, whose
second TP=2 shard is padding only, and GPT-2's 50,257, tied), so the model pads them: their
logits over the real ids, their log-probs through ``ops.linear_logprobs(vocab_size=...)``
(checked against the logits' log-softmax in every layout), gradients and exported weights
must match TP=1 and the source checkpoint too.

It also holds the tiny checkpoint builders the single-process tests use.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

QWEN2_ARCH = {
    "model_type": "qwen2",
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_theta": 5000.0,
    "tie_word_embeddings": False,
    "max_position_embeddings": 64,
    "initializer_range": 0.1,
}
LLAMA_ARCH = {
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "max_position_embeddings": 64,
    "initializer_range": 0.1,
}
ODD_VOCAB_ARCHS = {
    "qwen2-v127": {**QWEN2_ARCH, "vocab_size": 127},
    "llama-v50257": {**LLAMA_ARCH, "vocab_size": 50257},
}
"""Vocabularies no TP size divides (a prime; GPT-2's), padded by the model to a multiple of 128 x TP."""
TOL = 1e-4


def make_hf_checkpoint(arch: dict, path: Path, seed: int = 0):
    """Save a random-weight transformers model (biases and norms randomised too) to ``path``; returns it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    fields = {k: v for k, v in arch.items() if k != "model_type"}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch["model_type"], **fields)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return model


def packed_batches(vocab: int) -> list[dict]:
    """Two packed micro-batches (3 and 2 sequences of different lengths) with next-token targets."""
    g = torch.Generator().manual_seed(1)
    out = []
    for lens in ([5, 9, 3], [7, 4]):
        t = sum(lens)
        cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
        out.append(
            {
                "input_ids": torch.randint(0, vocab, (t,), generator=g),
                "cu_seqlens": cu,
                "targets": torch.randint(0, vocab, (t,), generator=g),
            }
        )
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _run_layout(ckpt: Path, role: str, tp: int, pp: int, save_to: Path, max_shard_bytes: int) -> dict | None:
    import torch.distributed as dist

    from orz_fast import ops, parallel
    from orz_fast.models import gather_hf_state_dict, load_pretrained, save_pretrained

    parallel.initialize(tp, pp)
    model = load_pretrained(ckpt, role=role, value_head_seed=7)
    vocab = model.spec.vocab_size
    batches = packed_batches(vocab)
    tp_group = parallel.tp_group() if tp > 1 else None

    if role == "policy":

        def loss_fn(hidden, batch):
            logits = model.logits(hidden)
            if logits.shape[-1] != vocab:
                raise AssertionError(f"logits have {logits.shape[-1]} columns, the vocabulary {vocab}")
            loss = F.cross_entropy(logits, batch["targets"])
            with torch.no_grad():
                logp = ops.linear_logprobs(
                    hidden, model.output_weight, batch["targets"], tp_group=tp_group, vocab_size=vocab
                )
                ref = torch.log_softmax(logits, dim=-1).gather(1, batch["targets"][:, None]).squeeze(1)
                if rel_err(logp, ref) > TOL:
                    raise AssertionError(f"linear_logprobs differs from the logits' log-softmax: {rel_err(logp, ref)}")
            return loss, {"loss": loss.detach(), "out": logits.detach(), "logp": logp}
    else:

        def loss_fn(values, batch):
            loss = (values - batch["targets"].float() / model.spec.vocab_size).square().mean()
            return loss, {"loss": loss.detach(), "out": values.detach()}

    stats = parallel.forward_backward(model, batches, loss_fn)
    parallel.finalize_model_grads(model)
    grads = gather_hf_state_dict(model, grads=True)
    fwd = parallel.forward_backward(model, batches, lambda out, b: out.detach(), forward_only=True)
    save_pretrained(model, save_to, max_shard_bytes=max_shard_bytes)

    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object((stats, fwd), gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    stats, fwd = next((s, f) for s, f in gathered if s)
    return {
        "loss": [float(s["loss"]) for s in stats],
        "out": [s["out"] for s in stats],
        "logp": [s["logp"] for s in stats if "logp" in s],
        "fwd": fwd,
        "grads": grads,
    }


def _check_save(saved: Path, source: Path, *, fresh_value_head: bool) -> None:
    """Every tensor of ``source`` is saved bit-exactly (a critic made from a policy adds its value head)."""
    from safetensors.torch import load_file

    def read(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    a, b = read(saved), read(source)
    if fresh_value_head:
        if "value_head.weight" not in a:
            raise AssertionError("critic save lacks value_head.weight")
        a.pop("value_head.weight")
        b.pop("lm_head.weight", None)
    if a.keys() != b.keys():
        raise AssertionError(f"{saved}: saved tensor names differ: {sorted(a.keys() ^ b.keys())}")
    for k in a:
        if not torch.equal(a[k], b[k]):
            raise AssertionError(f"{saved}: tensor {k} differs from the source checkpoint")


def main(ckpt_root: Path, work: Path) -> None:
    import torch.distributed as dist

    report: dict = {}
    runs = [(name, role) for name in ("qwen2", "llama") for role in ("policy", "critic")]
    runs += [(name, "policy") for name in ODD_VOCAB_ARCHS]
    for name, role in runs:
        src = ckpt_root / name
        base = work / f"{name}-{role}"
        ref = _run_layout(src, role, 1, 1, base / "tp1", max_shard_bytes=20_000)
        if dist.get_rank() == 0:
            _check_save(base / "tp1", src, fresh_value_head=role == "critic")
            if len(list((base / "tp1").glob("model-*.safetensors"))) < 2:
                raise AssertionError("the TP=1 save was expected to be sharded")
        dist.barrier()
        for tp, pp in ((2, 1), (1, 2)):
            got = _run_layout(base / "tp1", role, tp, pp, base / f"tp{tp}pp{pp}", max_shard_bytes=2**30)
            if dist.get_rank() != 0:
                continue
            _check_save(base / f"tp{tp}pp{pp}", base / "tp1", fresh_value_head=False)
            if got["grads"].keys() != ref["grads"].keys():
                raise AssertionError(f"gradient names differ: {sorted(got['grads'].keys() ^ ref['grads'].keys())}")
            errs = {
                "loss": max(abs(x - y) / abs(y) for x, y in zip(got["loss"], ref["loss"], strict=True)),
                "out": max(rel_err(x, y) for x, y in zip(got["out"], ref["out"], strict=True)),
                "fwd": max(rel_err(x, y) for x, y in zip(got["fwd"], ref["fwd"], strict=True)),
                "grad": max(rel_err(got["grads"][k], ref["grads"][k]) for k in ref["grads"]),
            }
            if role == "policy":
                errs["logp"] = max(rel_err(x, y) for x, y in zip(got["logp"], ref["logp"], strict=True))
            report[f"{name}/{role}/tp{tp}pp{pp}"] = errs
            bad = {k: v for k, v in errs.items() if not v <= TOL}
            if bad:
                raise AssertionError(f"{name} {role} tp={tp} pp={pp} differs from tp=1 pp=1: {bad}")
        dist.barrier()
    if dist.get_rank() == 0:
        (work / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    from orz_fast import parallel

    parallel.initialize(1, 1)
    try:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
    finally:
        parallel.destroy()
