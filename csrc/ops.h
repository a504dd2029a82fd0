// ops.h — the layer's building blocks over rows of activations, parallelised on the compute pool.
#pragma once
#include <cstdint>
#include <vector>
#include "kernels/kernels.h"
#include "model.h"

namespace ts {

// Y[m, W.ne[1]] = X[m, W.ne[0]] @ W^T. X rows are quantized once to the kernel's activation type;
// output rows of W are split across the pool. Each Y element is computed with the same arithmetic
// whatever m is (batch invariance).
void matmul(const IsaTable& isa, const Tensor& W, const float* X, int m, float* Y);
// Several matrices over the same input (q/k/v, gate/up) in one parallel region, quantizing X once.
void matmul_multi(const IsaTable& isa, const Tensor* const* Ws, float* const* Ys, int n_w, const float* X, int m);

// y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, for m rows of n.
void rmsnorm_rows(const IsaTable& isa, const float* x, const float* w, float eps, int m, int n, float* y);

// Dequantize one row of W (e.g. an embedding row).
void get_row(const Tensor& W, int64_t row, float* out);

}  // namespace ts
