// none.cpp — the CUDA entry points of a build without TINYSERVE_CUDA: --device cuda says so.
#include "backend.h"

namespace ts {

namespace {
const char* kNotBuilt =
    "this tinyserve was built without CUDA (rebuild with: pip install . -C cmake.define.TINYSERVE_CUDA=ON, "
    "which needs nvcc)";
}

bool cuda_compiled() { return false; }
std::string cuda_status() { return kNotBuilt; }
std::string cuda_device_description() { return ""; }
std::unique_ptr<Backend> make_cuda_backend(const Model&) {
    throw DeviceError(std::string("--device cuda: ") + kNotBuilt);
}

}  // namespace ts
