// Helpers for tests against the reference fixtures in tests/data (see tests/data/README.md).
#pragma once
#include <sys/wait.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
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

// The error transformers' bf16 run shows against its fp32 run on golden tensor `name` of `variant` ("V.bf16ref.name"
// against "V.fp32.name"): over all rows, or row `step` (V columns) of a decode's gen_logits. Where the bf16ref tensors
// were trimmed from the file (tests/data/README.md), from `bf16err` (the fixture's bf16ref-errors.json "errors").
inline double bf16_ref_error(const Golden& g, const nlohmann::json& bf16err, const std::string& variant,
                             const std::string& name, int64_t V, int step = -1) {
  const std::string ref = variant + ".fp32." + name, bf = variant + ".bf16ref." + name;
  if (g.has(bf)) {
    auto a = g.f32(bf), b = g.f32(ref);
    if (step < 0) return rel_l2(a, b);
    return rel_l2(a.data() + step * V, b.data() + step * V, size_t(V));
  }
  auto& e = bf16err.at(bf);
  return step < 0 ? e.at("all_rows").get<double>() : e.at("per_step").at(step).get<double>();
}

#ifdef DS_BINARY
struct CommandResult {
  int code;         // exit status; 128 + signal number if it was killed
  std::string out;  // stdout (and stderr when merged)
};
// Runs the deltaserve binary with `args` (shell syntax: redirections allowed) and collects its output.
inline CommandResult run_binary(const std::string& args, bool merge_stderr = true) {
  std::string cmd = std::string(DS_BINARY) + " " + args + (merge_stderr ? " 2>&1" : "");
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  int st = pclose(p);
  return {WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st), out};
}
#endif

}  // namespace ds::test
