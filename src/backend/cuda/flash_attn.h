// Tensor-core flash attention for the prefill rows of Backend::attention (flash_attn.cu).
//
// One block per (sequence, kv head, tile of TQ = ⌊128 / group⌋ query tokens): its 8 warps own the 128 query rows
// (q heads of the group × tokens of the tile, 16 rows per warp; at group 6, 126 rows and 2 of padding), so every
// K/V tile read from the paged cache is shared by the whole GQA group. K/V tiles of 32 positions are staged in shared memory through the block table with
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

// The flash kernels' grid: Σ over flash sequences of ceil(q_len / TQ) < T / TQ + (number of flash sequences ≤
// min(nseq, T / kFlashMinQ)) tiles, an upper bound from T and nseq only, so a recorded graph stays valid whatever the
// sequences' lengths (the extra blocks exit).
inline int64_t flash_tile_bound(int64_t T, int nseq, int64_t TQ) {
  const int64_t per_seq = T / kFlashMinQ;
  return (T + TQ - 1) / TQ + (nseq < per_seq ? nseq : per_seq);
}

// Whether the flash kernel is built for this shape (head_dim 64, 128 or 256 with q heads per kv head 1, 2, 4 or 8;
// head_dim 256 with 6).
bool flash_attn_supported(int64_t Nh, int64_t Nkv, int64_t Dh);

// The same attention through Hopper's warpgroup MMA (sm90a/flash_wg.cu) where it applies: head dim 256, q heads per
// kv head 1, 2, 4, 6 or 8, built (sm_90a), on a compute capability 9.0 device, and DS_CUDA_FA_WG not 0. False: nothing
// was launched. flash_attn_prefill calls it first.
bool flash_wg_prefill(const void* q, const void* k, const void* v, void* o, int64_t T, int nseq, int64_t Nh,
                      int64_t Nkv, int64_t Dh, int64_t bs, const int32_t* seqinfo, const int32_t* blocks, int maxb,
                      cudaStream_t s);

// o [T, Nh·Dh] bf16 for the rows of every sequence with q_len ≥ kFlashMinQ (other rows untouched): causal attention
// of q [T, Nh·Dh] bf16 over the paged cache k/v [num_blocks, bs, Nkv, Dh] bf16. seqinfo [nseq, 4] (q_start, q_len,
// ctx_len, slot) and blocks [nseq, maxb] on the device (DevBatch). scale = 1/sqrt(Dh).
void flash_attn_prefill(const void* q, const void* k, const void* v, void* o, int64_t T, int nseq, int64_t Nh,
                        int64_t Nkv, int64_t Dh, int64_t bs, const int32_t* seqinfo, const int32_t* blocks, int maxb,
                        cudaStream_t s);

}  // namespace ds::cuda
