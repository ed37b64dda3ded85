// The vision tower on the CUDA backend (issue #7 item 5).
//
// 1. Every vision op (ops.h "vision tower") CUDA vs its CPU twin over many shapes: the real Qwen3.6 tower's
//    (hidden 1152, 16 heads of 72, MLP 4304, merger 4608 → 2048, 1024×1024 image = 4096 patches), the tiny
//    fixtures' (hidden 64, 2 heads of 32), and awkward ones (odd sizes, several images per call, segments of 1 to
//    2000 rows). Inputs are bf16-exact, so both backends see the same numbers; the bound is relative L2 ≤ 1e-2 as
//    in test_cuda_ops.cpp (bf16 output rounding alone is ~1.5e-3; attention also rounds P to bf16).
// 2. A random tower of the real shapes (2 blocks) on two images in one call: CUDA vs CPU features.
// 4. An image request through the engine on CUDA (what `serve --backend cuda` runs): greedy tokens equal a
//    hand-driven CUDA forward (whole prompt, then eager decode), alone with step graphs on, and under chunked
//    prefill that splits the image run beside a text request (there only completion is required: chunking changes
//    bf16 rounding, so tokens may legitimately differ on a tiny random model; matches are printed).
// 3. The tiny fixtures' image features and image-prompt logits on CUDA against transformers' fp32 run. The golden
//    files have no bf16 reference run for the image tensors, so the bound is borrowed from the same model's text
//    path: 2× the largest relative error of the bf16 reference's prompt logits (V.bf16ref.promptN.logits vs
//    V.fp32.promptN.logits, or tiny-dense/bf16ref-errors.json). That is what bf16 activations cost this model's
//    language model, through which the image logits pass too; the tower adds 2 bf16 blocks of its own. Our
//    measured errors and their ratio to the bound are printed.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <numeric>

#include "cuda_test_util.h"
#include "golden_util.h"
#include "model_runner.h"
#include "io/config.h"
#include "model/model.h"
#include "runtime/cache.h"
#include "runtime/engine.h"
#include "vision/image.h"
#include "vision/preprocess.h"

namespace ds {
namespace {

using test::Both;
using test::Pair;
using test::randn;

constexpr double kTol = 1e-2;

#define REPORT(name, e)                                                    \
  do {                                                                     \
    double e_ = (e);                                                       \
    std::printf("  %-70s rel L2 %.3g\n", std::string(name).c_str(), e_);   \
    EXPECT_LT(e_, kTol) << name;                                           \
  } while (0)

// Largest |a − b| (reported with failures, to tell a wrong element from general drift).
double max_abs(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) m = std::max(m, double(std::fabs(a[i] - b[i])));
  return a.size() == b.size() ? m : INFINITY;
}
std::string cmp(Both& B, const Pair& p) {
  auto g = B.gpu->to_host_f32(p.g), c = B.cpu->to_host_f32(p.c);
  return str_cat("max |diff| ", max_abs(g, c));
}

class CudaVision : public ::testing::Test {
 protected:
  void SetUp() override { DS_REQUIRE_GPU(); }
};

TEST_F(CudaVision, LayerNorm) {
  Both B;
  // D: tiny 64, real 1152, merger input 4608 (after the view), odd 100 and 37; rows: 1, odd, real P = 4096.
  for (auto [R, D] : std::vector<std::pair<int64_t, int64_t>>{
           {1, 64}, {77, 64}, {308, 64}, {1, 1152}, {33, 1152}, {4096, 1152}, {1024, 4608}, {5, 100}, {3, 37}}) {
    auto x = B.up(randn(R * D, 2.f, 11 + R + D, 0.7f), {R, D});  // a non-zero mean: the subtraction matters
    auto w = B.up(randn(D, 0.2f, 12 + D, 1.f), {D}, DType::F32);
    auto b = B.up(randn(D, 0.3f, 13 + D), {D}, DType::F32);
    auto y = B.zeros({R, D});
    B.cpu->layernorm(x.c, w.c, b.c, 1e-6f, y.c);
    B.gpu->layernorm(x.g, w.g, b.g, 1e-6f, y.g);
    REPORT(str_cat("layernorm R ", R, " D ", D, " (", cmp(B, y), ")"), B.err(y));
  }
}

TEST_F(CudaVision, AddBias) {
  Both B;
  // N: qkv 3456, proj 1152, fc1 4304, merger 4608 / 2048, tiny 192 / 64 / 128 / 256, odd 7.
  for (auto [R, N] : std::vector<std::pair<int64_t, int64_t>>{
           {1, 7}, {308, 192}, {77, 256}, {13, 3456}, {4096, 1152}, {300, 4304}, {1024, 4608}, {1024, 2048}}) {
    auto x = B.up(randn(R * N, 1.f, 21 + R + N), {R, N});
    auto bias = B.up(randn(N, 0.5f, 22 + N), {N}, DType::F32);
    B.cpu->add_bias(x.c, bias.c);
    B.gpu->add_bias(x.g, bias.g);
    REPORT(str_cat("add_bias R ", R, " N ", N, " (", cmp(B, x), ")"), B.err(x));
  }
}

TEST_F(CudaVision, Gelu) {
  Both B;
  for (bool tanh_approx : {true, false})
    for (int64_t n : {int64_t(1), int64_t(1000), int64_t(77) * 4304, int64_t(1024) * 4608 + 3}) {
      auto x = B.up(randn(n, 3.f, 31 + n), {n});
      auto y = B.zeros({n});
      B.cpu->gelu(x.c, tanh_approx, y.c);
      B.gpu->gelu(x.g, tanh_approx, y.g);
      REPORT(str_cat("gelu ", tanh_approx ? "tanh" : "erf", " n ", n, " (", cmp(B, y), ")"), B.err(y));
    }
}

TEST_F(CudaVision, EmbedBilinearAdd) {
  Both B;
  std::mt19937_64 g(41);
  // table side 48 (2304 rows, the real and tiny configs'), D 64 and 1152; J = 4 (bilinear), 1 and 3 (awkward).
  for (auto [R, D, J] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
           {1, 64, 4}, {308, 64, 4}, {4096, 1152, 4}, {33, 1152, 1}, {17, 100, 3}}) {
    const int64_t V = 2304;
    auto table = B.up(randn(V * D, 0.5f, 42 + D), {V, D});
    auto x = B.up(randn(R * D, 1.f, 43 + R), {R, D});
    std::vector<int32_t> idx(size_t(R * J));
    std::vector<float> w(idx.size());
    std::uniform_int_distribution<int32_t> pick(0, int32_t(V - 1));
    std::uniform_real_distribution<float> u(0.f, 1.f);
    for (size_t i = 0; i < idx.size(); ++i) {
      idx[i] = pick(g);
      w[i] = u(g);
    }
    idx[0] = 0;
    idx.back() = int32_t(V - 1);  // both ends of the table
    B.cpu->embed_bilinear_add(x.c, table.c, idx, w);
    B.gpu->embed_bilinear_add(x.g, table.g, idx, w);
    REPORT(str_cat("embed_bilinear_add R ", R, " D ", D, " J ", J, " (", cmp(B, x), ")"), B.err(x));
  }
}

TEST_F(CudaVision, Rope2d) {
  Both B;
  std::mt19937_64 g(51);
  // (Nh, Dh): real 16×72, tiny 2×32, and 3×20, 1×4 (quarter = 1), 4×128.
  for (auto [P, Nh, Dh] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
           {1, 16, 72}, {4096, 16, 72}, {308, 2, 32}, {7, 3, 20}, {5, 1, 4}, {99, 4, 128}}) {
    auto qkv = B.up(randn(P * 3 * Nh * Dh, 1.f, 52 + P + Dh), {P, 3 * Nh * Dh});
    std::vector<int32_t> pos(size_t(2 * P));
    std::uniform_int_distribution<int32_t> pick(0, 127);  // a 2048-pixel side has 128 patches
    for (auto& p : pos) p = pick(g);
    pos[0] = 127;
    B.cpu->vision_rope(qkv.c, Nh, Dh, pos, 10000.0);
    B.gpu->vision_rope(qkv.g, Nh, Dh, pos, 10000.0);
    REPORT(str_cat("vision_rope P ", P, " Nh ", Nh, " Dh ", Dh, " (", cmp(B, qkv), ")"), B.err(qkv));
  }
}

TEST_F(CudaVision, Attention) {
  Both B;
  struct Case {
    std::vector<int32_t> cu;
    int64_t Nh, Dh;
  };
  std::vector<Case> cases = {
      {{0, 1}, 16, 72},                        // one patch
      {{0, 308}, 2, 32},                       // the tiny fixtures' image (14 × 22 patches)
      {{0, 1024}, 16, 72},                     // a 512 × 512 image, real heads
      {{0, 4096}, 2, 72},                      // a 1024 × 1024 image (two of the 16 heads: the CPU twin is slow)
      {{0, 4, 68, 69, 325, 1001, 1100}, 16, 72},  // six images of 4, 64, 1, 256, 676, 99 patches in one call
      {{0, 63, 128, 193}, 4, 40},              // segments around the 64-row tile, Dh padded 40 → 48
      {{0, 2000}, 1, 8},                       // Dh 8 (padded to 16), long segment
      {{0, 130, 131}, 3, 128},                 // largest Dh
      {{0, 200, 400}, 2, 104},                 // Dh 104 (padded to 112)
  };
  for (auto& c : cases) {
    const int64_t P = c.cu.back();
    // Scores of a few units (scale 1.5 per element): softmax neither uniform nor one-hot.
    auto qkv = B.up(randn(P * 3 * c.Nh * c.Dh, 1.5f, 61 + P + c.Dh), {P, 3 * c.Nh * c.Dh});
    auto o = B.zeros({P, c.Nh * c.Dh});
    B.cpu->vision_attention(qkv.c, c.Nh, c.Dh, c.cu, o.c);
    B.gpu->vision_attention(qkv.g, c.Nh, c.Dh, c.cu, o.g);
    std::string segs;
    for (size_t i = 0; i + 1 < c.cu.size(); ++i) segs += str_cat(i ? "," : "", c.cu[i + 1] - c.cu[i]);
    REPORT(str_cat("vision_attention segments [", segs, "] Nh ", c.Nh, " Dh ", c.Dh, " (", cmp(B, o), ")"), B.err(o));
  }
}

TEST_F(CudaVision, ScatterRows) {
  Both B;
  for (auto [T, H] : std::vector<std::pair<int64_t, int64_t>>{{91, 256}, {5, 2048}, {300, 37}}) {
    auto x = B.up(randn(T * H, 1.f, 71 + T), {T, H});
    std::vector<int32_t> rows;
    for (int64_t i = 1; i < T; i += 3) rows.push_back(int32_t(i));
    rows.push_back(0);
    auto src = B.up(randn(rows.size() * H, 1.f, 72 + T), {int64_t(rows.size()), H});
    B.cpu->scatter_rows(x.c, rows, src.c);
    B.gpu->scatter_rows(x.g, rows, src.g);
    REPORT(str_cat("scatter_rows T ", T, " H ", H, " rows ", rows.size(), " (", cmp(B, x), ")"), B.err(x));
  }
}

// ---- a random tower of the real shapes, CUDA vs CPU ----

std::string real_config() { return test::cuda_data_dir() + "/../../bench/configs/qwen3.6-35b-a3b.json"; }

TEST_F(CudaVision, RandomRealShapedTowerMatchesCpu) {
  io::ModelConfig cfg = io::load_model_config(real_config());
  ASSERT_TRUE(cfg.vision.present);
  EXPECT_EQ(cfg.vision.hidden_size, 1152);
  EXPECT_EQ(cfg.vision.num_heads, 16);
  EXPECT_EQ(cfg.vision.depth, 27);
  cfg.vision.depth = 2;  // the CPU twin of 27 blocks takes too long; every block runs the same ops
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend(0);
  auto mc = model::Model::load_random_vision(cfg, *cpu, 7);
  auto mg = model::Model::load_random_vision(cfg, *gpu, 7);
  // Two images in one call: 448 × 448 (28 × 28 patches) and 160 × 224 (10 × 14).
  const std::vector<std::array<int64_t, 3>> grids = {{1, 28, 28}, {1, 10, 14}};
  const int64_t K = 3 * 2 * 16 * 16, P = 28 * 28 + 10 * 14;
  std::vector<float> px(size_t(P * K));
  std::mt19937_64 g(8);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (auto& v : px) v = u(g);
  auto fc = cpu->to_host_f32(mc->encode_images(px, grids));
  auto fg = gpu->to_host_f32(mg->encode_images(px, grids));
  ASSERT_EQ(fc.size(), size_t(P / 4 * 2048));
  const double err = test::rel_l2(fg, fc);
  // bf16 activations through 2 blocks and the merger (each linear's input rounded, P rounded in attention).
  std::printf("  random real-shaped tower (2 blocks), 2 images, %lld patches: features rel L2 %.4g, max |diff| %.4g\n",
              (long long)P, err, max_abs(fg, fc));
  EXPECT_LT(err, 3e-2);
}

// ---- the tiny fixtures against transformers ----

// "<fixture>/<variant>", e.g. "tiny-moe/int4" (model_runner.h golden_fixture).
test::GoldenFixture& fixture(const std::string& param) {
  return test::golden_fixture(param, test::cuda_data_dir(), [] { return make_cuda_backend(0); });
}

vision::PixelValues fixture_pixels() {
  vision::SourcePolicy p;
  p.allow_any_file = true;
  const std::string dir = test::cuda_data_dir() + "/tiny-moe/";
  auto img = vision::load_image(dir + "image.png", p);
  return vision::preprocess_image(img, vision::load_preprocess_config(dir + "tiny-moe-bf16"));
}

std::vector<int32_t> collapse_pads(const std::vector<int32_t>& ids, int32_t pad) {
  std::vector<int32_t> out;
  for (auto t : ids)
    if (!(t == pad && !out.empty() && out.back() == pad)) out.push_back(t);
  return out;
}

class CudaVisionGolden : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override { DS_REQUIRE_GPU(); }
  std::string variant() const { return GetParam().substr(GetParam().find('/') + 1); }
  // 2× the largest error of the bf16 reference's text prompt logits on this fixture (see the top of the file).
  double bound(test::GoldenFixture& f) {
    double worst = 0;
    const size_t n = f.golden["text"][variant()].size();
    for (size_t i = 0; i < n; ++i) {
      const std::string name = "prompt" + std::to_string(i) + ".logits";
      const std::string bf = variant() + ".bf16ref." + name;
      double e;
      if (f.tensors->has(bf)) e = test::rel_l2(f.tensors->f32(bf), f.tensors->f32(variant() + ".fp32." + name));
      else e = f.bf16err.at(bf).at("all_rows").get<double>();
      worst = std::max(worst, e);
    }
    return 2 * worst;
  }
};

TEST_P(CudaVisionGolden, FeaturesMatchReference) {
  auto& f = fixture(GetParam());
  ASSERT_TRUE(f.m->has_vision());
  auto pv = fixture_pixels();
  auto ours = f.be->to_host_f32(f.m->encode_images(pv.data, {{pv.grid.t, pv.grid.h, pv.grid.w}}));
  std::vector<int64_t> shape;
  auto ref = f.tensors->f32(variant() + ".fp32.image.features", &shape);
  const double err = test::rel_l2(ours, ref), b = bound(f);
  std::printf("  cuda %s image features [%lld, %lld]: rel L2 %.4g, bound %.4g (ratio %.3f)\n", GetParam().c_str(),
              (long long)shape[0], (long long)shape[1], err, b, err / b);
  EXPECT_LT(err, b);
}

TEST_P(CudaVisionGolden, ImagePromptLogitsMatchReference) {
  auto& f = fixture(GetParam());
  auto pv = fixture_pixels();
  const int32_t pad = int32_t(f.m->config().image_token_id);
  auto ids = f.golden["image"]["input_ids"].get<std::vector<int32_t>>();
  auto toks = vision::expand_image_placeholders(collapse_pads(ids, pad), pad, {pv.grid}, 2);
  ASSERT_EQ(toks, ids);
  auto mp = vision::mrope_positions(toks, pad, {pv.grid}, 2);
  Tensor feats = f.m->encode_images(pv.data, {{pv.grid.t, pv.grid.h, pv.grid.w}});
  const int64_t T = int64_t(toks.size()), V = f.m->config().text.vocab_size;
  runtime::CacheManager cm(*f.m, 16, 16, 1);
  runtime::SeqCache seq;
  cm.start(seq);
  ASSERT_TRUE(cm.reserve(seq, T));
  BatchMeta b = runtime::make_batch({{&seq, toks}});
  b.positions = mp.pos;
  for (int64_t i = 0; i < T; ++i)
    if (toks[i] == pad) b.embed_rows.push_back(int32_t(i));
  b.embed_src = feats;
  std::vector<int32_t> rows(static_cast<size_t>(T));
  std::iota(rows.begin(), rows.end(), 0);
  auto ours = f.be->to_host_f32(f.m->forward(b, cm.caches(), rows));
  auto ref = f.tensors->f32(variant() + ".fp32.image.logits");
  ASSERT_EQ(int64_t(ours.size()), T * V);
  const double err = test::rel_l2(ours, ref), bd = bound(f);
  std::printf("  cuda %s image prompt logits [%lld, %lld]: rel L2 %.4g, bound %.4g (ratio %.3f)\n",
              GetParam().c_str(), (long long)T, (long long)V, err, bd, err / bd);
  EXPECT_LT(err, bd);
}

// ---- the engine on CUDA ----

int32_t argmax(const float* row, int64_t V) { return int32_t(std::max_element(row, row + V) - row); }

TEST(CudaVisionEngine, ImageRequestMatchesHandDrivenForward) {
  DS_REQUIRE_GPU();
  auto& f = fixture("tiny-moe/int4");
  model::Model& m = *f.m;
  const int32_t pad = int32_t(m.config().image_token_id);
  auto pv = fixture_pixels();
  auto mm = std::make_shared<runtime::MultiModalInput>();
  const auto prompt = vision::expand_image_placeholders(
      collapse_pads(f.golden["image"]["input_ids"].get<std::vector<int32_t>>(), pad), pad, {pv.grid}, 2);
  const auto mp = vision::mrope_positions(prompt, pad, {pv.grid}, 2);
  mm->pixel_values = pv.data;
  mm->grids = {{pv.grid.t, pv.grid.h, pv.grid.w}};
  for (size_t i = 0; i < prompt.size(); ++i)
    if (prompt[i] == pad) mm->rows.push_back(int32_t(i));
  mm->positions = mp.pos;
  mm->rope_delta = mp.rope_delta;
  constexpr int kTokens = 6;
  const int64_t P = int64_t(prompt.size()), V = m.config().text.vocab_size;
  // Hand-driven: the whole prompt in one forward, then one token at a time (eager).
  std::vector<int32_t> reference;
  {
    runtime::CacheManager cm(m, (P + kTokens) / 16 + 2, 16, 1);
    runtime::SeqCache seq;
    cm.start(seq);
    ASSERT_TRUE(cm.reserve(seq, P + kTokens));
    BatchMeta b = runtime::make_batch({{&seq, prompt}});
    b.positions = mm->positions;
    b.embed_rows = mm->rows;
    b.embed_src = m.encode_images(mm->pixel_values, mm->grids);
    auto l = f.be->to_host_f32(m.forward(b, cm.caches(), {int32_t(P - 1)}));
    seq.len = P;
    reference.push_back(argmax(l.data(), V));
    while (int(reference.size()) < kTokens) {
      BatchMeta d = runtime::make_batch({{&seq, {reference.back()}}});
      for (int r = 0; r < 3; ++r) d.positions[size_t(r)] = int32_t(seq.len + mm->rope_delta);
      auto ld = f.be->to_host_f32(m.forward(d, cm.caches(), {0}));
      seq.len += 1;
      reference.push_back(argmax(ld.data(), V));
    }
  }
  auto ref = f.tensors->f32("int4.fp32.image.logits");
  std::printf("  hand-driven cuda first token %d, fp32 reference argmax %d\n", reference[0],
              argmax(ref.data() + (P - 1) * V, V));
  auto config = [] {
    runtime::EngineConfig c;
    c.max_num_seqs = 8;
    c.max_num_batched_tokens = 2048;
    c.max_model_len = 512;
    c.block_size = 16;
    c.eos_token_ids = {1984, 1986};
    return c;
  };
  auto image_req = [&](uint64_t id) {
    auto r = std::make_shared<runtime::Request>();
    r->id = id;
    r->prompt = prompt;
    r->mm = mm;
    r->max_tokens = kTokens;
    r->ignore_eos = true;
    r->sampling.temperature = 0.f;
    return r;
  };
  auto collect = [](runtime::Request& r, runtime::FinishReason* fin, std::string* err) {
    std::vector<int32_t> toks;
    while (auto d = r.out->pop(std::chrono::milliseconds(0))) {
      toks.insert(toks.end(), d->tokens.begin(), d->tokens.end());
      *fin = d->finish;
      if (!d->error.empty()) *err = d->error;
    }
    return toks;
  };
  {
    runtime::Engine e(m, config());
    auto r = image_req(1);
    e.submit(r);
    while (e.step()) {
    }
    runtime::FinishReason fin = runtime::FinishReason::None;
    std::string err;
    EXPECT_EQ(collect(*r, &fin, &err), reference) << err;
    EXPECT_EQ(fin, runtime::FinishReason::Length) << err;
  }
  {
    runtime::EngineConfig c = config();
    c.max_num_batched_tokens = 16;  // the 77-token image run spans six chunks
    runtime::Engine e(m, c);
    auto r = image_req(2);
    auto t = std::make_shared<runtime::Request>();
    t->id = 3;
    t->prompt = f.golden["text"]["int4"][0]["prompt"].get<std::vector<int32_t>>();
    t->max_tokens = 8;
    t->ignore_eos = true;
    t->sampling.temperature = 0.f;
    e.submit(r);
    e.submit(t);
    while (e.step()) {
    }
    runtime::FinishReason fin = runtime::FinishReason::None, tfin = runtime::FinishReason::None;
    std::string err, terr;
    auto toks = collect(*r, &fin, &err);
    auto ttoks = collect(*t, &tfin, &terr);
    EXPECT_EQ(fin, runtime::FinishReason::Length) << err;
    EXPECT_EQ(toks.size(), size_t(kTokens));
    EXPECT_EQ(tfin, runtime::FinishReason::Length) << terr;
    int same = 0;
    for (size_t i = 0; i < std::min(toks.size(), reference.size()) && toks[i] == reference[i]; ++i) ++same;
    std::printf("  chunked prefill (16-token chunks) beside a text request: %d/%d leading tokens as hand-driven\n",
                same, kTokens);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaVisionGolden, test::tiny_checkpoints(), test::CheckpointName());

}  // namespace
}  // namespace ds
