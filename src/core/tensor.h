// A Tensor is a typed, shaped view of memory on one device, optionally owning it.
#pragma once
#include <cstdint>
#include <memory>
#include <numeric>
#include <vector>

#include "core/dtype.h"
#include "core/status.h"

namespace ds {

enum class Device : uint8_t { CPU, CUDA };

struct Tensor {
  void* data = nullptr;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;  // outermost first
  Device device = Device::CPU;
  std::shared_ptr<void> owner;  // keeps the allocation alive; empty for borrowed views

  int64_t numel() const {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
  int64_t dim(int i) const { return shape[i < 0 ? shape.size() + i : i]; }
  int ndim() const { return int(shape.size()); }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype); }
  bool defined() const { return data != nullptr || numel() == 0; }
  template <typename T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
  // Same memory, new shape with the same element count.
  Tensor view(std::vector<int64_t> s) const {
    Tensor t = *this;
    int64_t n = 1;
    for (auto d : s) n *= d;
    DS_CHECK(n == numel(), "view ", shape_str(s), " of tensor ", shape_str(shape));
    t.shape = std::move(s);
    return t;
  }
  // Rows [r0, r1) of the outermost dimension (contiguous).
  Tensor rows(int64_t r0, int64_t r1) const {
    Tensor t = *this;
    int64_t inner = shape.empty() ? 1 : numel() / shape[0];
    t.data = static_cast<char*>(data) + size_t(r0 * inner) * dtype_size(dtype);
    t.shape[0] = r1 - r0;
    return t;
  }
};

}  // namespace ds
