// model.cpp — load a llama/qwen2/qwen3/gemma3/phi3 GGUF (validating every tensor against the
// config) and run the forward over a ragged batch with a paged KV cache.
#include "model.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <sys/mman.h>
#include <tuple>
#include <utility>

#include "kernels/kernels.h"
#include "ops.h"
#include "threadpool.h"

namespace ts {

// ---------------------------------------------------------------------------------------------
// Loading

uint8_t* alloc_streamed(size_t bytes) {  // memory.h
    constexpr size_t kHuge = size_t{2} << 20;
    const char* e = std::getenv("TINYSERVE_HUGEPAGES");
    const bool huge = bytes >= 2 * kHuge && !(e && std::string(e) == "0");
    const size_t align = huge ? kHuge : 64;
    const size_t size = (std::max<size_t>(bytes, 1) + align - 1) / align * align;
    auto* p = static_cast<uint8_t*>(std::aligned_alloc(align, size));
    if (!p) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    if (huge) ::madvise(p, size, MADV_HUGEPAGE);  // advice only: a refusal leaves 4 KiB pages
#endif
    return p;
}

namespace {

std::string shape_str(const int64_t* ne, int n) {
    std::string s = "[";
    for (int i = 0; i < n; i++) s += (i ? ", " : "") + std::to_string(ne[i]);
    return s + "]";
}

int checked_int(const GGUFFile& f, const std::string& key, int64_t lo, int64_t hi, int64_t def, bool required) {
    int64_t v = required ? f.require_int(key) : f.get_int(key, def);
    if (v < lo || v > hi)
        throw GGUFError("metadata '" + key + "' = " + std::to_string(v) + " is out of range [" + std::to_string(lo) +
                        ", " + std::to_string(hi) + "]");
    return (int)v;
}

// The weight types the active table computes with, by name.
std::string supported_types() {
    const IsaTable& isa = active_table();
    std::string s;
    for (int id = 0; id < kMaxDTypeId; id++) {
        const DTypeInfo& ti = dtype_info(static_cast<uint32_t>(id));
        if (ti.name && ti.supported && isa.types[id] && isa.types[id]->vec_dot)
            s += (s.empty() ? "" : ", ") + std::string(ti.name);
    }
    return s;
}

// Look up a tensor and check its shape (ggml order) and that its type can be computed with.
Tensor get_tensor(const GGUFFile& f, const std::string& name, std::vector<int64_t> shape, bool required, bool matrix,
                  size_t& total_bytes) {
    Tensor t;
    const GGUFTensorInfo* info = f.find_tensor(name);
    if (!info) {
        if (required) throw GGUFError("missing tensor '" + name + "'");
        return t;
    }
    // trailing dims of 1 are equivalent
    int n_dims = info->n_dims;
    while (n_dims > 1 && info->ne[n_dims - 1] == 1) n_dims--;
    bool ok = n_dims == (int)shape.size();
    for (size_t i = 0; ok && i < shape.size(); i++) ok = info->ne[i] == shape[i];
    if (!ok)
        throw GGUFError("tensor '" + name + "' has shape " + shape_str(info->ne, info->n_dims) + ", expected " +
                        shape_str(shape.data(), (int)shape.size()));
    const DTypeInfo& ti = dtype_info(info->type);
    const char* tname = ti.name ? ti.name : "unknown";
    if (matrix) {
        const IsaTable& isa = active_table();
        if (!ti.supported || !isa.types[static_cast<uint32_t>(info->type)])
            throw GGUFError("tensor '" + name + "' has type " + tname +
                            ", which tinyserve cannot compute with (supported: " + supported_types() + ")");
    } else if (info->type != DType::F32) {
        throw GGUFError("tensor '" + name + "' has type " + tname + "; 1-D tensors must be F32");
    }
    t.name = name;
    t.type = info->type;
    for (int i = 0; i < 4; i++) t.ne[i] = info->ne[i];
    t.data = info->data;
    t.row_bytes = row_bytes(info->type, info->ne[0]);
    total_bytes += info->nbytes;
    return t;
}

}  // namespace

Model::Model(const std::string& path, Device device) : file_(std::make_unique<GGUFFile>(path)) {
    try {
        load();
    } catch (const GGUFError& e) {
        const std::string msg = e.what();
        if (msg.rfind(path, 0) == 0) throw;
        throw GGUFError(path + ": " + msg);
    }
    if (device == Device::CUDA) {  // the weights go to the device as the file lays them out
        backend_ = make_cuda_backend(*this);
        return;
    }
    pack();
    backend_ = make_cpu_backend(*this);
}

Model::~Model() = default;

// Where the active ISA has an x16 kernel for a matrix's type (and the rows come in whole groups
// of 16), copy the matrix into the packed layout once; the mmap'd original is then never read
// again for compute. TINYSERVE_PACK=0 keeps every matrix in the file's layout.
void Model::pack() {
    if (const char* e = std::getenv("TINYSERVE_PACK"); e && std::string(e) == "0") return;
    const IsaTable& isa = active_table();
    std::vector<Tensor*> todo;
    auto want = [&](Tensor& t) {
        const TypeKernels* k = isa.types[static_cast<uint32_t>(t.type)];
        if (t.present() && !t.packed && k && k->gemm_x16 && packable(t.type) && t.ne[1] % kPackRows == 0 &&
            std::find(todo.begin(), todo.end(), &t) == todo.end())
            todo.push_back(&t);
    };
    for (LayerWeights& L : w_.layers)
        for (Tensor* t : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down}) want(*t);
    want(w_.output);
    if (todo.empty()) return;
    size_t total = 0;
    std::vector<size_t> offset;
    struct Job {
        const Tensor* t;
        size_t off;
        int64_t group;
    };
    std::vector<Job> jobs;
    for (Tensor* t : todo) {
        for (int64_t g = 0; g < t->ne[1] / kPackRows; g++) jobs.push_back({t, total, g});
        offset.push_back(total);
        total += (size_t)t->ne[1] * t->row_bytes;
        total = (total + 63) / 64 * 64;
    }
    packed_.reset(alloc_streamed(total));
    uint8_t* base = packed_.get();
    parallel_for((int)jobs.size(), [&](int i, int) {
        const Job& j = jobs[i];
        const size_t gb = (size_t)kPackRows * j.t->row_bytes;
        pack_x16(j.t->type, static_cast<const uint8_t*>(j.t->data) + j.group * gb, j.t->row_bytes, j.t->ne[0],
                 base + j.off + j.group * gb);
    });
    for (size_t i = 0; i < todo.size(); i++) {
        file_->release(todo[i]->data, (size_t)todo[i]->ne[1] * todo[i]->row_bytes);  // RSS: no double count
        todo[i]->data = base + offset[i];
        todo[i]->packed = true;
    }
    packed_bytes_ = total;
    if (cfg_.tied_output) w_.tok_embd = w_.output;  // the embedding reads rows back out of the groups
}

namespace {

// What each architecture adds to the llama block (llama.cpp's graphs for these architectures;
// the numbers llama.cpp hard-codes rather than reads are marked).
struct ArchTraits {
    const char* name;
    bool rope_neox;      // RoPE on halves (NEOX) rather than adjacent pairs
    double default_eps;  // RMSNorm epsilon when the metadata has none
    bool qk_norm;        // attn_q_norm / attn_k_norm per head before RoPE
    bool gemma;          // gemma3: sqrt(dim) embedding scale, post-norms, GeGLU, local/global layers
    bool phi3;           // phi3: fused qkv and gate+up, LongRoPE factors, sliding window on all layers
};

constexpr ArchTraits kArchs[] = {
    {"llama", false, 1e-5, false, false, false}, {"qwen2", true, 1e-6, false, false, false},
    {"qwen3", true, 1e-6, true, false, false},   {"gemma3", true, 1e-6, true, true, false},
    {"phi3", true, 1e-5, false, false, true},
};

const ArchTraits& arch_traits(const std::string& arch) {
    std::string names;
    for (const ArchTraits& t : kArchs) {
        if (arch == t.name) return t;
        names += std::string(names.empty() ? "" : ", ") + t.name;
    }
    throw GGUFError("unsupported architecture '" + arch + "' (supported: " + names + ")");
}

float checked_float(const GGUFFile& f, const std::string& key, double def, double lo, double hi) {
    const double v = f.get_float(key, def);
    if (!std::isfinite(v) || v < lo || v > hi)
        throw GGUFError("metadata '" + key + "' = " + std::to_string(v) + " is out of range [" + std::to_string(lo) +
                        ", " + std::to_string(hi) + "]");
    return (float)v;
}

// Rows [r0, r0 + n) of a matrix as a matrix of its own (fused qkv / gate+up are bound this way).
Tensor row_range(const Tensor& t, int64_t r0, int64_t n, const std::string& part) {
    Tensor v = t;
    v.name = t.name + "[" + part + "]";
    v.ne[1] = n;
    v.data = static_cast<const uint8_t*>(t.data) + (size_t)r0 * t.row_bytes;
    return v;
}

// A 1-D F32 tensor of rope_dim / 2 positive finite factors, copied out of the file.
std::vector<float> rope_factors(const GGUFFile& f, const std::string& name, int rope_dim, size_t& wb) {
    const Tensor t = get_tensor(f, name, {rope_dim / 2}, true, false, wb);
    const float* p = static_cast<const float*>(t.data);
    std::vector<float> out(p, p + rope_dim / 2);
    for (float x : out)
        if (!(x > 0.f) || !std::isfinite(x))
            throw GGUFError("tensor '" + name + "' holds " + std::to_string(x) + "; rope factors must be positive");
    return out;
}

}  // namespace

void Model::load_config() {
    const GGUFFile& f = *file_;
    LlamaConfig& c = cfg_;
    c.arch = f.require_string("general.architecture");
    const ArchTraits& at = arch_traits(c.arch);
    c.rope_neox = at.rope_neox;
    c.qk_norm = at.qk_norm;
    const std::string a = c.arch + ".";
    c.n_layers = checked_int(f, a + "block_count", 1, 1024, 0, true);
    c.dim = checked_int(f, a + "embedding_length", 1, 1 << 16, 0, true);
    c.hidden_dim = checked_int(f, a + "feed_forward_length", 1, 1 << 18, 0, true);
    c.n_heads = checked_int(f, a + "attention.head_count", 1, 1024, 0, true);
    c.n_kv_heads = checked_int(f, a + "attention.head_count_kv", 1, 1024, c.n_heads, false);
    c.context_length = checked_int(f, a + "context_length", 1, 1 << 24, 2048, false);
    if (c.n_heads % c.n_kv_heads != 0)
        throw GGUFError("head_count " + std::to_string(c.n_heads) + " is not a multiple of head_count_kv " +
                        std::to_string(c.n_kv_heads));
    if (!f.find(a + "attention.key_length") && c.dim % c.n_heads != 0)
        throw GGUFError("embedding_length " + std::to_string(c.dim) + " is not a multiple of head_count " +
                        std::to_string(c.n_heads) + " and there is no attention.key_length");
    c.head_dim = checked_int(f, a + "attention.key_length", 2, 4096, c.dim / c.n_heads, false);
    const int v_len = checked_int(f, a + "attention.value_length", 2, 4096, c.head_dim, false);
    if (v_len != c.head_dim)
        throw GGUFError("attention.value_length " + std::to_string(v_len) + " != key_length " +
                        std::to_string(c.head_dim) + " is not supported");
    c.rope_dim = checked_int(f, a + "rope.dimension_count", 2, c.head_dim, c.head_dim, false);
    if (c.head_dim % 2 || c.rope_dim % 2) throw GGUFError("head and rope dimensions must be even");
    c.norm_eps = checked_float(f, a + "attention.layer_norm_rms_epsilon", at.default_eps, 1e-12, 1.0);

    // RoPE of the full-attention layers: base, then the scaling the metadata names
    RopeConfig& r = c.rope;
    r.base = checked_float(f, a + "rope.freq_base", 10000.0, 1e-3, 1e12);
    const std::string scaling = f.get_string(a + "rope.scaling.type", "none");
    r.attn_factor = checked_float(f, a + "rope.scaling.attn_factor", 1.0, 1e-3, 1e3);
    if (scaling == "linear" || scaling == "yarn") {
        r.scale = checked_float(f, a + "rope.scaling.factor", 1.0, 1e-6, 1e6);
    } else if (scaling == "none") {
        r.scale = checked_float(f, a + "rope.scale_linear", 1.0, 1e-6, 1e6);
    } else if (!((scaling == "longrope" || scaling == "su") && at.phi3)) {
        throw GGUFError("unsupported rope scaling type '" + scaling + "' (supported: none, linear, yarn" +
                        (at.phi3 ? ", longrope" : "") + ")");
    }
    if (scaling == "yarn") {
        r.yarn_ext_factor = checked_float(f, a + "rope.scaling.yarn_ext_factor", 1.0, 0.0, 1.0);
        r.yarn_orig_ctx =
            checked_int(f, a + "rope.scaling.original_context_length", 1, 1 << 24, c.context_length, false);
        r.yarn_beta_fast = checked_float(f, a + "rope.scaling.yarn_beta_fast", 32.0, 0.0, 1e6);
        r.yarn_beta_slow = checked_float(f, a + "rope.scaling.yarn_beta_slow", 1.0, 0.0, 1e6);
    }
    size_t& wb = weight_bytes_;
    if (f.find_tensor("rope_freqs.weight")) {  // llama 3.1/3.2: per-frequency factors
        r.freq_factors = rope_factors(f, "rope_freqs.weight", c.rope_dim, wb);
    } else if (at.phi3 && f.find_tensor("rope_factors_long.weight")) {
        // LongRoPE: the long factors when the context goes past the one the model was trained
        // with (llama.cpp chooses the same way, by context size, not per sequence)
        const int orig =
            checked_int(f, a + "rope.scaling.original_context_length", 1, 1 << 24, c.context_length, false);
        r.freq_factors = rope_factors(
            f, c.context_length > orig ? "rope_factors_long.weight" : "rope_factors_short.weight", c.rope_dim, wb);
    }
    c.rope_local = c.rope;

    c.attn_scale = 1.0f / std::sqrt((float)c.head_dim);
    c.layer_sliding.assign(c.n_layers, 0);
    if (at.gemma) {
        c.embd_scale = std::sqrt((float)c.dim);
        c.post_norms = true;
        c.ffn_act = FfnAct::GeluTanh;
        // llama.cpp: 1/sqrt(dim / n_heads) for the 27B model (query_pre_attn_scalar), else
        // 1/sqrt(head_dim); a file may say so itself
        if (c.n_layers == 62) c.attn_scale = 1.0f / std::sqrt((float)(c.dim / c.n_heads));
        c.logit_softcap = checked_float(f, a + "final_logit_softcapping", 0.0, 0.0, 1e6);
        c.sliding_window = checked_int(f, a + "attention.sliding_window", 0, 1 << 24, 0, false);
        if (c.sliding_window > 0) {
            // every 6th layer is global (transformers' sliding_window_pattern, llama.cpp's
            // set_swa_pattern(6): the GGUF carries no pattern); sliding layers rotate with base
            // 10000 and no scaling (rope_local_base_freq; llama.cpp hard-codes both)
            for (int l = 0; l < c.n_layers; l++) c.layer_sliding[l] = (l + 1) % 6 != 0;
            c.rope_local = RopeConfig{};
            c.rope_local.base = 10000.f;
        }
    }
    if (at.phi3) {
        // transformers applies phi3's sliding_window on every layer (llama.cpp currently ignores it)
        c.sliding_window = checked_int(f, a + "attention.sliding_window", 0, 1 << 24, 0, false);
        if (c.sliding_window >= c.context_length) c.sliding_window = 0;  // never binds
        std::fill(c.layer_sliding.begin(), c.layer_sliding.end(), 1);
    }
    c.attn_scale = checked_float(f, a + "attention.scale", c.attn_scale, 1e-6, 1e6);
}

void Model::load() {
    load_config();
    const GGUFFile& f = *file_;
    LlamaConfig& c = cfg_;
    const ArchTraits& at = arch_traits(c.arch);

    const int64_t D = c.dim, H = c.hidden_dim, HD = c.head_dim, QD = (int64_t)c.n_heads * c.head_dim,
                  KVD = (int64_t)c.n_kv_heads * c.head_dim;
    size_t& wb = weight_bytes_;
    const GGUFTensorInfo* emb = f.find_tensor("token_embd.weight");
    if (!emb) throw GGUFError("missing tensor 'token_embd.weight'");
    if (emb->n_dims != 2 || emb->ne[0] != D || emb->ne[1] < 1 || emb->ne[1] > (1 << 24))
        throw GGUFError("tensor 'token_embd.weight' has shape " + shape_str(emb->ne, emb->n_dims) + ", expected [" +
                        std::to_string(D) + ", n_vocab]");
    c.n_vocab = (int)emb->ne[1];
    const int64_t declared_vocab = f.get_int(c.arch + ".vocab_size", c.n_vocab);
    if (declared_vocab != c.n_vocab)
        throw GGUFError("metadata '" + c.arch + ".vocab_size' = " + std::to_string(declared_vocab) +
                        " but token_embd.weight has " + std::to_string(c.n_vocab) + " rows");
    w_.tok_embd = get_tensor(f, "token_embd.weight", {D, c.n_vocab}, true, true, wb);
    w_.out_norm = get_tensor(f, "output_norm.weight", {D}, true, false, wb);
    w_.output = get_tensor(f, "output.weight", {D, c.n_vocab}, false, true, wb);
    c.tied_output = !w_.output.present();
    if (c.tied_output) w_.output = w_.tok_embd;

    w_.layers.resize(c.n_layers);
    for (int l = 0; l < c.n_layers; l++) {
        const std::string p = "blk." + std::to_string(l) + ".";
        LayerWeights& L = w_.layers[l];
        L.attn_norm = get_tensor(f, p + "attn_norm.weight", {D}, true, false, wb);
        if (at.phi3 && f.find_tensor(p + "attn_qkv.weight")) {  // q, k and v rows in one matrix
            const Tensor qkv = get_tensor(f, p + "attn_qkv.weight", {D, QD + 2 * KVD}, true, true, wb);
            L.wq = row_range(qkv, 0, QD, "q");
            L.wk = row_range(qkv, QD, KVD, "k");
            L.wv = row_range(qkv, QD + KVD, KVD, "v");
            c.fused_qkv = true;
        } else {
            L.wq = get_tensor(f, p + "attn_q.weight", {D, QD}, true, true, wb);
            L.wk = get_tensor(f, p + "attn_k.weight", {D, KVD}, true, true, wb);
            L.wv = get_tensor(f, p + "attn_v.weight", {D, KVD}, true, true, wb);
        }
        L.bq = get_tensor(f, p + "attn_q.bias", {QD}, false, false, wb);
        L.bk = get_tensor(f, p + "attn_k.bias", {KVD}, false, false, wb);
        L.bv = get_tensor(f, p + "attn_v.bias", {KVD}, false, false, wb);
        if (at.qk_norm) {
            L.q_norm = get_tensor(f, p + "attn_q_norm.weight", {HD}, true, false, wb);
            L.k_norm = get_tensor(f, p + "attn_k_norm.weight", {HD}, true, false, wb);
        }
        L.wo = get_tensor(f, p + "attn_output.weight", {QD, D}, true, true, wb);
        if (at.gemma) {
            L.attn_post_norm = get_tensor(f, p + "post_attention_norm.weight", {D}, true, false, wb);
            L.ffn_post_norm = get_tensor(f, p + "post_ffw_norm.weight", {D}, true, false, wb);
        }
        L.ffn_norm = get_tensor(f, p + "ffn_norm.weight", {D}, true, false, wb);
        if (at.phi3 && !f.find_tensor(p + "ffn_gate.weight")) {  // gate rows, then up rows
            const Tensor gate_up = get_tensor(f, p + "ffn_up.weight", {D, 2 * H}, true, true, wb);
            L.w_gate = row_range(gate_up, 0, H, "gate");
            L.w_up = row_range(gate_up, H, H, "up");
            c.fused_gate_up = true;
        } else {
            L.w_gate = get_tensor(f, p + "ffn_gate.weight", {D, H}, true, true, wb);
            L.w_up = get_tensor(f, p + "ffn_up.weight", {D, H}, true, true, wb);
        }
        L.w_down = get_tensor(f, p + "ffn_down.weight", {H, D}, true, true, wb);
        if (L.bq.present() || L.bk.present() || L.bv.present()) c.qkv_bias = true;
    }
    if (c.n_layers > 0 && f.find_tensor("blk." + std::to_string(c.n_layers) + ".attn_norm.weight"))
        throw GGUFError("file has more layers than block_count = " + std::to_string(c.n_layers));
}

void Model::embed(const int32_t* tokens, int n, float* out) const {
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= cfg_.n_vocab)
            throw std::invalid_argument("token id " + std::to_string(tokens[i]) + " is outside the vocabulary [0, " +
                                        std::to_string(cfg_.n_vocab) + ")");
    for (int i = 0; i < n; i++) get_row(w_.tok_embd, tokens[i], out + (size_t)i * cfg_.dim);
}

// ---------------------------------------------------------------------------------------------
// KV cache

const char* kv_dtype_name(KVDType t) {
    switch (t) {
        case KVDType::F32:
            return "f32";
        case KVDType::F16:
            return "f16";
        case KVDType::Q8_0:
            return "q8_0";
    }
    return "unknown";
}

KVDType parse_kv_dtype(const std::string& name) {
    for (KVDType t : {KVDType::F32, KVDType::F16, KVDType::Q8_0})
        if (name == kv_dtype_name(t)) return t;
    throw std::invalid_argument("KV cache dtype must be 'f16', 'q8_0' or 'f32', got '" + name + "'");
}

namespace {

// Bytes of one head's run of block_size positions: (K, V).
std::pair<size_t, size_t> run_bytes(int head_dim, int block_size, KVDType dtype) {
    if (dtype == KVDType::Q8_0) {
        const KV8Layout L{head_dim, block_size};
        return {L.k_run_bytes(), L.v_run_bytes()};
    }
    const size_t r = (size_t)block_size * head_dim * (dtype == KVDType::F16 ? 2 : 4);
    return {r, r};
}

void check_block_size(int block_size) {
    if (block_size < 1 || block_size > 4096)
        throw std::invalid_argument("block_size must be in [1, 4096], got " + std::to_string(block_size));
}

}  // namespace

size_t KVCache::block_bytes(int n_layers, int n_kv_heads, int head_dim, int block_size, KVDType dtype) {
    check_block_size(block_size);
    const auto [k, v] = run_bytes(head_dim, block_size, dtype);
    return (size_t)n_layers * n_kv_heads * (k + v);
}

KVCache::KVCache(const LlamaConfig& cfg, int block_size, int64_t budget_bytes, int num_blocks, KVDType dtype,
                 Backend* device)
    : block_size_(block_size),
      num_blocks_(0),
      n_layers_(cfg.n_layers),
      kv_dim_(cfg.n_kv_heads * cfg.head_dim),
      n_kv_heads_(cfg.n_kv_heads),
      dtype_(dtype),
      kv8_{cfg.head_dim, block_size} {
    check_block_size(block_size);
    head_bytes_ = dtype == KVDType::Q8_0 ? 0 : (size_t)cfg.head_dim * (dtype == KVDType::F16 ? 2 : 4);
    std::tie(k_run_, v_run_) = run_bytes(cfg.head_dim, block_size, dtype);
    layer_bytes_ = (size_t)n_kv_heads_ * (k_run_ + v_run_);
    bytes_per_block_ = (size_t)n_layers_ * layer_bytes_;
    if (num_blocks > 0) {
        num_blocks_ = num_blocks;
    } else if (budget_bytes > 0) {
        num_blocks_ = (int)std::min<int64_t>(budget_bytes / (int64_t)bytes_per_block_, 1 << 30);
    } else {
        throw std::invalid_argument("KVCache needs num_blocks > 0 or budget_bytes > 0");
    }
    if (num_blocks_ < 1)
        throw std::invalid_argument("KV budget of " + std::to_string(budget_bytes) +
                                    " bytes is smaller than one block (" + std::to_string(bytes_per_block_) +
                                    " bytes)");
    if ((double)num_blocks_ * bytes_per_block_ > 64.0 * (1ull << 30))
        throw std::invalid_argument("KV cache of more than 64 GiB requested");
    arena_bytes_ = (size_t)num_blocks_ * bytes_per_block_;
    if (device && device->device() != Device::CPU) {
        if (dtype_ != KVDType::F16)
            throw std::invalid_argument(std::string("the ") + device_name(device->device()) +
                                        " backend keeps the KV cache in f16 only (--kv-dtype f16)");
        device_ = device;
        device_arena_ = device->alloc_kv(arena_bytes_);
        return;
    }
    arena_.reset(alloc_streamed(arena_bytes_));
    std::memset(arena_.get(), 0, arena_bytes_);
}

void KVCache::copy_block(int src, int dst) {
    if (src < 0 || src >= num_blocks_ || dst < 0 || dst >= num_blocks_)
        throw std::invalid_argument("block id out of range");
    if (src == dst) return;
    if (device_)
        return device_->copy_kv(device_arena_.get(), (size_t)dst * bytes_per_block_, (size_t)src * bytes_per_block_,
                                bytes_per_block_);
    std::memcpy(arena_.get() + (size_t)dst * bytes_per_block_, arena_.get() + (size_t)src * bytes_per_block_,
                bytes_per_block_);
}

// ---------------------------------------------------------------------------------------------
// Forward

namespace {

// Ask for the start of a run of KV cache memory before it is needed: blocks sit anywhere in the
// arena, so the hardware prefetcher cannot guess the next one, but it follows a run once started.
inline void prefetch_run(const void* p, size_t bytes) {
    const char* c = static_cast<const char*>(p);
    for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}
// The same into L2 only (prefetcht1). Into L1 (above) the requests wait on L1's few miss buffers:
// over 8 KB blocks at random places, reading with prefetches one block ahead ran at 7.5 GB/s per
// core into L1 and 13 GB/s into L2 on the dev box (EPYC, Zen 4).
inline void prefetch_l2(const void* p, size_t bytes) {
    const char* c = static_cast<const char*>(p);
    for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 2);
}

constexpr double kPi = 3.14159265358979323846;

const float* f32(const Tensor& t) { return static_cast<const float*>(t.data); }

void add_bias(const Tensor& b, float* x, int m, int n) {
    if (!b.present()) return;
    const float* bp = f32(b);
    for (int r = 0; r < m; r++)
        for (int i = 0; i < n; i++) x[(size_t)r * n + i] += bp[i];
}

void add_rows(float* x, const float* y, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] += y[i];
}

// An ISA may leave an op null: the scalar table's then does the work.
template <class F>
F op_or_scalar(F isa_op, F OpsKernels::* member) {
    return isa_op ? isa_op : isa_table_scalar()->ops.*member;
}

}  // namespace

// cos/sin of every rotated pair for every row (ggml's rope with freq factors and YaRN, computed
// in double): theta = pos * base^(-2i/d) / ff[i], interpolated by 1/scale (blended with the
// unscaled theta over YaRN's ramp), cos/sin times attn_factor (times YaRN's 1 + 0.1 ln(scale)).
void rope_table(const RopeConfig& r, int rope_dim, const std::vector<RunState::Row>& rows, RopeTable& out) {
    const int half = rope_dim / 2, T = (int)rows.size();
    out.cos.resize((size_t)T * half);
    out.sin.resize((size_t)T * half);
    std::vector<double> inv_freq(half), extrap_mix(half, 0.0);
    for (int i = 0; i < half; i++) {
        inv_freq[i] = std::pow((double)r.base, -2.0 * i / rope_dim);
        if (!r.freq_factors.empty()) inv_freq[i] /= r.freq_factors[i];
    }
    double mscale = r.attn_factor;
    if (r.yarn_ext_factor > 0.f) {
        // pairs that turn fewer than beta_slow times over the original context are interpolated,
        // more than beta_fast times extrapolated, a linear ramp between
        auto corr_dim = [&](double n_rot) {
            return rope_dim * std::log(r.yarn_orig_ctx / (n_rot * 2 * kPi)) / (2 * std::log((double)r.base));
        };
        const double lo = std::max(0.0, std::floor(corr_dim(r.yarn_beta_fast)));
        const double hi = std::min(rope_dim - 1.0, std::ceil(corr_dim(r.yarn_beta_slow)));
        for (int i = 0; i < half; i++) {
            const double y = (i - lo) / std::max(0.001, hi - lo);
            extrap_mix[i] = (1.0 - std::min(1.0, std::max(0.0, y))) * r.yarn_ext_factor;
        }
        mscale *= 1.0 + 0.1 * std::log((double)r.scale);
    }
    for (int t = 0; t < T; t++) {
        for (int i = 0; i < half; i++) {
            const double extrap = rows[t].pos * inv_freq[i];
            const double th = extrap / r.scale * (1.0 - extrap_mix[i]) + extrap * extrap_mix[i];
            out.cos[(size_t)t * half + i] = (float)(std::cos(th) * mscale);
            out.sin[(size_t)t * half + i] = (float)(std::sin(th) * mscale);
        }
    }
}

namespace {

// Rotate the first rope_dim dimensions of one head vector of row t.
void rope_head(const RopeTable& rt, int rope_dim, bool neox, int t, float* vec) {
    const int half = rope_dim / 2;
    const float* cs = &rt.cos[(size_t)t * half];
    const float* sn = &rt.sin[(size_t)t * half];
    if (neox) {
        for (int i = 0; i < half; i++) {
            const float a = vec[i], b = vec[i + half];
            vec[i] = a * cs[i] - b * sn[i];
            vec[i + half] = a * sn[i] + b * cs[i];
        }
    } else {
        for (int i = 0; i < half; i++) {
            const float a = vec[2 * i], b = vec[2 * i + 1];
            vec[2 * i] = a * cs[i] - b * sn[i];
            vec[2 * i + 1] = a * sn[i] + b * cs[i];
        }
    }
}

// The q8_0 cache stores K and V rotated by the orthonormal Walsh-Hadamard matrix H (64 x 64, per 64
// elements of a head; heads whose size is not a multiple of 64 are not rotated). H is symmetric and
// H H = I, so q.k = (Hq).(Hk) and sum_j p_j v_j = H sum_j p_j (H v_j): the attention computes on
// Hq, Hk, Hv and rotates its output back. The rotation spreads a few large channels (Qwen2's K
// biases) over the whole 64, so Q8_0's one scale per 32 leaves the small channels more int8 steps
// (llama.cpp does the same before a quantized cache: attn_rot_k / attn_rot_v). In place, the same
// fixed butterfly order for every vector (a row's result never depends on its batch); the 1/8 is
// exact.
bool kv8_rotated(int head_dim) { return head_dim % 64 == 0; }

void hadamard64(float* x) {
    for (int h = 1; h < 64; h *= 2)
        for (int i = 0; i < 64; i += 2 * h)
            for (int j = i; j < i + h; ++j) {
                const float a = x[j], b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
    for (int i = 0; i < 64; ++i) x[i] *= 0.125f;
}

void rotate_head(int hd, float* x) {
    for (int i = 0; i < hd; i += 64) hadamard64(x + i);
}

// A row's positions [lo, end) under a window (0: all of [0, pos]).
inline void attended(int pos, int window, int& lo, int& end) {
    end = pos + 1;
    lo = window > 0 ? std::max(0, end - window) : 0;
}

// One row's scores over one block of the f16 cache, positions [p0, p0 + n) at k (their V at v),
// for nq heads: four positions a call, each call after prefetching into L2 its share of the next
// block's K (k_next, k_next_bytes; null: none) and the V of its own positions, so memory works on
// what comes next while the FMAs run on what is here (decode reads every K and V byte once, from
// memory). A score does not depend on n (kernels.h), so the bits are those of one call.
void scores_block_f16(decltype(OpsKernels::attn_scores_f16) scores_f16, int hd, int nq, const float* q, const f16_t* k,
                      const f16_t* v, int n, float scale, float* scores, size_t ld, const uint8_t* k_next,
                      size_t k_next_bytes) {
    constexpr int kStep = 4;  // measured: 4 beats 8 and whole blocks (bench/bench_attention.py)
    const int calls = (n + kStep - 1) / kStep;
    const size_t share = (k_next_bytes / calls + 63) / 64 * 64;
    for (int c = 0, j = 0; j < n; c++, j += kStep) {
        const int m = std::min(kStep, n - j);
        if (k_next && (size_t)c * share < k_next_bytes)
            prefetch_l2(k_next + (size_t)c * share, std::min(share, k_next_bytes - (size_t)c * share));
        prefetch_l2(v + (size_t)j * hd, (size_t)m * hd * sizeof(f16_t));
        scores_f16(hd, nq, q, k + (size_t)j * hd, hd, m, scale, scores + j, ld);
    }
}

// The K that a row reading positions up to `end` (exclusive) finds in block b + 1 of its span
// [.., b1): that block's run in the cache and the bytes of it the row reads; null and 0 past the
// span. What scores_block_f16 prefetches while it scores block b.
struct NextK {
    const uint8_t* run;
    size_t bytes;
};
NextK next_k(const KVCache& kv, const SeqSpan& sq, int layer, int kvh, int b, int b1, int end, size_t row_bytes) {
    if (b + 1 >= b1) return {nullptr, 0};
    const int bs = kv.block_size();
    return {kv.run(sq.blocks[b + 1], layer, 0, kvh), (size_t)(std::min(end, (b + 2) * bs) - (b + 1) * bs) * row_bytes};
}

// attention() with many rows over the f16 cache: a task takes up to 16 / group consecutive rows of
// one sequence (with the same first position) and computes their scores together, block by block,
// by attn_scores_f16_rows: each K chunk is widened once for the whole tile. A row's scores past
// its own end are computed (from K already written in this call) and never read. Softmax and the V
// sums are the row's own, as in the per-row path, so every result is that path's, bit for bit.
void attention_f16_tiles(const IsaTable& isa, const LlamaConfig& c, const KVCache& kv, int layer, int window,
                         const std::vector<SeqSpan>& seqs, RunState& s) {
    const int T = (int)s.rows.size(), HD = c.head_dim, NH = c.n_heads, NKV = c.n_kv_heads;
    const int QD = NH * HD, group = NH / NKV, bs = kv.block_size(), rmax = std::max(1, 16 / group);
    const size_t row_bytes = (size_t)HD * sizeof(f16_t);  // one position of one head
    const auto softmax = op_or_scalar(isa.ops.softmax, &OpsKernels::softmax);
    const auto accum_f16 = op_or_scalar(isa.ops.attn_accum_f16, &OpsKernels::attn_accum_f16);
    const auto scores_f16 = op_or_scalar(isa.ops.attn_scores_f16, &OpsKernels::attn_scores_f16);
    struct Tile {
        int t0, nr, lo, top;  // rows [t0, t0 + nr), positions [lo, top)
    };
    std::vector<Tile> tiles;
    for (int t = 0; t < T;) {
        Tile tile{t, 1, 0, 0};
        attended(s.rows[t].pos, window, tile.lo, tile.top);
        for (; tile.nr < rmax && t + tile.nr < T && s.rows[t + tile.nr].seq == s.rows[t].seq; tile.nr++) {
            int lo, end;
            attended(s.rows[t + tile.nr].pos, window, lo, end);
            if (lo != tile.lo) break;
            tile.top = std::max(tile.top, end);
        }
        tiles.push_back(tile);
        t += tile.nr;
    }
    parallel_for((int)tiles.size(), [&](int ti, int tid) {
        const Tile tile = tiles[ti];
        const int lo = tile.lo, top = tile.top;
        std::vector<float>& scores = s.scores[tid];
        const SeqSpan& sq = seqs[s.rows[tile.t0].seq];
        const size_t L = (size_t)(top - lo), ldr = L * group;  // scores of (row r, head h) at r * ldr + h * L
        if (scores.size() < ldr * tile.nr) scores.resize(ldr * tile.nr);
        for (int kvh = 0; kvh < NKV; kvh++) {
            const int h0 = kvh * group;
            const float* q = &s.q[(size_t)tile.t0 * QD + h0 * HD];
            const int b0 = lo / bs, b1 = (top + bs - 1) / bs;
            if (tile.nr == 1) prefetch_run(kv.at(sq.blocks[b0], layer, 0, kvh, lo - b0 * bs), 256);
            for (int b = b0; b < b1; b++) {
                const int p0 = std::max(lo, b * bs), n = std::min(top, (b + 1) * bs) - p0;
                const f16_t* kp = reinterpret_cast<const f16_t*>(kv.at(sq.blocks[b], layer, 0, kvh, p0 - b * bs));
                if (tile.nr == 1) {  // one row (decode): the per-row kernel keeps a short q in registers
                    const f16_t* vp = reinterpret_cast<const f16_t*>(kv.at(sq.blocks[b], layer, 1, kvh, p0 - b * bs));
                    const NextK nk = next_k(kv, sq, layer, kvh, b, b1, top, row_bytes);
                    scores_block_f16(scores_f16, HD, group, q, kp, vp, n, c.attn_scale, scores.data() + (p0 - lo), L,
                                     nk.run, nk.bytes);
                } else {
                    if (b + 1 < b1) prefetch_run(kv.run(sq.blocks[b + 1], layer, 0, kvh), 256);
                    isa.ops.attn_scores_f16_rows(HD, tile.nr, group, q, QD, kp, HD, n, c.attn_scale,
                                                 scores.data() + (p0 - lo), ldr, L);
                }
            }
            for (int r = 0; r < tile.nr; r++) {
                const int t = tile.t0 + r;
                const int end = s.rows[t].pos + 1;  // the row's lo is the tile's
                float* sc = scores.data() + r * ldr;
                for (int hh = 0; hh < group; hh++) softmax(end - lo, sc + hh * L);
                float* out = &s.att[(size_t)t * QD + h0 * HD];
                std::fill(out, out + group * HD, 0.f);
                for (int b = lo / bs, b1 = (end + bs - 1) / bs; b < b1; b++) {
                    const int p0 = std::max(lo, b * bs), n = std::min(end, (b + 1) * bs) - p0;
                    if (b + 1 < b1) {  // one row: its V is in L2 already (scores_block_f16)
                        if (tile.nr == 1)
                            prefetch_l2(kv.run(sq.blocks[b + 1], layer, 1, kvh), (size_t)bs * row_bytes);
                        else
                            prefetch_run(kv.run(sq.blocks[b + 1], layer, 1, kvh), 256);
                    }
                    const f16_t* vp = reinterpret_cast<const f16_t*>(kv.at(sq.blocks[b], layer, 1, kvh, p0 - b * bs));
                    accum_f16(HD, group, sc + (p0 - lo), L, vp, HD, n, out);
                }
            }
        }
    });
}

// Causal attention of every row over its sequence's paged KV cache: att = softmax(q k^T * scale) v
// over positions [max(0, pos + 1 - window), pos] (window 0: all of [0, pos]).
//
// A unit of work is (row, KV head) with its GQA group of query heads, or (row, part of the group)
// when there are too few rows to keep the pool busy. With many rows one task takes all units of its
// row: fewer task claims, and one sequence's blocks at a time (measured 0-4% faster at 16-32 rows).
// Every score and every output element is computed the same way whatever the split.
void attention(const IsaTable& isa, const LlamaConfig& c, const KVCache& kv, int layer, int window,
               const std::vector<SeqSpan>& seqs, RunState& s) {
    const int T = (int)s.rows.size(), HD = c.head_dim, NH = c.n_heads, NKV = c.n_kv_heads;
    const int QD = NH * HD, group = NH / NKV, bs = kv.block_size();
    const KVDType dt = kv.dtype();
    const bool f16 = dt == KVDType::F16, q8 = dt == KVDType::Q8_0;
    const bool rotated = q8 && kv8_rotated(HD);
    const KV8Layout& L8 = kv.kv8();
    const float scale = c.attn_scale;
    const size_t row_bytes = (size_t)HD * sizeof(f16_t);  // one position of one head (f16)
    const auto softmax = op_or_scalar(isa.ops.softmax, &OpsKernels::softmax);
    const auto scores_f16 = op_or_scalar(isa.ops.attn_scores_f16, &OpsKernels::attn_scores_f16);
    const auto accum_f16 = op_or_scalar(isa.ops.attn_accum_f16, &OpsKernels::attn_accum_f16);
    const auto scores_q8 = op_or_scalar(isa.ops.attn_scores_q8, &OpsKernels::attn_scores_q8);
    const auto accum_q8 = op_or_scalar(isa.ops.attn_accum_q8, &OpsKernels::attn_accum_q8);
    const auto quantize_q8 = op_or_scalar(isa.ops.kv8_quantize_query, &OpsKernels::kv8_quantize_query);
    const int n_threads = get_num_threads();
    const bool by_group = T * NKV >= 4 * n_threads;
    // Few rows: the most heads of a GQA group per task that still gives every thread a task, so a
    // KV head's K and V are read once per task rather than once per query head (one sequence:
    // SmolLM2 3 tasks of 3 heads, Qwen2.5 2 of 7, Gemma 3 2 of 2; measured 4-6% faster decode on
    // SmolLM2 and Qwen2.5 than one head per task, Gemma 3 the same).
    int heads_per_task = by_group ? group : 1;
    if (!by_group)
        for (int d = group; d > 1; d--)
            if (group % d == 0 && T * (NH / d) >= n_threads) {
                heads_per_task = d;
                break;
            }
    const int per_row = NH / heads_per_task;
    const int fold = by_group && T >= 4 * n_threads ? per_row : 1;  // units per task
    if ((int)s.scores.size() < n_threads) s.scores.resize(n_threads);
    if ((int)s.q8.size() < n_threads) s.q8.resize(n_threads);
    if (f16 && isa.ops.attn_scores_f16_rows && fold == per_row && group <= 16) {
        attention_f16_tiles(isa, c, kv, layer, window, seqs, s);
        return;
    }
    parallel_for(T * per_row / fold, [&](int task, int tid) {
        std::vector<float>& scores = s.scores[tid];
        std::vector<uint8_t>& qrec = s.q8[tid];
        std::vector<float> qrot;
        for (int unit = task * fold; unit < (task + 1) * fold; unit++) {
            const int t = unit / per_row;
            const int h0 = (unit % per_row) * heads_per_task;  // first query head
            const int kvh = h0 / group;
            const SeqSpan& sq = seqs[s.rows[t].seq];
            int lo, end;  // positions [lo, end)
            attended(s.rows[t].pos, window, lo, end);
            const size_t ld = (size_t)(end - lo);
            if (scores.size() < ld * heads_per_task) scores.resize(ld * heads_per_task);
            const float* qh = &s.q[(size_t)t * QD + h0 * HD];
            float* out = &s.att[(size_t)t * QD + h0 * HD];
            std::fill(out, out + heads_per_task * HD, 0.f);
            const int b0 = lo / bs, b1 = (end + bs - 1) / bs;  // blocks [b0, b1) hold them
            if (q8) {                                          // int8 query: each of this unit's heads quantized once
                const size_t qb = L8.query_bytes();
                if (qrec.size() < qb * heads_per_task) qrec.resize(qb * heads_per_task);
                for (int hh = 0; hh < heads_per_task; hh++) {
                    const float* qq = qh + hh * HD;
                    if (rotated) {  // H q (the cache holds H k)
                        qrot.assign(qq, qq + HD);
                        rotate_head(HD, qrot.data());
                        qq = qrot.data();
                    }
                    quantize_q8(L8, qq, qrec.data() + hh * qb);
                }
            }
            // a block's part of [lo, end): positions [p0, p0 + n), scores from column p0 - lo
            auto part = [&](int b, int& p0, int& n) {
                p0 = std::max(lo, b * bs);
                n = std::min(end, (b + 1) * bs) - p0;
            };
            // scores: q . k for every position, block by block
            for (int b = b0; b < b1; b++) {
                int p0, n;
                part(b, p0, n);
                if (q8) {
                    if (b + 1 < b1) prefetch_run(kv.run(sq.blocks[b + 1], layer, 0, kvh), 256);
                    scores_q8(L8, heads_per_task, qrec.data(), kv.run(sq.blocks[b], layer, 0, kvh), p0 - b * bs, n,
                              scale, scores.data() + (p0 - lo), ld);
                } else if (f16) {
                    if (b == b0) prefetch_run(kv.at(sq.blocks[b], layer, 0, kvh, p0 - b * bs), 256);
                    const f16_t* kp = reinterpret_cast<const f16_t*>(kv.at(sq.blocks[b], layer, 0, kvh, p0 - b * bs));
                    const f16_t* vp = reinterpret_cast<const f16_t*>(kv.at(sq.blocks[b], layer, 1, kvh, p0 - b * bs));
                    const NextK nk = next_k(kv, sq, layer, kvh, b, b1, end, row_bytes);
                    scores_block_f16(scores_f16, HD, heads_per_task, qh, kp, vp, n, scale, scores.data() + (p0 - lo),
                                     ld, nk.run, nk.bytes);
                } else {
                    for (int hh = 0; hh < heads_per_task; hh++)
                        for (int j = 0; j < n; j++) {
                            const float* kp =
                                reinterpret_cast<const float*>(kv.at(sq.blocks[b], layer, 0, kvh, p0 - b * bs + j));
                            scores[hh * ld + (p0 - lo) + j] = isa.ops.dot_f32(HD, kp, qh + hh * HD) * scale;
                        }
                }
            }
            // softmax per head
            for (int hh = 0; hh < heads_per_task; hh++) softmax((int)ld, scores.data() + hh * ld);
            // weighted sum of v, positions in order
            for (int b = b0; b < b1; b++) {
                int p0, n;
                part(b, p0, n);
                if (b + 1 < b1 && q8) prefetch_run(kv.run(sq.blocks[b + 1], layer, 1, kvh), 256);
                if (b + 1 < b1 && f16) prefetch_l2(kv.run(sq.blocks[b + 1], layer, 1, kvh), (size_t)bs * row_bytes);
                if (q8) {
                    accum_q8(L8, heads_per_task, scores.data() + (p0 - lo), ld, kv.run(sq.blocks[b], layer, 1, kvh),
                             p0 - b * bs, n, out);
                } else if (f16) {
                    const f16_t* vp = reinterpret_cast<const f16_t*>(kv.at(sq.blocks[b], layer, 1, kvh, p0 - b * bs));
                    accum_f16(HD, heads_per_task, scores.data() + (p0 - lo), ld, vp, HD, n, out);
                } else {
                    for (int hh = 0; hh < heads_per_task; hh++)
                        for (int j = 0; j < n; j++) {
                            const float* vf =
                                reinterpret_cast<const float*>(kv.at(sq.blocks[b], layer, 1, kvh, p0 - b * bs + j));
                            const float a = scores[hh * ld + (p0 - lo) + j];
                            float* o = out + hh * HD;
                            for (int i = 0; i < HD; i++) o[i] += a * vf[i];
                        }
                }
            }
            if (rotated)  // the sum of H v: H (H o) = o
                for (int hh = 0; hh < heads_per_task; hh++) rotate_head(HD, out + hh * HD);
        }
    });
}

// Write one row's K and V (all KV heads) into its slot of the paged cache, as f16, q8_0 or f32.
void store_kv(const IsaTable& isa, KVCache& kv, int layer, int block, int slot, int n_kv_heads, int hd, const float* k,
              const float* v) {
    const auto store_q8 = op_or_scalar(isa.ops.kv8_store, &OpsKernels::kv8_store);
    thread_local std::vector<float> rot;  // H k, H v (see hadamard64)
    for (int h = 0; h < n_kv_heads; h++) {
        if (kv.dtype() == KVDType::Q8_0) {
            const float* kh = k + h * hd;
            const float* vh = v + h * hd;
            if (kv8_rotated(hd)) {
                rot.assign(kh, kh + hd);
                rot.insert(rot.end(), vh, vh + hd);
                rotate_head(hd, rot.data());
                rotate_head(hd, rot.data() + hd);
                kh = rot.data();
                vh = rot.data() + hd;
            }
            store_q8(kv.kv8(), 0, slot, kh, kv.run(block, layer, 0, h));
            store_q8(kv.kv8(), 1, slot, vh, kv.run(block, layer, 1, h));
        } else if (kv.dtype() == KVDType::F16) {
            isa.ops.f32_to_f16(k + h * hd, reinterpret_cast<f16_t*>(kv.at(block, layer, 0, h, slot)), hd);
            isa.ops.f32_to_f16(v + h * hd, reinterpret_cast<f16_t*>(kv.at(block, layer, 1, h, slot)), hd);
        } else {
            std::memcpy(kv.at(block, layer, 0, h, slot), k + h * hd, hd * sizeof(float));
            std::memcpy(kv.at(block, layer, 1, h, slot), v + h * hd, hd * sizeof(float));
        }
    }
}

// fn(t) for every row t < T, in parallel where the rows hold enough elements (elems each) to pay
// for a parallel region: the per-row steps between the matmuls (RoPE and the KV store, the FFN's
// gate) otherwise run on one thread while the others wait. Each row's work is its own, so the
// results are the same either way. Below 2^17 elements one thread does it, as for the activations'
// quantization (ops.cpp): a region costs a few microseconds. Measured (perf, Gemma 3 pp512): the
// worker's idle samples 2.6% -> 1.3% of the forward, the serial rest of forward_cpu 0.6% -> 0.05%.
template <class F>
void for_rows(int T, size_t elems, F&& fn) {
    if (T > 1 && (size_t)T * elems >= ((size_t)1 << 17))
        parallel_for(T, [&](int t, int) { fn(t); });
    else
        for (int t = 0; t < T; t++) fn(t);
}

// Size the run state for a batch of T rows and note each row's sequence and position.
void size_run_state(const LlamaConfig& c, const std::vector<SeqSpan>& seqs, int T, RunState& s) {
    const size_t D = c.dim, QD = (size_t)c.n_heads * c.head_dim, KVD = (size_t)c.n_kv_heads * c.head_dim,
                 H = c.hidden_dim;
    s.rows.resize(T);
    for (int si = 0, r = 0; si < (int)seqs.size(); si++)
        for (int i = 0; i < seqs[si].n_tokens; i++) s.rows[r++] = RunState::Row{si, seqs[si].start_pos + i};
    s.x.resize(T * D), s.xb.resize(T * D), s.xb2.resize(T * D);
    s.q.resize(T * QD), s.k.resize(T * KVD), s.v.resize(T * KVD), s.att.resize(T * QD);
    s.hb.resize(T * H), s.hb2.resize(T * H);
}

}  // namespace

void Model::check_batch(const KVCache& kv, const int32_t* tokens, int T, const std::vector<SeqSpan>& seqs,
                        const int32_t* logit_rows, int R) const {
    const LlamaConfig& c = cfg_;
    if (kv.n_layers() != c.n_layers || kv.kv_dim() != c.n_kv_heads * c.head_dim)
        throw std::invalid_argument("KV cache was made for a different model");
    const int bs = kv.block_size();
    int64_t total = 0;
    std::vector<int> block_owner(kv.num_blocks(), -1);
    for (size_t s = 0; s < seqs.size(); s++) {
        const SeqSpan& q = seqs[s];
        const std::string who = "sequence " + std::to_string(s) + ": ";
        if (q.n_tokens < 1) throw std::invalid_argument(who + "needs at least one new token");
        if (q.start_pos < 0) throw std::invalid_argument(who + "start_pos must be >= 0");
        const int64_t end = (int64_t)q.start_pos + q.n_tokens;
        if (end > c.context_length)
            throw std::invalid_argument(who + "positions up to " + std::to_string(end) + " exceed the context length " +
                                        std::to_string(c.context_length));
        const int64_t need = (end + bs - 1) / bs;
        if (need > q.n_blocks)
            throw std::invalid_argument(who + "needs " + std::to_string(need) + " KV blocks, block table has " +
                                        std::to_string(q.n_blocks));
        for (int64_t b = 0; b < need; b++)
            if (q.blocks[b] < 0 || q.blocks[b] >= kv.num_blocks())
                throw std::invalid_argument(who + "block id " + std::to_string(q.blocks[b]) + " is outside [0, " +
                                            std::to_string(kv.num_blocks()) + ")");
        for (int64_t b = q.start_pos / bs; b < need; b++) {  // blocks this call writes
            int& o = block_owner[q.blocks[b]];
            if (o != -1 && o != (int)s)
                throw std::invalid_argument("KV block " + std::to_string(q.blocks[b]) +
                                            " is written by two sequences in one batch");
            o = (int)s;
        }
        total += q.n_tokens;
    }
    if (total != T)
        throw std::invalid_argument("seq_lens add up to " + std::to_string(total) + " but " + std::to_string(T) +
                                    " tokens were given");
    for (int i = 0; i < T; i++)
        if (tokens[i] < 0 || tokens[i] >= c.n_vocab)
            throw std::invalid_argument("token id " + std::to_string(tokens[i]) + " is outside the vocabulary [0, " +
                                        std::to_string(c.n_vocab) + ")");
    for (int i = 0; i < R; i++)
        if (logit_rows[i] < 0 || logit_rows[i] >= T)
            throw std::invalid_argument("logit row " + std::to_string(logit_rows[i]) + " is outside [0, " +
                                        std::to_string(T) + ")");
}

void Model::forward(KVCache& kv, const int32_t* tokens, int T, const std::vector<SeqSpan>& seqs,
                    const int32_t* logit_rows, int R, float* logits) const {
    check_batch(kv, tokens, T, seqs, logit_rows, R);  // nothing is touched before this passes
    if (kv.device() != device())
        throw std::invalid_argument(std::string("KV cache is on ") + device_name(kv.device()) +
                                    " but the model is on " + device_name(device()));
    if (T == 0) return;
    backend_->forward(kv, tokens, T, seqs, logit_rows, R, logits);
}

void Model::forward_cpu(KVCache& kv, const int32_t* tokens, int T, const std::vector<SeqSpan>& seqs,
                        const int32_t* logit_rows, int R, float* logits) const {
    const LlamaConfig& c = cfg_;
    const IsaTable& isa = active_table();
    const int D = c.dim, HD = c.head_dim, NH = c.n_heads, NKV = c.n_kv_heads, H = c.hidden_dim;
    const int QD = NH * HD, KVD = NKV * HD, bs = kv.block_size();
    const auto geglu = op_or_scalar(isa.ops.geglu_tanh, &OpsKernels::geglu_tanh);

    std::lock_guard<std::mutex> lock(run_mu_);
    RunState& s = run_;  // every element is written before it is read
    size_run_state(c, seqs, T, s);
    // RoPE tables for this batch, one per RoPE variant the layers use
    rope_table(c.rope, c.rope_dim, s.rows, s.rope);
    if (c.sliding_window > 0) rope_table(c.rope_local, c.rope_dim, s.rows, s.rope_local);

    // embedding (gemma3: times sqrt(dim), in float32 as the model does)
    for (int t = 0; t < T; t++) get_row(w_.tok_embd, tokens[t], &s.x[(size_t)t * D]);
    if (c.embd_scale != 1.f)
        for (float& e : s.x) e *= c.embd_scale;

    for (int l = 0; l < c.n_layers; l++) {
        const LayerWeights& L = w_.layers[l];
        const bool sliding = c.is_sliding(l);
        const RopeTable& rt = sliding ? s.rope_local : s.rope;
        // attention: RMSNorm, then q, k, v projections (+ qwen2 bias)
        rmsnorm_rows(isa, s.x.data(), f32(L.attn_norm), c.norm_eps, T, D, s.xb.data());
        {
            const Tensor* ws[3] = {&L.wq, &L.wk, &L.wv};
            float* ys[3] = {s.q.data(), s.k.data(), s.v.data()};
            matmul_multi(isa, ws, ys, 3, s.xb.data(), T);
        }
        add_bias(L.bq, s.q.data(), T, QD);
        add_bias(L.bk, s.k.data(), T, KVD);
        add_bias(L.bv, s.v.data(), T, KVD);
        // QK-norm: RMSNorm of every head of q and k (qwen3, gemma3)
        if (c.qk_norm) {
            rmsnorm_rows(isa, s.q.data(), f32(L.q_norm), c.norm_eps, T * NH, HD, s.q.data());
            rmsnorm_rows(isa, s.k.data(), f32(L.k_norm), c.norm_eps, T * NKV, HD, s.k.data());
        }
        // RoPE: rotate q and k in each head; then store k, v in the paged cache
        for_rows(T, (size_t)QD + 2 * KVD, [&](int t) {
            for (int h = 0; h < NH; h++) rope_head(rt, c.rope_dim, c.rope_neox, t, &s.q[(size_t)t * QD + h * HD]);
            for (int h = 0; h < NKV; h++) rope_head(rt, c.rope_dim, c.rope_neox, t, &s.k[(size_t)t * KVD + h * HD]);
            const int p = s.rows[t].pos;
            store_kv(isa, kv, l, seqs[s.rows[t].seq].blocks[p / bs], p % bs, NKV, HD, &s.k[(size_t)t * KVD],
                     &s.v[(size_t)t * KVD]);
        });
        // causal attention over the paged cache (sliding layers: the last sliding_window positions)
        attention(isa, c, kv, l, sliding ? c.sliding_window : 0, seqs, s);
        // output projection (gemma3: post-attention RMSNorm), residual
        matmul(isa, L.wo, s.att.data(), T, s.xb2.data());
        if (c.post_norms) rmsnorm_rows(isa, s.xb2.data(), f32(L.attn_post_norm), c.norm_eps, T, D, s.xb2.data());
        for_rows(T, (size_t)D, [&](int t) { add_rows(&s.x[(size_t)t * D], &s.xb2[(size_t)t * D], (size_t)D); });
        // FFN: RMSNorm, SwiGLU or GeGLU, down projection (gemma3: post-FFN RMSNorm), residual
        rmsnorm_rows(isa, s.x.data(), f32(L.ffn_norm), c.norm_eps, T, D, s.xb.data());
        {
            const Tensor* ws[2] = {&L.w_gate, &L.w_up};
            float* ys[2] = {s.hb.data(), s.hb2.data()};
            matmul_multi(isa, ws, ys, 2, s.xb.data(), T);
        }
        for_rows(T, (size_t)H, [&](int t) {
            float* g = &s.hb[(size_t)t * H];
            if (c.ffn_act == FfnAct::GeluTanh)
                geglu(H, g, &s.hb2[(size_t)t * H], g);
            else
                isa.ops.swiglu(H, g, &s.hb2[(size_t)t * H], g);
        });
        matmul(isa, L.w_down, s.hb.data(), T, s.xb2.data());
        if (c.post_norms) rmsnorm_rows(isa, s.xb2.data(), f32(L.ffn_post_norm), c.norm_eps, T, D, s.xb2.data());
        for_rows(T, (size_t)D, [&](int t) { add_rows(&s.x[(size_t)t * D], &s.xb2[(size_t)t * D], (size_t)D); });
    }

    // final RMSNorm and output head, only for the rows that need logits (gemma: softcapping)
    if (R == 0) return;
    s.xr.resize((size_t)R * D), s.xn.resize((size_t)R * D);
    for (int i = 0; i < R; i++) std::memcpy(&s.xr[(size_t)i * D], &s.x[(size_t)logit_rows[i] * D], D * sizeof(float));
    rmsnorm_rows(isa, s.xr.data(), f32(w_.out_norm), c.norm_eps, R, D, s.xn.data());
    matmul(isa, w_.output, s.xn.data(), R, logits);
    if (c.logit_softcap > 0.f)
        for (size_t i = 0; i < (size_t)R * c.n_vocab; i++)
            logits[i] = c.logit_softcap * std::tanh(logits[i] / c.logit_softcap);
}

}  // namespace ts
