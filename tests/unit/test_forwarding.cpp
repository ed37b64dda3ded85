// ForwardingBackend (backend/forwarding.h): a wrapper derived from it runs a model exactly as the backend it wraps
// (same logits, bit for bit, on the tiny fixtures), sees the ops it overrides, and reaches the wrapped backend's
// fused ops unless it asks for their composition.
#include <gtest/gtest.h>

#include <map>
#include <string>

#include "backend/forwarding.h"
#include "backend/ops.h"
#include "golden_util.h"
#include "model/model.h"
#include "model_runner.h"

namespace ds {
namespace {

// Counts the ops it sees; with `compose`, deltanet_mix and moe_ffn run as Backend's compositions through it.
class Counting final : public ForwardingBackend {
 public:
  Counting(Backend& in, bool compose) : ForwardingBackend(in), compose_(compose) {}
  std::map<std::string, int> n;
  void linear(const Tensor& x, const Linear& w, Tensor& y) override {
    ++n["linear"];
    in_.linear(x, w, y);
  }
  void gated_delta_rule(const Tensor& qkv, const Tensor& ba, const Tensor& A_log, const Tensor& dt_bias, int64_t Hk,
                        int64_t Hv, int64_t Dk, int64_t Dv, StateLayer& st, const BatchMeta& b, Tensor& o) override {
    ++n["gated_delta_rule"];
    in_.gated_delta_rule(qkv, ba, A_log, dt_bias, Hk, Hv, Dk, Dv, st, b, o);
  }
  void moe_experts(const Tensor& x, const Experts& w, const Tensor& ids, const Tensor& wts, Tensor& y) override {
    ++n["moe_experts"];
    in_.moe_experts(x, w, ids, wts, y);
  }
  void deltanet_mix(const Tensor& m, const Tensor& cw, const Tensor& ba, const Tensor& A_log, const Tensor& dt_bias,
                    int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv, const Tensor* z, const Tensor* nw, float eps,
                    StateLayer& st, const BatchMeta& b, Tensor& y, const Tensor* ba_x = nullptr,
                    const Linear* ba_w = nullptr) override {
    ++n["deltanet_mix"];
    if (compose_) return Backend::deltanet_mix(m, cw, ba, A_log, dt_bias, Hk, Hv, Dk, Dv, z, nw, eps, st, b, y, ba_x, ba_w);
    in_.deltanet_mix(m, cw, ba, A_log, dt_bias, Hk, Hv, Dk, Dv, z, nw, eps, st, b, y, ba_x, ba_w);
  }
  void moe_ffn(const Tensor& l, int64_t k, const Tensor& x, const Experts& w, Tensor& ids, Tensor& wts,
               const Tensor* a, const Linear* sd, const Tensor* g, Tensor& y) override {
    ++n["moe_ffn"];
    if (compose_) return Backend::moe_ffn(l, k, x, w, ids, wts, a, sd, g, y);
    in_.moe_ffn(l, k, x, w, ids, wts, a, sd, g, y);
  }

 private:
  bool compose_;
};

// A CPU backend whose fused DeltaNet and MoE ops are marked: reaching them proves the wrapper forwarded the fused op
// itself, not its composition.
class MarkedCpu final : public ForwardingBackend {
 public:
  explicit MarkedCpu(Backend& in) : ForwardingBackend(in) {}
  int fused = 0;
  void deltanet_mix(const Tensor& m, const Tensor& cw, const Tensor& ba, const Tensor& A_log, const Tensor& dt_bias,
                    int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv, const Tensor* z, const Tensor* nw, float eps,
                    StateLayer& st, const BatchMeta& b, Tensor& y, const Tensor* ba_x = nullptr,
                    const Linear* ba_w = nullptr) override {
    ++fused;
    in_.deltanet_mix(m, cw, ba, A_log, dt_bias, Hk, Hv, Dk, Dv, z, nw, eps, st, b, y, ba_x, ba_w);
  }
  void moe_ffn(const Tensor& l, int64_t k, const Tensor& x, const Experts& w, Tensor& ids, Tensor& wts,
               const Tensor* a, const Linear* sd, const Tensor* g, Tensor& y) override {
    ++fused;
    in_.moe_ffn(l, k, x, w, ids, wts, a, sd, g, y);
  }
};

TEST(ForwardingBackend, RunsTheTinyModelsBitForBitAndSeesTheirOps) {
  for (const std::string fx : {"tiny-moe", "tiny-dense"}) {
    const std::string dir = test::data_dir() + "/" + fx + "/";
    const auto golden = test::read_json(dir + "golden.json");
    const auto toks = test::ids(golden["text"]["int4"][3]["prompt"]);  // crosses 64-token chunks
    auto cpu = make_cpu_backend();
    auto direct = model::Model::load(dir + fx + "-int4", *cpu);
    const std::vector<float> want = test::run_one(*direct, toks, toks.size() - 3);
    for (bool compose : {false, true}) {
      MarkedCpu marked(*cpu);
      Counting c(marked, compose);
      auto m = model::Model::load(dir + fx + "-int4", c);
      const std::vector<float> got = test::run_one(*m, toks, toks.size() - 3);
      const std::string tag = fx + (compose ? ", composed" : ", forwarded");
      EXPECT_TRUE(got == want) << tag << ": logits differ from the wrapped backend's";
      EXPECT_GT(c.n["linear"] + c.n["deltanet_mix"], 0) << tag;
      EXPECT_GT(c.n["deltanet_mix"], 0) << tag;  // both fixtures have DeltaNet layers
      if (compose) {
        // The compositions call this wrapper's ops, and never the inner backend's fused ones.
        EXPECT_EQ(c.n["gated_delta_rule"], c.n["deltanet_mix"]) << tag;
        EXPECT_EQ(c.n["moe_experts"], c.n["moe_ffn"]) << tag;
        EXPECT_EQ(marked.fused, 0) << tag;
      } else {
        // Forwarded: the inner backend's fused ops ran (the CPU's are the compositions, below this wrapper).
        EXPECT_EQ(c.n["gated_delta_rule"], 0) << tag;
        EXPECT_EQ(marked.fused, c.n["deltanet_mix"] + c.n["moe_ffn"]) << tag;
      }
    }
  }
}

}  // namespace
}  // namespace ds
