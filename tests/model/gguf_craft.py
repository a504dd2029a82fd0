"""Hand-crafted GGUF bytes for the malformed-file tests.

Each piece of a GGUF file is encoded by its own small function, so a test can corrupt exactly one
field (a length, a count, a type id, an offset) and leave the rest well formed. `craft()` joins
the pieces into a whole file: header, key/values, tensor infos, padding, data.

Layout (little-endian): "GGUF" u32 version u64 tensor_count u64 kv_count | kvs | tensor infos |
pad to alignment | data. A string is u64 length + bytes; a kv is string key, u32 type, value; an
array value is u32 element type, u64 length, elements; a tensor info is string name, u32 n_dims,
u64 ne[n_dims], u32 ggml type, u64 offset (relative to the data section).
"""

from __future__ import annotations

import dataclasses
import struct

# GGUF metadata value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_SCALAR_FMT = {
    U8: "B",
    I8: "b",
    U16: "H",
    I16: "h",
    U32: "I",
    I32: "i",
    F32: "f",
    BOOL: "?",
    U64: "Q",
    I64: "q",
    F64: "d",
}

# ggml tensor types: id -> (block size, bytes per block)
T_F32, T_F16, T_Q4_0, T_Q4_1, T_Q8_0 = 0, 1, 2, 3, 8
TENSOR_BLOCKS = {T_F32: (1, 4), T_F16: (1, 2), T_Q4_0: (32, 18), T_Q4_1: (32, 20), T_Q8_0: (32, 34)}


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def gstr(s: str | bytes, length: int | None = None) -> bytes:
    """A GGUF string; `length` overrides the stored length (to lie about it)."""
    b = s.encode() if isinstance(s, str) else s
    return u64(len(b) if length is None else length) + b


def value(vtype: int, v) -> bytes:
    """Encodes a value of type `vtype`. Arrays take (elem_type, list)."""
    if vtype == STRING:
        return gstr(v)
    if vtype == ARRAY:
        etype, items = v
        return u32(etype) + u64(len(items)) + b"".join(value(etype, x) for x in items)
    return struct.pack("<" + _SCALAR_FMT[vtype], v)


def kv(key: str | bytes, vtype: int, v, *, type_id: int | None = None) -> bytes:
    """One metadata key/value; `type_id` overrides the stored type (the value stays `vtype`)."""
    return gstr(key) + u32(vtype if type_id is None else type_id) + value(vtype, v)


def tensor_info(name: str | bytes, ne: list[int], ttype: int, offset: int, *, n_dims: int | None = None) -> bytes:
    """One tensor info; `n_dims` overrides the stored dimension count."""
    return (
        gstr(name)
        + u32(len(ne) if n_dims is None else n_dims)
        + b"".join(u64(d) for d in ne)
        + u32(ttype)
        + u64(offset)
    )


def nbytes(ne: list[int], ttype: int) -> int:
    bs, bb = TENSOR_BLOCKS[ttype]
    n = 1
    for d in ne:
        n *= d
    return n // bs * bb


@dataclasses.dataclass
class Tensor:
    name: str
    ne: list[int]
    ttype: int = T_F32
    offset: int | None = None  # None: placed after the previous tensor, aligned


def craft(
    kvs: list[bytes] = (),
    tensors: list[Tensor | bytes] = (),
    *,
    magic: bytes = b"GGUF",
    version: int = 3,
    n_tensors: int | None = None,
    n_kv: int | None = None,
    alignment: int = 32,
    data: bytes | None = None,
    fill: int = 0x5A,
    pad: bool = True,
) -> bytes:
    """A whole file. `tensors` are Tensor (encoded and placed here) or raw info bytes. The data
    section holds every Tensor's bytes (filled with `fill`) unless `data` is given. `pad=False`
    ends the file right after the tensor infos (no padding, no data)."""
    infos, end = [], 0
    for t in tensors:
        if isinstance(t, bytes):
            infos.append(t)
            continue
        off = t.offset
        if off is None:
            off = -(-end // alignment) * alignment
        infos.append(tensor_info(t.name, t.ne, t.ttype, off))
        end = max(end, off + nbytes(t.ne, t.ttype))
    head = (
        magic
        + u32(version)
        + u64(len(tensors) if n_tensors is None else n_tensors)
        + u64(len(kvs) if n_kv is None else n_kv)
        + b"".join(kvs)
        + b"".join(infos)
    )
    if not pad:
        return head
    return head + b"\0" * (-len(head) % alignment) + (bytes([fill]) * end if data is None else data)


def small_valid() -> bytes:
    """A small well-formed file touching every part of the format: scalar kvs of every type, a
    string, arrays of ints/floats/strings/bools and a nested array, and four tensors."""
    kvs = [
        kv("general.architecture", STRING, "llama"),
        kv("t.u8", U8, 200),
        kv("t.i8", I8, -100),
        kv("t.u16", U16, 60000),
        kv("t.i16", I16, -30000),
        kv("t.u32", U32, 4_000_000_000),
        kv("t.i32", I32, -2_000_000_000),
        kv("t.f32", F32, 1.5),
        kv("t.bool", BOOL, True),
        kv("t.u64", U64, 2**63 + 5),
        kv("t.i64", I64, -(2**62)),
        kv("t.f64", F64, -2.25),
        kv("t.strs", ARRAY, (STRING, ["a", "", "héllo"])),
        kv("t.ints", ARRAY, (I32, [1, -2, 3])),
        kv("t.floats", ARRAY, (F32, [0.5, -1.0])),
        kv("t.bools", ARRAY, (BOOL, [True, False])),
        kv("t.nested", ARRAY, (ARRAY, [(U8, [1, 2]), (STRING, ["x"])])),
    ]
    tensors = [
        Tensor("w.f32", [8, 2], T_F32),
        Tensor("w.q8", [32, 3], T_Q8_0),
        Tensor("w.q4", [64], T_Q4_1),
        Tensor("w.f16", [4, 1, 2, 2], T_F16),
    ]
    return craft(kvs, tensors)


def add_every_integer(w) -> None:
    """Through gguf-py's GGUFWriter `w` (the well-formed files of the tests and the fuzz seeds): one
    key of each integer type, t.u8 ... t.i64, most at an extreme of their range."""
    w.add_uint8("t.u8", 7)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 65535)
    w.add_int16("t.i16", -32768)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -5)
    w.add_uint64("t.u64", 2**64 - 1)
    w.add_int64("t.i64", -(2**63))
