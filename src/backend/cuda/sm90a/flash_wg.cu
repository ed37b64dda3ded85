// Hopper warpgroup-MMA flash attention for prefill rows at head dim 256 (flash_attn.h: flash_wg_prefill). Compiled
// for sm_90a only (CMakeLists.txt).
//
// The rows, tiles and arithmetic of k_flash_attn (flash_attn.cu): one block per (sequence, kv head, tile of TQ =
// ⌊128 / group⌋ query tokens), query rows r = (q head within the group) · TQ + token; the online softmax in fp32
// in the log2 domain, P rounded to bf16, O in fp32 registers written once as bf16. What differs: two warpgroups of 64
// rows each issue `wgmma` — S = Q·Kᵀ with Q and K both from shared memory (K-major, 128-byte swizzle), O += P·V with P
// from registers (the S accumulators are the A fragments) and V from shared memory read MN-major (the cache's rows
// stored as they are, the transpose done by the instruction) — over K/V tiles of 64 positions (the mma.sync kernel:
// 32), K and V stages double-buffered apart by cp.async from the paged cache, in FA3's intra-warpgroup order (S of the
// next tile issued before this tile's P·V, the softmax under the P·V; one block barrier per tile). So S's rounding
// per tile is the same and the softmax's rescaling happens per 64 positions: results equal k_flash_attn's to
// rounding, not bit for bit.
// Measured (H200, session 32; docs/perf.md): S, softmax and P·V in turn with two barriers per tile 287-317 TFLOP/s at
// 4k-32k tokens (35B-A3B shape; k_flash_attn 182-193); with one cache address per lane and tile in the loads 359-403;
// in FA3's order (249 registers) 407-465. The same order before the load fix: 243. Session 33 (the V bits below,
// same bits): 434-510.
#include <cuda_bf16.h>

#include <cmath>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/flash_attn.h"
#include "backend/cuda/flash_util.cuh"
#include "backend/cuda/mma_util.cuh"
#include "backend/cuda/sm90a/wgmma.cuh"
#include "core/env.h"
#include "core/status.h"

namespace ds::cuda {

namespace {

using namespace wgmma;

constexpr int kDH = 256;       // head dim
constexpr int kRows = 128;     // query rows per block: two warpgroups of 64
constexpr int kThreads = 256;  // two warpgroups
constexpr int kBN = 64;        // cache positions per K/V tile
// Shared memory: every tile is 4 regions of 64 columns (one per 128-byte row piece of the 256), each region rows of
// 128 bytes with the 16-byte chunk q of row r at q ^ (r % 8) (smem_desc_sw128's layout): Q 128 rows (64 KB), then two
// stages of K and V, 64 rows each (32 KB each).
constexpr uint32_t kQRegion = kRows * 128, kKVRegion = kBN * 128;
constexpr uint32_t kQBytes = 4 * kQRegion, kKVBytes = 4 * kKVRegion;
constexpr size_t kSmem = 1024 + kQBytes + 4 * size_t(kKVBytes);  // + alignment of the 1024-byte atoms
static_assert(kSmem <= 227 * 1024, "flash wg: shared memory");

// Where the 16-byte chunk ch (0..31) of row r goes in a tile of `region`-byte regions.
__device__ __forceinline__ uint32_t chunk_at(int r, int ch, uint32_t region) {
  return uint32_t(ch >> 3) * region + uint32_t(r) * 128 + (uint32_t((ch & 7) ^ (r & 7)) << 4);
}

// Descriptor of an MN-major operand in the 128-byte swizzle (the B of O += P·V: V's rows are the k dimension, 64
// columns of n per 128-byte row): 8-row atoms of 1024 bytes along k (stride-dimension offset), 64-column regions of
// `lbo` bytes along n (leading-dimension offset).
__device__ __forceinline__ uint64_t smem_desc_sw128_mn(uint32_t addr, uint32_t lbo) {
  return uint64_t((addr >> 4) & 0x3FFF) | uint64_t((lbo >> 4) & 0x3FFF) << 16 | uint64_t(1024 >> 4) << 32 |
         uint64_t(1) << 62;
}

// wgmma.m64n64k16 with A and B from shared memory (both K-major): D = A·B (ss64_0) or D += A·B (ss64).
// wgmma.m64n256k16 with A from registers and B MN-major (rs256_t): D += A·B.
#include "backend/cuda/sm90a/flash_wg_mma.inc"

__device__ __forceinline__ void st_zero16(uint32_t sa) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(sa), "r"(0) : "memory");
}

// V: session 33's changes as bits (DS_CUDA_FA_WG_V: 11 = all, the default; 0 = session 32's order and arithmetic),
// the same output bits either way (FlashAttention.WgVariantsSameBits):
//   1: O's rescale skipped where no row of the warp changed its maximum (the factor is exactly 1);
//   2: P and the factors by ex2.approx.ftz (exp2f's bits where x ≥ −126; 0 instead of a denormal below);
//   8: O rescaled as soon as P·V(j − 1) is done (before the tile's barrier), not between S(j + 1) and P·V(j).
// Measured alone and together (H200, docs/perf.md session 33): 8 alone lost 11%, 1 + 2 + 8 won 2-5%; a block-table
// read a tile ahead (the ncu profile's top stall) lost 3-5% in every combination and is not here.
template <int GROUP, int V>
__global__ void __launch_bounds__(kThreads, 1)
    k_flash_wg(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ kc,
               const __nv_bfloat16* __restrict__ vc, __nv_bfloat16* __restrict__ o, int nseq, int Nh, int Nkv, int bs,
               const int32_t* __restrict__ seqinfo, const int32_t* __restrict__ blocks, int maxb, float scale_log2) {
  constexpr int TQ = kRows / GROUP;  // tokens per block
  extern __shared__ uint8_t smem_raw[];
  const uint32_t sbase = (uint32_t(__cvta_generic_to_shared(smem_raw)) + 1023) & ~1023u;
  const uint32_t sQ = sbase, sKV = sbase + kQBytes;  // stage b: K at sKV + 2b·kKVBytes, V after it

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = tid >> 7;
  int kvh;
  FlashTile f;
  if (!flash_block(nseq, Nkv, seqinfo, blocks, maxb, TQ, lane, kvh, f)) return;
  const int q_start = f.q_start, ctx = f.ctx, t0 = f.t0, tq = f.tq, kv_end = f.kv_end, diag = f.diag;
  const int32_t* bt = f.bt;
  const int64_t crow = int64_t(Nkv) * kDH;  // elements per cache position
  const int64_t qrow = int64_t(Nh) * kDH;

  // Q: thread tid copies chunk tid % 32 of rows tid / 32 + 8i.
  const int ch = tid & 31;
  for (int r = tid >> 5; r < kRows; r += kThreads / 32) {
    const int tok = r % TQ, hg = r / TQ;
    const uint32_t dst = sQ + chunk_at(r, ch, kQRegion);
    if (tok < tq && (kRows % GROUP == 0 || hg < GROUP))  // rows past GROUP · TQ (group 6: 126) are padding
      cp_async16_sa(dst, q + int64_t(q_start + t0 + tok) * qrow + int64_t(kvh * GROUP + hg) * kDH + ch * 8);
    else
      st_zero16(dst);
  }
  // K/V tile j into stage b; positions ≥ kv_end are zero (never read from the cache: V there must not be NaN). Warp
  // w copies rows 8w .. 8w + 7, lane l row 8w + l / 4 and its 16-byte chunks l % 4 + 4i (i < 8): each copy reads 64
  // contiguous bytes of 8 rows, and a lane works out its cache address once per tile for K and V (per chunk, the
  // block-table division and 64-bit address arithmetic were most of the kernel's instructions: ncu, session 32).
  static_assert(kBN == kThreads / 4, "flash wg: one tile row per 4 lanes");
  const int lr = warp * 8 + (lane >> 2), lc = lane & 3;
  // crow_of(j): the cache row (block · bs + offset) of this lane's row of tile j, or −1 past kv_end; worked out once
  // per tile for its K and V copies, which are issued a tile apart.
  // (32-bit: a pool of 2^31 cache rows would hold over 2 TB at this head dim.)
  auto crow_of = [&](int j) {
    const int p = j * kBN + lr;
    if (p >= kv_end) return -1;
    const int d = p / bs;
    return bt[d] * bs + (p - d * bs);
  };
  auto load_tile = [&](int b, bool kk, bool vv, int cr) {
    const uint32_t dk = sKV + uint32_t(2 * b) * kKVBytes, dv = dk + kKVBytes;
    if (cr >= 0) {
      const int64_t off = int64_t(cr) * crow + int64_t(kvh) * kDH + lc * 8;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const uint32_t at = chunk_at(lr, lc + 4 * i, kKVRegion);
        if (kk) cp_async16_sa(dk + at, kc + off + 32 * i);
        if (vv) cp_async16_sa(dv + at, vc + off + 32 * i);
      }
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const uint32_t at = chunk_at(lr, lc + 4 * i, kKVRegion);
        if (kk) st_zero16(dk + at);
        if (vv) st_zero16(dv + at);
      }
    }
  };

  const int nkv = (kv_end + kBN - 1) / kBN;

  const int g = lane >> 2, t4 = lane & 3;
  // This thread's two rows (g and g + 8 of its warp's 16) and the last position each attends.
  const int r0 = warp * 16 + g, r1 = r0 + 8;
  const int pos0 = ctx + t0 + min(r0 % TQ, tq - 1), pos1 = ctx + t0 + min(r1 % TQ, tq - 1);
  const uint32_t qa = sQ + uint32_t(wg) * 64 * 128;  // this warpgroup's 64 rows of Q

  float acc[kDH / 8][4];
#pragma unroll
  for (int i = 0; i < kDH / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

  // K(t) sits in K stage t % 2, V(t) in V stage t % 2 (K at sKV + 2b·kKVBytes, V after it).
  auto kstage = [&](int j) { return sKV + uint32_t(2 * (j & 1)) * kKVBytes; };
  float(&of)[kDH / 2] = reinterpret_cast<float(&)[kDH / 2]>(acc);
  // S = Q·Kᵀ of tile j (64 rows × 64 positions per warpgroup), k16 steps in order over the head dim; issued only.
  auto issue_s = [&](int j, float (&s)[kBN / 8][4]) {
    float(&sf)[kBN / 2] = reinterpret_cast<float(&)[kBN / 2]>(s);
    const uint32_t kb = kstage(j);
    wg_fence();
#pragma unroll
    for (int c = 0; c < 4; ++c)
#pragma unroll
      for (int st = 0; st < 4; ++st) {
        const uint64_t da = smem_desc_sw128(qa + uint32_t(c) * kQRegion + 32 * st);
        const uint64_t db = smem_desc_sw128(kb + uint32_t(c) * kKVRegion + 32 * st);
        if (c == 0 && st == 0) ss64_0(sf, da, db);
        else ss64(sf, da, db);
      }
  };
  // The online softmax of tile j in the log2 domain (columns past a row's own position masked, only on tiles crossing
  // diag), with the O factor (c0, c1) returned (softmax_scores) rather than applied, since O may be in flight here.
  // Every row attends position 0, so the first tile gives a finite maximum and it stays finite.
  auto softmax = [&](int j, float (&s)[kBN / 8][4], float& c0, float& c1) {
    const bool mask = (j + 1) * kBN - 1 > diag;
    float mx0 = m0, mx1 = m1;
    flash_scale_mask(s, scale_log2, mask, j * kBN, t4, pos0, pos1, mx0, mx1);
    softmax_scores<kBN / 8, (V & 2) != 0>(s, mx0, mx1, m0, m1, l0, l1, c0, c1);
  };
  auto rescale = [&](float c0, float c1) {
    if constexpr ((V & 1) != 0)
      if (!__any_sync(0xffffffffu, c0 != 1.f || c1 != 1.f)) return;  // × 1 everywhere in this warp
#pragma unroll
    for (int i = 0; i < kDH / 8; ++i) acc[i][0] *= c0, acc[i][1] *= c0, acc[i][2] *= c1, acc[i][3] *= c1;
  };
  // O += P·V of tile j, issued only: P as A fragments (the S accumulators of n-tiles 2kk, 2kk + 1 are k16 step kk's).
  auto issue_pv = [&](int j, const uint32_t (&a)[kBN / 16][4]) {
    const uint32_t vb = kstage(j) + kKVBytes;
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk)
      rs256_t(of, a[kk], smem_desc_sw128_mn(vb + uint32_t(kk) * 2048, kKVRegion));
  };
  auto visible = [&] {  // this thread's copies and zero stores landed and visible to wgmma, everyone's
    fence_async_smem();
    __syncthreads();
  };
  // FA3's intra-warpgroup order: tile j's S is issued before P·V(j − 1), and the softmax of tile j runs while
  // P·V(j − 1) does (its O factor is applied once P·V(j − 1) is done, V & 8, else just before P·V(j) is issued).
  // Once S(j) and P·V(j − 1) are done (one barrier per tile), K stage j % 2 takes K(j + 2) and V stage (j + 1) % 2
  // takes V(j + 1): each copy has a whole tile's work to land before the barrier that makes it visible.
  load_tile(0, true, true, crow_of(0));
  cp_async_commit();
  int cr1 = nkv > 1 ? crow_of(1) : -1;  // tile j + 1's cache row (V(j + 1) is copied in iteration j)
  if (nkv > 1) load_tile(1, true, false, cr1);
  cp_async_commit();
  cp_async_wait<0>();
  visible();
  float sc[kBN / 8][4];
  uint32_t p[kBN / 16][4];
  float c0, c1;
  issue_s(0, sc);
  wg_commit();
  wg_wait<0>();
  reg_fence(reinterpret_cast<float(&)[kBN / 2]>(sc));
  softmax(0, sc, c0, c1);
  if constexpr ((V & 8) != 0) rescale(c0, c1);
#pragma unroll
  for (int kk = 0; kk < kBN / 16; ++kk) p_fragment(sc[2 * kk], sc[2 * kk + 1], p[kk]);
  __syncthreads();  // K stage 0 is free
  const int cr2 = nkv > 2 ? crow_of(2) : -1;
  if (nkv > 2) load_tile(0, true, false, cr2);
  if (nkv > 1) load_tile(1, false, true, cr1);
  cp_async_commit();
  cr1 = cr2;
  for (int j = 1; j < nkv; ++j) {
    issue_s(j, sc);  // K(j): visible since the last barrier
    wg_commit();
    if constexpr ((V & 8) == 0) rescale(c0, c1);
    issue_pv(j - 1, p);  // V(j − 1)
    wg_commit();
    wg_wait<1>();
    reg_fence(reinterpret_cast<float(&)[kBN / 2]>(sc));
    softmax(j, sc, c0, c1);
    wg_wait<0>();
    reg_fence(of);
    if constexpr ((V & 8) != 0) rescale(c0, c1);  // P·V(j − 1) is done: O takes tile j's factor now
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) p_fragment(sc[2 * kk], sc[2 * kk + 1], p[kk]);
    cp_async_wait<0>();  // K(j + 1) and V(j), copied during this tile
    visible();           // and every warpgroup is done with K(j) and V(j − 1)
    const int cr = j + 2 < nkv ? crow_of(j + 2) : -1;
    if (j + 2 < nkv) load_tile(j & 1, true, false, cr);
    if (j + 1 < nkv) load_tile((j + 1) & 1, false, true, cr1);
    cp_async_commit();
    cr1 = cr;
  }
  if constexpr ((V & 8) == 0) rescale(c0, c1);
  issue_pv(nkv - 1, p);
  wg_commit();
  wg_wait<0>();
  reg_fence(of);

  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float inv0 = 1.f / l0, inv1 = 1.f / l1;
  const int tok0 = r0 % TQ, tok1 = r1 % TQ;
  __nv_bfloat16* o0 = o + int64_t(q_start + t0 + tok0) * qrow + int64_t(kvh * GROUP + r0 / TQ) * kDH + 2 * t4;
  __nv_bfloat16* o1 = o + int64_t(q_start + t0 + tok1) * qrow + int64_t(kvh * GROUP + r1 / TQ) * kDH + 2 * t4;
#pragma unroll
  for (int i = 0; i < kDH / 8; ++i) {
    if (tok0 < tq && (kRows % GROUP == 0 || r0 < GROUP * TQ))
      *reinterpret_cast<__nv_bfloat162*>(o0 + i * 8) = __floats2bfloat162_rn(acc[i][0] * inv0, acc[i][1] * inv0);
    if (tok1 < tq && (kRows % GROUP == 0 || r1 < GROUP * TQ))
      *reinterpret_cast<__nv_bfloat162*>(o1 + i * 8) = __floats2bfloat162_rn(acc[i][2] * inv1, acc[i][3] * inv1);
  }
}

template <int GROUP, int V>
void launch(const void* q, const void* k, const void* v, void* o, int64_t T, int nseq, int64_t Nh, int64_t Nkv,
            int64_t bs, const int32_t* seqinfo, const int32_t* blocks, int maxb, cudaStream_t s) {
  flash_launch<k_flash_wg<GROUP, V>>(kThreads, kSmem, kRows / GROUP, kDH, q, k, v, o, T, nseq, Nh, Nkv, bs, seqinfo,
                                     blocks, maxb, s);
}

}  // namespace

bool flash_wg_prefill(const void* q, const void* k, const void* v, void* o, int64_t T, int nseq, int64_t Nh,
                      int64_t Nkv, int64_t Dh, int64_t bs, const int32_t* seqinfo, const int32_t* blocks, int maxb,
                      cudaStream_t s) {
  // DS_CUDA_FA_WG=0: the mma.sync kernel (read on every call, so one process can compare both).
  if (Dh != kDH || !sm90_device() || env_int("DS_CUDA_FA_WG", 1) == 0) return false;
  if (Nkv <= 0 || Nh % Nkv != 0) return false;
  const int64_t group = Nh / Nkv;
  // DS_CUDA_FA_WG_V=0: session 32's order and arithmetic, built for GQA 8:1 only (the 35B-A3B's), to compare.
  if (group == 8 && env_int("DS_CUDA_FA_WG_V", 11) == 0)
    return launch<8, 0>(q, k, v, o, T, nseq, Nh, Nkv, bs, seqinfo, blocks, maxb, s), true;
#define DS_FW(G) \
  if (group == G) return launch<G, 11>(q, k, v, o, T, nseq, Nh, Nkv, bs, seqinfo, blocks, maxb, s), true;
  DS_FW(8) DS_FW(6) DS_FW(4) DS_FW(2) DS_FW(1)
#undef DS_FW
  return false;
}

}  // namespace ds::cuda
