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
    """ORZ's prompt for ``problem``, preceded by ``bos_token`` when the tokenizer has one."""
    return (bos_token or "") + ORZ_PROMPT_TEMPLATE.format(prompt=problem)


def render_chat(problem: str, tokenizer: Any) -> str:
    """The tokenizer's chat template over one user turn (ORZ's instruction + the problem), ready for the
    assistant's reply. The template adds its own special tokens (including any bos)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"data.template='chat' needs a tokenizer with a chat template; {type(tokenizer).__name__} has none"
        )
    messages = [{"role": "user", "content": CHAT_INSTRUCTION.format(prompt=problem)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_prompt(problem: str, template: Template, tokenizer: Any = None) -> str:
    """Render ``problem`` with ``template`` (``"orz"``, ``"chat"`` or ``"plain"``); the result is tokenized
    without adding special tokens again."""
    if template == "orz":
        return render_orz(problem, bos_token=getattr(tokenizer, "bos_token", None))
    if template == "chat":
        return render_chat(problem, tokenizer)
    if template == "plain":
        return PLAIN_TEMPLATE.format(prompt=problem)
    raise ValueError(f"data.template must be 'orz', 'chat' or 'plain', got {template!r}")
