// Device probes for benchmarks and tests (not used by the engine): what the memory system gives a kernel that only
// reads, the ceiling the weight-streaming kernels (the experts, lm_head, the DeltaNet state's read half) are held to.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ds::cuda {

// Reads bytes (a multiple of 16; p 16-byte aligned) once with 16-byte loads, 4 in flight per thread, over `blocks`
// blocks of 256 threads (0: 8 per SM); writes one word to *sink only if the XOR of everything read is a value no test
// uses, so the loads cannot be dropped. One launch on s.
void read_stream(const void* p, int64_t bytes, uint32_t* sink, int blocks, cudaStream_t s);

// The rate of `mma.sync.m16n8k16` (bf16 inputs, fp32 accumulators: the decode kernels' tensor instruction) on the
// current device, in FLOP/s: one launch of 16 warps per SM, each issuing `iters` × 8 mma on 8 independent
// accumulators from registers (no memory traffic), timed with events on s (synchronises it). The ceiling for the
// mma.sync kernels, as the bf16 matmul is for cuBLAS (H200, session 37: ~645 TFLOP/s, 6.6 cycles per mma per
// scheduler; one dependent chain per warp: ~31 cycles per mma).
double mma_sync_rate(int iters, cudaStream_t s);

}  // namespace ds::cuda
