// The engine on the tiny MoE model (int4, CPU backend): greedy output equals the transformers reference;
// continuous batching, chunked prefill, preemption and concurrent submitters give every request the tokens
// it gets alone; finish reasons, aborts, rejected requests, and a failing request that fails alone.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <thread>
#include <tuple>

#include <nlohmann/json.hpp>

#include "backend/forwarding.h"
#include "backend/ops.h"
#include "core/status.h"
#include "golden_util.h"
#include "masker_util.h"
#include "model/model.h"
#include "runtime/cache.h"
#include "runtime/engine.h"
#include "sampling/grammar.h"
#include "text/tokenizer.h"

namespace ds::runtime {
namespace {

using namespace std::chrono_literals;

struct Fixture {
  std::unique_ptr<Backend> be;
  std::unique_ptr<model::Model> m;
  std::vector<std::vector<int32_t>> prompts, greedy;  // golden text.int4[i]
};

Fixture& fx() {
  static Fixture f = [] {
    Fixture f;
    const std::string dir = test::data_dir() + "/tiny-moe/";
    f.be = make_cpu_backend();
    f.m = model::Model::load(dir + "tiny-moe-int4", *f.be);
    auto g = test::read_json(dir + "golden.json");
    for (auto& p : g["text"]["int4"]) {
      f.prompts.push_back(p["prompt"].get<std::vector<int32_t>>());
      f.greedy.push_back(p["greedy"].get<std::vector<int32_t>>());
    }
    return f;
  }();
  return f;
}

EngineConfig base_config() {
  EngineConfig c;
  c.max_num_seqs = 8;
  c.max_num_batched_tokens = 2048;
  c.max_model_len = 512;
  c.block_size = 16;
  c.eos_token_ids = {1984, 1986};  // <|endoftext|>, <|im_end|>
  return c;
}

std::shared_ptr<Request> make_req(uint64_t id, std::vector<int32_t> prompt, int64_t max_tokens, float temperature = 0.f,
                                  std::optional<uint64_t> seed = std::nullopt) {
  auto r = std::make_shared<Request>();
  r->id = id;
  r->prompt = std::move(prompt);
  r->max_tokens = max_tokens;
  r->sampling.temperature = temperature;
  r->sampling.seed = seed;
  if (temperature > 0) {
    r->sampling.top_k = 50;
    r->sampling.top_p = 0.95f;
  }
  return r;
}

struct Result {
  std::vector<int32_t> tokens;
  std::vector<sampling::TokenLogprob> logprobs;
  std::vector<sampling::TokenLogprob> prompt_logprobs;
  int prompt_logprob_deltas = 0;  // deltas that carried prompt logprobs
  FinishReason finish = FinishReason::None;
  int32_t stop_token = -1;
  std::string error;
  int64_t prompt_tokens = 0, completion_tokens = 0, cached_tokens = 0;
  int deltas = 0;
};

// Reads a request's channel until its finishing delta (or the timeout).
Result collect(Request& r, std::chrono::milliseconds timeout = 120000ms) {
  Result res;
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (res.finish == FinishReason::None) {
    auto d = r.out->pop(timeout.count() ? 10ms : 0ms);
    if (!d) {
      if (std::chrono::steady_clock::now() >= deadline) break;
      continue;
    }
    ++res.deltas;
    res.tokens.insert(res.tokens.end(), d->tokens.begin(), d->tokens.end());
    res.logprobs.insert(res.logprobs.end(), d->logprobs.begin(), d->logprobs.end());
    if (!d->prompt_logprobs.empty()) {
      ++res.prompt_logprob_deltas;
      res.prompt_logprobs = d->prompt_logprobs;
    }
    res.finish = d->finish;
    res.stop_token = d->stop_token;
    res.error = d->error;
    res.prompt_tokens = d->prompt_tokens;
    res.completion_tokens = d->completion_tokens;
    res.cached_tokens = d->cached_tokens;
  }
  return res;
}

// Runs steps on the calling thread until the engine has nothing left.
int64_t drain(Engine& e) {
  int64_t steps = 0;
  while (e.step()) ++steps;
  return steps;
}

void expect_empty(const EngineMetrics& m) {
  EXPECT_EQ(m.running, 0);
  EXPECT_EQ(m.waiting, 0);
  EXPECT_EQ(m.kv_blocks_used, 0);
  EXPECT_EQ(m.slots_used, 0);
}

// One request on a fresh, unconstrained engine: the reference "alone" output.
Result run_alone(const Request& proto) {
  Engine e(*fx().m, base_config());
  auto r = std::make_shared<Request>(proto);
  r->out = std::make_shared<DeltaChannel>();
  e.submit(r);
  drain(e);
  return collect(*r, 0ms);
}

TEST(Engine, GreedyMatchesGoldenAlone) {
  auto& f = fx();
  for (size_t i = 0; i < f.prompts.size(); ++i) {
    auto res = run_alone(*make_req(i, f.prompts[i], 24));
    EXPECT_EQ(res.tokens, f.greedy[i]) << "prompt " << i;
    EXPECT_EQ(res.finish, FinishReason::Length);
    EXPECT_EQ(res.prompt_tokens, int64_t(f.prompts[i].size()));
    EXPECT_EQ(res.completion_tokens, 24);
    EXPECT_EQ(res.deltas, 24);  // one delta per generated token, the last one finishing
  }
}

TEST(Engine, GreedyMatchesGoldenBatchedAndChunked) {
  auto& f = fx();
  EngineConfig c = base_config();
  c.max_num_seqs = 3;             // two prompts wait for a slot
  c.max_num_batched_tokens = 40;  // the 150- and 333-token prompts prefill over many steps
  Engine e(*f.m, c);
  std::vector<std::shared_ptr<Request>> reqs;
  for (size_t i = 0; i < f.prompts.size(); ++i) {
    reqs.push_back(make_req(i, f.prompts[i], 24));
    e.submit(reqs.back());
  }
  EXPECT_EQ(e.metrics().waiting, int64_t(f.prompts.size()));
  const int64_t steps = drain(e);
  for (size_t i = 0; i < reqs.size(); ++i) {
    auto res = collect(*reqs[i], 0ms);
    EXPECT_EQ(res.tokens, f.greedy[i]) << "prompt " << i;
    EXPECT_EQ(res.finish, FinishReason::Length);
  }
  auto m = e.metrics();
  expect_empty(m);
  int64_t prompt_total = 0;
  for (auto& p : f.prompts) prompt_total += int64_t(p.size());
  EXPECT_EQ(m.prompt_tokens_total, prompt_total);
  EXPECT_EQ(m.generation_tokens_total, 24 * int64_t(f.prompts.size()));
  EXPECT_EQ(m.requests_finished[int(FinishReason::Length)], int64_t(f.prompts.size()));
  EXPECT_EQ(m.steps_total, steps);
  // 533 prompt tokens at 40 per step need at least 14 steps.
  EXPECT_GE(steps, prompt_total / 40);
}

// The 12-request mix used by the concurrency tests: golden prompts and slices of them, greedy and seeded
// sampling, different lengths.
std::vector<std::shared_ptr<Request>> mix12() {
  auto& f = fx();
  std::vector<std::shared_ptr<Request>> v;
  for (int i = 0; i < 12; ++i) {
    auto p = f.prompts[size_t(i % 5)];
    if (i >= 5) p.resize(p.size() > size_t(i) ? p.size() - size_t(i) : 1);  // distinct prompts
    const bool sampled = i % 3 == 1;
    v.push_back(make_req(uint64_t(100 + i), p, 8 + (i * 5) % 23, sampled ? 0.9f : 0.f,
                         sampled ? std::optional<uint64_t>(1000 + i) : std::nullopt));
  }
  return v;
}

// mix12()'s outputs, each request run alone (computed once).
const std::vector<Result>& mix12_alone() {
  static const std::vector<Result> v = [] {
    std::vector<Result> out;
    for (auto& r : mix12()) out.push_back(run_alone(*r));
    return out;
  }();
  return v;
}

TEST(Engine, ConcurrentSubmittersGetTheirAloneOutputs) {
  auto reqs = mix12();
  const auto& alone = mix12_alone();

  EngineConfig c = base_config();
  c.max_num_seqs = 4;
  c.max_num_batched_tokens = 64;
  Engine e(*fx().m, c);
  e.start();
  std::vector<Result> got(reqs.size());
  std::vector<std::thread> clients;
  for (int t = 0; t < 3; ++t)
    clients.emplace_back([&, t] {
      for (size_t i = size_t(t); i < reqs.size(); i += 3) e.submit(reqs[i]);
      for (size_t i = size_t(t); i < reqs.size(); i += 3) got[i] = collect(*reqs[i]);
    });
  for (auto& th : clients) th.join();
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(got[i].tokens, alone[i].tokens) << "request " << i;
    EXPECT_EQ(got[i].finish, alone[i].finish) << "request " << i;
    EXPECT_EQ(got[i].completion_tokens, alone[i].completion_tokens) << "request " << i;
  }
  // Gauges are published after the step that freed the last sequence.
  for (int i = 0; i < 200 && e.metrics().running + e.metrics().waiting > 0; ++i) std::this_thread::sleep_for(5ms);
  expect_empty(e.metrics());
  EXPECT_EQ(e.metrics().requests_finished[int(FinishReason::Length)] + e.metrics().requests_finished[int(FinishReason::Stop)],
            int64_t(reqs.size()));
  e.stop();
}

TEST(Engine, PreemptionKeepsOutputsIdentical) {
  auto reqs = mix12();
  const auto& alone = mix12_alone();

  EngineConfig c = base_config();
  c.max_num_seqs = 6;
  c.max_num_batched_tokens = 96;
  c.num_blocks = 26;  // 416 tokens: the largest request (333 + 8) fits alone, the mix does not
  Engine e(*fx().m, c);
  for (auto& r : reqs) e.submit(r);
  drain(e);
  for (size_t i = 0; i < reqs.size(); ++i) {
    auto res = collect(*reqs[i], 0ms);
    EXPECT_EQ(res.tokens, alone[i].tokens) << "request " << i;
    EXPECT_EQ(res.finish, alone[i].finish) << "request " << i;
  }
  auto m = e.metrics();
  std::printf("  preemptions: %lld in %lld steps\n", (long long)m.preemptions_total, (long long)m.steps_total);
  EXPECT_GT(m.preemptions_total, 0);
  expect_empty(m);
}

// Decode-only steps go through Model::forward_graphed (EngineConfig::step_graphs); prefill chunks and mixed
// batches stay eager. On the CPU backend forward_graphed runs the eager forward inside a step, so this checks
// the engine's routing (rows, batch, logits copy) and that the switch is honoured; tests/cuda/test_cuda_engine
// runs the same comparison with real CUDA graphs.
TEST(Engine, StepGraphsOnAndOffGiveIdenticalOutputs) {
  std::vector<std::vector<Result>> out(2);
  std::vector<int64_t> graph_steps(2), steps(2);
  for (int on = 0; on < 2; ++on) {
    auto reqs = mix12();
    EngineConfig c = base_config();
    c.max_num_seqs = 4;
    c.max_num_batched_tokens = 64;
    c.step_graphs = on == 1;
    Engine e(*fx().m, c);
    for (auto& r : reqs) e.submit(r);
    drain(e);
    for (auto& r : reqs) out[size_t(on)].push_back(collect(*r, 0ms));
    graph_steps[size_t(on)] = e.metrics().graph_steps_total;
    steps[size_t(on)] = e.metrics().steps_total;
    expect_empty(e.metrics());
  }
  const auto& alone = mix12_alone();
  for (size_t i = 0; i < out[0].size(); ++i) {
    EXPECT_EQ(out[1][i].tokens, out[0][i].tokens) << "request " << i;
    EXPECT_EQ(out[1][i].tokens, alone[i].tokens) << "request " << i;
    EXPECT_EQ(out[1][i].finish, out[0][i].finish) << "request " << i;
  }
  EXPECT_EQ(graph_steps[0], 0);
  EXPECT_GT(graph_steps[1], 0);
  EXPECT_LT(graph_steps[1], steps[1]);  // the prefill steps stayed eager
}

// Sampling on the backend (Backend::sample_rows, here the CPU backend's) gives the host sampler's tokens: greedy
// and seeded requests with every filter, penalties and bias, batched; a logprobs request's logprobs come from
// Backend::row_logprobs beside it (the same numbers), one asking for more alternatives than the backend gives
// (kMaxRowTopLogprobs) sends its steps to the host path. Only the path changes, never a token or a logprob.
TEST(Engine, DeviceSamplingEqualsHostSampling) {
  auto& f = fx();
  auto reqs_of = [&] {
    std::vector<std::shared_ptr<Request>> v;
    for (int i = 0; i < 8; ++i) {
      auto p = f.prompts[size_t(i % 5)];
      p.resize(std::min<size_t>(p.size(), i >= 5 ? 20 : 48));  // short prompts: the test is about the samplers
      auto r = make_req(uint64_t(i), p, 12, i % 4 == 0 ? 0.f : 0.7f + 0.1f * float(i), uint64_t(77 + i));
      auto& sp = r->sampling;
      if (i % 4 == 1) {  // every filter and penalty at once
        sp.top_k = 20;
        sp.top_p = 0.8f;
        sp.min_p = 0.05f;
        sp.repetition_penalty = 1.3f;
        sp.presence_penalty = 0.4f;
        sp.frequency_penalty = 0.3f;
        sp.logit_bias = {{7, 2.f}, {8, -100.f}, {9, 1.5f}, {9, 0.5f}};
      }
      if (i % 4 == 2) {  // plain temperature sampling over the whole vocabulary
        sp.top_k = 0;
        sp.top_p = 1.f;
      }
      if (i % 4 == 0) sp.repetition_penalty = 1.5f;  // greedy with a penalty
      if (i == 6) sp.logprobs = 2;                  // on the device, with Backend::row_logprobs
      if (i == 7) sp.logprobs = Backend::kMaxRowTopLogprobs + 1;  // its steps sample on the host
      v.push_back(r);
    }
    return v;
  };
  std::vector<std::vector<Result>> out(2);
  std::vector<int64_t> dev_steps(2);
  for (int on = 0; on < 2; ++on) {
    auto reqs = reqs_of();
    EngineConfig c = base_config();
    c.max_num_seqs = 4;
    c.max_num_batched_tokens = 64;
    c.vocab_limit = 2000;  // below the 2048 rows of the head: ids >= 2000 are never produced
    c.device_sampling = on == 1;
    Engine e(*f.m, c);
    for (auto& r : reqs) e.submit(r);
    drain(e);
    for (auto& r : reqs) out[size_t(on)].push_back(collect(*r, 0ms));
    dev_steps[size_t(on)] = e.metrics().device_sample_steps_total;
    expect_empty(e.metrics());
  }
  for (size_t i = 0; i < out[0].size(); ++i) {
    EXPECT_EQ(out[1][i].tokens, out[0][i].tokens) << "request " << i;
    EXPECT_EQ(out[1][i].finish, out[0][i].finish) << "request " << i;
    for (int32_t t : out[1][i].tokens) EXPECT_LT(t, 2000) << "request " << i;
    ASSERT_EQ(out[1][i].logprobs.size(), out[0][i].logprobs.size()) << "request " << i;
    for (size_t j = 0; j < out[0][i].logprobs.size(); ++j) {
      const auto &a = out[1][i].logprobs[j], &b = out[0][i].logprobs[j];
      EXPECT_EQ(a.token, b.token);
      EXPECT_EQ(a.logprob, b.logprob) << "request " << i << " token " << j;
      EXPECT_EQ(a.top, b.top) << "request " << i << " token " << j;
    }
  }
  EXPECT_EQ(out[1][6].logprobs.size(), out[1][6].tokens.size());
  EXPECT_EQ(out[1][6].logprobs[0].top.size(), 2u);
  EXPECT_EQ(out[1][7].logprobs[0].top.size(), size_t(Backend::kMaxRowTopLogprobs + 1));
  EXPECT_EQ(dev_steps[0], 0);
  EXPECT_GT(dev_steps[1], 5);
}

// ---------------------------------------------------------------------------------------------------
// Prefix caching (docs/engine.md "Prefix caching").

// The cache manager's bookkeeping: checkpoints share their blocks with the sequences that resume from them, the
// longest checkpoint of the right salt wins, the least recently used one goes first, and every block comes back.
TEST(PrefixCache, CheckpointBookkeeping) {
  auto& m = *fx().m;
  CacheManager cm(m, /*num_blocks=*/12, /*block_size=*/4, /*num_slots=*/2, 0, /*num_checkpoints=*/2);
  std::vector<int32_t> toks(20);
  for (int i = 0; i < 20; ++i) toks[size_t(i)] = 100 + i;
  SeqCache a;
  ASSERT_TRUE(cm.start(a));
  ASSERT_TRUE(cm.reserve(a, 10));  // 3 blocks
  a.len = 8;
  cm.save(a, "", toks);  // tokens [0, 8): 2 blocks shared
  EXPECT_EQ(cm.num_checkpoints(), 1);
  cm.save(a, "", toks);  // the same tokens: no second checkpoint
  EXPECT_EQ(cm.num_checkpoints(), 1);
  EXPECT_EQ(cm.free_blocks(), 9);
  EXPECT_EQ(cm.cached_blocks(), 0);  // a still holds them
  cm.release(a);
  EXPECT_EQ(cm.free_blocks(), 10);
  EXPECT_EQ(cm.cached_blocks(), 2);

  // A lookup needs the whole checkpoint inside tokens[0, limit) and the same salt.
  EXPECT_EQ(cm.lookup("", toks, 20).len, 8);
  EXPECT_EQ(cm.lookup("", toks, 7).entry, -1);
  EXPECT_EQ(cm.lookup("", toks, 7).common, 8);
  EXPECT_EQ(cm.lookup("other", toks, 20).entry, -1);
  std::vector<int32_t> diverged = toks;
  diverged[5] = 7;
  PrefixHit d = cm.lookup("", diverged, 20);
  EXPECT_EQ(d.entry, -1);
  EXPECT_EQ(d.common, 5);

  // Resume: the blocks are shared (not free, not only cached), len = 8.
  SeqCache b;
  ASSERT_TRUE(cm.start(b));
  cm.attach(b, cm.lookup("", toks, 20));
  EXPECT_EQ(b.len, 8);
  EXPECT_EQ(b.blocks.size(), 2u);
  EXPECT_EQ(cm.cached_blocks(), 0);
  ASSERT_TRUE(cm.reserve(b, 8));  // positions 8..15: 2 new blocks
  EXPECT_EQ(b.blocks.size(), 4u);
  b.len = 16;
  cm.save(b, "", toks);  // a longer checkpoint, sharing the first two blocks with the first
  EXPECT_EQ(cm.num_checkpoints(), 2);
  EXPECT_EQ(cm.lookup("", toks, 20).len, 16);  // the longest wins
  EXPECT_EQ(cm.lookup("", toks, 15).len, 8);
  cm.release(b);
  EXPECT_EQ(cm.cached_blocks(), 4);
  EXPECT_EQ(cm.free_blocks(), 8);

  // A third checkpoint takes the least recently used one's slot (the 8-token one was used by b's attach, then the
  // 16-token one was saved: the 8-token one goes).
  SeqCache c;
  ASSERT_TRUE(cm.start(c));
  ASSERT_TRUE(cm.reserve(c, 4));
  c.len = 4;
  std::vector<int32_t> other(4, 9);
  cm.save(c, "s", other);
  EXPECT_EQ(cm.num_checkpoints(), 2);
  EXPECT_EQ(cm.lookup("", toks, 20).len, 16);
  EXPECT_EQ(cm.lookup("", toks, 15).entry, -1);
  EXPECT_EQ(cm.lookup("s", other, 5).len, 4);
  cm.release(c);

  // Short of blocks, reserve() evicts checkpoints (oldest first) before it gives up.
  SeqCache big;
  ASSERT_TRUE(cm.start(big));
  EXPECT_EQ(cm.free_blocks(), 12 - 5);
  ASSERT_TRUE(cm.reserve(big, 12 * 4));  // every block
  EXPECT_EQ(cm.num_checkpoints(), 0);
  EXPECT_EQ(cm.cached_blocks(), 0);
  EXPECT_FALSE(cm.reserve(big, 49));
  cm.release(big);
  EXPECT_EQ(cm.free_blocks(), 12);
}

EngineConfig cached_config() {
  EngineConfig c = base_config();
  c.prefix_cache_checkpoints = 4;
  return c;
}

Result run_on(Engine& e, std::shared_ptr<Request> r) {
  e.submit(r);
  drain(e);
  return collect(*r, 0ms);
}

// One engine, requests one after another: the same prompt again, a conversation that continues it, prompts that
// share a system-prompt-like head with different tails. Every output equals the request's output alone on an
// engine without prefix caching; cached_tokens says where each resumed.
TEST(PrefixCache, ResumedRequestsGetTheirAloneOutputs) {
  auto& f = fx();
  const auto& p = f.prompts[3];  // 150 tokens
  ASSERT_EQ(p.size(), 150u);
  Engine e(*f.m, cached_config());
  uint64_t id = 1;
  auto check = [&](std::vector<int32_t> prompt, int64_t want_cached, const char* what) {
    auto proto = make_req(id++, prompt, 16);
    Result alone = run_alone(*proto);
    Result got = run_on(e, proto);
    EXPECT_EQ(got.tokens, alone.tokens) << what;
    EXPECT_EQ(got.cached_tokens, want_cached) << what;
    EXPECT_EQ(alone.cached_tokens, 0) << what;
    return got;
  };
  Result first = check(p, 0, "first");           // leaves a checkpoint at 144 = (150 - 1) / 16 * 16
  EXPECT_EQ(first.tokens, std::vector<int32_t>(f.greedy[3].begin(), f.greedy[3].begin() + 16));
  check(p, 144, "same prompt again");
  std::vector<int32_t> turn2 = p;
  turn2.insert(turn2.end(), first.tokens.begin(), first.tokens.end());
  turn2.insert(turn2.end(), f.prompts[2].begin(), f.prompts[2].begin() + 20);  // 186 tokens
  // A finished request leaves a checkpoint of what it ran: the prompt and 15 of its 16 tokens (the last one was
  // sampled, never run), so the next turn resumes after the answer.
  check(turn2, 165, "the conversation continued");                            // leaves one at 176
  check(turn2, 176, "the continued conversation again");
  // Same first 100 tokens as p, another tail: no checkpoint inside the shared part yet (miss), but this request
  // leaves one at 96, where the next such request resumes.
  std::vector<int32_t> tail_a(p.begin(), p.begin() + 100), tail_b(p.begin(), p.begin() + 100);
  tail_a.insert(tail_a.end(), f.prompts[4].begin(), f.prompts[4].begin() + 30);
  tail_b.insert(tail_b.end(), f.prompts[4].begin() + 50, f.prompts[4].begin() + 75);
  check(tail_a, 0, "shared head, first tail");
  check(tail_b, 96, "shared head, second tail");
  const EngineMetrics m = e.metrics();
  EXPECT_EQ(m.prefix_cache_hits_total, 144 + 165 + 176 + 96);
  EXPECT_EQ(m.prefix_cache_queries_total, 150 * 2 + 186 * 2 + 130 + 125);
  EXPECT_EQ(m.prefix_cache_checkpoints, 4);  // prompts' and finished answers' went in: the capacity, 4, are left
  expect_empty(m);
  EXPECT_GT(m.kv_blocks_cached, 0);
}

// A finished sequence's caches become a checkpoint of the tokens it ran, at any length (retire()): a resumed
// sequence gets its own copy of the checkpoint's last, partly filled block. Such checkpoints hold at most half the
// slots until one is resumed from.
TEST(PrefixCache, RetiredCheckpointsBookkeeping) {
  auto& m = *fx().m;
  CacheManager cm(m, /*num_blocks=*/16, /*block_size=*/4, /*num_slots=*/3, 0, /*num_checkpoints=*/4);
  std::vector<int32_t> toks(40);
  for (int i = 0; i < 40; ++i) toks[size_t(i)] = 100 + i;
  SeqCache a;
  ASSERT_TRUE(cm.start(a));
  ASSERT_TRUE(cm.reserve(a, 12));  // 3 blocks
  a.len = 10;                      // a finished having run 10 tokens: 2 full blocks and half of the third
  cm.retire(a, "", toks);
  EXPECT_EQ(a.slot, -1);
  EXPECT_EQ(cm.num_checkpoints(), 1);
  EXPECT_EQ(cm.cached_blocks(), 3);
  EXPECT_EQ(cm.free_blocks(), 13);
  EXPECT_EQ(cm.lookup("", toks, 40).len, 10);
  EXPECT_EQ(cm.lookup("", toks, 9).entry, -1);

  // Two sequences resume from it: each gets the two full blocks shared and its own copy of the third.
  SeqCache b, c;
  ASSERT_TRUE(cm.start(b));
  ASSERT_TRUE(cm.start(c));
  ASSERT_TRUE(cm.attach(b, cm.lookup("", toks, 40)));
  ASSERT_TRUE(cm.attach(c, cm.lookup("", toks, 40)));
  EXPECT_EQ(b.len, 10);
  ASSERT_EQ(b.blocks.size(), 3u);
  ASSERT_EQ(c.blocks.size(), 3u);
  EXPECT_EQ(b.blocks[0], c.blocks[0]);
  EXPECT_EQ(b.blocks[1], c.blocks[1]);
  EXPECT_NE(b.blocks[2], c.blocks[2]);
  EXPECT_EQ(cm.free_blocks(), 11);
  EXPECT_EQ(cm.cached_blocks(), 1);  // the checkpoint's own third block
  cm.release(b);
  cm.release(c);
  EXPECT_EQ(cm.free_blocks(), 13);
  // Below one block nothing is kept.
  SeqCache d;
  ASSERT_TRUE(cm.start(d));
  ASSERT_TRUE(cm.reserve(d, 3));
  d.len = 3;
  cm.retire(d, "", toks);
  EXPECT_EQ(cm.num_checkpoints(), 1);

  // The checkpoint above was resumed from: an ordinary one now. Retired ones that were not hold at most 2 of the 4
  // slots, taking each other's.
  auto retire_at = [&](int64_t len, int32_t first) {
    std::vector<int32_t> t(size_t(len), first);
    SeqCache s;
    ASSERT_TRUE(cm.start(s));
    ASSERT_TRUE(cm.reserve(s, len));
    s.len = len;
    cm.retire(s, "", t);
  };
  retire_at(5, 1);
  retire_at(6, 2);
  retire_at(7, 3);
  EXPECT_EQ(cm.num_checkpoints(), 3);
  EXPECT_EQ(cm.lookup("", std::vector<int32_t>(9, 1), 9).entry, -1);  // the oldest retired one went
  EXPECT_EQ(cm.lookup("", std::vector<int32_t>(9, 2), 9).len, 6);
  EXPECT_EQ(cm.lookup("", toks, 40).len, 10);  // the resumed one stayed
  // A prompt's checkpoint takes the least recently used slot of all.
  SeqCache e;
  ASSERT_TRUE(cm.start(e));
  ASSERT_TRUE(cm.reserve(e, 8));
  e.len = 8;
  std::vector<int32_t> other(8, 9);
  cm.save(e, "", other);
  cm.release(e);
  EXPECT_EQ(cm.num_checkpoints(), 4);
  EXPECT_EQ(cm.lookup("", other, 9).len, 8);
}

// The host tier (--cache-ram): a checkpoint a newer one pushes out of its device slot moves to host memory with its
// state and keeps its KV blocks; a sequence resumes from it through a copy back. The host tier drops its least
// recently used checkpoint when full and keeps retire()'s checkpoints to half of it, as the device slots do; reserve()
// evicts host checkpoints too, and their host buffers serve the next ones.
TEST(PrefixCache, HostTierBookkeeping) {
  auto& m = *fx().m;
  CacheManager cm(m, /*num_blocks=*/32, /*block_size=*/4, /*num_slots=*/3, 0, /*num_checkpoints=*/2,
                  /*num_host_checkpoints=*/2);
  EXPECT_EQ(cm.host_capacity(), 2);
  auto fill = [&](int32_t slot, float v) {  // every DeltaNet row of the slot = v
    for (auto& st : cm.caches().state) {
      if (!st.conv.defined() || st.conv.numel() == 0) continue;
      for (Tensor* t : {&st.conv, &st.ssm}) {
        Tensor r = t->rows(slot, slot + 1);
        ASSERT_EQ(r.dtype, DType::F32);
        std::fill(r.ptr<float>(), r.ptr<float>() + r.numel(), v);
      }
    }
  };
  auto holds = [&](int32_t slot, float v) {
    int64_t n = 0, bad = 0;
    for (auto& st : cm.caches().state) {
      if (!st.conv.defined() || st.conv.numel() == 0) continue;
      for (Tensor* t : {&st.conv, &st.ssm}) {
        Tensor r = t->rows(slot, slot + 1);
        for (int64_t i = 0; i < r.numel(); ++i) bad += r.ptr<float>()[i] != v ? 1 : 0;
        n += r.numel();
      }
    }
    return n > 0 && bad == 0;
  };
  auto toks = [](int32_t k) { return std::vector<int32_t>(12, 10 * k); };
  // A sequence whose state is k, keeping tokens[0, 8) of toks(k) as a prompt's checkpoint (or, retired, its 10).
  auto keep = [&](int32_t k, bool retired = false) {
    SeqCache s;
    ASSERT_TRUE(cm.start(s));
    ASSERT_TRUE(cm.reserve(s, 12));
    fill(s.slot, float(k));
    s.len = retired ? 10 : 8;
    if (retired) {
      cm.retire(s, "", toks(k));
    } else {
      cm.save(s, "", toks(k));
      cm.release(s);
    }
  };
  auto resumes = [&](int32_t k) {  // a fresh sequence resumes from toks(k)'s checkpoint with state k
    SeqCache s;
    EXPECT_TRUE(cm.start(s));
    const PrefixHit h = cm.lookup("", toks(k), 12);
    bool ok = h.entry >= 0 && cm.attach(s, h) && holds(s.slot, float(k));
    cm.release(s);
    return ok;
  };
  keep(1);
  keep(2);
  EXPECT_EQ(cm.num_checkpoints(), 2);
  EXPECT_EQ(cm.host_checkpoints(), 0);
  keep(3);  // 1 moves to host memory
  EXPECT_EQ(cm.num_checkpoints(), 3);
  EXPECT_EQ(cm.host_checkpoints(), 1);
  EXPECT_EQ(cm.cached_blocks(), 3 * 2);  // its blocks stay
  keep(4);  // 2 moves
  keep(5);  // 3 moves; host memory full: 1, its least recently used, goes
  EXPECT_EQ(cm.num_checkpoints(), 4);
  EXPECT_EQ(cm.host_checkpoints(), 2);
  EXPECT_EQ(cm.cached_blocks(), 4 * 2);
  EXPECT_EQ(cm.lookup("", toks(1), 12).entry, -1);
  EXPECT_TRUE(resumes(2));  // from host memory; 2 is now the most recently used
  EXPECT_TRUE(resumes(5));  // from a device slot
  keep(6);  // 4 moves; 3, not 2, leaves host memory
  EXPECT_EQ(cm.lookup("", toks(3), 12).entry, -1);
  for (int32_t k : {2, 4, 5, 6}) EXPECT_TRUE(resumes(k)) << k;

  // Short of blocks, reserve() evicts checkpoints wherever their states are.
  SeqCache big;
  ASSERT_TRUE(cm.start(big));
  ASSERT_TRUE(cm.reserve(big, 32 * 4));
  EXPECT_EQ(cm.num_checkpoints(), 0);
  EXPECT_EQ(cm.host_checkpoints(), 0);
  EXPECT_EQ(cm.cached_blocks(), 0);
  cm.release(big);
  EXPECT_EQ(cm.free_blocks(), 32);

  // The host buffers are used again; retire()'s checkpoints hold at most half of each tier (1 of 2 here).
  keep(7);
  keep(8, true);
  keep(9, true);   // 8 (the device slots' retired one) moves to host memory
  keep(10, true);  // 9 moves; host memory's retired half was 8's: 8 goes
  EXPECT_EQ(cm.num_checkpoints(), 3);
  EXPECT_EQ(cm.host_checkpoints(), 1);
  EXPECT_EQ(cm.lookup("", toks(8), 12).entry, -1);
  for (int32_t k : {7, 9, 10}) EXPECT_TRUE(resumes(k)) << k;
  // Resumed, 9 and 10 are ordinary checkpoints now. 7 (resumed before 9 and 10) moves to host memory, then 10 does
  // and 7, host memory's least recently used, goes.
  keep(11);
  keep(12);
  EXPECT_EQ(cm.num_checkpoints(), 4);
  EXPECT_EQ(cm.host_checkpoints(), 2);
  EXPECT_EQ(cm.lookup("", toks(7), 12).entry, -1);
  for (int32_t k : {9, 10, 11, 12}) EXPECT_TRUE(resumes(k)) << k;
  EXPECT_EQ(cm.free_blocks() + cm.cached_blocks(), 32);
}

// Host memory that runs out: the tier stops where allocation failed (said once on stderr) and keeps working with the
// buffers it has; nothing is lost but the checkpoints that no longer fit.
TEST(PrefixCache, HostTierCappedWhereHostMemoryRunsOut) {
  class TwoHostBuffers final : public ForwardingBackend {
   public:
    using ForwardingBackend::ForwardingBackend;
    Tensor alloc_host(DType dt, std::vector<int64_t> shape) override {
      if (++calls > 2) fail("host memory exhausted (test)");
      return ForwardingBackend::alloc_host(dt, std::move(shape));
    }
    std::atomic<int> calls{0};
  };
  TwoHostBuffers be(*fx().be);
  auto m = model::Model::load(test::data_dir() + "/tiny-moe/tiny-moe-int4", be);
  CacheManager cm(*m, /*num_blocks=*/32, /*block_size=*/4, /*num_slots=*/2, 0, /*num_checkpoints=*/1,
                  /*num_host_checkpoints=*/5);
  auto toks = [](int32_t k) { return std::vector<int32_t>(8, 10 * k); };
  for (int32_t k = 1; k <= 6; ++k) {
    SeqCache s;
    ASSERT_TRUE(cm.start(s));
    ASSERT_TRUE(cm.reserve(s, 8));
    s.len = 8;
    cm.save(s, "", toks(k));
    cm.release(s);
  }
  EXPECT_EQ(cm.host_capacity(), 2);
  EXPECT_EQ(cm.host_checkpoints(), 2);
  EXPECT_EQ(cm.num_checkpoints(), 3);  // 4, 5 in host memory, 6 on the device
  for (int32_t k = 1; k <= 6; ++k) EXPECT_EQ(cm.lookup("", toks(k), 8).entry >= 0, k >= 4) << k;
  SeqCache s;
  ASSERT_TRUE(cm.start(s));
  EXPECT_TRUE(cm.attach(s, cm.lookup("", toks(4), 8)));
  cm.release(s);
}

// Through the engine: a device slot for one checkpoint and host memory for eight. Three conversations, then each
// one's next turn: every next turn resumes after its previous answer (that answer's checkpoint was pushed to host
// memory long before), with the output it gets alone; without the host tier none finds anything (the one device
// slot holds the previous request's answer).
TEST(PrefixCache, HostTierResumesConversations) {
  auto& f = fx();
  std::vector<std::vector<int32_t>> firsts;
  for (auto [i, from, n] : {std::tuple<size_t, size_t, size_t>{3, 0, 60}, {4, 0, 70}, {4, 100, 80}}) {
    ASSERT_GE(f.prompts[i].size(), from + n);
    firsts.emplace_back(f.prompts[i].begin() + std::ptrdiff_t(from), f.prompts[i].begin() + std::ptrdiff_t(from + n));
  }
  for (int64_t host : {8, 0}) {
    EngineConfig c = base_config();
    c.prefix_cache_checkpoints = 1;
    c.prefix_cache_host_checkpoints = host;
    Engine e(*f.m, c);
    uint64_t id = 1;
    std::vector<Result> answers;
    for (auto& p : firsts) answers.push_back(run_on(e, make_req(id++, p, 12)));
    // Each conversation left its prompt's checkpoint and its answer's: all but the last answer's in host memory.
    if (host > 0) EXPECT_EQ(e.metrics().prefix_cache_host_checkpoints, 5);
    for (size_t i = 0; i < firsts.size(); ++i) {
      ASSERT_EQ(answers[i].finish, FinishReason::Length);
      std::vector<int32_t> next = firsts[i];
      next.insert(next.end(), answers[i].tokens.begin(), answers[i].tokens.end());
      next.insert(next.end(), f.prompts[2].begin(), f.prompts[2].begin() + 9);
      auto proto = make_req(id++, next, 12);
      const Result alone = run_alone(*proto);
      const Result got = run_on(e, proto);
      EXPECT_EQ(got.tokens, alone.tokens) << "conversation " << i << ", host " << host;
      // After the answer (all but its last token, which was never run).
      EXPECT_EQ(got.cached_tokens, host > 0 ? int64_t(firsts[i].size()) + 11 : 0) << i;
    }
    expect_empty(e.metrics());
  }
}

// --prefix-cache-interval: a long prompt also leaves a checkpoint every N tokens, so a prompt that leaves it anywhere
// (an edited message) resumes at most N tokens before that point; without it, nothing inside the shared part is kept.
TEST(PrefixCache, IntervalCheckpointsResumeInsideLongPrompts) {
  auto& f = fx();
  const auto& p = f.prompts[3];  // 150 tokens
  std::vector<int32_t> edited(p.begin(), p.begin() + 100);
  edited.insert(edited.end(), f.prompts[4].begin(), f.prompts[4].begin() + 30);
  for (int64_t interval : {32, 0}) {
    EngineConfig c = cached_config();
    c.prefix_cache_interval = interval;
    Engine e(*f.m, c);
    run_on(e, make_req(1, p, 8));  // checkpoints at 32, 64, 96, 128 and 144 with the interval; the 4 newest stay
    auto proto = make_req(2, edited, 8);
    const Result alone = run_alone(*proto);
    const Result got = run_on(e, proto);
    EXPECT_EQ(got.tokens, alone.tokens) << interval;
    EXPECT_EQ(got.cached_tokens, interval ? 96 : 0) << interval;
  }
}

// A finished request's checkpoint is where the next turn resumes: stopped by a stop token (the checkpoint holds the
// answer without it: the stop token was sampled, never run), by its length, or aborted between steps. Two requests
// that resume from the same checkpoint at once, with different tails, each write their own copy of its last, partly
// filled block: both get their alone outputs.
TEST(PrefixCache, FinishedRequestsLeaveCheckpoints) {
  auto& f = fx();
  const auto& p = f.prompts[3];  // 150 tokens
  const std::vector<int32_t> gen(f.greedy[3].begin(), f.greedy[3].begin() + 16);
  int stop_at = 9;  // the first position from 9 on whose token did not occur before it
  while (std::find(gen.begin(), gen.begin() + stop_at, gen[size_t(stop_at)]) != gen.begin() + stop_at) ++stop_at;
  ASSERT_LT(stop_at, 16);
  auto tail = [&](std::vector<int32_t> head, size_t from, size_t n) {
    head.insert(head.end(), f.prompts[4].begin() + std::ptrdiff_t(from), f.prompts[4].begin() + std::ptrdiff_t(from + n));
    return head;
  };
  for (int how = 0; how < 3; ++how) {
    SCOPED_TRACE(how == 0 ? "stop token" : how == 1 ? "length" : "abort");
    Engine e(*f.m, cached_config());
    auto first = make_req(1, p, how == 1 ? 12 : 40);
    if (how == 0) first->stop_token_ids = {gen[size_t(stop_at)]};
    e.submit(first);
    int64_t ran = 0;  // tokens the checkpoint should hold
    if (how == 2) {
      for (int i = 0; i < 6; ++i) e.step();  // the prompt, then decodes
      e.abort(1);
    } else {
      ran = how == 0 ? 150 + stop_at : 150 + 11;
    }
    drain(e);
    Result r1 = collect(*first, 0ms);
    if (how == 2) {
      ASSERT_GE(r1.tokens.size(), 3u);
      ran = 150 + int64_t(r1.tokens.size()) - 1;  // every token but the last one sampled
    }
    ASSERT_EQ(r1.tokens.size(), how == 0 ? size_t(stop_at) : how == 1 ? 12u : r1.tokens.size());
    // The next turn: the answer, the stop token where there was one, then a new message.
    std::vector<int32_t> head = p;
    head.insert(head.end(), r1.tokens.begin(), r1.tokens.end());
    if (how == 0) head.push_back(r1.stop_token);
    std::vector<std::shared_ptr<Request>> next = {make_req(2, tail(head, 0, 20), 10), make_req(3, tail(head, 40, 9), 10)};
    for (auto& r : next) e.submit(r);
    drain(e);
    for (size_t i = 0; i < next.size(); ++i) {
      Result got = collect(*next[i], 0ms);
      EXPECT_EQ(got.tokens, run_alone(*next[i]).tokens) << "request " << i;
      EXPECT_EQ(got.cached_tokens, ran) << "request " << i;
    }
    expect_empty(e.metrics());
  }
}

TEST(PrefixCache, SaltsAndImagesDoNotShare) {
  auto& f = fx();
  Engine e(*f.m, cached_config());
  auto a = make_req(1, f.prompts[3], 4);
  a->cache_salt = "tenant-a";
  EXPECT_EQ(run_on(e, a).cached_tokens, 0);
  auto b = make_req(2, f.prompts[3], 4);
  b->cache_salt = "tenant-b";
  EXPECT_EQ(run_on(e, b).cached_tokens, 0);
  auto a2 = make_req(3, f.prompts[3], 4);
  a2->cache_salt = "tenant-a";
  EXPECT_EQ(run_on(e, a2).cached_tokens, 144);
  auto plain = make_req(4, f.prompts[3], 4);
  EXPECT_EQ(run_on(e, plain).cached_tokens, 0);
}

// Requests that arrive together and share a head (n > 1 choices of one prompt; parallel calls behind one system
// prompt, marked by a hint as the server marks where a chat's second message starts): the first prefills it, the
// others wait for its checkpoints and resume there.
TEST(PrefixCache, ConcurrentSharedHeadsPrefillOnce) {
  auto& f = fx();
  const auto& p = f.prompts[3];  // 150 tokens
  std::vector<int32_t> tail_a(p.begin(), p.begin() + 100), tail_b(p.begin(), p.begin() + 100);
  tail_a.insert(tail_a.end(), f.prompts[4].begin(), f.prompts[4].begin() + 30);
  tail_b.insert(tail_b.end(), f.prompts[4].begin() + 50, f.prompts[4].begin() + 75);
  std::vector<std::shared_ptr<Request>> rs = {make_req(1, p, 8), make_req(2, p, 8), make_req(3, tail_a, 8),
                                              make_req(4, tail_b, 8)};
  for (auto& r : rs) r->cache_hints = {100};  // rounded down to 96
  Engine e(*f.m, cached_config());
  for (auto& r : rs) e.submit(r);
  drain(e);
  const std::vector<int64_t> want_cached = {0, 144, 96, 96};
  for (size_t i = 0; i < rs.size(); ++i) {
    auto res = collect(*rs[i], 0ms);
    EXPECT_EQ(res.tokens, run_alone(*rs[i]).tokens) << "request " << i;
    EXPECT_EQ(res.cached_tokens, want_cached[i]) << "request " << i;
  }
  expect_empty(e.metrics());
}

// Concurrent and preempted sequences with prefix caching on (mix12's prompts are slices of the golden prompts, so
// they share heads): every request gets its alone output, and the pool is whole again afterwards.
TEST(PrefixCache, ConcurrencyAndPreemptionKeepOutputs) {
  const auto& alone = mix12_alone();
  for (int pass = 0; pass < 2; ++pass) {
    auto reqs = mix12();
    EngineConfig c = cached_config();
    c.max_num_seqs = pass == 0 ? 4 : 6;
    c.max_num_batched_tokens = pass == 0 ? 64 : 96;
    if (pass == 1) c.num_blocks = 40;  // preemptions, and checkpoints evicted for the running sequences
    Engine e(*fx().m, c);
    // Twice each: the second round resumes from what the first left.
    for (int round = 0; round < 2; ++round) {
      for (auto& r : reqs) {
        r->out = std::make_shared<DeltaChannel>();
        e.submit(r);
      }
      drain(e);
      for (size_t i = 0; i < reqs.size(); ++i) {
        auto res = collect(*reqs[i], 0ms);
        EXPECT_EQ(res.tokens, alone[i].tokens) << "pass " << pass << " round " << round << " request " << i;
        EXPECT_EQ(res.finish, alone[i].finish) << "pass " << pass << " round " << round << " request " << i;
      }
    }
    auto m = e.metrics();
    std::printf("  pass %d: prefix cache hits %lld of %lld prompt tokens, %lld preemptions\n", pass,
                (long long)m.prefix_cache_hits_total, (long long)m.prefix_cache_queries_total,
                (long long)m.preemptions_total);
    EXPECT_GT(m.prefix_cache_hits_total, 0);
    if (pass == 1) EXPECT_GT(m.preemptions_total, 0);
    expect_empty(m);
  }
}

// Model::kv_block_bytes / state_slot_bytes / gdn_log_row_bytes are what alloc_caches really allocates per block, per
// slot and per row of the DeltaNet input log.
TEST(PoolSizing, BytesPerBlockAndSlotMatchAllocCaches) {
  auto& m = *fx().m;
  auto bytes = [&](int64_t blocks, int64_t bs, int64_t slots) {
    model::ModelCaches c = m.alloc_caches(blocks, bs, slots);
    int64_t kv = 0, st = 0;
    for (auto& l : c.kv)
      if (l.k.defined()) kv += l.k.nbytes() + l.v.nbytes();
    if (c.mtp_kv.k.defined()) kv += c.mtp_kv.k.nbytes() + c.mtp_kv.v.nbytes();
    for (auto& l : c.state)
      if (l.conv.defined()) st += l.conv.nbytes() + l.ssm.nbytes();
    return std::pair<int64_t, int64_t>(kv, st);
  };
  for (int64_t bs : {1, 16, 32}) {
    auto [kv3, st2] = bytes(3, bs, 2);
    EXPECT_GT(kv3, 0);
    EXPECT_EQ(kv3, 3 * m.kv_block_bytes(bs)) << "block_size " << bs;
    EXPECT_EQ(st2, 2 * m.state_slot_bytes());
  }
  // A bf16 recurrent state (--mamba-ssm-cache-dtype bfloat16): BF16 ssm tensors, and the slot bytes say so.
  const int64_t f32_slot = m.state_slot_bytes();
  m.set_ssm_state_dtype(DType::BF16);
  {
    const int64_t bf16_slot = m.state_slot_bytes();
    model::ModelCaches c = m.alloc_caches(1, 16, 3);
    int64_t st = 0;
    for (auto& l : c.state)
      if (l.conv.defined() && l.conv.numel() > 0) {
        EXPECT_EQ(l.ssm.dtype, DType::BF16);
        EXPECT_EQ(l.conv.dtype, DType::F32);
        st += l.conv.nbytes() + l.ssm.nbytes();
      }
    EXPECT_EQ(st, 3 * bf16_slot);
    EXPECT_LT(bf16_slot, f32_slot);
  }
  m.set_ssm_state_dtype(DType::F32);
  EXPECT_EQ(m.state_slot_bytes(), f32_slot);
  // The DeltaNet input log of speculative decoding: gdn_log_row_bytes per row.
  model::ModelCaches c = m.alloc_caches(1, 16, 2, 7);
  EXPECT_EQ(c.gdn_log.rows, 7);
  EXPECT_GT(m.gdn_log_row_bytes(), 0);
  EXPECT_EQ(c.gdn_log.mixed.nbytes() + c.gdn_log.ba.nbytes(), 7 * m.gdn_log_row_bytes());
  EXPECT_EQ(m.alloc_caches(1, 16, 2).gdn_log.rows, 0);
}

TEST(PoolSizing, PlanFromDeviceMemory) {
  const int64_t MiB = 1 << 20, GiB = int64_t(1) << 30;
  PoolSizing in;
  in.total = 80 * GiB;
  in.used = 20 * GiB;
  in.utilization = 0.9;
  in.scratch = 2 * GiB;
  in.block_bytes = 1 * MiB;
  in.slot_bytes = 64 * MiB;
  in.max_num_seqs = 16;
  in.max_model_len = 32768;
  in.block_size = 16;
  // Plenty (budget 50 GiB): every slot, and blocks capped at max_num_seqs × max_model_len (32 GiB).
  PoolPlan p = plan_pools(in);
  EXPECT_EQ(p.budget, int64_t(0.9 * double(80 * GiB)) - 22 * GiB);
  EXPECT_EQ(p.num_slots, 16);
  EXPECT_EQ(p.num_blocks, 16 * 2048);
  // With prefix caching the checkpoints' blocks come on top: the pool takes the whole budget.
  in.checkpoint_blocks = true;
  p = plan_pools(in);
  EXPECT_EQ(p.num_blocks, (p.budget - 16 * in.slot_bytes) / in.block_bytes);
  EXPECT_GT(p.num_blocks, 16 * 2048);
  in.checkpoint_blocks = false;
  // Blocks limited by memory: the budget minus the slots, in whole blocks.
  in.max_num_seqs = 64;
  p = plan_pools(in);
  EXPECT_EQ(p.num_slots, 64);
  EXPECT_EQ(p.num_blocks, (p.budget - 64 * in.slot_bytes) / in.block_bytes);
  EXPECT_LT(p.num_blocks, 64 * 2048);
  EXPECT_LE(p.num_blocks * in.block_bytes + p.num_slots * in.slot_bytes, p.budget);
  // Slots limited by memory: room stays for one max-length sequence's blocks.
  in.used = 68 * GiB;  // budget 72 - 68 - 2 = 2 GiB < one sequence: 2048 blocks (2 GiB) + a 64 MiB slot
  EXPECT_THROW(plan_pools(in), Error);
  in.used = 60 * GiB;  // budget 10 GiB: 2 GiB of blocks for one sequence, 8 GiB / 512 MiB = 16 slots < 64
  in.slot_bytes = 512 * MiB;
  p = plan_pools(in);
  EXPECT_EQ(p.num_slots, 16);
  EXPECT_GE(p.num_blocks, 2048);
  EXPECT_LE(p.num_blocks * in.block_bytes + p.num_slots * in.slot_bytes, p.budget);
  // The message names the numbers and the way out.
  in.used = 70 * GiB;
  try {
    plan_pools(in);
    ADD_FAILURE() << "expected a failure";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("max_model_len 32768"), std::string::npos) << msg;
    EXPECT_NE(msg.find("--gpu-memory-utilization"), std::string::npos) << msg;
  }
  // --num-gpu-blocks-override fixes the KV pool.
  in.used = 20 * GiB;
  in.num_blocks_override = 100;
  p = plan_pools(in);
  EXPECT_EQ(p.num_blocks, 100);
  in.utilization = 1.5;
  EXPECT_THROW(plan_pools(in), Error);
}

// vLLM's check_sequence_repetition: the last L tokens, L in [max(min, 1), max], min_count times in a row at the end.
TEST(RepetitionDetection, RepeatsAtEnd) {
  auto rep = [](std::vector<int32_t> t, int64_t max, int64_t min, int64_t count) {
    return repeats_at_end(t.data(), int64_t(t.size()), {max, min, count});
  };
  EXPECT_TRUE(rep({1, 2, 1, 2, 1, 2}, 2, 1, 3));
  EXPECT_FALSE(rep({1, 2, 1, 2, 1, 2}, 2, 1, 4));  // only 3 repeats
  EXPECT_FALSE(rep({1, 2, 1, 2, 1, 2}, 1, 1, 3));  // the period 2 is above max
  EXPECT_TRUE(rep({9, 7, 7, 7}, 3, 0, 3));          // min 0 counts as 1
  EXPECT_FALSE(rep({9, 7, 7, 7}, 3, 2, 3));         // but min 2 skips the period 1
  EXPECT_TRUE(rep({5, 1, 2, 3, 1, 2, 3}, 3, 3, 2));
  EXPECT_FALSE(rep({1, 2, 3, 1, 2, 4}, 3, 1, 2));   // the tail must repeat exactly
  EXPECT_FALSE(rep({1, 2, 1, 2}, 0, 0, 2));         // off
  EXPECT_FALSE(rep({4, 4, 4, 4}, 2, 1, 1));         // min_count < 2: off
  EXPECT_FALSE(rep({}, 4, 1, 2));
}

// Through the engine: a logit bias makes greedy repeat one token; the request ends with FinishReason::Repetition
// at the token that completes min_count repeats (kept in the output), not before min_tokens, and max_tokens wins a tie.
TEST(Engine, RepetitionDetectionEndsALoop) {
  auto& f = fx();
  auto looping = [&](uint64_t id, int64_t max_tokens) {
    auto r = make_req(id, f.prompts[2], max_tokens);
    r->sampling.logit_bias = {{77, 100.f}};
    r->repetition = {4, 1, 5};
    return r;
  };
  auto a = run_alone(*looping(1, 40));
  EXPECT_EQ(a.finish, FinishReason::Repetition);
  EXPECT_EQ(a.tokens, std::vector<int32_t>(5, 77));
  auto b_req = looping(2, 40);
  b_req->sampling.min_tokens = 9;
  auto b = run_alone(*b_req);
  EXPECT_EQ(b.finish, FinishReason::Repetition);
  EXPECT_EQ(b.tokens.size(), 9u);
  auto c = run_alone(*looping(3, 5));
  EXPECT_EQ(c.finish, FinishReason::Length);
  auto off = looping(4, 12);
  off->repetition = {};
  EXPECT_EQ(run_alone(*off).finish, FinishReason::Length);
  auto bad = looping(5, 12);
  bad->repetition = {2, 3, 4};
  Engine e(*f.m, base_config());
  EXPECT_THROW(e.submit(bad), Error);
  bad->repetition = {2, 1, 1};
  EXPECT_THROW(e.submit(bad), Error);
}

// Request::priority (vLLM's): the waiting queue admits the smallest value first; out of blocks, the least urgent
// running sequence is preempted, not the most recently started one. Outputs stay the alone outputs.
TEST(Engine, PriorityOrdersAdmissionAndPreemption) {
  auto& f = fx();
  auto finish_order = [&](Engine& e, const std::vector<std::shared_ptr<Request>>& rs) {
    std::vector<uint64_t> order;
    std::vector<Result> res(rs.size());
    auto poll = [&] {
      for (size_t i = 0; i < rs.size(); ++i)
        while (auto d = rs[i]->out->pop(0ms)) {
          res[i].tokens.insert(res[i].tokens.end(), d->tokens.begin(), d->tokens.end());
          if (d->finish != FinishReason::None) order.push_back(rs[i]->id);
        }
    };
    while (e.step()) poll();
    poll();
    for (size_t i = 0; i < rs.size(); ++i) EXPECT_EQ(res[i].tokens, run_alone(*rs[i]).tokens) << "request " << rs[i]->id;
    return order;
  };
  {  // admission: one slot, three waiting
    EngineConfig c = base_config();
    c.max_num_seqs = 1;
    Engine e(*f.m, c);
    std::vector<std::shared_ptr<Request>> rs = {make_req(1, f.prompts[2], 3), make_req(2, f.prompts[1], 3),
                                                make_req(3, f.prompts[0], 3)};
    rs[1]->priority = 5;
    rs[2]->priority = -1;
    for (auto& r : rs) e.submit(r);
    EXPECT_EQ(finish_order(e, rs), (std::vector<uint64_t>{3, 1, 2}));
  }
  for (int64_t first_prio : {0, 5}) {  // preemption: 20 blocks, two sequences that need 12 each
    EngineConfig c = base_config();
    c.num_blocks = 20;
    Engine e(*f.m, c);
    std::vector<std::shared_ptr<Request>> rs = {make_req(1, f.prompts[3], 40), make_req(2, f.prompts[3], 40)};
    rs[0]->priority = first_prio;
    e.submit(rs[0]);
    e.step();  // the first one starts first (and prefills)
    e.submit(rs[1]);
    const auto order = finish_order(e, rs);
    EXPECT_GT(e.metrics().preemptions_total, 0);
    // Equal priorities: the later one is preempted and finishes last; the first one less urgent: it is.
    EXPECT_EQ(order, first_prio == 0 ? (std::vector<uint64_t>{1, 2}) : (std::vector<uint64_t>{2, 1}));
  }
}

// A waiting request more urgent than running ones does not wait for them: with no slot (max_num_seqs) or no blocks
// for it, the least urgent running sequence is preempted and the urgent one admitted at once; equal priorities never
// preempt each other. Every output equals its request's alone.
TEST(Engine, UrgentRequestsPreemptLessUrgentRunningOnes) {
  auto& f = fx();
  struct Case {
    const char* what;
    int64_t max_num_seqs, num_blocks, urgent_prio;
  };
  for (const Case& k : {Case{"no slot", 2, 0, 0}, Case{"no blocks", 8, 24, 0}, Case{"equal priority", 2, 0, 5}}) {
    SCOPED_TRACE(k.what);
    EngineConfig c = base_config();
    c.max_num_seqs = k.max_num_seqs;
    if (k.num_blocks > 0) c.num_blocks = k.num_blocks;
    Engine e(*f.m, c);
    // Two long, less urgent generations (150-token prompt + 60 tokens: 14 blocks each at the end), then an urgent
    // request once they decode.
    // (24 blocks: the two hold 20 when the urgent one, which needs 10, arrives.)
    std::vector<std::shared_ptr<Request>> rs = {make_req(1, f.prompts[3], 60), make_req(2, f.prompts[3], 60),
                                                make_req(3, f.prompts[3], 6)};
    rs[2]->prompt[0] = 5;  // not a prefix of the others (prefix caching is off here anyway)
    rs[0]->priority = rs[1]->priority = 5;
    rs[2]->priority = k.urgent_prio;
    e.submit(rs[0]);
    e.submit(rs[1]);
    for (int i = 0; i < 5; ++i) e.step();
    ASSERT_EQ(e.metrics().running, 2);
    e.submit(rs[2]);
    std::vector<Result> res(rs.size());
    std::vector<int64_t> finished_at(rs.size(), -1);
    int64_t step = 0;
    auto poll = [&] {
      for (size_t i = 0; i < rs.size(); ++i)
        while (auto d = rs[i]->out->pop(0ms)) {
          res[i].tokens.insert(res[i].tokens.end(), d->tokens.begin(), d->tokens.end());
          if (d->finish != FinishReason::None) finished_at[i] = step;
        }
    };
    while (e.step()) {
      ++step;
      poll();
    }
    poll();
    for (size_t i = 0; i < rs.size(); ++i) EXPECT_EQ(res[i].tokens, run_alone(*rs[i]).tokens) << "request " << i;
    if (k.urgent_prio == 0) {
      EXPECT_GT(e.metrics().preemptions_total, 0);
      EXPECT_LE(finished_at[2], 7);  // admitted at once: its prompt, then 5 decodes (one more if it waited a step)
      EXPECT_LT(finished_at[2], std::min(finished_at[0], finished_at[1]));
    } else {
      EXPECT_EQ(e.metrics().preemptions_total, 0);
      EXPECT_GT(finished_at[2], std::min(finished_at[0], finished_at[1]));  // it waited for a slot
    }
    expect_empty(e.metrics());
  }
}

TEST(Engine, FinishReasons) {
  auto& f = fx();
  const auto& g = f.greedy[2];
  {  // max_tokens
    auto res = run_alone(*make_req(1, f.prompts[2], 5));
    EXPECT_EQ(res.tokens, std::vector<int32_t>(g.begin(), g.begin() + 5));
    EXPECT_EQ(res.finish, FinishReason::Length);
  }
  {  // stop_token_ids: the stop token ends it, is reported, and is not among the tokens
    auto r = make_req(2, f.prompts[2], 20);
    r->stop_token_ids = {g[3]};
    auto res = run_alone(*r);
    EXPECT_EQ(res.tokens, std::vector<int32_t>(g.begin(), g.begin() + 3));
    EXPECT_EQ(res.finish, FinishReason::Stop);
    EXPECT_EQ(res.stop_token, g[3]);
    EXPECT_EQ(res.completion_tokens, 4);
  }
  {  // the model's EOS set, and ignore_eos
    EngineConfig c = base_config();
    c.eos_token_ids = {g[2]};
    Engine e(*f.m, c);
    auto a = make_req(3, f.prompts[2], 10), b = make_req(4, f.prompts[2], 10);
    b->ignore_eos = true;
    e.submit(a);
    e.submit(b);
    drain(e);
    auto ra = collect(*a, 0ms), rb = collect(*b, 0ms);
    EXPECT_EQ(ra.finish, FinishReason::Stop);
    EXPECT_EQ(ra.stop_token, g[2]);
    EXPECT_EQ(ra.tokens.size(), 2u);
    EXPECT_EQ(rb.finish, FinishReason::Length);
    EXPECT_EQ(rb.tokens, std::vector<int32_t>(g.begin(), g.begin() + 10));
    EXPECT_EQ(e.metrics().requests_finished[int(FinishReason::Stop)], 1);
    EXPECT_EQ(e.metrics().requests_finished[int(FinishReason::Length)], 1);
  }
  {  // prompt + max_tokens == max_model_len exactly: allowed, ends by length
    EngineConfig c = base_config();
    c.max_model_len = int64_t(f.prompts[2].size()) + 6;
    Engine e(*f.m, c);
    auto r = make_req(5, f.prompts[2], 6);
    e.submit(r);
    drain(e);
    auto res = collect(*r, 0ms);
    EXPECT_EQ(res.tokens.size(), 6u);
    EXPECT_EQ(res.finish, FinishReason::Length);
  }
}

TEST(Engine, LogprobsRideAlongTheTokens) {
  auto& f = fx();
  auto r = make_req(1, f.prompts[1], 6);
  r->sampling.logprobs = 3;
  auto res = run_alone(*r);
  EXPECT_EQ(res.tokens, std::vector<int32_t>(f.greedy[1].begin(), f.greedy[1].begin() + 6));
  ASSERT_EQ(res.logprobs.size(), res.tokens.size());
  for (size_t i = 0; i < res.tokens.size(); ++i) {
    EXPECT_EQ(res.logprobs[i].token, res.tokens[i]);
    ASSERT_EQ(res.logprobs[i].top.size(), 3u);
    EXPECT_EQ(res.logprobs[i].top[0].first, res.tokens[i]);  // greedy = most likely
    EXPECT_FLOAT_EQ(res.logprobs[i].top[0].second, res.logprobs[i].logprob);
    EXPECT_LT(res.logprobs[i].logprob, 0.f);
  }
}

// Prompt logprobs (vLLM's prompt_logprobs, the completions API's echo with logprobs) against transformers' fp32 logits of
// every prompt row (golden prompts 1 and 2, 9 and 40 tokens): the logprob of each prompt token after the first, its
// rank and the top alternatives, in chunks of 16 rows and in one, alone and beside other requests.
void expect_prompt_logprobs_match_reference(const Result& res, size_t prompt, int32_t k) {
  auto& f = fx();
  const auto& p = f.prompts[prompt];
  std::vector<int64_t> shape;
  static const test::Golden g(test::data_dir() + "/tiny-moe/golden.safetensors");
  const auto ref = g.f32("int4.fp32.prompt" + std::to_string(prompt) + ".logits", &shape);
  const int64_t V = shape[1];
  ASSERT_EQ(shape[0], int64_t(p.size()));
  ASSERT_EQ(res.prompt_logprobs.size(), p.size() - 1);
  EXPECT_EQ(res.prompt_logprob_deltas, 1);
  std::vector<float> ours, theirs, ours_top, theirs_top;
  for (size_t i = 0; i + 1 < p.size(); ++i) {
    const float* z = ref.data() + int64_t(i) * V;
    double mx = -INFINITY, sum = 0;
    for (int64_t j = 0; j < V; ++j) mx = std::max(mx, double(z[j]));
    for (int64_t j = 0; j < V; ++j) sum += std::exp(double(z[j]) - mx);
    const double lse = mx + std::log(sum);
    const sampling::TokenLogprob& t = res.prompt_logprobs[i];
    const int32_t tok = p[i + 1];
    EXPECT_EQ(t.token, tok);
    ours.push_back(t.logprob);
    theirs.push_back(float(double(z[tok]) - lse));
    // The rank, where no other logit lies within 1e-4 of the token's (the engine's error is ~1e-6).
    int32_t lo = 0, hi = 0;
    for (int64_t j = 0; j < V; ++j) lo += z[j] >= z[tok] + 1e-4f, hi += z[j] >= z[tok] - 1e-4f;
    EXPECT_GE(t.rank, lo) << "row " << i;
    EXPECT_LE(t.rank, hi) << "row " << i;
    EXPECT_GE(t.rank, 1);
    std::vector<int32_t> ids(static_cast<size_t>(V));
    for (int64_t j = 0; j < V; ++j) ids[size_t(j)] = int32_t(j);
    std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [&](int32_t a, int32_t b) { return z[a] > z[b]; });
    ASSERT_EQ(t.top.size(), size_t(k));
    for (int32_t q = 0; q < k; ++q) {
      ours_top.push_back(t.top[size_t(q)].second);
      theirs_top.push_back(float(double(z[ids[size_t(q)]]) - lse));
      if (q == 0 && z[ids[0]] - z[ids[1]] > 1e-4f) EXPECT_EQ(t.top[0].first, ids[0]) << "row " << i;
      if (t.top[size_t(q)].first == tok) EXPECT_FLOAT_EQ(t.top[size_t(q)].second, t.logprob);
    }
  }
  const double e = test::rel_l2(ours, theirs), et = test::rel_l2(ours_top, theirs_top);
  std::printf("  prompt %zu: prompt logprobs rel L2 %.2e, top-%d %.2e\n", prompt, e, k, et);
  EXPECT_LT(e, 1e-4);
  EXPECT_LT(et, 1e-4);
}

TEST(Engine, PromptLogprobsMatchTheReference) {
  auto& f = fx();
  for (size_t prompt : {size_t(1), size_t(2)}) {
    auto r = make_req(1, f.prompts[prompt], 3);
    r->prompt_logprobs = 4;
    const Result alone = run_alone(*r);
    EXPECT_EQ(alone.error, "");
    EXPECT_EQ(alone.tokens, std::vector<int32_t>(f.greedy[prompt].begin(), f.greedy[prompt].begin() + 3));
    expect_prompt_logprobs_match_reference(alone, prompt, 4);
    // Chunks of 16 rows beside two other requests (one with prompt logprobs of its own, k = 0).
    EngineConfig c = base_config();
    c.max_num_batched_tokens = 16;
    Engine e(*f.m, c);
    auto a = make_req(1, f.prompts[prompt], 3), o = make_req(2, f.prompts[3], 4), z = make_req(3, f.prompts[2], 2);
    a->prompt_logprobs = 4;
    z->prompt_logprobs = 0;
    for (auto& x : {a, o, z}) e.submit(x);
    drain(e);
    const Result ra = collect(*a, 0ms), ro = collect(*o, 0ms), rz = collect(*z, 0ms);
    expect_prompt_logprobs_match_reference(ra, prompt, 4);
    EXPECT_EQ(ra.tokens, alone.tokens);
    EXPECT_TRUE(ro.prompt_logprobs.empty());
    EXPECT_EQ(ro.tokens, std::vector<int32_t>(f.greedy[3].begin(), f.greedy[3].begin() + 4));
    ASSERT_EQ(rz.prompt_logprobs.size(), f.prompts[2].size() - 1);
    for (auto& t : rz.prompt_logprobs) EXPECT_TRUE(t.top.empty());
    expect_empty(e.metrics());
  }
}

// A prompt with prompt logprobs resumes from no prefix-cache checkpoint (every row's logits are needed), leaves its
// own, and after a preemption (recompute) hands over its prompt logprobs once, the same.
TEST(Engine, PromptLogprobsSkipCheckpointsAndSurvivePreemption) {
  auto& f = fx();
  EngineConfig c = base_config();
  c.prefix_cache_checkpoints = 4;
  Engine e(*f.m, c);
  auto first = make_req(1, f.prompts[2], 2);
  first->prompt_logprobs = 2;
  const Result r1 = run_on(e, first);
  expect_prompt_logprobs_match_reference(r1, 2, 2);
  auto again = make_req(2, f.prompts[2], 2);
  again->prompt_logprobs = 2;
  const Result r2 = run_on(e, again);
  EXPECT_EQ(r2.cached_tokens, 0);
  expect_prompt_logprobs_match_reference(r2, 2, 2);
  const Result r3 = run_on(e, make_req(3, f.prompts[2], 2));  // without: resumes from the checkpoints they left
  EXPECT_GT(r3.cached_tokens, 0);
  EXPECT_EQ(r3.tokens, r1.tokens);

  // Preemption: a pool too small for all of them at once.
  auto reqs = mix12();
  for (size_t i = 0; i < reqs.size(); i += 3) reqs[i]->prompt_logprobs = 1;
  EngineConfig p = base_config();
  p.max_num_seqs = 6;
  p.max_num_batched_tokens = 96;
  p.num_blocks = 26;
  Engine small(*f.m, p);
  for (auto& r : reqs) small.submit(r);
  drain(small);
  const auto& alone = mix12_alone();
  for (size_t i = 0; i < reqs.size(); ++i) {
    const Result res = collect(*reqs[i], 0ms);
    EXPECT_EQ(res.tokens, alone[i].tokens) << "request " << i;
    if (i % 3) {
      EXPECT_EQ(res.prompt_logprob_deltas, 0);
      continue;
    }
    EXPECT_EQ(res.prompt_logprob_deltas, reqs[i]->prompt.size() > 1 ? 1 : 0) << "request " << i;  // none for 1 token
    EXPECT_EQ(res.prompt_logprobs.size(), reqs[i]->prompt.size() - 1) << "request " << i;
    for (size_t j = 0; j < res.prompt_logprobs.size(); ++j) {
      EXPECT_EQ(res.prompt_logprobs[j].token, reqs[i]->prompt[j + 1]);
      EXPECT_EQ(res.prompt_logprobs[j].top.size(), 1u);
    }
  }
  EXPECT_GT(small.metrics().preemptions_total, 0);
}

// Tokens per step (/metrics' iteration_tokens_total): a 40-token prompt in chunks of 16 then 9 decode steps: steps of
// 16, 16, 8 and nine of 1.
TEST(Engine, IterationTokensCountEveryStep) {
  auto& f = fx();
  EngineConfig c = base_config();
  c.max_num_batched_tokens = 16;
  Engine e(*f.m, c);
  const Result r = run_on(e, make_req(1, f.prompts[2], 10));
  ASSERT_EQ(r.tokens.size(), 10u);
  const EngineMetrics m = e.metrics();
  std::vector<int64_t> want(std::size(EngineMetrics::kIterationTokenBounds) + 1, 0);
  want[0] = 9;  // <= 1
  want[1] = 1;  // 8
  want[2] = 2;  // 16
  EXPECT_EQ(m.iteration_tokens, want);
  EXPECT_EQ(m.iteration_tokens_sum, 40 + 9);
  EXPECT_EQ(m.steps_total, 12);
}

TEST(Engine, AbortMidGenerationFreesMemory) {
  auto& f = fx();
  Engine e(*f.m, base_config());
  e.start();
  auto r = make_req(7, f.prompts[2], 400);
  e.submit(r);
  int got = 0;
  while (got < 3) {
    auto d = r->out->pop(60000ms);
    ASSERT_TRUE(d.has_value());
    ASSERT_EQ(d->finish, FinishReason::None);
    got += int(d->tokens.size());
  }
  EXPECT_GT(e.metrics().kv_blocks_used, 0);
  EXPECT_EQ(e.metrics().slots_used, 1);
  e.abort(7);
  auto res = collect(*r);
  EXPECT_EQ(res.finish, FinishReason::Abort);
  EXPECT_LT(int64_t(got + res.tokens.size()), 400);
  for (int i = 0; i < 200 && e.metrics().kv_blocks_used > 0; ++i) std::this_thread::sleep_for(5ms);
  expect_empty(e.metrics());
  EXPECT_EQ(e.metrics().requests_finished[int(FinishReason::Abort)], 1);
  e.abort(7);    // already gone: ignored
  e.abort(999);  // never existed: ignored
  // The same id may be used again once finished.
  auto again = make_req(7, f.prompts[0], 3);
  e.submit(again);
  EXPECT_EQ(collect(*again).tokens, std::vector<int32_t>(f.greedy[0].begin(), f.greedy[0].begin() + 3));
  e.stop();
}

TEST(Engine, AbortWhileWaitingAndStopEndsTheRest) {
  auto& f = fx();
  EngineConfig c = base_config();
  c.max_num_seqs = 1;
  Engine e(*f.m, c);
  auto a = make_req(1, f.prompts[1], 50), b = make_req(2, f.prompts[1], 50), d = make_req(3, f.prompts[0], 50);
  e.submit(a);
  e.submit(b);
  e.step();  // a runs, b waits
  EXPECT_EQ(e.metrics().running, 1);
  EXPECT_EQ(e.metrics().waiting, 1);
  e.abort(2);
  e.step();
  auto rb = collect(*b, 0ms);
  EXPECT_EQ(rb.finish, FinishReason::Abort);
  EXPECT_TRUE(rb.tokens.empty());
  EXPECT_EQ(e.metrics().waiting, 0);
  e.submit(d);  // never stepped: stop() ends it
  e.stop();
  EXPECT_EQ(collect(*a, 0ms).finish, FinishReason::Abort);
  EXPECT_EQ(collect(*d, 0ms).finish, FinishReason::Abort);
  expect_empty(e.metrics());
  EXPECT_THROW(e.submit(make_req(4, f.prompts[0], 5)), Error);
}

TEST(Engine, RejectsRequestsThatCanNeverRun) {
  auto& f = fx();
  EngineConfig c = base_config();
  c.max_model_len = 100;
  c.num_blocks = 4;  // 64 tokens
  Engine e(*f.m, c);
  auto msg = [&](std::shared_ptr<Request> r) {
    try {
      e.submit(r);
    } catch (const Error& ex) {
      return std::string(ex.what());
    }
    return std::string("accepted");
  };
  std::string m = msg(make_req(1, f.prompts[3], 5));  // 150 + 5 > 100
  EXPECT_NE(m.find("maximum context length is 100"), std::string::npos) << m;
  EXPECT_NE(m.find("155"), std::string::npos) << m;
  m = msg(make_req(2, f.prompts[2], 61));  // 40 + 61 > 100
  EXPECT_NE(m.find("maximum context length"), std::string::npos) << m;
  m = msg(make_req(3, f.prompts[2], 30));  // 70 tokens fit max_model_len but not the 4-block pool
  EXPECT_NE(m.find("KV blocks"), std::string::npos) << m;
  m = msg(make_req(4, {}, 5));
  EXPECT_NE(m.find("at least 1 token"), std::string::npos) << m;
  m = msg(make_req(5, {1, 2, 5000}, 5));
  EXPECT_NE(m.find("token id 5000 at position 2"), std::string::npos) << m;
  m = msg(make_req(6, {1, 2}, 0));
  EXPECT_NE(m.find("max_tokens"), std::string::npos) << m;
  auto bad = make_req(7, {1, 2}, 5);
  bad->sampling.top_p = 0.f;
  m = msg(bad);
  EXPECT_NE(m.find("top_p"), std::string::npos) << m;
  EXPECT_EQ(msg(make_req(8, {1, 2}, 5)), "accepted");
  m = msg(make_req(8, {1, 2}, 5));
  EXPECT_NE(m.find("already in flight"), std::string::npos) << m;
  EXPECT_EQ(e.metrics().waiting, 1);  // only the accepted one
}

TEST(Engine, AFailingRequestFailsAlone) {
  auto& f = fx();
  EngineConfig c = base_config();
  c.check_prompt_ids = false;  // let a bad id through so the forward throws inside a step
  Engine e(*f.m, c);
  std::vector<std::shared_ptr<Request>> reqs;
  for (size_t i = 0; i < 4; ++i) reqs.push_back(make_req(i, f.prompts[i], 12));
  auto bad = make_req(99, f.prompts[1], 12);
  bad->prompt[4] = 5000;
  e.submit(reqs[0]);
  e.step();  // request 0 is already decoding when the bad one joins
  e.submit(reqs[1]);
  e.submit(bad);
  e.submit(reqs[2]);
  e.submit(reqs[3]);
  drain(e);
  auto rb = collect(*bad, 0ms);
  EXPECT_EQ(rb.finish, FinishReason::Error);
  EXPECT_NE(rb.error.find("5000"), std::string::npos) << rb.error;
  for (size_t i = 0; i < reqs.size(); ++i) {
    auto res = collect(*reqs[i], 0ms);
    EXPECT_EQ(res.finish, FinishReason::Length) << "request " << i << ": " << res.error;
    EXPECT_EQ(res.tokens, std::vector<int32_t>(f.greedy[i].begin(), f.greedy[i].begin() + 12)) << "request " << i;
  }
  EXPECT_EQ(e.metrics().requests_finished[int(FinishReason::Error)], 1);
  expect_empty(e.metrics());
  // The engine keeps serving.
  auto after = make_req(50, f.prompts[0], 4);
  e.submit(after);
  drain(e);
  EXPECT_EQ(collect(*after, 0ms).tokens, std::vector<int32_t>(f.greedy[0].begin(), f.greedy[0].begin() + 4));
}


// ---------------------------------------------------------------------------------------------------
// Grammar masks ahead (EngineConfig::parallel_masks, docs/engine.md "Sampler"): the masks of a step's constrained
// rows are computed on worker threads during the forward.

// The tiny model's vocabulary as a grammar sees it (masker_util.h), and its added tokens' ids.
constexpr int32_t kToolCall = 1998, kToolCallEnd = 1999, kThinkEnd = 2009;
using test::text_of;
using test::tiny_masker;

const char* kMaskSchema = R"({"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer"}, "color": {"enum": ["red", "green", "blue"]}}, "required": ["name", "age", "color"],
    "additionalProperties": false})";
const char* kMaskTools = R"([{"type": "function", "function": {"name": "get_weather", "strict": true, "parameters": {"type": "object",
    "properties": {"city": {"type": "string", "maxLength": 6}, "days": {"type": "integer"}}, "required": ["city"]}}}])";

void constrain(Request& r, sampling::GrammarPtr g) {
  r.sampling.grammar = std::move(g);
  r.sampling.masker = tiny_masker();
}

// Constrained requests of every kind beside unconstrained ones, prompts long enough to prefill in several chunks.
std::vector<std::shared_ptr<Request>> mask_mix() {
  auto& f = fx();
  const auto schema = sampling::grammar_json_schema(nlohmann::ordered_json::parse(kMaskSchema));
  const auto tools = nlohmann::ordered_json::parse(kMaskTools);
  auto prompt = [&](int i) {
    auto p = f.prompts[size_t(i % 5)];
    p.resize(std::min<size_t>(p.size(), 40 + size_t(i) * 7));
    return p;
  };
  std::vector<std::shared_ptr<Request>> v;
  auto add = [&](std::shared_ptr<Request> r) {
    v.push_back(r);
    return r;
  };
  add(make_req(0, prompt(0), 20));                      // unconstrained, greedy
  constrain(*add(make_req(1, prompt(1), 40)), schema);  // json_schema, greedy
  constrain(*add(make_req(2, prompt(1), 40)), schema);  // the same: its position equals request 1's every step
  constrain(*add(make_req(3, prompt(2), 30, 0.8f, 31)), sampling::grammar_json_object());  // sampled json_object
  add(make_req(4, prompt(3), 24, 0.9f, 41));            // unconstrained, sampled
  {  // thinking, a budget (forced </think>), then the schema
    auto r = add(make_req(5, prompt(4), 40, 0.7f, 51));
    constrain(*r, schema);
    r->sampling.think_end = kThinkEnd;
    r->sampling.thinking_budget = 3;
    r->sampling.logprobs = 2;  // the forced </think>'s too
  }
  {  // tool_choice auto with a strict tool: a lazy grammar, the trigger and the close favoured so calls happen
    auto r = add(make_req(6, prompt(5), 64));
    constrain(*r, sampling::grammar_tool_call(tools, "", true));
    r->sampling.grammar_lazy = true;
    r->sampling.grammar_trigger = kToolCall;
    r->sampling.grammar_close = kToolCallEnd;
    r->sampling.logit_bias = {{kToolCall, 30.f}, {kToolCallEnd, 30.f}};
  }
  {  // tool_choice required: engaged past the prompt's forced prefix, then another call or the end (a fixed list)
    auto r = add(make_req(7, prompt(6), 64, 0.7f, 71));
    constrain(*r, sampling::grammar_tool_call(tools));
    r->sampling.grammar_trigger = kToolCall;
    r->sampling.grammar_close = kToolCallEnd;
    r->sampling.grammar_prefix = "\n<function=";
    r->sampling.after_close = sampling::SamplingParams::AfterClose::kCallOrEnd;
    r->sampling.logit_bias = {{kToolCallEnd, 30.f}};
  }
  {  // min_tokens with a grammar
    auto r = add(make_req(8, prompt(7), 30));
    constrain(*r, sampling::grammar_json_object());
    r->sampling.min_tokens = 6;
  }
  add(make_req(9, prompt(8), 16, 0.f))->sampling.allowed_ids = {5, 70, 300, 1200};  // a host mask, not a grammar
  return v;
}

struct MaskRun {
  std::vector<Result> out;
  EngineMetrics m;
};

MaskRun run_mask_mix(bool parallel, int64_t threads = 0, bool device = true) {
  auto reqs = mask_mix();
  EngineConfig c = base_config();
  c.max_num_seqs = 5;              // requests wait and join running batches
  c.max_num_batched_tokens = 48;   // prompts prefill in chunks, the last one sampling
  c.parallel_masks = parallel;
  c.device_sampling = device;
  c.mask_threads = threads;
  Engine e(*fx().m, c);
  for (auto& r : reqs) e.submit(r);
  drain(e);
  MaskRun run;
  for (auto& r : reqs) run.out.push_back(collect(*r, 0ms));
  run.m = e.metrics();
  expect_empty(run.m);
  return run;
}

// The same tokens with the masks computed ahead on the workers as on the engine thread at sampling, for every kind
// of constrained row, and with the masked rows sampled on the backend (Backend::sample_rows with their masks, the
// default) as on the host (sampling::sample); the constrained outputs are their grammars' text; unconstrained
// requests get their alone outputs.
TEST(EngineMasks, AheadAndSerialGiveTheSameTokens) {
  const MaskRun serial = run_mask_mix(false);
  const MaskRun ahead = run_mask_mix(true);
  const MaskRun one = run_mask_mix(true, 1);  // one worker: the engine thread takes jobs too
  const MaskRun host = run_mask_mix(true, 0, false);
  const MaskRun host_serial = run_mask_mix(false, 0, false);
  ASSERT_EQ(serial.out.size(), ahead.out.size());
  for (size_t i = 0; i < serial.out.size(); ++i) {
    SCOPED_TRACE("request " + std::to_string(i) + ": " + text_of(serial.out[i].tokens));
    EXPECT_NE(serial.out[i].finish, FinishReason::Error) << serial.out[i].error;
    for (const MaskRun* r : {&ahead, &one, &host, &host_serial}) {
      EXPECT_EQ(r->out[i].tokens, serial.out[i].tokens);
      EXPECT_EQ(r->out[i].finish, serial.out[i].finish);
      EXPECT_EQ(r->out[i].error, serial.out[i].error);
      ASSERT_EQ(r->out[i].logprobs.size(), serial.out[i].logprobs.size());
      for (size_t j = 0; j < serial.out[i].logprobs.size(); ++j) {
        EXPECT_EQ(r->out[i].logprobs[j].token, serial.out[i].logprobs[j].token);
        EXPECT_EQ(r->out[i].logprobs[j].logprob, serial.out[i].logprobs[j].logprob);
        EXPECT_EQ(r->out[i].logprobs[j].top, serial.out[i].logprobs[j].top);
      }
    }
    EXPECT_GT(serial.out[i].tokens.size(), 0u);
  }
  // Which path sampled: every step on the device by default (the budget's forced </think> of request 5 too).
  EXPECT_EQ(host.m.device_sample_steps_total, 0);
  for (const MaskRun* r : {&serial, &ahead}) EXPECT_EQ(r->m.device_sample_steps_total, r->m.steps_total);
  EXPECT_EQ(host.m.grammar_masks_ahead_total, ahead.m.grammar_masks_ahead_total);
  // What the grammars made: JSON of the schema where it ended, the same for the request at the same positions.
  const auto& o = serial.out;
  EXPECT_EQ(o[2].tokens, o[1].tokens);
  for (size_t i : {1, 2, 5}) {
    auto toks = o[i].tokens;
    if (i == 5) {
      auto it = std::find(toks.begin(), toks.end(), kThinkEnd);
      ASSERT_NE(it, toks.end());
      EXPECT_EQ(it - toks.begin(), 3) << "the thinking budget";
      ASSERT_EQ(o[i].logprobs.size(), o[i].tokens.size());
      EXPECT_EQ(o[i].logprobs[3].token, kThinkEnd);
      toks.erase(toks.begin(), it + 1);
    }
    if (o[i].finish != FinishReason::Stop) continue;
    const auto v = nlohmann::json::parse(text_of(toks));
    EXPECT_TRUE(v.contains("name") && v.contains("age") && v.contains("color")) << v.dump();
  }
  EXPECT_GE(std::count(o[6].tokens.begin(), o[6].tokens.end(), kToolCallEnd), 1) << "no call in the lazy request";
  EXPECT_GE(std::count(o[7].tokens.begin(), o[7].tokens.end(), kToolCallEnd), 1) << "the required call did not close";
  for (int32_t t : o[9].tokens) EXPECT_TRUE(t == 5 || t == 70 || t == 300 || t == 1200) << t;
  for (size_t i : {0, 4}) EXPECT_EQ(o[i].tokens, run_alone(*mask_mix()[i]).tokens) << "request " << i;
  // Where the masks came from.
  EXPECT_EQ(serial.m.grammar_masks_ahead_total, 0);
  EXPECT_GT(ahead.m.grammar_masks_ahead_total, 100);
  EXPECT_EQ(ahead.m.grammar_masks_stale_total, 0);
  EXPECT_EQ(one.m.grammar_masks_ahead_total, ahead.m.grammar_masks_ahead_total);
  std::printf("  %lld masks made ahead in %lld steps\n", (long long)ahead.m.grammar_masks_ahead_total,
              (long long)ahead.m.steps_total);
}

// An exception computing a mask on a worker ends that request only (as the masker's exception inside sample() does);
// the others get the tokens they get without it, and the engine, run by its own thread, keeps serving; stop() and
// the destructor leave no thread behind.
TEST(EngineMasks, AMaskErrorFailsOnlyItsRequest) {
  auto count_threads = [] {
    size_t n = 0;
    for ([[maybe_unused]] auto& e : std::filesystem::directory_iterator("/proc/self/task")) ++n;
    return n;
  };
  const bool proc = std::filesystem::exists("/proc/self/task");
  const MaskRun ref = run_mask_mix(true);  // also starts OpenMP's threads, which stay
  const size_t threads_before = proc ? count_threads() : 0;
  {
    std::atomic<int> calls{0};
    EngineConfig c = base_config();
    c.max_num_seqs = 5;
    c.max_num_batched_tokens = 48;
    c.mask_hook = [&](uint64_t id) {
      if (id == 3 && ++calls == 4) throw Error("mask hook: request 3's fourth mask");
    };
    Engine e(*fx().m, c);
    e.start();
    auto reqs = mask_mix();
    for (auto& r : reqs) e.submit(r);
    for (size_t i = 0; i < reqs.size(); ++i) {
      const Result res = collect(*reqs[i]);
      if (i == 3) {
        EXPECT_EQ(res.finish, FinishReason::Error);
        EXPECT_EQ(res.error, "sampling: mask hook: request 3's fourth mask");
        EXPECT_EQ(res.tokens, std::vector<int32_t>(ref.out[3].tokens.begin(), ref.out[3].tokens.begin() + 3))
            << "three tokens before the failing mask";
        continue;
      }
      EXPECT_EQ(res.tokens, ref.out[i].tokens) << "request " << i;
      EXPECT_EQ(res.finish, ref.out[i].finish) << "request " << i;
    }
    // Still serving constrained requests.
    auto again = mask_mix()[1];
    again->id = 100;
    e.submit(again);
    EXPECT_EQ(collect(*again).tokens, ref.out[1].tokens);
    for (int i = 0; i < 200 && e.metrics().running + e.metrics().waiting > 0; ++i) std::this_thread::sleep_for(5ms);
    EXPECT_EQ(e.metrics().requests_finished[int(FinishReason::Error)], 1);
    EXPECT_GT(e.metrics().grammar_masks_ahead_total, 0);
    EXPECT_GT(count_threads(), threads_before) << "the engine thread and the mask workers";
    e.stop();
  }
  // (An OpenMP team the engine thread started ends with that thread, asynchronously: give it a moment.)
  for (int i = 0; i < 100 && proc && count_threads() > threads_before; ++i) std::this_thread::sleep_for(10ms);
  if (proc) EXPECT_EQ(count_threads(), threads_before) << "threads left behind";
}


// Step wall times (printed, never asserted; bench/RESULTS.md "Structured output: the vocabulary mask"): N sequences
// inside a bounded JSON string (each character a new position, so every mask is cold) constrained with the real
// Qwen3 vocabulary's masker (151,669 tokens; the tiny model samples its first 2,048 ids), beside 4 unconstrained
// ones, masks ahead on the workers vs on the engine thread at sampling (DS_SERIAL_MASKS=1's path).
TEST(EngineMasks, StepTimesOnTheRealVocabulary) {
  const std::string path = std::string(DS_SHARED_DIR) + "/assets/qwen3-tokenizer/tokenizer.json";
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "no " << path;
  const auto tok = text::Tokenizer::load(path);
  std::vector<std::string> bytes(size_t(tok.vocab_size()));
  for (int32_t id = 0; id < tok.vocab_size(); ++id)
    if (!tok.is_added(id)) bytes[size_t(id)] = std::string(tok.token_bytes(id));
  auto& f = fx();
  const int steps = 20;
  auto time_steps = [&](int n, bool parallel) {
    // A fresh masker: its cache must not hold the positions an earlier run went through (same seeds, same tokens).
    const auto masker = std::make_shared<const sampling::TokenMasker>(bytes);
    EngineConfig c = base_config();
    c.max_num_seqs = 16;
    c.parallel_masks = parallel;
    Engine e(*f.m, c);
    std::vector<std::shared_ptr<Request>> reqs;
    for (int i = 0; i < n + 4; ++i) {
      auto p = f.prompts[size_t(i % 5)];
      p.resize(16);
      auto r = make_req(uint64_t(i), p, steps + 8, 0.8f, uint64_t(i));
      if (i < n) {  // a string of 400 to 400 + i characters: a distinct grammar each, no shared positions
        r->sampling.grammar = sampling::grammar_json_schema(nlohmann::ordered_json::parse(
            "{\"type\": \"string\", \"minLength\": 400, \"maxLength\": " + std::to_string(400 + i) + "}"));
        r->sampling.masker = masker;
        r->sampling.grammar_prefix = "\"";                        // inside the string from the first token
        r->sampling.logit_bias = {{1984, -100.f}, {1986, -100.f}};  // the end ids are ordinary Qwen3 tokens
      }
      reqs.push_back(r);
      e.submit(r);
    }
    for (int i = 0; i < 3; ++i) e.step();  // prefill, first decodes
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < steps; ++i) e.step();
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / steps;
    drain(e);
    for (int i = 0; i < n; ++i) EXPECT_NE(collect(*reqs[size_t(i)], 0ms).finish, FinishReason::Error);
    if (parallel && n > 0) EXPECT_GE(e.metrics().grammar_masks_ahead_total, n * steps);
    return ms;
  };
  {  // one such mask alone, cold, on this thread: the cost the serial path adds per constrained row
    const sampling::TokenMasker tm(bytes);
    sampling::Matcher mt(sampling::grammar_json_schema(
        nlohmann::ordered_json::parse(R"({"type": "string", "minLength": 400, "maxLength": 400})")));
    mt.advance("\"abc");
    std::vector<uint32_t> bits;
    double best = 1e9;
    for (int r = 0; r < 5; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      tm.allowed_uncached(mt, bits);
      best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::printf("  one mask inside the string, cold: %.2f ms (best of 5)\n", best);
  }
  std::printf("  %u hardware threads, %lld mask workers; ms per decode step, %d steps, 4 unconstrained rows +\n",
              std::thread::hardware_concurrency(), (long long)Engine(*f.m, base_config()).config().mask_threads, steps);
  std::printf("  %-14s %10s %10s %10s\n", "constrained", "serial", "ahead", "saved");
  std::fflush(stdout);
  for (int n : {0, 1, 2, 4, 8}) {
    double serial = 1e9, ahead = 1e9;  // the best of 3 runs each, alternating (a shared machine is noisy)
    for (int rep = 0; rep < 3; ++rep) {
      serial = std::min(serial, time_steps(n, false));
      ahead = std::min(ahead, time_steps(n, true));
    }
    std::printf("  %-14d %10.2f %10.2f %10.2f\n", n, serial, ahead, serial - ahead);
  }
}

}  // namespace
}  // namespace ds::runtime
