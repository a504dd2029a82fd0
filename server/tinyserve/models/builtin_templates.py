"""Chat templates tinyserve ships for model families whose GGUF files often carry none.

Chosen by `general.architecture` when the file has no tokenizer.chat_template (loader.py); they
render in the same sandbox as a file's own template (chat_template.ChatTemplate).

Gemma (gemma, gemma2, gemma3): the turn format of Google's Gemma documentation. Each turn is
`<start_of_turn>ROLE\\n` + text + `<end_of_turn>\\n` with ROLE `user` or `model` (our "assistant");
turns alternate, starting with the user. Gemma has no system role: a leading system message goes
at the start of the first user turn, followed by a blank line. Texts are stripped of surrounding
whitespace. The prompt starts with BOS, and the generation prompt is `<start_of_turn>model\\n`;
the model ends its turn with `<end_of_turn>`, which is one of the tokenizer's stop tokens.
"""

from __future__ import annotations

from collections.abc import Mapping

from .chat_template import ChatTemplate

__all__ = ["GEMMA_TURNS", "builtin_chat_template", "builtin_template_name"]

GEMMA_TURNS = """\
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system = messages[0]['content'] | trim -%}
  {%- set turns = messages[1:] -%}
  {%- if not turns -%}
    {{- raise_exception("Gemma's turn format needs a user message after the system message") -}}
  {%- endif -%}
{%- else -%}
  {%- set system = '' -%}
  {%- set turns = messages -%}
{%- endif -%}
{{- bos_token -}}
{%- for m in turns -%}
  {%- set speaker = 'user' if m['role'] == 'user' else ('model' if m['role'] in ('assistant', 'model') else '') -%}
  {%- if not speaker -%}
    {{- raise_exception("Gemma's turn format has no place for a '" ~ m['role'] ~ "' message here: "
                        ~ "one optional system message first, then user and assistant turns") -}}
  {%- endif -%}
  {%- if (speaker == 'user') != (loop.index0 % 2 == 0) -%}
    {{- raise_exception("Gemma's turn format needs user and assistant turns to alternate, starting with user") -}}
  {%- endif -%}
  {{- '<start_of_turn>' ~ speaker ~ '\\n' -}}
  {%- if loop.first and system -%}
    {{- system ~ '\\n\\n' -}}
  {%- endif -%}
  {{- m['content'] | trim -}}
  {{- '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<start_of_turn>model\\n' -}}
{%- endif -%}
"""

# architecture -> (name, template source, control tokens the vocabulary must have for it)
_BY_ARCH: dict[str, tuple[str, str, tuple[str, ...]]] = {
    arch: ("Gemma turns", GEMMA_TURNS, ("<start_of_turn>", "<end_of_turn>")) for arch in ("gemma", "gemma2", "gemma3")
}


def builtin_template_name(meta: Mapping, tokenizer) -> str | None:
    """The name of the built-in template for this model, or None when there is none for it."""
    spec = _BY_ARCH.get(str(meta.get("general.architecture", "")))
    if spec is None or any(tokenizer.token_to_id(t) is None for t in spec[2]):
        return None
    return spec[0]


def builtin_chat_template(meta: Mapping, tokenizer) -> ChatTemplate | None:
    """The built-in template for the file's architecture (None when there is none, or when the
    vocabulary lacks the tokens it is written in)."""
    if builtin_template_name(meta, tokenizer) is None:
        return None
    source = _BY_ARCH[str(meta["general.architecture"])][1]
    bos = tokenizer.token_text(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
    eos = tokenizer.token_text(tokenizer.eos_id) if tokenizer.eos_id is not None else ""
    return ChatTemplate(source, bos_token=bos, eos_token=eos)
