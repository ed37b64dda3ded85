// Device pieces shared by the W4A16 tensor-core kernels (int4_mma.cu: every M; int4_gemm.cu: large M). Internal
// to those two files; layout and the batch-invariance contract: int4_mma.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/dev_util.cuh"
#include "backend/cuda/int4_mma.h"
#include "backend/cuda/mma_util.cuh"

namespace ds::cuda::int4dev {

// Where a block's tokens come from. Dense linears: tokens [blockIdx.y·NTOK, +NTOK) of x. Experts: tile
// blockIdx.y of the table built by k_moe_tiles (expert, first index into list, count); list holds pair ids p,
// whose x row is p / xdiv and whose output row is p.
struct TokenSrc {
  const int32_t* tiles = nullptr;
  const int32_t* ntiles = nullptr;
  const int32_t* list = nullptr;
  int64_t M = 0;
  int64_t xdiv = 1;
  // Dense linears (no tile table): each warp sends its first `pre` quantisation groups (weights, zero points, scales)
  // toward L2 before the PDL wait (weights are no kernel's output). 0: not.
  int pre = 0;
  // Experts: the tile table and pair list were final before the previous launch passed its PDL wait (the down
  // projection, launched after gate_up, which waits on the table's kernel before it triggers), so a block may read
  // its entry, and send its first weights toward L2, before its own wait. 0: after the wait.
  int early = 0;
  // Experts' cp.async rings: each 16-row unit's scales copied once per row by 16 lanes (1), not by every lane for its
  // two rows (0). DS_INT4_MOE_SCALE_ROWS.
  int srows = 0;
};

// The x row of pair/token p: p / xdiv in 32 bits (the hosts check P, M < 2^31; a 64-bit division is a ~70-instruction
// subroutine, paid per lane and token tile in every block's prologue), a shift where xdiv is a power of two (1 for
// dense linears and the down projection, top-k = 8 for gate_up: the 32-bit division is still a ~20-instruction chain
// after the PDL wait, where the pair ids are read).
__device__ __forceinline__ int64_t x_row(const TokenSrc& ts, int64_t p) {
  const uint32_t d = uint32_t(ts.xdiv);
  return int64_t((d & (d - 1)) == 0 ? uint32_t(p) >> (__ffs(int(d)) - 1) : uint32_t(p) / d);
}
__device__ __forceinline__ uint32_t bf16x2_sub(uint32_t a, uint32_t b) {
  __nv_bfloat162 r = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&a), *reinterpret_cast<const __nv_bfloat162*>(&b));
  return *reinterpret_cast<const uint32_t*>(&r);
}
// bf16×2 (128 + z, 128 + z): subtracting it from (128 + q) leaves q − z exactly. For z < 128 (zero points are a
// nibble + 1, at most 16) the bf16 of 128 + z is exponent 2^7 (0x4300) with mantissa z: two integer instructions
// instead of a float round trip.
__device__ __forceinline__ uint32_t zero_pair(uint8_t z) { return (0x4300u | uint32_t(z)) * 0x10001u; }
// (v & 0x000F000F) | 0x43004300: bf16×2 (128 + nibble 0, 128 + nibble 4) in one LOP3. Written out, ptxas emits an AND
// and an OR (one 32-bit immediate per instruction); here the exponent word is a register operand (one MOV per kernel),
// which takes the decode kernels' integer work from 11 to 7 instructions per packed word (session 7, ncu SASS).
__device__ __forceinline__ uint32_t nib_bf16(uint32_t v) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(v), "n"(0x000F000F), "r"(0x43004300u));
  return r;
}
// One A fragment (rows r0, r1; four inputs each) from a packed word; zz0 / zz1: zero_pair of rows r0 / r1.
__device__ __forceinline__ void dequant(uint32_t w, uint32_t zz0, uint32_t zz1, uint32_t a[4]) {
  a[0] = bf16x2_sub(nib_bf16(w), zz0);
  a[1] = bf16x2_sub(nib_bf16(w >> 4), zz1);
  a[2] = bf16x2_sub(nib_bf16(w >> 8), zz0);
  a[3] = bf16x2_sub(nib_bf16(w >> 12), zz1);
}
// Element j of a 4-vector (uint4: a packed weight word or fragment register; float4: a scale).
template <class V>
__device__ __forceinline__ auto word_of(const V& v, int j) -> decltype(v.x) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}
// A lane's 8 A fragments of one quantisation group (its two packed uint4: chunks 2gi and 2gi + 1, the 8 k16 steps in
// order); zz0 / zz1: zero_pair of its rows g and g + 8.
__device__ __forceinline__ void dequant_group(const uint4& w0, const uint4& w1, uint32_t zz0, uint32_t zz1,
                                              uint32_t (&a)[8][4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    dequant(word_of(w0, j), zz0, zz1, a[j]);
    dequant(word_of(w1, j), zz0, zz1, a[4 + j]);
  }
}
// A stored fp16 scale (MmaInt4::sc) as fp32, exactly.
__device__ __forceinline__ float sc_f(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ float silu(float v) { return v / (1.f + expf(-v)); }
template <int A, int B>
__device__ __forceinline__ void zero_frags(float (&f)[A][B][4]) {
#pragma unroll
  for (int a = 0; a < A; ++a)
#pragma unroll
    for (int b = 0; b < B; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) f[a][b][c] = 0.f;
}

// One matrix of a launch: weights, rows per expert (dense: N), output columns, output and its dtype.
struct Int4Out {
  MmaInt4 W;
  int64_t rpe = 0, n_out = 0;
  void* y = nullptr;
  int ydt = 0;
};
// Up to three matrices of one launch (c only in k_int4_mma: int4_gemm and k_int4_wg take a and b).
struct Int4Pair {
  Int4Out a, b, c;
  unsigned b_block = 0xFFFFFFFFu;  // first block of matrix b (none: all blocks are a's)
  unsigned c_block = 0xFFFFFFFFu;  // first block of matrix c (none)
};
// The launch's matrices (b and c optional; c only with b) and its block count *nb: blocks(o) blocks for each
// matrix, a's first.
template <class Blocks>
inline Int4Pair int4_pair(const Int4Out& A, const Int4Out* B, Blocks blocks, unsigned* nb, const Int4Out* C = nullptr) {
  Int4Pair P;
  P.a = A;
  *nb = blocks(A);
  if (B) {
    P.b = *B;
    P.b_block = *nb;
    *nb += blocks(*B);
    if (C) {
      P.c = *C;
      P.c_block = *nb;
      *nb += blocks(*C);
    }
  }
  return P;
}

}  // namespace ds::cuda::int4dev
