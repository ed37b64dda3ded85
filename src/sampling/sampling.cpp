// CPU reference sampler. The order of processing follows vLLM's V1 sampler so that the same request gives
// the same distribution here and there: logit_bias → penalties → (greedy) → temperature → min_p → top_k →
// top_p → draw. Logprobs describe the model's raw distribution (vLLM's default `raw_logprobs` mode).
#include "sampling/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/status.h"

namespace ds::sampling {
namespace {

// Below this temperature a request is greedy (vLLM's _SAMPLING_EPS): dividing by it would overflow.
constexpr float kGreedyEps = 1e-5f;

uint64_t seed_of(const SamplingParams& p) {
  if (p.seed) return *p.seed;
  std::random_device rd;
  return (uint64_t(rd()) << 32) ^ uint64_t(rd());
}

// Uniform in [0, 1) from the top 53 bits: identical on every standard library, which
// std::uniform_real_distribution does not promise (seeded outputs must not change with the toolchain).
double uniform01(std::mt19937_64& g) { return double(g() >> 11) * 0x1.0p-53; }

int32_t argmax(const float* x, int64_t n) {
  int64_t a = 0;
  for (int64_t i = 1; i < n; ++i)
    if (x[i] > x[a]) a = i;
  return int32_t(a);
}

// Raw log-softmax over ids [0, n): the chosen token and the top `k` alternatives.
void fill_logprobs(const float* logits, int64_t n, int32_t chosen, int32_t k, TokenLogprob& lp) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, logits[i]);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(double(logits[i]) - mx);
  const double lse = double(mx) + std::log(sum);
  lp.token = chosen;
  lp.logprob = float(double(logits[chosen]) - lse);
  lp.top.clear();
  k = int32_t(std::min<int64_t>(k, n));
  if (k <= 0) return;
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) ids[size_t(i)] = int32_t(i);
  std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  for (int32_t i = 0; i < k; ++i) lp.top.push_back({ids[size_t(i)], float(double(logits[ids[size_t(i)]]) - lse)});
}

}  // namespace

SeqSampler::SeqSampler(const SamplingParams& p, const std::vector<int32_t>& prompt) : params(p), rng(seed_of(p)) {
  for (int32_t t : prompt) prompt_tokens[t] = true;
}

void check_params(const SamplingParams& p, int64_t vocab) {
  if (!(p.temperature >= 0.f) || !std::isfinite(p.temperature))
    fail("temperature: expected a finite value >= 0, found ", p.temperature);
  if (!(p.top_p > 0.f && p.top_p <= 1.f)) fail("top_p: expected a value in (0, 1], found ", p.top_p);
  if (p.top_k < -1) fail("top_k: expected -1 or 0 (off) or a positive count, found ", p.top_k);
  if (!(p.min_p >= 0.f && p.min_p <= 1.f)) fail("min_p: expected a value in [0, 1], found ", p.min_p);
  if (!(p.repetition_penalty > 0.f) || !std::isfinite(p.repetition_penalty))
    fail("repetition_penalty: expected a finite value > 0, found ", p.repetition_penalty);
  if (!std::isfinite(p.presence_penalty)) fail("presence_penalty: expected a finite value, found ", p.presence_penalty);
  if (!std::isfinite(p.frequency_penalty))
    fail("frequency_penalty: expected a finite value, found ", p.frequency_penalty);
  for (auto& [t, b] : p.logit_bias) {
    if (t < 0 || t >= vocab) fail("logit_bias: token id ", t, " is outside the vocabulary [0, ", vocab, ")");
    if (std::isnan(b)) fail("logit_bias: bias of token ", t, " is NaN");
  }
  if (p.logprobs < -1 || p.logprobs > vocab)
    fail("logprobs: expected -1 (off) or 0..", vocab, ", found ", p.logprobs);
}

void apply_bias_and_penalties(float* x, int64_t n, const SeqSampler& s) {
  const SamplingParams& p = s.params;
  for (auto& [t, b] : p.logit_bias)
    if (t >= 0 && t < n) x[t] += b;
  if (p.repetition_penalty != 1.f) {
    // HF/vLLM: once per distinct token of prompt + generated; moves the logit towards "less likely".
    const float rp = p.repetition_penalty;
    auto penalise = [&](int32_t t) {
      if (t < 0 || t >= n) return;
      x[t] = x[t] > 0 ? x[t] / rp : x[t] * rp;
    };
    for (auto& [t, _] : s.prompt_tokens) penalise(t);
    for (auto& [t, _] : s.generated_counts)
      if (!s.prompt_tokens.count(t)) penalise(t);
  }
  if (p.presence_penalty != 0.f || p.frequency_penalty != 0.f)
    for (auto& [t, c] : s.generated_counts)  // OpenAI: generated tokens only
      if (t >= 0 && t < n && c > 0) x[t] -= p.frequency_penalty * float(c) + p.presence_penalty;
}

namespace {

// The distribution sample() draws from, up to its normaliser: the candidates that survive temperature,
// min_p, top_k and top_p with their weights exp(logit/T - max), in the order sample() walks them.
// `x` holds the biased and penalised logits [n]; not called for greedy requests.
struct Cand {
  double w;  // exp(logit - max): probability up to the normaliser
  int32_t id;
};

std::vector<Cand> candidates(std::vector<float>& x, const SamplingParams& p) {
  const int64_t n = int64_t(x.size());
  const float inv_t = 1.f / p.temperature;
  float mx = -std::numeric_limits<float>::infinity();
  for (auto& v : x) {
    v *= inv_t;
    mx = std::max(mx, v);
  }
  if (!std::isfinite(mx)) fail("sampling: no token left to sample (every logit is -inf or NaN after logit_bias)");
  std::vector<Cand> c;
  c.reserve(size_t(n));
  // min_p keeps tokens whose probability is at least min_p × the top probability: w >= min_p.
  for (int64_t i = 0; i < n; ++i) {
    double w = std::exp(double(x[size_t(i)]) - mx);
    if (w > 0 && w >= double(p.min_p)) c.push_back({w, int32_t(i)});
  }
  auto by_prob = [](const Cand& a, const Cand& b) { return a.w > b.w || (a.w == b.w && a.id < b.id); };
  if (p.top_k > 0 && size_t(p.top_k) < c.size()) {
    // Ties with the k-th value are kept, like vLLM's mask `logits < kth`.
    std::nth_element(c.begin(), c.begin() + (p.top_k - 1), c.end(), by_prob);
    const double kth = c[size_t(p.top_k - 1)].w;
    c.erase(std::remove_if(c.begin(), c.end(), [&](const Cand& a) { return a.w < kth; }), c.end());
  }
  if (p.top_p < 1.f) {
    // Keep the most likely tokens while the mass before them is below top_p (so at least one survives).
    std::sort(c.begin(), c.end(), by_prob);
    double total = 0;
    for (auto& a : c) total += a.w;
    double before = 0;
    size_t keep = 0;
    while (keep < c.size() && before < double(p.top_p) * total) before += c[keep++].w;
    c.resize(std::max<size_t>(keep, 1));
  }
  return c;
}

// Draws from the candidates' weights (u uniform in [0, 1)).
int32_t draw(const std::vector<Cand>& c, double u) {
  double total = 0;
  for (auto& a : c) total += a.w;
  u *= total;
  int32_t tok = c.back().id;
  for (auto& a : c) {
    if (u < a.w) {
      tok = a.id;
      break;
    }
    u -= a.w;
  }
  return tok;
}

}  // namespace

int32_t sample(const float* logits, int64_t V, int64_t vocab_limit, SeqSampler& s, TokenLogprob* lp) {
  const SamplingParams& p = s.params;
  const int64_t n = vocab_limit > 0 ? std::min(vocab_limit, V) : V;  // ids >= n are never produced
  DS_CHECK(n > 0, "empty vocabulary");

  // 1. Logit bias, then penalties, on a copy of the raw row.
  std::vector<float> x(logits, logits + n);  // fp32 [n]
  apply_bias_and_penalties(x.data(), n, s);

  int32_t tok = -1;
  if (p.temperature < kGreedyEps) {
    tok = argmax(x.data(), n);
  } else {
    // 2. Temperature. 3. min_p, top_k, top_p over the surviving candidates. 4. Draw.
    tok = draw(candidates(x, p), uniform01(s.rng));
  }
  if (lp && p.logprobs >= 0) fill_logprobs(logits, n, tok, p.logprobs, *lp);
  return tok;
}

int32_t verify_draft(const float* logits, int64_t V, int64_t vocab_limit, SeqSampler& s, int32_t draft,
                     const float* draft_probs, bool* accepted, TokenLogprob* lp) {
  const SamplingParams& p = s.params;
  const int64_t n = vocab_limit > 0 ? std::min(vocab_limit, V) : V;
  DS_CHECK(n > 0, "empty vocabulary");
  std::vector<float> x(logits, logits + n);  // fp32 [n]
  apply_bias_and_penalties(x.data(), n, s);

  int32_t tok = -1;
  bool acc = false;
  if (p.temperature < kGreedyEps) {
    // Greedy target: p is one-hot at the argmax, so the rule reduces to "accept iff equal" and uses no RNG.
    tok = argmax(x.data(), n);
    acc = tok == draft;
  } else {
    std::vector<Cand> c = candidates(x, p);
    double total = 0, pd = 0;
    for (auto& a : c) {
      total += a.w;
      if (a.id == draft) pd = a.w;
    }
    pd /= total;  // p(draft); 0 outside the candidates (or outside [0, n))
    const double qd = draft_probs ? double(draft_probs[draft]) : 1.0;
    // Leviathan et al.: accept with probability min(1, p/q), i.e. u·q < p.
    const double u = uniform01(s.rng);
    if (u * qd < pd) {
      tok = draft;
      acc = true;
    } else {
      // Residual normalize(max(0, p - q)); with a one-hot q that is p without the draft. Its support lies
      // inside the candidates, since p = 0 elsewhere.
      std::vector<Cand> r;
      r.reserve(c.size());
      for (auto& a : c) {
        const double q = draft_probs ? double(draft_probs[a.id]) : (a.id == draft ? 1.0 : 0.0);
        const double w = a.w / total - q;
        if (w > 0) r.push_back({w, a.id});
      }
      // p == q leaves no residual mass, but then the draft was accepted with probability 1: unreachable
      // except by rounding; fall back to p itself.
      tok = draw(r.empty() ? c : r, uniform01(s.rng));
    }
  }
  if (accepted) *accepted = acc;
  if (lp && p.logprobs >= 0) fill_logprobs(logits, n, tok, p.logprobs, *lp);
  return tok;
}

int32_t draft_argmax(const float* logits, int64_t V, int64_t vocab_limit) {
  const int64_t n = vocab_limit > 0 ? std::min(vocab_limit, V) : V;
  return argmax(logits, n);
}

}  // namespace ds::sampling
