// The gated delta rule on the GPU (token-serial kernels for short chunks, the chunked tensor-core form of
// gdr_chunked.cu for sequences of ≥ 64 tokens) against the fp32 CPU reference (backend/cpu/deltanet.cpp).
// Outputs are fp32 on both sides here, so the bound measures the kernels, not bf16 output rounding. Each case runs
// twice on the same slots (the second call continues from the first call's state) and checks the outputs of both
// calls and the final state. DS_CUDA_NO_GDR_CHUNK=1 runs the old kernels on the same cases for comparison.
#include <cstdlib>
#include <numeric>

#include "backend/cuda/gdr_chunked.h"
#include "cuda_test_util.h"

namespace ds {
namespace {

using test::Both;
using test::Pair;
using test::randn;

constexpr double kTolF32 = 1e-3;   // fp32 outputs and state (3×TF32 products; measured ~1e-6)
constexpr double kTolBf16 = 1e-2;  // bf16 outputs (test_cuda_ops' bound)

struct Cfg {
  int64_t Hk, Hv, Dk, Dv;
};

BatchMeta batch_of(const std::vector<int64_t>& lens) {
  BatchMeta b;
  int32_t slot = 0;
  for (auto l : lens) {
    BatchMeta::Seq s;
    s.q_start = b.num_tokens();
    s.q_len = l;
    s.ctx_len = 0;
    s.state_slot = slot++;
    s.blocks = {0};
    b.seqs.push_back(s);
    for (int64_t i = 0; i < l; ++i) b.tokens.push_back(0);
  }
  b.positions.assign(size_t(3 * b.num_tokens()), 0);
  return b;
}

std::string lens_str(const std::vector<int64_t>& lens) {
  std::string s;
  for (auto l : lens) s += " " + std::to_string(l);
  return s;
}

struct Inputs {
  Pair qkv, ba;
};

// Post-conv activations (bf16-exact) and gates for T tokens. `corr`: keys of one head share a common direction
// (k = 0.8·c + noise), which makes (I + A) far from the identity — the triangular solve's hard case.
Inputs make_inputs(Both& B, const Cfg& c, int64_t T, uint64_t seed, bool corr) {
  const int64_t C = 2 * c.Hk * c.Dk + c.Hv * c.Dv;
  auto qkv = randn(size_t(T * C), 1.f, seed);
  if (corr) {
    auto common = randn(size_t(c.Hk * c.Dk), 1.f, seed + 7);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < c.Hk; ++h)
        for (int64_t d = 0; d < c.Dk; ++d) {
          float& x = qkv[size_t(t * C + c.Hk * c.Dk + h * c.Dk + d)];
          x = bf16_to_f32(f32_to_bf16(0.8f * common[size_t(h * c.Dk + d)] + 0.3f * x));
        }
  }
  Inputs in;
  in.qkv = B.up(qkv, {T, C});
  in.ba = B.up(randn(size_t(T * 2 * c.Hv), 1.f, seed + 1), {T, 2 * c.Hv});
  return in;
}

struct Result {
  double out1, out2, state;
};

// Two calls on the same slots: `lens1`, then `lens2` (continuing every sequence's state). fp32 or bf16 outputs.
Result run_case(Both& B, const Cfg& c, const std::vector<int64_t>& lens1, const std::vector<int64_t>& lens2,
                bool mild, bool corr, DType odt, uint64_t seed) {
  const int64_t S = int64_t(std::max(lens1.size(), lens2.size()));
  auto ssm0 = randn(size_t(S * c.Hv * c.Dk * c.Dv), 0.1f, seed);
  auto ssm = B.up(ssm0, {S, c.Hv, c.Dk, c.Dv}, DType::F32);
  StateLayer sc, sg;
  sc.ssm = ssm.c, sg.ssm = ssm.g;
  // mild: decay ≈ e^{−0.03} per token, so the state carries across many chunks; else the model-like spread
  auto A_log = B.up(randn(size_t(c.Hv), 0.5f, seed + 2, mild ? -3.5f : 0.f), {c.Hv}, DType::F32);
  auto dt_bias = B.up(randn(size_t(c.Hv), 0.5f, seed + 3), {c.Hv}, DType::F32);
  Result r{};
  int call = 0;
  for (auto* lens : {&lens1, &lens2}) {
    BatchMeta b = batch_of(*lens);
    const int64_t T = b.num_tokens();
    B.gpu->prepare_batch(b);
    Inputs in = make_inputs(B, c, T, seed + 10 + call, corr);
    auto o = B.zeros({T, c.Hv * c.Dv}, odt);
    B.cpu->gated_delta_rule(in.qkv.c, in.ba.c, A_log.c, dt_bias.c, c.Hk, c.Hv, c.Dk, c.Dv, sc, b, o.c);
    B.gpu->gated_delta_rule(in.qkv.g, in.ba.g, A_log.g, dt_bias.g, c.Hk, c.Hv, c.Dk, c.Dv, sg, b, o.g);
    (call == 0 ? r.out1 : r.out2) = B.err(o);
    ++call;
  }
  r.state = B.err(ssm);
  return r;
}

class CudaGdr : public ::testing::Test {
 protected:
  void SetUp() override { DS_REQUIRE_GPU(); }
};

// Every length class (decode, short, k_gdr_long's 32..63, chunked with partial and whole chunks), both head dims.
TEST_F(CudaGdr, ChunkedVsCpu) {
  Both B;
  const std::vector<std::vector<int64_t>> firsts = {{1}, {3}, {63}, {64}, {65}, {127}, {200}, {1000}, {2049}};
  for (auto c : {Cfg{16, 32, 128, 128}, Cfg{2, 4, 64, 64}})
    for (auto& lens : firsts)
      for (bool mild : {true, false}) {
        // continue with a decode step after short ones, with another long chunk after long ones
        const std::vector<int64_t> next = {lens[0] >= 64 ? 130 : 1};
        for (const char* mode : {"new", "old"}) {
          if (std::string(mode) == "old") setenv("DS_CUDA_NO_GDR_CHUNK", "1", 1);
          Result r = run_case(B, c, lens, next, mild, false, DType::F32, 100 + lens[0]);
          unsetenv("DS_CUDA_NO_GDR_CHUNK");
          char tag[200];
          std::snprintf(tag, sizeof tag, "%s Hv=%lld D=%lld %s lens:%s then%s", mode, (long long)c.Hv,
                        (long long)c.Dk, mild ? "mild" : "strong", lens_str(lens).c_str(), lens_str(next).c_str());
          std::printf("  %-62s out %.3g  out2 %.3g  state %.3g\n", tag, r.out1, r.out2, r.state);
          EXPECT_LT(r.out1, kTolF32) << tag;
          EXPECT_LT(r.out2, kTolF32) << tag;
          EXPECT_LT(r.state, kTolF32) << tag;
        }
      }
}

// Batches mixing decode rows, short chunks and long chunks; correlated keys; bf16 outputs as the model uses them.
TEST_F(CudaGdr, MixedBatches) {
  Both B;
  const Cfg c{16, 32, 128, 128};
  const std::vector<std::pair<std::vector<int64_t>, std::vector<int64_t>>> cases = {
      {{1, 200, 3, 65, 1, 1000, 5}, {1, 1, 1, 1, 1, 1, 1}},
      {{64, 1, 130, 40}, {5, 300, 64, 1}},
      {{2049, 1}, {1, 257}},
  };
  for (auto& [l1, l2] : cases)
    for (bool corr : {false, true})
      for (DType odt : {DType::F32, DType::BF16}) {
        Result r = run_case(B, c, l1, l2, true, corr, odt, 7);
        char tag[200];
        std::snprintf(tag, sizeof tag, "%s%s lens:%s then%s", odt == DType::F32 ? "f32" : "bf16",
                      corr ? " corr-keys" : "", lens_str(l1).c_str(), lens_str(l2).c_str());
        std::printf("  %-62s out %.3g  out2 %.3g  state %.3g\n", tag, r.out1, r.out2, r.state);
        const double tol = odt == DType::F32 ? kTolF32 : kTolBf16;
        EXPECT_LT(r.out1, tol) << tag;
        EXPECT_LT(r.out2, tol) << tag;
        EXPECT_LT(r.state, kTolF32) << tag;
      }
}

// Deterministic and batch-invariant: a 200-token sequence gives bit-identical outputs and state alone, twice, and
// next to other sequences.
TEST_F(CudaGdr, DeterministicAndBatchInvariant) {
  Both B;
  const Cfg c{16, 32, 128, 128};
  const int64_t C = 2 * c.Hk * c.Dk + c.Hv * c.Dv, L = 200;
  auto A_log = B.up(randn(size_t(c.Hv), 0.5f, 2, -3.5f), {c.Hv}, DType::F32);
  auto dt_bias = B.up(randn(size_t(c.Hv), 0.5f, 3), {c.Hv}, DType::F32);
  const auto x = randn(size_t(L * C), 1.f, 5), bav = randn(size_t(L * 2 * c.Hv), 1.f, 6);
  const auto s0 = randn(size_t(c.Hv * c.Dk * c.Dv), 0.1f, 8);
  // run the 200-token sequence at position `at` (slot `at`) of a batch with the given lengths
  auto run = [&](const std::vector<int64_t>& lens, size_t at, std::vector<float>& out, std::vector<float>& st) {
    BatchMeta b = batch_of(lens);
    const int64_t T = b.num_tokens(), S = int64_t(lens.size()), q0 = b.seqs[at].q_start;
    B.gpu->prepare_batch(b);
    std::vector<float> qkv = randn(size_t(T * C), 1.f, 9), ba = randn(size_t(T * 2 * c.Hv), 1.f, 10);
    std::copy(x.begin(), x.end(), qkv.begin() + q0 * C);
    std::copy(bav.begin(), bav.end(), ba.begin() + q0 * 2 * c.Hv);
    std::vector<float> ss = randn(size_t(S * c.Hv * c.Dk * c.Dv), 0.1f, 11);
    std::copy(s0.begin(), s0.end(), ss.begin() + int64_t(at) * c.Hv * c.Dk * c.Dv);
    Tensor tq = B.gpu->upload_f32(qkv, {T, C}, DType::BF16), tb = B.gpu->upload_f32(ba, {T, 2 * c.Hv}, DType::BF16);
    StateLayer sg;
    sg.ssm = B.gpu->upload_f32(ss, {S, c.Hv, c.Dk, c.Dv}, DType::F32);
    Tensor o = B.gpu->alloc(DType::F32, {T, c.Hv * c.Dv});
    B.gpu->gated_delta_rule(tq, tb, A_log.g, dt_bias.g, c.Hk, c.Hv, c.Dk, c.Dv, sg, b, o);
    auto oh = B.gpu->to_host_f32(o), sh = B.gpu->to_host_f32(sg.ssm);
    out.assign(oh.begin() + q0 * c.Hv * c.Dv, oh.begin() + (q0 + L) * c.Hv * c.Dv);
    st.assign(sh.begin() + int64_t(at) * c.Hv * c.Dk * c.Dv, sh.begin() + int64_t(at + 1) * c.Hv * c.Dk * c.Dv);
  };
  std::vector<float> o1, s1, o2, s2, o3, s3;
  run({L}, 0, o1, s1);
  run({L}, 0, o2, s2);
  run({1, 77, L, 3, 1000}, 2, o3, s3);
  EXPECT_TRUE(o1 == o2 && s1 == s2) << "two identical calls differ";
  EXPECT_TRUE(o1 == o3 && s1 == s3) << "the sequence's result depends on the rest of the batch";
}

// Device time of the two chunked kernels on the 35B-A3B shape (one sequence, Hk 16, Hv 32, Dk = Dv = 128), per
// layer and for the model's 30 DeltaNet layers. Prints only.
TEST_F(CudaGdr, ChunkedTiming) {
  const int64_t Hk = 16, Hv = 32, Dk = 128, Dv = 128, C = 2 * Hk * Dk + Hv * Dv;
  for (int64_t T : {4096, 32768}) {
    std::vector<float> qk(size_t(T * Hk * Dk)), gv(size_t(T * Hv)), bv(size_t(T * Hv));
    std::vector<uint16_t> xv(size_t(T * C));
    uint32_t r = 1;
    auto rnd = [&] { return float((r = r * 1664525u + 1013904223u) >> 8) / float(1 << 24) - 0.5f; };
    for (auto& x : qk) x = 0.18f * rnd();  // ~unit rows of 128
    for (auto& x : gv) x = -0.05f + 0.04f * rnd();
    for (auto& x : bv) x = 0.5f + 0.5f * rnd();
    for (auto& x : xv) x = f32_to_bf16(rnd());
    const int32_t info[4] = {0, int32_t(T), 0, 0};
    float *qn, *kn, *g, *beta, *Gc, *Tb, *P, *ssm, *o;
    void* qkv;
    int32_t* si;
    auto up = [](void** d, const void* h, size_t n) {
      ASSERT_EQ(cudaMalloc(d, n), cudaSuccess);
      if (h) {
        ASSERT_EQ(cudaMemcpy(*d, h, n, cudaMemcpyHostToDevice), cudaSuccess);
      }
    };
    up((void**)&qn, qk.data(), qk.size() * 4);
    up((void**)&kn, qk.data(), qk.size() * 4);
    up((void**)&g, gv.data(), gv.size() * 4);
    up((void**)&beta, bv.data(), bv.size() * 4);
    up(&qkv, xv.data(), xv.size() * 2);
    up((void**)&si, info, sizeof info);
    up((void**)&Gc, nullptr, size_t(T * Hv) * 4);
    up((void**)&Tb, nullptr, size_t(T * Hv * 64) * 4);
    up((void**)&P, nullptr, size_t(T * Hv * 64) * 4);
    up((void**)&ssm, nullptr, size_t(Hv * Dk * Dv) * 4);
    up((void**)&o, nullptr, size_t(T * Hv * Dv) * 2);
    cudaMemset(ssm, 0, size_t(Hv * Dk * Dv) * 4);
    cudaEvent_t e0, e1, e2;
    cudaEventCreate(&e0), cudaEventCreate(&e1), cudaEventCreate(&e2);
    // the state kernel also with plain TF32 products (DS_GDR_CHUNK_TF32=1: how much the 3×TF32 split costs)
    for (bool tf32 : {false, true}) {
      if (tf32) setenv("DS_GDR_CHUNK_TF32", "1", 1);
      double tp = 0, ts = 0;
      const int reps = 3;
      for (int it = 0; it <= reps; ++it) {
        cudaEventRecord(e0);
        cuda::gdr_chunked_prep(qn, kn, g, beta, T, Hk, Hv, Dk, 1, si, Gc, Tb, P, nullptr);
        cudaEventRecord(e1);
        cuda::gdr_chunked_state(qn, kn, qkv, int(DType::BF16), C, Hk, Hv, Dk, Dv, 1, si, Gc, Tb, P, ssm, o,
                                int(DType::BF16), nullptr);
        cudaEventRecord(e2);
        ASSERT_EQ(cudaEventSynchronize(e2), cudaSuccess);
        float a = 0, b = 0;
        cudaEventElapsedTime(&a, e0, e1);
        cudaEventElapsedTime(&b, e1, e2);
        if (it) tp += a / reps, ts += b / reps;  // the first run warms up
      }
      unsetenv("DS_GDR_CHUNK_TF32");
      std::printf("  chunked gated delta rule, T=%lld, %s: prep %.3f ms + state %.3f ms per layer; x30 layers %.1f ms\n",
                  (long long)T, tf32 ? "TF32 state products" : "3xTF32", tp, ts, 30 * (tp + ts));
    }
    for (void* p : {(void*)qn, (void*)kn, (void*)g, (void*)beta, qkv, (void*)si, (void*)Gc, (void*)Tb, (void*)P,
                    (void*)ssm, (void*)o})
      cudaFree(p);
    cudaEventDestroy(e0), cudaEventDestroy(e1), cudaEventDestroy(e2);
    EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  }
}

}  // namespace
}  // namespace ds
