"""Structured output on the real default model: every output of a JSON Schema validates with the
independent `jsonschema` package, regex and choice outputs match exactly (Python's re), Lark
arithmetic parses as the same arithmetic with Python's own parser; constrained and free requests
share batches without changing each other's tokens; preemption, max_tokens and logprobs."""

from __future__ import annotations

import ast
import json
import math
import re

import numpy as np
import pytest

from tinyserve.engine import EngineConfig, FinishReason, LLMEngine, SamplingParams, StoppingParams
from tinyserve.engine.grammar import (
    MAX_CHOICE_BYTES,
    MAX_CHOICES,
    MAX_GRAMMAR_BYTES,
    GrammarCompiler,
    ResponseFormat,
    apply_mask,
    fill_masks,
)
from tinyserve.engine.params import ParamError

jsonschema = pytest.importorskip("jsonschema")

GREEDY = SamplingParams(temperature=0.0)
SEEDS = (11, 12, 13)

_person = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}

# (what to ask for, schema): nested objects, arrays with bounds, enums, required/optional,
# patterns and formats, number bounds, anyOf/oneOf, $ref/$defs, consts, booleans, nulls.
# Every string, number and key is bounded: a 135M model at temperature 1 otherwise writes digits
# (or characters) until max_tokens, which is valid JSON's prefix but not JSON. "multipleOf"
# bounds a number's decimals.
SCHEMAS = [
    ("a person", _person),
    ("a city", {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]}),
    ("a colour", {"enum": ["red", "green", "blue"]}),
    ("a number between 1 and 10", {"type": "integer", "minimum": 1, "maximum": 10}),
    ("a price", {"type": "number", "minimum": 0, "maximum": 1000, "multipleOf": 0.01}),
    ("a yes/no flag", {"type": "boolean"}),
    ("nothing", {"type": "null"}),
    ("three tags", {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 3, "maxItems": 3}),
    (
        "one to four scores",
        {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "minItems": 1, "maxItems": 4},
    ),
    (
        "a point",
        {
            "type": "object",
            "properties": {
                "x": {"type": "number", "multipleOf": 0.1, "minimum": -100, "maximum": 100},
                "y": {"type": "integer", "minimum": -100, "maximum": 100},
            },
            "required": ["x", "y"],
            "additionalProperties": False,
        },
    ),
    (
        "an address",
        {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 30},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "country": {"enum": ["FR", "DE", "US"]},
            },
            "required": ["street", "zip", "country"],
            "additionalProperties": False,
        },
    ),
    (
        "a user with an address",
        {
            "type": "object",
            "properties": {
                "user": _person,
                "address": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 20}},
                    "required": ["city"],
                    "additionalProperties": False,
                },
            },
            "required": ["user", "address"],
            "additionalProperties": False,
        },
    ),
    (
        "a team",
        {
            "type": "object",
            "properties": {
                "team": {"type": "string", "maxLength": 20},
                "members": {"type": "array", "items": _person, "minItems": 1, "maxItems": 2},
            },
            "required": ["team", "members"],
            "additionalProperties": False,
        },
    ),
    ("a date", {"type": "string", "format": "date"}),
    ("an email address", {"type": "string", "format": "email", "maxLength": 40}),
    ("a uuid", {"type": "string", "format": "uuid"}),
    ("an IPv4 address", {"type": "string", "format": "ipv4"}),
    (
        "a birthday",
        {
            "type": "object",
            "properties": {"born": {"type": "string", "format": "date"}},
            "required": ["born"],
            "additionalProperties": False,
        },
    ),
    ("a phone number", {"type": "string", "pattern": "^\\+[0-9]{2} [0-9]{3}-[0-9]{4}$"}),
    ("a product code", {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2,4}$"}),
    (
        "an id or a name",
        {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99999}, {"type": "string", "maxLength": 16}]},
    ),
    (
        "a shape",
        {
            "oneOf": [
                {
                    "type": "object",
                    "properties": {
                        "kind": {"const": "circle"},
                        "r": {"type": "number", "minimum": 0, "maximum": 100, "multipleOf": 0.5},
                    },
                    "required": ["kind", "r"],
                    "additionalProperties": False,
                },
                {
                    "type": "object",
                    "properties": {"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1}},
                    "required": ["kind", "side"],
                    "additionalProperties": False,
                },
            ]
        },
    ),
    (
        "a tree node",
        {
            "$defs": {
                "leaf": {
                    "type": "object",
                    "properties": {"value": {"type": "integer", "minimum": 0, "maximum": 999}},
                    "required": ["value"],
                    "additionalProperties": False,
                }
            },
            "type": "object",
            "properties": {"left": {"$ref": "#/$defs/leaf"}, "right": {"$ref": "#/$defs/leaf"}},
            "required": ["left", "right"],
            "additionalProperties": False,
        },
    ),
    (
        "a list of people",
        {"$defs": {"p": _person}, "type": "array", "items": {"$ref": "#/$defs/p"}, "minItems": 1, "maxItems": 2},
    ),
    (
        "optional fields",
        {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 20},
                "subtitle": {"type": "string", "maxLength": 20},
                "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
            },
            "required": ["title"],
            "additionalProperties": False,
        },
    ),
    (
        "a version",
        {
            "type": "object",
            "properties": {
                "major": {"type": "integer", "minimum": 0, "maximum": 99},
                "minor": {"type": "integer", "minimum": 0, "maximum": 99},
                "stable": {"type": "boolean"},
            },
            "required": ["major", "minor", "stable"],
            "additionalProperties": False,
        },
    ),
    (
        "a temperature",
        {
            "type": "object",
            "properties": {
                "value": {"type": "number", "minimum": -50, "maximum": 60, "multipleOf": 0.1},
                "unit": {"enum": ["C", "F"]},
            },
            "required": ["value", "unit"],
            "additionalProperties": False,
        },
    ),
    (
        "a matrix",
        {
            "type": "array",
            "items": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 9},
                "minItems": 2,
                "maxItems": 2,
            },
            "minItems": 2,
            "maxItems": 2,
        },
    ),
    (
        "a pair",
        {
            "type": "array",
            "prefixItems": [{"type": "string", "maxLength": 10}, {"type": "integer", "minimum": 0, "maximum": 999}],
            "items": False,
            "minItems": 2,
        },
    ),
    (
        "a status",
        {
            "type": "object",
            "properties": {"status": {"const": "ok"}, "code": {"type": "integer", "minimum": 100, "maximum": 599}},
            "required": ["status", "code"],
            "additionalProperties": False,
        },
    ),
    (
        "a nullable name",
        {
            "type": "object",
            "properties": {"name": {"type": ["string", "null"], "maxLength": 16}},
            "required": ["name"],
            "additionalProperties": False,
        },
    ),
    (
        "a rating",
        {
            "type": "object",
            "properties": {
                "stars": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
                "comment": {"type": "string", "minLength": 3, "maxLength": 40},
            },
            "required": ["stars", "comment"],
            "additionalProperties": False,
        },
    ),
    ("a fraction", {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1, "multipleOf": 0.01}),
    (
        "an inventory",
        {
            "type": "object",
            "patternProperties": {"^[a-z]{1,10}$": {"type": "integer", "minimum": 0, "maximum": 99}},
            "additionalProperties": False,
            "maxProperties": 3,
        },
    ),
]


@pytest.fixture(scope="module")
def llm(default_model_path):
    from tinyserve.llm import LLM

    return LLM(default_model_path)


@pytest.fixture(scope="module")
def compiler(llm):
    return GrammarCompiler.for_tokenizer(llm.tokenizer)


def chat_prompt(llm, ask: str) -> list[int]:
    text = llm.model.chat_template.render(
        [{"role": "user", "content": f"Reply with JSON only: {ask}."}],
        add_generation_prompt=True,
    )
    return llm.tokenizer.encode(text)


def run(engine: LLMEngine, requests: dict[str, tuple]) -> dict[str, tuple[list[int], FinishReason]]:
    """Add every (prompt ids, sampling, stopping, grammar or None) at once; step until all end."""
    for rid, (ids, sp, st, g) in requests.items():
        engine.add_request(rid, ids, sp, st, grammar=g)
    out: dict[str, list[int]] = {rid: [] for rid in requests}
    reasons: dict[str, FinishReason] = {}
    for _ in range(20000):
        if not engine.has_unfinished_requests():
            break
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
            if o.finished:
                assert o.finish_reason is not FinishReason.ERROR, o.error
                reasons[o.request_id] = o.finish_reason
    return {rid: (out[rid], reasons[rid]) for rid in requests}


def text_of(llm, ids: list[int], reason: FinishReason) -> str:
    if reason is FinishReason.STOP:
        assert ids[-1] in llm.tokenizer.stop_ids
        ids = ids[:-1]
    specials = [t for t in ids if t in llm.tokenizer.special_ids]
    assert not specials, f"special tokens inside the structure: {specials}"
    return llm.tokenizer.decode(ids)


def test_thirty_json_schemas_validate_greedy_and_sampled(llm, compiler):
    assert len(SCHEMAS) >= 30
    engine = LLMEngine(llm.model, EngineConfig())
    reqs, schema_of = {}, {}
    for i, (ask, schema) in enumerate(SCHEMAS):
        jsonschema.Draft202012Validator.check_schema(schema)
        g = compiler.compile(ResponseFormat("json_schema", json.dumps(schema)))
        ids = chat_prompt(llm, ask)
        st = StoppingParams(max_tokens=200)
        reqs[f"{i}-greedy"] = (ids, GREEDY, st, g.matcher())
        for seed in SEEDS:
            reqs[f"{i}-{seed}"] = (ids, SamplingParams(temperature=1.0, seed=seed), st, g.matcher())
        schema_of.update({rid: schema for rid in reqs if rid.startswith(f"{i}-")})
    got = run(engine, reqs)
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    bad = []
    for rid, (ids, reason) in got.items():
        text = text_of(llm, ids, reason)
        try:
            assert reason is FinishReason.STOP, f"ended with {reason.value}"
            jsonschema.validate(json.loads(text), schema_of[rid], format_checker=checker)
        except (AssertionError, ValueError, jsonschema.ValidationError) as e:
            bad.append(f"{rid}: {text!r}: {str(e).splitlines()[0]}")
    assert not bad, "\n".join(bad)
    assert engine.stats().kv_blocks_used == 0


def test_json_object_is_any_object(llm, compiler):
    g = compiler.compile(ResponseFormat("json_object"))
    ids = chat_prompt(llm, "a book with a title and an author")
    got = run(
        LLMEngine(llm.model, EngineConfig()),
        {s: (ids, SamplingParams(temperature=1.0, seed=s), StoppingParams(max_tokens=120), g.matcher()) for s in SEEDS},
    )
    for s, (ids, reason) in got.items():
        if reason is FinishReason.STOP:
            assert isinstance(json.loads(text_of(llm, ids, reason)), dict)
        else:  # a long value ran into max_tokens: still the start of an object
            assert text_of(llm, ids, reason).startswith("{")


REGEXES = [
    r"[0-9]{3}-[0-9]{4}",
    r"(yes|no)",
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}",
    r"[A-Z][a-z]{2,8}( [A-Z][a-z]{2,8})?",
    r"(0|[1-9][0-9]{0,2})\.[0-9]{2} EUR",
    r"[a-z]{1,10}@[a-z]{1,10}\.(com|org)",
]


def test_regex_outputs_match_exactly(llm, compiler):
    reqs = {}
    for i, rx in enumerate(REGEXES):
        g = compiler.compile(ResponseFormat("regex", rx))
        ids = llm.tokenizer.encode("Here is the answer:")
        reqs[f"{i}-g"] = (ids, GREEDY, StoppingParams(max_tokens=40), g.matcher())
        for s in SEEDS:
            reqs[f"{i}-{s}"] = (
                ids,
                SamplingParams(temperature=1.0, seed=s),
                StoppingParams(max_tokens=40),
                g.matcher(),
            )
    for rid, (ids, reason) in run(LLMEngine(llm.model, EngineConfig()), reqs).items():
        rx = REGEXES[int(rid.split("-")[0])]
        text = text_of(llm, ids, reason)
        assert reason is FinishReason.STOP and re.fullmatch(rx, text), (rid, rx, text, reason)


def test_choice_outputs_are_one_of_the_options(llm, compiler):
    options = ("red", "green", "light blue", 'say "hi"', "ünïcode ✓", "red wine")
    g = compiler.compile(ResponseFormat("choice", options))
    ids = chat_prompt(llm, "name a colour")
    reqs = {"g": (ids, GREEDY, StoppingParams(max_tokens=20), g.matcher())}
    reqs |= {
        str(s): (ids, SamplingParams(temperature=1.5, seed=s), StoppingParams(max_tokens=20), g.matcher())
        for s in range(8)
    }
    seen = set()
    for rid, (ids, reason) in run(LLMEngine(llm.model, EngineConfig()), reqs).items():
        text = text_of(llm, ids, reason)
        assert reason is FinishReason.STOP and text in options, (rid, text)
        seen.add(text)
    assert len(seen) >= 2  # sampling really chose among them


# Arithmetic of bounded length (so every sampled sentence ends within max_tokens).
ARITHMETIC = r"""start: expr "="
expr: term | term OP term | term OP term OP term
term: NUMBER | "(" NUMBER OP NUMBER ")"
OP: "+" | "-" | "*" | "/"
NUMBER: /[0-9]{1,4}/
"""


def _is_arithmetic(node) -> bool:
    """Python's parse of the same language: integers, + - * / and parentheses only."""
    if isinstance(node, ast.Expression):
        return _is_arithmetic(node.body)
    if isinstance(node, ast.BinOp):
        return (
            isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div))
            and _is_arithmetic(node.left)
            and _is_arithmetic(node.right)
        )
    return isinstance(node, ast.Constant) and type(node.value) is int


def test_lark_grammar_produces_sentences_of_the_grammar(llm, compiler):
    g = compiler.compile(ResponseFormat("lark_grammar", ARITHMETIC))
    ids = llm.tokenizer.encode("Arithmetic practice.\n2+3*4=\n(7-1)/2=\n10*(3+4)=\n")
    reqs = {"g": (ids, GREEDY, StoppingParams(max_tokens=48), g.matcher())}
    reqs |= {
        str(s): (ids, SamplingParams(temperature=1.0, seed=s), StoppingParams(max_tokens=48), g.matcher())
        for s in SEEDS
    }
    for rid, (ids, reason) in run(LLMEngine(llm.model, EngineConfig()), reqs).items():
        text = text_of(llm, ids, reason)
        assert reason is FinishReason.STOP and text.endswith("="), (rid, text)
        assert re.fullmatch(r"[0-9+\-*/()]+", text[:-1]), text
        assert _is_arithmetic(ast.parse(text[:-1], mode="eval")), text


def test_free_requests_in_a_constrained_batch_keep_their_tokens(llm, compiler):
    """Batch invariance: a free request's tokens are the same alone and beside constrained ones,
    and so are a constrained request's."""
    free = (
        llm.tokenizer.encode("The capital of France is"),
        GREEDY,
        StoppingParams(max_tokens=24, ignore_eos=True),
        None,
    )
    fmt = ResponseFormat("json_schema", json.dumps(_person))
    cons = (chat_prompt(llm, "a person"), SamplingParams(temperature=0.8, seed=5), StoppingParams(max_tokens=64))
    alone_free = run(LLMEngine(llm.model, EngineConfig()), {"free": free})["free"]
    alone_cons = run(LLMEngine(llm.model, EngineConfig()), {"c": (*cons, compiler.compile(fmt).matcher())})["c"]
    mixed = {"free": free} | {f"c{i}": (*cons, compiler.compile(fmt).matcher()) for i in range(5)}
    got = run(LLMEngine(llm.model, EngineConfig()), mixed)
    assert got["free"] == alone_free
    assert all(got[f"c{i}"] == alone_cons for i in range(5))


def test_preempted_constrained_requests_resume_their_structure(llm, compiler):
    """Few KV blocks: sequences are preempted and recomputed; the matcher follows the output
    tokens (kept across preemption), so the outputs equal those of a roomy engine and validate."""
    fmt = ResponseFormat("json_schema", json.dumps(SCHEMAS[12][1]))  # a team: long-ish outputs
    ids = chat_prompt(llm, "a team")

    def reqs():
        return {
            str(s): (
                ids,
                SamplingParams(temperature=1.0, seed=s),
                StoppingParams(max_tokens=150),
                compiler.compile(fmt).matcher(),
            )
            for s in range(6)
        }

    roomy = run(LLMEngine(llm.model, EngineConfig()), reqs())
    tight_engine = LLMEngine(llm.model, EngineConfig(num_kv_blocks=16, block_size=16))
    tight = run(tight_engine, reqs())
    assert tight_engine.num_preemptions > 0
    assert tight == roomy
    for ids_, reason in tight.values():
        if reason is FinishReason.STOP:
            jsonschema.validate(json.loads(text_of(llm, ids_, reason)), SCHEMAS[12][1])


def test_max_tokens_leaves_a_valid_prefix(llm, compiler):
    fmt = ResponseFormat("json_schema", json.dumps(_person))
    full = run(
        LLMEngine(llm.model, EngineConfig()),
        {
            "full": (
                chat_prompt(llm, "a person"),
                GREEDY,
                StoppingParams(max_tokens=64),
                compiler.compile(fmt).matcher(),
            )
        },
    )
    short = run(
        LLMEngine(llm.model, EngineConfig()),
        {
            "short": (
                chat_prompt(llm, "a person"),
                GREEDY,
                StoppingParams(max_tokens=5),
                compiler.compile(fmt).matcher(),
            )
        },
    )
    ids, reason = short["short"]
    assert reason is FinishReason.LENGTH and len(ids) == 5
    assert full["full"][0][:5] == ids  # the start of the complete, valid output
    assert json.loads(text_of(llm, *full["full"]))


def test_logprobs_are_of_the_masked_distribution(llm, compiler):
    g = compiler.compile(ResponseFormat("choice", ("A", "B")))
    ids = llm.tokenizer.encode("Answer A or B:")
    got = []
    llm.engine.add_request(
        "lp",
        ids,
        SamplingParams(temperature=1.0, seed=1, logprobs=5),
        StoppingParams(max_tokens=4),
        grammar=g.matcher(),
    )
    while llm.engine.has_unfinished_requests():
        got += [o for o in llm.engine.step() if o.logprobs]
    assert all(len(o.logprobs) == len(o.new_token_ids) for o in got)  # the forced end token too
    assert got[-1].finish_reason is FinishReason.STOP and got[-1].logprobs[-1].logprob == 0.0
    first = got[0].logprobs[0]
    allowed = {llm.tokenizer.encode("A")[0], llm.tokenizer.encode("B")[0]}
    finite = [(t, lp) for t, lp in first.top if math.isfinite(lp)]
    assert {t for t, _ in finite} == allowed  # only the allowed tokens carry probability ...
    assert sum(math.exp(lp) for _, lp in finite) == pytest.approx(1.0, abs=1e-4)  # ... all of it
    assert first.token_id in allowed and math.isfinite(first.logprob)


def test_masks_match_the_matcher_and_leave_other_rows_alone(llm, compiler):
    """apply_mask forbids exactly what the bitmask forbids; allowed logits keep their values."""
    g = compiler.compile(ResponseFormat("regex", "[0-9]+"))
    m = g.matcher()
    V = llm.tokenizer.vocab_size
    masks = fill_masks([m, compiler.compile(ResponseFormat("choice", ("x",))).matcher()], V)
    rng = np.random.default_rng(0)
    row = rng.standard_normal(V).astype(np.float32)
    orig = row.copy()
    assert apply_mask(row, masks[0])
    allowed = np.isfinite(row)
    digits = {i for i in range(V) if (b := llm.tokenizer.token_bytes(i)) and b.isdigit()}
    assert set(np.flatnonzero(allowed)) == digits
    assert np.array_equal(row[allowed], orig[allowed])
    assert not apply_mask(row, np.zeros_like(masks[0]))  # nothing allowed: refused


BAD = [
    (ResponseFormat("json_schema", '{"type": "strin"}'), "response_format.json_schema", "strin"),
    (ResponseFormat("json_schema", "not json"), "response_format.json_schema", "not valid JSON"),
    (ResponseFormat("json_schema", "[1, 2]"), "response_format.json_schema", "object"),
    (
        ResponseFormat("json_schema", '{"type": "string", "pattern": "(?<=a)b"}'),
        "response_format.json_schema",
        "look-around",
    ),
    (ResponseFormat("json_schema", '{"$ref": "#/$defs/nope"}'), "response_format.json_schema", "nope"),
    (ResponseFormat("json_schema", '{"not": {"type": "string"}}'), "response_format.json_schema", "not"),
    (ResponseFormat("json_schema", '{"type": "string", "format": "colour"}'), "response_format.json_schema", "colour"),
    (
        ResponseFormat("json_schema", json.dumps({"enum": ["x" * 100] * 700})),
        "response_format.json_schema",
        f"{MAX_GRAMMAR_BYTES} bytes",
    ),
    (ResponseFormat("regex", "[a-"), "response_format.regex", "unclosed"),
    (ResponseFormat("regex", ""), "response_format.regex", "empty"),
    (ResponseFormat("lark_grammar", "start: foo"), "response_format.lark_grammar", "foo"),
    (ResponseFormat("lark_grammar", "start: ("), "response_format.lark_grammar", ""),
    (ResponseFormat("choice", ()), "response_format.choice.options", "at least one"),
    (ResponseFormat("choice", ("",)), "response_format.choice.options[0]", "1 to"),
    (ResponseFormat("choice", ("a" * (MAX_CHOICE_BYTES + 1),)), "response_format.choice.options[0]", "1 to"),
    (
        ResponseFormat("choice", tuple(map(str, range(MAX_CHOICES + 1)))),
        "response_format.choice.options",
        f"at most {MAX_CHOICES}",
    ),
    (ResponseFormat("yaml", "x"), "response_format", "unknown format"),
]


@pytest.mark.parametrize("fmt,field,needle", BAD, ids=[f"{b[0].kind}-{i}" for i, b in enumerate(BAD)])
def test_bad_formats_name_their_field(compiler, fmt, field, needle):
    with pytest.raises(ParamError) as e:
        compiler.compile(fmt)
    assert e.value.field == field and needle in e.value.message, e.value


def test_a_pathological_regex_neither_breaks_nor_changes_its_batch(llm, compiler):
    """(a|b)*a(a|b){24}c needs a lexer DFA of 2^24 states if built eagerly; llguidance builds it
    lazily under the per-step fuel limit. The request ends normally, and the free request beside
    it produces the tokens it produces alone."""
    free = (llm.tokenizer.encode("Once upon a time"), GREEDY, StoppingParams(max_tokens=16, ignore_eos=True), None)
    alone = run(LLMEngine(llm.model, EngineConfig()), {"free": free})["free"]
    g = compiler.compile(ResponseFormat("regex", "(a|b)*a(a|b){24}c"))
    engine = LLMEngine(llm.model, EngineConfig())
    for rid, (ids, sp, st, m) in {"free": free}.items():
        engine.add_request(rid, ids, sp, st)
    engine.add_request(
        "p",
        llm.tokenizer.encode("ab"),
        SamplingParams(temperature=1.0, seed=1),
        StoppingParams(max_tokens=60),
        grammar=g.matcher(),
    )
    out: dict[str, list[int]] = {"free": [], "p": []}
    reasons = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
            if o.finished:
                reasons[o.request_id] = (o.finish_reason, o.error)
    assert (out["free"], reasons["free"][0]) == alone
    reason, error = reasons["p"]
    if reason is FinishReason.ERROR:  # a parser limit ended it: said so
        assert "structured output" in error
    else:
        text = text_of(llm, out["p"], reason)
        assert re.fullmatch(r"[ab]*", text) or re.fullmatch(r"(a|b)*a(a|b){24}c", text), text


def test_compiled_grammars_are_cached_with_a_bound(llm):
    c = GrammarCompiler(llm.tokenizer, cache_size=2)
    a1 = c.compile(ResponseFormat("regex", "a+"))
    assert c.compile(ResponseFormat("regex", "a+")) is a1 and c.num_compiled == 1
    c.compile(ResponseFormat("regex", "b+"))
    c.compile(ResponseFormat("regex", "c+"))
    assert c.num_cached == 2 and c.num_compiled == 3
    assert c.compile(ResponseFormat("regex", "a+")) is not a1  # evicted, compiled again
    assert GrammarCompiler.for_tokenizer(llm.tokenizer) is GrammarCompiler.for_tokenizer(llm.tokenizer)
