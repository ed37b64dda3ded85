// Dequantisation of an int4 matrix in the mma layout (int4_mma.h) to a row-major bf16 copy, so that a prefill
// chunk's int4 linears can run as cuBLAS bf16 GEMMs (cuda_backend.cu, int4 linears of ≥ DS_INT4_DEQUANT_MIN_M rows).
// w[n, k] = bf16((q − z)·s) with q the stored nibble, z the group's zero point and s its fp32 scale: the product is
// formed in fp32 (exact) and rounded once to bf16, which is where this path differs from the mma kernels (they keep
// (q − z) exact in bf16 and apply s to the fp32 group partial).
#pragma once

#include <cuda_runtime.h>

#include "backend/cuda/int4_mma.h"

namespace ds::cuda {

// dst: bf16 [W.N, W.K], row-major, 16-byte aligned. One launch on s.
void int4_dequant_bf16(const MmaInt4& W, void* dst, cudaStream_t s);

}  // namespace ds::cuda
