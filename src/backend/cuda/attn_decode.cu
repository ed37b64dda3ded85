// Tensor-core split-context attention for decode rows and short verify chunks (design: attn_decode.h).
#include "backend/cuda/attn_decode.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/mma_util.cuh"
#include "backend/cuda/pdl.h"

#include <cuda_bf16.h>

#include <cmath>

#include "core/env.h"
#include "core/status.h"

namespace ds::cuda {

namespace {

constexpr int kTP = 16;      // cache positions per K/V tile
constexpr int kStages = 3;   // tiles in flight
constexpr int kThreads = 128;  // 4 warps

// Shared-memory tiles are [kTP][DH] bf16, XOR-swizzled (swz, mma_util.cuh) as in flash_attn.cu.

// Grid (T, Nkv, S). Rows of the mma: q head kvh·group + r of token t, r < group (the rest zero).
// QKS (session 17): warp w computes S = Q·Kᵀ over its quarter of the head dims only, the four partials meet in shared
// memory and every warp adds them in warp order (the same S in every warp; not the bits of QKS = false, whose every
// warp computes all of S). A quarter of the q fragments in registers: 4 blocks per SM instead of 3.
template <int DH, bool QKS>
__global__ void __launch_bounds__(kThreads, QKS ? 4 : 3)
    k_attn_dec_tc(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ kc,
                  const __nv_bfloat16* __restrict__ vc, int Nh, int Nkv, int group, int bs, int bs_shift,
                  const int32_t* __restrict__ seq_of, const int32_t* __restrict__ seqinfo,
                  const int32_t* __restrict__ blocks, int maxb, float scale_log2, int S, float* __restrict__ part,
                  int flash_min, int min_pos, int meta_early) {
  constexpr int CH = DH / 8;    // 16-byte chunks per row
  constexpr int KT = DH / 16;   // k-steps of S = Q·Kᵀ
  constexpr int KW = QKS ? KT / 4 : KT;  // k-steps of this warp
  constexpr int DW = DH / 4;    // head dims per warp in P·V
  constexpr int NTW = DW / 8;   // n-tiles of O per warp
  constexpr int DPW = DW / 16;  // ldmatrix.x4.trans per warp and tile (2 n-tiles each)
  constexpr int TPR = kThreads / kTP;  // threads per cache row in a tile load
  constexpr int CPT = CH / TPR;        // 16-byte chunks per thread and row
  static_assert(CH % TPR == 0 && KT % 4 == 0, "attn_decode: tile shape");
  extern __shared__ uint4 smem_u4[];
  __nv_bfloat16* sK = reinterpret_cast<__nv_bfloat16*>(smem_u4);  // [kStages][kTP][DH]
  __nv_bfloat16* sV = sK + kStages * kTP * DH;                     // [kStages][kTP][DH]
  float4* sRed = reinterpret_cast<float4*>(sV + kStages * kTP * DH);  // QKS: [4 warps][2][32 lanes]
  // PDL-launched (pdl.h): q and the cache are earlier kernels' outputs. With meta_early the batch table (seq_of,
  // seqinfo, blocks: uploaded before the step, written by no kernel) and the first tiles' block ids are read before
  // the wait — three dependent L2 round trips off the chain (session 21) — and only q and the cache after it.
  if (!meta_early) {
    pdl_wait();
    pdl_trigger();
  }
  const int t = int(blockIdx.x), kvh = int(blockIdx.y), split = int(blockIdx.z);
  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
  const int s = seq_of[t];
  const bool flash_row = seqinfo[s * 4 + 1] >= flash_min;
  const int n_ctx = seqinfo[s * 4 + 2] + (t - seqinfo[s * 4 + 0]) + 1;
  // Splits of at least min_pos positions (session 14): a short context uses the first Se of the S splits, the rest
  // are empty (their partial is m = −inf and l = 0 only; the merge reads no acc of an empty split).
  const int Se = attn_live_splits(n_ctx, S, min_pos);
  const int chunk = (n_ctx + Se - 1) / Se, p0 = split * chunk, p1 = min(n_ctx, p0 + chunk);
  const int ntiles = p1 > p0 ? (p1 - p0 + kTP - 1) / kTP : 0;
  const int32_t* bt = blocks + int64_t(s) * maxb;
  const int64_t crow = int64_t(Nkv) * DH;
  // Tile j (positions p0 + 16j ..): thread tid copies row lr = tid / TPR of each tile, chunks lc + TPR·i; one
  // block-table lookup per tile (session 17: a lookup and a 64-bit offset per chunk were a third of the kernel's
  // instructions, ncu). bid: the cache block of this thread's row of tile j (0 past the split).
  const int lr = tid / TPR, lc = tid % TPR;
  auto bid = [&](int j) -> int32_t {
    const int p = p0 + j * kTP + lr;
    if (p >= p1) return 0;
    const unsigned up = unsigned(p), bi = bs_shift >= 0 ? up >> bs_shift : up / unsigned(bs);
    return bt[bi];
  };
  int32_t pre[kStages - 1];  // the first tiles' block ids
#pragma unroll
  for (int j = 0; j < kStages - 1; ++j) pre[j] = j < ntiles ? bid(j) : 0;
  if (meta_early) {
    pdl_wait();
    pdl_trigger();
  }
  if (flash_row) return;  // block-uniform: the flash kernel's row
  if (ntiles == 0) {  // an empty split: m = −inf, l = 0, no acc (the merges read acc only where m > −inf)
    if (tid < group) {
      float* d = part + ((int64_t(t) * Nh + int64_t(kvh) * group + tid) * S + split) * (DH + 2);
      d[0] = -INFINITY;
      d[1] = 0.f;
    }
    return;
  }

  // Tile j into stage j % kStages (blk = bid(j)); positions ≥ p1 are zeros (never read from the cache).
  int soff[CPT];
#pragma unroll
  for (int i = 0; i < CPT; ++i) soff[i] = swz<DH>(lr, lc + TPR * i);
  const __nv_bfloat16* kh = kc + int64_t(kvh) * DH + lc * 8;
  const __nv_bfloat16* vh = vc + int64_t(kvh) * DH + lc * 8;
  auto load = [&](int j, int32_t blk) {
    __nv_bfloat16* dK = sK + (j % kStages) * kTP * DH;
    __nv_bfloat16* dV = sV + (j % kStages) * kTP * DH;
    const int p = p0 + j * kTP + lr;
    if (p < p1) {
      const unsigned up = unsigned(p), bi = bs_shift >= 0 ? up >> bs_shift : up / unsigned(bs);
      const int64_t off = (int64_t(blk) * bs + int64_t(up - bi * unsigned(bs))) * crow;
#pragma unroll
      for (int i = 0; i < CPT; ++i) {
        cp_async16(dK + soff[i], kh + off + TPR * 8 * i);
        cp_async16(dV + soff[i], vh + off + TPR * 8 * i);
      }
    } else {
#pragma unroll
      for (int i = 0; i < CPT; ++i) {
        cp_async16(dK + soff[i], kc, 0);
        cp_async16(dV + soff[i], vc, 0);
      }
    }
  };
#pragma unroll
  for (int j = 0; j < kStages - 1; ++j) {
    if (j < ntiles) load(j, pre[j]);
    cp_async_commit();
  }

  // Q as A fragments of every k-step (rows g and g + 8), held in registers for the whole split.
  const int r0 = g, r1 = g + 8;
  const bool has0 = r0 < group, has1 = r1 < group;
  const __nv_bfloat16* q0 = q + (int64_t(t) * Nh + int64_t(kvh) * group + (has0 ? r0 : 0)) * DH + 2 * t4;
  const __nv_bfloat16* q1 = q + (int64_t(t) * Nh + int64_t(kvh) * group + (has1 ? r1 : 0)) * DH + 2 * t4;
  const int kk0 = QKS ? warp * KW : 0;  // this warp's first k-step of S
  uint32_t qa[KW][4];
#pragma unroll
  for (int kk = 0; kk < KW; ++kk) {
    const int c = (kk0 + kk) * 16;
    qa[kk][0] = has0 ? ld_u32(q0 + c) : 0u;
    qa[kk][1] = has1 ? ld_u32(q1 + c) : 0u;
    qa[kk][2] = has0 ? ld_u32(q0 + c + 8) : 0u;
    qa[kk][3] = has1 ? ld_u32(q1 + c + 8) : 0u;
  }

  float acc[NTW][4];
#pragma unroll
  for (int i = 0; i < NTW; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
  // ldmatrix addressing (flash_attn.cu): B (K) rows (lane & 7) + 8·(lane >> 4), chunk + ((lane >> 3) & 1);
  // trans-B (V) rows (lane & 7) + 8·((lane >> 3) & 1), chunk + (lane >> 4).
  const int k_row = (lane & 7) + (lane >> 4) * 8, k_ch = (lane >> 3) & 1;
  const int v_row = (lane & 7) + ((lane >> 3) & 1) * 8, v_ch = lane >> 4;

  for (int j = 0; j < ntiles; ++j) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile j landed for every thread; everyone is done with tile j − 1, whose stage is refilled now
    if (j + kStages - 1 < ntiles) load(j + kStages - 1, bid(j + kStages - 1));
    cp_async_commit();
    const __nv_bfloat16* K = sK + (j % kStages) * kTP * DH;
    const __nv_bfloat16* V = sV + (j % kStages) * kTP * DH;

    // S = Q·Kᵀ: 16 rows × 16 positions (n-tiles 0, 1).
    float sc[2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i) sc[i][0] = sc[i][1] = sc[i][2] = sc[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KW; ++kk) {
      uint32_t b[4];
      ldsm_x4(b, K + swz<DH>(k_row, (kk0 + kk) * 2 + k_ch));
      mma16816(sc[0], qa[kk], b[0], b[1]);
      mma16816(sc[1], qa[kk], b[2], b[3]);
    }
    if constexpr (QKS) {  // the four warps' partials of S, added in warp order (the next write is after the next
                          // iteration's first barrier, which every thread reaches only after reading these)
      sRed[(warp * 2) * 32 + lane] = make_float4(sc[0][0], sc[0][1], sc[0][2], sc[0][3]);
      sRed[(warp * 2 + 1) * 32 + lane] = make_float4(sc[1][0], sc[1][1], sc[1][2], sc[1][3]);
      __syncthreads();
      float4 a0 = sRed[lane], a1 = sRed[32 + lane];
#pragma unroll
      for (int w = 1; w < 4; ++w) {
        const float4 b0 = sRed[(w * 2) * 32 + lane], b1 = sRed[(w * 2 + 1) * 32 + lane];
        a0.x += b0.x, a0.y += b0.y, a0.z += b0.z, a0.w += b0.w;
        a1.x += b1.x, a1.y += b1.y, a1.z += b1.z, a1.w += b1.w;
      }
      sc[0][0] = a0.x, sc[0][1] = a0.y, sc[0][2] = a0.z, sc[0][3] = a0.w;
      sc[1][0] = a1.x, sc[1][1] = a1.y, sc[1][2] = a1.z, sc[1][3] = a1.w;
    }

    // Online softmax (log2 domain); positions ≥ p1 are masked. Every tile holds at least one real position.
    const int tp = p0 + j * kTP;
    float mx0 = m0, mx1 = m1;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = sc[i][e] * scale_log2;
        if (tp + i * 8 + 2 * t4 + (e & 1) >= p1) x = -INFINITY;
        sc[i][e] = x;
        if (e < 2) mx0 = fmaxf(mx0, x);
        else mx1 = fmaxf(mx1, x);
      }
    online_softmax_tile(sc, acc, mx0, mx1, m0, m1, l0, l1);

    // O += P·V for this warp's dims: the S accumulators of n-tiles 0, 1 are the A fragment of the one k-step.
    uint32_t a[4];
    p_fragment(sc[0], sc[1], a);
#pragma unroll
    for (int dp = 0; dp < DPW; ++dp) {
      uint32_t b[4];
      ldsm_x4_t(b, V + swz<DH>(v_row, (warp * DPW + dp) * 2 + v_ch));
      mma16816(acc[2 * dp], a, b[0], b[1]);
      mma16816(acc[2 * dp + 1], a, b[2], b[3]);
    }
  }

  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  // Partial of (row, split): m in the natural-log domain (the merge weighs splits by e^{m_s − M}), l, acc.
  constexpr float kLn2 = 0.69314718055994531f;
  auto store = [&](int r, float m, float l, int c) {
    float* d = part + ((int64_t(t) * Nh + int64_t(kvh) * group + r) * S + split) * (DH + 2);
    if (warp == 0 && t4 == 0) {
      d[0] = m == -INFINITY ? -INFINITY : m * kLn2;
      d[1] = l;
    }
#pragma unroll
    for (int i = 0; i < NTW; ++i)
      *reinterpret_cast<float2*>(d + 2 + warp * DW + i * 8 + 2 * t4) = make_float2(acc[i][c], acc[i][c + 1]);
  };
  if (has0) store(r0, m0, l0, 0);
  if (has1) store(r1, m1, l1, 2);
}

// K and V tiles, plus the S partials of QKS (over 48 KB at DH = 256: opt-in, raised once per instance).
template <int DH, bool QKS>
constexpr size_t dec_smem() {
  return size_t(2 * kStages * kTP * DH) * 2 + (QKS ? 8 * 32 * sizeof(float4) : 0);
}
template <int DH, bool QKS>
void set_smem_limit() {
  static const bool attr = [] {
    DS_CUDA_CHECK(cudaFuncSetAttribute(k_attn_dec_tc<DH, QKS>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       int(dec_smem<DH, QKS>())));
    return true;
  }();
  (void)attr;
}
// Blocks of the instance resident on the device at once (SMs × blocks per SM).
template <int DH, bool QKS>
int64_t resident_blocks() {
  static const int64_t n = [] {
    set_smem_limit<DH, QKS>();
    int per_sm = 0;
    DS_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k_attn_dec_tc<DH, QKS>, kThreads,
                                                                dec_smem<DH, QKS>()));
    return int64_t(per_sm) * device_sm_count();
  }();
  return n;
}
bool qk_split() { return env_int("DS_ATTN_QK_SPLIT", 1) != 0; }

template <int DH, bool QKS>
void launch(const void* q, const void* k, const void* v, int64_t T, int64_t Nh, int64_t Nkv, int64_t bs,
            const int32_t* seq_of, const int32_t* seqinfo, const int32_t* blocks, int maxb, float scale, int S,
            float* part, int flash_min, int min_pos, cudaStream_t s) {
  constexpr size_t smem = dec_smem<DH, QKS>();
  set_smem_limit<DH, QKS>();
  const float scale_log2 = float(double(scale) * 1.4426950408889634);
  const int bs_shift = (bs & (bs - 1)) == 0 ? __builtin_ctzll(uint64_t(bs)) : -1;  // power of two: a shift
  DS_CUDA_CHECK(pdl_launch(k_attn_dec_tc<DH, QKS>, dim3(unsigned(T), unsigned(Nkv), unsigned(S)), dim3(kThreads), smem,
                           s, static_cast<const __nv_bfloat16*>(q), static_cast<const __nv_bfloat16*>(k),
                           static_cast<const __nv_bfloat16*>(v), int(Nh), int(Nkv), int(Nh / Nkv), int(bs), bs_shift,
                           seq_of, seqinfo, blocks, maxb, scale_log2, S, part, flash_min, min_pos,
                           int(meta_early())));
}
template <int DH>
void launch_qks(bool qks, const void* q, const void* k, const void* v, int64_t T, int64_t Nh, int64_t Nkv, int64_t bs,
                const int32_t* seq_of, const int32_t* seqinfo, const int32_t* blocks, int maxb, float scale, int S,
                float* part, int flash_min, int min_pos, cudaStream_t s) {
  (qks ? launch<DH, true> : launch<DH, false>)(q, k, v, T, Nh, Nkv, bs, seq_of, seqinfo, blocks, maxb, scale, S, part,
                                               flash_min, min_pos, s);
}

}  // namespace

bool attn_decode_tc_supported(int64_t Nh, int64_t Nkv, int64_t Dh) {
  return Nkv > 0 && Nh % Nkv == 0 && Nh / Nkv <= 16 && (Dh == 64 || Dh == 128 || Dh == 256);
}

int64_t attn_decode_tc_wave(int64_t Dh) {
  const bool qks = qk_split();
  if (Dh == 256) return qks ? resident_blocks<256, true>() : resident_blocks<256, false>();
  if (Dh == 128) return qks ? resident_blocks<128, true>() : resident_blocks<128, false>();
  return qks ? resident_blocks<64, true>() : resident_blocks<64, false>();
}

void attn_decode_tc(const void* q, const void* k, const void* v, int64_t T, int64_t Nh, int64_t Nkv, int64_t Dh,
                    int64_t bs, const int32_t* seq_of, const int32_t* seqinfo, const int32_t* blocks, int maxb,
                    float scale, int S, float* part, int flash_min, int min_pos, cudaStream_t s) {
  DS_CHECK(attn_decode_tc_supported(Nh, Nkv, Dh), "tensor-core decode attention: unsupported shape Nh=", Nh,
           " Nkv=", Nkv, " Dh=", Dh);
  DS_CHECK(T >= 1 && T <= 2147483647 && S >= 1 && S <= 65535 && Nkv <= 65535, "tensor-core decode attention: grid");
  // DS_ATTN_QK_SPLIT=0: every warp computes all of S (before session 17; other bits).
  const bool qks = qk_split();
  if (Dh == 256)
    return launch_qks<256>(qks, q, k, v, T, Nh, Nkv, bs, seq_of, seqinfo, blocks, maxb, scale, S, part, flash_min,
                           min_pos, s);
  if (Dh == 128)
    return launch_qks<128>(qks, q, k, v, T, Nh, Nkv, bs, seq_of, seqinfo, blocks, maxb, scale, S, part, flash_min,
                           min_pos, s);
  return launch_qks<64>(qks, q, k, v, T, Nh, Nkv, bs, seq_of, seqinfo, blocks, maxb, scale, S, part, flash_min,
                        min_pos, s);
}

}  // namespace ds::cuda
