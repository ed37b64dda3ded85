// int4 (mma layout) → row-major bf16 (int4_dequant.h).
#include "backend/cuda/int4_dequant.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/int4_mma_dev.cuh"

#include <cuda_bf16.h>

#include "core/status.h"

namespace ds::cuda {

namespace {

// One thread per stored uint4 = (16-row tile mt, 64-input chunk kc, lane l): rows r0 = 16·mt + l/4 and r0 + 8,
// inputs kb0 = 64·kc + 16·(l%4) .. + 15 (one quantisation group: G is a multiple of 16). Word j holds inputs
// kb0 + 4j + {0..3}; nibble pos = half + 2·(off&2 ? 1 : 0) + 4·(off&1) for input offset off and row half (int4_mma.h).
__global__ void __launch_bounds__(256) k_int4_dequant(const uint4* __restrict__ qw, const uint16_t* __restrict__ sc,
                                                      const uint8_t* __restrict__ z, int64_t N, int64_t K, int G,
                                                      __nv_bfloat16* __restrict__ dst) {
  const int64_t KC = K / 64, n = (N / 16) * KC * 32;
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const int l = int(i & 31);
  const int64_t kc = (i >> 5) % KC, mt = (i >> 5) / KC;
  const int64_t r0 = 16 * mt + l / 4, kb0 = 64 * kc + 16 * (l % 4), ng = K / G, g = kb0 / G;
  const uint4 v = qw[i];
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t r = r0 + 8 * half;
    const float s = int4dev::sc_f(sc[r * ng + g]), zz = float(z[r * ng + g]);
    uint4 out[2];
    __nv_bfloat16* o = reinterpret_cast<__nv_bfloat16*>(out);
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int off = 0; off < 4; ++off) {
        const int pos = half + ((off & 2) ? 2 : 0) + ((off & 1) ? 4 : 0);
        const float q = float((words[j] >> (4 * pos)) & 0xFu);
        o[4 * j + off] = __float2bfloat16_rn((q - zz) * s);
      }
    uint4* d = reinterpret_cast<uint4*>(dst + r * K + kb0);
    d[0] = out[0];
    d[1] = out[1];
  }
}

}  // namespace

void int4_dequant_bf16(const MmaInt4& W, void* dst, cudaStream_t s) {
  DS_CHECK(W.N % 16 == 0 && W.K % 64 == 0 && W.G % 16 == 0 && W.K % W.G == 0, "int4 dequant: N ", W.N, ", K ", W.K,
           ", group ", W.G, " (expected N % 16, K % 64 and G % 16 zero)");
  const int64_t n = (W.N / 16) * (W.K / 64) * 32;
  if (n == 0) return;
  k_int4_dequant<<<unsigned((n + 255) / 256), 256, 0, s>>>(W.qw, W.sc, W.z, W.N, W.K, W.G,
                                                           static_cast<__nv_bfloat16*>(dst));
  DS_CUDA_CHECK_LAST();
}

}  // namespace ds::cuda
