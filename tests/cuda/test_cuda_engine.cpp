// The engine on the CUDA backend: greedy output with decode steps through CUDA graphs
// (EngineConfig::step_graphs, the default) equals the output with every step eager, token for token, over a
// batched and chunked mix of the tiny-moe golden prompts (batch shapes change as requests finish).
#include <gtest/gtest.h>

#include <memory>

#include "backend/ops.h"
#include "cuda_test_util.h"
#include "golden_util.h"
#include "model/model.h"
#include "runtime/engine.h"

namespace ds {
namespace {

TEST(CudaEngine, GreedyIdenticalWithAndWithoutStepGraphs) {
  DS_REQUIRE_GPU();
  auto be = make_cuda_backend(0);
  const std::string dir = test::cuda_data_dir() + "/tiny-moe/";
  auto m = model::Model::load(dir + "tiny-moe-int4", *be);
  auto g = test::read_json(dir + "golden.json");
  std::vector<std::vector<int32_t>> prompts;
  for (auto& p : g["text"]["int4"]) prompts.push_back(p["prompt"].get<std::vector<int32_t>>());
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

}  // namespace
}  // namespace ds
