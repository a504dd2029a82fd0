// bindings_kernels.cpp — the `_core.kernels` submodule: kernel-level entry points for tests and
// micro-benchmarks (quantize/dequantize rows, matmul through any ISA's table, the ops kernels).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/kernels.h"
#include "quant.h"
#include "threadpool.h"

namespace py = pybind11;
using namespace ts;

namespace {

using f32_array = py::array_t<float, py::array::c_style | py::array::forcecast>;
using u8_array = py::array_t<uint8_t, py::array::c_style>;

DType parse_type(const std::string& name) {
    for (uint32_t id = 0; id < static_cast<uint32_t>(kMaxDTypeId); ++id) {
        const DTypeInfo& info = dtype_info(id);
        if (info.name && name == info.name) return static_cast<DType>(id);
    }
    throw py::value_error("unknown tensor type '" + name + "'");
}

const IsaTable& pick_table(const std::string& isa) {
    if (isa.empty()) return active_table();
    return table_for(parse_isa(isa.c_str()));  // invalid_argument -> ValueError
}

const TypeKernels& kernels_for(const IsaTable& t, DType type) {
    const TypeKernels* k = t.types[static_cast<int>(type)];
    if (!k)
        throw py::value_error(std::string("type ") + dtype_info(type).name + " has no kernels on " + isa_name(t.isa));
    return *k;
}

void check_row_len(DType type, int64_t n) {
    const DTypeInfo& info = dtype_info(type);
    if (n <= 0 || n % info.block_size != 0)
        throw py::value_error("row length " + std::to_string(n) + " is not a positive multiple of the " + info.name +
                              " block size " + std::to_string(info.block_size));
}

// A weight type's kernels on one ISA ("" = the active one), its activation type's, and its row
// bytes at row length n: what matmul and time_matmul start from. Throws ValueError for an
// activation type, a type without kernels there, or a row length its blocks do not divide.
struct WeightKernels {
    DType t;
    const IsaTable& table;
    const TypeKernels& k;   // the weight type's (vec_dot, gemm, gemm_x16)
    const TypeKernels& ak;  // the activation type's (from_float)
    size_t wrb;             // bytes of one weight row
};
WeightKernels weight_kernels(const std::string& type, const std::string& isa, int64_t n) {
    const DType t = parse_type(type);
    const IsaTable& table = pick_table(isa);
    const TypeKernels& k = kernels_for(table, t);
    if (!k.vec_dot) throw py::value_error("matmul: " + type + " is an activation type, not a weight type");
    const TypeKernels& ak = kernels_for(table, k.vec_dot_type);
    check_row_len(t, n);
    return {t, table, k, ak, row_bytes(t, n)};
}

// 2-D view of a float32 array (a 1-D array is one row).
struct Rows {
    const float* data;
    int64_t m, n;
};
Rows as_rows(const f32_array& x) {
    if (x.ndim() == 1) return {x.data(), 1, x.shape(0)};
    if (x.ndim() == 2) return {x.data(), x.shape(0), x.shape(1)};
    throw py::value_error("expected a 1-D or 2-D float32 array");
}

py::array_t<uint8_t> quantize_rows(DType type, const f32_array& x, const quantize_row_fn fn) {
    const Rows r = as_rows(x);
    check_row_len(type, r.n);
    const size_t rb = row_bytes(type, r.n);
    py::array_t<uint8_t> out({static_cast<py::ssize_t>(r.m), static_cast<py::ssize_t>(rb)});
    uint8_t* o = out.mutable_data();
    for (int64_t i = 0; i < r.m; ++i) {
        if (fn)
            fn(r.data + i * r.n, o + i * rb, r.n);
        else
            quantize_row_ref(type, r.data + i * r.n, o + i * rb, r.n);
    }
    return out;
}

// A 1-D float32 array argument of length n (ops).
const float* f32_arg(const py::object& o, py::ssize_t n, const char* what, f32_array& keep) {
    keep = f32_array::ensure(o);
    if (!keep || keep.ndim() != 1 || (n >= 0 && keep.shape(0) != n))
        throw py::value_error(std::string(what) + ": expected a 1-D float32 array" +
                              (n >= 0 ? " of length " + std::to_string(n) : std::string()));
    return keep.data();
}

// A 1-D array of 2-byte elements (np.float16 or raw uint16 bits).
const f16_t* f16_arg(const py::object& o, const char* what, py::array& keep, py::ssize_t* n) {
    keep = py::array::ensure(o, py::array::c_style);
    if (!keep || keep.ndim() != 1 || keep.itemsize() != 2)
        throw py::value_error(std::string(what) + ": expected a 1-D float16 (or uint16 bits) array");
    *n = keep.shape(0);
    return static_cast<const f16_t*>(keep.data());
}

py::object run_op(const std::string& name, const std::string& isa, py::args args) {
    const OpsKernels& ops = pick_table(isa).ops;
    auto need = [&](size_t k) {
        if (args.size() != k)
            throw py::value_error("ops('" + name + "') takes " + std::to_string(k) + " arguments, got " +
                                  std::to_string(args.size()));
    };
    f32_array k0, k1, k2;
    py::array h0;
    py::ssize_t n = 0;
    if (name == "dot_f16_f32") {  // (x f16[n], y f32[n]) -> float
        need(2);
        const f16_t* x = f16_arg(args[0], name.c_str(), h0, &n);
        const float* y = f32_arg(args[1], n, name.c_str(), k1);
        return py::float_(ops.dot_f16_f32(static_cast<int>(n), x, y));
    }
    if (name == "axpy_f16") {  // (a, x f16[n], y f32[n]) -> y + a * x (new array)
        need(3);
        const float a = args[0].cast<float>();
        const f16_t* x = f16_arg(args[1], name.c_str(), h0, &n);
        const float* y = f32_arg(args[2], n, name.c_str(), k1);
        py::array_t<float> out(n);
        std::memcpy(out.mutable_data(), y, static_cast<size_t>(n) * sizeof(float));
        ops.axpy_f16(static_cast<int>(n), a, x, out.mutable_data());
        return std::move(out);
    }
    if (name == "f32_to_f16") {  // (x f32[n]) -> uint16 bits [n]
        need(1);
        const float* x = f32_arg(args[0], -1, name.c_str(), k0);
        n = k0.shape(0);
        py::array_t<uint16_t> out(n);
        ops.f32_to_f16(x, out.mutable_data(), static_cast<int>(n));
        return std::move(out);
    }
    if (name == "dot_f32") {  // (x, y) -> float
        need(2);
        const float* x = f32_arg(args[0], -1, name.c_str(), k0);
        n = k0.shape(0);
        const float* y = f32_arg(args[1], n, name.c_str(), k1);
        return py::float_(ops.dot_f32(static_cast<int>(n), x, y));
    }
    if (name == "rmsnorm") {  // (x, w, eps) -> y
        need(3);
        const float* x = f32_arg(args[0], -1, name.c_str(), k0);
        n = k0.shape(0);
        const float* w = f32_arg(args[1], n, name.c_str(), k1);
        const float eps = args[2].cast<float>();
        py::array_t<float> out(n);
        ops.rmsnorm(static_cast<int>(n), x, w, eps, out.mutable_data());
        return std::move(out);
    }
    if (name == "swiglu") {  // (gate, up) -> silu(gate) * up
        need(2);
        const float* g = f32_arg(args[0], -1, name.c_str(), k0);
        n = k0.shape(0);
        const float* u = f32_arg(args[1], n, name.c_str(), k1);
        py::array_t<float> out(n);
        ops.swiglu(static_cast<int>(n), g, u, out.mutable_data());
        return std::move(out);
    }
    // Attention over one block (kernels.h); an ISA that leaves them null uses the scalar table's.
    auto attn_dims = [&](int64_t hd, int64_t nq, int64_t stride, int64_t n, int64_t ld, py::ssize_t kv_len,
                         py::ssize_t row_len) {
        if (hd < 1 || nq < 1 || n < 0 || stride < hd || ld < n)
            throw py::value_error(name + ": need hd >= 1, nq >= 1, n >= 0, stride >= hd, ld >= n");
        if (kv_len < (n > 0 ? (n - 1) * stride + hd : 0))
            throw py::value_error(name + ": K/V array too short for n positions at this stride");
        if (row_len != nq * ld) throw py::value_error(name + ": scores/probabilities must have nq * ld elements");
    };
    if (name == "attn_scores_f16") {  // (hd, nq, q f32[nq*hd], k f16, k_stride, n, scale, ld) -> f32[nq*ld]
        need(8);
        const int64_t hd = args[0].cast<int64_t>(), nq = args[1].cast<int64_t>();
        const float* q = f32_arg(args[2], -1, name.c_str(), k0);
        if (k0.shape(0) != hd * nq) throw py::value_error(name + ": q must have nq * hd elements");
        const f16_t* k = f16_arg(args[3], name.c_str(), h0, &n);
        const int64_t ks = args[4].cast<int64_t>(), npos = args[5].cast<int64_t>();
        const float scale = args[6].cast<float>();
        const int64_t ld = args[7].cast<int64_t>();
        attn_dims(hd, nq, ks, npos, ld, n, nq * ld);
        py::array_t<float> out(nq * ld);
        std::fill(out.mutable_data(), out.mutable_data() + nq * ld, 0.0f);
        auto fn = ops.attn_scores_f16 ? ops.attn_scores_f16 : isa_table_scalar()->ops.attn_scores_f16;
        fn((int)hd, (int)nq, q, k, (size_t)ks, (int)npos, scale, out.mutable_data(), (size_t)ld);
        return std::move(out);
    }
    if (name == "attn_scores_f16_rows") {  // (hd, nr, nq, q f32[nr*nq*hd], k f16, k_stride, n, scale, ld)
        need(9);                           // -> f32[nr*nq*ld]; null on an ISA: attn_scores_f16 per row
        const int64_t hd = args[0].cast<int64_t>(), nr = args[1].cast<int64_t>(), nq = args[2].cast<int64_t>();
        if (nr < 1 || nr * nq > 16) throw py::value_error(name + ": need 1 <= nr and nr * nq <= 16");
        const float* q = f32_arg(args[3], -1, name.c_str(), k0);
        if (k0.shape(0) != nr * nq * hd) throw py::value_error(name + ": q must have nr * nq * hd elements");
        const f16_t* k = f16_arg(args[4], name.c_str(), h0, &n);
        const int64_t ks = args[5].cast<int64_t>(), npos = args[6].cast<int64_t>();
        const float scale = args[7].cast<float>();
        const int64_t ld = args[8].cast<int64_t>();
        attn_dims(hd, nq, ks, npos, ld, n, nq * ld);
        py::array_t<float> out(nr * nq * ld);
        std::fill(out.mutable_data(), out.mutable_data() + nr * nq * ld, 0.0f);
        if (ops.attn_scores_f16_rows) {
            ops.attn_scores_f16_rows((int)hd, (int)nr, (int)nq, q, (size_t)(nq * hd), k, (size_t)ks, (int)npos, scale,
                                     out.mutable_data(), (size_t)(nq * ld), (size_t)ld);
        } else {
            auto fn = ops.attn_scores_f16 ? ops.attn_scores_f16 : isa_table_scalar()->ops.attn_scores_f16;
            for (int64_t r = 0; r < nr; r++)
                fn((int)hd, (int)nq, q + r * nq * hd, k, (size_t)ks, (int)npos, scale, out.mutable_data() + r * nq * ld,
                   (size_t)ld);
        }
        return std::move(out);
    }
    if (name == "attn_accum_f16") {  // (hd, nq, p f32[nq*ld], ld, v f16, v_stride, n, out f32[nq*hd]) -> new out
        need(8);
        const int64_t hd = args[0].cast<int64_t>(), nq = args[1].cast<int64_t>();
        const float* p = f32_arg(args[2], -1, name.c_str(), k0);
        const int64_t ld = args[3].cast<int64_t>();
        const f16_t* v = f16_arg(args[4], name.c_str(), h0, &n);
        const int64_t vs = args[5].cast<int64_t>(), npos = args[6].cast<int64_t>();
        attn_dims(hd, nq, vs, npos, ld, n, k0.shape(0));
        const float* o = f32_arg(args[7], hd * nq, name.c_str(), k1);
        py::array_t<float> out(nq * hd);
        std::memcpy(out.mutable_data(), o, static_cast<size_t>(nq * hd) * sizeof(float));
        auto fn = ops.attn_accum_f16 ? ops.attn_accum_f16 : isa_table_scalar()->ops.attn_accum_f16;
        fn((int)hd, (int)nq, p, (size_t)ld, v, (size_t)vs, (int)npos, out.mutable_data());
        return std::move(out);
    }
    // Attention over one block of the int8 KV cache: runs and query records as kv8_run/kv8_query make them.
    auto kv8_dims = [&](int64_t hd, int64_t bs, int64_t nq, int64_t j0, int64_t n, int64_t ld) {
        if (hd < 1 || hd > 4096 || bs < 1 || bs > 4096 || nq < 1 || j0 < 0 || n < 0 || j0 + n > bs || ld < n)
            throw py::value_error(name + ": need 1 <= hd, bs <= 4096, nq >= 1, 0 <= j0, j0 + n <= bs, ld >= n");
        return KV8Layout{(int)hd, (int)bs};
    };
    auto u8_arg = [&](const py::object& o, size_t need, const char* what, py::array& keep) {
        keep = py::array::ensure(o, py::array::c_style);
        if (!keep || keep.ndim() != 1 || keep.itemsize() != 1 || (size_t)keep.shape(0) < need)
            throw py::value_error(name + ": " + what + " must be a 1-D uint8 array of at least " +
                                  std::to_string(need) + " bytes");
        return static_cast<const uint8_t*>(keep.data());
    };
    if (name == "attn_scores_q8") {  // (hd, bs, nq, q records u8, k run u8, j0, n, scale, ld) -> f32[nq*ld]
        need(9);
        const int64_t hd = args[0].cast<int64_t>(), bs = args[1].cast<int64_t>(), nq = args[2].cast<int64_t>();
        const int64_t j0 = args[5].cast<int64_t>(), npos = args[6].cast<int64_t>(), ld = args[8].cast<int64_t>();
        const float scale = args[7].cast<float>();
        const KV8Layout L = kv8_dims(hd, bs, nq, j0, npos, ld);
        py::array qk, kk;
        const uint8_t* q = u8_arg(args[3], nq * L.query_bytes(), "q", qk);
        const uint8_t* k = u8_arg(args[4], L.k_run_bytes(), "k run", kk);
        py::array_t<float> out(nq * ld);
        std::fill(out.mutable_data(), out.mutable_data() + nq * ld, 0.0f);
        ops.attn_scores_q8(L, (int)nq, q, k, (int)j0, (int)npos, scale, out.mutable_data(), (size_t)ld);
        return std::move(out);
    }
    if (name == "attn_accum_q8") {  // (hd, bs, nq, p f32[nq*ld], ld, v run u8, j0, n, out f32[nq*hd]) -> new out
        need(9);
        const int64_t hd = args[0].cast<int64_t>(), bs = args[1].cast<int64_t>(), nq = args[2].cast<int64_t>();
        const int64_t ld = args[4].cast<int64_t>(), j0 = args[6].cast<int64_t>(), npos = args[7].cast<int64_t>();
        const KV8Layout L = kv8_dims(hd, bs, nq, j0, npos, ld);
        const float* p = f32_arg(args[3], nq * ld, name.c_str(), k0);
        py::array vk;
        const uint8_t* v = u8_arg(args[5], L.v_run_bytes(), "v run", vk);
        const float* o = f32_arg(args[8], hd * nq, name.c_str(), k1);
        py::array_t<float> out(nq * hd);
        std::memcpy(out.mutable_data(), o, static_cast<size_t>(nq * hd) * sizeof(float));
        ops.attn_accum_q8(L, (int)nq, p, (size_t)ld, v, (int)j0, (int)npos, out.mutable_data());
        return std::move(out);
    }
    if (name == "softmax") {  // (x f32[n]) -> softmax(x) (new array)
        need(1);
        const float* x = f32_arg(args[0], -1, name.c_str(), k0);
        n = k0.shape(0);
        py::array_t<float> out(n);
        std::memcpy(out.mutable_data(), x, static_cast<size_t>(n) * sizeof(float));
        auto fn = ops.softmax ? ops.softmax : isa_table_scalar()->ops.softmax;
        fn(static_cast<int>(n), out.mutable_data());
        return std::move(out);
    }
    throw py::value_error(
        "unknown op '" + name +
        "' (known: dot_f16_f32, axpy_f16, f32_to_f16, dot_f32, rmsnorm, swiglu, "
        "attn_scores_f16, attn_scores_f16_rows, attn_accum_f16, attn_scores_q8, attn_accum_q8, softmax)");
}

}  // namespace

void bind_kernels(py::module_& m) {
    m.def(
        "type_names",
        []() {
            std::vector<std::string> out;
            const IsaTable& t = *isa_table_scalar();
            for (int id = 0; id < kMaxDTypeId; ++id)
                if (t.types[id]) out.emplace_back(dtype_info(static_cast<uint32_t>(id)).name);
            return out;
        },
        "Types the kernels handle (weights, and the activation types Q8_0/Q8_1).");

    m.def(
        "block_size", [](const std::string& type) { return dtype_info(parse_type(type)).block_size; }, py::arg("type"));
    m.def(
        "type_size", [](const std::string& type) { return dtype_info(parse_type(type)).block_bytes; }, py::arg("type"),
        "Bytes per block.");
    m.def(
        "vec_dot_type",
        [](const std::string& type) {
            return std::string(dtype_info(kernels_for(*isa_table_scalar(), parse_type(type)).vec_dot_type).name);
        },
        py::arg("type"));

    m.def(
        "quantize",
        [](const std::string& type, const f32_array& x) {
            const DType t = parse_type(type);
            kernels_for(*isa_table_scalar(), t);
            return quantize_rows(t, x, nullptr);
        },
        py::arg("type"), py::arg("x"), "Reference quantization of rows: x [m, n] -> bytes [m, row_bytes].");

    m.def(
        "from_float",
        [](const std::string& type, const f32_array& x, const std::string& isa) {
            const DType t = parse_type(type);
            return quantize_rows(t, x, kernels_for(pick_table(isa), t).from_float);
        },
        py::arg("type"), py::arg("x"), py::arg("isa") = "",
        "Quantize rows with an ISA's from_float (activation quantization); isa '' = active.");

    m.def(
        "dequantize",
        [](const std::string& type, const u8_array& q, int64_t n) {
            const DType t = parse_type(type);
            kernels_for(*isa_table_scalar(), t);
            check_row_len(t, n);
            const size_t rb = row_bytes(t, n);
            if (q.ndim() != 2 || static_cast<size_t>(q.shape(1)) != rb)
                throw py::value_error("dequantize: expected uint8 [m, " + std::to_string(rb) + "] for " +
                                      std::to_string(n) + " elements of " + type);
            const int64_t m = q.shape(0);
            py::array_t<float> out({static_cast<py::ssize_t>(m), static_cast<py::ssize_t>(n)});
            for (int64_t i = 0; i < m; ++i) dequantize_row_ref(t, q.data() + i * rb, out.mutable_data() + i * n, n);
            return out;
        },
        py::arg("type"), py::arg("q"), py::arg("n"), "Reference dequantization of rows: [m, row_bytes] -> [m, n].");

    m.def(
        "pack",
        [](const std::string& type, const u8_array& w, int64_t n) {
            const DType t = parse_type(type);
            if (!packable(t)) throw py::value_error("pack: " + type + " has no x16 packed layout");
            check_row_len(t, n);
            const size_t rb = row_bytes(t, n);
            if (w.ndim() != 2 || static_cast<size_t>(w.shape(1)) != rb || w.shape(0) % kPackRows != 0)
                throw py::value_error("pack: w must be uint8 [16 * k, " + std::to_string(rb) + "]");
            const int64_t groups = w.shape(0) / kPackRows;
            py::array_t<uint8_t> out({static_cast<py::ssize_t>(groups), static_cast<py::ssize_t>(kPackRows * rb)});
            for (int64_t g = 0; g < groups; ++g)
                pack_x16(t, w.data() + g * kPackRows * rb, rb, n, out.mutable_data() + g * kPackRows * rb);
            return out;
        },
        py::arg("type"), py::arg("w"), py::arg("n"),
        "Rows [16k, row_bytes] -> the x16 packed layout, one 16-row group per output row.");

    m.def(
        "unpack_row",
        [](const std::string& type, const u8_array& group, int64_t n, int r) {
            const DType t = parse_type(type);
            if (!packable(t)) throw py::value_error("unpack_row: " + type + " has no x16 packed layout");
            check_row_len(t, n);
            const size_t rb = row_bytes(t, n);
            if (group.ndim() != 1 || static_cast<size_t>(group.shape(0)) != kPackRows * rb)
                throw py::value_error("unpack_row: group must be uint8 [" + std::to_string(kPackRows * rb) + "]");
            if (r < 0 || r >= kPackRows) throw py::value_error("unpack_row: r must be in [0, 16)");
            py::array_t<uint8_t> out(static_cast<py::ssize_t>(rb));
            unpack_x16_row(t, group.data(), n, r, out.mutable_data());
            return out;
        },
        py::arg("type"), py::arg("group"), py::arg("n"), py::arg("r"), "Row r of a packed group, GGUF layout.");

    m.def(
        "has_packed",
        [](const std::string& type, const std::string& isa) {
            return kernels_for(pick_table(isa), parse_type(type)).gemm_x16 != nullptr;
        },
        py::arg("type"), py::arg("isa") = "", "Does this ISA have an x16 packed kernel for the type?");

    m.def(
        "matmul",
        [](const std::string& type, const u8_array& w, const f32_array& x, int64_t n, const std::string& isa,
           bool use_gemm, bool packed, int64_t chunk) {
            const auto [t, table, k, ak, wrb] = weight_kernels(type, isa, n);
            if (w.ndim() != 2 || static_cast<size_t>(w.shape(1)) != wrb)
                throw py::value_error("matmul: w must be uint8 [rows, " + std::to_string(wrb) + "]");
            const Rows xr = as_rows(x);
            if (xr.n != n) throw py::value_error("matmul: x rows must have n = " + std::to_string(n) + " elements");
            const int64_t rows = w.shape(0), m = xr.m;
            if (packed && !k.gemm_x16)
                throw py::value_error("matmul: ISA " + std::string(isa_name(table.isa)) + " has no packed kernel for " +
                                      type);
            if (packed && rows % kPackRows != 0) throw py::value_error("matmul: packed needs a multiple of 16 rows");
            const int64_t step =
                chunk > 0 ? std::max<int64_t>(kPackRows, chunk / kPackRows * kPackRows) : std::max<int64_t>(rows, 1);
            const size_t arb = row_bytes(k.vec_dot_type, n);
            std::vector<uint8_t> aq(static_cast<size_t>(m) * arb + 64);
            std::vector<uint8_t> wp;
            py::array_t<float> out({static_cast<py::ssize_t>(m), static_cast<py::ssize_t>(rows)});
            float* o = out.mutable_data();
            const uint8_t* wd = w.data();
            {
                py::gil_scoped_release nogil;
                for (int64_t c = 0; c < m; ++c) ak.from_float(xr.data + c * n, aq.data() + c * arb, n);
                if (packed) {
                    // chunks of `step` rows (like the engine's tasks) x all activation rows, or one
                    // activation row at a time without use_gemm
                    const size_t gb = kPackRows * wrb;
                    wp.resize(static_cast<size_t>(rows) * wrb);
                    for (int64_t g = 0; g < rows / kPackRows; ++g) pack_x16(t, wd + g * gb, wrb, n, wp.data() + g * gb);
                    for (int64_t r0 = 0; r0 < rows; r0 += step) {
                        const int nr = static_cast<int>(std::min(step, rows - r0));
                        const uint8_t* wg = wp.data() + r0 / kPackRows * gb;
                        if (use_gemm) {
                            k.gemm_x16(static_cast<int>(n), nr, static_cast<int>(m), wg, gb, aq.data(), arb, o + r0,
                                       static_cast<size_t>(rows));
                        } else {
                            for (int64_t c = 0; c < m; ++c)
                                k.gemm_x16(static_cast<int>(n), nr, 1, wg, gb, aq.data() + c * arb, arb,
                                           o + c * rows + r0, static_cast<size_t>(rows));
                        }
                    }
                } else if (use_gemm && k.gemm) {
                    k.gemm(static_cast<int>(n), static_cast<int>(rows), static_cast<int>(m), wd, wrb, aq.data(), arb, o,
                           static_cast<size_t>(rows));
                } else {
                    for (int64_t c = 0; c < m; ++c)
                        for (int64_t r = 0; r < rows; ++r)
                            k.vec_dot(static_cast<int>(n), o + c * rows + r, wd + r * wrb, aq.data() + c * arb);
                }
            }
            return out;
        },
        py::arg("type"), py::arg("w"), py::arg("x"), py::arg("n"), py::arg("isa") = "", py::arg("use_gemm") = true,
        py::arg("packed") = false, py::arg("chunk") = 0,
        "y[c, r] = dot(W row r, x row c), x quantized to the type's activation type by the ISA's "
        "from_float. use_gemm=False uses vec_dot for every pair (packed: one activation row at a "
        "time). packed=True packs W (x16 layout) and runs the ISA's packed kernel over chunks of "
        "`chunk` rows (rounded to 16; 0 = all).");

    m.def(
        "time_matmul",
        [](const std::string& type, const u8_array& w, const f32_array& x, int64_t n, int64_t rows,
           const std::string& isa, bool use_gemm, int iters, int64_t chunk, bool packed) {
            // Seconds per matmul of `rows` weight rows x all x rows (activations quantized once,
            // outside the timing). w holds several copies of the matrix ([copies * rows, row_bytes]);
            // successive iterations walk through them so a big w measures streaming from DRAM.
            const auto [t, table, k, ak, wrb] = weight_kernels(type, isa, n);
            if (w.ndim() != 2 || static_cast<size_t>(w.shape(1)) != wrb || rows <= 0 || w.shape(0) % rows != 0)
                throw py::value_error("time_matmul: w must be uint8 [copies * rows, " + std::to_string(wrb) + "]");
            const Rows xr = as_rows(x);
            if (xr.n != n) throw py::value_error("time_matmul: x rows must have n elements");
            if (iters <= 0) throw py::value_error("time_matmul: iters must be positive");
            const int64_t copies = w.shape(0) / rows, m = xr.m;
            if (packed && (!k.gemm_x16 || rows % kPackRows != 0))
                throw py::value_error("time_matmul: packed needs the ISA's packed kernel and a multiple of 16 rows");
            std::vector<uint8_t> wp;
            if (packed) {  // the whole w, group by group
                wp.resize(static_cast<size_t>(w.shape(0)) * wrb);
                for (int64_t g = 0; g < w.shape(0) / kPackRows; ++g)
                    pack_x16(t, w.data() + g * kPackRows * wrb, wrb, n, wp.data() + g * kPackRows * wrb);
            }
            const size_t arb = row_bytes(k.vec_dot_type, n);
            std::vector<uint8_t> aq(static_cast<size_t>(m) * arb + 64);
            std::vector<float> out(static_cast<size_t>(m * rows));
            double secs, cpu_secs;
            auto thread_cpu = []() {
                timespec ts{};
                clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
                return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
            };
            {
                py::gil_scoped_release nogil;
                for (int64_t c = 0; c < m; ++c) ak.from_float(xr.data + c * n, aq.data() + c * arb, n);
                const auto t0 = std::chrono::steady_clock::now();
                const double c0 = thread_cpu();
                for (int it = 0; it < iters; ++it) {
                    const uint8_t* wd = (packed ? wp.data() : w.data()) + (it % copies) * rows * wrb;
                    if (packed) {
                        const int64_t step =
                            chunk > 0 ? std::max<int64_t>(kPackRows, chunk / kPackRows * kPackRows) : rows;
                        for (int64_t r0 = 0; r0 < rows; r0 += step)
                            k.gemm_x16(static_cast<int>(n), static_cast<int>(std::min(step, rows - r0)),
                                       static_cast<int>(m), wd + r0 * wrb, kPackRows * wrb, aq.data(), arb,
                                       out.data() + r0, static_cast<size_t>(rows));
                    } else if (use_gemm && k.gemm) {
                        // like the engine's matmul driver: chunks of weight rows x all activation rows
                        const int64_t step = chunk > 0 ? chunk : rows;
                        for (int64_t r0 = 0; r0 < rows; r0 += step)
                            k.gemm(static_cast<int>(n), static_cast<int>(std::min(step, rows - r0)),
                                   static_cast<int>(m), wd + r0 * wrb, wrb, aq.data(), arb, out.data() + r0,
                                   static_cast<size_t>(rows));
                    } else {
                        for (int64_t c = 0; c < m; ++c)
                            for (int64_t r = 0; r < rows; ++r)
                                k.vec_dot(static_cast<int>(n), out.data() + c * rows + r, wd + r * wrb,
                                          aq.data() + c * arb);
                    }
                }
                cpu_secs = (thread_cpu() - c0) / iters;
                secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
            }
            return py::make_tuple(secs, cpu_secs);
        },
        py::arg("type"), py::arg("w"), py::arg("x"), py::arg("n"), py::arg("rows"), py::arg("isa") = "",
        py::arg("use_gemm") = true, py::arg("iters") = 10, py::arg("chunk") = 0, py::arg("packed") = false,
        "Micro-benchmark helper: (wall, thread-CPU) seconds per matmul (see bench/bench_kernels.py).");

    // ---- the int8 KV cache format (kernels.h) ----
    auto layout = [](int64_t hd, int64_t bs) {
        if (hd < 1 || hd > 4096 || bs < 1 || bs > 4096) throw py::value_error("kv8: need 1 <= hd, bs <= 4096");
        return KV8Layout{(int)hd, (int)bs};
    };
    m.def(
        "kv8_layout",
        [layout](int64_t hd, int64_t bs) {
            const KV8Layout L = layout(hd, bs);
            py::dict d;
            d["groups"] = L.groups();
            d["chunks"] = L.chunks();
            d["k_scales_offset"] = L.k_scales_offset();
            d["k_tile_bytes"] = L.k_tile_bytes();
            d["k_run_bytes"] = L.k_run_bytes();
            d["v_scales_offset"] = L.v_scales_offset();
            d["v_run_bytes"] = L.v_run_bytes();
            d["query_bytes"] = L.query_bytes();
            return d;
        },
        py::arg("hd"), py::arg("bs"), "Sizes and offsets of the q8_0 KV layout for head_dim hd, block size bs.");
    m.def(
        "kv8_run",
        [layout](int kv, const f32_array& x, int64_t bs, const std::string& isa) {
            if (kv != 0 && kv != 1) throw py::value_error("kv8_run: kv must be 0 (K) or 1 (V)");
            const Rows r = as_rows(x);
            const KV8Layout L = layout(r.n, bs);
            if (r.m > bs) throw py::value_error("kv8_run: more rows than the block has positions");
            const auto store = pick_table(isa).ops.kv8_store;
            const size_t bytes = kv == 0 ? L.k_run_bytes() : L.v_run_bytes();
            py::array_t<uint8_t> out(static_cast<py::ssize_t>(bytes));
            std::memset(out.mutable_data(), 0, bytes);
            for (int64_t i = 0; i < r.m; ++i) store(L, kv, (int)i, r.data + i * r.n, out.mutable_data());
            return out;
        },
        py::arg("kv"), py::arg("x"), py::arg("bs"), py::arg("isa") = "scalar",
        "A K (kv=0) or V (kv=1) run of bs positions with rows x[m, hd] stored in slots 0..m-1 (zeros after), "
        "by the kv8_store of `isa` (default: the scalar reference; '' the active ISA).");
    m.def(
        "kv8_values",
        [layout](int kv, const u8_array& run, int64_t hd, int64_t bs, int64_t m) {
            const KV8Layout L = layout(hd, bs);
            if (kv != 0 && kv != 1) throw py::value_error("kv8_values: kv must be 0 (K) or 1 (V)");
            if (m < 0 || m > bs || run.ndim() != 1 ||
                (size_t)run.shape(0) < (kv == 0 ? L.k_run_bytes() : L.v_run_bytes()))
                throw py::value_error("kv8_values: need 0 <= m <= bs and a whole run");
            py::array_t<float> out({static_cast<py::ssize_t>(m), static_cast<py::ssize_t>(hd)});
            for (int64_t j = 0; j < m; ++j)
                for (int64_t i = 0; i < hd; ++i)
                    out.mutable_data()[j * hd + i] = kv8_load(L, kv, (int)j, (int)i, run.data());
            return out;
        },
        py::arg("kv"), py::arg("run"), py::arg("hd"), py::arg("bs"), py::arg("m"),
        "The values (scale * q) a run holds for slots 0..m-1: float32 [m, hd].");
    m.def(
        "kv8_query",
        [](const f32_array& x, int64_t hd, const std::string& isa) {
            const Rows r = as_rows(x);
            if (hd < 1 || hd > 4096 || r.m * r.n % hd != 0)
                throw py::value_error("kv8_query: x must hold whole heads of hd");
            const auto quantize = pick_table(isa).ops.kv8_quantize_query;
            const KV8Layout L{(int)hd, 1};
            const int64_t nh = r.m * r.n / hd;
            py::array_t<uint8_t> out(static_cast<py::ssize_t>(nh * L.query_bytes()));
            for (int64_t h = 0; h < nh; ++h) quantize(L, r.data + h * hd, out.mutable_data() + h * L.query_bytes());
            return out;
        },
        py::arg("x"), py::arg("hd"), py::arg("isa") = "scalar",
        "Query records of consecutive heads of hd floats, by the kv8_quantize_query of `isa` (default: the "
        "scalar reference; '' the active ISA).");

    m.def("ops", &run_op, py::arg("name"), py::arg("isa"), "Run one OpsKernels entry on numpy arrays (tests).");

    m.def(
        "read_bandwidth",
        [](const u8_array& buf, int reps) {
            // The roofline of a decode step: the compute pool's threads read buf once (each a few
            // contiguous ranges, as a GEMV's tasks are), summing 64-bit words; best of reps.
            const size_t words = static_cast<size_t>(buf.size()) / 8;
            if (words == 0 || reps < 1) throw std::invalid_argument("read_bandwidth needs >= 8 bytes and reps >= 1");
            const auto* w = reinterpret_cast<const uint64_t*>(buf.data());
            const int tasks = 4 * get_num_threads();
            std::vector<uint64_t> part(tasks);
            double best = 1e300;
            uint64_t sum = 0;
            {
                py::gil_scoped_release release;
                for (int r = 0; r < reps; r++) {
                    const auto t0 = std::chrono::steady_clock::now();
                    parallel_for(tasks, [&](int t, int) {
                        const size_t lo = words * t / tasks, hi = words * (t + 1) / tasks;
                        uint64_t a[8] = {};
                        size_t i = lo;
                        for (; i + 8 <= hi; i += 8)
                            for (int k = 0; k < 8; k++) a[k] += w[i + k];
                        for (; i < hi; i++) a[0] += w[i];
                        part[t] = a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7];
                    });
                    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
                    sum = 0;
                    for (uint64_t v : part) sum += v;
                }
            }
            return py::make_tuple(static_cast<double>(words * 8) / best / 1e9, sum);
        },
        py::arg("buf"), py::arg("reps") = 5,
        "(GB/s, checksum): the compute pool reads buf's whole 64-bit words once per rep (best rep), "
        "the checksum their sum mod 2^64.");

    m.def(
        "pool_counts",
        [](int n_tasks, int regions) {
            // How often each task of parallel_for(n_tasks) ran, summed over `regions` regions in a row,
            // and how many tasks each pool thread ran (tests of the pool's claiming and stealing).
            if (n_tasks < 0 || regions < 1) throw std::invalid_argument("pool_counts needs n_tasks >= 0, regions >= 1");
            std::vector<std::atomic<int>> runs(n_tasks);
            std::vector<std::atomic<int>> by_thread(get_num_threads());
            {
                py::gil_scoped_release release;
                for (int r = 0; r < regions; r++)
                    parallel_for(n_tasks, [&](int t, int tid) {
                        runs[t].fetch_add(1, std::memory_order_relaxed);
                        by_thread[tid].fetch_add(1, std::memory_order_relaxed);
                    });
            }
            py::array_t<int32_t> out(n_tasks), threads((py::ssize_t)by_thread.size());
            for (int t = 0; t < n_tasks; t++) out.mutable_at(t) = runs[t].load();
            for (size_t i = 0; i < by_thread.size(); i++) threads.mutable_at((py::ssize_t)i) = by_thread[i].load();
            return py::make_tuple(out, threads);
        },
        py::arg("n_tasks"), py::arg("regions") = 1,
        "(runs per task, tasks per pool thread) of `regions` parallel_for(n_tasks) regions (tests).");
}
