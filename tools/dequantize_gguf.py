#!/usr/bin/env python3
"""Rewrite a GGUF so that every matrix is of a type tinyserve computes with: tensors of types it
cannot use (K-quants, Q5_0, ...) are dequantized with the gguf package and stored as F16; F32,
F16 and Q8_0 tensors and all metadata are copied unchanged.

    python tools/dequantize_gguf.py gemma-3-270m-q4_k_m.gguf /tmp/gemma-3-270m-f16.gguf
"""

from __future__ import annotations

import argparse

import gguf
import numpy as np

KEEP = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    args = ap.parse_args()
    r = gguf.GGUFReader(args.src)
    w = gguf.GGUFWriter(args.dst, r.fields["general.architecture"].contents())
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), field.types[0], sub)
    for t in r.tensors:
        if t.tensor_type in KEEP:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
        else:
            shape = list(reversed([int(n) for n in t.shape]))
            w.add_tensor(
                t.name, gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float16)
            )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
