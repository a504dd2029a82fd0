"""Property-based fuzzing (hypothesis) of request decoding and validation (issue 13, part 5).

- api/wire.py: random bytes and random valid-but-mutated requests never make the deserializer
  raise; it refuses exactly what protobuf refuses, and every field it names really holds
  invalid UTF-8 (checked by resolving the path in the lenient parse independently).
- the real in-process server: the same inputs on every RPC get only the documented status codes
  (never UNKNOWN or INTERNAL), and afterwards the server still serves, holds no KV blocks and has
  logged no error.
- parameter validation (engine/params.py, and the servicer on top of it): random values of any
  type give ParamErrors only, and random SamplingParameters / StoppingParameters get exactly the
  verdict of an oracle written from the proto's documented ranges.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from grpc_fakes import VOCAB, FakeEngine
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from server_thread import ServerThread
from test_rpcs import text_of, wait_for
from test_status_codes import violations

from tinyserve.api import wire
from tinyserve.api.protos import pb2 as P
from tinyserve.config import ServerConfig
from tinyserve.engine.params import (
    MAX_LOGPROBS,
    MAX_STOP_BYTES,
    MAX_STOP_STRINGS,
    ParamError,
    SamplingParams,
    StoppingParams,
)

SERVICE = P.DESCRIPTOR.services_by_name["TinyServeService"]
REQUESTS = [getattr(P, m.input_type.name) for m in SERVICE.methods]
# TINYSERVE_FUZZ_EXAMPLES=5000 for a longer run (the default keeps the suite quick)
EXAMPLES = int(os.environ.get("TINYSERVE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(deadline=None, max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow])
FUZZ_SERVER = settings(FUZZ, max_examples=EXAMPLES * 4 // 3)

# ---- strategies -------------------------------------------------------------------------------
_INTS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
# text a real client sends: empty, the model's name, control tokens, stop-like strings, anything
TEXT = st.one_of(
    st.just(""),
    st.just("fake"),
    st.sampled_from(["<|im_end|>", "<|endoftext|>", "<|im_start|>user\n", "user", "assistant", "\x00"]),
    st.text(max_size=24),
)


def scalar(fd: FieldDescriptor):
    t = fd.type
    if t in _INTS:
        lo, hi = _INTS[t]
        return st.one_of(st.integers(-3, 300), st.integers(lo, hi)).filter(lambda v: lo <= v <= hi)
    if t == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if t == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return TEXT
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=16)
    if t == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in fd.enum_type.values])
    raise AssertionError(f"no strategy for field type {t}")


@st.composite
def message(draw, desc, depth: int = 0):
    """A random valid message of descriptor `desc` (any subset of fields, nested to depth 3)."""
    msg = message_factory.GetMessageClass(desc)()
    for fd in desc.fields:
        if not draw(st.booleans()):
            continue
        value = getattr(msg, fd.name)
        if wire._is_map(fd):
            k_fd, v_fd = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
            for k in draw(st.lists(scalar(k_fd), max_size=3)):
                if v_fd.type == FieldDescriptor.TYPE_MESSAGE:
                    value[k].CopyFrom(draw(message(v_fd.message_type, depth + 1)))
                else:
                    value[k] = draw(scalar(v_fd))
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 3:
                continue
            if wire._is_repeated(fd):
                for sub in draw(st.lists(message(fd.message_type, depth + 1), max_size=3)):
                    value.add().CopyFrom(sub)
            else:
                value.CopyFrom(draw(message(fd.message_type, depth + 1)))
                value.SetInParent()
        elif wire._is_repeated(fd):
            value.extend(draw(st.lists(scalar(fd), max_size=5)))
        else:
            setattr(msg, fd.name, draw(scalar(fd)))
    return msg


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """`data` after a few byte-level edits: flips, inserts (bad UTF-8 among them), deletions,
    truncation, a duplicated chunk."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "dup"]))
        at = draw(st.integers(0, len(buf)))
        if kind == "flip" and buf:
            buf[min(at, len(buf) - 1)] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            buf[at:at] = draw(
                st.one_of(
                    st.binary(min_size=1, max_size=6), st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"])
                )
            )
        elif kind == "delete":
            del buf[at : at + draw(st.integers(1, 4))]
        elif kind == "truncate":
            del buf[at:]
        elif kind == "dup":
            buf[at:at] = buf[at : at + draw(st.integers(1, 8))]
    return bytes(buf)


@st.composite
def request_bytes(draw, cls):
    """Random bytes, or a random valid request of `cls`, serialized and (maybe) mutated."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=64))
    data = draw(message(cls.DESCRIPTOR)).SerializeToString()
    return draw(mutated(data))


# ---- the deserializer alone -------------------------------------------------------------------
def _resolve(twin, path: str):
    """The value at a BadRequest path (`a.b[2].c`, `m["k"]`) in a lenient twin message."""
    value = twin
    for part in re.findall(r'[A-Za-z_]\w*|\[\d+\]|\["(?:[^"\\]|\\.)*"\]|\[-?\d+\]|\[(?:true|false)\]', path):
        if part.startswith('["'):
            key = part[2:-2].encode()
            value = next(e.value for e in value if e.key == key)
        elif part.startswith("["):
            value = (
                value[int(part[1:-1])]
                if not hasattr(value[0], "key")
                else next(e.value for e in value if str(e.key).lower() == part[1:-1])
            )
        else:
            value = getattr(value, part)
    return value


@pytest.mark.parametrize("cls", REQUESTS, ids=lambda c: c.DESCRIPTOR.name)
@FUZZ
@given(data=st.data())
def test_the_deserializer_never_raises_and_names_only_real_bad_fields(cls, data):
    raw = data.draw(request_bytes(cls))
    got = wire.tolerant_deserializer(cls)(raw)
    try:
        expect = cls.FromString(raw)
    except Exception:  # noqa: BLE001
        expect = None
    if expect is not None:
        assert got == expect
        return
    assert isinstance(got, wire.MalformedRequest)
    assert isinstance(got.error, wire.InvalidArgument), repr(got.error)
    fields = [v.field for v in got.error.violations]
    assert fields and len(fields) <= wire.MAX_VIOLATIONS
    if fields == [""]:
        return  # not a protobuf message at all
    twin = wire._lenient_class(cls.DESCRIPTOR).FromString(raw)
    for v in got.error.violations:
        if not v.field or v.description.startswith("a map key"):
            continue
        value = _resolve(twin, v.field)
        with pytest.raises(UnicodeDecodeError):
            value.decode("utf-8")


# ---- the server ---------------------------------------------------------------------------------
class _Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def fuzz_server():
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    eng = FakeEngine()
    srv = ServerThread([eng], ServerConfig(port=0))
    srv.errors, srv.engine = errors, eng
    yield srv
    srv.close()
    logging.getLogger().removeHandler(errors)


ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def _call(srv, method, raw: bytes):
    m = SERVICE.methods_by_name[method]
    resp = getattr(P, m.output_type.name)
    ch = srv.channel() if not hasattr(srv, "_fuzz_channel") else srv._fuzz_channel
    srv._fuzz_channel = ch
    make = ch.unary_stream if m.server_streaming else ch.unary_unary
    call = make(f"/{SERVICE.full_name}/{method}", request_serializer=lambda b: b, response_deserializer=resp.FromString)
    try:
        out = call(raw, timeout=15)
        if m.server_streaming:
            list(out)
    except grpc.RpcError as e:
        return e.code(), e
    return grpc.StatusCode.OK, None


@FUZZ_SERVER
@given(data=st.data())
def test_fuzzed_requests_get_only_documented_statuses(fuzz_server, data):
    method = data.draw(st.sampled_from([m.name for m in SERVICE.methods]))
    cls = getattr(P, SERVICE.methods_by_name[method].input_type.name)
    raw = data.draw(request_bytes(cls))
    assume(b"__crash__" not in raw and b"__error__" not in raw)  # the fake engine's failure knobs
    code, err = _call(fuzz_server, method, raw)
    assert code in ALLOWED, (code, err and err.details())
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert violations(err), "INVALID_ARGUMENT without field violations"


def test_the_server_is_unharmed_after_fuzzing(fuzz_server):
    """Runs after the fuzz test above (same module server)."""
    srv = fuzz_server
    evs = list(
        srv.stub().Generate(P.GenerateRequest(prompt="ok", stopping=P.StoppingParameters(max_tokens=2)), timeout=10)
    )
    assert text_of(evs) == "ok"
    assert wait_for(lambda: srv.engine.stats().kv_blocks_used == 0)
    assert wait_for(lambda: srv.server.models[0].engine.num_open == 0)
    assert srv.server.state.inflight == 0
    assert not srv.errors.records, [r.getMessage() for r in srv.errors.records[:3]]


# ---- parameter validation ----------------------------------------------------------------------
ANYTHING = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4), st.lists(st.integers(), max_size=2)
)


@FUZZ
@given(
    kw=st.fixed_dictionaries(
        {},
        optional={name: ANYTHING for name in (f.name for f in dataclasses.fields(SamplingParams))},
    )
)
def test_sampling_validation_raises_param_errors_only(kw):
    p = SamplingParams(**kw)
    bad = p.violations()
    assert all(isinstance(e, ParamError) and e.field.startswith("sampling.") for e in bad)
    assert len({e.field for e in bad}) == len(bad)
    if bad:
        with pytest.raises(ParamError) as ei:
            p.validate()
        assert ei.value.field == bad[0].field
    else:
        p.validate()


@FUZZ
@given(
    max_tokens=ANYTHING,
    stop=st.lists(st.one_of(st.text(max_size=300), st.integers()), max_size=20),
    stop_token_ids=st.lists(ANYTHING, max_size=4),
)
def test_stopping_validation_raises_param_errors_only(max_tokens, stop, stop_token_ids):
    p = StoppingParams(max_tokens=max_tokens, stop=stop, stop_token_ids=stop_token_ids)
    bad = p.violations()
    assert all(isinstance(e, ParamError) and e.field.startswith("stopping.") for e in bad)
    if bad:
        with pytest.raises(ParamError):
            p.validate()
    else:
        p.validate()


def oracle(req: P.GenerateRequest, prompt_tokens: int, context: int) -> set[str]:
    """The fields the proto's documentation says are invalid in `req`."""
    s, t = req.sampling, req.stopping
    bad = set()

    def check(name, ok):
        if s.HasField(name):
            v = getattr(s, name)
            if not (math.isfinite(v) and ok(v)):
                bad.add(f"sampling.{name}")

    check("temperature", lambda v: v >= 0)
    check("top_p", lambda v: 0 < v <= 1)
    check("min_p", lambda v: 0 <= v < 1)
    check("repetition_penalty", lambda v: v > 0)
    check("presence_penalty", lambda v: -2 <= v <= 2)  # engine/params.py: [-2, 2]
    check("frequency_penalty", lambda v: -2 <= v <= 2)
    if s.HasField("top_k") and s.top_k < 0:
        bad.add("sampling.top_k")
    if not 0 <= s.logprobs <= 20:
        bad.add("sampling.logprobs")
    if t.HasField("max_tokens") and t.max_tokens < 1:
        bad.add("stopping.max_tokens")
    if len(t.stop) > 16:
        bad.add("stopping.stop")
    bad |= {f"stopping.stop[{i}]" for i, x in enumerate(t.stop) if not 1 <= len(x.encode()) <= 256}
    bad |= {f"stopping.stop_token_ids[{i}]" for i, x in enumerate(t.stop_token_ids) if not 0 <= x < VOCAB}
    if not bad and t.HasField("max_tokens") and t.max_tokens > context - prompt_tokens:
        bad.add("stopping.max_tokens")
    return bad


assert (MAX_LOGPROBS, MAX_STOP_STRINGS, MAX_STOP_BYTES) == (20, 16, 256)  # what the proto says


@FUZZ_SERVER
@given(sampling=message(P.SamplingParameters.DESCRIPTOR), stopping=message(P.StoppingParameters.DESCRIPTOR))
def test_the_server_validates_parameters_as_documented(fuzz_server, sampling, stopping):
    req = P.GenerateRequest(prompt="ab", sampling=sampling, stopping=stopping)
    expect = oracle(req, prompt_tokens=2, context=256)
    code, err = _call(fuzz_server, "Generate", req.SerializeToString())
    if expect:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (expect, code)
        assert set(violations(err)) == expect
    else:
        assert code == grpc.StatusCode.OK, err and err.details()
