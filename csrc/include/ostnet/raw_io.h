// Raw float32 tensor files: the simplest interchange with a Python or video front end.
// Layout: "OSTT" + uint32 rank + rank x int64 dims (little-endian), then float32 data in C order.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace ostnet {

struct HostTensor {
  std::vector<int64_t> shape;
  std::vector<float> data;
  int64_t numel() const;
};

HostTensor read_tensor(const std::string& path);  // throws std::runtime_error naming the path
void write_tensor(const std::string& path, const HostTensor& t);

}  // namespace ostnet
