"""The GGUF reader (csrc/gguf.cpp through `_core.read_gguf`): well-formed files read exactly as
gguf-py reads them, and every kind of malformed file gives a GGUFError naming the problem, never
a crash. Hostile bytes come from gguf_craft, which encodes each field separately."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import gguf
import gguf_craft as gc
import numpy as np
import pytest
from gguf_craft import ARRAY, STRING, U8, U32, Tensor, craft, gstr, kv, tensor_info, u32, u64

_core = pytest.importorskip("tinyserve._core")
QT = gguf.GGMLQuantizationType


def write(tmp_path: Path, data: bytes, name: str = "m.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def reader_view(path: Path) -> dict:
    """What gguf-py (an independent reader) sees, in read_gguf's shape."""
    r = gguf.GGUFReader(path)
    meta = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY and f.types[-1] == gguf.GGUFValueType.BOOL:
            meta[name] = [bool(x) for x in f.contents()]
        elif f.types[0] == gguf.GGUFValueType.BOOL:
            meta[name] = bool(f.contents())
        else:
            meta[name] = f.contents()
    tensors = [(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in r.tensors]
    return {"data_offset": r.data_offset, "metadata": meta, "tensors": tensors}


# --- well-formed files


def write_with_gguf_py(path: Path, alignment: int | None = None) -> None:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    gc.add_every_integer(w)
    w.add_float32("t.f32", 0.25)
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "ChatML {{ x }} ✓")
    w.add_array("t.strs", ["<s>", "", "Ġhello", "é"])
    w.add_array("t.ints", [3, -1, 2**20])
    w.add_array("t.floats", [0.5, -2.0, 3.25])
    w.add_array("t.bools", [True, False, True])
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 7)).astype(np.float16))
    for name, qt in (("q8_0", QT.Q8_0), ("q4_0", QT.Q4_0), ("q4_1", QT.Q4_1)):
        x = rng.standard_normal((4, 64)).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(x, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("alignment", [None, 64])
def test_gguf_py_file_reads_like_gguf_py(tmp_path, alignment):
    path = tmp_path / "ok.gguf"
    write_with_gguf_py(path, alignment)
    got = _core.read_gguf(str(path))
    want = reader_view(path)
    assert got["version"] == 3
    assert got["alignment"] == (alignment or 32)
    assert got["data_offset"] == want["data_offset"]
    assert got["data_offset"] % got["alignment"] == 0
    assert got["metadata"] == want["metadata"]
    assert got["tensors"] == want["tensors"]
    # spot checks that do not rely on gguf-py
    md = got["metadata"]
    assert md["t.u64"] == 2**64 - 1 and md["t.i64"] == -(2**63)
    assert md["t.bool"] is True and md["t.bools"] == [True, False, True]
    assert md["t.strs"] == ["<s>", "", "Ġhello", "é"]
    assert dict((n, (t, s)) for n, t, s in got["tensors"])["q4_1"] == ("Q4_1", (64, 4))


def test_crafted_file_values(tmp_path):
    data = gc.small_valid()
    got = _core.read_gguf(str(write(tmp_path, data)))
    md = got["metadata"]
    assert list(md) == [
        "general.architecture",
        "t.u8",
        "t.i8",
        "t.u16",
        "t.i16",
        "t.u32",
        "t.i32",
        "t.f32",
        "t.bool",
        "t.u64",
        "t.i64",
        "t.f64",
        "t.strs",
        "t.ints",
        "t.floats",
        "t.bools",
        "t.nested",
    ]
    assert (md["t.u8"], md["t.i8"], md["t.u16"], md["t.i16"]) == (200, -100, 60000, -30000)
    assert (md["t.u32"], md["t.i32"]) == (4_000_000_000, -2_000_000_000)
    assert (md["t.u64"], md["t.i64"]) == (2**63 + 5, -(2**62))
    assert (md["t.f32"], md["t.f64"], md["t.bool"]) == (1.5, -2.25, True)
    assert md["t.strs"] == ["a", "", "héllo"]
    assert md["t.ints"] == [1, -2, 3] and md["t.floats"] == [0.5, -1.0]
    assert md["t.bools"] == [True, False]
    assert md["t.nested"] == []  # nested arrays are validated, then stored empty
    assert got["tensors"] == [
        ("w.f32", "F32", (8, 2)),
        ("w.q8", "Q8_0", (32, 3)),
        ("w.q4", "Q4_1", (64,)),
        ("w.f16", "F16", (4, 1, 2, 2)),
    ]
    # w.f32 64 B at 0, w.q8 3*34 B at 64, w.q4 2*20 B at 192, w.f16 16*2 B at 256: 288 B of data
    assert len(data) - got["data_offset"] == 288 and got["data_offset"] % 32 == 0


def test_no_tensors_data_offset_is_padded_header(tmp_path):
    data = craft([kv("general.alignment", U32, 64), kv("a", STRING, "xyz")], alignment=64)
    got = _core.read_gguf(str(write(tmp_path, data)))
    assert got["alignment"] == 64 and got["tensors"] == []
    assert got["data_offset"] == len(data) and len(data) % 64 == 0


@pytest.mark.slow
def test_default_model_reads_like_gguf_py(default_model_path):
    got = _core.read_gguf(str(default_model_path))
    want = reader_view(default_model_path)
    assert got["data_offset"] == want["data_offset"]
    assert got["tensors"] == want["tensors"]
    assert got["metadata"] == want["metadata"]
    assert got["metadata"]["general.architecture"] == "llama"
    assert len(got["metadata"]["tokenizer.ggml.tokens"]) == 49152


# --- hostile files: each must give a GGUFError whose message names the problem

ARCH = kv("general.architecture", STRING, "llama")
W = [Tensor("w", [32, 2])]  # one F32 tensor, 256 bytes


HOSTILE = {
    # header
    "bad_magic": (craft([ARCH], magic=b"GGML"), r"not a GGUF file: bad magic 47 47 4d 4c"),
    "version_0": (craft([ARCH], version=0), r"unsupported GGUF version 0"),
    "version_1": (craft([ARCH], version=1), r"GGUF version 1 is not supported"),
    "version_4": (craft([ARCH], version=4), r"unsupported GGUF version 4"),
    "big_endian_crafted": (craft([ARCH], version=0x03000000), r"big-endian GGUF is not supported.*version 3"),
    "absurd_kv_count": (craft([ARCH], n_kv=2**40), r"kv_count 1099511627776 is impossible"),
    "kv_count_max": (craft([ARCH], n_kv=2**64 - 1), r"kv_count \d+ is impossible"),
    "absurd_tensor_count": (craft([ARCH], W, n_tensors=2**62), r"tensor_count 4611686018427387904 is impossible"),
    "kv_count_one_too_many": (craft([ARCH], n_kv=2, pad=False), r"truncated GGUF: metadata kv #1 key"),
    # metadata strings and arrays
    "huge_key_length": (
        craft([gstr("k", length=2**63) + u32(U8) + b"\x01"]),
        r"metadata kv #0 key length 9223372036854775808 .*exceeds the limit",
    ),
    "key_length_past_end": (
        craft([gstr("abc", length=1000) + u32(U8) + b"\x01"]),
        r"truncated GGUF: metadata kv #0 key length 1000 at offset 24",
    ),
    "empty_key": (craft([kv("", U8, 1)]), r"metadata kv #0 has an empty key"),
    "huge_string_value": (
        craft([gstr("k") + u32(STRING) + gstr("abc", length=2**60)]),
        r"metadata key 'k' string value length 1152921504606846976 .*only \d+ "
        r"bytes remain",
    ),
    "huge_array_length": (
        craft([gstr("k") + u32(ARRAY) + u32(U32) + u64(2**61) + u32(1)]),
        r"metadata key 'k' array of U32 has length 2305843009213693952",
    ),
    "array_length_one_too_many": (
        craft([gstr("k") + u32(ARRAY) + u32(U32) + u64(3) + u32(1) * 2], pad=False),
        r"metadata key 'k' array of U32 has length 3",
    ),
    "huge_string_array_length": (
        craft([gstr("k") + u32(ARRAY) + u32(STRING) + u64(2**40)]),
        r"metadata key 'k' array of STRING has length 1099511627776",
    ),
    "string_array_element_lies": (
        craft([gstr("k") + u32(ARRAY) + u32(STRING) + u64(2) + gstr("a") + gstr("b", length=99)]),
        r"metadata key 'k' string element #1 length 99",
    ),
    "unknown_value_type": (craft([ARCH, kv("k", U8, 1, type_id=13)]), r"metadata key 'k' has unknown value type 13"),
    "unknown_value_type_huge": (
        craft([kv("k", U32, 1, type_id=0xFFFFFFFF)]),
        r"metadata key 'k' has unknown value type 4294967295",
    ),
    "unknown_array_elem_type": (
        craft([gstr("k") + u32(ARRAY) + u32(99) + u64(0)]),
        r"metadata key 'k' has an array of unknown value type 99",
    ),
    "nested_arrays_too_deep": (
        craft([gstr("k") + u32(ARRAY) + (u32(ARRAY) + u64(1)) * 6 + u32(U8) + u64(0)]),
        r"metadata key 'k' arrays nested deeper than \d+ levels",
    ),
    "duplicate_key": (craft([ARCH, kv("a", U8, 1), kv("a", U8, 2)]), r"duplicate metadata key 'a'"),
    # alignment
    "alignment_0": (
        craft([kv("general.alignment", U32, 0)], W),
        r"'general.alignment' is 0, expected a nonzero power of two",
    ),
    "alignment_3": (
        craft([kv("general.alignment", U32, 3)], W),
        r"'general.alignment' is 3, expected a nonzero power of two",
    ),
    # below the spec's multiple of 8, tensor data could start at any byte (misaligned float loads)
    "alignment_1": (
        craft([kv("general.alignment", U32, 1)], W),
        r"'general.alignment' is 1, expected a nonzero power of two of at least 8",
    ),
    "alignment_4": (
        craft([kv("general.alignment", U32, 4)], W, alignment=4),
        r"'general.alignment' is 4, expected a nonzero power of two of at least 8",
    ),
    "alignment_string": (
        craft([kv("general.alignment", STRING, "32")], W),
        r"'general.alignment' has type STRING, expected an integer",
    ),
    # tensor infos
    "empty_tensor_name": (
        craft([ARCH], [tensor_info("", [32], gc.T_F32, 0)], data=bytes(128)),
        r"tensor info #0 has an empty name",
    ),
    "huge_tensor_name": (
        craft([ARCH], [gstr("w", length=2**40)]),
        r"tensor info #0 name length 1099511627776 .*exceeds the limit",
    ),
    "unknown_tensor_type": (
        craft([ARCH], [tensor_info("w", [32], 77, 0)], data=bytes(128)),
        r"tensor 'w' has unknown tensor type id 77",
    ),
    "unknown_tensor_type_huge": (
        craft([ARCH], [tensor_info("w", [32], 2**32 - 1, 0)]),
        r"tensor 'w' has unknown tensor type id 4294967295",
    ),
    "n_dims_0": (
        craft([ARCH], [tensor_info("w", [], gc.T_F32, 0)], data=bytes(128)),
        r"tensor 'w' has n_dims 0 .*expected 1\.\.4",
    ),
    "n_dims_5": (
        craft([ARCH], [tensor_info("w", [1, 1, 1, 1, 32], gc.T_F32, 0)], data=bytes(128)),
        r"tensor 'w' has n_dims 5",
    ),
    "n_dims_lies": (
        craft([ARCH], [tensor_info("w", [32], gc.T_F32, 0, n_dims=3)]),
        r"tensor 'w' has dimension ne\[1\] = 0|truncated GGUF: tensor 'w'",
    ),
    "zero_dim": (
        craft([ARCH], [tensor_info("w", [32, 0], gc.T_F32, 0)], data=bytes(128)),
        r"tensor 'w' has dimension ne\[1\] = 0 .*expected >= 1",
    ),
    "negative_dim": (
        craft([ARCH], [tensor_info("w", [2**64 - 1], gc.T_F32, 0)], data=bytes(128)),
        r"tensor 'w' has dimension ne\[0\] = -1 ",
    ),
    "dims_product_overflows": (
        craft([ARCH], [tensor_info("w", [2**32, 2**32], gc.T_F32, 0)]),
        r"tensor 'w': the element count of its shape overflows",
    ),
    "dims_product_past_int64": (
        craft([ARCH], [tensor_info("w", [2**32, 2**31], gc.T_F32, 0)]),
        r"tensor 'w': the element count of its shape overflows",
    ),
    "bytes_overflow": (
        craft([ARCH], [tensor_info("w", [2**31, 2**31], gc.T_F32, 0)]),
        r"tensor 'w': its byte size overflows",
    ),
    "row_not_block_multiple": (
        craft([ARCH], [tensor_info("w", [33, 2], gc.T_Q4_0, 0)], data=bytes(128)),
        r"tensor 'w': row length ne\[0\] = 33 is not a multiple of the "
        r"Q4_0 block size 32",
    ),
    "duplicate_tensor_name": (craft([ARCH], [Tensor("w", [8]), Tensor("w", [8])]), r"duplicate tensor 'w'"),
    # data placement
    "offset_past_end": (
        craft([ARCH], [Tensor("w", [32], offset=4096)], data=bytes(128)),
        r"tensor 'w' data \(offset 4096 .*lies outside the file",
    ),
    "data_one_byte_short": (craft([ARCH], W)[:-1], r"tensor 'w' data .*lies outside the file"),
    "offset_plus_size_wraps": (
        craft([ARCH], [Tensor("w", [32], offset=2**64 - 64)], data=bytes(128)),
        r"tensor 'w' data .*lies outside the file",
    ),
    "misaligned_offset": (
        craft([ARCH], [Tensor("w", [8], offset=4)], data=bytes(128)),
        r"tensor 'w' has data offset 4 .*not a multiple of the alignment 32",
    ),
    "misaligned_custom_alignment": (
        craft([kv("general.alignment", U32, 64)], [Tensor("w", [8], offset=32)], alignment=64, data=bytes(128)),
        r"data offset 32 .*not a multiple of the alignment 64",
    ),
    "overlapping_tensors": (
        craft([ARCH], [Tensor("a", [32]), Tensor("b", [16], offset=64)]),
        r"tensor 'b' data \[64, 128\) overlaps tensor 'a' data \[0, 128\)",
    ),
    "same_offset_tensors": (
        craft([ARCH], [Tensor("b", [8], offset=32), Tensor("a", [8], offset=32)], data=bytes(64)),
        r"tensor '[ab]' data \[32, 64\) overlaps tensor '[ab]'",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_file_is_refused(tmp_path, case):
    data, pattern = HOSTILE[case]
    path = write(tmp_path, data)
    with pytest.raises(_core.GGUFError, match=pattern) as exc:
        _core.read_gguf(str(path))
    assert str(path) in str(exc.value)  # the message names the file
    assert isinstance(exc.value, ValueError)


def test_big_endian_file_from_gguf_py(tmp_path):
    path = tmp_path / "be.gguf"
    w = gguf.GGUFWriter(path, "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_uint32("x", 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(_core.GGUFError, match=r"big-endian GGUF is not supported.*version 3"):
        _core.read_gguf(str(path))


def test_not_a_file(tmp_path):
    with pytest.raises(_core.GGUFError, match=r"is a directory"):
        _core.read_gguf(str(tmp_path))
    with pytest.raises(_core.GGUFError, match=r"empty file"):
        _core.read_gguf(str(write(tmp_path, b"")))
    missing = tmp_path / "nope.gguf"
    with pytest.raises(_core.GGUFError, match=re.escape(str(missing)) + r".*No such file"):
        _core.read_gguf(str(missing))
    with pytest.raises(_core.GGUFError, match=r"not a regular file"):
        _core.read_gguf("/dev/null")


def test_model_refuses_malformed_file(tmp_path):
    """The engine goes through the same reader: a broken file is a GGUFError, not a crash."""
    path = write(tmp_path, craft([ARCH], [Tensor("w", [32], offset=4096)], data=bytes(128)))
    with pytest.raises(_core.GGUFError, match=r"lies outside the file"):
        _core.Model(str(path))


# --- truncation and corruption sweeps, in a child process so a crash fails the test cleanly

SWEEP = r"""
import os, random, re, sys
from tinyserve import _core
data = open(sys.argv[1], "rb").read()
out = sys.argv[2]
def put(b):  # a fresh file each time: truncating a just-mapped file is slow on some filesystems
    if os.path.exists(out):
        os.unlink(out)
    with open(out, "xb") as f:
        f.write(b)
# every cut in the first 8 KiB (all of the header), then a stride through the data
cuts = sorted(set(range(0, min(len(data), 8192))) | set(range(0, len(data), 61)))
for n in cuts:
    put(data[:n])
    try:
        _core.read_gguf(out)
    except _core.GGUFError as e:
        msg = str(e)
        assert re.search("truncated GGUF|empty file|outside the file|impossible|bytes remain",
                         msg), (n, msg)
    else:
        raise SystemExit(f"truncated at {n} of {len(data)} bytes but parsed")
# random byte corruption of the header: parse or GGUFError, nothing else
rng = random.Random(1234)
n_ok = n_err = 0
for _ in range(5000):
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        b[rng.randrange(min(len(b), 2048))] = rng.randrange(256)
    put(b)
    try:
        _core.read_gguf(out)
        n_ok += 1
    except _core.GGUFError:
        n_err += 1
print("cuts", len(cuts), "ok", n_ok, "err", n_err)
"""


@pytest.mark.parametrize("source", ["crafted", "gguf_py"])
def test_truncation_and_byte_flip_sweep(tmp_path, source):
    src = tmp_path / "src.gguf"
    if source == "crafted":
        src.write_bytes(gc.small_valid())
    else:
        write_with_gguf_py(src)
    _core.read_gguf(str(src))  # the untouched file is valid
    r = subprocess.run(
        [sys.executable, "-c", SWEEP, str(src), str(tmp_path / "cut.gguf")], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    m = re.search(r"cuts (\d+) ok (\d+) err (\d+)", r.stdout)
    assert m and int(m[1]) > 100 and int(m[3]) > 0, r.stdout


def test_array_longer_than_the_limit(tmp_path):
    """Arrays are capped at 16M elements (real vocabularies have < 1M) so a file cannot make the
    reader allocate 8 bytes per 1-byte element without bound."""
    n = (1 << 24) + 1
    data = craft([gstr("k") + u32(ARRAY) + u32(U8) + u64(n) + bytes(n)])
    with pytest.raises(
        _core.GGUFError,
        match=r"metadata key 'k' array length 16777217 .*exceeds the "
        r"limit of 16777216 elements",
    ):
        _core.read_gguf(str(write(tmp_path, data)))


LLAMA_HP = [
    kv("llama.block_count", U32, 1),
    kv("llama.embedding_length", U32, 64),
    kv("llama.feed_forward_length", U32, 96),
    kv("llama.attention.head_count", U32, 4),
]


@pytest.mark.parametrize(
    "kvs, pattern",
    [
        ([], r"missing required metadata key 'general.architecture'"),
        ([kv("general.architecture", U32, 7)], r"metadata key 'general.architecture' has type U32, expected STRING"),
        (
            [ARCH, kv("llama.block_count", STRING, "30")],
            r"metadata key 'llama.block_count' has type STRING, expected an integer",
        ),
        (
            [ARCH, kv("llama.block_count", ARRAY, (U32, [30]))],
            r"metadata key 'llama.block_count' has type ARRAY of U32, expected an integer",
        ),
        (
            [ARCH, kv("llama.block_count", gc.U64, 2**64 - 1)],
            r"metadata key 'llama.block_count' value 18446744073709551615 does not fit in int64",
        ),
        (
            [ARCH, *LLAMA_HP, kv("llama.rope.freq_base", STRING, "1e4")],
            r"metadata key 'llama.rope.freq_base' has type STRING, expected a number",
        ),
    ],
    ids=["missing", "arch_u32", "int_as_string", "int_as_array", "u64_too_big", "float_as_string"],
)
def test_typed_getters_name_key_and_types(tmp_path, kvs, pattern):
    """GGUFFile's typed getters, as the model loader uses them on the metadata."""
    with pytest.raises(_core.GGUFError, match=pattern):
        _core.Model(str(write(tmp_path, craft(kvs))))
