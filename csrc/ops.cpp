// ops.cpp — matmul driver and row-wise helpers. No intrinsics here: the ISA files own those.
#include "ops.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "memory.h"
#include "threadpool.h"

namespace ts {

namespace {
thread_local streamed_vector<uint8_t> t_act;  // quantized activations (per calling thread)
}

namespace {

// Quantize m activation rows to `type` once (in parallel for prefill-sized batches).
const uint8_t* quantize_activations(const IsaTable& isa, DType type, const float* X, int m, int n, size_t stride) {
    const TypeKernels* ak = isa.types[static_cast<uint32_t>(type)];
    quantize_row_fn q = ak ? ak->from_float : nullptr;
    if (t_act.size() < stride * m) t_act.resize(stride * m);
    uint8_t* buf = t_act.data();
    auto one = [&](int r) {
        if (q)
            q(X + (size_t)r * n, buf + r * stride, n);
        else
            quantize_row_ref(type, X + (size_t)r * n, buf + r * stride, n);
    };
    // A parallel region costs more than quantizing a decode batch (32 rows of 576 take ~10 us)
    if ((int64_t)m * n >= (1 << 17))
        parallel_for(m, [&](int r, int) { one(r); });
    else
        for (int r = 0; r < m; r++) one(r);
    return buf;
}

}  // namespace

void matmul_multi(const IsaTable& isa, const Tensor* const* Ws, float* const* Ys, int n_w, const float* X, int m) {
    const TypeKernels* k0 = isa.types[static_cast<uint32_t>(Ws[0]->type)];
    bool same_act = true;
    for (int i = 0; i < n_w; i++) {
        const TypeKernels* ki = isa.types[static_cast<uint32_t>(Ws[i]->type)];
        if (!ki) throw std::runtime_error("no kernel for tensor " + Ws[i]->name);
        if (ki->vec_dot_type != k0->vec_dot_type || Ws[i]->ne[0] != Ws[0]->ne[0]) same_act = false;
    }
    if (!same_act) {  // different activation types: one matrix at a time
        for (int i = 0; i < n_w; i++) matmul_multi(isa, &Ws[i], &Ys[i], 1, X, m);
        return;
    }
    const int n = (int)Ws[0]->ne[0];

    // 1. activations -> the kernels' activation type, once for all weight rows of all matrices
    const uint8_t* A = reinterpret_cast<const uint8_t*>(X);
    size_t a_stride = (size_t)n * sizeof(float);
    if (k0->vec_dot_type != DType::F32) {
        a_stride = row_bytes(k0->vec_dot_type, n);
        A = quantize_activations(isa, k0->vec_dot_type, X, m, n, a_stride);
    }

    // 2. split weight rows into chunks; each chunk multiplies against every activation row.
    //    The chunk size never changes what a (row, activation) product computes.
    int total_rows = 0;
    for (int i = 0; i < n_w; i++) total_rows += (int)Ws[i]->ne[1];
    const int n_threads = get_num_threads();
    struct Task {
        int w, r0, nr;
    };
    std::vector<Task> tasks;
    // Two contiguous row ranges per thread. The pool gives each thread a contiguous share of the
    // tasks, so a thread's ranges follow one another in memory and its weights stream as one run;
    // the second range is what another thread can steal when this one is late. GEMM (m >= 8): each
    // call unpacks the activations, so few big calls. GEMV: measured on a Zen 4 (one sequence,
    // SmolLM2), 4 ranges a thread were 3-7% slower than 2 and 1 the same as 2.
    const int tasks_per_thread = 2;
    const int target = std::max(m >= 8 ? 4 : 16, total_rows / (tasks_per_thread * n_threads));
    for (int i = 0; i < n_w; i++) {
        const int rows = (int)Ws[i]->ne[1], u = Ws[i]->packed ? kPackRows : 4;  // packed: whole groups
        const int parts = std::max(1, (rows + target / 2) / target);
        int per = (rows + parts - 1) / parts;
        per = (per + u - 1) / u * u;
        for (int r0 = 0; r0 < rows; r0 += per) tasks.push_back({i, r0, std::min(per, rows - r0)});
    }
    parallel_for((int)tasks.size(), [&](int ti, int) {
        const Task& t = tasks[ti];
        const Tensor& W = *Ws[t.w];
        const TypeKernels* k = isa.types[static_cast<uint32_t>(W.type)];
        const int rows = (int)W.ne[1];
        const uint8_t* w = static_cast<const uint8_t*>(W.data) + (size_t)t.r0 * W.row_bytes;
        float* Y = Ys[t.w] + t.r0;
        if (W.packed) {
            k->gemm_x16(n, t.nr, m, w, (size_t)kPackRows * W.row_bytes, A, a_stride, Y, (size_t)rows);
        } else if (k->gemm) {
            k->gemm(n, t.nr, m, w, W.row_bytes, A, a_stride, Y, (size_t)rows);
        } else {
            for (int c = 0; c < m; c++)
                for (int r = 0; r < t.nr; r++)
                    k->vec_dot(n, Y + (size_t)c * rows + r, w + (size_t)r * W.row_bytes, A + c * a_stride);
        }
    });
}

void matmul(const IsaTable& isa, const Tensor& W, const float* X, int m, float* Y) {
    const Tensor* ws[1] = {&W};
    float* ys[1] = {Y};
    matmul_multi(isa, ws, ys, 1, X, m);
}

void rmsnorm_rows(const IsaTable& isa, const float* x, const float* w, float eps, int m, int n, float* y) {
    auto one = [&](int r) { isa.ops.rmsnorm(n, x + (size_t)r * n, w, eps, y + (size_t)r * n); };
    if (m >= 64)
        parallel_for(m, [&](int r, int) { one(r); });
    else
        for (int r = 0; r < m; r++) one(r);
}

void get_row(const Tensor& W, int64_t row, float* out) {
    const uint8_t* p = static_cast<const uint8_t*>(W.data) + (size_t)row * W.row_bytes;
    if (W.packed) {  // row `row` of its 16-row group, back in the file's layout
        thread_local std::vector<uint8_t> tmp;
        tmp.resize(W.row_bytes);
        const uint8_t* group =
            static_cast<const uint8_t*>(W.data) + (size_t)(row / kPackRows) * kPackRows * W.row_bytes;
        unpack_x16_row(W.type, group, W.ne[0], (int)(row % kPackRows), tmp.data());
        p = tmp.data();
    }
    dequantize_row_ref(W.type, p, out, W.ne[0]);
}

}  // namespace ts
