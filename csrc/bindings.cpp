// bindings.cpp — the only file (with bindings_kernels.cpp) that sees Python. Converts numpy
// arrays to plain pointers, validates shapes, and releases the GIL around the forward.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <stdexcept>

#include "gguf.h"
#include "kernels/kernels.h"
#include "model.h"
#include "threadpool.h"

namespace py = pybind11;
using namespace ts;

void bind_kernels(py::module_& m);
void bind_sampling(py::module_& m);  // bindings_sampling.cpp

namespace {

using i32arr = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

// Strings in a hostile file need not be UTF-8: fall back to bytes.
py::object str_or_bytes(const std::string& s) {
    PyObject* o = PyUnicode_DecodeUTF8(s.data(), (Py_ssize_t)s.size(), "strict");
    if (!o) {
        PyErr_Clear();
        return py::bytes(s);
    }
    return py::reinterpret_steal<py::object>(o);
}

py::object value_to_py(const GGUFValue& v) {
    auto scalar_int = [](GGUFType t, int64_t i) -> py::object {
        if (t == GGUFType::BOOL) return py::bool_(i != 0);
        if (t == GGUFType::U64) return py::int_((uint64_t)i);
        return py::int_(i);
    };
    switch (v.type) {
        case GGUFType::F32:
        case GGUFType::F64:
            return py::float_(v.f);
        case GGUFType::STRING:
            return str_or_bytes(v.s);
        case GGUFType::ARRAY: {
            py::list out;
            if (v.elem_type == GGUFType::STRING) {
                for (const auto& s : v.as) out.append(str_or_bytes(s));
            } else if (v.elem_type == GGUFType::F32 || v.elem_type == GGUFType::F64) {
                for (double f : v.af) out.append(py::float_(f));
            } else if (v.elem_type != GGUFType::ARRAY) {
                for (int64_t i : v.ai) out.append(scalar_int(v.elem_type, i));
            }
            return out;
        }
        default:
            return scalar_int(v.type, v.i);
    }
}

py::dict metadata_dict(const GGUFFile& f) {
    py::dict d;
    for (const auto& [k, v] : f.metadata()) d[str_or_bytes(k)] = value_to_py(v);
    return d;
}

py::list tensor_list(const GGUFFile& f) {
    py::list out;
    for (const auto& t : f.tensors()) {
        py::tuple shape(t.n_dims);
        for (int i = 0; i < t.n_dims; i++) shape[i] = t.ne[i];
        const char* tn = dtype_info(t.type).name;
        out.append(py::make_tuple(str_or_bytes(t.name), tn ? tn : "?", shape));
    }
    return out;
}

py::dict config_dict(const Model& m) {
    const auto& c = m.config();
    py::dict d;
    d["arch"] = c.arch;
    d["n_vocab"] = c.n_vocab;
    d["dim"] = c.dim;
    d["hidden_dim"] = c.hidden_dim;
    d["n_layers"] = c.n_layers;
    d["n_heads"] = c.n_heads;
    d["n_kv_heads"] = c.n_kv_heads;
    d["head_dim"] = c.head_dim;
    d["context_length"] = c.context_length;
    d["rope_dim"] = c.rope_dim;
    d["rope_base"] = c.rope.base;
    d["rope_scale"] = c.rope.scale;
    d["rope_type"] = c.rope_neox ? "neox" : "norm";
    d["rope_freq_factors"] = !c.rope.freq_factors.empty();
    d["rope_yarn"] = c.rope.yarn_ext_factor > 0.f;
    d["rope_attn_factor"] = c.rope.attn_factor;
    d["rope_base_local"] = c.rope_local.base;
    d["norm_eps"] = c.norm_eps;
    d["embd_scale"] = c.embd_scale;
    d["attn_scale"] = c.attn_scale;
    d["logit_softcap"] = c.logit_softcap;
    d["sliding_window"] = c.sliding_window;
    py::list sliding;
    for (int l = 0; l < c.n_layers; l++) sliding.append(py::bool_(c.is_sliding(l)));
    d["sliding_layers"] = sliding;
    d["ffn_act"] = c.ffn_act == FfnAct::GeluTanh ? "gelu_tanh" : "silu";
    d["tied_output"] = c.tied_output;
    d["qkv_bias"] = c.qkv_bias;
    d["qk_norm"] = c.qk_norm;
    d["post_norms"] = c.post_norms;
    d["fused_qkv"] = c.fused_qkv;
    d["fused_gate_up"] = c.fused_gate_up;
    d["file_size"] = m.gguf().file_size();
    d["weight_bytes"] = m.weight_bytes();
    d["repacked_bytes"] = m.repacked_bytes();
    return d;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "tinyserve C++ core: GGUF loading, kernels, llama forward over a ragged batch";
    m.attr("__version__") = "0.1.0";

    static py::exception<GGUFError> gguf_error(m, "GGUFError", PyExc_ValueError);
    static py::exception<DeviceError> device_error(m, "DeviceError", PyExc_RuntimeError);
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const GGUFError& e) { PyErr_SetString(gguf_error.ptr(), e.what()); } catch (const DeviceError& e) {
            PyErr_SetString(device_error.ptr(), e.what());
        }
    });

    m.def(
        "read_gguf",
        [](const py::object& path_like) {
            GGUFFile f(py::str(py::module_::import("os").attr("fspath")(path_like)));
            py::dict d;
            d["version"] = f.version();
            d["alignment"] = f.alignment();
            d["data_offset"] = f.data_offset();
            d["metadata"] = metadata_dict(f);
            d["tensors"] = tensor_list(f);
            return d;
        },
        py::arg("path"), "Parse and validate a GGUF file; returns its header (no model checks).");

    py::class_<Model>(m, "Model")
        .def(py::init([](const py::object& path, const std::string& device) {
                 // accept str and os.PathLike
                 std::string p = py::str(py::module_::import("os").attr("fspath")(path));
                 const Device d = parse_device(device);
                 py::gil_scoped_release nogil;
                 return std::make_unique<Model>(p, d);
             }),
             py::arg("path"), py::arg("device") = "cpu")
        .def_property_readonly("path", [](const Model& self) { return self.gguf().path(); })
        .def_property_readonly("device", [](const Model& self) { return std::string(device_name(self.device())); })
        .def_property_readonly("device_description", [](const Model& self) { return self.backend().description(); })
        .def_property_readonly("config", &config_dict)
        .def("metadata", [](const Model& self) { return metadata_dict(self.gguf()); })
        .def("tensors", [](const Model& self) { return tensor_list(self.gguf()); })
        .def(
            "embed",
            [](const Model& self, i32arr tokens) {
                if (tokens.ndim() != 1) throw std::invalid_argument("tokens must be 1-D");
                int n = (int)tokens.shape(0);
                py::array_t<float> out({n, self.config().dim});
                const int32_t* tp = tokens.data();
                float* op = out.mutable_data();
                {
                    py::gil_scoped_release nogil;
                    self.embed(tp, n, op);
                }
                return out;
            },
            py::arg("tokens"))
        .def(
            "forward",
            [](const Model& self, KVCache& kv, i32arr tokens, i32arr seq_lens, i32arr start_pos, i32arr block_tables,
               i32arr logit_rows, py::object out_obj) {
                if (tokens.ndim() != 1) throw std::invalid_argument("tokens must be 1-D [T]");
                if (seq_lens.ndim() != 1) throw std::invalid_argument("seq_lens must be 1-D [S]");
                if (start_pos.ndim() != 1 || start_pos.shape(0) != seq_lens.shape(0))
                    throw std::invalid_argument("start_pos must be 1-D with one entry per sequence");
                if (block_tables.ndim() != 2 || block_tables.shape(0) != seq_lens.shape(0))
                    throw std::invalid_argument("block_tables must be 2-D [S, max_blocks]");
                if (logit_rows.ndim() != 1) throw std::invalid_argument("logit_rows must be 1-D [R]");
                const int S = (int)seq_lens.shape(0);
                const int B = (int)block_tables.shape(1);
                std::vector<SeqSpan> seqs(S);
                for (int s = 0; s < S; s++) {
                    const int32_t* row = block_tables.data() + (size_t)s * B;
                    int nb = 0;
                    while (nb < B && row[nb] >= 0) nb++;
                    seqs[s] = SeqSpan{seq_lens.data()[s], start_pos.data()[s], row, nb};
                }
                const int T = (int)tokens.shape(0);
                const int R = (int)logit_rows.shape(0);
                // out: a caller's [R, n_vocab] float32 buffer to reuse, so a step does not map and
                // fault in a fresh one (32 MB at 32 rows of a 262k vocabulary)
                py::array_t<float> out;
                if (out_obj.is_none()) {
                    out = py::array_t<float>({R, self.config().n_vocab});
                } else {
                    const bool ok_type = py::isinstance<py::array_t<float>>(out_obj);
                    if (ok_type) out = py::reinterpret_borrow<py::array_t<float>>(out_obj);
                    if (!ok_type || out.ndim() != 2 || out.shape(0) != R || out.shape(1) != self.config().n_vocab ||
                        !(out.flags() & py::array::c_style) || !out.writeable())
                        throw std::invalid_argument("out must be a writable C-contiguous float32 array of shape [" +
                                                    std::to_string(R) + ", " + std::to_string(self.config().n_vocab) +
                                                    "]");
                }
                const int32_t* tp = tokens.data();
                const int32_t* lp = logit_rows.data();
                float* op = out.mutable_data();
                {
                    py::gil_scoped_release nogil;
                    self.forward(kv, tp, T, seqs, lp, R, op);
                }
                return out;
            },
            py::arg("kv"), py::arg("tokens"), py::arg("seq_lens"), py::arg("start_pos"), py::arg("block_tables"),
            py::arg("logit_rows"), py::arg("out") = py::none());

    py::class_<KVCache>(m, "KVCache")
        .def(py::init([](const Model& model, int block_size, int64_t budget_bytes, int num_blocks,
                         const std::string& dtype) {
                 Backend* device = model.device() == Device::CPU ? nullptr : &model.backend();
                 return new KVCache(model.config(), block_size, budget_bytes, num_blocks, parse_kv_dtype(dtype),
                                    device);
             }),
             py::arg("model"), py::arg("block_size") = 16, py::arg("budget_bytes") = 0, py::arg("num_blocks") = 0,
             py::arg("dtype") = "f16", py::keep_alive<1, 2>())
        .def_static(
            "block_bytes",
            [](int n_layers, int n_kv_heads, int head_dim, int block_size, const std::string& dtype) {
                if (n_layers < 1 || n_kv_heads < 1 || head_dim < 1)
                    throw std::invalid_argument("block_bytes: n_layers, n_kv_heads and head_dim must be >= 1");
                return KVCache::block_bytes(n_layers, n_kv_heads, head_dim, block_size, parse_kv_dtype(dtype));
            },
            py::arg("n_layers"), py::arg("n_kv_heads"), py::arg("head_dim"), py::arg("block_size"), py::arg("dtype"),
            "Bytes of one KV block of block_size positions for a model of this shape (what a budget is divided by).")
        .def_property_readonly("num_blocks", &KVCache::num_blocks)
        .def_property_readonly("block_size", &KVCache::block_size)
        .def_property_readonly("bytes_per_block", &KVCache::bytes_per_block)
        .def_property_readonly("total_bytes", &KVCache::total_bytes)
        .def_property_readonly("dtype", [](const KVCache& k) { return kv_dtype_name(k.dtype()); })
        .def_property_readonly("device", [](const KVCache& k) { return std::string(device_name(k.device())); })
        .def("copy_block", &KVCache::copy_block, py::arg("src"), py::arg("dst"));

    m.def("cuda_compiled", &cuda_compiled, "Was this extension built with TINYSERVE_CUDA.");
    m.def(
        "cuda_status",
        []() {
            py::gil_scoped_release nogil;
            return cuda_status();
        },
        "'' when a usable CUDA device is there, else why not (one line).");
    m.def(
        "cuda_device",
        []() {
            py::gil_scoped_release nogil;
            return cuda_device_description();
        },
        "The CUDA device Model(path, device='cuda') would use ('' if none).");
    m.def("set_num_threads", &set_num_threads, py::arg("n"));
    m.def("get_num_threads", &get_num_threads);
    m.def("isa", []() { return std::string(isa_name(active_table().isa)); });
    m.def("available_isas", []() {
        std::vector<std::string> out;
        for (Isa i : {Isa::Scalar, Isa::AVX2, Isa::AVX512, Isa::NEON})
            if (isa_available(i)) out.push_back(isa_name(i));
        return out;
    });
    m.def("cpu_features", []() {
        const auto& f = cpu_features();
        py::dict d;
        d["avx2"] = f.avx2;
        d["fma"] = f.fma;
        d["f16c"] = f.f16c;
        d["avx512f"] = f.avx512f;
        d["avx512bw"] = f.avx512bw;
        d["avx512vl"] = f.avx512vl;
        d["avx512dq"] = f.avx512dq;
        d["avx512vnni"] = f.avx512vnni;
        d["avx512bf16"] = f.avx512bf16;
        d["neon"] = f.neon;
        d["neon_dotprod"] = f.neon_dotprod;
        d["intel"] = f.intel;
        return d;
    });
    m.def("gemv_prefetch", &gemv_prefetch,
          "Do the x16 GEMV tiles prefetch their weights? (TINYSERVE_GEMV_PREFETCH, else Intel CPUs only)");

    auto km = m.def_submodule("kernels", "kernel-level entry points for tests and benchmarks");
    bind_kernels(km);
    bind_sampling(m);
}
