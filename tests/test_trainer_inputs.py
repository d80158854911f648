"""Bad inputs a run reads are refused before any weights are read, naming the file or the setting: a missing GGUF or
Hugging Face checkpoint, a GGUF quantisation type transformers cannot dequantise, a tokenizer without an EOS token,
a stop string the tokenizer cannot encode; and the thread default of a training process."""

import json

import numpy as np
import pytest
from test_trainer import train_cmd

from orz_fast.config import resolve
from orz_fast.data.char_tokenizer import CharTokenizer
from orz_fast.models.checkpoint import CheckpointError, check_checkpoint, check_gguf
from orz_fast.ppo.trainer import Trainer, check_tokenizer
from orz_fast.rollout.vllm_model_dir import char_tokenizer_as_hf
from orz_fast.train import default_threads

TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
REAL_MODEL_SETS = ["logging.progress=false", "data.template=plain", "data.max_prompt_tokens=64"]


def trainer_error(tmp_path, *overrides) -> str:
    """The message of the error a Trainer raises for ``tiny`` with ``overrides``; nothing may have been written."""
    cfg = resolve("tiny", overrides=list(overrides))
    with pytest.raises(ValueError) as err:
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    return str(err.value)


def gguf_with(path, qtype_name: str):
    """A GGUF file whose embedding is stored as ``qtype_name`` (its bytes are zeros)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    writer.add_tensor("token_embd.weight", np.zeros((4, gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_missing_checkpoints_are_named(tmp_path):
    gguf = tmp_path / "nope.gguf"
    assert (
        trainer_error(tmp_path, f"model.path={gguf}", *REAL_MODEL_SETS)
        == f"model.path={str(gguf)!r}: no such GGUF file"
    )
    hf = tmp_path / "nope"
    msg = trainer_error(tmp_path, f"model.path={hf}", *REAL_MODEL_SETS)
    assert msg == f"model.path={str(hf)!r}: no such Hugging Face directory"
    msg = trainer_error(tmp_path, f"model.critic_path={hf}")
    assert msg == f"model.critic_path={str(hf)!r}: no such Hugging Face directory"
    (tmp_path / "empty").mkdir()
    msg = trainer_error(tmp_path, f"model.path={tmp_path / 'empty'}", *REAL_MODEL_SETS)
    assert msg == f"model.path: {tmp_path / 'empty'}: no config.json"


def test_a_gguf_type_transformers_cannot_dequantise_is_named_before_loading(tmp_path):
    bad = gguf_with(tmp_path / "q81.gguf", "Q8_1")
    with pytest.raises(CheckpointError, match=r"q81.gguf: tensor 'token_embd.weight' is quantised as Q8_1, which"):
        check_gguf(bad)
    msg = trainer_error(tmp_path, f"model.path={bad}", *REAL_MODEL_SETS)
    assert msg.startswith(f"model.path: {bad}: tensor 'token_embd.weight' is quantised as Q8_1")
    check_gguf(gguf_with(tmp_path / "q80.gguf", "Q8_0"))  # a type transformers reads passes
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(CheckpointError, match="junk.gguf: not a readable GGUF file"):
        check_checkpoint(tmp_path / "junk.gguf")


@pytest.fixture
def hf_dir_without_weights(tmp_path):
    """A Hugging Face directory whose model.safetensors is not a weights file: an error about anything but its weights
    shows the checks ran before any weight was read."""
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(TINY_LLAMA))
    (path / "model.safetensors").write_bytes(b"never read")
    return path


def test_a_tokenizer_without_eos_is_named(tmp_path, hf_dir_without_weights):
    tokenizer = char_tokenizer_as_hf(CharTokenizer(), TINY_LLAMA["vocab_size"])
    tokenizer.eos_token = None
    tokenizer.save_pretrained(str(hf_dir_without_weights))
    msg = trainer_error(tmp_path, f"model.path={hf_dir_without_weights}", *REAL_MODEL_SETS)
    assert msg.startswith(f"the tokenizer of {hf_dir_without_weights} has no EOS token")


def test_a_stop_string_the_tokenizer_cannot_encode_is_named(tmp_path, hf_dir_without_weights):
    msg = trainer_error(tmp_path, 'rollout.stop=["</answer>", "→"]')  # the character tokenizer: ASCII only
    assert msg.startswith("rollout.stop: the tokenizer of the character tokenizer cannot encode the stop string '→'")
    char_tokenizer_as_hf(CharTokenizer(), TINY_LLAMA["vocab_size"]).save_pretrained(str(hf_dir_without_weights))
    msg = trainer_error(tmp_path, f"model.path={hf_dir_without_weights}", *REAL_MODEL_SETS, 'rollout.stop=["ü"]')
    assert msg.startswith(f"rollout.stop: the tokenizer of {hf_dir_without_weights} cannot encode the stop string 'ü'")

    class Empty:
        eos_token_id, unk_token_id = 0, None

        def encode(self, text, add_special_tokens=False):
            return []

    with pytest.raises(ValueError, match=r"cannot encode the stop string '</answer>' \(it gives \[\]\)"):
        check_tokenizer(resolve("tiny", overrides=['rollout.stop=["</answer>"]']), Empty())


def test_the_cli_exits_2_naming_the_missing_gguf(tmp_path):
    import subprocess

    gguf = tmp_path / "SmolLM2.gguf"
    cmd = train_cmd(tmp_path / "run", f"model.path={gguf}", *REAL_MODEL_SETS[1:])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and f"model.path={str(gguf)!r}: no such GGUF file" in out.stderr


def test_default_threads_divide_the_cores_over_the_node_processes(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert default_threads({}) == 16
    assert default_threads({"LOCAL_WORLD_SIZE": "8"}) == 2
    assert default_threads({"LOCAL_WORLD_SIZE": "32"}) == 1
    assert default_threads({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"}) is None  # the user's choice
