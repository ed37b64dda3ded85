// Helpers for tests against the reference fixtures in tests/data (see tests/data/README.md).
#pragma once
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "io/safetensors.h"

namespace ds::test {

inline std::string data_dir() { return DS_TEST_DATA_DIR; }

inline nlohmann::json read_json(const std::string& path) {
  std::ifstream f(path);
  return nlohmann::json::parse(f);
}

// Golden tensors of one safetensors file, as fp32.
class Golden {
 public:
  explicit Golden(const std::string& path) : file_(path) {}
  bool has(const std::string& name) const {
    for (auto& t : file_.header().tensors)
      if (t.name == name) return true;
    return false;
  }
  std::vector<float> f32(const std::string& name, std::vector<int64_t>* shape = nullptr) const {
    for (auto& t : file_.header().tensors) {
      if (t.name != name) continue;
      if (shape) *shape = t.shape;
      std::vector<float> v(size_t(t.numel()));
      for (size_t i = 0; i < v.size(); ++i) {
        if (t.dtype == DType::F32) std::memcpy(&v[i], t.data + 4 * i, 4);
        else if (t.dtype == DType::I64) {
          int64_t x;
          std::memcpy(&x, t.data + 8 * i, 8);
          v[i] = float(x);
        }
      }
      return v;
    }
    throw std::runtime_error("golden tensor missing: " + name);
  }

 private:
  io::SafetensorsFile file_;
};

// ‖a − b‖₂ / ‖b‖₂
inline double rel_l2(const float* a, const float* b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    double d = double(a[i]) - b[i];
    num += d * d;
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}
inline double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  return rel_l2(a.data(), b.data(), a.size());
}

}  // namespace ds::test
