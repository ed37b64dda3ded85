// Tensor-core W4A16 kernels: int4 linears of any M and the routed experts (layout and invariants: int4_mma.h).
#include "backend/cuda/int4_mma.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/int4_gemm.h"
#include "backend/cuda/int4_mma_dev.cuh"
#include "backend/cuda/int4_wg.h"
#include "backend/cuda/moe_fuse.cuh"
#include "backend/cuda/moe_table.h"
#include "backend/cuda/pdl.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <cstdlib>
#include <type_traits>

#include "core/dtype.h"
#include "core/env.h"
#include "core/status.h"

namespace ds::cuda {

namespace {

using namespace int4dev;


constexpr int kWarps = 4;  // warps per block

// One block = 4 warps. Each warp computes MT output tiles of 16 rows (GATED: MT gate tiles and the matching up
// tiles) × NT token tiles of 8, over the K slices s ≡ wk (mod WK); the block's 4 / WK warp groups take
// consecutive output tiles. With WK > 1 the slices' partials meet in shared memory and are added in slice order,
// which is also the order a WK = 1 warp adds them in (batch invariance, int4_mma.h).
// Output: GATED → bf16 silu(gate)·up at [p, n]; else y[p, n] of dtype ydt (F32 or BF16); row stride n_out.
// UNR: groups per loop body, 2 for the decode and medium dense shapes (the next group's loads in flight with the
// current one's), 1 for the large shapes (their accumulators leave no registers for it).
// C3: the third matrix (Int4Pair::c) compiled in; false for the dense two-tile decode launches of two matrices.
// The kernel's body, a device function under the __global__ k_int4_mma below (session 23, for a variant capped by
// __maxnreg__ that lost; kept because ptxas allocates several instantiations a few registers fewer this way — the
// experts' one-tile down projection 112 → 104, the medium 1 × 4 tile 176 → 168 — and the step measured no slower,
// batch 64 a little faster: bench/RESULTS.md session 23, run 6).
template <int MT, int NT, int WK, int CPG, bool GATED, int UNR, bool C3>
__device__ __forceinline__ void int4_mma_body(const Int4Pair& P, const __nv_bfloat16* __restrict__ x, TokenSrc ts) {
  // Blocks [0, P.b_block) compute matrix a, [P.b_block, P.c_block) matrix b, the rest matrix c (up to three linears
  // of one input in one launch).
  // (No third matrix in the gated kernels and the experts' two-tile down projection: fewer registers there.)
  constexpr bool kThree = C3 && !GATED && !(MT == 2 && NT == 1 && WK == 1);
  const bool second = blockIdx.x >= P.b_block, third = kThree && blockIdx.x >= P.c_block;
  const MmaInt4 W = third ? P.c.W : second ? P.b.W : P.a.W;
  const int64_t rows_per_expert = third ? P.c.rpe : second ? P.b.rpe : P.a.rpe;
  const int64_t n_out = third ? P.c.n_out : second ? P.b.n_out : P.a.n_out;
  void* const y = third ? P.c.y : second ? P.b.y : P.a.y;
  const int ydt = third ? P.c.ydt : second ? P.b.ydt : P.a.ydt;
  const unsigned bx = blockIdx.x - (third ? P.c_block : second ? P.b_block : 0u);
  constexpr int WM = kWarps / WK, NTOK = 8 * NT, MW = GATED ? 2 * MT : MT;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wk = warp % WK, wm = warp / WK;
  const int g = lane >> 2, tig = lane & 3;
  const int64_t otiles = n_out / 16, ot0 = (int64_t(bx) * WM + wm) * MT;
  const int64_t KC = W.K / 64, ngroups = W.K / W.G;
  const int64_t gps = ngroups / W.KS;  // groups per slice
  const int spw = W.KS / WK;           // slices per warp: warp wk owns [wk·spw, (wk + 1)·spw)
  // The block's tokens: tile blockIdx.y of the table (experts) or of x (dense), and the x rows whose B fragments
  // this lane loads, token nt·8 + g of the tile (padding lanes reuse token 0). The table and pair list are read before
  // the wait for dense launches (nothing to read) and with ts.early (see TokenSrc; gate_up, the GATED form, never has
  // it); a block past the table's end returns after the wait, so the chain of waits stays unbroken.
  int64_t e = 0, t0 = 0;
  int cnt = 0;
  const __nv_bfloat16* xr[NT];
  const int32_t* list = ts.list;  // the pair list (experts)
  auto entry = [&] {
    if (ts.tiles) {
      if (int(blockIdx.y) >= *ts.ntiles) return false;  // block-uniform
      const int32_t* tl = ts.tiles + 3 * blockIdx.y;
      e = tl[0], t0 = tl[1], cnt = tl[2];
    } else {
      t0 = int64_t(blockIdx.y) * NTOK;
      cnt = int(ts.M - t0 < NTOK ? ts.M - t0 : NTOK);
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int i = nt * 8 + g < cnt ? nt * 8 + g : 0;
      const int64_t p = list ? list[t0 + i] : t0 + i;
      xr[nt] = x + x_row(ts, p) * W.K + 16 * tig;
    }
    return true;
  };
  if constexpr (GATED) {
    pdl_wait();  // launched with pdl_launch: the tile table, x and y belong to earlier kernels
    pdl_trigger();
    if (!entry()) return;
  } else {
    const bool early = !ts.tiles || ts.early;
    const bool live = early ? entry() : true;
    if (ts.pre > 0 && early && live) {  // this warp's first ts.pre groups toward L2 (one 128-byte line per lane)
      const int64_t g0 = int64_t(wk) * spw * gps;
      const int64_t bytes = int64_t(ts.pre < ngroups - g0 ? ts.pre : ngroups - g0) * CPG * 512;
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int64_t ot = ot0 + i < otiles ? ot0 + i : otiles - 1;
        const int64_t wt = e * (rows_per_expert / 16) + ot;
        const char* wb = reinterpret_cast<const char*>(W.qw + (wt * KC + g0 * CPG) * 32);
        for (int64_t b = int64_t(lane) * 128; b < bytes; b += 32 * 128) prefetch_l2(wb + b);
        if (lane < 16) prefetch_l2(W.sc + (wt * 16 + lane) * ngroups + g0);
        else if (W.zu < 0) prefetch_l2(W.z + (wt * 16 + lane - 16) * ngroups + g0);
      }
    }
    pdl_wait();  // launched with pdl_launch: the tile table (without ts.early), x and y belong to earlier kernels
    pdl_trigger();
    if (!(early ? live : entry())) return;
  }
  const uint4* wp[MW];
  int64_t r0[MW];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    const int64_t ot = ot0 + i < otiles ? ot0 + i : otiles - 1;  // out-of-range tiles compute, never store
    const int64_t wt = e * (rows_per_expert / 16) + ot;
    r0[i] = wt * 16 + g;
    wp[i] = W.qw + wt * KC * 32 + lane;
    if constexpr (GATED) {
      r0[MT + i] = r0[i] + n_out;
      wp[MT + i] = wp[i] + (n_out / 16) * KC * 32;
    }
  }

  float acc[MW][NT][4];
  // Slices of other warps, each kept apart so warp 0 adds them one by one in slice order (at most 3: KS ≤ 4).
  constexpr bool kSplit = WK > 1;
  __shared__ float red[kSplit ? 3 : 1][kSplit ? WM : 1][kSplit ? MW * NT * 4 : 1][32];
  // kStep: the slices' groups through pointers that step one group at a time (the unrolled body then addresses its
  // second group by immediate offsets) and, where one zero point serves every group (MmaInt4::zu; UZ), no zero-point
  // path compiled into the loop. Session 37's SASS of the 2 × 2 medium tile had ~42 integer instructions of address
  // arithmetic per group and the predicated-off zero-point loads inside it (H200, own µs per launch: qkv + z at 64
  // tokens 18.73 → 17.67, the batch-1 decode kernels 3–5% shorter; steps batch 1 / 8 / 64 −0.05 / −0.05 / −0.06 ms).
  // The 2-block kernel with four groups per body and the decode kernel without a third matrix were slower that way
  // (out_proj 8.71 → 10.60 µs, 7.18 → 7.42), so they keep the indexed form. Same loads, same arithmetic, same bits.
  constexpr bool kStep = UNR <= 2 && C3;
  auto slices = [&](auto uz) {
    constexpr bool UZ = decltype(uz)::value;
    uint32_t zu2 = 0;
    if constexpr (UZ) zu2 = zero_pair(uint8_t(W.zu));
    // kStep only (the indexed form leaves them unused): the warp's slices are consecutive, so its groups are too; the
    // pointers start at its first group and step on through every slice.
    [[maybe_unused]] int gs = int(wk * spw * gps);
    [[maybe_unused]] const uint4* wq[MW];
    [[maybe_unused]] const uint16_t* sb[MW];  // scales of rows r0[u] (group g at [g]) and r0[u] + 8 (at [g + r8])
    [[maybe_unused]] const uint8_t* zb[MW];   // zero points, the same way (not with UZ)
    [[maybe_unused]] const __nv_bfloat16* xq[NT];
    [[maybe_unused]] const int r8 = int(8 * ngroups);
    if constexpr (kStep) {
#pragma unroll
      for (int u = 0; u < MW; ++u) {
        wq[u] = wp[u] + int64_t(gs) * CPG * 32;
        sb[u] = W.sc + r0[u] * ngroups;
        if constexpr (!UZ) zb[u] = W.z + r0[u] * ngroups;
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) xq[nt] = xr[nt] + int64_t(gs) * CPG * 64;
    }
    // Group gi's step into the slice partial (kStep: group g32 through the stepping pointers; else g64 indexed).
    auto group = [&](int g32, int64_t gi, float (&part)[MW][NT][4]) {
      uint4 wv[CPG][MW];
#pragma unroll
      for (int c = 0; c < CPG; ++c)
#pragma unroll
        for (int u = 0; u < MW; ++u) {
          if constexpr (kStep) wv[c][u] = __ldg(wq[u] + c * 32);
          else wv[c][u] = __ldg(wp[u] + (gi * CPG + c) * 32);
        }
      uint32_t zz0[MW], zz1[MW];
#pragma unroll
      for (int u = 0; u < MW; ++u) {
        if constexpr (UZ) {
          zz0[u] = zz1[u] = zu2;
        } else if constexpr (kStep) {
          zz0[u] = zero_pair(zb[u][g32]);
          zz1[u] = zero_pair(zb[u][g32 + r8]);
        } else if (W.zu >= 0) {  // one zero point everywhere (MmaInt4::zu)
          zz0[u] = zz1[u] = zero_pair(uint8_t(W.zu));
        } else {
          zz0[u] = zero_pair(W.z[r0[u] * ngroups + gi]);
          zz1[u] = zero_pair(W.z[(r0[u] + 8) * ngroups + gi]);
        }
      }
      float tmp[MW][NT][4];
      zero_frags(tmp);
#pragma unroll
      for (int c = 0; c < CPG; ++c) {
        uint4 xv[NT][2];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const __nv_bfloat16* xp;
          if constexpr (kStep) xp = xq[nt] + c * 64;
          else xp = xr[nt] + (gi * CPG + c) * 64;
          xv[nt][0] = __ldg(reinterpret_cast<const uint4*>(xp));
          xv[nt][1] = __ldg(reinterpret_cast<const uint4*>(xp + 8));
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
          for (int u = 0; u < MW; ++u) {
            uint32_t a[4];
            dequant(word_of(wv[c][u], j), zz0[u], zz1[u], a);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
              mma16816(tmp[u][nt], a, word_of(xv[nt][j >> 1], 2 * (j & 1)), word_of(xv[nt][j >> 1], 2 * (j & 1) + 1));
          }
        }
      }
#pragma unroll
      for (int u = 0; u < MW; ++u) {
        float s0, s1;
        if constexpr (kStep) s0 = sc_f(sb[u][g32]), s1 = sc_f(sb[u][g32 + r8]);
        else s0 = sc_f(W.sc[r0[u] * ngroups + gi]), s1 = sc_f(W.sc[(r0[u] + 8) * ngroups + gi]);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          part[u][nt][0] += s0 * tmp[u][nt][0];
          part[u][nt][1] += s0 * tmp[u][nt][1];
          part[u][nt][2] += s1 * tmp[u][nt][2];
          part[u][nt][3] += s1 * tmp[u][nt][3];
        }
        if constexpr (kStep) wq[u] += CPG * 32;
      }
      if constexpr (kStep)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) xq[nt] += CPG * 64;
    };
    for (int s = wk * spw; s < (wk + 1) * spw; ++s) {
      float part[MW][NT][4];
      zero_frags(part);
      if constexpr (kStep) {
#pragma unroll(UNR)  // groups per loop body (two: two groups' loads in flight)
        for (int i = 0; i < int(gps); ++i, ++gs) group(gs, 0, part);
      } else {
#pragma unroll(UNR)
        for (int64_t gi = s * gps; gi < (s + 1) * gps; ++gi) group(0, gi, part);
      }
      if (wk == 0) {
#pragma unroll
        for (int u = 0; u < MW; ++u)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[u][nt][c] = s == 0 ? part[u][nt][c] : acc[u][nt][c] + part[u][nt][c];
      } else if constexpr (kSplit) {
#pragma unroll
        for (int u = 0; u < MW; ++u)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int c = 0; c < 4; ++c) red[s - spw][wm][(u * NT + nt) * 4 + c][lane] = part[u][nt][c];
      }
    }
  };
  if constexpr (kStep) {
    if (W.zu >= 0) slices(std::true_type{});
    else slices(std::false_type{});
  } else {
    slices(std::false_type{});  // the indexed form tests W.zu per group itself
  }

  if constexpr (kSplit) {
    __syncthreads();
    if (wk > 0) return;
    for (int s = spw; s < W.KS; ++s)
#pragma unroll
      for (int u = 0; u < MW; ++u)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[u][nt][c] += red[s - spw][wm][(u * NT + nt) * 4 + c][lane];
  }

  // C fragment: c[2·rr + h] is (row g + 8·rr, token 2·tig + h) of the tile.
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    if (ot0 + i >= otiles) continue;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int ti = nt * 8 + 2 * tig + h;
        if (ti >= cnt) continue;
        const int64_t p = list ? list[t0 + ti] : t0 + ti;
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const int64_t n = (ot0 + i) * 16 + g + 8 * rr;
          const float v = acc[i][nt][2 * rr + h];
          if constexpr (GATED) {
            static_cast<__nv_bfloat16*>(y)[p * n_out + n] = __float2bfloat16_rn(silu(v) * acc[MT + i][nt][2 * rr + h]);
          } else if (ydt == int(DType::F32)) {
            static_cast<float*>(y)[p * n_out + n] = v;
          } else {
            static_cast<__nv_bfloat16*>(y)[p * n_out + n] = __float2bfloat16_rn(v);
          }
        }
      }
  }
}
constexpr int default_unr(int MT, int NT, bool GATED) { return NT == 1 || (MT == 1 && !GATED) ? 2 : 1; }
template <int MT, int NT, int WK, int CPG, bool GATED, int UNR = default_unr(MT, NT, GATED), bool C3 = true>
// Decode: ≥ 16 warps per SM in flight (4 blocks), except
// - the dense two-tile kernel with a third matrix: 3 (its launches have at most ~3 blocks per SM, and at 4 its
//   registers spilled once it took three matrices); without it (C3 = false) 4, 128 registers without spilling, so
//   beside the DeltaNet qkv + z's ~3 blocks per SM the conv kernel that follows finds registers to start in (session
//   23: batch 1 −0.01 to −0.04 ms, batch 4 −0.01 to −0.05);
// - the gated (experts' gate_up) decode kernels: 3, 150 registers where 4 spilled 24 bytes (session 23: batch 1
//   −0.02 ms; a launch has 2 blocks per SM at batch 1). Capped at 144 or 136 registers (__maxnreg__, so that two
//   down-projection blocks fit beside two of its blocks) they spill in the loop: batch 1 +0.08 ms.
__global__ void __launch_bounds__(kWarps * 32, NT == 1   ? (GATED || (MT == 2 && WK == 4 && C3) ? 3 : 4)
                                               : NT == 2 ? 3
                                                         : 1)
    k_int4_mma(const Int4Pair P, const __nv_bfloat16* __restrict__ x, TokenSrc ts) {
  int4_mma_body<MT, NT, WK, CPG, GATED, UNR, C3>(P, x, ts);
}

// The same body at 2 blocks per SM (up to 255 registers): the dense medium tiles with four groups per loop body where
// the whole grid fits the device at 2 blocks per SM (see launch_cpg).
template <int MT, int NT, int WK, int CPG, bool GATED, int UNR, bool C3>
__global__ void __launch_bounds__(kWarps * 32, 2)
    k_int4_mma_2b(const Int4Pair P, const __nv_bfloat16* __restrict__ x, TokenSrc ts) {
  int4_mma_body<MT, NT, WK, CPG, GATED, UNR, C3>(P, x, ts);
}

// Streaming decode kernels for the experts (k_int4_moe_gu, k_int4_moe_down): a warp holds its token tile's
// activation fragments for 8 chunks (512 inputs: one slice of the gate_up's K = 2048, all of the down projection's
// K = 512) in registers and streams 16-row weight tiles, the next tile's weights, zero points (one 4-byte word per row)
// and fp16 scales (8 bytes per row) loading while the current tile computes; k_int4_mma pays its prologue (tile table,
// pair list, activation loads) per tile or two and re-reads the activations per tile. Same arithmetic as k_int4_mma
// (int4_mma.h, batch invariance): per group a fresh partial of 8 mma in chunk and step order, times the group's scale,
// added to the slice partial in group order; slices added in order. So the rows are bit-identical whichever runs.
constexpr int kStreamKC = 8;  // chunks of 64 inputs per streamed tile (4 groups of 128)
struct StreamTile {
  uint4 w[kStreamKC];
  uint32_t z0, z1;  // zero points of rows g, g + 8 of the tile, byte q = group q of the 4
  uint2 s0, s1;     // their fp16 scales, half q = group q
};
// z0 / z1 where every group's zero point is z (MmaInt4::zu).
__device__ __forceinline__ uint32_t zero_bytes4(int z) { return uint32_t(z) * 0x01010101u; }
// Where lane (g, ·)'s pieces of chunks [8·sl, 8·sl + 8) (groups [4·sl, 4·sl + 4)) of weight tile wt lie (kc chunks
// and ng groups per row): its weight words (chunk c at w + 32·c), the 4 zero-point bytes and 4 scales of rows g, g + 8.
struct StreamSrc {
  const uint4* w;
  const uint8_t *z0, *z1;
  const uint16_t *s0, *s1;
};
__device__ __forceinline__ StreamSrc stream_src(const MmaInt4& W, int64_t wt, int64_t kc, int64_t ng, int sl, int g,
                                                int lane) {
  const int64_t r0 = wt * 16 + g;
  const int c0 = sl * kStreamKC, q0 = sl * (kStreamKC / 2);
  return {W.qw + (wt * kc + c0) * 32 + lane, W.z + r0 * ng + q0, W.z + (r0 + 8) * ng + q0, W.sc + r0 * ng + q0,
          W.sc + (r0 + 8) * ng + q0};
}
// The slice's pieces into registers.
__device__ __forceinline__ void stream_load(const MmaInt4& W, int64_t wt, int64_t kc, int64_t ng, int sl, int g,
                                            int lane, StreamTile& t) {
  const StreamSrc p = stream_src(W, wt, kc, ng, sl, g, lane);
#pragma unroll
  for (int c = 0; c < kStreamKC; ++c) t.w[c] = __ldg(p.w + c * 32);
  if (W.zu >= 0) {  // one zero point everywhere (MmaInt4::zu): nothing to load
    t.z0 = t.z1 = zero_bytes4(W.zu);
  } else {
    t.z0 = __ldg(reinterpret_cast<const uint32_t*>(p.z0));
    t.z1 = __ldg(reinterpret_cast<const uint32_t*>(p.z1));
  }
  t.s0 = __ldg(reinterpret_cast<const uint2*>(p.s0));
  t.s1 = __ldg(reinterpret_cast<const uint2*>(p.s1));
}
// L2 prefetch of what stream_load(W, wt, kc, ng, sl, ·) reads, one instruction per lane: lane l the weights' 128-byte
// line l of the slice (8 chunks × 512 bytes), lanes 0-15 / 16-31 the scale / zero-point pieces of the tile's rows.
// The registers hold one tile ahead; this puts the tile after it in flight without registers, so its loads hit L2.
__device__ __forceinline__ void stream_prefetch(const MmaInt4& W, int64_t wt, int64_t kc, int64_t ng, int sl,
                                                int lane) {
  const int c0 = sl * kStreamKC, q0 = sl * (kStreamKC / 2);
  prefetch_l2(W.qw + (wt * kc + c0) * 32 + lane * 8);
  const int64_t r = wt * 16 + (lane & 15);
  if (lane < 16) prefetch_l2(W.sc + r * ng + q0);
  else if (W.zu < 0) prefetch_l2(W.z + r * ng + q0);
}
// A stage of a warp's cp.async ring (the streaming kernels with D > 0): what stream_load reads, each lane's pieces at
// its index, so a lane copies and later reads only its own bytes (no barrier guards the ring) — except the scales
// with `rows` (TokenSrc::srows): lane r < 16 copies row r's 8 bytes into sr[r], read by the 4 lanes of that row, so
// a __syncwarp() follows each wait and precedes each refill.
struct StreamSmem {
  uint4 w[kStreamKC][32];
  uint2 s0[32], s1[32];
  uint2 sr[16];
  uint32_t z0[32], z1[32];
};
// Blocks per SM the streaming kernels' registers are sized for: D = 0 (register double buffer) 2; a D-stage ring
// reads its tiles in place, so the registers hold little more than the activations and 4 blocks fit (2 stages: 43 KB
// of ring per block; 3 stages 3 blocks, 4 stages 2 by shared memory).
constexpr int stream_min_blocks(int D) { return D == 0 ? 2 : D == 2 ? 4 : D == 3 ? 3 : 2; }
// stream_load's reads as cp.async into stage b (commit and wait are the caller's).
__device__ __forceinline__ void stream_issue(const MmaInt4& W, int64_t wt, int64_t kc, int64_t ng, int sl, int g,
                                             int lane, StreamSmem& b, bool rows) {
  const StreamSrc p = stream_src(W, wt, kc, ng, sl, g, lane);
#pragma unroll
  for (int c = 0; c < kStreamKC; ++c) cp_async16(&b.w[c][lane], p.w + c * 32);
  if (W.zu >= 0) {  // one zero point everywhere (MmaInt4::zu): stored, not copied (the lane's own slots)
    b.z0[lane] = b.z1[lane] = zero_bytes4(W.zu);
  } else {
    cp_async4(&b.z0[lane], p.z0);
    cp_async4(&b.z1[lane], p.z1);
  }
  if (rows) {
    if (lane < 16) cp_async8(&b.sr[lane], W.sc + (wt * 16 + lane) * ng + sl * (kStreamKC / 2));
  } else {
    cp_async8(&b.s0[lane], p.s0);
    cp_async8(&b.s1[lane], p.s1);
  }
}
// A lane's view of a ring stage, read where stream_group uses it (no tile of registers).
struct RingTile {
  const StreamSmem* b;
  int lane;
  bool rows;  // scales by row (StreamSmem)
};
__device__ __forceinline__ uint4 tile_w(const StreamTile& t, int c) { return t.w[c]; }
__device__ __forceinline__ uint4 tile_w(const RingTile& t, int c) { return t.b->w[c][t.lane]; }
__device__ __forceinline__ uint32_t tile_z(const StreamTile& t, int rr) { return rr ? t.z1 : t.z0; }
__device__ __forceinline__ uint32_t tile_z(const RingTile& t, int rr) { return rr ? t.b->z1[t.lane] : t.b->z0[t.lane]; }
__device__ __forceinline__ float tile_s(const StreamTile& t, int rr, int q) {
  const uint2 v = rr ? t.s1 : t.s0;
  return sc_f(uint16_t((q < 2 ? v.x : v.y) >> (16 * (q & 1))));
}
__device__ __forceinline__ float tile_s(const RingTile& t, int rr, int q) {
  if (t.rows) return sc_f(reinterpret_cast<const uint16_t*>(&t.b->sr[(t.lane >> 2) + 8 * rr])[q]);
  return sc_f(reinterpret_cast<const uint16_t*>(rr ? &t.b->s1[t.lane] : &t.b->s0[t.lane])[q]);
}
// The activation fragments of 8 chunks from xr (token row + 16·tig + first chunk's input).
__device__ __forceinline__ void stream_x(const __nv_bfloat16* xr, uint4 (&xv)[kStreamKC][2]) {
#pragma unroll
  for (int c = 0; c < kStreamKC; ++c) {
    xv[c][0] = __ldg(reinterpret_cast<const uint4*>(xr + c * 64));
    xv[c][1] = __ldg(reinterpret_cast<const uint4*>(xr + c * 64 + 8));
  }
}
// part += scale · (group q's 8 mma): k_int4_mma's per-group step. C fragment: [2·rr + h] is (row g + 8·rr, token
// 2·tig + h) of the tile.
// T: a StreamTile (registers) or a RingTile (shared memory).
template <class T>
__device__ __forceinline__ void stream_group(const T& t, const uint4 (&xv)[kStreamKC][2], int q, float (&part)[4]) {
  const uint32_t zz0 = zero_pair(uint8_t(tile_z(t, 0) >> (8 * q))), zz1 = zero_pair(uint8_t(tile_z(t, 1) >> (8 * q)));
  float tmp[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int c = 2 * q; c < 2 * q + 2; ++c) {
    const uint4 w = tile_w(t, c);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t a[4];
      dequant(word_of(w, j), zz0, zz1, a);
      mma16816(tmp, a, word_of(xv[c][j >> 1], 2 * (j & 1)), word_of(xv[c][j >> 1], 2 * (j & 1) + 1));
    }
  }
  const float s0 = tile_s(t, 0, q), s1 = tile_s(t, 1, q);
  part[0] += s0 * tmp[0];
  part[1] += s0 * tmp[1];
  part[2] += s1 * tmp[2];
  part[3] += s1 * tmp[3];
}
// Calls store(p, rr, h) for every C-fragment element of the lane that holds a real token: [2·rr + h] is (row g + 8·rr,
// token 2·tig + h) of the tile, p that token's pair id.
template <class F>
__device__ __forceinline__ void stream_store(const TokenSrc& ts, int64_t t0, int cnt, int tig, F&& store) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int ti = 2 * tig + h;
    if (ti >= cnt) continue;
    const int64_t p = ts.list[t0 + ti];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) store(p, rr, h);
  }
}
// The tile table entry of blockIdx.y, i.e. expert, first list index, pair count (false: past the table's end).
__device__ __forceinline__ bool tile_entry(const TokenSrc& ts, int64_t& e, int64_t& t0, int& cnt) {
  if (int(blockIdx.y) >= *ts.ntiles) return false;
  const int32_t* tl = ts.tiles + 3 * blockIdx.y;
  e = tl[0], t0 = tl[1], cnt = tl[2];
  return true;
}
// A streaming kernel's start (PDL-launched: the tile table and the activations belong to earlier kernels).
__device__ __forceinline__ bool stream_tile_entry(const TokenSrc& ts, int64_t& e, int64_t& t0, int& cnt) {
  pdl_wait();
  pdl_trigger();
  return tile_entry(ts, e, t0, cnt);
}

// The experts' down projection when K = 512 (the 35B-A3B's moe_intermediate_size; its 4 slices are one group each):
// each warp streams tpw consecutive 16-row output tiles of its expert, the next tile's loads in flight while one
// computes: D = 0 in registers (two tiles of them), D > 0 through a D-stage cp.async ring per warp in dynamic shared
// memory (D − 1 tiles in flight), read in place.
template <int D = 0>
__global__ void __launch_bounds__(kWarps * 32, stream_min_blocks(D))
    k_int4_moe_down(const MmaInt4 W, int64_t H, float* __restrict__ y, const __nv_bfloat16* __restrict__ x,
                    TokenSrc ts, int tpw) {
  constexpr int KC = kStreamKC, NG = KC / 2;  // chunks; groups (= slices)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
  const int64_t otiles = H / 16, ot_begin = (int64_t(blockIdx.x) * kWarps + warp) * tpw;
  const int64_t ot_end = ot_begin + tpw < otiles ? ot_begin + tpw : otiles;
  const int n = ot_end > ot_begin ? int(ot_end - ot_begin) : 0;  // tiles of this warp
  extern __shared__ uint4 down_ring[];
  StreamSmem* ring = reinterpret_cast<StreamSmem*>(down_ring) + warp * D;
  // The ring's first D − 1 tiles (weights: no kernel's output), one commit group per tile, empty past the end.
  auto prologue = [&](int64_t e) {
#pragma unroll
    for (int q = 0; q < D - 1; ++q) {
      if (q < n) stream_issue(W, e * otiles + ot_begin + q, KC, NG, 0, g, lane, ring[q], ts.srows);
      cp_async_commit();
    }
  };
  int64_t e = 0, t0 = 0;
  int cnt = 0;
  bool live = true;
  if (ts.early) {  // the table is final (TokenSrc::early): the first tiles' weights go out before the wait
    live = tile_entry(ts, e, t0, cnt);
    if (live && n > 0) {
      if constexpr (D > 0) prologue(e);
      else
        for (int q = 0; q < 2 && q < n; ++q) stream_prefetch(W, e * otiles + ot_begin + q, KC, NG, 0, lane);
    }
  }
  pdl_wait();
  pdl_trigger();
  if (!ts.early) live = tile_entry(ts, e, t0, cnt);
  if (!live || n == 0) return;  // block-uniform / warp-uniform; no barriers below
  uint4 xv[KC][2];  // token g of the tile (padding lanes reuse token 0)
  const __nv_bfloat16* xr = x + x_row(ts, ts.list[t0 + (g < cnt ? g : 0)]) * (KC * 64) + 16 * tig;
  auto tile = [&](const auto& cur, int64_t ot) {
    float acc[4];
#pragma unroll
    for (int s = 0; s < NG; ++s) {  // slice s = group s
      float part[4] = {0.f, 0.f, 0.f, 0.f};
      stream_group(cur, xv, s, part);
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[q] = s == 0 ? part[q] : acc[q] + part[q];
    }
    stream_store(ts, t0, cnt, tig,
                 [&](int64_t p, int rr, int h) { y[p * H + ot * 16 + g + 8 * rr] = acc[2 * rr + h]; });
  };
  if constexpr (D > 0) {
    if (!ts.early) prologue(e);
    stream_x(xr, xv);
    for (int i = 0; i < n; ++i) {
      // Refills the stage tile i − 1 came from (this lane's own bytes, already read: its mma have consumed them).
      if (ts.srows) __syncwarp();  // every lane has read the stage refilled next (scales by row)
      if (i + D - 1 < n)
        stream_issue(W, e * otiles + ot_begin + i + D - 1, KC, NG, 0, g, lane, ring[(i + D - 1) % D], ts.srows);
      cp_async_commit();
      cp_async_wait<D - 1>();  // tile i's group has landed
      if (ts.srows) __syncwarp();  // and every lane's part of it
      tile(RingTile{&ring[i % D], lane, ts.srows != 0}, ot_begin + i);
    }
  } else {
    stream_x(xr, xv);
    StreamTile cur, nxt;
    stream_load(W, e * otiles + ot_begin, KC, NG, 0, g, lane, cur);
    for (int64_t ot = ot_begin; ot < ot_end; ++ot) {
      if (ot + 1 < ot_end) stream_load(W, e * otiles + ot + 1, KC, NG, 0, g, lane, nxt);
      tile(cur, ot);
      cur = nxt;
    }
  }
}

// The experts' gate_up when K = 2048 (4 slices of 512). Block = 4 warps, warp s = slice s; the block streams R
// (gate, up) tile pairs of its expert, each warp computing its slice's partial of the gate tile, then of the up tile.
// The partials meet in shared memory; after the R pairs each warp adds the slices of every 4th pair in slice order
// and stores silu(gate)·up. D = 0: the tiles come through a register double buffer, with PF the tile after next
// prefetched into L2; D > 0: through a D-stage cp.async ring per warp in shared memory after the partials (D − 1
// tiles in flight), read in place (PF unused).
template <bool PF, int D = 0>
__global__ void __launch_bounds__(kWarps * 32, stream_min_blocks(D))
    k_int4_moe_gu(const MmaInt4 W, int64_t I, __nv_bfloat16* __restrict__ act, const __nv_bfloat16* __restrict__ x,
                  TokenSrc ts, int R) {
  constexpr int KS = kWarps, NGS = kStreamKC / 2;  // slices; groups per slice
  constexpr int64_t K = int64_t(KS) * kStreamKC * 64, KC = K / 64, NG = K / 128;
  extern __shared__ float red[];  // [R][gate, up][slice][4][32]
  const int s = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
  int64_t e, t0;
  int cnt;
  if (!stream_tile_entry(ts, e, t0, cnt)) return;  // block-uniform
  const int64_t ptiles = I / 16, pt0 = int64_t(blockIdx.x) * R;
  const int np = int(ptiles - pt0 < R ? ptiles - pt0 : R);
  if (np <= 0) return;  // block-uniform
  // Unit u: pair u / 2, its gate (u even) or up tile.
  auto wtile = [&](int u) { return e * (2 * ptiles) + pt0 + u / 2 + (u & 1) * ptiles; };
  auto partial = [&](const auto& t, const uint4 (&xv)[kStreamKC][2], int u) {
    float part[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int q = 0; q < NGS; ++q) stream_group(t, xv, q, part);
    float* rp = red + (size_t(u) * KS + s) * 4 * 32 + lane;
#pragma unroll
    for (int c = 0; c < 4; ++c) rp[c * 32] = part[c];
  };
  uint4 xv[kStreamKC][2];  // token g of the tile (padding lanes reuse token 0), slice s
  const __nv_bfloat16* xr = x + x_row(ts, ts.list[t0 + (g < cnt ? g : 0)]) * K + s * kStreamKC * 64 + 16 * tig;
  if constexpr (D > 0) {
    // Stage q of this warp's ring; the ring starts after the R pairs' partials (R · 4 KB, 16-byte aligned).
    StreamSmem* ring = reinterpret_cast<StreamSmem*>(red + size_t(R) * 2 * KS * 4 * 32) + s * D;
    const int nu = 2 * np;
#pragma unroll
    for (int q = 0; q < D - 1; ++q) {  // one commit group per unit, empty past the end
      if (q < nu) stream_issue(W, wtile(q), KC, NG, s, g, lane, ring[q], ts.srows);
      cp_async_commit();
    }
    stream_x(xr, xv);
    for (int u = 0; u < nu; ++u) {
      // Refills the stage unit u − 1 came from (this lane's own bytes, already read: its mma have consumed them).
      if (ts.srows) __syncwarp();  // every lane has read the stage refilled next (scales by row)
      if (u + D - 1 < nu) stream_issue(W, wtile(u + D - 1), KC, NG, s, g, lane, ring[(u + D - 1) % D], ts.srows);
      cp_async_commit();
      cp_async_wait<D - 1>();  // unit u's group has landed
      if (ts.srows) __syncwarp();  // and every lane's part of it
      partial(RingTile{&ring[u % D], lane, ts.srows != 0}, xv, u);
    }
  } else {
    stream_x(xr, xv);
    StreamTile cur, nxt;
    stream_load(W, wtile(0), KC, NG, s, g, lane, cur);
    for (int u = 0; u < 2 * np; ++u) {
      if (u + 1 < 2 * np) stream_load(W, wtile(u + 1), KC, NG, s, g, lane, nxt);
      if (PF && u + 2 < 2 * np) stream_prefetch(W, wtile(u + 2), KC, NG, s, lane);
      partial(cur, xv, u);
      cur = nxt;
    }
  }
  __syncthreads();
  for (int j = s; j < np; j += KS) {
    float gt[4], up[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const float* gp = red + (size_t(2 * j) * KS) * 4 * 32 + c * 32 + lane;
      const float* upp = red + (size_t(2 * j + 1) * KS) * 4 * 32 + c * 32 + lane;
      gt[c] = gp[0], up[c] = upp[0];
#pragma unroll
      for (int k = 1; k < KS; ++k) gt[c] = gt[c] + gp[k * 4 * 32], up[c] = up[c] + upp[k * 4 * 32];
    }
    stream_store(ts, t0, cnt, tig, [&](int64_t p, int rr, int h) {
      act[p * I + (pt0 + j) * 16 + g + 8 * rr] = __float2bfloat16_rn(silu(gt[2 * rr + h]) * up[2 * rr + h]);
    });
  }
}

// Pairs sorted by expert and cut into tiles of at most ntok pairs of one expert (one block of 1024 threads,
// thread i owns expert i; E ≤ 1024): tiles[3·i] = expert, [3·i + 1] = first index into list, [3·i + 2] = count;
// *ntiles = number of tiles. The order of pairs inside an expert is arbitrary: each pair's output depends only on
// its own row.
__device__ __forceinline__ int32_t block_exclusive_scan(int32_t v, int32_t* total) {
  __shared__ int32_t warp_tot[32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  int32_t inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int32_t t = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += t;
  }
  if (lane == 31) warp_tot[w] = inc;
  __syncthreads();
  if (w == 0) {
    int32_t t = lane < int(blockDim.x >> 5) ? warp_tot[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int32_t u = __shfl_up_sync(0xffffffffu, t, o);
      if (lane >= o) t += u;
    }
    warp_tot[lane] = t;  // inclusive prefix over warps
  }
  __syncthreads();
  const int32_t before = (w > 0 ? warp_tot[w - 1] : 0) + inc - v;
  *total = warp_tot[(blockDim.x >> 5) - 1];
  __syncthreads();  // warp_tot is reused by the next scan
  return before;
}
__device__ __forceinline__ void moe_tiles_body(const int32_t* ids, int64_t P, int64_t E, int ntok, int32_t* list,
                                               int32_t* tiles, int32_t* ntiles) {
  __shared__ int32_t cnt[1024], start[1024];
  const int i = threadIdx.x;
  cnt[i] = 0;
  __syncthreads();
  for (int64_t p = i; p < P; p += blockDim.x) atomicAdd(&cnt[ids[p]], 1);
  __syncthreads();
  const int32_t c = i < E ? cnt[i] : 0, nt = (c + ntok - 1) / ntok;
  int32_t total_pairs, total_tiles;
  const int32_t pos = block_exclusive_scan(c, &total_pairs);
  const int32_t t0 = block_exclusive_scan(nt, &total_tiles);
  start[i] = pos;
  for (int32_t j = 0; j < nt; ++j) {
    tiles[3 * (t0 + j)] = i;
    tiles[3 * (t0 + j) + 1] = pos + j * ntok;
    tiles[3 * (t0 + j) + 2] = c - j * ntok < ntok ? c - j * ntok : ntok;
  }
  if (i == 0) *ntiles = total_tiles;
  __syncthreads();
  for (int64_t p = i; p < P; p += blockDim.x) list[atomicAdd(&start[ids[p]], 1)] = int32_t(p);
}
__global__ void __launch_bounds__(1024)
    k_moe_tiles(const int32_t* ids, int64_t P, int64_t E, int ntok, int32_t* list, int32_t* tiles, int32_t* ntiles) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  moe_tiles_body(ids, P, E, ntok, list, tiles, ntiles);
}
// The router (moe_fuse.cuh, the code of the backend's k_moe_route: warp w routes tokens w, w + 32, ...) and the
// tile table in one launch (decode-sized steps): the block reads its own ids back after a barrier, which makes its
// global writes visible to all its threads.
__global__ void __launch_bounds__(1024) k_moe_route_tiles(const MoeRouteIn r, int64_t E, int64_t topk, int ntok,
                                                          int32_t* list, int32_t* tiles, int32_t* ntiles) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  for (int64_t t = threadIdx.x >> 5; t < r.T; t += blockDim.x >> 5)
    moe_route_token(r.logits, r.ldt, t, E, topk, r.ids, r.wts, threadIdx.x & 31);
  __syncthreads();
  moe_tiles_body(r.ids, r.T * topk, E, ntok, list, tiles, ntiles);
}

// The table of at most 32 pairs in one warp (the same layout as moe_tiles_body: experts in increasing order, pairs in
// increasing order within an expert, tiles of at most ntok): lane p holds pair p's expert id (p < P; others pass any
// value and are ignored). Each lane ranks its pair against the others (one shuffle per pair), and the first pair of
// each expert (the lowest lane, __match_any_sync) writes the expert's tiles after the tiles of the smaller experts.
__device__ __forceinline__ void moe_tiles_warp(int32_t id, int P, int ntok, int32_t* list, int32_t* tiles,
                                               int32_t* ntiles, int lane) {
  const bool live = lane < P;
  const unsigned same = __match_any_sync(0xffffffffu, live ? id : -1) & (live ? 0xffffffffu : 0u);
  const bool lead = live && (__ffs(same) - 1) == lane;
  const int32_t c = __popc(same), nt = lead ? (c + ntok - 1) / ntok : 0;
  int32_t rank = 0, tb = 0;
  for (int q = 0; q < P; ++q) {
    const int32_t iq = __shfl_sync(0xffffffffu, id, q), nq = __shfl_sync(0xffffffffu, nt, q);
    rank += moe_pair_before(iq, q, id, lane);  // from shuffled ids
    tb += iq < id ? nq : 0;
  }
  if (live) list[rank] = lane;
  if (lead)
    for (int32_t j = 0; j < nt; ++j) {
      tiles[3 * (tb + j)] = id;
      tiles[3 * (tb + j) + 1] = rank + j * ntok;
      tiles[3 * (tb + j) + 2] = c - j * ntok < ntok ? c - j * ntok : ntok;
    }
  const int32_t total = int32_t(__reduce_add_sync(0xffffffffu, uint32_t(nt)));
  if (lane == 0) *ntiles = total;
}
// Decode steps of at most 32 pairs (session 16): the router (warp w routes token w, T ≤ 4 warps) and the table in one
// warp (moe_tiles_warp), 128 threads, where k_moe_route_tiles' 1024-thread table needs two block scans and ~9 block
// barriers. The ids pass through shared memory.
__global__ void __launch_bounds__(128) k_moe_route_tiles_w(const MoeRouteIn r, int64_t E, int64_t topk, int ntok,
                                                            int32_t* list, int32_t* tiles, int32_t* ntiles) {
  __shared__ int32_t sids[32];
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  const int w = int(threadIdx.x >> 5), lane = int(threadIdx.x & 31), P = int(r.T * topk);
  if (w < r.T) moe_route_token(r.logits, r.ldt, w, E, topk, sids, r.wts, lane, true);
  __syncthreads();
  if (w == 0) {
    const int32_t id = lane < P ? sids[lane] : 0;
    if (lane < P) r.ids[lane] = id;
    moe_tiles_warp(id, P, ntok, list, tiles, ntiles, lane);
  }
}

// The router (moe_route_token_c) and the one-warp table for decode steps of T ≤ 4 tokens, top-KK over E ≤ 256
// experts (session 24): its own time per launch in the batch-1 step 7.2 → 3.8 µs against k_moe_route_tiles_w with
// the generic router (H200). Block: 32·T threads, warp t routes token t; at T = 1 the ids reach the table in
// registers.
template <typename LT, int KK>
__global__ void __launch_bounds__(128)
    k_moe_route_tiles_c(const LT* __restrict__ logits, int T, int E, int ntok, int32_t* __restrict__ ids,
                        float* __restrict__ wts, int32_t* list, int32_t* tiles, int32_t* ntiles) {
  __shared__ int32_t sids[32];
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  const int w = int(threadIdx.x >> 5), lane = int(threadIdx.x & 31), P = T * KK;
  const int32_t myid = moe_route_token_c<LT, KK>(logits, w, E, lane, ids, wts);
  int32_t id = myid;
  if (T > 1) {
    if (lane < KK) sids[w * KK + lane] = myid;
    __syncthreads();
    id = lane < P ? sids[lane] : 0;
  }
  if (w == 0) moe_tiles_warp(id, P, ntok, list, tiles, ntiles, lane);
}
// k_moe_route_tiles with the compact router (T > 4 up to DS_CUDA_MOE_FUSE_MAXT).
template <typename LT, int KK>
__global__ void __launch_bounds__(1024, 1) k_moe_route_tiles_cb(const LT* __restrict__ logits, int T, int E, int ntok,
                                                             int32_t* ids, float* wts, int32_t* list, int32_t* tiles,
                                                             int32_t* ntiles) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  const int lane = int(threadIdx.x & 31);
  for (int t = int(threadIdx.x >> 5); t < T; t += int(blockDim.x >> 5))
    moe_route_token_c<LT, KK>(logits, t, E, lane, ids, wts);
  __syncthreads();
  moe_tiles_body(ids, int64_t(T) * KK, E, ntok, list, tiles, ntiles);
}

// The most tiles P pairs over E experts can need: an expert with n > 0 pairs takes ceil(n / ntok) = 1 + floor((n − 1)
// / ntok) tiles, so d experts with pairs take at most d + floor((P − d) / ntok), which grows with d ≤ min(P, E).
// (Until session 19 min(P, E) + P / ntok + 1: at batch 64 321 rows of expert blocks instead of 288, the extra ones
// returning after their wait; the tighter grid moved gate_up's own time by −0.4 µs per launch, within noise.)
// CudaOps.Int4MoeWorstCaseTiles routes a batch to exactly this many tiles.
int64_t max_tiles(int64_t P, int64_t E, int ntok) {
  const int64_t d = std::min(P, E);
  return d + (P - d) / ntok;
}

// Groups each warp of a decode-shape launch sends toward L2 before its PDL wait (TokenSrc::pre): DS_INT4_PREWAIT,
// 8 (a K = 4096 slice: all of out_proj's and o_proj's, whose 128-block launches follow the recurrence and the
// attention; 4 until session 22, when 8 moved those launches 4.69 → 4.11 µs); 0 = none.
int prewait_groups() { return int(env_int("DS_INT4_PREWAIT", 8)); }

template <int MT, int NT, int WK, bool GATED, bool C3 = true>
void launch_cpg(const Int4Out& A, const Int4Out* B, const void* x, const TokenSrc& ts, int64_t gy, cudaStream_t s,
                const Int4Out* C = nullptr) {
  constexpr int WM = kWarps / WK;
  unsigned nb = 0;
  const Int4Pair P = int4_pair(
      A, B, [](const Int4Out& o) { return unsigned((o.n_out / 16 + WM * MT - 1) / (WM * MT)); }, &nb, C);
  const dim3 grid(nb, unsigned(gy));
  DS_CHECK(gy >= 1 && gy <= 65535, "int4 mma: ", gy, " token tiles (at most 65535)");
  const auto* xb = static_cast<const __nv_bfloat16*>(x);
  auto go = [&](auto* kernel) { DS_CUDA_CHECK(pdl_launch(kernel, grid, dim3(kWarps * 32), 0, s, P, xb, ts)); };
  // Group size 128 (AutoRound's and GPTQ's default) is the one instantiated; mma_int4_supported() sends others to
  // the bf16 path.
  DS_CHECK(A.W.G == 128 && (!B || B->W.G == 128) && (!C || C->W.G == 128), "int4 mma: group size ", A.W.G,
           " (instantiated: 128)");
  // DS_INT4_UNROLL1=1: one group per loop body in the medium shape (before session 7; same bits). Two put the next
  // group's loads in flight with the current one's (255 registers, still 2 blocks per SM; batch 32 int4 linears
  // 1.55 → 1.42 ms). The large shapes keep one (they would spill).
  if constexpr (NT == 4 && MT == 1 && !GATED)
    if (env_flag("DS_INT4_UNROLL1")) return go(k_int4_mma<MT, NT, WK, 2, GATED, 1>);
  DS_CHECK(C3 || !C, "int4 mma: a third matrix for a kernel compiled without it");
  // The dense medium tiles of 16 tokens per warp (NT = 2: 9-64 tokens). Where the grid fits the device at 2 blocks per
  // SM (out_proj / o_proj, K = 4096: 128-256 blocks at 16-64 tokens; the attention's q + k + v at 48: 216), the kernel
  // bounded to 2 blocks per SM with four groups per loop body (198-248 registers, no spills). The profile of out_proj
  // at 64 tokens with one group per body: 34% of the stall samples on the first use of a group's weight word, 0.38
  // eligible warps per scheduler. Own µs per launch, out_proj / o_proj: 64 tokens 11.38 → 8.72, 48 11.40 → 8.44, 32
  // 8.40 → 6.56, 16 7.77 → 6.55. Otherwise the 2 × 2 tile with K unsplit (the DeltaNet qkv + z: 384 blocks at 64
  // tokens) takes two groups per body at 3 blocks per SM (168 registers, no spills): 20.09 → 18.68 at 64 tokens,
  // 19.36 → 18.72 at 48. Steps: batch 64 −0.12 ms, 48 −0.13 to −0.18, 32 and 16 −0.05 (bench/RESULTS.md session 29).
  // Same bits: only the loop's schedule changes. Benchmark knobs: DS_INT4_MED_2B=0 (no 2-block kernel),
  // DS_INT4_MED_2B_UNR=2 (two groups per body in it), DS_INT4_MED22_UNR=1 (one group per body in the 2 × 2 tile at 3
  // blocks per SM); the first and the last together give the kernels before session 29.
  if constexpr (NT == 2 && !GATED) {
    if (env_int("DS_INT4_MED_2B", 1) != 0 && int64_t(grid.x) * grid.y <= 2 * int64_t(device_sm_count())) {
      const int64_t u = env_int("DS_INT4_MED_2B_UNR", 4);
      DS_CHECK(u == 2 || u == 4, "DS_INT4_MED_2B_UNR: expected 2 or 4, got ", u);
      return go(u == 4 ? k_int4_mma_2b<MT, NT, WK, 2, GATED, 4, C3> : k_int4_mma_2b<MT, NT, WK, 2, GATED, 2, C3>);
    }
    if constexpr (MT == 2 && WK == 1)
      if (env_int("DS_INT4_MED22_UNR", 2) == 2) return go(k_int4_mma<MT, NT, WK, 2, GATED, 2, C3>);
  }
  go(k_int4_mma<MT, NT, WK, 2, GATED, default_unr(MT, NT, GATED), C3>);
}

// Blocks of the dense decode kernel (one tile per warp, K split over 4 warps) the device holds at once: its blocks
// per SM × SMs (528 on an H100 or H200: 4 × 132). Read once per process, on the current device.
int64_t dense_wave_blocks() {
  static const int64_t n = [] {
    int per_sm = 0;
    DS_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k_int4_mma<1, 1, 4, 2, false>, kWarps * 32, 0));
    return int64_t(per_sm) * device_sm_count();
  }();
  return n;
}

// Kernel shapes. Small (decode, few tokens per tile): one 16-row tile (GATED: a gate/up pair) × 8 tokens per
// warp. Medium (up to a few hundred tokens): × 32 tokens (dense linears up to 64 tokens: 1 tile × 16 tokens or 2
// tiles × 16 tokens, see launch). Both split K over WK warps of the block (WK ≤ KS; more
// warps on long K so each has several groups in flight, fewer on short K so the split does not dominate). The
// slices of a split are added in slice order whatever WK is, so every shape gives bit-identical rows.
// Large (prefill): each warp 2 tiles (GATED: 1 pair) × 32 tokens over all of K, 4 warps side by side.
enum class Shape { Small, Medium, Large };
constexpr int ntok_of(Shape s) { return s == Shape::Small ? 8 : 32; }
template <int MT, int NT, bool GATED>
void launch_wk(int wk, const Int4Out& A, const Int4Out* B, const void* x, const TokenSrc& ts, int64_t gy,
               cudaStream_t s, const Int4Out* C = nullptr) {
  switch (wk) {
    case 4: return launch_cpg<MT, NT, 4, GATED>(A, B, x, ts, gy, s, C);
    case 2: return launch_cpg<MT, NT, 2, GATED>(A, B, x, ts, gy, s, C);
    default: return launch_cpg<MT, NT, 1, GATED>(A, B, x, ts, gy, s, C);
  }
}
// B (optional): a second matrix with the same K and group size, computed in the same launch; C (optional, with B; dense
// only): a third.
// wk_cap: at most this many warps split K in the small shape; mt: 16-row output tiles per warp there (1 or 2; 2
// only where one warp covers all of K, the experts' down projection: see mma_moe). Every choice gives the same bits.
template <bool GATED>
void launch(Shape shape, const Int4Out& A, const Int4Out* B, const void* x, const TokenSrc& ts, int64_t gy,
            cudaStream_t s, int wk_cap = 4, int mt = 1, const Int4Out* C = nullptr) {
  const MmaInt4& W = A.W;
  if (shape == Shape::Large) return launch_cpg<GATED ? 1 : 2, 4, 1, GATED>(A, B, x, ts, gy, s, C);
  // Small: every slice its own warp (most loads in flight for one token) unless K is short (the down projection's
  // 512: one warp). Medium: at least 1024 inputs per warp (K = 2048: two warps; 4096: four).
  int wk = 1;
  if (shape == Shape::Small) {
    wk = W.K >= 1024 ? W.KS : 1;
    // DS_INT4_SMALL_WK=n (1, 2 or 4): at most n warps split K in the decode shape (benchmark knob; every choice gives
    // the same bits, since slices are added in slice order whatever the split).
    const char* v = std::getenv("DS_INT4_SMALL_WK");
    const int cap = v ? std::atoi(v) : wk_cap;
    while (wk > 1 && wk > cap) wk /= 2;
  } else {
    while (wk < W.KS && W.K / (2 * wk) >= 1024) wk *= 2;
    // Dense launches of 17-64 tokens with K ≤ 2048 (the DeltaNet qkv + z, the attention's q + k + v): one warp over all
    // of K. Its blocks hold 4 × MT tiles instead of 2 × MT, so the 384 blocks of qkv + z at 64 tokens fit one wave of 3
    // per SM (396) where the K-split kernel's 768 needed two, and no slice partials meet in shared memory: own µs per
    // launch at 64 tokens 22.40 → 20.05, 48 21.58 → 19.34, 32 15.39 → 13.75; at 16 tokens (192 blocks, half a wave)
    // 8.77 → 11.59, so not there; K = 4096 (out_proj, o_proj: 2048 rows) keeps 4 warps (bench/RESULTS.md session 27).
    if (!ts.tiles && W.K <= 2048 && ts.M > 16 && ts.M <= 64) wk = 1;
    // DS_INT4_MED_WK=n (1, 2 or 4; at most KS): n warps split K in the medium shape instead (benchmark knob; same bits,
    // slices are added in order whatever the split).
    const int64_t mw = env_int("DS_INT4_MED_WK", 0);
    DS_CHECK(mw == 0 || mw == 1 || mw == 2 || mw == 4, "DS_INT4_MED_WK: expected 1, 2 or 4, got ", mw);
    if (mw > 0) wk = int(std::min<int64_t>(mw, W.KS));
  }
  if constexpr (!GATED)
    if (shape == Shape::Small && wk == 1 && mt == 2 && !C) return launch_cpg<2, 1, 1, false>(A, B, x, ts, gy, s);
  // Dense decode launches whose one-tile-per-warp blocks (one per 16-row tile, A's and B's together) would not fit
  // the device at once take two tiles per warp: half the blocks, one wave, and every warp's first groups (both
  // tiles) toward L2 before the wait instead of only the first wave's. The DeltaNet qkv + z (768 tiles on 528 block
  // slots of an H200) and the attention's q + k (+ v: 576): batch 1 −0.015 to −0.02 ms (bench/RESULTS.md session 22).
  // DS_INT4_DENSE_MT2=n: from more than n tiles instead (0: always; −1: never). Same bits.
  if constexpr (!GATED)
    if (shape == Shape::Small && !ts.tiles && wk == 4) {
      const int64_t n2 = env_int("DS_INT4_DENSE_MT2", dense_wave_blocks());
      if (n2 >= 0 && A.n_out / 16 + (B ? B->n_out / 16 : 0) + (C ? C->n_out / 16 : 0) > n2) {
        // Two matrices: the kernel without the third (DS_INT4_MT2_LIGHT=0: with it; same bits).
        if (!C && env_int("DS_INT4_MT2_LIGHT", 1) != 0) return launch_cpg<2, 1, 4, false, false>(A, B, x, ts, gy, s);
        return launch_cpg<2, 1, 4, false>(A, B, x, ts, gy, s, C);
      }
    }
  if (shape == Shape::Small) return launch_wk<1, 1, GATED>(wk, A, B, x, ts, gy, s, C);
  if constexpr (!GATED)
    if (!ts.tiles) {
      // The dense medium shape's warp tile, MT output tiles × NT token tiles (DS_INT4_MED = 10·MT + NT overrides:
      // 14, 24, 12, 22; same bits whichever). Up to 32 tokens 1 × 2 (16-token blocks, ≤ 170 registers: 3 blocks per
      // SM instead of 2), up to 64 tokens 2 × 2 (each activation fragment feeds two weight tiles); above that 1 × 4,
      // as before. int4 linears: batch 16 1.34 → 0.97 ms, 32 1.45 → 1.27, 64 1.87 → 1.73 (bench/RESULTS.md session 9;
      // 2 × 4 no faster than 1 × 4).
      const int64_t med = env_int("DS_INT4_MED", ts.M <= 32 ? 12 : ts.M <= 64 ? 22 : 14);
      DS_CHECK(med == 14 || med == 12 || med == 22, "DS_INT4_MED: expected 14, 12 or 22, got ", med);
      const int64_t gy2 = (ts.M + 15) / 16;
      if (med == 12) return launch_wk<1, 2, false>(wk, A, B, x, ts, gy2, s, C);
      if (med == 22) return launch_wk<2, 2, false>(wk, A, B, x, ts, gy2, s, C);
    }
  return launch_wk<1, 4, GATED>(wk, A, B, x, ts, gy, s, C);
}

}  // namespace

void mma_int4_pack_tile(const int32_t* qweight, int64_t Np, int64_t K, int64_t tile, int64_t n0, uint32_t* dst) {
  const int64_t KC = K / 64, dt = n0 / 16 + tile;
  // Nibbles k..k+3 of row r in the low 16 bits (k a multiple of 4: they never straddle a word).
  auto quad = [&](int64_t r, int64_t k) { return (uint32_t(qweight[(k / 8) * Np + r]) >> (4 * (k % 8))) & 0xFFFFu; };
  for (int64_t kc = 0; kc < KC; ++kc)
    for (int lane = 0; lane < 32; ++lane) {
      const int64_t r0 = 16 * tile + lane / 4, r1 = r0 + 8;
      for (int j = 0; j < 4; ++j) {
        const int64_t kb = 64 * kc + 16 * (lane % 4) + 4 * j;
        const uint32_t a = quad(r0, kb), b = quad(r1, kb);
        // nibble i of a/b is input kb + i; destination order (r0,kb) (r1,kb) (r0,kb+2) (r1,kb+2) (r0,kb+1) ...
        dst[((dt * KC + kc) * 32 + lane) * 4 + j] =
            (a & 0xFu) | (b & 0xFu) << 4 | (a >> 8 & 0xFu) << 8 | (b >> 8 & 0xFu) << 12 | (a >> 4 & 0xFu) << 16 |
            (b >> 4 & 0xFu) << 20 | (a >> 12 & 0xFu) << 24 | (b >> 12 & 0xFu) << 28;
      }
    }
}

int mma_int4_nibble(const uint32_t* packed, int64_t K, int64_t n, int64_t k) {
  const int64_t KC = K / 64, tile = n / 16, rr = n % 16, kc = k / 64, kin = k % 64;
  const int lane = int(4 * (rr % 8) + kin / 16), j = int((kin % 16) / 4), off = int(kin % 4);
  const int pos = int(rr / 8) + ((off & 2) ? 2 : 0) + ((off & 1) ? 4 : 0);
  return int((packed[((tile * KC + kc) * 32 + lane) * 4 + j] >> (4 * pos)) & 0xFu);
}

void mma_int4_linear(const MmaInt4& W, const void* x, int64_t M, void* y, int ydt, cudaStream_t s) {
  mma_int4_linear2(W, y, ydt, nullptr, nullptr, 0, x, M, s);
}

void mma_int4_linear2(const MmaInt4& A, void* ya, int ydta, const MmaInt4* B, void* yb, int ydtb, const void* x,
                      int64_t M, cudaStream_t s, const MmaInt4* C, void* yc, int ydtc) {
  if (M == 0) return;
  DS_CHECK(M < (int64_t(1) << 31), "int4 mma: ", M, " rows (fewer than 2^31)");
  DS_CHECK(!B || (B->K == A.K && B->G == A.G && B->KS == A.KS), "int4 mma pair: both matrices must share K and groups");
  DS_CHECK(!C || (B && C->K == A.K && C->G == A.G && C->KS == A.KS),
           "int4 mma: a third matrix needs a second and the same K and groups");
  // DS_INT4_SMALL_MAX_M=n: the decode shape up to n rows (8; benchmark knob, same bits).
  const Shape shape = M <= env_int("DS_INT4_SMALL_MAX_M", 8) ? Shape::Small : M <= 256 ? Shape::Medium : Shape::Large;
  TokenSrc ts;
  ts.M = M;
  // Decode shape: each warp sends its first DS_INT4_PREWAIT groups (8: a K = 4096 slice; 0 = none) toward L2 before
  // the PDL wait. Batch 1 −0.05 ms, batch 8 −0.02; in the medium shape (several waves) it cost batch 64 0.1–0.25 ms
  // (bench/RESULTS.md session 10), so not there.
  ts.pre = shape == Shape::Small ? prewait_groups() : 0;
  const Int4Out oa{A, A.N, A.N, ya, ydta};
  Int4Out ob, oc;
  if (B) ob = Int4Out{*B, B->N, B->N, yb, ydtb};
  if (C) oc = Int4Out{*C, C->N, C->N, yc, ydtc};
  const bool big = M >= int4_gemm_min_m() && int4_gemm_enabled();
  if (C && (big || (shape == Shape::Medium && int4_wg_enabled()))) {  // kernels of at most two matrices
    mma_int4_linear2(A, ya, ydta, B, yb, ydtb, x, M, s);
    return mma_int4_linear(*C, x, M, yc, ydtc, s);
  }
  if (big)  // prefill sizes: the large-M kernel (int4_gemm.h)
    return int4_gemm(false, oa, B ? &ob : nullptr, x, ts, (M + kGemmTok - 1) / kGemmTok, s);
  // The medium shape through Hopper's warpgroup MMA when DS_INT4_WG=1 (int4_wg.h; the same bits; off by default:
  // slower so far, docs/perf.md session 13).
  if (shape == Shape::Medium && int4_wg_linear2(oa, B ? &ob : nullptr, x, M, s)) return;
  launch<false>(shape, oa, B ? &ob : nullptr, x, ts, (M + ntok_of(shape) - 1) / ntok_of(shape), s, 4, 1,
                C ? &oc : nullptr);
}

int64_t mma_moe_scratch_ints(int64_t P, int64_t E) { return P + 3 * max_tiles(P, E, ntok_of(Shape::Small)) + 1; }

void mma_moe(const MmaInt4& gate_up, const MmaInt4& down, int64_t E, int64_t I, int64_t H, const void* x, int64_t topk,
             const int32_t* ids, int64_t P, int32_t* scratch, void* act, float* out, cudaStream_t s,
             const MoeRouteIn* route) {
  if (P == 0) return;
  DS_CHECK(E <= 1024, "int4 mma experts: E = ", E, " (at most 1024)");
  DS_CHECK(P < (int64_t(1) << 31), "int4 mma experts: ", P, " pairs (fewer than 2^31)");
  // Decode sizes: a couple of pairs per touched expert; prefill: many.
  const Shape shape = P >= 16 * E ? Shape::Large : Shape::Small;
  // Prefill sizes (many pairs per expert): tiles of up to kGemmTok pairs for the warpgroup-MMA kernels (Hopper,
  // int4_wg.h: int4_wgx_moe) or the large-M kernel (int4_gemm.h).
  const bool wgx = shape == Shape::Large && int4_wgx_enabled() && int4_wgx_fits(gate_up, down, I, H, P, topk);
  const bool big = !wgx && P >= int4_gemm_moe_min() * E && int4_gemm_enabled();
  const int ntok = big || wgx ? kGemmTok : ntok_of(shape);
  const int64_t mt = max_tiles(P, E, ntok);  // grid.y of every expert launch below
  DS_CHECK(mt <= 65535, "int4 mma experts: ", mt, " token tiles (at most 65535)");
  int32_t *list = scratch, *ntiles = scratch + P, *tiles = ntiles + 1;
  // Decode sizes from DS_INT4_MOE_WK2_MIN_P pairs on: K split over at most 2 warps (batch 64 −0.27 ms per step
  // against 4; batch 1 is faster with 4). From DS_INT4_MOE_DOWN_MT2_MIN_P pairs on: two 16-row tiles per warp in the
  // down projection (K = 512, one warp over all of K: twice the bytes per warp for the same prologue; batch 64
  // −0.68 ms, batch 8 −0.15, batch 1 +0.07, so not there). DS_INT4_MOE_DOWN_MT=1|2 forces it. Measured in session 6
  // (docs/perf.md); tiles of 4 per warp, or 2 gate/up pairs per warp, spill and were slower.
  const int wk_cap = P >= env_int("DS_INT4_MOE_WK2_MIN_P", 256) ? 2 : 4;
  const int down_mt = int(env_int("DS_INT4_MOE_DOWN_MT", P >= env_int("DS_INT4_MOE_DOWN_MT2_MIN_P", 16) ? 2 : 1));
  // The streaming kernels' pair thresholds (their other conditions are below, at the launches).
  const bool gu_stream_p = P >= env_int("DS_INT4_MOE_GU_R_MIN_P", 16);
  const bool down_stream_p = P >= env_int("DS_INT4_MOE_DOWN_TPW_MIN_P", 16);
  if (route) {
    DS_CHECK(route->ids == ids && route->T * topk == P, "int4 mma experts: the routed ids must be the experts' ids");
    // At most 32 pairs (T ≤ 4 at top-8): the one-warp table; DS_CUDA_MOE_TILES_BLOCK=1: the block's (same table up
    // to the order of pairs within an expert, which no row's bits depend on).
    const bool warp_table = P <= 32 && route->T <= 4 && !env_flag("DS_CUDA_MOE_TILES_BLOCK");
    // E ≤ 256, top-8, bf16 or fp32 logits: the compact router (DS_MOE_ROUTE_C=0: the generic one; same bits)
    const bool compact = moe_route_c_fits(E, topk, route->ldt) && env_int("DS_MOE_ROUTE_C", 1) != 0;
    auto launch_compact = [&](auto lt) {
      using LT = decltype(lt);
      const auto* lg = static_cast<const LT*>(route->logits);
      if (warp_table)
        DS_CUDA_CHECK(pdl_launch(k_moe_route_tiles_c<LT, 8>, 1, unsigned(32 * route->T), 0, s, lg, int(route->T),
                                 int(E), ntok, route->ids, route->wts, list, tiles, ntiles));
      else
        DS_CUDA_CHECK(pdl_launch(k_moe_route_tiles_cb<LT, 8>, 1, 1024, 0, s, lg, int(route->T), int(E), ntok,
                                 route->ids, route->wts, list, tiles, ntiles));
    };
    if (compact && route->ldt == kBF16)
      launch_compact(__nv_bfloat16{});
    else if (compact)
      launch_compact(float{});
    else if (warp_table)
      DS_CUDA_CHECK(pdl_launch(k_moe_route_tiles_w, 1, 128, 0, s, *route, E, topk, ntok, list, tiles, ntiles));
    else
      DS_CUDA_CHECK(pdl_launch(k_moe_route_tiles, 1, 1024, 0, s, *route, E, topk, ntok, list, tiles, ntiles));
  } else {
    DS_CUDA_CHECK(pdl_launch(k_moe_tiles, 1, 1024, 0, s, ids, P, E, ntok, list, tiles, ntiles));
  }
  DS_CUDA_CHECK(cudaGetLastError());
  TokenSrc ts;
  ts.tiles = tiles, ts.ntiles = ntiles, ts.list = list, ts.xdiv = topk;
  // The streaming kernels' rings copy each unit's scales once per row (16 lanes × 8 bytes) instead of once per lane
  // (32 lanes × 2 × 8 bytes, 4 lanes per row); DS_INT4_MOE_SCALE_ROWS=0: per lane (before session 19). Same bits.
  ts.srows = env_int("DS_INT4_MOE_SCALE_ROWS", 1) != 0;
  if (wgx) {  // x permuted into out's bytes (T·H bf16 ≤ P·H fp32), free until the down projection writes them
    return int4_wgx_moe(Int4Out{gate_up, 2 * I, I, act, int(DType::BF16)}, Int4Out{down, H, H, out, int(DType::F32)}, x,
                        P / topk, ts, mt, out, s);
  }
  if (big) {
    int4_gemm(true, Int4Out{gate_up, 2 * I, I, act, int(DType::BF16)}, nullptr, x, ts, mt, s);
    ts.xdiv = 1;
    return int4_gemm(false, Int4Out{down, H, H, out, int(DType::F32)}, nullptr, act, ts, mt, s);
  }
  // The streaming kernels (session 7) from DS_INT4_MOE_GU_R_MIN_P / DS_INT4_MOE_DOWN_TPW_MIN_P pairs on (16; batch 1's
  // 8 pairs keep k_int4_mma), where the shapes are the 35B-A3B's (gate_up K = 2048, down K = 512): DS_INT4_MOE_GU_R
  // gate/up tile pairs per block (4; 2 and 8 measured slower) and DS_INT4_MOE_DOWN_TPW output tiles per warp (8 then;
  // 4 with the ring since session 11, below). Batch 64 12.12 → 11.71 ms together (down alone 11.79), batch 8 4.70 → 4.49 (bench/RESULTS.md).
  // They read a row's 4 zero points as one 4-byte word and its 4 scales as one 8-byte word (ngroups a multiple of 4
  // for these K; the allocations' alignment, checked here).
  auto streamable = [](const MmaInt4& W) {
    return W.G == 128 && reinterpret_cast<uintptr_t>(W.z) % 4 == 0 && reinterpret_cast<uintptr_t>(W.sc) % 8 == 0;
  };
  // From DS_INT4_MOE_RING_MIN_P pairs on (32, i.e. batch 4) both streaming kernels take their tiles through a
  // DS_INT4_MOE_RING-stage cp.async ring per warp (2; 3 or 4 allowed; 0 = off), read in place, at 4 blocks per SM
  // instead of 2: batch 64 11.39 → 10.78 ms, batch 32 8.45 → 8.08 (session 9, when batch 8 was slower with it:
  // 4.41 → 4.62, so it started at 128 pairs). Since the down kernel's prologue runs before the PDL wait and takes 4
  // tiles per warp with the ring (session 11) it wins below 128 too: batch 4 3.34 → 3.32 ms, 8 4.11 → 4.04, 12
  // 5.15 → 4.82 (bench/RESULTS.md session 11, run 6). 2 stages taken into registers (3 blocks per SM) or read in place
  // at 5 blocks per SM (spills) were slower.
  const int64_t ring = P >= env_int("DS_INT4_MOE_RING_MIN_P", 32) ? env_int("DS_INT4_MOE_RING", 2) : 0;
  DS_CHECK(ring == 0 || (ring >= 2 && ring <= 4), "DS_INT4_MOE_RING: expected 0 (off) or 2-4 stages, got ", ring);
  const size_t ring_bytes = size_t(kWarps) * size_t(ring) * sizeof(StreamSmem);  // per block
  constexpr int kMaxSmem = 160 * 1024;
  static const bool smem_attrs = [] {
    for (const void* k : {reinterpret_cast<const void*>(k_int4_moe_gu<false, 2>),
                          reinterpret_cast<const void*>(k_int4_moe_gu<false, 3>),
                          reinterpret_cast<const void*>(k_int4_moe_gu<false, 4>),
                          reinterpret_cast<const void*>(k_int4_moe_down<3>),
                          reinterpret_cast<const void*>(k_int4_moe_down<4>)})
      DS_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxSmem));
    return true;
  }();
  (void)smem_attrs;
  // gate/up tile pairs per block: 4 in registers, 2 with the ring (4 blocks of 8 KB partials + 43 KB ring fit an SM).
  const int64_t gr = env_int("DS_INT4_MOE_GU_R", ring ? 2 : 4);
  // gate_up prefetches the tile after the next one into L2 (stream_prefetch); DS_INT4_MOE_PF=0: not. Batch 64
  // 11.71 → 11.37 ms (8: 4.49 → 4.41, 32: 8.68 → 8.45); in the down kernel as well 11.45 (ncu: down 48 → 55 µs,
  // gate_up 94 → 87); 2 or 4 tiles ahead slower (bench/RESULTS.md session 8, runs 4-6). Not with the ring.
  const bool pf = env_int("DS_INT4_MOE_PF", 1) != 0;
  if (shape == Shape::Small && gate_up.K == kWarps * kStreamKC * 64 && streamable(gate_up) && gate_up.KS == kWarps &&
      I % 16 == 0 && gr >= 1 && gr <= 12 && gu_stream_p) {
    const int64_t gx = (I / 16 + gr - 1) / gr;
    const size_t smem = size_t(gr) * 2 * kWarps * 4 * 32 * sizeof(float) + ring_bytes;
    DS_CHECK(smem <= size_t(kMaxSmem), "int4 mma experts: gate_up needs ", smem, " bytes of shared memory (at most ",
             kMaxSmem, ")");
    auto* k = ring == 2   ? k_int4_moe_gu<false, 2>
              : ring == 3 ? k_int4_moe_gu<false, 3>
              : ring == 4 ? k_int4_moe_gu<false, 4>
              : pf        ? k_int4_moe_gu<true>
                          : k_int4_moe_gu<false>;
    DS_CUDA_CHECK(pdl_launch(k, dim3(unsigned(gx), unsigned(mt)), dim3(kWarps * 32), smem, s, gate_up, I,
                             static_cast<__nv_bfloat16*>(act), static_cast<const __nv_bfloat16*>(x), ts, int(gr)));
  } else {
    launch<true>(shape, Int4Out{gate_up, 2 * I, I, act, int(DType::BF16)}, nullptr, x, ts, mt, s, wk_cap);
  }
  ts.xdiv = 1;
  // The down projection reads its tile entry and pair list, and sends its first weights on their way (cp.async into
  // the ring, else toward L2; the decode shape its first DS_INT4_PREWAIT groups), before its PDL wait: gate_up has
  // waited on the table's kernel before it triggers (TokenSrc::early). DS_INT4_MOE_EARLY=0: after the wait.
  ts.early = env_int("DS_INT4_MOE_EARLY", 1) != 0;
  if (ts.early && shape == Shape::Small) ts.pre = prewait_groups();
  // Output tiles per warp of the streaming down kernel: 4 with the ring (its prologue before the wait costs little,
  // and more blocks leave a shorter last wave: batch 32 7.60 → 7.51 ms, 16 and 64 within noise; 16 was slower,
  // session 11 run 4), else 8.
  // From DS_INT4_MOE_DOWN_TPW8_MIN_P pairs on (512: batch 64) 8 again with the ring: half the blocks, each warp's ring
  // running over twice the tiles (batch 64 own 32.70 → 31.77 µs per launch; batch 16 15.86 → 16.98, so not there;
  // bench/RESULTS.md session 27).
  const int64_t tpw =
      env_int("DS_INT4_MOE_DOWN_TPW", !ring || P >= env_int("DS_INT4_MOE_DOWN_TPW8_MIN_P", 512) ? 8 : 4);
  if (shape == Shape::Small && down.K == kStreamKC * 64 && streamable(down) && down.KS == kStreamKC / 2 &&
      H % 16 == 0 && tpw >= 1 && down_stream_p) {
    const int64_t gx = (H / 16 + kWarps * tpw - 1) / (kWarps * tpw);
    auto* k = ring == 2   ? k_int4_moe_down<2>
              : ring == 3 ? k_int4_moe_down<3>
              : ring == 4 ? k_int4_moe_down<4>
                          : k_int4_moe_down<0>;
    DS_CUDA_CHECK(pdl_launch(k, dim3(unsigned(gx), unsigned(mt)), dim3(kWarps * 32), ring_bytes, s, down, H, out,
                             static_cast<const __nv_bfloat16*>(act), ts, int(tpw)));
    return;
  }
  launch<false>(shape, Int4Out{down, H, H, out, int(DType::F32)}, nullptr, act, ts, mt, s, wk_cap, down_mt);
}

}  // namespace ds::cuda
