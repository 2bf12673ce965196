// One interface over both runtimes: set the source once, then animate batches of driving frames.
// Images are float32 NCHW in [0, 1] at the model's size (the export sidecar JSON says which).
#pragma once
#include <memory>
#include <string>

#include "ostnet/raw_io.h"

namespace ostnet {

class Runner {
 public:
  virtual ~Runner() = default;
  virtual void set_source(const HostTensor& source) = 0;      // (1, 3, S, S)
  virtual HostTensor animate(const HostTensor& driving) = 0;  // (N, 3, S, S) -> (N, 3, S, S)
};

#ifdef OSTNET_HAVE_AOTI
// dir holds source.pt2 and frame.pt2 from export/export_aoti.py; device "cpu" or "cuda".
std::unique_ptr<Runner> make_aoti_runner(const std::string& dir, const std::string& device);
#endif
#ifdef OSTNET_HAVE_TENSORRT
// dir holds source.engine and frame.engine from export/build_trt.py.
std::unique_ptr<Runner> make_trt_runner(const std::string& dir);
#endif

}  // namespace ostnet
