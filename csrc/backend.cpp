// backend.cpp — device names and the CPU backend (Model::forward_cpu behind the Backend seam).
#include "backend.h"

#include "kernels/kernels.h"
#include "model.h"

namespace ts {

const char* device_name(Device d) { return d == Device::CUDA ? "cuda" : "cpu"; }

Device parse_device(const std::string& name) {
    if (name == "cpu") return Device::CPU;
    if (name == "cuda") return Device::CUDA;
    throw std::invalid_argument("unknown device '" + name + "' (choose cpu or cuda)");
}

namespace {

class CpuBackend final : public Backend {
  public:
    explicit CpuBackend(const Model& m) : m_(m) {}
    Device device() const override { return Device::CPU; }
    std::string description() const override { return std::string("cpu (") + isa_name(active_table().isa) + ")"; }
    void forward(KVCache& kv, const int32_t* tokens, int T, const std::vector<SeqSpan>& seqs, const int32_t* logit_rows,
                 int R, float* logits) override {
        m_.forward_cpu(kv, tokens, T, seqs, logit_rows, R, logits);
    }

  private:
    const Model& m_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const Model& m) { return std::make_unique<CpuBackend>(m); }

}  // namespace ts
