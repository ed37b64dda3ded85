// Tensor-core flash attention for the prefill rows of Backend::attention (flash_attn.cu).
//
// One block per (sequence, kv head, tile of TQ = 128 / group query tokens): its 8 warps own the 128 query rows
// (q heads of the group × tokens of the tile, 16 rows per warp), so every K/V tile read from the paged cache is
// shared by the whole GQA group. K/V tiles of 32 positions are staged in shared memory through the block table with
// cp.async (double-buffered); S = Q·Kᵀ and O += P·V run on mma.sync m16n8k16 (bf16 in, fp32 accumulate); the
// online softmax is fp32 (exp2 of log2e-prescaled scores); P is rounded to bf16 for P·V; O stays in fp32 registers
// and is written once, as bf16. The causal mask is applied only on the tiles that cross the tile's first position.
//
// Dispatch (CudaBackend::attention): sequences whose chunk has at least kFlashMinQ new tokens run this kernel;
// shorter ones (decode rows, speculative verify chunks of K + 1 ≤ 5 tokens) keep the split kernel, so their bits
// never depend on what else is in the batch. A step with both launches both; each kernel skips the other's
// sequences on the device (graph-safe: the grid depends only on T and the number of sequences). Each output row is
// computed by exactly one block in a fixed order: deterministic.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ds::cuda {

// Sequences with at least this many query tokens in the call run the flash kernel.
constexpr int64_t kFlashMinQ = 16;

// Whether the flash kernel is built for this shape (head_dim 64, 128 or 256; q heads per kv head 1, 2, 4 or 8).
bool flash_attn_supported(int64_t Nh, int64_t Nkv, int64_t Dh);

// o [T, Nh·Dh] bf16 for the rows of every sequence with q_len ≥ kFlashMinQ (other rows untouched): causal attention
// of q [T, Nh·Dh] bf16 over the paged cache k/v [num_blocks, bs, Nkv, Dh] bf16. seqinfo [nseq, 4] (q_start, q_len,
// ctx_len, slot) and blocks [nseq, maxb] on the device (DevBatch). scale = 1/sqrt(Dh).
void flash_attn_prefill(const void* q, const void* k, const void* v, void* o, int64_t T, int nseq, int64_t Nh,
                        int64_t Nkv, int64_t Dh, int64_t bs, const int32_t* seqinfo, const int32_t* blocks, int maxb,
                        cudaStream_t s);

}  // namespace ds::cuda
