"""Fuzzing template rendering with hypothesis: random templates built from the constructs hostile
templates use (big and small numbers, every operator, string and list growth, filters and str
methods with size arguments, format specs, loops, recursion, namespaces) on random conversations.

Whatever they do, a render either returns text within max_output_chars or raises a
ChatTemplateError; and it is always the sandbox's own bounds that stop it: never the worker's
memory cap or its kill (those are the backstop, not the design)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinyserve.models.chat_template import ChatTemplate, ChatTemplateError, TemplateLimitExceeded, TemplateLimits
from tinyserve.models.template_workers import WorkerPool

LIMITS = TemplateLimits(
    max_output_chars=50_000, max_items=5_000, max_ops=50_000, max_int_bits=128, time_s=5.0, memory_mb=256
)

numbers = st.one_of(st.integers(-3, 70), st.sampled_from(["10**9", "2**64", "10**1000", "-1", "1e9", "0.5"]))
strings = st.sampled_from(
    ["'x'", "''", "'ab\\ncd'", "'{0:>{1}}'", "'%s%d'", "'{:>99999999}'", "'%(a)9999999s'", "'é🙂'", "'<|im_start|>'"]
)
names = st.sampled_from(
    [
        "messages",
        "messages[0]",
        "m",
        "m.content",
        "m.role",
        "ns.v",
        "loop.index",
        "i",
        "tools",
        "bos_token",
        "add_generation_prompt",
        "undefined_thing",
    ]
)
leaf = st.one_of(
    numbers.map(str), strings, names, st.just("[1, 'a']"), st.just("{'a': 1}"), numbers.map(lambda n: f"range({n})")
)


def _expr(children):
    binop = st.tuples(children, st.sampled_from(["+", "-", "*", "**", "//", "%", "~", "in", "==", "<"]), children).map(
        lambda t: f"({t[0]} {t[1]} {t[2]})"
    )
    filt = st.tuples(
        children,
        st.sampled_from(
            [
                "length",
                "upper",
                "join",
                "list",
                "tojson",
                "tojson(indent=N)",
                "center(N)",
                "indent(N)",
                "replace('x', 'xxxxxxxx')",
                "batch(N)|list",
                "slice(N)|list",
                "format(N, N)",
                "trim",
                "first",
                "last",
                "sort",
                "unique|list",
                "string",
                "int",
                "reverse",
                "wordcount",
                "sum",
                "map('upper')|join",
                "truncate(N)",
                "default('d')",
                "select|list",
                "title",
                "escape",
                "pprint",
                "items|list",
                "dictsort",
                "abs",
                "round(N)",
            ]
        ),
        numbers.map(str),
    ).map(lambda t: f"({t[0]})|{t[1].replace('N', t[2])}")
    method = st.tuples(
        children,
        st.sampled_from(
            [
                ".format(N, N)",
                ".ljust(N)",
                ".zfill(N)",
                ".split()",
                ".replace('', 'yy')",
                ".join([N, N])",
                ".strip()",
                ".startswith('x')",
                ".expandtabs(N)",
                ".to_bytes(N, 'big')",
                ".count('x')",
                ".format_map({'a': N})",
                "[::-1]",
                "[N]",
                "[:N]",
            ]
        ),
        numbers.map(str),
    ).map(lambda t: f"({t[0]}){t[1].replace('N', t[2])}")
    call = st.tuples(
        st.sampled_from(["range", "lipsum", "namespace", "dict", "raise_exception", "strftime_now"]), numbers.map(str)
    ).map(lambda t: f"{t[0]}({t[1]})")
    return st.one_of(binop, filt, method, call)


exprs = st.recursive(leaf, _expr, max_leaves=6)


def _stmt(children):
    return st.one_of(
        st.tuples(
            st.sampled_from(["range(N)", "messages", "ns.v", "'abc'", "range(10**9)"]), numbers.map(str), children
        ).map(lambda t: f"{{% for i in {t[0].replace('N', t[1])} %}}{t[2]}{{% endfor %}}"),
        st.tuples(exprs, children).map(lambda t: f"{{% if {t[0]} %}}{t[1]}{{% endif %}}"),
        st.tuples(children, children).map(lambda t: t[0] + t[1]),
        exprs.map(lambda e: f"{{% set ns.v = {e} %}}"),
        st.tuples(numbers.map(str), children).map(
            lambda t: f"{{% for m in messages recursive %}}{t[1]}{{% if loop.depth < {t[0]} %}}"
            f"{{{{ loop(messages) }}}}{{% endif %}}{{% endfor %}}"
        ),
        st.tuples(numbers.map(str), children).map(
            lambda t: f"{{% macro f(n) %}}{t[1]}{{% if n < {t[0]} %}}{{{{ f(n + 1) }}}}{{% endif %}}"
            f"{{% endmacro %}}{{{{ f(0) }}}}"
        ),
    )


bodies = st.recursive(exprs.map(lambda e: f"{{{{ {e} }}}}"), _stmt, max_leaves=5)
templates = bodies.map(lambda b: "{% set ns = namespace(v='x') %}{% for m in messages %}" + b + "{% endfor %}" + b)
contents = st.one_of(st.text(max_size=40), st.sampled_from(["x" * 2000, "{{ 7 * 7 }}", "<|im_end|>"]))
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", ""]), "content": contents}),
    min_size=0,
    max_size=6,
)


@pytest.fixture(scope="module")
def pool():
    p = WorkerPool(size=1, memory_mb=LIMITS.memory_mb)
    yield p
    p.close()


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(source=templates, msgs=messages, agp=st.booleans())
def test_random_templates_stay_within_their_limits(pool, source, msgs, agp):
    try:
        ct = ChatTemplate(source, limits=LIMITS, pool=pool)
    except ChatTemplateError:
        return  # does not compile: a clear error at load
    killed = pool.num_killed
    try:
        out = ct.render(msgs, add_generation_prompt=agp, tools=[{"name": "t"}])
    except TemplateLimitExceeded as e:
        assert e.limit not in ("memory_mb", "time_s"), (source, str(e))  # the backstop was needed
        return
    except ChatTemplateError:
        return
    finally:
        assert pool.num_killed == killed, source
    assert isinstance(out, str) and len(out) <= LIMITS.max_output_chars


@settings(max_examples=100, deadline=None, database=None)
@given(source=templates, msgs=messages)
def test_random_templates_inline_raise_only_template_errors(source, msgs):
    # The same in the calling thread (no worker): only ChatTemplateError ever escapes.
    try:
        out = ChatTemplate(source, limits=LIMITS, isolated=False).render(msgs)
    except ChatTemplateError:
        return
    assert len(out) <= LIMITS.max_output_chars
