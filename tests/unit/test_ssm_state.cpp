// The DeltaNet recurrent state stored in bf16 (--mamba-ssm-cache-dtype bfloat16, ops.h StateLayer) on the CPU
// backend, the CUDA kernels' twin: a chunk shorter than kStateTokenRoundMax rounds the state after every token, so it
// leaves the state and outputs its one-token steps leave (bit for bit); a longer chunk rounds once at its end and
// stays near the fp32 state. Also the option's spelling and the config's mamba_ssm_dtype.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "backend/ops.h"
#include "core/dtype.h"
#include "core/status.h"
#include "golden_util.h"
#include "model/model.h"

namespace ds {
namespace {

constexpr int64_t Hk = 2, Hv = 4, Dk = 32, Dv = 32, C = 2 * Hk * Dk + Hv * Dv;

std::vector<float> randn(size_t n, float scale, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d(0.f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

struct Inputs {
  std::vector<float> qkv, ba, A_log, dt_bias, s0;
};

Inputs inputs(int64_t T, uint64_t seed) {
  return {randn(size_t(T * C), 1.f, seed), randn(size_t(T * 2 * Hv), 1.f, seed + 1), randn(Hv, 0.5f, seed + 2),
          randn(Hv, 0.5f, seed + 3), randn(size_t(Hv * Dk * Dv), 0.3f, seed + 4)};
}

// Runs `chunks` (token counts) of one sequence through gated_delta_rule from state s0 stored in `sdt`; returns the
// outputs of every token, then the final state (widened to fp32).
std::pair<std::vector<float>, std::vector<float>> run(Backend& be, const Inputs& in, const std::vector<int64_t>& chunks,
                                                      DType sdt) {
  StateLayer st;
  st.ssm = be.upload_f32(in.s0, {1, Hv, Dk, Dv}, sdt);
  const Tensor A = be.upload_f32(in.A_log, {Hv}, DType::F32), dtb = be.upload_f32(in.dt_bias, {Hv}, DType::F32);
  std::vector<float> out;
  int64_t t0 = 0;
  for (int64_t L : chunks) {
    const Tensor qkv = be.upload_f32(std::vector<float>(in.qkv.begin() + t0 * C, in.qkv.begin() + (t0 + L) * C),
                                     {L, C}, DType::F32);
    const Tensor ba = be.upload_f32(
        std::vector<float>(in.ba.begin() + t0 * 2 * Hv, in.ba.begin() + (t0 + L) * 2 * Hv), {L, 2 * Hv}, DType::F32);
    Tensor o = be.alloc(DType::F32, {L, Hv * Dv});
    const BatchMeta b = BatchMeta::one_sequence(L, t0, 0);
    be.gated_delta_rule(qkv, ba, A, dtb, Hk, Hv, Dk, Dv, st, b, o);
    auto oh = be.to_host_f32(o);
    out.insert(out.end(), oh.begin(), oh.end());
    t0 += L;
  }
  return {out, be.to_host_f32(st.ssm)};
}

TEST(SsmState, Bf16ShortChunkEqualsOneTokenSteps) {
  auto be = make_cpu_backend();
  for (int64_t L : {2, 5, 31}) {
    const Inputs in = inputs(L, 10 + uint64_t(L));
    const auto chunk = run(*be, in, {L}, DType::BF16);
    const auto steps = run(*be, in, std::vector<int64_t>(size_t(L), 1), DType::BF16);
    EXPECT_TRUE(chunk.first == steps.first) << "outputs, L " << L;
    EXPECT_TRUE(chunk.second == steps.second) << "state, L " << L;
    // and every stored value is a bf16 (the state was rounded, not kept wide)
    for (float x : chunk.second) ASSERT_EQ(x, bf16_to_f32(f32_to_bf16(x)));
    // near the fp32 state's run, not equal to it
    const auto f32 = run(*be, in, {L}, DType::F32);
    const double eo = test::rel_l2(chunk.first, f32.first), es = test::rel_l2(chunk.second, f32.second);
    std::printf("  L %lld: bf16 against fp32 state: outputs %.3g, state %.3g\n", (long long)L, eo, es);
    EXPECT_LT(eo, 1e-2) << "L " << L;
    EXPECT_LT(es, 1e-2) << "L " << L;
    EXPECT_GT(es, 1e-5) << "L " << L;
  }
}

TEST(SsmState, Bf16LongChunkRoundsOnce) {
  auto be = make_cpu_backend();
  const int64_t L = 100;  // the chunked form, two 64-token chunks
  const Inputs in = inputs(L, 77);
  const auto bf = run(*be, in, {L}, DType::BF16), f32 = run(*be, in, {L}, DType::F32);
  // From the same bf16-representable start, the outputs are the fp32 run's exactly (the state is widened and
  // only the final state is rounded) ...
  Inputs in16 = in;
  for (auto& x : in16.s0) x = bf16_to_f32(f32_to_bf16(x));
  const auto bf2 = run(*be, in16, {L}, DType::BF16), f32b = run(*be, in16, {L}, DType::F32);
  EXPECT_TRUE(bf2.first == f32b.first);
  // ... and the final state is the fp32 one rounded
  for (size_t i = 0; i < f32b.second.size(); ++i) ASSERT_EQ(bf2.second[i], bf16_to_f32(f32_to_bf16(f32b.second[i])));
  EXPECT_LT(test::rel_l2(bf.first, f32.first), 1e-2);
}

TEST(SsmState, OptionSpellings) {
  using model::Model;
  EXPECT_EQ(Model::ssm_dtype_from_name("", DType::F32, "x"), DType::F32);
  EXPECT_EQ(Model::ssm_dtype_from_name("auto", DType::BF16, "x"), DType::BF16);
  EXPECT_EQ(Model::ssm_dtype_from_name("float32", DType::BF16, "x"), DType::F32);
  EXPECT_EQ(Model::ssm_dtype_from_name("bf16", DType::F32, "x"), DType::BF16);
  EXPECT_EQ(Model::ssm_dtype_from_name("bfloat16", DType::F32, "x"), DType::BF16);
  try {
    Model::ssm_dtype_from_name("float16", DType::F32, "--mamba-ssm-cache-dtype");
    FAIL() << "float16 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--mamba-ssm-cache-dtype: 'float16' is not one of auto, float32, bfloat16"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace ds
