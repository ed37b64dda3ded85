// Tensor-core bf16 linears for steps of up to kBf16MmaMaxM rows (bf16_mma.cu): every decode and verify step's
// small bf16 linears (router, shared expert gate_up with SwiGLU, shared down with the gated add, shared gate,
// DeltaNet in_proj_a/b), several weights of one input in one launch.
//
// Weights stay in their row-major bf16 [N, K] copy (the one cuBLAS reads above kBf16MmaMaxM rows). mma.sync
// m16n8k16: 16 weight rows are the m dimension, tokens the n8 dimension. The 16 inputs of each k16 step are a
// permutation of the mathematical k order, chosen so that every lane loads its A and B fragments straight from
// row-major memory with 16-byte loads that are fully coalesced: in a 64-input chunk, lane (g = lane/4, t = lane%4)
// loads inputs [8t, 8t + 8) and [32 + 8t, 32 + 8t + 8) of weight rows g and g + 8 and of token g; step j uses the
// four inputs 32·(j/2) + 8t + 4·(j%2) + {0..3}. The same permutation on both operands leaves the product unchanged.
//
// Batch invariance (a row's bits never depend on how many rows share the step, 1..kBf16MmaMaxM): columns of an mma
// are independent; K is split into a fixed number of slices per K (bf16_mma_slices, never dependent on M), each
// slice's partial is one chain of mma steps in k order from zero, and the partials are added in slice order. Every
// kernel variant (tokens per block, one or two weight tiles per warp, chunks in flight) keeps that arithmetic, so
// a verify step's rows equal the plain decode step's rows bit for bit (greedy speculation; docs/notes.md).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ds::cuda {

constexpr int kBf16MmaMaxM = 256, kBf16MmaSegs = 4;

// One weight of a launch. Modes: 0 plain y = x·Wᵀ; 1 SwiGLU (W = [gate rows; up rows], y [M, rows] =
// silu(g)·u with g and u rounded to bf16 first, as linear + silu_mul); 2 gated add (y += sigmoid(gate[m])·s with s
// rounded to bf16 first, as linear + sigmoid_scale_add); 3 gated add onto the routed experts' sum (y = r +
// sigmoid(gate[m])·s, r = Σ_k moe_w[m, k]·moe_out[m·moe_k + k] rounded to y's dtype: moe_experts' combine, then the
// gated add; y is not read).
struct Bf16MmaSeg {
  const void* w = nullptr;     // bf16 [N, K] row-major, 16-byte aligned
  void* y = nullptr;           // [M, rows], dtype ydt (a ds::DType value: F32, BF16 or F16)
  const void* gate = nullptr;  // modes 2, 3: [M] logits, dtype gdt
  int ydt = 0, gdt = 0, mode = 0;
  int64_t rows = 0;            // output columns: N, or N / 2 for SwiGLU
  const float* moe_out = nullptr;  // mode 3: the routed experts' outputs [M·moe_k, rows] fp32
  const float* moe_w = nullptr;    // mode 3: their weights [M, moe_k]
  int moe_k = 0;
};

// Whether an [N, K] bf16 weight and input x can take the kernel: K a multiple of 8, 16-byte aligned pointers.
bool bf16_mma_supported(int64_t K, const void* w, const void* x);
// The fixed number of K slices for inputs of length K (8, 4, 2 or 1; see batch invariance above).
int bf16_mma_slices(int64_t K);
// segs[0..n) read the same x bf16 [M, K], 1 ≤ M ≤ kBf16MmaMaxM; launches ceil(n / kBf16MmaSegs) kernels.
// x_early: the caller guarantees that x was written two or more kernels back on s, so it is complete whenever the
// launch starts (pdl.h, "Reading before the wait"). Then each block runs its whole main loop before the PDL wait,
// beside the previous kernel, and waits only for the epilogue, which reads y (mode 2), gate and the routed outputs
// (mode 3) and writes y. The same bits.
void bf16_mma_linear(const Bf16MmaSeg* segs, int n, const void* x, int64_t M, int64_t K, cudaStream_t s,
                     bool x_early = false);

}  // namespace ds::cuda
