// Step graphs (Model::forward_graphed: step arena + CUDA graph per batch shape) compute exactly what the eager
// forward computes: the same sequences decoded eagerly (cache set E) and through recorded graphs (cache set G)
// give bit-identical logits at every step, across a re-record (G's block table outgrowing its 16-entry padding,
// with blocks of 4 tokens) and a change of batch shape (every 10th step decodes two of the three sequences).
#include <gtest/gtest.h>

#include <cmath>

#include "backend/ops.h"
#include "cuda_test_util.h"
#include "model/model.h"
#include "runtime/cache.h"

namespace ds {
namespace {

TEST(CudaGraph, DecodeStepsMatchEager) {
  DS_REQUIRE_GPU();
  auto be = make_cuda_backend(0);
  const std::string dir = test::cuda_data_dir() + "/tiny-moe/tiny-moe-int4";
  auto m = model::Model::load(dir, *be);
  const int nseq = 3;
  runtime::CacheManager ce(*m, 512, 4, nseq), cg(*m, 512, 4, nseq);
  std::vector<runtime::SeqCache> se(nseq), sg(nseq);
  std::vector<std::vector<int32_t>> prompts = {{1, 2, 3, 4, 5}, {}, {}};
  for (int i = 0; i < 17; ++i) prompts[1].push_back(7 + 3 * i);
  for (int i = 0; i < 30; ++i) prompts[2].push_back(100 + i);
  for (int i = 0; i < nseq; ++i) {
    for (auto* p : {&ce, &cg}) {
      auto& s = p == &ce ? se[i] : sg[i];
      ASSERT_TRUE(p->start(s));
      ASSERT_TRUE(p->reserve(s, int64_t(prompts[i].size())));
      BatchMeta b = runtime::make_batch({{&s, prompts[i]}});
      m->forward(b, p->caches(), {int32_t(prompts[i].size() - 1)});
      s.len += int64_t(prompts[i].size());
    }
  }
  const int64_t V = m->config().text.vocab_size;
  std::vector<int32_t> next = {11, 22, 33};
  for (int step = 0; step < 48; ++step) {
    const int n = step % 10 == 9 ? 2 : 3;
    std::vector<std::pair<const runtime::SeqCache*, std::vector<int32_t>>> pe, pg;
    for (int i = 0; i < n; ++i) {
      ASSERT_TRUE(ce.reserve(se[i], 1));
      ASSERT_TRUE(cg.reserve(sg[i], 1));
      pe.push_back({&se[i], {next[i]}});
      pg.push_back({&sg[i], {next[i]}});
    }
    std::vector<int32_t> rows(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) rows[i] = i;
    BatchMeta be_ = runtime::make_batch(pe), bg = runtime::make_batch(pg);
    auto le = be->to_host_f32(m->forward(be_, ce.caches(), rows));
    auto lg = be->to_host_f32(m->forward_graphed(bg, cg.caches(), rows));
    ASSERT_EQ(le.size(), size_t(n * V));
    ASSERT_EQ(lg.size(), le.size());
    size_t worst = 0;
    for (size_t i = 0; i < le.size(); ++i)
      if (!(std::fabs(le[i] - lg[i]) <= std::fabs(le[worst] - lg[worst]))) worst = i;
    ASSERT_EQ(le[worst], lg[worst]) << "step " << step << ", row " << worst / V << ", column " << worst % V;
    for (int i = 0; i < n; ++i) {
      se[i].len += 1;
      sg[i].len += 1;
      int32_t best = 0;  // greedy next token, so the recorded steps see changing inputs
      for (int64_t v = 1; v < V; ++v)
        if (le[size_t(i * V + v)] > le[size_t(i * V + best)]) best = int32_t(v);
      next[i] = best;
    }
  }
}

// Two eager runs of the same steps agree bit for bit (the kernels are deterministic), so the graph test's
// equality is meaningful.
TEST(CudaGraph, EagerIsDeterministic) {
  DS_REQUIRE_GPU();
  auto be = make_cuda_backend(0);
  auto m = model::Model::load(test::cuda_data_dir() + "/tiny-moe/tiny-moe-int4", *be);
  std::vector<std::vector<float>> runs;
  for (int r = 0; r < 2; ++r) {
    runtime::CacheManager c(*m, 64, 16, 2);
    std::vector<runtime::SeqCache> s(2);
    for (auto& x : s) ASSERT_TRUE(c.start(x));
    std::vector<float> all;
    std::vector<int32_t> tok = {5, 9};
    for (int step = 0; step < 20; ++step) {
      std::vector<std::pair<const runtime::SeqCache*, std::vector<int32_t>>> parts;
      for (int i = 0; i < 2; ++i) {
        ASSERT_TRUE(c.reserve(s[i], 1));
        parts.push_back({&s[i], {tok[i] + step}});
      }
      BatchMeta b = runtime::make_batch(parts);
      auto l = be->to_host_f32(m->forward(b, c.caches(), {0, 1}));
      all.insert(all.end(), l.begin(), l.end());
      for (auto& x : s) x.len += 1;
    }
    runs.push_back(all);
  }
  ASSERT_EQ(runs[0], runs[1]);
}

}  // namespace
}  // namespace ds
