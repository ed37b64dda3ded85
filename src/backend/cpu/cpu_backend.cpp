#include "backend/cpu/cpu_backend.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

namespace ds::cpu {

void dequantize_to_f32(const LinearSource& src, std::vector<float>& out) {
  const int64_t N = src.N, K = src.K;
  size_t base = out.size();
  out.resize(base + size_t(N * K));
  float* W = out.data() + base;
  if (src.kind == LinearSource::Kind::Dense) {
    const int64_t n = N * K;
    if (src.dtype == DType::F32) std::memcpy(W, src.data, size_t(n) * 4);
    else if (src.dtype == DType::BF16)
      for (int64_t i = 0; i < n; ++i) W[i] = bf16_to_f32(static_cast<const uint16_t*>(src.data)[i]);
    else if (src.dtype == DType::F16)
      for (int64_t i = 0; i < n; ++i) W[i] = f16_to_f32(static_cast<const uint16_t*>(src.data)[i]);
    else
      fail("linear weight: expected F32, BF16 or F16, got ", dtype_name(src.dtype));
    return;
  }
  const int G = src.group_size;
#pragma omp parallel for
  for (int64_t r = 0; r < K / 8; ++r) {
    for (int64_t n = 0; n < N; ++n) {
      uint32_t word = uint32_t(src.qweight[r * N + n]);
      for (int j = 0; j < 8; ++j) {
        int64_t k = 8 * r + j;
        int64_t g = k / G;
        int u = int((word >> (4 * j)) & 0xF);
        int z = int((uint32_t(src.qzeros[g * (N / 8) + n / 8]) >> (4 * (n % 8))) & 0xF) + 1;
        W[n * K + k] = f16_to_f32(src.scales[g * N + n]) * float(u - z);
      }
    }
  }
}

void matmul_nt(const float* x, const float* w, float* y, int64_t T, int64_t N, int64_t K) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t t = 0; t < T; ++t)
    for (int64_t n = 0; n < N; ++n) {
      const float* xr = x + t * K;
      const float* wr = w + n * K;
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += xr[k] * wr[k];
      y[t * N + n] = s;
    }
}

namespace {

inline float silu(float x) { return x / (1.f + std::exp(-x)); }
inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }
// PyTorch softplus (beta 1, threshold 20): linear above the threshold.
inline float softplus(float x) { return x > 20.f ? x : std::log1p(std::exp(x)); }

class CpuBackend final : public Backend {
 public:
  std::string name() const override { return "cpu"; }
  DType act_dtype() const override { return DType::F32; }

  Tensor alloc(DType dt, std::vector<int64_t> shape) override {
    Tensor t;
    t.dtype = dt;
    t.shape = std::move(shape);
    size_t n = std::max<size_t>(t.nbytes(), 1);
    auto buf = std::shared_ptr<uint8_t[]>(new uint8_t[n]());
    t.data = buf.get();
    t.owner = buf;
    return t;
  }
  Tensor upload_f32(const std::vector<float>& v, std::vector<int64_t> shape, DType dt) override {
    Tensor t = alloc(dt, std::move(shape));
    DS_CHECK(int64_t(v.size()) == t.numel());
    if (dt == DType::F32) std::memcpy(t.data, v.data(), v.size() * 4);
    else if (dt == DType::BF16)
      for (size_t i = 0; i < v.size(); ++i) t.ptr<uint16_t>()[i] = f32_to_bf16(v[i]);
    else if (dt == DType::I32)
      for (size_t i = 0; i < v.size(); ++i) t.ptr<int32_t>()[i] = int32_t(v[i]);
    else fail("cpu upload: unsupported dtype ", dtype_name(dt));
    return t;
  }
  std::vector<float> to_host_f32(const Tensor& t) override {
    std::vector<float> v(size_t(t.numel()));
    if (t.dtype == DType::F32) std::memcpy(v.data(), t.data, v.size() * 4);
    else if (t.dtype == DType::BF16)
      for (size_t i = 0; i < v.size(); ++i) v[i] = bf16_to_f32(t.ptr<uint16_t>()[i]);
    else if (t.dtype == DType::I32)
      for (size_t i = 0; i < v.size(); ++i) v[i] = float(t.ptr<int32_t>()[i]);
    else fail("cpu to_host: unsupported dtype ", dtype_name(t.dtype));
    return v;
  }
  void zero(Tensor& t) override { std::memset(t.data, 0, t.nbytes()); }
  void copy(Tensor& dst, const Tensor& src) override {
    DS_CHECK(dst.nbytes() == src.nbytes() && dst.dtype == src.dtype);
    std::memmove(dst.data, src.data, src.nbytes());
  }

  Linear make_linear(const std::vector<LinearSource>& parts) override {
    auto l = std::make_shared<CpuLinear>();
    l->K = parts.at(0).K;
    for (auto& p : parts) {
      DS_CHECK(p.K == l->K, "concatenated linears must share K");
      dequantize_to_f32(p, l->w);
      l->N += p.N;
      l->int4 = l->int4 || p.kind == LinearSource::Kind::Int4;
    }
    return l;
  }
  Experts make_experts(const std::vector<std::vector<LinearSource>>& gate_up,
                       const std::vector<LinearSource>& down) override {
    auto e = std::make_shared<CpuExperts>();
    e->E = int64_t(down.size());
    e->H = down.at(0).N;
    e->I = down.at(0).K;
    e->gate_up.resize(e->E);
    e->down.resize(e->E);
    for (int64_t i = 0; i < e->E; ++i) {
      for (auto& p : gate_up[i]) dequantize_to_f32(p, e->gate_up[i]);
      dequantize_to_f32(down[i], e->down[i]);
    }
    return e;
  }

  void embed(const Tensor& table, const BatchMeta& b, Tensor& out) override {
    const int64_t H = table.dim(1), V = table.dim(0);
    for (int64_t t = 0; t < b.num_tokens(); ++t) {
      int32_t id = b.tokens[t];
      if (id < 0 || id >= V) fail("token id ", id, " is outside the vocabulary [0, ", V, ")");
      std::memcpy(out.ptr<float>() + t * H, table.ptr<float>() + int64_t(id) * H, size_t(H) * 4);
    }
  }

  void rmsnorm(const Tensor& x, const Tensor& w, float eps, Tensor& y) override {
    const int64_t D = w.numel(), R = x.numel() / D;
    const float* xp = x.ptr<float>();
    const float* wp = w.ptr<float>();
    float* yp = y.ptr<float>();
#pragma omp parallel for
    for (int64_t r = 0; r < R; ++r) {
      double ss = 0;
      for (int64_t d = 0; d < D; ++d) ss += double(xp[r * D + d]) * xp[r * D + d];
      float inv = float(1.0 / std::sqrt(ss / D + eps));
      for (int64_t d = 0; d < D; ++d) yp[r * D + d] = xp[r * D + d] * inv * wp[d];
    }
  }

  void add_inplace(Tensor& x, const Tensor& y) override {
    float* a = x.ptr<float>();
    const float* b = y.ptr<float>();
    for (int64_t i = 0; i < x.numel(); ++i) a[i] += b[i];
  }

  void linear(const Tensor& x, const Linear& w, Tensor& y) override {
    auto* l = static_cast<const CpuLinear*>(w.get());
    const int64_t T = x.numel() / l->K;
    DS_CHECK(y.numel() == T * l->N, "linear out ", shape_str(y.shape), " for N=", l->N);
    matmul_nt(x.ptr<float>(), l->w.data(), y.ptr<float>(), T, l->N, l->K);
  }

  void silu_mul(const Tensor& gu, Tensor& y) override {
    const int64_t T = gu.dim(0), I = gu.dim(1) / 2;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < I; ++i)
        y.ptr<float>()[t * I + i] = silu(gu.ptr<float>()[t * 2 * I + i]) * gu.ptr<float>()[t * 2 * I + I + i];
  }

  void qk_norm_rope(const Tensor& qg, Tensor& k, const Tensor& qnorm, const Tensor& knorm, float eps,
                    const RopeParams& rope, const BatchMeta& b, Tensor& q, Tensor& gate) override {
    const int64_t T = b.num_tokens(), Dh = qnorm.numel();
    const int64_t Nh = qg.dim(1) / (2 * Dh), Nkv = k.dim(1) / Dh;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < Nh; ++h) {
        std::memcpy(q.ptr<float>() + (t * Nh + h) * Dh, qg.ptr<float>() + (t * Nh + h) * 2 * Dh, size_t(Dh) * 4);
        std::memcpy(gate.ptr<float>() + (t * Nh + h) * Dh, qg.ptr<float>() + (t * Nh + h) * 2 * Dh + Dh,
                    size_t(Dh) * 4);
      }
    Tensor qv = q.view({T * Nh, Dh}), kv = k.view({T * Nkv, Dh});
    rmsnorm(qv, qnorm, eps, qv);
    rmsnorm(kv, knorm, eps, kv);
    apply_rope(q.ptr<float>(), T, Nh, Dh, rope, b);
    apply_rope(k.ptr<float>(), T, Nkv, Dh, rope, b);
  }

  // NeoX rotation of the first rotary_dim dims; frequency i takes its position from the T/H/W row chosen
  // by the interleaved mRoPE pattern (H for i%3==1 below 3·section[1], W for i%3==2 below 3·section[2]).
  static void apply_rope(float* x, int64_t T, int64_t N, int64_t Dh, const RopeParams& rope, const BatchMeta& b) {
    const int half = rope.rotary_dim / 2;
    std::vector<float> inv(half);
    std::vector<int> axis(half, 0);
    for (int i = 0; i < half; ++i) {
      inv[i] = float(1.0 / std::pow(rope.theta, double(2 * i) / rope.rotary_dim));
      if (rope.mrope_interleaved) {
        if (i % 3 == 1 && i < 3 * rope.mrope_section[1]) axis[i] = 1;
        else if (i % 3 == 2 && i < 3 * rope.mrope_section[2]) axis[i] = 2;
      } else {
        axis[i] = i < rope.mrope_section[0] ? 0 : i < rope.mrope_section[0] + rope.mrope_section[1] ? 1 : 2;
      }
    }
    for (int64_t t = 0; t < T; ++t) {
      for (int i = 0; i < half; ++i) {
        float ang = float(b.positions[axis[i] * T + t]) * inv[i];
        float c = std::cos(ang), s = std::sin(ang);
        for (int64_t h = 0; h < N; ++h) {
          float* v = x + (t * N + h) * Dh;
          float a = v[i], bb = v[i + half];
          v[i] = a * c - bb * s;
          v[i + half] = bb * c + a * s;
        }
      }
    }
  }

  static float* kv_slot(const Tensor& pool, int64_t bs, const BatchMeta::Seq& s, int64_t pos, int64_t row) {
    int64_t blk = s.blocks.at(size_t(pos / bs));
    return pool.ptr<float>() + (blk * bs + pos % bs) * row;
  }

  void kv_cache_write(KvLayer& kv, const Tensor& k, const Tensor& v, const BatchMeta& b) override {
    const int64_t row = k.dim(1);
    for (auto& s : b.seqs)
      for (int64_t i = 0; i < s.q_len; ++i) {
        int64_t pos = s.ctx_len + i;
        std::memcpy(kv_slot(kv.k, kv.block_size, s, pos, row), k.ptr<float>() + (s.q_start + i) * row, size_t(row) * 4);
        std::memcpy(kv_slot(kv.v, kv.block_size, s, pos, row), v.ptr<float>() + (s.q_start + i) * row, size_t(row) * 4);
      }
  }

  void attention(const Tensor& q, const KvLayer& kv, const BatchMeta& b, Tensor& o) override {
    const int64_t Nkv = kv.k.dim(2), Dh = kv.k.dim(3), row = Nkv * Dh;
    const int64_t Nh = q.dim(1) / Dh, group = Nh / Nkv;
    const float scale = 1.f / std::sqrt(float(Dh));
    for (auto& s : b.seqs) {
#pragma omp parallel for collapse(2)
      for (int64_t i = 0; i < s.q_len; ++i)
        for (int64_t h = 0; h < Nh; ++h) {
          const int64_t t = s.q_start + i, n_ctx = s.ctx_len + i + 1, g = h / group;
          const float* qv = q.ptr<float>() + (t * Nh + h) * Dh;
          std::vector<float> sc(static_cast<size_t>(n_ctx));
          float mx = -INFINITY;
          for (int64_t p = 0; p < n_ctx; ++p) {
            const float* kp = kv_slot(kv.k, kv.block_size, s, p, row) + g * Dh;
            float d = 0.f;
            for (int64_t e = 0; e < Dh; ++e) d += qv[e] * kp[e];
            sc[p] = d * scale;
            mx = std::max(mx, sc[p]);
          }
          float sum = 0.f;
          for (auto& x : sc) sum += x = std::exp(x - mx);
          float* ov = o.ptr<float>() + (t * Nh + h) * Dh;
          for (int64_t e = 0; e < Dh; ++e) ov[e] = 0.f;
          for (int64_t p = 0; p < n_ctx; ++p) {
            const float* vp = kv_slot(kv.v, kv.block_size, s, p, row) + g * Dh;
            float w = sc[p] / sum;
            for (int64_t e = 0; e < Dh; ++e) ov[e] += w * vp[e];
          }
        }
    }
  }

  void sigmoid_gate_mul(Tensor& x, const Tensor& gate) override {
    for (int64_t i = 0; i < x.numel(); ++i) x.ptr<float>()[i] *= sigmoid(gate.ptr<float>()[i]);
  }

  void conv1d_causal(const Tensor& mixed, const Tensor& weight, StateLayer& st, const BatchMeta& b,
                     Tensor& out) override {
    const int64_t C = weight.dim(0), Kc = weight.dim(1), W = Kc - 1;
    const float* w = weight.ptr<float>();
    for (auto& s : b.seqs) {
      float* state = st.conv.ptr<float>() + int64_t(s.state_slot) * C * W;
#pragma omp parallel for
      for (int64_t ch = 0; ch < C; ++ch) {
        // window = [state (oldest first) | new inputs]
        std::vector<float> win(size_t(W + s.q_len));
        for (int64_t i = 0; i < W; ++i) win[i] = state[ch * W + i];
        for (int64_t i = 0; i < s.q_len; ++i) win[W + i] = mixed.ptr<float>()[(s.q_start + i) * C + ch];
        for (int64_t i = 0; i < s.q_len; ++i) {
          float acc = 0.f;
          for (int64_t j = 0; j < Kc; ++j) acc += w[ch * Kc + j] * win[i + j];
          out.ptr<float>()[(s.q_start + i) * C + ch] = silu(acc);
        }
        for (int64_t i = 0; i < W; ++i) state[ch * W + i] = win[s.q_len + i];
      }
    }
  }

  void gated_delta_rule(const Tensor& qkv, const Tensor& ba, const Tensor& A_log, const Tensor& dt_bias, int64_t Hk,
                        int64_t Hv, int64_t Dk, int64_t Dv, StateLayer& st, const BatchMeta& b, Tensor& o) override {
    const int64_t C = qkv.dim(1), ratio = Hv / Hk;
    const float qscale = 1.f / std::sqrt(float(Dk));
    // A bf16 state (Model::ssm_state_dtype) is widened to fp32 for the call and rounded to bf16 after every token of
    // a chunk shorter than kStateTokenRoundMax, once at the end of a longer one (ops.h StateLayer).
    const bool bf16_state = ssm_is_bf16(st.ssm, "gated_delta_rule");
    for (auto& s : b.seqs) {
      const int64_t L = s.q_len;
#pragma omp parallel for
      for (int64_t j = 0; j < Hv; ++j) {
        const int64_t kh = j / ratio;
        std::vector<float> q(L * Dk), k(L * Dk), v(L * Dv), g(L), beta(L), out(L * Dv);
        for (int64_t i = 0; i < L; ++i) {
          const float* row = qkv.ptr<float>() + (s.q_start + i) * C;
          auto l2 = [&](const float* src, float* dst, float mul) {
            float ss = 0.f;
            for (int64_t d = 0; d < Dk; ++d) ss += src[d] * src[d];
            float inv = 1.f / std::sqrt(ss + 1e-6f);
            for (int64_t d = 0; d < Dk; ++d) dst[d] = src[d] * inv * mul;
          };
          l2(row + kh * Dk, q.data() + i * Dk, qscale);
          l2(row + Hk * Dk + kh * Dk, k.data() + i * Dk, 1.f);
          std::memcpy(v.data() + i * Dv, row + 2 * Hk * Dk + j * Dv, size_t(Dv) * 4);
          const float* bar = ba.ptr<float>() + (s.q_start + i) * 2 * Hv;
          beta[i] = sigmoid(bar[j]);
          g[i] = -std::exp(A_log.ptr<float>()[j]) * softplus(bar[Hv + j] + dt_bias.ptr<float>()[j]);
        }
        const int64_t off = (int64_t(s.state_slot) * Hv + j) * Dk * Dv;
        std::vector<float> wide;
        float* S = nullptr;
        if (!bf16_state) {
          S = st.ssm.ptr<float>() + off;
        } else {
          const uint16_t* h = st.ssm.ptr<uint16_t>() + off;
          wide.resize(size_t(Dk * Dv));
          for (int64_t e = 0; e < Dk * Dv; ++e) wide[size_t(e)] = bf16_to_f32(h[e]);
          S = wide.data();
        }
        if (bf16_state && L > 1 && L < kStateTokenRoundMax) {
          for (int64_t i = 0; i < L; ++i) {
            gdr_recurrent(q.data() + i * Dk, k.data() + i * Dk, v.data() + i * Dv, g.data() + i, beta.data() + i, 1,
                          Dk, Dv, S, out.data() + i * Dv);
            if (i + 1 < L)
              for (int64_t e = 0; e < Dk * Dv; ++e) S[e] = bf16_to_f32(f32_to_bf16(S[e]));
          }
        } else if (L == 1) {
          gdr_recurrent(q.data(), k.data(), v.data(), g.data(), beta.data(), L, Dk, Dv, S, out.data());
        } else {
          gdr_chunked(q.data(), k.data(), v.data(), g.data(), beta.data(), L, Dk, Dv, 64, S, out.data());
        }
        if (bf16_state) {
          uint16_t* h = st.ssm.ptr<uint16_t>() + off;
          for (int64_t e = 0; e < Dk * Dv; ++e) h[e] = f32_to_bf16(wide[size_t(e)]);
        }
        for (int64_t i = 0; i < L; ++i)
          std::memcpy(o.ptr<float>() + ((s.q_start + i) * Hv + j) * Dv, out.data() + i * Dv, size_t(Dv) * 4);
      }
    }
  }

  void gated_rmsnorm(const Tensor& o, const Tensor& z, const Tensor& w, float eps, Tensor& y) override {
    const int64_t D = w.numel(), R = o.numel() / D;
#pragma omp parallel for
    for (int64_t r = 0; r < R; ++r) {
      const float* x = o.ptr<float>() + r * D;
      const float* zz = z.ptr<float>() + r * D;
      float ss = 0.f;
      for (int64_t d = 0; d < D; ++d) ss += x[d] * x[d];
      float inv = 1.f / std::sqrt(ss / D + eps);
      for (int64_t d = 0; d < D; ++d) y.ptr<float>()[r * D + d] = x[d] * inv * w.ptr<float>()[d] * silu(zz[d]);
    }
  }

  void moe_route(const Tensor& logits, int64_t top_k, Tensor& ids, Tensor& weights) override {
    const int64_t T = logits.dim(0), E = logits.dim(1);
    for (int64_t t = 0; t < T; ++t) {
      const float* l = logits.ptr<float>() + t * E;
      float mx = *std::max_element(l, l + E);
      std::vector<float> p(E);
      float sum = 0.f;
      for (int64_t e = 0; e < E; ++e) sum += p[e] = std::exp(l[e] - mx);
      for (auto& x : p) x /= sum;
      std::vector<int32_t> order(E);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return p[a] > p[b]; });
      float tsum = 0.f;
      for (int64_t k = 0; k < top_k; ++k) tsum += p[order[k]];
      for (int64_t k = 0; k < top_k; ++k) {
        ids.ptr<int32_t>()[t * top_k + k] = order[k];
        weights.ptr<float>()[t * top_k + k] = p[order[k]] / tsum;
      }
    }
  }

  void moe_experts(const Tensor& x, const Experts& w, const Tensor& ids, const Tensor& weights, Tensor& y) override {
    auto* ex = static_cast<const CpuExperts*>(w.get());
    const int64_t T = x.dim(0), H = ex->H, I = ex->I, Kk = ids.dim(1);
#pragma omp parallel for
    for (int64_t t = 0; t < T; ++t) {
      std::vector<float> gu(2 * I), act(I), out(H);
      float* yt = y.ptr<float>() + t * H;
      for (int64_t d = 0; d < H; ++d) yt[d] = 0.f;
      for (int64_t k = 0; k < Kk; ++k) {
        int32_t e = ids.ptr<int32_t>()[t * Kk + k];
        float wt = weights.ptr<float>()[t * Kk + k];
        matmul_nt(x.ptr<float>() + t * H, ex->gate_up[e].data(), gu.data(), 1, 2 * I, H);
        for (int64_t i = 0; i < I; ++i) act[i] = silu(gu[i]) * gu[I + i];
        matmul_nt(act.data(), ex->down[e].data(), out.data(), 1, H, I);
        for (int64_t d = 0; d < H; ++d) yt[d] += wt * out[d];
      }
    }
  }

  void sigmoid_scale_add(Tensor& y, const Tensor& s, const Tensor& gate_logit) override {
    const int64_t T = y.dim(0), H = y.dim(1);
    for (int64_t t = 0; t < T; ++t) {
      float g = sigmoid(gate_logit.ptr<float>()[t]);
      for (int64_t d = 0; d < H; ++d) y.ptr<float>()[t * H + d] += g * s.ptr<float>()[t * H + d];
    }
  }

  void sample_rows(const Tensor& logits, int64_t vocab_limit, const std::vector<SampleRowParams>& rows,
                   const std::vector<SampleEdit>& edits, const std::vector<uint32_t>& masks,
                   std::vector<int32_t>& ids) override {
    DS_CHECK(logits.ndim() == 2 && logits.dim(0) >= int64_t(rows.size()), "sample_rows: logits [R, V] for ",
             rows.size(), " rows");
    if (logits.dtype == DType::F32)
      return cpu::sample_rows(logits.ptr<float>(), logits.dim(1), vocab_limit, rows, edits, masks, ids);
    const std::vector<float> host = to_host_f32(logits);  // BF16 logits
    cpu::sample_rows(host.data(), logits.dim(1), vocab_limit, rows, edits, masks, ids);
  }
  bool has_row_logprobs() const override { return true; }
  void row_logprobs(const Tensor& logits, int64_t vocab_limit, const std::vector<int32_t>& rows,
                    const std::vector<int32_t>& chosen, int32_t k, std::vector<float>& out) override {
    DS_CHECK(k >= 0 && k <= kMaxRowTopLogprobs, "row_logprobs: k in 0..", kMaxRowTopLogprobs, ", got ", k);
    const int64_t V = logits.ndim() == 2 ? logits.dim(1) : 0, n = vocab_limit > 0 ? std::min(vocab_limit, V) : V;
    const int32_t kk = int32_t(std::min<int64_t>(k, n));
    std::vector<float> host;
    const float* all = host_row_tokens("row_logprobs", logits, rows, chosen, n, host);
    out.assign(rows.size() * size_t(1 + 2 * k), 0.f);
    for (size_t i = 0; i < rows.size(); ++i)
      cpu::row_logprobs(all + int64_t(rows[i]) * V, n, chosen[i], kk, out.data() + i * size_t(1 + 2 * k));
  }
  void row_ranks(const Tensor& logits, int64_t vocab_limit, const std::vector<int32_t>& rows,
                 const std::vector<int32_t>& chosen, std::vector<int32_t>& out) override {
    const int64_t V = logits.ndim() == 2 ? logits.dim(1) : 0, n = vocab_limit > 0 ? std::min(vocab_limit, V) : V;
    std::vector<float> host;
    const float* all = host_row_tokens("row_ranks", logits, rows, chosen, V, host);
    out.assign(rows.size(), 0);
    for (size_t i = 0; i < rows.size(); ++i) out[i] = cpu::row_rank(all + int64_t(rows[i]) * V, n, chosen[i]);
  }
  // row_logprobs / row_ranks (the CUDA backend's upload_row_tokens' twin): checks logits [·, V], each row inside it
  // and each chosen token below `tokens`; returns the logits as fp32 (`host` holds the converted copy of BF16 ones).
  const float* host_row_tokens(const char* what, const Tensor& logits, const std::vector<int32_t>& rows,
                               const std::vector<int32_t>& chosen, int64_t tokens, std::vector<float>& host) {
    DS_CHECK(logits.ndim() == 2 && rows.size() == chosen.size(), what, ": logits [R, V], one chosen token per row");
    for (size_t i = 0; i < rows.size(); ++i)
      DS_CHECK(rows[i] >= 0 && rows[i] < logits.dim(0) && chosen[i] >= 0 && chosen[i] < tokens, what, ": row ", rows[i],
               " of ", logits.dim(0), ", token ", chosen[i], " of ", tokens);
    if (logits.dtype == DType::F32) return logits.ptr<float>();
    host = to_host_f32(logits);
    return host.data();
  }
  void gather_rows(const Tensor& x, const std::vector<int32_t>& rows, Tensor& out) override {
    const int64_t H = x.numel() / x.dim(0);
    for (size_t i = 0; i < rows.size(); ++i)
      std::memcpy(out.ptr<float>() + int64_t(i) * H, x.ptr<float>() + int64_t(rows[i]) * H, size_t(H) * 4);
  }

  void argmax_rows(const Tensor& logits, int64_t limit, Tensor& ids, const Tensor* map = nullptr) override {
    const int64_t R = logits.dim(0), N = logits.numel() / std::max<int64_t>(R, 1);
    DS_CHECK(logits.dtype == DType::F32 && ids.dtype == DType::I32 && ids.numel() == R && limit >= 1 && limit <= N,
             "argmax_rows: logits F32 [R, N], ids I32 [R], limit in 1..N");
    DS_CHECK(!map || (map->dtype == DType::I32 && map->numel() == N), "argmax_rows: map must be I32 [", N, "]");
    for (int64_t r = 0; r < R; ++r) {
      const float* x = logits.ptr<float>() + r * N;
      int64_t a = -1;
      for (int64_t j = 0; j < limit; ++j)
        if (!std::isnan(x[j]) && (a < 0 || x[j] > x[a])) a = j;
      ids.ptr<int32_t>()[r] = map ? map->ptr<int32_t>()[a < 0 ? 0 : a] : int32_t(a < 0 ? 0 : a);
    }
  }

  // ---- vision tower: backend/cpu/vision_ops.cpp ----
  void layernorm(const Tensor& x, const Tensor& w, const Tensor& b, float eps, Tensor& y) override {
    cpu::layernorm(x, w, b, eps, y);
  }
  void add_bias(Tensor& x, const Tensor& bias) override { cpu::add_bias(x, bias); }
  void gelu(const Tensor& x, bool tanh_approx, Tensor& y) override { cpu::gelu(x, tanh_approx, y); }
  void embed_bilinear_add(Tensor& x, const Tensor& table, const std::vector<int32_t>& idx,
                          const std::vector<float>& w) override {
    cpu::embed_bilinear_add(x, table, idx, w);
  }
  void vision_rope(Tensor& qkv, int64_t Nh, int64_t Dh, const std::vector<int32_t>& pos, double theta) override {
    cpu::vision_rope(qkv, Nh, Dh, pos, theta);
  }
  void vision_attention(const Tensor& qkv, int64_t Nh, int64_t Dh, const std::vector<int32_t>& cu, Tensor& o) override {
    cpu::vision_attention(qkv, Nh, Dh, cu, o);
  }
  void scatter_rows(Tensor& x, const std::vector<int32_t>& rows, const Tensor& src) override {
    cpu::scatter_rows(x, rows, src);
  }
};

}  // namespace
}  // namespace ds::cpu

namespace ds {
std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<cpu::CpuBackend>(); }
}  // namespace ds
