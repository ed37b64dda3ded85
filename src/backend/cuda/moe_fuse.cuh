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

// One selection round over the warp's 32·JN probabilities p (lane l holds those of experts l + 32·j): the largest
// (bv) and its expert (bi), ties to the lower expert; every lane gets both.
template <int JN>
__device__ __forceinline__ void moe_pick(const float (&p)[JN], int lane, float& bv, int& bi) {
  bv = -2.f;
  bi = 1 << 30;
#pragma unroll
  for (int j = 0; j < JN; ++j)
    if (p[j] > bv) {
      bv = p[j];
      bi = lane + 32 * j;
    }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ov > bv || (ov == bv && oi < bi)) {
      bv = ov;
      bi = oi;
    }
  }
}
// Router of token t, one warp (lane = this thread's lane): softmax over E ≤ 32·JN logits, top-K (ties to the lower
// index, as a stable sort), renormalised; ids[t·K + k], wts[t·K + k]. The warp's lanes must all call it. JN = the
// logits per lane: every loop (loads, softmax, K select rounds, knock-out) is JN long, so E = 256 takes 8 where a
// fixed 32 spent three quarters of each on predicated-off slots. Slots past E hold −∞ / 0 / −1 as before, so the
// max, the sum (adding +0) and the selection are the same bits for any JN ≥ E / 32.
// wreg (K ≤ 32; the one-warp table launch k_moe_route_tiles_w): lane k keeps round k's probability in a register and
// stores it divided by the sum, where otherwise lane 0 stores it each round and the lanes read it back (a dependent L2
// round trip); the same bits (session 24: batch 1 −0.012 to −0.017 ms, batch 4 −0.035, H200).
template <int JN>
__device__ __forceinline__ void moe_route_token_n(const void* logits, int ldt, int64_t t, int64_t E, int64_t K,
                                                  int32_t* ids, float* wts, int lane, bool wreg) {
  wreg = wreg && K <= 32;
  float myw = 0.f;
  float p[JN];
  float mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < JN; ++j) {
    int64_t e = lane + 32 * j;
    p[j] = e < E ? ldf(logits, ldt, t * E + e) : -INFINITY;
    mx = fmaxf(mx, p[j]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < JN; ++j) {
    int64_t e = lane + 32 * j;
    p[j] = e < E ? expf(p[j] - mx) : 0.f;
    sum += p[j];
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  // A NaN logit makes every probability NaN, which no round of moe_pick would take (its ids would be 1 << 30): as 0
  // they go to experts 0..K−1 with weights 0 / 0 = NaN, what moe_route_token_c gives (ids in range).
#pragma unroll
  for (int j = 0; j < JN; ++j) {
    const float q = p[j] / sum;
    p[j] = (lane + 32 * j) < E ? (q >= 0.f ? q : 0.f) : -1.f;
  }
  float tsum = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    float bv;
    int bi;
    moe_pick(p, lane, bv, bi);
    tsum += bv;
    if (wreg && lane == k) myw = bv;
    if (lane == 0) {
      ids[t * K + k] = bi;
      if (!wreg) wts[t * K + k] = bv;
    }
#pragma unroll
    for (int j = 0; j < JN; ++j)
      if (lane + 32 * j == bi) p[j] = -1.f;
  }
  if (wreg) {
    if (lane < K) wts[t * K + lane] = myw / tsum;
    return;
  }
  __syncwarp();
  for (int64_t k = lane; k < K; k += 32) wts[t * K + k] = wts[t * K + k] / tsum;
}
// E ≤ 1024: the shortest of 8, 16 or 32 logits per lane (warp-uniform branch).
__device__ __forceinline__ void moe_route_token(const void* logits, int ldt, int64_t t, int64_t E, int64_t K,
                                                int32_t* ids, float* wts, int lane, bool wreg = false) {
  if (E <= 256) return moe_route_token_n<8>(logits, ldt, t, E, K, ids, wts, lane, wreg);
  if (E <= 512) return moe_route_token_n<16>(logits, ldt, t, E, K, ids, wts, lane, wreg);
  moe_route_token_n<32>(logits, ldt, t, E, K, ids, wts, lane, wreg);
}

// The compact router of one token (session 24), for E ≤ 256 and top-KK (KK ≤ 32) with the logits' dtype a template
// parameter: moe_route_token_n<8>'s arithmetic (the same ids and weight bits) on a shorter instruction path — 32-bit
// indices, selects instead of branches around expf and the division, the rounds in one loop, the picks kept in
// registers. ncu on the generic form's one-warp launch (batch 1) found it stalled on instruction fetch for over half
// of its non-barrier samples: its kernel was 6,360 instructions (three logits-per-lane widths, three dtypes). Token t
// of logits [·, E]: lane k < KK stores pick k to ids[t·KK + k] and wts[t·KK + k] (weight renormalised over the KK
// picks) and returns its expert id. The picks run on warp reductions (session 39, below: the route launch's own time
// 3.67 → 2.68 µs at batch 1, 3.01 → 2.04 at batch 64, H200). A NaN logit makes every probability NaN; NaN keys as
// past E, so the picks are then experts 0..KK−1 with NaN weights — ids in range, where moe_pick picks none.
template <typename LT, int KK>
__device__ __forceinline__ int32_t moe_route_token_c(const LT* logits, int t, int E, int lane, int32_t* ids,
                                                     float* wts) {
  constexpr int JN = 8;
  const LT* lg = logits + size_t(t) * size_t(E);
  float p[JN], mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < JN; ++j) {
    const int e = lane + 32 * j;
    const float v = e < E ? to_f32(lg[e]) : -INFINITY;
    p[j] = v;
    mx = fmaxf(mx, v);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < JN; ++j) {
    const float ex = expf(p[j] - mx);
    p[j] = lane + 32 * j < E ? ex : 0.f;
    sum += p[j];
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
#pragma unroll
  for (int j = 0; j < JN; ++j) {
    const float q = p[j] / sum;
    p[j] = lane + 32 * j < E ? q : -1.f;
  }
  // The KK rounds of moe_pick (largest probability, ties to the lower expert) on warp reductions: each lane sorts its
  // own JN probabilities once (key descending, then expert ascending), so its best remaining one is always its first;
  // a round is the largest first key (__reduce_max_sync), the lowest expert holding it (__reduce_min_sync: a lane's
  // tied probabilities sit after its first in expert order, so the lowest tied expert is some lane's first), and the
  // winning lane's shift. Key: a probability's bits + 1 (non-negative floats order as their bits), 0 past E (where
  // moe_pick's −1 lost to every probability). Two single-instruction reductions per round where moe_pick walked JN
  // slots and ten dependent shuffles: the same picks and weights (CudaOps.MoeRouteTableDecode, ties included).
  static_assert(JN == 8, "the sorting network is 8 wide");
  uint32_t key[JN];
  int32_t ex[JN];
#pragma unroll
  for (int j = 0; j < JN; ++j) {
    key[j] = p[j] >= 0.f ? __float_as_uint(p[j]) + 1u : 0u;
    ex[j] = lane + 32 * j;
  }
  auto cas = [&](int a, int b) {  // a ← the earlier of the two (larger key, then lower expert), b ← the other
    const bool sw = key[b] > key[a] || (key[b] == key[a] && ex[b] < ex[a]);
    const uint32_t ka = sw ? key[b] : key[a], kb = sw ? key[a] : key[b];
    const int32_t ea = sw ? ex[b] : ex[a], eb = sw ? ex[a] : ex[b];
    key[a] = ka, key[b] = kb, ex[a] = ea, ex[b] = eb;
  };
  cas(0, 2), cas(1, 3), cas(4, 6), cas(5, 7);  // 19 comparators, depth 6 (checked by the 0-1 principle)
  cas(0, 4), cas(1, 5), cas(2, 6), cas(3, 7);
  cas(0, 1), cas(2, 3), cas(4, 5), cas(6, 7);
  cas(2, 4), cas(3, 5);
  cas(1, 4), cas(3, 6);
  cas(1, 2), cas(3, 4), cas(5, 6);
  float tsum = 0.f, w = 0.f;
  int32_t id = 0;
#pragma unroll
  for (int k = 0; k < KK; ++k) {
    const uint32_t m = __reduce_max_sync(0xffffffffu, key[0]);
    const int32_t bi = int32_t(__reduce_min_sync(0xffffffffu, key[0] == m ? uint32_t(ex[0]) : 0xffffffffu));
    const float bv = __uint_as_float(m - 1u);
    tsum += bv;
    if (lane == k) {
      w = bv;
      id = bi;
    }
    if (ex[0] == bi) {  // the winner's next one comes first
#pragma unroll
      for (int j = 0; j + 1 < JN; ++j) key[j] = key[j + 1], ex[j] = ex[j + 1];
      key[JN - 1] = 0u;
    }
  }
  if (lane < KK) {
    ids[t * KK + lane] = id;
    wts[t * KK + lane] = w / tsum;
  }
  return id;
}
// Whether moe_route_token_c serves E experts, top-k and logits of dtype ldt (host and device).
constexpr bool moe_route_c_fits(int64_t E, int64_t K, int ldt) {
  return E <= 256 && K == 8 && (ldt == kBF16 || ldt == kF32);
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
