// The CPU sampler core: the specification of Backend::sample_rows (ops.h) and what sampling::sample draws with.
// Plain loops; sums in double in id order (the CUDA kernel sums in float in another order, see docs/engine.md).
#include <algorithm>
#include <cmath>
#include <limits>

#include "backend/cpu/cpu_backend.h"
#include "core/status.h"

namespace ds::cpu {

void sample_values(const float* raw, int64_t n, const SampleRowParams& p, const SampleEdit* edits, int64_t ne,
                   std::vector<float>& z, const uint32_t* mask) {
  const float ninf = -std::numeric_limits<float>::infinity();
  z.resize(size_t(n));
  for (int64_t i = 0; i < n; ++i) z[size_t(i)] = mask_allows(mask, i) ? scaled_logit(raw[i], p) : ninf;
  for (int64_t j = 0; j < ne; ++j) {
    const SampleEdit& e = edits[j];
    if (e.id >= 0 && e.id < n && mask_allows(mask, e.id)) z[size_t(e.id)] = scaled_logit(edit_logit(raw[e.id], e, p), p);
  }
}

void row_logprobs(const float* logits, int64_t n, int32_t chosen, int32_t k, float* out) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, logits[i]);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(double(logits[i]) - double(mx));
  const double lse = double(mx) + std::log(sum);
  out[0] = float(double(logits[chosen]) - lse);
  k = int32_t(std::min<int64_t>(k, n));
  if (k <= 0) return;
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) ids[size_t(i)] = int32_t(i);
  std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  for (int32_t j = 0; j < k; ++j) {
    out[1 + 2 * j] = float(ids[size_t(j)]);
    out[2 + 2 * j] = float(double(logits[ids[size_t(j)]]) - lse);
  }
}

int32_t row_rank(const float* logits, int64_t n, int32_t chosen) {
  const float c = logits[chosen];
  int32_t r = 0;
  for (int64_t i = 0; i < n; ++i) r += logits[i] >= c;
  return r;
}

int32_t sample_argmax(const float* z, int64_t n) {
  int64_t a = 0;
  float best = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i)
    if (z[i] > best) {  // NaN is never greater
      best = z[i];
      a = i;
    }
  return int32_t(a);
}

bool sample_filter(const float* z, int64_t n, const SampleRowParams& p, SampleSet& out) {
  const float ninf = -std::numeric_limits<float>::infinity();
  out.ids.clear();
  out.w.clear();
  out.total = 0;
  float zmax = ninf;
  for (int64_t i = 0; i < n; ++i) zmax = std::max(zmax, z[i]);  // std::max keeps zmax when z[i] is NaN
  if (!(zmax > ninf) || std::isinf(zmax)) return false;
  float lo = p.log_min_p == ninf ? ninf : add_rn(zmax, p.log_min_p);
  auto cand = [&](float v) { return v > ninf && v >= lo; };
  auto weight = [&](float v) { return double(std::exp(sub_rn(v, zmax))); };
  if (p.top_k > 0) {
    std::vector<float> c;
    for (int64_t i = 0; i < n; ++i)
      if (cand(z[i])) c.push_back(z[i]);
    if (int64_t(c.size()) > p.top_k) {
      // The k-th largest value; ties with it stay.
      std::nth_element(c.begin(), c.begin() + (p.top_k - 1), c.end(), std::greater<float>());
      lo = c[size_t(p.top_k - 1)];
    }
  }
  if (p.top_p < 1.f) {
    // lo = the largest candidate value whose mass Σ_{z >= value} w reaches top_p × total.
    std::vector<std::pair<float, double>> c;
    double total = 0;
    for (int64_t i = 0; i < n; ++i)
      if (cand(z[i])) {
        c.push_back({z[i], weight(z[i])});
        total += c.back().second;
      }
    const double target = double(p.top_p) * total;
    std::sort(c.begin(), c.end(), [](auto& a, auto& b) { return a.first > b.first; });
    double acc = 0;
    for (size_t i = 0; i < c.size();) {
      size_t j = i;
      while (j < c.size() && c[j].first == c[i].first) acc += c[j++].second;  // a group of equal values
      if (acc >= target || j == c.size()) {
        lo = c[i].first;
        break;
      }
      i = j;
    }
  }
  for (int64_t i = 0; i < n; ++i)
    if (cand(z[i])) {
      out.ids.push_back(int32_t(i));
      out.w.push_back(weight(z[i]));
      out.total += out.w.back();
    }
  return !out.ids.empty();
}

int32_t sample_draw(const SampleSet& s, float u) {
  const double target = double(u) * s.total;
  double cum = 0;
  int32_t last = s.ids.empty() ? -1 : s.ids.back();
  for (size_t i = 0; i < s.ids.size(); ++i) {
    cum += s.w[i];
    if (cum > target) return s.ids[i];
    if (s.w[i] > 0) last = s.ids[i];
  }
  return last;
}

int32_t sample_verify(const SampleSet& s, int32_t d, const float* q, float u, float u2, bool* accepted) {
  auto q_of = [&](int32_t id) { return q ? double(q[id]) : id == d ? 1.0 : 0.0; };
  double pd = 0;  // p(d); 0 outside the kept set
  for (size_t i = 0; i < s.ids.size(); ++i)
    if (s.ids[i] == d) pd = s.w[i] / s.total;
  const bool acc = double(u) * q_of(d) < pd;
  if (accepted) *accepted = acc;
  if (acc) return d;
  // The residual normalize(max(0, p - q)); its support lies inside the kept set, since p = 0 elsewhere. Empty only
  // when p == q, where d was accepted with probability 1: p itself then.
  SampleSet res;
  for (size_t i = 0; i < s.ids.size(); ++i) {
    const double w = s.w[i] / s.total - q_of(s.ids[i]);
    if (w > 0) {
      res.ids.push_back(s.ids[i]);
      res.w.push_back(w);
      res.total += w;
    }
  }
  return sample_draw(res.ids.empty() ? s : res, u2);
}

int32_t sample_row(const float* raw, int64_t n, const SampleRowParams& p, const SampleEdit* edits, int64_t ne,
                   const uint32_t* mask) {
  std::vector<float> z;
  sample_values(raw, n, p, edits, ne, z, mask);
  if (p.greedy) {
    const int32_t a = sample_argmax(z.data(), n);
    return mask && !(z[size_t(a)] > -std::numeric_limits<float>::infinity()) ? -1 : a;
  }
  SampleSet s;
  if (!sample_filter(z.data(), n, p, s)) return -1;
  return p.draft >= 0 ? sample_verify(s, p.draft, nullptr, p.u, p.u2) : sample_draw(s, p.u);
}

void sample_rows(const float* logits, int64_t V, int64_t vocab_limit, const std::vector<SampleRowParams>& rows,
                 const std::vector<SampleEdit>& edits, const std::vector<uint32_t>& masks, std::vector<int32_t>& ids) {
  const int64_t n = vocab_limit > 0 ? std::min(vocab_limit, V) : V;
  DS_CHECK(n > 0, "sample_rows: empty vocabulary");
  Backend::check_sample_rows(rows, edits, masks, n);
  ids.assign(rows.size(), -1);
  const int64_t W = mask_words(n);
  for (size_t r = 0; r < rows.size(); ++r) {
    const SampleRowParams& p = rows[r];
    ids[r] = sample_row(logits + int64_t(r) * V, n, p, edits.data() + p.edit_begin, p.edit_count,
                        p.mask >= 0 ? masks.data() + int64_t(p.mask) * W : nullptr);
  }
}

}  // namespace ds::cpu
