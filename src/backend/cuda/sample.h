// Backend::sample_rows on the GPU (sample.cu); the CPU specification is backend/cpu/sample.cpp.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/sample_math.h"

namespace ds::cuda {

// ids[r] for r < R, as ops.h defines sample_rows: logits [R, V] of dtype `dt` (ds::DType value: F32, BF16, F16),
// n = ids considered, rows [R], edits and masks (mask_words(n) words each; null when no row has one) on the device,
// `max_edits` the largest edit_count of a row, scratch z [R, n] fp32. Kernels only, on `stream`; nothing is
// synchronised.
void launch_sample_rows(const void* logits, int dt, int64_t V, int64_t n, int R, const SampleRowParams* rows,
                        const SampleEdit* edits, int max_edits, const uint32_t* masks, float* z, int32_t* ids,
                        cudaStream_t stream);

// Backend::row_logprobs: out[i·stride ..] = cpu::row_logprobs(row rows[i] of logits [·, V] (dtype dt) over n ids,
// chosen[i], k) for i < R; k <= 20, rows / chosen / out on the device, `scratch` of row_logprobs_scratch_bytes(R, n)
// bytes. Kernels only, on `stream`.
int64_t row_logprobs_scratch_bytes(int R, int64_t n);
void launch_row_logprobs(const void* logits, int dt, int64_t V, int64_t n, int R, const int32_t* rows,
                         const int32_t* chosen, int k, int stride, float* out, void* scratch, cudaStream_t stream);

// Backend::row_ranks: out[i] = cpu::row_rank(row rows[i] of logits [·, V] (dtype dt), n, chosen[i]) for i < R; rows /
// chosen / out on the device. Kernels only, on `stream`.
void launch_row_ranks(const void* logits, int dt, int64_t V, int64_t n, int R, const int32_t* rows,
                      const int32_t* chosen, int32_t* out, cudaStream_t stream);

}  // namespace ds::cuda
