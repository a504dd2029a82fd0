// model.h — the decoder forward (llama, qwen2, qwen3, gemma3, phi3) over a ragged batch, and the
// paged KV cache.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>
#include "backend.h"
#include "gguf.h"
#include "kernels/kernels.h"
#include "memory.h"
#include "quant.h"

namespace ts {

// A weight tensor: a view into the mmap'd file (zero copy), or into the model's packed copy.
struct Tensor {
    std::string name;
    DType type = DType::F32;
    int64_t ne[4] = {1, 1, 1, 1};  // ggml order: ne[0] = row length (input dim), ne[1] = rows
    const void* data = nullptr;
    size_t row_bytes = 0;
    bool packed = false;  // data is in the x16 layout (quant.h): groups of 16 rows
    bool present() const { return data != nullptr; }
};

// One RoPE variant. theta(pos, i) = pos / scale * base^(-2i / rope_dim) / freq_factors[i] (with
// YaRN's blend of interpolation and extrapolation when yarn_ext_factor > 0); cos and sin are
// multiplied by attn_factor.
struct RopeConfig {
    float base = 10000.f;
    float scale = 1.f;                // linear scaling: position is divided by this
    std::vector<float> freq_factors;  // per rotated pair (llama 3 rope_freqs, phi3 LongRoPE); empty: none
    float attn_factor = 1.f;          // magnitude scale of cos/sin (LongRoPE, YaRN)
    float yarn_ext_factor = 0.f;      // 0: no YaRN; else the extrapolation mix (llama.cpp's ext_factor)
    int yarn_orig_ctx = 0;            // YaRN: the context length the model was trained with
    float yarn_beta_fast = 32.f, yarn_beta_slow = 1.f;  // YaRN: ramp ends, in rotations
};

enum class FfnAct { SiLU, GeluTanh };  // SwiGLU (llama, qwen, phi3) or GeGLU with tanh-GELU (gemma3)

struct LlamaConfig {
    std::string arch;    // "llama", "qwen2", "qwen3", "gemma3" or "phi3"
    int n_vocab = 0;     // vocabulary size (rows of the embedding)
    int dim = 0;         // hidden size
    int hidden_dim = 0;  // FFN inner size
    int n_layers = 0;
    int n_heads = 0;                     // query heads
    int n_kv_heads = 0;                  // key/value heads (GQA when < n_heads)
    int head_dim = 0;                    // attention.key_length, else dim / n_heads (gemma3, qwen3: not dim / n_heads)
    int rope_dim = 0;                    // dimensions rotated per head (<= head_dim; the first rope_dim)
    int context_length = 0;              // max positions
    bool rope_neox = false;              // false: rotate adjacent pairs (llama); true: halves (qwen/gemma/phi3)
    RopeConfig rope;                     // RoPE of full-attention layers
    RopeConfig rope_local;               // RoPE of sliding-window layers (gemma3: base 10000; else == rope)
    float norm_eps = 1e-5f;              // RMSNorm epsilon
    float embd_scale = 1.f;              // embedding rows are multiplied by this (gemma3: sqrt(dim))
    float attn_scale = 0.f;              // softmax scale of q.k (1/sqrt(head_dim) unless the model says otherwise)
    float logit_softcap = 0.f;           // > 0: logits = cap * tanh(logits / cap) (gemma's final softcapping)
    int sliding_window = 0;              // > 0: sliding layers attend to the last sliding_window positions only
    std::vector<uint8_t> layer_sliding;  // per layer: 1 = sliding-window attention, 0 = full
    FfnAct ffn_act = FfnAct::SiLU;
    bool tied_output = false;    // output head shares token_embd
    bool qkv_bias = false;       // qwen2-style bias on q/k/v
    bool qk_norm = false;        // per-head RMSNorm of q and k before RoPE (qwen3, gemma3)
    bool post_norms = false;     // RMSNorm of the attention and FFN outputs before each residual (gemma3)
    bool fused_qkv = false;      // the file stores one attn_qkv matrix (phi3); bound as three row ranges
    bool fused_gate_up = false;  // the file stores gate and up in one ffn_up matrix (phi3)
    bool is_sliding(int layer) const { return sliding_window > 0 && layer_sliding[layer]; }
};

struct LayerWeights {
    Tensor attn_norm;       // (dim)
    Tensor wq;              // (dim -> n_heads * head_dim)
    Tensor wk;              // (dim -> n_kv_heads * head_dim)
    Tensor wv;              // (dim -> n_kv_heads * head_dim)
    Tensor bq, bk, bv;      // optional biases (qwen2)
    Tensor q_norm, k_norm;  // optional (head_dim): QK-norm (qwen3, gemma3)
    Tensor wo;              // (n_heads * head_dim -> dim)
    Tensor attn_post_norm;  // optional (dim): norm of the attention output (gemma3)
    Tensor ffn_norm;        // (dim)
    Tensor w_gate;          // (dim -> hidden_dim)
    Tensor w_up;            // (dim -> hidden_dim)
    Tensor w_down;          // (hidden_dim -> dim)
    Tensor ffn_post_norm;   // optional (dim): norm of the FFN output (gemma3)
};

struct LlamaWeights {
    Tensor tok_embd;  // (n_vocab rows of dim)
    Tensor out_norm;  // (dim)
    Tensor output;    // (dim -> n_vocab); == tok_embd when tied
    std::vector<LayerWeights> layers;
};

class KVCache;

// One sequence of a ragged batch.
struct SeqSpan {
    int n_tokens;           // new tokens in this call
    int start_pos;          // position of the first new token
    const int32_t* blocks;  // block table
    int n_blocks;           // valid entries in `blocks`
};

// cos/sin of every rotated pair for every row of a batch: [row][rope_dim / 2].
struct RopeTable {
    std::vector<float> cos, sin;
};

// The activations of one forward (llama2.c's RunState). Sized for the largest batch seen and kept
// between calls, so a decode step never page-faults; one forward at a time uses them.
struct RunState {
    struct Row {
        int seq, pos;
    };  // the sequence and absolute position of each batch row
    std::vector<Row> rows;                   // (T)
    streamed_vector<float> x;                // (T, dim) residual stream
    streamed_vector<float> xb;               // (T, dim) normed input of a sublayer
    streamed_vector<float> xb2;              // (T, dim) output of a sublayer
    streamed_vector<float> q;                // (T, n_heads * head_dim)
    streamed_vector<float> k, v;             // (T, n_kv_heads * head_dim)
    streamed_vector<float> att;              // (T, n_heads * head_dim) attention output
    streamed_vector<float> hb, hb2;          // (T, hidden_dim) FFN gate and up (hb: activation too)
    streamed_vector<float> xr, xn;           // (R, dim) rows that need logits, before/after the norm
    RopeTable rope, rope_local;              // full-attention and sliding-window layers' RoPE
    std::vector<std::vector<float>> scores;  // per pool thread: attention scores of its task
    std::vector<std::vector<uint8_t>> q8;    // per pool thread: its task's int8 query records (q8_0 KV)
};

// The RoPE table of a batch's rows (every backend rotates with the same cos/sin).
void rope_table(const RopeConfig& r, int rope_dim, const std::vector<RunState::Row>& rows, RopeTable& out);

class Model {
  public:
    // throws GGUFError / std::system_error; Device::CUDA: DeviceError when it cannot be used
    explicit Model(const std::string& path, Device device = Device::CPU);
    ~Model();
    const LlamaConfig& config() const { return cfg_; }
    const GGUFFile& gguf() const { return *file_; }
    const LlamaWeights& weights() const { return w_; }
    size_t weight_bytes() const { return weight_bytes_; }
    size_t repacked_bytes() const { return packed_bytes_; }
    Device device() const { return backend_->device(); }
    Backend& backend() const { return *backend_; }

    // tokens: all sequences' new tokens concatenated; logits written as [n_logit_rows, n_vocab].
    // Validates everything first (std::invalid_argument), then computes on the model's backend.
    void forward(KVCache& kv, const int32_t* tokens, int n_tokens, const std::vector<SeqSpan>& seqs,
                 const int32_t* logit_rows, int n_logit_rows, float* logits) const;
    // The CPU backend's forward of a checked batch (backend.cpp calls it; callers use forward()).
    void forward_cpu(KVCache& kv, const int32_t* tokens, int n_tokens, const std::vector<SeqSpan>& seqs,
                     const int32_t* logit_rows, int n_logit_rows, float* logits) const;
    void embed(const int32_t* tokens, int n, float* out) const;

  private:
    void load();  // read the config and bind every tensor, validating both
    void load_config();
    void pack();  // copy the matrices the active ISA has x16 kernels for into the packed layout
    // Throws std::invalid_argument unless the batch is well formed for this model and cache.
    void check_batch(const KVCache& kv, const int32_t* tokens, int T, const std::vector<SeqSpan>& seqs,
                     const int32_t* logit_rows, int R) const;
    std::unique_ptr<GGUFFile> file_;
    streamed_ptr packed_;
    size_t packed_bytes_ = 0;
    LlamaConfig cfg_;
    LlamaWeights w_;
    size_t weight_bytes_ = 0;
    mutable std::mutex run_mu_;  // one forward at a time owns run_
    mutable RunState run_;
    std::unique_ptr<Backend> backend_;  // where forward() runs (CPU unless asked otherwise)
};

// Element type of the KV cache: f32, f16, or int8 with fp16 scales per 32 elements (q8_0).
enum class KVDType { F32, F16, Q8_0 };
const char* kv_dtype_name(KVDType t);
KVDType parse_kv_dtype(const std::string& name);  // throws std::invalid_argument naming the choices

// Paged KV cache: one arena of num_blocks blocks; each block holds block_size positions of K
// and V for every layer. Layout of a block: [layer][k|v][kv head][run], where a run holds one head's
// block_size positions contiguously (attention streams them): f16/f32 as [pos in block][head_dim],
// q8_0 as kernels.h describes (KV8Layout: K in tiles of 16 positions, V by position, plus scales).
// With a device backend the arena is device memory of the same layout (f16 only; at() and run()
// are then host-only: not usable).
class KVCache {
  public:
    KVCache(const LlamaConfig& cfg, int block_size, int64_t budget_bytes, int num_blocks, KVDType dtype,
            Backend* device = nullptr);
    // The bytes one block takes, for a model's shape (what a budget is divided by).
    static size_t block_bytes(int n_layers, int n_kv_heads, int head_dim, int block_size, KVDType dtype);
    int num_blocks() const { return num_blocks_; }
    int block_size() const { return block_size_; }
    size_t bytes_per_block() const { return bytes_per_block_; }
    size_t total_bytes() const { return arena_bytes_; }
    KVDType dtype() const { return dtype_; }
    const KV8Layout& kv8() const { return kv8_; }
    bool is_f16() const { return dtype_ == KVDType::F16; }
    Device device() const { return device_ ? device_->device() : Device::CPU; }
    uint8_t* device_arena() const { return device_arena_.get(); }  // null unless on a device
    // start of the run of K (kv=0) or V (kv=1) of `layer`, KV head `head`, in `block`
    uint8_t* run(int block, int layer, int kv, int head) {
        return arena_.get() + (size_t)block * bytes_per_block_ + (size_t)layer * layer_bytes_ +
               (kv ? (size_t)n_kv_heads_ * k_run_ + (size_t)head * v_run_ : (size_t)head * k_run_);
    }
    const uint8_t* run(int block, int layer, int kv, int head) const {
        return const_cast<KVCache*>(this)->run(block, layer, kv, head);
    }
    // f16/f32: the head_dim elements of position `slot` in a run
    uint8_t* at(int block, int layer, int kv, int head, int slot) {
        return run(block, layer, kv, head) + (size_t)slot * head_bytes_;
    }
    const uint8_t* at(int block, int layer, int kv, int head, int slot) const {
        return const_cast<KVCache*>(this)->at(block, layer, kv, head, slot);
    }
    void copy_block(int src, int dst);
    int n_layers() const { return n_layers_; }
    int kv_dim() const { return kv_dim_; }

  private:
    int block_size_, num_blocks_, n_layers_, kv_dim_, n_kv_heads_;
    KVDType dtype_;
    KV8Layout kv8_;
    size_t head_bytes_ = 0, k_run_ = 0, v_run_ = 0, layer_bytes_ = 0, bytes_per_block_ = 0, arena_bytes_ = 0;
    streamed_ptr arena_;         // alloc_streamed: 2 MiB aligned, huge pages
    Backend* device_ = nullptr;  // non-null: the arena is this backend's device memory
    std::shared_ptr<uint8_t> device_arena_;
};

}  // namespace ts
