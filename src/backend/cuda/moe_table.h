// The order of the pairs inside an expert in the one-warp tile table (int4_mma.cu, moe_tiles_warp): by expert, then
// by pair. Host and device.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define DS_HD __host__ __device__
#else
#define DS_HD
#endif

namespace ds::cuda {

// Whether pair q (of expert eq) sorts before pair p (of expert ep): by expert, then by pair.
DS_HD inline bool moe_pair_before(int32_t eq, int q, int32_t ep, int p) { return eq < ep || (eq == ep && q < p); }

}  // namespace ds::cuda

#undef DS_HD
