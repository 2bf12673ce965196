#include "ostnet/raw_io.h"

#include <cstring>
#include <fstream>
#include <stdexcept>

namespace ostnet {

int64_t HostTensor::numel() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

HostTensor read_tensor(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open tensor file: " + path);
  char magic[4];
  uint32_t rank = 0;
  f.read(magic, 4);
  f.read(reinterpret_cast<char*>(&rank), sizeof(rank));
  if (!f || std::memcmp(magic, "OSTT", 4) != 0 || rank > 8)
    throw std::runtime_error("not an OSTT tensor file: " + path);
  HostTensor t;
  t.shape.resize(rank);
  f.read(reinterpret_cast<char*>(t.shape.data()), rank * sizeof(int64_t));
  t.data.resize(static_cast<size_t>(t.numel()));
  f.read(reinterpret_cast<char*>(t.data.data()), t.data.size() * sizeof(float));
  if (!f) throw std::runtime_error("truncated tensor file: " + path);
  return t;
}

void write_tensor(const std::string& path, const HostTensor& t) {
  std::ofstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot write tensor file: " + path);
  uint32_t rank = static_cast<uint32_t>(t.shape.size());
  f.write("OSTT", 4);
  f.write(reinterpret_cast<const char*>(&rank), sizeof(rank));
  f.write(reinterpret_cast<const char*>(t.shape.data()), rank * sizeof(int64_t));
  f.write(reinterpret_cast<const char*>(t.data.data()), t.data.size() * sizeof(float));
  if (!f) throw std::runtime_error("failed writing tensor file: " + path);
}

}  // namespace ostnet
