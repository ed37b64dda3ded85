// Large-M W4A16 tensor-core kernel (int4_gemm.cu): int4 linears of many tokens (prefill) and expert tiles of up to
// 128 pairs. Selected by int4_mma.cu above a size threshold; DS_CUDA_NO_BIG_GEMM=1 keeps the int4_mma.cu kernels.
//
// Same arithmetic as k_int4_mma, element by element (int4_mma.h, batch invariance): per quantisation group a fresh
// fp32 mma.m16n8k16 partial over the group's 8 k16 steps in the same order with the same fragments, times the
// group's fp32 scale, added to the slice partial in group order; slice partials added in slice order. What changes
// is only how data reaches the registers: the block's 128 tokens × one group of activations and its packed weights
// go to shared memory with cp.async (3 stages), so one dequantised weight fragment feeds 64 tokens of a warp and one
// activation fragment feeds the 4 warps of a token half.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/int4_mma_dev.cuh"

namespace ds::cuda {

constexpr int kGemmTok = 128;  // tokens per block (dense: consecutive tokens; experts: one tile of k_moe_tiles)

// Whether the large-M kernel may be used: DS_CUDA_NO_BIG_GEMM=0 turns it on, =1 off; unset, kInt4GemmDefault.
// Off by default: on the H200 (session 4) it has not yet beaten the k_int4_mma kernels at prefill sizes
// (bench/RESULTS.md); the tests run it explicitly.
inline constexpr bool kInt4GemmDefault = false;
bool int4_gemm_enabled();
// Thresholds (read on every call so tests can set them): dense linears from M ≥ DS_INT4_BIG_MIN_M (default 512);
// experts from P ≥ DS_INT4_BIG_MOE_MIN · E pairs (default 48 per expert on average).
int64_t int4_gemm_min_m();
int64_t int4_gemm_moe_min();

// One launch over gy token tiles of kGemmTok (ts as for k_int4_mma); B (optional, not GATED): a second matrix of
// the same input. GATED: A is the experts' gate_up, output silu(gate)·up as bf16.
void int4_gemm(bool gated, const int4dev::Int4Out& A, const int4dev::Int4Out* B, const void* x,
               const int4dev::TokenSrc& ts, int64_t gy, cudaStream_t s);

}  // namespace ds::cuda
