"""Function tools of a chat: checking them, showing them to the model, constraining and parsing its calls.

    specs = check_tools([(name, description, parameters_json), ...])   # ParamError on tools[i].*
    messages, extra = with_tools(messages, specs, template_uses_tools)   # what the template renders
    fmt = call_format(specs)             # tool_choice "required" / a name: a JSON Schema of one call
    calls = parse_calls(text, specs)     # the calls in the model's answer (auto or constrained)

A call is written as the JSON object {"name": <function>, "arguments": {...}}, the form the
Hermes/Qwen templates teach (inside <tool_call> tags there) and the one a constrained call
produces. A template that reads `tools` gets them as OpenAI-style function entries; one that does
not gets them described in a system message (prepended to the first one, or a new first message).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tinyserve.engine.grammar import MAX_GRAMMAR_BYTES, ResponseFormat
from tinyserve.engine.params import ParamError

__all__ = [
    "MAX_TOOLS",
    "ToolCall",
    "ToolSpec",
    "call_format",
    "check_tools",
    "parse_calls",
    "resolve_choice",
    "with_tools",
]

MAX_TOOLS = 64
MAX_DESCRIPTION_CHARS = 4096
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
CHOICE_KEYWORDS = ("auto", "none", "required")


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict  # a JSON Schema object

    def template_entry(self) -> dict:
        """The OpenAI-style entry chat templates expect in `tools`."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as JSON text


class ToolErrors(ParamError):
    """Several bad tool fields at once (`.errors`); itself the first of them."""

    def __init__(self, errors: list[ParamError]):
        super().__init__(errors[0].field, errors[0].message)
        self.errors = errors


def check_tools(tools: Sequence[tuple[str, str, str]]) -> list[ToolSpec]:
    """ToolSpecs from (name, description, parameters JSON text); raises a list of ParamError
    (ToolErrors) naming every bad field (tools[i].name, tools[i].parameters, ...)."""
    bad: list[ParamError] = []
    if len(tools) > MAX_TOOLS:
        raise ToolErrors([ParamError("tools", f"at most {MAX_TOOLS} tools, got {len(tools)}")])
    specs, seen = [], set()
    total = 0
    for i, (name, description, parameters) in enumerate(tools):
        if not _NAME.fullmatch(name or ""):
            bad.append(ParamError(f"tools[{i}].name", "must be 1 to 64 characters of a-z, A-Z, 0-9, '_' and '-'"))
        elif name in seen:
            bad.append(ParamError(f"tools[{i}].name", f"{name!r} is given twice"))
        seen.add(name)
        if len(description) > MAX_DESCRIPTION_CHARS:
            bad.append(ParamError(f"tools[{i}].description", f"at most {MAX_DESCRIPTION_CHARS} characters"))
        total += len(parameters.encode("utf-8", "surrogatepass")) + len(name) + 64
        schema: Any = {"type": "object"}
        if parameters:
            try:
                schema = json.loads(parameters)
            except ValueError as e:
                bad.append(ParamError(f"tools[{i}].parameters", f"not valid JSON: {e}"))
                continue
            if not isinstance(schema, dict):
                bad.append(ParamError(f"tools[{i}].parameters", f"a JSON Schema object, got {type(schema).__name__}"))
                continue
        specs.append(ToolSpec(name, description, schema))
    if total > MAX_GRAMMAR_BYTES:
        bad.append(
            ParamError(
                "tools", f"the tools' parameters are at most {MAX_GRAMMAR_BYTES} bytes together, got about {total}"
            )
        )
    if bad:
        raise ToolErrors(bad)
    return specs


def resolve_choice(tool_choice: str, specs: Sequence[ToolSpec]) -> str | None:
    """What tool_choice asks: "auto", "none", "required", or the one function's name. None with
    no tools and no tool_choice. Raises ParamError on tool_choice."""
    if not specs:
        if tool_choice and tool_choice != "none":
            raise ParamError("tool_choice", f"{tool_choice!r} needs tools")
        return None
    choice = tool_choice or "auto"
    if choice not in CHOICE_KEYWORDS and choice not in {s.name for s in specs}:
        raise ParamError("tool_choice", f"must be auto, none, required or one of the tools' names, got {choice[:64]!r}")
    return choice


def with_tools(messages: list[dict], specs: Sequence[ToolSpec], template_uses_tools: bool) -> tuple[list[dict], dict]:
    """(messages, extra template variables) that show `specs` to the model."""
    if not specs:
        return messages, {}
    if template_uses_tools:
        return messages, {"tools": [s.template_entry() for s in specs]}
    text = (
        "You can call functions. To call one, answer with only a JSON object "
        '{"name": <function name>, "arguments": <its arguments as a JSON object>}. '
        "The functions:\n"
        + "\n".join(
            json.dumps({"name": s.name, "description": s.description, "parameters": s.parameters}, ensure_ascii=False)
            for s in specs
        )
    )
    msgs = [dict(m) for m in messages]
    if msgs and msgs[0].get("role") == "system":
        msgs[0]["content"] = f"{msgs[0]['content']}\n\n{text}"
    else:
        msgs.insert(0, {"role": "system", "content": text})
    return msgs, {}


def call_schema(specs: Sequence[ToolSpec]) -> dict:
    """The JSON Schema of one call of one of `specs`: {"name": const, "arguments": parameters}."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": s.name}, "arguments": s.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for s in specs
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def call_format(specs: Sequence[ToolSpec], choice: str) -> ResponseFormat:
    """The response format of tool_choice "required" (any of specs) or a function name."""
    allowed = [s for s in specs if choice == "required" or s.name == choice]
    return ResponseFormat("json_schema", json.dumps(call_schema(allowed), ensure_ascii=False))


_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def parse_calls(text: str, specs: Sequence[ToolSpec]) -> list[ToolCall]:
    """The calls in the model's answer: <tool_call>{...}</tool_call> blocks, else the whole
    answer as one call object (or a list of them), each naming one of `specs` with an object of
    arguments ("arguments" or "parameters"). Anything else is text: []."""
    names = {s.name for s in specs}
    bodies = _TAGGED.findall(text) if "<tool_call>" in text else [text.strip()]
    calls: list[ToolCall] = []
    for body in bodies:
        body = body.strip()
        if body.startswith("```"):  # a fenced block: ```json ... ```
            body = body.strip("`").removeprefix("json").strip()
        try:
            value = json.loads(body)
        except ValueError:
            continue
        for v in value if isinstance(value, list) else [value]:
            if not isinstance(v, dict) or v.get("name") not in names:
                continue
            args = v.get("arguments", v.get("parameters", {}))
            if isinstance(args, str):  # some models write the arguments as a JSON string
                try:
                    args = json.loads(args)
                except ValueError:
                    continue
            if isinstance(args, dict):
                calls.append(ToolCall(f"call_{secrets.token_hex(12)}", v["name"], json.dumps(args, ensure_ascii=False)))
    return calls
