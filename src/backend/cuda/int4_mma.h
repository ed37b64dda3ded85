// Tensor-core W4A16 matrix products (int4_mma.cu): every int4 linear and the int4 routed experts.
//
// Weights are repacked at load into the "mma layout": for each 16-row tile mt and each 64-input chunk kc, lane l
// of a warp owns one uint4 (four 32-bit words, one per 16-input step j) holding exactly the eight nibbles its
// mma.sync.m16n8k16 A fragment needs: rows r0 = 16·mt + l/4 and r1 = r0 + 8, inputs kb = 64·kc + 16·(l%4) + 4·j
// + {0..3}, nibble order (r0,kb) (r1,kb) (r0,kb+2) (r1,kb+2) (r0,kb+1) (r1,kb+1) (r0,kb+3) (r1,kb+3), so that
// (w >> 4i) & 0x000F000F is one bf16×2 register after an exponent OR. The inputs of a 16-step are a permutation
// of the mathematical k order, applied identically to the activations (each lane loads its own 16 consecutive
// activations of the chunk with two 16-byte loads), so the product is unchanged.
// Dequantisation is exact: (q − z) is formed in bf16 (small integers), summed on tensor cores in fp32 per
// quantisation group, and the group's scale (stored fp16 as in the checkpoint, widened to fp32 exactly) multiplies
// the fp32 partial (never rounded to bf16).
//
// Batch invariance: a token's output never depends on which other tokens share the launch. Columns of an mma
// are independent, and K is always split into the same KS slices whose partials are added in slice order,
// whichever kernel variant (split-K across warps for few tokens, one warp over all of K for many) runs.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace ds::cuda {

struct MmaInt4 {
  const uint4* qw = nullptr;    // [N/16][K/64][32] uint4
  const uint16_t* sc = nullptr; // [N][K/G] fp16 scales (the checkpoint's bits; exact in fp32: sc_f())
  const uint8_t* z = nullptr;   // [N][K/G] zero points (the true zero: stored nibble + 1)
  int64_t N = 0, K = 0;
  int G = 128;
  int KS = 1;  // fixed K slices (see batch invariance above)
  // The zero point of every group where they are all equal (symmetric checkpoints: 8, the only kind the loader
  // accepts), else −1. The decode kernels then skip the zero-point loads (z stays for the others).
  int zu = -1;
};

// Whether an [N, K] int4 matrix with group size G can use the mma layout.
// (The kernels are instantiated for group size 128, AutoRound's and GPTQ's default; others run as bf16.)
inline bool mma_int4_supported(int64_t N, int64_t K, int G) { return N % 16 == 0 && G == 128 && K % G == 0; }
// The fixed number of K slices for a shape: 4, 2 or 1, each slice a whole number of groups.
inline int mma_int4_slices(int64_t K, int G) {
  for (int ks : {4, 2}) if (K % (int64_t(ks) * G) == 0) return ks;
  return 1;
}

// Host repack of rows [n0, n0 + Np) of the destination from one GPTQ/AutoRound part: qweight int32 [K/8, Np]
// (word r of column n holds inputs 8r..8r+7, nibble j = input 8r + j). dst is the whole destination matrix in
// the mma layout as 32-bit words; Np and n0 multiples of 16. Tiles are independent: fn is called per tile.
void mma_int4_pack_tile(const int32_t* qweight, int64_t Np, int64_t K, int64_t tile, int64_t n0, uint32_t* dst);

// Reference: the value W[n, k] (before scale and zero) that the packed layout holds (tests and debugging).
int mma_int4_nibble(const uint32_t* packed, int64_t K, int64_t n, int64_t k);

// y[m, n] = Σ_k x[m, k] W[n, k], x bf16 [M, K], y F32 or BF16 (ydt: ds::DType value) [M, N].
void mma_int4_linear(const MmaInt4& W, const void* x, int64_t M, void* y, int ydt, cudaStream_t s);
// Two or three linears of the same input (same K and group size) in one launch: ya = x·Aᵀ, yb = x·Bᵀ, yc = x·Cᵀ (B
// may be null; C only with B). Each output's bits equal those of its own mma_int4_linear (the blocks of each matrix
// compute exactly as alone). Three matrices take one launch at the sizes k_int4_mma serves, two launches where the
// large-M or warpgroup kernel does.
void mma_int4_linear2(const MmaInt4& A, void* ya, int ydta, const MmaInt4* B, void* yb, int ydtb, const void* x,
                      int64_t M, cudaStream_t s, const MmaInt4* C = nullptr, void* yc = nullptr, int ydtc = 0);

// Routed experts. W stacks E experts' rows: gate_up E × [gate I rows | up I rows], down E × [H rows].
// pairs: ids [P] (P = T·topk, pair p = t·topk + k). Scratch (device, int32): moe_scratch_ints(P, E) words.
int64_t mma_moe_scratch_ints(int64_t P, int64_t E);
// With `route`, the ids (route->ids, which `ids` must be) and their weights are first computed from the router
// logits [T, E] (Backend::moe_route's meaning, the same code as the backend's router kernel) in the launch that
// builds the tile table: one launch fewer, for decode-sized steps (one block routes all T tokens).
struct MoeRouteIn {
  const void* logits = nullptr;  // [T, E], dtype ldt (a ds::DType value)
  int ldt = 0;
  int64_t T = 0;
  int32_t* ids = nullptr;  // [T, topk]
  float* wts = nullptr;    // [T, topk]
};
// act[p, i] = silu(gate_e x_t)·(up_e x_t) as bf16 [P, I]; out[p, h] = down_e act[p] fp32 [P, H].
void mma_moe(const MmaInt4& gate_up, const MmaInt4& down, int64_t E, int64_t I, int64_t H, const void* x, int64_t topk,
             const int32_t* ids, int64_t P, int32_t* scratch, void* act, float* out, cudaStream_t s,
             const MoeRouteIn* route = nullptr);

}  // namespace ds::cuda
