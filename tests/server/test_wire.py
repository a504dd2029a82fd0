"""The wire check (api/wire.py): invalid UTF-8 in any string field of any request is
INVALID_ARGUMENT naming the field path, whatever other field kinds the message holds.

The cases are generated from the descriptors: every string field reachable in every message of
proto/tinyserve/v1/*.proto (new fields are covered without touching this file), plus a test-only
message holding every field kind (optional, repeated packed/unpacked, nested, repeated nested,
oneof members, maps with string/int keys and string/message values, recursion). Each case fills
every other field of the message with non-default values (the old walk crashed on a scalar
beside the bad string) and swaps a marker in the serialized bytes for invalid UTF-8 of the same
length.
"""

from __future__ import annotations

import logging

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.descriptor import FieldDescriptor
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from test_rpcs import text_of
from test_status_codes import details, violations

from tinyserve.api import wire
from tinyserve.api.protos import pb2 as P

MARK = "@@BAD@@"
BAD = b"\xff\xfe\xc3(\xed\xa0\x80"  # same length as MARK; not UTF-8 in four different ways
assert len(BAD) == len(MARK.encode())
MAX_DEPTH = 3

# Every field kind proto3 has, in one message (built in a private pool, never registered).
KINDS_PROTO = """
name: "tinyserve_test/kinds.proto" package: "tinyserve.test" syntax: "proto3"
enum_type { name: "Colour" value { name: "COLOUR_UNSPECIFIED" number: 0 }
            value { name: "COLOUR_RED" number: 1 } }
message_type {
  name: "Inner"
  field { name: "text" number: 1 type: TYPE_STRING label: LABEL_OPTIONAL }
  field { name: "tags" number: 2 type: TYPE_STRING label: LABEL_REPEATED }
  field { name: "n" number: 3 type: TYPE_INT32 label: LABEL_OPTIONAL }
}
message_type {
  name: "Kinds"
  field { name: "s" number: 1 type: TYPE_STRING label: LABEL_OPTIONAL }
  field { name: "opt_s" number: 2 type: TYPE_STRING
      label: LABEL_OPTIONAL oneof_index: 1 proto3_optional: true }
  field { name: "rep_s" number: 3 type: TYPE_STRING label: LABEL_REPEATED }
  field { name: "i" number: 4 type: TYPE_INT32 label: LABEL_OPTIONAL }
  field { name: "opt_i" number: 5 type: TYPE_INT64
      label: LABEL_OPTIONAL oneof_index: 2 proto3_optional: true }
  field { name: "packed" number: 6 type: TYPE_INT32 label: LABEL_REPEATED }
  field { name: "unpacked" number: 7 type: TYPE_UINT64 label: LABEL_REPEATED options { packed: false } }
  field { name: "f" number: 8 type: TYPE_FLOAT label: LABEL_OPTIONAL }
  field { name: "d" number: 9 type: TYPE_DOUBLE label: LABEL_OPTIONAL }
  field { name: "b" number: 10 type: TYPE_BOOL label: LABEL_OPTIONAL }
  field { name: "raw" number: 11 type: TYPE_BYTES label: LABEL_OPTIONAL }
  field { name: "colour" number: 12 type: TYPE_ENUM type_name: ".tinyserve.test.Colour"
      label: LABEL_OPTIONAL }
  field { name: "inner" number: 13 type: TYPE_MESSAGE type_name: ".tinyserve.test.Inner"
      label: LABEL_OPTIONAL }
  field { name: "inners" number: 14 type: TYPE_MESSAGE type_name: ".tinyserve.test.Inner"
      label: LABEL_REPEATED }
  field { name: "one_s" number: 15 type: TYPE_STRING label: LABEL_OPTIONAL oneof_index: 0 }
  field { name: "one_m" number: 16 type: TYPE_MESSAGE type_name: ".tinyserve.test.Inner"
      label: LABEL_OPTIONAL oneof_index: 0 }
  field { name: "one_i" number: 17 type: TYPE_INT32 label: LABEL_OPTIONAL oneof_index: 0 }
  field { name: "labels" number: 18 type: TYPE_MESSAGE type_name: ".tinyserve.test.Kinds.LabelsEntry"
      label: LABEL_REPEATED }
  field { name: "by_name" number: 19 type: TYPE_MESSAGE type_name: ".tinyserve.test.Kinds.ByNameEntry"
      label: LABEL_REPEATED }
  field { name: "by_id" number: 20 type: TYPE_MESSAGE type_name: ".tinyserve.test.Kinds.ByIdEntry"
      label: LABEL_REPEATED }
  field { name: "counts" number: 21 type: TYPE_MESSAGE type_name: ".tinyserve.test.Kinds.CountsEntry"
      label: LABEL_REPEATED }
  field { name: "child" number: 22 type: TYPE_MESSAGE type_name: ".tinyserve.test.Kinds"
      label: LABEL_OPTIONAL }
  field { name: "fx" number: 23 type: TYPE_FIXED32 label: LABEL_OPTIONAL }
  field { name: "si" number: 24 type: TYPE_SINT64 label: LABEL_OPTIONAL }
  nested_type { name: "LabelsEntry" options { map_entry: true }
    field { name: "key" number: 1 type: TYPE_STRING label: LABEL_OPTIONAL }
    field { name: "value" number: 2 type: TYPE_STRING label: LABEL_OPTIONAL } }
  nested_type { name: "ByNameEntry" options { map_entry: true }
    field { name: "key" number: 1 type: TYPE_STRING label: LABEL_OPTIONAL }
    field { name: "value" number: 2 type: TYPE_MESSAGE type_name: ".tinyserve.test.Inner"
        label: LABEL_OPTIONAL } }
  nested_type { name: "ByIdEntry" options { map_entry: true }
    field { name: "key" number: 1 type: TYPE_INT32 label: LABEL_OPTIONAL }
    field { name: "value" number: 2 type: TYPE_STRING label: LABEL_OPTIONAL } }
  nested_type { name: "CountsEntry" options { map_entry: true }
    field { name: "key" number: 1 type: TYPE_STRING label: LABEL_OPTIONAL }
    field { name: "value" number: 2 type: TYPE_UINT64 label: LABEL_OPTIONAL } }
  oneof_decl { name: "choice" } oneof_decl { name: "_opt_s" } oneof_decl { name: "_opt_i" }
}
"""


def _kinds_class():
    fdp = text_format.Parse(KINDS_PROTO, descriptor_pb2.FileDescriptorProto())
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tinyserve.test.Kinds"))


Kinds = _kinds_class()


# ---- building the cases from descriptors ---------------------------------------------------
def _repeated(fd) -> bool:
    return wire._is_repeated(fd)


def _is_map(fd) -> bool:
    return wire._is_map(fd)


def _real_oneof(fd):
    o = fd.containing_oneof
    return o if o is not None and len(o.fields) > 1 else None


def _scalar(fd):
    """A valid non-default value of a scalar field."""
    t = fd.type
    if t == FieldDescriptor.TYPE_STRING:
        return "ok"
    if t == FieldDescriptor.TYPE_BYTES:
        return b"\x00\xff raw bytes are not checked"
    if t == FieldDescriptor.TYPE_BOOL:
        return True
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return 0.5
    if t == FieldDescriptor.TYPE_ENUM:
        return fd.enum_type.values[-1].number
    return 7  # every integer type


def fill(msg, depth: int = 0) -> None:
    """Set every field of `msg` (nested ones to MAX_DEPTH) to non-default values; the first
    member of each oneof."""
    for fd in msg.DESCRIPTOR.fields:
        oneof = _real_oneof(fd)
        if oneof is not None and fd is not oneof.fields[0]:
            continue
        value = getattr(msg, fd.name)
        if _is_map(fd):
            key_fd, val_fd = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
            key = _scalar(key_fd)
            if val_fd.type == FieldDescriptor.TYPE_MESSAGE:
                if depth < MAX_DEPTH:
                    fill(value[key], depth + 1)
            else:
                value[key] = _scalar(val_fd)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= MAX_DEPTH:
                continue
            if _repeated(fd):
                for _ in range(2):
                    fill(value.add(), depth + 1)
            else:
                value.SetInParent()
                fill(value, depth + 1)
        elif _repeated(fd):
            value.extend([_scalar(fd)] * 2)
        else:
            setattr(msg, fd.name, _scalar(fd))


def string_paths(desc, depth: int = 0):
    """Every way down to a string field: lists of steps (kind, field descriptor, index/key)."""
    if depth > MAX_DEPTH:
        return
    for fd in desc.fields:
        if _is_map(fd):
            key_fd, val_fd = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
            if key_fd.type == FieldDescriptor.TYPE_STRING:
                yield [("map_key", fd, None)]
            key = _scalar(key_fd)
            if val_fd.type == FieldDescriptor.TYPE_STRING:
                yield [("map_value", fd, key)]
            elif val_fd.type == FieldDescriptor.TYPE_MESSAGE:
                for sub in string_paths(val_fd.message_type, depth + 1):
                    yield [("map_value", fd, key)] + sub
        elif fd.type == FieldDescriptor.TYPE_STRING:
            yield [("item" if _repeated(fd) else "field", fd, 1 if _repeated(fd) else None)]
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            step = ("item", fd, 1) if _repeated(fd) else ("field", fd, None)
            for sub in string_paths(fd.message_type, depth + 1):
                yield [step] + sub


def build_case(cls, steps) -> tuple[bytes, str, str]:
    """(request bytes with invalid UTF-8 at `steps`, expected field path, expected description)."""
    msg = cls()
    fill(msg)
    target, path = msg, ""
    for n, (kind, fd, where) in enumerate(steps):
        last = n == len(steps) - 1
        name = path + fd.name
        if kind == "map_key":
            container = getattr(target, fd.name)
            val_fd = fd.message_type.fields_by_name["value"]
            if val_fd.type == FieldDescriptor.TYPE_MESSAGE:
                container[MARK].SetInParent()
            else:
                container[MARK] = _scalar(val_fd)
            path, description = name, "a map key is not valid UTF-8"
            break
        if kind == "map_value":
            container = getattr(target, fd.name)
            shown = f'"{where}"' if isinstance(where, str) else str(where).lower()
            path = f"{name}[{shown}]"
            if last:
                container[where] = MARK
            else:
                target = container[where]
                fill(target)
        elif kind == "item":
            container = getattr(target, fd.name)
            path = f"{name}[{where}]"
            if last:
                container[where] = MARK
            else:
                target = container[where]
        else:
            path = name
            if last:
                setattr(target, fd.name, MARK)
            else:
                target = getattr(target, fd.name)
                target.SetInParent()
                fill(target)  # a oneof member other than the first starts empty
        path += "."
    else:
        path, description = path[:-1], "not valid UTF-8"
    data = msg.SerializeToString()
    assert data.count(MARK.encode()) == 1
    return data.replace(MARK.encode(), BAD), path, description


def all_messages(file_desc):
    def walk(desc):
        if not desc.GetOptions().map_entry:
            yield desc
        for nested in desc.nested_types:
            yield from walk(nested)

    for desc in file_desc.message_types_by_name.values():
        yield from walk(desc)


def cases_for(cls):
    return [build_case(cls, steps) for steps in string_paths(cls.DESCRIPTOR)]


PROTO_MESSAGES = [getattr(P, d.name) if d.containing_type is None else None for d in all_messages(P.DESCRIPTOR)]
PROTO_MESSAGES = [c for c in PROTO_MESSAGES if c is not None]
SERVICE = P.DESCRIPTOR.services_by_name["TinyServeService"]


# ---- the explainer, message by message ------------------------------------------------------
def test_the_generator_covers_every_field_kind():
    """Guards the generator itself: the test-only message yields a case through each kind."""
    got = {p for _, p, _ in cases_for(Kinds)}
    for expect in [
        "s",
        "opt_s",
        "rep_s[1]",
        "inner.text",
        "inner.tags[1]",
        "inners[1].text",
        "one_s",
        "one_m.text",
        'labels["ok"]',
        "labels",
        'by_name["ok"].text',
        "by_name",
        "by_id[7]",
        "counts",
        "child.s",
        "child.inner.tags[1]",
        "child.child.labels",
    ]:
        assert expect in got, (expect, sorted(got))
    # and every message type of the real proto with a string field has cases
    with_strings = {c.DESCRIPTOR.name for c in PROTO_MESSAGES if list(string_paths(c.DESCRIPTOR))}
    assert {
        "GenerateRequest",
        "ChatRequest",
        "TokenizeRequest",
        "DetokenizeRequest",
        "GetModelRequest",
        "GenerateResponse",
        "ChatResponse",
        "GetModelResponse",
        "GetUsageResponse",
        "ModelInfo",
    } <= with_strings


@pytest.mark.parametrize("cls", [Kinds] + PROTO_MESSAGES, ids=lambda c: c.DESCRIPTOR.name)
def test_bad_utf8_in_any_string_field_names_that_field(cls):
    deserialize = wire.tolerant_deserializer(cls)
    for data, path, description in cases_for(cls):
        with pytest.raises(Exception):  # noqa: B017 - protobuf itself refuses the bytes
            cls.FromString(data)
        got = deserialize(data)
        assert isinstance(got, wire.MalformedRequest), path
        assert isinstance(got.error, wire.InvalidArgument), (path, got.error)
        assert [(v.field, v.description) for v in got.error.violations] == [(path, description)]
    # the filled message itself (every field set, no bad bytes) parses as it is
    msg = cls()
    fill(msg)
    assert deserialize(msg.SerializeToString()) == msg


def test_many_bad_fields_are_all_named_up_to_the_cap():
    msg = Kinds(rep_s=[MARK] * 3, s=MARK, inner={"text": MARK})
    data = msg.SerializeToString().replace(MARK.encode(), BAD)
    got = wire.tolerant_deserializer(Kinds)(data)
    assert [v.field for v in got.error.violations] == ["s", "rep_s[0]", "rep_s[1]", "rep_s[2]", "inner.text"]
    many = Kinds(rep_s=[MARK] * 100).SerializeToString().replace(MARK.encode(), BAD)
    got = wire.tolerant_deserializer(Kinds)(many)
    assert len(got.error.violations) == wire.MAX_VIOLATIONS
    assert [v.field for v in got.error.violations[:-1]] == [f"rep_s[{i}]" for i in range(15)]
    assert got.error.violations[-1] == wire.FieldViolation(
        "", "more fields are not valid UTF-8 (the first 15 are listed)"
    )


def test_bad_items_of_a_repeated_string_are_found_wherever_they_are():
    """The one-pass search over a repeated string field against a per-item decode."""
    items = ["ok", MARK, "", "é", MARK, "\u20ac" * 3, MARK]
    raw = [s.encode() for s in items]
    raw[1] = b"\xc3"  # a truncated sequence at an item's end
    raw[4] = b"\xa9tail"  # a continuation byte at an item's start
    raw[6] = b"ok\xed\xa0\x80"  # an encoded surrogate at the very end
    # joined without separators, raw[3:5] would hide nothing, but raw[0:2] + "é"[1:] would
    got = [v.field for v in wire._bad_items(raw, "x")]
    expect = []
    for i, b in enumerate(raw):
        try:
            b.decode("utf-8")
        except UnicodeDecodeError:
            expect.append(f"x[{i}]")
    assert got == expect == ["x[1]", "x[4]", "x[6]"]


def test_map_keys_in_paths_are_escaped_and_clipped():
    key = 'a"b' + "k" * 100
    msg = Kinds(labels={key: MARK})
    data = msg.SerializeToString().replace(MARK.encode(), BAD)
    (v,) = wire.tolerant_deserializer(Kinds)(data).error.violations
    assert v.field == 'labels["a\\"b' + "k" * 29 + '..."]'


@pytest.mark.parametrize(
    "data",
    [b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x08", b"\x0f\x00", b"\x12\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01"],
)
def test_bytes_that_are_no_message_are_invalid_argument_not_an_exception(data):
    got = wire.tolerant_deserializer(P.GenerateRequest)(data)
    assert isinstance(got, wire.MalformedRequest)
    assert [(v.field, v.description) for v in got.error.violations] == [("", wire.NOT_PROTOBUF)]


def test_a_failing_explainer_becomes_internal_with_a_request_id(serve, monkeypatch, caplog):
    """A bug in the wire check itself is INTERNAL with the request id, no exception text (the
    traceback goes to the server log)."""

    def broken(*a):
        raise TypeError("'int' object is not iterable")

    monkeypatch.setattr(wire, "explain", broken)
    srv = serve()
    raw = srv.channel().unary_stream(
        "/tinyserve.v1.TinyServeService/Generate",
        request_serializer=lambda b: b,
        response_deserializer=P.GenerateResponse.FromString,
    )
    bad = P.GenerateRequest(prompt=MARK).SerializeToString().replace(MARK.encode(), BAD)
    with caplog.at_level(logging.ERROR, logger="tinyserve.api"):
        with pytest.raises(grpc.RpcError) as e:
            list(raw(bad, timeout=10))
    assert e.value.code() == grpc.StatusCode.INTERNAL
    rid = details(e.value, error_details_pb2.ErrorInfo)[0].metadata["request_id"]
    assert rid and e.value.details() == f"internal error (request id {rid})"
    assert dict(e.value.trailing_metadata())["x-request-id"] == rid
    assert any(rid in r.getMessage() and r.exc_info for r in caplog.records)


# ---- through the real in-process server -----------------------------------------------------
def _raw(channel, method):
    m = SERVICE.methods_by_name[method]
    resp = getattr(P, m.output_type.name)
    make = channel.unary_stream if m.server_streaming else channel.unary_unary
    return make(f"/{SERVICE.full_name}/{method}", request_serializer=lambda b: b, response_deserializer=resp.FromString)


@pytest.mark.parametrize("method", [m.name for m in SERVICE.methods])
def test_every_rpc_answers_bad_utf8_with_the_field_path(serve, method):
    srv = serve()
    req_cls = getattr(P, SERVICE.methods_by_name[method].input_type.name)
    call = _raw(srv.channel(), method)
    for data, path, description in cases_for(req_cls):
        with pytest.raises(grpc.RpcError) as e:
            out = call(data, timeout=10)
            if SERVICE.methods_by_name[method].server_streaming:
                list(out)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, e.value.details())
        assert violations(e.value) == {path: description}
        assert path in e.value.details()
        assert "x-request-id" in dict(e.value.trailing_metadata())
        assert rpc_status.from_call(e.value).code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    # the server keeps serving
    evs = list(
        srv.stub().Generate(P.GenerateRequest(prompt="ok", stopping=P.StoppingParameters(max_tokens=2)), timeout=10)
    )
    assert text_of(evs) == "ok"


def test_the_issue_cases(serve):
    """Bad prompt bytes beside max_tokens / temperature, and Tokenize beside add_bos: these were
    UNKNOWN with a TypeError text."""
    srv = serve()
    gen, tok = _raw(srv.channel(), "Generate"), _raw(srv.channel(), "Tokenize")
    for req in (
        P.GenerateRequest(prompt=MARK, stopping=P.StoppingParameters(max_tokens=4)),
        P.GenerateRequest(prompt=MARK, sampling=P.SamplingParameters(temperature=0.5)),
        P.GenerateRequest(
            prompt=MARK,
            sampling=P.SamplingParameters(seed=3, logprobs=2),
            stopping=P.StoppingParameters(stop_token_ids=[1, 2], ignore_eos=True),
        ),
    ):
        with pytest.raises(grpc.RpcError) as e:
            list(gen(req.SerializeToString().replace(MARK.encode(), BAD), timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(e.value) == {"prompt": "not valid UTF-8"}
    with pytest.raises(grpc.RpcError) as e:
        tok(P.TokenizeRequest(text=MARK, add_bos=True).SerializeToString().replace(MARK.encode(), BAD), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(e.value) == {"text": "not valid UTF-8"}
