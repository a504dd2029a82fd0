"""The packed path's batch-invariance check, shared by test_kernels.py and test_kquants.py: every
tile shape, chunk of rows and batch gives a (weight row, activation row) pair the same bits as
computing it alone."""

from __future__ import annotations

import numpy as np

from tinyserve import _core

K = _core.kernels


def assert_packed_batch_invariant(isa: str, name: str, w, x, n: int, chunks: tuple[int, ...]) -> None:
    """w: 64 packed-able weight rows of `name`; x: 19 activation rows of length n."""
    full = K.matmul(name, w, x, n, isa=isa, packed=True)
    alone = K.matmul(name, w, x, n, isa=isa, packed=True, use_gemm=False)
    assert np.array_equal(full, alone), f"{isa} {name} n={n}: batched != one row at a time"
    for chunk in chunks:
        assert np.array_equal(full, K.matmul(name, w, x, n, isa=isa, packed=True, chunk=chunk)), (isa, name, n, chunk)
    for m in [1, 2, 3, 4, 5, 7, 8, 9]:
        for off in [0, 1, 6]:
            sub = K.matmul(name, w[16:], x[off : off + m], n, isa=isa, packed=True)
            assert np.array_equal(sub, full[off : off + m, 16:]), f"{isa} {name} n={n} m={m} off={off}"
