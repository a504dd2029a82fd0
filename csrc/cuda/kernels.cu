// kernels.cu — hand-written CUDA kernels for the layer step (kernels.cuh says what each computes).
// Simple before fast: one warp per weight row, one lane per block, dp4a for the int8 dot products,
// weight blocks read in the file's own layout. Every kernel mirrors the CPU scalar reference.
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

#include "cuda/kernels.cuh"

namespace ts::cuda {

namespace {

constexpr int kWarp = 32;

__constant__ int8_t c_iq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

void check_launch(const char* what) {
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA ") + what + ": " + cudaGetErrorString(e));
}

unsigned blocks_for(size_t n, int threads) { return (unsigned)((n + threads - 1) / threads); }

__device__ __forceinline__ float h2f(const uint8_t* p) {
    return __half2float(__ushort_as_half((unsigned short)(p[0] | (p[1] << 8))));
}
__device__ __forceinline__ float h2f_round(float f) { return __half2float(__float2half_rn(f)); }
// 4 int8 values (low byte first) as one word for dp4a
__device__ __forceinline__ int pack4(int a, int b, int c, int d) {
    return (a & 0xff) | ((b & 0xff) << 8) | ((c & 0xff) << 16) | ((int)((unsigned)(d & 0xff) << 24));
}
__device__ __forceinline__ uint32_t ld_u32(const uint8_t* p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
// acc + a * b without contraction into one fma (the CPU reference rounds the product first)
__device__ __forceinline__ float add_mul(float acc, float a, float b) { return __fadd_rn(acc, __fmul_rn(a, b)); }

// ---- activation quantization (quant.cpp's quantize_q8_0 / q8_1 / q8_K, one thread per block) ----

__global__ void k_quant_q8_0(const float* X, int m, int n, int8_t* q, float* d, float* s, bool with_sum) {
    const int nb = n / 32;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= m * nb) return;
    const int r = i / nb, b = i % nb;
    const float* x = X + (size_t)r * n + b * 32;
    float amax = 0.f;
    for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
    const float dd = amax / 127.0f;
    const float id = dd != 0.0f ? 1.0f / dd : 0.0f;
    int8_t* qo = q + (size_t)r * n + b * 32;
    int sum = 0;
    for (int j = 0; j < 32; j++) {
        const int8_t v = (int8_t)(int)roundf(__fmul_rn(x[j], id));
        qo[j] = v;
        sum += v;
    }
    d[i] = h2f_round(dd);
    if (with_sum) s[i] = h2f_round(__fmul_rn((float)sum, dd));
}

__global__ void k_quant_q8_k(const float* X, int m, int n, int8_t* q, float* d, int* bsums) {
    const int nb = n / 256;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= m * nb) return;
    const int r = i / nb, b = i % nb;
    const float* x = X + (size_t)r * n + b * 256;
    int8_t* qo = q + (size_t)r * n + b * 256;
    int* bs = bsums + (size_t)r * (n / 16) + b * 16;
    float amax = 0.f, mx = 0.f;
    for (int j = 0; j < 256; j++)
        if (fabsf(x[j]) > amax) { amax = fabsf(x[j]); mx = x[j]; }
    if (amax == 0.f) {
        for (int j = 0; j < 256; j++) qo[j] = 0;
        for (int j = 0; j < 16; j++) bs[j] = 0;
        d[i] = 0.f;
        return;
    }
    const float iscale = -127.0f / mx;
    for (int j = 0; j < 256; j++) {
        const int v = __float2int_rn(__fmul_rn(iscale, x[j]));  // round half to even
        qo[j] = (int8_t)(v < 127 ? v : 127);
    }
    for (int j = 0; j < 16; j++) {
        int sum = 0;
        for (int k = 0; k < 16; k++) sum += qo[16 * j + k];
        bs[j] = sum;
    }
    d[i] = 1.0f / iscale;
}

// ---- weight blocks: decode 32 elements into 8 words of int8 (element 4i + k at byte k of word i) ----

// Low nibble of qs[j] is element j, high nibble element j + 16 (Q4_0, Q4_1, Q5_*, IQ4_NL).
template <class F>
__device__ __forceinline__ void nibbles32(const uint8_t* qs, F value, int (&w)[8]) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const uint32_t b = ld_u32(qs + 4 * i);
        int lo[4], hi[4];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const int byte = (b >> (8 * k)) & 0xff;
            lo[k] = value(byte & 0x0f, 4 * i + k);
            hi[k] = value(byte >> 4, 16 + 4 * i + k);
        }
        w[i] = pack4(lo[0], lo[1], lo[2], lo[3]);
        w[4 + i] = pack4(hi[0], hi[1], hi[2], hi[3]);
    }
}

__device__ __forceinline__ int dot8(const int (&w)[8], const int8_t* a) {
    const int* aw = reinterpret_cast<const int*>(a);  // 32 quants, 4-byte aligned
    int s = 0;
#pragma unroll
    for (int i = 0; i < 8; i++) s = __dp4a(w[i], aw[i], s);
    return s;
}
__device__ __forceinline__ int dot4(const int* w, const int8_t* a) {
    const int* aw = reinterpret_cast<const int*>(a);
    int s = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) s = __dp4a(w[i], aw[i], s);
    return s;
}

// One weight type: QK elements and BYTES bytes per block; accumulate(block, b, acts, c0, nc, acc)
// adds block b's products with activation rows c0 .. c0 + nc - 1 to acc[0 .. nc).
template <DType T> struct W32;  // the 32-element types

template <> struct W32<DType::Q4_0> {
    static constexpr int BYTES = 18; static constexpr bool MIN = false;
    __device__ static void decode(const uint8_t* p, int (&w)[8], float& d, float& m) {
        d = h2f(p); m = 0.f;
        nibbles32(p + 2, [](int q, int) { return q - 8; }, w);
    }
};
template <> struct W32<DType::Q4_1> {
    static constexpr int BYTES = 20; static constexpr bool MIN = true;
    __device__ static void decode(const uint8_t* p, int (&w)[8], float& d, float& m) {
        d = h2f(p); m = h2f(p + 2);
        nibbles32(p + 4, [](int q, int) { return q; }, w);
    }
};
template <> struct W32<DType::Q5_0> {
    static constexpr int BYTES = 22; static constexpr bool MIN = false;
    __device__ static void decode(const uint8_t* p, int (&w)[8], float& d, float& m) {
        d = h2f(p); m = 0.f;
        const uint32_t qh = ld_u32(p + 2);
        nibbles32(p + 6, [qh](int q, int j) { return (q | (int)(((qh >> j) & 1) << 4)) - 16; }, w);
    }
};
template <> struct W32<DType::Q5_1> {
    static constexpr int BYTES = 24; static constexpr bool MIN = true;
    __device__ static void decode(const uint8_t* p, int (&w)[8], float& d, float& m) {
        d = h2f(p); m = h2f(p + 2);
        const uint32_t qh = ld_u32(p + 4);
        nibbles32(p + 8, [qh](int q, int j) { return q | (int)(((qh >> j) & 1) << 4); }, w);
    }
};
template <> struct W32<DType::IQ4_NL> {
    static constexpr int BYTES = 18; static constexpr bool MIN = false;
    __device__ static void decode(const uint8_t* p, int (&w)[8], float& d, float& m) {
        d = h2f(p); m = 0.f;
        nibbles32(p + 2, [](int q, int) { return (int)c_iq4nl[q]; }, w);
    }
};
template <> struct W32<DType::Q8_0> {
    static constexpr int BYTES = 34; static constexpr bool MIN = false;
    __device__ static void decode(const uint8_t* p, int (&w)[8], float& d, float& m) {
        d = h2f(p); m = 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++) w[i] = (int)ld_u32(p + 2 + 4 * i);  // already int8
    }
};

// vec_dot_*_q8_0 / _q8_1: sum += float(sumi) * (d * d8) [+ m * s8]
template <DType T, int NC>
__device__ __forceinline__ void accumulate32(const uint8_t* blk, int b, const Acts& a, int c0, int nc, float (&acc)[NC]) {
    int w[8];
    float d, m;
    W32<T>::decode(blk, w, d, m);
    const int nb = a.n / 32;
#pragma unroll
    for (int c = 0; c < NC; c++) {
        if (c >= nc) break;
        const int row = c0 + c;
        const int sumi = dot8(w, a.q + (size_t)row * a.n + b * 32);
        acc[c] = add_mul(acc[c], (float)sumi, __fmul_rn(d, a.d[(size_t)row * nb + b]));
        if constexpr (W32<T>::MIN) acc[c] = add_mul(acc[c], m, a.s[(size_t)row * nb + b]);
    }
}

// The K-quants and IQ4_XS: super-blocks of 256 in 8 chunks of 32. decode_chunk gives chunk j's
// 8 words and the integer scales of its two halves of 16 (sc_lo, sc_hi) and its min (mn).
template <DType T> struct W256;

__device__ __forceinline__ void scale_min_k4(int j, const uint8_t* q, int& sc, int& m) {
    if (j < 4) {
        sc = q[j] & 63;
        m = q[j + 4] & 63;
    } else {
        sc = (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4);
        m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

template <bool kQ5>
struct W256Q45 {
    static constexpr int BYTES = kQ5 ? 176 : 144; static constexpr bool MIN = true;
    __device__ static void header(const uint8_t* p, float& d, float& dmin) { d = h2f(p); dmin = h2f(p + 2); }
    __device__ static void decode_chunk(const uint8_t* p, int j, int (&w)[8], int& sc_lo, int& sc_hi, int& mn) {
        const uint8_t* scales = p + 4;
        const uint8_t* qh = p + 16;
        const uint8_t* qs = p + (kQ5 ? 48 : 16);
        int sc;
        scale_min_k4(j, scales, sc, mn);
        sc_lo = sc_hi = sc;
        const int k = j / 2, h = j % 2;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            int v[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int l = 4 * i + e;
                int q = (qs[32 * k + l] >> (4 * h)) & 0x0f;
                if constexpr (kQ5) q |= ((qh[l] >> j) & 1) << 4;
                v[e] = q;
            }
            w[i] = pack4(v[0], v[1], v[2], v[3]);
        }
    }
};
template <> struct W256<DType::Q4_K> : W256Q45<false> {};
template <> struct W256<DType::Q5_K> : W256Q45<true> {};

template <> struct W256<DType::Q6_K> {
    static constexpr int BYTES = 210; static constexpr bool MIN = false;
    __device__ static void header(const uint8_t* p, float& d, float& dmin) { d = h2f(p + 208); dmin = 0.f; }
    __device__ static void decode_chunk(const uint8_t* p, int j, int (&w)[8], int& sc_lo, int& sc_hi, int& mn) {
        const uint8_t* ql = p;
        const uint8_t* qh = p + 128;
        const int8_t* scales = reinterpret_cast<const int8_t*>(p + 192);
        sc_lo = scales[2 * j];
        sc_hi = scales[2 * j + 1];
        mn = 0;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            int v[4];
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const int e = 32 * j + 4 * i + k;
                const int half = e / 128, r = e % 128, l = r % 64, hi = r / 64;
                const int lo4 = (ql[64 * half + l] >> (4 * hi)) & 0x0f;
                const int top = (qh[32 * half + l % 32] >> (4 * hi + 2 * (l / 32))) & 3;
                v[k] = (lo4 | (top << 4)) - 32;
            }
            w[i] = pack4(v[0], v[1], v[2], v[3]);
        }
    }
};

template <> struct W256<DType::IQ4_XS> {
    static constexpr int BYTES = 136; static constexpr bool MIN = false;
    __device__ static void header(const uint8_t* p, float& d, float& dmin) { d = h2f(p); dmin = 0.f; }
    __device__ static void decode_chunk(const uint8_t* p, int j, int (&w)[8], int& sc_lo, int& sc_hi, int& mn) {
        const int scales_h = p[2] | (p[3] << 8);
        const uint8_t* scales_l = p + 4;
        const int ls = ((scales_l[j / 2] >> (4 * (j % 2))) & 0x0f) | (((scales_h >> (2 * j)) & 3) << 4);
        sc_lo = sc_hi = ls - 32;
        mn = 0;
        nibbles32(p + 8 + 16 * j, [](int q, int) { return (int)c_iq4nl[q]; }, w);
    }
};

// vec_dot_*_q8_k: per super-block exact isum (and msum of the mins against the block sums), then
// sum += float(isum) * (d * d8); sum -= float(msum) * (dmin * d8)
template <DType T, int NC>
__device__ __forceinline__ void accumulate256(const uint8_t* blk, int b, const Acts& a, int c0, int nc,
                                              float (&acc)[NC]) {
    int isum[NC], msum[NC];
#pragma unroll
    for (int c = 0; c < NC; c++) isum[c] = msum[c] = 0;
    for (int j = 0; j < 8; j++) {
        int w[8], sc_lo, sc_hi, mn;
        W256<T>::decode_chunk(blk, j, w, sc_lo, sc_hi, mn);
#pragma unroll
        for (int c = 0; c < NC; c++) {
            if (c >= nc) break;
            const int row = c0 + c;
            const int8_t* aq = a.q + (size_t)row * a.n + b * 256 + 32 * j;
            isum[c] += sc_lo * dot4(w, aq) + sc_hi * dot4(w + 4, aq + 16);
            if constexpr (W256<T>::MIN) {
                const int* bs = a.bsums + (size_t)row * (a.n / 16) + b * 16;
                msum[c] += mn * (bs[2 * j] + bs[2 * j + 1]);
            }
        }
    }
    float d, dmin;
    W256<T>::header(blk, d, dmin);
    const int nb = a.n / 256;
#pragma unroll
    for (int c = 0; c < NC; c++) {
        if (c >= nc) break;
        const float d8 = a.d[(size_t)(c0 + c) * nb + b];
        acc[c] = add_mul(acc[c], (float)isum[c], __fmul_rn(d, d8));
        if constexpr (W256<T>::MIN) acc[c] = __fsub_rn(acc[c], __fmul_rn((float)msum[c], __fmul_rn(dmin, d8)));
    }
}

// Float weights (F32, F16, BF16) against F32 activations, blocks of 32.
template <DType T> struct WF;
template <> struct WF<DType::F32> {
    static constexpr int BYTES = 128;
    __device__ static float at(const uint8_t* p, int i) { return reinterpret_cast<const float*>(p)[i]; }
};
template <> struct WF<DType::F16> {
    static constexpr int BYTES = 64;
    __device__ static float at(const uint8_t* p, int i) { return h2f(p + 2 * i); }
};
template <> struct WF<DType::BF16> {
    static constexpr int BYTES = 64;
    __device__ static float at(const uint8_t* p, int i) {
        return __uint_as_float((uint32_t)(p[2 * i] | (p[2 * i + 1] << 8)) << 16);
    }
};
template <DType T, int NC>
__device__ __forceinline__ void accumulate_f(const uint8_t* blk, int b, const Acts& a, int c0, int nc, float (&acc)[NC]) {
    float w[32];
#pragma unroll
    for (int i = 0; i < 32; i++) w[i] = WF<T>::at(blk, i);
#pragma unroll
    for (int c = 0; c < NC; c++) {
        if (c >= nc) break;
        const float* x = a.x + (size_t)(c0 + c) * a.n + b * 32;
#pragma unroll
        for (int i = 0; i < 32; i++) acc[c] = add_mul(acc[c], w[i], x[i]);
    }
}

enum class Kind { F, B32, B256 };
template <DType T> constexpr Kind kind() {
    if constexpr (T == DType::F32 || T == DType::F16 || T == DType::BF16) return Kind::F;
    else if constexpr (T == DType::Q4_K || T == DType::Q5_K || T == DType::Q6_K || T == DType::IQ4_XS) return Kind::B256;
    else return Kind::B32;
}
template <DType T> constexpr int block_elems() { return kind<T>() == Kind::B256 ? 256 : 32; }
template <DType T> constexpr int block_bytes() {
    if constexpr (kind<T>() == Kind::F) return WF<T>::BYTES;
    else if constexpr (kind<T>() == Kind::B256) return W256<T>::BYTES;
    else return W32<T>::BYTES;
}

constexpr int kRowsPerBlock = 4;  // warps (weight rows) per thread block

// One warp per weight row, NC activation rows per grid column; lane l takes blocks l, l + 32, ...
// The lanes' partial sums are added in one fixed butterfly, so an element's value depends only on
// its weight row and activation row, never on NC or on how many activation rows there are.
template <DType T, int NC>
__global__ void __launch_bounds__(kWarp * kRowsPerBlock)
k_matmul(const uint8_t* W, size_t row_bytes, int rows, Acts a, float* Y, size_t ldy) {
    const int r = blockIdx.x * kRowsPerBlock + threadIdx.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    if (r >= rows) return;  // whole warps leave together
    const int c0 = blockIdx.y * NC;
    const int nc = min(NC, a.m - c0);
    const uint8_t* wrow = W + (size_t)r * row_bytes;
    float acc[NC];
#pragma unroll
    for (int c = 0; c < NC; c++) acc[c] = 0.f;
    const int nb = a.n / block_elems<T>();
    for (int b = lane; b < nb; b += kWarp) {
        const uint8_t* blk = wrow + (size_t)b * block_bytes<T>();
        if constexpr (kind<T>() == Kind::F) accumulate_f<T, NC>(blk, b, a, c0, nc, acc);
        else if constexpr (kind<T>() == Kind::B256) accumulate256<T, NC>(blk, b, a, c0, nc, acc);
        else accumulate32<T, NC>(blk, b, a, c0, nc, acc);
    }
#pragma unroll
    for (int c = 0; c < NC; c++) {
        const float v = warp_sum(acc[c]);
        if (lane == 0 && c < nc) Y[(size_t)(c0 + c) * ldy + r] = v;
    }
}

template <DType T>
void launch_matmul(const uint8_t* W, size_t row_bytes, int rows, const Acts& a, float* Y, size_t ldy, cudaStream_t st) {
    const dim3 block(kWarp * kRowsPerBlock);
    const unsigned gx = blocks_for(rows, kRowsPerBlock);
    if (a.m == 1) {  // decode: a GEMV
        k_matmul<T, 1><<<dim3(gx, 1), block, 0, st>>>(W, row_bytes, rows, a, Y, ldy);
    } else {         // prefill / batched decode: each weight block is read once per 8 activation rows
        constexpr int NC = 8;
        k_matmul<T, NC><<<dim3(gx, blocks_for(a.m, NC)), block, 0, st>>>(W, row_bytes, rows, a, Y, ldy);
    }
    check_launch("matmul");
}

// ---- the rest of the layer ----------------------------------------------------------------------

__device__ float block_sum(float v, float* shared) {  // blockDim.x a multiple of 32, <= 1024
    v = warp_sum(v);
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    const int nw = blockDim.x / kWarp;
    v = lane < nw ? shared[lane] : 0.f;
    v = warp_sum(v);
    __syncthreads();
    return v;
}

__global__ void k_rmsnorm(const float* x, const float* w, float eps, int n, float* y) {
    __shared__ float sh[32];
    const float* xr = x + (size_t)blockIdx.x * n;
    float* yr = y + (size_t)blockIdx.x * n;
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss = add_mul(ss, xr[i], xr[i]);
    ss = block_sum(ss, sh);
    const float sc = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = __fmul_rn(__fmul_rn(xr[i], sc), w[i]);
}

__global__ void k_add_bias(float* x, const float* b, int m, int n) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)m * n) x[i] += b[i % n];
}
__global__ void k_add(float* x, const float* y, size_t n) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}
__global__ void k_scale(float* x, float a, size_t n) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= a;
}
__global__ void k_softcap(float* x, float cap, size_t n) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = cap * tanhf(x[i] / cap);
}
__global__ void k_glu(bool gelu, float* g, const float* u, size_t n) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float x = g[i];
    if (gelu) {
        constexpr float kSqrt2OverPi = 0.7978845608028654f;
        g[i] = 0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + 0.044715f * x * x * x))) * u[i];
    } else {
        g[i] = x / (1.0f + expf(-x)) * u[i];
    }
}

// one thread per (row, head, rotated pair)
__global__ void k_rope(float* x, int T, int n_heads, int hd, size_t ld, int rope_dim, bool neox, const float* cos,
                       const float* sin) {
    const int half = rope_dim / 2;
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)T * n_heads * half) return;
    const int p = (int)(i % half), h = (int)(i / half % n_heads), t = (int)(i / half / n_heads);
    float* v = x + (size_t)t * ld + (size_t)h * hd;
    const float c = cos[(size_t)t * half + p], s = sin[(size_t)t * half + p];
    const int i0 = neox ? p : 2 * p, i1 = neox ? p + half : 2 * p + 1;
    const float a = v[i0], b = v[i1];
    v[i0] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    v[i1] = __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
}

__global__ void k_gather(const float* src, const int* rows, int R, int n, float* dst) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)R * n) dst[i] = src[(size_t)rows[i / n] * n + i % n];
}

__device__ __forceinline__ __half* kv_at(const KVLayout& kv, int block, int layer, int which, int head, int slot) {
    return reinterpret_cast<__half*>(kv.arena + (size_t)block * kv.bytes_per_block +
                                     (((size_t)(layer * 2 + which) * kv.n_kv_heads + head) * kv.block_size + slot) *
                                         kv.head_dim * sizeof(__half));
}

// one thread per (row, kv head, dim)
__global__ void k_store_kv(KVLayout kv, int layer, const float* k, const float* v, int T, const int* row_block,
                           const int* row_slot) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int kvd = kv.n_kv_heads * kv.head_dim;
    if (i >= (size_t)T * kvd) return;
    const int t = (int)(i / kvd), h = (int)(i % kvd) / kv.head_dim, d = (int)(i % kv.head_dim);
    kv_at(kv, row_block[t], layer, 0, h, row_slot[t])[d] = __float2half_rn(k[i]);
    kv_at(kv, row_block[t], layer, 1, h, row_slot[t])[d] = __float2half_rn(v[i]);
}

// One warp per (row, query head): lane l holds dims l, l + 32, ... of q and of the output. Per
// position, the warp reduces q . k, then an online softmax (running max and sum) weighs v.
constexpr int kDimsPerLane = kMaxHeadDim / kWarp;
__global__ void k_attention(KVLayout kv, int layer, const float* q, int T, int n_heads, float scale, int window,
                            const int* row_pos, const int* row_bt, const int* blocks, float* out) {
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / kWarp, lane = threadIdx.x % kWarp;
    if (warp >= T * n_heads) return;
    const int t = warp / n_heads, h = warp % n_heads;
    const int hd = kv.head_dim, kvh = h / (n_heads / kv.n_kv_heads);
    const float* qh = q + (size_t)t * n_heads * hd + (size_t)h * hd;
    float qv[kDimsPerLane], acc[kDimsPerLane];
#pragma unroll
    for (int i = 0; i < kDimsPerLane; i++) {
        const int d = lane + kWarp * i;
        qv[i] = d < hd ? qh[d] : 0.f;
        acc[i] = 0.f;
    }
    const int end = row_pos[t] + 1;
    const int lo = window > 0 ? max(0, end - window) : 0;
    const int* bt = blocks + row_bt[t];
    float mx = -INFINITY, sum = 0.f;
    for (int j = lo; j < end; j++) {
        const int blk = bt[j / kv.block_size], slot = j % kv.block_size;
        const __half* kp = kv_at(kv, blk, layer, 0, kvh, slot);
        const __half* vp = kv_at(kv, blk, layer, 1, kvh, slot);
        float part = 0.f;
#pragma unroll
        for (int i = 0; i < kDimsPerLane; i++) {
            const int d = lane + kWarp * i;
            if (d < hd) part = add_mul(part, __half2float(kp[d]), qv[i]);
        }
        const float s = scale * warp_sum(part);
        const float mnew = fmaxf(mx, s);
        const float corr = expf(mx - mnew);  // 0 on the first position (mx = -inf)
        const float p = expf(s - mnew);
        sum = sum * corr + p;
#pragma unroll
        for (int i = 0; i < kDimsPerLane; i++) {
            const int d = lane + kWarp * i;
            if (d < hd) acc[i] = acc[i] * corr + p * __half2float(vp[d]);
        }
        mx = mnew;
    }
    float* o = out + (size_t)t * n_heads * hd + (size_t)h * hd;
    const float inv = 1.0f / sum;
#pragma unroll
    for (int i = 0; i < kDimsPerLane; i++) {
        const int d = lane + kWarp * i;
        if (d < hd) o[d] = acc[i] * inv;
    }
}

constexpr int kThreads = 256;

}  // namespace

DType act_type(DType w) {
    switch (w) {
        case DType::Q4_0: case DType::Q5_0: case DType::Q8_0: case DType::IQ4_NL: return DType::Q8_0;
        case DType::Q4_1: case DType::Q5_1: return DType::Q8_1;
        case DType::Q4_K: case DType::Q5_K: case DType::Q6_K: case DType::IQ4_XS: return DType::Q8_K;
        default: return DType::F32;
    }
}

bool matmul_supported(DType w) {
    switch (w) {
        case DType::F32: case DType::F16: case DType::BF16: case DType::Q4_0: case DType::Q4_1: case DType::Q5_0:
        case DType::Q5_1: case DType::Q8_0: case DType::IQ4_NL: case DType::Q4_K: case DType::Q5_K: case DType::Q6_K:
        case DType::IQ4_XS:
            return true;
        default: return false;
    }
}

void quantize_acts(DType type, const float* X, int m, int n, int8_t* q, float* d, float* s, int* bsums,
                   cudaStream_t st) {
    if (type == DType::Q8_K) {
        const size_t nb = (size_t)m * (n / 256);
        k_quant_q8_k<<<blocks_for(nb, 128), 128, 0, st>>>(X, m, n, q, d, bsums);
    } else {
        const size_t nb = (size_t)m * (n / 32);
        k_quant_q8_0<<<blocks_for(nb, 128), 128, 0, st>>>(X, m, n, q, d, s, type == DType::Q8_1);
    }
    check_launch("quantize activations");
}

void matmul(DType wtype, const uint8_t* W, size_t row_bytes, int rows, const Acts& a, float* Y, size_t ldy,
            cudaStream_t st) {
    if (a.m == 0) return;
    switch (wtype) {
#define TS_CASE(T) case DType::T: return launch_matmul<DType::T>(W, row_bytes, rows, a, Y, ldy, st);
        TS_CASE(F32) TS_CASE(F16) TS_CASE(BF16) TS_CASE(Q4_0) TS_CASE(Q4_1) TS_CASE(Q5_0) TS_CASE(Q5_1)
        TS_CASE(Q8_0) TS_CASE(IQ4_NL) TS_CASE(Q4_K) TS_CASE(Q5_K) TS_CASE(Q6_K) TS_CASE(IQ4_XS)
#undef TS_CASE
        default: throw std::runtime_error("CUDA matmul: unsupported weight type");
    }
}

void rmsnorm(const float* x, const float* w, float eps, int m, int n, float* y, cudaStream_t st) {
    if (m == 0) return;
    k_rmsnorm<<<m, kThreads, 0, st>>>(x, w, eps, n, y);
    check_launch("rmsnorm");
}
void add_bias(float* x, const float* b, int m, int n, cudaStream_t st) {
    k_add_bias<<<blocks_for((size_t)m * n, kThreads), kThreads, 0, st>>>(x, b, m, n);
    check_launch("add_bias");
}
void add(float* x, const float* y, size_t n, cudaStream_t st) {
    k_add<<<blocks_for(n, kThreads), kThreads, 0, st>>>(x, y, n);
    check_launch("add");
}
void scale(float* x, float a, size_t n, cudaStream_t st) {
    k_scale<<<blocks_for(n, kThreads), kThreads, 0, st>>>(x, a, n);
    check_launch("scale");
}
void softcap(float* x, float cap, size_t n, cudaStream_t st) {
    k_softcap<<<blocks_for(n, kThreads), kThreads, 0, st>>>(x, cap, n);
    check_launch("softcap");
}
void glu(bool gelu, float* g, const float* u, size_t n, cudaStream_t st) {
    k_glu<<<blocks_for(n, kThreads), kThreads, 0, st>>>(gelu, g, u, n);
    check_launch("glu");
}
void rope(float* x, int T, int n_heads, int hd, size_t ld, int rope_dim, bool neox, const float* cos,
          const float* sin, cudaStream_t st) {
    const size_t n = (size_t)T * n_heads * (rope_dim / 2);
    k_rope<<<blocks_for(n, kThreads), kThreads, 0, st>>>(x, T, n_heads, hd, ld, rope_dim, neox, cos, sin);
    check_launch("rope");
}
void gather_rows(const float* src, const int* rows, int R, int n, float* dst, cudaStream_t st) {
    k_gather<<<blocks_for((size_t)R * n, kThreads), kThreads, 0, st>>>(src, rows, R, n, dst);
    check_launch("gather");
}
void store_kv(const KVLayout& kv, int layer, const float* k, const float* v, int T, const int* row_block,
              const int* row_slot, cudaStream_t st) {
    const size_t n = (size_t)T * kv.n_kv_heads * kv.head_dim;
    k_store_kv<<<blocks_for(n, kThreads), kThreads, 0, st>>>(kv, layer, k, v, T, row_block, row_slot);
    check_launch("store_kv");
}
void attention(const KVLayout& kv, int layer, const float* q, int T, int n_heads, float scale, int window,
               const int* row_pos, const int* row_bt, const int* blocks, float* out, cudaStream_t st) {
    const size_t threads = (size_t)T * n_heads * kWarp;
    k_attention<<<blocks_for(threads, 128), 128, 0, st>>>(kv, layer, q, T, n_heads, scale, window, row_pos, row_bt,
                                                          blocks, out);
    check_launch("attention");
}

}  // namespace ts::cuda
