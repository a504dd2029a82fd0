"""Request decoding that turns malformed bytes into INVALID_ARGUMENT, never INTERNAL or UNKNOWN.

protobuf's Python runtime refuses a `string` field holding invalid UTF-8 at parse time
(DecodeError). grpc would answer such a request with INTERNAL ("Exception deserializing request"),
and an exception raised by a deserializer becomes UNKNOWN with the exception's text. Our
deserializer never raises: it hands the handler a MalformedRequest, which the handler turns into
INVALID_ARGUMENT with a BadRequest field violation like `messages[1].content: not valid UTF-8`
(or, if explaining the bytes itself failed, INTERNAL with a request id).

To find the field we parse the bytes again with a "lenient twin" of the request message: the
same schema with every `string` turned into `bytes` and every map entry into a plain nested
message (both wire-compatible), built once per file in a private descriptor pool. Then one walk
over the twin, typed by the real descriptor, visits every field kind: singular, optional, oneof,
repeated (packed or not), nested and repeated messages, and maps (string keys and values,
message values).

Paths follow google.rpc.BadRequest: `stopping.stop[0]`, `messages[2].content`,
`labels["key"]` for a map value (the key shown escaped and clipped), `labels` for a bad map key.
"""

from __future__ import annotations

import bisect
import codecs
import contextlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor
from google.protobuf.message import DecodeError

from tinyserve.api import errors
from tinyserve.api.errors import MAX_VIOLATIONS, FieldViolation, InvalidArgument
from tinyserve.api.interceptors import request_id

NOT_UTF8 = "not valid UTF-8"
NOT_PROTOBUF = "the request is not a valid protobuf message"
_MAX_KEY_CHARS = 32  # of a map key shown in a path


@dataclass
class MalformedRequest:
    """Stands in for a request whose bytes could not be parsed.

    `error` is an InvalidArgument naming the bad fields, or the exception that stopped us from
    explaining the bytes (a bug: it becomes INTERNAL with a request id)."""

    error: Exception


def tolerant_deserializer(cls):
    """A request_deserializer for `cls` that returns MalformedRequest instead of raising."""

    def deserialize(data: bytes):
        try:
            return cls.FromString(data)
        except DecodeError:
            pass
        except Exception as e:  # noqa: BLE001 - a deserializer that raises gives the client UNKNOWN
            return MalformedRequest(e)
        try:
            return MalformedRequest(InvalidArgument(explain(cls.DESCRIPTOR, data)))
        except Exception as e:  # noqa: BLE001 - same: INTERNAL (with a request id), not UNKNOWN
            return MalformedRequest(e)

    return deserialize


def reject_malformed(fn, streaming: bool):
    """The handler `fn` behind a check that answers a MalformedRequest with its status."""
    if streaming:

        async def stream(request, context):
            if isinstance(request, MalformedRequest):
                await errors.abort(context, request.error, request_id())
            async with contextlib.aclosing(fn(request, context)) as events:
                async for item in events:
                    yield item

        return stream

    async def unary(request, context):
        if isinstance(request, MalformedRequest):
            await errors.abort(context, request.error, request_id())
        return await fn(request, context)

    return unary


def explain(desc: Descriptor, data: bytes) -> list[FieldViolation]:
    """Why `data` does not parse as message `desc`: the string fields holding invalid UTF-8
    (the first MAX_VIOLATIONS - 1, then a note if there are more), else one violation saying
    it is no protobuf message."""
    try:
        twin = _lenient_class(desc).FromString(data)
    except DecodeError:
        return [FieldViolation("", NOT_PROTOBUF)]
    bad = list(itertools.islice(bad_utf8(twin, desc), MAX_VIOLATIONS))
    if len(bad) == MAX_VIOLATIONS:
        bad[-1] = FieldViolation("", f"more fields are {NOT_UTF8} (the first {MAX_VIOLATIONS - 1} are listed)")
    return bad or [FieldViolation("", NOT_PROTOBUF)]


def bad_utf8(twin, desc: Descriptor, prefix: str = "") -> Iterator[FieldViolation]:
    """Violations for the string fields (per the real descriptor `desc`) of the lenient twin
    message `twin` whose bytes are not UTF-8, in field order, depth first."""
    for twin_fd, value in twin.ListFields():
        fd = desc.fields_by_name[twin_fd.name]
        path = prefix + fd.name
        if _is_map(fd):
            yield from _bad_map(fd, value, path)
        elif _is_repeated(fd) and fd.type == FieldDescriptor.TYPE_STRING:
            yield from _bad_items(value, path)
        elif _is_repeated(fd):
            for i, item in enumerate(value):
                yield from _bad_value(fd, item, f"{path}[{i}]")
        else:
            yield from _bad_value(fd, value, path)


def _bad_value(fd: FieldDescriptor, value, path: str) -> Iterator[FieldViolation]:
    if fd.type == FieldDescriptor.TYPE_STRING:
        if not _is_utf8(value):
            yield FieldViolation(path, NOT_UTF8)
    elif fd.type == FieldDescriptor.TYPE_MESSAGE:
        yield from bad_utf8(value, _message_type(fd), path + ".")


def _bad_map(fd: FieldDescriptor, entries, path: str) -> Iterator[FieldViolation]:
    key_fd = _message_type(fd).fields_by_name["key"]
    value_fd = _message_type(fd).fields_by_name["value"]
    for entry in entries:  # the twin's entries are plain messages with `key` and `value`
        key = entry.key
        if key_fd.type == FieldDescriptor.TYPE_STRING and not _is_utf8(key):
            yield FieldViolation(path, f"a map key is {NOT_UTF8}")
            continue
        if value_fd.type == FieldDescriptor.TYPE_MESSAGE and not entry.HasField("value"):
            continue
        yield from _bad_value(value_fd, entry.value, f"{path}[{_key_text(key)}]")


def _bad_items(items, path: str) -> Iterator[FieldViolation]:
    """The items of a repeated string field that are not UTF-8, found in one pass: joined by
    NULs (an ASCII byte ends any sequence, so the join is valid iff every item is), decoded,
    and each error's offset mapped back to its item."""
    joined = b"\x00".join(items)
    view, pos, ends = memoryview(joined), 0, None
    while True:
        try:
            codecs.utf_8_decode(view[pos:], "strict", True)
            return
        except UnicodeDecodeError as e:
            bad_at = pos + e.start
        if ends is None:  # ends[i]: offset just past item i and its separator
            ends = list(itertools.accumulate(len(b) + 1 for b in items))
        i = bisect.bisect_right(ends, bad_at)
        yield FieldViolation(f"{path}[{i}]", NOT_UTF8)
        pos = ends[i]
        if pos >= len(joined):
            return


def _key_text(key) -> str:
    if isinstance(key, bytes):  # a string key (bytes in the twin), already checked to be UTF-8
        text = key.decode("utf-8")
        clipped = text[:_MAX_KEY_CHARS] + ("..." if len(text) > _MAX_KEY_CHARS else "")
        return json.dumps(clipped)
    if isinstance(key, bool):
        return "true" if key else "false"
    return str(key)


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _is_repeated(fd: FieldDescriptor) -> bool:
    rep = getattr(fd, "is_repeated", None)  # FieldDescriptor.label left protobuf 7
    if rep is None:
        rep = fd.label == FieldDescriptor.LABEL_REPEATED  # type: ignore[attr-defined]  # protobuf < 7
    return bool(rep)


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.type == FieldDescriptor.TYPE_MESSAGE and _is_repeated(fd) and _message_type(fd).GetOptions().map_entry


def _message_type(fd: FieldDescriptor) -> Descriptor:
    """The message type of a TYPE_MESSAGE field (never None for one)."""
    mt = fd.message_type
    assert mt is not None, fd.full_name
    return mt


# ---- the lenient twins --------------------------------------------------------------------
@cache
def _lenient_class(desc: Descriptor):
    pool = _lenient_pool(desc.file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(desc.full_name))


@cache
def _lenient_pool(file: FileDescriptor) -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    _add_file(pool, file, set())
    return pool


def _add_file(pool: descriptor_pool.DescriptorPool, fdesc: FileDescriptor, seen: set) -> None:
    if fdesc.name in seen:
        return
    seen.add(fdesc.name)
    for dep in fdesc.dependencies:
        _add_file(pool, dep, seen)
    proto = descriptor_pb2.FileDescriptorProto()
    fdesc.CopyToProto(proto)

    def loosen(messages) -> None:
        for m in messages:
            if m.options.map_entry:
                # A map entry is wire-identical to a message {key = 1; value = 2;}; as a plain
                # message its key may be bytes (map keys may not) and the map a repeated field.
                m.options.ClearField("map_entry")
            for f in m.field:
                if f.type == f.TYPE_STRING:
                    f.type = f.TYPE_BYTES
            loosen(m.nested_type)

    loosen(proto.message_type)
    pool.Add(proto)
