// Vision-tower kernels of the CUDA backend (vision_kernels.cu): the ops of backend/ops.h's "vision tower" section.
// Each one means exactly what its CPU twin in backend/cpu/vision_ops.cpp means (tests/cuda/test_cuda_vision.cpp
// compares them). Activations are bf16 (any dtype where noted: `dt` codes are ds::DType values), accumulation fp32.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace ds::cuda {

// y [R, D] = LayerNorm(x) · w + b (biased variance, two passes in fp32); w, b fp32 [D].
void vis_layernorm(const void* x, int xdt, const float* w, const float* b, float eps, int64_t R, int64_t D, void* y,
                   int ydt, cudaStream_t s);
// x [R, N] += bias [N] (fp32).
void vis_add_bias(void* x, int xdt, const float* bias, int64_t R, int64_t N, cudaStream_t s);
// y = gelu(x) over n values: tanh approximation or the exact erf form.
void vis_gelu(const void* x, int xdt, bool tanh_approx, int64_t n, void* y, int ydt, cudaStream_t s);
// x [R, D] += Σ_j w[r·J + j] · table[idx[r·J + j]] (idx, w on the device).
void vis_embed_bilinear_add(void* x, int xdt, const void* table, int tdt, const int32_t* idx, const float* w, int64_t R,
                            int64_t J, int64_t D, cudaStream_t s);
// 2-D rotary in place on the q and k parts of qkv [P, 3·Nh·Dh]; pos [2, P] (rows, then cols), freq [Dh/4] fp32
// (the CPU reference's float(theta^(−2j/half))).
void vis_rope(void* qkv, int dt, int64_t P, int64_t Nh, int64_t Dh, const int32_t* pos, const float* freq,
              cudaStream_t s);

// Segment-masked bidirectional attention on tensor cores (mma.sync m16n8k16 bf16, fp32 accumulation, online
// softmax). qkv bf16 [P, 3·Nh·Dh] 16-byte aligned, o bf16 [P, Nh·Dh]. Query tiles of 64 rows never straddle a
// segment: `tiles` (device, int32 [ntiles, 3]) lists per tile its segment's [s0, s1) and its first row;
// vis_attention_tiles builds it from cu_seqlens.
constexpr int kVisAttnRows = 64;
bool vis_attention_supported(int64_t Dh);  // Dh a multiple of 8, at most 128
std::vector<int32_t> vis_attention_tiles(const std::vector<int32_t>& cu_seqlens);
void vis_attention(const void* qkv, int64_t Nh, int64_t Dh, const int32_t* tiles, int64_t ntiles, void* o,
                   cudaStream_t s);

// x[rows[i]] = src[i] (both dtype dt, rows of H values; rows on the device).
void vis_scatter_rows(void* x, const void* src, int dt, const int32_t* rows, int64_t R, int64_t H, cudaStream_t s);

}  // namespace ds::cuda
