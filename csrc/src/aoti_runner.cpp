// AOTInductor path: two packages compiled by export/export_aoti.py. source.pt2 maps the source image
// to the source tensors; frame.pt2 takes (those source tensors..., driving) and returns the output frame
// first. The source tensors stay on the device between calls: set_source runs once per photo.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <stdexcept>

#include "ostnet/runner.h"

namespace ostnet {
namespace {

torch::Tensor to_torch(const HostTensor& t, const torch::Device& device) {
  auto cpu = torch::from_blob(const_cast<float*>(t.data.data()), t.shape, torch::kFloat32);
  return cpu.to(device).contiguous();
}

HostTensor to_host(const torch::Tensor& t) {
  auto cpu = t.to(torch::kCPU, torch::kFloat32).contiguous();
  HostTensor h;
  h.shape.assign(cpu.sizes().begin(), cpu.sizes().end());
  h.data.assign(cpu.data_ptr<float>(), cpu.data_ptr<float>() + cpu.numel());
  return h;
}

class AotiRunner : public Runner {
 public:
  AotiRunner(const std::string& dir, const std::string& device)
      : device_(device), source_(dir + "/source.pt2"), frame_(dir + "/frame.pt2") {}

  void set_source(const HostTensor& source) override {
    torch::NoGradGuard no_grad;
    state_ = source_.run({to_torch(source, device_)});
  }

  HostTensor animate(const HostTensor& driving) override {
    if (state_.empty()) throw std::runtime_error("animate() called before set_source()");
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> inputs = state_;
    inputs.push_back(to_torch(driving, device_));
    return to_host(frame_.run(inputs).at(0));
  }

 private:
  torch::Device device_;
  torch::inductor::AOTIModelPackageLoader source_;
  torch::inductor::AOTIModelPackageLoader frame_;
  std::vector<torch::Tensor> state_;
};

}  // namespace

std::unique_ptr<Runner> make_aoti_runner(const std::string& dir, const std::string& device) {
  return std::make_unique<AotiRunner>(dir, device);
}

}  // namespace ostnet
