// Device probes (probe.h).
#include "backend/cuda/probe.h"

#include "backend/cuda/cuda_check.h"

namespace ds::cuda {
namespace {

__global__ void __launch_bounds__(256) k_read_stream(const uint4* __restrict__ p, int64_t n, uint32_t* sink) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  uint32_t acc = 0;
  int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = __ldg(p + i + u * stride);
#pragma unroll
    for (int u = 0; u < 4; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n; i += stride) {
    const uint4 v = __ldg(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) *sink = acc;
}

}  // namespace

void read_stream(const void* p, int64_t bytes, uint32_t* sink, int blocks, cudaStream_t s) {
  if (blocks <= 0) blocks = 8 * device_sm_count();
  k_read_stream<<<blocks, 256, 0, s>>>(static_cast<const uint4*>(p), bytes / 16, sink);
  DS_CUDA_CHECK(cudaGetLastError());
}

}  // namespace ds::cuda
