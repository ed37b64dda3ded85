// Helpers for tests against the reference fixtures in tests/data (see tests/data/README.md).
#pragma once
#include <gtest/gtest.h>
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

// The four tiny checkpoints the golden suites run on, as "<fixture>/<variant>" parameters, and their gtest names
// ('/' and '-' become '_'): INSTANTIATE_TEST_SUITE_P(Tiny, Suite, tiny_checkpoints(), CheckpointName()).
inline auto tiny_checkpoints() {
  return ::testing::Values("tiny-moe/bf16", "tiny-moe/int4", "tiny-dense/bf16", "tiny-dense/int4");
}
struct CheckpointName {
  std::string operator()(const ::testing::TestParamInfo<std::string>& info) const {
    std::string s = info.param;
    for (auto& c : s)
      if (c == '/' || c == '-') c = '_';
    return s;
  }
};

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

// Our teacher-forced decode against the fp32 reference (`ours`, `ref`: steps × V logits), next to the error
// transformers' bf16 run shows (bf16_step(s): that run's error at step s). The bf16 run decodes its own greedy tokens,
// so once it picks another token its rows stop being comparable (its error jumps to ~1): the statistics cover the
// steps before that (n of them, bf16_step(s) < 0.5), statistic against statistic.
struct DecodeErrors {
  int n = 0, steps = 0;
  double rms = 0, rms_bf16 = 0;      // RMS over the comparable steps of our per-step rel L2, and of the bf16 run's
  double worst = 0, worst_bf16 = 0;  // the largest of each over the comparable steps
  double least_after_first = 1;      // our smallest over comparable steps 1.. (1 when there are none)
  double later = 0;                  // our largest over the steps after them (reported, not compared)
};
template <class Bf16Step>
DecodeErrors decode_errors(const std::vector<float>& ours, const std::vector<float>& ref, int64_t V,
                           Bf16Step bf16_step) {
  DecodeErrors d;
  d.steps = int(ref.size() / size_t(V));
  while (d.n < d.steps && bf16_step(d.n) < 0.5) ++d.n;
  double ss = 0, ssb = 0;
  for (int s = 0; s < d.steps; ++s) {
    const double e = rel_l2(ours.data() + s * V, ref.data() + s * V, size_t(V));
    if (s >= d.n) {
      d.later = std::max(d.later, e);
      continue;
    }
    const double b = bf16_step(s);
    ss += e * e, ssb += b * b;
    d.worst = std::max(d.worst, e), d.worst_bf16 = std::max(d.worst_bf16, b);
    if (s > 0) d.least_after_first = std::min(d.least_after_first, e);
  }
  d.rms = std::sqrt(ss / std::max(d.n, 1)), d.rms_bf16 = std::sqrt(ssb / std::max(d.n, 1));
  return d;
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
