"""The LM head the trainer and the rollout share: the engine's reduction of its logits is the trainer's op, bit for
bit (fp32 and bf16, temperatures, a padded vocabulary); the packed-batch trainer log-probs; one forward under any
attention context."""

import pytest
import torch

from orz_fast import ops, parallel
from orz_fast.models import build_model
from orz_fast.models.attention import PackedSegments
from orz_fast.models.lm_head import lm_head_shard, packed_token_logprobs, token_logprobs

ODD_QWEN2 = {
    "model_type": "qwen2",
    "vocab_size": 131,  # padded to 256 rows
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.2,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module", autouse=True)
def single_process():
    parallel.initialize(1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_logprobs_are_the_trainer_op_bit_for_bit(dtype, temperature):
    model = build_model(ODD_QWEN2, seed=1, device="cpu", dtype=dtype)
    assert model.padded_vocab_size == 256
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 64, generator=g).to(dtype)
    targets = torch.randint(0, 131, (37,), generator=g)
    shard = lm_head_shard(model, hidden)
    assert shard.logits.shape == (37, 131) and shard.logits.dtype == dtype
    got = shard.logprobs(targets, temperature)
    want = token_logprobs(model, hidden, targets, temperature=temperature)
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want)
    # subsets of rows reduce to the same numbers
    idx = torch.tensor([3, 0, 36])
    assert torch.equal(shard.rows(idx).logprobs(targets[idx], temperature), want[idx])
    # the sampler's logits: fp32, the real vocabulary only, the head's values
    full = shard.fp32_logits()
    assert full.shape == (37, 131) and full.dtype == torch.float32
    torch.testing.assert_close(full, model.logits(hidden).float(), rtol=0, atol=0)
    ref = torch.log_softmax(full.double() / temperature, dim=-1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)


def test_packed_token_logprobs_is_the_trainer_forward():
    model = build_model(ODD_QWEN2, seed=2, device="cpu")
    g = torch.Generator().manual_seed(1)
    lengths = [9, 1, 23]
    ids = torch.randint(0, 131, (sum(lengths),), generator=g)
    cu = torch.tensor([0, 9, 10, 33])
    rows = torch.tensor([2, 3, 8, 12, 31])  # tokens of segments 0 and 2 (none past a segment's end)
    targets = ids[rows + 1]
    got = packed_token_logprobs(model, ids, cu, rows, targets, temperature=0.8)
    with torch.no_grad():
        hidden = model(ids, cu)
    want = ops.linear_logprobs(
        hidden[rows], model.output_weight, targets, temperature=0.8, vocab_size=model.spec.vocab_size
    )
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"rows and targets must be 1-D of one length, got \(5,\) and \(4,\)"):
        packed_token_logprobs(model, ids, cu, rows, targets[:4])


def test_one_forward_under_an_attention_context():
    """``model(ids, cu_seqlens)`` is ``model(ids, attention=PackedSegments)``; a context's ``output_rows`` selects
    the last stage's rows; autograd on (megatron's modules) and off (plain GEMMs) give the same numbers."""
    model = build_model(ODD_QWEN2, seed=3, device="cpu")
    ids = torch.randint(0, 131, (30,))
    cu = torch.tensor([0, 12, 30])
    with torch.no_grad():
        plain = model(ids, cu)
    with_grad = model(ids, cu)
    assert with_grad.requires_grad
    torch.testing.assert_close(plain, with_grad.detach(), rtol=0, atol=1e-6)

    class Rows(PackedSegments):
        output_rows = torch.tensor([11, 29])

    segs = PackedSegments.from_cu_seqlens(cu, 30)
    rows = Rows(segs.cu_seqlens, segs.bounds, segs.max_seqlen)
    with torch.no_grad():
        assert torch.equal(model(ids, attention=segs), plain)
        assert torch.equal(model(ids, attention=rows), plain[[11, 29]])
    with pytest.raises(ValueError, match="exactly one of cu_seqlens"):
        model(ids, cu, attention=segs)
    with pytest.raises(ValueError, match="exactly one of cu_seqlens"):
        model(ids)
