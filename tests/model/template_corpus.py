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

QWEN_PATH = Path(os.environ.get("TINYSERVE_QWEN_MODEL", "/work/dl/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"))
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

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name, e.g. Zürich"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    }
]


def _long() -> list[dict]:
    out = [{"role": "system", "content": 'You answer in one line.\nNo <html> & no "quotes".'}]
    for i in range(8):
        out.append({"role": "user", "content": f"  question {i}: Grüße, 日本語, emoji 🙂, tab\tend  "})
        out.append({"role": "assistant", "content": f"answer {i}\n\nwith a blank line"})
    out.append({"role": "user", "content": "last one?"})
    return out


CONVERSATIONS = {
    "one_user": [{"role": "user", "content": "What is 2+2?"}],
    "system_turns": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "Bye"},
    ],
    "no_system": [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "Bye"},
    ],
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


_NS_LOOP = "{% set ns = namespace(v=VALUE) %}{% for i in range(N) %}{% set ns.v = STEP %}{% endfor %}{{ ns.v|length }}"


def _loop(value: str, step: str, n: int = 64) -> str:
    return _NS_LOOP.replace("VALUE", value).replace("STEP", step).replace("N", str(n))


# (name, source, the limit that must stop it: TemplateLimitExceeded.limit)
HOSTILE = [
    # issue 13: big integers held the GIL for seconds
    ("pow_chain_10_1000", "{{ ((10**1000)**1000)**1000 }}", "max_int_bits"),
    ("pow_chain_10_10", "{{ ((10**10)**1000)**1000 }}", "max_int_bits"),
    (
        "square_in_loop",
        "{% set ns = namespace(n=2) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}{% endfor %}{{ ns.n }}",
        "max_int_bits",
    ),
    ("add_doubling_int", _loop("1", "ns.v + ns.v", 100000).replace("|length", ""), "max_int_bits"),
    # issue 13: allocated gigabytes before a budget fired
    ("tojson_huge_indent", "{{ messages|tojson(indent=1000000000) }}", "max_indent"),
    ("format_nested_width", "{{ '{0:>{1}}'.format('x', 2000000000) }}", "max_width"),
    ("format_width", "{{ '{:>999999999}'.format(1) }}", "max_width"),
    ("percent_keyed_width", "{{ '%(a)999999999s' % {'a': 1} }}", "max_width"),
    ("percent_star_width", "{{ '%*d' % (999999999, 1) }}", "max_width"),
    ("lipsum", "{{ lipsum(1000000) }}", "lipsum"),
    # loops and work
    ("nested_loops", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "max_ops"),
    ("quadratic_concat", _loop("''", "ns.v ~ 'xxxxxxxx'", 100000), "max_ops"),
    (
        "membership_in_loop",
        "{% set big = 'x' * 4000000 %}{% for i in range(100000) %}{% if 'y' in big %}{% endif %}{% endfor %}",
        "max_ops",
    ),
    # strings and lists
    ("string_doubling_concat", _loop("'x'", "ns.v ~ ns.v"), "max_output_chars"),
    ("string_doubling_plus", _loop("'x'", "ns.v + ns.v"), "max_output_chars"),
    ("string_times", "{{ 'x' * 10**9 }}", "max_output_chars"),
    ("center", "{{ 'x'|center(10**9) }}", "max_output_chars"),
    ("ljust", "{{ 'x'.ljust(10**9) }}", "max_output_chars"),
    ("to_bytes", "{{ (1).to_bytes(10**9, 'big') }}", "max_output_chars"),
    ("replace_empty", "{{ ('x' * 1000).replace('', 'y' * 10000) }}", "max_output_chars"),
    ("print_shared_refs", "{{ ['x' * 1000000] * 100000 }}", "max_output_chars"),
    ("join_shared_refs", "{{ (['x' * 1000000] * 100000)|join }}", "max_output_chars"),
    ("output", "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "max_output_chars"),
    ("list_doubling", _loop("[0]", "ns.v + ns.v"), "max_items"),
    ("list_times", "{{ [0] * 10**9 }}", "max_items"),
    ("range", "{{ range(10**9)|list|length }}", "max_items"),
    ("batch_list", "{{ ('x' * 4000000)|batch(1)|list|length }}", "max_items"),
    ("split", "{{ ('x ' * 2000000).split()|length }}", "max_items"),
    # recursion
    ("macro_recursion", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion"),
    ("loop_recursion", "{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}", "recursion"),
    ("deep_tojson", _loop("[]", "[ns.v]", 5000).replace("|length", "|tojson"), "recursion"),
]

# Runaways that only the worker's hard time limit stops: one C-level call that no budget sees
# (textwrap over 4M characters), so they need TemplateLimits.time_s and the process kill.
HARD_RUNAWAYS = [
    ("wordwrap_4m", "{{ ('x' * 4000000)|wordwrap(1) }}"),
]
