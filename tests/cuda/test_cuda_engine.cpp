// The engine on the CUDA backend: greedy output with decode steps through CUDA graphs
// (EngineConfig::step_graphs, the default) equals the output with every step eager, token for token, over a
// batched and chunked mix of the tiny-moe golden prompts (batch shapes change as requests finish); and sampling
// on the GPU (EngineConfig::device_sampling, the default) gives the host sampler's tokens, greedy and seeded.
#include <gtest/gtest.h>

#include <memory>

#include "backend/ops.h"
#include "cuda_test_util.h"
#include "golden_util.h"
#include "model/model.h"
#include "runtime/engine.h"

namespace ds {
namespace {

// The tiny MoE model (int4) on the GPU and its golden prompts.
struct TinyMoe {
  std::unique_ptr<Backend> be = make_cuda_backend(0);
  std::unique_ptr<model::Model> m;
  std::vector<std::vector<int32_t>> prompts;
  TinyMoe() {
    const std::string dir = test::cuda_data_dir() + "/tiny-moe/";
    m = model::Model::load(dir + "tiny-moe-int4", *be);
    auto g = test::read_json(dir + "golden.json");
    for (auto& p : g["text"]["int4"]) prompts.push_back(p["prompt"].get<std::vector<int32_t>>());
  }
};

TEST(CudaEngine, GreedyIdenticalWithAndWithoutStepGraphs) {
  DS_REQUIRE_GPU();
  TinyMoe t;
  auto& m = t.m;
  const auto& prompts = t.prompts;
  std::vector<std::vector<std::vector<int32_t>>> out(2);
  std::vector<int64_t> graph_steps(2);
  for (int on = 0; on < 2; ++on) {
    runtime::EngineConfig c;
    c.max_num_seqs = 3;
    c.max_num_batched_tokens = 64;
    c.max_model_len = 512;
    c.block_size = 16;
    c.step_graphs = on == 1;
    runtime::Engine e(*m, c);
    std::vector<std::shared_ptr<runtime::Request>> reqs;
    for (size_t i = 0; i < prompts.size() * 2; ++i) {
      auto r = std::make_shared<runtime::Request>();
      r->id = i;
      r->prompt = prompts[i % prompts.size()];
      if (i >= prompts.size()) r->prompt.resize(std::max<size_t>(1, r->prompt.size() / 2));
      r->max_tokens = 20 + int64_t(i) * 3;  // requests end at different steps: the batch shape changes
      r->ignore_eos = true;
      r->sampling.temperature = 0.f;
      e.submit(r);
      reqs.push_back(r);
    }
    while (e.step()) {
    }
    for (auto& r : reqs) {
      std::vector<int32_t> toks;
      while (auto d = r->out->pop(std::chrono::milliseconds(0))) toks.insert(toks.end(), d->tokens.begin(), d->tokens.end());
      EXPECT_EQ(int64_t(toks.size()), r->max_tokens) << "request " << r->id;
      out[size_t(on)].push_back(toks);
    }
    graph_steps[size_t(on)] = e.metrics().graph_steps_total;
  }
  for (size_t i = 0; i < out[0].size(); ++i) EXPECT_EQ(out[1][i], out[0][i]) << "request " << i;
  EXPECT_EQ(graph_steps[0], 0);
  EXPECT_GT(graph_steps[1], 10);
}

// Prefix caching on the GPU (docs/engine.md "Prefix caching"): the golden prompts twice on one engine (the second
// round resumes from the first round's checkpoints: the state copied device to device, the KV blocks shared) and
// conversations that continue them after the answers (finished requests' checkpoints, which end inside a block: the
// resumed sequences write copies of it); every greedy output equals the same request's on an engine without the
// cache. Then the same with one device slot for checkpoints and host memory for sixteen (--cache-ram): the states
// pushed out of the slot go to pinned host memory and come back by copies in stream order.
TEST(CudaEngine, PrefixCachingResumesWithTheSameTokens) {
  DS_REQUIRE_GPU();
  TinyMoe t;
  auto& m = t.m;
  const auto& prompts = t.prompts;
  auto config = [](int64_t checkpoints, int64_t host = 0) {
    runtime::EngineConfig c;
    c.prefix_cache_host_checkpoints = host;
    c.max_num_seqs = 4;
    c.max_num_batched_tokens = 64;
    c.max_model_len = 512;
    c.block_size = 16;
    c.prefix_cache_checkpoints = checkpoints;
    return c;
  };
  auto run = [&](runtime::Engine& e, const std::vector<std::vector<int32_t>>& ps, uint64_t base,
                 std::vector<int64_t>* cached = nullptr) {
    std::vector<std::shared_ptr<runtime::Request>> reqs;
    for (size_t i = 0; i < ps.size(); ++i) {
      auto r = std::make_shared<runtime::Request>();
      r->id = base + i;
      r->prompt = ps[i];
      r->max_tokens = 16;
      r->ignore_eos = true;
      r->sampling.temperature = 0.f;
      e.submit(r);
      reqs.push_back(r);
    }
    while (e.step()) {
    }
    std::vector<std::vector<int32_t>> out;
    for (auto& r : reqs) {
      std::vector<int32_t> toks;
      int64_t c = 0;
      while (auto d = r->out->pop(std::chrono::milliseconds(0))) {
        toks.insert(toks.end(), d->tokens.begin(), d->tokens.end());
        c = d->cached_tokens;
      }
      out.push_back(toks);
      if (cached) cached->push_back(c);
    }
    return out;
  };
  for (int64_t host : {0, 16}) {
    SCOPED_TRACE(host ? "one device slot, host memory" : "device slots");
    runtime::Engine e(*m, host ? config(1, host) : config(16));
    const auto first = run(e, prompts, 0);
    std::vector<int64_t> cached;
    const auto second = run(e, prompts, 100, &cached);
    std::vector<std::vector<int32_t>> turn2;
    for (size_t i = 0; i < prompts.size(); ++i) {
      turn2.push_back(prompts[i]);
      turn2.back().insert(turn2.back().end(), first[i].begin(), first[i].end());
      turn2.back().insert(turn2.back().end(), prompts[2].begin(), prompts[2].begin() + 10);
    }
    std::vector<int64_t> cached2;
    const auto continued = run(e, turn2, 200, &cached2);
    runtime::Engine plain(*m, config(0));
    const auto want_first = run(plain, prompts, 0);
    const auto want_continued = run(plain, turn2, 200);
    for (size_t i = 0; i < prompts.size(); ++i) {
      EXPECT_EQ(first[i], want_first[i]) << "prompt " << i;
      EXPECT_EQ(second[i], want_first[i]) << "prompt " << i << " again";
      EXPECT_EQ(continued[i], want_continued[i]) << "prompt " << i << " continued";
      EXPECT_EQ(cached[i], int64_t(prompts[i].size() - 1) / 16 * 16) << "prompt " << i;
      // Where the first round's answer ended (a finished request's checkpoint: its last token was never run).
      EXPECT_EQ(cached2[i], int64_t(prompts[i].size()) + 15) << "prompt " << i << " continued";
    }
    EXPECT_GT(e.metrics().prefix_cache_hits_total, 0);
    EXPECT_EQ(e.metrics().kv_blocks_used, 0);
    if (host) EXPECT_GT(e.metrics().prefix_cache_host_checkpoints, 0);
  }
}

// Greedy and seeded requests (every filter, penalties, bias) batched on the GPU: sample_rows on the device and the
// host sampler over the copied logits pick the same tokens. Both paths see the same logits (the forward does
// not depend on the sampler), so only a draw within float rounding of a cumulative boundary could differ
// (tests/cuda/test_cuda_sampling.cpp); over these ~300 draws that is not expected, so this requires equality.
// Every fourth request wants logprobs (5 alternatives): on the device they come from Backend::row_logprobs, on the
// host from the copied rows: the same top ids, logprobs within 1e-5.
TEST(CudaEngine, DeviceSamplingEqualsHostSampling) {
  DS_REQUIRE_GPU();
  TinyMoe t;
  auto& m = t.m;
  const auto& prompts = t.prompts;
  std::vector<std::vector<std::vector<int32_t>>> out(2);
  std::vector<std::vector<std::vector<sampling::TokenLogprob>>> lps(2);
  std::vector<int64_t> dev_steps(2);
  for (int on = 0; on < 2; ++on) {
    runtime::EngineConfig c;
    c.max_num_seqs = 4;
    c.max_num_batched_tokens = 64;
    c.max_model_len = 512;
    c.block_size = 16;
    c.vocab_limit = 2000;
    c.device_sampling = on == 1;
    runtime::Engine e(*m, c);
    std::vector<std::shared_ptr<runtime::Request>> reqs;
    for (size_t i = 0; i < prompts.size() * 2; ++i) {
      auto r = std::make_shared<runtime::Request>();
      r->id = i;
      r->prompt = prompts[i % prompts.size()];
      if (i >= prompts.size()) r->prompt.resize(std::max<size_t>(1, r->prompt.size() / 2));
      r->max_tokens = 24 + int64_t(i) * 2;
      r->ignore_eos = true;
      auto& sp = r->sampling;
      sp.seed = 500 + i;
      sp.temperature = i % 3 == 0 ? 0.f : 0.8f;
      if (i % 3 == 1) {
        sp.top_k = 20;
        sp.top_p = 0.9f;
        sp.min_p = 0.02f;
        sp.repetition_penalty = 1.2f;
        sp.presence_penalty = 0.3f;
        sp.frequency_penalty = 0.2f;
        sp.logit_bias = {{5, 1.5f}, {6, -50.f}};
      }
      if (i % 4 == 2) sp.logprobs = 5;
      e.submit(r);
      reqs.push_back(r);
    }
    while (e.step()) {
    }
    for (auto& r : reqs) {
      std::vector<int32_t> toks;
      std::vector<sampling::TokenLogprob> lp;
      while (auto d = r->out->pop(std::chrono::milliseconds(0))) {
        toks.insert(toks.end(), d->tokens.begin(), d->tokens.end());
        lp.insert(lp.end(), d->logprobs.begin(), d->logprobs.end());
      }
      EXPECT_EQ(int64_t(toks.size()), r->max_tokens) << "request " << r->id;
      EXPECT_EQ(lp.size(), r->sampling.logprobs >= 0 ? toks.size() : 0u) << "request " << r->id;
      out[size_t(on)].push_back(toks);
      lps[size_t(on)].push_back(lp);
    }
    dev_steps[size_t(on)] = e.metrics().device_sample_steps_total;
  }
  for (size_t i = 0; i < out[0].size(); ++i) EXPECT_EQ(out[1][i], out[0][i]) << "request " << i;
  int checked = 0;
  for (size_t i = 0; i < lps[0].size(); ++i)
    for (size_t j = 0; j < std::min(lps[0][i].size(), lps[1][i].size()); ++j) {
      const auto &h = lps[0][i][j], &d = lps[1][i][j];
      EXPECT_EQ(d.token, h.token);
      EXPECT_NEAR(d.logprob, h.logprob, 1e-5) << "request " << i << " token " << j;
      ASSERT_EQ(d.top.size(), 5u);
      ASSERT_EQ(h.top.size(), 5u);
      for (size_t q = 0; q < 5; ++q) {
        EXPECT_EQ(d.top[q].first, h.top[q].first) << "request " << i << " token " << j << " alternative " << q;
        EXPECT_NEAR(d.top[q].second, h.top[q].second, 1e-5) << "request " << i << " token " << j << " alternative " << q;
      }
      ++checked;
    }
  EXPECT_GT(checked, 40);
  EXPECT_EQ(dev_steps[0], 0);
  EXPECT_GT(dev_steps[1], 10);
}

// Prompt logprobs on the GPU (golden prompts 1 and 2, whose every row transformers dumped): the prompt tokens'
// logprobs against the fp32 reference's log-softmax within twice the error transformers' own bf16 run shows, chunked
// (16 rows per step) beside another request; k = 5 through Backend::row_logprobs / row_ranks, k = 25 (past the
// device's 20) through the host path: the same values within 1e-5, the same ids.
TEST(CudaEngine, PromptLogprobsMatchTheReference) {
  DS_REQUIRE_GPU();
  TinyMoe t;
  const test::Golden g(test::cuda_data_dir() + "/tiny-moe/golden.safetensors");
  for (size_t prompt : {size_t(1), size_t(2)}) {
    const auto& p = t.prompts[prompt];
    std::vector<std::vector<sampling::TokenLogprob>> got;
    for (int32_t k : {5, 25}) {
      runtime::EngineConfig c;
      c.max_num_seqs = 2;
      c.max_num_batched_tokens = 16;
      c.max_model_len = 512;
      c.block_size = 16;
      runtime::Engine e(*t.m, c);
      auto r = std::make_shared<runtime::Request>(), o = std::make_shared<runtime::Request>();
      r->id = 1, o->id = 2;
      r->prompt = p, o->prompt = t.prompts[3];
      r->max_tokens = 4, o->max_tokens = 6;
      r->prompt_logprobs = k;
      e.submit(r);
      e.submit(o);
      while (e.step()) {
      }
      std::vector<sampling::TokenLogprob> v;
      int carrying = 0;
      while (auto d = r->out->pop(std::chrono::milliseconds(0)))
        if (!d->prompt_logprobs.empty()) v = d->prompt_logprobs, ++carrying;
      EXPECT_EQ(carrying, 1);
      ASSERT_EQ(v.size(), p.size() - 1) << "k " << k;
      got.push_back(v);
    }
    std::vector<int64_t> shape;
    const auto ref = g.f32("int4.fp32.prompt" + std::to_string(prompt) + ".logits", &shape);
    const auto bf = g.f32("int4.bf16ref.prompt" + std::to_string(prompt) + ".logits");
    const int64_t V = shape[1];
    auto lp = [&](const std::vector<float>& z, size_t row, int32_t tok) {
      const float* x = z.data() + int64_t(row) * V;
      double mx = -INFINITY, sum = 0;
      for (int64_t j = 0; j < V; ++j) mx = std::max(mx, double(x[j]));
      for (int64_t j = 0; j < V; ++j) sum += std::exp(double(x[j]) - mx);
      return float(double(x[tok]) - mx - std::log(sum));
    };
    std::vector<float> ours, theirs, bf16;
    for (size_t i = 0; i + 1 < p.size(); ++i) {
      const auto &a = got[0][i], &b = got[1][i];
      EXPECT_EQ(a.token, p[i + 1]);
      ours.push_back(a.logprob);
      theirs.push_back(lp(ref, i, p[i + 1]));
      bf16.push_back(lp(bf, i, p[i + 1]));
      EXPECT_NEAR(a.logprob, b.logprob, 1e-5) << "row " << i;
      EXPECT_EQ(a.rank, b.rank) << "row " << i;
      EXPECT_GE(a.rank, 1);
      ASSERT_EQ(a.top.size(), 5u);
      ASSERT_EQ(b.top.size(), 25u);
      for (size_t q = 0; q < 5; ++q) {
        EXPECT_EQ(a.top[q].first, b.top[q].first) << "row " << i << " alternative " << q;
        EXPECT_NEAR(a.top[q].second, b.top[q].second, 1e-5) << "row " << i << " alternative " << q;
        if (a.top[q].first == a.token) EXPECT_GE(a.rank, int32_t(q) + 1);
      }
    }
    const double e = test::rel_l2(ours, theirs), eb = test::rel_l2(bf16, theirs);
    std::printf("  prompt %zu: prompt logprobs rel L2 %.3g (transformers bf16 %.3g)\n", prompt, e, eb);
    EXPECT_LE(e, 2 * eb);
  }
}

}  // namespace
}  // namespace ds
