// Backend::sample_rows on CUDA (src/backend/cuda/sample.cu) against its CPU specification (backend/cpu/sample.cpp)
// over a table of shapes (R 1, 3, 64; V 7, 1000, 151936, 248320; vocab_limit V and below; fp32 and bf16 logits)
// and every combination of temperature (greedy included), top_k, top_p, min_p, penalties over repeated tokens and
// logit bias. Tokens must be identical; the only tolerated difference is a genuine boundary case, where the CPU's
// double sums and the GPU's float sums in another order may fall on either side: the draw's target u × total
// within 1e-5 × total of the chosen tokens' cumulative boundary, or a top_p cut whose mass is within 1e-5 × total
// of top_p × total. Greedy rows and rows with nothing to sample (-1) must always be identical.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>

#include "backend/cpu/cpu_backend.h"
#include "backend/ops.h"
#include "core/dtype.h"
#include "cuda_test_util.h"
#include "sampling/sampling.h"

namespace ds {
namespace {

constexpr double kEps = 1e-5;

// The combination table: index → parameters (216 combinations, cycled through the rows of every shape).
sampling::SamplingParams combo(int i, int64_t n, std::mt19937_64& g) {
  sampling::SamplingParams p;
  const float temps[] = {0.f, 0.6f, 1.3f};
  const int32_t ks[] = {0, 1, 40};
  const float tps[] = {1.f, 0.9f, 0.3f};
  const float mps[] = {0.f, 0.05f};
  p.temperature = temps[i % 3];
  p.top_k = ks[(i / 3) % 3];
  p.top_p = tps[(i / 9) % 3];
  p.min_p = mps[(i / 27) % 2];
  if ((i / 54) % 2) {
    p.repetition_penalty = 1.3f;
    p.presence_penalty = 0.7f;
    p.frequency_penalty = 0.4f;
  }
  if ((i / 108) % 2) {
    std::uniform_int_distribution<int32_t> id(0, int32_t(n - 1));
    p.logit_bias = {{id(g), 6.f}, {id(g), -3.f}, {id(g), 2.5f}, {int32_t(n - 1), 4.f}};
    p.logit_bias.push_back({p.logit_bias[0].first, 0.5f});  // a repeated id: biases summed
  }
  return p;
}
constexpr int kCombos = 216;

struct Classified {
  bool boundary = false;
  std::string why;
};

// Decides whether a CPU/GPU disagreement on a non-greedy row is a rounding boundary (see the file comment).
Classified classify(const std::vector<float>& z, const SampleRowParams& p, int32_t cpu_tok, int32_t gpu_tok) {
  const int64_t n = int64_t(z.size());
  const float ninf = -std::numeric_limits<float>::infinity();
  float zmax = ninf;
  for (float v : z) zmax = std::max(zmax, v);
  float lo = p.log_min_p == ninf ? ninf : zmax + p.log_min_p;
  auto cand = [&](float v) { return v > ninf && v >= lo; };
  auto w = [&](float v) { return double(std::exp(v - zmax)); };
  if (p.top_k > 0) {
    std::vector<float> c;
    for (float v : z)
      if (cand(v)) c.push_back(v);
    if (int64_t(c.size()) > p.top_k) {
      std::nth_element(c.begin(), c.begin() + (p.top_k - 1), c.end(), std::greater<float>());
      lo = c[size_t(p.top_k - 1)];
    }
  }
  if (p.top_p < 1.f) {
    std::vector<std::pair<float, double>> c;
    double total = 0;
    for (float v : z)
      if (cand(v)) {
        c.push_back({v, w(v)});
        total += w(v);
      }
    std::sort(c.begin(), c.end(), [](auto& a, auto& b) { return a.first > b.first; });
    const double target = double(p.top_p) * total;
    double acc = 0;
    for (size_t i = 0; i < c.size();) {
      size_t j = i;
      while (j < c.size() && c[j].first == c[i].first) acc += c[j++].second;
      if (std::abs(acc - target) <= kEps * total) return {true, "top_p cut within 1e-5 of top_p x total"};
      if (acc >= target) {
        lo = c[i].first;
        break;
      }
      i = j;
    }
  }
  double total = 0;
  for (float v : z)
    if (cand(v)) total += w(v);
  if (gpu_tok < 0 || gpu_tok >= n || !cand(z[size_t(gpu_tok)])) return {false, "GPU token outside the kept set"};
  // A draft: accepted where u x total < w_d, else the draw with u2 over the kept set without it.
  const int64_t d = p.draft >= 0 && p.draft < n ? p.draft : -1;
  if (d >= 0) {
    const double wd = cand(z[size_t(d)]) ? w(z[size_t(d)]) : 0.0;
    const double ua = double(p.u) * total;
    if (std::abs(ua - wd) <= kEps * total) return {true, "draft acceptance within 1e-5 of u x total"};
    if (ua < wd) return {false, "the draft is accepted, the GPU chose another token"};
    if (gpu_tok == d) return {false, "the draft is rejected, the GPU chose it"};
    total -= wd;
  }
  const double target = double(d >= 0 ? p.u2 : p.u) * total;
  double before = 0;
  for (int64_t i = 0; i < gpu_tok; ++i)
    if (cand(z[size_t(i)]) && i != d) before += w(z[size_t(i)]);
  const double after = before + w(z[size_t(gpu_tok)]);
  if (before - kEps * total <= target && target <= after + kEps * total)
    return {true, "draw target within 1e-5 of a cumulative boundary"};
  char buf[200];
  std::snprintf(buf, sizeof buf, "not a boundary: target %.9g, GPU token's cumulative [%.9g, %.9g) of %.9g (CPU %d)",
                target, before, after, total, cpu_tok);
  return {false, buf};
}

struct Stats {
  int64_t rows = 0, boundary = 0;
  std::vector<int> combos_seen = std::vector<int>(kCombos, 0);
};

void run_shape(test::Both& B, int R, int64_t V, int64_t limit, DType dt, int& next_combo, Stats& st) {
  SCOPED_TRACE(str_cat("R ", R, " V ", V, " vocab_limit ", limit, " ", dtype_name(dt)));
  std::mt19937_64 g(uint64_t(R) * 1000003u + uint64_t(V) * 7u + uint64_t(limit) + (dt == DType::BF16 ? 1 : 0));
  const int64_t n = std::min(limit, V);
  std::vector<float> host(size_t(R) * size_t(V));
  for (int r = 0; r < R; ++r) {
    // Mostly spread-out rows, some peaked ones (one token dominant), like real logits.
    std::normal_distribution<float> d(0.f, r % 4 == 3 ? 1.f : 3.f);
    for (int64_t i = 0; i < V; ++i) host[size_t(r) * size_t(V) + size_t(i)] = d(g);
    if (r % 4 == 3) host[size_t(r) * size_t(V) + size_t(g() % uint64_t(n))] += 25.f;
  }
  if (dt == DType::BF16)
    for (auto& v : host) v = bf16_to_f32(f32_to_bf16(v));
  Tensor t = B.gpu->upload_f32(host, {R, V}, dt);

  std::vector<SampleRowParams> rows;
  std::vector<SampleEdit> edits;
  std::vector<uint32_t> masks;
  std::vector<int> combo_of;
  for (int r = 0; r < R; ++r) {
    const int c = next_combo++ % kCombos;
    combo_of.push_back(c);
    ++st.combos_seen[size_t(c)];
    sampling::SamplingParams p = combo(c, n, g);
    p.seed = g();
    // A prompt with repeated ids, and generated tokens seen several times.
    std::vector<int32_t> prompt;
    std::uniform_int_distribution<int32_t> id(0, int32_t(n - 1));
    const int plen = r == 0 ? 3000 : 40;  // row 0: more edits than one block of the edit kernel
    for (int i = 0; i < plen; ++i) prompt.push_back(i % 5 == 0 ? 0 : id(g));
    sampling::SeqSampler s(p, prompt);
    for (int i = 0; i < 30; ++i) s.accept(i % 3 == 0 ? prompt[1] : id(g));
    s.draws = g() % 1000;
    rows.push_back(sampling::next_row(s, edits));
    // Half the sampled rows verify a draft (speculative rejection sampling): a likely id (a logit the row holds high)
    // or any id.
    if (!rows.back().greedy && g() % 2) {
      const float* x = host.data() + size_t(r) * size_t(V);
      rows.back().draft = g() % 3 ? int32_t(std::max_element(x, x + n) - x) : int32_t(g() % uint64_t(n));
      rows.back().u2 = uniform_at(g(), 0);
    }
    // A third of the rows masked (a grammar's or allowed_token_ids' ids): one id up to all but one, a row now and
    // then sharing the previous row's mask.
    if (g() % 3 != 0) continue;
    const int64_t W = mask_words(n);
    if (!masks.empty() && g() % 4 == 0) {
      rows.back().mask = int32_t(masks.size() / size_t(W)) - 1;
      continue;
    }
    static const double kDensity[] = {0.0, 0.001, 0.05, 0.5, 0.999};
    const double dens = kDensity[g() % 5];
    std::vector<uint32_t> m(size_t(W), 0u);
    std::bernoulli_distribution keep(dens);
    for (int64_t i = 0; i < n; ++i)
      if (keep(g)) m[size_t(i / 32)] |= 1u << (i % 32);
    const int64_t one = int64_t(g() % uint64_t(n));
    m[size_t(one / 32)] |= 1u << (one % 32);  // at least one id
    rows.back().mask = int32_t(masks.size() / size_t(W));
    masks.insert(masks.end(), m.begin(), m.end());
  }
  std::vector<int32_t> got, again, want;
  const auto t0 = std::chrono::steady_clock::now();
  B.gpu->sample_rows(t, limit, rows, edits, masks, got);
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  B.gpu->sample_rows(t, limit, rows, edits, masks, again);
  EXPECT_EQ(got, again) << "the GPU is not deterministic";
  cpu::sample_rows(host.data(), V, limit, rows, edits, masks, want);
  ASSERT_EQ(got.size(), size_t(R));
  if (V >= 151936) std::printf("  R %d V %ld %s: sample_rows %.3f ms (incl. uploads and the copy back)\n", R, long(V),
                               dtype_name(dt), ms);
  for (int r = 0; r < R; ++r) {
    ++st.rows;
    if (got[size_t(r)] == want[size_t(r)]) continue;
    const SampleRowParams& p = rows[size_t(r)];
    if (p.greedy || want[size_t(r)] < 0) {
      ADD_FAILURE() << "row " << r << " (combo " << combo_of[size_t(r)] << (p.greedy ? ", greedy" : ", nothing to sample")
                    << "): GPU " << got[size_t(r)] << ", CPU " << want[size_t(r)];
      continue;
    }
    std::vector<float> z;
    cpu::sample_values(host.data() + size_t(r) * size_t(V), n, p, edits.data() + p.edit_begin, p.edit_count, z,
                       p.mask >= 0 ? masks.data() + size_t(p.mask) * size_t(mask_words(n)) : nullptr);
    const Classified c = classify(z, p, want[size_t(r)], got[size_t(r)]);
    if (c.boundary) {
      ++st.boundary;
      std::printf("  boundary case: row %d combo %d: GPU %d, CPU %d (%s)\n", r, combo_of[size_t(r)], got[size_t(r)],
                  want[size_t(r)], c.why.c_str());
    } else {
      ADD_FAILURE() << "row " << r << " combo " << combo_of[size_t(r)] << ": GPU " << got[size_t(r)] << ", CPU "
                    << want[size_t(r)] << ": " << c.why;
    }
  }
}

TEST(CudaSampling, MatchesCpuOverShapesAndParameters) {
  DS_REQUIRE_GPU();
  test::Both B;
  Stats st;
  int next_combo = 0;
  for (int64_t V : {int64_t(7), int64_t(1000), int64_t(151936), int64_t(248320)})
    for (int R : {1, 3, 64})
      for (DType dt : {DType::F32, DType::BF16})
        for (int64_t limit : {V, V - std::max<int64_t>(1, V / 10)}) run_shape(B, R, V, limit, dt, next_combo, st);
  for (int c = 0; c < kCombos; ++c) EXPECT_GT(st.combos_seen[size_t(c)], 0) << "combination " << c << " never ran";
  std::printf("  %ld rows, %ld boundary cases\n", long(st.rows), long(st.boundary));
  EXPECT_LE(st.boundary, std::max<int64_t>(3, st.rows / 100)) << "boundary cases should be rare";
}

// Rows with nothing to sample, NaNs, -inf bias, a single finite logit, ties everywhere.
TEST(CudaSampling, EdgeRows) {
  DS_REQUIRE_GPU();
  test::Both B;
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  const int64_t V = 5000;
  std::vector<std::vector<float>> rows_x = {
      std::vector<float>(V, -inf),                 // nothing: -1 when sampling, 0 when greedy
      std::vector<float>(V, 1.5f),                 // all tied
      std::vector<float>(V, -inf),                 // one finite logit
      std::vector<float>(V, 0.f),                  // NaNs sprinkled
  };
  rows_x[2][4321] = -7.f;
  for (int64_t i = 0; i < V; i += 7) rows_x[3][size_t(i)] = nan;
  rows_x[3][100] = 3.f;
  for (DType dt : {DType::F32, DType::BF16})
    for (int greedy = 0; greedy < 2; ++greedy)
      for (int32_t k : {0, 3}) {
        std::vector<float> host;
        for (auto& x : rows_x) host.insert(host.end(), x.begin(), x.end());
        Tensor t = B.gpu->upload_f32(host, {int64_t(rows_x.size()), V}, dt);
        std::vector<SampleRowParams> rows;
        std::vector<SampleEdit> edits;
        for (size_t r = 0; r < rows_x.size(); ++r) {
          sampling::SamplingParams p;
          p.temperature = greedy ? 0.f : 0.8f;
          p.top_k = k;
          p.top_p = 0.7f;
          p.seed = 3 + r;
          if (r == 1) p.logit_bias = {{10, -inf}, {11, -inf}};
          sampling::SeqSampler s(p, {});
          rows.push_back(sampling::next_row(s, edits));
        }
        std::vector<int32_t> got, want;
        B.gpu->sample_rows(t, V, rows, edits, {}, got);
        cpu::sample_rows(host.data(), V, V, rows, edits, {}, want);
        EXPECT_EQ(got, want) << dtype_name(dt) << (greedy ? " greedy" : " sampled") << " top_k " << k;
        EXPECT_EQ(want[0], greedy ? 0 : -1);
        EXPECT_EQ(want[2], 4321);
        // Masked: the first row (all -inf) gives -1 greedy too; a mask on the lone finite logit keeps it, one without
        // it leaves nothing; the tied row's mask picks its lowest allowed id when greedy; a bias cannot reopen an id.
        const int64_t W = mask_words(V);
        std::vector<uint32_t> masks(size_t(3 * W), 0u);
        auto allow = [&](int m, int64_t id) { masks[size_t(m * W + id / 32)] |= 1u << (id % 32); };
        allow(0, 4321);
        allow(1, 10);  // -inf bias on the tied row
        allow(1, 77);
        allow(1, 3000);
        allow(2, 4320);
        std::vector<SampleRowParams> mrows = rows;
        mrows[0].mask = 0;
        mrows[1].mask = 1;
        mrows[2].mask = greedy ? 0 : 2;
        mrows[3].mask = 1;
        B.gpu->sample_rows(t, V, mrows, edits, masks, got);
        cpu::sample_rows(host.data(), V, V, mrows, edits, masks, want);
        EXPECT_EQ(got, want) << dtype_name(dt) << (greedy ? " greedy" : " sampled") << " top_k " << k << ", masked";
        EXPECT_EQ(want[0], -1);
        if (greedy) EXPECT_EQ(want[1], 77);
        EXPECT_TRUE(want[1] == 77 || want[1] == 3000) << want[1];
        EXPECT_EQ(want[2], greedy ? 4321 : -1);
      }
}

// Rows [rows_in, V] of N(0, 3) logits in the given dtype's values, every fifth one of a kind: many ties (whole
// numbers), one dominant token (within the first n ids), every third id -inf, one finite logit among -inf; with
// `nans` every seventh row also holds a NaN.
std::vector<float> edge_rows(int rows_in, int64_t V, int64_t n, DType dt, std::mt19937_64& g, bool nans) {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> host(size_t(rows_in) * size_t(V));
  std::normal_distribution<float> d(0.f, 3.f);
  for (auto& v : host) v = d(g);
  for (int r = 0; r < rows_in; ++r) {
    float* x = host.data() + size_t(r) * size_t(V);
    if (r % 5 == 1)
      for (int64_t i = 0; i < V; ++i) x[i] = float(int(x[i]));  // many ties
    if (r % 5 == 2) x[g() % uint64_t(n)] += 30.f;                 // one dominant token
    if (r % 5 == 3)
      for (int64_t i = 0; i < V; i += 3) x[i] = -inf;
    if (r % 5 == 4) {
      for (int64_t i = 0; i < V; ++i) x[i] = -inf;
      x[(V - 1) % n] = 2.f;  // one finite logit
    }
    if (nans && r % 7 == 6) x[g() % uint64_t(V)] = std::numeric_limits<float>::quiet_NaN();
  }
  if (dt != DType::F32)
    for (auto& v : host) v = dt == DType::BF16 ? bf16_to_f32(f32_to_bf16(v)) : f16_to_f32(f32_to_f16(v));
  return host;
}

// Backend::row_logprobs on CUDA against cpu::row_logprobs over shapes (R 1, 5, 64; V 7 .. 248320; vocab_limit V and
// below; k 0, 1, 5, 20 and k > n; fp32, bf16, f16 logits; rows of a larger tensor in any order) and rows with ties
// everywhere, -inf and one finite logit: the same top ids in the same order, logprobs within 2e-6 + 1e-6 |x| (the
// CPU sums exp in id order, the GPU per thread then a tree, both in double).
TEST(CudaSampling, RowLogprobsMatchCpu) {
  DS_REQUIRE_GPU();
  test::Both B;
  ASSERT_TRUE(B.gpu->has_row_logprobs());
  const float inf = std::numeric_limits<float>::infinity();
  int cases = 0;
  double worst = 0;
  for (int64_t V : {int64_t(7), int64_t(1000), int64_t(151936), int64_t(248320)})
    for (int R : {1, 5, 64})
      for (DType dt : {DType::F32, DType::BF16, DType::F16})
        for (int64_t limit : {V, V - std::max<int64_t>(1, V / 10)})
          for (int32_t k : {0, 1, 5, 20}) {
            if (V > 1000 && (R == 5 || dt == DType::F16) && k != 20) continue;  // time: the big rows at k 20
            SCOPED_TRACE(str_cat("R ", R, " V ", V, " limit ", limit, " ", dtype_name(dt), " k ", k));
            std::mt19937_64 g(uint64_t(R) * 31u + uint64_t(V) + uint64_t(k) * 7u + uint64_t(limit));
            const int64_t n = std::min(limit, V);
            const int rows_in = R + 3;  // the tensor has more rows than are asked for
            const std::vector<float> host = edge_rows(rows_in, V, n, dt, g, false);
            Tensor t = B.gpu->upload_f32(host, {rows_in, V}, dt);
            std::vector<int32_t> rows, chosen;
            for (int i = 0; i < R; ++i) {
              rows.push_back(int32_t((i * 7 + 2) % rows_in));
              const float* x = host.data() + size_t(rows.back()) * size_t(V);
              int32_t c = int32_t(g() % uint64_t(n));
              while (!(x[c] > -inf)) c = (c + 1) % int32_t(n);
              chosen.push_back(c);
            }
            std::vector<float> got;
            B.gpu->row_logprobs(t, limit, rows, chosen, k, got);
            const int stride = 1 + 2 * k, kk = int(std::min<int64_t>(k, n));
            ASSERT_EQ(got.size(), size_t(R) * size_t(stride));
            std::vector<float> want(size_t(stride), 0.f);
            for (int i = 0; i < R; ++i) {
              std::fill(want.begin(), want.end(), 0.f);
              cpu::row_logprobs(host.data() + size_t(rows[size_t(i)]) * size_t(V), n, chosen[size_t(i)], kk, want.data());
              const float* o = got.data() + size_t(i) * size_t(stride);
              auto close = [&](float a, float b) {
                if (a == b) return true;  // -inf too
                const double e = std::fabs(double(a) - double(b));
                worst = std::max(worst, e / (1.0 + std::fabs(double(b))));
                return e <= 2e-6 + 1e-6 * std::fabs(double(b));
              };
              EXPECT_TRUE(close(o[0], want[0])) << "row " << i << ": chosen logprob GPU " << o[0] << " CPU " << want[0];
              for (int j = 0; j < kk; ++j) {
                EXPECT_EQ(o[1 + 2 * j], want[1 + 2 * j]) << "row " << i << " top " << j;
                EXPECT_TRUE(close(o[2 + 2 * j], want[2 + 2 * j]))
                    << "row " << i << " top " << j << ": GPU " << o[2 + 2 * j] << " CPU " << want[2 + 2 * j];
              }
              for (int j = kk; j < k; ++j) EXPECT_EQ(o[1 + 2 * j], 0.f) << "row " << i << ": pair " << j << " beyond n";
            }
            ++cases;
          }
  std::printf("  %d cases, worst logprob difference %.3g (relative to 1 + |x|)\n", cases, worst);
  // k above the device's limit is refused, not truncated.
  Tensor t = B.gpu->upload_f32(std::vector<float>(10, 0.f), {1, 10}, DType::F32);
  std::vector<float> out;
  EXPECT_THROW(B.gpu->row_logprobs(t, 10, {0}, {0}, Backend::kMaxRowTopLogprobs + 1, out), std::exception);
}

// Backend::row_ranks (prompt logprobs' rank) against cpu::row_rank: edge_rows with NaNs; chosen tokens inside and past
// the vocabulary limit; every dtype; the real vocabularies.
TEST(CudaSampling, RowRanksMatchCpu) {
  DS_REQUIRE_GPU();
  test::Both B;
  int cases = 0;
  for (int64_t V : {int64_t(1), int64_t(7), int64_t(1000), int64_t(16385), int64_t(151936), int64_t(248320)})
    for (int R : {1, 5, 128})
      for (DType dt : {DType::F32, DType::BF16, DType::F16})
        for (int64_t limit : {V, V - V / 10}) {
          if (limit < 1 || (V > 20000 && R == 128 && dt != DType::F32)) continue;
          SCOPED_TRACE(str_cat("R ", R, " V ", V, " limit ", limit, " ", dtype_name(dt)));
          std::mt19937_64 g(uint64_t(R) * 131u + uint64_t(V) + uint64_t(limit));
          const int rows_in = R + 2;
          const int64_t n = std::min(limit, V);
          const std::vector<float> host = edge_rows(rows_in, V, n, dt, g, true);
          Tensor t = B.gpu->upload_f32(host, {rows_in, V}, dt);
          std::vector<int32_t> rows, chosen;
          for (int i = 0; i < R; ++i) {
            rows.push_back(int32_t((i * 7 + 1) % rows_in));
            chosen.push_back(i % 4 == 3 ? int32_t(V - 1) : int32_t(g() % uint64_t(V)));  // V - 1: past the limit
          }
          std::vector<int32_t> got;
          B.gpu->row_ranks(t, limit, rows, chosen, got);
          ASSERT_EQ(got.size(), size_t(R));
          for (int i = 0; i < R; ++i)
            EXPECT_EQ(got[size_t(i)], cpu::row_rank(host.data() + size_t(rows[size_t(i)]) * size_t(V), n, chosen[size_t(i)]))
                << "row " << i;
          ++cases;
        }
  std::printf("  %d cases\n", cases);
}

// Time per call at the real vocabulary: sample_rows on the GPU vs the host path it replaces (copy [R, V] fp32 to the
// host, then sampling::sample per row). Prints only; docs/engine.md "Sampler".
TEST(CudaSampling, TimeAgainstTheHostPath) {
  DS_REQUIRE_GPU();
  test::Both B;
  const int64_t V = 248320;
  struct Set {
    const char* name;
    float t, top_p;
    int32_t top_k;
  };
  const Set sets[] = {{"greedy", 0.f, 1.f, 0}, {"T 1", 1.f, 1.f, 0}, {"top_p 0.95", 0.7f, 0.95f, 0},
                      {"top_k 20 + top_p 0.95", 0.6f, 0.95f, 20}};
  for (int R : {1, 16, 64}) {
    const auto host = test::randn(size_t(R) * size_t(V), 3.f, 7 + uint64_t(R));
    Tensor t = B.gpu->upload_f32(host, {R, V}, DType::F32);
    for (const Set& set : sets) {
      std::vector<sampling::SeqSampler> ss;
      for (int r = 0; r < R; ++r) {
        sampling::SamplingParams p;
        p.temperature = set.t;
        p.top_p = set.top_p;
        p.top_k = set.top_k;
        p.seed = uint64_t(r);
        ss.emplace_back(p, std::vector<int32_t>{1, 2, 3});
      }
      const int iters = 20;
      std::vector<int32_t> ids;
      auto dev = [&] {
        std::vector<SampleRowParams> rows;
        std::vector<SampleEdit> edits;
        for (auto& s : ss) rows.push_back(sampling::next_row(s, edits));
        B.gpu->sample_rows(t, V, rows, edits, {}, ids);
      };
      dev();  // warm-up (pool growth)
      auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < iters; ++i) dev();
      const double dev_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / iters;
      t0 = std::chrono::steady_clock::now();
      const int hiters = R == 1 ? 5 : 1;
      for (int i = 0; i < hiters; ++i) {
        const auto x = B.gpu->to_host_f32(t);
        for (int r = 0; r < R; ++r) sampling::sample(x.data() + size_t(r) * size_t(V), V, V, ss[size_t(r)], nullptr);
      }
      const double host_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / hiters;
      std::printf("  R %2d V %ld %-22s device %8.3f ms/step   host copy + sample %9.3f ms/step\n", R, long(V), set.name,
                  dev_ms, host_ms);
    }
    {  // Every row masked (a grammar's mask inside a JSON string: nearly every id allowed), greedy and T 1: the masks'
       // upload (R x 31 KB) and their reads included.
      const int64_t W = mask_words(V);
      const std::vector<uint32_t> masks(size_t(R) * size_t(W), 0xFFFFFFF0u);
      for (int greedy = 1; greedy >= 0; --greedy) {
        std::vector<SampleRowParams> rows(static_cast<size_t>(R));
        for (int r = 0; r < R; ++r) {
          rows[size_t(r)].greedy = greedy;
          rows[size_t(r)].u = 0.5f;
          rows[size_t(r)].mask = r;
        }
        std::vector<int32_t> ids;
        B.gpu->sample_rows(t, V, rows, {}, masks, ids);  // warm-up
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < 20; ++i) B.gpu->sample_rows(t, V, rows, {}, masks, ids);
        const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / 20;
        std::printf("  R %2d V %ld %-22s device %8.3f ms/step (every row with its mask)\n", R, long(V),
                    greedy ? "greedy, masked" : "T 1, masked", ms);
      }
    }
    // Logprobs with 20 alternatives for every row: row_logprobs beside sample_rows, against the host path's copy of
    // the rows and its log-softmax + top 20 per row.
    std::vector<int32_t> rows(static_cast<size_t>(R)), chosen(static_cast<size_t>(R), 1);
    for (int r = 0; r < R; ++r) rows[size_t(r)] = r;
    std::vector<float> out;
    B.gpu->row_logprobs(t, V, rows, chosen, 20, out);  // warm-up
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 20; ++i) B.gpu->row_logprobs(t, V, rows, chosen, 20, out);
    const double dev_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / 20;
    t0 = std::chrono::steady_clock::now();
    const auto x = B.gpu->to_host_f32(t);
    std::vector<float> one(41);
    for (int r = 0; r < R; ++r) cpu::row_logprobs(x.data() + size_t(r) * size_t(V), V, 1, 20, one.data());
    const double host_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    std::printf("  R %2d V %ld logprobs, 20 alternatives: device %8.3f ms/step   host copy + log-softmax %9.3f ms/step\n",
                R, long(V), dev_ms, host_ms);
  }
}

}  // namespace
}  // namespace ds
