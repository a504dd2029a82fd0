// ops.cpp — matmul driver and row-wise helpers. No intrinsics here: the ISA files own those.
#include "ops.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "threadpool.h"

namespace ts {

namespace {
thread_local std::vector<uint8_t> t_act;  // quantized activations (per calling thread)
}

void matmul(const IsaTable& isa, const Tensor& W, const float* X, int m, float* Y) {
    const TypeKernels* k = isa.types[static_cast<uint32_t>(W.type)];
    if (!k) throw std::runtime_error("no kernel for tensor " + W.name);
    const int n = (int)W.ne[0];
    const int rows = (int)W.ne[1];

    // 1. activations -> the kernel's activation type, once for all weight rows
    const void* A = X;
    size_t a_stride = (size_t)n * sizeof(float);
    if (k->vec_dot_type != DType::F32) {
        const TypeKernels* ak = isa.types[static_cast<uint32_t>(k->vec_dot_type)];
        quantize_row_fn q = ak ? ak->from_float : nullptr;
        a_stride = row_bytes(k->vec_dot_type, n);
        if (t_act.size() < a_stride * m) t_act.resize(a_stride * m);
        uint8_t* buf = t_act.data();
        if (q) {
            if (m >= 8) {
                parallel_for(m, [&](int r, int) { q(X + (size_t)r * n, buf + r * a_stride, n); });
            } else {
                for (int r = 0; r < m; r++) q(X + (size_t)r * n, buf + r * a_stride, n);
            }
        } else {
            for (int r = 0; r < m; r++) quantize_row_ref(k->vec_dot_type, X + (size_t)r * n, buf + r * a_stride, n);
        }
        A = buf;
    }

    // 2. split weight rows into chunks; each chunk multiplies against every activation row
    int chunk = 16;
    const int n_threads = get_num_threads();
    // enough tasks for load balance, chunks big enough to amortise scheduling
    while (chunk > 4 && (rows + chunk - 1) / chunk < 4 * n_threads) chunk /= 2;
    if ((size_t)rows * n * std::max(m, 1) > (size_t)64 << 20) chunk = std::max(chunk, 32);
    const int n_tasks = (rows + chunk - 1) / chunk;
    const uint8_t* wbase = static_cast<const uint8_t*>(W.data);
    const size_t wstride = W.row_bytes;
    const uint8_t* abase = static_cast<const uint8_t*>(A);
    parallel_for(n_tasks, [&](int t, int) {
        const int r0 = t * chunk;
        const int nr = std::min(chunk, rows - r0);
        if (k->gemm) {
            k->gemm(n, nr, m, wbase + (size_t)r0 * wstride, wstride, abase, a_stride, Y + r0, (size_t)rows);
        } else {
            for (int c = 0; c < m; c++)
                for (int r = 0; r < nr; r++)
                    k->vec_dot(n, Y + (size_t)c * rows + r0 + r, wbase + (size_t)(r0 + r) * wstride,
                               abase + c * a_stride);
        }
    });
}

void rmsnorm_rows(const IsaTable& isa, const float* x, const float* w, float eps, int m, int n, float* y) {
    auto one = [&](int r) { isa.ops.rmsnorm(n, x + (size_t)r * n, w, eps, y + (size_t)r * n); };
    if (m >= 64) parallel_for(m, [&](int r, int) { one(r); });
    else for (int r = 0; r < m; r++) one(r);
}

void get_row(const Tensor& W, int64_t row, float* out) {
    const uint8_t* p = static_cast<const uint8_t*>(W.data) + (size_t)row * W.row_bytes;
    dequantize_row_ref(W.type, p, out, W.ne[0]);
}

}  // namespace ts
