"""The bounded Jinja sandbox that chat templates run in (in a worker process, see template_workers.py).

A template comes from a model file, which is untrusted input. It runs in Jinja's immutable sandbox
(no `__class__` and friends, no mutating the messages), and every operation it can perform is
charged to a per-render budget (TemplateLimits) BEFORE it allocates or computes its result:

- integers: the result of `+ - * // % **` on integers may not exceed max_int_bits
  (`((10**1000)**1000)**1000` and `n = n * n` in a loop stop at once, never build a huge number);
- strings and lists: any one string the template builds is at most max_output_chars characters,
  any one list/tuple/range at most max_items items; `*`, `+`, `~`, join, str methods (center, ljust,
  zfill, expandtabs, replace, ...), int.to_bytes, every filter, `str.format` (widths/precisions
  resolved from nested fields too) and %-formats are checked before they run; printing a value
  or converting it to a string is sized first; tojson streams and stops at the limit, its indent
  is at most MAX_INDENT; lipsum is capped;
- work: every lookup, call, operator, comparison and loop iteration costs 1 from max_ops, and an
  operation over n characters or items costs another n // 64 (so quadratic string building
  runs out of budget, not of time);
- recursion: Python's recursion limit (RecursionError);
- output: at most max_output_chars characters in all;
- time: the render checks its clock every 256 operations (time_s, and the request's deadline).

A template that breaks any of these raises TemplateLimitExceeded naming the limit; one that
calls raise_exception() raises TemplateRefused; anything else it does wrong is TemplateFault.
This module has no process machinery: template_workers.py runs it where a runaway cannot hold
the server's GIL, and kills it if a C-level operation ever outlasts the time limit.

The context is the one Hugging Face templates expect: messages, add_generation_prompt, bos_token,
eos_token, raise_exception(), strftime_now(), the loopcontrols extension, a tojson filter that
keeps non-ASCII text as is, the {% generation %} tag, and the caller's extra variables.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import operator
import re
import threading
import time
import types
from collections.abc import Iterable, Iterator, KeysView, Mapping, Sequence, ValuesView
from dataclasses import dataclass
from typing import Any, cast

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
from jinja2.utils import Namespace, generate_lorem_ipsum
from jinja2.visitor import NodeTransformer
from markupsafe import EscapeFormatter, Markup

__all__ = [
    "ChatTemplateError",
    "TemplateRefused",
    "TemplateFault",
    "TemplateLimitExceeded",
    "TemplateDeadlineExceeded",
    "TemplateUnavailable",
    "TemplateLimits",
    "SandboxedTemplate",
    "check_messages",
    "MAX_SOURCE_CHARS",
]

MAX_SOURCE_CHARS = 256 << 10  # a template's own length (real ones are 0.3-20 KB)
MAX_WIDTH = 100_000  # widths and precisions in str.format / %-format specs
MAX_INDENT = 64  # tojson(indent=...) and indent(width) as a string
MAX_LIPSUM_WORDS = 10_000  # lipsum(n, min, max): n * max words at most
_CLOCK_EVERY = 256  # operations between two looks at the clock
_WORK_UNIT = 64  # characters/items that cost one more operation


# ---- errors ---------------------------------------------------------------------------------
class ChatTemplateError(ValueError):
    """The chat template is invalid, failed while rendering, exceeded a limit, or refused the messages."""


class TemplateRefused(ChatTemplateError):
    """The conversation is not acceptable: the template called raise_exception(), or the messages
    are malformed. The caller's fault (INVALID_ARGUMENT)."""


class TemplateFault(ChatTemplateError):
    """The template itself failed (an error in its code, a crashed or killed worker). The server's
    fault: it accepted the template. `limit` names the limit broken, if any."""

    limit: str | None = None


class TemplateLimitExceeded(TemplateFault):
    """The render broke one of TemplateLimits (named by `limit`, e.g. "max_ops", "time_s")."""

    def __init__(self, limit: str, message: str):
        super().__init__(message if limit in message else f"{message} ({limit})")
        self.limit = limit


class TemplateDeadlineExceeded(ChatTemplateError):
    """The request's own deadline passed while its template rendered."""


class TemplateUnavailable(TemplateFault):
    """No template worker could be had (none started, or none free before the deadline)."""


# ---- limits ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TemplateLimits:
    """What one render may use. The defaults leave real templates ~100x headroom on a 1 MB chat."""

    max_output_chars: int = 4 << 20  # the rendered prompt, and any one string built on the way
    max_items: int = 100_000  # any one list, tuple, dict or range the template builds
    max_ops: int = 2_000_000  # lookups + calls + operators + iterations (+ size // 64)
    max_int_bits: int = 256  # any integer an operator computes
    time_s: float = 5.0  # wall time of one render (the worker is killed past it)
    memory_mb: int = 512  # address space of a worker process (RLIMIT_AS)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"TemplateLimits.{f.name} must be > 0, got {v!r}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- the per-render budget ------------------------------------------------------------------
class _Budget:
    def __init__(self, limits: TemplateLimits, time_s: float, deadline_is_request: bool):
        self.limits = limits
        self.ops_left = limits.max_ops
        self.time_s = time_s
        self.t_end = time.monotonic() + time_s
        self.deadline_is_request = deadline_is_request
        self._clock = _CLOCK_EVERY

    def tick(self, n: int = 1) -> None:
        self.ops_left -= n
        if self.ops_left < 0:
            raise TemplateLimitExceeded(
                "max_ops", f"chat template ran for more than {self.limits.max_ops} operations (max_ops)"
            )
        self._clock -= n
        if self._clock <= 0:
            self._clock = _CLOCK_EVERY
            if time.monotonic() > self.t_end:
                if self.deadline_is_request:
                    raise TemplateDeadlineExceeded("the request's deadline passed while its chat template rendered")
                raise TemplateLimitExceeded("time_s", f"chat template ran for more than {self.time_s:g} s (time_s)")

    def work(self, n: int) -> None:
        """An operation over n characters or items."""
        self.tick(1 + n // _WORK_UNIT)

    def check_chars(self, n: int, what: str = "a string") -> None:
        if n > self.limits.max_output_chars:
            raise TemplateLimitExceeded(
                "max_output_chars",
                f"chat template built {what} of {n} characters (max_output_chars {self.limits.max_output_chars})",
            )

    def check_items(self, n: int, what: str = "a list") -> None:
        if n > self.limits.max_items:
            raise TemplateLimitExceeded(
                "max_items", f"chat template built {what} of {n} items (max_items {self.limits.max_items})"
            )

    def check_int_bits(self, bits: int) -> None:
        if bits > self.limits.max_int_bits:
            raise TemplateLimitExceeded(
                "max_int_bits",
                f"chat template computed an integer of about {bits} bits (max_int_bits {self.limits.max_int_bits})",
            )

    def check_result(self, value) -> None:
        """Size limits on something just built, and its cost."""
        if isinstance(value, (str, bytes, bytearray)):
            self.check_chars(len(value))
            self.work(len(value))
        elif isinstance(value, (list, tuple, dict, set, frozenset, range)):
            self.check_items(len(value))
            self.work(len(value))
        elif isinstance(value, int) and not isinstance(value, bool):
            self.check_int_bits(value.bit_length())

    def check_text_size(self, value, what: str = "a string") -> None:
        """Refuse to turn `value` into text (print, str(), join, format) if the text would be too long."""
        self.check_chars(_text_size(value, self.limits.max_output_chars + 1, self), what)


def _text_size(value, limit: int, budget: _Budget, depth: int = 0) -> int:
    """An upper-bound estimate of len(str(value)), exact enough for the limit check; stops counting
    once past `limit`. Each visited item costs one operation."""
    if isinstance(value, str):
        return len(value) + 2
    if isinstance(value, (bool, float, type(None))):
        return 32
    if isinstance(value, int):
        return value.bit_length() // 3 + 2
    if isinstance(value, (bytes, bytearray)):
        return 4 * len(value) + 3
    if depth > 64:
        return limit  # absurdly nested: treat as too big rather than recurse on
    if isinstance(value, Namespace):
        value = object.__getattribute__(value, "_Namespace__attrs")
    items: Iterable[Any]
    if isinstance(value, Mapping):
        items = [x for kv in value.items() for x in kv]
    elif isinstance(value, (list, tuple, set, frozenset, KeysView, ValuesView)):  # ItemsView is a Set of tuples
        items = value
    elif isinstance(value, range):
        return len(value) * (max(abs(value.start), abs(value.stop)).bit_length() // 3 + 4)
    else:
        return 64  # other objects (Undefined, namespace, loop, macros) print a short text
    total = 2
    for item in items:
        budget.tick()
        total += _text_size(item, limit - total, budget, depth + 1) + 2
        if total > limit:
            return total
    return total


# ---- integer and format guards --------------------------------------------------------------
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int_result_bits(op: str, a: int, b: int) -> int:
    """An upper bound on the bit length of `a op b` for integers, without computing it."""
    la, lb = a.bit_length(), b.bit_length()
    if op in ("+", "-"):
        return max(la, lb) + 1
    if op == "*":
        return la + lb
    if op == "**":
        if b < 0 or abs(a) <= 1:
            return 1  # a float, or 0 / 1 / -1
        if b > 1 << 32:
            return b
        return int(b * math.log2(abs(a))) + 1
    return la  # // and %


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")


def _check_percent_format(fmt: str) -> None:
    """Refuse %-formats with huge or `*` (taken from the data) widths and precisions."""
    for width, precision in _PERCENT_SPEC.findall(fmt):
        for p in (width, precision):
            if p == "*" or (p and int(p) > MAX_WIDTH):
                raise TemplateLimitExceeded(
                    "max_width", f"chat template used a %-format width/precision {p!r} (limit {MAX_WIDTH})"
                )


def _check_format_spec(spec: str) -> None:
    for p in _DIGITS.findall(spec):
        if len(p) > 6 or int(p) > MAX_WIDTH:
            raise TemplateLimitExceeded(
                "max_width", f"chat template used a format width/precision {p!r} (limit {MAX_WIDTH})"
            )


class _BoundedFormatter(SandboxedFormatter):
    """str.format in the sandbox, with every field's spec (after nested fields are filled in)
    and every field's text checked before it is formatted."""

    def __init__(self, env, budget_of):
        super().__init__(env)
        self._budget_of = budget_of

    def format_field(self, value, format_spec):
        b = self._budget_of()
        if b is not None:
            b.tick()
            _check_format_spec(format_spec)
            b.check_text_size(value, "a formatted field")
        return super().format_field(value, format_spec)


class _BoundedEscapeFormatter(_BoundedFormatter, EscapeFormatter):
    def __init__(self, env, budget_of, escape):
        EscapeFormatter.__init__(self, escape)
        self._env = env
        self._budget_of = budget_of


# ---- the sandbox ----------------------------------------------------------------------------
_SEQUENCE_TYPES = (str, bytes, bytearray, list, tuple)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with every lookup, call and operator charged to the render's budget
    and checked for outsized results before they are built."""

    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def __init__(self, **kw):
        super().__init__(**kw)
        self._local = threading.local()  # the budget of the render running in this thread

    @property
    def budget(self) -> _Budget | None:
        return getattr(self._local, "budget", None)

    @budget.setter
    def budget(self, b: _Budget | None) -> None:
        self._local.budget = b

    def _tick(self) -> _Budget | None:
        b = self.budget
        if b is not None:
            b.tick()
        return b

    def getattr(self, obj, attribute):
        self._tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        b = self._tick()
        result = super().getitem(obj, argument)
        if b is not None and isinstance(argument, slice):
            b.check_result(result)
        return result

    def unsafe_undefined(self, obj, attribute):
        # Jinja would return an Undefined that only fails when used; fail at once instead.
        raise jinja2.sandbox.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def wrap_str_format(self, value):
        if (
            not isinstance(value, (types.MethodType, types.BuiltinMethodType))
            or value.__name__ not in ("format", "format_map")
            or not isinstance(value.__self__, str)
        ):
            return None
        fmt = value.__self__
        budget_of = lambda: self.budget  # noqa: E731
        formatter = (
            _BoundedEscapeFormatter(self, budget_of, fmt.escape)
            if isinstance(fmt, Markup)
            else _BoundedFormatter(self, budget_of)
        )
        is_map = value.__name__ == "format_map"

        def wrapper(*args, **kwargs):
            if is_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one positional argument")
                args, kwargs = (), args[0]
            out = type(fmt)(formatter.vformat(fmt, args, kwargs))
            b = self.budget
            if b is not None:
                b.check_result(out)
            return out

        return wrapper

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature style)
        b = __self._tick()
        if b is not None:
            _precheck_call(b, __obj, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        if b is not None:
            b.check_result(result)
        return result

    def call_binop(self, context, operator_, left, right):
        b = self._tick()
        if b is not None:
            _precheck_binop(b, operator_, left, right)
        result = super().call_binop(context, operator_, left, right)
        if b is not None:
            b.check_result(result)
        return result


def _precheck_binop(b: _Budget, op: str, left, right) -> None:
    if _is_int(left) and _is_int(right):
        b.check_int_bits(_int_result_bits(op, left, right))
    elif op == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, _SEQUENCE_TYPES) and _is_int(n):
                size = len(seq) * max(n, 0)
                if isinstance(seq, (str, bytes, bytearray)):
                    b.check_chars(size)
                else:
                    b.check_items(size)
    elif op == "+":
        if isinstance(left, _SEQUENCE_TYPES) and isinstance(right, _SEQUENCE_TYPES):
            size = len(left) + len(right)
            if isinstance(left, (str, bytes, bytearray)):
                b.check_chars(size)
            else:
                b.check_items(size)
    elif op == "%" and isinstance(left, str):
        _check_percent_format(left)
        b.check_text_size(right, "a %-format argument")


def _precheck_call(b: _Budget, obj, args, kwargs) -> None:
    """Refuse str/bytes/int method calls whose result would be outsized, before they allocate it."""
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "")
    ints = [a for a in (*args, *kwargs.values()) if _is_int(a)]
    if isinstance(owner, (str, bytes, bytearray)):
        b.work(len(owner))
        if name in ("center", "ljust", "rjust", "zfill"):
            for n in ints:
                b.check_chars(n)
        elif name == "expandtabs":
            for n in ints:
                b.check_chars(len(owner) * max(n, 1))
        elif (
            name == "replace"
            and len(args) >= 2
            and isinstance(args[0], type(owner))
            and isinstance(args[1], type(owner))
        ):
            _check_replace(b, owner, args[0], args[1])
        elif name == "join" and args:
            b.check_text_size(args[0], "a joined string")
            if isinstance(args[0], Sequence):
                b.check_chars(len(owner) * max(len(args[0]) - 1, 0))
        elif name in ("split", "rsplit", "splitlines") and len(owner) > b.limits.max_items:
            sep = args[0] if args and isinstance(args[0], type(owner)) and args[0] else None
            text: Any = owner  # str, bytes or bytearray; sep is of the same type
            seps = (
                text.count(sep)
                if sep is not None
                else sum(text.count(c) for c in (" \t\n\r\x0b\x0c" if isinstance(owner, str) else b" \t\n\r\x0b\x0c"))
            )
            b.check_items(seps + 1, "a split list")
    elif _is_int(owner) and name == "to_bytes":
        for n in ints:
            b.check_chars(n)
    elif isinstance(owner, (list, tuple, dict)):
        b.work(len(owner))


def _check_replace(b: _Budget, s, old, new) -> None:
    if len(new) > len(old):
        count = len(s) + 1 if not old else s.count(old)
        b.check_chars(len(s) + count * (len(new) - len(old)))


_COMPARE = {
    "eq": operator.eq,
    "ne": operator.ne,
    "gt": operator.gt,
    "gteq": operator.ge,
    "lt": operator.lt,
    "lteq": operator.le,
    "in": lambda a, b: a in b,
    "notin": lambda a, b: a not in b,
}


def _size(x) -> int:
    return len(x) if isinstance(x, (str, bytes, bytearray, list, tuple, dict, set, frozenset)) else 0


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


_ITER_GUARD = "__tinyserve_iter"
_CONCAT_GUARD = "__tinyserve_concat"
_COMPARE_GUARD = "__tinyserve_compare"


class _GuardNodes(NodeTransformer):
    """Route what Jinja runs without the sandbox's hooks through guards: every for-loop's iterable
    (one operation per iteration), every `~` concatenation (sized first) and every comparison
    (`in` and `==` cost their size)."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = cast(nodes.For, self.generic_visit(node))
        node.iter = nodes.Call(nodes.Name(_ITER_GUARD, "load"), [node.iter], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        node = cast(nodes.Concat, self.generic_visit(node))
        return nodes.Call(nodes.Name(_CONCAT_GUARD, "load"), list(node.nodes), [], None, None, lineno=node.lineno)

    def visit_Compare(self, node: nodes.Compare) -> nodes.Call:
        node = cast(nodes.Compare, self.generic_visit(node))
        args = [node.expr]
        for operand in node.ops:
            args += [nodes.Const(operand.op), operand.expr]
        return nodes.Call(nodes.Name(_COMPARE_GUARD, "load"), args, [], None, None, lineno=node.lineno)


# Filters whose result size their arguments decide; every other filter's result is checked after.
_SIZED_ARG_FILTERS = ("center", "indent", "batch", "slice")


class SandboxedTemplate:
    """One compiled chat template in the bounded sandbox. Thread-safe: each render has its own budget."""

    def __init__(
        self, source: str, bos_token: str = "", eos_token: str = "", limits: TemplateLimits = TemplateLimits()
    ):
        if not isinstance(source, str):
            raise TemplateFault(f"chat template must be str, got {type(source).__name__}")
        if len(source) > MAX_SOURCE_CHARS:
            raise TemplateLimitExceeded(
                "max_source_chars", f"chat template is {len(source)} characters long (limit {MAX_SOURCE_CHARS})"
            )
        self.source, self.bos_token, self.eos_token, self.limits = source, bos_token, eos_token, limits
        # optimized=False: Jinja's optimizer would evaluate constant expressions (filters included)
        # while compiling, outside the budget; everything must run inside render() instead.
        env = _Sandbox(
            trim_blocks=True,
            lstrip_blocks=True,
            autoescape=False,
            optimized=False,
            extensions=["jinja2.ext.loopcontrols", _GenerationTag],
            finalize=self._finalize,
        )
        self._env = env
        for name, fn in list(env.filters.items()):
            env.filters[name] = _guard_filter(env, name, fn)
        env.filters["tojson"] = _guard_filter(env, "tojson", self._tojson)
        env.globals.update(
            {
                "raise_exception": _raise_exception,
                "strftime_now": _strftime_now,
                "range": self._range,
                "lipsum": self._lipsum,
                _ITER_GUARD: self._iter,
                _CONCAT_GUARD: self._concat,
                _COMPARE_GUARD: self._compare,
            }
        )
        try:
            self._template = env.from_string(_GuardNodes().visit(env.parse(source)))
        except jinja2.TemplateSyntaxError as e:
            raise TemplateFault(f"chat template syntax error (line {e.lineno}): {e.message}") from None
        except (RecursionError, MemoryError):
            raise TemplateFault("chat template is nested too deeply to compile") from None
        except Exception as e:  # TemplateError, SyntaxError from Python's compiler, ...
            raise TemplateFault(f"chat template does not compile: {type(e).__name__}: {e}") from None

    @property
    def variables(self) -> set[str]:
        """The context variables the template reads (e.g. {"messages", "tools", ...})."""
        from jinja2 import meta

        return set(meta.find_undeclared_variables(self._env.parse(self.source)))

    def render(
        self,
        messages,
        add_generation_prompt: bool = True,
        extra: Mapping | None = None,
        *,
        time_s: float | None = None,
        deadline_is_request: bool = False,
    ) -> str:
        """The rendered prompt. time_s (default limits.time_s) bounds this render's wall time; with
        deadline_is_request, running past it is the request's deadline, not the template's limit."""
        msgs = check_messages(messages)
        context: dict[str, Any] = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        context.update(extra or {})
        context["messages"] = msgs
        context["add_generation_prompt"] = bool(add_generation_prompt)
        limit_s = self.limits.time_s if time_s is None else min(time_s, self.limits.time_s)
        budget = _Budget(self.limits, limit_s, deadline_is_request and limit_s < self.limits.time_s)
        outer = self._env.budget
        self._env.budget = budget
        try:
            out, size = [], 0
            for chunk in self._template.generate(context):
                size += len(chunk)
                if size > self.limits.max_output_chars:
                    raise TemplateLimitExceeded(
                        "max_output_chars",
                        f"chat template output exceeds {self.limits.max_output_chars} characters (max_output_chars)",
                    )
                out.append(chunk)
            return "".join(out)
        except ChatTemplateError:
            raise
        except _Raised as e:
            raise TemplateRefused(f"chat template raised an exception: {e}") from None
        except jinja2.sandbox.SecurityError as e:
            raise TemplateFault(f"chat template did something unsafe: {e}") from None
        except RecursionError:
            raise TemplateLimitExceeded("recursion", "chat template recursed too deeply (recursion)") from None
        except MemoryError:
            raise TemplateLimitExceeded("memory_mb", "chat template ran out of memory (memory_mb)") from None
        except Exception as e:  # anything else the template's own code raised
            raise TemplateFault(f"chat template failed: {type(e).__name__}: {e}") from None
        finally:
            self._env.budget = outer

    # ---- guarded globals and hooks ----

    def _finalize(self, value):
        b = self._env.budget
        if b is not None and not isinstance(value, str):
            b.check_text_size(value, "a printed value")
        return value

    def _range(self, *args):
        r = range(*args)
        b = self._env.budget
        if b is not None:
            b.check_items(len(r), "a range")
        return r

    def _lipsum(self, n=5, html=True, min=20, max=100):  # noqa: A002 (jinja's own parameter names)
        if not all(_is_int(x) for x in (n, min, max)) or n * max > MAX_LIPSUM_WORDS:
            raise TemplateLimitExceeded(
                "lipsum", f"chat template asked for lipsum({n!r}, max={max!r}) (at most {MAX_LIPSUM_WORDS} words)"
            )
        return generate_lorem_ipsum(n, html, min, max)

    def _iter(self, iterable):
        budget = self._env.budget
        if budget is None:
            yield from iterable
            return
        for item in iterable:
            budget.tick()
            yield item

    def _concat(self, *parts) -> str:
        budget = self._env.budget
        if budget is not None:
            total = 0
            for p in parts:
                total += _text_size(p, budget.limits.max_output_chars + 1, budget)
                budget.check_chars(total)
        s = "".join(map(str, parts))
        if budget is not None:
            budget.check_result(s)
        return s

    def _compare(self, left, *ops):
        budget = self._env.budget
        for i in range(0, len(ops), 2):
            op, right = ops[i], ops[i + 1]
            if budget is not None:
                budget.work(min(_size(left), _size(right)) if op not in ("in", "notin") else _size(right))
            if not _COMPARE[op](left, right):
                return False
            left = right
        return True

    def _tojson(self, value, indent=None, separators=None, sort_keys=False, ensure_ascii=False):
        """transformers' tojson (no HTML escaping, non-ASCII kept), streamed against the limit."""
        b = self._env.budget
        if indent is not None and not (
            _is_int(indent) and 0 <= indent <= MAX_INDENT or isinstance(indent, str) and len(indent) <= MAX_INDENT
        ):
            raise TemplateLimitExceeded("max_indent", f"tojson indent {indent!r} (at most {MAX_INDENT})")
        try:
            enc = json.JSONEncoder(
                indent=indent, separators=separators, sort_keys=bool(sort_keys), ensure_ascii=bool(ensure_ascii)
            )
            out, size = [], 0
            for chunk in enc.iterencode(value):
                size += len(chunk)
                if b is not None:
                    b.check_chars(size, "a tojson text")
                    b.work(len(chunk))
                out.append(chunk)
            return "".join(out)
        except ChatTemplateError:
            raise
        except RecursionError:
            raise TemplateLimitExceeded("recursion", "tojson: value nested too deeply (recursion)") from None
        except (TypeError, ValueError) as e:
            raise TemplateFault(f"tojson: {e}") from None


def _guard_filter(env: _Sandbox, name: str, fn):
    """Wrap a filter: it costs one operation plus its input's size, arguments that decide the
    result's size are checked first, and the result is checked after. The wrapper takes the
    context, which also stops Jinja from running it at compile time on constant arguments."""
    wants = getattr(getattr(fn, "jinja_pass_arg", None), "name", None)  # context / eval_context / environment

    @jinja2.pass_context
    def guarded(context, value, *params, **kwargs):
        b = env.budget
        if b is not None:
            b.work(_size(value))
            args = [*params, *kwargs.values()]
            if name in _SIZED_ARG_FILTERS:
                for p in args:
                    if _is_int(p):
                        b.check_items(p) if name in ("batch", "slice") else b.check_chars(p)
                    elif isinstance(p, str) and name == "indent":
                        if len(p) > MAX_INDENT:
                            raise TemplateLimitExceeded(
                                "max_indent", f"indent string of {len(p)} characters (at most {MAX_INDENT})"
                            )
                        b.check_chars(len(p) * (str(value).count("\n") + 1) + len(str(value)))
            elif name == "format" and isinstance(value, str):
                _check_percent_format(value)
                b.check_text_size(args, "a format argument")
            elif name == "replace" and len(args) >= 2:
                _check_replace(b, str(value), str(args[0]), str(args[1]))
            elif name in ("join", "string", "pprint", "safe", "escape", "e", "forceescape", "urlize"):
                b.check_text_size(value, f"a |{name} text")
            elif name == "list" and isinstance(value, str):
                b.check_items(len(value))
        first = {"context": (context,), "eval_context": (context.eval_ctx,), "environment": (context.environment,)}.get(
            wants, ()
        )
        result = fn(*first, value, *params, **kwargs)
        if b is not None:
            b.check_result(result)
            if isinstance(result, Iterator):  # map, select, batch, ...: lazy, so count as it runs
                result = _counted(b, result, f"|{name}")
        return result

    return guarded


def _counted(b: _Budget, items: Iterator, what: str):
    for n, item in enumerate(items, 1):
        b.tick()
        if n > b.limits.max_items:
            b.check_items(n, f"a {what} sequence")
        yield item


# ---- messages and globals -------------------------------------------------------------------
class _Raised(Exception):
    """raise_exception() called by the template."""


def _raise_exception(message="chat template raised an exception"):
    raise _Raised(str(message)[:1000])


def _strftime_now(fmt: str) -> str:
    if not isinstance(fmt, str) or len(fmt) > 256:
        raise TemplateFault("strftime_now takes a format string of at most 256 characters")
    return datetime.datetime.now().strftime(fmt)


def check_messages(messages) -> list[dict]:
    """The messages as a list of plain dicts, each with str role and content (else TemplateRefused)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TemplateRefused(f"messages must be a list of {{role, content}} dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TemplateRefused(f"messages[{i}] must be a dict, got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise TemplateRefused(f"messages[{i}] has no {key!r}")
            if not isinstance(m[key], str):
                raise TemplateRefused(f"messages[{i}].{key} must be str, got {type(m[key]).__name__}")
        out.append(dict(m))
    return out
