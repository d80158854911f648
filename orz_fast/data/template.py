"""Prompt formats: ORZ's exact base-model template, and the tokenizer's chat template for instruct models."""

from __future__ import annotations

from typing import Any, Literal

ORZ_PROMPT_TEMPLATE = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with "
    "the answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>. User: You must put your answer inside <answer> </answer> tags, "
    "i.e., <answer> answer here </answer>. And your final answer will be extracted automatically by the "
    "\\boxed{{}} tag.\nThis is the problem:\n{prompt}\nAssistant: <think>"
)
"""ORZ's training prompt (``str.format`` with ``prompt=``); generation continues right after ``<think>``."""

CHAT_INSTRUCTION = (
    "You must put your answer inside <answer> </answer> tags, i.e., <answer> answer here </answer>. "
    "And your final answer will be extracted automatically by the \\boxed{{}} tag.\nThis is the problem:\n{prompt}"
)
"""The user turn in chat mode: ORZ's instruction and the problem (the chat template adds the roles)."""

PLAIN_TEMPLATE = "{prompt}\nAssistant: "
"""The problem and an ``Assistant:`` turn only: for small random-weight models (the CPU demo), which have no
use for ORZ's instructions; the answer format is then learned, not read."""

Template = Literal["orz", "chat", "plain"]


def render_orz(problem: str, *, bos_token: str | None = None) -> str:
    """ORZ's prompt for ``problem``, preceded by ``bos_token`` when given (see :func:`bos_prefix`)."""
    return (bos_token or "") + ORZ_PROMPT_TEMPLATE.format(prompt=problem)


def bos_prefix(tokenizer: Any) -> str:
    """The BOS token's text when the tokenizer itself starts plain text with it (``encode(text,
    add_special_tokens=True)`` begins with ``bos_token_id``, as Llama's tokenizers do), else ``""``.

    A BOS token the tokenizer never adds on its own is left out: the model was not trained to see it
    before plain text, and it may be a chat token (SmolLM2's ``bos_token`` is ``<|im_start|>``, which
    opens a chat turn that ORZ's template would never close). Qwen2.5 has no BOS token at all."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None:
        return ""
    ids = list(tokenizer.encode("a", add_special_tokens=True))
    return bos if ids and ids[0] == bos_id else ""


def render_chat(problem: str, tokenizer: Any) -> str:
    """The tokenizer's chat template over one user turn (ORZ's instruction + the problem), ready for the
    assistant's reply. The template adds its own special tokens (including any bos)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"data.template='chat' needs a tokenizer with a chat template; {type(tokenizer).__name__} has none"
        )
    messages = [{"role": "user", "content": CHAT_INSTRUCTION.format(prompt=problem)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_prompt(problem: str, template: Template, tokenizer: Any = None, *, bos: str | None = None) -> str:
    """Render ``problem`` with ``template`` (``"orz"``, ``"chat"`` or ``"plain"``); the result is tokenized
    without adding special tokens again. ``bos``: the ``orz`` template's prefix, when the caller computed
    :func:`bos_prefix` once for many prompts (default: computed here)."""
    if template == "orz":
        return render_orz(problem, bos_token=bos_prefix(tokenizer) if bos is None else bos)
    if template == "chat":
        return render_chat(problem, tokenizer)
    if template == "plain":
        return PLAIN_TEMPLATE.format(prompt=problem)
    raise ValueError(f"data.template must be 'orz', 'chat' or 'plain', got {template!r}")
