// Tensor-core split-context attention for the rows that do not run the flash kernel: decode rows and short
// speculative verify chunks (attn_decode.cu).
//
// One block of 4 warps per (token, kv head, split), the same grid and partial format as the CUDA-core split kernel
// it replaces (k_attn_split in cuda_backend.cu; DS_CUDA_NO_TC_DECODE=1 goes back to it): the split's positions
// [p0, p1) of the token's context, in tiles of 16 cache positions staged in shared memory through the block table
// (cp.async, 3 tiles in flight). The q heads of the GQA group are the 16 rows of an mma.sync m16n8k16 (rows past the
// group are zero), so S = Q·Kᵀ is 2·Dh/16 mma per tile for the whole group, where the CUDA-core kernel spent ~100
// instructions per (head, position). Each warp computes S over a quarter of the head dims; the partials are added
// in warp order through shared memory, so every warp holds the same S and softmax (DS_ATTN_QK_SPLIT=0: every warp
// computes all of S, before session 17), then P·V for its quarter of the head dims. The online softmax is fp32 in the log2 domain; P is rounded to bf16 for P·V (as in the flash
// kernel). Partials (m in the natural-log domain, l, unnormalised acc[Dh]) go to part [T, Nh, S, Dh + 2] fp32 for
// k_attn_merge. Deterministic: each partial is written by one block in a fixed order.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ds::cuda {

// Head dims 64, 128 and 256; at most 16 q heads per kv head.
bool attn_decode_tc_supported(int64_t Nh, int64_t Nkv, int64_t Dh);

// Blocks of the kernel (head dim Dh, as attn_decode_tc would launch it) that the current device holds at once: SMs ×
// blocks per SM. The backend sizes a step's splits to fit this one wave.
int64_t attn_decode_tc_wave(int64_t Dh);

// The splits a row of context n_ctx uses: the first Se = min(S, ceil(n_ctx / min_pos)) of S (each of ≥ min_pos
// positions; min_pos ≤ 0: all S). The rest are empty. The kernel's rule, which k_attn_merge_sm follows to read only
// the live ones.
__device__ __forceinline__ int attn_live_splits(int n_ctx, int S, int min_pos) {
  return min_pos > 0 ? max(1, min(S, (n_ctx + min_pos - 1) / min_pos)) : S;
}

// q [T, Nh·Dh] bf16, k/v caches [num_blocks, bs, Nkv, Dh] bf16; seq_of [T], seqinfo [nseq, 4] (q_start, q_len,
// ctx_len, slot), blocks [nseq, maxb] (DevBatch). Rows of sequences with q_len ≥ flash_min are skipped. scale =
// 1/sqrt(Dh). Grid (T, Nkv, S). min_pos > 0: a row of context n uses only the first min(S, ceil(n / min_pos)) splits
// (each of ≥ min_pos positions); the others write an empty partial (m = −inf, l = 0, acc not written).
void attn_decode_tc(const void* q, const void* k, const void* v, int64_t T, int64_t Nh, int64_t Nkv, int64_t Dh,
                    int64_t bs, const int32_t* seq_of, const int32_t* seqinfo, const int32_t* blocks, int maxb,
                    float scale, int S, float* part, int flash_min, int min_pos, cudaStream_t s);

}  // namespace ds::cuda
