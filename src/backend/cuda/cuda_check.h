// Host-side error checks shared by the CUDA backend's files: a failed CUDA runtime call becomes a ds::Error naming
// the CUDA error, the place and the call. Also the device's SM count, which several launch heuristics size by.
#pragma once

#include <cuda_runtime.h>

#include "core/status.h"

#define DS_CUDA_CHECK(x)                                                                                   \
  do {                                                                                                     \
    cudaError_t e_ = (x);                                                                                  \
    if (e_ != cudaSuccess)                                                                                 \
      ::ds::fail("CUDA error ", cudaGetErrorString(e_), " at ", __FILE__, ":", __LINE__, ": " #x);         \
  } while (0)
// After a kernel launch: the launch's own error (bad configuration, too many resources).
#define DS_CUDA_CHECK_LAST() DS_CUDA_CHECK(cudaGetLastError())

namespace ds::cuda {
// Streaming multiprocessors of the current device, read once per process (132 if the query fails).
inline int device_sm_count() {
  static const int sms = [] {
    int dev = 0, n = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0)
      n = 132;
    return n;
  }();
  return sms;
}
}  // namespace ds::cuda
