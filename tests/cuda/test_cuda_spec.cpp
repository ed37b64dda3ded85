// Speculative decoding on the CUDA backend (issue 8 item 4): the engine with step graphs (verify steps through
// forward_graphed, drafts through mtp_forward_graphed, both CUDA graphs recorded per shape) gives the same tokens as
// the engine with every step eager, with an oracle so that drafts are accepted and partly rejected, three
// sequences batched (different accepted counts, so the drafting rows are not a prefix), full and reduced draft
// head. Greedy verification is exact, so any difference in a recorded step's inputs shows up as different tokens.
#include <gtest/gtest.h>

#include <memory>
#include <random>
#include <tuple>

#include "backend/ops.h"
#include "cuda_test_util.h"
#include "model/model.h"
#include "runtime/engine.h"
#include "runtime/spec_decode.h"

namespace ds {
namespace {

using namespace std::chrono_literals;

std::vector<std::vector<int32_t>> run(model::Model& m, runtime::EngineConfig c,
                                      const std::vector<std::vector<int32_t>>& prompts, int64_t n,
                                      runtime::EngineMetrics* mt) {
  runtime::Engine e(m, c);
  std::vector<std::shared_ptr<runtime::Request>> rs;
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto r = std::make_shared<runtime::Request>();
    r->id = i;
    r->prompt = prompts[i];
    r->max_tokens = n;
    r->sampling.temperature = 0.f;
    r->ignore_eos = true;
    e.submit(r);
    rs.push_back(r);
  }
  while (e.step()) {
  }
  std::vector<std::vector<int32_t>> out;
  for (auto& r : rs) {
    std::vector<int32_t> t;
    while (auto d = r->out->pop(0ms)) t.insert(t.end(), d->tokens.begin(), d->tokens.end());
    out.push_back(t);
  }
  if (mt) *mt = e.metrics();
  return out;
}

TEST(CudaSpec, GraphedVerifyAndDraftMatchEager) {
  DS_REQUIRE_GPU();
  auto be = make_cuda_backend(0);
  model::LoadOptions lo;
  lo.draft_vocab = runtime::draft_vocab_ids(512, "", 2048);
  auto m = model::Model::load(test::cuda_data_dir() + "/tiny-moe/tiny-moe-int4", *be, nullptr, lo);
  ASSERT_TRUE(m->has_mtp());
  std::vector<std::vector<int32_t>> prompts = {{1, 2, 3, 4, 5}, {}, {}};
  for (int i = 0; i < 17; ++i) prompts[1].push_back(7 + 3 * i);
  for (int i = 0; i < 30; ++i) prompts[2].push_back(100 + i);
  const int64_t n = 40;
  runtime::EngineConfig base;
  base.max_num_seqs = 4;
  base.max_model_len = 256;
  base.step_graphs = false;
  const auto plain = run(*m, base, prompts, n, nullptr);  // the oracle's source of the target's tokens
  for (int64_t K : {1, 3})
    for (int64_t dv : {int64_t(0), int64_t(512)}) {
      std::vector<std::vector<std::vector<int32_t>>> outs;
      std::vector<runtime::EngineMetrics> ms(2);
      std::vector<std::vector<int32_t>> props(2);
      for (int g = 0; g < 2; ++g) {
        runtime::EngineConfig c = base;
        c.num_speculative_tokens = K;
        c.draft_vocab_size = dv;
        c.step_graphs = g == 1;
        c.spec_step_graphs = g == 1;
        auto rng = std::make_shared<std::mt19937_64>(uint64_t(K * 100 + dv));
        auto* rec = &props[size_t(g)];
        c.draft_hook = [&, rng, rec](uint64_t id, int64_t index, int32_t proposed) {
          rec->push_back(proposed);
          const auto& w = plain[size_t(id)];
          const int64_t i = index - int64_t(prompts[size_t(id)].size());
          if (i < 0 || i >= int64_t(w.size())) return proposed;
          return ((*rng)() % 10) < 7 ? w[size_t(i)] : proposed;
        };
        outs.push_back(run(*m, c, prompts, n, &ms[size_t(g)]));
      }
      for (size_t i = 0; i < prompts.size(); ++i) {
        ASSERT_EQ(outs[1][i].size(), size_t(n));
        EXPECT_EQ(outs[1][i], outs[0][i]) << "K=" << K << " draft vocab " << dv << " prompt " << i;
      }
      EXPECT_GT(ms[1].spec_accepted_tokens_total, 0);
      EXPECT_LT(ms[1].spec_accepted_tokens_total, ms[1].spec_draft_tokens_total);  // some rejections happened
      // The MTP's own proposals: the recorded draft computes logits of every row (the eager one of the drafting
      // rows only), so a near-tie could in principle round the other way; expect (almost) all equal.
      size_t same = 0, cmp = std::min(props[0].size(), props[1].size());
      for (size_t i = 0; i < cmp; ++i) same += props[0][i] == props[1][i];
      std::printf("  K=%lld draft vocab %lld: %zu/%zu proposals equal, accepted %lld of %lld drafts\n", (long long)K,
                  (long long)dv, same, cmp, (long long)ms[1].spec_accepted_tokens_total,
                  (long long)ms[1].spec_draft_tokens_total);
      EXPECT_GE(double(same), 0.95 * double(cmp));
    }
}

}  // namespace
}  // namespace ds
