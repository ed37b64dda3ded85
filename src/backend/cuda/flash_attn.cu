// Tensor-core flash attention for prefill rows (design and dispatch: flash_attn.h).
#include "backend/cuda/flash_attn.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/flash_util.cuh"
#include "backend/cuda/mma_util.cuh"

#include <cuda_bf16.h>

#include <cmath>

#include "core/status.h"

namespace ds::cuda {

namespace {


constexpr int kRows = 128;    // query rows per block (q heads of the group × tokens of the tile)
constexpr int kThreads = 256;  // 8 warps, 16 rows each
constexpr int kBN = 32;        // cache positions per K/V tile

// Shared-memory tiles are [rows][DH] bf16, XOR-swizzled (swz, mma_util.cuh).

// Grid: one block per (tile index, kv head), blockIdx.x = idx · Nkv + kv head; idx runs over the tiles of the flash
// sequences in sequence order (an upper bound of blocks is launched; the extra ones exit).
template <int DH, int GROUP>
__global__ void __launch_bounds__(kThreads, 1)
    k_flash_attn(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ kc,
                 const __nv_bfloat16* __restrict__ vc, __nv_bfloat16* __restrict__ o, int nseq, int Nh, int Nkv,
                 int bs, const int32_t* __restrict__ seqinfo, const int32_t* __restrict__ blocks, int maxb,
                 float scale_log2) {
  constexpr int TQ = kRows / GROUP;  // tokens per block
  constexpr int CH = DH / 8;         // 16-byte chunks per row
  constexpr int NT = kBN / 8;        // n-tiles of S per K/V tile
  constexpr int DT = DH / 8;         // n-tiles of O
  extern __shared__ uint4 smem_u4[];
  __nv_bfloat16* sQ = reinterpret_cast<__nv_bfloat16*>(smem_u4);  // [kRows][DH]
  __nv_bfloat16* sK = sQ + kRows * DH;                              // [2][kBN][DH]
  __nv_bfloat16* sV = sK + 2 * kBN * DH;                            // [2][kBN][DH]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int kvh;
  FlashTile f;
  if (!flash_block(nseq, Nkv, seqinfo, blocks, maxb, TQ, lane, kvh, f)) return;
  const int q_start = f.q_start, ctx = f.ctx, t0 = f.t0, tq = f.tq, kv_end = f.kv_end, diag = f.diag;
  const int32_t* bt = f.bt;
  const int64_t crow = int64_t(Nkv) * DH;  // elements per cache position
  const int64_t qrow = int64_t(Nh) * DH;

  // Q rows: r = (q head within the group) · TQ + token.
  for (int c = tid; c < kRows * CH; c += kThreads) {
    const int r = c / CH, ch = c % CH, tok = r % TQ, hg = r / TQ;
    __nv_bfloat16* dst = sQ + swz<DH>(r, ch);
    if (tok < tq && (kRows % GROUP == 0 || hg < GROUP))  // rows past GROUP · TQ (group 6: 126) are padding
      cp_async16(dst, q + int64_t(q_start + t0 + tok) * qrow + int64_t(kvh * GROUP + hg) * DH + ch * 8);
    else
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
  }
  // K/V tile j into buffer `buf`; positions ≥ kv_end are zero (never read from the cache: V there must not be NaN).
  // Thread t copies row t / 8 of the tile, its 16-byte chunks t % 8 + 8i: one cache address per thread and tile (per
  // chunk, the block-table division and 64-bit address arithmetic cost more than the copies; session 32).
  static_assert(kBN * 8 == kThreads, "flash: one tile row per 8 threads");
  auto load_kv = [&](int j, int buf) {
    const int r = tid >> 3, c0 = tid & 7, p = j * kBN + r;
    __nv_bfloat16* dk = sK + buf * kBN * DH;
    __nv_bfloat16* dv = sV + buf * kBN * DH;
    if (p < kv_end) {
      const int64_t off = (int64_t(bt[p / bs]) * bs + p % bs) * crow + int64_t(kvh) * DH;
#pragma unroll
      for (int i = 0; i < CH / 8; ++i) {
        const int ch = c0 + 8 * i;
        cp_async16(dk + swz<DH>(r, ch), kc + off + ch * 8);
        cp_async16(dv + swz<DH>(r, ch), vc + off + ch * 8);
      }
    } else {
#pragma unroll
      for (int i = 0; i < CH / 8; ++i) {
        const int ch = c0 + 8 * i;
        *reinterpret_cast<uint4*>(dk + swz<DH>(r, ch)) = make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4*>(dv + swz<DH>(r, ch)) = make_uint4(0, 0, 0, 0);
      }
    }
  };

  const int nkv = (kv_end + kBN - 1) / kBN;
  load_kv(0, 0);
  cp_async_commit();

  const int g = lane >> 2, t4 = lane & 3;
  // This thread's two rows (g and g + 8 of the warp's 16) and the last position each attends.
  const int r0 = warp * 16 + g, r1 = r0 + 8;
  const int pos0 = ctx + t0 + min(r0 % TQ, tq - 1), pos1 = ctx + t0 + min(r1 % TQ, tq - 1);

  float acc[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

  // ldmatrix row/chunk offsets of this lane: A (Q) and trans-B (V) take rows (lane & 7) + 8·((lane >> 3) & 1) and
  // chunk + (lane >> 4); B (K) takes rows (lane & 7) + 8·(lane >> 4) and chunk + ((lane >> 3) & 1).
  const int a_row = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, a_ch = lane >> 4;
  const int k_row = (lane & 7) + (lane >> 4) * 8, k_ch = (lane >> 3) & 1;
  const int v_row = (lane & 7) + ((lane >> 3) & 1) * 8, v_ch = lane >> 4;

  for (int j = 0; j < nkv; ++j) {
    if (j + 1 < nkv) load_kv(j + 1, (j + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const __nv_bfloat16* K = sK + (j & 1) * kBN * DH;
    const __nv_bfloat16* V = sV + (j & 1) * kBN * DH;

    // S = Q·Kᵀ (16 rows × kBN positions per warp)
    float s[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DH / 16; ++kk) {
      uint32_t a[4];
      ldsm_x4(a, sQ + swz<DH>(a_row, kk * 2 + a_ch));
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t b[4];
        ldsm_x4(b, K + swz<DH>(np * 16 + k_row, kk * 2 + k_ch));
        mma16816(s[2 * np], a, b[0], b[1]);
        mma16816(s[2 * np + 1], a, b[2], b[3]);
      }
    }

    // Online softmax in the log2 domain. Columns past a row's own position are masked (only on tiles crossing diag).
    const bool mask = (j + 1) * kBN - 1 > diag;
    float mx0 = m0, mx1 = m1;
    flash_scale_mask(s, scale_log2, mask, j * kBN, t4, pos0, pos1, mx0, mx1);
    // Every row attends position 0, so the first tile gives a finite maximum and it stays finite.
    online_softmax_tile(s, acc, mx0, mx1, m0, m1, l0, l1);

    // O += P·V: the S accumulators of n-tiles 2kk, 2kk+1 are exactly the A fragment of k-step kk.
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t a[4];
      p_fragment(s[2 * kk], s[2 * kk + 1], a);
#pragma unroll
      for (int dp = 0; dp < DH / 16; ++dp) {
        uint32_t b[4];
        ldsm_x4_t(b, V + swz<DH>(kk * 16 + v_row, dp * 2 + v_ch));
        mma16816(acc[2 * dp], a, b[0], b[1]);
        mma16816(acc[2 * dp + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // buffer j & 1 is refilled by the next iteration's load of tile j + 2
  }

  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float inv0 = 1.f / l0, inv1 = 1.f / l1;
  const int tok0 = r0 % TQ, tok1 = r1 % TQ;
  __nv_bfloat16* o0 = o + int64_t(q_start + t0 + tok0) * qrow + int64_t(kvh * GROUP + r0 / TQ) * DH + 2 * t4;
  __nv_bfloat16* o1 = o + int64_t(q_start + t0 + tok1) * qrow + int64_t(kvh * GROUP + r1 / TQ) * DH + 2 * t4;
#pragma unroll
  for (int i = 0; i < DT; ++i) {
    if (tok0 < tq && (kRows % GROUP == 0 || r0 < GROUP * TQ))
      *reinterpret_cast<__nv_bfloat162*>(o0 + i * 8) = __floats2bfloat162_rn(acc[i][0] * inv0, acc[i][1] * inv0);
    if (tok1 < tq && (kRows % GROUP == 0 || r1 < GROUP * TQ))
      *reinterpret_cast<__nv_bfloat162*>(o1 + i * 8) = __floats2bfloat162_rn(acc[i][2] * inv1, acc[i][3] * inv1);
  }
}

template <int DH, int GROUP>
void launch(const void* q, const void* k, const void* v, void* o, int64_t T, int nseq, int64_t Nh, int64_t Nkv,
            int64_t bs, const int32_t* seqinfo, const int32_t* blocks, int maxb, cudaStream_t s) {
  constexpr size_t smem = size_t(kRows + 4 * kBN) * DH * 2;
  flash_launch<k_flash_attn<DH, GROUP>>(kThreads, smem, kRows / GROUP, DH, q, k, v, o, T, nseq, Nh, Nkv, bs, seqinfo,
                                        blocks, maxb, s);
}

}  // namespace

bool flash_attn_supported(int64_t Nh, int64_t Nkv, int64_t Dh) {
  if (Nkv <= 0 || Nh % Nkv != 0) return false;
  const int64_t group = Nh / Nkv;
  return (Dh == 64 || Dh == 128 || Dh == 256) && (group == 1 || group == 2 || group == 4 || group == 8) ||
         (Dh == 256 && group == 6);  // the 27B's 24 q heads over 4 kv heads
}

void flash_attn_prefill(const void* q, const void* k, const void* v, void* o, int64_t T, int nseq, int64_t Nh,
                        int64_t Nkv, int64_t Dh, int64_t bs, const int32_t* seqinfo, const int32_t* blocks, int maxb,
                        cudaStream_t s) {
  DS_CHECK(flash_attn_supported(Nh, Nkv, Dh), "flash attention: unsupported shape");
  if (T < kFlashMinQ || nseq == 0) return;
  if (flash_wg_prefill(q, k, v, o, T, nseq, Nh, Nkv, Dh, bs, seqinfo, blocks, maxb, s)) return;
  const int64_t group = Nh / Nkv;
#define DS_FA(DH, G) \
  if (Dh == DH && group == G) return launch<DH, G>(q, k, v, o, T, nseq, Nh, Nkv, bs, seqinfo, blocks, maxb, s);
  DS_FA(256, 8) DS_FA(256, 6) DS_FA(256, 4) DS_FA(256, 2) DS_FA(256, 1)
  DS_FA(128, 8) DS_FA(128, 4) DS_FA(128, 2) DS_FA(128, 1)
  DS_FA(64, 8) DS_FA(64, 4) DS_FA(64, 2) DS_FA(64, 1)
#undef DS_FA
}

}  // namespace ds::cuda
