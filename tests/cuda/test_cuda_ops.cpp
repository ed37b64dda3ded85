// Every op of the CUDA backend against the fp32 CPU reference, on the real Qwen3.6-35B-A3B shapes and awkward ones.
// Inputs are bf16-exact so both backends see the same numbers; the CUDA side keeps bf16 activations, so the bound
// is relative L2 ≤ 1e-2 (bf16 output rounding alone is ~1.5e-3).
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>

#include "backend/cuda/bf16_mma.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/int4_dequant.h"
#include "backend/cuda/int4_mma.h"
#include "backend/cuda/int4_wg.h"
#include "backend/cuda/probe.h"
#include "cuda_test_util.h"

namespace ds {
namespace {

using test::Both;
using test::Pair;
using test::randn;

constexpr double kTol = 1e-2;

using test::ScopedEnv;

// A weight [N, K] of the linear tests and what it stands for.
struct LinearShape {
  int64_t N, K;
  const char* what;
};

#define REPORT(name, e)                                            \
  do {                                                             \
    double e_ = (e);                                               \
    std::printf("  %-60s rel L2 %.3g\n", std::string(name).c_str(), e_); \
    EXPECT_LT(e_, kTol) << name;                                   \
  } while (0)

// Host data of one random linear, dense or int4 (GPTQ v1 layout, zero point 8, signed scales).
struct HostLinear {
  int64_t N, K;
  bool int4;
  std::vector<uint16_t> bf16;
  std::vector<int32_t> qw, qz;
  std::vector<uint16_t> sc;
  // sym: every zero point 8 (qzeros 0x77777777), as in every checkpoint the loader accepts; else random nibbles.
  HostLinear(int64_t n, int64_t k, bool q, uint64_t seed, bool sym = false) : N(n), K(k), int4(q) {
    std::mt19937_64 g(seed);
    if (!q) {
      auto w = randn(size_t(N * K), 1.f / std::sqrt(float(K)), seed);
      bf16.resize(w.size());
      for (size_t i = 0; i < w.size(); ++i) bf16[i] = f32_to_bf16(w[i]);
    } else {
      qw.resize(size_t(K / 8 * N));
      for (auto& x : qw) x = int32_t(uint32_t(g()));
      // Zero points: AutoRound's symmetric checkpoints store 7 (true zero 8) everywhere; any nibble is legal.
      qz.resize(size_t(K / 128 * N / 8));
      for (auto& x : qz) x = int32_t(sym ? 0x77777777u : uint32_t(g()));
      auto s = randn(size_t(K / 128 * N), 0.3f / std::sqrt(float(K)), seed + 1);
      sc.resize(s.size());
      for (size_t i = 0; i < s.size(); ++i) sc[i] = f32_to_f16(s[i]);
    }
  }
  LinearSource src() const {
    LinearSource s;
    s.N = N;
    s.K = K;
    if (!int4) {
      s.kind = LinearSource::Kind::Dense;
      s.dtype = DType::BF16;
      s.data = bf16.data();
    } else {
      s.kind = LinearSource::Kind::Int4;
      s.qweight = qw.data();
      s.qzeros = qz.data();
      s.scales = sc.data();
    }
    return s;
  }
};

// E experts of random weights (gate and up [I, H], down [H, I]; int4 or bf16); expert e's seeds sg + e, su + e, sd + e.
// Holds the host data its LinearSources point into: construct in place, do not copy.
struct HostExperts {
  std::vector<HostLinear> gate, up, down;
  std::vector<std::vector<LinearSource>> gu;
  std::vector<LinearSource> dn;
  HostExperts(int64_t E, int64_t H, int64_t I, bool q, uint64_t sg, uint64_t su, uint64_t sd, bool sym = false)
      : gu(E), dn(E) {
    gate.reserve(E), up.reserve(E), down.reserve(E);
    for (int64_t e = 0; e < E; ++e) {
      gate.emplace_back(I, H, q, sg + e, sym);
      up.emplace_back(I, H, q, su + e, sym);
      down.emplace_back(H, I, q, sd + e, sym);
      gu[e] = {gate.back().src(), up.back().src()};
      dn[e] = down.back().src();
    }
  }
  HostExperts(const HostExperts&) = delete;
  Experts make(Backend& b) const { return b.make_experts(gu, dn); }
};

// Uniform random routing of T tokens, appended to idv / wv: each token's K distinct experts of E (one shuffle of
// 0..E−1 per token, from g) with weight 1/K; ids as floats, which the tests upload as I32.
void uniform_routing(int64_t T, int64_t E, int64_t K, std::mt19937& g, std::vector<float>& idv,
                     std::vector<float>& wv) {
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int> perm(static_cast<size_t>(E));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), g);
    for (int64_t k = 0; k < K; ++k) idv.push_back(float(perm[size_t(k)])), wv.push_back(1.f / float(K));
  }
}

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override { DS_REQUIRE_GPU(); }
};

TEST_F(CudaOps, ElementwiseAndNorms) {
  Both B;
  for (int64_t T : {1, 17, 255}) {
    const int64_t H = 2048;
    auto x = B.up(randn(T * H, 1.f, 1 + T), {T, H});
    auto w = B.up(randn(H, 0.2f, 2, 1.f), {H}, DType::F32);
    auto y = B.zeros({T, H});
    B.cpu->rmsnorm(x.c, w.c, 1e-6f, y.c);
    B.gpu->rmsnorm(x.g, w.g, 1e-6f, y.g);
    REPORT("rmsnorm T=" + std::to_string(T) + " H=2048", B.err(y));
    // in place, as the MTP head uses it
    B.cpu->rmsnorm(x.c, w.c, 1e-6f, x.c);
    B.gpu->rmsnorm(x.g, w.g, 1e-6f, x.g);
    REPORT("rmsnorm in place T=" + std::to_string(T), B.err(x));
    auto z = B.up(randn(T * H, 1.f, 3 + T), {T, H});
    B.cpu->add_inplace(y.c, z.c);
    B.gpu->add_inplace(y.g, z.g);
    REPORT("add_inplace T=" + std::to_string(T), B.err(y));
    auto gu = B.up(randn(T * 1024, 2.f, 4 + T), {T, 1024});
    auto a = B.zeros({T, 512});
    B.cpu->silu_mul(gu.c, a.c);
    B.gpu->silu_mul(gu.g, a.g);
    REPORT("silu_mul T=" + std::to_string(T) + " I=512", B.err(a));
    B.cpu->sigmoid_gate_mul(y.c, z.c);
    B.gpu->sigmoid_gate_mul(y.g, z.g);
    REPORT("sigmoid_gate_mul T=" + std::to_string(T), B.err(y));
    auto gl = B.up(randn(T, 2.f, 5 + T), {T, 1});
    B.cpu->sigmoid_scale_add(y.c, z.c, gl.c);
    B.gpu->sigmoid_scale_add(y.g, z.g, gl.g);
    REPORT("sigmoid_scale_add T=" + std::to_string(T), B.err(y));
    // gated rmsnorm over DeltaNet heads (Hv=32, Dv=128)
    auto o = B.up(randn(T * 4096, 1.f, 6 + T), {T, 4096});
    auto zz = B.up(randn(T * 4096, 1.f, 7 + T), {T, 4096});
    auto nw = B.up(randn(128, 0.2f, 8, 1.f), {128}, DType::F32);
    auto gy = B.zeros({T, 4096});
    B.cpu->gated_rmsnorm(o.c, zz.c, nw.c, 1e-6f, gy.c);
    B.gpu->gated_rmsnorm(o.g, zz.g, nw.g, 1e-6f, gy.g);
    REPORT("gated_rmsnorm T=" + std::to_string(T) + " Hv=32 Dv=128", B.err(gy));
    // other head sizes (warp form for 128·{1,2,4}, the block form otherwise) and row counts that are not a
    // multiple of the warp form's 8 rows per block
    for (int64_t D : {128, 256, 512, 96}) {
      const int64_t R = 3 * T + 2;
      auto o2 = B.up(randn(R * D, 1.f, 9 + T), {R, D});
      auto z2 = B.up(randn(R * D, 1.f, 10 + T), {R, D});
      auto w2 = B.up(randn(D, 0.2f, 11, 1.f), {D}, DType::F32);
      auto y2 = B.zeros({R, D});
      B.cpu->gated_rmsnorm(o2.c, z2.c, w2.c, 1e-6f, y2.c);
      B.gpu->gated_rmsnorm(o2.g, z2.g, w2.g, 1e-6f, y2.g);
      REPORT("gated_rmsnorm R=" + std::to_string(R) + " D=" + std::to_string(D), B.err(y2));
    }
    std::vector<int32_t> rows;
    for (int64_t i = T - 1; i >= 0; i -= 3) rows.push_back(int32_t(i));
    auto gr = B.zeros({int64_t(rows.size()), H});
    B.cpu->gather_rows(z.c, rows, gr.c);
    B.gpu->gather_rows(z.g, rows, gr.g);
    EXPECT_EQ(B.err(gr), 0.0);
  }
  // embed
  BatchMeta b;
  for (int i = 0; i < 17; ++i) b.tokens.push_back((i * 7919) % 1000);
  b.positions.assign(3 * 17, 0);
  auto table = B.up(randn(1000 * 2048, 1.f, 9), {1000, 2048});
  auto e = B.zeros({17, 2048});
  B.gpu->prepare_batch(b);
  B.cpu->embed(table.c, b, e.c);
  B.gpu->embed(table.g, b, e.g);
  EXPECT_EQ(B.err(e), 0.0);
  // I32 round trip
  auto ids = B.up({1, -2, 300000}, {3}, DType::I32);
  EXPECT_EQ(B.gpu->to_host_f32(ids.g), (std::vector<float>{1, -2, 300000}));
}

TEST_F(CudaOps, Linear) {
  Both B;
  const std::vector<LinearShape> shapes = {{8192, 2048, "q_proj / DeltaNet qkv"}, {2048, 4096, "o_proj / DeltaNet out"},
                                     {512, 2048, "kv_proj"}, {1024, 2048, "expert gate_up"}, {2048, 512, "expert down"},
                                     {1, 2048, "shared expert gate"}};
  for (bool q : {false, true})
    for (auto& s : shapes) {
      if (q && s.N % 8 != 0) continue;  // the int4 format packs zero points 8 columns per word
      HostLinear hl(s.N, s.K, q, s.N * 31 + s.K);
      Linear lc = B.cpu->make_linear({hl.src()}), lg = B.gpu->make_linear({hl.src()});
      for (int64_t M : {1, 3, 8, 9, 17, 255, 300}) {
        auto x = B.up(randn(M * s.K, 1.f, M + s.K), {M, s.K});
        auto y = B.zeros({M, s.N});
        B.cpu->linear(x.c, lc, y.c);
        B.gpu->linear(x.g, lg, y.g);
        REPORT(std::string(q ? "int4" : "bf16") + " linear " + s.what + " N=" + std::to_string(s.N) +
                   " K=" + std::to_string(s.K) + " M=" + std::to_string(M),
               B.err(y));
      }
    }
  // concatenated parts (gate | up; b | a) and F32 output (logits)
  for (bool q : {false, true}) {
    HostLinear a(512, 2048, q, 11), c(512, 2048, q, 12);
    Linear lc = B.cpu->make_linear({a.src(), c.src()}), lg = B.gpu->make_linear({a.src(), c.src()});
    for (int64_t M : {1, 17}) {
      auto x = B.up(randn(M * 2048, 1.f, 13 + M), {M, 2048});
      auto y = B.zeros({M, 1024}, DType::F32);
      B.cpu->linear(x.c, lc, y.c);
      B.gpu->linear(x.g, lg, y.g);
      REPORT(std::string(q ? "int4" : "bf16") + " concat linear, F32 out, M=" + std::to_string(M), B.err(y));
    }
  }
  HostLinear lm(32768, 2048, false, 14);
  Linear lc = B.cpu->make_linear({lm.src()}), lg = B.gpu->make_linear({lm.src()});
  for (int64_t M : {1, 5}) {
    auto x = B.up(randn(M * 2048, 1.f, 15 + M), {M, 2048});
    auto y = B.zeros({M, 32768}, DType::F32);
    B.cpu->linear(x.c, lc, y.c);
    B.gpu->linear(x.g, lg, y.g);
    REPORT("bf16 lm_head-like V=32768 F32 out M=" + std::to_string(M), B.err(y));
  }
}

// The fused ops (ops.h "fused ops") against the CPU, and against their own default composition on the GPU, which
// they must equal exactly (same rounding of every intermediate): add_rmsnorm, linear_group (bf16 rows through the
// small-M GEMV, SwiGLU in its epilogue, int4 jobs alongside), linear_gated_add. Also the small-M GEMV against
// cuBLAS (DS_CUDA_NO_GEMV) within bf16 rounding.
TEST_F(CudaOps, FusedOps) {
  Both B;
  auto same = [&](const Tensor& a, const Tensor& b) { return B.gpu->to_host_f32(a) == B.gpu->to_host_f32(b); };
  auto copy_of = [&](const Pair& p) {
    Pair q{B.cpu->alloc(p.c.dtype, p.c.shape), B.gpu->alloc(p.g.dtype, p.g.shape)};
    B.cpu->copy(q.c, p.c);
    B.gpu->copy(q.g, p.g);
    return q;
  };
  for (int64_t K : {int64_t(2048), int64_t(512), int64_t(8)}) {
    // the MoE block's group: router (E = 256), shared gate_up with SwiGLU (I = 512 → 2I rows), shared gate (N = 1),
    // plus an int4 projection and an odd N, all reading the same x
    HostLinear router(256, K, false, 21 + K), sgu(1024, K, false, 22 + K), sg(1, K, false, 23 + K),
        q4(K >= 128 ? 512 : 16, K, K >= 128, 24 + K), odd(37, K, false, 25 + K), sdn(K, 512, false, 26 + K),
        q4b(K >= 128 ? 272 : 24, K, K >= 128, 27 + K), q4c(K >= 128 ? 64 : 8, K, K >= 128, 28 + K);
    auto mk = [&](Backend& be, const HostLinear& h) { return be.make_linear({h.src()}); };
    Linear rc = mk(*B.cpu, router), rg = mk(*B.gpu, router), gc = mk(*B.cpu, sgu), gg = mk(*B.gpu, sgu),
           sc = mk(*B.cpu, sg), sgg = mk(*B.gpu, sg), qc = mk(*B.cpu, q4), qg = mk(*B.gpu, q4),
           oc = mk(*B.cpu, odd), og = mk(*B.gpu, odd), dc = mk(*B.cpu, sdn), dg = mk(*B.gpu, sdn),
           bc = mk(*B.cpu, q4b), bg = mk(*B.gpu, q4b), cc = mk(*B.cpu, q4c), cg = mk(*B.gpu, q4c);
    for (int64_t T : {1, 2, 3, 5, 8, 13, 16, 17, 64}) {
      const std::string tag = " K=" + std::to_string(K) + " T=" + std::to_string(T);
      auto x = B.up(randn(T * K, 1.f, 31 + T + K), {T, K});
      Pair yr = B.zeros({T, 256}), ya = B.zeros({T, 512}), yg = B.zeros({T, 1}), yq = B.zeros({T, q4.N}),
           yo = B.zeros({T, 37}, DType::F32);
      auto jobs = [](Linear& r, Linear& g, Linear& s, Linear& q, Linear& o, Tensor& a, Tensor& b, Tensor& c,
                     Tensor& d, Tensor& e) {
        return std::vector<Backend::LinearJob>{{&r, &a}, {&g, &b, true}, {&s, &c}, {&q, &d}, {&o, &e}};
      };
      B.cpu->linear_group(x.c, jobs(rc, gc, sc, qc, oc, yr.c, ya.c, yg.c, yq.c, yo.c));
      B.gpu->linear_group(x.g, jobs(rg, gg, sgg, qg, og, yr.g, ya.g, yg.g, yq.g, yo.g));
      // three int4 projections of one input (attention q / k / v): two share a launch, the third runs alone; each
      // must equal its own linear bit for bit
      {
        Pair p1 = B.zeros({T, q4.N}), p2 = B.zeros({T, q4b.N}, DType::F32), p3 = B.zeros({T, q4c.N});
        B.cpu->linear_group(x.c, {{&qc, &p1.c}, {&bc, &p2.c}, {&cc, &p3.c}});
        B.gpu->linear_group(x.g, {{&qg, &p1.g}, {&bg, &p2.g}, {&cg, &p3.g}});
        REPORT("linear_group 3 projections, 1st" + tag, B.err(p1));
        REPORT("linear_group 3 projections, 2nd (F32 out)" + tag, B.err(p2));
        REPORT("linear_group 3 projections, 3rd" + tag, B.err(p3));
        Tensor s1 = B.gpu->alloc(DType::BF16, {T, q4.N}), s2 = B.gpu->alloc(DType::F32, {T, q4b.N}),
               s3 = B.gpu->alloc(DType::BF16, {T, q4c.N});
        B.gpu->linear(x.g, qg, s1);
        B.gpu->linear(x.g, bg, s2);
        B.gpu->linear(x.g, cg, s3);
        EXPECT_TRUE(same(p1.g, s1) && same(p2.g, s2) && same(p3.g, s3)) << "paired int4 launch differs" << tag;
      }
      REPORT("linear_group router" + tag, B.err(yr));
      REPORT("linear_group shared gate_up + SwiGLU" + tag, B.err(ya));
      REPORT("linear_group shared gate (N=1)" + tag, B.err(yg));
      REPORT(std::string("linear_group ") + (q4.int4 ? "int4" : "bf16") + " projection" + tag, B.err(yq));
      REPORT("linear_group N=37 F32 out" + tag, B.err(yo));
      // the default composition on the GPU: equal bit for bit
      Tensor r2 = B.gpu->alloc(DType::BF16, {T, 256}), a2 = B.gpu->alloc(DType::BF16, {T, 512}),
             g2 = B.gpu->alloc(DType::BF16, {T, 1}), q2 = B.gpu->alloc(DType::BF16, {T, q4.N}),
             o2 = B.gpu->alloc(DType::F32, {T, 37});
      B.gpu->Backend::linear_group(x.g, jobs(rg, gg, sgg, qg, og, r2, a2, g2, q2, o2));
      EXPECT_TRUE(same(yr.g, r2) && same(ya.g, a2) && same(yg.g, g2) && same(yq.g, q2) && same(yo.g, o2))
          << "linear_group differs from its composition" << tag;
      // the small-M GEMV against cuBLAS
      setenv("DS_CUDA_NO_GEMV", "1", 1);
      Tensor r3 = B.gpu->alloc(DType::BF16, {T, 256});
      B.gpu->linear(x.g, rg, r3);
      unsetenv("DS_CUDA_NO_GEMV");
      const double ge = test::rel(B.gpu->to_host_f32(yr.g), B.gpu->to_host_f32(r3));
      std::printf("  %-60s rel L2 %.3g\n", ("GEMV vs cuBLAS router" + tag).c_str(), ge);
      EXPECT_LT(ge, kTol);
      // shared expert down (K_in = 512 → N = K) with its sigmoid gate, added into y
      if (K >= 512) {
        auto act = B.up(randn(T * 512, 1.f, 41 + T), {T, 512});
        auto gl = B.up(randn(T, 2.f, 42 + T), {T, 1});
        auto y = B.up(randn(T * K, 1.f, 43 + T), {T, K});
        Pair y2 = copy_of(y);
        B.cpu->linear_gated_add(act.c, dc, gl.c, y.c);
        B.gpu->linear_gated_add(act.g, dg, gl.g, y.g);
        REPORT("linear_gated_add (shared down + gate)" + tag, B.err(y));
        B.gpu->Backend::linear_gated_add(act.g, dg, gl.g, y2.g);
        EXPECT_TRUE(same(y.g, y2.g)) << "linear_gated_add differs from its composition" << tag;
      }
      // residual add + next norm
      auto rx = B.up(randn(T * K, 1.f, 51 + T), {T, K});
      auto rd = B.up(randn(T * K, 1.f, 52 + T), {T, K});
      auto nw = B.up(randn(K, 0.2f, 53, 1.f), {K}, DType::F32);
      Pair rx2 = copy_of(rx), h = B.zeros({T, K});
      Tensor h2 = B.gpu->alloc(DType::BF16, {T, K});
      B.cpu->add_rmsnorm(rx.c, rd.c, nw.c, 1e-6f, h.c);
      B.gpu->add_rmsnorm(rx.g, rd.g, nw.g, 1e-6f, h.g);
      REPORT("add_rmsnorm h" + tag, B.err(h));
      REPORT("add_rmsnorm x" + tag, B.err(rx));
      B.gpu->Backend::add_rmsnorm(rx2.g, rd.g, nw.g, 1e-6f, h2);
      EXPECT_TRUE(same(rx.g, rx2.g) && same(h.g, h2)) << "add_rmsnorm differs from add_inplace + rmsnorm" << tag;
    }
  }
}

// add_rmsnorm's typed kernels (k_add_rmsnorm_t, one per bf16 / fp32 combination of x, d and h) equal the generic
// one (DS_CUDA_ADDNORM_T=0) bit for bit, on full and partial columns per thread, and the CPU within tolerance.
TEST_F(CudaOps, AddRmsnormTyped) {
  Both B;
  Backend& g = *B.gpu;
  for (int64_t D : {2048, 4096, 200, 2300})
    for (int64_t T : {1, 3, 64})
      for (DType xdt : {DType::BF16, DType::F32})
        for (DType ddt : {DType::BF16, DType::F32})
          for (DType hdt : {DType::BF16, DType::F32}) {
            const std::string tag = " D=" + std::to_string(D) + " T=" + std::to_string(T) + " x " + dtype_name(xdt) +
                                    " d " + dtype_name(ddt) + " h " + dtype_name(hdt);
            const auto xv = randn(size_t(T * D), 1.f, uint64_t(60 + D + T)), dv = randn(size_t(T * D), 1.f, 61);
            const auto wv = randn(size_t(D), 0.2f, 62, 1.f);
            Tensor w = g.upload_f32(wv, {D}, DType::F32), d = g.upload_f32(dv, {T, D}, ddt);
            std::vector<float> xs[2], hs[2];
            for (int typed : {1, 0}) {
              ScopedEnv e("DS_CUDA_ADDNORM_T", typed ? "1" : "0");
              Tensor x = g.upload_f32(xv, {T, D}, xdt), h = g.alloc(hdt, {T, D});
              g.add_rmsnorm(x, d, w, 1e-6f, h);
              xs[typed] = g.to_host_f32(x), hs[typed] = g.to_host_f32(h);
            }
            EXPECT_TRUE(xs[0] == xs[1] && hs[0] == hs[1]) << "typed and generic add_rmsnorm differ" << tag;
            Tensor xc = B.cpu->upload_f32(xv, {T, D}, DType::F32), dc = B.cpu->upload_f32(dv, {T, D}, DType::F32);
            Tensor wc = B.cpu->upload_f32(wv, {D}, DType::F32), hc = B.cpu->alloc(DType::F32, {T, D});
            B.cpu->add_rmsnorm(xc, dc, wc, 1e-6f, hc);
            EXPECT_LT(test::rel(hs[1], B.cpu->to_host_f32(hc)), 2e-2) << "typed add_rmsnorm vs CPU" << tag;
          }
}

// The tensor-core kernel of the small bf16 linears (bf16_mma.h) at every step size a decode or verify has (M = 1 ..
// 256), in each mode (plain, SwiGLU, gated add), on the real shapes and awkward ones (N = 1, 37, 48; K = 96 and 200,
// whose last 64-input chunk is partial; SwiGLU with I = 20, not a multiple of 16): against the CPU; against the GEMV
// it replaces (DS_CUDA_NO_BF16_MMA=1) within bf16 rounding; and every row of a 64- and a 256-row step equal bit for
// bit to the same row alone, single weights and the MoE block's group (router + gate_up·SwiGLU + gate) alike.
TEST_F(CudaOps, Bf16MmaLinears) {
  Both B;
  struct Case {
    int64_t N, K;
    int mode;  // 0 plain (linear), 1 SwiGLU (linear_group), 2 gated add (linear_gated_add)
    DType ydt;
    const char* what;
  };
  const std::vector<Case> cases = {
      {256, 2048, 0, DType::BF16, "router"},        {1024, 2048, 1, DType::BF16, "shared gate_up + SwiGLU"},
      {2048, 512, 2, DType::BF16, "shared down + gated add"}, {32, 2048, 0, DType::BF16, "in_proj_a"},
      {1, 2048, 0, DType::BF16, "shared gate N=1"}, {48, 96, 0, DType::BF16, "N=48 K=96"},
      {37, 200, 0, DType::F32, "N=37 K=200 F32 out"}, {40, 136, 1, DType::BF16, "SwiGLU I=20 K=136"},
      {24, 4096, 2, DType::BF16, "gated add N=24 K=4096"}};
  auto same = [&](const Tensor& a, const Tensor& b) { return B.gpu->to_host_f32(a) == B.gpu->to_host_f32(b); };
  auto rows_of = [](const std::vector<float>& v, int64_t r0, int64_t n, int64_t cols) {
    return std::vector<float>(v.begin() + r0 * cols, v.begin() + (r0 + n) * cols);
  };
  for (const auto& c : cases) {
    HostLinear hl(c.N, c.K, false, 7 * c.N + c.K);
    const Linear lc = B.cpu->make_linear({hl.src()}), lg = B.gpu->make_linear({hl.src()});
    const int64_t cols = c.mode == 1 ? c.N / 2 : c.N;
    auto run = [&](Backend& be, const Linear& l, const Tensor& x, const Tensor& gate, Tensor& y) {
      if (c.mode == 0) be.linear(x, l, y);
      else if (c.mode == 1) be.linear_group(x, {{&l, &y, true}});
      else be.linear_gated_add(x, l, gate, y);
    };
    // inputs of 256 rows; a step of M rows takes rows [r0, r0 + M)
    const auto xs = randn(size_t(256 * c.K), 1.f, 100 + c.K), gs = randn(256, 2.f, 101),
               ys = randn(size_t(256 * cols), 1.f, 102);
    auto step = [&](int64_t r0, int64_t M) {  // GPU output of rows [r0, r0 + M)
      Tensor x = B.gpu->upload_f32(rows_of(xs, r0, M, c.K), {M, c.K}, DType::BF16);
      Tensor gate = B.gpu->upload_f32(rows_of(gs, r0, M, 1), {M, 1}, DType::BF16);
      Tensor y = c.mode == 2 ? B.gpu->upload_f32(rows_of(ys, r0, M, cols), {M, cols}, c.ydt)
                             : B.gpu->alloc(c.ydt, {M, cols});
      run(*B.gpu, lg, x, gate, y);
      return B.gpu->to_host_f32(y);
    };
    for (int64_t M : {1, 2, 3, 4, 5, 8, 17, 64, 65, 255, 256}) {
      const std::string tag = std::string("bf16 mma ") + c.what + " M=" + std::to_string(M);
      auto x = B.up(rows_of(xs, 0, M, c.K), {M, c.K});
      auto gate = B.up(rows_of(gs, 0, M, 1), {M, 1});
      Pair y = c.mode == 2 ? B.up(rows_of(ys, 0, M, cols), {M, cols}, c.ydt) : B.zeros({M, cols}, c.ydt);
      run(*B.cpu, lc, x.c, gate.c, y.c);
      run(*B.gpu, lg, x.g, gate.g, y.g);
      REPORT(tag, B.err(y));
      if (M == 1 || M == 5 || M == 64) {  // the GEMV it replaces
        Pair y2 = c.mode == 2 ? B.up(rows_of(ys, 0, M, cols), {M, cols}, c.ydt) : B.zeros({M, cols}, c.ydt);
        setenv("DS_CUDA_NO_BF16_MMA", "1", 1);
        run(*B.gpu, lg, x.g, gate.g, y2.g);
        unsetenv("DS_CUDA_NO_BF16_MMA");
        const double e = test::rel(B.gpu->to_host_f32(y.g), B.gpu->to_host_f32(y2.g));
        std::printf("  %-60s rel L2 %.3g\n", (tag + " vs GEMV").c_str(), e);
        EXPECT_LT(e, kTol) << tag;
      }
    }
    // batch invariance: each row of a 64-row and a 256-row step equals the row alone
    const auto y256 = step(0, 256), y64 = step(0, 64);
    int diff = 0;
    for (int64_t r = 0; r < 256; r += r < 64 ? 1 : 37) {
      const auto one = step(r, 1);
      diff += one != rows_of(y256, r, 1, cols);
      if (r < 64) diff += one != rows_of(y64, r, 1, cols);
    }
    const auto y17 = step(3, 17);
    diff += y17 != rows_of(y256, 3, 17, cols);
    EXPECT_EQ(diff, 0) << "bf16 mma " << c.what << ": rows differ across step sizes";
  }
  // the MoE block's group in one launch (a two-tile kernel with plain weights beside the SwiGLU one): rows invariant,
  // and each output equal to its weight's own launch
  HostLinear router(256, 2048, false, 61), sgu(1024, 2048, false, 62), sg(1, 2048, false, 63);
  const Linear rg = B.gpu->make_linear({router.src()}), gg = B.gpu->make_linear({sgu.src()}),
               sgg = B.gpu->make_linear({sg.src()});
  const auto xs = randn(size_t(64 * 2048), 1.f, 64);
  auto group = [&](int64_t r0, int64_t M) {
    Tensor x = B.gpu->upload_f32(rows_of(xs, r0, M, 2048), {M, 2048}, DType::BF16);
    Tensor yr = B.gpu->alloc(DType::BF16, {M, 256}), ya = B.gpu->alloc(DType::BF16, {M, 512}),
           yg = B.gpu->alloc(DType::BF16, {M, 1}), r2 = B.gpu->alloc(DType::BF16, {M, 256});
    B.gpu->linear_group(x, {{&rg, &yr}, {&gg, &ya, true}, {&sgg, &yg}});
    B.gpu->linear(x, rg, r2);
    EXPECT_TRUE(same(yr, r2)) << "router in the group differs from its own launch, M=" << M;
    return std::array<std::vector<float>, 3>{B.gpu->to_host_f32(yr), B.gpu->to_host_f32(ya), B.gpu->to_host_f32(yg)};
  };
  const auto all = group(0, 64);
  int diff = 0;
  for (int64_t r = 0; r < 64; ++r) {
    const auto one = group(r, 1);
    diff += one[0] != rows_of(all[0], r, 1, 256) || one[1] != rows_of(all[1], r, 1, 512) ||
            one[2] != rows_of(all[2], r, 1, 1);
  }
  EXPECT_EQ(diff, 0) << "bf16 mma group: rows differ across step sizes";
}

// A batch of sequences: (ctx_len, q_len) each; blocks of 16 tokens scattered over a shuffled pool.
BatchMeta make_batch(const std::vector<std::pair<int64_t, int64_t>>& seqs, int64_t bs, std::vector<int32_t>& pool,
                     bool distinct_rows = false) {
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
      for (int r = 0; r < 3; ++r)
        b.positions[r * T + s.q_start + i] = int32_t(s.ctx_len + i + (distinct_rows ? 5 * r : 0));
  return b;
}

TEST_F(CudaOps, QkNormRope) {
  Both B;
  struct Cfg {
    int64_t Nh, Nkv, Dh;
    int rot;
    std::array<int, 3> sec;
  };
  for (auto c : {Cfg{16, 2, 256, 64, {11, 11, 10}}, Cfg{4, 2, 64, 16, {3, 3, 2}}})
    for (bool inter : {true, false}) {
      std::vector<int32_t> pool(1000);
      std::iota(pool.begin(), pool.end(), 0);
      BatchMeta b = make_batch({{0, 17}, {100, 1}, {3000, 5}}, 16, pool, true);
      const int64_t T = b.num_tokens();
      B.gpu->prepare_batch(b);
      RopeParams rp;
      rp.rotary_dim = c.rot;
      rp.mrope_section = c.sec;
      rp.mrope_interleaved = inter;
      auto qg = B.up(randn(T * c.Nh * 2 * c.Dh, 1.f, 21), {T, c.Nh * 2 * c.Dh});
      auto k = B.up(randn(T * c.Nkv * c.Dh, 1.f, 22), {T, c.Nkv * c.Dh});
      auto qn = B.up(randn(c.Dh, 0.2f, 23, 1.f), {c.Dh}, DType::F32);
      auto kn = B.up(randn(c.Dh, 0.2f, 24, 1.f), {c.Dh}, DType::F32);
      auto q = B.zeros({T, c.Nh * c.Dh}), gate = B.zeros({T, c.Nh * c.Dh});
      B.cpu->qk_norm_rope(qg.c, k.c, qn.c, kn.c, 1e-6f, rp, b, q.c, gate.c);
      B.gpu->qk_norm_rope(qg.g, k.g, qn.g, kn.g, 1e-6f, rp, b, q.g, gate.g);
      std::string tag = " Dh=" + std::to_string(c.Dh) + (inter ? " interleaved" : " sectioned");
      REPORT("qk_norm_rope q" + tag, B.err(q));
      REPORT("qk_norm_rope k" + tag, B.err(k));
      EXPECT_EQ(B.err(gate), 0.0);
      {  // q and k in one launch (the default) or one launch each: the same bits
        auto k2 = B.up(randn(T * c.Nkv * c.Dh, 1.f, 22), {T, c.Nkv * c.Dh});  // k's inputs again (normed in place)
        Tensor q2 = B.gpu->alloc(q.g.dtype, q.g.shape), g2 = B.gpu->alloc(gate.g.dtype, gate.g.shape);
        setenv("DS_CUDA_NO_QK_FUSE", "1", 1);
        B.gpu->qk_norm_rope(qg.g, k2.g, qn.g, kn.g, 1e-6f, rp, b, q2, g2);
        unsetenv("DS_CUDA_NO_QK_FUSE");
        EXPECT_EQ(B.gpu->to_host_f32(q2), B.gpu->to_host_f32(q.g)) << "q, one launch vs two" << tag;
        EXPECT_EQ(B.gpu->to_host_f32(k2.g), B.gpu->to_host_f32(k.g)) << "k, one launch vs two" << tag;
        EXPECT_EQ(B.gpu->to_host_f32(g2), B.gpu->to_host_f32(gate.g)) << "gate, one launch vs two" << tag;
      }
    }
}

TEST_F(CudaOps, PagedAttention) {
  Both B;
  struct Cfg {
    int64_t Nh, Nkv, Dh;
  };
  const std::vector<std::vector<std::pair<int64_t, int64_t>>> batches = {
      {{0, 63}}, {{0, 64}}, {{0, 65}}, {{0, 2049}}, {{2048, 1}}, {{40, 17}, {100, 1}, {0, 65}, {7, 1}}};
  for (auto c : {Cfg{16, 2, 256}, Cfg{6, 2, 128}, Cfg{4, 4, 64}})
    for (auto& seqs : batches) {
      if (c.Dh != 256 && seqs[0].second == 2049) continue;
      const int64_t bs = 16, nblocks = 400;
      std::vector<int32_t> pool(nblocks);
      std::iota(pool.begin(), pool.end(), 0);
      std::shuffle(pool.begin(), pool.end(), std::mt19937(7));
      KvLayer kc, kg;
      kc.block_size = kg.block_size = bs;
      kc.k = B.cpu->alloc(DType::F32, {nblocks, bs, c.Nkv, c.Dh});
      kc.v = B.cpu->alloc(DType::F32, {nblocks, bs, c.Nkv, c.Dh});
      kg.k = B.gpu->alloc(DType::BF16, {nblocks, bs, c.Nkv, c.Dh});
      kg.v = B.gpu->alloc(DType::BF16, {nblocks, bs, c.Nkv, c.Dh});
      // the earlier context, written by a first call
      std::vector<std::pair<int64_t, int64_t>> pre;
      for (auto [ctx, ql] : seqs) pre.push_back({0, ctx});
      BatchMeta b0 = make_batch(pre, bs, pool);
      // same blocks for the call under test (make_batch hands out blocks in order; recompute with full length)
      BatchMeta b = make_batch(seqs, bs, pool);
      for (size_t i = 0; i < b.seqs.size(); ++i) b0.seqs[i].blocks = b.seqs[i].blocks;
      auto run = [&](BatchMeta& bb, uint64_t seed, bool attend) {
        const int64_t T = bb.num_tokens();
        if (T == 0) return 0.0;
        B.gpu->prepare_batch(bb);
        auto k = B.up(randn(T * c.Nkv * c.Dh, 1.f, seed), {T, c.Nkv * c.Dh});
        auto v = B.up(randn(T * c.Nkv * c.Dh, 1.f, seed + 1), {T, c.Nkv * c.Dh});
        B.cpu->kv_cache_write(kc, k.c, v.c, bb);
        B.gpu->kv_cache_write(kg, k.g, v.g, bb);
        if (!attend) return 0.0;
        auto q = B.up(randn(T * c.Nh * c.Dh, 1.f, seed + 2), {T, c.Nh * c.Dh});
        auto o = B.zeros({T, c.Nh * c.Dh});
        B.cpu->attention(q.c, kc, bb, o.c);
        B.gpu->attention(q.g, kg, bb, o.g);
        {  // the merge before session 12 (k_attn_merge): the same bits
          Tensor o2 = B.gpu->alloc(o.g.dtype, o.g.shape);
          setenv("DS_ATTN_OLD_MERGE", "1", 1);
          B.gpu->attention(q.g, kg, bb, o2);
          unsetenv("DS_ATTN_OLD_MERGE");
          EXPECT_EQ(B.gpu->to_host_f32(o2), B.gpu->to_host_f32(o.g)) << "old attention merge differs";
        }
        {  // every warp computing all of S (before session 17): other bits, the same tolerance
          auto o4 = B.zeros({T, c.Nh * c.Dh});
          setenv("DS_ATTN_QK_SPLIT", "0", 1);
          B.gpu->attention(q.g, kg, bb, o4.g);
          unsetenv("DS_ATTN_QK_SPLIT");
          o4.c = o.c;
          const double e = B.err(o4);
          std::printf("    DS_ATTN_QK_SPLIT=0 rel L2 %.3g\n", e);
          EXPECT_LT(e, kTol) << "DS_ATTN_QK_SPLIT=0";
        }
        for (const char* mp : {"0", "16", "1000"}) {  // every split used / other minimum split lengths (default 64)
          auto o3 = B.zeros({T, c.Nh * c.Dh});
          setenv("DS_ATTN_MIN_POS", mp, 1);
          B.gpu->attention(q.g, kg, bb, o3.g);
          unsetenv("DS_ATTN_MIN_POS");
          o3.c = o.c;
          const double e = B.err(o3);
          std::printf("    DS_ATTN_MIN_POS=%s rel L2 %.3g\n", mp, e);
          EXPECT_LT(e, kTol) << "DS_ATTN_MIN_POS=" << mp;
        }
        return B.err(o);
      };
      run(b0, 31, false);
      std::string tag = "attention Nh=" + std::to_string(c.Nh) + " Nkv=" + std::to_string(c.Nkv) +
                        " Dh=" + std::to_string(c.Dh) + " (ctx,q):";
      for (auto [ctx, ql] : seqs) tag += " (" + std::to_string(ctx) + "," + std::to_string(ql) + ")";
      REPORT(tag, run(b, 41, true));
    }
}

// The real model's batch-64 decode shape (16 q heads, 2 KV heads of 256; 64 sequences of 1,023 cached positions and
// one new token; blocks scattered over the pool) against the CPU. Also the target for profiling the decode kernel:
// ncu -k regex:k_attn_dec_tc --launch-count 1 test_cuda_ops --gtest_filter=CudaOps.PagedAttentionDecodeBatch
TEST_F(CudaOps, PagedAttentionDecodeBatch) {
  Both B;
  const int64_t Nh = 16, Nkv = 2, Dh = 256, bs = 16, nseq = 64, ctx = 1023;
  const int64_t nblocks = nseq * ((ctx + 1 + bs - 1) / bs) + 8;
  std::vector<int32_t> pool(nblocks);
  std::iota(pool.begin(), pool.end(), 0);
  std::shuffle(pool.begin(), pool.end(), std::mt19937(11));
  KvLayer kc, kg;
  kc.block_size = kg.block_size = bs;
  kc.k = B.cpu->alloc(DType::F32, {nblocks, bs, Nkv, Dh});
  kc.v = B.cpu->alloc(DType::F32, {nblocks, bs, Nkv, Dh});
  kg.k = B.gpu->alloc(DType::BF16, {nblocks, bs, Nkv, Dh});
  kg.v = B.gpu->alloc(DType::BF16, {nblocks, bs, Nkv, Dh});
  std::vector<std::pair<int64_t, int64_t>> pre(nseq, {0, ctx}), step(nseq, {ctx, 1});
  BatchMeta b0 = make_batch(pre, bs, pool), b = make_batch(step, bs, pool);
  for (size_t i = 0; i < b.seqs.size(); ++i) b0.seqs[i].blocks = b.seqs[i].blocks;
  auto write = [&](BatchMeta& bb, uint64_t seed) {
    const int64_t T = bb.num_tokens();
    B.gpu->prepare_batch(bb);
    auto k = B.up(randn(T * Nkv * Dh, 1.f, seed), {T, Nkv * Dh});
    auto v = B.up(randn(T * Nkv * Dh, 1.f, seed + 1), {T, Nkv * Dh});
    B.cpu->kv_cache_write(kc, k.c, v.c, bb);
    B.gpu->kv_cache_write(kg, k.g, v.g, bb);
  };
  write(b0, 51);
  write(b, 61);
  auto q = B.up(randn(nseq * Nh * Dh, 1.f, 71), {nseq, Nh * Dh});
  auto o = B.zeros({nseq, Nh * Dh});
  B.cpu->attention(q.c, kc, b, o.c);
  B.gpu->attention(q.g, kg, b, o.g);
  REPORT("attention batch 64 x 1024 positions, Nh=16 Nkv=2 Dh=256", B.err(o));
  setenv("DS_ATTN_QK_SPLIT", "0", 1);  // every warp computing all of S (before session 17)
  B.gpu->attention(q.g, kg, b, o.g);
  unsetenv("DS_ATTN_QK_SPLIT");
  REPORT("  the same, DS_ATTN_QK_SPLIT=0", B.err(o));
}

// qk_norm_rope_kv and attention_gated (session 14: the cache write inside the norm/rope launch, the output gate
// inside the merge, no flash launch when no chunk can reach kFlashMinQ) against the same ops run apart
// (DS_CUDA_NO_ATTN_FUSE=1): q, gate, both caches and o bit for bit; o against the CPU's composition. Decode batches
// past kFlashMinQ rows, short multi-token chunks with many sequences, and mixed prefill + decode batches (the
// flash kernel runs: the gate stays apart).
TEST_F(CudaOps, AttentionFusedOps) {
  Both B;
  struct Cfg {
    int64_t Nh, Nkv, Dh;
  };
  std::vector<std::pair<int64_t, int64_t>> decode20, verify16 = {{12, 3}};
  for (int i = 0; i < 20; ++i) decode20.push_back({5 + 37 * i, 1});
  for (int i = 0; i < 15; ++i) verify16.push_back({3 + 11 * i, 1});
  const std::vector<std::vector<std::pair<int64_t, int64_t>>> batches = {
      decode20, verify16, {{3000, 1}, {10, 1}}, {{0, 20}}, {{40, 17}, {100, 1}, {0, 65}, {7, 1}}};
  for (auto c : {Cfg{16, 2, 256}, Cfg{4, 2, 64}})
    for (auto& seqs : batches) {
      const int64_t bs = 16, nblocks = 600;
      std::vector<int32_t> pool(nblocks);
      std::iota(pool.begin(), pool.end(), 0);
      std::shuffle(pool.begin(), pool.end(), std::mt19937(11));
      KvLayer kc, k1, k2;
      kc.block_size = k1.block_size = k2.block_size = bs;
      kc.k = B.cpu->alloc(DType::F32, {nblocks, bs, c.Nkv, c.Dh});
      kc.v = B.cpu->alloc(DType::F32, {nblocks, bs, c.Nkv, c.Dh});
      for (KvLayer* kg : {&k1, &k2}) {
        kg->k = B.gpu->alloc(DType::BF16, {nblocks, bs, c.Nkv, c.Dh});
        kg->v = B.gpu->alloc(DType::BF16, {nblocks, bs, c.Nkv, c.Dh});
      }
      std::vector<std::pair<int64_t, int64_t>> pre;
      for (auto [ctx, ql] : seqs) pre.push_back({0, ctx});
      BatchMeta b0 = make_batch(pre, bs, pool);
      BatchMeta b = make_batch(seqs, bs, pool, true);
      for (size_t i = 0; i < b.seqs.size(); ++i) b0.seqs[i].blocks = b.seqs[i].blocks;
      b0.seqs.erase(std::remove_if(b0.seqs.begin(), b0.seqs.end(), [](auto& s) { return s.q_len == 0; }),
                    b0.seqs.end());
      int64_t row = 0;
      for (auto& s : b0.seqs) s.q_start = row, row += s.q_len;
      const int64_t T0 = b0.num_tokens(), T = b.num_tokens();
      if (T0 > 0) {  // the earlier context, the same in every cache
        B.gpu->prepare_batch(b0);
        auto k = B.up(randn(T0 * c.Nkv * c.Dh, 1.f, 51), {T0, c.Nkv * c.Dh});
        auto v = B.up(randn(T0 * c.Nkv * c.Dh, 1.f, 52), {T0, c.Nkv * c.Dh});
        B.cpu->kv_cache_write(kc, k.c, v.c, b0);
        B.gpu->kv_cache_write(k1, k.g, v.g, b0);
        B.gpu->kv_cache_write(k2, k.g, v.g, b0);
      }
      B.gpu->prepare_batch(b);
      RopeParams rp;
      rp.rotary_dim = 64;
      rp.mrope_section = {11, 11, 10};
      rp.mrope_interleaved = true;
      auto qg = B.up(randn(T * c.Nh * 2 * c.Dh, 1.f, 61), {T, c.Nh * 2 * c.Dh});
      auto v = B.up(randn(T * c.Nkv * c.Dh, 1.f, 63), {T, c.Nkv * c.Dh});
      auto qn = B.up(randn(c.Dh, 0.2f, 64, 1.f), {c.Dh}, DType::F32);
      auto kn = B.up(randn(c.Dh, 0.2f, 65, 1.f), {c.Dh}, DType::F32);
      auto q = B.zeros({T, c.Nh * c.Dh}), gate = B.zeros({T, c.Nh * c.Dh}), o = B.zeros({T, c.Nh * c.Dh});
      {
        auto k = B.up(randn(T * c.Nkv * c.Dh, 1.f, 62), {T, c.Nkv * c.Dh});
        B.cpu->qk_norm_rope_kv(qg.c, k.c, v.c, qn.c, kn.c, 1e-6f, rp, b, q.c, gate.c, kc);
        B.cpu->attention_gated(q.c, kc, b, gate.c, o.c);
      }
      auto run = [&](KvLayer& kv, bool apart, Tensor& qq, Tensor& gg, Tensor& oo) {
        auto k = B.up(randn(T * c.Nkv * c.Dh, 1.f, 62), {T, c.Nkv * c.Dh});
        if (apart) setenv("DS_CUDA_NO_ATTN_FUSE", "1", 1);
        B.gpu->qk_norm_rope_kv(qg.g, k.g, v.g, qn.g, kn.g, 1e-6f, rp, b, qq, gg, kv);
        B.gpu->attention_gated(qq, kv, b, gg, oo);
        unsetenv("DS_CUDA_NO_ATTN_FUSE");
      };
      Tensor q1 = B.gpu->alloc(DType::BF16, {T, c.Nh * c.Dh}), g1 = B.gpu->alloc(DType::BF16, {T, c.Nh * c.Dh}),
             o1 = B.gpu->alloc(DType::BF16, {T, c.Nh * c.Dh});
      run(k1, true, q1, g1, o1);
      run(k2, false, q.g, gate.g, o.g);
      std::string tag = " Nh=" + std::to_string(c.Nh) + " Dh=" + std::to_string(c.Dh) + " (ctx,q):";
      for (size_t i = 0; i < seqs.size() && i < 4; ++i)
        tag += " (" + std::to_string(seqs[i].first) + "," + std::to_string(seqs[i].second) + ")";
      if (seqs.size() > 4) tag += " … " + std::to_string(seqs.size()) + " sequences";
      EXPECT_EQ(B.gpu->to_host_f32(q.g), B.gpu->to_host_f32(q1)) << "q, fused vs apart" << tag;
      EXPECT_EQ(B.gpu->to_host_f32(gate.g), B.gpu->to_host_f32(g1)) << "gate, fused vs apart" << tag;
      EXPECT_EQ(B.gpu->to_host_f32(k2.k), B.gpu->to_host_f32(k1.k)) << "k cache, fused vs apart" << tag;
      EXPECT_EQ(B.gpu->to_host_f32(k2.v), B.gpu->to_host_f32(k1.v)) << "v cache, fused vs apart" << tag;
      EXPECT_EQ(B.gpu->to_host_f32(o.g), B.gpu->to_host_f32(o1)) << "o, fused vs apart" << tag;
      REPORT("attention_gated o" + tag, B.err(o));
    }
}

TEST_F(CudaOps, DeltaNet) {
  Both B;
  struct Cfg {
    int64_t Hk, Hv, Dk, Dv;
  };
  const std::vector<std::vector<int64_t>> batches = {{1, 1, 1}, {63}, {64}, {65}, {2049}, {17, 1, 65}};
  for (auto c : {Cfg{16, 32, 128, 128}, Cfg{16, 48, 128, 128}, Cfg{2, 4, 64, 64}})
    for (auto& lens : batches) {
      if (c.Hv == 48 && lens[0] == 2049) continue;
      const int64_t C = 2 * c.Hk * c.Dk + c.Hv * c.Dv, Kc = 4, S = int64_t(lens.size());
      std::vector<std::pair<int64_t, int64_t>> seqs;
      for (auto l : lens) seqs.push_back({10, l});
      std::vector<int32_t> pool(2000);
      std::iota(pool.begin(), pool.end(), 0);
      BatchMeta b = make_batch(seqs, 16, pool);
      const int64_t T = b.num_tokens();
      B.gpu->prepare_batch(b);
      StateLayer sc, sg;
      auto conv0 = randn(S * C * (Kc - 1), 1.f, 51);
      auto ssm0 = randn(S * c.Hv * c.Dk * c.Dv, 0.1f, 52);
      auto cw = B.up(randn(C * Kc, 0.5f, 53), {C, Kc}, DType::F32);
      auto conv = B.up(conv0, {S, C, Kc - 1}, DType::F32), ssm = B.up(ssm0, {S, c.Hv, c.Dk, c.Dv}, DType::F32);
      sc.conv = conv.c, sg.conv = conv.g, sc.ssm = ssm.c, sg.ssm = ssm.g;
      auto mixed = B.up(randn(T * C, 1.f, 54), {T, C});
      auto qkv = B.zeros({T, C});
      B.cpu->conv1d_causal(mixed.c, cw.c, sc, b, qkv.c);
      B.gpu->conv1d_causal(mixed.g, cw.g, sg, b, qkv.g);
      std::string tag = " Hk=" + std::to_string(c.Hk) + " Hv=" + std::to_string(c.Hv) + " D=" + std::to_string(c.Dk) +
                        " lens:";
      for (auto l : lens) tag += " " + std::to_string(l);
      REPORT("conv1d out" + tag, B.err(qkv));
      REPORT("conv1d state" + tag, B.err(conv));
      {  // the prefill conv's per-token loop (DS_CUDA_NO_CONV_SLIDE=1) from the same state: the same bits
        StateLayer s2 = sg;
        s2.conv = B.gpu->upload_f32(conv0, {S, C, Kc - 1}, DType::F32);
        Tensor q2 = B.gpu->alloc(DType::BF16, {T, C});
        {
          ScopedEnv loop("DS_CUDA_NO_CONV_SLIDE", "1");
          B.gpu->conv1d_causal(mixed.g, cw.g, s2, b, q2);
        }
        EXPECT_EQ(B.gpu->to_host_f32(qkv.g), B.gpu->to_host_f32(q2)) << "conv out, sliding vs per-token" << tag;
        EXPECT_EQ(B.gpu->to_host_f32(conv.g), B.gpu->to_host_f32(s2.conv)) << "conv state, sliding vs per-token" << tag;
      }
      // the delta rule on identical (bf16) inputs: take the CPU conv output rounded to bf16 for both
      std::vector<float> qv = B.cpu->to_host_f32(qkv.c);
      for (auto& x : qv) x = bf16_to_f32(f32_to_bf16(x));
      auto qkv2 = B.up(qv, {T, C});
      auto ba = B.up(randn(T * 2 * c.Hv, 1.f, 55), {T, 2 * c.Hv});
      auto A_log = B.up(randn(c.Hv, 0.5f, 56), {c.Hv}, DType::F32);
      auto dt_bias = B.up(randn(c.Hv, 0.5f, 57), {c.Hv}, DType::F32);
      auto o = B.zeros({T, c.Hv * c.Dv});
      B.cpu->gated_delta_rule(qkv2.c, ba.c, A_log.c, dt_bias.c, c.Hk, c.Hv, c.Dk, c.Dv, sc, b, o.c);
      B.gpu->gated_delta_rule(qkv2.g, ba.g, A_log.g, dt_bias.g, c.Hk, c.Hv, c.Dk, c.Dv, sg, b, o.g);
      REPORT("gated_delta_rule out" + tag, B.err(o));
      REPORT("gated_delta_rule state" + tag, B.err(ssm));
    }
}

// Backend::deltanet_mix (conv1d_causal + gated_delta_rule + gated_rmsnorm; on CUDA the fused short-chunk kernels of
// gdr_decode.h, the unfused ones for sequences of >= 32 tokens) against the CPU's three ops: the output and the
// updated conv and recurrent states, from random states. `spans`: (q_start, q_len) per sequence; rows of T outside
// every span (the speculative replay's rejected rows) are not compared. Returns the GPU output (host).
// baK > 0: ba is formed inside deltanet_mix from a random layer input [T, baK] and a bf16 in_proj_b | in_proj_a
// (the CUDA fused form for short sequences, linear() for long ones) and compared too.
struct MixCfg {
  int64_t Hk, Hv, Dk, Dv, Kc;
};
std::vector<float> check_deltanet_mix(Both& B, MixCfg c, const std::vector<std::pair<int64_t, int64_t>>& spans,
                                      int64_t T, bool norm, uint64_t seed, const std::string& what,
                                      const std::vector<int32_t>& slots = {}, int64_t baK = 0,
                                      DType sdt = DType::F32) {
  const int64_t C = 2 * c.Hk * c.Dk + c.Hv * c.Dv, Kc = c.Kc, Vd = c.Hv * c.Dv;
  BatchMeta b;
  int64_t nslots = 0;
  for (size_t i = 0; i < spans.size(); ++i) {
    BatchMeta::Seq s;
    s.q_start = spans[i].first;
    s.q_len = spans[i].second;
    s.ctx_len = 10;
    s.state_slot = slots.empty() ? int32_t(i) : slots[i];
    nslots = std::max<int64_t>(nslots, s.state_slot + 1);
    b.seqs.push_back(s);
  }
  b.tokens.assign(size_t(T), 0);
  b.positions.assign(size_t(3 * T), 0);
  B.gpu->prepare_batch(b);
  const int64_t S = nslots;
  StateLayer sc, sg;
  auto conv = B.up(randn(S * C * (Kc - 1), 1.f, seed + 1), {S, C, Kc - 1}, DType::F32);
  Pair ssm;  // the recurrent state in sdt on both backends (a bf16 one: ops.h StateLayer)
  {
    const auto v = randn(S * c.Hv * c.Dk * c.Dv, 0.1f, seed + 2);
    ssm.c = B.cpu->upload_f32(v, {S, c.Hv, c.Dk, c.Dv}, sdt);
    ssm.g = B.gpu->upload_f32(v, {S, c.Hv, c.Dk, c.Dv}, sdt);
  }
  sc.conv = conv.c, sg.conv = conv.g, sc.ssm = ssm.c, sg.ssm = ssm.g;
  auto cw = B.up(randn(C * Kc, 0.5f, seed + 3), {C, Kc}, DType::F32);
  auto mixed = B.up(randn(T * C, 1.f, seed + 4), {T, C});
  auto ba = B.up(randn(T * 2 * c.Hv, 1.f, seed + 5), {T, 2 * c.Hv});
  auto A_log = B.up(randn(c.Hv, 0.5f, seed + 6), {c.Hv}, DType::F32);
  auto dt_bias = B.up(randn(c.Hv, 0.5f, seed + 7), {c.Hv}, DType::F32);
  auto z = B.up(randn(T * Vd, 1.f, seed + 8), {T, Vd});
  auto nw = B.up(randn(c.Dv, 0.3f, seed + 9, 1.f), {c.Dv}, DType::F32);
  auto y = B.zeros({T, Vd});
  Pair bx;
  Linear blc, blg;
  if (baK > 0) {
    bx = B.up(randn(T * baK, 1.f, seed + 10), {T, baK});
    HostLinear hl(2 * c.Hv, baK, false, seed + 11);
    blc = B.cpu->make_linear({hl.src()}), blg = B.gpu->make_linear({hl.src()});
    B.cpu->linear(bx.c, blc, ba.c);
  }
  {
    Tensor qkv = B.cpu->alloc(DType::F32, {T, C}), o = B.cpu->alloc(DType::F32, {T, Vd});
    B.cpu->conv1d_causal(mixed.c, cw.c, sc, b, qkv);
    B.cpu->gated_delta_rule(qkv, ba.c, A_log.c, dt_bias.c, c.Hk, c.Hv, c.Dk, c.Dv, sc, b, norm ? o : y.c);
    if (norm) B.cpu->gated_rmsnorm(o, z.c, nw.c, 1e-6f, y.c);
  }
  B.gpu->deltanet_mix(mixed.g, cw.g, ba.g, A_log.g, dt_bias.g, c.Hk, c.Hv, c.Dk, c.Dv, norm ? &z.g : nullptr,
                      norm ? &nw.g : nullptr, 1e-6f, sg, b, y.g, baK > 0 ? &bx.g : nullptr, baK > 0 ? &blg : nullptr);
  std::vector<float> yg = B.gpu->to_host_f32(y.g), yc = B.cpu->to_host_f32(y.c), a, r;
  for (auto [q0, ql] : spans) {
    a.insert(a.end(), yg.begin() + q0 * Vd, yg.begin() + (q0 + ql) * Vd);
    r.insert(r.end(), yc.begin() + q0 * Vd, yc.begin() + (q0 + ql) * Vd);
  }
  std::string tag = what + " Hk=" + std::to_string(c.Hk) + " Hv=" + std::to_string(c.Hv) +
                    " Dk=" + std::to_string(c.Dk) + " Kc=" + std::to_string(Kc) + (norm ? "" : " no-norm") +
                    (sdt == DType::BF16 ? " bf16 state" : "") + " lens:";
  for (size_t i = 0; i < spans.size() && i < 6; ++i) tag += " " + std::to_string(spans[i].second);
  if (spans.size() > 6) tag += " ... (" + std::to_string(spans.size()) + " seqs)";
  REPORT("deltanet_mix out" + tag, test::rel(a, r));
  REPORT("deltanet_mix conv state" + tag, B.err(conv));
  REPORT("deltanet_mix ssm state" + tag, B.err(ssm));
  if (baK > 0) REPORT("deltanet_mix ba (in_proj_b | a, K " + std::to_string(baK) + ")" + tag, B.err(ba));
  return a;
}

std::vector<std::pair<int64_t, int64_t>> packed(const std::vector<int64_t>& lens, int64_t* T) {
  std::vector<std::pair<int64_t, int64_t>> v;
  int64_t t = 0;
  for (auto l : lens) v.push_back({t, l}), t += l;
  *T = t;
  return v;
}

TEST_F(CudaOps, DeltaNetMix) {
  Both B;
  std::mt19937_64 rng(7);
  uint64_t seed = 100;
  for (int nseq : {1, 2, 3, 17, 64, 65})
    for (int pattern = 0; pattern < 4; ++pattern) {  // decode, verify (4 each), random 1..8, 8 each
      std::vector<int64_t> lens(static_cast<size_t>(nseq));
      for (auto& l : lens) l = pattern == 0 ? 1 : pattern == 1 ? 4 : pattern == 3 ? 8 : int64_t(1 + rng() % 8);
      int64_t T;
      auto sp = packed(lens, &T);
      check_deltanet_mix(B, {16, 32, 128, 128, 4}, sp, T, true, seed += 10, "");
    }
  // other head shapes, kernel sizes and every token count 1..8
  for (MixCfg c : {MixCfg{2, 4, 64, 128, 4}, MixCfg{4, 4, 32, 128, 2}, MixCfg{2, 6, 128, 128, 6},
                   MixCfg{16, 32, 128, 128, 3}})
    for (int64_t l = 1; l <= 8; ++l) {
      int64_t T;
      auto sp = packed({l, 9 - l, 1}, &T);
      check_deltanet_mix(B, c, sp, T, true, seed += 10, "");
      check_deltanet_mix(B, c, sp, T, false, seed += 10, "");
    }
  // short and long sequences in one batch: the long ones through the unfused kernels (k_gdr_long, chunked)
  for (auto lens : std::vector<std::vector<int64_t>>{{3, 40, 1}, {1, 70, 2, 31, 32}, {33}, {64, 1}}) {
    int64_t T;
    auto sp = packed(lens, &T);
    check_deltanet_mix(B, {16, 32, 128, 128, 4}, sp, T, true, seed += 10, "mixed");
    check_deltanet_mix(B, {16, 32, 128, 128, 4}, sp, T, false, seed += 10, "mixed");
  }
  // the speculative replay: rows of the input log in place, rejected rows between sequences, slots out of order
  check_deltanet_mix(B, {16, 32, 128, 128, 4}, {{0, 2}, {4, 3}, {8, 4}}, 12, false, seed += 10, "replay", {2, 0, 1});
  check_deltanet_mix(B, {16, 32, 128, 128, 4}, {{1, 1}, {3, 4}}, 8, false, seed += 10, "replay", {1, 0});
  // ba formed inside the mixer (in_proj_b | a fused into the conv kernel for short sequences, linear() for the long
  // ones): K = 2048 (the 35B-A3B's hidden size), 1000 (125 chunks of 8: threads without a chunk), 4096 (the most)
  for (int64_t K : {int64_t(2048), int64_t(1000), int64_t(4096)})
    for (auto lens : std::vector<std::vector<int64_t>>{{1}, {1, 1, 1, 1}, {4, 8, 31}, {3, 40, 1}}) {
      int64_t T;
      auto sp = packed(lens, &T);
      check_deltanet_mix(B, {16, 32, 128, 128, 4}, sp, T, true, seed += 10, "fused ba", {}, K);
    }
  {
    setenv("DS_CUDA_NO_BA_FUSE", "1", 1);
    int64_t T;
    auto sp = packed({2, 5}, &T);
    check_deltanet_mix(B, {16, 32, 128, 128, 4}, sp, T, true, seed += 10, "ba by linear()", {}, 2048);
    unsetenv("DS_CUDA_NO_BA_FUSE");
  }
  {  // the fused sums after the PDL wait (DS_GDN_BA_EARLY=0) are the same bits as before it (the default)
    int64_t T;
    auto sp = packed({1, 4, 2}, &T);
    const auto early = check_deltanet_mix(B, {16, 32, 128, 128, 4}, sp, T, true, 990, "fused ba, early", {}, 2048);
    setenv("DS_GDN_BA_EARLY", "0", 1);
    const auto late = check_deltanet_mix(B, {16, 32, 128, 128, 4}, sp, T, true, 990, "fused ba, late", {}, 2048);
    unsetenv("DS_GDN_BA_EARLY");
    EXPECT_TRUE(early == late) << "fused ba: the sums before and after the wait differ";
  }
  // the typed conv instantiation (bf16 mixed / ba as types, the default) and the generic one (DS_GDN_TYPED=0) are the
  // same bits
  for (int64_t K : {int64_t(0), int64_t(2048)}) {
    int64_t T;
    auto sp = packed({1, 4, 2}, &T);
    const auto typ = check_deltanet_mix(B, {16, 32, 128, 128, 4}, sp, T, true, 995, "typed", {}, K);
    setenv("DS_GDN_TYPED", "0", 1);
    const auto gen = check_deltanet_mix(B, {16, 32, 128, 128, 4}, sp, T, true, 995, "generic", {}, K);
    unsetenv("DS_GDN_TYPED");
    EXPECT_TRUE(gen == typ) << "DS_GDN_TYPED=0 differs (ba K " << K << ")";
  }
  // the unfused path (DS_CUDA_NO_GDR_FUSE=1, the three ops) still agrees
  setenv("DS_CUDA_NO_GDR_FUSE", "1", 1);
  for (auto lens : std::vector<std::vector<int64_t>>{{1, 1, 1}, {4, 2, 40}}) {
    int64_t T;
    auto sp = packed(lens, &T);
    check_deltanet_mix(B, {16, 32, 128, 128, 4}, sp, T, true, seed += 10, "unfused");
  }
  unsetenv("DS_CUDA_NO_GDR_FUSE");
}

// A bf16 recurrent state (--mamba-ssm-cache-dtype bfloat16): the fused short-chunk kernel (k_gdn_recur_norm<DK,
// bf16>), the long chunks' widened copy (k_state_bf16 around k_gdr_long and the chunked kernels) and the unfused path
// against the CPU twin with the same bf16 state; and a verify of k tokens leaves the state and outputs of k one-token
// steps, bit for bit (speculative decoding's exactness).
TEST_F(CudaOps, DeltaNetMixBf16State) {
  Both B;
  uint64_t seed = 4000;
  const MixCfg big{16, 32, 128, 128, 4};
  for (auto lens : std::vector<std::vector<int64_t>>{
           {1}, {1, 1, 1, 1, 1, 1, 1, 1}, {4, 4, 4}, {3, 8, 1, 31}, {1, 40, 2}, {100, 1, 70, 5}, {33}})
    for (int64_t baK : {int64_t(0), int64_t(2048)}) {
      int64_t T;
      auto sp = packed(lens, &T);
      std::vector<int32_t> slots;  // distinct slots out of batch order
      for (size_t i = 0; i < lens.size(); ++i) slots.push_back(int32_t(lens.size() + 1 - i));
      check_deltanet_mix(B, big, sp, T, true, seed += 10, "", slots, baK, DType::BF16);
    }
  for (MixCfg c : {MixCfg{2, 4, 64, 128, 4}, MixCfg{4, 4, 32, 128, 2}}) {
    int64_t T;
    auto sp = packed({5, 1, 40}, &T);
    check_deltanet_mix(B, c, sp, T, true, seed += 10, "", {}, 0, DType::BF16);
  }
  setenv("DS_CUDA_NO_GDR_FUSE", "1", 1);
  for (auto lens : std::vector<std::vector<int64_t>>{{1, 1, 1}, {4, 2, 40}, {70}}) {
    int64_t T;
    auto sp = packed(lens, &T);
    check_deltanet_mix(B, big, sp, T, true, seed += 10, "unfused", {2, 0, 1}, 0, DType::BF16);
  }
  unsetenv("DS_CUDA_NO_GDR_FUSE");

  // One sequence (slot 1 of 3) fed L tokens as one chunk, and as L one-token steps, on the GPU.
  for (const char* unfused : {"0", "1"})
    for (int64_t L : {2, 4, 9, 31}) {
      setenv("DS_CUDA_NO_GDR_FUSE", unfused, 1);
      const MixCfg& c = big;
      const int64_t C = 2 * c.Hk * c.Dk + c.Hv * c.Dv, Vd = c.Hv * c.Dv;
      const auto mixed = randn(L * C, 1.f, seed + 1), ba = randn(L * 2 * c.Hv, 1.f, seed + 2);
      const auto z = randn(L * Vd, 1.f, seed + 3), s0 = randn(3 * c.Hv * c.Dk * c.Dv, 0.1f, seed + 4);
      const auto cv0 = randn(3 * C * (c.Kc - 1), 1.f, seed + 5);
      const Tensor cw = B.gpu->upload_f32(randn(C * c.Kc, 0.5f, seed + 6), {C, c.Kc}, DType::F32);
      const Tensor A_log = B.gpu->upload_f32(randn(c.Hv, 0.5f, seed + 7), {c.Hv}, DType::F32);
      const Tensor dtb = B.gpu->upload_f32(randn(c.Hv, 0.5f, seed + 8), {c.Hv}, DType::F32);
      const Tensor nw = B.gpu->upload_f32(randn(c.Dv, 0.3f, seed + 9, 1.f), {c.Dv}, DType::F32);
      auto run = [&](int64_t chunk) {
        StateLayer st;
        st.conv = B.gpu->upload_f32(cv0, {3, C, c.Kc - 1}, DType::F32);
        st.ssm = B.gpu->upload_f32(s0, {3, c.Hv, c.Dk, c.Dv}, DType::BF16);
        std::vector<float> out;
        for (int64_t t0 = 0; t0 < L; t0 += chunk) {
          const int64_t n = std::min(chunk, L - t0);
          BatchMeta b = BatchMeta::one_sequence(n, 10 + t0, 1);
          b.tokens.assign(size_t(n), 0);
          B.gpu->prepare_batch(b);
          auto part = [&](const std::vector<float>& v, int64_t w) {
            return std::vector<float>(v.begin() + t0 * w, v.begin() + (t0 + n) * w);
          };
          const Tensor m = B.gpu->upload_f32(part(mixed, C), {n, C}, DType::BF16);
          const Tensor bat = B.gpu->upload_f32(part(ba, 2 * c.Hv), {n, 2 * c.Hv}, DType::BF16);
          const Tensor zz = B.gpu->upload_f32(part(z, Vd), {n, Vd}, DType::BF16);
          Tensor y = B.gpu->alloc(DType::BF16, {n, Vd});
          B.gpu->deltanet_mix(m, cw, bat, A_log, dtb, c.Hk, c.Hv, c.Dk, c.Dv, &zz, &nw, 1e-6f, st, b, y);
          const auto yh = B.gpu->to_host_f32(y);
          out.insert(out.end(), yh.begin(), yh.end());
        }
        return std::make_pair(out, B.gpu->to_host_f32(st.ssm));
      };
      const auto whole = run(L), steps = run(1);
      EXPECT_TRUE(whole.first == steps.first) << "outputs, " << L << " tokens, DS_CUDA_NO_GDR_FUSE=" << unfused;
      EXPECT_TRUE(whole.second == steps.second) << "state, " << L << " tokens, DS_CUDA_NO_GDR_FUSE=" << unfused;
      seed += 10;
    }
  unsetenv("DS_CUDA_NO_GDR_FUSE");
}

// A sequence's fused output and states are bit-identical whatever else is in the batch.
TEST_F(CudaOps, DeltaNetMixBatchInvariance) {
  Both B;
  const MixCfg c{16, 32, 128, 128, 4};
  for (int64_t baK : {int64_t(0), int64_t(2048)})  // ba given, or formed inside (fused in_proj_b | a)
    for (int64_t ql : {1, 4}) {
      // Same seeds and the same T: sequence 0 (rows 0.., slot 0) sees the same inputs in both batches, the other
      // sequences other lengths.
      int64_t T, T2;
      const auto sp = packed({ql, 3, 1, 5}, &T), sp2 = packed({ql, 1, 7, 1}, &T2);
      auto batch = check_deltanet_mix(B, c, sp, T, true, 900, "batch", {}, baK);
      auto batch2 = check_deltanet_mix(B, c, sp2, T2, true, 900, "batch'", {}, baK);
      const size_t n = size_t(ql * c.Hv * c.Dv);
      int diffs = 0;
      for (size_t i = 0; i < n; ++i) diffs += batch[i] != batch2[i];
      EXPECT_EQ(diffs, 0) << "sequence 0 of " << ql << " tokens depends on the rest of the batch (baK " << baK << ")";
    }
}

TEST_F(CudaOps, Moe) {
  Both B;
  for (int64_t T : {1, 3, 17, 255}) {
    const int64_t E = 256, K = 8;
    auto logits = B.up(randn(T * E, 1.f, 61 + T), {T, E});
    auto ids = B.zeros({T, K}, DType::I32);
    auto wts = B.zeros({T, K}, DType::F32);
    B.cpu->moe_route(logits.c, K, ids.c, wts.c);
    B.gpu->moe_route(logits.g, K, ids.g, wts.g);
    EXPECT_EQ(B.err(ids), 0.0) << "routing ids T=" << T;
    REPORT("moe_route E=256 K=8 T=" + std::to_string(T) + " weights", B.err(wts));
  }
  // Other E (slots past E in the last lanes; 8, 16 and 32 logits per lane) and K, and logits on a grid of 0.5 so
  // that many probabilities tie exactly: the ties go to the lower expert (the CPU's stable sort), weights bit-exact
  // up to the CPU's exp.
  const std::vector<std::pair<int64_t, int64_t>> shapes{{200, 8}, {256, 1}, {256, 32}, {512, 10}, {1000, 40}};
  for (const auto& [E, K] : shapes)
    for (bool ties : {false, true}) {
      const int64_t T = 5;
      std::vector<float> lv = randn(T * E, 1.f, 90 + E + K);
      if (ties)
        for (float& v : lv) v = std::round(v * 2.f) / 2.f;
      auto logits = B.up(lv, {T, E});
      auto ids = B.zeros({T, K}, DType::I32);
      auto wts = B.zeros({T, K}, DType::F32);
      B.cpu->moe_route(logits.c, K, ids.c, wts.c);
      B.gpu->moe_route(logits.g, K, ids.g, wts.g);
      const std::string tag = "moe_route E=" + std::to_string(E) + " K=" + std::to_string(K) + (ties ? " ties" : "");
      EXPECT_EQ(B.err(ids), 0.0) << tag << " ids";
      REPORT(tag + " weights", B.err(wts));
    }
  // Experts: real H and I; E reduced to 16 to keep the fp32 CPU reference small (routing covers every expert).
  const int64_t E = 16, H = 2048, I = 512, K = 8;
  for (bool q : {false, true}) {
    const HostExperts hx(E, H, I, q, 100, 200, 300);
    Experts ec = hx.make(*B.cpu), eg = hx.make(*B.gpu);
    for (int64_t T : {1, 3, 17, 64, 255}) {
      std::mt19937 g(T);
      std::vector<float> idv, wv;
      for (int64_t t = 0; t < T; ++t) {
        std::vector<int> perm(E);
        std::iota(perm.begin(), perm.end(), 0);
        std::shuffle(perm.begin(), perm.end(), g);
        float s = 0;
        for (int64_t k = 0; k < K; ++k) {
          idv.push_back(float(perm[k]));
          wv.push_back(float(g() % 1000 + 1));
          s += wv.back();
        }
        for (int64_t k = 0; k < K; ++k) wv[wv.size() - K + k] /= s;
      }
      auto ids = B.up(idv, {T, K}, DType::I32);
      auto wts = B.up(wv, {T, K}, DType::F32);
      auto x = B.up(randn(T * H, 1.f, 70 + T), {T, H});
      auto y = B.zeros({T, H});
      B.cpu->moe_experts(x.c, ec, ids.c, wts.c, y.c);
      B.gpu->moe_experts(x.g, eg, ids.g, wts.g, y.g);
      REPORT(std::string(q ? "int4" : "bf16") + " moe_experts E=16 H=2048 I=512 K=8 T=" + std::to_string(T),
             B.err(y));
    }
  }
}

// The tensor-core layout holds every nibble of the checkpoint where int4_mma.h says.
TEST(Int4MmaLayout, PackHoldsEveryNibble) {
  for (auto [N, K] : std::vector<std::pair<int64_t, int64_t>>{{16, 64}, {48, 384}, {32, 2048}}) {
    std::mt19937_64 g(N * K);
    std::vector<int32_t> qw(size_t(K / 8 * N));
    for (auto& x : qw) x = int32_t(uint32_t(g()));
    std::vector<uint32_t> packed(size_t(N * K / 8));
    for (int64_t t = 0; t < N / 16; ++t) cuda::mma_int4_pack_tile(qw.data(), N, K, t, 0, packed.data());
    int bad = 0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k)
        bad += cuda::mma_int4_nibble(packed.data(), K, n, k) != int((uint32_t(qw[(k / 8) * N + n]) >> (4 * (k % 8))) & 0xF);
    EXPECT_EQ(bad, 0) << "N=" << N << " K=" << K;
  }
}

// A token's output does not depend on the tokens launched with it: rows of a big batch (the many-token kernel)
// equal the same rows computed alone (the few-token kernel), bit for bit; int4 linears and int4 experts.
// argmax_rows (speculative drafting's device argmax): the same column as the CPU op, exactly, on rows with ties
// (values rounded to a few levels), NaNs, -inf rows, all-NaN rows, and limits below the row width; vocabulary-sized
// rows (the full 35B-A3B head: 248320 columns) included.
TEST_F(CudaOps, ArgmaxRows) {
  Both B;
  for (int64_t N : {int64_t(7), int64_t(2048), int64_t(32768), int64_t(248320)})
    for (int64_t R : {int64_t(1), int64_t(5), int64_t(64)}) {
      std::mt19937 g(uint32_t(N + R));
      std::vector<float> v(size_t(R * N));
      for (auto& x : v) x = float(int(g() % 64)) * 0.25f - 8.f;
      if (R >= 5) {
        for (int64_t j = 0; j < N; j += 3) v[size_t(1 * N + j)] = std::nanf("");
        for (int64_t j = 0; j < N; ++j) v[size_t(2 * N + j)] = -INFINITY;
        for (int64_t j = 0; j < N; ++j) v[size_t(3 * N + j)] = std::nanf("");
        v[size_t(4 * N + N - 1)] = 1000.f;
      }
      // map: a reduced draft head's column -> token id (a permutation of ids of a larger vocabulary)
      std::vector<float> mv(static_cast<size_t>(N));
      for (int64_t j = 0; j < N; ++j) mv[size_t(j)] = float((j * 7919 + 13) % 262144);
      Pair map = B.up(mv, {N}, DType::I32);
      for (int64_t limit : {N, std::max<int64_t>(1, N - 5), std::max<int64_t>(1, N / 3)}) {
        Pair L = B.up(v, {R, N}, DType::F32), A = B.zeros({R}, DType::I32), M = B.zeros({R}, DType::I32);
        B.cpu->argmax_rows(L.c, limit, A.c);
        B.gpu->argmax_rows(L.g, limit, A.g);
        EXPECT_EQ(B.gpu->to_host_f32(A.g), B.cpu->to_host_f32(A.c)) << "N " << N << " R " << R << " limit " << limit;
        B.cpu->argmax_rows(L.c, limit, M.c, &map.c);
        B.gpu->argmax_rows(L.g, limit, M.g, &map.g);
        const auto col = B.cpu->to_host_f32(A.c), tok = B.cpu->to_host_f32(M.c);
        for (int64_t r = 0; r < R; ++r) EXPECT_EQ(tok[size_t(r)], mv[size_t(col[size_t(r)])]);
        EXPECT_EQ(B.gpu->to_host_f32(M.g), tok) << "mapped, N " << N << " R " << R << " limit " << limit;
      }
    }
}

// batch_tokens_from (speculative drafting's device feed): the embedding of a batch whose token ids come from a
// device tensor equals the embedding of the same ids given in b.tokens, on both backends, eagerly and recorded
// (the copy into the batch mirror as a graph node, the ids changed between replays).
TEST_F(CudaOps, BatchTokensFrom) {
  Both B;
  const int64_t V = 300, H = 64;
  Pair table = B.up(randn(size_t(V * H), 1.f, 3), {V, H});
  for (int64_t T : {int64_t(1), int64_t(3), int64_t(17), int64_t(64)}) {
    std::vector<float> ids(static_cast<size_t>(T));
    for (int64_t i = 0; i < T; ++i) ids[size_t(i)] = float((i * 37 + T) % V);
    BatchMeta want, fed;
    want.seqs.push_back({0, T, 0, 0, {}});
    want.tokens.assign(ids.begin(), ids.end());
    want.positions.assign(size_t(3 * T), 0);
    fed = want;
    fed.tokens.assign(size_t(T), 0);  // placeholders: the ids come from the device
    Pair I = B.up(ids, {T}, DType::I32);
    Pair a = B.zeros({T, H}), b = B.zeros({T, H});
    for (Backend* be : {B.cpu.get(), B.gpu.get()}) {
      const bool g = be == B.gpu.get();
      be->prepare_batch(want);
      be->embed(g ? table.g : table.c, want, g ? a.g : a.c);
      BatchMeta f = fed;
      be->prepare_batch(f);
      be->batch_tokens_from(f, g ? I.g : I.c);
      be->embed(g ? table.g : table.c, f, g ? b.g : b.c);
    }
    EXPECT_EQ(B.gpu->to_host_f32(b.g), B.gpu->to_host_f32(a.g)) << "T " << T;
    EXPECT_EQ(B.cpu->to_host_f32(b.c), B.cpu->to_host_f32(a.c)) << "T " << T;
    // Recorded: warm-up, record, then replays with other ids in the same device tensor.
    Tensor out = B.gpu->alloc(B.gpu->act_dtype(), {T, H});
    for (int rep = 0; rep < 4; ++rep) {
      std::vector<float> r(static_cast<size_t>(T));
      for (int64_t i = 0; i < T; ++i) r[size_t(i)] = float((i * 11 + rep * 5 + 1) % V);
      Tensor src = B.gpu->upload_f32(r, {T}, DType::I32);
      B.gpu->step_begin();
      Tensor fixed = I.g;  // the recording reads the ids from here
      B.gpu->copy(fixed, src);
      BatchMeta f = fed;
      B.gpu->prepare_batch(f);
      B.gpu->graph_run(str_cat("test/tokens_from/", T), [&] {
        B.gpu->prepare_batch(f);
        B.gpu->batch_tokens_from(f, fixed);
        B.gpu->embed(table.g, f, out);
      });
      B.gpu->step_end();
      BatchMeta w = want;
      w.tokens.assign(r.begin(), r.end());
      Tensor ref = B.gpu->alloc(B.gpu->act_dtype(), {T, H});
      B.gpu->prepare_batch(w);
      B.gpu->embed(table.g, w, ref);
      EXPECT_EQ(B.gpu->to_host_f32(out), B.gpu->to_host_f32(ref)) << "T " << T << " replay " << rep;
    }
  }
}

TEST_F(CudaOps, Int4BatchInvariance) {
  Both B;
  auto rows_of = [&](Backend& be, const Tensor& t, int64_t r, int64_t n) {
    auto v = be.to_host_f32(t);
    return std::vector<float>(v.begin() + r * n, v.begin() + (r + 1) * n);
  };
  for (auto [N, K] : std::vector<std::pair<int64_t, int64_t>>{{8192, 2048}, {2048, 512}, {256, 384}}) {
    HostLinear hl(N, K, true, N + K);
    Linear lg = B.gpu->make_linear({hl.src()});
    const int64_t M = 300;
    auto xs = randn(size_t(M * K), 1.f, 5);
    Tensor x = B.gpu->upload_f32(xs, {M, K}, DType::BF16), y = B.gpu->alloc(DType::F32, {M, N});
    B.gpu->linear(x, lg, y);
    int diff = 0;
    for (int64_t r : {int64_t(0), int64_t(7), int64_t(299)})
      // the row alone and inside smaller batches (the medium shape's warp tiles: 9 → 1 × 2, 40 → 2 × 2, 100 → 1 × 4)
      for (int64_t m : {int64_t(1), int64_t(9), int64_t(40), int64_t(100)}) {
        std::vector<float> sub(xs.begin() + r * K, xs.begin() + (r + 1) * K);
        for (int64_t i = 1; i < m; ++i) sub.insert(sub.end(), xs.begin() + ((r + i) % M) * K, xs.begin() + ((r + i) % M + 1) * K);
        Tensor xr = B.gpu->upload_f32(sub, {m, K}, DType::BF16), yr = B.gpu->alloc(DType::F32, {m, N});
        B.gpu->linear(xr, lg, yr);
        diff += rows_of(*B.gpu, yr, 0, N) != rows_of(*B.gpu, y, r, N);
      }
    EXPECT_EQ(diff, 0) << "int4 linear N=" << N << " K=" << K;
  }
  // experts: E = 16 so T = 64 already takes the many-token kernel (P ≥ 16·E)
  const int64_t E = 16, H = 512, I = 256, K = 8, T = 64;
  const HostExperts hx(E, H, I, true, 400, 500, 600);
  Experts eg = hx.make(*B.gpu);
  std::mt19937 g(3);
  std::vector<float> idv, wv;
  uniform_routing(T, E, K, g, idv, wv);
  auto xs = randn(size_t(T * H), 1.f, 9);
  auto run = [&](int64_t t0, int64_t n) {
    Tensor ids = B.gpu->upload_f32(std::vector<float>(idv.begin() + t0 * K, idv.begin() + (t0 + n) * K), {n, K}, DType::I32);
    Tensor w = B.gpu->upload_f32(std::vector<float>(wv.begin() + t0 * K, wv.begin() + (t0 + n) * K), {n, K}, DType::F32);
    Tensor x = B.gpu->upload_f32(std::vector<float>(xs.begin() + t0 * H, xs.begin() + (t0 + n) * H), {n, H}, DType::BF16);
    Tensor y = B.gpu->alloc(DType::F32, {n, H});
    B.gpu->moe_experts(x, eg, ids, w, y);
    return B.gpu->to_host_f32(y);
  };
  auto all = run(0, T);
  int diff = 0;
  for (int64_t t : {int64_t(0), int64_t(5), int64_t(63)}) {
    auto one = run(t, 1);
    diff += std::vector<float>(all.begin() + t * H, all.begin() + (t + 1) * H) != one;
  }
  EXPECT_EQ(diff, 0) << "int4 experts: a token alone differs from the same token in a batch of " << T;
}

// Rows of a [M, n] host copy.
std::vector<float> host_rows(const std::vector<float>& v, int64_t r0, int64_t r1, int64_t n) {
  return std::vector<float>(v.begin() + r0 * n, v.begin() + r1 * n);
}
// moe_experts on `gpu` for tokens [t0, t0 + n): routing ids / weights idv / wv (K per token), activations xs (H per
// token); the fp32 output rows to the host.
std::vector<float> gpu_moe_rows(Backend& gpu, const Experts& eg, const std::vector<float>& idv,
                                const std::vector<float>& wv, const std::vector<float>& xs, int64_t K, int64_t H,
                                int64_t t0, int64_t n) {
  Tensor ids = gpu.upload_f32(std::vector<float>(idv.begin() + t0 * K, idv.begin() + (t0 + n) * K), {n, K}, DType::I32);
  Tensor w = gpu.upload_f32(std::vector<float>(wv.begin() + t0 * K, wv.begin() + (t0 + n) * K), {n, K}, DType::F32);
  Tensor x = gpu.upload_f32(host_rows(xs, t0, t0 + n, H), {n, H}, DType::BF16);
  Tensor y = gpu.alloc(DType::F32, {n, H});
  gpu.moe_experts(x, eg, ids, w, y);
  return gpu.to_host_f32(y);
}
int bit_diffs(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return -1;
  int d = 0;
  for (size_t i = 0; i < a.size(); ++i) d += std::memcmp(&a[i], &b[i], 4) != 0;
  return d;
}
// Mean µs per call of fn over `iters` calls after one warm-up call, with the backend's stream and the device idle at
// both ends (the throughput tests' timings: printed, never asserted).
template <class F>
double time_per_call_us(Backend& gpu, int iters, F&& fn) {
  fn();
  gpu.synchronize();
  cudaDeviceSynchronize();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) fn();
  gpu.synchronize();
  cudaDeviceSynchronize();
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / iters;
}

// The large-M int4 kernel (int4_gemm.h) at prefill sizes: against the CPU on sampled rows, and bit for bit against
// the kernels it replaces (DS_CUDA_NO_BIG_GEMM=1, every row) and against each row computed alone (the decode
// kernel). DS_INT4_BIG_MIN_M=64 makes it take M = 64, 65 and 300 too.
TEST_F(CudaOps, Int4LargeM) {
  Both B;
  ScopedEnv on("DS_CUDA_NO_BIG_GEMM", "0");  // the large-M kernel, whatever the default
  ScopedEnv no_deq("DS_CUDA_NO_DEQUANT_GEMM", "1");  // not the dequantise + cuBLAS path (Int4DequantGemm)
  ScopedEnv min_m("DS_INT4_BIG_MIN_M", "64");
  const std::vector<LinearShape> shapes = {{8192, 2048, "q_proj / DeltaNet qkv"}, {2048, 4096, "o_proj / DeltaNet out"},
                                     {1024, 2048, "expert gate_up"}, {2048, 512, "expert down"},
                                     {272, 384, "odd: 17 tiles, 3 groups"}};
  for (auto& s : shapes) {
    HostLinear hl(s.N, s.K, true, s.N * 7 + s.K);
    Linear lc = B.cpu->make_linear({hl.src()}), lg = B.gpu->make_linear({hl.src()});
    for (int64_t M : {1, 7, 64, 65, 300, 2049, 4096}) {
      if (M == 4096 && s.N * s.K > 8192 * 2048 / 2) continue;  // keep the test's time down
      const auto xs = randn(size_t(M * s.K), 1.f, M * 3 + s.K);
      Tensor x = B.gpu->upload_f32(xs, {M, s.K}, DType::BF16);
      for (DType ydt : {DType::F32, DType::BF16}) {
        const std::string tag = std::string(" N=") + std::to_string(s.N) + " K=" + std::to_string(s.K) +
                                " M=" + std::to_string(M) + (ydt == DType::F32 ? " F32" : " BF16") + " (" + s.what + ")";
        Tensor y = B.gpu->alloc(ydt, {M, s.N}), yo = B.gpu->alloc(ydt, {M, s.N});
        B.gpu->linear(x, lg, y);
        {
          ScopedEnv off("DS_CUDA_NO_BIG_GEMM", "1");
          B.gpu->linear(x, lg, yo);
        }
        const auto yv = B.gpu->to_host_f32(y);
        EXPECT_EQ(bit_diffs(yv, B.gpu->to_host_f32(yo)), 0) << "large-M int4 kernel vs the old kernels" << tag;
        // each sampled row alone (M = 1: the decode kernel)
        int diff = 0;
        for (int64_t r : {int64_t(0), M / 2, M - 1, std::min<int64_t>(M - 1, 127), std::min<int64_t>(M - 1, 128)}) {
          Tensor xr = B.gpu->upload_f32(host_rows(xs, r, r + 1, s.K), {1, s.K}, DType::BF16);
          Tensor yr = B.gpu->alloc(ydt, {1, s.N});
          B.gpu->linear(xr, lg, yr);
          diff += bit_diffs(B.gpu->to_host_f32(yr), host_rows(yv, r, r + 1, s.N)) != 0;
        }
        EXPECT_EQ(diff, 0) << "rows alone differ from the same rows at" << tag;
        if (ydt != DType::F32) continue;
        // against the CPU: the first and last rows (at most 64 + 48)
        const int64_t a = std::min<int64_t>(M, 64), b0 = std::max<int64_t>(a, M - 48);
        std::vector<float> sub = host_rows(xs, 0, a, s.K), ref = host_rows(yv, 0, a, s.N);
        auto tail = host_rows(xs, b0, M, s.K), ytail = host_rows(yv, b0, M, s.N);
        sub.insert(sub.end(), tail.begin(), tail.end());
        ref.insert(ref.end(), ytail.begin(), ytail.end());
        const int64_t R = int64_t(sub.size()) / s.K;
        Tensor xc = B.cpu->upload_f32(sub, {R, s.K}, DType::F32), yc = B.cpu->alloc(DType::F32, {R, s.N});
        B.cpu->linear(xc, lc, yc);
        REPORT("int4 linear" + tag, test::rel(ref, B.cpu->to_host_f32(yc)));
      }
    }
  }
  // Two matrices of one input in one launch (linear_group → mma_int4_linear2): each as alone.
  {
    HostLinear qa(4096, 2048, true, 71), qb(512, 2048, true, 72);
    Linear la = B.gpu->make_linear({qa.src()}), lb = B.gpu->make_linear({qb.src()});
    const int64_t M = 2049;
    Tensor x = B.gpu->upload_f32(randn(size_t(M * 2048), 1.f, 73), {M, 2048}, DType::BF16);
    Tensor ya = B.gpu->alloc(DType::BF16, {M, 4096}), yb = B.gpu->alloc(DType::F32, {M, 512});
    Tensor sa = B.gpu->alloc(DType::BF16, {M, 4096}), sb = B.gpu->alloc(DType::F32, {M, 512});
    {
      ScopedEnv off("DS_CUDA_NO_BIG_GEMM", "1");
      B.gpu->linear(x, la, sa);
      B.gpu->linear(x, lb, sb);
    }
    // R = 5 row blocks per block: one block runs across the end of matrix a into matrix b
    for (const char* r : {static_cast<const char*>(nullptr), "5"}) {
      ScopedEnv rr("DS_INT4_BIG_R", r);
      B.gpu->linear_group(x, {{&la, &ya, false}, {&lb, &yb, false}});
      const std::string tag = std::string(" R=") + (r ? r : "auto");
      EXPECT_EQ(bit_diffs(B.gpu->to_host_f32(ya), B.gpu->to_host_f32(sa)), 0) << "paired large-M launch, matrix a" << tag;
      EXPECT_EQ(bit_diffs(B.gpu->to_host_f32(yb), B.gpu->to_host_f32(sb)), 0) << "paired large-M launch, matrix b" << tag;
    }
  }
}

// The dense decode shape with two 16-row tiles per warp (by default for launches of more tiles than one wave holds;
// DS_INT4_DENSE_MT2=0: always, −1: never) gives the bits of one tile per warp: the model's shapes, odd tile counts
// (the last warp's second tile past the end), one and two matrices per launch, 1..8 tokens, F32 and BF16 outputs.
TEST_F(CudaOps, Int4DenseTwoTiles) {
  Both B;
  const std::vector<LinearShape> shapes = {{12288, 2048, "DeltaNet qkvz"}, {2048, 4096, "out_proj"},
                                           {272, 2048, "17 tiles"}, {48, 1024, "3 tiles, KS 4 of 2 groups"}};
  for (auto& s : shapes) {
    HostLinear hl(s.N, s.K, true, s.N * 7 + s.K);
    Linear lg = B.gpu->make_linear({hl.src()});
    for (int64_t M : {1, 2, 5, 8})
      for (DType ydt : {DType::F32, DType::BF16}) {
        Tensor x = B.gpu->upload_f32(randn(size_t(M * s.K), 1.f, M * 13 + s.K), {M, s.K}, DType::BF16);
        Tensor y1 = B.gpu->alloc(ydt, {M, s.N}), y2 = B.gpu->alloc(ydt, {M, s.N});
        {
          ScopedEnv mt1("DS_INT4_DENSE_MT2", "-1");
          B.gpu->linear(x, lg, y1);
        }
        {
          ScopedEnv mt2("DS_INT4_DENSE_MT2", "0");
          B.gpu->linear(x, lg, y2);
        }
        EXPECT_EQ(bit_diffs(B.gpu->to_host_f32(y2), B.gpu->to_host_f32(y1)), 0)
            << "two tiles per warp, N=" << s.N << " K=" << s.K << " M=" << M << " (" << s.what << ")";
      }
  }
  // q + k of a layer: one launch, 545 tiles; by the two-tile kernel compiled without the third matrix (the default
  // for two, DS_INT4_MT2_LIGHT) and with it
  HostLinear qa(8192, 2048, true, 91), qb(528, 2048, true, 92);
  Linear la = B.gpu->make_linear({qa.src()}), lb = B.gpu->make_linear({qb.src()});
  for (const char* light : {"1", "0"})
    for (int64_t M : {1, 3, 8}) {
      ScopedEnv lt("DS_INT4_MT2_LIGHT", light);
      Tensor x = B.gpu->upload_f32(randn(size_t(M * 2048), 1.f, 93 + M), {M, 2048}, DType::BF16);
      Tensor ya = B.gpu->alloc(DType::BF16, {M, 8192}), yb = B.gpu->alloc(DType::F32, {M, 528});
      Tensor sa = B.gpu->alloc(DType::BF16, {M, 8192}), sb = B.gpu->alloc(DType::F32, {M, 528});
      {
        ScopedEnv mt1("DS_INT4_DENSE_MT2", "-1");
        B.gpu->linear_group(x, {{&la, &sa, false}, {&lb, &sb, false}});
      }
      {
        ScopedEnv mt2("DS_INT4_DENSE_MT2", "0");
        B.gpu->linear_group(x, {{&la, &ya, false}, {&lb, &yb, false}});
      }
      EXPECT_EQ(bit_diffs(B.gpu->to_host_f32(ya), B.gpu->to_host_f32(sa)), 0)
          << "two tiles per warp, paired a, M=" << M << " light " << light;
      EXPECT_EQ(bit_diffs(B.gpu->to_host_f32(yb), B.gpu->to_host_f32(sb)), 0)
          << "two tiles per warp, paired b, M=" << M << " light " << light;
    }
}

// Three int4 linears of one input in one launch (linear_group: the attention's q, k, v) give each one's bits alone, at
// decode, medium and prefill sizes (the last two launches: the large-M kernel takes two matrices), with one and two
// tiles per warp in the decode shape, F32 and BF16 outputs; and four jobs (three + one).
TEST_F(CudaOps, Int4ThreeInOneLaunch) {
  Both B;
  HostLinear qa(8192, 2048, true, 101), qb(512, 2048, true, 102), qc(528, 2048, true, 103), qd(48, 2048, true, 104);
  Linear la = B.gpu->make_linear({qa.src()}), lb = B.gpu->make_linear({qb.src()}), lc = B.gpu->make_linear({qc.src()}),
         ld = B.gpu->make_linear({qd.src()});
  for (int64_t M : {1, 3, 8, 9, 40, 64, 200, 300, 700})
    for (const char* mt2 : {"-1", "0"}) {
      if (M > 8 && std::string(mt2) == "0") continue;  // a decode-shape knob
      ScopedEnv m2("DS_INT4_DENSE_MT2", mt2);
      Tensor x = B.gpu->upload_f32(randn(size_t(M * 2048), 1.f, 105 + M), {M, 2048}, DType::BF16);
      Tensor ya = B.gpu->alloc(DType::BF16, {M, 8192}), yb = B.gpu->alloc(DType::F32, {M, 512}),
             yc = B.gpu->alloc(DType::BF16, {M, 528}), yd = B.gpu->alloc(DType::F32, {M, 48});
      Tensor sa = B.gpu->alloc(DType::BF16, {M, 8192}), sb = B.gpu->alloc(DType::F32, {M, 512}),
             sc = B.gpu->alloc(DType::BF16, {M, 528}), sd = B.gpu->alloc(DType::F32, {M, 48});
      B.gpu->linear(x, la, sa);
      B.gpu->linear(x, lb, sb);
      B.gpu->linear(x, lc, sc);
      B.gpu->linear(x, ld, sd);
      B.gpu->linear_group(x, {{&la, &ya, false}, {&lb, &yb, false}, {&lc, &yc, false}});
      const std::string tag = " M=" + std::to_string(M) + " DS_INT4_DENSE_MT2=" + mt2;
      EXPECT_EQ(bit_diffs(B.gpu->to_host_f32(ya), B.gpu->to_host_f32(sa)), 0) << "three in one launch, a" << tag;
      EXPECT_EQ(bit_diffs(B.gpu->to_host_f32(yb), B.gpu->to_host_f32(sb)), 0) << "three in one launch, b" << tag;
      EXPECT_EQ(bit_diffs(B.gpu->to_host_f32(yc), B.gpu->to_host_f32(sc)), 0) << "three in one launch, c" << tag;
      B.gpu->zero(ya), B.gpu->zero(yb), B.gpu->zero(yc);
      B.gpu->linear_group(x, {{&la, &ya, false}, {&lb, &yb, false}, {&lc, &yc, false}, {&ld, &yd, false}});
      EXPECT_EQ(bit_diffs(B.gpu->to_host_f32(ya), B.gpu->to_host_f32(sa)), 0) << "four jobs, a" << tag;
      EXPECT_EQ(bit_diffs(B.gpu->to_host_f32(yc), B.gpu->to_host_f32(sc)), 0) << "four jobs, c" << tag;
      EXPECT_EQ(bit_diffs(B.gpu->to_host_f32(yd), B.gpu->to_host_f32(sd)), 0) << "four jobs, d" << tag;
    }
}

// The Hopper warpgroup-MMA kernel (int4_wg.h) for 9 .. 256 tokens: bit for bit equal to the mma.sync kernels
// (DS_INT4_WG=0) at every token count, tile width (16, 32, 64 tokens per block) and K split (1 or 2 warpgroups),
// for F32 and BF16 outputs, the
// model's shapes and odd ones (row tiles past the end of a 64-row block, one group, K slices of 1, 2 and 4 groups),
// and in the paired launch (linear_group); against the CPU on the first shape. Skipped where the kernel is not built
// or the device is not compute capability 9.0.
TEST_F(CudaOps, Int4Wgmma) {
  Both B;
  ScopedEnv on("DS_INT4_WG", "1");  // off by default
  if (!cuda::int4_wg_enabled()) GTEST_SKIP() << "the sm_90a kernel is not built or this device is not sm_90";
  const std::vector<LinearShape> shapes = {{8192, 2048, "q_proj / DeltaNet qkv"}, {2048, 4096, "o_proj / DeltaNet out"},
                                     {512, 2048, "k_proj"}, {272, 384, "17 tiles, 3 groups"},
                                     {48, 128, "3 tiles, 1 group"}, {1040, 1024, "65 tiles, KS 4 of 2 groups"},
                                     {96, 768, "KS 2 of 3 groups"}};
  int runs = 0;
  for (auto& s : shapes) {
    HostLinear hl(s.N, s.K, true, s.N * 5 + s.K);
    Linear lc = B.cpu->make_linear({hl.src()}), lg = B.gpu->make_linear({hl.src()});
    for (int64_t M : {9, 16, 17, 31, 32, 33, 40, 63, 64, 65, 100, 200, 256}) {
      const auto xs = randn(size_t(M * s.K), 1.f, M * 11 + s.K);
      Tensor x = B.gpu->upload_f32(xs, {M, s.K}, DType::BF16);
      for (DType ydt : {DType::F32, DType::BF16}) {
        const std::string tag = std::string(" N=") + std::to_string(s.N) + " K=" + std::to_string(s.K) +
                                " M=" + std::to_string(M) + (ydt == DType::F32 ? " F32" : " BF16") + " (" + s.what + ")";
        Tensor yo = B.gpu->alloc(ydt, {M, s.N});
        {
          ScopedEnv off("DS_INT4_WG", "0");
          B.gpu->linear(x, lg, yo);
        }
        const auto ov = B.gpu->to_host_f32(yo);
        for (const char* nt : {static_cast<const char*>(nullptr), "16", "32", "64"})
          for (const char* wk : {static_cast<const char*>(nullptr), "1", "2"}) {
            if (nt && !wk) continue;
            ScopedEnv ntok("DS_INT4_WG_NTOK", nt), wks("DS_INT4_WG_WK", wk);
            Tensor y = B.gpu->alloc(ydt, {M, s.N});
            B.gpu->linear(x, lg, y);
            EXPECT_EQ(bit_diffs(B.gpu->to_host_f32(y), ov), 0) << "wgmma vs mma.sync, tokens per block "
                                                              << (nt ? nt : "auto") << ", K split " << (wk ? wk : "auto") << tag;
            ++runs;
          }
        if (&s != &shapes[0] || ydt != DType::F32 || M % 32 != 1) continue;
        Tensor xc = B.cpu->upload_f32(xs, {M, s.K}, DType::F32), yc = B.cpu->alloc(DType::F32, {M, s.N});
        B.cpu->linear(xc, lc, yc);
        REPORT("int4 linear (wgmma)" + tag, test::rel(ov, B.cpu->to_host_f32(yc)));
      }
    }
  }
  // Two matrices of one input in one launch: each as alone.
  {
    HostLinear qa(4096, 2048, true, 81), qb(528, 2048, true, 82);
    Linear la = B.gpu->make_linear({qa.src()}), lb = B.gpu->make_linear({qb.src()});
    for (int64_t M : {12, 64, 130}) {
      Tensor x = B.gpu->upload_f32(randn(size_t(M * 2048), 1.f, 83 + M), {M, 2048}, DType::BF16);
      Tensor ya = B.gpu->alloc(DType::BF16, {M, 4096}), yb = B.gpu->alloc(DType::F32, {M, 528});
      Tensor sa = B.gpu->alloc(DType::BF16, {M, 4096}), sb = B.gpu->alloc(DType::F32, {M, 528});
      {
        ScopedEnv off("DS_INT4_WG", "0");
        B.gpu->linear(x, la, sa);
        B.gpu->linear(x, lb, sb);
      }
      B.gpu->linear_group(x, {{&la, &ya, false}, {&lb, &yb, false}});
      EXPECT_EQ(bit_diffs(B.gpu->to_host_f32(ya), B.gpu->to_host_f32(sa)), 0) << "paired wgmma launch, a, M=" << M;
      EXPECT_EQ(bit_diffs(B.gpu->to_host_f32(yb), B.gpu->to_host_f32(sb)), 0) << "paired wgmma launch, b, M=" << M;
    }
  }
  std::printf("  int4 wgmma: %d comparisons\n", runs);
}

// The expert launches' grid (int4_mma.cu max_tiles) against routing that needs the most tiles it allows: E = 32,
// T = 16, top-8 (128 pairs, decode tiles of 8): 12 experts with 9 pairs (2 tiles each) and 20 with one, 44 tiles,
// exactly the bound. A tile past the grid would leave its rows unwritten: against the CPU, and each token alone.
TEST_F(CudaOps, Int4MoeWorstCaseTiles) {
  Both B;
  const int64_t E = 32, H = 256, I = 128, K = 8, T = 16;
  const HostExperts hx(E, H, I, true, 1100, 1200, 1300);
  const Experts ec = hx.make(*B.cpu), eg = hx.make(*B.gpu);
  // Largest remaining count first, distinct experts per token.
  std::vector<int> left(size_t(E), 1);
  for (int e = 0; e < 12; ++e) left[size_t(e)] = 9;
  std::vector<float> idv, wv;
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int> order(static_cast<size_t>(E));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return left[size_t(a)] > left[size_t(b)]; });
    for (int64_t k = 0; k < K; ++k) {
      const int e = order[size_t(k)];
      ASSERT_GT(left[size_t(e)], 0);
      --left[size_t(e)];
      idv.push_back(float(e)), wv.push_back(1.f / float(K));
    }
  }
  for (int c : left) ASSERT_EQ(c, 0);
  const auto xs = randn(size_t(T * H), 1.f, 1400);
  const auto all = gpu_moe_rows(*B.gpu, eg, idv, wv, xs, K, H, 0, T);
  auto x = B.up(xs, {T, H});
  Tensor ids_c = B.cpu->upload_f32(idv, {T, K}, DType::I32), w_c = B.cpu->upload_f32(wv, {T, K}, DType::F32);
  Tensor yc = B.cpu->alloc(DType::F32, {T, H});
  B.cpu->moe_experts(x.c, ec, ids_c, w_c, yc);
  REPORT("int4 experts, 44 tiles (the grid's bound)", test::rel(all, B.cpu->to_host_f32(yc)));
  int diff = 0;
  for (int64_t t = 0; t < T; ++t)
    diff += bit_diffs(host_rows(all, t, t + 1, H), gpu_moe_rows(*B.gpu, eg, idv, wv, xs, K, H, t, 1)) != 0;
  EXPECT_EQ(diff, 0) << "tokens whose rows differ from the token alone";
}

// The medium dense shape's K split (one warp over all of K for 17-64 tokens at K ≤ 2048 since session 27; 2 or 4
// warps otherwise): every split, and both other warp tiles, give the default's bits, for the model's shapes and an odd
// row count, in single and grouped launches.
TEST_F(CudaOps, Int4MediumWarpSplit) {
  Both B;
  const std::vector<LinearShape> shapes = {{8192, 2048, "q_proj / DeltaNet qkv"}, {2048, 4096, "o_proj / DeltaNet out"},
                                           {528, 2048, "33 tiles"}, {96, 768, "KS 2 of 3 groups"}};
  int runs = 0;
  for (auto& s : shapes) {
    HostLinear hl(s.N, s.K, true, s.N * 3 + s.K);
    Linear lg = B.gpu->make_linear({hl.src()});
    for (int64_t M : {9, 16, 17, 31, 33, 40, 64, 65, 100}) {
      Tensor x = B.gpu->upload_f32(randn(size_t(M * s.K), 1.f, M * 17 + s.K), {M, s.K}, DType::BF16);
      Tensor y0 = B.gpu->alloc(DType::F32, {M, s.N});
      B.gpu->linear(x, lg, y0);
      const auto ref = B.gpu->to_host_f32(y0);
      // (and the loop schedules of session 29: no 2-block kernel, two groups per body in it, one in the 2 × 2 tile)
      const std::pair<const char*, const char*> knobs[] = {
          {"DS_INT4_MED_WK", "1"}, {"DS_INT4_MED_WK", "2"},  {"DS_INT4_MED_WK", "4"},     {"DS_INT4_MED", "12"},
          {"DS_INT4_MED", "14"},   {"DS_INT4_MED", "22"},    {"DS_INT4_MED_2B", "0"},    {"DS_INT4_MED_2B_UNR", "2"},
          {"DS_INT4_MED22_UNR", "1"}};
      for (const auto& [name, val] : knobs) {
        ScopedEnv e(name, val);
        Tensor y = B.gpu->alloc(DType::F32, {M, s.N});
        B.gpu->linear(x, lg, y);
        EXPECT_EQ(bit_diffs(B.gpu->to_host_f32(y), ref), 0)
            << name << "=" << val << " N=" << s.N << " K=" << s.K << " M=" << M << " (" << s.what << ")";
        ++runs;
      }
    }
  }
  // the DeltaNet's qkv + z pair in one launch against each alone, at every split
  HostLinear qa(8192, 2048, true, 61), qb(4096, 2048, true, 62);
  Linear la = B.gpu->make_linear({qa.src()}), lb = B.gpu->make_linear({qb.src()});
  for (int64_t M : {17, 40, 64})
    for (const char* wk : {static_cast<const char*>(nullptr), "1", "2", "4"}) {
      ScopedEnv e("DS_INT4_MED_WK", wk);
      Tensor x = B.gpu->upload_f32(randn(size_t(M * 2048), 1.f, 63 + M), {M, 2048}, DType::BF16);
      Tensor ya = B.gpu->alloc(DType::BF16, {M, 8192}), yb = B.gpu->alloc(DType::F32, {M, 4096});
      Tensor sa = B.gpu->alloc(DType::BF16, {M, 8192}), sb = B.gpu->alloc(DType::F32, {M, 4096});
      B.gpu->linear(x, la, sa);
      B.gpu->linear(x, lb, sb);
      B.gpu->linear_group(x, {{&la, &ya, false}, {&lb, &yb, false}});
      const std::string tag = std::string(" M=") + std::to_string(M) + " DS_INT4_MED_WK=" + (wk ? wk : "default");
      EXPECT_EQ(bit_diffs(B.gpu->to_host_f32(ya), B.gpu->to_host_f32(sa)), 0) << "qkv in the pair" << tag;
      EXPECT_EQ(bit_diffs(B.gpu->to_host_f32(yb), B.gpu->to_host_f32(sb)), 0) << "z in the pair" << tag;
      runs += 2;
    }
  std::printf("  int4 medium K splits and tiles: %d comparisons\n", runs);
}

// The dense int4 decode shapes of the 35B-A3B at 64 / 48 / 32 / 16 tokens (DeltaNet qkv + z in one launch, K = 2048; the
// out projection, K = 4096): µs per call and TFLOP/s of the medium shape, four copies of the weights in turn so that a
// call finds little of its matrix in L2. A timing (printed; asserted only to stay below the mma.sync ceiling) and the
// ncu target for the medium shape (session 19 compared a cluster kernel with it here: branch `tok`); since session 27
// also under each of the medium shape's knobs.
TEST_F(CudaOps, Int4MediumThroughput) {
  Both B;
  // The mma.sync ceiling (probe.h), printed with each row's share of it: a row's useful FLOP (real tokens only) are a
  // subset of its mma work, so no row can reach it — a probe reporting less than a kernel achieves fails here.
  const double ceiling = cuda::mma_sync_rate(4096, nullptr);
  ASSERT_TRUE(std::isfinite(ceiling) && ceiling > 0) << ceiling;
  std::printf("  mma.sync m16n8k16 ceiling %.1f TFLOP/s\n", ceiling * 1e-12);
  struct Shape {
    int64_t Na, Nb, K;
    const char* what;
  };
  for (const Shape& sh : {Shape{8192, 4096, 2048, "DeltaNet qkv + z"}, Shape{2048, 0, 4096, "out_proj"}}) {
    std::vector<HostLinear> ha, hb;
    std::vector<Linear> la, lb;
    for (int c = 0; c < 4; ++c) {
      ha.emplace_back(sh.Na, sh.K, true, 700 + c, true);
      la.push_back(B.gpu->make_linear({ha.back().src()}));
      if (sh.Nb) {
        hb.emplace_back(sh.Nb, sh.K, true, 800 + c, true);
        lb.push_back(B.gpu->make_linear({hb.back().src()}));
      }
    }
    for (int64_t M : {int64_t(64), int64_t(48), int64_t(32), int64_t(16)}) {
      Tensor x = B.gpu->upload_f32(randn(size_t(M * sh.K), 1.f, 900 + M), {M, sh.K}, DType::BF16);
      Tensor ya = B.gpu->alloc(DType::BF16, {M, sh.Na}), yb = B.gpu->alloc(DType::BF16, {M, sh.Nb ? sh.Nb : 16});
      int call = 0;
      auto run = [&] {
        const int c = call++ % 4;
        if (sh.Nb)
          B.gpu->linear_group(x, {{&la[size_t(c)], &ya, false}, {&lb[size_t(c)], &yb, false}});
        else
          B.gpu->linear(x, la[size_t(c)], ya);
      };
      const double flop = 2.0 * double(M) * double(sh.Na + sh.Nb) * double(sh.K);
      // the default, then the medium shape's knobs (warps splitting K, the warp tile, the loop schedules; same bits)
      const std::pair<const char*, const char*> knobs[] = {
          {"DS_INT4_MED_WK", nullptr}, {"DS_INT4_MED_WK", "1"}, {"DS_INT4_MED_WK", "2"},     {"DS_INT4_MED_WK", "4"},
          {"DS_INT4_MED", "12"},       {"DS_INT4_MED", "14"},   {"DS_INT4_MED_2B", "0"},     {"DS_INT4_MED_2B_UNR", "2"},
          {"DS_INT4_MED22_UNR", "1"}};
      for (const auto& [name, val] : knobs) {
        ScopedEnv e(name, val);
        const double us = time_per_call_us(*B.gpu, 40, run);
        std::printf("  %-18s M=%3lld %s=%-7s %8.2f us  %6.1f TFLOP/s (%4.1f%% of mma.sync)\n", sh.what, (long long)M,
                    name, val ? val : "default", us, flop / us * 1e-6, 100.0 * flop / (us * 1e-6) / ceiling);
        EXPECT_LT(flop / (us * 1e-6), ceiling) << sh.what << " M=" << M << " " << name;
      }
    }
  }
}

// Int4 experts at prefill sizes (tiles of up to 128 pairs per expert, the large-M kernel incl. its SwiGLU form):
// skewed routing (experts with many full tiles, partial tiles, one expert with none); bit for bit against the
// old kernels and against tokens alone (decode kernel), and against the CPU on sampled tokens.
bool wgx_available() {
  ScopedEnv w("DS_INT4_WGX", "1");
  return cuda::int4_wgx_enabled();
}

// Also the warpgroup-MMA experts (Hopper, int4_wg.h: int4_wgx_moe), bit for bit against the large-M kernel, with the
// checkpoint's zero points and (symmetric experts) with one zero point everywhere: at T = 40 the random experts' tiles
// take N = 16 or 32 tokens, the first four's 64; at 100 those take 128 and the others 64; at 1024 full tiles and ragged
// last ones.
TEST_F(CudaOps, Int4LargeMExperts) {
  Both B;
  ScopedEnv on("DS_CUDA_NO_BIG_GEMM", "0");  // the large-M kernel, whatever the default
  ScopedEnv no_wgx("DS_INT4_WGX", "0");      // ... not the warpgroup-MMA one (compared below)
  const int64_t E = 16, H = 2048, I = 512, K = 8;
  const HostExperts hx(E, H, I, true, 700, 800, 900);
  Experts ec = hx.make(*B.cpu), eg = hx.make(*B.gpu);
  for (int64_t T : {int64_t(40), int64_t(100), int64_t(1024)}) {
    ScopedEnv min_moe("DS_INT4_BIG_MOE_MIN", "1");
    std::mt19937 g{uint32_t(T)};
    std::vector<float> idv, wv;
    for (int64_t t = 0; t < T; ++t) {
      // experts 0..3 for every token (8 full tiles each at T = 1024; one partial tile at T = 100), four of 4..14 at
      // random (~36 or ~370 pairs: partial tiles, some with a token half empty), expert 15 never
      std::vector<int> perm(E - 5);
      std::iota(perm.begin(), perm.end(), 4);
      std::shuffle(perm.begin(), perm.end(), g);
      float sum = 0;
      for (int64_t k = 0; k < K; ++k) {
        idv.push_back(float(k < 4 ? int(k) : perm[size_t(k - 4)]));
        wv.push_back(float(g() % 1000 + 1));
        sum += wv.back();
      }
      for (int64_t k = 0; k < K; ++k) wv[wv.size() - K + k] /= sum;
    }
    const auto xs = randn(size_t(T * H), 1.f, 90 + T);
    auto run = [&](int64_t t0, int64_t n) { return gpu_moe_rows(*B.gpu, eg, idv, wv, xs, K, H, t0, n); };
    const std::string tag = " T=" + std::to_string(T);
    const auto all = run(0, T);
    {
      ScopedEnv off("DS_CUDA_NO_BIG_GEMM", "1");
      EXPECT_EQ(bit_diffs(all, run(0, T)), 0) << "large-M experts vs the old kernels" << tag;
    }
    {
      ScopedEnv r3("DS_INT4_BIG_R", "3");  // 3 row blocks per block (8 and 16 row blocks: uneven last blocks)
      EXPECT_EQ(bit_diffs(all, run(0, T)), 0) << "large-M experts, R = 3" << tag;
    }
    if (wgx_available()) {
      ScopedEnv w("DS_INT4_WGX", "1");
      EXPECT_EQ(bit_diffs(all, run(0, T)), 0) << "warpgroup-MMA experts vs the large-M kernel" << tag;
      // 3 gate_up row blocks per block (8 in all: a ragged last block), 5 of the down projection's 16 (its stages
      // kept across them)
      ScopedEnv r1("DS_INT4_WGX_R_GU", "3"), r2("DS_INT4_WGX_R_DOWN", "5");
      EXPECT_EQ(bit_diffs(all, run(0, T)), 0) << "warpgroup-MMA experts, 3 / 5 row blocks per block" << tag;
    } else {
      std::printf("  (warpgroup-MMA experts: no sm_90a build or device; not compared)\n");
    }
    int diff = 0;
    for (int64_t t : {int64_t(0), int64_t(5), T / 2, T - 1}) diff += bit_diffs(run(t, 1), host_rows(all, t, t + 1, H)) != 0;
    EXPECT_EQ(diff, 0) << "int4 experts: a token alone differs from the same token in a batch of" << tag;
    // CPU on the first 64 tokens
    const int64_t R = std::min<int64_t>(T, 64);
    Tensor ids = B.cpu->alloc(DType::I32, {R, K});
    for (int64_t i = 0; i < R * K; ++i) ids.ptr<int32_t>()[i] = int32_t(idv[size_t(i)]);
    Tensor w = B.cpu->upload_f32(std::vector<float>(wv.begin(), wv.begin() + R * K), {R, K}, DType::F32);
    Tensor x = B.cpu->upload_f32(host_rows(xs, 0, R, H), {R, H}, DType::F32), y = B.cpu->alloc(DType::F32, {R, H});
    B.cpu->moe_experts(x, ec, ids, w, y);
    REPORT("int4 moe_experts large-M E=16 H=2048 I=512 K=8" + tag, test::rel(host_rows(all, 0, R, H), B.cpu->to_host_f32(y)));
  }
  if (wgx_available()) {  // symmetric experts: one zero point everywhere (MmaInt4::zu), none loaded
    const HostExperts hs(E, H, I, true, 710, 810, 910, true);
    Experts es = hs.make(*B.gpu);
    const int64_t T = 300;
    std::mt19937 g{3};
    std::vector<float> idv, wv;
    uniform_routing(T, E, K, g, idv, wv);
    const auto xs = randn(size_t(T * H), 1.f, 91);
    const auto ref = gpu_moe_rows(*B.gpu, es, idv, wv, xs, K, H, 0, T);
    ScopedEnv w("DS_INT4_WGX", "1");
    EXPECT_EQ(bit_diffs(ref, gpu_moe_rows(*B.gpu, es, idv, wv, xs, K, H, 0, T)), 0)
        << "warpgroup-MMA experts, symmetric weights (one zero point), T=" << T;
  }
  if (wgx_available()) {  // another shape: gate_up K = 1024 (2 groups per slice), down K = 256 (2 groups, both kept
                          // in the stages, one per slice), top-4 of 8 experts
    const int64_t E2 = 8, H2 = 1024, I2 = 256, K2 = 4, T = 200;
    const HostExperts h2(E2, H2, I2, true, 720, 820, 920);
    Experts c2 = h2.make(*B.cpu), g2 = h2.make(*B.gpu);
    std::mt19937 g{5};
    std::vector<float> idv, wv;
    uniform_routing(T, E2, K2, g, idv, wv);
    const auto xs = randn(size_t(T * H2), 1.f, 92);
    const auto ref = gpu_moe_rows(*B.gpu, g2, idv, wv, xs, K2, H2, 0, T);
    std::vector<float> got;
    {
      ScopedEnv w("DS_INT4_WGX", "1");
      got = gpu_moe_rows(*B.gpu, g2, idv, wv, xs, K2, H2, 0, T);
      EXPECT_EQ(bit_diffs(ref, got), 0) << "warpgroup-MMA experts, H = 1024, I = 256, top-4 of 8, T=" << T;
    }
    const int64_t R = 16;
    Tensor ids = B.cpu->alloc(DType::I32, {R, K2});
    for (int64_t i = 0; i < R * K2; ++i) ids.ptr<int32_t>()[i] = int32_t(idv[size_t(i)]);
    Tensor w = B.cpu->upload_f32(std::vector<float>(wv.begin(), wv.begin() + R * K2), {R, K2}, DType::F32);
    Tensor x = B.cpu->upload_f32(host_rows(xs, 0, R, H2), {R, H2}, DType::F32), y = B.cpu->alloc(DType::F32, {R, H2});
    B.cpu->moe_experts(x, c2, ids, w, y);
    REPORT("int4 moe_experts warpgroup MMA E=8 H=1024 I=256 K=4",
           test::rel(host_rows(got, 0, R, H2), B.cpu->to_host_f32(y)));
  }
}

// The experts at decode sizes through the streaming kernels (k_int4_moe_gu, K = 2048: a slice of activations per
// warp, R gate/up tile pairs per block; k_int4_moe_down, K = 512: all activations in registers, tpw output tiles
// per warp): bit for bit against the k_int4_mma kernels they replace, for several pairs per block (1, 3: a ragged
// last block, 4, 8) and tiles per warp (1, 3, 4, 8), routing skewed so some experts take several 8-pair tiles, and
// against each token alone (the decode kernels below the streaming kernels' minimum pair counts).
TEST_F(CudaOps, Int4MoeDecodeStream) {
  Both B;
  const int64_t E = 16, H = 2048, I = 512, K = 8;
  const HostExperts hx(E, H, I, true, 1700, 1800, 1900);
  Experts eg = hx.make(*B.gpu);
  for (int64_t T : {int64_t(2), int64_t(8), int64_t(64), int64_t(100)}) {
    std::mt19937 g{uint32_t(T + 5)};
    std::vector<float> idv, wv;
    for (int64_t t = 0; t < T; ++t) {
      std::vector<int> perm(E - 2);  // experts 0 and 1 for every token (several tiles each from T = 9), six of 2..15
      std::iota(perm.begin(), perm.end(), 2);
      std::shuffle(perm.begin(), perm.end(), g);
      for (int64_t k = 0; k < K; ++k) {
        idv.push_back(float(k < 2 ? int(k) : perm[size_t(k - 2)]));
        wv.push_back(1.f / float(K));
      }
    }
    const auto xs = randn(size_t(T * H), 1.f, 190 + T);
    auto run = [&](int64_t t0, int64_t n) { return gpu_moe_rows(*B.gpu, eg, idv, wv, xs, K, H, t0, n); };
    std::vector<float> old;
    {
      ScopedEnv off("DS_INT4_MOE_DOWN_TPW_MIN_P", "1000000000"), off2("DS_INT4_MOE_GU_R_MIN_P", "1000000000");
      old = run(0, T);
    }
    const char* const n[] = {"1", "3", "4", "8"};
    for (int a = 0; a < 4; ++a) {  // the register double buffer (no ring)
      ScopedEnv on("DS_INT4_MOE_DOWN_TPW_MIN_P", "1"), t("DS_INT4_MOE_DOWN_TPW", n[a]), nr("DS_INT4_MOE_RING", "0");
      ScopedEnv on2("DS_INT4_MOE_GU_R_MIN_P", "1"), r("DS_INT4_MOE_GU_R", n[3 - a]);
      EXPECT_EQ(bit_diffs(run(0, T), old), 0) << "k_int4_moe_gu (" << n[3 - a] << " pairs per block) + k_int4_moe_down ("
                                              << n[a] << " tiles per warp) vs k_int4_mma, T=" << T;
    }
    {  // the defaults (the ring from 128 pairs: T = 64, 100), gate_up alone, then down alone
      ScopedEnv off("DS_INT4_MOE_DOWN_TPW_MIN_P", "1000000000"), on2("DS_INT4_MOE_GU_R_MIN_P", "1");
      EXPECT_EQ(bit_diffs(run(0, T), old), 0) << "k_int4_moe_gu alone vs k_int4_mma, T=" << T;
    }
    {
      ScopedEnv off("DS_INT4_MOE_GU_R_MIN_P", "1000000000"), on("DS_INT4_MOE_DOWN_TPW_MIN_P", "1");
      EXPECT_EQ(bit_diffs(run(0, T), old), 0) << "k_int4_moe_down alone vs k_int4_mma, T=" << T;
    }
    // Both kernels' cp.async rings (DS_INT4_MOE_RING 2-4 stages, read in place) with 1-4 gate/up pairs per block and
    // 1 / 2 / 3 / 8 down tiles per warp: units per warp below, at and above the ring's depth
    for (const char* d : {"2", "3", "4"})
      for (int a = 0; a < 4; ++a) {
        const char* const r[] = {"1", "2", "3", "4"};
        const char* const tpw[] = {"1", "2", "3", "8"};
        ScopedEnv on("DS_INT4_MOE_RING_MIN_P", "1"), ring("DS_INT4_MOE_RING", d);
        ScopedEnv on1("DS_INT4_MOE_GU_R_MIN_P", "1"), rr("DS_INT4_MOE_GU_R", r[a]);
        ScopedEnv on2("DS_INT4_MOE_DOWN_TPW_MIN_P", "1"), t("DS_INT4_MOE_DOWN_TPW", tpw[a]);
        EXPECT_EQ(bit_diffs(run(0, T), old), 0) << "streaming experts, " << d << "-stage ring, " << r[a]
                                                << " pairs per block, " << tpw[a] << " down tiles per warp, T=" << T;
      }
    int diff = 0;
    for (int64_t t : {int64_t(0), T / 2, T - 1}) diff += bit_diffs(run(t, 1), host_rows(old, t, t + 1, H)) != 0;
    EXPECT_EQ(diff, 0) << "int4 experts: a token alone differs from the same token in a batch of T=" << T;
  }
}

// One zero point everywhere (MmaInt4::zu: symmetric checkpoints, the only ones the loader accepts): the decode kernels
// skip the zero-point loads. Bit for bit against the same weights with the zero points loaded
// (DS_CUDA_NO_UNIFORM_ZERO=1), for the int4 linears at the decode, medium and large shapes and the experts at
// every decode kernel (k_int4_mma, the streaming kernels with registers and with the ring); and against the CPU.
// (DS_CUDA_NO_UNIFORM_ZERO is read at each launch.)
TEST_F(CudaOps, Int4UniformZero) {
  Both B;
  HostLinear hl(2048, 4096, true, 41, true);
  const Linear lc = B.cpu->make_linear({hl.src()}), lg = B.gpu->make_linear({hl.src()});
  for (int64_t M : {int64_t(1), int64_t(8), int64_t(64), int64_t(300)}) {
    auto x = B.up(randn(size_t(M * 4096), 1.f, 42 + M), {M, 4096});
    auto y = B.zeros({M, 2048});
    B.cpu->linear(x.c, lc, y.c);
    B.gpu->linear(x.g, lg, y.g);
    REPORT("int4 linear, one zero point, M=" + std::to_string(M), B.err(y));
    Tensor yz = B.gpu->alloc(DType::F32, {M, 2048}), yu = B.gpu->alloc(DType::F32, {M, 2048});
    B.gpu->linear(x.g, lg, yu);
    {
      ScopedEnv nz("DS_CUDA_NO_UNIFORM_ZERO", "1");
      B.gpu->linear(x.g, lg, yz);
    }
    EXPECT_EQ(bit_diffs(B.gpu->to_host_f32(yu), B.gpu->to_host_f32(yz)), 0) << "int4 linear M=" << M;
  }
  const int64_t E = 16, H = 2048, I = 512, K = 8;
  std::vector<HostLinear> hg, hu, hd;
  hg.reserve(E), hu.reserve(E), hd.reserve(E);
  std::vector<std::vector<LinearSource>> gu(E);
  std::vector<LinearSource> dn(E);
  for (int64_t e = 0; e < E; ++e) {
    hg.emplace_back(I, H, true, 50 + e, true), hu.emplace_back(I, H, true, 70 + e, true);
    hd.emplace_back(H, I, true, 90 + e, true);
    gu[e] = {hg.back().src(), hu.back().src()}, dn[e] = hd.back().src();
  }
  const Experts ec = B.cpu->make_experts(gu, dn), eg = B.gpu->make_experts(gu, dn);
  for (int64_t T : {int64_t(1), int64_t(8), int64_t(64)}) {
    std::mt19937 g{uint32_t(T)};
    std::vector<float> idv, wv;
    uniform_routing(T, E, K, g, idv, wv);
    const auto xs = randn(size_t(T * H), 1.f, 60 + T);
    const auto u = gpu_moe_rows(*B.gpu, eg, idv, wv, xs, K, H, 0, T);
    {
      ScopedEnv nz("DS_CUDA_NO_UNIFORM_ZERO", "1");
      EXPECT_EQ(bit_diffs(u, gpu_moe_rows(*B.gpu, eg, idv, wv, xs, K, H, 0, T)), 0) << "experts T=" << T;
    }
    {
      ScopedEnv nr("DS_INT4_MOE_RING", "0");  // the streaming kernels' register path
      EXPECT_EQ(bit_diffs(gpu_moe_rows(*B.gpu, eg, idv, wv, xs, K, H, 0, T), u), 0) << "experts, no ring, T=" << T;
    }
    auto x = B.up(xs, {T, H});
    Tensor ids_c = B.cpu->upload_f32(idv, {T, K}, DType::I32), w_c = B.cpu->upload_f32(wv, {T, K}, DType::F32);
    Tensor yc = B.cpu->alloc(DType::F32, {T, H});
    B.cpu->moe_experts(x.c, ec, ids_c, w_c, yc);
    const auto c = B.cpu->to_host_f32(yc);
    double num = 0, den = 0;
    for (size_t i = 0; i < c.size(); ++i) num += (u[i] - c[i]) * double(u[i] - c[i]), den += double(c[i]) * c[i];
    REPORT("int4 experts, one zero point, T=" + std::to_string(T), std::sqrt(num / den));
  }
}

// The dequantise kernel (int4_dequant.h) alone, bit for bit against the host: w[n, k] = bf16((q − z)·s), q read back
// through the mma layout's reference (mma_int4_nibble); every element of small and real-sized matrices.
TEST_F(CudaOps, Int4DequantKernel) {
  for (auto [N, K] : std::vector<std::pair<int64_t, int64_t>>{{16, 128}, {272, 384}, {512, 2048}, {2048, 4096}}) {
    const int G = 128;
    std::mt19937_64 g(N * 13 + K);
    std::vector<int32_t> qw(size_t(K / 8 * N));
    for (auto& x : qw) x = int32_t(uint32_t(g()));
    std::vector<uint32_t> packed(size_t(N * K / 8));
    for (int64_t t = 0; t < N / 16; ++t) cuda::mma_int4_pack_tile(qw.data(), N, K, t, 0, packed.data());
    std::vector<uint16_t> sc(size_t(N * (K / G)));  // fp16, as stored
    std::vector<uint8_t> z(sc.size());
    auto sv = randn(sc.size(), 0.02f, N + K);
    for (size_t i = 0; i < sc.size(); ++i) sc[i] = f32_to_f16(sv[i]), z[i] = uint8_t(1 + g() % 16);
    void *dq = nullptr, *ds = nullptr, *dz = nullptr, *dw = nullptr;
    ASSERT_EQ(cudaMalloc(&dq, packed.size() * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&ds, sc.size() * 2), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&dz, z.size()), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&dw, size_t(N * K) * 2), cudaSuccess);
    cudaMemcpy(dq, packed.data(), packed.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(ds, sc.data(), sc.size() * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(dz, z.data(), z.size(), cudaMemcpyHostToDevice);
    cuda::MmaInt4 W;
    W.qw = static_cast<const uint4*>(dq), W.sc = static_cast<const uint16_t*>(ds), W.z = static_cast<const uint8_t*>(dz);
    W.N = N, W.K = K, W.G = G, W.KS = cuda::mma_int4_slices(K, G);
    cuda::int4_dequant_bf16(W, dw, nullptr);
    std::vector<uint16_t> w(size_t(N * K));
    ASSERT_EQ(cudaMemcpy(w.data(), dw, w.size() * 2, cudaMemcpyDeviceToHost), cudaSuccess);
    int64_t bad = 0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const size_t gi = size_t(n * (K / G) + k / G);
        const float v = (float(cuda::mma_int4_nibble(packed.data(), K, n, k)) - float(z[gi])) * f16_to_f32(sc[gi]);
        bad += w[size_t(n * K + k)] != f32_to_bf16(v);
      }
    EXPECT_EQ(bad, 0) << "int4 dequant N=" << N << " K=" << K;
    for (void* p : {dq, ds, dz, dw}) cudaFree(p);
  }
}

// Prefill-sized int4 linears through a dequantised bf16 copy and cuBLAS (int4_dequant.h; default from 512 rows):
// against the CPU (every row of M ≤ 1024, else the first 64 and last 48), the error of the mma kernels on the same
// rows beside it, and the time of both; below the threshold the mma kernels, bit for bit.
TEST_F(CudaOps, Int4DequantGemm) {
  Both B;
  const std::vector<LinearShape> shapes = {{8192, 2048, "DeltaNet qkv"}, {4096, 2048, "DeltaNet z"},
                                     {2048, 4096, "DeltaNet out"}, {16384, 2048, "attention q|gate"},
                                     {2048, 8192, "attention o"}, {512, 2048, "attention k / v"},
                                     {272, 384, "odd: 17 tiles, 3 groups"}};
  auto time_ms = [&](auto&& fn) { return time_per_call_us(*B.gpu, 5, fn) * 1e-3; };
  for (auto& s : shapes) {
    HostLinear hl(s.N, s.K, true, s.N * 5 + s.K);
    Linear lc = B.cpu->make_linear({hl.src()}), lg = B.gpu->make_linear({hl.src()});
    for (int64_t M : {511, 512, 777, 2049, 4096}) {
      if (M == 4096 && s.N * s.K > 8192 * 2048) continue;
      const auto xs = randn(size_t(M * s.K), 1.f, M * 5 + s.K);
      Tensor x = B.gpu->upload_f32(xs, {M, s.K}, DType::BF16);
      for (DType ydt : {DType::F32, DType::BF16}) {
        const std::string tag = std::string(" N=") + std::to_string(s.N) + " K=" + std::to_string(s.K) +
                                " M=" + std::to_string(M) + (ydt == DType::F32 ? " F32" : " BF16") + " (" + s.what + ")";
        Tensor y = B.gpu->alloc(ydt, {M, s.N}), yo = B.gpu->alloc(ydt, {M, s.N});
        B.gpu->linear(x, lg, y);
        {
          ScopedEnv off("DS_CUDA_NO_DEQUANT_GEMM", "1");
          B.gpu->linear(x, lg, yo);
        }
        const auto yv = B.gpu->to_host_f32(y), yov = B.gpu->to_host_f32(yo);
        if (M < 512) {
          EXPECT_EQ(bit_diffs(yv, yov), 0) << "below the threshold: the mma kernels" << tag;
          continue;
        }
        if (ydt != DType::F32) continue;
        const int64_t a = M <= 1024 ? M : 64, b0 = M <= 1024 ? M : M - 48;
        std::vector<float> sub = host_rows(xs, 0, a, s.K), ref = host_rows(yv, 0, a, s.N), old = host_rows(yov, 0, a, s.N);
        auto tail = host_rows(xs, b0, M, s.K), yt = host_rows(yv, b0, M, s.N), ot = host_rows(yov, b0, M, s.N);
        sub.insert(sub.end(), tail.begin(), tail.end());
        ref.insert(ref.end(), yt.begin(), yt.end());
        old.insert(old.end(), ot.begin(), ot.end());
        const int64_t R = int64_t(sub.size()) / s.K;
        Tensor xc = B.cpu->upload_f32(sub, {R, s.K}, DType::F32), yc = B.cpu->alloc(DType::F32, {R, s.N});
        B.cpu->linear(xc, lc, yc);
        const auto cv = B.cpu->to_host_f32(yc);
        const double e_new = test::rel(ref, cv), e_old = test::rel(old, cv);
        const double t_new = time_ms([&] { B.gpu->linear(x, lg, y); });
        double t_old;
        {
          ScopedEnv off("DS_CUDA_NO_DEQUANT_GEMM", "1");
          t_old = time_ms([&] { B.gpu->linear(x, lg, yo); });
        }
        const double fl = 2.0 * double(M) * double(s.N) * double(s.K) * 1e-9;
        std::printf("  %-62s mma: %.3g, %.3f ms %.0f TFLOP/s | dequant+cuBLAS: %.3g, %.3f ms %.0f TFLOP/s\n",
                    tag.c_str(), e_old, t_old, fl / t_old, e_new, t_new, fl / t_new);
        REPORT("int4 dequant+cuBLAS" + tag, e_new);
      }
    }
  }
  // linear_group (two int4 weights of one input, as the DeltaNet qkv | z pair) takes the same path: each output as
  // from linear()
  {
    HostLinear qa(4096, 2048, true, 81), qb(512, 2048, true, 82);
    Linear la = B.gpu->make_linear({qa.src()}), lb = B.gpu->make_linear({qb.src()});
    const int64_t M = 1000;
    Tensor x = B.gpu->upload_f32(randn(size_t(M * 2048), 1.f, 83), {M, 2048}, DType::BF16);
    Tensor ya = B.gpu->alloc(DType::BF16, {M, 4096}), yb = B.gpu->alloc(DType::F32, {M, 512});
    Tensor sa = B.gpu->alloc(DType::BF16, {M, 4096}), sb = B.gpu->alloc(DType::F32, {M, 512});
    B.gpu->linear(x, la, sa);
    B.gpu->linear(x, lb, sb);
    B.gpu->linear_group(x, {{&la, &ya, false}, {&lb, &yb, false}});
    EXPECT_EQ(bit_diffs(B.gpu->to_host_f32(ya), B.gpu->to_host_f32(sa)), 0) << "linear_group matrix a";
    EXPECT_EQ(bit_diffs(B.gpu->to_host_f32(yb), B.gpu->to_host_f32(sb)), 0) << "linear_group matrix b";
  }
}

// Throughput of the int4 kernels at a 4k prefill, old (DS_CUDA_NO_BIG_GEMM=1) and new: one 4096 × 2048 → 4096
// linear and one routed-experts layer of the 35B-A3B shape (E = 256, H = 2048, I = 512, top-8, uniform random
// routing). Prints TFLOP/s; asserts nothing about time.
TEST_F(CudaOps, Int4PrefillThroughput) {
  Both B;
  ScopedEnv no_deq("DS_CUDA_NO_DEQUANT_GEMM", "1");  // the int4 kernels' own rates
  ScopedEnv no_wgx("DS_INT4_WGX", "0");              // the warpgroup-MMA experts: their own rows below
  auto time_ms = [&](auto&& fn) { return time_per_call_us(*B.gpu, 10, fn) * 1e-3; };
  struct Variant {
    const char *name, *no_big, *warp, *r;
  };
  const std::vector<Variant> variants = {{"old", "1", nullptr, nullptr},
                                         {"new (warp 32x64, R auto)", "0", "2", nullptr},
                                         {"new (warp 32x64, R 1)", "0", "2", "1"},
                                         {"new (warp 64x32, R auto)", "0", "4", nullptr}};
  {
    const int64_t M = 4096, K = 2048, N = 4096;
    HostLinear hl(N, K, true, 1);
    Linear lg = B.gpu->make_linear({hl.src()});
    Tensor x = B.gpu->upload_f32(randn(size_t(M * K), 1.f, 2), {M, K}, DType::BF16), y = B.gpu->alloc(DType::BF16, {M, N});
    for (const auto& v : variants) {
      ScopedEnv sw("DS_CUDA_NO_BIG_GEMM", v.no_big), sv("DS_INT4_BIG_WARP", v.warp), sr("DS_INT4_BIG_R", v.r);
      const double ms = time_ms([&] { B.gpu->linear(x, lg, y); });
      std::printf("  int4 linear M=%lld K=%lld N=%lld %s: %.3f ms, %.1f TFLOP/s\n", (long long)M, (long long)K,
                  (long long)N, v.name, ms, 2.0 * M * N * K / ms * 1e-9);
    }
  }
  {
    const int64_t E = 256, H = 2048, I = 512, K = 8, T = 4096;
    HostLinear g1(I, H, true, 3), u1(I, H, true, 4), d1(H, I, true, 5);  // one expert's data for all 256
    std::vector<std::vector<LinearSource>> gu(size_t(E), {g1.src(), u1.src()});
    std::vector<LinearSource> dn(size_t(E), d1.src());
    Experts eg = B.gpu->make_experts(gu, dn);
    std::mt19937 g(7);
    std::vector<float> idv, wv;
    uniform_routing(T, E, K, g, idv, wv);
    Tensor ids = B.gpu->upload_f32(idv, {T, K}, DType::I32), w = B.gpu->upload_f32(wv, {T, K}, DType::F32);
    Tensor x = B.gpu->upload_f32(randn(size_t(T * H), 1.f, 8), {T, H}, DType::BF16), y = B.gpu->alloc(DType::BF16, {T, H});
    for (const auto& v : variants) {
      ScopedEnv sw("DS_CUDA_NO_BIG_GEMM", v.no_big), sv("DS_INT4_BIG_WARP", v.warp), sr("DS_INT4_BIG_R", v.r);
      const double ms = time_ms([&] { B.gpu->moe_experts(x, eg, ids, w, y); });
      std::printf("  int4 moe_experts T=%lld E=%lld top-%lld H=%lld I=%lld %s: %.3f ms, %.1f TFLOP/s\n", (long long)T,
                  (long long)E, (long long)K, (long long)H, (long long)I, v.name, ms,
                  2.0 * T * K * 3 * H * I / ms * 1e-9);
    }
    // The warpgroup-MMA experts: gate_up / down row blocks per block, weights sent toward L2 first or not
    struct Wgx {
      const char *rg, *rd, *pf;
    };
    if (wgx_available())
      for (const Wgx& v : {Wgx{"1", "4", "0"}, Wgx{"1", "4", "1"}, Wgx{"2", "4", "0"}, Wgx{"1", "8", "0"}}) {
        ScopedEnv on_wgx("DS_INT4_WGX", "1"), rg("DS_INT4_WGX_R_GU", v.rg), rd("DS_INT4_WGX_R_DOWN", v.rd),
            pf("DS_INT4_WGX_PF", v.pf);
        const double ms = time_ms([&] { B.gpu->moe_experts(x, eg, ids, w, y); });
        std::printf("  int4 moe_experts T=%lld E=%lld top-%lld H=%lld I=%lld wgmma (gate_up R %s, down R %s, L2 "
                    "prefetch %s): %.3f ms, %.1f TFLOP/s\n",
                    (long long)T, (long long)E, (long long)K, (long long)H, (long long)I, v.rg, v.rd, v.pf, ms,
                    2.0 * T * K * 3 * H * I / ms * 1e-9);
      }
  }
}

// The routed experts at decode sizes on the 35B-A3B's shape (E = 256, H = 2048, I = 512, top-8, uniform random
// routing; one expert's data copied to all 256): bit for bit against the kernels without the streaming ring
// (DS_INT4_MOE_RING=0), then the time per moe_experts call (tile table + gate_up + down) and the rate over the
// distinct experts' bytes, next to a read-only stream of the same bytes (probe.h: the ceiling). Prints; asserts
// nothing about time. Also the ncu target for the expert kernels at batch 64 (-k regex:k_int4_moe). Session 18 (H200):
// 106 us at T=64 against 87 for the stream (bench/RESULTS.md).
TEST_F(CudaOps, Int4MoeDecodeThroughput) {
  Both B;
  const int64_t E = 256, H = 2048, I = 512, K = 8;
  HostLinear g1(I, H, true, 31, true), u1(I, H, true, 32, true), d1(H, I, true, 33, true);  // symmetric
  std::vector<std::vector<LinearSource>> gu(size_t(E), {g1.src(), u1.src()});
  std::vector<LinearSource> dn(size_t(E), d1.src());
  Experts eg = B.gpu->make_experts(gu, dn);
  // Device bytes per expert the kernels read: packed nibbles and fp16 scales per group of 128 (one zero point: none).
  const double per_expert = double(2 * I) * H * (0.5 + 2.0 / 128) + double(H) * I * (0.5 + 2.0 / 128);
  for (int64_t T : {int64_t(64), int64_t(8)}) {
    std::mt19937 g(uint32_t(100 + T));
    std::vector<float> idv, wv;
    uniform_routing(T, E, K, g, idv, wv);
    std::vector<char> used(size_t(E), 0);
    for (float id : idv) used[size_t(id)] = 1;
    const int64_t distinct = std::count(used.begin(), used.end(), 1);
    const auto xs = randn(size_t(T * H), 1.f, 300 + T);
    const auto all = gpu_moe_rows(*B.gpu, eg, idv, wv, xs, K, H, 0, T);
    {
      ScopedEnv off("DS_INT4_MOE_RING", "0");
      EXPECT_EQ(bit_diffs(all, gpu_moe_rows(*B.gpu, eg, idv, wv, xs, K, H, 0, T)), 0) << "ring vs registers, T=" << T;
    }
    {
      ScopedEnv nz("DS_CUDA_NO_UNIFORM_ZERO", "1");
      EXPECT_EQ(bit_diffs(all, gpu_moe_rows(*B.gpu, eg, idv, wv, xs, K, H, 0, T)), 0) << "zero points loaded, T=" << T;
    }
    Tensor ids = B.gpu->upload_f32(idv, {T, K}, DType::I32), w = B.gpu->upload_f32(wv, {T, K}, DType::F32);
    Tensor x = B.gpu->upload_f32(xs, {T, H}, DType::BF16), y = B.gpu->alloc(DType::F32, {T, H});
    const double bytes = per_expert * double(distinct);
    auto time_us = [&](auto&& fn) { return time_per_call_us(*B.gpu, 50, fn); };
    for (const char* nz : {"0", "1"}) {
      ScopedEnv z("DS_CUDA_NO_UNIFORM_ZERO", nz);
      const double us = time_us([&] { B.gpu->moe_experts(x, eg, ids, w, y); });
      std::printf("  T=%lld (%lld experts, %.1f MB) moe_experts, %s %8.2f us  %6.0f GB/s\n", (long long)T,
                  (long long)distinct, bytes / 1e6, *nz == '0' ? "one zero point" : "zero points loaded", us,
                  bytes / us * 1e-3);
    }
    {
      ScopedEnv sr("DS_INT4_MOE_SCALE_ROWS", "0");  // the rings' scales copied by every lane (before session 19)
      EXPECT_EQ(bit_diffs(all, gpu_moe_rows(*B.gpu, eg, idv, wv, xs, K, H, 0, T)), 0) << "scales per lane, T=" << T;
      const double us = time_us([&] { B.gpu->moe_experts(x, eg, ids, w, y); });
      std::printf("  T=%lld moe_experts, scales copied per lane %8.2f us  %6.0f GB/s\n", (long long)T, us,
                  bytes / us * 1e-3);
    }
    // The same bytes as one contiguous read-only stream (separate buffer, cold in L2 after the first pass).
    void* buf = nullptr;
    uint32_t* sink = nullptr;
    const int64_t n16 = int64_t(bytes / 16);
    ASSERT_EQ(cudaMalloc(&buf, size_t(n16 * 16) * 2), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&sink, 4), cudaSuccess);
    ASSERT_EQ(cudaMemset(buf, 1, size_t(n16 * 16) * 2), cudaSuccess);
    int half = 0;  // alternate two halves so the 50 MB L2 never holds what the next call reads
    const double rs = time_us([&] {
      cuda::read_stream(static_cast<char*>(buf) + (half ^= 1) * n16 * 16, n16 * 16, sink, 0, nullptr);
    });
    std::printf("  T=%lld read-only stream of the same bytes: %8.2f us  %6.0f GB/s\n", (long long)T, rs,
                bytes / rs * 1e-3);
    // Beside a reader on n SMs (probe.h ReadHog; idle: the SMs held without reading), at T = 64: what the experts and
    // the read-only stream get, and what the reader takes meanwhile (their sum is DRAM's total while both run). Timed
    // by stream synchronisation (a device synchronisation would wait for the reader). Printed only.
    if (T == 64)
      for (int n : {16, 32}) {
        cuda::ReadHog rd(n, int64_t(1) << 30), idle(n, int64_t(1) << 30, false);
        auto beside = [&](cuda::ReadHog& h, auto&& fn, auto&& sync, double* hog_bw) {
          fn();
          sync();
          h.start();
          const auto t0 = std::chrono::steady_clock::now();
          for (int i = 0; i < 100; ++i) fn();
          sync();
          const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
          *hog_bw = h.stop();
          return us / 100;
        };
        auto experts = [&] { B.gpu->moe_experts(x, eg, ids, w, y); };
        auto stream = [&] {
          cuda::read_stream(static_cast<char*>(buf) + (half ^= 1) * n16 * 16, n16 * 16, sink, 0, nullptr);
        };
        auto gsync = [&] { B.gpu->synchronize(); };
        auto ssync = [] { cudaStreamSynchronize(nullptr); };
        double hi = 0, hr = 0, si = 0, sr = 0;  // the idle reader's (0) and the reading one's rates
        const double ei = beside(idle, experts, gsync, &hi), er = beside(rd, experts, gsync, &hr);
        const double qi = beside(idle, stream, ssync, &si), qr = beside(rd, stream, ssync, &sr);
        std::printf("  T=64, %d SMs held: moe_experts %8.2f us (%6.0f GB/s) idle, %8.2f us (%6.0f GB/s) beside a reader "
                    "taking %5.0f GB/s (sum %5.0f); read-only stream %6.0f GB/s idle, %6.0f beside a reader taking %5.0f "
                    "(sum %5.0f)\n",
                    n, ei, bytes / ei * 1e-3, er, bytes / er * 1e-3, hr / 1e9, bytes / er * 1e-3 + hr / 1e9,
                    bytes / qi * 1e-3, bytes / qr * 1e-3, sr / 1e9, bytes / qr * 1e-3 + sr / 1e9);
      }
    cudaFree(buf), cudaFree(sink);
  }
}

// The bench's read hog (probe.h ReadHog, `bench --variants "x:hog=N"`): it reads while it runs, other streams' work
// completes beside it (a read of 256 MB on a stream of its own, synchronised while the hog runs; its kernel launched
// once before, probe.h), stop() ends it at once (not by its 60 s limit), it restarts, an idle hog reads nothing, and
// impossible SM counts are refused.
TEST_F(CudaOps, ReadHog) {
  const int sms = cuda::device_sm_count();
  EXPECT_THROW(cuda::ReadHog(0, int64_t(1) << 26), std::exception);
  EXPECT_THROW(cuda::ReadHog(sms, int64_t(1) << 26), std::exception);
  cuda::ReadHog hog(4, int64_t(1) << 26), idle(4, int64_t(1) << 26, false);
  void* buf = nullptr;
  uint32_t* sink = nullptr;
  const int64_t bytes = int64_t(1) << 28;
  ASSERT_EQ(cudaMalloc(&buf, size_t(bytes)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&sink, 4), cudaSuccess);
  ASSERT_EQ(cudaMemset(buf, 1, size_t(bytes)), cudaSuccess);
  cudaStream_t s = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  cuda::read_stream(buf, bytes, sink, 0, s);  // loaded before the hog runs (probe.h: lazy module loading)
  ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  for (int round = 0; round < 2; ++round) {
    const auto t0 = std::chrono::steady_clock::now();
    hog.start();
    cuda::read_stream(buf, bytes, sink, 0, s);
    ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
    const double read_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double rate = hog.stop();
    const double all_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("  round %d: 256 MB read beside the hog in %.2f ms; hog %.0f GB/s on 4 SMs; stopped after %.2f ms\n",
                round, read_s * 1e3, rate / 1e9, all_s * 1e3);
    EXPECT_GT(rate, 1e9) << "the hog read (almost) nothing";
    EXPECT_LT(all_s, 5.0) << "stop() did not end the hog (its own limit is 60 s)";
  }
  idle.start();
  cuda::read_stream(buf, bytes, sink, 0, s);
  ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  EXPECT_EQ(idle.stop(), 0.0) << "an idle hog reads nothing";
  cudaStreamDestroy(s);
  cudaFree(buf), cudaFree(sink);
}

// Backend::moe_ffn fused on CUDA (routing + expert tile table in one launch; the routed sum inside the shared expert's
// gated add): against the CPU
// composition, bit for bit against the unfused CUDA path (DS_CUDA_NO_MOE_FUSE), and row by row against one-row steps
// (batch invariance). E reduced to 64 (distinct int4 experts) for the CPU.
TEST_F(CudaOps, MoeFfnFused) {
  Both B;
  const int64_t E = 64, H = 1024, I = 256, Is = 512, K = 8, TM = 300;
  const HostExperts hx(E, H, I, true, 400, 500, 600);
  Experts ec = hx.make(*B.cpu), eg = hx.make(*B.gpu);
  HostLinear sd(H, Is, false, 700);
  const Linear sdc = B.cpu->make_linear({sd.src()}), sdg = B.gpu->make_linear({sd.src()});
  const auto ls = randn(size_t(TM * E), 1.f, 701), xs = randn(size_t(TM * H), 1.f, 702),
             as = randn(size_t(TM * Is), 1.f, 703), gs = randn(size_t(TM), 2.f, 704);
  auto rows_of = [](const std::vector<float>& v, int64_t r0, int64_t n, int64_t cols) {
    return std::vector<float>(v.begin() + r0 * cols, v.begin() + (r0 + n) * cols);
  };
  struct Out {
    std::vector<float> y, ids, w;
    bool operator==(const Out& o) const { return y == o.y && ids == o.ids && w == o.w; }
  };
  // GPU outputs of the step made of rows [r0, r0 + T)
  auto gpu_step = [&](int64_t r0, int64_t T, bool shared) {
    Backend& g = *B.gpu;
    Tensor l = g.upload_f32(rows_of(ls, r0, T, E), {T, E}, DType::BF16);
    Tensor x = g.upload_f32(rows_of(xs, r0, T, H), {T, H}, DType::BF16);
    Tensor a = g.upload_f32(rows_of(as, r0, T, Is), {T, Is}, DType::BF16);
    Tensor gt = g.upload_f32(rows_of(gs, r0, T, 1), {T, 1}, DType::BF16);
    Tensor ids = g.alloc(DType::I32, {T, K}), w = g.alloc(DType::F32, {T, K}), y = g.alloc(DType::BF16, {T, H});
    g.moe_ffn(l, K, x, eg, ids, w, shared ? &a : nullptr, shared ? &sdg : nullptr, shared ? &gt : nullptr, y);
    return Out{g.to_host_f32(y), g.to_host_f32(ids), g.to_host_f32(w)};
  };
  for (bool shared : {true, false})
    for (int64_t T : {1, 2, 3, 4, 7, 64, 65, 256, 300}) {
      const std::string tag = std::string("moe_ffn") + (shared ? " + shared" : "") + " E=64 T=" + std::to_string(T);
      auto l = B.up(rows_of(ls, 0, T, E), {T, E});
      auto x = B.up(rows_of(xs, 0, T, H), {T, H});
      auto a = B.up(rows_of(as, 0, T, Is), {T, Is});
      auto gt = B.up(rows_of(gs, 0, T, 1), {T, 1});
      auto ids = B.zeros({T, K}, DType::I32), w = B.zeros({T, K}, DType::F32), y = B.zeros({T, H});
      B.cpu->moe_ffn(l.c, K, x.c, ec, ids.c, w.c, shared ? &a.c : nullptr, shared ? &sdc : nullptr,
                     shared ? &gt.c : nullptr, y.c);
      B.gpu->moe_ffn(l.g, K, x.g, eg, ids.g, w.g, shared ? &a.g : nullptr, shared ? &sdg : nullptr,
                     shared ? &gt.g : nullptr, y.g);
      EXPECT_EQ(B.err(ids), 0.0) << tag << " ids";
      REPORT(tag + " weights", B.err(w));
      REPORT(tag, B.err(y));
      Out fused, epi, plain;
      {
        ScopedEnv m("DS_CUDA_MOE_FUSE_MAXT", "300");  // the fused path at every T
        ScopedEnv e("DS_CUDA_MOE_EPI_MAXT", "300");
        fused = gpu_step(0, T, shared);
      }
      {
        ScopedEnv m("DS_CUDA_MOE_FUSE_MAXT", "0");  // k_moe_route, then the routed sum in the shared expert's epilogue
        ScopedEnv e("DS_CUDA_MOE_EPI_MAXT", "300");
        epi = gpu_step(0, T, shared);
      }
      {
        ScopedEnv n("DS_CUDA_NO_MOE_FUSE", "1");
        plain = gpu_step(0, T, shared);
      }
      EXPECT_TRUE(fused == plain) << tag << ": fused and unfused CUDA differ";
      EXPECT_TRUE(epi == plain) << tag << ": epilogue-only fusion and unfused CUDA differ";
      if (T <= 4) {  // up to 32 pairs: the fused router's table in one warp by default; the 1024-thread block's
        ScopedEnv m("DS_CUDA_MOE_FUSE_MAXT", "300");
        ScopedEnv b("DS_CUDA_MOE_TILES_BLOCK", "1");
        EXPECT_TRUE(gpu_step(0, T, shared) == plain) << tag << ": the block's tile table and unfused CUDA differ";
      }
      if (shared && (T == 1 || T == 7)) {  // the GEMV's gated add (no mode 3): fused routing, separate combine
        ScopedEnv nm("DS_CUDA_NO_BF16_MMA", "1");
        Out f2 = gpu_step(0, T, shared), p2;
        {
          ScopedEnv n("DS_CUDA_NO_MOE_FUSE", "1");
          p2 = gpu_step(0, T, shared);
        }
        EXPECT_TRUE(f2 == p2) << tag << " (GEMV): fused and unfused CUDA differ";
      }
    }
  // batch invariance: every row of a 64-row fused step equals the row alone
  for (bool shared : {true, false}) {
    const Out all = gpu_step(0, 64, shared);
    int diff = 0;
    for (int64_t r = 0; r < 64; ++r) {
      const Out one = gpu_step(r, 1, shared);
      diff += one.y != rows_of(all.y, r, 1, H) || one.ids != rows_of(all.ids, r, 1, K) ||
              one.w != rows_of(all.w, r, 1, K);
    }
    EXPECT_EQ(diff, 0) << "moe_ffn rows of a 64-row step vs alone" << (shared ? " (shared)" : "");
  }
}

// The compact router (moe_route_token_c, default for E ≤ 256 at top-8 with bf16 or fp32 logits) in its three
// launches — the decode router + one-warp table (T ≤ 4), the 1024-thread router + table (T ≤ 8, or T ≤ 4 with
// DS_CUDA_MOE_TILES_BLOCK=1) and the unfused router (larger T, and DS_CUDA_NO_MOE_FUSE) — gives the generic router's
// (DS_MOE_ROUTE_C=0) ids, weights and MoE output bit for bit, fused or not, and the ids are the CPU's. Logits on a
// grid of 0.5 make many probabilities tie exactly.
TEST_F(CudaOps, MoeRouteTableDecode) {
  Both B;
  const int64_t H = 256, I = 128, K = 8;
  for (int64_t E : {256, 200, 64}) {
    const HostExperts hx(E, H, I, true, 800 + E, 900 + E, 1000 + E);
    Experts eg = hx.make(*B.gpu);
    for (DType ldt : {DType::BF16, DType::F32})
      for (bool ties : {false, true})
        for (int64_t T : {1, 2, 3, 4, 5, 8, 17, 64}) {
          const std::string tag = "E=" + std::to_string(E) + " T=" + std::to_string(T) +
                                  (ldt == DType::BF16 ? " bf16" : " f32") + (ties ? " ties" : "");
          std::vector<float> lv = randn(size_t(T * E), 1.f, uint64_t(1100 + E + T + 7 * ties));
          for (float& v : lv) v = ties ? std::round(v * 2.f) / 2.f : bf16_to_f32(f32_to_bf16(v));  // exact in bf16
          const auto xs = randn(size_t(T * H), 1.f, uint64_t(1200 + T));
          struct Out {
            std::vector<float> y, ids, w;
            bool operator==(const Out& o) const { return y == o.y && ids == o.ids && w == o.w; }
          };
          auto run = [&] {
            Backend& g = *B.gpu;
            Tensor l = g.upload_f32(lv, {T, E}, ldt), x = g.upload_f32(xs, {T, H}, DType::BF16);
            Tensor ids = g.alloc(DType::I32, {T, K}), w = g.alloc(DType::F32, {T, K}), y = g.alloc(DType::BF16, {T, H});
            g.moe_ffn(l, K, x, eg, ids, w, nullptr, nullptr, nullptr, y);
            return Out{g.to_host_f32(y), g.to_host_f32(ids), g.to_host_f32(w)};
          };
          Out ref, compact, compact_plain, general;
          {
            ScopedEnv c("DS_MOE_ROUTE_C", "0");
            ScopedEnv n("DS_CUDA_NO_MOE_FUSE", "1");
            ref = run();  // the generic router, unfused
          }
          compact = run();
          {
            ScopedEnv n("DS_CUDA_NO_MOE_FUSE", "1");
            compact_plain = run();
          }
          {
            ScopedEnv c("DS_MOE_ROUTE_C", "0");
            general = run();
          }
          EXPECT_TRUE(compact == ref) << tag << ": compact router (fused) and the generic one differ";
          EXPECT_TRUE(compact_plain == ref) << tag << ": compact router (unfused) and the generic one differ";
          EXPECT_TRUE(general == ref) << tag << ": generic router fused and unfused differ";
          if (T <= 4) {
            ScopedEnv b("DS_CUDA_MOE_TILES_BLOCK", "1");
            EXPECT_TRUE(run() == ref) << tag << ": compact router with the 1024-thread table and the generic one differ";
          }
          auto l = B.up(lv, {T, E});
          auto ids = B.zeros({T, K}, DType::I32), w = B.zeros({T, K}, DType::F32);
          B.cpu->moe_route(l.c, K, ids.c, w.c);
          const std::vector<float> cid = B.cpu->to_host_f32(ids.c);
          EXPECT_EQ(cid, compact.ids) << tag << ": ids differ from the CPU's";
        }
  }
}

// A NaN router logit (a broken checkpoint or an overflow upstream) makes the token's probabilities NaN. The compact
// router (E ≤ 256, top-8: every routing launch of the 35B-A3B) and the generic one (DS_MOE_ROUTE_C=0) then pick
// experts 0..7 with NaN weights: ids in range, so the expert kernels read only real experts (a pick outside [0, E)
// would read past the weights). Checked in the unfused router, the decode router + table (T = 1, 4) and the
// 1024-thread one (T = 8) through moe_ffn.
TEST_F(CudaOps, MoeRouteNaNLogits) {
  Both B;
  const int64_t E = 256, H = 256, I = 128, K = 8;
  const HostExperts hx(E, H, I, true, 1300, 1301, 1302);
  Experts eg = hx.make(*B.gpu);
  for (int64_t T : {1, 4, 8, 64}) {
    std::vector<float> lv = randn(size_t(T * E), 1.f, uint64_t(1400 + T));
    for (float& v : lv) v = bf16_to_f32(f32_to_bf16(v));  // exact in bf16, so the CPU routes the same logits
    lv[size_t(3)] = std::nanf("");  // token 0
    std::vector<float> cpu_ids;
    {
      auto lc = B.up(lv, {T, E});
      auto ic = B.zeros({T, K}, DType::I32), wc = B.zeros({T, K}, DType::F32);
      B.cpu->moe_route(lc.c, K, ic.c, wc.c);  // the CPU twin: its stable sort keeps 0..7 when every key is NaN
      cpu_ids = B.cpu->to_host_f32(ic.c);
    }
    const auto xs = randn(size_t(T * H), 1.f, uint64_t(1500 + T));
    Backend& g = *B.gpu;
    Tensor l = g.upload_f32(lv, {T, E}, DType::BF16), x = g.upload_f32(xs, {T, H}, DType::BF16);
    Tensor w = g.alloc(DType::F32, {T, K}), y = g.alloc(DType::BF16, {T, H});
    for (int v = 0; v < 4; ++v) {
      const bool fused = v & 1;
      ScopedEnv n("DS_CUDA_NO_MOE_FUSE", fused ? "0" : "1");
      ScopedEnv c("DS_MOE_ROUTE_C", v & 2 ? "0" : "1");
      // −1 everywhere first, so a variant that stored no ids cannot pass on an earlier variant's
      Tensor ids = g.upload_f32(std::vector<float>(size_t(T * K), -1.f), {T, K}, DType::I32);
      g.moe_ffn(l, K, x, eg, ids, w, nullptr, nullptr, nullptr, y);
      const std::vector<float> id = g.to_host_f32(ids);
      for (int64_t k = 0; k < K; ++k) EXPECT_EQ(id[size_t(k)], float(k)) << "T=" << T << " variant " << v;
      for (size_t i = 0; i < id.size(); ++i)
        ASSERT_TRUE(id[i] >= 0 && id[i] < float(E)) << "T=" << T << " variant " << v << " id " << id[i] << " at " << i;
      EXPECT_EQ(id, cpu_ids) << "T=" << T << " variant " << v << ": ids differ from the CPU's";
    }
  }
}

}  // namespace
}  // namespace ds
