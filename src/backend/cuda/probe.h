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

}  // namespace ds::cuda
