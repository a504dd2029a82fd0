// kernels.cu — hand-written CUDA kernels for the layer step (kernels.cuh says what each computes).
// Simple before fast: one warp per weight row, one lane per block, dp4a for the int8 dot products,
// weight blocks read in the file's own layout. Every kernel mirrors the CPU scalar reference.
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

#include "cuda/blocks.cuh"
#include "cuda/kernels.cuh"

namespace ts::cuda {

namespace {

constexpr int kWarp = 32;

void check_launch(const char* what) {
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA ") + what + ": " + cudaGetErrorString(e));
}

unsigned blocks_for(size_t n, int threads) { return (unsigned)((n + threads - 1) / threads); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// ---- activation quantization (quant.cpp's quantize_q8_0 / q8_1 / q8_K, one thread per block) ----

__global__ void k_quant_q8_0(const float* X, int m, int n, int8_t* q, float* d, float* s, bool with_sum) {
    const int nb = n / 32;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= m * nb) return;
    const int r = i / nb, b = i % nb;
    quant_q8_0_block(X + (size_t)r * n + b * 32, q + (size_t)r * n + b * 32, d + i, s + i, with_sum);
}

__global__ void k_quant_q8_k(const float* X, int m, int n, int8_t* q, float* d, int* bsums) {
    const int nb = n / 256;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= m * nb) return;
    const int r = i / nb, b = i % nb;
    quant_q8_k_block(X + (size_t)r * n + b * 256, q + (size_t)r * n + b * 256, d + i,
                     bsums + (size_t)r * (n / 16) + b * 16);
}

constexpr int kRowsPerBlock = 4;  // warps (weight rows) per thread block

// One warp per weight row, NC activation rows per grid column; lane l takes blocks l, l + 32, ...
// The lanes' partial sums are added in one fixed butterfly, so an element's value depends only on
// its weight row and activation row, never on NC or on how many activation rows there are.
template <DType T, int NC>
__global__ void __launch_bounds__(kWarp* kRowsPerBlock)
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
        if constexpr (kind<T>() == Kind::F)
            accumulate_f<T, NC>(blk, b, a, c0, nc, acc);
        else if constexpr (kind<T>() == Kind::B256)
            accumulate256<T, NC>(blk, b, a, c0, nc, acc);
        else
            accumulate32<T, NC>(blk, b, a, c0, nc, acc);
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
    } else {  // prefill / batched decode: each weight block is read once per 8 activation rows
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
        case DType::Q4_0:
        case DType::Q5_0:
        case DType::Q8_0:
        case DType::IQ4_NL:
            return DType::Q8_0;
        case DType::Q4_1:
        case DType::Q5_1:
            return DType::Q8_1;
        case DType::Q4_K:
        case DType::Q5_K:
        case DType::Q6_K:
        case DType::IQ4_XS:
            return DType::Q8_K;
        default:
            return DType::F32;
    }
}

bool matmul_supported(DType w) {
    switch (w) {
        case DType::F32:
        case DType::F16:
        case DType::BF16:
        case DType::Q4_0:
        case DType::Q4_1:
        case DType::Q5_0:
        case DType::Q5_1:
        case DType::Q8_0:
        case DType::IQ4_NL:
        case DType::Q4_K:
        case DType::Q5_K:
        case DType::Q6_K:
        case DType::IQ4_XS:
            return true;
        default:
            return false;
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
    // clang-format off
    switch (wtype) {
#define TS_CASE(T) case DType::T: return launch_matmul<DType::T>(W, row_bytes, rows, a, Y, ldy, st);
        TS_CASE(F32) TS_CASE(F16) TS_CASE(BF16) TS_CASE(Q4_0) TS_CASE(Q4_1) TS_CASE(Q5_0) TS_CASE(Q5_1)
        TS_CASE(Q8_0) TS_CASE(IQ4_NL) TS_CASE(Q4_K) TS_CASE(Q5_K) TS_CASE(Q6_K) TS_CASE(IQ4_XS)
#undef TS_CASE
        default: throw std::runtime_error("CUDA matmul: unsupported weight type");
    }
    // clang-format on
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
void rope(float* x, int T, int n_heads, int hd, size_t ld, int rope_dim, bool neox, const float* cos, const float* sin,
          cudaStream_t st) {
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
