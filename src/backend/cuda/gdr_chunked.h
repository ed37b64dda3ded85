// Chunked gated delta rule for prefill on tensor cores (gdr_chunked.cu). The CPU specification is
// backend/cpu/deltanet.cpp `gdr_chunked` (chunk 64); tests/cuda/test_cuda_gdr.cpp compares them.
//
// Per value head and chunk of 64 tokens (G = cumulative log-decay within the chunk, β per token):
//   A[i,j] = β_i (k_i·k_j) e^{G_i−G_j} (j<i),  T = (I+A)⁻¹,  Tb = T·diag(β),  P[i,j] = (q_i·k_j) e^{G_i−G_j} (j≤i)
//   V' = Tb·(V − e^G⊙(K·S))            (= U − W·S of the WY form: U = Tb·V, W = Tb·(e^G⊙K))
//   O  = e^G⊙(Q·S) + P·V'
//   S ← e^{G_c}·S + Kᵀ·(e^{G_c−G}⊙V')
// Two kernels: k_gdr_chunk_prep, fully parallel over every (chunk, key head): KKᵀ and QKᵀ once in fp32, then
// per pair of value heads G, P, A and T = (I + A)⁻¹ by 16 × 16 blocks in fp32 (to scratch); k_gdr_chunk_state, one
// block of 16 warps per (sequence, value head, 32 state columns) walking the chunks in order: the four products on
// tensor cores, the state fp32 in registers across chunks, the next chunk's inputs staged by cp.async during the
// current one.
// Every product is 3×TF32 (mma.sync m16n8k8: each fp32 operand split into a tf32 high part and a tf32 remainder,
// hi·hi + hi·lo + lo·hi), so the results keep fp32 accuracy (measured vs the CPU: ≤ 1.2e-6 rel L2, as the
// token-serial kernels). Both read the sequence table (q_start, q_len, ctx, slot) on the device: only sequences with
// q_len ≥ kGdrChunkMin are touched (graph-safe, batch-invariant: a sequence's result depends on its own length only).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ds::cuda {

constexpr int64_t kGdrChunkMin = 64;  // sequences with at least this many tokens in the step take the chunked path
constexpr int kGdrChunk = 64;         // tokens per chunk

inline bool gdr_chunked_supported(int64_t Dk, int64_t Dv) { return (Dk == 64 || Dk == 128) && Dv % 32 == 0; }

// qn, kn [T, Hk, Dk] fp32 (l2-normalised, q scaled), g, beta [T, Hv] fp32 (k_gdr_prep's outputs); v from qkv
// [T, C] (dtype qdt, value head j at column 2·Hk·Dk + j·Dv); ssm [slots, Hv, Dk, Dv] fp32; o [T, Hv·Dv] (dtype odt).
// Scratch: Gc [T, Hv], Tb and P [T, Hv, 64] fp32. nseq sequences in seqinfo [nseq, 4].
void gdr_chunked(const float* qn, const float* kn, const float* g, const float* beta, const void* qkv, int qdt,
                 int64_t C, int64_t T, int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv, int nseq,
                 const int32_t* seqinfo, float* ssm, void* o, int odt, float* Gc, float* Tb, float* P,
                 cudaStream_t stream);
// The two launches of gdr_chunked, separately (tests time them).
void gdr_chunked_prep(const float* qn, const float* kn, const float* g, const float* beta, int64_t T, int64_t Hk,
                      int64_t Hv, int64_t Dk, int nseq, const int32_t* seqinfo, float* Gc, float* Tb, float* P,
                      cudaStream_t stream);
void gdr_chunked_state(const float* qn, const float* kn, const void* qkv, int qdt, int64_t C, int64_t Hk, int64_t Hv,
                       int64_t Dk, int64_t Dv, int nseq, const int32_t* seqinfo, const float* Gc, const float* Tb,
                       const float* P, float* ssm, void* o, int odt, cudaStream_t stream);

}  // namespace ds::cuda
