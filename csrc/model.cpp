// model.cpp — load a llama-architecture GGUF (validating every tensor against the config) and
// run the forward over a ragged batch with a paged KV cache.
#include "model.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels/kernels.h"
#include "ops.h"
#include "threadpool.h"

namespace ts {

// ---------------------------------------------------------------------------------------------
// Loading

namespace {

std::string shape_str(const int64_t* ne, int n) {
    std::string s = "[";
    for (int i = 0; i < n; i++) s += (i ? ", " : "") + std::to_string(ne[i]);
    return s + "]";
}

int checked_int(const GGUFFile& f, const std::string& key, int64_t lo, int64_t hi, int64_t def, bool required) {
    int64_t v = required ? f.require_int(key) : f.get_int(key, def);
    if (v < lo || v > hi)
        throw GGUFError("metadata '" + key + "' = " + std::to_string(v) + " is out of range [" +
                        std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return (int)v;
}

// The weight types the active table computes with, by name.
std::string supported_types() {
    const IsaTable& isa = active_table();
    std::string s;
    for (int id = 0; id < kMaxDTypeId; id++) {
        const DTypeInfo& ti = dtype_info(static_cast<uint32_t>(id));
        if (ti.name && ti.supported && isa.types[id] && isa.types[id]->vec_dot) s += (s.empty() ? "" : ", ") + std::string(ti.name);
    }
    return s;
}

// Look up a tensor and check its shape (ggml order) and that its type can be computed with.
Tensor get_tensor(const GGUFFile& f, const std::string& name, std::vector<int64_t> shape, bool required,
                  bool matrix, size_t& total_bytes) {
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
        throw GGUFError("tensor '" + name + "' has shape " + shape_str(info->ne, info->n_dims) +
                        ", expected " + shape_str(shape.data(), (int)shape.size()));
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

Model::Model(const std::string& path) : file_(std::make_unique<GGUFFile>(path)) {
    try {
        load();
    } catch (const GGUFError& e) {
        const std::string msg = e.what();
        if (msg.rfind(path, 0) == 0) throw;
        throw GGUFError(path + ": " + msg);
    }
    pack();
}

void Model::FreeDeleter::operator()(uint8_t* p) const { std::free(p); }

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
    struct Job { const Tensor* t; size_t off; int64_t group; };
    std::vector<Job> jobs;
    for (Tensor* t : todo) {
        for (int64_t g = 0; g < t->ne[1] / kPackRows; g++) jobs.push_back({t, total, g});
        offset.push_back(total);
        total += (size_t)t->ne[1] * t->row_bytes;
        total = (total + 63) / 64 * 64;
    }
    packed_.reset(static_cast<uint8_t*>(std::aligned_alloc(64, total)));
    if (!packed_) throw std::bad_alloc();
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

void Model::load() {
    const GGUFFile& f = *file_;
    LlamaConfig& c = cfg_;
    c.arch = f.require_string("general.architecture");
    if (c.arch == "llama") {
        c.rope_neox = false;
    } else if (c.arch == "qwen2") {
        c.rope_neox = true;
    } else {
        throw GGUFError("unsupported architecture '" + c.arch + "' (supported: llama, qwen2)");
    }
    const std::string a = c.arch + ".";
    c.n_layers = checked_int(f, a + "block_count", 1, 1024, 0, true);
    c.dim = checked_int(f, a + "embedding_length", 1, 1 << 16, 0, true);
    c.hidden_dim = checked_int(f, a + "feed_forward_length", 1, 1 << 18, 0, true);
    c.n_heads = checked_int(f, a + "attention.head_count", 1, 1024, 0, true);
    c.n_kv_heads = checked_int(f, a + "attention.head_count_kv", 1, 1024, c.n_heads, false);
    c.context_length = checked_int(f, a + "context_length", 1, 1 << 24, 2048, false);
    if (c.dim % c.n_heads != 0)
        throw GGUFError("embedding_length " + std::to_string(c.dim) + " is not a multiple of head_count " +
                        std::to_string(c.n_heads));
    if (c.n_heads % c.n_kv_heads != 0)
        throw GGUFError("head_count " + std::to_string(c.n_heads) + " is not a multiple of head_count_kv " +
                        std::to_string(c.n_kv_heads));
    c.head_dim = c.dim / c.n_heads;
    c.rope_dim = checked_int(f, a + "rope.dimension_count", 2, c.head_dim, c.head_dim, false);
    if (c.head_dim % 2 || c.rope_dim % 2) throw GGUFError("head and rope dimensions must be even");
    c.rope_base = (float)f.get_float(a + "rope.freq_base", 10000.0);
    if (!(c.rope_base > 0.f) || !std::isfinite(c.rope_base))
        throw GGUFError("metadata '" + a + "rope.freq_base' must be a positive finite number");
    c.norm_eps = (float)f.get_float(a + "attention.layer_norm_rms_epsilon", c.arch == "qwen2" ? 1e-6 : 1e-5);
    if (!(c.norm_eps > 0.f) || !std::isfinite(c.norm_eps) || c.norm_eps > 1.f)
        throw GGUFError("metadata '" + a + "attention.layer_norm_rms_epsilon' must be in (0, 1]");
    const std::string scaling = f.get_string(a + "rope.scaling.type", "none");
    if (scaling == "linear") {
        c.rope_scale = (float)f.get_float(a + "rope.scaling.factor", 1.0);
    } else if (scaling == "none") {
        c.rope_scale = (float)f.get_float(a + "rope.scale_linear", 1.0);
    } else {
        throw GGUFError("unsupported rope scaling type '" + scaling + "' (supported: none, linear)");
    }
    if (!(c.rope_scale > 0.f) || !std::isfinite(c.rope_scale) || c.rope_scale > 1e6f)
        throw GGUFError("rope scaling factor must be a positive finite number");

    const int64_t D = c.dim, H = c.hidden_dim, QD = (int64_t)c.n_heads * c.head_dim,
                  KVD = (int64_t)c.n_kv_heads * c.head_dim;
    size_t& wb = weight_bytes_;
    const GGUFTensorInfo* emb = f.find_tensor("token_embd.weight");
    if (!emb) throw GGUFError("missing tensor 'token_embd.weight'");
    if (emb->n_dims != 2 || emb->ne[0] != D || emb->ne[1] < 1 || emb->ne[1] > (1 << 24))
        throw GGUFError("tensor 'token_embd.weight' has shape " + shape_str(emb->ne, emb->n_dims) +
                        ", expected [" + std::to_string(D) + ", n_vocab]");
    c.n_vocab = (int)emb->ne[1];
    const int64_t declared_vocab = f.get_int(a + "vocab_size", c.n_vocab);
    if (declared_vocab != c.n_vocab)
        throw GGUFError("metadata '" + a + "vocab_size' = " + std::to_string(declared_vocab) +
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
        L.wq = get_tensor(f, p + "attn_q.weight", {D, QD}, true, true, wb);
        L.wk = get_tensor(f, p + "attn_k.weight", {D, KVD}, true, true, wb);
        L.wv = get_tensor(f, p + "attn_v.weight", {D, KVD}, true, true, wb);
        L.bq = get_tensor(f, p + "attn_q.bias", {QD}, false, false, wb);
        L.bk = get_tensor(f, p + "attn_k.bias", {KVD}, false, false, wb);
        L.bv = get_tensor(f, p + "attn_v.bias", {KVD}, false, false, wb);
        L.wo = get_tensor(f, p + "attn_output.weight", {QD, D}, true, true, wb);
        L.ffn_norm = get_tensor(f, p + "ffn_norm.weight", {D}, true, false, wb);
        L.w_gate = get_tensor(f, p + "ffn_gate.weight", {D, H}, true, true, wb);
        L.w_up = get_tensor(f, p + "ffn_up.weight", {D, H}, true, true, wb);
        L.w_down = get_tensor(f, p + "ffn_down.weight", {H, D}, true, true, wb);
        if (L.bq.present() || L.bk.present() || L.bv.present()) c.qkv_bias = true;
    }
    if (f.find_tensor("rope_freqs.weight"))
        throw GGUFError("tensor 'rope_freqs.weight' (llama-3 style rope frequency factors) is not supported yet");
    if (c.n_layers > 0 && f.find_tensor("blk." + std::to_string(c.n_layers) + ".attn_q.weight"))
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

KVCache::KVCache(const LlamaConfig& cfg, int block_size, int64_t budget_bytes, int num_blocks, bool f16)
    : block_size_(block_size), num_blocks_(0), n_layers_(cfg.n_layers),
      kv_dim_(cfg.n_kv_heads * cfg.head_dim), n_kv_heads_(cfg.n_kv_heads), f16_(f16) {
    if (block_size < 1 || block_size > 4096)
        throw std::invalid_argument("block_size must be in [1, 4096], got " + std::to_string(block_size));
    head_bytes_ = (size_t)cfg.head_dim * (f16 ? 2 : 4);
    bytes_per_block_ = (size_t)n_layers_ * 2 * block_size_ * n_kv_heads_ * head_bytes_;
    if (num_blocks > 0) {
        num_blocks_ = num_blocks;
    } else if (budget_bytes > 0) {
        num_blocks_ = (int)std::min<int64_t>(budget_bytes / (int64_t)bytes_per_block_, 1 << 30);
    } else {
        throw std::invalid_argument("KVCache needs num_blocks > 0 or budget_bytes > 0");
    }
    if (num_blocks_ < 1)
        throw std::invalid_argument("KV budget of " + std::to_string(budget_bytes) +
                                    " bytes is smaller than one block (" + std::to_string(bytes_per_block_) + " bytes)");
    if ((double)num_blocks_ * bytes_per_block_ > 64.0 * (1ull << 30))
        throw std::invalid_argument("KV cache of more than 64 GiB requested");
    arena_.assign((size_t)num_blocks_ * bytes_per_block_, 0);
}

void KVCache::copy_block(int src, int dst) {
    if (src < 0 || src >= num_blocks_ || dst < 0 || dst >= num_blocks_)
        throw std::invalid_argument("block id out of range");
    if (src == dst) return;
    std::memcpy(arena_.data() + (size_t)dst * bytes_per_block_, arena_.data() + (size_t)src * bytes_per_block_,
                bytes_per_block_);
}

// ---------------------------------------------------------------------------------------------
// Forward

namespace {

struct RowInfo {
    int seq;  // which sequence
    int pos;  // absolute position
};

// Ask for the start of a run of KV cache memory before it is needed: blocks sit anywhere in the
// arena, so the hardware prefetcher cannot guess the next one, but it follows a run once started.
inline void prefetch_run(const void* p, size_t bytes) {
    const char* c = static_cast<const char*>(p);
    for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

void add_bias(const Tensor& b, float* x, int m, int n) {
    if (!b.present()) return;
    const float* bp = static_cast<const float*>(b.data);
    for (int r = 0; r < m; r++)
        for (int i = 0; i < n; i++) x[(size_t)r * n + i] += bp[i];
}

}  // namespace

void Model::forward(KVCache& kv, const int32_t* tokens, int T, const std::vector<SeqSpan>& seqs,
                    const int32_t* logit_rows, int R, float* logits) const {
    const LlamaConfig& c = cfg_;
    // ---- validate everything before touching anything
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
    if (T == 0) return;

    const IsaTable& isa = active_table();
    const int D = c.dim, HD = c.head_dim, NH = c.n_heads, NKV = c.n_kv_heads;
    const int QD = NH * HD, KVD = NKV * HD, H = c.hidden_dim;
    const int group = NH / NKV;

    std::vector<RowInfo> rows(T);
    {
        int r = 0;
        for (size_t s = 0; s < seqs.size(); s++)
            for (int i = 0; i < seqs[s].n_tokens; i++) rows[r++] = RowInfo{(int)s, seqs[s].start_pos + i};
    }

    // activations
    // activations: per calling thread, kept between calls (no page faults per token); every
    // element is written before it is read
    // (lambdas run on pool threads: they must see the caller's buffers, hence the references)
    thread_local std::vector<float> tl_x, tl_xb, tl_xb2, tl_q, tl_k, tl_v, tl_att, tl_hb, tl_hb2;
    auto &x = tl_x, &xb = tl_xb, &xb2 = tl_xb2, &q = tl_q, &k = tl_k, &v = tl_v, &att = tl_att, &hb = tl_hb,
         &hb2 = tl_hb2;
    x.resize((size_t)T * D), xb.resize((size_t)T * D), xb2.resize((size_t)T * D);
    q.resize((size_t)T * QD), k.resize((size_t)T * KVD), v.resize((size_t)T * KVD), att.resize((size_t)T * QD);
    hb.resize((size_t)T * H), hb2.resize((size_t)T * H);

    // RoPE table for this batch: cos/sin per row and rotated pair (same for every layer)
    const int half = c.rope_dim / 2;
    std::vector<float> rcos((size_t)T * half), rsin((size_t)T * half);
    std::vector<double> inv_freq(half);
    for (int i = 0; i < half; i++) inv_freq[i] = std::pow((double)c.rope_base, -2.0 * i / c.rope_dim);
    for (int t = 0; t < T; t++) {
        const double p = rows[t].pos / (double)c.rope_scale;
        for (int i = 0; i < half; i++) {
            const double th = p * inv_freq[i];
            rcos[(size_t)t * half + i] = (float)std::cos(th);
            rsin[(size_t)t * half + i] = (float)std::sin(th);
        }
    }
    auto rope = [&](float* vec, int t) {  // rotate one head vector of row t
        const float* cs = &rcos[(size_t)t * half];
        const float* sn = &rsin[(size_t)t * half];
        if (c.rope_neox) {
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
    };

    // embedding
    for (int t = 0; t < T; t++) get_row(w_.tok_embd, tokens[t], &x[(size_t)t * D]);

    const float scale = 1.0f / std::sqrt((float)HD);
    const bool f16 = kv.is_f16();
    const auto softmax = isa.ops.softmax ? isa.ops.softmax : isa_table_scalar()->ops.softmax;
    // block-wise attention kernels; an ISA without them gets the same loops over its dot/axpy
    auto attn_scores = [&](int hd, int nq, const float* qv, const f16_t* kp, size_t ks, int n, float sc,
                           float* out, size_t ld) {
        if (isa.ops.attn_scores_f16) return isa.ops.attn_scores_f16(hd, nq, qv, kp, ks, n, sc, out, ld);
        for (int h = 0; h < nq; h++)
            for (int j = 0; j < n; j++) out[h * ld + j] = sc * isa.ops.dot_f16_f32(hd, kp + j * ks, qv + h * hd);
    };
    auto attn_accum = [&](int hd, int nq, const float* pv, size_t ld, const f16_t* vp, size_t vs, int n, float* out) {
        if (isa.ops.attn_accum_f16) return isa.ops.attn_accum_f16(hd, nq, pv, ld, vp, vs, n, out);
        for (int h = 0; h < nq; h++)
            for (int j = 0; j < n; j++) isa.ops.axpy_f16(hd, pv[h * ld + j], vp + j * vs, out + h * hd);
    };

    for (int l = 0; l < c.n_layers; l++) {
        const LayerWeights& L = w_.layers[l];
        // attention rmsnorm
        rmsnorm_rows(isa, x.data(), static_cast<const float*>(L.attn_norm.data), c.norm_eps, T, D, xb.data());
        // q, k, v projections (+ qwen2 bias)
        {
            const Tensor* ws[3] = {&L.wq, &L.wk, &L.wv};
            float* ys[3] = {q.data(), k.data(), v.data()};
            matmul_multi(isa, ws, ys, 3, xb.data(), T);
        }
        add_bias(L.bq, q.data(), T, QD);
        add_bias(L.bk, k.data(), T, KVD);
        add_bias(L.bv, v.data(), T, KVD);
        // RoPE: rotate q and k in each head; then store k, v in the paged cache
        for (int t = 0; t < T; t++) {
            for (int h = 0; h < NH; h++) rope(&q[(size_t)t * QD + h * HD], t);
            for (int h = 0; h < NKV; h++) rope(&k[(size_t)t * KVD + h * HD], t);
            const SeqSpan& s = seqs[rows[t].seq];
            const int p = rows[t].pos;
            const int blk = s.blocks[p / bs], slot = p % bs;
            for (int h = 0; h < NKV; h++) {
                const float* kh = &k[(size_t)t * KVD + h * HD];
                const float* vh = &v[(size_t)t * KVD + h * HD];
                if (f16) {
                    isa.ops.f32_to_f16(kh, reinterpret_cast<f16_t*>(kv.at(blk, l, 0, h, slot)), HD);
                    isa.ops.f32_to_f16(vh, reinterpret_cast<f16_t*>(kv.at(blk, l, 1, h, slot)), HD);
                } else {
                    std::memcpy(kv.at(blk, l, 0, h, slot), kh, HD * sizeof(float));
                    std::memcpy(kv.at(blk, l, 1, h, slot), vh, HD * sizeof(float));
                }
            }
        }
        // causal attention over the paged cache. A unit of work is (row, KV head) with its GQA
        // group of query heads, or (row, query head) when there are too few rows to keep the pool
        // busy. With many rows one task takes all units of its row: fewer task claims, and one
        // sequence's blocks at a time (measured 0-4% faster at 16-32 rows, interleaved in one
        // process). Every score and every output element is computed the same way whatever the split.
        const bool by_group = T * NKV >= 4 * get_num_threads();
        const int heads_per_task = by_group ? group : 1;
        const int per_row = NH / heads_per_task;
        const int fold = by_group && T >= 4 * get_num_threads() ? per_row : 1;  // units per task
        parallel_for(T * per_row / fold, [&](int task, int) {
          for (int unit = task * fold; unit < (task + 1) * fold; unit++) {
            thread_local std::vector<float> scores;
            const int t = unit / per_row;
            const int h0 = (unit % per_row) * heads_per_task;  // first query head
            const int kvh = h0 / group;
            const SeqSpan& s = seqs[rows[t].seq];
            const int n_pos = rows[t].pos + 1;
            const size_t ld = (size_t)n_pos;
            if (scores.size() < ld * heads_per_task) scores.resize(ld * heads_per_task);
            const float* qh = &q[(size_t)t * QD + h0 * HD];
            float* out = &att[(size_t)t * QD + h0 * HD];
            std::fill(out, out + heads_per_task * HD, 0.f);
            const int n_blocks = (n_pos + bs - 1) / bs;
            if (f16) {
                // QK^T block by block
                for (int b = 0; b < n_blocks; b++) {
                    const int n = std::min(bs, n_pos - b * bs);
                    if (b + 1 < n_blocks) prefetch_run(kv.at(s.blocks[b + 1], l, 0, kvh, 0), 256);
                    const f16_t* kp = reinterpret_cast<const f16_t*>(kv.at(s.blocks[b], l, 0, kvh, 0));
                    attn_scores(HD, heads_per_task, qh, kp, HD, n, scale, scores.data() + b * bs, ld);
                }
            } else {
                for (int hh = 0; hh < heads_per_task; hh++)
                    for (int p = 0; p < n_pos; p++) {
                        const float* kp = reinterpret_cast<const float*>(kv.at(s.blocks[p / bs], l, 0, kvh, p % bs));
                        scores[hh * ld + p] = isa.ops.dot_f32(HD, kp, qh + hh * HD) * scale;
                    }
            }
            // softmax per head
            for (int hh = 0; hh < heads_per_task; hh++) softmax(n_pos, scores.data() + hh * ld);
            // weighted sum of V
            if (f16) {
                for (int b = 0; b < n_blocks; b++) {
                    const int n = std::min(bs, n_pos - b * bs);
                    if (b + 1 < n_blocks) prefetch_run(kv.at(s.blocks[b + 1], l, 1, kvh, 0), 256);
                    const f16_t* vp = reinterpret_cast<const f16_t*>(kv.at(s.blocks[b], l, 1, kvh, 0));
                    attn_accum(HD, heads_per_task, scores.data() + b * bs, ld, vp, HD, n, out);
                }
            } else {
                for (int hh = 0; hh < heads_per_task; hh++)
                    for (int p = 0; p < n_pos; p++) {
                        const float* vf = reinterpret_cast<const float*>(kv.at(s.blocks[p / bs], l, 1, kvh, p % bs));
                        const float a = scores[hh * ld + p];
                        float* o = out + hh * HD;
                        for (int i = 0; i < HD; i++) o[i] += a * vf[i];
                    }
            }
          }
        });
        // output projection and residual
        matmul(isa, L.wo, att.data(), T, xb2.data());
        for (size_t i = 0; i < (size_t)T * D; i++) x[i] += xb2[i];
        // FFN: rmsnorm, SwiGLU, down projection, residual
        rmsnorm_rows(isa, x.data(), static_cast<const float*>(L.ffn_norm.data), c.norm_eps, T, D, xb.data());
        {
            const Tensor* ws[2] = {&L.w_gate, &L.w_up};
            float* ys[2] = {hb.data(), hb2.data()};
            matmul_multi(isa, ws, ys, 2, xb.data(), T);
        }
        for (int t = 0; t < T; t++) isa.ops.swiglu(H, &hb[(size_t)t * H], &hb2[(size_t)t * H], &hb[(size_t)t * H]);
        matmul(isa, L.w_down, hb.data(), T, xb2.data());
        for (size_t i = 0; i < (size_t)T * D; i++) x[i] += xb2[i];
    }

    // final norm and output head, only for the rows that need logits
    if (R == 0) return;
    std::vector<float> xr((size_t)R * D), xn((size_t)R * D);
    for (int i = 0; i < R; i++) std::memcpy(&xr[(size_t)i * D], &x[(size_t)logit_rows[i] * D], D * sizeof(float));
    rmsnorm_rows(isa, xr.data(), static_cast<const float*>(w_.out_norm.data), c.norm_eps, R, D, xn.data());
    matmul(isa, w_.output, xn.data(), R, logits);
}

}  // namespace ts
