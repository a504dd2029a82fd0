"""The built-in Gemma turn template: the documented format, written out by hand below as the
expected text, its refusals, and its choice by architecture when the file has no template."""

from __future__ import annotations

import pytest

from tinyserve.models.builtin_templates import GEMMA_TURNS, builtin_chat_template, builtin_template_name
from tinyserve.models.chat_template import CHATML_TEMPLATE, ChatTemplateError
from tinyserve.models.loader import ModelLoadError, select_chat_template


class VocabStub:
    """The few tokenizer answers template selection needs."""

    def __init__(self, tokens: list[str], bos_id: int | None = 2, eos_id: int | None = 1):
        self._tokens = tokens
        self.bos_id, self.eos_id = bos_id, eos_id

    def token_to_id(self, text: str) -> int | None:
        return self._tokens.index(text) if text in self._tokens else None

    def token_text(self, i: int) -> str:
        return self._tokens[i]

    def decode(self, ids) -> str:
        return "".join(self._tokens[i] for i in ids)


GEMMA_VOCAB = VocabStub(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "a"])
GEMMA_META = {"general.architecture": "gemma3"}


@pytest.fixture(scope="module")
def gemma():
    tpl = builtin_chat_template(GEMMA_META, GEMMA_VOCAB)
    assert tpl is not None and tpl.source == GEMMA_TURNS
    return tpl


def test_one_user_turn_and_the_generation_prompt(gemma):
    assert gemma.render([{"role": "user", "content": "Hi"}]) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    )
    assert gemma.render([{"role": "user", "content": "Hi"}], add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n"
    )


def test_system_is_folded_into_the_first_user_turn_and_assistant_is_model(gemma):
    msgs = [
        {"role": "system", "content": " Answer briefly. "},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris.\n"},
        {"role": "user", "content": "\n  And of Italy?"},
    ]
    assert gemma.render(msgs) == (
        "<bos><start_of_turn>user\nAnswer briefly.\n\nCapital of France?<end_of_turn>\n"
        "<start_of_turn>model\nParis.<end_of_turn>\n"
        "<start_of_turn>user\nAnd of Italy?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_model_is_accepted_as_the_assistant_role(gemma):
    msgs = [{"role": "user", "content": "a"}, {"role": "model", "content": "b"}, {"role": "user", "content": "c"}]
    assert gemma.render(msgs, add_generation_prompt=False) == (
        "<bos><start_of_turn>user\na<end_of_turn>\n<start_of_turn>model\nb<end_of_turn>\n"
        "<start_of_turn>user\nc<end_of_turn>\n"
    )


@pytest.mark.parametrize(
    "msgs, match",
    [
        ([{"role": "assistant", "content": "x"}], "alternate, starting with user"),
        ([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], "alternate"),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}], "alternate"),
        ([{"role": "user", "content": "x"}, {"role": "tool", "content": "{}"}], "no place for a 'tool' message"),
        ([{"role": "user", "content": "x"}, {"role": "system", "content": "late"}], "no place for a 'system'"),
        ([{"role": "system", "content": "only"}], "needs a user message after the system message"),
    ],
)
def test_conversations_the_format_cannot_express_are_refused(gemma, msgs, match):
    with pytest.raises(ChatTemplateError, match=match):
        gemma.render(msgs)


def _chat_template(meta, vocab):
    return select_chat_template(meta, vocab, "test-model")[0]


def test_chosen_by_architecture_only_when_the_file_has_none():
    assert _chat_template(GEMMA_META, GEMMA_VOCAB).source == GEMMA_TURNS
    for arch in ("gemma", "gemma2"):
        assert _chat_template({"general.architecture": arch}, GEMMA_VOCAB).source == GEMMA_TURNS
    own = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert _chat_template({**GEMMA_META, "tokenizer.chat_template": own}, GEMMA_VOCAB).source == own
    # a broken template in the file is a load error (issue 13), Gemma or not: never a silent substitute
    with pytest.raises(ModelLoadError, match="test-model"):
        _chat_template({**GEMMA_META, "tokenizer.chat_template": "{% if %}"}, GEMMA_VOCAB)
    # other architectures keep the ChatML fallback, and so does a Gemma file without the turn tokens
    assert _chat_template({"general.architecture": "llama"}, GEMMA_VOCAB).source == CHATML_TEMPLATE
    plain = VocabStub(["<pad>", "<eos>", "<bos>", "a"])
    assert builtin_template_name(GEMMA_META, plain) is None
    assert _chat_template(GEMMA_META, plain).source == CHATML_TEMPLATE
    assert builtin_template_name(GEMMA_META, GEMMA_VOCAB) == "Gemma turns"


def test_without_bos_in_the_vocabulary_the_prompt_starts_at_the_first_turn():
    tpl = builtin_chat_template(GEMMA_META, VocabStub(["<start_of_turn>", "<end_of_turn>"], None, None))
    assert tpl.render([{"role": "user", "content": "Hi"}]).startswith("<start_of_turn>user\nHi")
