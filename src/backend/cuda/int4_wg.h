// Hopper (sm_90a) W4A16 linears for the medium token counts (9 .. 256 rows): warpgroup MMA (`wgmma.mma_async`) with
// the dequantised weights as the A operand in registers and the activations as the B operand in shared memory.
// Same arithmetic as k_int4_mma (int4_mma.h): per quantisation group a fresh fp32 partial of the group's 8 k16 steps
// (the same 16 inputs per step, in the same order), times the group's fp32 scale, added to the slice partial in group
// order; slices added in order. So every row is bit-identical to the mma.sync kernels' (CudaOps.Int4Wgmma): the
// tensor cores' wgmma and mma.sync give the same fp32 bits for the same 16 products per k16 step.
// Built only where the build targets sm_90 (src/backend/cuda/sm90a/, compiled for sm_90a); elsewhere the stubs
// report it unavailable and the mma.sync kernels run.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ds::cuda {

namespace int4dev {
struct Int4Out;
struct TokenSrc;
}
struct MmaInt4;

// Whether the kernel is built, the current device can run it (compute capability 9.0) and DS_INT4_WG=1 asks for it
// (off by default: slower than the mma.sync kernels so far, docs/perf.md session 13).
bool int4_wg_enabled();

// ya = x·Aᵀ (and yb = x·Bᵀ in the same launch when B is given) for M tokens, if the kernel applies (enabled, group
// size 128); false: nothing was launched and the caller runs the mma.sync kernels.
bool int4_wg_linear2(const int4dev::Int4Out& A, const int4dev::Int4Out* B, const void* x, int64_t M, cudaStream_t s);

// The routed experts at prefill sizes through warpgroup MMA (sm90a/int4_wgx.cu): tiles of up to 128 pairs of one
// expert (k_moe_tiles with kGemmTok), gate_up then down, each output bit for bit the mma.sync kernels'. Default of
// DS_INT4_WGX (read on every call; 0 = the mma.sync kernels).
constexpr bool kInt4WgxDefault = true;
// Built, on a compute capability 9.0 device, and DS_INT4_WGX on.
bool int4_wgx_enabled();
// Whether the shapes suit it (group 128, I a multiple of 64, down.K = I, gate_up.K = H; P pairs of P / topk tokens,
// top-k a power of two, activations with element offsets under 2^31).
bool int4_wgx_fits(const MmaInt4& gate_up, const MmaInt4& down, int64_t I, int64_t H, int64_t P, int64_t topk);
// gu: gate_up (rows 2·I per expert, n_out I, y = act bf16 [P, I], written with each 64-column chunk permuted for the
// down projection); dn: down (y fp32 [P, H]); x bf16 [T, H]; ts / gy: the tile table of kGemmTok-pair tiles (xdiv =
// top-k); xp: T·H bf16 of scratch (x permuted), free until the down projection writes dn.y (it may be dn.y).
void int4_wgx_moe(const int4dev::Int4Out& gu, const int4dev::Int4Out& dn, const void* x, int64_t T,
                  const int4dev::TokenSrc& ts, int64_t gy, void* xp, cudaStream_t s);

}  // namespace ds::cuda
