"""A character-level tokenizer for random-weight models (tests and the CPU demo).

Its vocabulary is the printable ASCII characters, newline, the four tags of ORZ's format
(``<think>``, ``</think>``, ``<answer>``, ``</answer>``, one token each) and the special tokens
``<pad>``, ``<eos>`` and ``<unk>``. It offers the small part of the Hugging Face tokenizer API
that orz_fast uses: ``encode``, ``decode``, ``eos_token_id``, ``pad_token_id``, ``bos_token``,
``chat_template`` and ``len()``.
"""

from __future__ import annotations

from collections.abc import Sequence

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")


class CharTokenizer:
    """Characters and ORZ's tags as tokens; deterministic and dependency-free."""

    bos_token = None
    chat_template = None

    def __init__(self) -> None:
        chars = ["\n"] + [chr(c) for c in range(32, 127)]
        self.vocab: list[str] = [*SPECIAL_TOKENS, *TAG_TOKENS, *chars]
        self._ids = {tok: i for i, tok in enumerate(self.vocab)}
        self.pad_token_id = self._ids["<pad>"]
        self.eos_token_id = self._ids["<eos>"]
        self.unk_token_id = self._ids["<unk>"]
        self.eos_token = "<eos>"
        self.pad_token = "<pad>"
        self._special_ids = {self._ids[t] for t in SPECIAL_TOKENS}

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``: a tag where one starts, else one id per character (``<unk>`` if unknown)."""
        ids: list[int] = []
        i = 0
        while i < len(text):
            if text[i] == "<":
                tag = next((t for t in TAG_TOKENS if text.startswith(t, i)), None)
                if tag is not None:
                    ids.append(self._ids[tag])
                    i += len(tag)
                    continue
            ids.append(self._ids.get(text[i], self.unk_token_id))
            i += 1
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; ``skip_special_tokens`` drops ``<pad>``, ``<eos>`` and ``<unk>``.

        Ids past the vocabulary (a model's vocab is padded to a multiple of the TP size, as
        Qwen2.5's is) are reserved tokens and decode to nothing; negative ids are an error.
        """
        out = []
        for i in ids:
            i = int(i)
            if i < 0:
                raise ValueError(f"token id {i} is negative")
            if i >= len(self.vocab) or (skip_special_tokens and i in self._special_ids):
                continue
            out.append(self.vocab[i])
        return "".join(out)
