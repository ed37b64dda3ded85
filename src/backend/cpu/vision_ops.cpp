// Vision-tower ops of the fp32 reference backend (contract in backend/ops.h, "vision tower").
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "backend/cpu/cpu_backend.h"

namespace ds::cpu {

namespace {
void need_f32(const Tensor& t, const char* op, const char* what) {
  if (t.dtype != DType::F32) fail(op, ": ", what, " must be F32 on the cpu backend, got ", dtype_name(t.dtype));
}
}  // namespace

void layernorm(const Tensor& x, const Tensor& w, const Tensor& b, float eps, Tensor& y) {
  const int64_t D = w.numel(), R = x.numel() / D;
  DS_CHECK(b.numel() == D && y.numel() == x.numel(), "layernorm x ", shape_str(x.shape), " w ", shape_str(w.shape));
  need_f32(x, "layernorm", "x");
  const float* xp = x.ptr<float>();
  float* yp = y.ptr<float>();
#pragma omp parallel for
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = xp + r * D;
    double mean = 0;
    for (int64_t d = 0; d < D; ++d) mean += xr[d];
    mean /= double(D);
    double var = 0;
    for (int64_t d = 0; d < D; ++d) var += (xr[d] - mean) * (xr[d] - mean);
    const float inv = float(1.0 / std::sqrt(var / double(D) + eps));
    for (int64_t d = 0; d < D; ++d) yp[r * D + d] = float(xr[d] - mean) * inv * w.ptr<float>()[d] + b.ptr<float>()[d];
  }
}

void add_bias(Tensor& x, const Tensor& bias) {
  const int64_t N = bias.numel(), R = x.numel() / N;
  DS_CHECK(R * N == x.numel(), "add_bias x ", shape_str(x.shape), " bias ", shape_str(bias.shape));
  float* xp = x.ptr<float>();
  const float* bp = bias.ptr<float>();
#pragma omp parallel for
  for (int64_t r = 0; r < R; ++r)
    for (int64_t n = 0; n < N; ++n) xp[r * N + n] += bp[n];
}

void gelu(const Tensor& x, bool tanh_approx, Tensor& y) {
  DS_CHECK(x.numel() == y.numel());
  const float* xp = x.ptr<float>();
  float* yp = y.ptr<float>();
  const int64_t n = x.numel();
  const float k0 = 0.7978845608028654f, k1 = 0.044715f, rs2 = 0.7071067811865476f;
#pragma omp parallel for
  for (int64_t i = 0; i < n; ++i) {
    const float v = xp[i];
    yp[i] = tanh_approx ? 0.5f * v * (1.f + std::tanh(k0 * (v + k1 * v * v * v))) : 0.5f * v * (1.f + std::erf(v * rs2));
  }
}

void embed_bilinear_add(Tensor& x, const Tensor& table, const std::vector<int32_t>& idx, const std::vector<float>& w) {
  const int64_t R = x.dim(0), D = x.numel() / R, V = table.dim(0);
  DS_CHECK(table.numel() / V == D && idx.size() == w.size() && int64_t(idx.size()) % R == 0,
           "embed_bilinear_add x ", shape_str(x.shape), " table ", shape_str(table.shape), " idx ", idx.size());
  const int64_t J = int64_t(idx.size()) / R;
  for (int32_t id : idx) DS_CHECK(id >= 0 && id < V, "position-embedding index ", id, " outside [0, ", V, ")");
  float* xp = x.ptr<float>();
  const float* tp = table.ptr<float>();
#pragma omp parallel for
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < J; ++j) {
      const int32_t id = idx[size_t(r * J + j)];
      const float wt = w[size_t(r * J + j)];
      for (int64_t d = 0; d < D; ++d) xp[r * D + d] += wt * tp[int64_t(id) * D + d];
    }
}

void vision_rope(Tensor& qkv, int64_t Nh, int64_t Dh, const std::vector<int32_t>& pos, double theta) {
  const int64_t P = qkv.dim(0), half = Dh / 2, quarter = half / 2, row = 3 * Nh * Dh;
  DS_CHECK(qkv.numel() == P * row && int64_t(pos.size()) == 2 * P && Dh % 4 == 0, "vision_rope qkv ",
           shape_str(qkv.shape), " Nh ", Nh, " Dh ", Dh, " pos ", pos.size());
  std::vector<double> f(static_cast<size_t>(quarter));
  for (int64_t j = 0; j < quarter; ++j) f[j] = 1.0 / std::pow(theta, double(2 * j) / double(half));
  float* base = qkv.ptr<float>();
#pragma omp parallel for
  for (int64_t p = 0; p < P; ++p) {
    std::vector<float> c(static_cast<size_t>(half)), s(static_cast<size_t>(half));
    for (int64_t i = 0; i < half; ++i) {
      // fp32 angle, as the reference computes (position · inv_freq in float32)
      const float ang = i < quarter ? float(pos[p]) * float(f[i]) : float(pos[P + p]) * float(f[i - quarter]);
      c[i] = std::cos(ang);
      s[i] = std::sin(ang);
    }
    for (int64_t part = 0; part < 2; ++part)  // q, k
      for (int64_t h = 0; h < Nh; ++h) {
        float* v = base + p * row + part * Nh * Dh + h * Dh;
        for (int64_t i = 0; i < half; ++i) {
          const float a = v[i], b = v[i + half];
          v[i] = a * c[i] - b * s[i];
          v[i + half] = b * c[i] + a * s[i];
        }
      }
  }
}

void vision_attention(const Tensor& qkv, int64_t Nh, int64_t Dh, const std::vector<int32_t>& cu, Tensor& o) {
  const int64_t P = qkv.dim(0), row = 3 * Nh * Dh;
  DS_CHECK(qkv.numel() == P * row && o.numel() == P * Nh * Dh && cu.size() >= 2 && cu.front() == 0 && cu.back() == P,
           "vision_attention qkv ", shape_str(qkv.shape), " o ", shape_str(o.shape));
  const float scale = 1.f / std::sqrt(float(Dh));
  const float* base = qkv.ptr<float>();
  for (size_t sgm = 0; sgm + 1 < cu.size(); ++sgm) {
    const int64_t s0 = cu[sgm], s1 = cu[sgm + 1];
#pragma omp parallel for collapse(2)
    for (int64_t i = s0; i < s1; ++i)
      for (int64_t h = 0; h < Nh; ++h) {
        const float* q = base + i * row + h * Dh;
        std::vector<float> sc(size_t(s1 - s0));
        float mx = -INFINITY;
        for (int64_t j = s0; j < s1; ++j) {
          const float* k = base + j * row + Nh * Dh + h * Dh;
          float d = 0.f;
          for (int64_t e = 0; e < Dh; ++e) d += q[e] * k[e];
          sc[j - s0] = d * scale;
          mx = std::max(mx, sc[j - s0]);
        }
        float sum = 0.f;
        for (auto& v : sc) sum += v = std::exp(v - mx);
        float* out = o.ptr<float>() + (i * Nh + h) * Dh;
        for (int64_t e = 0; e < Dh; ++e) out[e] = 0.f;
        for (int64_t j = s0; j < s1; ++j) {
          const float* v = base + j * row + 2 * Nh * Dh + h * Dh;
          const float wt = sc[j - s0] / sum;
          for (int64_t e = 0; e < Dh; ++e) out[e] += wt * v[e];
        }
      }
  }
}

void scatter_rows(Tensor& x, const std::vector<int32_t>& rows, const Tensor& src) {
  const int64_t T = x.dim(0), H = x.numel() / T;
  DS_CHECK(src.numel() == int64_t(rows.size()) * H, "scatter_rows src ", shape_str(src.shape), " for ", rows.size(),
           " rows of ", H);
  for (size_t i = 0; i < rows.size(); ++i) {
    DS_CHECK(rows[i] >= 0 && rows[i] < T, "scatter_rows row ", rows[i], " outside [0, ", T, ")");
    std::memcpy(x.ptr<float>() + int64_t(rows[i]) * H, src.ptr<float>() + int64_t(i) * H, size_t(H) * 4);
  }
}

}  // namespace ds::cpu
