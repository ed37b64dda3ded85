// Large-M W4A16 tensor-core kernel (see int4_gemm.h; layout and batch invariance: int4_mma.h).
//
// Block: 8 warps over 128 output rows (GATED: 64 gate + the matching 64 up rows, 64 outputs) × 128 tokens. Warp
// tile (WarpTile): 2 weight tiles of 16 rows × 8 token tiles of 8, warps 4 along the rows × 2 along the tokens
// (default), or 4 × 4 tiles, 2 × 4 warps (DS_INT4_BIG_WARP=4).
// Shared memory, per stage (one quantisation group of 128 inputs): the 128 token rows (bf16, rows padded to 272 B so
// the 16-byte fragment loads of a quarter warp hit 8 distinct bank quads) and the block's 8 weight tiles × 2 chunks
// of the packed mma layout (1 KB each, contiguous in global memory). 3 stages in flight with cp.async.
// Per lane and group: tmp (fresh group partial, 64 fp32), part (slice partial, 64 fp32); the finished slices'
// running sum lives in shared memory (lane-private, 64 fp32), so the per-element sequence is exactly k_int4_mma's:
//   tmp = Σ over the group's 8 k16 steps (mma, same fragments, same order); part += scale · tmp (group order);
//   acc = part (slice 0), acc = acc + part (later slices, in order).
// Per group and warp (default tile): 16 dequantised A fragments, each feeding 8 mma; 32 16-byte shared loads of
// activations (each 2 B fragments), each fragment feeding 2 mma; 128 mma in all.
#include "backend/cuda/int4_gemm.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/mma_util.cuh"
#include "backend/cuda/pdl.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "core/dtype.h"
#include "core/env.h"
#include "core/status.h"

namespace ds::cuda {

namespace {

using namespace int4dev;


constexpr int kGW = 8;                           // warps per block
constexpr int kBlockTiles = 8;                   // weight tiles of 16 rows per block (128 rows; GATED: 64 + 64)
constexpr int kStages = 3;                       // groups in flight
constexpr int kRowH = 128 + 8;                   // bf16 per token row in shared memory
constexpr int kActBytes = kGemmTok * kRowH * 2;  // one group of the block's tokens
constexpr int kWBytes = kBlockTiles * 2 * 32 * 16;  // one group of the block's weight tiles (2 chunks of 64 inputs)
constexpr int kStageBytes = kActBytes + kWBytes;
constexpr int kAccFloats = 64;  // per lane: MW tiles × NT token tiles × 4
constexpr int kSmem = kGemmTok * 8 + kStages * kStageBytes + kGW * kAccFloats * 32 * 4;
// Warp tile: MW weight tiles of 16 rows × NT token tiles of 8, MW·NT = 16 (MW = 2: 32 rows × 64 tokens, warps 4
// along the rows × 2 along the tokens; MW = 4: 64 rows × 32 tokens, 2 × 4 warps: half the activation loads from
// shared memory, twice the dequantisation).
template <int MW>
struct WarpTile {
  static constexpr int NT = 16 / MW, WT = kGemmTok / (8 * NT), WR = kGW / WT;
  static_assert(MW * NT * 4 == kAccFloats && WR * MW == kBlockTiles, "int4 gemm: warp tile");
};
static_assert(kSmem <= 227 * 1024, "int4 gemm: shared memory");

// GATED: the experts' gate_up (each warp's first kMW / 2 tiles gate, the rest the matching up tiles), output bf16
// silu(gate)·up; else Int4Pair (one or two matrices, row blocks [0, b_block) of matrix a) with output dtype ydt.
// Token tile blockIdx.y (source as k_int4_mma); row blocks [blockIdx.x·R, +R) one after the other, the pipeline
// running on across them (the next row block's first groups load while the current one finishes), so a block's
// start-up latency is paid once per R row blocks.
template <int kMW, bool GATED>
__global__ void __launch_bounds__(kGW * 32, 1)
    k_int4_gemm(const Int4Pair P, unsigned nbx, unsigned R, const __nv_bfloat16* __restrict__ x, TokenSrc ts) {
  extern __shared__ __align__(16) unsigned char smem[];
  int64_t* rowoff = reinterpret_cast<int64_t*>(smem);  // x offset of each token row of the block (−1: padding)
  unsigned char* stages = smem + kGemmTok * 8;
  float* accs = reinterpret_cast<float*>(stages + kStages * kStageBytes);

  constexpr int MT = GATED ? kMW / 2 : kMW;  // output tiles per warp
  constexpr int kNT = WarpTile<kMW>::NT, kWR = WarpTile<kMW>::WR;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, wr = warp % kWR, wt = warp / kWR;
  const int g = lane >> 2, tig = lane & 3;
  pdl_wait();
  pdl_trigger();

  int64_t e, t0;
  int cnt;
  if (ts.tiles) {
    if (int(blockIdx.y) >= *ts.ntiles) return;  // block-uniform
    const int32_t* tl = ts.tiles + 3 * blockIdx.y;
    e = tl[0], t0 = tl[1], cnt = tl[2];
  } else {
    e = 0, t0 = int64_t(blockIdx.y) * kGemmTok;
    cnt = int(ts.M - t0 < kGemmTok ? ts.M - t0 : kGemmTok);
  }
  const int64_t K = P.a.W.K, KC = K / 64, ngroups = K / P.a.W.G;  // shared by a and b
  const int gps = int(ngroups) / P.a.W.KS;                          // groups per slice
  const int KS = P.a.W.KS;
  if (tid < kGemmTok) {
    int64_t off = -1;
    if (tid < cnt) {
      const int64_t p = ts.list ? ts.list[t0 + tid] : t0 + tid;
      off = x_row(ts, p) * K;
    }
    rowoff[tid] = off;
  }
  const unsigned rb0 = blockIdx.x * R, nit = min(R, nbx - rb0);  // this block's row blocks
  // Steps: row block rb0 + v / ngroups, group v % ngroups, stage v % kStages; the loader, the scale prefetch and the
  // compute each keep their own cursor (no divisions in the loop).
  const int ng = int(ngroups), nsteps = int(nit) * ng;
  // Global weight tile of block slot i (warp row i / kMW, tile u = i % kMW; GATED: u ≥ MT is the up tile of u − MT)
  // in row block rb.
  auto wtile = [&](unsigned rb, int i) -> int64_t {
    const bool second = rb >= P.b_block;
    const Int4Out& o = second ? P.b : P.a;
    const unsigned bx = second ? rb - P.b_block : rb;
    const int r = i / kMW, u = i % kMW;
    int64_t ot = (int64_t(bx) * kWR + r) * MT + u % MT;
    if (ot >= o.n_out / 16) ot = o.n_out / 16 - 1;  // out-of-range tiles compute, never store
    return e * (o.rpe / 16) + ot + (u >= MT ? o.n_out / 16 : 0);
  };
  __syncthreads();  // rowoff

  // Stage of the next step to load: the block's 128 token rows × group l_gi, and its 8 weight tiles' 2 chunks of
  // the group in row block l_rb (thread: 2 of the 512 uint4, slot i / 64, uint4 i % 64).
  unsigned l_rb = rb0;
  int l_gi = 0, l_st = 0;
  auto load_next = [&]() {
    unsigned char* st = stages + l_st * kStageBytes;
    const unsigned rb = l_rb;
    const int gi = l_gi;
    if (++l_gi == ng) l_gi = 0, ++l_rb;
    if (++l_st == kStages) l_st = 0;
    const int ch = tid % 16;
#pragma unroll
    for (int q = 0; q < kGemmTok * 16 / (kGW * 32); ++q) {
      const int row = tid / 16 + (kGW * 32 / 16) * q;
      const int64_t off = rowoff[row];
      const __nv_bfloat16* src = off >= 0 ? x + off + int64_t(gi) * 128 + ch * 8 : x;
      cp_async16(st + (row * kRowH + ch * 8) * 2, src, off >= 0 ? 16 : 0);
    }
    const uint4* qw = rb >= P.b_block ? P.b.W.qw : P.a.W.qw;
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int i = tid + kGW * 32 * q;
      cp_async16(st + kActBytes + i * 16, qw + (wtile(rb, i / 64) * KC + 2 * gi) * 32 + i % 64, 16);
    }
  };
  // Zero points and scales of group gi of row block rb for this lane's rows (row g and g + 8 of each of its kMW tiles).
  uint8_t zn[kMW][2];
  float sn[kMW][2];
  auto load_zs = [&](unsigned rb, int gi) {
    const MmaInt4& W = rb >= P.b_block ? P.b.W : P.a.W;
#pragma unroll
    for (int u = 0; u < kMW; ++u) {
      const int64_t r0 = wtile(rb, wr * kMW + u) * 16 + g;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        zn[u][h] = W.z[(r0 + 8 * h) * ngroups + gi];
        sn[u][h] = sc_f(W.sc[(r0 + 8 * h) * ngroups + gi]);
      }
    }
  };
  // Token tiles of this warp holding at least one real token (warp-uniform).
  const int ntv = max(0, min(kNT, (cnt - wt * kNT * 8 + 7) / 8));

#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < nsteps) load_next();
    cp_async_commit();
  }
  unsigned z_rb = rb0;
  int z_gi = 0;
  load_zs(z_rb, z_gi);

  float part[kMW][kNT][4];
  zero_frags(part);
  // Compute cursor: row block, group, stage; group within the slice, slice.
  unsigned c_rb = rb0;
  int gi = 0, c_st = 0, sg = 0, s = 0;
  for (int v = 0; v < nsteps; ++v) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // step v landed for every thread; everyone is done with the stage that is refilled next
    if (v + kStages - 1 < nsteps) load_next();
    cp_async_commit();
    uint32_t zz[kMW][2];
    float sc[kMW][2];
#pragma unroll
    for (int u = 0; u < kMW; ++u)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        zz[u][h] = zero_pair(zn[u][h]);
        sc[u][h] = sn[u][h];
      }
    if (v + 1 < nsteps) {
      if (++z_gi == ng) z_gi = 0, ++z_rb;
      load_zs(z_rb, z_gi);
    }
    // One group's products for the warp's first NTU token tiles (NTU = kNT, or kNT / 2 when the second half of the
    // warp's tokens is padding), straight-line code: per chunk and 16-step pair, the B fragments of all NTU token
    // tiles are loaded, then each 16-step's A fragments are dequantised and feed kMW × NTU independent mma, so
    // every accumulator's chain of 8 dependent mma is interleaved with the others. The order of the mma on each
    // tmp[u][nt] is k_int4_mma's (chunk 0 steps 0..3, chunk 1 steps 0..3).
    auto group = [&](auto ntu) {
      constexpr int NTU = decltype(ntu)::value;
      const unsigned char* st = stages + c_st * kStageBytes;
      const uint4* wsm = reinterpret_cast<const uint4*>(st + kActBytes) + wr * kMW * 64 + lane;
      const __nv_bfloat16* xs = reinterpret_cast<const __nv_bfloat16*>(st) + (wt * kNT * 8 + g) * kRowH + 16 * tig;
      float tmp[kMW][NTU][4];
      zero_frags(tmp);
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        uint4 wv[kMW];
#pragma unroll
        for (int u = 0; u < kMW; ++u) wv[u] = wsm[u * 64 + c * 32];
#pragma unroll
        for (int jp = 0; jp < 2; ++jp) {
          uint4 xv[NTU];  // inputs 16·tig + 8·jp + 0..7 of the chunk: steps j = 2·jp, 2·jp + 1
#pragma unroll
          for (int nt = 0; nt < NTU; ++nt) xv[nt] = *reinterpret_cast<const uint4*>(xs + nt * 8 * kRowH + c * 64 + 8 * jp);
#pragma unroll
          for (int jj = 0; jj < 2; ++jj) {
            uint32_t a[kMW][4];
#pragma unroll
            for (int u = 0; u < kMW; ++u) dequant(word_of(wv[u], 2 * jp + jj), zz[u][0], zz[u][1], a[u]);
#pragma unroll
            for (int nt = 0; nt < NTU; ++nt)
#pragma unroll
              for (int u = 0; u < kMW; ++u) mma16816(tmp[u][nt], a[u], word_of(xv[nt], 2 * jj), word_of(xv[nt], 2 * jj + 1));
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kMW; ++u)
#pragma unroll
        for (int nt = 0; nt < NTU; ++nt) {
          part[u][nt][0] += sc[u][0] * tmp[u][nt][0];
          part[u][nt][1] += sc[u][0] * tmp[u][nt][1];
          part[u][nt][2] += sc[u][1] * tmp[u][nt][2];
          part[u][nt][3] += sc[u][1] * tmp[u][nt][3];
        }
    };
    if (ntv > kNT / 2)
      group(std::integral_constant<int, kNT>());
    else if (ntv > 0)
      group(std::integral_constant<int, kNT / 2>());
    if (++sg == gps) {  // end of slice s: acc = part (s = 0), acc = acc + part (later), in slice order
      sg = 0;
      float* ap = accs + warp * kAccFloats * 32 + lane;
      if (s + 1 < KS) {
#pragma unroll
        for (int u = 0; u < kMW; ++u)
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              float& a = ap[((u * kNT + nt) * 4 + c) * 32];
              a = s == 0 ? part[u][nt][c] : a + part[u][nt][c];
              part[u][nt][c] = 0.f;
            }
      } else if (s > 0) {
#pragma unroll
        for (int u = 0; u < kMW; ++u)
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int c = 0; c < 4; ++c) part[u][nt][c] = ap[((u * kNT + nt) * 4 + c) * 32] + part[u][nt][c];
      }
      ++s;
    }
    const unsigned rb = c_rb;
    const bool last = gi + 1 == ng;
    if (++gi == ng) gi = 0, ++c_rb, s = 0;
    if (++c_st == kStages) c_st = 0;
    if (!last || ntv == 0) continue;
    // Row block done: store. C fragment: c[2·rr + h] is (row g + 8·rr, token 2·tig + h) of the tile.
    const bool second = rb >= P.b_block;
    const Int4Out& o = second ? P.b : P.a;
    const unsigned bx = second ? rb - P.b_block : rb;
    const int64_t n_out = o.n_out;
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      const int64_t ot = (int64_t(bx) * kWR + wr) * MT + i;
      if (ot >= n_out / 16) continue;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int ti = wt * kNT * 8 + nt * 8 + 2 * tig + h;
          if (ti >= cnt) continue;
          const int64_t p = ts.list ? ts.list[t0 + ti] : t0 + ti;
#pragma unroll
          for (int rr = 0; rr < 2; ++rr) {
            const int64_t n = ot * 16 + g + 8 * rr;
            const float val = part[i][nt][2 * rr + h];
            if constexpr (GATED) {
              static_cast<__nv_bfloat16*>(o.y)[p * n_out + n] = __float2bfloat16_rn(silu(val) * part[MT + i][nt][2 * rr + h]);
            } else if (o.ydt == int(DType::F32)) {
              static_cast<float*>(o.y)[p * n_out + n] = val;
            } else {
              static_cast<__nv_bfloat16*>(o.y)[p * n_out + n] = __float2bfloat16_rn(val);
            }
          }
        }
    }
    zero_frags(part);
  }
}

template <int MW, bool GATED>
void launch(const Int4Out& A, const Int4Out* B, const void* x, const TokenSrc& ts, int64_t gy, cudaStream_t s) {
  constexpr int rows = kBlockTiles * 16 / (GATED ? 2 : 1);  // output rows per block
  static const cudaError_t attr =
      cudaFuncSetAttribute(k_int4_gemm<MW, GATED>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  DS_CUDA_CHECK(attr);
  unsigned nb = 0;
  const Int4Pair P = int4_pair(A, B, [](const Int4Out& o) { return unsigned((o.n_out + rows - 1) / rows); }, &nb);
  DS_CHECK(gy >= 1 && gy <= 65535, "int4 gemm: ", gy, " token tiles (at most 65535)");
  DS_CHECK(A.W.G == 128 && (!B || B->W.G == 128), "int4 gemm: group size ", A.W.G, " (instantiated: 128)");
  DS_CHECK(!B || (B->W.K == A.W.K && B->W.KS == A.W.KS), "int4 gemm pair: both matrices must share K and slices");
  // Row blocks per block (one block per SM at a time; the experts' tile count gy is an upper bound, the blocks past
  // the real count exit at once); DS_INT4_BIG_R=n overrides.
  const int sms = device_sm_count();
  int64_t R = env_int("DS_INT4_BIG_R", 0);
  if (R <= 0) {
    // Waves × (R row blocks + the start-up, ~2 groups' latency, in row-block units): the fewest start-ups without a
    // ragged last wave (e.g. 64 × 32 row blocks × token tiles: R = 8, 256 blocks, 2 full waves; R = 7 would leave
    // 320 blocks, 2.4 waves).
    const double startup = 2.0 / double(A.W.K / A.W.G);
    double best = 1e300;
    for (int64_t r = 1; r <= nb; ++r) {
      const int64_t waves = ((int64_t(nb) + r - 1) / r * gy + sms - 1) / sms;
      const double cost = double(waves) * (double(r) + startup);
      if (cost < best) best = cost, R = r;
    }
  }
  R = std::min<int64_t>(R, nb);
  const unsigned gx = unsigned((nb + R - 1) / R);
  DS_CUDA_CHECK(pdl_launch(k_int4_gemm<MW, GATED>, dim3(gx, unsigned(gy)), dim3(kGW * 32), size_t(kSmem), s, P, nb,
                     unsigned(R), static_cast<const __nv_bfloat16*>(x), ts));
}

}  // namespace

bool int4_gemm_enabled() {
  const char* v = std::getenv("DS_CUDA_NO_BIG_GEMM");
  if (v && *v) return std::strcmp(v, "0") == 0;
  return kInt4GemmDefault;
}
int64_t int4_gemm_min_m() { return env_int("DS_INT4_BIG_MIN_M", 512); }
int64_t int4_gemm_moe_min() { return env_int("DS_INT4_BIG_MOE_MIN", 48); }

void int4_gemm(bool gated, const int4dev::Int4Out& A, const int4dev::Int4Out* B, const void* x,
               const int4dev::TokenSrc& ts, int64_t gy, cudaStream_t s) {
  DS_CHECK(!gated || !B, "int4 gemm: the gated form takes one matrix");
  // DS_INT4_BIG_WARP=4: warp tiles of 64 rows × 32 tokens (default 2: 32 rows × 64 tokens); same bits either way.
  if (env_int("DS_INT4_BIG_WARP", 2) == 4)
    return gated ? launch<4, true>(A, B, x, ts, gy, s) : launch<4, false>(A, B, x, ts, gy, s);
  return gated ? launch<2, true>(A, B, x, ts, gy, s) : launch<2, false>(A, B, x, ts, gy, s);
}

}  // namespace ds::cuda
