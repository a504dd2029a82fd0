"""Chat templates and conversations the template tests and bench/bench_templates.py share.

- REAL: the templates of real models (read from the GGUF files: SmolLM2's in the default model,
  Qwen2.5's in the Qwen2.5-Coder file when it is there) plus GEMMA_STYLE, our own template for
  Gemma's turn format (the Gemma file in /work/dl/models carries none).
- CONVERSATIONS: what they render in the golden and transformers comparisons.
- HOSTILE: templates that try to stall, bloat or escape the renderer, each with the limit that
  must stop it.
"""
from __future__ import annotations

import os
from pathlib import Path

QWEN_PATH = Path(os.environ.get("TINYSERVE_QWEN_MODEL",
                                "/work/dl/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"))
GOLDENS = Path(__file__).parent / "data" / "template_goldens.json"

# Gemma's turn format (<start_of_turn>user / model, <end_of_turn>; a system message is folded into
# the first user turn; turns must alternate), written for these tests.
GEMMA_STYLE = (
    "{{- bos_token -}}\n"
    "{%- set ns = namespace(system='') -%}\n"
    "{%- if messages and messages[0].role == 'system' -%}\n"
    "  {%- set ns.system = messages[0].content ~ '\\n\\n' -%}\n"
    "  {%- set turns = messages[1:] -%}\n"
    "{%- else -%}\n"
    "  {%- set turns = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for m in turns -%}\n"
    "  {%- if (m.role == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "    {{- raise_exception('turns must alternate user/assistant, starting with user') -}}\n"
    "  {%- endif -%}\n"
    "  {%- set role = 'model' if m.role == 'assistant' else m.role -%}\n"
    "  {{- '<start_of_turn>' ~ role ~ '\\n' ~ (ns.system if loop.first else '') ~ m.content | trim"
    " ~ '<end_of_turn>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}\n"
)
GEMMA_TOKENS = ("<bos>", "<eos>")

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name, e.g. Zürich"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}}]


def _long() -> list[dict]:
    out = [{"role": "system", "content": "You answer in one line.\nNo <html> & no \"quotes\"."}]
    for i in range(8):
        out.append({"role": "user", "content": f"  question {i}: Grüße, 日本語, emoji 🙂, tab\tend  "})
        out.append({"role": "assistant", "content": f"answer {i}\n\nwith a blank line"})
    out.append({"role": "user", "content": "last one?"})
    return out


CONVERSATIONS = {
    "one_user": [{"role": "user", "content": "What is 2+2?"}],
    "system_turns": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                     {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Bye"}],
    "no_system": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"},
                  {"role": "user", "content": "Bye"}],
    "long": _long(),
}


def real_templates(default_model_path) -> dict[str, tuple[str, str, str]]:
    """name -> (source, bos_token, eos_token) of every real template available here."""
    from tinyserve.models.tokenizer import Tokenizer, metadata_from_gguf

    out = {}
    for name, path in (("smollm2", Path(default_model_path)), ("qwen2.5", QWEN_PATH)):
        if not path.is_file():
            continue
        meta = metadata_from_gguf(path)
        tok = Tokenizer.from_metadata(meta)
        bos = tok.decode([tok.bos_id]) if tok.bos_id is not None else ""
        eos = tok.decode([tok.eos_id]) if tok.eos_id is not None else ""
        out[name] = (meta["tokenizer.chat_template"], bos, eos)
    out["gemma-style"] = (GEMMA_STYLE, *GEMMA_TOKENS)
    return out


def golden_cases(templates: dict) -> list[tuple[str, str, bool, bool]]:
    """(template name, conversation name, add_generation_prompt, with tools) to compare."""
    cases = []
    for t in templates:
        cases += [(t, c, agp, False) for c in CONVERSATIONS for agp in (True, False)]
        if t == "qwen2.5":
            cases += [(t, c, True, True) for c in CONVERSATIONS]
    return cases
