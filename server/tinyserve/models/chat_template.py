"""Chat templates: the Jinja template a GGUF carries (tokenizer.chat_template) turns a list of
messages into the prompt text, the way transformers' `apply_chat_template` does.

    ct = ChatTemplate(source, bos_token="<s>", eos_token="</s>")   # compiles; syntax errors raise
    ct.validate()                                                  # at load: a sample conversation
    text = ct.render(messages, add_generation_prompt=True, deadline=time.monotonic() + 5)

Templates come from model files, which are untrusted input. Each render runs in the bounded sandbox
(template_sandbox.py: every operation's cost and result size is checked against TemplateLimits
before it runs) inside a worker process (template_workers.py: hard time limit, killed and replaced
on overrun, address space capped), so a runaway can neither hold the server's GIL nor eat its
memory. `isolated=False` renders in the calling thread with the same budgets but without the
process backstop (for tests and tools; never for untrusted templates in the server).

Errors (all ChatTemplateError, a ValueError):
- TemplateRefused: the template called raise_exception(), or the messages are malformed; the
  caller's fault (the server answers INVALID_ARGUMENT).
- TemplateFault / TemplateLimitExceeded (.limit names the limit): the template failed or broke a
  limit; the server's fault, as it accepted the template (INTERNAL with the request id).
- TemplateDeadlineExceeded: the request's deadline passed first (DEADLINE_EXCEEDED).
- TemplateUnavailable: no worker could be had (UNAVAILABLE).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence

from tinyserve.models.template_sandbox import (
    MAX_SOURCE_CHARS,
    ChatTemplateError,
    SandboxedTemplate,
    TemplateDeadlineExceeded,
    TemplateFault,
    TemplateLimitExceeded,
    TemplateLimits,
    TemplateRefused,
    TemplateUnavailable,
    check_messages,
)

__all__ = [
    "ChatTemplate",
    "ChatTemplateError",
    "TemplateRefused",
    "TemplateFault",
    "TemplateLimitExceeded",
    "TemplateDeadlineExceeded",
    "TemplateUnavailable",
    "TemplateLimits",
    "CHATML_TEMPLATE",
    "MAX_SOURCE_CHARS",
    "check_message_contents",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# What validate() renders: a conversation with a system turn, the same without it (templates
# such as Gemma 2's refuse system messages), and a function tool for templates that read `tools`.
SAMPLE_CONVERSATIONS = (
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello, who are you?"},
        {"role": "assistant", "content": "I am an assistant. How can I help?"},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    [
        {"role": "user", "content": "Hello, who are you?"},
        {"role": "assistant", "content": "I am an assistant. How can I help?"},
        {"role": "user", "content": "What is the capital of France?"},
    ],
)
SAMPLE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "the city"}},
                "required": ["city"],
            },
        },
    }
]


class ChatTemplate:
    """One compiled chat template. Thread-safe: each render has its own budget (and worker)."""

    def __init__(
        self,
        source: str,
        bos_token: str = "",
        eos_token: str = "",
        *,
        limits: TemplateLimits | None = None,
        max_output_chars: int | None = None,
        max_ops: int | None = None,
        isolated: bool = True,
        pool=None,
    ):
        limits = limits or TemplateLimits()
        overrides = {k: v for k, v in (("max_output_chars", max_output_chars), ("max_ops", max_ops)) if v is not None}
        if overrides:
            limits = dataclasses.replace(limits, **overrides)
        # Compiled here too (syntax errors at once); renders run it in a worker unless isolated=False.
        self._compiled = SandboxedTemplate(source, bos_token, eos_token, limits)
        self.source, self.bos_token, self.eos_token, self.limits = source, bos_token, eos_token, limits
        self.isolated = isolated
        self._pool = pool

    @classmethod
    def from_metadata(cls, meta: Mapping, tok, **kw) -> ChatTemplate | None:
        """The file's tokenizer.chat_template (None when it has none), with the vocabulary's BOS/EOS text."""
        source = meta.get("tokenizer.chat_template")
        if source is None:
            return None
        if isinstance(source, (bytes, bytearray)):  # _core passes non-UTF-8 strings as bytes
            source = bytes(source).decode("utf-8", errors="replace")
        if not isinstance(source, str):
            raise TemplateFault(f"tokenizer.chat_template must be str, got {type(source).__name__}")
        bos = tok.decode([tok.bos_id]) if tok.bos_id is not None else ""
        eos = tok.decode([tok.eos_id]) if tok.eos_id is not None else ""
        return cls(source, bos_token=bos, eos_token=eos, **kw)

    @classmethod
    def chatml(cls, bos_token: str = "", eos_token: str = "<|im_end|>", **kw) -> ChatTemplate:
        """ChatML (<|im_start|>role\\ncontent<|im_end|>), for files that carry no usable template."""
        return cls(CHATML_TEMPLATE, bos_token=bos_token, eos_token=eos_token, **kw)

    @property
    def uses_tools(self) -> bool:
        return "tools" in self._compiled.variables

    def render(
        self, messages: Sequence[Mapping], add_generation_prompt: bool = True, *, deadline: float | None = None, **extra
    ) -> str:
        """The prompt text for `messages`; `extra` are further template variables (tools, ...).
        `deadline` (time.monotonic()) is the request's: the render ends by then, or by
        limits.time_s, whichever is sooner."""
        msgs = check_messages(messages)
        if deadline is not None and deadline <= time.monotonic():
            raise TemplateDeadlineExceeded("the request's deadline passed before its chat template rendered")
        if not self.isolated:
            time_s, is_request = self.limits.time_s, False
            if deadline is not None and deadline - time.monotonic() < time_s:
                time_s, is_request = deadline - time.monotonic(), True
            return self._compiled.render(
                msgs, add_generation_prompt, extra, time_s=time_s, deadline_is_request=is_request
            )
        from tinyserve.models.template_workers import default_pool

        pool = self._pool or default_pool()
        request = {
            "template": {
                "source": self.source,
                "bos": self.bos_token,
                "eos": self.eos_token,
                "limits": self.limits.as_dict(),
            },
            "messages": msgs,
            "add_generation_prompt": bool(add_generation_prompt),
            "extra": extra,
        }
        return pool.render(request, self.limits.time_s, deadline)

    def validate(self) -> None:
        """Render sample conversations as a request would (in a worker, with the limits), so a
        template that cannot serve is found at load, not by the first client. Raises
        ChatTemplateError naming the problem (and TemplateLimitExceeded.limit the limit)."""
        refused: TemplateRefused | None = None
        for messages in SAMPLE_CONVERSATIONS:
            try:
                text = self.render(messages, add_generation_prompt=True)
            except TemplateRefused as e:  # e.g. "system role not supported": try the next one
                refused = e
                continue
            if messages[-1]["content"] not in text:
                raise TemplateFault("the chat template's output does not contain the last user message")
            if self.uses_tools:
                self.render(messages, add_generation_prompt=True, tools=SAMPLE_TOOLS)
            return
        raise TemplateFault(f"the chat template refuses every sample conversation: {refused}")


def check_message_contents(messages: list[dict], tokenizer) -> None:
    """Refuse message contents that spell out one of the model's control tokens.

    A chat prompt is rendered to text and tokenized with control tokens parsed (the template's own
    `<|im_start|>`/`<|im_end|>` must become single tokens), so a content holding that text would
    forge a turn boundary or a system message: prompt injection across roles, which matters when
    an application passes its end users' text through. Raises TemplateRefused (a ChatTemplateError)
    naming the message and the token.
    """
    specials = sorted({tokenizer.token_text(i) for i in tokenizer.special_ids} - {""}, key=len, reverse=True)
    for i, m in enumerate(messages):
        content = m.get("content")
        if not isinstance(content, str) or "<" not in content and "[" not in content:
            continue
        for s in specials:
            if s in content:
                raise TemplateRefused(
                    f"messages[{i}].content contains the control token {s!r}, which would forge a chat turn"
                )
