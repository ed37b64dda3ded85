// The MTP head against the reference (mtp-golden.*): first-pass rows and chained draft steps, both fixtures.
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <filesystem>

#include "golden_util.h"

namespace ds {
namespace {

namespace fs = std::filesystem;

std::string join(const std::vector<int32_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s;
}

class Mtp : public ::testing::TestWithParam<std::string> {};

TEST_P(Mtp, FirstPassAndChainMatchReference) {
  const std::string fx = GetParam(), dir = test::data_dir() + "/" + fx + "/";
  auto golden = test::read_json(dir + "mtp-golden.json");
  test::Golden ref(dir + "mtp-golden.safetensors");
  for (auto& c : golden["cases"]) {
    auto prompt = c["prompt"].get<std::vector<int32_t>>();
    int idx = c["prompt_index"].get<int>();
    fs::path out = fs::temp_directory_path() / ("ds_mtp_" + fx + std::to_string(idx) + ".safetensors");
    std::string cmd = std::string(DS_BINARY) + " mtp-logits --model " + dir + fx + "-bf16 --tokens " + join(prompt) +
                      " --next " + std::to_string(c["next_token"].get<int>()) + " --draft-steps 3 --out " +
                      out.string() + " 2>&1";
    ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
    test::Golden ours(out.string());
    auto a = ours.f32("mtp_logits"), r = ref.f32("mtp.prompt" + std::to_string(idx) + ".logits");
    double e1 = test::rel_l2(a, r);
    auto ca = ours.f32("chain_logits"), cr = ref.f32("mtp.prompt" + std::to_string(idx) + ".chain_logits");
    double e2 = test::rel_l2(ca, cr);
    std::printf("  %s prompt%d: mtp rows rel L2 %.3g, chain rel L2 %.3g\n", fx.c_str(), idx, e1, e2);
    EXPECT_LT(e1, 1e-4);
    EXPECT_LT(e2, 1e-4);
    // The drafts the reference chose (argmax of each step) are ours too.
    auto drafts = c["drafts"].get<std::vector<int32_t>>();
    const int64_t V = 2048;
    auto argmax = [&](const float* p) { return int32_t(std::max_element(p, p + V) - p); };
    EXPECT_EQ(argmax(a.data() + (prompt.size() - 1) * V), drafts[0]);
    EXPECT_EQ(argmax(ca.data()), drafts[1]);
    EXPECT_EQ(argmax(ca.data() + V), drafts[2]);
  }
}

INSTANTIATE_TEST_SUITE_P(Tiny, Mtp, ::testing::Values("tiny-moe", "tiny-dense"),
                         [](const auto& info) { return info.param == "tiny-moe" ? std::string("moe") : std::string("dense"); });

}  // namespace
}  // namespace ds
