// The fp32 reference backend: plain loops over row-major fp32 tensors, parallel with OpenMP.
// It is the specification the CUDA backend is tested against: keep it simple and obviously right.
#pragma once
#include "backend/ops.h"

namespace ds::cpu {

// Dense fp32 weights [N, K]; int4 checkpoints are dequantized exactly (scale · (q − z) in fp32).
struct CpuLinear : LinearWeight {
  std::vector<float> w;
};

struct CpuExperts : ExpertsWeight {
  std::vector<std::vector<float>> gate_up;  // E × [2I, H]
  std::vector<std::vector<float>> down;     // E × [H, I]
};

// Appends the fp32 [N, K] matrix described by `src` to `out` (row-major).
void dequantize_to_f32(const LinearSource& src, std::vector<float>& out);

// y[t, n] = Σ_k x[t, k] · w[n, k]
void matmul_nt(const float* x, const float* w, float* y, int64_t T, int64_t N, int64_t K);

// Gated delta rule of one value head over one sequence's new tokens, updating S [Dk, Dv] in place.
// q, k [L, Dk] already L2-normalised (q also scaled), v [L, Dv], g (log-decay) and beta [L]; o [L, Dv].
void gdr_recurrent(const float* q, const float* k, const float* v, const float* g, const float* beta, int64_t L,
                   int64_t Dk, int64_t Dv, float* S, float* o);
void gdr_chunked(const float* q, const float* k, const float* v, const float* g, const float* beta, int64_t L,
                 int64_t Dk, int64_t Dv, int64_t chunk, float* S, float* o);

}  // namespace ds::cpu
