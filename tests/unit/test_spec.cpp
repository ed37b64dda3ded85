// Speculative decoding with the MTP head (issue 8): the rejection-sampling rule on synthetic distributions
// (the emitted tokens follow the target distribution), and the engine on the tiny fixtures (CPU backend):
// greedy output with speculation equals the output without it for K = 1..4, batched with chunked prefill;
// max_tokens, stop tokens, preemption and abort behave as without speculation; the spec counters add up.
#include <gtest/gtest.h>

#include <algorithm>

#include <cmath>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <tuple>
#include <unistd.h>

#include "backend/ops.h"
#include "core/status.h"
#include "golden_util.h"
#include "masker_util.h"
#include "model/model.h"
#include "runtime/engine.h"
#include "runtime/spec_decode.h"
#include "sampling/grammar.h"
#include "sampling/sampling.h"
#include "server/metrics.h"

namespace ds {
namespace {

using namespace std::chrono_literals;
using runtime::Engine;
using runtime::EngineConfig;
using runtime::FinishReason;
using runtime::Request;

// ---- the acceptance rule on synthetic distributions ---------------------------------------------------

std::vector<double> normalized(std::vector<double> v) {
  double s = std::accumulate(v.begin(), v.end(), 0.0);
  for (auto& x : v) x /= s;
  return v;
}

// Draws `trials` drafts d ~ q, runs verify_draft with target logits log(p) (temperature 1, no filters), and
// checks every token's empirical frequency against p within 5 standard errors; returns the acceptance rate.
double check_follows_target(const std::vector<double>& p, const std::vector<double>* q, int32_t fixed_draft,
                            int trials, uint64_t seed) {
  const int64_t n = int64_t(p.size());
  std::vector<float> logits(static_cast<size_t>(n)), qf;
  for (int64_t i = 0; i < n; ++i) logits[size_t(i)] = p[size_t(i)] > 0 ? float(std::log(p[size_t(i)])) : -INFINITY;
  if (q) qf.assign(q->begin(), q->end());
  sampling::SamplingParams sp;
  sp.temperature = 1.f;
  sp.seed = seed;
  sampling::SeqSampler s(sp, {});
  std::mt19937_64 draft_rng(seed ^ 0x9e3779b97f4a7c15ull);
  std::discrete_distribution<int32_t> qd(q ? q->begin() : p.begin(), q ? q->end() : p.end());
  std::vector<int64_t> count(size_t(n), 0);
  int64_t acc = 0;
  for (int t = 0; t < trials; ++t) {
    const int32_t d = q ? qd(draft_rng) : fixed_draft;
    bool ok = false;
    int32_t tok = sampling::verify_draft(logits.data(), n, n, s, d, q ? qf.data() : nullptr, &ok, nullptr);
    if (ok) {
      EXPECT_EQ(tok, d);
    }
    ++count[size_t(tok)];
    acc += ok;
  }
  double max_z = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double f = double(count[size_t(i)]) / trials, pi = p[size_t(i)];
    const double se = std::sqrt(std::max(pi * (1 - pi), 1e-12) / trials);
    max_z = std::max(max_z, std::abs(f - pi) / se);
    EXPECT_LT(std::abs(f - pi), 5 * se + 1e-9) << "token " << i << ": empirical " << f << " vs target " << pi;
  }
  std::printf("  max |freq - p| = %.2f standard errors over %d trials, acceptance %.4f\n", max_z, trials,
              double(acc) / trials);
  return double(acc) / trials;
}

TEST(SpecVerify, RejectionSamplingFollowsTheTargetDistribution) {
  const auto p = normalized({0.30, 0.05, 0.20, 0.0, 0.15, 0.10, 0.12, 0.08});
  const auto q = normalized({0.05, 0.30, 0.10, 0.20, 0.15, 0.05, 0.05, 0.10});
  const int trials = 200000;
  double expect_acc = 0;  // P(accept) = Σ min(p, q)
  for (size_t i = 0; i < p.size(); ++i) expect_acc += std::min(p[i], q[i]);
  const double acc = check_follows_target(p, &q, -1, trials, 7);
  EXPECT_NEAR(acc, expect_acc, 5 * std::sqrt(expect_acc * (1 - expect_acc) / trials));
  // q == p: everything is accepted.
  EXPECT_DOUBLE_EQ(check_follows_target(p, &p, -1, 20000, 8), 1.0);
  // Deterministic (one-hot) drafts, as the engine's MTP argmax gives: likely, unlikely and impossible drafts.
  for (int32_t d : {0, 1, 3}) {
    const double a = check_follows_target(p, nullptr, d, trials, 100 + uint64_t(d));
    EXPECT_NEAR(a, p[size_t(d)], 5 * std::sqrt(std::max(p[size_t(d)] * (1 - p[size_t(d)]), 1e-12) / trials));
  }
}

TEST(SpecVerify, TargetIsTheProcessedDistribution) {
  // temperature 0.5 and top_k 3 over 8 logits: the target is softmax(l / 0.5) over the top 3, renormalised.
  const std::vector<float> logits = {1.0f, 0.2f, 0.8f, -1.0f, 0.5f, 0.0f, 0.9f, -0.3f};
  sampling::SamplingParams sp;
  sp.temperature = 0.5f;
  sp.top_k = 3;
  sp.seed = 11;
  sampling::SeqSampler s(sp, {});
  std::vector<double> p(8, 0.0);
  for (int i : {0, 2, 6}) p[size_t(i)] = std::exp(logits[size_t(i)] / 0.5);
  p = normalized(p);
  const int trials = 100000;
  for (int32_t d : {2, 4}) {  // a candidate, and a token top_k removed (p = 0: always rejected)
    std::vector<int64_t> count(8, 0);
    int64_t acc = 0;
    for (int t = 0; t < trials; ++t) {
      bool ok = false;
      ++count[size_t(sampling::verify_draft(logits.data(), 8, 8, s, d, nullptr, &ok, nullptr))];
      acc += ok;
    }
    for (int i = 0; i < 8; ++i) {
      const double f = double(count[size_t(i)]) / trials, se = std::sqrt(std::max(p[i] * (1 - p[i]), 1e-12) / trials);
      EXPECT_LT(std::abs(f - p[size_t(i)]), 5 * se + 1e-9) << "draft " << d << " token " << i;
    }
    EXPECT_NEAR(double(acc) / trials, p[size_t(d)], 0.01);
  }
}

TEST(SpecVerify, GreedyAcceptsExactlyTheArgmaxWithoutTouchingTheRng) {
  const std::vector<float> logits = {0.1f, 2.0f, 0.3f, 1.9f};
  sampling::SamplingParams sp;
  sp.temperature = 0.f;
  sp.seed = 3;
  sampling::SeqSampler s(sp, {});
  const auto before = s.draws;
  bool ok = false;
  EXPECT_EQ(sampling::verify_draft(logits.data(), 4, 4, s, 1, nullptr, &ok, nullptr), 1);
  EXPECT_TRUE(ok);
  EXPECT_EQ(sampling::verify_draft(logits.data(), 4, 4, s, 3, nullptr, &ok, nullptr), 1);
  EXPECT_FALSE(ok);
  EXPECT_EQ(s.draws, before);
}

// Backend::argmax_rows (drafting's device argmax) is the host argmax the drafts used before: first maximum among
// columns [0, limit); NaN never wins, a row of NaNs gives 0.
TEST(SpecDraft, ArgmaxRowsIsTheHostArgmax) {
  auto be = make_cpu_backend();
  const int64_t R = 6, N = 50;
  std::mt19937 g(5);
  std::vector<float> v(size_t(R * N));
  for (auto& x : v) x = float(int(g() % 20)) - 10.f;  // few distinct values: ties everywhere
  const float nan = std::nanf(""), inf = INFINITY;
  v[size_t(1 * N + 0)] = nan;  // a NaN first, then numbers
  for (int64_t j = 0; j < N; ++j) v[size_t(2 * N + j)] = -inf;
  v[size_t(2 * N + 7)] = -3.f;
  for (int64_t j = 0; j < N; ++j) v[size_t(3 * N + j)] = -inf;  // all -inf: column 0
  for (int64_t j = 0; j < N; ++j) v[size_t(4 * N + j)] = nan;   // all NaN: column 0
  v[size_t(5 * N + 40)] = 100.f;                                 // beyond the limit below
  Tensor L = be->upload_f32(v, {R, N}, DType::F32), A = be->alloc(DType::I32, {R});
  for (int64_t limit : {N, int64_t(33), int64_t(1)}) {
    be->argmax_rows(L, limit, A);
    const auto got = be->to_host_f32(A);
    for (int64_t r = 0; r < R; ++r) {
      int64_t want = 0;
      if (r == 1) want = sampling::draft_argmax(v.data() + r * N + 1, limit - 1, 0) + (limit > 1 ? 1 : -1);
      else if (r != 4) want = sampling::draft_argmax(v.data() + r * N, limit, 0);
      if (r == 1 && limit == 1) want = 0;
      EXPECT_EQ(int64_t(got[size_t(r)]), want) << "row " << r << " limit " << limit;
    }
  }
  EXPECT_EQ(int64_t(be->to_host_f32(A)[5]), 0);  // limit 1
  be->argmax_rows(L, N, A);
  EXPECT_EQ(int64_t(be->to_host_f32(A)[5]), 40);
  EXPECT_EQ(int64_t(be->to_host_f32(A)[2]), 7);
  EXPECT_THROW(be->argmax_rows(L, N + 1, A), Error);
}

// ---- the engine on the tiny fixtures ----------------------------------------------------------------

struct Fixture {
  std::unique_ptr<Backend> be;
  std::unique_ptr<model::Model> m;
  std::vector<std::vector<int32_t>> prompts;
};

Fixture& fixture(const std::string& family, const std::string& variant) {
  static std::map<std::string, Fixture> all;
  const std::string key = family + "-" + variant;
  auto it = all.find(key);
  if (it != all.end()) return it->second;
  Fixture& f = all[key];
  const std::string dir = test::data_dir() + "/" + family + "/";
  f.be = make_cpu_backend();
  f.m = model::Model::load(dir + key, *f.be);
  auto g = test::read_json(dir + "golden.json");
  for (auto& p : g["text"][variant]) f.prompts.push_back(p["prompt"].get<std::vector<int32_t>>());
  return f;
}

EngineConfig config(int64_t K) {
  EngineConfig c;
  c.max_num_seqs = 8;
  c.max_num_batched_tokens = 48;  // the 150- and 333-token prompts prefill in chunks, beside decodes
  c.max_model_len = 512;
  c.block_size = 16;
  c.eos_token_ids = {1984, 1986};
  c.num_speculative_tokens = K;
  return c;
}

struct Out {
  std::vector<int32_t> tokens;
  std::vector<sampling::TokenLogprob> logprobs;
  FinishReason finish = FinishReason::None;
  int32_t stop_token = -1;
  int64_t completion_tokens = 0;
  std::string error;
};

Out collect(Request& r) {
  Out o;
  while (auto d = r.out->pop(0ms)) {
    o.tokens.insert(o.tokens.end(), d->tokens.begin(), d->tokens.end());
    o.logprobs.insert(o.logprobs.end(), d->logprobs.begin(), d->logprobs.end());
    o.finish = d->finish;
    o.stop_token = d->stop_token;
    o.completion_tokens = d->completion_tokens;
    if (!d->error.empty()) o.error = d->error;
  }
  return o;
}

std::shared_ptr<Request> req(uint64_t id, std::vector<int32_t> prompt, int64_t max_tokens, float temperature = 0.f) {
  auto r = std::make_shared<Request>();
  r->id = id;
  r->prompt = std::move(prompt);
  r->max_tokens = max_tokens;
  r->sampling.temperature = temperature;
  r->sampling.seed = id + 1;
  r->ignore_eos = true;
  return r;
}

void expect_empty(const runtime::EngineMetrics& m) {
  EXPECT_EQ(m.running, 0);
  EXPECT_EQ(m.waiting, 0);
  EXPECT_EQ(m.kv_blocks_used, 0);
  EXPECT_EQ(m.slots_used, 0);
}

// Every prompt of the fixture submitted at once and stepped to the end.
std::vector<Out> run_all(model::Model& m, const EngineConfig& c, const std::vector<std::shared_ptr<Request>>& rs,
                         runtime::EngineMetrics* metrics = nullptr) {
  Engine e(m, c);
  for (auto& r : rs) e.submit(r);
  while (e.step()) {
  }
  std::vector<Out> out;
  for (auto& r : rs) out.push_back(collect(*r));
  if (metrics) *metrics = e.metrics();
  expect_empty(e.metrics());
  return out;
}

void check_counters(const runtime::EngineMetrics& m, int64_t K) {
  ASSERT_EQ(int64_t(m.spec_accepted_per_pos.size()), K);
  EXPECT_GT(m.spec_num_drafts_total, 0);
  EXPECT_LE(m.spec_draft_tokens_total, K * m.spec_num_drafts_total);
  EXPECT_LE(m.spec_accepted_tokens_total, m.spec_draft_tokens_total);
  int64_t sum = 0;
  for (int64_t i = 0; i < K; ++i) {
    sum += m.spec_accepted_per_pos[size_t(i)];
    if (i > 0) {
      EXPECT_LE(m.spec_accepted_per_pos[size_t(i)], m.spec_accepted_per_pos[size_t(i - 1)]);
    }
  }
  EXPECT_EQ(sum, m.spec_accepted_tokens_total);
}

class SpecGreedy : public ::testing::TestWithParam<std::pair<const char*, const char*>> {};

TEST_P(SpecGreedy, SameTokensAsWithoutSpeculation) {
  auto [family, variant] = GetParam();
  Fixture& f = fixture(family, variant);
  ASSERT_TRUE(f.m->has_mtp());
  const int64_t N = 20;
  auto make = [&] {
    std::vector<std::shared_ptr<Request>> rs;
    for (size_t i = 0; i < f.prompts.size(); ++i) rs.push_back(req(i, f.prompts[i], N - int64_t(i)));
    return rs;
  };
  const auto want = run_all(*f.m, config(0), make());
  for (int64_t K = 1; K <= 4; ++K) {
    runtime::EngineMetrics m;
    const auto got = run_all(*f.m, config(K), make(), &m);
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_EQ(got[i].tokens, want[i].tokens) << family << "-" << variant << " K=" << K << " prompt " << i;
      EXPECT_EQ(got[i].finish, FinishReason::Length);
      EXPECT_EQ(got[i].completion_tokens, N - int64_t(i));
    }
    check_counters(m, K);
    std::printf("  %s-%s K=%lld: %lld rounds, drafted %lld, accepted %lld (%.1f%%), per position:", family, variant,
                (long long)K, (long long)m.spec_num_drafts_total, (long long)m.spec_draft_tokens_total,
                (long long)m.spec_accepted_tokens_total,
                100.0 * double(m.spec_accepted_tokens_total) / double(std::max<int64_t>(1, m.spec_draft_tokens_total)));
    for (auto a : m.spec_accepted_per_pos) std::printf(" %lld", (long long)a);
    std::printf("\n");
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, SpecGreedy,
                         ::testing::Values(std::make_pair("tiny-moe", "bf16"), std::make_pair("tiny-moe", "int4"),
                                           std::make_pair("tiny-dense", "bf16"), std::make_pair("tiny-dense", "int4")),
                         [](const auto& info) {
                           return std::string(info.param.first == std::string("tiny-moe") ? "moe_" : "dense_") +
                                  info.param.second;
                         });

// A draft hook that proposes the plain run's next token (`want`) with probability right/10, else a wrong one.
std::function<int32_t(uint64_t, int64_t, int32_t)> oracle(const std::vector<Out>& want,
                                                           const std::vector<std::vector<int32_t>>& prompts,
                                                           uint64_t seed, int right) {
  auto rng = std::make_shared<std::mt19937_64>(seed);
  return [&want, &prompts, rng, right](uint64_t id, int64_t index, int32_t proposed) {
    const auto& w = want[size_t(id)].tokens;
    const int64_t g = index - int64_t(prompts[size_t(id)].size());
    const bool hit = int((*rng)() % 10) < right;
    if (g < 0 || g >= int64_t(w.size())) return proposed;
    return hit ? w[size_t(g)] : int32_t((w[size_t(g)] + 1 + (*rng)() % 100) % 2048);
  };
}

// Random weights accept almost nothing, so an oracle replaces each draft by the target's own next token with
// probability 0.7 (else a wrong one): acceptance, bonus tokens and partial rollbacks all happen, batched with
// chunked prefill, greedy and sampled, and the greedy output is still the plain one.
TEST(SpecEngine, OracleDraftsAreAcceptedAndOutputUnchanged) {
  Fixture& f = fixture("tiny-moe", "bf16");
  const int64_t N = 24;
  auto make = [&](float temp) {
    std::vector<std::shared_ptr<Request>> rs;
    for (size_t i = 0; i < f.prompts.size(); ++i) rs.push_back(req(i, f.prompts[i], N, temp));
    return rs;
  };
  const auto want = run_all(*f.m, config(0), make(0.f));
  for (int64_t K : {1, 3}) {
    EngineConfig c = config(K);
    c.draft_hook = oracle(want, f.prompts, uint64_t(K), 7);
    runtime::EngineMetrics m;
    const auto got = run_all(*f.m, c, make(0.f), &m);
    for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(got[i].tokens, want[i].tokens) << "K=" << K << " prompt " << i;
    check_counters(m, K);
    const double rate = double(m.spec_accepted_tokens_total) / double(m.spec_draft_tokens_total);
    std::printf("  oracle 0.7, K=%lld: %lld rounds, drafted %lld, accepted %lld (%.1f%%), per position:", (long long)K,
                (long long)m.spec_num_drafts_total, (long long)m.spec_draft_tokens_total,
                (long long)m.spec_accepted_tokens_total, 100 * rate);
    for (auto a : m.spec_accepted_per_pos) std::printf(" %lld", (long long)a);
    std::printf("; %lld forward steps for %lld tokens\n", (long long)m.steps_total, (long long)m.generation_tokens_total);
    EXPECT_GT(rate, 0.4);
    EXPECT_EQ(m.spec_accepted_per_pos[0] > 0, true);
    // Sampled requests with the same oracle: lengths exact, counters consistent.
    const auto s = run_all(*f.m, c, make(0.7f), &m);
    for (auto& o : s) EXPECT_EQ(int64_t(o.tokens.size()), N);
    check_counters(m, K);
  }
}

// Structured output under speculation: a constrained request's drafts are verified against its mask at each
// position (the drafts before it accepted) — on the device (Backend::sample_rows with a mask per verified row, made
// ahead on the workers or on the engine thread) or on the host (verify_draft) — so greedy outputs are the plain run's
// token for token and every output is text of its grammar; drafts were proposed and accepted for all. One request
// thinks first (a budget forces </think>, after which its grammar engages; drafted inside the think block too), two
// make tool calls, one has allowed_token_ids.
TEST(SpecEngine, GrammarRequestsAreSpeculatedWithTheSameTokens) {
  Fixture& f = fixture("tiny-moe", "bf16");
  const int32_t think_end = 2009;
  const auto schema = sampling::grammar_json_schema(nlohmann::ordered_json::parse(
      R"({"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
          "required": ["name", "n"], "additionalProperties": false})"));
  const auto code = sampling::grammar_regex("[A-Z]{2}-[0-9]{2,6}( [a-z]{1,5}){0,3}");
  const auto tools = nlohmann::ordered_json::parse(R"([{"type": "function", "function": {"name": "get_weather",
      "strict": true, "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
      "days": {"type": "integer"}}, "required": ["city"]}}}])");
  const int32_t tool_call = 1998, tool_call_end = 1999;  // <tool_call>, </tool_call>
  auto make = [&](float temp) {
    std::vector<std::shared_ptr<Request>> rs;
    for (size_t i = 0; i < f.prompts.size(); ++i) {
      auto r = req(i, f.prompts[i], 80, temp);
      r->ignore_eos = false;
      r->sampling.grammar = i % 3 == 0 ? schema : i % 3 == 1 ? code : sampling::grammar_json_object();
      r->sampling.masker = test::tiny_masker();
      if (i == 2) {
        r->sampling.think_end = think_end;
        r->sampling.thinking_budget = 5;
        r->sampling.logit_bias = {{think_end, -100.f}};
      }
      rs.push_back(r);
    }
    // Tool calls: tool_choice auto with a strict tool (a lazy grammar engaged by <tool_call>, its trigger and close
    // favoured so calls happen amid free text) and tool_choice required (engaged past the forced prefix, then another
    // call or the end): drafted while their grammar masks them, a draft </tool_call> releasing it as a sampled one.
    for (int t = 0; t < 2; ++t) {
      auto r = req(f.prompts.size() + size_t(t), f.prompts[size_t(t)], 80, temp);
      r->ignore_eos = false;
      r->sampling.masker = test::tiny_masker();
      r->sampling.grammar = t == 0 ? sampling::grammar_tool_call(tools, "", true) : sampling::grammar_tool_call(tools);
      r->sampling.grammar_trigger = tool_call;
      r->sampling.grammar_close = tool_call_end;
      if (t == 0) {
        r->sampling.grammar_lazy = true;
        r->sampling.logit_bias = {{tool_call, 30.f}, {tool_call_end, 30.f}};
      } else {
        r->sampling.grammar_prefix = "\n<function=";
        r->sampling.after_close = sampling::SamplingParams::AfterClose::kCallOrEnd;
        r->sampling.logit_bias = {{tool_call_end, 30.f}};
      }
      rs.push_back(r);
    }
    // allowed_token_ids: a mask, no grammar (the end ids among them). Every 5th id: with every 7th, the 30th token is a
    // near tie (logits 2.170714 / 2.170709) that a verify's rows, computed together, break the other way.
    auto r = req(f.prompts.size() + 2, f.prompts[2], 40, temp);
    r->ignore_eos = false;
    for (int32_t id = 0; id < 2000; id += 5) r->sampling.allowed_ids.push_back(id);
    r->sampling.allowed_ids.push_back(1986);
    rs.push_back(r);
    return rs;
  };
  // The text after the think block (if any) is a prefix of the grammar's language, complete when the output stopped.
  auto check = [&](const std::vector<Out>& outs, const std::vector<std::shared_ptr<Request>>& rs, const char* what) {
    for (size_t i = 0; i < outs.size(); ++i) {
      ASSERT_NE(outs[i].finish, FinishReason::Error) << what << " request " << i << ": " << outs[i].error;
      if (!rs[i]->sampling.grammar) {
        for (int32_t t : outs[i].tokens) EXPECT_TRUE(t == 1986 || t % 5 == 0) << what << " request " << i << ": " << t;
        continue;
      }
      if (rs[i]->sampling.grammar_trigger >= 0) continue;  // tool calls: the engine's own checks (accept) held
      auto t = outs[i].tokens;
      if (auto at = std::find(t.begin(), t.end(), think_end); rs[i]->sampling.think_end >= 0 && at != t.end())
        t.erase(t.begin(), at + 1);
      if (!t.empty() && (t.back() == 1984 || t.back() == 1986)) t.pop_back();
      sampling::Matcher m(rs[i]->sampling.grammar);
      ASSERT_TRUE(m.advance(test::text_of(t))) << what << " request " << i << ": " << test::text_of(t);
      if (outs[i].finish == FinishReason::Stop) EXPECT_TRUE(m.accepting()) << what << " request " << i;
    }
  };
  std::vector<std::vector<int32_t>> prompts = f.prompts;  // by request id (the oracle's index)
  prompts.push_back(f.prompts[0]);
  prompts.push_back(f.prompts[1]);
  prompts.push_back(f.prompts[2]);
  const auto greedy = make(0.f);
  const auto want = run_all(*f.m, config(0), greedy);
  check(want, greedy, "plain");
  const size_t nt = f.prompts.size();
  EXPECT_NE(std::find(want[nt].tokens.begin(), want[nt].tokens.end(), tool_call), want[nt].tokens.end())
      << "the auto request calls its tool";
  for (int64_t K : {1, 3}) {
    EngineConfig c = config(K);
    auto drafted = std::make_shared<std::set<uint64_t>>();  // ids the hook was asked to draft for
    c.draft_hook = [drafted, o = oracle(want, prompts, uint64_t(K), 7)](uint64_t id, int64_t index, int32_t proposed) {
      drafted->insert(id);
      return o(id, index, proposed);
    };
    // Greedy: verified on the device (Backend::sample_rows with each row's mask; the masks made ahead on the workers
    // or on the engine thread) and on the host (verify_draft), the same tokens.
    for (int path = 0; path < 3; ++path) {
      SCOPED_TRACE(path == 0 ? "device, masks ahead" : path == 1 ? "device, serial masks" : "host");
      EngineConfig cp = c;
      cp.parallel_masks = path != 1;
      cp.device_sampling = path != 2;
      drafted->clear();
      runtime::EngineMetrics m;
      const auto rs = make(0.f);
      const auto got = run_all(*f.m, cp, rs, &m);
      for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(got[i].tokens, want[i].tokens) << "K=" << K << " request " << i;
      check(got, rs, "greedy speculated");
      check_counters(m, K);
      EXPECT_GT(m.spec_accepted_tokens_total, 0) << "the constrained requests' drafts were verified and accepted";
      for (uint64_t id = 0; id < prompts.size(); ++id) EXPECT_TRUE(drafted->count(id)) << "request " << id << " drafted";
      // Every step on the device (the budget's forced </think> too).
      if (path < 2) EXPECT_EQ(m.device_sample_steps_total, m.steps_total);
      if (path == 0) EXPECT_GT(m.grammar_masks_ahead_total, 0);
      if (path == 0) EXPECT_EQ(m.grammar_masks_stale_total, 0);
    }
    // Sampled, with the same oracle: text of the grammar, counters consistent.
    runtime::EngineMetrics m;
    const auto sampled = make(0.8f);
    const auto s = run_all(*f.m, c, sampled, &m);
    check(s, sampled, "sampled speculated");
    check_counters(m, K);
  }
}

// A thinking budget under speculation: drafts stop short of the forced row (drafts_wanted), so the forced </think>
// lands at the same index and the greedy output (a min_tokens hold on an end id included) is the plain one.
TEST(SpecEngine, ThinkingBudgetAndMinTokensUnchangedBySpeculation) {
  Fixture& f = fixture("tiny-moe", "bf16");
  const int64_t N = 20;
  const int32_t think_end = 2009;  // </think> in the tiny vocabulary
  auto make = [&] {
    std::vector<std::shared_ptr<Request>> rs;
    for (size_t i = 0; i < f.prompts.size(); ++i) {
      auto r = req(i, f.prompts[i], N);
      r->sampling.think_end = think_end;
      r->sampling.thinking_budget = int64_t(3 + 2 * i);
      r->sampling.logit_bias = {{think_end, -100.f}};
      if (i == 0) {  // an end id the bias wants, held back for 12 tokens
        r->ignore_eos = false;
        r->stop_token_ids = {77};
        r->sampling.logit_bias.push_back({77, 100.f});
        r->sampling.min_tokens = 12;
      }
      rs.push_back(r);
    }
    return rs;
  };
  const auto want = run_all(*f.m, config(0), make());
  for (size_t i = 0; i < want.size(); ++i) {
    const auto& t = want[i].tokens;
    const int64_t at = int64_t(std::find(t.begin(), t.end(), think_end) - t.begin());
    EXPECT_EQ(at, int64_t(3 + 2 * i)) << "prompt " << i;
  }
  EXPECT_EQ(int64_t(want[0].tokens.size()), 12) << "min_tokens, then the stop id (not in the tokens)";
  for (int64_t K : {1, 3}) {
    EngineConfig c = config(K);
    c.draft_hook = oracle(want, f.prompts, uint64_t(K), 8);
    const auto got = run_all(*f.m, c, make());
    for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(got[i].tokens, want[i].tokens) << "K=" << K << " prompt " << i;
  }
}

// Verification on the backend (EngineConfig::device_verify: sample_rows' choice per verified row — greedy, or
// rejection sampling of its draft — compared with the drafts in the engine) decides exactly as verify_draft on the
// host, penalties and logit_bias included (row j's penalties see d_1..d_j), with acceptances and rejections from the
// oracle.
TEST(SpecEngine, DeviceVerifyEqualsHostVerify) {
  Fixture& f = fixture("tiny-moe", "bf16");
  const int64_t N = 18;
  auto make = [&] {
    std::vector<std::shared_ptr<Request>> rs;
    for (size_t i = 0; i < f.prompts.size(); ++i) {
      rs.push_back(req(i, f.prompts[i], N));
      if (i % 3 != 1) rs.back()->sampling.logprobs = i % 3 == 0 ? 4 : 0;  // of every emitted token, verified or not
      if (i % 2) {  // penalties and a bias: the edits of each verified row depend on the drafts before it
        auto& sp = rs.back()->sampling;
        sp.repetition_penalty = 1.3f;
        sp.presence_penalty = 0.4f;
        sp.frequency_penalty = 0.2f;
        sp.logit_bias = {{5, 2.0f}, {17, -1.5f}};
      }
    }
    return rs;
  };
  const auto want = run_all(*f.m, config(0), make());
  for (int64_t K : {1, 3}) {
    auto oracle = [&](EngineConfig c) {
      auto rng = std::make_shared<std::mt19937_64>(K);
      c.draft_hook = [&, rng](uint64_t id, int64_t index, int32_t proposed) {
        const auto& w = want[size_t(id)].tokens;
        const int64_t g = index - int64_t(f.prompts[size_t(id)].size());
        if (g < 0 || g >= int64_t(w.size())) return proposed;
        return ((*rng)() % 10) < 7 ? w[size_t(g)] : int32_t((w[size_t(g)] + 1 + (*rng)() % 100) % 2048);
      };
      return c;
    };
    EngineConfig dev = oracle(config(K)), host = oracle(config(K));
    host.device_verify = false;
    runtime::EngineMetrics md, mh;
    const auto a = run_all(*f.m, dev, make(), &md);
    const auto b = run_all(*f.m, host, make(), &mh);
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_EQ(a[i].tokens, want[i].tokens) << "device verify, K=" << K << " prompt " << i;
      EXPECT_EQ(b[i].tokens, want[i].tokens) << "host verify, K=" << K << " prompt " << i;
      // Logprobs: the device's (Backend::row_logprobs over the verified rows) equal the host's (verify_draft's) and,
      // within rounding (other batches), those without speculation.
      const size_t nl = i % 3 == 1 ? 0 : want[i].tokens.size();
      ASSERT_EQ(a[i].logprobs.size(), nl) << "K=" << K << " prompt " << i;
      ASSERT_EQ(b[i].logprobs.size(), nl);
      ASSERT_EQ(want[i].logprobs.size(), nl);
      for (size_t j = 0; j < nl; ++j) {
        const auto &d = a[i].logprobs[j], &h = b[i].logprobs[j], &w = want[i].logprobs[j];
        EXPECT_EQ(d.token, a[i].tokens[j]);
        EXPECT_EQ(h.token, d.token);
        EXPECT_NEAR(d.logprob, h.logprob, 1e-6) << "K=" << K << " prompt " << i << " token " << j;
        EXPECT_NEAR(d.logprob, w.logprob, 1e-4) << "K=" << K << " prompt " << i << " token " << j;
        ASSERT_EQ(d.top.size(), i % 3 == 0 ? 4u : 0u);
        ASSERT_EQ(h.top.size(), d.top.size());
        for (size_t q = 0; q < d.top.size(); ++q) {
          EXPECT_EQ(d.top[q].first, h.top[q].first);
          EXPECT_NEAR(d.top[q].second, h.top[q].second, 1e-6);
        }
      }
    }
    EXPECT_EQ(md.spec_accepted_tokens_total, mh.spec_accepted_tokens_total);
    EXPECT_EQ(md.spec_draft_tokens_total, mh.spec_draft_tokens_total);
    EXPECT_GT(md.spec_accepted_tokens_total, 0);
    EXPECT_LT(md.spec_accepted_tokens_total, md.spec_draft_tokens_total);
    EXPECT_GT(md.device_sample_steps_total, mh.device_sample_steps_total);  // the verify steps
    // Sampled requests: rejection sampling on the backend (each row's draft, u and u2) draws exactly what verify_draft
    // draws on the host, one uniform per row and one more at a rejection: the same tokens and logprobs, and every
    // step of the device run samples there.
    auto sampled = [&] {
      auto rs = make();
      for (size_t i = 0; i < rs.size(); ++i) {
        auto& sp = rs[i]->sampling;
        sp.temperature = 0.05f + 0.05f * float(i % 3);  // peaked: the oracle's greedy drafts are often accepted
        if (i % 2 == 0) sp.top_p = 0.9f;
        if (i % 3 == 2) sp.top_k = 30;
      }
      return rs;
    };
    runtime::EngineMetrics sd, sh;
    const auto sa = run_all(*f.m, dev, sampled(), &sd);
    const auto sb = run_all(*f.m, host, sampled(), &sh);
    for (size_t i = 0; i < sa.size(); ++i) {
      EXPECT_EQ(sa[i].tokens, sb[i].tokens) << "sampled, K=" << K << " prompt " << i;
      EXPECT_EQ(int64_t(sa[i].tokens.size()), N);
      ASSERT_EQ(sa[i].logprobs.size(), sb[i].logprobs.size());
      for (size_t j = 0; j < sa[i].logprobs.size(); ++j) EXPECT_NEAR(sa[i].logprobs[j].logprob, sb[i].logprobs[j].logprob, 1e-6);
    }
    EXPECT_EQ(sd.spec_accepted_tokens_total, sh.spec_accepted_tokens_total);
    EXPECT_GT(sd.spec_accepted_tokens_total, 0);
    EXPECT_LT(sd.spec_accepted_tokens_total, sd.spec_draft_tokens_total);
    EXPECT_EQ(sd.device_sample_steps_total, sd.steps_total);
    EXPECT_LT(sh.device_sample_steps_total, sh.steps_total);  // the verify steps on the host
  }
}

TEST(SpecEngine, MaxTokensStopTokensAndPreemption) {
  Fixture& f = fixture("tiny-moe", "bf16");
  const auto& p = f.prompts[2];
  const auto want = run_all(*f.m, config(0), {req(0, p, 12)})[0].tokens;
  ASSERT_EQ(want.size(), 12u);
  // max_tokens 1..6 with K = 4: exactly max_tokens tokens, the prefix of the plain output.
  for (int64_t mt = 1; mt <= 6; ++mt) {
    auto o = run_all(*f.m, config(4), {req(0, p, mt)})[0];
    EXPECT_EQ(o.finish, FinishReason::Length);
    EXPECT_EQ(o.completion_tokens, mt);
    EXPECT_EQ(o.tokens, std::vector<int32_t>(want.begin(), want.begin() + mt)) << "max_tokens " << mt;
  }
  // A stop token in the middle: the same cut as without speculation, the stop token not reported.
  for (size_t at : {size_t(3), size_t(7)}) {
    auto r = req(0, p, 12);
    r->stop_token_ids = {want[at]};
    size_t first = std::find(want.begin(), want.end(), want[at]) - want.begin();
    auto o = run_all(*f.m, config(3), {r})[0];
    EXPECT_EQ(o.finish, FinishReason::Stop);
    EXPECT_EQ(o.stop_token, want[at]);
    EXPECT_EQ(o.tokens, std::vector<int32_t>(want.begin(), want.begin() + first));
    EXPECT_EQ(o.completion_tokens, int64_t(first + 1));
  }
  // A KV pool too small for everyone: preemption (recompute) keeps the outputs identical.
  std::vector<std::shared_ptr<Request>> a, b;
  for (size_t i = 0; i < 4; ++i) {
    a.push_back(req(i, f.prompts[i], 16));
    b.push_back(req(i, f.prompts[i], 16));
  }
  EngineConfig c0 = config(0), c3 = config(3);
  c0.num_blocks = c3.num_blocks = 16;  // 256 tokens for prompts of 1 + 9 + 40 + 150 and 64 generated
  runtime::EngineMetrics m;
  const auto plain = run_all(*f.m, c0, a), spec = run_all(*f.m, c3, b, &m);
  EXPECT_GT(m.preemptions_total, 0);
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(spec[i].tokens, plain[i].tokens) << "prompt " << i;
}

// Prompt logprobs come from the forward's final-norm hiddens, which a speculating engine asks of every row anyway: the
// same values (within rounding), ranks and alternatives with K = 3 as without, chunked beside speculating decodes.
TEST(SpecEngine, PromptLogprobsUnchangedBySpeculation) {
  Fixture& f = fixture("tiny-moe", "bf16");
  auto lps = [&](int64_t K) {
    std::vector<std::shared_ptr<Request>> rs;
    for (size_t i = 0; i < 4; ++i) {
      rs.push_back(req(i, f.prompts[i], 10));
      if (i != 1) rs.back()->prompt_logprobs = 3;
    }
    Engine e(*f.m, config(K));
    for (auto& r : rs) e.submit(r);
    while (e.step()) {
    }
    std::vector<std::vector<sampling::TokenLogprob>> out;
    for (auto& r : rs) {
      std::vector<sampling::TokenLogprob> v;
      while (auto d = r->out->pop(0ms))
        if (!d->prompt_logprobs.empty()) v = d->prompt_logprobs;
      out.push_back(v);
    }
    return out;
  };
  const auto plain = lps(0), spec = lps(3);
  for (size_t i = 0; i < 4; ++i) {
    ASSERT_EQ(plain[i].size(), i == 1 ? 0 : f.prompts[i].size() - 1) << "prompt " << i;
    ASSERT_EQ(spec[i].size(), plain[i].size()) << "prompt " << i;
    for (size_t j = 0; j < plain[i].size(); ++j) {
      EXPECT_EQ(spec[i][j].token, plain[i][j].token);
      // Within rounding: the chunks run beside other rows (verify rows) than without speculation.
      EXPECT_NEAR(spec[i][j].logprob, plain[i][j].logprob, 1e-4) << "prompt " << i << " row " << j;
      EXPECT_EQ(spec[i][j].rank, plain[i][j].rank);
      ASSERT_EQ(spec[i][j].top.size(), 3u);
      for (size_t q = 0; q < 3; ++q) {
        EXPECT_EQ(spec[i][j].top[q].first, plain[i][j].top[q].first);
        EXPECT_NEAR(spec[i][j].top[q].second, plain[i][j].top[q].second, 1e-4);
      }
    }
  }
}

TEST(SpecEngine, SamplingRunsAndCountersAddUp) {
  Fixture& f = fixture("tiny-dense", "bf16");
  std::vector<std::shared_ptr<Request>> rs;
  for (size_t i = 0; i < f.prompts.size(); ++i) rs.push_back(req(i, f.prompts[i], 16, 0.8f));
  runtime::EngineMetrics m;
  const auto out = run_all(*f.m, config(3), rs, &m);
  for (auto& o : out) {
    EXPECT_EQ(o.finish, FinishReason::Length);
    EXPECT_EQ(o.tokens.size(), 16u);
  }
  check_counters(m, 3);
  // Seeded sampling with speculation is reproducible.
  std::vector<std::shared_ptr<Request>> again;
  for (size_t i = 0; i < f.prompts.size(); ++i) again.push_back(req(i, f.prompts[i], 16, 0.8f));
  const auto out2 = run_all(*f.m, config(3), again);
  for (size_t i = 0; i < out.size(); ++i) EXPECT_EQ(out2[i].tokens, out[i].tokens);
  // Exported under vLLM's names.
  server::ServerMetrics sm;
  const std::string text = sm.render(m, "tiny");
  for (const char* name : {"deltaserve:spec_decode_num_drafts_total", "deltaserve:spec_decode_num_draft_tokens_total",
                           "deltaserve:spec_decode_num_accepted_tokens_total",
                           "deltaserve:spec_decode_num_accepted_tokens_per_pos{model_name=\"tiny\",position=\"2\"}"})
    EXPECT_NE(text.find(name), std::string::npos) << name;
}

TEST(SpecEngine, AbortMidSpeculationFreesEverything) {
  Fixture& f = fixture("tiny-moe", "int4");
  Engine e(*f.m, config(4));
  std::vector<std::shared_ptr<Request>> rs;
  for (size_t i = 0; i < 3; ++i) {
    rs.push_back(req(i, f.prompts[i], 40));
    e.submit(rs.back());
  }
  // Prefill and a few verify rounds, so drafts and spare slots are in use.
  for (int i = 0; i < 4; ++i) e.step();
  EXPECT_GT(e.metrics().spec_num_drafts_total, 0);
  EXPECT_EQ(e.metrics().slots_used, 3);
  for (auto& r : rs) e.abort(r->id);
  e.step();
  expect_empty(e.metrics());
  for (auto& r : rs) EXPECT_EQ(collect(*r).finish, FinishReason::Abort);
  // The engine serves the next request normally.
  auto r = req(9, f.prompts[1], 5);
  e.submit(r);
  while (e.step()) {
  }
  EXPECT_EQ(collect(*r).completion_tokens, 5);
  expect_empty(e.metrics());
}

// ---- reduced-vocabulary draft head -----------------------------------------------------------------------

std::unique_ptr<model::Model> load_with_draft_vocab(Backend& be, const std::string& family, const std::string& variant,
                                                    std::vector<int32_t> ids) {
  model::LoadOptions o;
  o.draft_vocab = std::move(ids);
  return model::Model::load(test::data_dir() + "/" + family + "/" + family + "-" + variant, be, nullptr, o);
}

// Every draft proposal of a run: (request, token index, proposed), through a hook that changes nothing.
using Proposals = std::vector<std::tuple<uint64_t, int64_t, int32_t>>;
EngineConfig recording(EngineConfig c, Proposals& out) {
  c.draft_hook = [&out](uint64_t id, int64_t index, int32_t proposed) {
    out.push_back({id, index, proposed});
    return proposed;
  };
  return c;
}

// Prefix caching under speculation: a checkpoint's blocks carry the MTP layer's KV of its positions too, so a request
// that resumes from one drafts exactly what it drafted the first time (every proposal the same), and the greedy
// output stays the plain run's.
TEST(SpecEngine, PrefixCachingKeepsOutputsAndProposals) {
  Fixture& f = fixture("tiny-moe", "bf16");
  const int64_t N = 12;
  auto make = [&](uint64_t base) {
    std::vector<std::shared_ptr<Request>> rs;
    for (size_t i = 0; i < f.prompts.size(); ++i) rs.push_back(req(base + i, f.prompts[i], N));
    return rs;
  };
  const auto want = run_all(*f.m, config(0), make(0));
  Proposals props;
  EngineConfig c = recording(config(2), props);
  c.prefix_cache_checkpoints = 8;
  Engine e(*f.m, c);
  std::vector<Proposals> rounds(2);
  for (int round = 0; round < 2; ++round) {
    props.clear();
    auto rs = make(uint64_t(round) * 100);
    for (auto& r : rs) e.submit(r);
    while (e.step()) {
    }
    for (size_t i = 0; i < rs.size(); ++i) EXPECT_EQ(collect(*rs[i]).tokens, want[i].tokens) << "round " << round << " prompt " << i;
    for (auto [id, index, p] : props) rounds[size_t(round)].push_back({id % 100, index, p});
    std::sort(rounds[size_t(round)].begin(), rounds[size_t(round)].end());
  }
  const runtime::EngineMetrics m = e.metrics();
  EXPECT_EQ(m.prefix_cache_hits_total, 32 + 144 + 320);  // the 40-, 150- and 333-token prompts' second round
  EXPECT_FALSE(rounds[0].empty());
  EXPECT_EQ(rounds[1], rounds[0]);
  expect_empty(m);
}

// A finished request's checkpoint under speculation: its state is rolled back to the tokens it kept where its last
// verify ran past them (the oracle's wrong drafts make that happen), and its MTP KV is filled up to its last token
// (fed the token after it: the stop token, or the next one of a length-limited answer). The next turn resumes
// after the answer, gets the plain greedy output, and proposes exactly what an engine without the cache proposes.
TEST(SpecEngine, FinishedRequestsResumeWithTheirDrafts) {
  Fixture& f = fixture("tiny-moe", "bf16");
  const int64_t N = 12;
  // Round 1 stops each answer at a stop token: the first of its greedy tokens from the 7th on that did not occur
  // before (so the answer is the tokens before it).
  const auto full = run_all(*f.m, config(0), [&] {
    std::vector<std::shared_ptr<Request>> rs;
    for (size_t i = 0; i < f.prompts.size(); ++i) rs.push_back(req(i, f.prompts[i], N));
    return rs;
  }());
  std::vector<int64_t> stop_at;
  for (auto& o : full) {
    size_t k = 6;
    while (k < o.tokens.size() && std::find(o.tokens.begin(), o.tokens.begin() + std::ptrdiff_t(k), o.tokens[k]) !=
                                      o.tokens.begin() + std::ptrdiff_t(k))
      ++k;
    ASSERT_LT(k, o.tokens.size());
    stop_at.push_back(int64_t(k));
  }
  auto first = [&] {
    std::vector<std::shared_ptr<Request>> rs;
    for (size_t i = 0; i < f.prompts.size(); ++i) {
      rs.push_back(req(i, f.prompts[i], N));
      rs.back()->stop_token_ids = {full[i].tokens[size_t(stop_at[i])]};
    }
    return rs;
  };
  const auto want1 = run_all(*f.m, config(0), first());
  for (size_t i = 0; i < want1.size(); ++i) ASSERT_EQ(int64_t(want1[i].tokens.size()), stop_at[i]);
  auto second = [&] {  // the answer and its stop token, then a new message
    std::vector<std::shared_ptr<Request>> rs;
    for (size_t i = 0; i < f.prompts.size(); ++i) {
      std::vector<int32_t> p = f.prompts[i];
      p.insert(p.end(), want1[i].tokens.begin(), want1[i].tokens.end());
      p.push_back(want1[i].stop_token);
      p.insert(p.end(), f.prompts[4].begin() + std::ptrdiff_t(10 * i), f.prompts[4].begin() + std::ptrdiff_t(10 * i + 7));
      rs.push_back(req(100 + i, p, N));
    }
    return rs;
  };
  const auto want2 = run_all(*f.m, config(0), second());
  Proposals fresh;
  run_all(*f.m, recording(config(2), fresh), second());
  std::sort(fresh.begin(), fresh.end());

  // Round 1 through the oracle (wrong drafts 30% of the time), always wrong where the stop token comes: the target
  // samples it in place of a draft, so the last verify ran past the kept tokens and is rolled back. Round 2 is
  // recorded as it is.
  // The device slots, then one device slot and host memory (--cache-ram): the same outputs, hits and proposals.
  for (int64_t host : {0, 16}) {
    SCOPED_TRACE(host);
    Proposals props;
    EngineConfig c = config(2);
    c.prefix_cache_checkpoints = host ? 1 : 16;  // one device slot: the checkpoints wait in host memory
    c.prefix_cache_host_checkpoints = host;
    auto oracle1 = oracle(full, f.prompts, 3, 7);
    c.draft_hook = [&](uint64_t id, int64_t index, int32_t proposed) {
      if (id >= 100) {
        props.push_back({id, index, proposed});
        return proposed;
      }
      if (index - int64_t(f.prompts[size_t(id)].size()) == stop_at[size_t(id)]) return int32_t(7);
      return oracle1(id, index, proposed);
    };
    Engine e(*f.m, c);
    auto r1 = first();
    for (auto& r : r1) e.submit(r);
    while (e.step()) {
    }
    for (size_t i = 0; i < r1.size(); ++i) EXPECT_EQ(collect(*r1[i]).tokens, want1[i].tokens) << "prompt " << i;
    const int64_t hits_before = e.metrics().prefix_cache_hits_total;
    auto r2 = second();
    for (auto& r : r2) e.submit(r);
    while (e.step()) {
    }
    for (size_t i = 0; i < r2.size(); ++i) EXPECT_EQ(collect(*r2[i]).tokens, want2[i].tokens) << "prompt " << i;
    // Every answer of 16 tokens or more with its prompt was resumed after.
    int64_t want_hits = 0;
    for (size_t i = 0; i < f.prompts.size(); ++i) {
      const int64_t ran = int64_t(f.prompts[i].size()) + stop_at[i];
      want_hits += ran >= 16 ? ran : 0;
    }
    EXPECT_EQ(e.metrics().prefix_cache_hits_total - hits_before, want_hits);
    std::sort(props.begin(), props.end());
    EXPECT_FALSE(props.empty());
    EXPECT_EQ(props, fresh);
    expect_empty(e.metrics());
  }
}

// The draft head over the N lowest ids (the default choice): greedy output identical to no speculation for
// K = 1..4, every proposal inside the subset.
TEST(SpecReducedDraft, GreedyOutputUnchangedAndProposalsInTheSubset) {
  for (const char* variant : {"bf16", "int4"}) {
    Fixture& f = fixture("tiny-moe", variant);
    const int64_t N = 300;
    auto m = load_with_draft_vocab(*f.be, "tiny-moe", variant, runtime::draft_vocab_ids(N, "", 2048));
    ASSERT_EQ(int64_t(m->draft_vocab().size()), N);
    auto make = [&] {
      std::vector<std::shared_ptr<Request>> rs;
      for (size_t i = 0; i < f.prompts.size(); ++i) rs.push_back(req(i, f.prompts[i], 14));
      return rs;
    };
    const auto want = run_all(*m, config(0), make());
    for (int64_t K : {1, 4}) {  // the ends of 1..4 (SpecGreedy covers every K with the full head); CI time
      EngineConfig c = config(K);
      c.draft_vocab_size = N;
      Proposals props;
      runtime::EngineMetrics mt;
      const auto got = run_all(*m, recording(c, props), make(), &mt);
      for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(got[i].tokens, want[i].tokens) << variant << " K=" << K << " prompt " << i;
      check_counters(mt, K);
      ASSERT_FALSE(props.empty());
      for (auto& [id, index, d] : props) EXPECT_TRUE(d >= 0 && d < N) << "proposal " << d << " outside the subset";
      std::printf("  %s N=%lld K=%lld: drafted %lld, accepted %lld\n", variant, (long long)N, (long long)K,
                  (long long)mt.spec_draft_tokens_total, (long long)mt.spec_accepted_tokens_total);
    }
  }
}

// A "reduced" head over every id in reverse order is the full head with its columns permuted: the same proposals
// and the same acceptance as the full lm_head (so the column -> token mapping is right), output unchanged.
TEST(SpecReducedDraft, PermutedFullVocabularyProposesWhatTheFullHeadProposes) {
  Fixture& f = fixture("tiny-dense", "bf16");
  std::vector<int32_t> rev(2048);
  for (int32_t i = 0; i < 2048; ++i) rev[size_t(i)] = 2047 - i;
  auto m = load_with_draft_vocab(*f.be, "tiny-dense", "bf16", rev);
  auto make = [&] {
    std::vector<std::shared_ptr<Request>> rs;
    for (size_t i = 0; i < f.prompts.size(); ++i) rs.push_back(req(i, f.prompts[i], 12));
    return rs;
  };
  for (int64_t K : {1, 3}) {
    Proposals full, red;
    runtime::EngineMetrics mf, mr;
    const auto a = run_all(*m, recording(config(K), full), make(), &mf);
    EngineConfig c = config(K);
    c.draft_vocab_size = 2048;
    const auto b = run_all(*m, recording(c, red), make(), &mr);
    ASSERT_FALSE(full.empty());
    EXPECT_EQ(red, full) << "K=" << K;
    EXPECT_EQ(mr.spec_accepted_tokens_total, mf.spec_accepted_tokens_total);
    EXPECT_EQ(mr.spec_draft_tokens_total, mf.spec_draft_tokens_total);
    for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(b[i].tokens, a[i].tokens);
  }
}

// The benchmark's configuration: the oracle on top of the reduced head. Drafts are the target's tokens with
// probability 0.8, so about 80% of first drafts are accepted, and the output is still the plain one.
TEST(SpecReducedDraft, OracleAcceptanceAsExpected) {
  Fixture& f = fixture("tiny-moe", "bf16");
  auto m = load_with_draft_vocab(*f.be, "tiny-moe", "bf16", runtime::draft_vocab_ids(64, "", 2048));
  const int64_t N = 40;
  auto make = [&] {
    std::vector<std::shared_ptr<Request>> rs;
    for (size_t i = 0; i < f.prompts.size(); ++i) rs.push_back(req(i, f.prompts[i], N));
    return rs;
  };
  const auto want = run_all(*m, config(0), make());
  EngineConfig c = config(2);
  c.draft_vocab_size = 64;
  std::mt19937_64 rng(5);
  c.draft_hook = [&](uint64_t id, int64_t index, int32_t proposed) {
    const auto& w = want[size_t(id)].tokens;
    const int64_t g = index - int64_t(f.prompts[size_t(id)].size());
    if (g < 0 || g >= int64_t(w.size())) return proposed;
    return (rng() % 10) < 8 ? w[size_t(g)] : int32_t((w[size_t(g)] + 1 + rng() % 100) % 2048);
  };
  runtime::EngineMetrics mt;
  const auto got = run_all(*m, c, make(), &mt);
  for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(got[i].tokens, want[i].tokens) << "prompt " << i;
  check_counters(mt, 2);
  const double first = double(mt.spec_accepted_per_pos[0]) / double(mt.spec_num_drafts_total);
  std::printf("  first-draft acceptance %.3f over %lld rounds\n", first, (long long)mt.spec_num_drafts_total);
  EXPECT_NEAR(first, 0.8, 0.12);
}

TEST(SpecReducedDraft, VocabularyChoiceAndValidation) {
  EXPECT_EQ(runtime::draft_vocab_ids(3, "", 10), (std::vector<int32_t>{0, 1, 2}));
  EXPECT_THROW(runtime::draft_vocab_ids(0, "", 10), Error);
  EXPECT_THROW(runtime::draft_vocab_ids(11, "", 10), Error);
  const std::string path = ::testing::TempDir() + "draft_vocab_" + std::to_string(::getpid()) + ".txt";
  auto write = [&](const char* text) {
    std::ofstream(path) << text;
  };
  write("7, 3 9\n1");
  EXPECT_EQ(runtime::draft_vocab_ids(0, path, 10), (std::vector<int32_t>{7, 3, 9, 1}));
  EXPECT_EQ(runtime::draft_vocab_ids(2, path, 10), (std::vector<int32_t>{7, 3}));
  EXPECT_THROW(runtime::draft_vocab_ids(5, path, 10), Error);  // fewer ids than asked for
  write("7 3 7");
  EXPECT_THROW(runtime::draft_vocab_ids(0, path, 10), Error);  // listed twice
  write("7 x");
  EXPECT_THROW(runtime::draft_vocab_ids(0, path, 10), Error);
  write("10");
  EXPECT_THROW(runtime::draft_vocab_ids(0, path, 10), Error);  // outside the vocabulary
  EXPECT_THROW(runtime::draft_vocab_ids(0, path + ".missing", 10), Error);
  std::remove(path.c_str());
  // The engine's draft_vocab_size must match the loaded head; the loader checks the ids.
  Fixture& f = fixture("tiny-moe", "bf16");
  EngineConfig c = config(2);
  c.draft_vocab_size = 16;
  EXPECT_THROW(Engine(*f.m, c), Error);  // no reduced head loaded
  auto m = load_with_draft_vocab(*f.be, "tiny-moe", "bf16", runtime::draft_vocab_ids(8, "", 2048));
  EXPECT_THROW(Engine(*m, c), Error);  // 8, not 16
  c.draft_vocab_size = 8;
  EXPECT_NO_THROW(Engine(*m, c));
  c.num_speculative_tokens = 0;
  EXPECT_THROW(Engine(*m, c), Error);  // a draft head without speculation
  EXPECT_THROW(load_with_draft_vocab(*f.be, "tiny-moe", "bf16", {1, 2, 1}), Error);
  EXPECT_THROW(load_with_draft_vocab(*f.be, "tiny-moe", "bf16", {2048}), Error);
}

// ---- rollback: replaying the logged DeltaNet inputs -------------------------------------------------------

// Every linear-attention layer's state of `slot` (conv window + recurrent state), on the host.
std::vector<float> slot_state(model::Model& m, model::ModelCaches& c, int32_t slot) {
  std::vector<float> out;
  for (auto& s : c.state) {
    if (!s.conv.defined() || s.conv.numel() == 0) continue;
    for (const Tensor& t : {s.conv.rows(slot, slot + 1), s.ssm.rows(slot, slot + 1)}) {
      auto v = m.backend().to_host_f32(t);
      out.insert(out.end(), v.begin(), v.end());
    }
  }
  return out;
}

// Model::replay_deltanet: a verify of [t, d_1..d_k] logs each DeltaNet layer's inputs; replaying the first a + 1
// logged rows from the snapshot gives the state that a forward of those a + 1 tokens from the snapshot gives (the
// engine's rollback before the log), bit for bit on the CPU for a + 1 >= 2 (each row's inputs are computed the same
// way in the longer verify), and all k + 1 rows give the verify's own state. One sequence logged away from its
// batch rows (copied into the log), then two logged at their batch rows (written in place) and replayed together
// with rejected rows between them, eagerly and through graph_run.
TEST(SpecRollback, ReplayGivesTheStateOfTheAcceptedRows) {
  Fixture& f = fixture("tiny-moe", "bf16");
  model::Model& m = *f.m;
  const int64_t R = 10;
  model::ModelCaches c = m.alloc_caches(8, 16, 8, R);
  ASSERT_EQ(c.gdn_log.rows, R);
  runtime::SeqCache A, B;  // slots 0 and 1; slots 2.. hold snapshots and scratch states
  A.slot = 0, A.blocks = {0, 1, 2};
  B.slot = 1, B.blocks = {3, 4, 5};
  auto forward = [&](std::vector<std::pair<const runtime::SeqCache*, std::vector<int32_t>>> parts,
                     std::vector<int64_t> log_rows = {}) {
    BatchMeta b = runtime::make_batch(parts);
    for (size_t i = 0; i < log_rows.size(); ++i) b.seqs[i].log_row = log_rows[i];
    m.forward(b, c, {0});
  };
  const std::vector<int32_t> pa = f.prompts[1];  // 9 tokens
  const std::vector<int32_t> pb(f.prompts[2].begin(), f.prompts[2].begin() + 13);
  forward({{&A, pa}, {&B, pb}});
  A.len = int64_t(pa.size());
  B.len = int64_t(pb.size());
  const std::vector<int32_t> va = {5, 17, 300, 41}, vb = {9, 1000, 77};
  // The reference: `n` tokens of `v` run through the whole model from the snapshot in `snap`, on slot `dst`.
  auto reference = [&](const runtime::SeqCache& s, int32_t snap, int32_t dst, const std::vector<int32_t>& v,
                       int64_t n) {
    m.copy_slot(c, dst, snap);
    runtime::SeqCache r = s;
    r.slot = dst;
    forward({{&r, std::vector<int32_t>(v.begin(), v.begin() + n)}});
    return slot_state(m, c, dst);
  };
  auto replay = [&](std::vector<std::tuple<int32_t, int32_t, int64_t, int64_t>> seqs, bool graphed) {
    BatchMeta b;  // (snapshot, slot, rows, log row)
    for (auto [snap, slot, n, row] : seqs) {
      m.copy_slot(c, slot, snap);
      BatchMeta::Seq q;
      q.state_slot = slot;
      q.q_len = n;
      q.log_row = row;
      b.seqs.push_back(q);
    }
    m.replay_deltanet(b, c, graphed);
  };

  // One sequence, logged at rows 6..9 of the log (batch rows 0..3): copied.
  m.copy_slot(c, 2, A.slot);  // the snapshot
  forward({{&A, va}}, {6});
  const auto verified = slot_state(m, c, A.slot);
  for (int64_t n = 1; n <= 4; ++n) {
    const auto want = reference(A, 2, 3, va, n);
    replay({{2, 4, n, 6}}, false);
    const auto got = slot_state(m, c, 4);
    if (n > 1) {
      EXPECT_EQ(got, want) << "rows " << n;
    } else {  // a 1-token forward runs the recurrent form, the verify (whose inputs the replay reads) the chunked one
      ASSERT_EQ(got.size(), want.size());
      for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], want[i], 1e-4) << i;
    }
    if (n == 4) {
      EXPECT_EQ(want, verified);
    }
  }
  EXPECT_THROW(replay({{2, 4, 5, 6}}, false), Error);  // past the log's end

  // Two sequences, logged at their batch rows (A 0..3, B 4..6); A keeps 2 rows, B all 3 (rows 2, 3 left out).
  m.copy_slot(c, A.slot, 2);
  m.copy_slot(c, 5, B.slot);
  forward({{&A, va}, {&B, vb}}, {0, 4});
  const auto verified_b = slot_state(m, c, B.slot);
  const auto want_a = reference(A, 2, 3, va, 2), want_b = reference(B, 5, 6, vb, 3);
  EXPECT_EQ(want_b, verified_b);
  for (bool graphed : {false, true, true}) {
    replay({{2, 4, 2, 0}, {5, 7, 3, 4}}, graphed);
    EXPECT_EQ(slot_state(m, c, 4), want_a) << "graphed " << graphed;
    EXPECT_EQ(slot_state(m, c, 7), want_b) << "graphed " << graphed;
  }
}

// ---- step graphs ------------------------------------------------------------------------------------------

// EngineConfig::step_graphs runs decode/verify steps through Model::forward_graphed and drafts through
// mtp_forward_graphed (every row a logit row, drafting rows picked afterwards). On the CPU graph_run runs the same
// code eagerly, so this checks that path's plumbing against the plain one: with an oracle (so drafts are accepted,
// partly rejected, and batches mix sequences with different accepted counts) the same tokens, the same proposals
// and the same counters, for the full and the reduced draft head. The graphed run without the device draft feed
// (the oracle's replaced tokens then feed the chained steps, as in the eager run); with the feed (chained steps fed
// the MTP's own proposals on the device) the output is still the plain one, and with a hook that replaces nothing
// the proposals are the eager run's.
TEST(SpecGraphs, GraphedAndEagerStepsAgree) {
  Fixture& f = fixture("tiny-moe", "int4");
  auto m = load_with_draft_vocab(*f.be, "tiny-moe", "int4", runtime::draft_vocab_ids(512, "", 2048));
  auto make = [&] {
    std::vector<std::shared_ptr<Request>> rs;
    for (size_t i = 0; i < f.prompts.size(); ++i) rs.push_back(req(i, f.prompts[i], 16));
    return rs;
  };
  const auto want = run_all(*m, config(0), make());
  for (int64_t K : {3})  // several drafts per step (K = 1 is covered by SpecGreedy); CI time
    for (int64_t dv : {int64_t(0), int64_t(512)}) {
      std::vector<Proposals> props(3);
      std::vector<std::vector<Out>> outs;
      std::vector<runtime::EngineMetrics> ms(3);
      for (int g = 0; g < 3; ++g) {  // eager, graphed, graphed with the device draft feed
        EngineConfig c = config(K);
        c.step_graphs = g >= 1;
        c.spec_step_graphs = g >= 1;
        c.device_draft_feed = g == 2;
        c.draft_vocab_size = dv;
        auto rng = std::make_shared<std::mt19937_64>(K * 10 + dv);
        Proposals* rec = &props[size_t(g)];
        c.draft_hook = [&, rng, rec](uint64_t id, int64_t index, int32_t proposed) {
          rec->push_back({id, index, proposed});
          const auto& w = want[size_t(id)].tokens;
          const int64_t i = index - int64_t(f.prompts[size_t(id)].size());
          if (i < 0 || i >= int64_t(w.size())) return proposed;
          return ((*rng)() % 10) < 7 ? w[size_t(i)] : proposed;
        };
        outs.push_back(run_all(*m, c, make(), &ms[size_t(g)]));
      }
      for (size_t i = 0; i < want.size(); ++i) {
        EXPECT_EQ(outs[1][i].tokens, outs[0][i].tokens) << "K=" << K << " draft vocab " << dv << " prompt " << i;
        EXPECT_EQ(outs[1][i].tokens, want[i].tokens);
      }
      EXPECT_EQ(props[1], props[0]) << "K=" << K << " draft vocab " << dv;
      EXPECT_EQ(ms[1].spec_accepted_per_pos, ms[0].spec_accepted_per_pos);
      EXPECT_EQ(ms[1].steps_total, ms[0].steps_total);
      EXPECT_GT(ms[1].spec_accepted_tokens_total, 0);
      for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(outs[2][i].tokens, want[i].tokens) << "fed, prompt " << i;
      check_counters(ms[2], K);
      EXPECT_GT(ms[2].spec_accepted_tokens_total, 0);
      // A hook that replaces nothing: the fed chain sees the tokens the stepwise one does.
      Proposals eager, fed;
      EngineConfig c = config(K);
      c.draft_vocab_size = dv;
      c.step_graphs = c.spec_step_graphs = false;
      run_all(*m, recording(c, eager), make());
      c.step_graphs = c.spec_step_graphs = true;
      const auto o = run_all(*m, recording(c, fed), make());
      EXPECT_EQ(fed, eager) << "K=" << K << " draft vocab " << dv;
      for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(o[i].tokens, want[i].tokens);
    }
}

TEST(SpecEngine, RejectsSpeculationWithoutAnMtpHead) {
  Fixture& f = fixture("tiny-moe", "bf16");
  auto be = make_cpu_backend();
  model::LoadOptions o;
  o.mtp = false;
  auto m = model::Model::load(test::data_dir() + "/tiny-moe/tiny-moe-bf16", *be, nullptr, o);
  EXPECT_THROW(Engine(*m, config(2)), Error);
  EXPECT_THROW(Engine(*f.m, config(17)), Error);
}

}  // namespace
}  // namespace ds
