// Device pieces of the MoE FFN shared by its unfused kernels (cuda_backend.cu: k_moe_route, k_moe_combine) and the
// fused ones (int4_mma.cu: k_moe_route_tiles; bf16_mma.cu: the routed sum in the shared expert's gated add), so the
// fused and unfused forms are the same code and give the same bits.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/dev_util.cuh"
#include "core/dtype.h"

namespace ds::cuda {

// Router of token t, one warp (lane = this thread's lane): softmax over E ≤ 1024 logits, top-K (ties to the lower
// index, as a stable sort), renormalised; ids[t·K + k], wts[t·K + k]. The warp's lanes must all call it.
__device__ __forceinline__ void moe_route_token(const void* logits, int ldt, int64_t t, int64_t E, int64_t K,
                                                int32_t* ids, float* wts, int lane) {
  float p[32];
  float mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    int64_t e = lane + 32 * j;
    p[j] = e < E ? ldf(logits, ldt, t * E + e) : -INFINITY;
    mx = fmaxf(mx, p[j]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    int64_t e = lane + 32 * j;
    p[j] = e < E ? expf(p[j] - mx) : 0.f;
    sum += p[j];
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
#pragma unroll
  for (int j = 0; j < 32; ++j) p[j] = (lane + 32 * j) < E ? p[j] / sum : -1.f;
  float tsum = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    float bv = -2.f;
    int bi = 1 << 30;
#pragma unroll
    for (int j = 0; j < 32; ++j)
      if (p[j] > bv) {
        bv = p[j];
        bi = lane + 32 * j;
      }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (ov > bv || (ov == bv && oi < bi)) {
        bv = ov;
        bi = oi;
      }
    }
    tsum += bv;
    if (lane == 0) {
      ids[t * K + k] = bi;
      wts[t * K + k] = bv;
    }
#pragma unroll
    for (int j = 0; j < 32; ++j)
      if (lane + 32 * j == bi) p[j] = -1.f;
  }
  __syncwarp();
  for (int64_t k = lane; k < K; k += 32) wts[t * K + k] = wts[t * K + k] / tsum;
}

// The routed experts' weighted sum for token t, output column d: Σ_k wts[t, k] · out[t·K + k, d] in k order, fp32
// (out [T·K, H] fp32, the experts' outputs per (token, k) pair).
__device__ __forceinline__ float moe_routed_sum(const float* out, const float* wts, int64_t K, int64_t H, int64_t t,
                                                int64_t d) {
  float acc = 0.f;
#pragma unroll 8  // the loads of 8 pairs in flight; the sum stays in k order
  for (int64_t k = 0; k < K; ++k) acc += wts[t * K + k] * out[(t * K + k) * H + d];
  return acc;
}

}  // namespace ds::cuda
