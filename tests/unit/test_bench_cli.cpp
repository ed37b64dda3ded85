// `deltaserve bench` on the CPU backend with the tiny MoE config: the command runs end to end and prints its
// tables (decode with step graphs falling back to eager on the CPU, breakdown, prefill).
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <string>

#include "golden_util.h"
#ifdef DS_HAVE_CUDA
#include "backend/cuda/kernel_times.h"
#endif

namespace {

using ds::test::run_binary;

const std::string kConfig = std::string(DS_TEST_DATA_DIR) + "/tiny-moe/tiny-moe-int4/config.json";

// `deltaserve bench --random-weights` on the tiny MoE config with these flags.
ds::test::CommandResult bench_tiny(const std::string& flags) {
  return run_binary("bench --random-weights --config " + kConfig + " " + flags);
}

TEST(BenchCli, TinyMoeOnCpu) {
  auto r = bench_tiny("--backend cpu --batch 1,3 --context 16,40 --prefill 8,33 --steps 2 --breakdown");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("## Decode"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("| graph | 3 | 40 |"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("### Time by kernel family"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("batch 3, context 40"), std::string::npos) << r.out;  // a breakdown for every context
  EXPECT_NE(r.out.find("## Prefill"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("| graph | 33 | 33 |"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("weights read per token"), std::string::npos) << r.out;
}

// --kernel-times needs the CUDA backend's recorded steps: elsewhere a line says why, and the bench still runs.
TEST(BenchCli, KernelTimesOnCpuSaysWhy) {
  auto r = bench_tiny("--backend cpu --batch 2 --context 16 --prefill none --steps 2 --kernel-times");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("| graph | 2 | 16 |"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("### Kernel times, graph, batch 2, context 16: CUDA step graphs only"), std::string::npos)
      << r.out;
}

#ifdef DS_HAVE_CUDA
// The kernel names of --kernel-times' table (CUPTI reports mangled names).
TEST(KernelTimes, ShortNames) {
  using ds::cuda::short_kernel_name;
  EXPECT_EQ(short_kernel_name("_ZN2ds4cuda12_GLOBAL__N_19k_rmsnormEPKvifflPvi"), "k_rmsnorm");
  // Template arguments stay, namespaces inside them too; the parameter list goes.
  const std::string t =
      short_kernel_name("_ZN2ds4cuda12k_attn_splitILi8ELb1EEEvPK13__nv_bfloat16S4_S4_lllPKiS6_S6_ifiPfi");
  EXPECT_EQ(t, "k_attn_split<8, true>") << t;
  EXPECT_EQ(short_kernel_name("k_plain_c_name"), "k_plain_c_name");  // not mangled: as given
  EXPECT_EQ(short_kernel_name("_Z6kernelv"), "kernel");
  EXPECT_EQ(short_kernel_name("_Z4kernILi3EEvv"), "kern<3>");  // a global template: "void kern<3>()"
  // A parameter type from an anonymous namespace ("...(anonymous namespace)::Jobs, ...)"), and a compiler clone.
  const std::string a = short_kernel_name(
      "_ZN2ds4cuda44_GLOBAL__N__0da2569a_11_bf16_mma_cu_20277f7bL10k_bf16_mmaILi1ELi1ELi2EEEvNS1_4JobsEPK13__nv_"
      "bfloat16il");
  EXPECT_EQ(a, "k_bf16_mma<1, 1, 2>") << a;
  const std::string c = short_kernel_name(
      "_ZN2ds4cuda44_GLOBAL__N__0da2569a_11_bf16_mma_cu_20277f7bL10k_bf16_mmaILi1ELi1ELi2EEEvNS1_4JobsEPK13__nv_"
      "bfloat16il.cold");
  EXPECT_EQ(c, "k_bf16_mma<1, 1, 2>") << c;
}

// Collection starts and stops cleanly where a device is, and says why not elsewhere (no GPU here: CUPTI is found
// and opened, then refuses to enable), never crashing or reporting kernels that did not run.
TEST(KernelTimes, StartsOrSaysWhy) {
  std::string why;
  if (ds::cuda::kernel_times_start(&why)) {
    EXPECT_TRUE(ds::cuda::kernel_times_stop().empty());  // nothing ran between
  } else {
    EXPECT_FALSE(why.empty());
    std::printf("  kernel times unavailable here: %s\n", why.c_str());
  }
  EXPECT_TRUE(ds::cuda::kernel_times_stop().empty());  // stopping twice is harmless
}
#endif

TEST(BenchCli, ChunkedPrefillAndBf16) {
  auto r = bench_tiny("--backend cpu --bf16 --batch 2 --context 8 --prefill 20 --prefill-chunk 7 --steps 1 "
                      "--no-graph");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("| eager | 20 | 7 |"), std::string::npos) << r.out;
}

TEST(BenchCli, Variants) {
  auto r = bench_tiny("--backend cpu --batch 1 --context 8 --prefill 9 --steps 1 "
                      "--variants 'a:no-graph,DS_X=1;b:graph'");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("| a | 1 | 8 |"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("| b | 9 | 9 |"), std::string::npos) << r.out;
}

// A step whose logits are not finite is said under its row (a NaN state, which later variants share, routes every
// token to the same experts and times faster than any real step). A negative rms_norm_eps (accepted, as by
// transformers) makes every norm NaN.
TEST(BenchCli, NonFiniteLogitsSaid) {
  auto r = bench_tiny("--config-override '{\"text_config\": {\"rms_norm_eps\": -1e30}}'"
                      " --backend cpu --batch 2 --context 8 --prefill none --steps 1");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("**warning: variant graph, batch 2, context 8: "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("logits are not finite"), std::string::npos) << r.out;
  auto ok = bench_tiny("--backend cpu --batch 2 --context 8 --prefill none --steps 1");
  ASSERT_EQ(ok.code, 0) << ok.out;
  EXPECT_EQ(ok.out.find("not finite"), std::string::npos) << ok.out;
}

// A variant on a bf16 DeltaNet state (its own cache set): half the state bytes per step in the traffic column, and a
// bad dtype named before any weight is built.
TEST(BenchCli, Bf16StateVariant) {
  auto r = bench_tiny("--backend cpu --batch 2 --context 8 --prefill 9 --steps 1"
                      " --variants 'f:no-graph;h:no-graph,ssm-dtype=bfloat16'");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("| f | 2 | 8 |"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("| h | 2 | 8 |"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("| h | 9 | 9 |"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("fp32 recurrent state"), std::string::npos) << r.out;
  auto bad = bench_tiny("--backend cpu --batch 1 --context 8 --prefill 9 --steps 1 --variants 'h:ssm-dtype=fp8'");
  EXPECT_NE(bad.code, 0);
  EXPECT_NE(bad.out.find("ssm-dtype: 'fp8' is not one of auto, float32, bfloat16"), std::string::npos) << bad.out;
  auto flag = bench_tiny("--backend cpu --batch 1 --context 8 --prefill 9 --steps 1 "
                         "--mamba-ssm-cache-dtype bfloat16");
  ASSERT_EQ(flag.code, 0) << flag.out;
  EXPECT_NE(flag.out.find("bf16 recurrent state"), std::string::npos) << flag.out;
}

// The speculative table through the engine: baseline, full and reduced draft heads, every run reproducing the
// baseline's greedy tokens under the oracle.
TEST(BenchCli, SpeculativeOracle) {
  auto r = bench_tiny("--backend cpu --speculative 1,3 --oracle-p 0.8 --draft-vocab 256 --spec-prompt 8 "
                      "--spec-tokens 20");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("| none (no speculation) | 0 |"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("| full lm_head | 3 | 0.80 |"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("| reduced 256 | 1 | 0.80 |"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("| no (from token"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("best K"), std::string::npos) << r.out;
}

// --prefix-cache alone: the prefix-caching table through the engine, each prompt resumed from its checkpoint (the
// last block boundary before its last token), the continued prompt too; no decode or prefill tables.
TEST(BenchCli, PrefixCacheTable) {
  auto r = bench_tiny("--backend cpu --prefix-cache 40,100");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("## Prefix caching"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("| 40 | "), std::string::npos) << r.out;
  // cached tokens: 32 for the 40-token prompt (again and continued), 96 for the 100-token one.
  EXPECT_NE(r.out.find(" | 32 | "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(" | 96 | "), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("## Decode"), std::string::npos) << r.out;
}

// --vision alone: the vision-tower table only (no text weights built), on the tiny config's tower.
TEST(BenchCli, VisionTowerTable) {
  auto r = bench_tiny("--backend cpu --vision 64x64,100x40 --steps 1");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("## Vision tower"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("| 64x64 | 4x4 | 16 | 4 |"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("| 100x40 | 6x2 | 12 | 3 |"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("## Decode"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("## Prefill"), std::string::npos) << r.out;
  auto bad = bench_tiny("--backend cpu --vision 64by64");
  EXPECT_NE(bad.code, 0);
  EXPECT_NE(bad.out.find("WIDTHxHEIGHT"), std::string::npos) << bad.out;
}

// The dense 27B config (issue 9) through the same bench, shrunk with --config-override to run on the CPU.
TEST(BenchCli, Dense27bConfigAtTinyShape) {
  const std::string cfg = std::string(DS_TEST_DATA_DIR) + "/../../bench/configs/qwen3.6-27b.json";
  const std::string ov =
      R"('{"text_config": {"hidden_size": 256, "num_hidden_layers": 4, "layer_types": ["linear_attention", )"
      R"("linear_attention", "linear_attention", "full_attention"], "intermediate_size": 512, "num_attention_heads": 4, )"
      R"("num_key_value_heads": 2, "head_dim": 256, "linear_num_key_heads": 2, "linear_num_value_heads": 4, )"
      R"("linear_key_head_dim": 32, "linear_value_head_dim": 32, "vocab_size": 4096}}')";
  auto r = run_binary("bench --random-weights --config " + cfg + " --config-override " + ov +
                      " --backend cpu --batch 1 --context 16 --prefill 8 --steps 1 --speculative 2 --oracle-p 0.9 "
                      "--spec-prompt 8 --spec-tokens 12 --batch 1 --context 16 --prefill 8");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("## Decode"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("| full lm_head | 2 | 0.90 |"), std::string::npos) << r.out;
}

TEST(BenchCli, RejectsBadLists) {
  auto r = bench_tiny("--backend cpu --batch 1,x");
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("--batch"), std::string::npos) << r.out;
}

}  // namespace
