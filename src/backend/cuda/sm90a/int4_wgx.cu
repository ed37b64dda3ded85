// Hopper warpgroup-MMA kernel for the int4 routed experts at prefill sizes (int4_wg.h: int4_wgx_moe). Compiled for
// sm_90a only (CMakeLists.txt).
//
// A block is two warpgroups over one tile of k_moe_tiles (up to 128 pairs of one expert) and R row blocks:
//   - gate_up (GATED): a row block is 64 outputs; warpgroup 0 computes their 64 gate rows, warpgroup 1 the 64
//     matching up rows (warp w of a warpgroup: the 16-row tile 4·rb + w of its matrix half); at the row block's end
//     warpgroup 1 leaves its sums in shared memory and warpgroup 0 writes bf16 silu(gate)·up;
//   - down: a row block is 128 rows, 64 per warpgroup; each writes its fp32 rows.
// Per quantisation group (128 inputs, 8 k16 steps), each warpgroup issues 8 `wgmma.m64nNk16` with A = the dequantised
// weight fragments in registers (per warp exactly mma.m16n8k16's A fragment of its 16 rows, as k_int4_mma forms it)
// and B = the tile's activations in shared memory (K-major, 128-byte swizzle), and dequantises the next group while
// they run. N = 128, 64, 32 or 16 tokens: the fewest covering the tile's pairs (a ragged tile's padding costs tensor
// time only up to the next size).
// The activations come from a row-permuted copy (k_perm64, or gate_up's own output for the down projection): within
// each 64-input chunk the inputs of each k16 step, in the order k_int4_mma's B fragments hold them, are 32 contiguous
// bytes, so each 16-byte piece of a stage is one cp.async (4 stages, loaded 3 groups ahead; when the stages hold all
// of K — the down projection's 4 groups — they are loaded once per block and kept across its row blocks). Each lane
// loads its packed weights and scales into registers three groups ahead (dequantised one group ahead). One barrier
// per group: both warpgroups issue, dequantise, wait and scale in step.
// Arithmetic (int4_mma.h): per group a fresh fp32 partial of the 8 k16 steps (the same 16 products per step as
// k_int4_mma's mma.sync), times the group's scale, added to the slice partial in group order; slice partials added in
// slice order (the running sum in shared memory, lane-private; in registers where a slice is one group). The wgmma
// and mma.sync tensor paths give the same fp32 bits for the same products (docs/perf.md session 13,
// CudaOps.Int4Wgmma), so every output equals the mma.sync kernels' bit for bit (CudaOps.Int4LargeMExperts).
// Measured (H200, session 30): a 4k-token MoE layer 1.50 → 0.96-1.01 ms (~210 TFLOP/s), a 4k prefill 133 → 111-114
// ms; ncu: gate_up's tensor pipe ~18% busy, 0.4 eligible warps per scheduler — it is latency-bound at 2 warps per
// scheduler, the next step there a producer warp and the two warpgroups out of step (docs/perf.md).
#include <cuda_bf16.h>

#include <type_traits>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/dev_util.cuh"
#include "backend/cuda/int4_gemm.h"
#include "backend/cuda/int4_mma_dev.cuh"
#include "backend/cuda/int4_wg.h"
#include "backend/cuda/mma_util.cuh"
#include "backend/cuda/pdl.h"
#include "backend/cuda/sm90a/wgmma.cuh"
#include "core/dtype.h"
#include "core/env.h"
#include "core/status.h"

namespace ds::cuda {

namespace {

using namespace int4dev;
using namespace wgmma;

constexpr int kXT = kGemmTok;                  // pairs per tile (128)
constexpr int kXS = 4;                         // activation stages (one group each)
constexpr int kXStage = 2 * kXT * 128;         // bytes per stage: 2 chunks × 128 tokens × 128 bytes
constexpr int kXThreads = 256;                 // two warpgroups
constexpr int kXAcc = 64;                      // slice sums per thread (N = 128: 64 accumulators)
constexpr size_t kXSmem = 1024 + size_t(kXS) * kXStage + size_t(kXThreads) * kXAcc * 4;  // stages, slice sums
static_assert(kXSmem <= 227 * 1024, "int4 wgx: shared memory");

// Position of input r (0..63) of a 64-input chunk in the permuted row: step j's inputs 16m + 4j + 2hh + e (m, e: the
// word and half of mma.m16n8k16's B fragment register hh) at 16j + 8hh + 2m + e.
__host__ __device__ constexpr int perm64(int r) {
  return 16 * ((r >> 2) & 3) + 8 * ((r >> 1) & 1) + 2 * (r >> 4) + (r & 1);
}

// xp = x with every 64-input chunk of every row permuted (perm64); one thread per 16-byte piece of xp.
__global__ void __launch_bounds__(256) k_perm64(const __nv_bfloat16* __restrict__ x, int64_t rows, int64_t K,
                                                __nv_bfloat16* __restrict__ xp) {
  pdl_wait();
  pdl_trigger();
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, per = K / 8;
  if (i >= rows * per) return;
  const int64_t t = i / per;
  const int q = int(i - t * per), c = q >> 3, lc = q & 7;  // piece lc of chunk c: step lc / 2, half lc % 2
  const uint32_t* src = reinterpret_cast<const uint32_t*>(x + t * K + 64 * c + 4 * (lc >> 1) + 2 * (lc & 1));
  reinterpret_cast<uint4*>(xp + t * K)[q] = make_uint4(__ldg(src), __ldg(src + 8), __ldg(src + 16), __ldg(src + 24));
}

// A lane's pieces of one group: its two packed uint4 (chunks 2gi, 2gi + 1), zero points (raw; used only where the
// matrix has no uniform one) and fp16 scales of its rows g, g + 8.
struct XPkg {
  uint4 w0, w1;
  uint8_t z0, z1;
  uint16_t s0, s1;
};

// One block's tile: N tokens (the fewest of 16, 32, 64, 128 covering its cnt pairs) over its nit row blocks. G1: one
// group per K slice (the down projection at K = 512, KS = 4): the slice sums stay in registers (acc = p0, acc + p1,
// ..., each p = fma(scale, group partial, 0) as k_int4_mma forms it); else they go to shared memory (accs,
// lane-private) at each slice's end.
template <bool GATED, int N, bool G1>
__device__ __forceinline__ void wgx_run(const Int4Out& O, const __nv_bfloat16* __restrict__ xp, int64_t e, int cnt,
                                        unsigned rb0, unsigned nit, unsigned char* stages, float* accs,
                                        const int32_t* plist, int64_t xdiv_shift, bool pf) {
  constexpr int NA = N / 2;  // accumulators per thread
  const MmaInt4& W = O.W;
  const int tid = int(threadIdx.x), wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2,
            tig = lane & 3;
  const int64_t KC = W.K / 64, otiles = O.n_out / 16;
  const int ng = int(W.K / 128), gps = ng / W.KS, KS = W.KS;
  const int nsteps = int(nit) * ng;
  // All of K in the stages (the down projection's 4 groups): loaded once, kept across the block's row blocks.
  const bool resident = ng <= kXS && kXS % ng == 0;
  const int nload = resident ? ng : nsteps;  // steps whose activations are loaded
  // Output tile of this warp in row block rb (GATED: of the gate half; warpgroup 1 takes the matching up tile).
  auto out_tile = [&](unsigned rb) -> int64_t { return GATED ? 4 * int64_t(rb) + warp : 8 * int64_t(rb) + 4 * wg + warp; };
  auto wtile = [&](unsigned rb) -> int64_t {
    int64_t ot = out_tile(rb);
    if (ot >= otiles) ot = otiles - 1;  // out-of-range tiles compute, never store
    return e * (O.rpe / 16) + ot + (GATED && wg == 1 ? otiles : 0);
  };
  // This thread's activation pieces: the 16 bytes lc = tid % 8 of a 128-byte token row, for tokens n0 + 32j (j < NJ)
  // in both chunks (N ≥ 32), or token n0 in chunk c0 (N = 16: 256 pieces). A row's swizzle n % 8 is n0 % 8 for all of
  // them. Padding tokens (n ≥ cnt) copy the tile's first pair (plist), a real row: columns are independent and
  // theirs are never stored.
  constexpr int NJ = N >= 32 ? N / 32 : 1, NC = N >= 32 ? 2 : 1;
  const int lc = tid & 7, n0 = N >= 32 ? tid >> 3 : (tid >> 3) & 15, c0 = N >= 32 ? 0 : tid >> 7;
  const __nv_bfloat16* xb[NJ];
#pragma unroll
  for (int j = 0; j < NJ; ++j)
    xb[j] = xp + (int64_t(uint32_t(plist[n0 + 32 * j]) >> xdiv_shift)) * W.K + 64 * c0 + 8 * lc;
  const uint32_t sbase = uint32_t(__cvta_generic_to_shared(stages));
  const uint32_t dofs = sbase + uint32_t((c0 * N + n0) * 128 + ((lc ^ (n0 & 7)) << 4));
  // Loader cursor: the next step's group and stage (steps in order: row block, then group).
  int la_n = 0, la_gi = 0, la_st = 0;
  auto load_act = [&] {
    if (la_n < nload) {
      const uint32_t st = dofs + uint32_t(la_st * kXStage);
#pragma unroll
      for (int j = 0; j < NJ; ++j)
#pragma unroll
        for (int c = 0; c < NC; ++c) cp_async16_sa(st + (c * N + 32 * j) * 128, xb[j] + 128 * la_gi + 64 * c);
      ++la_n;
      if (++la_gi == ng) la_gi = 0;
      la_st = resident ? (la_st + 1 == ng ? 0 : la_st + 1) : (la_st + 1) % kXS;
    }
    cp_async_commit();
  };
  // Weight cursor: this lane's pointers at the next step's group (row block lp_rb, group lp_gi).
  int lp_n = 0, lp_gi = 0;
  unsigned lp_rb = rb0;
  const uint4* lw = nullptr;
  const uint16_t* ls = nullptr;
  const uint8_t* lz = nullptr;
  auto set_rb = [&](unsigned rb) {
    const int64_t wt = wtile(rb), r0 = wt * 16 + g;
    lw = W.qw + wt * KC * 32 + lane;
    ls = W.sc + r0 * ng;
    lz = W.z + r0 * ng;
  };
  set_rb(rb0);
  // pf (DS_INT4_WGX_PF=1): every weight tile this warp will read (16 rows × all of K for each of the block's row
  // blocks: 8 · ng 128-byte lines each) and their scales sent toward L2 first.
  if (pf)
    for (unsigned r = 0; r < nit; ++r) {
      const int64_t wt = wtile(rb0 + r);
      const char* wb = reinterpret_cast<const char*>(W.qw + wt * KC * 32);
      for (int b = lane * 128; b < ng * 1024; b += 32 * 128) prefetch_l2(wb + b);
      if (lane < 16) prefetch_l2(W.sc + (wt * 16 + lane) * ng);
    }
  auto load_pkg = [&](XPkg& p) {
    if (lp_n >= nsteps) return;
    p.w0 = __ldg(lw);
    p.w1 = __ldg(lw + 32);
    p.s0 = ls[0];
    p.s1 = ls[8 * ng];
    if (W.zu < 0) p.z0 = lz[0], p.z1 = lz[8 * ng];
    ++lp_n, lw += 64, ++ls, ++lz;
    if (++lp_gi == ng) lp_gi = 0, set_rb(++lp_rb);
  };
  auto dequant_pkg = [&](const XPkg& p, uint32_t (&a)[8][4]) {
    dequant_group(p.w0, p.w1, zero_pair(W.zu >= 0 ? uint8_t(W.zu) : p.z0), zero_pair(W.zu >= 0 ? uint8_t(W.zu) : p.z1),
                  a);
  };

#pragma unroll
  for (int l = 0; l < kXS - 1; ++l) load_act();
  XPkg pk[2];
  load_pkg(pk[0]);
  load_pkg(pk[1]);
  uint32_t A[2][8][4];
  dequant_pkg(pk[0], A[0]);
  float s_cur0 = sc_f(pk[0].s0), s_cur1 = sc_f(pk[0].s1);
  load_pkg(pk[0]);

  float tmp[NA], part[NA];  // tmp: the group's partial (written by its first wgmma)
#pragma unroll
  for (int i = 0; i < NA; ++i) part[i] = 0.f;
  float4* const ap = reinterpret_cast<float4*>(accs) + tid;  // slice sums: float4 q of this thread at ap[q · 256]
  int gi = 0, sg = 0, sl = 0, c_st = 0;  // compute cursor: group, group in slice, slice, stage
  unsigned rb = rb0;

  // Step v with A[PAR] holding its fragments; pk[PAR ^ 1] holds step v + 1's pieces.
  auto step = [&](auto par_c, int v) {
    constexpr int PAR = decltype(par_c)::value;
    cp_async_wait<kXS - 2>();  // step v's pieces (this thread's) landed
    fence_async_smem();        // ... and are visible to wgmma's operand reads
    __syncthreads();           // every thread's pieces; every warpgroup done with the stage refilled next
    load_act();                // step v + kXS − 1, into the stage step v − 1 used
    const uint64_t db = smem_desc_sw128(sbase + uint32_t(c_st * kXStage));
    c_st = resident ? (c_st + 1 == ng ? 0 : c_st + 1) : (c_st + 1) % kXS;
    reg_fence(tmp);
    wg_fence();
    // the group's fresh partial: the first k16 step without the accumulator (scale-d 0), then accumulated
    Wg<N>::mma0(tmp, A[PAR][0], db);
#pragma unroll
    for (int k = 1; k < 8; ++k) Wg<N>::mma(tmp, A[PAR][k], db + uint64_t(((k >> 2) * N * 128 + 32 * (k & 3)) >> 4));
    wg_commit();
    float s_nx0 = 0.f, s_nx1 = 0.f;
    if (v + 1 < nsteps) {
      dequant_pkg(pk[PAR ^ 1], A[PAR ^ 1]);
      s_nx0 = sc_f(pk[PAR ^ 1].s0), s_nx1 = sc_f(pk[PAR ^ 1].s1);
      load_pkg(pk[PAR ^ 1]);  // step v + 3
    }
    wg_wait<0>();
    reg_fence(tmp);
    if constexpr (G1) {  // the slice's partial fma(scale, tmp, 0), added to the running sum (the first: it)
      const bool first = gi == 0;
#pragma unroll
      for (int i = 0; i < NA; ++i) {
        const float q = __fmaf_rn((i & 2) ? s_cur1 : s_cur0, tmp[i], 0.f);
        part[i] = first ? q : __fadd_rn(part[i], q);
      }
    } else if (sg == 0) {  // the slice's first group: part = fma(scale, tmp, 0), as 0 + scale · tmp is formed
#pragma unroll
      for (int i = 0; i < NA; ++i) part[i] = __fmaf_rn((i & 2) ? s_cur1 : s_cur0, tmp[i], 0.f);
    } else {
      scale_add(part, tmp, s_cur0, s_cur1);
    }
    s_cur0 = s_nx0, s_cur1 = s_nx1;
    if constexpr (!G1) {
      if (++sg == gps) {  // end of slice sl: acc = part (sl = 0), acc = acc + part (later), in slice order
        sg = 0;
        if (sl + 1 < KS) {
          if (sl == 0) {
#pragma unroll
            for (int q = 0; q < NA / 4; ++q)
              ap[q * kXThreads] = make_float4(part[4 * q], part[4 * q + 1], part[4 * q + 2], part[4 * q + 3]);
          } else {
#pragma unroll
            for (int q = 0; q < NA / 4; ++q) {
              float4 a = ap[q * kXThreads];
              a.x = a.x + part[4 * q], a.y = a.y + part[4 * q + 1];
              a.z = a.z + part[4 * q + 2], a.w = a.w + part[4 * q + 3];
              ap[q * kXThreads] = a;
            }
          }
        } else if (sl > 0) {
#pragma unroll
          for (int q = 0; q < NA / 4; ++q) {
            const float4 a = ap[q * kXThreads];
            part[4 * q] = a.x + part[4 * q];
            part[4 * q + 1] = a.y + part[4 * q + 1];
            part[4 * q + 2] = a.z + part[4 * q + 2];
            part[4 * q + 3] = a.w + part[4 * q + 3];
          }
        }
        ++sl;
      }
    }
    if (++gi < ng) return;
    // Row block rb done. C fragment: part[4i + 2rr + h] is (row g + 8rr of the warp's tile, token 8i + 2tig + h).
    gi = 0, sl = 0;
    const int64_t ot = out_tile(rb++);
    if constexpr (GATED) {
      if (wg == 1)  // the up sums, for warpgroup 0
#pragma unroll
        for (int q = 0; q < NA / 4; ++q)
          ap[q * kXThreads] = make_float4(part[4 * q], part[4 * q + 1], part[4 * q + 2], part[4 * q + 3]);
      __syncthreads();
      if (wg == 0 && ot < otiles) {
        // silu(gate)·up, permuted for the down projection (perm64): columns of rows g and g + 8 of the tile
        const int nb = int(ot) * 16, c0p = (nb & ~63) + perm64((nb & 63) + g), c1p = (nb & ~63) + perm64((nb & 63) + g + 8);
        const float* up = reinterpret_cast<const float*>(ap + 128);
        for_fragment_tokens<N>(tig, cnt, [&](int i, int h, int ti) {
          __nv_bfloat16* yr = static_cast<__nv_bfloat16*>(O.y) + int64_t(plist[ti]) * O.n_out;
          const int c = 4 * i + h, d = c + 2;  // rr = 0 and rr = 1
          const float u0 = up[(c >> 2) * kXThreads * 4 + (c & 3)], u1 = up[(d >> 2) * kXThreads * 4 + (d & 3)];
          yr[c0p] = __float2bfloat16_rn(silu(part[c]) * u0);
          yr[c1p] = __float2bfloat16_rn(silu(part[d]) * u1);
        });
      }
    } else if (ot < otiles) {
      const int64_t n = ot * 16 + g;
      for_fragment_tokens<N>(tig, cnt, [&](int i, int h, int ti) {
        const int64_t ro = int64_t(plist[ti]) * O.n_out + n;
        const float v0 = part[4 * i + h], v1 = part[4 * i + 2 + h];
        if (O.ydt == int(DType::F32)) {
          static_cast<float*>(O.y)[ro] = v0;
          static_cast<float*>(O.y)[ro + 8] = v1;
        } else {
          static_cast<__nv_bfloat16*>(O.y)[ro] = __float2bfloat16_rn(v0);
          static_cast<__nv_bfloat16*>(O.y)[ro + 8] = __float2bfloat16_rn(v1);
        }
      });
    }
  };
  for (int v = 0; v < nsteps; v += 2) {
    step(std::integral_constant<int, 0>{}, v);
    if (v + 1 < nsteps) step(std::integral_constant<int, 1>{}, v + 1);
  }
  cp_async_wait<0>();
}

// Grid: (row-block groups of R, tiles of the table). GATED: O is gate_up (rows 2·n_out per expert, output bf16
// silu(gate)·up, permuted for the down projection); else the down projection.
template <bool GATED>
__global__ void __launch_bounds__(kXThreads, 1)
    k_int4_wgx(const Int4Out O, const __nv_bfloat16* __restrict__ xp, TokenSrc ts, unsigned nrb, unsigned R, int pf) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char wgx_smem[];
  __shared__ int32_t plist[kXT];  // the tile's pair ids (padding: the first)
  const uint32_t sraw = uint32_t(__cvta_generic_to_shared(wgx_smem));
  unsigned char* const stages = wgx_smem + (((sraw + 1023) & ~1023u) - sraw);
  float* const accs = reinterpret_cast<float*>(stages + size_t(kXS) * kXStage);
  pdl_wait();  // launched with pdl_launch: the tile table, the activations and the output belong to earlier kernels
  pdl_trigger();
  if (int(blockIdx.y) >= *ts.ntiles) return;  // block-uniform
  const int32_t* tl = ts.tiles + 3 * blockIdx.y;
  const int64_t e = tl[0], t0 = tl[1];
  const int cnt = tl[2];
  const int tid = int(threadIdx.x);
  if (tid < kXT) plist[tid] = ts.list[t0 + (tid < cnt ? tid : 0)];
  __syncthreads();
  const unsigned rb0 = blockIdx.x * R, nit = min(R, nrb - rb0);
  const int64_t sh = __ffsll(ts.xdiv) - 1;  // x row of pair p: p >> sh (xdiv a power of two: the host checks)
  const bool g1 = !GATED && O.W.K / 128 == O.W.KS;
  auto run = [&](auto n_c, auto g1_c) {
    wgx_run<GATED, decltype(n_c)::value, decltype(g1_c)::value>(O, xp, e, cnt, rb0, nit, stages, accs, plist, sh,
                                                                         pf != 0);
  };
  using I128 = std::integral_constant<int, 128>;
  using I64 = std::integral_constant<int, 64>;
  using I32 = std::integral_constant<int, 32>;
  using I16 = std::integral_constant<int, 16>;
  using F = std::false_type;
  if (GATED || !g1) {
    if (cnt > 64) run(I128{}, F{});
    else if (cnt > 32) run(I64{}, F{});
    else if (cnt > 16) run(I32{}, F{});
    else run(I16{}, F{});
  } else {
    using T = std::true_type;
    if (cnt > 64) run(I128{}, T{});
    else if (cnt > 32) run(I64{}, T{});
    else if (cnt > 16) run(I32{}, T{});
    else run(I16{}, T{});
  }
#endif
}

template <bool GATED>
void launch_wgx(const Int4Out& O, const void* xp, const TokenSrc& ts, int64_t gy, int64_t R, cudaStream_t s) {
  static const bool attr = [] {
    DS_CUDA_CHECK(cudaFuncSetAttribute(k_int4_wgx<GATED>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kXSmem)));
    return true;
  }();
  (void)attr;
  const int64_t nrb = GATED ? O.n_out / 64 : (O.n_out + 127) / 128;
  R = std::max<int64_t>(1, std::min(R, nrb));
  DS_CHECK(gy >= 1 && gy <= 65535, "int4 wgx: ", gy, " token tiles (at most 65535)");
  DS_CUDA_CHECK(pdl_launch(k_int4_wgx<GATED>, dim3(unsigned((nrb + R - 1) / R), unsigned(gy)), dim3(kXThreads), kXSmem,
                           s, O, static_cast<const __nv_bfloat16*>(xp), ts, unsigned(nrb), unsigned(R),
                           int(env_int("DS_INT4_WGX_PF", 0))));
}

}  // namespace

bool int4_wgx_enabled() {
  // Read on every call so that one process can compare both paths.
  return wgmma::sm90_device() && env_int("DS_INT4_WGX", kInt4WgxDefault ? 1 : 0) != 0;
}

bool int4_wgx_fits(const MmaInt4& gate_up, const MmaInt4& down, int64_t I, int64_t H, int64_t P, int64_t topk) {
  auto ok = [](const MmaInt4& W) { return W.G == 128 && W.K % 128 == 0 && W.K / 128 % W.KS == 0; };
  // x row of pair p: p >> log2(top-k) (k_int4_wgx's shift)
  if (topk <= 0 || (topk & (topk - 1)) != 0 || P % topk != 0) return false;
  constexpr int64_t k31 = int64_t(1) << 31;  // the activations' element offsets are 32-bit
  return ok(gate_up) && ok(down) && I % 64 == 0 && down.K == I && H % 16 == 0 && gate_up.K == H &&
         P / topk * H < k31 && P * I < k31;
}

void int4_wgx_moe(const Int4Out& gu, const Int4Out& dn, const void* x, int64_t T, const TokenSrc& ts, int64_t gy,
                  void* xp, cudaStream_t s) {
  DS_CHECK(ts.xdiv > 0 && (ts.xdiv & (ts.xdiv - 1)) == 0, "int4 wgx: top-k ", ts.xdiv, " (expected a power of two)");
  const int64_t H = gu.W.K;
  const int64_t pieces = T * H / 8;
  DS_CUDA_CHECK(pdl_launch(k_perm64, unsigned((pieces + 255) / 256), 256, 0, s, static_cast<const __nv_bfloat16*>(x),
                           T, H, static_cast<__nv_bfloat16*>(xp)));
  // Row blocks per block (DS_INT4_WGX_R_GU / _DOWN): gate_up 8 row blocks of 64 outputs at I = 512, down 16 of 128 rows.
  launch_wgx<true>(gu, xp, ts, gy, env_int("DS_INT4_WGX_R_GU", 1), s);
  TokenSrc td = ts;
  td.xdiv = 1;
  launch_wgx<false>(dn, gu.y, td, gy, env_int("DS_INT4_WGX_R_DOWN", 4), s);
}

}  // namespace ds::cuda
