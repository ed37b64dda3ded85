// Decode-speed measurement on the real Qwen3.6-35B-A3B shapes with random weights: one decode step composed
// of backend ops exactly as model/forward.cpp composes them (30 DeltaNet + 10 attention layers, 256 experts
// top-8 int4, BF16 shared experts / routers / in_proj_a,b / lm_head), no CUDA graph.
// Usage: bench_decode [batch=1] [context=1024] [steps=20]
// Prints ms per step, tok/s, and the weight bytes a step must read over the time (GB/s) vs 3.35 TB/s.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>

#include "backend/ops.h"

using namespace ds;

namespace {

uint64_t rng_state = 0x9E3779B97F4A7C15ull;
inline uint64_t next() {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return rng_state;
}

struct Src {  // host bytes of one linear
  LinearSource s;
  std::vector<uint16_t> bf16, sc;
  std::vector<int32_t> qw, qz;
};
std::unique_ptr<Src> make_src(int64_t N, int64_t K, bool int4) {
  auto p = std::make_unique<Src>();
  p->s.N = N;
  p->s.K = K;
  const float amp = 1.f / std::sqrt(float(K));
  if (!int4) {
    p->bf16.resize(size_t(N * K));
    for (auto& x : p->bf16) x = f32_to_bf16((float(next() % 2001) / 1000.f - 1.f) * amp);
    p->s.kind = LinearSource::Kind::Dense;
    p->s.dtype = DType::BF16;
    p->s.data = p->bf16.data();
  } else {
    p->qw.resize(size_t(K / 8 * N));
    for (auto& x : p->qw) x = int32_t(uint32_t(next()));
    p->qz.assign(size_t(K / 128 * N / 8), int32_t(0x77777777));
    p->sc.resize(size_t(K / 128 * N));
    for (auto& x : p->sc) x = f32_to_f16((float(next() % 2001) / 1000.f - 1.f) * 0.3f * amp);
    p->s.kind = LinearSource::Kind::Int4;
    p->s.qweight = p->qw.data();
    p->s.qzeros = p->qz.data();
    p->s.scales = p->sc.data();
  }
  return p;
}

double wbytes(int64_t N, int64_t K, bool int4) { return int4 ? N * K / 2.0 + N * K / 128.0 * 5 : N * K * 2.0; }

}  // namespace

int main(int argc, char** argv) {
  const int64_t B = argc > 1 ? std::atoi(argv[1]) : 1, ctx = argc > 2 ? std::atoi(argv[2]) : 1024;
  const int steps = argc > 3 ? std::atoi(argv[3]) : 20;
  const int64_t H = 2048, V = 248320, L = 40, Nh = 16, Nkv = 2, Dh = 256, Hk = 16, Hv = 32, Dk = 128, Dvh = 128;
  const int64_t C = 2 * Hk * Dk + Hv * Dvh, Vd = Hv * Dvh, E = 256, K = 8, I = 512, Is = 512, NC = 4;
  auto be = make_cuda_backend(0);
  const DType act = be->act_dtype();
  auto t0 = std::chrono::steady_clock::now();
  auto lin = [&](int64_t N, int64_t Kin, bool q) {
    auto s = make_src(N, Kin, q);
    return be->make_linear({s->s});
  };
  // NC distinct copies of each per-layer weight set (layer L uses copy L % NC) so the working set exceeds L2.
  struct Gdn {
    Linear qkv, z, ba, out;
  };
  struct Attn {
    Linear q, k, v, o;
  };
  struct Ffn {
    Linear router, sgu, sdown, sgate;
  };
  std::vector<Gdn> gdn(NC);
  std::vector<Attn> attn(NC);
  std::vector<Ffn> ffn(NC);
  for (int c = 0; c < NC; ++c) {
    gdn[c] = {lin(C, H, true), lin(Vd, H, true), lin(2 * Hv, H, false), lin(H, Vd, true)};
    attn[c] = {lin(Nh * 2 * Dh, H, true), lin(Nkv * Dh, H, true), lin(Nkv * Dh, H, true), lin(H, Nh * Dh, true)};
    ffn[c] = {lin(E, H, false), lin(2 * Is, H, false), lin(H, Is, false), lin(1, H, false)};
  }
  // Experts: two distinct sets (a step touches 8 of 256 per layer, so reuse across layers rarely hits L2).
  std::vector<Experts> experts;
  for (int c = 0; c < 2; ++c) {
    std::vector<std::unique_ptr<Src>> keep;
    std::vector<std::vector<LinearSource>> gu(E);
    std::vector<LinearSource> dn(E);
    for (int64_t e = 0; e < E; ++e) {
      keep.push_back(make_src(2 * I, H, true));
      gu[e] = {keep.back()->s};
      keep.push_back(make_src(H, I, true));
      dn[e] = keep.back()->s;
    }
    experts.push_back(be->make_experts(gu, dn));
  }
  Linear lm_head = lin(V, H, false);
  std::vector<float> small(static_cast<size_t>(std::max<int64_t>(C * 4, 4 * H)));
  for (auto& x : small) x = float(next() % 2001) / 1000.f - 1.f;
  auto vecf = [&](int64_t n, float add) {
    std::vector<float> v(small.begin(), small.begin() + n);
    for (auto& x : v) x = 0.1f * x + add;
    return be->upload_f32(v, {n}, DType::F32);
  };
  Tensor norm_h = vecf(H, 1.f), qn = vecf(Dh, 1.f), gnorm = vecf(Dvh, 1.f), A_log = vecf(Hv, 0.f),
         dt_bias = vecf(Hv, 0.f);
  Tensor conv_w = be->upload_f32(std::vector<float>(small.begin(), small.begin() + C * 4), {C, 4}, DType::F32);
  std::vector<float> emb(static_cast<size_t>(1024 * H));
  for (auto& x : emb) x = float(next() % 2001) / 1000.f - 1.f;
  Tensor embed = be->upload_f32(emb, {1024, H}, act);
  // caches: B sequences of `ctx` tokens
  const int64_t bs = 16, nb = B * ((ctx + 1 + bs - 1) / bs);
  std::vector<KvLayer> kv(L);
  std::vector<StateLayer> st(L);
  for (int64_t l = 0; l < L; ++l) {
    if (l % 4 == 3) {
      kv[l].block_size = bs;
      kv[l].k = be->alloc(act, {nb, bs, Nkv, Dh});
      kv[l].v = be->alloc(act, {nb, bs, Nkv, Dh});
    } else {
      st[l].conv = be->alloc(DType::F32, {B, C, 3});
      st[l].ssm = be->alloc(DType::F32, {B, Hv, Dk, Dvh});
    }
  }
  be->synchronize();
  auto t1 = std::chrono::steady_clock::now();
  std::printf("weights built in %.1f s\n", std::chrono::duration<double>(t1 - t0).count());

  const int64_t nblk = (ctx + 1 + bs - 1) / bs;
  BatchMeta b = BatchMeta::decode_step(B, ctx, nblk, nblk);
  for (int64_t s = 0; s < B; ++s) b.tokens.push_back(int32_t(next() % 1024));
  RopeParams rope;
  rope.rotary_dim = 64;
  rope.mrope_section = {11, 11, 10};
  std::vector<int32_t> rows(static_cast<size_t>(B));
  for (int64_t i = 0; i < B; ++i) rows[i] = int32_t(i);

  auto step = [&](int it) {
    be->prepare_batch(b);
    Tensor x = be->alloc(act, {B, H});
    be->embed(embed, b, x);
    for (int64_t l = 0; l < L; ++l) {
      const int c = int(l % NC);
      Tensor h = be->alloc(act, {B, H});
      be->rmsnorm(x, norm_h, 1e-6f, h);
      Tensor y = be->alloc(act, {B, H});
      if (l % 4 == 3) {
        auto& a = attn[c];
        Tensor qg = be->alloc(act, {B, Nh * 2 * Dh}), k = be->alloc(act, {B, Nkv * Dh}), v = be->alloc(act, {B, Nkv * Dh});
        be->linear(h, a.q, qg);
        be->linear(h, a.k, k);
        be->linear(h, a.v, v);
        Tensor q = be->alloc(act, {B, Nh * Dh}), gate = be->alloc(act, {B, Nh * Dh});
        be->qk_norm_rope(qg, k, qn, qn, 1e-6f, rope, b, q, gate);
        be->kv_cache_write(kv[l], k, v, b);
        Tensor o = be->alloc(act, {B, Nh * Dh});
        be->attention(q, kv[l], b, o);
        be->sigmoid_gate_mul(o, gate);
        be->linear(o, a.o, y);
      } else {
        auto& g = gdn[c];
        Tensor mixed = be->alloc(act, {B, C}), z = be->alloc(act, {B, Vd}), ba = be->alloc(act, {B, 2 * Hv});
        be->linear(h, g.qkv, mixed);
        be->linear(h, g.z, z);
        be->linear(h, g.ba, ba);
        Tensor qkv = be->alloc(act, {B, C});
        be->conv1d_causal(mixed, conv_w, st[l], b, qkv);
        Tensor o = be->alloc(act, {B, Vd});
        be->gated_delta_rule(qkv, ba, A_log, dt_bias, Hk, Hv, Dk, Dvh, st[l], b, o);
        Tensor nrm = be->alloc(act, {B, Vd});
        be->gated_rmsnorm(o, z, gnorm, 1e-6f, nrm);
        be->linear(nrm, g.out, y);
      }
      be->add_inplace(x, y);
      be->rmsnorm(x, norm_h, 1e-6f, h);
      auto& f = ffn[c];
      Tensor rl = be->alloc(act, {B, E});
      be->linear(h, f.router, rl);
      Tensor ids = be->alloc(DType::I32, {B, K}), w = be->alloc(DType::F32, {B, K});
      be->moe_route(rl, K, ids, w);
      Tensor m = be->alloc(act, {B, H});
      be->moe_experts(h, experts[l % 2], ids, w, m);
      Tensor gu = be->alloc(act, {B, 2 * Is}), sa = be->alloc(act, {B, Is}), s = be->alloc(act, {B, H});
      be->linear(h, f.sgu, gu);
      be->silu_mul(gu, sa);
      be->linear(sa, f.sdown, s);
      Tensor gl = be->alloc(act, {B, 1});
      be->linear(h, f.sgate, gl);
      be->sigmoid_scale_add(m, s, gl);
      be->add_inplace(x, m);
    }
    Tensor last = be->alloc(act, {B, H});
    be->gather_rows(x, rows, last);
    Tensor hf = be->alloc(act, {B, H});
    be->rmsnorm(last, norm_h, 1e-6f, hf);
    Tensor logits = be->alloc(DType::F32, {B, V});
    be->linear(hf, lm_head, logits);
    (void)it;
  };
  for (int i = 0; i < 3; ++i) step(i);
  be->synchronize();
  std::vector<double> ms;
  for (int i = 0; i < steps; ++i) {
    auto a = std::chrono::steady_clock::now();
    step(i);
    be->synchronize();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - a).count());
  }
  std::sort(ms.begin(), ms.end());
  const double med = ms[ms.size() / 2];
  // Bytes a step must read: all dense/int4 weights once, B·8 experts per layer (at most 256), lm_head,
  // DeltaNet state read+write, KV cache.
  double bytes = 0;
  bytes += 30 * (wbytes(C, H, true) + wbytes(Vd, H, true) + wbytes(2 * Hv, H, false) + wbytes(H, Vd, true));
  bytes += 10 * (wbytes(Nh * 2 * Dh, H, true) + 2 * wbytes(Nkv * Dh, H, true) + wbytes(H, Nh * Dh, true));
  bytes += 40 * (wbytes(E, H, false) + wbytes(2 * Is, H, false) + wbytes(H, Is, false) + wbytes(1, H, false));
  const double touched = E * (1.0 - std::pow(1.0 - double(K) / E, double(B)));
  bytes += 40 * touched * (wbytes(2 * I, H, true) + wbytes(H, I, true));
  bytes += wbytes(V, H, false);
  bytes += 30.0 * B * Hv * Dk * Dvh * 4 * 2;
  bytes += 10.0 * B * ctx * Nkv * Dh * 2 * 2;
  std::printf("batch %lld, context %lld: median %.3f ms/step (min %.3f, max %.3f), %.1f tok/s; "
              "%.2f GB/step -> %.0f GB/s = %.1f%% of 3.35 TB/s\n",
              (long long)B, (long long)ctx, med, ms.front(), ms.back(), B * 1000.0 / med, bytes / 1e9,
              bytes / 1e9 / (med / 1e3), 100.0 * bytes / (med / 1e3) / 3.35e12);
  // Single-op timings (weights L2-cold: cycle over the NC copies).
  auto time_op = [&](const char* what, double bytes_per, auto&& fn) {
    for (int i = 0; i < 3; ++i) fn(i);
    be->synchronize();
    const int reps = 40;
    auto a = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) fn(i);
    be->synchronize();
    double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - a).count() / reps;
    std::printf("  %-44s %8.1f us  %6.0f GB/s\n", what, us, bytes_per / us / 1e3);
  };
  Tensor xin = be->alloc(act, {B, Vd}), yout = be->alloc(act, {B, C}), yh = be->alloc(act, {B, H});
  Tensor lo = be->alloc(DType::F32, {B, V});
  time_op("int4 linear 8192x2048 (DeltaNet qkv)", wbytes(C, H, true),
          [&](int i) { be->linear(xin.view({B * 2, H}).rows(0, B), gdn[i % NC].qkv, yout); });
  time_op("int4 linear 2048x4096 (DeltaNet out)", wbytes(H, Vd, true), [&](int i) { be->linear(xin, gdn[i % NC].out, yh); });
  time_op("bf16 lm_head 248320x2048 (cuBLAS)", wbytes(V, H, false),
          [&](int) { be->linear(xin.view({B * 2, H}).rows(0, B), lm_head, lo); });
  return 0;
}
