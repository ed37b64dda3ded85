// Tensor-core flash attention (backend/cuda/flash_attn.h) through CudaBackend::attention against the fp32 CPU
// reference: prefill chunks of awkward lengths, with and without earlier context, several sequences per batch
// (decode rows and short verify chunks, which stay on the split kernel, next to prefill chunks), block sizes 16 and
// 32, head dims 64 / 128 / 256, GQA 8:1, 6:1 (the 27B's; 126 of a block's 128 rows), 4:1, 2:1 and 1:1. Same bound
// as test_cuda_ops (bf16 activations). At head dim 256 each case runs the warpgroup-MMA kernel (sm90a/flash_wg.cu,
// the default on sm_90) and the mma.sync kernel (DS_CUDA_FA_WG=0).
// FlashAttention.Dh256Small: a few of those cases, for compute-sanitizer.
// FlashAttention.DecodeRowsMatchCpu covers the decode/verify rows' tensor-core split kernel (attn_decode.h).
// FlashAttention.Throughput prints the kernel's TFLOP/s (and the split kernel's, DS_CUDA_NO_FLASH=1) without asserting.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <numeric>

#include "cuda_test_util.h"

namespace ds {
namespace {

using test::Both;
using test::randn;

constexpr double kTol = 1e-2;

class FlashAttention : public ::testing::Test {
 protected:
  void SetUp() override { DS_REQUIRE_GPU(); }
};

using Seqs = std::vector<std::pair<int64_t, int64_t>>;  // (ctx_len, q_len) per sequence

BatchMeta make_batch(const Seqs& seqs, int64_t bs, const std::vector<int32_t>& pool) {
  BatchMeta b;
  int32_t slot = 0;
  size_t next = 0;
  for (auto [ctx, ql] : seqs) {
    BatchMeta::Seq s;
    s.q_start = b.num_tokens();
    s.q_len = ql;
    s.ctx_len = ctx;
    s.state_slot = slot++;
    for (int64_t i = 0; i < (ctx + ql + bs - 1) / bs; ++i) s.blocks.push_back(pool.at(next++));
    b.seqs.push_back(s);
    for (int64_t i = 0; i < ql; ++i) b.tokens.push_back(0);
  }
  const int64_t T = b.num_tokens();
  b.positions.assign(size_t(3 * T), 0);
  for (auto& s : b.seqs)
    for (int64_t i = 0; i < s.q_len; ++i)
      for (int r = 0; r < 3; ++r) b.positions[r * T + s.q_start + i] = int32_t(s.ctx_len + i);
  return b;
}

struct Cfg {
  int64_t Nh, Nkv, Dh, bs;
};

std::string tag_of(const Cfg& c, const Seqs& seqs) {
  std::string tag = "Nh=" + std::to_string(c.Nh) + " Nkv=" + std::to_string(c.Nkv) + " Dh=" + std::to_string(c.Dh) +
                    " bs=" + std::to_string(c.bs) + " (ctx,q):";
  for (auto [ctx, ql] : seqs) tag += " (" + std::to_string(ctx) + "," + std::to_string(ql) + ")";
  return tag;
}

// The kernel variants MatchesCpu runs at head dim 256 (environment settings; {nullptr, nullptr}: the default, the
// warpgroup-MMA kernel on an sm_90 device), then the mma.sync kernel.
struct Variant {
  const char *name, *value;
};
const std::vector<Variant> kDh256Variants = {{nullptr, nullptr}, {"DS_CUDA_FA_WG", "0"}};

// Writes the context (a first call per sequence) and then this call's K/V, and compares the CPU and GPU outputs of
// attention over the batch `seqs` (relative L2 of the GPU against the CPU), once per variant (environment settings
// for the GPU call); each GPU call runs twice, with identical bits.
std::vector<double> run_variants(Both& B, const Cfg& c, const Seqs& seqs, uint64_t seed,
                                 const std::vector<Variant>& variants,
                                 std::vector<std::vector<float>>* outs = nullptr) {
  int64_t need = 0;
  for (auto [ctx, ql] : seqs) need += (ctx + ql + c.bs - 1) / c.bs;
  const int64_t nblocks = need + 3;
  std::vector<int32_t> pool(nblocks);
  std::iota(pool.begin(), pool.end(), 0);
  std::shuffle(pool.begin(), pool.end(), std::mt19937(uint32_t(seed)));
  KvLayer kc, kg;
  kc.block_size = kg.block_size = c.bs;
  kc.k = B.cpu->alloc(DType::F32, {nblocks, c.bs, c.Nkv, c.Dh});
  kc.v = B.cpu->alloc(DType::F32, {nblocks, c.bs, c.Nkv, c.Dh});
  kg.k = B.gpu->alloc(DType::BF16, {nblocks, c.bs, c.Nkv, c.Dh});
  kg.v = B.gpu->alloc(DType::BF16, {nblocks, c.bs, c.Nkv, c.Dh});
  // Unused cache slots hold NaN on the GPU: positions past a sequence's end must never be read.
  {
    std::vector<float> nan(size_t(nblocks * c.bs * c.Nkv * c.Dh), NAN);
    Tensor t = B.gpu->upload_f32(nan, {nblocks, c.bs, c.Nkv, c.Dh}, DType::BF16);
    B.gpu->copy(kg.k, t);
    B.gpu->copy(kg.v, t);
  }
  Seqs pre;
  for (auto [ctx, ql] : seqs) pre.push_back({0, ctx});
  BatchMeta b0 = make_batch(pre, c.bs, pool);
  BatchMeta b = make_batch(seqs, c.bs, pool);
  for (size_t i = 0; i < b.seqs.size(); ++i) b0.seqs[i].blocks = b.seqs[i].blocks;
  auto write = [&](BatchMeta& bb, uint64_t sd) {
    const int64_t T = bb.num_tokens();
    if (T == 0) return;
    B.gpu->prepare_batch(bb);
    auto k = B.up(randn(T * c.Nkv * c.Dh, 1.f, sd), {T, c.Nkv * c.Dh});
    auto v = B.up(randn(T * c.Nkv * c.Dh, 1.f, sd + 1), {T, c.Nkv * c.Dh});
    B.cpu->kv_cache_write(kc, k.c, v.c, bb);
    B.gpu->kv_cache_write(kg, k.g, v.g, bb);
  };
  write(b0, seed + 10);
  write(b, seed + 20);
  const int64_t T = b.num_tokens();
  B.gpu->prepare_batch(b);
  // q scaled up a little so that the softmax is peaked (scores of a few units), not nearly uniform.
  auto q = B.up(randn(T * c.Nh * c.Dh, 2.f, seed + 30), {T, c.Nh * c.Dh});
  auto o = B.zeros({T, c.Nh * c.Dh});
  B.cpu->attention(q.c, kc, b, o.c);
  const std::vector<float> ref = B.cpu->to_host_f32(o.c);
  std::vector<double> errs;
  for (const Variant& v : variants) {
    test::ScopedEnv env(v.name ? v.name : "DS_TEST_UNUSED", v.value);
    B.gpu->attention(q.g, kg, b, o.g);
    const std::vector<float> first = B.gpu->to_host_f32(o.g);
    auto o2 = B.zeros({T, c.Nh * c.Dh});
    B.gpu->attention(q.g, kg, b, o2.g);
    EXPECT_TRUE(first == B.gpu->to_host_f32(o2.g))
        << "not deterministic: " << tag_of(c, seqs) << " " << (v.name ? v.name : "default");
    errs.push_back(test::rel(first, ref));
    if (outs) outs->push_back(first);
  }
  return errs;
}
double run_case(Both& B, const Cfg& c, const Seqs& seqs, uint64_t seed) {
  return run_variants(B, c, seqs, seed, {{nullptr, nullptr}})[0];
}

TEST_F(FlashAttention, MatchesCpu) {
  Both B;
  const std::vector<Seqs> single = {{{0, 1}},    {{0, 3}},    {{0, 16}},  {{0, 17}},   {{0, 63}},
                                    {{0, 64}},   {{0, 65}},   {{0, 255}}, {{5, 16}},   {{5, 17}},
                                    {{5, 63}},   {{1000, 3}}, {{1000, 16}}, {{1000, 65}}, {{1000, 255}}};
  const std::vector<Seqs> mixed = {
      {{1000, 1}, {0, 65}, {5, 3}, {1000, 17}, {7, 1}, {0, 16}},
      {{40, 17}, {100, 1}, {0, 255}, {7, 5}},
      {{0, 15}, {3, 16}, {31, 33}, {1, 1}, {2, 2}, {60, 129}},
  };
  const std::vector<Seqs> big = {{{0, 2049}}, {{1000, 2049}}, {{5, 2049}, {2000, 1}, {17, 4}}};
  const std::vector<Cfg> cfgs = {{16, 2, 256, 16}, {16, 2, 256, 32}, {4, 4, 256, 16}, {8, 2, 256, 16},
                                 {16, 2, 128, 16}, {8, 8, 128, 32},  {8, 1, 64, 16},  {4, 2, 64, 32},
                                 {24, 4, 256, 16}};
  uint64_t seed = 100;
  for (const Cfg& c : cfgs) {
    std::vector<Seqs> all = single;
    all.insert(all.end(), mixed.begin(), mixed.end());
    if (c.Nkv == 2 && c.bs == 16 && (c.Dh == 256 || c.Nh == 16)) all.insert(all.end(), big.begin(), big.end());
    if ((c.Nh == 4 || c.Nh == 24) && c.Dh == 256) all.push_back({{0, 2049}});
    for (const Seqs& seqs : all) {
      if (c.Dh == 256) {  // the default (wgmma on sm_90), then mma.sync
        const std::vector<double> e = run_variants(B, c, seqs, seed += 7, kDh256Variants);
        std::printf("  %-80s rel L2 %.3g (mma.sync %.3g)\n", tag_of(c, seqs).c_str(), e[0], e[1]);
        for (double x : e) EXPECT_LT(x, kTol) << tag_of(c, seqs);
        continue;
      }
      const double e = run_case(B, c, seqs, seed += 7);
      std::printf("  %-80s rel L2 %.3g\n", tag_of(c, seqs).c_str(), e);
      EXPECT_LT(e, kTol) << tag_of(c, seqs);
    }
  }
}

// A few head-dim-256 cases (the 35B-A3B's GQA 8:1, the 27B's 6:1, and 1:1) on both prefill kernels, small enough for
// compute-sanitizer's memcheck and racecheck (tools/gpu_test.sh).
TEST_F(FlashAttention, Dh256Small) {
  Both B;
  const std::vector<Seqs> cases = {{{0, 65}}, {{70, 130}}, {{40, 17}, {100, 1}, {0, 80}, {7, 5}}};
  uint64_t seed = 500;
  for (const Cfg& c : {Cfg{16, 2, 256, 16}, Cfg{24, 4, 256, 16}, Cfg{2, 2, 256, 32}})
    for (const Seqs& seqs : cases) {
      const std::vector<double> e = run_variants(B, c, seqs, seed += 7, kDh256Variants);
      std::printf("  %-70s rel L2 %.3g (mma.sync %.3g)\n", tag_of(c, seqs).c_str(), e[0], e[1]);
      for (double x : e) EXPECT_LT(x, kTol) << tag_of(c, seqs);
    }
}

// k_flash_wg against its session-32 form (DS_CUDA_FA_WG_V=0; flash_wg.cu), bit for bit: skipping O's rescale where
// every factor is 1 and rescaling earlier change no bits; ex2.approx.ftz differs from exp2f only below 2^-126, which
// these scores never reach. GQA 8:1 (the only group built in both forms). (Session 33 ran every combination of the
// variant bits through this test.)
TEST_F(FlashAttention, WgVariantsSameBits) {
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess || prop.major != 9) GTEST_SKIP() << "k_flash_wg needs sm_90";
  Both B;
  const std::vector<Seqs> cases = {{{0, 65}},   {{0, 2049}}, {{1000, 255}},
                                   {{5, 2049}, {2000, 1}, {17, 4}}, {{40, 17}, {100, 1}, {0, 255}, {7, 5}}};
  const std::vector<Variant> vars = {{"DS_CUDA_FA_WG_V", "0"}, {nullptr, nullptr}};
  uint64_t seed = 700;
  for (const Cfg& c : {Cfg{16, 2, 256, 16}, Cfg{16, 2, 256, 32}, Cfg{8, 1, 256, 16}})
    for (const Seqs& seqs : cases) {
      std::vector<std::vector<float>> outs;
      const std::vector<double> e = run_variants(B, c, seqs, seed += 7, vars, &outs);
      std::printf("  %-70s rel L2 %.3g\n", tag_of(c, seqs).c_str(), e[0]);
      for (size_t i = 1; i < outs.size(); ++i)
        EXPECT_TRUE(outs[i] == outs[0]) << tag_of(c, seqs) << " variant " << (vars[i].value ? vars[i].value : "default");
    }
}

// Decode rows and short verify chunks: the tensor-core split kernel (attn_decode.h) and the CUDA-core one it replaced
// (DS_CUDA_NO_TC_DECODE=1), both against the CPU, over head dims, GQA groups (1..16 run on tensor cores; 32 falls
// back), block sizes (8, 16, 32) and batches whose split counts leave splits empty (batch 1: 64 splits over a
// 1..17-position context), cut tiles mid-way or run many tiles per split (5,000 positions).
TEST_F(FlashAttention, DecodeRowsMatchCpu) {
  Both B;
  std::vector<Seqs> batches = {{{0, 1}},    {{1, 1}},    {{15, 1}},   {{16, 1}},   {{17, 1}},
                               {{47, 1}},   {{2047, 1}}, {{5000, 1}}, {{100, 2}, {300, 5}, {0, 4}, {16, 3}}};
  {
    Seqs many;  // 64 decode rows of mixed lengths (batch 64: 16 splits per row)
    std::mt19937 rng(5);
    for (int i = 0; i < 64; ++i) many.push_back({int64_t(rng() % 1200), 1});
    batches.push_back(many);
  }
  // Block size 8: a 16-position tile spans two cache blocks.
  const std::vector<Cfg> cfgs = {{16, 2, 256, 16}, {16, 2, 256, 32}, {16, 1, 256, 16}, {6, 2, 128, 16},
                                 {8, 8, 128, 32},  {4, 1, 64, 16},   {32, 1, 64, 16},  {16, 2, 256, 8}};
  uint64_t seed = 900;
  for (const Cfg& c : cfgs)
    for (const Seqs& seqs : batches) {
      if (c.Dh != 256 && seqs.size() == 64) continue;
      seed += 7;
      const double tc = run_case(B, c, seqs, seed);
      setenv("DS_CUDA_NO_TC_DECODE", "1", 1);
      const double cc = run_case(B, c, seqs, seed);
      unsetenv("DS_CUDA_NO_TC_DECODE");
      std::string tag = tag_of(c, seqs);
      if (tag.size() > 90) tag = tag.substr(0, 87) + "...";
      std::printf("  %-90s rel L2 tensor cores %.3g, CUDA cores %.3g\n", tag.c_str(), tc, cc);
      EXPECT_LT(tc, kTol) << tag;
      EXPECT_LT(cc, kTol) << tag;
    }
}

// Timing of the attention op alone (Qwen3.6-35B-A3B full attention: 16 q heads, 2 kv heads, head_dim 256), one
// prefill sequence from an empty cache; FLOPs = 4·Dh·Nh·Σ_i (i + 1) (QKᵀ and PV, causal). Prints, asserts nothing.
TEST_F(FlashAttention, Throughput) {
  Both B;
  const int64_t Nh = 16, Nkv = 2, Dh = 256, bs = 16;
  auto time_it = [&](int64_t T, bool flash, int iters) {
    const int64_t nblocks = (T + bs - 1) / bs;
    std::vector<int32_t> pool(nblocks);
    std::iota(pool.begin(), pool.end(), 0);
    KvLayer kg;
    kg.block_size = bs;
    kg.k = B.gpu->alloc(DType::BF16, {nblocks, bs, Nkv, Dh});
    kg.v = B.gpu->alloc(DType::BF16, {nblocks, bs, Nkv, Dh});
    BatchMeta b = make_batch({{0, T}}, bs, pool);
    B.gpu->prepare_batch(b);
    Tensor k = B.gpu->upload_f32(randn(T * Nkv * Dh, 1.f, 1), {T, Nkv * Dh}, DType::BF16);
    Tensor v = B.gpu->upload_f32(randn(T * Nkv * Dh, 1.f, 2), {T, Nkv * Dh}, DType::BF16);
    Tensor q = B.gpu->upload_f32(randn(T * Nh * Dh, 1.f, 3), {T, Nh * Dh}, DType::BF16);
    Tensor o = B.gpu->alloc(DType::BF16, {T, Nh * Dh});
    B.gpu->kv_cache_write(kg, k, v, b);
    if (flash) unsetenv("DS_CUDA_NO_FLASH");
    else setenv("DS_CUDA_NO_FLASH", "1", 1);
    B.gpu->attention(q, kg, b, o);  // warm-up
    B.gpu->synchronize();
    auto st = static_cast<cudaStream_t>(B.gpu->stream_handle());
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    cudaEventRecord(e0, st);
    for (int i = 0; i < iters; ++i) B.gpu->attention(q, kg, b, o);
    cudaEventRecord(e1, st);
    cudaEventSynchronize(e1);
    float ms = 0.f;
    cudaEventElapsedTime(&ms, e0, e1);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    unsetenv("DS_CUDA_NO_FLASH");
    ms /= float(iters);
    const double flops = 4.0 * double(Dh) * double(Nh) * double(T) * double(T + 1) / 2.0;
    std::printf("  attention %-5s T=%-6lld %9.3f ms  %7.1f TFLOP/s  (%.1f%% of 990 dense bf16)\n",
                flash ? "flash" : "split", static_cast<long long>(T), ms, flops / (ms * 1e-3) / 1e12,
                flops / (ms * 1e-3) / 1e12 / 990.0 * 100.0);
  };
  time_it(4096, false, 2);
  for (const char* wg : {"1", "0"}) {  // the wgmma kernel (sm_90), then the mma.sync one
    test::ScopedEnv env("DS_CUDA_FA_WG", wg);
    std::printf("  DS_CUDA_FA_WG=%s\n", wg);
    time_it(4096, true, 10);
    time_it(16384, true, 5);
    time_it(32768, true, 3);
  }
}

}  // namespace
}  // namespace ds
