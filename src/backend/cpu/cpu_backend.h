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

// Vision tower ops (backend/cpu/vision_ops.cpp); the CpuBackend methods of the same names call these.
void layernorm(const Tensor& x, const Tensor& w, const Tensor& b, float eps, Tensor& y);
void add_bias(Tensor& x, const Tensor& bias);
void gelu(const Tensor& x, bool tanh_approx, Tensor& y);
void embed_bilinear_add(Tensor& x, const Tensor& table, const std::vector<int32_t>& idx, const std::vector<float>& w);
void vision_rope(Tensor& qkv, int64_t Nh, int64_t Dh, const std::vector<int32_t>& pos, double theta);
void vision_attention(const Tensor& qkv, int64_t Nh, int64_t Dh, const std::vector<int32_t>& cu_seqlens, Tensor& o);
void scatter_rows(Tensor& x, const std::vector<int32_t>& rows, const Tensor& src);

// Sampling (backend/cpu/sample.cpp): the specification of Backend::sample_rows, also the host sampler's core
// (sampling::sample and verify_draft draw from the same set).
struct SampleSet {
  std::vector<int32_t> ids;  // kept ids, increasing
  std::vector<double> w;     // their weights expf(z - zmax)
  double total = 0;          // Σ w, in id order
};
// z [n] = scaled_logit(edited raw logits) (sample_math.h); `edits` [ne]. `mask` (mask_words(n) words, null: none):
// the ids it forbids are -inf, unedited.
void sample_values(const float* raw, int64_t n, const SampleRowParams& p, const SampleEdit* edits, int64_t ne,
                   std::vector<float>& z, const uint32_t* mask = nullptr);
// The lowest id of the largest z (NaN as -inf); 0 when every z is -inf or NaN.
int32_t sample_argmax(const float* z, int64_t n);
// The kept set of a non-greedy row (min_p, top_k, top_p as ops.h defines them). False: nothing to sample.
bool sample_filter(const float* z, int64_t n, const SampleRowParams& p, SampleSet& out);
// The first kept id whose cumulative weight exceeds u × total (else the last kept id with w > 0).
int32_t sample_draw(const SampleSet& s, float u);
// Speculative verification of a draft d against the kept set (Leviathan et al.), p = w / total: d where
// u · q(d) < p(d), else a draw with u2 from normalize(max(0, p − q)) (p itself where that is empty, unreachable but by
// rounding). q [n]: the draft's distribution, or null for a deterministic draft (one-hot at d: the residual is p
// without d). *accepted (optional): whether d passed the test.
int32_t sample_verify(const SampleSet& s, int32_t d, const float* q, float u, float u2, bool* accepted = nullptr);
// One row of sample_rows: greedy or filter + draw with p.u; -1 when nothing can be sampled (with a mask, greedy too:
// no id it allows has a z above -inf).
int32_t sample_row(const float* raw, int64_t n, const SampleRowParams& p, const SampleEdit* edits, int64_t ne,
                   const uint32_t* mask = nullptr);
// Raw log-softmax of one row over ids [0, n) (Backend::row_logprobs' specification, and the host sampler's logprobs):
// out[0] = logits[chosen] − lse, then for j < min(k, n) out[1 + 2j] = the id of the j-th most likely (ties: the lower
// id first), out[2 + 2j] = its logprob. lse = max + log Σ exp(double(x) − max), in double, in id order.
void row_logprobs(const float* logits, int64_t n, int32_t chosen, int32_t k, float* out);
// vLLM's rank of `chosen` in one row: how many ids in [0, n) have a logit >= logits[chosen] (itself included; a NaN
// compares false, so a NaN chosen logit ranks 0) (Backend::row_ranks' specification).
int32_t row_rank(const float* logits, int64_t n, int32_t chosen);
// Backend::sample_rows over host fp32 logits [R, V] (R = rows.size()).
void sample_rows(const float* logits, int64_t V, int64_t vocab_limit, const std::vector<SampleRowParams>& rows,
                 const std::vector<SampleEdit>& edits, const std::vector<uint32_t>& masks, std::vector<int32_t>& ids);

}  // namespace ds::cpu
