// bindings_sampling.cpp — `_core.sample_batch`: one token per row of a logits batch (sampling.h).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "sampling.h"

namespace py = pybind11;

namespace {

template <typename T>
using arr = py::array_t<T, py::array::c_style | py::array::forcecast>;

template <typename T>
const T* column(const arr<T>& a, py::ssize_t rows, const char* name) {
    if (a.ndim() != 1 || a.shape(0) != rows)
        throw std::invalid_argument(std::string(name) + " must be 1-D with one entry per row of logits");
    return a.data();
}

}  // namespace

void bind_sampling(py::module_& m) {
    m.def(
        "sample_batch",
        [](const arr<float>& logits, const arr<double>& temperature, const arr<int32_t>& top_k,
           const arr<double>& top_p, const arr<double>& min_p, const arr<double>& u) {
            if (logits.ndim() != 2) throw std::invalid_argument("logits must be 2-D [rows, vocab]");
            const py::ssize_t rows = logits.shape(0), vocab = logits.shape(1);
            if (rows > 0 && vocab < 1) throw std::invalid_argument("logits has an empty vocabulary");
            const double* t = column(temperature, rows, "temperature");
            const int32_t* k = column(top_k, rows, "top_k");
            const double* p = column(top_p, rows, "top_p");
            const double* mp = column(min_p, rows, "min_p");
            const double* uu = column(u, rows, "u");
            std::vector<ts::SampleParams> params(rows);
            for (py::ssize_t r = 0; r < rows; r++) {
                if (!(std::isfinite(t[r]) && t[r] >= 0) || !(p[r] > 0 && p[r] <= 1) || !(mp[r] >= 0 && mp[r] < 1) ||
                    !(uu[r] >= 0 && uu[r] < 1) || k[r] < 0)
                    throw std::invalid_argument("row " + std::to_string(r) +
                                                ": temperature >= 0, top_k >= 0, "
                                                "top_p in (0, 1], min_p in [0, 1) and u in [0, 1) are required");
                params[r] = ts::SampleParams{t[r], k[r], p[r], mp[r], uu[r]};
            }
            py::array_t<int32_t> out(rows);
            const float* lp = logits.data();
            int32_t* op = out.mutable_data();
            {
                py::gil_scoped_release nogil;
                ts::sample_rows(lp, (int)rows, (int)vocab, params.data(), op);
            }
            return out;
        },
        py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"), py::arg("u"),
        "One token per row of logits [rows, vocab] (float32): greedy at temperature 0, else top-k, "
        "softmax, top-p, min-p and the inverse CDF at u (the semantics of tinyserve.engine.sampling).");
}
