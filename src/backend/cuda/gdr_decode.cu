// Fused Gated DeltaNet for short chunks (contract and layout: gdr_decode.h; CPU twin: backend/cpu/cpu_backend.cpp
// conv1d_causal, gated_delta_rule, gated_rmsnorm).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/dev_util.cuh"
#include "backend/cuda/gdr_decode.h"
#include "backend/cuda/pdl.h"
#include "backend/ops.h"
#include "core/dtype.h"
#include "core/env.h"
#include "core/status.h"

namespace ds::cuda {

namespace {


// ---- kernel 1: conv1d with state + SiLU, q/k L2 norm, g and beta --------------------------------------------------
// Block (unit u, sequence s), 128 threads, thread c = channel c of the unit: units 0..Hk−1 are q heads, Hk..2Hk−1 k
// heads, 2Hk..2Hk+Hv−1 v heads. Every channel belongs to exactly one unit, so its conv window is read and written
// by one thread only.
// With bx (fused in_proj_b | in_proj_a): v-head block j also forms b = x·Wb[j] and a = x·Wa[j] (rows j and Hv + j
// of bw [2·Hv, bK] bf16) for its sequence's tokens, rounds them to bdt, writes them to ba (an output then) and uses
// them. Thread c takes inputs 8·(c + 128·i) .. + 7 of both rows (i < kBaChunks); each token's sums are lane sums in
// input order, then warp sums, then the 4 warps in order: per token, so batch-invariant. The sums are formed before
// the PDL wait (bx is two or more kernels back: gdr_decode.h); DS_GDN_BA_EARLY=0: after it, the rows sent toward L2
// before it.
constexpr int kBaChunks = 4;  // bK ≤ 128 threads × 8 × 4 = 4096
// MT / BT: mixed's and ba's dtypes as types (dev_util.cuh ldx), void = the runtime codes (session 25: the typed bf16
// instantiation, no dtype branches around its loads and stores, is the 35B-A3B's; DS_GDN_TYPED=0: the generic one).
// The first token (a decode's only one) is taken before the loop over further tokens, with its own norm buffer (H200,
// session 26: own time per launch at batch 64 9.56 → 8.63 µs, 16 3.30 → 2.88, the same bits); the typed kernel is
// held to 48 registers, 10 blocks per SM, as before. Several sequences per block (their loads issued together, one
// barrier for their first tokens' norms; branch s26-spb) were slower: at batch 64 2 per block 11.3 µs, 4 per block
// 12.8.
template <int KC, typename MT = void, typename BT = void>
__global__ void __launch_bounds__(128, std::is_void_v<MT> ? 6 : 10)
    k_gdn_conv_prep(const void* mixed, int mdt, const float* conv_w, float* conv_state, void* ba, int bdt,
                    const float* A_log, const float* dt_bias, int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv,
                    const int32_t* seqinfo, float qscale, float* qn, float* kn, float* vv, float* g, float* beta,
                    const __nv_bfloat16* bx, const __nv_bfloat16* bw, int64_t bK, int ba_early) {
  constexpr int W = KC - 1;
  const int64_t C = 2 * Hk * Dk + Hv * Dv;
  const int64_t u = blockIdx.x;
  const int s = blockIdx.y, c = threadIdx.x, lane = c & 31, w = c >> 5;
  // Before the wait, what no kernel of the step writes, off the critical path (the previous kernel's tail): the batch
  // table (uploaded before the step), the conv weights, A_log / dt_bias, and this channel's conv window (written only
  // in earlier steps, by this kernel or the long-chunk conv kernels; steps are separated by the host's read of the
  // sampled ids).
  const int64_t qs = seqinfo[s * 4 + 0], ql = seqinfo[s * 4 + 1], slot = seqinfo[s * 4 + 3];
  const bool run = ql > 0 && ql < kGdnShortMax;  // longer chunks: the unfused path
  const bool isv = u >= 2 * Hk, isq = u < Hk;
  const int64_t D = isv ? Dv : Dk;
  const int64_t ch = isv ? 2 * Hk * Dk + (u - 2 * Hk) * Dv + c : u * Dk + c;
  const bool act = c < D;
  float wv[KC], win[KC];
  float* st = conv_state + (slot * C + ch) * W;
  if (run && act) {
#pragma unroll
    for (int j = 0; j < KC; ++j) wv[j] = conv_w[ch * KC + j];
#pragma unroll
    for (int j = 0; j < W; ++j) win[j] = st[j];
  }
  const bool gb = run && isv && c < ql;  // this thread writes g and beta of token qs + c
  const float a_log = gb ? A_log[u - 2 * Hk] : 0.f, dtb = gb ? dt_bias[u - 2 * Hk] : 0.f;
  const bool fba = bx && run && isv;  // block-uniform
  const __nv_bfloat16* const rb = fba ? bw + (u - 2 * Hk) * bK : nullptr;
  const __nv_bfloat16* const ra = fba ? bw + (Hv + u - 2 * Hk) * bK : nullptr;
  __shared__ float red[2][4], red0[4];
  __shared__ float bred[kGdnShortMax][4][2];  // fused ba: per token, warp sums of b and a
  auto ba_sums = [&] {
    for (int64_t i = 0; i < ql; ++i) {
      const uint4* xr = reinterpret_cast<const uint4*>(bx + (qs + i) * bK);
      float pb = 0.f, pa = 0.f;
#pragma unroll
      for (int k = 0; k < kBaChunks; ++k) {
        if (8 * (c + 128 * k) >= bK) break;
        const uint4 xv = xr[c + 128 * k];
        const uint4 wb = __ldg(reinterpret_cast<const uint4*>(rb) + c + 128 * k);
        const uint4 wa = __ldg(reinterpret_cast<const uint4*>(ra) + c + 128 * k);
        const __nv_bfloat16* xe = reinterpret_cast<const __nv_bfloat16*>(&xv);
        const __nv_bfloat16* be = reinterpret_cast<const __nv_bfloat16*>(&wb);
        const __nv_bfloat16* ae = reinterpret_cast<const __nv_bfloat16*>(&wa);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float xf = __bfloat162float(xe[e]);
          pb += xf * __bfloat162float(be[e]);
          pa += xf * __bfloat162float(ae[e]);
        }
      }
      pb = warp_sum(pb);
      pa = warp_sum(pa);
      if (lane == 0) bred[i][w][0] = pb, bred[i][w][1] = pa;
    }
    __syncthreads();
  };
  if (fba && ba_early) {
    // bx is the layer input, written two or more kernels back (the q/k/v and z linears come between, and they wait
    // before they trigger), so complete once this grid may start: the sums run beside the previous kernel. Only ba
    // itself is written after the wait.
    ba_sums();
  } else if (fba) {
    // Only into L2 before the wait: held in registers (8 uint4 per thread) they took the kernel to 111 registers,
    // 4 blocks per SM and ~8 waves at batch 64 (20 µs of own time per launch; now 48 registers, 10 blocks per SM,
    // 13 µs; session 15). A minimum of 12 or 16 blocks per SM (40 / 32 registers, small spills) was slower.
#pragma unroll
    for (int i = 0; i < kBaChunks; ++i)
      if (8 * (c + 128 * i) < bK) {
        prefetch_l2(reinterpret_cast<const uint4*>(rb) + c + 128 * i);
        prefetch_l2(reinterpret_cast<const uint4*>(ra) + c + 128 * i);
      }
  }
  // Wait before the trigger: k_gdn_recur_norm reads the recurrent state before its own wait, which is safe only if
  // every kernel before this one has completed once it may start.
  pdl_wait();
  pdl_trigger();
  if (!run) return;
  if (fba && !ba_early) ba_sums();
  // One token: the conv over the window and the new input, SiLU, the window shifted.
  auto conv_step = [&](float xin) {
    win[W] = xin;
    float acc = 0.f;
#pragma unroll
    for (int j = 0; j < KC; ++j) acc += wv[j] * win[j];
#pragma unroll
    for (int j = 0; j < W; ++j) win[j] = win[j + 1];
    return silu_f(acc);
  };
  auto put = [&](int64_t t, float x, float inv) {
    if (!act) return;
    if (isv) vv[(t * Hv + (u - 2 * Hk)) * Dv + c] = x;
    else if (isq) qn[(t * Hk + u) * Dk + c] = x * inv * qscale;
    else kn[(t * Hk + (u - Hk)) * Dk + c] = x * inv;
  };
  // The first token (v as is, q and k through the L2 norm over the head's channels: a block sum).
  const float x0 = act ? conv_step(ldx<MT>(mixed, mdt, qs * C + ch)) : 0.f;
  if (!isv) {  // uniform over the block
    const float ps = warp_sum(x0 * x0);
    if (lane == 0) red0[w] = ps;
    __syncthreads();
  }
  put(qs, x0, isv ? 1.f : 1.f / sqrtf((red0[0] + red0[1]) + (red0[2] + red0[3]) + 1e-6f));
  // Further tokens (verify and replay chunks). Double-buffered partial sums: token i + 1 writes the other buffer, and
  // token i + 2's writes wait behind token i + 1's barrier, which every thread reaches only after reading token i's.
  for (int64_t i = 1; i < ql; ++i) {
    const int64_t t = qs + i;
    const float x = act ? conv_step(ldx<MT>(mixed, mdt, t * C + ch)) : 0.f;
    if (isv) {  // uniform over the block
      put(t, x, 1.f);
      continue;
    }
    const float ps = warp_sum(x * x);
    if (lane == 0) red[i & 1][w] = ps;
    __syncthreads();
    put(t, x, 1.f / sqrtf((red[i & 1][0] + red[i & 1][1]) + (red[i & 1][2] + red[i & 1][3]) + 1e-6f));
  }
  if (act) {
#pragma unroll
    for (int j = 0; j < W; ++j) st[j] = win[j];
  }
  if (gb) {
    const int64_t t = qs + c, j = u - 2 * Hk;
    float bv, av;
    if (fba) {  // as stored in ba and read back (the speculative replay reads them from there)
      bv = roundx<BT>((bred[c][0][0] + bred[c][1][0]) + (bred[c][2][0] + bred[c][3][0]), bdt);
      av = roundx<BT>((bred[c][0][1] + bred[c][1][1]) + (bred[c][2][1] + bred[c][3][1]), bdt);
      stx<BT>(ba, bdt, t * 2 * Hv + j, bv);
      stx<BT>(ba, bdt, t * 2 * Hv + Hv + j, av);
    } else {
      bv = ldx<BT>(ba, bdt, t * 2 * Hv + j);
      av = ldx<BT>(ba, bdt, t * 2 * Hv + Hv + j);
    }
    beta[t * Hv + j] = sigmoid_f(bv);
    g[t * Hv + j] = -expf(a_log) * softplus_f(av + dtb);
  }
}

// ---- kernel 2: the recurrence and the gated RMSNorm ---------------------------------------------------------------
__device__ __forceinline__ void f4_fma(float4& a, const float4& b, float s) {
  a.x += b.x * s, a.y += b.y * s, a.z += b.z * s, a.w += b.w * s;
}
__device__ __forceinline__ void f4_add(float4& a, const float4& b) { a.x += b.x, a.y += b.y, a.z += b.z, a.w += b.w; }

// The recurrent state's four columns of a lane as stored and as held between tokens: ST = float (a float4, 16 bytes)
// or __nv_bfloat16 (a uint2 of two packed pairs, 8 bytes: the state between tokens is the rounded one, ops.h
// StateLayer, so the registers hold it packed — 32 for a 128-row head instead of 64, no spills), streamed from and to
// memory (this step's only read and write of them). widen / narrow: to fp32 and back (round to nearest even).
template <typename ST>
struct StateQuad {
  using V = float4;
  static __device__ __forceinline__ V load(const V* p) { return __ldcs(p); }
  static __device__ __forceinline__ void store(V* p, const V& v) { __stcs(p, v); }
  static __device__ __forceinline__ float4 widen(const V& v) { return v; }
  static __device__ __forceinline__ V narrow(const float4& v) { return v; }
};
template <>
struct StateQuad<__nv_bfloat16> {
  using V = uint2;
  static __device__ __forceinline__ float lo(uint32_t w) { return __uint_as_float(w << 16); }
  static __device__ __forceinline__ float hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);  // a in the low half: the lower address
    return uint32_t(__bfloat16_as_ushort(h.x)) | (uint32_t(__bfloat16_as_ushort(h.y)) << 16);
  }
  static __device__ __forceinline__ V load(const V* p) { return __ldcs(p); }
  static __device__ __forceinline__ void store(V* p, const V& v) { __stcs(p, v); }
  static __device__ __forceinline__ float4 widen(const V& u) { return make_float4(lo(u.x), hi(u.x), lo(u.y), hi(u.y)); }
  static __device__ __forceinline__ V narrow(const float4& v) { return make_uint2(pack(v.x, v.y), pack(v.z, v.w)); }
};

// ST: the state's storage type (float or __nv_bfloat16: rounded to bf16 after every token, ops.h StateLayer).
// A packed bf16 state reads k and q from L1 in the two passes instead of holding them: 128 registers, no spills (with
// them in registers it spilled 44-184 bytes; compiled for 3 blocks per SM it spilled 180 bytes at 80 registers and
// ran no faster, H200 session 25: 47.0 us per launch at batch 64 either way, against 70.5 for the fp32 state).
template <int DK, typename ST = float>
__global__ void __launch_bounds__(256, 2) k_gdn_recur_norm(const float* qn, const float* kn, const float* vv,
                                                           const float* g, const float* beta, int64_t Hk, int64_t Hv,
                                                           ST* ssm, const int32_t* seqinfo, const void* z, int zdt,
                                                           const float* norm_w, float eps, void* y, int ydt) {
  static_assert(kGdnShortMax <= kStateTokenRoundMax, "every chunk this kernel takes rounds a bf16 state per token");
  using Q = StateQuad<ST>;
  constexpr int DV = 128, NW = 8, RPW = DK / NW;
  static_assert(RPW % 4 == 0, "rows per warp: whole float4s");
  pdl_trigger();
  const int64_t j = blockIdx.x;
  const int s = blockIdx.y, lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int64_t qs = seqinfo[s * 4 + 0], ql = seqinfo[s * 4 + 1], slot = seqinfo[s * 4 + 3];
  // Blocks of other sequences still wait (session 11): this kernel triggers at entry, so a launch whose
  // blocks all left at once would complete before k_gdn_conv_prep, and the next kernel's wait would no longer imply
  // that every kernel before it has completed.
  if (ql <= 0 || ql >= kGdnShortMax) {
    pdl_wait();
    return;
  }
  // The state (written only by this kernel's earlier launches, all complete: k_gdn_conv_prep waits before it
  // triggers) is read before the wait, overlapping the conv kernel. Streaming loads and stores: a layer's states
  // (batch 64: 134 MB) do not fit in L2 and are not read again this step.
  typename Q::V* S = reinterpret_cast<typename Q::V*>(ssm + ((slot * Hv + j) * DK + int64_t(w) * RPW) * DV) + lane;
  typename Q::V st[RPW];
#pragma unroll
  for (int r = 0; r < RPW; ++r) st[r] = Q::load(S + r * (DV / 4));
  // The gated norm's weight (a model weight) too: read after the recurrence it was a DRAM round trip per block.
  const float4 nw = norm_w ? reinterpret_cast<const float4*>(norm_w)[lane] : make_float4(0.f, 0.f, 0.f, 0.f);
  // The k head: for the fp32 state before the wait too (after it, its two divisions were the first thing every block
  // did; session 26); the packed bf16 kernel, at its register bound, spilled 24 bytes with it held across the wait.
  constexpr bool kWide = std::is_same_v<ST, float>;
  int64_t kh = 0;
  if constexpr (kWide) kh = j / (Hv / Hk);
  pdl_wait();
  if constexpr (!kWide) kh = j / (Hv / Hk);
  __shared__ float4 redu[NW][32], redo[NW][32];
  for (int64_t i = 0; i < ql; ++i) {
    const int64_t t = qs + i;
    float kr[kWide ? RPW : 1], qr[kWide ? RPW : 1];
    const float4* kp = reinterpret_cast<const float4*>(kn + (t * Hk + kh) * DK + w * RPW);
    const float4* qp = reinterpret_cast<const float4*>(qn + (t * Hk + kh) * DK + w * RPW);
    if constexpr (kWide) {
#pragma unroll
      for (int e = 0; e < RPW / 4; ++e) {
        const float4 a = kp[e], b = qp[e];
        kr[4 * e] = a.x, kr[4 * e + 1] = a.y, kr[4 * e + 2] = a.z, kr[4 * e + 3] = a.w;
        qr[4 * e] = b.x, qr[4 * e + 1] = b.y, qr[4 * e + 2] = b.z, qr[4 * e + 3] = b.w;
      }
    }
    // Row r's k (or q): from the registers, or for a packed state from L1 (the warp's 4·RPW bytes, one broadcast load).
    auto row = [&](const float* regs, const float4* p, int r) -> float {
      if constexpr (kWide) {
        return regs[r];
      } else {
        const float4 a = p[r / 4];
        return r % 4 == 0 ? a.x : r % 4 == 1 ? a.y : r % 4 == 2 ? a.z : a.w;
      }
    };
    const float4 v = reinterpret_cast<const float4*>(vv + (t * Hv + j) * DV)[lane];
    const float decay = expf(g[t * Hv + j]), b = beta[t * Hv + j];
    // The gate z of the gated RMSNorm requested with k, q and v, so the norm after the two reductions waits for no
    // further DRAM/L2 round trip (batch 64: DeltaNet 2.45 → 2.42 ms).
    const int64_t base = (t * Hv + j) * DV + 4 * lane;
    const bool mine = w == int(i % NW);  // token i's output row is written by warp i mod 8
    float4 zv = make_float4(0.f, 0.f, 0.f, 0.f);
    if (norm_w && mine)
      zv = make_float4(ldf(z, zdt, base + 0), ldf(z, zdt, base + 1), ldf(z, zdt, base + 2), ldf(z, zdt, base + 3));
    // u = b · (v − (decay·S)ᵀ k), per column; rows reduce within the thread, then over the warps.
    float4 pu = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      float4 s = Q::widen(st[r]);
      s.x *= decay, s.y *= decay, s.z *= decay, s.w *= decay;
      f4_fma(pu, s, row(kr, kp, r));
      if constexpr (kWide) st[r] = s;  // a packed state forms decay·S again below (the same products)
    }
    redu[w][lane] = pu;
    __syncthreads();
    float4 u = redu[0][lane];
#pragma unroll
    for (int ww = 1; ww < NW; ++ww) f4_add(u, redu[ww][lane]);
    u.x = b * (v.x - u.x), u.y = b * (v.y - u.y), u.z = b * (v.z - u.z), u.w = b * (v.w - u.w);
    if constexpr (!kWide) {
      // The packed words "change" here (they do not): the compiler must form decay·S again from them below rather
      // than keep the first pass's 4·RPW fp32 products live across the barrier, which spilled (ptxas).
#pragma unroll
      for (int r = 0; r < RPW; ++r) asm volatile("" : "+r"(st[r].x), "+r"(st[r].y));
    }
    // S += k uᵀ; out = Sᵀ q.
    float4 po = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      float4 s = Q::widen(st[r]);
      if constexpr (!kWide) s.x *= decay, s.y *= decay, s.z *= decay, s.w *= decay;
      f4_fma(s, u, row(kr, kp, r));
      f4_fma(po, s, row(qr, qp, r));  // the output reads the update before a bf16 state's rounding, as a one-token step does
      st[r] = Q::narrow(s);
    }
    redo[w][lane] = po;
    __syncthreads();
    float4 o = redo[0][lane];
#pragma unroll
    for (int ww = 1; ww < NW; ++ww) f4_add(o, redo[ww][lane]);
    // Every warp now holds the head's whole output row.
    if (norm_w) {
      const float ss = warp_sum((o.x * o.x + o.y * o.y) + (o.z * o.z + o.w * o.w));
      const float inv = 1.f / sqrtf(ss / float(DV) + eps);
      if (mine) {
        stf(y, ydt, base + 0, o.x * inv * nw.x * silu_f(zv.x));
        stf(y, ydt, base + 1, o.y * inv * nw.y * silu_f(zv.y));
        stf(y, ydt, base + 2, o.z * inv * nw.z * silu_f(zv.z));
        stf(y, ydt, base + 3, o.w * inv * nw.w * silu_f(zv.w));
      }
    } else if (mine) {
      stf(y, ydt, base + 0, o.x);
      stf(y, ydt, base + 1, o.y);
      stf(y, ydt, base + 2, o.z);
      stf(y, ydt, base + 3, o.w);
    }
  }
#pragma unroll
  for (int r = 0; r < RPW; ++r) Q::store(S + r * (DV / 4), st[r]);
}

}  // namespace

bool gdn_ba_fusable(int64_t K, const void* x, const void* w) {
  return K % 8 == 0 && K <= 128 * 8 * kBaChunks && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(w) % 16 == 0;
}

void gdn_decode(const void* mixed, int mdt, const float* conv_w, int64_t Kc, float* conv_state, void* ba,
                int bdt, const float* A_log, const float* dt_bias, const void* z, int zdt, const float* norm_w,
                float eps, int64_t T, int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv, int nseq, const int32_t* seqinfo,
                void* ssm, int sdt, float* qn, float* kn, float* vv, float* g, float* beta, void* y, int ydt,
                cudaStream_t stream, const void* ba_x, const void* ba_w, int64_t ba_K) {
  DS_CHECK(sdt == int(DType::F32) || sdt == int(DType::BF16), "gdn_decode: the recurrent state is ",
           dtype_name(DType(sdt)), " (expected F32 or BF16)");
  DS_CHECK(gdn_decode_supported(Kc, Hk, Hv, Dk, Dv), "gdn_decode: unsupported shape");
  DS_CHECK(!ba_x || gdn_ba_fusable(ba_K, ba_x, ba_w), "gdn_decode: in_proj_ba of K = ", ba_K, " cannot be fused");
  if (T == 0 || nseq == 0) return;
  const float qscale = 1.f / std::sqrt(float(Dk));
  const int ba_early = env_int("DS_GDN_BA_EARLY", 1) != 0;  // 0: the sums after the wait (weights into L2 before)
  const dim3 ga(unsigned(2 * Hk + Hv), unsigned(nseq));
#define DS_GDN_CONV(KC)                                                                                         \
  case KC:                                                                                                      \
    DS_CUDA_CHECK(pdl_launch(k_gdn_conv_prep<KC>, ga, dim3(128), 0, stream, mixed, mdt, conv_w, conv_state, ba, \
                             bdt, A_log, dt_bias, Hk, Hv, Dk, Dv, seqinfo, qscale, qn, kn, vv, g, beta,         \
                             static_cast<const __nv_bfloat16*>(ba_x), static_cast<const __nv_bfloat16*>(ba_w),  \
                             ba_K, ba_early));                                                                  \
    break;
  // bf16 mixed and ba at the 35B-A3B's kernel size 4 take the typed conv kernel (same bits; CudaOps.DeltaNetMix
  // compares; H200 session 25: own 2.63 -> 2.40 us per launch at batch 4, step -0.003 to -0.007 ms at batch 1-4).
  // DS_GDN_TYPED=0: the generic kernel. (The recurrence typed on z and y spilled 20-28 bytes at its 128-register
  // bound: not tried.)
  const bool typed = env_int("DS_GDN_TYPED", 1) != 0;
  if (typed && Kc == 4 && mdt == int(DType::BF16) && bdt == int(DType::BF16)) {
    DS_CUDA_CHECK(pdl_launch(k_gdn_conv_prep<4, __nv_bfloat16, __nv_bfloat16>, ga, dim3(128), 0, stream, mixed, mdt,
                             conv_w, conv_state, ba, bdt, A_log, dt_bias, Hk, Hv, Dk, Dv, seqinfo, qscale, qn, kn, vv,
                             g, beta, static_cast<const __nv_bfloat16*>(ba_x),
                             static_cast<const __nv_bfloat16*>(ba_w), ba_K, ba_early));
  } else {
    switch (Kc) {
      DS_GDN_CONV(2)
      DS_GDN_CONV(3)
      DS_GDN_CONV(4)
      DS_GDN_CONV(5)
      DS_GDN_CONV(6)
      default:
        break;
    }
  }
#undef DS_GDN_CONV
  const dim3 gb{unsigned(Hv), unsigned(nseq)};
#define DS_GDN_REC(DK)                                                                                               \
  case DK:                                                                                                           \
    if (sdt == int(DType::BF16))                                                                                     \
      DS_CUDA_CHECK(pdl_launch(k_gdn_recur_norm<DK, __nv_bfloat16>, gb, dim3(256), 0, stream, qn, kn, vv, g, beta,   \
                               Hk, Hv, static_cast<__nv_bfloat16*>(ssm), seqinfo, z, zdt, norm_w, eps, y, ydt));     \
    else                                                                                                             \
      DS_CUDA_CHECK(pdl_launch(k_gdn_recur_norm<DK>, gb, dim3(256), 0, stream, qn, kn, vv, g, beta, Hk, Hv,          \
                               static_cast<float*>(ssm), seqinfo, z, zdt, norm_w, eps, y, ydt));                     \
    break;
  switch (Dk) {
    DS_GDN_REC(32)
    DS_GDN_REC(64)
    DS_GDN_REC(128)
    default:
      break;
  }
#undef DS_GDN_REC
}

}  // namespace ds::cuda
