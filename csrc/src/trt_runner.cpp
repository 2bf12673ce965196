// TensorRT path: source.engine (source image -> source tensors) and frame.engine (source tensors +
// "driving" -> output frame), both from export/build_trt.py. Tensors are matched BY NAME: every
// output of the source engine is an input of the frame engine of the same name. Source tensors stay
// in device memory between frames; one CUDA stream; enqueueV3 (TensorRT 10 / TensorRT-RTX API).
#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <stdexcept>
#include <vector>

#include "ostnet/runner.h"

namespace ostnet {
namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

class Logger : public nvinfer1::ILogger {
  void log(Severity s, const char* msg) noexcept override {
    if (s <= Severity::kWARNING) std::cerr << "[TensorRT] " << msg << "\n";
  }
};

std::vector<char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open engine: " + path);
  return std::vector<char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

size_t element_size(nvinfer1::DataType t) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return 4;
    case nvinfer1::DataType::kHALF: return 2;
    default: throw std::runtime_error("ostnet_infer: engine I/O must be float32 or float16");
  }
}

// IEEE half <-> float on the host (I/O only; the engine computes on the GPU).
uint16_t to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000, exp = (x >> 23) & 0xff, man = x & 0x7fffff;
  if (exp == 0xff) return static_cast<uint16_t>(sign | 0x7c00 | (man ? 0x200 : 0));
  int e = static_cast<int>(exp) - 127 + 15;
  if (e >= 31) return static_cast<uint16_t>(sign | 0x7c00);
  if (e <= 0) {
    if (e < -10) return static_cast<uint16_t>(sign);
    man |= 0x800000;
    uint32_t shift = static_cast<uint32_t>(14 - e);
    uint32_t half_man = man >> shift;
    if ((man >> (shift - 1)) & 1) half_man++;
    return static_cast<uint16_t>(sign | half_man);
  }
  uint32_t h = sign | (static_cast<uint32_t>(e) << 10) | (man >> 13);
  if (man & 0x1000) h++;  // round half up
  return static_cast<uint16_t>(h);
}

float from_half(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, x;
  if (exp == 0) {
    if (man == 0) { x = sign; } else {
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; exp--; }
      x = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    x = sign | 0x7f800000 | (man << 13);
  } else {
    x = sign | ((exp - 15 + 127) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  void ensure(size_t n) {
    if (n <= bytes) return;
    if (ptr) cudaFree(ptr);
    check(cudaMalloc(&ptr, n), "cudaMalloc");
    bytes = n;
  }
  ~DeviceBuffer() { if (ptr) cudaFree(ptr); }
};

int64_t volume(const nvinfer1::Dims& d) {
  int64_t v = 1;
  for (int i = 0; i < d.nbDims; ++i) v *= d.d[i];
  return v;
}

struct Engine {
  std::unique_ptr<nvinfer1::ICudaEngine> engine;
  std::unique_ptr<nvinfer1::IExecutionContext> context;
};

class TrtRunner : public Runner {
 public:
  explicit TrtRunner(const std::string& dir) {
    runtime_.reset(nvinfer1::createInferRuntime(logger_));
    if (!runtime_) throw std::runtime_error("createInferRuntime failed");
    source_ = load(dir + "/source.engine");
    frame_ = load(dir + "/frame.engine");
    check(cudaStreamCreate(&stream_), "cudaStreamCreate");
  }
  ~TrtRunner() override { cudaStreamDestroy(stream_); }

  void set_source(const HostTensor& source) override {
    auto* e = source_.engine.get();
    auto* c = source_.context.get();
    for (int i = 0; i < e->getNbIOTensors(); ++i) {
      const char* name = e->getIOTensorName(i);
      if (e->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT) {
        upload(c, name, source, buffers_[name]);
      }
    }
    for (int i = 0; i < e->getNbIOTensors(); ++i) {
      const char* name = e->getIOTensorName(i);
      if (e->getTensorIOMode(name) == nvinfer1::TensorIOMode::kOUTPUT) {
        size_t n = volume(c->getTensorShape(name)) * element_size(e->getTensorDataType(name));
        buffers_[name].ensure(n);
        c->setTensorAddress(name, buffers_[name].ptr);
      }
    }
    if (!c->enqueueV3(stream_)) throw std::runtime_error("source engine enqueueV3 failed");
    check(cudaStreamSynchronize(stream_), "source engine");
    has_source_ = true;
  }

  HostTensor animate(const HostTensor& driving) override {
    if (!has_source_) throw std::runtime_error("animate() called before set_source()");
    auto* e = frame_.engine.get();
    auto* c = frame_.context.get();
    for (int i = 0; i < e->getNbIOTensors(); ++i) {
      const char* name = e->getIOTensorName(i);
      if (e->getTensorIOMode(name) != nvinfer1::TensorIOMode::kINPUT) continue;
      if (std::string(name) == "driving") {
        upload(c, name, driving, buffers_["driving"]);
      } else {
        auto it = buffers_.find(name);
        if (it == buffers_.end()) throw std::runtime_error(std::string("frame engine input '") + name +
                                                           "' is not an output of the source engine");
        c->setInputShape(name, source_.context->getTensorShape(name));
        c->setTensorAddress(name, it->second.ptr);
      }
    }
    std::string out_name;
    for (int i = 0; i < e->getNbIOTensors(); ++i) {
      const char* name = e->getIOTensorName(i);
      if (e->getTensorIOMode(name) != nvinfer1::TensorIOMode::kOUTPUT) continue;
      if (out_name.empty()) out_name = name;  // the output frame is the first output
      auto& buf = buffers_[std::string("out:") + name];
      buf.ensure(volume(c->getTensorShape(name)) * element_size(e->getTensorDataType(name)));
      c->setTensorAddress(name, buf.ptr);
    }
    if (!c->enqueueV3(stream_)) throw std::runtime_error("frame engine enqueueV3 failed");
    HostTensor out = download(c, e, out_name.c_str(), buffers_["out:" + out_name]);
    return out;
  }

 private:
  Engine load(const std::string& path) {
    auto blob = read_file(path);
    Engine en;
    en.engine.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
    if (!en.engine) throw std::runtime_error("cannot deserialize " + path +
                                             " (built for another TensorRT version or GPU? see its .json sidecar)");
    en.context.reset(en.engine->createExecutionContext());
    if (!en.context) throw std::runtime_error("createExecutionContext failed for " + path);
    return en;
  }

  void upload(nvinfer1::IExecutionContext* c, const char* name, const HostTensor& t, DeviceBuffer& buf) {
    nvinfer1::Dims dims;
    dims.nbDims = static_cast<int>(t.shape.size());
    for (int i = 0; i < dims.nbDims; ++i) dims.d[i] = t.shape[i];
    if (!c->setInputShape(name, dims)) throw std::runtime_error(std::string("input shape rejected for ") + name +
                                                               " (outside the engine's optimization profile?)");
    auto type = c->getEngine().getTensorDataType(name);
    size_t n = static_cast<size_t>(t.numel());
    buf.ensure(n * element_size(type));
    if (type == nvinfer1::DataType::kFLOAT) {
      check(cudaMemcpyAsync(buf.ptr, t.data.data(), n * 4, cudaMemcpyHostToDevice, stream_), "upload");
    } else {
      staging_.resize(n);
      for (size_t i = 0; i < n; ++i) staging_[i] = to_half(t.data[i]);
      check(cudaMemcpyAsync(buf.ptr, staging_.data(), n * 2, cudaMemcpyHostToDevice, stream_), "upload");
      check(cudaStreamSynchronize(stream_), "upload");
    }
    c->setTensorAddress(name, buf.ptr);
  }

  HostTensor download(nvinfer1::IExecutionContext* c, const nvinfer1::ICudaEngine* e, const char* name,
                      DeviceBuffer& buf) {
    auto dims = c->getTensorShape(name);
    HostTensor out;
    out.shape.assign(dims.d, dims.d + dims.nbDims);
    size_t n = static_cast<size_t>(out.numel());
    out.data.resize(n);
    if (e->getTensorDataType(name) == nvinfer1::DataType::kFLOAT) {
      check(cudaMemcpyAsync(out.data.data(), buf.ptr, n * 4, cudaMemcpyDeviceToHost, stream_), "download");
      check(cudaStreamSynchronize(stream_), "download");
    } else {
      staging_.resize(n);
      check(cudaMemcpyAsync(staging_.data(), buf.ptr, n * 2, cudaMemcpyDeviceToHost, stream_), "download");
      check(cudaStreamSynchronize(stream_), "download");
      for (size_t i = 0; i < n; ++i) out.data[i] = from_half(staging_[i]);
    }
    return out;
  }

  Logger logger_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  Engine source_, frame_;
  cudaStream_t stream_{};
  std::map<std::string, DeviceBuffer> buffers_;
  std::vector<uint16_t> staging_;
  bool has_source_ = false;
};

}  // namespace

std::unique_ptr<Runner> make_trt_runner(const std::string& dir) { return std::make_unique<TrtRunner>(dir); }

}  // namespace ostnet
