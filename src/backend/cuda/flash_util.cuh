// Device pieces shared by the flash attention kernels (flash_attn.cu, sm90a/flash_wg.cu).
#pragma once

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/flash_attn.h"

namespace ds::cuda {

// The (sequence, tile) of flash block idx: blocks run over the tiles of TQ query tokens of the sequences with at
// least kFlashMinQ new tokens, in sequence order, each sequence's last (longest) tiles first. A warp-wide prefix sum
// of the tile counts (every lane gets the same answer); seq = −1 past the last tile (an upper bound of blocks is
// launched; the extra ones exit).
__device__ __forceinline__ void flash_tile_of(int idx, int nseq, const int32_t* __restrict__ seqinfo, int TQ, int lane,
                                              int& seq, int& tile) {
  seq = -1, tile = 0;
  int base = 0;
  for (int s0 = 0; s0 < nseq; s0 += 32) {
    const int s = s0 + lane;
    int n = 0;
    if (s < nseq) {
      const int ql = seqinfo[s * 4 + 1];
      if (ql >= kFlashMinQ) n = (ql + TQ - 1) / TQ;
    }
    int inc = n;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, inc, off);
      if (lane >= off) inc += v;
    }
    const int total = __shfl_sync(0xffffffffu, inc, 31);
    if (idx < base + total) {
      const int l = __ffs(__ballot_sync(0xffffffffu, base + inc > idx)) - 1;
      const int first = base + __shfl_sync(0xffffffffu, inc - n, l);
      const int ns = __shfl_sync(0xffffffffu, n, l);
      seq = s0 + l;
      tile = ns - 1 - (idx - first);
      return;
    }
    base += total;
  }
}

// A flash block's tile: its sequence's rows and context, the tile's tokens and the cache positions they attend.
struct FlashTile {
  int q_start, q_len, ctx;  // the sequence's first row in the batch, rows in this call, positions already cached
  int t0, tq;               // the tile's first token within the chunk, tokens in the tile
  int kv_end;               // the tile's last token attends positions [0, kv_end)
  int diag;                 // its first token attends [0, diag]: K/V tiles up to diag need no mask
  const int32_t* bt;        // the sequence's block table
};
// Block blockIdx.x's kv head and tile (blockIdx.x = tile index · Nkv + kv head); false past the last tile (the block
// exits). Every lane gets the same answer.
__device__ __forceinline__ bool flash_block(int nseq, int Nkv, const int32_t* __restrict__ seqinfo,
                                            const int32_t* __restrict__ blocks, int maxb, int TQ, int lane, int& kvh,
                                            FlashTile& f) {
  kvh = int(blockIdx.x % unsigned(Nkv));
  const int idx = int(blockIdx.x / unsigned(Nkv));
  int seq, tile;
  flash_tile_of(idx, nseq, seqinfo, TQ, lane, seq, tile);
  if (seq < 0) return false;
  f.q_start = seqinfo[seq * 4 + 0], f.q_len = seqinfo[seq * 4 + 1], f.ctx = seqinfo[seq * 4 + 2];
  f.t0 = tile * TQ;
  f.tq = min(TQ, f.q_len - f.t0);
  f.kv_end = f.ctx + f.t0 + f.tq;
  f.diag = f.ctx + f.t0;
  f.bt = blocks + int64_t(seq) * maxb;
  return true;
}

// A tile's scores in the log2 domain (s · scale_log2) and this lane's row maxima: s[i][e] is (row g + 8·(e / 2),
// column c0 + 8i + 2·t4 + e % 2) of an S tile (c0: its first position; t4 = lane % 4); with `mask` (a tile crossing
// the diagonal) a column past its row's own position (pos0: row g, pos1: row g + 8) becomes −inf. mx0 / mx1 come in
// as the running maxima and leave as the maxima over them and this lane's columns.
template <int NS>
__device__ __forceinline__ void flash_scale_mask(float (&s)[NS][4], float scale_log2, bool mask, int c0, int t4,
                                                 int pos0, int pos1, float& mx0, float& mx1) {
#pragma unroll
  for (int i = 0; i < NS; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float x = s[i][e] * scale_log2;
      if (mask) {
        const int col = c0 + i * 8 + 2 * t4 + (e & 1);
        if (col > (e < 2 ? pos0 : pos1)) x = -INFINITY;
      }
      s[i][e] = x;
      if (e < 2) mx0 = fmaxf(mx0, x);
      else mx1 = fmaxf(mx1, x);
    }
}

// A flash kernel's launch (k_flash_attn and k_flash_wg take the same parameters): flash_tile_bound's tiles × Nkv
// blocks of `threads`, `smem` bytes of dynamic shared memory (the limit raised once per kernel), TQ query tokens per
// block, the softmax scale in the log2 domain for head dim DH.
template <auto Kernel>
void flash_launch(int threads, size_t smem, int64_t TQ, int64_t DH, const void* q, const void* k, const void* v,
                  void* o, int64_t T, int nseq, int64_t Nh, int64_t Nkv, int64_t bs, const int32_t* seqinfo,
                  const int32_t* blocks, int maxb, cudaStream_t s) {
  static const bool attr = [smem] {
    DS_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    return true;
  }();
  (void)attr;
  const int64_t tiles = flash_tile_bound(T, nseq, TQ);
  const float scale_log2 = float(1.4426950408889634 / std::sqrt(double(DH)));
  Kernel<<<unsigned(tiles * Nkv), threads, smem, s>>>(
      static_cast<const __nv_bfloat16*>(q), static_cast<const __nv_bfloat16*>(k), static_cast<const __nv_bfloat16*>(v),
      static_cast<__nv_bfloat16*>(o), nseq, int(Nh), int(Nkv), int(bs), seqinfo, blocks, maxb, scale_log2);
  DS_CUDA_CHECK(cudaGetLastError());
}

}  // namespace ds::cuda
