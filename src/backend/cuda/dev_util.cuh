// Small device helpers shared by the backend's kernel files: dtype-dispatched element loads and stores (values of
// ds::DType), the activation functions in the forms the CPU twin's results are compared against, warp and block sums.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "core/dtype.h"

namespace ds::cuda {

// Sends the line holding p toward L2 (no register, nothing waits for it): loads before a PDL wait of data no kernel of
// the step writes.
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// dtype codes used inside kernels (values of ds::DType)
constexpr int kF32 = int(DType::F32), kBF16 = int(DType::BF16);

__device__ __forceinline__ float ldf(const void* p, int dt, int64_t i) {
  if (dt == kBF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  if (dt == kF32) return static_cast<const float*>(p)[i];
  return __half2float(static_cast<const __half*>(p)[i]);
}
__device__ __forceinline__ void stf(void* p, int dt, int64_t i, float v) {
  if (dt == kBF16) static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  else if (dt == kF32) static_cast<float*>(p)[i] = v;
  else static_cast<__half*>(p)[i] = __float2half_rn(v);
}
// v as stored in dtype dt and read back (stf then ldf)
__device__ __forceinline__ float round_dt(float v, int dt) {
  if (dt == kBF16) return __bfloat162float(__float2bfloat16_rn(v));
  if (dt == kF32) return v;
  return __half2float(__float2half_rn(v));
}
// A bf16 or fp32 element (T = __nv_bfloat16 or float, a kernel's template parameter) to fp32 and back (round to
// nearest): the typed kernels' counterparts of ldf / stf, with no dtype branch.
template <typename T>
__device__ __forceinline__ float to_f32(T v) {
  if constexpr (sizeof(T) == 2) return __bfloat162float(v);
  else return v;
}
template <typename T>
__device__ __forceinline__ T from_f32(float v) {
  if constexpr (sizeof(T) == 2) return __float2bfloat16_rn(v);
  else return v;
}
// ldf / stf / round_dt with the dtype a type (DT = __nv_bfloat16 or float) or, with DT = void, the runtime code dt:
// a kernel templated on DT has no dtype branches around its loads and stores (session 24: a small kernel's code size
// is fetch time).
template <typename DT>
__device__ __forceinline__ float ldx(const void* p, int dt, int64_t i) {
  if constexpr (std::is_void_v<DT>) return ldf(p, dt, i);
  else return to_f32(static_cast<const DT*>(p)[i]);
}
template <typename DT>
__device__ __forceinline__ void stx(void* p, int dt, int64_t i, float v) {
  if constexpr (std::is_void_v<DT>) stf(p, dt, i, v);
  else static_cast<DT*>(p)[i] = from_f32<DT>(v);
}
template <typename DT>
__device__ __forceinline__ float roundx(float v, int dt) {
  if constexpr (std::is_void_v<DT>) return round_dt(v, dt);
  else return to_f32(from_f32<DT>(v));
}
__device__ __forceinline__ float silu_f(float x) { return x / (1.f + expf(-x)); }
__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + expf(-x)); }
__device__ __forceinline__ float softplus_f(float x) { return x > 20.f ? x : log1pf(expf(x)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, ≤ 1024); every thread gets the result, formed in one order (warp
// sums, then warp 0 over them). Safe to call twice in a row: the first __syncthreads orders this call's writes after
// every thread read the previous result.
__device__ inline float block_sum(float v) {
  __shared__ float red[32];
  __shared__ float total;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) red[w] = v;
  __syncthreads();
  if (w == 0) {
    float s = lane < int(blockDim.x >> 5) ? red[lane] : 0.f;
    s = warp_sum(s);
    if (lane == 0) total = s;
  }
  __syncthreads();
  return total;
}

}  // namespace ds::cuda
