"""The directory vLLM serves a random-weight policy from: its ``config.json`` and a Hugging Face tokenizer.

vLLM builds its model from a Hugging Face directory; the weights come from the trainer's pushes
(``load_format="dummy"``), so only the config and the tokenizer are written. The character
tokenizer of random-weight runs (:class:`~orz_fast.data.char_tokenizer.CharTokenizer`) is written
as an equivalent Hugging Face fast tokenizer, so vLLM's own detokenizer and stop strings see the
same text as the native engine: one token per character, ORZ's four tags as single tokens,
``<pad>``/``<eos>``/``<unk>`` special, and ids past the character vocabulary reserved special
tokens that decode to nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orz_fast.data.char_tokenizer import SPECIAL_TOKENS, TAG_TOKENS, CharTokenizer
from orz_fast.rollout.vllm_engine import served_architecture

__all__ = ["char_tokenizer_as_hf", "write_vllm_model_dir"]


def char_tokenizer_as_hf(tokenizer: CharTokenizer, vocab_size: int):
    """A ``transformers`` fast tokenizer that encodes and decodes exactly as ``tokenizer``, over ``vocab_size`` ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the character tokenizer's {len(tokenizer)} tokens")
    vocab = {tok: i for i, tok in enumerate(tokenizer.vocab)}
    reserved = [f"<reserved_{i}>" for i in range(len(tokenizer), vocab_size)]
    vocab.update({tok: len(tokenizer) + i for i, tok in enumerate(reserved)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=tokenizer.vocab[tokenizer.unk_token_id]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per character
    core.decoder = decoders.Fuse()  # concatenate, no separator
    core.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (*SPECIAL_TOKENS, *reserved)])
    core.add_tokens([AddedToken(t, normalized=False, special=False) for t in TAG_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token, unk_token="<unk>"
    )


def write_vllm_model_dir(hf_config: dict[str, Any], tokenizer: Any, path: str | Path) -> Path:
    """Write ``config.json`` (with ``architectures``) and the tokenizer's files into ``path``; returns it.

    Args:
        hf_config: the policy's Hugging Face config fields (``ModelSpec.hf_config``).
        tokenizer: a :class:`CharTokenizer` (written as its Hugging Face equivalent), a
            Hugging Face tokenizer (``save_pretrained``), or None (token ids only: the engine then
            needs ``skip_tokenizer_init=True``).
        path: directory to create or overwrite.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {**hf_config, "architectures": [served_architecture(hf_config)]}
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is None:
        return path
    if isinstance(tokenizer, CharTokenizer):
        tokenizer = char_tokenizer_as_hf(tokenizer, int(hf_config["vocab_size"]))
    if not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"cannot write a {type(tokenizer).__name__} for vLLM: it has no save_pretrained")
    tokenizer.save_pretrained(str(path))
    return path
