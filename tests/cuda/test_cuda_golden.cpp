// The CUDA backend on the golden fixtures (tiny-moe and tiny-dense, BF16 and int4 checkpoints): its logits error
// against transformers' fp32 run must be at most 2× the error of transformers' own bf16 run on the same prompt
// (`V.bf16ref.*` vs `V.fp32.*`), for prompt logits and for every teacher-forced decode step; a batch of all prompts
// (mixed prefill + decode) must match single runs to within 2× the bf16 reference's error.
// DS_GOLDEN_PROMPTS=n limits the prompts (compute-sanitizer runs use 1).
#include <gtest/gtest.h>

#include <cstdlib>
#include <map>
#include <memory>

#include "backend/ops.h"
#include "cuda_test_util.h"
#include "golden_util.h"
#include "model_runner.h"
#include "model/model.h"
#include "runtime/cache.h"

namespace ds {
namespace {

using test::rel_l2;

// "<fixture>/<variant>", e.g. "tiny-moe/int4" (model_runner.h golden_fixture).
test::GoldenFixture& fixture(const std::string& param) {
  return test::golden_fixture(param, test::cuda_data_dir(), [] { return make_cuda_backend(0); });
}

using test::ids;
using test::last_rows;
using test::run_one;
using test::run_steps;
using test::staggered_batch;
using test::teacher_forced;
using test::DecodeErrors;
using test::decode_errors;

size_t num_prompts(const nlohmann::json& prompts) {
  size_t n = prompts.size();
  if (const char* e = std::getenv("DS_GOLDEN_PROMPTS")) n = std::min(n, size_t(std::atoi(e)));
  return n;
}

class CudaGolden : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override { DS_REQUIRE_GPU(); }
  std::string variant() const { return GetParam().substr(GetParam().find('/') + 1); }
  // The bf16 reference's error on `name` (prompt logits, or one decode step when step >= 0).
  double bf16_error(test::GoldenFixture& f, const std::string& name, int64_t V, int step = -1) {
    return test::bf16_ref_error(*f.tensors, f.bf16err, variant(), name, V, step);
  }
};

TEST_P(CudaGolden, PromptLogitsWithinTwiceBf16Reference) {
  auto& f = fixture(GetParam());
  const int64_t V = f.m->config().text.vocab_size;
  auto& prompts = f.golden["text"][variant()];
  for (size_t i = 0; i < num_prompts(prompts); ++i) {
    auto toks = ids(prompts[i]["prompt"]);
    const std::string name = "prompt" + std::to_string(i) + ".logits";
    std::vector<int64_t> shape;
    auto ref = f.tensors->f32(variant() + ".fp32." + name, &shape);
    auto ours = last_rows(run_one(*f.m, toks, toks.size()), shape[0], V);
    const double err = rel_l2(ours, ref), bf = bf16_error(f, name, V);
    std::printf("  %s prompt%zu (%zu tokens): cuda rel L2 %.4g, bf16 ref %.4g, ratio %.3f\n", GetParam().c_str(), i,
                toks.size(), err, bf, err / bf);
    EXPECT_LE(err, 2 * bf) << "prompt " << i;
  }
}

TEST_P(CudaGolden, TeacherForcedDecodeWithinTwiceBf16Reference) {
  auto& f = fixture(GetParam());
  const int64_t V = f.m->config().text.vocab_size;
  auto& prompts = f.golden["text"][variant()];
  for (size_t i = 0; i < num_prompts(prompts); ++i) {
    const std::string name = "prompt" + std::to_string(i) + ".gen_logits";
    auto ref = f.tensors->f32(variant() + ".fp32." + name);
    auto ours = teacher_forced(*f.m, ids(prompts[i]["prompt"]), ids(prompts[i]["greedy"]), int64_t(ref.size()) / V);
    // Statistic against statistic over the steps before the bf16 run picks another token (golden_util.h
    // decode_errors): the RMS of our per-step errors ≤ 2× the bf16 reference's RMS over the same steps, and our
    // worst step ≤ 2× its worst step (a single step is a noisy statistic: on the MoE model one flipped expert choice
    // moves a step's error).
    const DecodeErrors d = decode_errors(ours, ref, V, [&](int s) { return bf16_error(f, name, V, s); });
    EXPECT_LE(d.rms, 2 * d.rms_bf16) << "prompt " << i;
    EXPECT_LE(d.worst, 2 * d.worst_bf16) << "prompt " << i;
    std::printf("  %s prompt%zu decode: %d/%d steps comparable; RMS step error %.4g vs bf16 ref %.4g (ratio %.3f); "
                "worst step %.4g vs %.4g (ratio %.3f); later steps max %.4g\n",
                GetParam().c_str(), i, d.n, d.steps, d.rms, d.rms_bf16, d.rms / d.rms_bf16, d.worst, d.worst_bf16,
                d.worst / std::max(d.worst_bf16, 1e-30), d.later);
  }
}

TEST_P(CudaGolden, BatchOfAllPromptsMatchesSingleRuns) {
  if (std::getenv("DS_GOLDEN_PROMPTS")) GTEST_SKIP() << "limited run";
  auto& f = fixture(GetParam());
  const int64_t V = f.m->config().text.vocab_size;
  const auto r = staggered_batch(*f.m, f.golden["text"][variant()]);
  for (int i = 0; i < int(r.alone.size()); ++i) {
    const double e = rel_l2(r.batched[i], r.alone[i]);
    const double bf = bf16_error(f, "prompt" + std::to_string(i) + ".logits", V);
    std::printf("  %s prompt%d batched vs alone: rel L2 %.4g (bf16 ref error %.4g, ratio %.3f)\n", GetParam().c_str(),
                i, e, bf, e / bf);
    // Batched rows may take another GEMM path than single ones (int4: M > 8 dequantizes to bf16): two bf16-level
    // computations, so the same 2× bound as against the fp32 reference.
    EXPECT_LE(e, 2 * bf) << "prompt " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Tiny, CudaGolden, test::tiny_checkpoints(), test::CheckpointName());

}  // namespace
}  // namespace ds
