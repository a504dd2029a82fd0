"""Load a GGUF model: the C++ core (mmap'd weights), its tokenizer and its chat template."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tinyserve import _core
    from tinyserve.models.chat_template import ChatTemplate
    from tinyserve.models.tokenizer import Tokenizer

log = logging.getLogger("tinyserve.models")

CHAT_TEMPLATE_FALLBACKS = ("chatml",)  # what --chat-template-fallback accepts


class ModelLoadError(ValueError):
    """The model file cannot be used (missing, unreadable, malformed or unsupported)."""


@dataclass
class LoadedModel:
    name: str  # served name (default: the file name without .gguf)
    path: str
    core: _core.Model  # the mmap'd weights and the forward
    config: dict[str, Any]  # = core.config (arch, n_vocab, dim, n_layers, context_length, ...)
    tokenizer: Tokenizer
    chat_template: ChatTemplate  # from the file, built in for its architecture, or ChatML
    metadata: dict[str, Any] = field(repr=False, default_factory=dict)
    chat_template_origin: str = "from the file"  # which template is in use, and why (tinyserve info)

    def kv_bytes_per_token(self, kv_dtype: str = "f16", block_size: int = 16) -> float:
        """KV cache bytes per position (K and V, every layer), from the cache's real block size."""
        from tinyserve import _core

        c = self.config
        return (
            _core.KVCache.block_bytes(c["n_layers"], c["n_kv_heads"], c["head_dim"], block_size, kv_dtype) / block_size
        )


def load_model(
    path: str | os.PathLike,
    name: str | None = None,
    *,
    chat_template_fallback: str | None = None,
    device: str | None = None,
) -> LoadedModel:
    """Raises ModelLoadError (a ValueError) naming the problem for any file we cannot serve, and
    DeviceUnavailable (a RuntimeError) when `device` (tinyserve.device) cannot be used.

    The file's chat template is validated here (select_chat_template); one that fails is a load
    error unless chat_template_fallback="chatml" is given, which serves ChatML instead."""
    from tinyserve import _core
    from tinyserve.device import DeviceUnavailable, check_device
    from tinyserve.models.tokenizer import Tokenizer

    device = check_device(device)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"model file not found: {path}")
    try:
        core = _core.Model(path, device=device)
    except _core.DeviceError as e:
        raise DeviceUnavailable(str(e)) from None
    except OSError as e:
        raise ModelLoadError(f"cannot open model file {path}: {e}") from None
    except ValueError as e:  # _core.GGUFError (its message names the file)
        raise ModelLoadError(str(e) if path in str(e) else f"{path}: {e}") from None
    meta = core.metadata()
    try:
        tokenizer = Tokenizer.from_metadata(meta)
    except ValueError as e:
        raise ModelLoadError(f"{path}: tokenizer: {e}") from None
    if tokenizer.vocab_size != core.config["n_vocab"]:
        raise ModelLoadError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
            f"vocabulary is {core.config['n_vocab']}"
        )
    if name is None:
        name = os.path.splitext(os.path.basename(path))[0]
    chat_template, origin = select_chat_template(meta, tokenizer, f"{name} ({path})", chat_template_fallback)
    return LoadedModel(
        name=name,
        path=path,
        core=core,
        config=dict(core.config),
        tokenizer=tokenizer,
        chat_template=chat_template,
        metadata=meta,
        chat_template_origin=origin,
    )


def select_chat_template(
    meta: dict[str, Any], tokenizer: Tokenizer, model: str, fallback: str | None = None
) -> tuple[ChatTemplate, str]:
    """(the ChatTemplate to serve, a line saying which one and why).

    The file's template is compiled and validated (ChatTemplate.validate: sample conversations,
    with tools when it uses them, in a worker, under the render limits). A file without one gets
    ChatML. A template that fails raises ModelLoadError naming the model and the problem (the limit
    it broke), unless fallback="chatml": then ChatML, with a WARNING."""
    from tinyserve.models.chat_template import ChatTemplate, ChatTemplateError

    if fallback is not None and fallback not in CHAT_TEMPLATE_FALLBACKS:
        raise ModelLoadError(
            f"unknown chat template fallback {fallback!r} (choose from {', '.join(CHAT_TEMPLATE_FALLBACKS)})"
        )
    if meta.get("tokenizer.chat_template") is None:
        # none in the file: the built-in one for its architecture (Gemma's turns), else ChatML
        from tinyserve.models.builtin_templates import builtin_chat_template, builtin_template_name

        builtin = builtin_chat_template(meta, tokenizer)
        if builtin is not None:
            builtin.validate()
            return builtin, f"built-in ({builtin_template_name(meta, tokenizer)}; the file has no chat template)"
        return ChatTemplate.chatml(), "ChatML (the file has no chat template)"
    try:
        tpl = ChatTemplate.from_metadata(meta, tokenizer)
        assert tpl is not None  # the file has a chat template (checked above)
        tpl.validate()
        return tpl, "from the file (validated at load)"
    except ChatTemplateError as e:  # a TemplateLimitExceeded's message names its limit
        problem = str(e)
    if fallback is None:
        raise ModelLoadError(
            f"model {model}: its chat template cannot be served: {problem}. "
            f"Fix the file, or pass --chat-template-fallback chatml to serve it with ChatML"
        )
    log.warning(
        "model %s: its chat template cannot be served (%s); using ChatML (--chat-template-fallback chatml)",
        model,
        problem,
    )
    return (
        ChatTemplate.chatml(),
        f"ChatML fallback (--chat-template-fallback chatml): the file's template failed: {problem}",
    )
