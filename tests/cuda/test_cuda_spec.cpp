// Speculative decoding on the CUDA backend (issue 8 item 4): the engine with step graphs (verify steps through
// forward_graphed, drafts through mtp_forward_graphed, both CUDA graphs recorded per shape) gives the same tokens as
// the engine with every step eager, with an oracle so that drafts are accepted and partly rejected, three
// sequences batched (different accepted counts, so the drafting rows are not a prefix), full and reduced draft
// head. Greedy verification is exact, so any difference in a recorded step's inputs shows up as different tokens.
#include <gtest/gtest.h>

#include <functional>
#include <memory>
#include <random>
#include <tuple>

#include "backend/ops.h"
#include "cuda_test_util.h"
#include "model/model.h"
#include "runtime/cache.h"
#include "runtime/engine.h"
#include "runtime/spec_decode.h"

namespace ds {
namespace {

using namespace std::chrono_literals;

// One greedy request per prompt (n tokens, EOS ignored; `adjust` may change each before it is submitted), stepped to
// the end; returns the requests with their channels full.
std::vector<std::shared_ptr<runtime::Request>> run_requests(
    model::Model& m, runtime::EngineConfig c, const std::vector<std::vector<int32_t>>& prompts, int64_t n,
    runtime::EngineMetrics* mt, const std::function<void(runtime::Request&)>& adjust = nullptr) {
  runtime::Engine e(m, c);
  std::vector<std::shared_ptr<runtime::Request>> rs;
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto r = std::make_shared<runtime::Request>();
    r->id = i;
    r->prompt = prompts[i];
    r->max_tokens = n;
    r->sampling.temperature = 0.f;
    r->ignore_eos = true;
    if (adjust) adjust(*r);
    e.submit(r);
    rs.push_back(r);
  }
  while (e.step()) {
  }
  if (mt) *mt = e.metrics();
  return rs;
}

std::vector<std::vector<int32_t>> run(model::Model& m, runtime::EngineConfig c,
                                      const std::vector<std::vector<int32_t>>& prompts, int64_t n,
                                      runtime::EngineMetrics* mt) {
  std::vector<std::vector<int32_t>> out;
  for (auto& r : run_requests(m, c, prompts, n, mt)) {
    std::vector<int32_t> t;
    while (auto d = r->out->pop(0ms)) t.insert(t.end(), d->tokens.begin(), d->tokens.end());
    out.push_back(t);
  }
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
      std::vector<runtime::EngineMetrics> ms(3);
      std::vector<std::vector<int32_t>> props(3);
      // eager; graphed with each draft step's tokens through the host (the oracle's replaced tokens feed the chained
      // steps, as in the eager run); graphed with the device draft feed (chained steps fed the MTP's own argmax)
      for (int g = 0; g < 3; ++g) {
        runtime::EngineConfig c = base;
        c.num_speculative_tokens = K;
        c.draft_vocab_size = dv;
        c.step_graphs = g >= 1;
        c.spec_step_graphs = g >= 1;
        c.device_draft_feed = g == 2;
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
      for (int g = 1; g <= 2; ++g) {
        for (size_t i = 0; i < prompts.size(); ++i) {
          ASSERT_EQ(outs[size_t(g)][i].size(), size_t(n));
          EXPECT_EQ(outs[size_t(g)][i], outs[0][i]) << "K=" << K << " draft vocab " << dv << " prompt " << i << " run " << g;
        }
        EXPECT_GT(ms[size_t(g)].spec_accepted_tokens_total, 0);
        EXPECT_LT(ms[size_t(g)].spec_accepted_tokens_total, ms[size_t(g)].spec_draft_tokens_total);  // some rejections
      }
      // The MTP's own proposals: the recorded draft computes logits of every row (the eager one of the drafting
      // rows only), so a near-tie could in principle round the other way; expect (almost) all equal. The fed run
      // against an eager run whose hook replaces nothing (then both chains see the same tokens).
      auto compare = [&](const std::vector<int32_t>& a, const std::vector<int32_t>& b, const char* what) {
        size_t same = 0, cmp = std::min(a.size(), b.size());
        for (size_t i = 0; i < cmp; ++i) same += a[i] == b[i];
        std::printf("  K=%lld draft vocab %lld, %s: %zu/%zu proposals equal\n", (long long)K, (long long)dv, what, same,
                    cmp);
        EXPECT_GT(cmp, size_t(0));
        EXPECT_GE(double(same), 0.95 * double(cmp)) << what;
      };
      std::printf("  K=%lld draft vocab %lld: accepted %lld of %lld drafts\n", (long long)K, (long long)dv,
                  (long long)ms[1].spec_accepted_tokens_total, (long long)ms[1].spec_draft_tokens_total);
      compare(props[0], props[1], "graphed vs eager");
      std::vector<std::vector<int32_t>> plain_props(2);
      for (int g = 0; g < 2; ++g) {
        runtime::EngineConfig c = base;
        c.num_speculative_tokens = K;
        c.draft_vocab_size = dv;
        c.step_graphs = c.spec_step_graphs = g == 1;  // the graphed run feeds on the device
        auto* rec = &plain_props[size_t(g)];
        c.draft_hook = [rec](uint64_t, int64_t, int32_t proposed) {
          rec->push_back(proposed);
          return proposed;
        };
        const auto o = run(*m, c, prompts, n, nullptr);
        for (size_t i = 0; i < prompts.size(); ++i) EXPECT_EQ(o[i], plain[i]) << "no oracle, run " << g;
      }
      compare(plain_props[0], plain_props[1], "fed vs eager, no oracle");
    }
}

// Model::replay_deltanet on the GPU (the speculative rollback): the verify of [t, d_1..d_3] logs each DeltaNet
// layer's inputs; from the snapshot, replaying the first n logged rows and then the other 4 − n (the second part
// with rows 0..5 + n of the log left out of every sequence, which conv1d_causal must skip) gives the verify's own
// state bit for bit (the short-chunk recurrent kernels take one token after the other either way), and n rows alone
// are close to a forward of those n tokens. Two sequences replayed together, with rejected rows between them, give
// what each gives alone, eagerly and through its recording (warm-up, record, replay).
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

// Greedy speculation on CUDA reproduces the plain greedy output for every K = 1..4 (verify steps of 2..5 rows per
// sequence cross the small-M GEMV bound, M ≤ 4), one sequence alone and three batched, graphed and eager, with an
// oracle so that most drafts are accepted and some rejected.
TEST(CudaSpec, GreedySpeculationEqualsPlainForK1To4) {
  DS_REQUIRE_GPU();
  auto be = make_cuda_backend(0);
  auto m = model::Model::load(test::cuda_data_dir() + "/tiny-moe/tiny-moe-int4", *be, nullptr, {});
  ASSERT_TRUE(m->has_mtp());
  std::vector<std::vector<int32_t>> prompts = {{}, {1, 2, 3, 4, 5}, {}};
  for (int i = 0; i < 40; ++i) prompts[0].push_back(100 + 7 * i);
  for (int i = 0; i < 17; ++i) prompts[2].push_back(9 + 5 * i);
  const int64_t n = 32;
  runtime::EngineConfig base;
  base.max_num_seqs = 4;
  base.max_model_len = 256;
  for (bool graphs : {true, false})
    for (size_t np : {size_t(1), size_t(3)}) {
      std::vector<std::vector<int32_t>> ps(prompts.begin(), prompts.begin() + np);
      runtime::EngineConfig c0 = base;
      c0.step_graphs = graphs;
      const auto plain = run(*m, c0, ps, n, nullptr);
      for (int64_t K = 1; K <= 4; ++K) {
        runtime::EngineConfig c = c0;
        c.num_speculative_tokens = K;
        auto rng = std::make_shared<std::mt19937_64>(uint64_t(K));
        c.draft_hook = [&, rng](uint64_t id, int64_t index, int32_t proposed) {
          const auto& w = plain[size_t(id)];
          const int64_t i = index - int64_t(ps[size_t(id)].size());
          if (i < 0 || i >= int64_t(w.size())) return proposed;
          return ((*rng)() % 10) < 8 ? w[size_t(i)] : proposed;
        };
        runtime::EngineMetrics mt;
        const auto out = run(*m, c, ps, n, &mt);
        for (size_t i = 0; i < ps.size(); ++i)
          EXPECT_EQ(out[i], plain[i]) << "K=" << K << " sequences " << np << " graphs " << graphs << " seq " << i;
        EXPECT_GT(mt.spec_accepted_tokens_total, 0) << "K=" << K;
      }
    }
}

// Logprobs under greedy speculation on the device (Backend::row_logprobs over every verified row) against the host
// path (device_verify off: [K + 1, V] logits back, verify_draft): the same tokens, logprobs within 1e-5, the same
// alternatives; and against plain decoding within bf16 rounding (other batch shapes).
TEST(CudaSpec, LogprobsOnTheDeviceEqualTheHostPath) {
  DS_REQUIRE_GPU();
  auto be = make_cuda_backend(0);
  auto m = model::Model::load(test::cuda_data_dir() + "/tiny-moe/tiny-moe-int4", *be, nullptr, {});
  std::vector<std::vector<int32_t>> prompts = {{}, {1, 2, 3, 4, 5}, {}};
  for (int i = 0; i < 40; ++i) prompts[0].push_back(100 + 7 * i);
  for (int i = 0; i < 17; ++i) prompts[2].push_back(9 + 5 * i);
  const int64_t n = 24;
  auto go = [&](int64_t K, bool device, const std::vector<std::vector<int32_t>>* plain, runtime::EngineMetrics* mt) {
    runtime::EngineConfig c;
    c.max_num_seqs = 4;
    c.max_model_len = 256;
    c.num_speculative_tokens = K;
    c.device_verify = device;
    auto rng = std::make_shared<std::mt19937_64>(7);
    if (plain)
      c.draft_hook = [plain, rng, &prompts](uint64_t id, int64_t index, int32_t proposed) {
        const auto& w = (*plain)[size_t(id)];
        const int64_t i = index - int64_t(prompts[size_t(id)].size());
        if (i < 0 || i >= int64_t(w.size())) return proposed;
        return ((*rng)() % 10) < 7 ? w[size_t(i)] : proposed;
      };
    const auto rs = run_requests(*m, c, prompts, n, mt,
                                 [](runtime::Request& r) { r.sampling.logprobs = r.id == 1 ? 0 : 5; });
    std::vector<std::pair<std::vector<int32_t>, std::vector<sampling::TokenLogprob>>> out;
    for (auto& r : rs) {
      out.emplace_back();
      while (auto d = r->out->pop(0ms)) {
        out.back().first.insert(out.back().first.end(), d->tokens.begin(), d->tokens.end());
        out.back().second.insert(out.back().second.end(), d->logprobs.begin(), d->logprobs.end());
      }
    }
    return out;
  };
  const auto plain = go(0, true, nullptr, nullptr);
  std::vector<std::vector<int32_t>> plain_tokens;
  for (auto& p : plain) plain_tokens.push_back(p.first);
  runtime::EngineMetrics md, mh;
  const auto dev = go(3, true, &plain_tokens, &md), host = go(3, false, &plain_tokens, &mh);
  EXPECT_GT(md.spec_accepted_tokens_total, 0);
  EXPECT_GT(md.device_sample_steps_total, mh.device_sample_steps_total);
  int checked = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_EQ(dev[i].first, plain[i].first) << "seq " << i;
    EXPECT_EQ(host[i].first, plain[i].first) << "seq " << i;
    ASSERT_EQ(dev[i].second.size(), size_t(n));
    ASSERT_EQ(host[i].second.size(), size_t(n));
    for (size_t j = 0; j < size_t(n); ++j) {
      const auto &d = dev[i].second[j], &h = host[i].second[j], &p = plain[i].second[j];
      EXPECT_EQ(d.token, dev[i].first[j]);
      EXPECT_NEAR(d.logprob, h.logprob, 1e-5) << "seq " << i << " token " << j;
      EXPECT_NEAR(d.logprob, p.logprob, 0.05) << "seq " << i << " token " << j;
      ASSERT_EQ(d.top.size(), i == 1 ? 0u : 5u);
      ASSERT_EQ(h.top.size(), d.top.size());
      for (size_t q = 0; q < d.top.size(); ++q) {
        EXPECT_EQ(d.top[q].first, h.top[q].first) << "seq " << i << " token " << j << " alternative " << q;
        EXPECT_NEAR(d.top[q].second, h.top[q].second, 1e-5);
      }
      ++checked;
    }
  }
  EXPECT_EQ(checked, 3 * n);
}

TEST(CudaSpec, ReplayGivesTheVerifyStateBitForBit) {
  DS_REQUIRE_GPU();
  auto be = make_cuda_backend(0);
  auto m = model::Model::load(test::cuda_data_dir() + "/tiny-moe/tiny-moe-int4", *be);
  const int64_t R = 10;
  model::ModelCaches c = m->alloc_caches(8, 16, 8, R);
  runtime::SeqCache A, B;  // slots 0 and 1; 2.. snapshots and scratch
  A.slot = 0, A.blocks = {0, 1, 2};
  B.slot = 1, B.blocks = {3, 4, 5};
  auto forward = [&](std::vector<std::pair<const runtime::SeqCache*, std::vector<int32_t>>> parts,
                     std::vector<int64_t> log_rows = {}) {
    BatchMeta b = runtime::make_batch(parts);
    for (size_t i = 0; i < log_rows.size(); ++i) b.seqs[i].log_row = log_rows[i];
    m->forward(b, c, {0});
  };
  std::vector<int32_t> pa, pb;
  for (int i = 0; i < 9; ++i) pa.push_back(3 + 5 * i);
  for (int i = 0; i < 13; ++i) pb.push_back(200 + 7 * i);
  forward({{&A, pa}, {&B, pb}});
  A.len = int64_t(pa.size());
  B.len = int64_t(pb.size());
  const std::vector<int32_t> va = {5, 17, 300, 41}, vb = {9, 1000, 77};
  // (snapshot to copy first, or -1 to continue from the slot's state; slot; rows; log row)
  auto replay = [&](std::vector<std::tuple<int32_t, int32_t, int64_t, int64_t>> seqs, bool graphed) {
    BatchMeta b;
    for (auto [snap, slot, n, row] : seqs) {
      if (snap >= 0) m->copy_slot(c, slot, snap);
      BatchMeta::Seq q;
      q.state_slot = slot;
      q.q_len = n;
      q.log_row = row;
      b.seqs.push_back(q);
    }
    m->replay_deltanet(b, c, graphed);
  };

  m->copy_slot(c, 2, A.slot);  // the snapshot
  forward({{&A, va}}, {6});    // logged at rows 6..9 (copied into the log)
  const auto verified = slot_state(*m, c, A.slot);
  replay({{2, 4, 4, 6}}, false);
  EXPECT_EQ(slot_state(*m, c, 4), verified) << "all 4 rows";
  for (int64_t n = 1; n < 4; ++n) {
    replay({{2, 4, n, 6}}, false);
    m->copy_slot(c, 3, 2);
    runtime::SeqCache r = A;
    r.slot = 3;
    forward({{&r, std::vector<int32_t>(va.begin(), va.begin() + n)}});
    EXPECT_LT(test::rel(slot_state(*m, c, 4), slot_state(*m, c, 3)), 2e-2) << "rows " << n;
    replay({{-1, 4, 4 - n, 6 + n}}, false);
    EXPECT_EQ(slot_state(*m, c, 4), verified) << "rows " << n << " then " << 4 - n;
  }

  // Two sequences logged at their batch rows (A 0..3, B 4..6); A keeps 2 rows, B 3 (rows 2, 3 left out).
  m->copy_slot(c, A.slot, 2);
  m->copy_slot(c, 5, B.slot);
  forward({{&A, va}, {&B, vb}}, {0, 4});
  replay({{2, 4, 2, 0}}, false);
  replay({{5, 7, 3, 4}}, false);
  const auto want_a = slot_state(*m, c, 4), want_b = slot_state(*m, c, 7);
  EXPECT_EQ(want_b, slot_state(*m, c, B.slot));
  for (int i = 0; i < 4; ++i) {
    const bool graphed = i > 0;
    replay({{2, 4, 2, 0}, {5, 7, 3, 4}}, graphed);
    EXPECT_EQ(slot_state(*m, c, 4), want_a) << "graphed " << graphed << ", call " << i;
    EXPECT_EQ(slot_state(*m, c, 7), want_b) << "graphed " << graphed << ", call " << i;
  }
}

}  // namespace
}  // namespace ds
