// Device pieces shared by the flash attention kernels (flash_attn.cu, sm90a/flash_wg.cu).
#pragma once

#include <cstdint>

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

}  // namespace ds::cuda
