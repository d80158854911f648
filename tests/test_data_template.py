"""The ORZ prompt template (pinned string) and the chat-template mode."""

import pytest

from orz_fast.data import ORZ_PROMPT_TEMPLATE, render_chat, render_orz, render_prompt

PINNED = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The "
    "Assistant first thinks about the reasoning process in the mind and then provides the User with the answer. "
    "The reasoning process is enclosed within <think> </think> and answer is enclosed within <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. User: You "
    "must put your answer inside <answer> </answer> tags, i.e., <answer> answer here </answer>. And your final "
    "answer will be extracted automatically by the \\boxed{} tag.\nThis is the problem:\n"
    "What is $\\frac{1}{2} + \\{x\\}$?\nAssistant: <think>"
)


def test_orz_template_renders_exactly():
    problem = "What is $\\frac{1}{2} + \\{x\\}$?"
    assert render_orz(problem) == PINNED
    assert render_orz(problem, bos_token="<|endoftext|>") == "<|endoftext|>" + PINNED
    rendered = render_orz(problem)
    assert rendered.count("\n") == 3 and rendered.endswith("?\nAssistant: <think>")
    assert ORZ_PROMPT_TEMPLATE.format(prompt="P") == render_orz("P")


class _NoBos:
    bos_token = None
    bos_token_id = None
    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return [ord(c) + 10 for c in text]


class _AddsBos(_NoBos):
    """Starts plain text with its BOS token (Llama's tokenizers)."""

    bos_token, bos_token_id = "<s>", 1

    def encode(self, text, add_special_tokens=True):
        return [1] * add_special_tokens + super().encode(text)


class _ChatBos(_NoBos):
    """A BOS token it never adds to plain text, which opens a chat turn (SmolLM2's ``<|im_start|>``)."""

    bos_token, bos_token_id = "<|im_start|>", 1


def test_render_prompt_prepends_only_a_bos_the_tokenizer_adds_itself():
    assert render_prompt("Q", "orz", _NoBos()) == render_orz("Q")
    assert render_prompt("Q", "orz", _AddsBos()) == "<s>" + render_orz("Q")
    assert render_prompt("Q", "orz", _ChatBos()) == render_orz("Q")
    assert render_prompt("Q", "orz") == render_orz("Q")
    assert render_prompt("Q", "orz", _AddsBos(), bos="") == render_orz("Q")
    with pytest.raises(ValueError, match="template"):
        render_prompt("Q", "alpaca", _NoBos())
    with pytest.raises(ValueError, match="chat template"):
        render_chat("Q", _NoBos())


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    words = ["What", "is", "2+2?", "You", "must", "put"]
    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "<|im_start|>", "<|im_end|>", *words])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        unk_token="[UNK]",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
    )


def test_chat_mode_uses_the_tokenizers_chat_template(chat_tokenizer):
    text = render_prompt("What is 2+2?", "chat", chat_tokenizer)
    assert text.startswith("<|im_start|>user\nYou must put your answer inside <answer> </answer> tags")
    assert text.endswith("This is the problem:\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert "\\boxed{} tag" in text and "A conversation between" not in text
    # This tokenizer never puts its BOS before plain text, so ORZ's template does not either.
    orz_ids = chat_tokenizer.encode(render_prompt("What is 2+2?", "orz", chat_tokenizer), add_special_tokens=False)
    assert orz_ids[0] != chat_tokenizer.bos_token_id


def test_orz_template_opens_no_chat_turn_for_smollm2():
    """SmolLM2's bos_token is ``<|im_start|>`` (it opens a chat turn) and its tokenizer never adds it: ORZ's
    prompt starts with ORZ's own text."""
    from conftest import smollm2_gguf

    from orz_fast.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(smollm2_gguf()))
    assert tokenizer.bos_token == "<|im_start|>"
    text = render_prompt("3>8?", "orz", tokenizer)
    assert text == render_orz("3>8?")
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.bos_token_id not in ids and tokenizer.decode(ids).startswith("A conversation between User")
