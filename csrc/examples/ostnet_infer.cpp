// ostnet_infer: run OSTNet from C++ on raw tensor files (see include/ostnet/raw_io.h).
//
//   ostnet_infer --backend aoti|trt --model DIR --source source.ostt --driving frames.ostt --out out.ostt
//                [--device cpu|cuda] [--batch N]
//
// The source is set once; the driving frames (N, 3, S, S) are animated in batches of --batch.
#include <cstdlib>
#include <iostream>
#include <string>

#include "ostnet/runner.h"

namespace {

void usage() {
  std::cerr << "usage: ostnet_infer --backend aoti|trt --model DIR --source FILE --driving FILE --out FILE"
               " [--device cpu|cuda] [--batch N]\n";
}

}  // namespace

int main(int argc, char** argv) {
  std::string backend, model, source, driving, out, device = "cuda";
  int64_t batch = 8;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) { usage(); std::exit(2); }
      return argv[++i];
    };
    if (a == "--backend") backend = next();
    else if (a == "--model") model = next();
    else if (a == "--source") source = next();
    else if (a == "--driving") driving = next();
    else if (a == "--out") out = next();
    else if (a == "--device") device = next();
    else if (a == "--batch") batch = std::stoll(next());
    else { usage(); return 2; }
  }
  if (backend.empty() || model.empty() || source.empty() || driving.empty() || out.empty() || batch < 1) {
    usage();
    return 2;
  }
  try {
    std::unique_ptr<ostnet::Runner> runner;
#ifdef OSTNET_HAVE_AOTI
    if (backend == "aoti") runner = ostnet::make_aoti_runner(model, device);
#endif
#ifdef OSTNET_HAVE_TENSORRT
    if (backend == "trt") runner = ostnet::make_trt_runner(model);
#endif
    if (!runner) {
      std::cerr << "ostnet_infer: backend '" << backend << "' was not built into this binary\n";
      return 2;
    }
    runner->set_source(ostnet::read_tensor(source));
    auto frames = ostnet::read_tensor(driving);
    if (frames.shape.size() != 4) throw std::runtime_error("driving frames must be (N, 3, S, S)");
    const int64_t n = frames.shape[0], per = frames.numel() / n;
    ostnet::HostTensor result;
    for (int64_t start = 0; start < n; start += batch) {
      int64_t count = std::min(batch, n - start);
      ostnet::HostTensor chunk;
      chunk.shape = {count, frames.shape[1], frames.shape[2], frames.shape[3]};
      chunk.data.assign(frames.data.begin() + start * per, frames.data.begin() + (start + count) * per);
      auto y = runner->animate(chunk);
      if (result.shape.empty()) result.shape = {0, y.shape[1], y.shape[2], y.shape[3]};
      result.shape[0] += y.shape[0];
      result.data.insert(result.data.end(), y.data.begin(), y.data.end());
    }
    ostnet::write_tensor(out, result);
    std::cout << "ostnet_infer: " << n << " frames -> " << out << "\n";
  } catch (const std::exception& e) {
    std::cerr << "ostnet_infer: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
