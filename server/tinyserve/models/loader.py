"""Load a GGUF model: the C++ core (mmap'd weights), its tokenizer and its chat template."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


class ModelLoadError(ValueError):
    """The model file cannot be used (missing, unreadable, malformed or unsupported)."""


@dataclass
class LoadedModel:
    name: str                    # served name (default: the file name without .gguf)
    path: str
    core: Any                    # tinyserve._core.Model
    config: dict                 # = core.config (arch, n_vocab, dim, n_layers, context_length, ...)
    tokenizer: Any               # tinyserve.models.tokenizer.Tokenizer
    chat_template: Any           # ChatTemplate from the file, or the ChatML fallback
    metadata: dict = field(repr=False, default_factory=dict)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        c = self.config
        return 2 * c["n_layers"] * c["n_kv_heads"] * c["head_dim"] * dtype_bytes


def load_model(path: str | os.PathLike, name: str | None = None) -> LoadedModel:
    """Raises ModelLoadError (a ValueError) naming the problem for any file we cannot serve."""
    from tinyserve import _core
    from tinyserve.models.tokenizer import Tokenizer

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"model file not found: {path}")
    try:
        core = _core.Model(path)
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
        raise ModelLoadError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                             f"vocabulary is {core.config['n_vocab']}")
    chat_template = _chat_template(meta, tokenizer)
    if name is None:
        name = os.path.splitext(os.path.basename(path))[0]
    return LoadedModel(name=name, path=path, core=core, config=dict(core.config), tokenizer=tokenizer,
                       chat_template=chat_template, metadata=meta)


def _chat_template(meta: dict, tokenizer: Any) -> Any:
    try:
        from tinyserve.models.chat_template import ChatTemplate
    except ImportError:  # not there yet: a minimal ChatML renderer
        return _ChatML()
    try:
        tpl = ChatTemplate.from_metadata(meta, tokenizer)
    except ValueError:  # a broken template in the file: serve with a built-in one rather than not at all
        tpl = None
    if tpl is None:  # none in the file: the built-in one for its architecture (Gemma's turns), else ChatML
        from tinyserve.models.builtin_templates import builtin_chat_template

        tpl = builtin_chat_template(meta, tokenizer)
    return tpl if tpl is not None else ChatTemplate.chatml()


class _ChatML:
    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")
