// The self-routing experts' tile table (int4_mma.cu, TokenSrc::rlogits): the pairs of a step sorted by (expert,
// pair), cut into tiles of at most ntok consecutive pairs of one expert, in the order k_moe_tiles lays its tiles out
// (experts in increasing order; within an expert its order of pairs is arbitrary, this one's increasing). Host and
// device, so that a CPU test checks it (tests/cuda/test_cuda_ops.cpp, MoeSelfRouteTable). The one-warp table of
// k_moe_route_tiles_w ranks its pairs in the same order (moe_pair_before).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define DS_HD __host__ __device__
#else
#define DS_HD
#endif

namespace ds::cuda {

// Whether pair q (of expert eq) sorts before pair p (of expert ep): by expert, then by pair.
DS_HD inline bool moe_pair_before(int32_t eq, int q, int32_t ep, int p) { return eq < ep || (eq == ep && q < p); }

// Where pair p goes when the P pairs (ids[p] = expert) are sorted by (expert, pair).
DS_HD inline int moe_pair_rank(const int32_t* ids, int P, int p) {
  const int32_t ep = ids[p];
  int r = 0;
  for (int q = 0; q < P; ++q) r += moe_pair_before(ids[q], q, ep, p);
  return r;
}

// Tile y of the sorted pairs (sorted[i] = the pair of rank i): its expert, first index into sorted and count. False
// past the last tile.
DS_HD inline bool moe_sorted_tile(const int32_t* ids, const int32_t* sorted, int P, int ntok, int y, int* e,
                                  int* start, int* cnt) {
  for (int i = 0, tile = 0; i < P; ++tile) {
    const int32_t ex = ids[sorted[i]];
    int j = i + 1;
    while (j < P && j - i < ntok && ids[sorted[j]] == ex) ++j;
    if (tile == y) {
      *e = ex, *start = i, *cnt = j - i;
      return true;
    }
    i = j;
  }
  return false;
}

}  // namespace ds::cuda

#undef DS_HD
