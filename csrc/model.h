// model.h — the llama forward over a ragged batch, and the paged KV cache.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>
#include "gguf.h"
#include "quant.h"

namespace ts {

// A weight tensor: a view into the mmap'd file (zero copy), or into the model's packed copy.
struct Tensor {
    std::string name;
    DType type = DType::F32;
    int64_t ne[4] = {1, 1, 1, 1};   // ggml order: ne[0] = row length (input dim), ne[1] = rows
    const void* data = nullptr;
    size_t row_bytes = 0;
    bool packed = false;            // data is in the x16 layout (quant.h): groups of 16 rows
    bool present() const { return data != nullptr; }
};

struct LlamaConfig {
    std::string arch;        // "llama" or "qwen2"
    int n_vocab = 0;         // vocabulary size (rows of the embedding)
    int dim = 0;             // hidden size
    int hidden_dim = 0;      // FFN inner size
    int n_layers = 0;
    int n_heads = 0;         // query heads
    int n_kv_heads = 0;      // key/value heads (GQA when < n_heads)
    int head_dim = 0;        // dim / n_heads
    int rope_dim = 0;        // dimensions rotated per head (== head_dim for llama)
    int context_length = 0;  // max positions
    float rope_base = 10000.f;
    float rope_scale = 1.f;  // linear scaling: position is divided by this
    bool rope_neox = false;  // false: rotate adjacent pairs (llama); true: halves (qwen2/neox)
    float norm_eps = 1e-5f;  // RMSNorm epsilon
    bool tied_output = false;// output head shares token_embd
    bool qkv_bias = false;   // qwen2-style bias on q/k/v
};

struct LayerWeights {
    Tensor attn_norm;            // (dim)
    Tensor wq;                   // (dim -> n_heads * head_dim)
    Tensor wk;                   // (dim -> n_kv_heads * head_dim)
    Tensor wv;                   // (dim -> n_kv_heads * head_dim)
    Tensor bq, bk, bv;           // optional biases (qwen2)
    Tensor wo;                   // (n_heads * head_dim -> dim)
    Tensor ffn_norm;             // (dim)
    Tensor w_gate;               // (dim -> hidden_dim)
    Tensor w_up;                 // (dim -> hidden_dim)
    Tensor w_down;               // (hidden_dim -> dim)
};

struct LlamaWeights {
    Tensor tok_embd;             // (n_vocab rows of dim)
    Tensor out_norm;             // (dim)
    Tensor output;               // (dim -> n_vocab); == tok_embd when tied
    std::vector<LayerWeights> layers;
};

class KVCache;

// One sequence of a ragged batch.
struct SeqSpan {
    int n_tokens;            // new tokens in this call
    int start_pos;           // position of the first new token
    const int32_t* blocks;   // block table
    int n_blocks;            // valid entries in `blocks`
};

class Model {
 public:
    explicit Model(const std::string& path);   // throws GGUFError / std::system_error
    const LlamaConfig& config() const { return cfg_; }
    const GGUFFile& gguf() const { return *file_; }
    const LlamaWeights& weights() const { return w_; }
    size_t weight_bytes() const { return weight_bytes_; }
    size_t repacked_bytes() const { return packed_bytes_; }

    // tokens: all sequences' new tokens concatenated; logits written as [n_logit_rows, n_vocab].
    // Validates everything first (std::invalid_argument), then computes.
    void forward(KVCache& kv, const int32_t* tokens, int n_tokens, const std::vector<SeqSpan>& seqs,
                 const int32_t* logit_rows, int n_logit_rows, float* logits) const;
    void embed(const int32_t* tokens, int n, float* out) const;

 private:
    void load();  // read the config and bind every tensor, validating both
    void pack();  // copy the matrices the active ISA has x16 kernels for into the packed layout
    std::unique_ptr<GGUFFile> file_;
    struct FreeDeleter { void operator()(uint8_t* p) const; };
    std::unique_ptr<uint8_t, FreeDeleter> packed_;
    size_t packed_bytes_ = 0;
    LlamaConfig cfg_;
    LlamaWeights w_;
    size_t weight_bytes_ = 0;
};

// Paged KV cache: one arena of num_blocks blocks; each block holds block_size positions of K
// and V for every layer. Layout of a block: [layer][k|v][kv head][pos in block][head_dim], so one
// head's positions of a block are one contiguous run (attention streams them).
class KVCache {
 public:
    KVCache(const LlamaConfig& cfg, int block_size, int64_t budget_bytes, int num_blocks, bool f16);
    int num_blocks() const { return num_blocks_; }
    int block_size() const { return block_size_; }
    size_t bytes_per_block() const { return bytes_per_block_; }
    size_t total_bytes() const { return arena_.size(); }
    bool is_f16() const { return f16_; }
    // pointer to K (kv=0) or V (kv=1) of `layer`, KV head `head`, for position `slot` in `block`
    uint8_t* at(int block, int layer, int kv, int head, int slot) {
        return arena_.data() + (size_t)block * bytes_per_block_ +
               (((size_t)(layer * 2 + kv) * n_kv_heads_ + head) * block_size_ + slot) * head_bytes_;
    }
    const uint8_t* at(int block, int layer, int kv, int head, int slot) const {
        return const_cast<KVCache*>(this)->at(block, layer, kv, head, slot);
    }
    void copy_block(int src, int dst);
    int n_layers() const { return n_layers_; }
    int kv_dim() const { return kv_dim_; }

 private:
    int block_size_, num_blocks_, n_layers_, kv_dim_, n_kv_heads_;
    bool f16_;
    size_t head_bytes_, bytes_per_block_;
    std::vector<uint8_t> arena_;
};

}  // namespace ts
