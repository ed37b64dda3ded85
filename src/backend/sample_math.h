// Sampling arithmetic shared by the CPU sampler (backend/cpu/sample.cpp, sampling/) and the CUDA kernels
// (backend/cuda): the per-row parameters of Backend::sample_rows, the counter-based uniform, the logit edits
// (bias and penalties) and the order-preserving float key. Every function here is compiled for both sides and
// rounds the same way on both: products and sums go through mul_rn/add_rn so nvcc cannot fuse them into FMAs.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define DS_HD __host__ __device__ __forceinline__
#else
#define DS_HD inline
#endif

namespace ds {

// One token that a row's logit_bias or penalties touch. Ids are distinct within a row.
struct SampleEdit {
  int32_t id = 0;
  int32_t count = 0;     // times generated: presence/frequency penalties (OpenAI)
  float bias = 0.f;      // logit_bias of the id (entries for the same id summed in list order)
  int32_t repeated = 0;  // in prompt or generated: repetition penalty (HF/vLLM)
};

// One row's sampling parameters (plain data, uploaded as is).
struct SampleRowParams {
  int32_t greedy = 0;             // 1: argmax of the edited logits (temperature < 1e-5), nothing drawn
  float inv_temperature = 1.f;    // z = edited logit × this (float product) when not greedy
  int32_t top_k = 0;              // <= 0: off
  float top_p = 1.f;              // 1: off
  float log_min_p = -__builtin_inff();  // ln(min_p); -inf: off
  float repetition_penalty = 1.f;
  float presence_penalty = 0.f;
  float frequency_penalty = 0.f;
  float u = 0.f;                  // the row's uniform in [0, 1) (uniform_at)
  // Speculative verification of a deterministic draft (not greedy; ops.h sample_rows): the draft id (-1: a plain
  // draw), and the uniform of the draw from the rest of the distribution where it is rejected.
  int32_t draft = -1;
  float u2 = 0.f;
  int32_t edit_begin = 0, edit_count = 0;  // its SampleEdits in the op's edit list
  // Its allowed ids (a grammar's or allowed_token_ids' mask): index of its bit mask among sample_rows' masks, each
  // mask_words(n) words, bit i % 32 of word i / 32 set iff id i may be sampled; -1: every id may.
  int32_t mask = -1;
};

// Words of one sample_rows mask over n ids.
DS_HD int64_t mask_words(int64_t n) { return (n + 31) / 32; }
// Whether a mask (null: none) lets id i be sampled.
DS_HD bool mask_allows(const uint32_t* mask, int64_t i) { return !mask || ((mask[i >> 5] >> (i & 31)) & 1u); }

DS_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
DS_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
DS_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
DS_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// SplitMix64's output function.
DS_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The counter-th uniform of a seed's stream, in [0, 1) with 24 bits (exact in float): SplitMix64 started at a
// hash of the seed, so draw i needs no state but (seed, i) and a skipped draw costs nothing.
DS_HD float uniform_at(uint64_t seed, uint64_t counter) {
  const uint64_t h = mix64(mix64(seed ^ 0x2545F4914F6CDD1Dull) + (counter + 1) * 0x9E3779B97F4A7C15ull);
  return float(uint32_t(h >> 40)) * (1.0f / 16777216.0f);
}

// Bias, then repetition penalty, then presence/frequency penalties on one raw logit (sampling::sample's order).
DS_HD float edit_logit(float x, const SampleEdit& e, const SampleRowParams& p) {
  x = add_rn(x, e.bias);
  if (e.repeated && p.repetition_penalty != 1.f)
    x = x > 0.f ? div_rn(x, p.repetition_penalty) : mul_rn(x, p.repetition_penalty);
  if (e.count > 0 && (p.presence_penalty != 0.f || p.frequency_penalty != 0.f))
    x = sub_rn(x, add_rn(mul_rn(p.frequency_penalty, float(e.count)), p.presence_penalty));
  return x;
}

// The value the filters and the draw see: the edited logit, divided by the temperature unless greedy.
DS_HD float scaled_logit(float x, const SampleRowParams& p) { return p.greedy ? x : mul_rn(x, p.inv_temperature); }

// Unsigned key with the order of the floats (-0 just below +0); NaN is never keyed (not a candidate).
DS_HD uint32_t order_key(uint32_t bits) { return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u); }
DS_HD uint32_t key_bits(uint32_t key) { return (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key; }

}  // namespace ds
