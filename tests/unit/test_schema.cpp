// The schema of a config must be exactly the tensor set of a real checkpoint of that config.
#include <gtest/gtest.h>

#include <map>

#include "golden_util.h"
#include "io/schema.h"

namespace ds {
namespace {

void expect_schema_matches(const std::string& dir, bool int4) {
  auto cfg = io::load_model_config(dir);
  auto idx = io::TensorIndex::open_dir(dir);
  std::map<std::string, const io::TensorSpec*> want;
  auto schema = io::checkpoint_schema(cfg, int4);
  for (auto& s : schema) want[s.name] = &s;
  size_t text_tensors = 0;
  for (auto& n : idx->names()) {
    if (n.rfind("model.visual.", 0) == 0) continue;
    ++text_tensors;
    auto it = want.find(n);
    ASSERT_NE(it, want.end()) << dir << ": checkpoint tensor " << n << " is not in the schema";
    auto& e = idx->get(n);
    EXPECT_EQ(e.shape, it->second->shape) << n;
    EXPECT_EQ(e.dtype, it->second->dtype) << n;
  }
  EXPECT_EQ(text_tensors, schema.size()) << dir;
}

TEST(Schema, MatchesTheTinyCheckpointsExactly) {
  expect_schema_matches(test::data_dir() + "/tiny-moe/tiny-moe-int4", true);
  expect_schema_matches(test::data_dir() + "/tiny-moe/tiny-moe-bf16", false);
  expect_schema_matches(test::data_dir() + "/tiny-dense/tiny-dense-int4", true);
  expect_schema_matches(test::data_dir() + "/tiny-dense/tiny-dense-bf16", false);
}

TEST(Schema, SeedRecipeWithoutAQuantConfigAgreesWithTheFixture) {
  auto cfg = io::load_model_config(test::data_dir() + "/tiny-moe/tiny-moe-int4");
  auto with = io::checkpoint_schema(cfg, true);
  cfg.quant = io::QuantConfig{};
  auto without = io::checkpoint_schema(cfg, true);
  ASSERT_EQ(with.size(), without.size());
  for (size_t i = 0; i < with.size(); ++i) EXPECT_EQ(with[i].name, without[i].name);
}

}  // namespace
}  // namespace ds

#include "backend/ops.h"
#include "model/model.h"
#include "runtime/cache.h"

namespace ds {
namespace {

TEST(RandomModel, LoadsAndRunsForTheTinyConfig) {
  auto cfg = io::load_model_config(test::data_dir() + "/tiny-moe/tiny-moe-int4");
  cfg.quant = io::QuantConfig{};  // follow the seed recipe
  auto be = make_cpu_backend();
  for (bool int4 : {true, false}) {
    auto m = model::Model::load_random(cfg, *be, 7, int4);
    runtime::CacheManager cm(*m, 8, 16, 1);
    runtime::SeqCache s;
    cm.start(s);
    cm.reserve(s, 5);
    BatchMeta b = runtime::make_batch({{&s, {1, 2, 3, 4, 5}}});
    auto logits = be->to_host_f32(m->forward(b, cm.caches(), {4}));
    double sum = 0;
    for (float x : logits) {
      ASSERT_TRUE(std::isfinite(x));
      sum += std::fabs(x);
    }
    EXPECT_GT(sum, 0.0);
  }
}

}  // namespace
}  // namespace ds
