// Hopper warpgroup-MMA W4A16 linears for 9 .. 256 tokens (int4_wg.h). Compiled for sm_90a only (CMakeLists.txt).
//
// One block = WK warpgroups (4 warps each); a warpgroup = 64 output rows (warp w: the 16-row tile 4·blockIdx.x + w of
// the mma layout, int4_mma.h) × NTOK tokens (tile blockIdx.y) over K / WK (whole slices), one quantisation group
// (128 inputs = 8 k16 steps) per iteration:
//   - first, all of the warpgroup's activations go to shared memory as the B operand (K-major, 128-byte swizzle: a
//     token's 64 inputs of a chunk in one 128-byte row), with the inputs of each k16 step permuted exactly as the mma
//     layout permutes them for k_int4_mma's B fragments (step j of chunk c takes inputs 64c + 16t + 4j + {0..3},
//     t = 0..3): a thread loads 16-byte pieces of a token row and writes whole 16-byte chunks; one proxy fence;
//   - each lane loads its packed words of a group (two uint4, as k_int4_mma does) two groups ahead in registers, and
//     dequantises the next group's 8 A fragments (wgmma's A register fragment per warp is mma.m16n8k16's) while the
//     current group's 8 `wgmma.m64nNTOKk16` run;
//   - the group's partial (fresh fp32 accumulators, then the 8 steps) times the group's scale is added to the slice
//     partial; at a slice's end the slice partial is added to the total, slices in order.
// The bits equal k_int4_mma's (CudaOps.Int4Wgmma, 1,638 comparisons on an H200). The speed does not yet: 1.7–1.8× the
// mma.sync kernels' time (docs/perf.md, session 13), so it is off unless DS_INT4_WG=1. What was measured: with one
// warpgroup per SM (128–255 registers a thread) the loop is bound by instruction latency (~175 instructions per warp
// and group for 8 wgmma, ncu "wait" + "selected" 60% of stalls); two-stage activation rings with a proxy fence per
// group (its MEMBAR waits for every load in flight, the weights' too) and L2 prefetch of the weights changed nothing;
// an unswizzled B layout had shared-memory bank conflicts.
#include <cuda_bf16.h>

#include <type_traits>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/int4_mma_dev.cuh"
#include "backend/cuda/int4_wg.h"
#include "backend/cuda/pdl.h"
#include "backend/cuda/sm90a/wgmma.cuh"
#include "core/dtype.h"
#include "core/env.h"
#include "core/status.h"

namespace ds::cuda {

namespace {

using namespace int4dev;
using namespace wgmma;


// A lane's pieces of one quantisation group: its two packed uint4 (chunks 2gi, 2gi + 1), the zero points (raw
// bytes: nothing may use a loaded value before the group is dequantised, or the in-order warp stalls on the load
// there; session 13's first version formed zero_pair at load time and ran at one DRAM latency per group) and the
// scales of its rows g, g + 8.
struct WgPkg {
  uint4 w0, w1;
  uint8_t z0, z1;
  float s0, s1;
};

// Staging: a group's activations as 4·NTOK units (chunk c, token n, half b); unit q: n % 8 = q % 8, b = (q / 8) % 2,
// then n / 8 and c. A unit loads the token's inputs 64c + 16m + 8b + {0..7}, m = 0..3 (4 × 16 bytes), which are
// exactly the 4 logical 16-byte chunks 4b .. 4b + 3 of the token's row of chunk c: logical chunk 2j + hh holds the
// 8 inputs of k16 step j's half hh (its word m is the input pair 64c + 16m + 4j + 2hh). Eight consecutive lanes
// (8 consecutive tokens) write 8 different swizzled chunk positions: no bank conflicts.
template <int NTOK>
struct WgStage {
  static constexpr int kUnits = 4 * NTOK;
  static constexpr int kPerThread = kUnits >= 128 ? kUnits / 128 : 1;
  // [chunk 2][token NTOK][8 × 16 bytes, swizzled]
  uint4 v[2 * NTOK * 8];
};

// Dynamic shared memory of a block: each warpgroup's activations for all of its groups (NGW = K / 128 / WK group
// stages, 1024-byte aligned inside the allocation) and the slice partials of warpgroups 1 .. WK − 1
// ([KS − spw][NTOK / 2][128] floats).
template <int NTOK, int WK>
constexpr size_t wg_smem_bytes(int64_t K, int KS) {
  return 1024 + size_t(K / 128) * sizeof(WgStage<NTOK>) + size_t(KS - KS / WK) * (NTOK / 2) * 128 * sizeof(float);
}
constexpr int kWgMaxSmem = 227 * 1024;

// WK warpgroups per block split K: warpgroup w takes the slices [w·spw, (w + 1)·spw) (spw = KS / WK); warpgroup 0
// keeps the running total, the others leave each slice's partial in shared memory, and warpgroup 0 adds them in
// slice order at the end, which is the order a single warpgroup (or k_int4_mma) adds them in.
template <int NTOK, int WK>
__global__ void __launch_bounds__(128 * WK, 1)
    k_int4_wg(const Int4Pair P, const __nv_bfloat16* __restrict__ x, int64_t M) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using St = WgStage<NTOK>;
  constexpr int NA = NTOK / 2;  // accumulator registers per thread
  extern __shared__ unsigned char wg_smem[];
  const uint32_t sraw = uint32_t(__cvta_generic_to_shared(wg_smem));
  unsigned char* const sal = wg_smem + (((sraw + 1023) & ~1023u) - sraw);
  const int wgi = int(threadIdx.x >> 7), tid = int(threadIdx.x & 127);
  const bool second = blockIdx.x >= P.b_block;
  const MmaInt4 W = second ? P.b.W : P.a.W;
  const int64_t n_out = second ? P.b.n_out : P.a.n_out;
  void* const y = second ? P.b.y : P.a.y;
  const int ydt = second ? P.b.ydt : P.a.ydt;
  const unsigned bx = second ? blockIdx.x - P.b_block : blockIdx.x;
  const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
  const int64_t otiles = n_out / 16, ot_raw = int64_t(bx) * 4 + warp;
  const int64_t ot = ot_raw < otiles ? ot_raw : otiles - 1;  // out-of-range tiles compute, never store
  const int64_t KC = W.K / 64, NGA = W.K / W.G, gps = NGA / W.KS;
  const int spw = W.KS / WK;                           // slices per warpgroup
  const int64_t gb = int64_t(wgi) * spw * gps, NG = spw * gps;  // this warpgroup's first group and group count
  St* const stage = reinterpret_cast<St*>(sal) + gb;  // this warpgroup's groups (both matrices of a pair share K)
  float* const red = reinterpret_cast<float*>(sal + size_t(NGA) * sizeof(St));
  const int64_t r0 = ot * 16 + g;
  const uint4* wp = W.qw + ot * KC * 32 + lane;
  const uint8_t *zp0 = W.z + r0 * NGA + gb, *zp1 = zp0 + 8 * NGA;
  const uint16_t *sp0 = W.sc + r0 * NGA + gb, *sp1 = sp0 + 8 * NGA;
  const int64_t t0 = int64_t(blockIdx.y) * NTOK;
  const int cnt = int(M - t0 < NTOK ? M - t0 : NTOK);

  auto load_pkg = [&](int64_t gi, WgPkg& p) {
    p.w0 = __ldg(wp + (2 * (gb + gi)) * 32);
    p.w1 = __ldg(wp + (2 * (gb + gi) + 1) * 32);
    p.z0 = zp0[gi];
    p.z1 = zp1[gi];
    p.s0 = sc_f(sp0[gi]);
    p.s1 = sc_f(sp1[gi]);
  };
  auto dequant_pkg = [&](const WgPkg& p, uint32_t (&a)[8][4]) {
    dequant_group(p.w0, p.w1, zero_pair(p.z0), zero_pair(p.z1), a);
  };
  // Staging units of this thread (see WgStage) and their token rows.
  const __nv_bfloat16* xrow[St::kPerThread];
  int soff[St::kPerThread];  // uint4 index of the unit's row within a stage
  int sxor[St::kPerThread];  // its swizzle, n % 8
  bool sact[St::kPerThread];
#pragma unroll
  for (int u = 0; u < St::kPerThread; ++u) {
    const int q = tid + 128 * u;
    sact[u] = q < St::kUnits;
    const int nlo = q & 7, b = (q >> 3) & 1, rest = q >> 4;
    const int n = (rest % (NTOK / 8)) * 8 + nlo, c = rest / (NTOK / 8);
    const int nn = n < cnt ? n : 0;  // padding tokens stage token 0 (columns are independent, never stored)
    xrow[u] = x + (t0 + nn) * W.K + gb * 128 + 64 * c + 8 * b;
    soff[u] = (c * NTOK + n) * 8;
    sxor[u] = (n & 7) ^ (4 * b);
  }
  auto load_x = [&](int64_t gi, uint4 (&xs)[St::kPerThread][4]) {
#pragma unroll
    for (int u = 0; u < St::kPerThread; ++u)
      if (sact[u])
#pragma unroll
        for (int m = 0; m < 4; ++m) xs[u][m] = __ldg(reinterpret_cast<const uint4*>(xrow[u] + gi * 128 + 16 * m));
  };
  auto store_x = [&](St& s, const uint4 (&xs)[St::kPerThread][4]) {
#pragma unroll
    for (int u = 0; u < St::kPerThread; ++u)
      if (sact[u]) {
        uint4* d = s.v + soff[u];  // logical chunk 4b + i at (4b + i) ^ (n % 8) = i ^ sxor
        d[0 ^ sxor[u]] = make_uint4(xs[u][0].x, xs[u][1].x, xs[u][2].x, xs[u][3].x);  // step 2b, hh 0
        d[1 ^ sxor[u]] = make_uint4(xs[u][0].y, xs[u][1].y, xs[u][2].y, xs[u][3].y);  // step 2b, hh 1
        d[2 ^ sxor[u]] = make_uint4(xs[u][0].z, xs[u][1].z, xs[u][2].z, xs[u][3].z);  // step 2b + 1, hh 0
        d[3 ^ sxor[u]] = make_uint4(xs[u][0].w, xs[u][1].w, xs[u][2].w, xs[u][3].w);  // step 2b + 1, hh 1
      }
  };
  // Descriptor of group gi's step k: the base's address field plus (offset >> 4).
  const uint64_t dbase = smem_desc_sw128(uint32_t(__cvta_generic_to_shared(stage)));

  WgPkg pk[2];
  load_pkg(0, pk[0]);  // weights are no kernel's output: before the wait
  if (NG > 1) load_pkg(1, pk[1]);
  pdl_wait();  // launched with pdl_launch: x and y belong to earlier kernels
  pdl_trigger();
  // All of this warpgroup's activations into shared memory at once, with one proxy fence: the fence
  // (fence.proxy.async: MEMBAR.ALL.CTA + FENCE.VIEW.ASYNC) waits for every load the thread has in flight, so a fence
  // per group (session 13's first version, two stages) waited on the weight loads meant to be two groups ahead.
  // XB groups' loads in flight at a time.
  constexpr int XB = 8 / St::kPerThread;
  for (int64_t g0 = 0; g0 < NG; g0 += XB) {
    uint4 xs[XB][St::kPerThread][4];
#pragma unroll
    for (int b = 0; b < XB; ++b)
      if (g0 + b < NG) load_x(g0 + b, xs[b]);
#pragma unroll
    for (int b = 0; b < XB; ++b)
      if (g0 + b < NG) store_x(stage[g0 + b], xs[b]);
  }
  fence_async_smem();
  uint32_t A[2][8][4];
  dequant_pkg(pk[0], A[0]);
  float s_cur0 = pk[0].s0, s_cur1 = pk[0].s1;
  if (NG > 2) load_pkg(2, pk[0]);
  // This warpgroup's barrier (ids 1 .. WK; 0 is __syncthreads').
  asm volatile("bar.sync %0, 128;\n" ::"r"(wgi + 1) : "memory");

  float tmp[NA], part[NA], acc[NA];
#pragma unroll
  for (int i = 0; i < NA; ++i) tmp[i] = 0.f, part[i] = 0.f, acc[i] = 0.f;

  int gleft = int(gps);  // groups left in this slice
  int sl = wgi * spw;    // the slice
  // One group: A[PAR] holds group gi's fragments; pk[PAR ^ 1] group gi + 1's pieces.
  auto body = [&](auto par_c, int64_t gi) {
    constexpr int PAR = decltype(par_c)::value;
    reg_fence(tmp);
    wg_fence();
#pragma unroll
    for (int k = 0; k < 8; ++k)
      Wg<NTOK>::mma(tmp, A[PAR][k], dbase + uint64_t((gi * NTOK * 256 + (k >> 2) * NTOK * 128 + 32 * (k & 3)) >> 4));
    wg_commit();
    float s_nx0 = 0.f, s_nx1 = 0.f;
    if (gi + 1 < NG) {
      dequant_pkg(pk[PAR ^ 1], A[PAR ^ 1]);
      s_nx0 = pk[PAR ^ 1].s0, s_nx1 = pk[PAR ^ 1].s1;
      if (gi + 3 < NG) load_pkg(gi + 3, pk[PAR ^ 1]);
    }
    wg_wait<0>();
    reg_fence(tmp);
    scale_add(part, tmp, s_cur0, s_cur1);
#pragma unroll
    for (int i = 0; i < NA; ++i) tmp[i] = 0.f;
    if (--gleft == 0) {  // the slice's end
      gleft = int(gps);
      if (wgi == 0) {
#pragma unroll
        for (int i = 0; i < NA; ++i) acc[i] = sl == 0 ? part[i] : acc[i] + part[i];
      } else {
#pragma unroll
        for (int i = 0; i < NA; ++i) red[(int64_t(sl - spw) * NA + i) * 128 + tid] = part[i];
      }
#pragma unroll
      for (int i = 0; i < NA; ++i) part[i] = 0.f;
      ++sl;
    }
    s_cur0 = s_nx0, s_cur1 = s_nx1;
  };
  for (int64_t gi = 0; gi < NG; gi += 2) {
    body(std::integral_constant<int, 0>{}, gi);
    if (gi + 1 < NG) body(std::integral_constant<int, 1>{}, gi + 1);
  }

  if constexpr (WK > 1) {
    __syncthreads();
    if (wgi > 0) return;
    for (int sx = spw; sx < W.KS; ++sx)
#pragma unroll
      for (int i = 0; i < NA; ++i) acc[i] += red[(int64_t(sx - spw) * NA + i) * 128 + tid];
  }
  if (ot_raw >= otiles) return;
  for_fragment_tokens<NTOK>(tig, cnt, [&](int i, int h, int ti) {
    const int64_t p = t0 + ti;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int64_t n = ot * 16 + g + 8 * rr;
      const float v = acc[4 * i + 2 * rr + h];
      if (ydt == int(DType::F32))
        static_cast<float*>(y)[p * n_out + n] = v;
      else
        static_cast<__nv_bfloat16*>(y)[p * n_out + n] = __float2bfloat16_rn(v);
    }
  });
#endif
}

template <int NTOK, int WK>
void launch_wg(const Int4Pair& P, unsigned nb, const void* x, int64_t M, cudaStream_t s) {
  const int64_t gy = (M + NTOK - 1) / NTOK;
  DS_CHECK(gy <= 65535, "int4 wgmma: ", gy, " token tiles (at most 65535)");
  const size_t smem = wg_smem_bytes<NTOK, WK>(P.a.W.K, P.a.W.KS);
  static const bool attr = [] {
    DS_CUDA_CHECK(cudaFuncSetAttribute(k_int4_wg<NTOK, WK>, cudaFuncAttributeMaxDynamicSharedMemorySize, kWgMaxSmem));
    return true;
  }();
  (void)attr;
  DS_CUDA_CHECK(pdl_launch(k_int4_wg<NTOK, WK>, dim3(nb, unsigned(gy)), dim3(128 * WK), smem, s, P,
                           static_cast<const __nv_bfloat16*>(x), M));
}
template <int NTOK>
void launch_wg_wk(int wk, const Int4Pair& P, unsigned nb, const void* x, int64_t M, cudaStream_t s) {
  if (wk == 2) return launch_wg<NTOK, 2>(P, nb, x, M, s);
  launch_wg<NTOK, 1>(P, nb, x, M, s);
}

}  // namespace

bool int4_wg_enabled() {
  // Off by default (slower than the mma.sync kernels so far: docs/perf.md, session 13); DS_INT4_WG=1 turns it on,
  // read on every call so that one process can compare both.
  return wgmma::sm90_device() && env_int("DS_INT4_WG", 0) != 0;
}

bool int4_wg_linear2(const Int4Out& A, const Int4Out* B, const void* x, int64_t M, cudaStream_t s) {
  if (M <= 0 || !int4_wg_enabled()) return false;
  if (A.W.G != 128 || (B && B->W.G != 128) || A.W.KS > 4) return false;
  unsigned nb = 0;  // 64 rows (4 tiles) per warpgroup
  const Int4Pair P = int4_pair(A, B, [](const Int4Out& o) { return unsigned((o.n_out / 16 + 3) / 4); }, &nb);
  const int sms = device_sm_count();
  // Warpgroups splitting K (1 or 2; DS_INT4_WG_WK) and tokens per block (16, 32 or 64; DS_INT4_WG_NTOK): by default
  // the fewest tokens' tile covering M (at most 64), then, while the launch has fewer warpgroups than SMs, K split
  // over 2 warpgroups and then half the tokens per block (the 2048-row projections: 32 row blocks).
  int64_t ntok = M <= 16 ? 16 : M <= 32 ? 32 : 64;
  int64_t wk = 1;
  auto wgs = [&] { return int64_t(nb) * ((M + ntok - 1) / ntok) * wk; };
  if (wgs() < sms && A.W.KS % 2 == 0) wk = 2;
  if (wgs() < sms && ntok > 16) ntok /= 2;
  ntok = env_int("DS_INT4_WG_NTOK", ntok);
  wk = env_int("DS_INT4_WG_WK", wk);
  DS_CHECK(ntok == 16 || ntok == 32 || ntok == 64, "DS_INT4_WG_NTOK: expected 16, 32 or 64, got ", ntok);
  DS_CHECK(wk == 1 || wk == 2, "DS_INT4_WG_WK: expected 1 or 2, got ", wk);
  if (A.W.KS % wk != 0) wk = 1;
  // The activations of all of K stay in shared memory: fewer tokens per block where they would not fit, and the
  // mma.sync kernels where even 16 do not.
  auto bytes = [&] {
    return ntok == 16 ? wg_smem_bytes<16, 1>(A.W.K, A.W.KS) : ntok == 32 ? wg_smem_bytes<32, 1>(A.W.K, A.W.KS)
                                                                         : wg_smem_bytes<64, 1>(A.W.K, A.W.KS);
  };
  while (bytes() + size_t(A.W.KS) * (ntok / 2) * 128 * 4 > size_t(kWgMaxSmem) && ntok > 16) ntok /= 2;
  if (bytes() + size_t(A.W.KS) * (ntok / 2) * 128 * 4 > size_t(kWgMaxSmem)) return false;
  if (ntok == 16) launch_wg_wk<16>(int(wk), P, nb, x, M, s);
  else if (ntok == 32) launch_wg_wk<32>(int(wk), P, nb, x, M, s);
  else launch_wg_wk<64>(int(wk), P, nb, x, M, s);
  return true;
}

}  // namespace ds::cuda
