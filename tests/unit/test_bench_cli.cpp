// `deltaserve bench` on the CPU backend with the tiny MoE config: the command runs end to end and prints its
// tables (decode with step graphs falling back to eager on the CPU, breakdown, prefill).
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <string>

#include "golden_util.h"

namespace {

using ds::test::run_binary;

const std::string kConfig = std::string(DS_TEST_DATA_DIR) + "/tiny-moe/tiny-moe-int4/config.json";

TEST(BenchCli, TinyMoeOnCpu) {
  auto r = run_binary("bench --random-weights --config " + kConfig +
               " --backend cpu --batch 1,3 --context 16,40 --prefill 8,33 --steps 2 --breakdown");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("## Decode"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("| graph | 3 | 40 |"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("### Time by kernel family"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("## Prefill"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("| graph | 33 | 33 |"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("weights read per token"), std::string::npos) << r.out;
}

TEST(BenchCli, ChunkedPrefillAndBf16) {
  auto r = run_binary("bench --random-weights --config " + kConfig +
               " --backend cpu --bf16 --batch 2 --context 8 --prefill 20 --prefill-chunk 7 --steps 1 --no-graph");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("| eager | 20 | 7 |"), std::string::npos) << r.out;
}

TEST(BenchCli, Variants) {
  auto r = run_binary("bench --random-weights --config " + kConfig +
               " --backend cpu --batch 1 --context 8 --prefill 9 --steps 1 --variants 'a:no-graph,DS_X=1;b:graph'");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("| a | 1 | 8 |"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("| b | 9 | 9 |"), std::string::npos) << r.out;
}

TEST(BenchCli, RejectsBadLists) {
  auto r = run_binary("bench --random-weights --config " + kConfig + " --backend cpu --batch 1,x");
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("--batch"), std::string::npos) << r.out;
}

}  // namespace
