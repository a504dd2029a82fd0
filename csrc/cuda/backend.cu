// backend.cu — the CUDA backend: finds the device (a missing driver or device is a clean
// DeviceError, never a crash: the runtime is linked statically and finds libcuda at run time),
// uploads the weights once in the file's block layouts, and runs Model's forward as one stream
// of kernels per step (kernels.cuh). The host keeps what the CPU computes anyway and cheaply:
// the embedding rows (the reference dequantizer, exact) and the RoPE cos/sin table (model.cpp's).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "backend.h"
#include "cuda/kernels.cuh"
#include "model.h"
#include "ops.h"

namespace ts {

namespace {

void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA ") + what + ": " + cudaGetErrorString(e));
}

__global__ void k_probe() {}

std::string version_str(int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); }

// "" when device 0 can run this build's kernels; else why not.
std::string probe() {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e == cudaErrorInsufficientDriver || e == cudaErrorNoDevice || e != cudaSuccess || n == 0) {
        int drv = 0;
        cudaDriverGetVersion(&drv);
        const std::string rt = "this build's CUDA runtime is " + version_str(CUDART_VERSION);
        if (drv == 0 || e == cudaErrorInsufficientDriver)
            return drv == 0 ? "no NVIDIA driver found (libcuda.so cannot be loaded); " + rt
                            : "the NVIDIA driver supports CUDA " + version_str(drv) + " only; " + rt;
        if (e == cudaErrorNoDevice || n == 0) return "no CUDA device found (driver CUDA " + version_str(drv) + ")";
        return std::string("CUDA cannot be initialised: ") + cudaGetErrorString(e);
    }
    cudaDeviceProp p{};
    check(cudaGetDeviceProperties(&p, 0), "cudaGetDeviceProperties");
    cudaFuncAttributes fa{};
    const cudaError_t ke = cudaFuncGetAttributes(&fa, k_probe);
    if (ke != cudaSuccess) {
        cudaGetLastError();
        return std::string("this build has no kernels for ") + p.name + " (sm_" + std::to_string(p.major) +
               std::to_string(p.minor) +
               "): rebuild with -C cmake.define.CMAKE_CUDA_ARCHITECTURES=" + std::to_string(p.major) +
               std::to_string(p.minor) + " (" + cudaGetErrorString(ke) + ")";
    }
    return "";
}

std::string describe(int dev) {
    cudaDeviceProp p{};
    check(cudaGetDeviceProperties(&p, dev), "cudaGetDeviceProperties");
    return "cuda:" + std::to_string(dev) + " " + p.name + " (sm_" + std::to_string(p.major) + std::to_string(p.minor) +
           ", " + std::to_string((p.totalGlobalMem + (1ull << 29)) >> 30) + " GiB)";
}

// Device memory that grows (contents are not kept when it does).
class DevBuf {
  public:
    DevBuf() = default;
    DevBuf(const DevBuf&) = delete;
    DevBuf& operator=(const DevBuf&) = delete;
    ~DevBuf() {
        if (p_) cudaFree(p_);
    }
    bool ensure(size_t bytes) {  // true when the memory moved
        if (bytes <= n_) return false;
        if (p_) cudaFree(p_);
        p_ = nullptr, n_ = 0;
        check(cudaMalloc(&p_, bytes), "cudaMalloc");
        n_ = bytes;
        return true;
    }
    template <class T>
    T* as() const {
        return static_cast<T*>(p_);
    }

  private:
    void* p_ = nullptr;
    size_t n_ = 0;
};

// A matrix (or 1-D F32 vector) in device memory, in the file's layout.
struct DevTensor {
    DType type = DType::F32;
    const uint8_t* data = nullptr;
    size_t row_bytes = 0;
    int rows = 0, n = 0;
    const float* f32() const { return reinterpret_cast<const float*>(data); }
};

struct DevLayer {
    DevTensor attn_norm, wq, wk, wv, bq, bk, bv, q_norm, k_norm, wo, attn_post_norm, ffn_norm, w_gate, w_up, w_down,
        ffn_post_norm;
};

class CudaBackend final : public Backend {
  public:
    explicit CudaBackend(const Model& m) : m_(m) {
        if (const std::string why = probe(); !why.empty()) throw DeviceError("--device cuda: " + why);
        const LlamaConfig& c = m.config();
        if (c.head_dim > cuda::kMaxHeadDim)
            throw GGUFError("head_dim " + std::to_string(c.head_dim) + " is larger than the CUDA attention's " +
                            std::to_string(cuda::kMaxHeadDim));
        check(cudaSetDevice(dev_), "cudaSetDevice");
        try {
            check(cudaStreamCreateWithFlags(&st_, cudaStreamNonBlocking), "cudaStreamCreate");
            upload_weights();
        } catch (...) {  // a type the kernels lack, or out of memory: give back what was taken
            release();
            throw;
        }
        const char* g = std::getenv("TINYSERVE_CUDA_GRAPHS");
        graphs_on_ = g && std::string(g) == "1";
    }
    ~CudaBackend() override { release(); }

    Device device() const override { return Device::CUDA; }
    std::string description() const override { return describe(dev_); }

    std::shared_ptr<uint8_t> alloc_kv(size_t bytes) override {
        std::lock_guard<std::mutex> lock(mu_);
        check(cudaSetDevice(dev_), "cudaSetDevice");
        void* p = nullptr;
        check(cudaMalloc(&p, bytes), "cudaMalloc (KV cache)");
        if (const cudaError_t e = cudaMemset(p, 0, bytes); e != cudaSuccess) {
            cudaFree(p);
            check(e, "cudaMemset (KV cache)");
        }
        return std::shared_ptr<uint8_t>(static_cast<uint8_t*>(p), [](uint8_t* q) { cudaFree(q); });
    }
    void copy_kv(uint8_t* arena, size_t dst_off, size_t src_off, size_t bytes) override {
        std::lock_guard<std::mutex> lock(mu_);
        check(cudaSetDevice(dev_), "cudaSetDevice");
        check(cudaMemcpyAsync(arena + dst_off, arena + src_off, bytes, cudaMemcpyDeviceToDevice, st_), "copy_block");
        check(cudaStreamSynchronize(st_), "copy_block");
    }

    void forward(KVCache& kv, const int32_t* tokens, int T, const std::vector<SeqSpan>& seqs, const int32_t* logit_rows,
                 int R, float* logits) override;

  private:
    const DevTensor& upload(const Tensor& t, DevTensor& out);
    void upload_weights();
    bool size_buffers(int T, int R);  // true when any buffer moved
    void clear_graphs();
    void release();  // the weights, graphs and stream (the activation buffers free themselves)
    // Y = X @ W^T for several matrices over one input, quantizing X once per activation type.
    void matmul_multi(const DevTensor* const* ws, float* const* ys, int n_w, const float* X, int m);
    void matmul(const DevTensor& w, const float* X, int m, float* Y) {
        const DevTensor* ws[1] = {&w};
        float* ys[1] = {Y};
        matmul_multi(ws, ys, 1, X, m);
    }

    const Model& m_;
    int dev_ = 0;
    cudaStream_t st_ = nullptr;
    std::mutex mu_;                                   // one forward (or KV copy) at a time
    std::vector<void*> owned_;                        // weight allocations
    std::map<const void*, const uint8_t*> uploaded_;  // host data -> device copy (tied head: once)
    DevTensor out_norm_, output_;
    std::vector<DevLayer> layers_;
    // activations (llama2.c's RunState, on the device), sized for the largest batch seen
    DevBuf x_, xb_, xb2_, q_, k_, v_, att_, hb_, hb2_, xr_, xn_, logits_;
    DevBuf aq_[3], ad_[3], as_[3], abs_[3];  // quantized activations per type: Q8_0, Q8_1, Q8_K
    DevBuf ints_, floats_;                   // the step's row metadata and x / RoPE tables
    int cap_T_ = 0, cap_R_ = 0, cap_A_ = 0;
    // host staging
    std::vector<RunState::Row> rows_;
    RopeTable rope_, rope_local_;
    std::vector<int> ints_h_;
    std::vector<float> floats_h_;
    // TINYSERVE_CUDA_GRAPHS=1: a step's kernels captured once per (rows, logit rows, KV arena) and
    // replayed (decode-sized steps only); every buffer they name stays put until a buffer grows.
    struct GraphKey {
        int T, R, block_size;
        const uint8_t* arena;
        bool operator<(const GraphKey& o) const {
            return std::tie(T, R, block_size, arena) < std::tie(o.T, o.R, o.block_size, o.arena);
        }
    };
    static constexpr int kMaxGraphRows = 256, kMaxGraphs = 64;
    bool graphs_on_ = false;
    std::map<GraphKey, cudaGraphExec_t> graphs_;
};

void CudaBackend::release() {
    cudaSetDevice(dev_);
    clear_graphs();
    for (void* p : owned_) cudaFree(p);
    owned_.clear();
    if (st_) cudaStreamDestroy(st_);
    st_ = nullptr;
}

void CudaBackend::clear_graphs() {
    for (auto& [key, exec] : graphs_) cudaGraphExecDestroy(exec);
    graphs_.clear();
}

const DevTensor& CudaBackend::upload(const Tensor& t, DevTensor& out) {
    if (!t.present()) return out;
    if (t.packed) throw std::logic_error("CUDA upload: tensor '" + t.name + "' is in the x16 layout");
    if (!cuda::matmul_supported(t.type))
        throw GGUFError("tensor '" + t.name + "' has type " + dtype_info(t.type).name +
                        ", which the CUDA backend cannot compute with");
    out.type = t.type;
    out.row_bytes = t.row_bytes;
    out.rows = (int)t.ne[1];
    out.n = (int)t.ne[0];
    auto it = uploaded_.find(t.data);
    if (it != uploaded_.end()) {
        out.data = it->second;
        return out;
    }
    const size_t bytes = (size_t)t.ne[1] * t.row_bytes;
    void* p = nullptr;
    check(cudaMalloc(&p, bytes), "cudaMalloc (weights)");
    owned_.push_back(p);
    check(cudaMemcpy(p, t.data, bytes, cudaMemcpyHostToDevice), "upload weights");
    out.data = static_cast<const uint8_t*>(p);
    uploaded_[t.data] = out.data;
    return out;
}

void CudaBackend::upload_weights() {
    const LlamaWeights& w = m_.weights();
    upload(w.out_norm, out_norm_);
    upload(w.output, output_);
    layers_.resize(w.layers.size());
    for (size_t l = 0; l < w.layers.size(); l++) {
        const LayerWeights& L = w.layers[l];
        DevLayer& D = layers_[l];
        upload(L.attn_norm, D.attn_norm);
        upload(L.wq, D.wq), upload(L.wk, D.wk), upload(L.wv, D.wv);
        upload(L.bq, D.bq), upload(L.bk, D.bk), upload(L.bv, D.bv);
        upload(L.q_norm, D.q_norm), upload(L.k_norm, D.k_norm);
        upload(L.wo, D.wo);
        upload(L.attn_post_norm, D.attn_post_norm);
        upload(L.ffn_norm, D.ffn_norm);
        upload(L.w_gate, D.w_gate), upload(L.w_up, D.w_up), upload(L.w_down, D.w_down);
        upload(L.ffn_post_norm, D.ffn_post_norm);
    }
}

bool CudaBackend::size_buffers(int T, int R) {
    bool moved = false;
    const LlamaConfig& c = m_.config();
    const size_t D = c.dim, QD = (size_t)c.n_heads * c.head_dim, KVD = (size_t)c.n_kv_heads * c.head_dim,
                 H = c.hidden_dim, F = sizeof(float);
    if (T > cap_T_) {
        for (DevBuf* b : {&x_, &xb_, &xb2_}) b->ensure(T * D * F);
        q_.ensure(T * QD * F), att_.ensure(T * QD * F);
        k_.ensure(T * KVD * F), v_.ensure(T * KVD * F);
        hb_.ensure(T * H * F), hb2_.ensure(T * H * F);
        cap_T_ = T;
        moved = true;
    }
    if (const int A = std::max(T, R); A > cap_A_) {  // quantized activations: layer rows or logit rows
        const size_t n = std::max({D, QD, H});
        for (int i = 0; i < 3; i++) {
            aq_[i].ensure(A * n), ad_[i].ensure(A * (n / 32) * F), as_[i].ensure(A * (n / 32) * F);
            abs_[i].ensure(A * (n / 16) * sizeof(int));
        }
        cap_A_ = A;
        moved = true;
    }
    if (R > cap_R_) {
        xr_.ensure(R * D * F), xn_.ensure(R * D * F), logits_.ensure((size_t)R * c.n_vocab * F);
        cap_R_ = R;
        moved = true;
    }
    return moved;
}

void CudaBackend::matmul_multi(const DevTensor* const* ws, float* const* ys, int n_w, const float* X, int m) {
    cuda::Acts acts[3];
    bool done[3] = {false, false, false};
    for (int i = 0; i < n_w; i++) {
        const DevTensor& w = *ws[i];
        const DType at = cuda::act_type(w.type);
        cuda::Acts a;
        a.m = m, a.n = w.n, a.type = at;
        if (at == DType::F32) {
            a.x = X;
        } else {
            const int k = at == DType::Q8_0 ? 0 : at == DType::Q8_1 ? 1 : 2;
            if (!done[k] || acts[k].n != w.n) {
                cuda::quantize_acts(at, X, m, w.n, aq_[k].as<int8_t>(), ad_[k].as<float>(), as_[k].as<float>(),
                                    abs_[k].as<int>(), st_);
                acts[k] = a;
                acts[k].q = aq_[k].as<int8_t>(), acts[k].d = ad_[k].as<float>(), acts[k].s = as_[k].as<float>();
                acts[k].bsums = abs_[k].as<int>();
                done[k] = true;
            }
            a = acts[k];
        }
        cuda::matmul(w.type, w.data, w.row_bytes, w.rows, a, ys[i], (size_t)w.rows, st_);
    }
}

void CudaBackend::forward(KVCache& kv, const int32_t* tokens, int T, const std::vector<SeqSpan>& seqs,
                          const int32_t* logit_rows, int R, float* logits) {
    if (!kv.is_f16()) throw std::invalid_argument("the CUDA backend keeps the KV cache in f16 only");
    std::lock_guard<std::mutex> lock(mu_);
    check(cudaSetDevice(dev_), "cudaSetDevice");
    const LlamaConfig& c = m_.config();
    const int D = c.dim, HD = c.head_dim, NH = c.n_heads, NKV = c.n_kv_heads, H = c.hidden_dim;
    const int QD = NH * HD, KVD = NKV * HD, bs = kv.block_size(), half = c.rope_dim / 2;
    bool moved = size_buffers(T, std::max(R, 1));

    // host: each row's sequence and position, the RoPE tables, the embedding rows
    rows_.resize(T);
    for (int si = 0, r = 0; si < (int)seqs.size(); si++)
        for (int i = 0; i < seqs[si].n_tokens; i++) rows_[r++] = RunState::Row{si, seqs[si].start_pos + i};
    rope_table(c.rope, c.rope_dim, rows_, rope_);
    if (c.sliding_window > 0) rope_table(c.rope_local, c.rope_dim, rows_, rope_local_);
    // floats: x [T][D] | cos | sin | cos_local | sin_local
    const size_t rope_n = (size_t)T * half;
    floats_h_.resize((size_t)T * D + 4 * rope_n);
    float* xh = floats_h_.data();
    for (int t = 0; t < T; t++) get_row(m_.weights().tok_embd, tokens[t], xh + (size_t)t * D);
    std::memcpy(xh + (size_t)T * D, rope_.cos.data(), rope_n * sizeof(float));
    std::memcpy(xh + (size_t)T * D + rope_n, rope_.sin.data(), rope_n * sizeof(float));
    if (c.sliding_window > 0) {
        std::memcpy(xh + (size_t)T * D + 2 * rope_n, rope_local_.cos.data(), rope_n * sizeof(float));
        std::memcpy(xh + (size_t)T * D + 3 * rope_n, rope_local_.sin.data(), rope_n * sizeof(float));
    }
    // ints: pos [T] | block table offset [T] | block [T] | slot [T] | logit rows [R] | block tables
    ints_h_.assign((size_t)5 * T + R, 0);
    std::vector<int> seq_bt(seqs.size());
    for (size_t si = 0; si < seqs.size(); si++) {
        seq_bt[si] = (int)ints_h_.size();
        ints_h_.insert(ints_h_.end(), seqs[si].blocks, seqs[si].blocks + seqs[si].n_blocks);
    }
    int* ih = ints_h_.data();
    for (int t = 0; t < T; t++) {
        const RunState::Row& row = rows_[t];
        ih[t] = row.pos;
        ih[T + t] = seq_bt[row.seq];
        ih[2 * T + t] = seqs[row.seq].blocks[row.pos / bs];
        ih[3 * T + t] = row.pos % bs;
    }
    for (int i = 0; i < R; i++) ih[4 * T + i] = logit_rows[i];
    moved |= ints_.ensure(ints_h_.size() * sizeof(int));
    moved |= floats_.ensure(floats_h_.size() * sizeof(float));
    if (moved) clear_graphs();
    check(cudaMemcpyAsync(ints_.as<int>(), ints_h_.data(), ints_h_.size() * sizeof(int), cudaMemcpyHostToDevice, st_),
          "upload step");
    check(cudaMemcpyAsync(floats_.as<float>(), floats_h_.data(), floats_h_.size() * sizeof(float),
                          cudaMemcpyHostToDevice, st_),
          "upload step");
    const int* d_pos = ints_.as<int>();
    const int* d_bt = d_pos + T;
    const int* d_block = d_pos + 2 * T;
    const int* d_slot = d_pos + 3 * T;
    const int* d_logit_rows = d_pos + 4 * T;
    const int* d_blocks = d_pos;  // block tables: at their offsets into the same array
    const float* d_cos = floats_.as<float>() + (size_t)T * D;
    const float* d_sin = d_cos + rope_n;
    const float* d_cos_local = d_cos + 2 * rope_n;
    const float* d_sin_local = d_cos + 3 * rope_n;

    float *x = x_.as<float>(), *xb = xb_.as<float>(), *xb2 = xb2_.as<float>(), *q = q_.as<float>(), *k = k_.as<float>(),
          *v = v_.as<float>(), *att = att_.as<float>(), *hb = hb_.as<float>(), *hb2 = hb2_.as<float>();
    const cuda::KVLayout kvl{kv.device_arena(), kv.bytes_per_block(), bs, NKV, HD};

    // the step's kernels, all on st_ (captured into a graph or launched as they come)
    auto compute = [&] {
        // embedding (gemma3: times sqrt(dim))
        check(cudaMemcpyAsync(x, floats_.as<float>(), (size_t)T * D * sizeof(float), cudaMemcpyDeviceToDevice, st_),
              "embedding");
        if (c.embd_scale != 1.f) cuda::scale(x, c.embd_scale, (size_t)T * D, st_);

        for (int l = 0; l < c.n_layers; l++) {
            const DevLayer& L = layers_[l];
            const bool sliding = c.is_sliding(l);
            // attention: RMSNorm, then q, k, v projections (+ qwen2 bias)
            cuda::rmsnorm(x, L.attn_norm.f32(), c.norm_eps, T, D, xb, st_);
            {
                const DevTensor* ws[3] = {&L.wq, &L.wk, &L.wv};
                float* ys[3] = {q, k, v};
                matmul_multi(ws, ys, 3, xb, T);
            }
            if (L.bq.data) cuda::add_bias(q, L.bq.f32(), T, QD, st_);
            if (L.bk.data) cuda::add_bias(k, L.bk.f32(), T, KVD, st_);
            if (L.bv.data) cuda::add_bias(v, L.bv.f32(), T, KVD, st_);
            // QK-norm: RMSNorm of every head of q and k (qwen3, gemma3)
            if (c.qk_norm) {
                cuda::rmsnorm(q, L.q_norm.f32(), c.norm_eps, T * NH, HD, q, st_);
                cuda::rmsnorm(k, L.k_norm.f32(), c.norm_eps, T * NKV, HD, k, st_);
            }
            // RoPE: rotate q and k in each head; then store k, v in the paged cache
            const float* cs = sliding ? d_cos_local : d_cos;
            const float* sn = sliding ? d_sin_local : d_sin;
            cuda::rope(q, T, NH, HD, QD, c.rope_dim, c.rope_neox, cs, sn, st_);
            cuda::rope(k, T, NKV, HD, KVD, c.rope_dim, c.rope_neox, cs, sn, st_);
            cuda::store_kv(kvl, l, k, v, T, d_block, d_slot, st_);
            // causal attention over the paged cache (sliding layers: the last sliding_window positions)
            cuda::attention(kvl, l, q, T, NH, c.attn_scale, sliding ? c.sliding_window : 0, d_pos, d_bt, d_blocks, att,
                            st_);
            // output projection (gemma3: post-attention RMSNorm), residual
            matmul(L.wo, att, T, xb2);
            if (c.post_norms) cuda::rmsnorm(xb2, L.attn_post_norm.f32(), c.norm_eps, T, D, xb2, st_);
            cuda::add(x, xb2, (size_t)T * D, st_);
            // FFN: RMSNorm, SwiGLU or GeGLU, down projection (gemma3: post-FFN RMSNorm), residual
            cuda::rmsnorm(x, L.ffn_norm.f32(), c.norm_eps, T, D, xb, st_);
            {
                const DevTensor* ws[2] = {&L.w_gate, &L.w_up};
                float* ys[2] = {hb, hb2};
                matmul_multi(ws, ys, 2, xb, T);
            }
            cuda::glu(c.ffn_act == FfnAct::GeluTanh, hb, hb2, (size_t)T * H, st_);
            matmul(L.w_down, hb, T, xb2);
            if (c.post_norms) cuda::rmsnorm(xb2, L.ffn_post_norm.f32(), c.norm_eps, T, D, xb2, st_);
            cuda::add(x, xb2, (size_t)T * D, st_);
        }

        // final RMSNorm and output head, only for the rows that need logits (gemma: softcapping)
        if (R > 0) {
            cuda::gather_rows(x, d_logit_rows, R, D, xr_.as<float>(), st_);
            cuda::rmsnorm(xr_.as<float>(), out_norm_.f32(), c.norm_eps, R, D, xn_.as<float>(), st_);
            matmul(output_, xn_.as<float>(), R, logits_.as<float>());
            if (c.logit_softcap > 0.f) cuda::softcap(logits_.as<float>(), c.logit_softcap, (size_t)R * c.n_vocab, st_);
        }
    };
    if (graphs_on_ && T <= kMaxGraphRows) {
        const GraphKey key{T, R, bs, kv.device_arena()};
        auto it = graphs_.find(key);
        if (it == graphs_.end()) {
            if ((int)graphs_.size() >= kMaxGraphs) clear_graphs();
            check(cudaStreamBeginCapture(st_, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
            cudaGraph_t graph = nullptr;
            try {
                compute();
            } catch (...) {
                cudaStreamEndCapture(st_, &graph);
                if (graph) cudaGraphDestroy(graph);
                throw;
            }
            check(cudaStreamEndCapture(st_, &graph), "cudaStreamEndCapture");
            cudaGraphExec_t exec = nullptr;
            const cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
            cudaGraphDestroy(graph);
            check(e, "cudaGraphInstantiate");
            it = graphs_.emplace(key, exec).first;
        }
        check(cudaGraphLaunch(it->second, st_), "cudaGraphLaunch");
    } else {
        compute();
    }
    if (R > 0) {
        check(cudaMemcpyAsync(logits, logits_.as<float>(), (size_t)R * c.n_vocab * sizeof(float),
                              cudaMemcpyDeviceToHost, st_),
              "download logits");
    }
    check(cudaStreamSynchronize(st_), "forward");
}

}  // namespace

bool cuda_compiled() { return true; }
std::string cuda_status() { return probe(); }
std::string cuda_device_description() { return probe().empty() ? describe(0) : ""; }
std::unique_ptr<Backend> make_cuda_backend(const Model& m) { return std::make_unique<CudaBackend>(m); }

}  // namespace ts
