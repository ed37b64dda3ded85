// The CPU sampler: greedy, top-k/top-p/min-p supports, the sampled distribution against softmax, penalties
// and logit bias on exactly the right logits, seeds, raw logprobs, parameter checks.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>
#include <set>

#include "backend/cpu/cpu_backend.h"
#include "backend/ops.h"
#include "core/status.h"
#include "error_util.h"
#include "sampling/sampling.h"
#include "text/tool_parser.h"

#include <nlohmann/json.hpp>

namespace ds::sampling {
namespace {

std::vector<float> random_logits(int64_t V, uint64_t seed, float scale = 3.f) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d(0.f, scale);
  std::vector<float> x(static_cast<size_t>(V));
  for (auto& v : x) v = d(g);
  return x;
}

int32_t argmax(const std::vector<float>& x, int64_t n) {
  int64_t a = 0;
  for (int64_t i = 1; i < n; ++i)
    if (x[size_t(i)] > x[size_t(a)]) a = i;
  return int32_t(a);
}

// Logits of a distribution given as probabilities.
std::vector<float> log_of(const std::vector<double>& p) {
  std::vector<float> x;
  for (double v : p) x.push_back(float(std::log(v)));
  return x;
}

// Which tokens come out of `draws` samples with `p`.
std::set<int32_t> support(const std::vector<float>& x, SamplingParams p, int draws = 4000) {
  p.seed = 7;
  SeqSampler s(p, {});
  std::set<int32_t> seen;
  for (int i = 0; i < draws; ++i) seen.insert(sample(x.data(), int64_t(x.size()), int64_t(x.size()), s, nullptr));
  return seen;
}

TEST(Sampling, GreedyIsArgmax) {
  SamplingParams p;
  p.temperature = 0.f;
  for (uint64_t seed = 0; seed < 20; ++seed) {
    auto x = random_logits(1000, seed);
    SeqSampler s(p, {});
    EXPECT_EQ(sample(x.data(), 1000, 1000, s, nullptr), argmax(x, 1000)) << "seed " << seed;
    // Tiny temperatures are greedy too (vLLM's epsilon), whatever the top-k/top-p.
    SamplingParams q = p;
    q.temperature = 1e-7f;
    q.top_p = 0.5f;
    SeqSampler s2(q, {});
    EXPECT_EQ(sample(x.data(), 1000, 1000, s2, nullptr), argmax(x, 1000));
  }
}

TEST(Sampling, VocabLimitMasksPaddingIds) {
  std::vector<float> x(100, 0.f);
  x[99] = 50.f;  // a padding row the tokenizer never produces
  x[42] = 1.f;
  SamplingParams p;
  p.temperature = 0.f;
  SeqSampler s(p, {});
  EXPECT_EQ(sample(x.data(), 100, 100, s, nullptr), 99);
  EXPECT_EQ(sample(x.data(), 100, 90, s, nullptr), 42);
  p.temperature = 1.f;
  p.seed = 1;
  SeqSampler r(p, {});
  for (int i = 0; i < 2000; ++i) EXPECT_LT(sample(x.data(), 100, 90, r, nullptr), 90);
}

TEST(Sampling, TopK1IsGreedy) {
  for (uint64_t seed = 0; seed < 20; ++seed) {
    auto x = random_logits(500, 100 + seed, 1.f);
    SamplingParams p;
    p.temperature = 1.5f;
    p.top_k = 1;
    p.seed = seed;
    SeqSampler s(p, {});
    for (int i = 0; i < 10; ++i) EXPECT_EQ(sample(x.data(), 500, 500, s, nullptr), argmax(x, 500));
  }
}

TEST(Sampling, EmpiricalFrequenciesMatchSoftmax) {
  const std::vector<float> x = {1.0f, 0.5f, -0.3f, 2.0f, 0.0f, -1.5f, 1.2f, 0.7f};
  const float T = 0.8f;
  std::vector<double> want(x.size());
  double z = 0;
  for (size_t i = 0; i < x.size(); ++i) z += want[i] = std::exp(double(x[i]) / T);
  for (auto& w : want) w /= z;
  SamplingParams p;
  p.temperature = T;
  p.seed = 1234;
  SeqSampler s(p, {});
  const int N = 200000;
  std::vector<int> count(x.size(), 0);
  for (int i = 0; i < N; ++i) ++count[size_t(sample(x.data(), int64_t(x.size()), int64_t(x.size()), s, nullptr))];
  double worst = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    double f = double(count[i]) / N, sd = std::sqrt(want[i] * (1 - want[i]) / N);
    worst = std::max(worst, std::abs(f - want[i]) / sd);
    EXPECT_NEAR(f, want[i], 5 * sd + 1e-4) << "token " << i;
  }
  std::printf("  %d draws at T=%.1f: worst deviation %.2f standard errors\n", N, T, worst);
}

TEST(Sampling, TopPMinPTopKKeepTheRightTokens) {
  const auto x = log_of({0.5, 0.3, 0.15, 0.05});  // sorted by id already
  SamplingParams p;
  EXPECT_EQ(support(x, p), (std::set<int32_t>{0, 1, 2, 3}));
  // top_p: keep a token while the mass of the more likely ones is below top_p.
  p.top_p = 0.45f;
  EXPECT_EQ(support(x, p), (std::set<int32_t>{0}));
  p.top_p = 0.75f;
  EXPECT_EQ(support(x, p), (std::set<int32_t>{0, 1}));
  p.top_p = 0.9f;
  EXPECT_EQ(support(x, p), (std::set<int32_t>{0, 1, 2}));
  p.top_p = 1.f;
  // min_p: keep p >= min_p · p_max (0.5).
  p.min_p = 0.2f;  // threshold 0.1
  EXPECT_EQ(support(x, p), (std::set<int32_t>{0, 1, 2}));
  p.min_p = 0.5f;  // threshold 0.25
  EXPECT_EQ(support(x, p), (std::set<int32_t>{0, 1}));
  p.min_p = 0.f;
  p.top_k = 2;
  EXPECT_EQ(support(x, p), (std::set<int32_t>{0, 1}));
  p.top_k = 3;
  EXPECT_EQ(support(x, p), (std::set<int32_t>{0, 1, 2}));
  // Order like vLLM: min_p, then top_k, then top_p renormalised over the survivors.
  // top_k 3 leaves {0.5, 0.3, 0.15}/0.95; top_p 0.8 keeps 0 (before 0) and 1 (before 0.526), not 2 (0.842).
  p.top_p = 0.8f;
  EXPECT_EQ(support(x, p), (std::set<int32_t>{0, 1}));
  // Temperature is applied before the filters: at T = 0.5 the probabilities are 0.69/0.25/0.06/0.007.
  p = SamplingParams{};
  p.temperature = 0.5f;
  p.min_p = 0.05f;  // threshold 0.0347 of the sharpened distribution keeps 0..2 only (0.15² / 0.5² = 0.09)
  EXPECT_EQ(support(x, p), (std::set<int32_t>{0, 1, 2}));
}

TEST(Sampling, PenaltiesChangeExactlyTheRightLogits) {
  const std::vector<float> raw = {2.0f, -1.0f, 0.5f, -0.25f, 3.0f, 1.0f};
  SamplingParams p;
  p.repetition_penalty = 2.0f;
  p.presence_penalty = 0.5f;
  p.frequency_penalty = 0.25f;
  p.logit_bias = {{5, -3.0f}, {3, 1.0f}};
  // Prompt has 0 and 1; generated 2 (twice) and 1 (once); 4 appears nowhere.
  SeqSampler s(p, {0, 1, 0});
  s.accept(2);
  s.accept(2);
  s.accept(1);
  auto x = raw;
  apply_bias_and_penalties(x.data(), int64_t(x.size()), s);
  EXPECT_FLOAT_EQ(x[0], 2.0f / 2);                         // prompt, positive: divided
  EXPECT_FLOAT_EQ(x[1], -1.0f * 2 - 0.25f * 1 - 0.5f);     // prompt+generated once: multiplied, then OpenAI
  EXPECT_FLOAT_EQ(x[2], 0.5f / 2 - 0.25f * 2 - 0.5f);      // generated twice
  EXPECT_FLOAT_EQ(x[3], -0.25f + 1.0f);                    // bias first, then untouched (not seen)
  EXPECT_FLOAT_EQ(x[4], 3.0f);                             // untouched
  EXPECT_FLOAT_EQ(x[5], 1.0f - 3.0f);                      // bias only
  // The bias comes before the repetition penalty: a biased prompt token is penalised on the biased value.
  SamplingParams q;
  q.repetition_penalty = 2.0f;
  q.logit_bias = {{1, 3.0f}};
  SeqSampler t(q, {1});
  x = raw;
  apply_bias_and_penalties(x.data(), int64_t(x.size()), t);
  EXPECT_FLOAT_EQ(x[1], (-1.0f + 3.0f) / 2);
  EXPECT_FLOAT_EQ(x[0], 2.0f);
  // Neutral params change nothing.
  SeqSampler u(SamplingParams{}, {0, 1, 2});
  u.accept(3);
  x = raw;
  apply_bias_and_penalties(x.data(), int64_t(x.size()), u);
  EXPECT_EQ(x, raw);
}

TEST(Sampling, PenaltiesSteerGreedyChoice) {
  std::vector<float> x = {1.0f, 0.9f, 0.0f};
  SamplingParams p;
  p.temperature = 0.f;
  p.presence_penalty = 0.2f;
  SeqSampler s(p, {});
  EXPECT_EQ(sample(x.data(), 3, 3, s, nullptr), 0);
  s.accept(0);
  EXPECT_EQ(sample(x.data(), 3, 3, s, nullptr), 1);  // 0.8 < 0.9
  p.presence_penalty = 0.f;
  p.logit_bias = {{2, 5.f}};
  SeqSampler b(p, {});
  EXPECT_EQ(sample(x.data(), 3, 3, b, nullptr), 2);
}

TEST(Sampling, SameSeedSameSequence) {
  auto x = random_logits(300, 5, 1.f);
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_p = 0.95f;
  p.top_k = 50;
  p.seed = 42;
  auto draw = [&](SamplingParams q) {
    SeqSampler s(q, {});
    std::vector<int32_t> out;
    for (int i = 0; i < 64; ++i) out.push_back(sample(x.data(), 300, 300, s, nullptr));
    return out;
  };
  auto a = draw(p), b = draw(p);
  EXPECT_EQ(a, b);
  p.seed = 43;
  EXPECT_NE(draw(p), a);
  p.seed.reset();  // unseeded: from the random device
  EXPECT_NE(draw(p), draw(p));
}

TEST(Sampling, LogprobsAreRawLogSoftmax) {
  const std::vector<float> x = {0.1f, 2.0f, -1.0f, 1.5f, 0.0f};
  double z = 0;
  for (float v : x) z += std::exp(double(v));
  SamplingParams p;
  p.temperature = 0.f;
  p.presence_penalty = 10.f;  // changes the choice, not the reported distribution
  p.logprobs = 3;
  SeqSampler s(p, {});
  s.accept(1);
  TokenLogprob lp;
  int32_t t = sample(x.data(), 5, 5, s, &lp);
  EXPECT_EQ(t, 3);
  EXPECT_EQ(lp.token, 3);
  EXPECT_NEAR(lp.logprob, 1.5 - std::log(z), 1e-6);
  ASSERT_EQ(lp.top.size(), 3u);
  EXPECT_EQ(lp.top[0].first, 1);
  EXPECT_EQ(lp.top[1].first, 3);
  EXPECT_EQ(lp.top[2].first, 0);
  EXPECT_NEAR(lp.top[0].second, 2.0 - std::log(z), 1e-6);
  // logprobs = 0: the chosen token only. -1: untouched.
  p.logprobs = 0;
  SeqSampler s0(p, {});
  TokenLogprob lp0;
  sample(x.data(), 5, 5, s0, &lp0);
  EXPECT_EQ(lp0.token, 1);
  EXPECT_TRUE(lp0.top.empty());
  // Masked ids are outside the distribution: the normaliser covers ids < vocab_limit only.
  p.logprobs = 1;
  SeqSampler s1(p, {});
  TokenLogprob lp1;
  sample(x.data(), 5, 2, s1, &lp1);
  EXPECT_NEAR(lp1.logprob, 2.0 - std::log(std::exp(0.1) + std::exp(2.0)), 1e-6);
}

TEST(Sampling, CheckParamsRejectsOutOfRange) {
  auto bad = [](auto edit) {
    SamplingParams p;
    edit(p);
    EXPECT_THROW(check_params(p, 100), Error);
  };
  bad([](SamplingParams& p) { p.temperature = -0.1f; });
  bad([](SamplingParams& p) { p.top_p = 0.f; });
  bad([](SamplingParams& p) { p.top_p = 1.5f; });
  bad([](SamplingParams& p) { p.top_k = -2; });
  bad([](SamplingParams& p) { p.min_p = 1.5f; });
  bad([](SamplingParams& p) { p.repetition_penalty = 0.f; });
  bad([](SamplingParams& p) { p.logit_bias = {{100, 1.f}}; });
  bad([](SamplingParams& p) { p.logprobs = -2; });
  SamplingParams ok;
  ok.top_k = -1;
  ok.logit_bias = {{99, -100.f}};
  EXPECT_NO_THROW(check_params(ok, 100));
  try {
    SamplingParams p;
    p.top_p = 2.f;
    check_params(p, 100);
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("top_p"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("2"), std::string::npos) << e.what();
  }
}

// ---- the counter-based stream and the kernels' semantics (Backend::sample_rows) ----------------------------

TEST(SamplingRng, CounterUniformsAreAPureFunctionOfSeedAndCounter) {
  // Pinned: seeded outputs depend on these values on every backend (a change here changes every seeded request).
  EXPECT_EQ(uniform_at(0, 0), 0x1.45bf56p-1f);
  EXPECT_EQ(uniform_at(0, 1), 0x1.2dd72ep-1f);
  EXPECT_EQ(uniform_at(42, 7), 0x1.971a9p-4f);
  SamplingParams p;
  p.seed = 42;
  SeqSampler s(p, {});
  EXPECT_EQ(s.seed, 42u);
  for (uint64_t i = 0; i < 10; ++i) EXPECT_EQ(s.next_uniform(), uniform_at(42, i));
  EXPECT_EQ(s.draws, 10u);
  // Unseeded samplers get a random seed at creation.
  SamplingParams q;
  EXPECT_NE(SeqSampler(q, {}).seed, SeqSampler(q, {}).seed);
  // In [0, 1), on the 2^-24 grid; 16 equal bins over 32768 draws of 8 seeds: chi-square with 15 degrees of
  // freedom below 37.7 (p = 0.001); neighbouring seeds and counters not correlated.
  std::vector<int> bins(16, 0);
  double lag = 0, mean = 0;
  const int N = 4096;
  for (uint64_t seed = 0; seed < 8; ++seed)
    for (int i = 0; i < N; ++i) {
      const float u = uniform_at(seed, uint64_t(i));
      ASSERT_GE(u, 0.f);
      ASSERT_LT(u, 1.f);
      ASSERT_EQ(u * 16777216.f, std::floor(u * 16777216.f));
      ++bins[size_t(u * 16)];
      mean += u;
      lag += (u - 0.5) * (uniform_at(seed + 1, uint64_t(i)) - 0.5) + (u - 0.5) * (uniform_at(seed, uint64_t(i) + 1) - 0.5);
    }
  double chi2 = 0;
  const double want = 8.0 * N / 16;
  for (int b : bins) chi2 += (b - want) * (b - want) / want;
  EXPECT_LT(chi2, 37.7);
  EXPECT_NEAR(mean / (8 * N), 0.5, 0.01);
  EXPECT_NEAR(lag / (2 * 8 * N), 0.0, 0.005);  // a correlation of 0 has variance 1/144 per term
}

// The filtered distribution, written from the classic definitions (sort, cut) rather than the thresholds.
std::vector<double> filtered(const std::vector<float>& x, const SamplingParams& p) {
  const size_t n = x.size();
  std::vector<float> z(n);
  for (size_t i = 0; i < n; ++i) z[i] = x[i] * (1.f / p.temperature);
  const float zmax = *std::max_element(z.begin(), z.end());
  std::vector<double> w(n);
  for (size_t i = 0; i < n; ++i) w[i] = std::exp(double(z[i]) - zmax);
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return w[a] > w[b]; });
  std::vector<bool> keep(n, true);
  for (size_t i = 0; i < n; ++i) keep[i] = w[i] >= p.min_p;
  if (p.top_k > 0)
    for (size_t r = size_t(p.top_k); r < n; ++r) keep[order[r]] = false;
  if (p.top_p < 1.f) {
    double total = 0, before = 0;
    for (size_t i = 0; i < n; ++i) total += keep[i] ? w[i] : 0;
    for (size_t i : order) {
      if (!keep[i]) continue;
      if (before >= double(p.top_p) * total) keep[i] = false;
      before += w[i];
    }
  }
  double total = 0;
  for (size_t i = 0; i < n; ++i) total += keep[i] ? w[i] : 0;
  std::vector<double> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = keep[i] ? w[i] / total : 0;
  return out;
}

TEST(SamplingRng, FrequenciesMatchTheFilteredDistribution) {
  // Logits without ties and no filter within rounding of a cut: the kept set is unambiguous.
  const std::vector<float> x = {1.0f, 0.5f, -0.3f, 2.0f, 0.1f, -1.5f, 1.3f, 0.75f};
  struct Case {
    float t, top_p, min_p;
    int32_t top_k;
  };
  const Case cases[] = {{1.f, 1.f, 0.f, 0}, {0.7f, 1.f, 0.f, 5}, {1.f, 0.8f, 0.f, 0},
                        {1.3f, 1.f, 0.12f, 0}, {0.9f, 0.9f, 0.05f, 6}, {2.f, 0.5f, 0.f, 3}};
  for (size_t c = 0; c < std::size(cases); ++c) {
    SamplingParams p;
    p.temperature = cases[c].t;
    p.top_p = cases[c].top_p;
    p.min_p = cases[c].min_p;
    p.top_k = cases[c].top_k;
    p.seed = 900 + c;
    const auto want = filtered(x, p);
    SeqSampler s(p, {});
    const int N = 4000;
    std::vector<int> count(x.size(), 0);
    for (int i = 0; i < N; ++i) ++count[size_t(sample(x.data(), 8, 8, s, nullptr))];
    double chi2 = 0;
    int df = -1;
    for (size_t i = 0; i < x.size(); ++i) {
      if (want[i] == 0) {
        EXPECT_EQ(count[i], 0) << "case " << c << ": token " << i << " is filtered out";
        continue;
      }
      ++df;
      const double e = want[i] * N;
      chi2 += (count[i] - e) * (count[i] - e) / e;
    }
    // p = 0.001 critical values of chi-square for 1..7 degrees of freedom.
    const double crit[] = {0, 10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32};
    EXPECT_LT(chi2, crit[std::max(df, 1)]) << "case " << c << " (" << df << " degrees of freedom)";
  }
}

TEST(SamplingRng, ThresholdSemanticsKeepTies) {
  // top_k keeps every token tied with the k-th value; top_p keeps a tied group whole.
  const std::vector<float> x = {1.f, 3.f, 2.f, 2.f, 0.f, 2.f};
  SamplingParams p;
  p.top_k = 2;
  EXPECT_EQ(support(x, p, 2000), (std::set<int32_t>{1, 2, 3, 5}));
  p.top_k = 0;
  p.top_p = 0.3f;  // token 1 alone has 0.41 of the mass
  EXPECT_EQ(support(x, p, 2000), (std::set<int32_t>{1}));
  p.top_p = 0.5f;  // the group of 2s reaches it: all three stay
  EXPECT_EQ(support(x, p, 2000), (std::set<int32_t>{1, 2, 3, 5}));
}

// The backend op on the CPU (sample_rows over several rows with their edits) picks exactly sample()'s tokens.
TEST(SamplingRng, CpuSampleRowsEqualsSample) {
  auto be = make_cpu_backend();
  const int64_t V = 600, limit = 550;
  const int R = 6;
  std::vector<float> all;
  for (int r = 0; r < R; ++r) {
    auto x = random_logits(V, 50 + uint64_t(r), 2.f);
    all.insert(all.end(), x.begin(), x.end());
  }
  Tensor t = be->upload_f32(all, {R, V}, DType::F32);
  std::vector<SamplingParams> ps(R);
  ps[0].temperature = 0.f;
  ps[0].repetition_penalty = 1.4f;
  ps[1].top_k = 7;
  ps[2].top_p = 0.6f;
  ps[2].temperature = 0.6f;
  ps[3].min_p = 0.2f;
  ps[3].presence_penalty = 1.f;
  ps[3].frequency_penalty = 0.5f;
  ps[4].logit_bias = {{3, 5.f}, {549, 4.f}, {560, 50.f}};
  ps[5].top_k = 30;
  ps[5].top_p = 0.9f;
  ps[5].min_p = 0.01f;
  ps[5].repetition_penalty = 0.8f;
  std::vector<SeqSampler> a, b;
  for (int r = 0; r < R; ++r) {
    ps[size_t(r)].seed = 5 + uint64_t(r);
    a.emplace_back(ps[size_t(r)], std::vector<int32_t>{1, 2, 3, 400});
    b.emplace_back(ps[size_t(r)], std::vector<int32_t>{1, 2, 3, 400});
  }
  for (int step = 0; step < 40; ++step) {
    std::vector<SampleRowParams> rows;
    std::vector<SampleEdit> edits;
    for (int r = 0; r < R; ++r) rows.push_back(next_row(b[size_t(r)], edits));
    std::vector<int32_t> ids;
    be->sample_rows(t, limit, rows, edits, {}, ids);
    ASSERT_EQ(ids.size(), size_t(R));
    for (int r = 0; r < R; ++r) {
      const int32_t want = sample(all.data() + int64_t(r) * V, V, limit, a[size_t(r)], nullptr);
      ASSERT_EQ(ids[size_t(r)], want) << "step " << step << " row " << r;
      ASSERT_LT(want, limit);
      a[size_t(r)].accept(want);
      b[size_t(r)].accept(want);
      EXPECT_EQ(a[size_t(r)].draws, b[size_t(r)].draws);
    }
  }
  // Nothing to sample: -1 from the op, an error from sample().
  std::vector<float> dead(8, -std::numeric_limits<float>::infinity());
  Tensor d = be->upload_f32(dead, {1, 8}, DType::F32);
  SamplingParams p;
  p.seed = 1;
  SeqSampler s(p, {});
  std::vector<SampleEdit> edits;
  std::vector<int32_t> ids;
  be->sample_rows(d, 8, {next_row(s, edits)}, edits, {}, ids);
  EXPECT_EQ(ids, std::vector<int32_t>{-1});
  EXPECT_THROW(sample(dead.data(), 8, 8, s, nullptr), Error);
}

// Rows that verify a draft (SampleRowParams::draft: rejection sampling with a one-hot draft, what the engine's
// device verify gives Backend::sample_rows) decide as verify_draft does on the host, uniform for uniform: the draft
// where u < p(d), else the draw from the rest with the next uniform. Every filter, drafts likely and unlikely.
TEST(SamplingRng, CpuSampleRowsVerifiesDraftsAsVerifyDraft) {
  const int64_t V = 500;
  int accepted = 0, rejected = 0;
  for (int t = 0; t < 400; ++t) {
    const auto x = random_logits(V, 900 + uint64_t(t), 1.5f);
    SamplingParams p;
    p.seed = uint64_t(t);
    p.temperature = 0.5f + 0.1f * float(t % 8);
    if (t % 3 == 1) p.top_k = 20;
    if (t % 4 == 2) p.top_p = 0.8f;
    if (t % 5 == 3) p.min_p = 0.05f;
    if (t % 2) p.repetition_penalty = 1.2f;
    SeqSampler host(p, {1, 2, 3}), dev(p, {1, 2, 3});
    host.draws = dev.draws = uint64_t(t) * 7;
    const int32_t d = t % 3 ? int32_t(std::max_element(x.begin(), x.end()) - x.begin()) : int32_t(t % V);
    bool ok = false;
    const int32_t want = verify_draft(x.data(), V, V, host, d, nullptr, &ok, nullptr);
    std::vector<SampleEdit> edits;
    SampleRowParams r = next_row(dev, edits);
    r.draft = d;
    r.u2 = uniform_at(dev.seed, dev.draws);
    std::vector<int32_t> ids;
    cpu::sample_rows(x.data(), V, V, {r}, edits, {}, ids);
    ASSERT_EQ(ids[0], want) << "case " << t;
    EXPECT_EQ(ok, want == d);
    EXPECT_EQ(host.draws, dev.draws + (ok ? 0 : 1)) << "a rejection draws one more uniform";
    ++(ok ? accepted : rejected);
  }
  EXPECT_GT(accepted, 50);
  EXPECT_GT(rejected, 50);
}

// Rows with masks (row_mask: allowed_token_ids here, a grammar's in SamplingGrammar.*): sample_rows with the masks
// picks sample()'s tokens, greedy and sampled, with every filter, with a bias on a forbidden id (it stays forbidden)
// and penalties; masked rows beside unmasked ones, two rows sharing one mask. A mask that leaves nothing gives -1,
// greedy too, and sample() names the mask; bad mask arguments are errors.
TEST(SamplingRng, CpuSampleRowsWithMasksEqualsSample) {
  auto be = make_cpu_backend();
  const int64_t V = 700, limit = 650, W = mask_words(limit);
  const int R = 7;
  std::mt19937 g(11);
  std::vector<float> all;
  for (int r = 0; r < R; ++r) {
    auto x = random_logits(V, 70 + uint64_t(r), 2.f);
    all.insert(all.end(), x.begin(), x.end());
  }
  Tensor t = be->upload_f32(all, {R, V}, DType::F32);
  std::vector<SamplingParams> ps(R);
  for (int r = 0; r < R; ++r) {
    SamplingParams& p = ps[size_t(r)];
    p.seed = 9 + uint64_t(r);
    p.temperature = r % 3 == 0 ? 0.f : 0.8f;
    if (r == 1) p.top_k = 5;
    if (r == 2) p.top_p = 0.7f;
    if (r == 4) p.min_p = 0.1f;
    if (r == 5) p.repetition_penalty = 1.3f, p.presence_penalty = 0.5f;
    if (r == 3) continue;  // unmasked
    for (int i = 0; i < 40 + 30 * r; ++i) p.allowed_ids.push_back(int32_t(g() % uint32_t(limit + 20)));  // some >= limit
    p.logit_bias = {{int32_t(g() % uint32_t(limit)), 60.f}};  // likely forbidden: must stay so
  }
  ps[6].allowed_ids = ps[5].allowed_ids;  // the same mask twice
  std::vector<SeqSampler> a, b;
  for (int r = 0; r < R; ++r) {
    a.emplace_back(ps[size_t(r)], std::vector<int32_t>{1, 2, 3});
    b.emplace_back(ps[size_t(r)], std::vector<int32_t>{1, 2, 3});
  }
  for (int step = 0; step < 30; ++step) {
    std::vector<SampleRowParams> rows;
    std::vector<SampleEdit> edits;
    std::vector<uint32_t> masks, bits;
    for (int r = 0; r < R; ++r) {
      rows.push_back(next_row(b[size_t(r)], edits));
      const MaskKind k = row_mask(b[size_t(r)], nullptr, limit, bits);
      ASSERT_EQ(k, r == 3 ? MaskKind::kNone : MaskKind::kAllowed);
      if (k == MaskKind::kNone) continue;
      ASSERT_EQ(int64_t(bits.size()), W);
      rows.back().mask = int32_t(masks.size() / size_t(W));
      masks.insert(masks.end(), bits.begin(), bits.end());
    }
    std::vector<int32_t> ids;
    be->sample_rows(t, limit, rows, edits, masks, ids);
    for (int r = 0; r < R; ++r) {
      const int32_t want = sample(all.data() + int64_t(r) * V, V, limit, a[size_t(r)], nullptr);
      ASSERT_EQ(ids[size_t(r)], want) << "step " << step << " row " << r;
      const auto& al = ps[size_t(r)].allowed_ids;
      if (r != 3) EXPECT_NE(std::find(al.begin(), al.end(), want), al.end()) << "row " << r;
      a[size_t(r)].accept(want);
      b[size_t(r)].accept(want);
    }
  }
  // A mask whose allowed ids are all -inf: -1, greedy or not; sample() says which mask left nothing.
  std::vector<float> x(8, 0.f);
  x[2] = x[5] = -std::numeric_limits<float>::infinity();
  Tensor d = be->upload_f32(x, {1, 8}, DType::F32);
  for (float temp : {0.f, 1.f}) {
    SamplingParams p;
    p.seed = 1;
    p.temperature = temp;
    p.allowed_ids = {2, 5};
    SeqSampler s(p, {});
    std::vector<SampleEdit> edits;
    std::vector<uint32_t> bits;
    std::vector<int32_t> ids;
    ASSERT_EQ(row_mask(s, nullptr, 8, bits), MaskKind::kAllowed);
    EXPECT_EQ(bits, std::vector<uint32_t>{(1u << 2) | (1u << 5)});
    SampleRowParams row = next_row(s, edits);
    row.mask = 0;
    be->sample_rows(d, 8, {row}, edits, bits, ids);
    EXPECT_EQ(ids, std::vector<int32_t>{-1}) << "temperature " << temp;
    row.mask = -1;
    be->sample_rows(d, 8, {row}, edits, bits, ids);
    EXPECT_GE(ids[0], 0) << "unmasked: any finite logit";
    EXPECT_ERROR(sample(x.data(), 8, 8, s, nullptr), "allowed_token_ids: none of them is left");
    row.mask = 1;
    EXPECT_ERROR(be->sample_rows(d, 8, {row}, edits, bits, ids), "mask 1 outside the 1 masks given");
    row.mask = 0;
    Tensor wide = be->upload_f32(std::vector<float>(40, 0.f), {1, 40}, DType::F32);  // 2 words a mask
    EXPECT_ERROR(be->sample_rows(wide, 40, {row}, edits, {1u, 2u, 3u}, ids), "masks of 3 words, expected a multiple of 2");
  }
}

}  // namespace
}  // namespace ds::sampling

namespace ds::sampling {
namespace {

// A small byte vocabulary: every printable ASCII character, some multi-character pieces, an end id and an id no
// grammar allows (an empty string: a special token).
std::vector<std::string> grammar_vocab() {
  std::vector<std::string> v;
  for (int c = 32; c < 127; ++c) v.push_back(std::string(1, char(c)));
  for (const char* s : {"{\"", "\":", "\",", "true", "false", "null", "  ", "\n", "ab", "\"}", "12", "red", "}}"})
    v.push_back(s);
  v.push_back("");  // end id
  v.push_back("");  // special
  return v;
}

// Constrained sampling (sample + accept): the tokens spell a document of the grammar, the end id comes only once it
// is complete, the logprobs stay raw, and with think_end the constraint starts after it.
TEST(SamplingGrammar, SampledTokensSpellTheGrammarsLanguage) {
  const auto vocab = grammar_vocab();
  const int32_t V = int32_t(vocab.size()), end = V - 2;
  auto masker = std::make_shared<const TokenMasker>(vocab);
  const auto schema = nlohmann::ordered_json::parse(
      R"({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["red", "blue"]},
          "c": {"type": "string", "maxLength": 3}}, "required": ["a", "b", "c"], "additionalProperties": false})");
  for (int think = 0; think < 2; ++think)
    for (uint64_t seed = 1; seed <= 30; ++seed) {
      SamplingParams p;
      p.temperature = 1.f;
      p.seed = seed;
      p.logprobs = 0;
      p.grammar = grammar_json_schema(schema);
      p.masker = masker;
      p.end_ids = {end};
      p.think_end = think ? int32_t('!' - 32) : -1;  // the "!" token closes the think block
      SeqSampler s(p, {});
      std::string text;
      bool ended = false;
      if (think) {
        EXPECT_FALSE(s.constrained());
        s.accept(int32_t('x' - 32));  // unconstrained before think_end
        EXPECT_FALSE(s.constrained());
        s.accept(p.think_end);
        ASSERT_TRUE(s.constrained());
      }
      for (int step = 0; step < 400 && !ended; ++step) {
        const auto logits = random_logits(V, seed * 1000 + uint64_t(step), 1.f);
        TokenLogprob lp;
        const int32_t tok = sample(logits.data(), V, V, s, &lp);
        // raw logprob: log-softmax of the unmasked row
        double mx = -1e30, z = 0;
        for (float x : logits) mx = std::max(mx, double(x));
        for (float x : logits) z += std::exp(double(x) - mx);
        EXPECT_NEAR(lp.logprob, double(logits[size_t(tok)]) - mx - std::log(z), 1e-4);
        ASSERT_NE(tok, V - 1) << "a token no grammar allows";
        if (tok == end) {
          ASSERT_TRUE(s.matcher->accepting()) << "end before the text is complete: " << text;
          ended = true;
        } else {
          text += vocab[size_t(tok)];
        }
        s.accept(tok);
      }
      ASSERT_TRUE(ended) << "seed " << seed << ": no end in 400 tokens: " << text;
      const auto v = nlohmann::json::parse(text);  // throws if not JSON
      ASSERT_TRUE(v.is_object()) << text;
      EXPECT_EQ(v.size(), 3u) << text;
      EXPECT_TRUE(v["a"].is_number_integer()) << text;
      EXPECT_TRUE(v["b"] == "red" || v["b"] == "blue") << text;
      EXPECT_TRUE(v["c"].is_string() && v["c"].get<std::string>().size() <= 3) << text;
    }
}


// Tool-call grammars (SamplingParams::grammar_trigger / grammar_close / grammar_lazy / grammar_prefix / after_close):
// a vocabulary with the format's pieces and four ids the grammar never spells: <tool_call>, </tool_call>, an end id
// and </think>.
struct ToolVocab {
  std::vector<std::string> v;
  int32_t trigger, close, end, think_end;
  ToolVocab() {
    for (int c = 32; c < 127; ++c) v.push_back(std::string(1, char(c)));
    for (const char* s : {"\n", "\n<function=", "f>\n", "g>\n", "<parameter=", "n>\n", "s>\n", "\n</parameter>\n",
                          "</function>\n", "12", "true", "ab", "</", "parameter"})
      v.push_back(s);
    trigger = int32_t(v.size());
    close = trigger + 1;
    end = trigger + 2;
    think_end = trigger + 3;
    v.resize(v.size() + 4);
  }
};

const char* kTwoTools = R"([
  {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
      "properties": {"n": {"type": "integer"}, "s": {"type": "string", "maxLength": 4}}, "required": ["n"]}}},
  {"type": "function", "function": {"name": "g"}}])";

SamplingParams tool_params(const ToolVocab& tv, uint64_t seed) {
  SamplingParams p;
  p.temperature = 1.f;
  p.seed = seed;
  p.grammar = grammar_tool_call(nlohmann::ordered_json::parse(kTwoTools));
  p.masker = std::make_shared<const TokenMasker>(tv.v);
  p.end_ids = {tv.end};
  p.grammar_trigger = tv.trigger;
  p.grammar_close = tv.close;
  return p;
}

// Samples up to `steps` tokens with logits that favour `favour` (so the walk reaches it); returns the tokens. Each
// token is checked against the state it was sampled in.
// Stops after an end id or `stop`.
std::vector<int32_t> run(SeqSampler& s, const ToolVocab& tv, int steps, uint64_t seed, int32_t stop = -1) {
  std::vector<int32_t> out;
  const int32_t V = int32_t(tv.v.size());
  for (int i = 0; i < steps; ++i) {
    auto x = random_logits(V, seed * 7919 + uint64_t(i), 1.f);
    x[size_t(tv.close)] += 4.f;  // so calls finish
    const bool engaged = s.matcher.has_value();
    const bool complete = engaged && s.matcher->accepting();
    const int32_t t = sample(x.data(), V, V, s, nullptr);
    if (engaged) {
      EXPECT_NE(t, tv.end) << "an end id inside a call";
      EXPECT_NE(t, tv.trigger);
      if (t == tv.close) EXPECT_TRUE(complete) << "the close token before the call is complete";
    }
    s.accept(t);
    out.push_back(t);
    if (t == tv.end || t == stop) break;
  }
  return out;
}

// The calls in a token sequence, text between <tool_call> and </tool_call>, parsed by the tool-call parser.
std::vector<ToolCall> calls_of(const ToolVocab& tv, const std::vector<int32_t>& toks, const std::string& prefix = "") {
  std::string text = prefix;
  for (int32_t t : toks)
    text += t == tv.trigger ? "<tool_call>" : t == tv.close ? "</tool_call>" : t >= tv.trigger ? "" : tv.v[size_t(t)];
  return ToolCallParser::parse(text, nlohmann::ordered_json::parse(kTwoTools)).tool_calls;
}

void expect_valid_calls(const std::vector<ToolCall>& calls) {
  for (auto& c : calls) {
    SCOPED_TRACE(c.name + " " + c.arguments);
    ASSERT_TRUE(c.name == "f" || c.name == "g");
    const auto a = nlohmann::json::parse(c.arguments);
    if (c.name == "g") {
      EXPECT_TRUE(a.empty());
      continue;
    }
    ASSERT_TRUE(a.contains("n"));
    EXPECT_TRUE(a["n"].is_number_integer());
    if (a.contains("s")) EXPECT_TRUE(a["s"].is_string() && a["s"].get<std::string>().size() <= 4);
  }
}

// Lazy (tool_choice auto): free text until the trigger, a call's grammar from it to the close token, free again, and
// the trigger re-arms; inside reasoning the trigger is ordinary text.
TEST(SamplingGrammar, TriggerEngagesAFreshCallAndCloseReleasesIt) {
  const ToolVocab tv;
  int calls = 0;
  for (uint64_t seed = 1; seed <= 20; ++seed) {
    SamplingParams p = tool_params(tv, seed);
    p.grammar_lazy = true;
    p.think_end = tv.think_end;
    SeqSampler s(p, {});
    s.accept(tv.trigger);  // inside the think block: not a call
    EXPECT_FALSE(s.constrained());
    s.accept(tv.think_end);
    EXPECT_FALSE(s.constrained()) << "lazy: not engaged after </think>";
    s.accept(int32_t('a' - 32));
    EXPECT_FALSE(s.constrained());
    std::vector<int32_t> toks;
    for (int k = 0; k < 2; ++k) {  // two calls, text between them
      s.accept(tv.trigger);
      toks.push_back(tv.trigger);
      ASSERT_TRUE(s.constrained());
      std::vector<int32_t> call = run(s, tv, 200, seed * 10 + uint64_t(k), tv.close);
      ASSERT_FALSE(call.empty());
      ASSERT_EQ(call.back(), tv.close) << "seed " << seed << ": the call did not finish";
      toks.insert(toks.end(), call.begin(), call.end());
      EXPECT_FALSE(s.constrained()) << "released at the close token";
      EXPECT_TRUE(s.closed);
      s.accept(int32_t('x' - 32));  // free text after a call (kFree)
      toks.push_back(int32_t('x' - 32));
    }
    const auto cs = calls_of(tv, toks);
    ASSERT_EQ(cs.size(), 2u);
    expect_valid_calls(cs);
    calls += int(cs.size());
  }
  EXPECT_EQ(calls, 40);
}

// Engaged at the start past a prefix (tool_choice required / named: the prompt ends with "<tool_call>\n<function="),
// then after the close token only another call or an end (kCallOrEnd), or only an end (kEnd).
TEST(SamplingGrammar, PrefixAndWhatMayFollowTheClose) {
  const ToolVocab tv;
  int more_calls = 0;
  for (uint64_t seed = 1; seed <= 20; ++seed) {
    SamplingParams p = tool_params(tv, seed);
    p.grammar_prefix = "\n<function=";
    p.after_close = SamplingParams::AfterClose::kCallOrEnd;
    SeqSampler s(p, {});
    ASSERT_TRUE(s.constrained());
    std::vector<int32_t> toks = run(s, tv, 400, seed);
    ASSERT_FALSE(toks.empty());
    EXPECT_EQ(toks.back(), tv.end) << "seed " << seed;
    // Between calls: nothing but the trigger and the end.
    for (size_t i = 1; i < toks.size(); ++i)
      if (toks[i - 1] == tv.close) {
        EXPECT_TRUE(toks[i] == tv.trigger || toks[i] == tv.end) << "after a call: " << toks[i];
        more_calls += toks[i] == tv.trigger;
      }
    const auto cs = calls_of(tv, toks, "<tool_call>\n<function=");
    ASSERT_GE(cs.size(), 1u);
    expect_valid_calls(cs);
  }
  EXPECT_GT(more_calls, 0) << "the trigger never re-engaged";

  // kEnd, named: one call of f, then the end.
  for (uint64_t seed = 1; seed <= 10; ++seed) {
    SamplingParams p = tool_params(tv, seed);
    p.grammar_prefix = "\n<function=f>\n";
    p.after_close = SamplingParams::AfterClose::kEnd;
    SeqSampler s(p, {});
    std::vector<int32_t> toks = run(s, tv, 400, seed);
    ASSERT_GE(toks.size(), 2u);
    EXPECT_EQ(toks.back(), tv.end);
    EXPECT_EQ(toks[toks.size() - 2], tv.close);
    const auto cs = calls_of(tv, toks, "<tool_call>\n<function=f>\n");
    ASSERT_EQ(cs.size(), 1u);
    EXPECT_EQ(cs[0].name, "f");
    expect_valid_calls(cs);
  }
}

TEST(SamplingGrammar, TriggerGrammarErrors) {
  const ToolVocab tv;
  SamplingParams p = tool_params(tv, 1);
  p.grammar_prefix = "\n<function=h";
  EXPECT_THROW(SeqSampler(p, {}), Error) << "a prefix outside the grammar's language";
  p.grammar_prefix = "\n<function=g>\n";
  p.after_close = SamplingParams::AfterClose::kEnd;
  SeqSampler s(p, {});
  EXPECT_THROW(s.accept(tv.close), Error) << "the close token before </function>";
  EXPECT_THROW(s.accept(tv.end), Error) << "an end id inside a call";
  s.accept(int32_t(tv.v.size()) - 4 - 6);  // "</function>\n"
  ASSERT_TRUE(s.matcher && s.matcher->accepting());
  s.accept(tv.close);
  EXPECT_TRUE(s.constrained()) << "kEnd: only an end may follow";
  std::vector<uint32_t> bits;
  ASSERT_TRUE(s.grammar_mask(bits));
  for (int32_t id = 0; id < int32_t(tv.v.size()); ++id)
    EXPECT_EQ(bits[size_t(id) / 32] >> (id % 32) & 1u, id == tv.end ? 1u : 0u) << id;
  EXPECT_THROW(s.accept(tv.trigger), Error);
}


// The next token both ways: sample() on the host and the CPU sample_rows of next_row() (what the device sampler
// is given); they must agree. The host draw advances the stream, so the row's uniform is taken back first.
int32_t sample_both(SeqSampler& s, const std::vector<float>& x) {
  const int64_t V = int64_t(x.size());
  const uint64_t draws = s.draws;
  std::vector<SampleEdit> edits;
  const SampleRowParams r = next_row(s, edits);
  s.draws = draws;
  std::vector<int32_t> ids;
  cpu::sample_rows(x.data(), V, V, {r}, edits, {}, ids);
  const int32_t t = sample(x.data(), V, V, s, nullptr);
  EXPECT_EQ(ids[0], t) << "host and device samplers agree";
  return t;
}

// thinking_token_budget: `budget` reasoning tokens, then think_end is forced (no draw); undo takes back the end of
// the think block; without a budget nothing is forced.
TEST(SamplingThinking, BudgetForcesThinkEnd) {
  const int64_t V = 50;
  for (int64_t budget : {0, 1, 3, 7}) {
    SamplingParams p;
    p.seed = uint64_t(budget) + 1;
    p.think_end = 5;
    p.thinking_budget = budget;
    p.logit_bias = {{5, -100.f}};  // never closed by the model itself
    p.logprobs = 0;
    SeqSampler s(p, {1, 2});
    for (int64_t i = 0; i < budget; ++i) {
      EXPECT_EQ(s.forced(), -1);
      EXPECT_EQ(s.budget_left(), budget - i);
      const auto x = random_logits(V, uint64_t(100 + i));
      const int32_t t = sample(x.data(), V, V, s, nullptr);
      EXPECT_NE(t, 5);
      s.accept(t);
    }
    EXPECT_EQ(s.forced(), 5) << "budget " << budget;
    const SeqSampler::Mark before = s.mark();
    const auto x = random_logits(V, 999);
    const uint64_t draws = s.draws;
    TokenLogprob lp;
    EXPECT_EQ(sample(x.data(), V, V, s, &lp), 5);
    EXPECT_EQ(s.draws, draws) << "a forced token draws nothing";
    EXPECT_EQ(lp.token, 5);
    s.accept(5);
    EXPECT_FALSE(s.thinking);
    EXPECT_EQ(s.forced(), -1);
    EXPECT_EQ(s.budget_left(), INT64_MAX);
    s.undo(before, {5});  // a rejected draft
    EXPECT_TRUE(s.thinking);
    EXPECT_EQ(s.forced(), 5);
    s.accept(5);
    const SeqSampler::Mark after = s.mark();
    s.accept(7);  // content: not reasoning
    s.undo(after, {7});
    EXPECT_FALSE(s.thinking);
    EXPECT_EQ(s.reasoning, budget);
    EXPECT_EQ(s.generated_counts.count(7), 0u);
  }
  SamplingParams p;
  p.think_end = 5;
  SeqSampler s(p, {});
  for (int i = 0; i < 100; ++i) s.accept(3);
  EXPECT_EQ(s.forced(), -1) << "no budget, nothing forced";
}

// min_tokens: the end ids get a bias of -inf until that many tokens are generated, on the host sampler and in the
// edits the device sampler applies.
TEST(SamplingThinking, MinTokensHoldsTheEndIds) {
  const int64_t V = 40;
  SamplingParams p;
  p.temperature = 0.f;
  p.min_tokens = 4;
  p.end_ids = {7, 9};
  p.logit_bias = {{7, 100.f}};
  SeqSampler s(p, {});
  for (int i = 0; i < 4; ++i) {
    const int32_t t = sample_both(s, random_logits(V, uint64_t(i)));
    EXPECT_NE(t, 7);
    EXPECT_NE(t, 9);
    s.accept(t);
  }
  const auto x = random_logits(V, 77);
  EXPECT_EQ(sample(x.data(), V, V, s, nullptr), 7) << "after min_tokens the biased end id wins";
}


// bad_words: a one-token word is never sampled; the last token of a longer one only where the output ends with the
// rest of it (and again after an undo), on the host sampler and in the device sampler's edits alike.
// allowed_token_ids: nothing else is sampled (the host path: constrained()).
TEST(SamplingWords, BadWordsAndAllowedTokenIds) {
  const int64_t V = 30;
  SamplingParams p;
  p.temperature = 0.f;
  p.logit_bias = {{4, 50.f}, {9, 40.f}};  // greedy wants 4, then 9
  p.bad_words = {{4}, {2, 3, 9}};
  SeqSampler s(p, {});
  EXPECT_FALSE(s.constrained());
  auto both = [&](uint64_t seed) { return sample_both(s, random_logits(V, seed)); };
  EXPECT_EQ(both(1), 9) << "4 is banned, so the next-biased 9";
  s.accept(2);
  const SeqSampler::Mark m2 = s.mark();
  s.accept(3);
  EXPECT_NE(both(2), 9) << "2 3 9 is a bad word";
  EXPECT_NE(both(3), 4);
  s.undo(m2, {3});
  EXPECT_EQ(both(4), 9) << "after 2 alone 9 is fine";
  s.accept(3);
  s.accept(7);
  EXPECT_EQ(both(5), 9);

  SamplingParams q;
  q.temperature = 1.f;
  q.seed = 3;
  q.allowed_ids = {3, 11, 17};
  SeqSampler a(q, {});
  EXPECT_TRUE(a.constrained());
  std::set<int32_t> seen;
  for (int i = 0; i < 200; ++i) {
    const auto x = random_logits(V, uint64_t(50 + i));
    const int32_t t = sample(x.data(), V, V, a, nullptr);
    EXPECT_TRUE(t == 3 || t == 11 || t == 17) << t;
    seen.insert(t);
    a.accept(t);
  }
  EXPECT_EQ(seen.size(), 3u);
  q.allowed_ids = {3, 40};
  EXPECT_THROW(check_params(q, V), Error);
}


// A mask made ahead (mask_ahead + compute, what the engine's workers do during the forward) is grammar_mask()'s at
// that position, sample() with it picks the token sample() picks alone, a stale one (the position moved since the
// copy) is recomputed, and an exception of its computation comes out of sample() as the masker's would. Structured
// output (with think_end), a lazy tool-call grammar (trigger, close, kCallOrEnd's fixed list after it).
TEST(SamplingGrammar, MaskAheadIsTheMaskAtSampling) {
  const auto vocab = grammar_vocab();
  const int32_t V = int32_t(vocab.size()), end = V - 2;
  SamplingParams p;
  p.temperature = 1.f;
  p.seed = 5;
  p.grammar = grammar_json_schema(nlohmann::ordered_json::parse(
      R"({"type": "object", "properties": {"c": {"type": "string", "maxLength": 6}, "a": {"type": "integer"}},
          "required": ["c", "a"]})"));
  p.masker = std::make_shared<const TokenMasker>(vocab, 0);  // no cache: every mask is computed
  p.end_ids = {end};
  p.think_end = int32_t('!' - 32);
  SeqSampler a(p, {}), b(p, {});  // a: masks ahead, b: masks made by sample()
  for (SeqSampler* s : {&a, &b}) s->accept(int32_t('x' - 32));
  int steps = 0;
  bool ended = false;
  for (int step = 0; step < 300 && !ended; ++step) {
    const auto x = random_logits(V, 900 + uint64_t(step), 1.f);
    if (step == 0) {  // still thinking: nothing to mask ahead
      MaskAhead m = mask_ahead(a);
      EXPECT_TRUE(m.done);
      EXPECT_FALSE(m.constrained);
      for (SeqSampler* s : {&a, &b}) s->accept(p.think_end);
      continue;
    }
    MaskAhead m = mask_ahead(a);
    ASSERT_FALSE(m.done);
    m.compute();
    std::vector<uint32_t> want;
    ASSERT_TRUE(a.grammar_mask(want));
    ASSERT_TRUE(m.constrained);
    ASSERT_EQ(m.bits, want) << "step " << step;
    const int32_t ta = sample(x.data(), V, V, a, nullptr, &m), tb = sample(x.data(), V, V, b, nullptr);
    ASSERT_EQ(ta, tb) << "step " << step;
    ended = ta == end;
    a.accept(ta);
    b.accept(tb);
    ++steps;
    if (!ended) {  // m is stale now: sample() recomputes instead of using it
      const auto y = random_logits(V, 5000 + uint64_t(step), 1.f);
      SeqSampler a2 = a, b2 = b;
      EXPECT_EQ(sample(y.data(), V, V, a2, nullptr, &m), sample(y.data(), V, V, b2, nullptr)) << "step " << step;
    }
  }
  EXPECT_TRUE(ended);
  EXPECT_GT(steps, 5);

  // An error computing the mask is sample()'s error; a stale one is not.
  SeqSampler c(p, {});
  c.accept(p.think_end);
  MaskAhead m = mask_ahead(c);
  m.error = std::make_exception_ptr(Error("mask failed"));
  m.done = true;
  const auto x = random_logits(V, 1, 1.f);
  EXPECT_THROW(sample(x.data(), V, V, c, nullptr, &m), Error);
  c.accept(int32_t('{' - 32));
  EXPECT_NO_THROW(sample(x.data(), V, V, c, nullptr, &m));

  // Tool calls: free text (nothing to mask), the call, and after the close only the trigger or the end.
  const ToolVocab tv;
  SamplingParams q = tool_params(tv, 3);
  q.grammar_lazy = true;
  q.after_close = SamplingParams::AfterClose::kCallOrEnd;
  SeqSampler t(q, {}), u(q, {});
  for (SeqSampler* s : {&t, &u}) s->accept(int32_t('a' - 32));
  EXPECT_TRUE(mask_ahead(t).done) << "a lazy grammar before its trigger masks nothing";
  for (SeqSampler* s : {&t, &u}) s->accept(tv.trigger);
  const int32_t W = int32_t(tv.v.size());
  int closes = 0;
  for (int step = 0; step < 400; ++step) {
    auto x = random_logits(W, 77 + uint64_t(step), 1.f);
    x[size_t(tv.close)] += 4.f;
    MaskAhead m = mask_ahead(t);
    m.compute();
    std::vector<uint32_t> want;
    EXPECT_EQ(m.constrained, t.grammar_mask(want));
    if (m.constrained) ASSERT_EQ(m.bits, want) << "step " << step;
    const int32_t tt = sample(x.data(), W, W, t, nullptr, &m), tu = sample(x.data(), W, W, u, nullptr);
    ASSERT_EQ(tt, tu) << "step " << step;
    t.accept(tt);
    u.accept(tu);
    closes += tt == tv.close;
    if (tt == tv.end) break;
  }
  EXPECT_GT(closes, 0);
}

}  // namespace
}  // namespace ds::sampling
