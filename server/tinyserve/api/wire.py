"""Request decoding that turns malformed bytes into INVALID_ARGUMENT instead of INTERNAL.

protobuf's Python runtime refuses a `string` field holding invalid UTF-8 at parse time
(DecodeError). grpc would answer such a request with INTERNAL ("Exception deserializing request")
before any handler runs. Our deserializer catches the error and hands the handler a
MalformedRequest naming the field, so the client sees INVALID_ARGUMENT with a BadRequest field
violation like `messages[1].content: not valid UTF-8`.

To find the field we parse the bytes again with a "lenient twin" of the request message: the
same schema with every `string` turned into `bytes` (wire-compatible), built once in a private
descriptor pool.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from tinyserve.api.errors import FieldViolation, InvalidArgument


@dataclass
class MalformedRequest:
    """Stands in for a request whose bytes could not be parsed."""

    error: InvalidArgument


def tolerant_deserializer(cls):
    """A request_deserializer for `cls` that returns MalformedRequest instead of raising."""

    def deserialize(data: bytes):
        try:
            return cls.FromString(data)
        except DecodeError:
            return MalformedRequest(InvalidArgument(_explain(cls, data)))
    return deserialize


def _explain(cls, data: bytes) -> list[FieldViolation]:
    try:
        twin = _lenient_class(cls.DESCRIPTOR.file.name, cls.DESCRIPTOR.full_name).FromString(data)
    except DecodeError:
        return [FieldViolation("", "the request is not a valid protobuf message")]
    bad = list(_bad_utf8(twin, cls.DESCRIPTOR, ""))
    return bad or [FieldViolation("", "the request is not a valid protobuf message")]


def _bad_utf8(twin, desc, prefix: str):
    """Paths of string fields (per the real descriptor `desc`) whose bytes are not UTF-8."""
    for fd, value in twin.ListFields():
        real = desc.fields_by_name[fd.name]
        path = f"{prefix}{fd.name}"
        repeated = not isinstance(value, (bytes, Message))  # FieldDescriptor.label left protobuf 7
        items = list(enumerate(value)) if repeated else [(None, value)]
        for i, item in items:
            p = path if i is None else f"{path}[{i}]"
            if real.type == real.TYPE_STRING:
                try:
                    item.decode("utf-8")
                except UnicodeDecodeError:
                    yield FieldViolation(p, "not valid UTF-8")
            elif real.type == real.TYPE_MESSAGE:
                yield from _bad_utf8(item, real.message_type, p + ".")


@lru_cache(maxsize=None)
def _lenient_class(file_name: str, message_name: str):
    pool = _lenient_pool(file_name)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(message_name))


@lru_cache(maxsize=None)
def _lenient_pool(file_name: str) -> descriptor_pool.DescriptorPool:
    src = descriptor_pool.Default().FindFileByName(file_name)
    pool = descriptor_pool.DescriptorPool()
    _add_file(pool, src, set())
    return pool


def _add_file(pool, fdesc, seen: set) -> None:
    if fdesc.name in seen:
        return
    seen.add(fdesc.name)
    for dep in fdesc.dependencies:
        _add_file(pool, dep, seen)
    proto = descriptor_pb2.FileDescriptorProto()
    fdesc.CopyToProto(proto)

    def loosen(messages):
        for m in messages:
            for f in m.field:
                if m.options.map_entry and f.name == "key":
                    continue  # map keys cannot be bytes (no request has a map: nothing lost)
                if f.type == f.TYPE_STRING:
                    f.type = f.TYPE_BYTES
            loosen(m.nested_type)
    loosen(proto.message_type)
    pool.Add(proto)
