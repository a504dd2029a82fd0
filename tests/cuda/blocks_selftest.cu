// blocks_selftest.cu — the CUDA matmul's per-block arithmetic (csrc/cuda/blocks.cuh), compiled by
// nvcc and run on the CPU: no GPU needed. For every weight type the CUDA path covers it checks
//   1. activation quantization (Q8_0, Q8_1, Q8_K) bit for bit against quant.cpp's reference, and
//   2. one warp's dot products (32 lanes striding over blocks, then the kernel's butterfly sum)
//      against the scalar vec_dot of csrc/kernels/ref.cpp, within a float-reassociation bound
//      (the integer block sums are exact on both sides; only the order of float adds differs),
//   3. that a tile of 8 activation rows gives the same bits as one row at a time (batch invariance).
// Weight blocks are random bytes (every bit pattern of quants and scales) with finite fp16 scales.
// Prints one line per type and exits non-zero on the first failure.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/blocks.cuh"
#include "kernels/kernels.h"
#include "quant.h"

namespace ts::cuda {
namespace {

constexpr int kLanes = 32;

[[noreturn]] void fail(const std::string& what) {
    std::printf("FAIL %s\n", what.c_str());
    std::exit(1);
}

// Device-layout activations for m rows of n, from the reference quantizer's blocks.
struct HostActs {
    std::vector<int8_t> q;
    std::vector<float> d, s;
    std::vector<int> bsums;
    std::vector<float> x;
    Acts view(DType t, int m, int n) const {
        Acts a;
        a.type = t, a.m = m, a.n = n;
        a.x = x.data(), a.q = q.data(), a.d = d.data(), a.s = s.data(), a.bsums = bsums.data();
        return a;
    }
};

// Quantize with blocks.cuh and check every field against quantize_row_ref.
HostActs quantize_checked(DType at, const std::vector<float>& x, int m, int n) {
    HostActs h;
    h.x = x;
    if (at == DType::F32) return h;
    const int qk = at == DType::Q8_K ? 256 : 32;
    const int nb = n / qk;
    h.q.resize((size_t)m * n), h.d.resize((size_t)m * nb), h.s.resize((size_t)m * nb), h.bsums.resize((size_t)m * n / 16);
    std::vector<uint8_t> ref(row_bytes(at, n));
    for (int r = 0; r < m; r++) {
        const float* xr = x.data() + (size_t)r * n;
        quantize_row_ref(at, xr, ref.data(), n);
        for (int b = 0; b < nb; b++) {
            const size_t i = (size_t)r * nb + b;
            int8_t* q = h.q.data() + (size_t)r * n + b * qk;
            if (at == DType::Q8_K) {
                quant_q8_k_block(xr + b * qk, q, &h.d[i], h.bsums.data() + (size_t)r * (n / 16) + b * 16);
                const auto* rb = reinterpret_cast<const block_q8_K*>(ref.data()) + b;
                if (std::memcmp(&rb->d, &h.d[i], 4) != 0 || std::memcmp(rb->qs, q, 256) != 0)
                    fail("Q8_K quantization differs from the reference (row " + std::to_string(r) + ")");
                for (int j = 0; j < 16; j++)
                    if (rb->bsums[j] != h.bsums[(size_t)r * (n / 16) + b * 16 + j]) fail("Q8_K bsums differ");
            } else {
                quant_q8_0_block(xr + b * qk, q, &h.d[i], &h.s[i], at == DType::Q8_1);
                const uint8_t* rb = ref.data() + (size_t)b * (at == DType::Q8_1 ? 36 : 34);
                const float rd = fp16_to_fp32((uint16_t)(rb[0] | rb[1] << 8));
                const int qoff = at == DType::Q8_1 ? 4 : 2;
                if (std::memcmp(&rd, &h.d[i], 4) != 0 || std::memcmp(rb + qoff, q, 32) != 0)
                    fail(std::string(dtype_info(at).name) + " quantization differs from the reference");
                if (at == DType::Q8_1) {
                    const float rs = fp16_to_fp32((uint16_t)(rb[2] | rb[3] << 8));
                    if (std::memcmp(&rs, &h.s[i], 4) != 0) fail("Q8_1 block sum differs from the reference");
                }
            }
        }
    }
    return h;
}

// One warp's result for weight row `w` and activation rows [c0, c0 + nc), as k_matmul computes it.
template <DType T, int NC>
void warp_dot(const uint8_t* w, const Acts& a, int c0, int nc, float* out) {
    float lane_acc[kLanes][NC] = {};
    const int nb = a.n / block_elems<T>();
    for (int lane = 0; lane < kLanes; lane++)
        for (int b = lane; b < nb; b += kLanes) {
            const uint8_t* blk = w + (size_t)b * block_bytes<T>();
            if constexpr (kind<T>() == Kind::F) accumulate_f<T, NC>(blk, b, a, c0, nc, lane_acc[lane]);
            else if constexpr (kind<T>() == Kind::B256) accumulate256<T, NC>(blk, b, a, c0, nc, lane_acc[lane]);
            else accumulate32<T, NC>(blk, b, a, c0, nc, lane_acc[lane]);
        }
    for (int c = 0; c < nc; c++) {  // warp_sum: v += shfl_xor(v, o) for o = 16, 8, 4, 2, 1
        float v[kLanes];
        for (int l = 0; l < kLanes; l++) v[l] = lane_acc[l][c];
        for (int o = kLanes / 2; o > 0; o >>= 1) {
            float nv[kLanes];
            for (int l = 0; l < kLanes; l++) nv[l] = v[l] + v[l ^ o];
            std::memcpy(v, nv, sizeof v);
        }
        out[c] = v[0];
    }
}

// Random blocks with finite fp16 scale fields of moderate size.
std::vector<uint8_t> random_rows(DType t, int rows, int n, std::mt19937& rng) {
    const size_t rb = row_bytes(t, n);
    std::vector<uint8_t> w(rows * rb);
    if (t == DType::F32 || t == DType::F16 || t == DType::BF16) {
        std::normal_distribution<float> g(0.f, 1.f);
        std::vector<float> f(n);
        for (int r = 0; r < rows; r++) {
            for (float& v : f) v = g(rng);
            quantize_row_ref(t, f.data(), w.data() + r * rb, n);
        }
        return w;
    }
    for (uint8_t& b : w) b = (uint8_t)(rng() & 0xff);
    const int bb = (int)dtype_info(t).block_bytes;
    std::uniform_real_distribution<float> u(-0.05f, 0.05f);
    auto put = [&](uint8_t* p) {
        const uint16_t h = fp32_to_fp16(u(rng));
        p[0] = h & 0xff, p[1] = h >> 8;
    };
    for (size_t off = 0; off < w.size(); off += bb) {
        uint8_t* p = w.data() + off;
        switch (t) {
            case DType::Q4_1: case DType::Q5_1: case DType::Q4_K: case DType::Q5_K: put(p), put(p + 2); break;
            case DType::Q6_K: put(p + 208); break;
            default: put(p); break;  // Q4_0, Q5_0, Q8_0, IQ4_NL, IQ4_XS: d first
        }
    }
    return w;
}

template <DType T>
void check_type(std::mt19937& rng) {
    const char* name = dtype_info(T).name;
    const int qk = block_elems<T>();
    const int n = qk == 256 ? 256 * 37 : 32 * 41;  // more blocks than lanes: lanes take 1 or 2
    const int rows = 5, m = 11;                     // 11 activation rows: one full tile of 8, a tail of 3
    const DType at = act_type(T);
    const TypeKernels* ref = isa_table_scalar()->types[static_cast<int>(T)];
    if (!ref || ref->vec_dot_type != at) fail(std::string(name) + ": activation type differs from the CPU table's");
    std::normal_distribution<float> g(0.f, 1.f);
    std::vector<float> x((size_t)m * n);
    for (float& v : x) v = g(rng);
    for (int j = 0; j < 256; j++) x[j] = 0.f;  // all-zero blocks (d = 0; Q8_K's early exit)
    const HostActs h = quantize_checked(at, x, m, n);
    const Acts a = h.view(at, m, n);
    const std::vector<uint8_t> w = random_rows(T, rows, n, rng);
    const size_t rb = row_bytes(T, n);
    // the reference's activation rows (its own layout) and dequantized values for the error bound
    std::vector<uint8_t> aref(row_bytes(at, n) * m);
    std::vector<float> wf(n), af(n);
    double worst = 0;
    for (int c = 0; c < m; c++) quantize_row_ref(at, x.data() + (size_t)c * n, aref.data() + c * row_bytes(at, n), n);
    for (int r = 0; r < rows; r++) {
        const uint8_t* wr = w.data() + r * rb;
        float tile[8], one[1];
        for (int c0 = 0; c0 < m; c0 += 8) {
            const int nc = std::min(8, m - c0);
            warp_dot<T, 8>(wr, a, c0, nc, tile);
            for (int c = 0; c < nc; c++) {
                warp_dot<T, 1>(wr, a, c0 + c, 1, one);
                if (std::memcmp(&one[0], &tile[c], 4) != 0)
                    fail(std::string(name) + ": a tile of 8 rows differs from one row alone");
                float expect;
                const uint8_t* ar = aref.data() + (c0 + c) * row_bytes(at, n);
                ref->vec_dot(n, &expect, wr, ar);
                dequantize_row_ref(T, wr, wf.data(), n);
                dequantize_row_ref(at, ar, af.data(), n);
                double mag = 0;
                for (int i = 0; i < n; i++) mag += std::fabs((double)wf[i] * af[i]);
                const double err = std::fabs((double)tile[c] - expect);
                const double bound = (kind<T>() == Kind::F ? 2e-5 : 5e-6) * mag + 1e-30;
                if (!(err <= bound) || !std::isfinite(tile[c]))
                    fail(std::string(name) + ": dot " + std::to_string(tile[c]) + " vs reference " +
                         std::to_string(expect) + " (|err| " + std::to_string(err) + " > " + std::to_string(bound) + ")");
                worst = std::max(worst, err / (mag + 1e-30));
            }
        }
    }
    std::printf("ok   %-6s n=%d: activations bit-exact, dots within %.1e of sum|w*a|, tiles bit-exact\n",
                name, n, worst);
}

}  // namespace
}  // namespace ts::cuda

int main() {
    using namespace ts;
    using namespace ts::cuda;
    std::mt19937 rng(15);
    check_type<DType::F32>(rng);
    check_type<DType::F16>(rng);
    check_type<DType::BF16>(rng);
    check_type<DType::Q4_0>(rng);
    check_type<DType::Q4_1>(rng);
    check_type<DType::Q5_0>(rng);
    check_type<DType::Q5_1>(rng);
    check_type<DType::Q8_0>(rng);
    check_type<DType::IQ4_NL>(rng);
    check_type<DType::Q4_K>(rng);
    check_type<DType::Q5_K>(rng);
    check_type<DType::Q6_K>(rng);
    check_type<DType::IQ4_XS>(rng);
    std::printf("all CUDA block kernels agree with the scalar reference\n");
    return 0;
}
