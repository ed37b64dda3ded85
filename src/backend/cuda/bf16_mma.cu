// Tensor-core bf16 linears of up to 256 rows (fragment order and batch invariance: bf16_mma.h).
#include "backend/cuda/bf16_mma.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/dev_util.cuh"
#include "backend/cuda/mma_util.cuh"
#include "backend/cuda/moe_fuse.cuh"
#include "backend/cuda/pdl.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "core/dtype.h"
#include "core/status.h"

namespace ds::cuda {

namespace {


constexpr int kWarps = 8;  // warps per block: (kWarps / KS) groups of 16 output columns × KS slices of K

struct Jobs {
  Bf16MmaSeg s[kBf16MmaSegs];
  unsigned bstart[kBf16MmaSegs + 1] = {};  // first block of each weight
  int n = 0;
  bool early = false;  // x_early (bf16_mma.h): the main loop before the PDL wait, only the epilogue after it
};

// v rounded to bf16 (the activation dtype the default compositions keep their intermediates in)
__device__ __forceinline__ float to_bf16(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

__device__ __forceinline__ uint32_t word(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}
__device__ __forceinline__ void mma_bf16(float c[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1) {
  const uint32_t a[4] = {a0, a1, a2, a3};
  mma16816(c, a, b0, b1);
}
// 16 bytes at p + off when input off of the row exists (K is a multiple of 8), else zeros (the tail chunk). FULL: K is
// a multiple of 64, so every chunk's inputs exist and no bound is tested.
template <bool FULL>
__device__ __forceinline__ uint4 ld16(const __nv_bfloat16* p, int64_t off, int64_t K) {
  if constexpr (FULL) return __ldg(reinterpret_cast<const uint4*>(p + off));
  else return off < K ? __ldg(reinterpret_cast<const uint4*>(p + off)) : make_uint4(0u, 0u, 0u, 0u);
}
// One chunk of weights: v[t][2·h + rr] = row g + 8·rr of tile t, inputs off + 32·h .. + 8 (off = 64·chunk + 8·t4).
template <bool FULL, int MW>
__device__ __forceinline__ void load_w(uint4 (&v)[MW][4], const __nv_bfloat16* const (&wr)[MW][2], bool two,
                                       int64_t off, int64_t K) {
#pragma unroll
  for (int t = 0; t < MW; ++t) {
    if (t == 1 && !two) break;
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) v[t][2 * h + rr] = ld16<FULL>(wr[t][rr], off + 32 * h, K);
  }
}
// One chunk of activations: v[nt][h] = token nt·8 + g, inputs off + 32·h .. + 8.
template <bool FULL, int NT>
__device__ __forceinline__ void load_x(uint4 (&v)[NT][2], const __nv_bfloat16* const (&xr)[NT], int64_t off,
                                       int64_t K) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int h = 0; h < 2; ++h) v[nt][h] = ld16<FULL>(xr[nt], off + 32 * h, K);
}

// Output column n (of rows), token p: the segment's epilogue. v0: the row's sum (SwiGLU: the gate row's), v1: the
// up row's sum.
__device__ __forceinline__ void emit(const Bf16MmaSeg& S, int64_t n, int64_t p, float v0, float v1) {
  const int64_t o = p * S.rows + n;
  if (S.mode == 0) stf(S.y, S.ydt, o, v0);
  else if (S.mode == 1) stf(S.y, S.ydt, o, silu_f(to_bf16(v0)) * to_bf16(v1));
  else {  // 2: onto y as it is; 3: onto the routed experts' sum as moe_experts would have stored it in y
    const float base =
        S.mode == 2 ? ldf(S.y, S.ydt, o) : round_dt(moe_routed_sum(S.moe_out, S.moe_w, S.moe_k, S.rows, p, n), S.ydt);
    stf(S.y, S.ydt, o, base + sigmoid_f(ldf(S.gate, S.gdt, p)) * to_bf16(v0));
  }
}

// Block: kWarps warps = WM groups of 16 output columns × KS slices (warp = group·KS + slice); blockIdx.y: tokens
// [8·NT·y, +8·NT). Each warp computes its columns (MW = 2: also the matching up rows of a SwiGLU weight) for 8·NT
// tokens over its slice, U chunks of 64 inputs in flight; the slices' partials meet in shared memory and are added
// in slice order, then the block's threads run the epilogue.
template <int NT, int MW, int KS, bool FULL>
__global__ void __launch_bounds__(kWarps * 32, 1)
    k_bf16_mma(const Jobs J, const __nv_bfloat16* __restrict__ x, int M, int64_t K) {
  constexpr int WM = kWarps / KS, U = NT == 1 ? 4 : 2;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wk = warp % KS, wm = warp / KS;
  const int g = lane >> 2, t4 = lane & 3;
  int si = 0;
  while (blockIdx.x >= J.bstart[si + 1]) ++si;
  const Bf16MmaSeg& S = J.s[si];
  const int64_t rows = S.rows, tg0 = int64_t(blockIdx.x - J.bstart[si]) * WM, tg = tg0 + wm;
  const bool two = MW == 2 && S.mode == 1, live = tg * 16 < rows;
  // Weight rows g and g + 8 of this warp's 16 columns (clamped past the end: computed, never stored); SwiGLU: the up
  // rows at + rows.
  const __nv_bfloat16* const w = static_cast<const __nv_bfloat16*>(S.w);
  const __nv_bfloat16* wr[MW][2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int64_t r = tg * 16 + g + 8 * rr < rows ? tg * 16 + g + 8 * rr : rows - 1;
    wr[0][rr] = w + r * K;
    if constexpr (MW == 2) wr[1][rr] = w + (two ? r + rows : r) * K;
  }
  const int64_t KC = (K + 63) / 64, cps = KC / KS, cb = wk * cps, ce = cb + cps;
  const int64_t t0 = int64_t(blockIdx.y) * 8 * NT;
  const int cnt = M - t0 < 8 * NT ? int(M - t0) : 8 * NT;

  uint4 wv[U][MW][4], xv[U][NT][2];
  float part[MW][NT][4];
#pragma unroll
  for (int t = 0; t < MW; ++t)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) part[t][nt][c] = 0.f;
  // Weights are never written by kernels: the first chunks' loads go out before waiting for the previous kernel.
  if (live) {
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (cb + u < ce) load_w<FULL, MW>(wv[u], wr, two, (cb + u) * 64 + 8 * t4, K);
  }
  if (!J.early) {
    pdl_wait();  // launched with pdl_launch: x and y belong to earlier kernels
    pdl_trigger();
  }
  if (live) {
    // Token nt·8 + g of the block (padding lanes read token 0: their columns are never stored).
    const __nv_bfloat16* xr[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) xr[nt] = x + (t0 + (nt * 8 + g < cnt ? nt * 8 + g : 0)) * K;
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (cb + u < ce) load_x<FULL, NT>(xv[u], xr, (cb + u) * 64 + 8 * t4, K);
    for (int64_t c0 = cb; c0 < ce; c0 += U) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t c = c0 + u;
        if (c >= ce) break;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int h = j >> 1, q = 2 * (j & 1);
#pragma unroll
          for (int t = 0; t < MW; ++t) {
            if (t == 1 && !two) break;
            const uint4 &lo = wv[u][t][2 * h], &hi = wv[u][t][2 * h + 1];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
              mma_bf16(part[t][nt], word(lo, q), word(hi, q), word(lo, q + 1), word(hi, q + 1), word(xv[u][nt][h], q),
                       word(xv[u][nt][h], q + 1));
          }
        }
        if (c + U < ce) {  // refill this slot with the chunk U ahead
          load_w<FULL, MW>(wv[u], wr, two, (c + U) * 64 + 8 * t4, K);
          load_x<FULL, NT>(xv[u], xr, (c + U) * 64 + 8 * t4, K);
        }
      }
    }
  }

  if (J.early) {  // x was complete when this grid started (bf16_mma.h); the epilogue reads and writes the rest
    pdl_wait();
    pdl_trigger();
  }
  // C fragment: part[t][nt][2·rr + hh] is (column g + 8·rr, token nt·8 + 2·t4 + hh).
  if constexpr (KS == 1) {
    if (!live) return;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int64_t n = tg * 16 + g + 8 * (c >> 1);
        const int ti = nt * 8 + 2 * t4 + (c & 1);
        if (n < rows && ti < cnt) emit(S, n, t0 + ti, part[0][nt][c], MW == 2 ? part[MW - 1][nt][c] : 0.f);
      }
  } else {
    __shared__ float red[kWarps][MW][NT][4][32];
#pragma unroll
    for (int t = 0; t < MW; ++t)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) red[warp][t][nt][c][lane] = part[t][nt][c];
    __syncthreads();
    for (int e = threadIdx.x; e < WM * NT * 128; e += kWarps * 32) {
      const int gm = e / (NT * 128), nt = (e / 128) % NT, c = (e / 32) % 4, ln = e % 32;
      const int64_t n = (tg0 + gm) * 16 + (ln >> 2) + 8 * (c >> 1);
      const int ti = nt * 8 + 2 * (ln & 3) + (c & 1);
      if (n >= rows || ti >= cnt) continue;
      float v0 = red[gm * KS][0][nt][c][ln], v1 = red[gm * KS][MW - 1][nt][c][ln];
#pragma unroll
      for (int k = 1; k < KS; ++k) {  // slice order
        v0 += red[gm * KS + k][0][nt][c][ln];
        if (MW == 2) v1 += red[gm * KS + k][MW - 1][nt][c][ln];
      }
      emit(S, n, t0 + ti, v0, v1);
    }
  }
}

// K a multiple of 64 (every model linear of the 35B-A3B): the kernel without the tail chunk's bound tests (session 37,
// H200: own µs per launch, the MoE block's router + shared gate_up at batch 1 2.90 → 2.63, at batch 64 5.72 → 5.03).
template <int NT, int MW, int KS>
void launch3(const Jobs& J, dim3 grid, const void* x, int64_t M, int64_t K, cudaStream_t s) {
  auto* k = K % 64 == 0 ? k_bf16_mma<NT, MW, KS, true> : k_bf16_mma<NT, MW, KS, false>;
  DS_CUDA_CHECK(pdl_launch(k, grid, dim3(kWarps * 32), 0, s, J, static_cast<const __nv_bfloat16*>(x), int(M), K));
}
template <int NT, int MW>
void launch2(int ks, const Jobs& J, dim3 grid, const void* x, int64_t M, int64_t K, cudaStream_t s) {
  switch (ks) {
    case 8: return launch3<NT, MW, 8>(J, grid, x, M, K, s);
    case 4: return launch3<NT, MW, 4>(J, grid, x, M, K, s);
    case 2: return launch3<NT, MW, 2>(J, grid, x, M, K, s);
    default: return launch3<NT, MW, 1>(J, grid, x, M, K, s);
  }
}
template <int NT>
void launch1(int mw, int ks, const Jobs& J, dim3 grid, const void* x, int64_t M, int64_t K, cudaStream_t s) {
  if (mw == 2) return launch2<NT, 2>(ks, J, grid, x, M, K, s);
  launch2<NT, 1>(ks, J, grid, x, M, K, s);
}

}  // namespace

int bf16_mma_slices(int64_t K) {
  const int64_t KC = (K + 63) / 64;
  for (int ks : {8, 4, 2})
    if (KC % ks == 0 && KC / ks >= 2) return ks;
  return 1;
}

bool bf16_mma_supported(int64_t K, const void* w, const void* x) {
  auto al = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return K > 0 && K % 8 == 0 && al(w) && al(x);
}

void bf16_mma_linear(const Bf16MmaSeg* segs, int n, const void* x, int64_t M, int64_t K, cudaStream_t s,
                     bool x_early) {
  if (M == 0 || n == 0) return;
  DS_CHECK(M <= kBf16MmaMaxM, "bf16 mma: ", M, " rows (at most ", kBf16MmaMaxM, ")");
  const int ks = bf16_mma_slices(K), wm = kWarps / ks;
  // Tokens per block: 8 for decode-sized steps, up to 32 (more per block reads each weight fewer times, but holds
  // more registers). Where each warp's K slice is at most 2 chunks (the shared expert's down projection, K = 512),
  // 16: twice the blocks for a short loop (batch 64: 7.4 → 5.3 µs per launch, H200, session 15; the MoE group at
  // K = 2048 is faster with 32: 6.1 against 9.0 µs). Any choice gives the same bits (bf16_mma.h).
  const int nt = M <= 8 ? 1 : M <= 16 || (K + 63) / 64 / ks <= 2 ? 2 : 4;
  for (int i0 = 0; i0 < n; i0 += kBf16MmaSegs) {
    Jobs J;
    J.early = x_early;
    int mw = 1;
    for (int i = i0; i < std::min(n, i0 + kBf16MmaSegs); ++i) {
      const Bf16MmaSeg& g = segs[i];
      DS_CHECK(g.rows >= 1 && (g.mode < 2 || g.gate) && (g.mode != 3 || (g.moe_out && g.moe_w && g.moe_k > 0)),
               "bf16 mma: bad segment");
      J.s[J.n] = g;
      J.bstart[J.n + 1] = J.bstart[J.n] + unsigned(((g.rows + 15) / 16 + wm - 1) / wm);
      if (g.mode == 1) mw = 2;
      ++J.n;
    }
    for (int i = J.n + 1; i <= kBf16MmaSegs; ++i) J.bstart[i] = J.bstart[J.n];
    const dim3 grid(J.bstart[J.n], unsigned((M + 8 * nt - 1) / (8 * nt)));
    if (nt == 1) launch1<1>(mw, ks, J, grid, x, M, K, s);
    else if (nt == 2) launch1<2>(mw, ks, J, grid, x, M, K, s);
    else launch1<4>(mw, ks, J, grid, x, M, K, s);
  }
}

}  // namespace ds::cuda
