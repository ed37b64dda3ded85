// Helpers for the CUDA backend tests: skip without a GPU, mirrored CPU/CUDA tensors, bf16-exact random data.
#pragma once
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <cstdio>
#include <memory>
#include <random>
#include <vector>

#include "backend/ops.h"
#include "core/dtype.h"

namespace ds::test {

// The fixtures folder: $DS_TEST_DATA_DIR when set (binaries carried to another machine), else the build's.
inline std::string cuda_data_dir() {
  const char* e = std::getenv("DS_TEST_DATA_DIR");
  return e && *e ? e : DS_TEST_DATA_DIR;
}

inline bool have_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}
#define DS_REQUIRE_GPU() \
  if (!::ds::test::have_gpu()) GTEST_SKIP() << "no CUDA device"

// ‖a − b‖₂ / ‖b‖₂ (b is the reference)
inline double rel(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    double d = double(a[i]) - b[i];
    num += d * d;
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

// Values already rounded to bf16, so both backends see exactly the same inputs.
inline std::vector<float> randn(size_t n, float scale, uint64_t seed, float mean = 0.f) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d(mean, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = bf16_to_f32(f32_to_bf16(d(g)));
  return v;
}

// Sets an environment variable for a scope (kernel choices read on every call).
struct ScopedEnv {
  std::string name, old;
  bool had;
  ScopedEnv(const char* n, const char* v) : name(n) {
    const char* o = std::getenv(n);
    had = o != nullptr;
    if (had) old = o;
    if (v)
      setenv(n, v, 1);
    else
      unsetenv(n);
  }
  ~ScopedEnv() {
    if (had)
      setenv(name.c_str(), old.c_str(), 1);
    else
      unsetenv(name.c_str());
  }
};

struct Pair {
  Tensor c, g;  // CPU (fp32) and CUDA
};

struct Both {
  std::unique_ptr<Backend> cpu = make_cpu_backend();
  std::unique_ptr<Backend> gpu = make_cuda_backend(0);

  // act-dtype tensors (F32 on CPU, BF16 on CUDA) unless `dt` says F32 / I32 for both
  Pair up(const std::vector<float>& v, std::vector<int64_t> shape, DType dt = DType::BF16) {
    Pair p;
    if (dt == DType::I32) {
      p.c = cpu->alloc(DType::I32, shape);
      for (size_t i = 0; i < v.size(); ++i) p.c.ptr<int32_t>()[i] = int32_t(v[i]);
    } else {
      p.c = cpu->upload_f32(v, shape, DType::F32);
    }
    p.g = gpu->upload_f32(v, shape, dt);
    return p;
  }
  Pair zeros(std::vector<int64_t> shape, DType dt = DType::BF16) {
    Pair p;
    p.c = cpu->alloc(dt == DType::BF16 ? DType::F32 : dt, shape);
    p.g = gpu->alloc(dt, shape);
    return p;
  }
  // CUDA vs CPU
  double err(const Pair& p) { return rel(gpu->to_host_f32(p.g), cpu->to_host_f32(p.c)); }
};

}  // namespace ds::test
