"""Answer extraction from model responses: pure string scanning, linear in the response length."""

from __future__ import annotations

import re

ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_SURROGATE = re.compile("[\ud800-\udfff]")


def sanitize_text(text: str | bytes) -> str:
    """Return ``text`` as valid Unicode: bytes are decoded as UTF-8 and lone surrogates replaced by U+FFFD."""
    if isinstance(text, bytes):
        return text.decode("utf-8", errors="replace")
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def matching_brace(text: str, open_idx: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``open_idx``, or -1 when it is never closed."""
    depth = 0
    for i in range(open_idx, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    Returns None when there is no box command; an unclosed last box yields None too, so a
    response cut inside its box never scores.
    """
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    brace = start + len(cmd)
    while brace < len(text) and text[brace] == " ":
        brace += 1
    if brace >= len(text) or text[brace] != "{":
        return None
    end = matching_brace(text, brace)
    if end < 0:
        return None
    return text[brace + 1 : end]


def extract_answer(response: str | bytes) -> str | None:
    """The answer of a response: the last complete ``<answer>…</answer>`` block; inside it the last
    ``\\boxed{…}`` if any, else the block's stripped text. None when there is no complete block, the
    block is empty, or its last box is unclosed."""
    text = sanitize_text(response)
    close = text.rfind(ANSWER_CLOSE)
    if close < 0:
        return None
    open_ = text.rfind(ANSWER_OPEN, 0, close)
    if open_ < 0:
        return None
    block = text[open_ + len(ANSWER_OPEN) : close]
    if any(cmd in block for cmd in _BOX_COMMANDS):
        answer = last_boxed(block)
        return None if answer is None or not answer.strip() else answer.strip()
    block = block.strip()
    return block or None
