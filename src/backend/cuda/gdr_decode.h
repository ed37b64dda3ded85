// Fused Gated DeltaNet for short chunks (decode, speculative verify and replay): Backend::deltanet_mix's
// conv1d_causal + gated_delta_rule + gated_rmsnorm in two kernels (gdr_decode.cu) instead of four. The CPU
// specification is backend/cpu/cpu_backend.cpp (conv1d_causal, gated_delta_rule, gated_rmsnorm); tests/cuda/
// test_cuda_ops.cpp (CudaOps.DeltaNetMix*) compares them.
//
//   k_gdn_conv_prep: one block per (head unit, sequence): the unit is a q head, a k head or a v head (128 threads,
//     one per channel). Causal conv1d with the state window + SiLU over the sequence's tokens, the window written
//     back (each channel by exactly one block: no two blocks share a channel), then per token the L2 norm of q
//     (times 1/sqrt(Dk)) and k, or v as is; v-head blocks also compute g = −exp(A_log)·softplus(a + dt_bias) and
//     β = sigmoid(b), with ba_x given forming b and a themselves (in_proj_b | in_proj_a; session 12: batch 1 2.53 →
//     2.47 ms; since session 20 the sums before the PDL wait). Outputs fp32 scratch qn, kn [T, Hk, Dk], vv
//     [T, Hv, Dv], g, beta [T, Hv].
//   k_gdn_recur_norm: one block per (value head, sequence), 256 threads: warp w holds state rows
//     w·Dk/8 .. (w+1)·Dk/8 − 1, lane l columns 4l .. 4l + 3 (Dv = 128), so a warp moves whole 512-byte state rows
//     with 16-byte loads and stores. The state is loaded before the PDL wait (it overlaps k_gdn_conv_prep); per
//     token the two column sums (S·k and S·q over rows) reduce across warps in shared memory, and the output row
//     of the head is complete in every warp, so the gated RMSNorm (over the head's Dv values, · w · silu(z)) needs
//     only a warp sum (z is requested with the token's k, q and v). One kernel for both, and the states streamed
//     through a shared-memory ring by persistent blocks, were measured slower (docs/perf.md, session 8).
// Both read the sequence table (q_start, q_len, ctx, slot) on the device and touch only sequences with
// 1 <= q_len < kGdnShortMax (graph-safe, batch-invariant: a sequence's result depends on its own rows only).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ds::cuda {

constexpr int64_t kGdnShortMax = 32;  // = kGdrLongMin (cuda_backend.cu): the sequences the short kernels take

inline bool gdn_decode_supported(int64_t Kc, int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv) {
  return Kc >= 2 && Kc <= 6 && Hk > 0 && Hv % Hk == 0 && (Dk == 32 || Dk == 64 || Dk == 128) && Dv == 128;
}

// mixed [T, C] (dtype mdt; q | k | v channels, C = 2·Hk·Dk + Hv·Dv), conv_w [C, Kc] fp32, conv_state
// [slots, C, Kc − 1] fp32; ba [T, 2·Hv] (b | a, dtype bdt); A_log, dt_bias [Hv] fp32; ssm [slots, Hv, Dk, Dv] of dtype
// sdt, F32 or BF16 (bf16: widened on load, rounded after every token, ops.h StateLayer).
// z [T, Hv·Dv] (dtype zdt) and norm_w [Dv] fp32, or both null (y = the delta rule's output). y [T, Hv·Dv] (ydt).
// Scratch (fp32): qn, kn [T, Hk, Dk], vv [T, Hv, Dv], g, beta [T, Hv]. nseq sequences in seqinfo [nseq, 4].
// ba_x (optional, bf16 [T, ba_K], 16-byte aligned): the layer input, and ba_w bf16 [2·Hv, ba_K] (in_proj_b rows, then
// in_proj_a): the v-head blocks compute ba = ba_x·ba_wᵀ themselves for the short sequences (rounded to bdt, written
// to ba, which is then an output) — one launch fewer per layer; gdn_ba_fusable says which shapes can. ba_x must
// have been written two or more kernels before this launch on `stream` (the model's layer input: the q/k/v and z
// linears come between), since the sums read it before the PDL wait (pdl.h, "Reading before the wait").
bool gdn_ba_fusable(int64_t K, const void* x, const void* w);
void gdn_decode(const void* mixed, int mdt, const float* conv_w, int64_t Kc, float* conv_state, void* ba,
                int bdt, const float* A_log, const float* dt_bias, const void* z, int zdt, const float* norm_w,
                float eps, int64_t T, int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv, int nseq, const int32_t* seqinfo,
                void* ssm, int sdt, float* qn, float* kn, float* vv, float* g, float* beta, void* y, int ydt,
                cudaStream_t stream, const void* ba_x = nullptr, const void* ba_w = nullptr, int64_t ba_K = 0);

}  // namespace ds::cuda
