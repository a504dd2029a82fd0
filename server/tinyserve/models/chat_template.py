"""Chat templates: the Jinja template a GGUF carries (tokenizer.chat_template) turns a list of
messages into the prompt text, the way transformers' `apply_chat_template` does.

Templates come from model files, which are untrusted input, so they run in Jinja's immutable sandbox
(no access to `__class__` and friends, no mutating the messages) and under a budget: a cap on the
output and on every string the template builds, a count of operations (attribute and item lookups,
calls, loop iterations) and Python's recursion limit. A template that breaks any of these, fails,
or calls raise_exception() gives ChatTemplateError; it never hangs the server or eats its memory.

The context is the one Hugging Face templates expect: messages, add_generation_prompt, bos_token,
eos_token, raise_exception(), strftime_now(), the loopcontrols extension, a tojson filter that
keeps non-ASCII text as is, and anything the caller passes as **extra (tools, documents, ...).
"""
from __future__ import annotations

import datetime
import json
import re
import threading
from collections.abc import Mapping, Sequence

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

__all__ = ["ChatTemplate", "ChatTemplateError", "CHATML_TEMPLATE"]


class ChatTemplateError(ValueError):
    """The chat template is invalid, failed while rendering, exceeded its budget, or refused the messages."""


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DEFAULT_MAX_OUTPUT_CHARS = 4 << 20   # the rendered prompt, and any one string built on the way
DEFAULT_MAX_OPS = 2_000_000          # attribute/item lookups + calls + operators + loop iterations
MAX_RANGE = 100_000                  # items in one range()
MAX_WIDTH = 100_000                  # widths in padding and %-formats

_ITER_GUARD = "__tinyserve_iter"
_CONCAT_GUARD = "__tinyserve_concat"


class _Raised(Exception):
    """raise_exception() called by the template."""


class _BudgetExceeded(Exception):
    pass


class _Budget:
    def __init__(self, max_ops: int, max_chars: int):
        self.ops_left = max_ops
        self.max_ops = max_ops
        self.max_chars = max_chars

    def tick(self, n: int = 1) -> None:
        self.ops_left -= n
        if self.ops_left < 0:
            raise _BudgetExceeded(f"chat template ran for more than {self.max_ops} operations")

    def check_len(self, n: int, what: str = "a string") -> None:
        if n > self.max_chars:
            raise _BudgetExceeded(f"chat template built {what} of {n} items (limit {self.max_chars})")


_PERCENT_SPEC = re.compile(r"%[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*:[^{}]*\}")
_DIGITS = re.compile(r"\d+")


def _check_format_widths(fmt: str, style: str) -> None:
    """Refuse %-format or str.format specs with huge (or * from data) widths/precisions."""
    specs = _PERCENT_SPEC.findall(fmt) if style == "%" else _BRACE_SPEC.findall(fmt)
    for spec in specs:
        parts = spec if isinstance(spec, tuple) else _DIGITS.findall(spec)
        for p in parts:
            if p == "*" or (p and int(p) > MAX_WIDTH):
                raise _BudgetExceeded(f"chat template used a format width/precision {p!r} over the limit")


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with every lookup, call and operator charged to the render's budget
    and checked for outsized results before they are built."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, **kw):
        super().__init__(**kw)
        self._local = threading.local()  # the budget of the render running in this thread

    @property
    def budget(self) -> _Budget | None:
        return getattr(self._local, "budget", None)

    def _tick(self) -> _Budget | None:
        b = self.budget
        if b is not None:
            b.tick()
        return b

    def getattr(self, obj, attribute):
        b = self._tick()
        if b is not None and isinstance(obj, str) and attribute in ("format", "format_map"):
            _check_format_widths(obj, "{")  # the sandbox hands out a wrapper, so check the spec here
        return super().getattr(obj, attribute)

    def unsafe_undefined(self, obj, attribute):
        # Jinja would return an Undefined that only fails when used; fail at once instead.
        raise jinja2.sandbox.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def getitem(self, obj, argument):
        self._tick()
        return super().getitem(obj, argument)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature style)
        b = __self._tick()
        if b is not None:
            _precheck_call(b, __obj, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        if b is not None and isinstance(result, (str, list, tuple)):
            b.check_len(len(result))
        return result

    def call_binop(self, context, operator, left, right):
        b = self._tick()
        if b is not None:
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                        b.check_len(len(seq) * max(n, 0))
            elif operator == "+":
                if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                    b.check_len(len(left) + len(right))
            elif operator == "**":
                if isinstance(left, (int, float)) and isinstance(right, (int, float)) and abs(right) > 1024 \
                        and abs(left) > 1:
                    raise _BudgetExceeded(f"chat template computed {left!r} ** {right!r}")
            elif operator == "%" and isinstance(left, str):
                _check_format_widths(left, "%")
        return super().call_binop(context, operator, left, right)


def _precheck_call(b: _Budget, obj, args, kwargs) -> None:
    """Refuse str method calls whose result would be outsized, before they allocate it."""
    owner = getattr(obj, "__self__", None)
    if not isinstance(owner, str):
        return
    name = getattr(obj, "__name__", "")
    ints = [a for a in (*args, *kwargs.values()) if isinstance(a, int)]
    if name in ("center", "ljust", "rjust", "zfill"):
        for n in ints:
            b.check_len(n)
    elif name == "expandtabs":
        for n in ints:
            b.check_len(len(owner) * max(n, 1))
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        _check_replace(b, owner, args[0], args[1])


def _check_replace(b: _Budget, s: str, old: str, new: str) -> None:
    if len(new) > len(old):
        count = len(s) + 1 if not old else s.count(old)
        b.check_len(len(s) + count * (len(new) - len(old)))


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


class _GuardLoopsAndConcats(NodeTransformer):
    """Route every for-loop's iterable through the iteration guard and every `~` concatenation
    through the length guard (Jinja runs neither through the sandbox's hooks)."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        node.iter = nodes.Call(nodes.Name(_ITER_GUARD, "load"), [node.iter], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        node = self.generic_visit(node)
        return nodes.Call(nodes.Name(_CONCAT_GUARD, "load"), list(node.nodes), [], None, None, lineno=node.lineno)


class ChatTemplate:
    """One compiled chat template. Thread-safe: each render has its own budget."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", *,
                 max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS, max_ops: int = DEFAULT_MAX_OPS):
        if not isinstance(source, str):
            raise ChatTemplateError(f"chat template must be str, got {type(source).__name__}")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.max_output_chars = max_output_chars
        self.max_ops = max_ops
        # optimized=False: Jinja's optimizer would evaluate constant expressions (filters included)
        # while compiling, outside the budget; everything must run inside render() instead.
        env = _Sandbox(trim_blocks=True, lstrip_blocks=True, autoescape=False, optimized=False,
                       extensions=["jinja2.ext.loopcontrols", _GenerationTag])
        self._env = env
        env.filters["tojson"] = _tojson
        for name in ("center", "indent", "format", "replace", "batch", "slice", "wordwrap", "truncate"):
            env.filters[name] = _guard_filter(env, name, env.filters[name])
        env.globals.update({
            "raise_exception": _raise_exception,
            "strftime_now": _strftime_now,
            "range": self._range,
            _ITER_GUARD: self._iter,
            _CONCAT_GUARD: self._concat,
        })
        try:
            self._template = env.from_string(_GuardLoopsAndConcats().visit(env.parse(source)))
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template syntax error (line {e.lineno}): {e.message}") from None
        except Exception as e:  # TemplateError, RecursionError on absurd nesting, ...
            raise ChatTemplateError(f"chat template does not compile: {type(e).__name__}: {e}") from None

    @classmethod
    def from_metadata(cls, meta: Mapping, tok) -> ChatTemplate | None:
        """The file's tokenizer.chat_template (None when it has none), with the vocabulary's BOS/EOS text."""
        source = meta.get("tokenizer.chat_template")
        if source is None:
            return None
        if isinstance(source, (bytes, bytearray)):  # _core passes non-UTF-8 strings as bytes
            source = bytes(source).decode("utf-8", errors="replace")
        if not isinstance(source, str):
            raise ChatTemplateError(f"tokenizer.chat_template must be str, got {type(source).__name__}")
        bos = tok.decode([tok.bos_id]) if tok.bos_id is not None else ""
        eos = tok.decode([tok.eos_id]) if tok.eos_id is not None else ""
        return cls(source, bos_token=bos, eos_token=eos)

    @classmethod
    def chatml(cls, bos_token: str = "", eos_token: str = "<|im_end|>") -> ChatTemplate:
        """ChatML (<|im_start|>role\\ncontent<|im_end|>), for files that carry no template."""
        return cls(CHATML_TEMPLATE, bos_token=bos_token, eos_token=eos_token)

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = True, **extra) -> str:
        msgs = _check_messages(messages)
        context = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        context.update(extra)
        context["messages"] = msgs
        context["add_generation_prompt"] = bool(add_generation_prompt)
        budget = _Budget(self.max_ops, self.max_output_chars)
        local = self._env._local
        outer = getattr(local, "budget", None)
        local.budget = budget
        try:
            out, size = [], 0
            for chunk in self._template.generate(context):
                size += len(chunk)
                if size > self.max_output_chars:
                    raise _BudgetExceeded(f"chat template output exceeds {self.max_output_chars} characters")
                out.append(chunk)
            return "".join(out)
        except _Raised as e:
            raise ChatTemplateError(f"chat template raised an exception: {e}") from None
        except _BudgetExceeded as e:
            raise ChatTemplateError(str(e)) from None
        except jinja2.sandbox.SecurityError as e:
            raise ChatTemplateError(f"chat template did something unsafe: {e}") from None
        except RecursionError:
            raise ChatTemplateError("chat template recursed too deeply") from None
        except MemoryError:
            raise ChatTemplateError("chat template ran out of memory") from None
        except Exception as e:  # anything else the template's own code raised
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
        finally:
            local.budget = outer

    # ---- guarded globals ----

    def _range(self, *args):
        r = range(*args)
        if len(r) > MAX_RANGE:
            raise _BudgetExceeded(f"chat template asked for range() of {len(r)} items (limit {MAX_RANGE})")
        return r

    def _iter(self, iterable):
        budget = self._env.budget
        if budget is None:
            yield from iterable
            return
        for item in iterable:
            budget.tick()
            yield item

    def _concat(self, *parts) -> str:
        s = "".join(map(str, parts))
        budget = self._env.budget
        if budget is not None:
            budget.tick()
            budget.check_len(len(s))
        return s


def _check_messages(messages) -> list[dict]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of {{role, content}} dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise ChatTemplateError(f"messages[{i}] has no {key!r}")
            if not isinstance(m[key], str):
                raise ChatTemplateError(f"messages[{i}].{key} must be str, got {type(m[key]).__name__}")
        out.append(dict(m))
    return out


def _raise_exception(message="chat template raised an exception"):
    raise _Raised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value, indent=None, separators=None, sort_keys=False, ensure_ascii=False):
    """JSON without HTML escaping and keeping non-ASCII text (transformers' tojson)."""
    try:
        return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys,
                          ensure_ascii=ensure_ascii)
    except (TypeError, ValueError) as e:
        raise ChatTemplateError(f"tojson: {e}") from None


def _guard_filter(env: _Sandbox, name: str, fn):
    """Wrap a built-in filter whose arguments can ask for an outsized result. The wrapper takes the
    context, which also stops Jinja from running it at compile time on constant arguments (Jinja
    folds constant output while compiling, outside any budget)."""
    wants = getattr(getattr(fn, "jinja_pass_arg", None), "name", None)  # context / eval_context / environment

    @jinja2.pass_context
    def guarded(context, value, *params, **kwargs):
        b = env.budget
        if b is not None:
            b.tick()
            args = [*params, *kwargs.values()]
            if name in ("center", "batch", "slice", "indent"):
                for p in args:
                    if isinstance(p, int) and not isinstance(p, bool):
                        b.check_len(p)
                    elif isinstance(p, str) and name == "indent":
                        b.check_len(len(p) * (str(value).count("\n") + 1) + len(str(value)))
            elif name == "format" and isinstance(value, str):
                _check_format_widths(value, "%")
            elif name == "replace" and len(args) >= 2:
                _check_replace(b, str(value), str(args[0]), str(args[1]))
        first = {"context": (context,), "eval_context": (context.eval_ctx,),
                 "environment": (context.environment,)}.get(wants, ())
        result = fn(*first, value, *params, **kwargs)
        if b is not None and isinstance(result, str):
            b.check_len(len(result))
        return result

    return guarded


def check_message_contents(messages: list[dict], tokenizer) -> None:
    """Refuse message contents that spell out one of the model's control tokens.

    A chat prompt is rendered to text and tokenized with control tokens parsed (the template's own
    `<|im_start|>`/`<|im_end|>` must become single tokens), so a content holding that text would
    forge a turn boundary or a system message: prompt injection across roles, which matters when
    an application passes its end users' text through. Raises ChatTemplateError (a ValueError)
    naming the message and the token.
    """
    specials = sorted({tokenizer.token_text(i) for i in tokenizer.special_ids} - {""}, key=len, reverse=True)
    for i, m in enumerate(messages):
        content = m.get("content")
        if not isinstance(content, str) or "<" not in content and "[" not in content:
            continue
        for s in specials:
            if s in content:
                raise ChatTemplateError(
                    f"messages[{i}].content contains the control token {s!r}, which would forge a chat turn")
