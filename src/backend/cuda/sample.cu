// Sampling on the GPU: Backend::sample_rows (ops.h). One block of 1024 threads per row; every filter is a
// threshold on the scaled logit z, found without sorting:
//   max (and its lowest id) → min_p threshold → top_k: the k-th largest candidate by a radix descent over the
//   order keys counting candidates → top_p: the same descent summing candidate mass → draw: each thread sums the
//   mass of its contiguous id range, a block scan gives the ranges' cumulative mass, and the thread whose range
//   crosses u × total walks it in id order.
// A masked row's forbidden ids are -inf in z (k_sample_values; k_sample_edits leaves them); a row verifying a draft
// (speculative rejection sampling) keeps the draft out of the ranges, accepts it where u × total < w_d and otherwise
// draws from the rest with u2.
// All sums are in a fixed order (per-thread sequential, then warp butterflies and a fixed tree), so a row's result
// is deterministic; it differs from the CPU's double sums in id order only by rounding (docs/engine.md).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/dev_util.cuh"
#include "backend/cuda/pdl.h"
#include "backend/cuda/sample.h"
#include "core/dtype.h"
#include "core/status.h"

namespace ds::cuda {
namespace {

constexpr int kThreads = 1024;

// A row's mask (sample_math.h), or null.
__device__ __forceinline__ const uint32_t* row_mask(const SampleRowParams& p, const uint32_t* masks, int64_t n) {
  return p.mask >= 0 ? masks + int64_t(p.mask) * mask_words(n) : nullptr;
}

// z [R, n] = scaled raw logits (-inf where the row's mask forbids the id); then the edited ids are overwritten
// (k_sample_edits, same stream, after).
__global__ void k_sample_values(const void* logits, int dt, int64_t V, int64_t n, const SampleRowParams* rows,
                                const uint32_t* masks, float* z) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  const int64_t r = blockIdx.y;
  const SampleRowParams p = rows[r];
  const uint32_t* m = row_mask(p, masks, n);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    z[r * n + i] = mask_allows(m, i) ? scaled_logit(ldf(logits, dt, r * V + i), p) : -INFINITY;
}

__global__ void k_sample_edits(const void* logits, int dt, int64_t V, int64_t n, const SampleRowParams* rows,
                               const SampleEdit* edits, const uint32_t* masks, float* z) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  const int64_t r = blockIdx.y;
  const SampleRowParams p = rows[r];
  const uint32_t* m = row_mask(p, masks, n);
  for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < p.edit_count; j += gridDim.x * blockDim.x) {
    const SampleEdit e = edits[p.edit_begin + j];
    if (e.id >= 0 && e.id < n && mask_allows(m, e.id))
      z[r * n + e.id] = scaled_logit(edit_logit(ldf(logits, dt, r * V + e.id), e, p), p);
  }
}

__device__ __forceinline__ bool is_cand(float v, float lo) { return v > -INFINITY && v >= lo; }  // NaN: false

__device__ __forceinline__ float mass_of(float v, float zmax) { return expf(sub_rn(v, zmax)); }


// Sum over the block in a fixed order; every thread gets it. `red` [32] shared.
__device__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // red may still be read by a previous call
  if (lane == 0) red[w] = v;
  __syncthreads();
  float s = 0.f;
  for (int k = 0; k < nw; ++k) s += red[k];
  return s;
}

// hist[16] = Σ over the block of each thread's acc[16], in a fixed order. `red` [32·16] shared.
__device__ void block_sum16(float (&acc)[16], float* red, float* hist) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int j = 0; j < 16; ++j) acc[j] = warp_sum(acc[j]);
  if (lane == 0)
#pragma unroll
    for (int j = 0; j < 16; ++j) red[w * 16 + j] = acc[j];
  __syncthreads();
  if (threadIdx.x < 16) {
    float s = 0.f;
    for (int k = 0; k < nw; ++k) s += red[k * 16 + threadIdx.x];
    hist[threadIdx.x] = s;
  }
  __syncthreads();
}

// The largest candidate value v (z >= lo) with Σ_{candidates z >= v} f >= target, f = 1 (count) or the mass
// expf(z - zmax): radix descent over the order keys, 4 bits a pass from the top. Rounding can leave no digit
// reaching the target (a top_p close to 1): the lowest non-empty digit is kept then.
__device__ float select_threshold(const float* z, int64_t n, float lo, float zmax, float target, bool mass, float* red,
                                  float* hist) {
  uint32_t prefix = 0, pmask = 0;
  float above = 0.f;  // f of the candidates whose keys are above the current prefix range
  for (int shift = 28; shift >= 0; shift -= 4) {
    float acc[16];
#pragma unroll
    for (int j = 0; j < 16; ++j) acc[j] = 0.f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const float v = z[i];
      if (!is_cand(v, lo)) continue;
      const uint32_t k = order_key(__float_as_uint(v));
      if ((k & pmask) != prefix) continue;
      const float f = mass ? mass_of(v, zmax) : 1.f;
      const uint32_t d = (k >> shift) & 15u;
#pragma unroll
      for (int j = 0; j < 16; ++j) acc[j] += d == uint32_t(j) ? f : 0.f;
    }
    block_sum16(acc, red, hist);
    int chosen = -1, lowest = 0;
    for (int d = 15; d >= 0; --d) {
      const float h = hist[d];
      if (!(h > 0.f)) continue;
      lowest = d;
      if (above + h >= target) {
        chosen = d;
        break;
      }
      above += h;
    }
    if (chosen < 0) {
      chosen = lowest;
      above -= hist[lowest];
    }
    prefix |= uint32_t(chosen) << shift;
    pmask |= 15u << shift;
  }
  return __uint_as_float(key_bits(prefix));
}

__device__ __forceinline__ void better(float& v, int32_t& i, float v2, int32_t i2) {
  if (v2 > v || (v2 == v && i2 < i)) {
    v = v2;
    i = i2;
  }
}

// The warp's best (value, then lower id) in every lane.
__device__ __forceinline__ void warp_best(float& v, int32_t& i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) better(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
}

// The block's best (value, then lower id) in every thread; `sv` / `si` [32] shared.
__device__ void block_best(float& v, int32_t& i, float* sv, int32_t* si) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  warp_best(v, i);
  __syncthreads();  // sv / si may still be read by a previous call
  if (lane == 0) {
    sv[w] = v;
    si[w] = i;
  }
  __syncthreads();
  v = sv[0];
  i = si[0];
  for (int q = 1; q < nw; ++q) better(v, i, sv[q], si[q]);
}

__global__ void __launch_bounds__(kThreads) k_sample_rows(const float* zall, int64_t n, const SampleRowParams* rows,
                                                          int32_t* ids) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  __shared__ float red[32 * 16];
  __shared__ float hist[16];
  __shared__ float sv[32];
  __shared__ int32_t si[32];
  __shared__ float incl_of[kThreads];
  __shared__ int pick, last;
  const int64_t r = blockIdx.x;
  const SampleRowParams p = rows[r];
  const float* z = zall + r * n;
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;

  // 1. The largest z and its lowest id (NaN as -inf).
  float bv = -INFINITY;
  int32_t bi = INT_MAX;
  for (int64_t i = tid; i < n; i += blockDim.x) {
    const float v = z[i];
    better(bv, bi, v != v ? -INFINITY : v, int32_t(i));
  }
  block_best(bv, bi, sv, si);
  const float zmax = bv;
  if (p.greedy) {
    if (tid == 0) ids[r] = p.mask >= 0 && !(zmax > -INFINITY) ? -1 : bi;  // a mask that leaves nothing: -1
    return;
  }
  if (!(zmax > -INFINITY) || isinf(zmax)) {
    if (tid == 0) ids[r] = -1;
    return;
  }

  // 2. Filters: every one raises the threshold lo.
  float lo = p.log_min_p == -INFINITY ? -INFINITY : add_rn(zmax, p.log_min_p);
  if (p.top_k > 0) {
    float c = 0.f;
    for (int64_t i = tid; i < n; i += blockDim.x) c += is_cand(z[i], lo) ? 1.f : 0.f;
    c = block_sum(c, sv);  // exact: integers below 2^24
    if (c > float(p.top_k)) lo = select_threshold(z, n, lo, zmax, float(p.top_k), false, red, hist);
  }
  if (p.top_p < 1.f) {
    float t = 0.f;
    for (int64_t i = tid; i < n; i += blockDim.x) {
      const float v = z[i];
      if (is_cand(v, lo)) t += mass_of(v, zmax);
    }
    t = block_sum(t, sv);
    lo = select_threshold(z, n, lo, zmax, mul_rn(p.top_p, t), true, red, hist);
  }

  // 3. Draw in id order: thread t owns ids [t·chunk, (t+1)·chunk). A draft d to verify is left out of the ranges:
  // accepted where u × total < w_d, else the draw (with u2) runs over the rest.
  const int32_t d = p.draft >= 0 && p.draft < n ? p.draft : -1;
  const float wd = d >= 0 && is_cand(z[d], lo) ? mass_of(z[d], zmax) : 0.f;
  const int64_t chunk = (n + blockDim.x - 1) / blockDim.x;
  const int64_t b0 = std::min<int64_t>(n, tid * chunk), b1 = std::min<int64_t>(n, b0 + chunk);
  float s = 0.f;
  for (int64_t i = b0; i < b1; ++i) {
    const float v = z[i];
    if (is_cand(v, lo) && i != d) s += mass_of(v, zmax);
  }
  float incl = s;  // inclusive scan over the block
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  __syncthreads();  // sv is free again
  if (lane == 31) sv[w] = incl;
  if (tid == 0) {
    pick = INT_MAX;
    last = -1;
  }
  __syncthreads();
  float off = 0.f;
  for (int k = 0; k < w; ++k) off += sv[k];
  incl += off;
  incl_of[tid] = incl;
  __syncthreads();
  const float total = incl_of[blockDim.x - 1];  // without the draft
  if (d >= 0 && mul_rn(p.u, add_rn(total, wd)) < wd) {  // every thread decides alike
    if (tid == 0) ids[r] = d;
    return;
  }
  const float target = mul_rn(d >= 0 ? p.u2 : p.u, total);
  if (incl > target) atomicMin(&pick, tid);
  if (s > 0.f) atomicMax(&last, tid);
  __syncthreads();
  const int owner = pick != INT_MAX ? pick : last;
  if (owner < 0 && tid == 0) ids[r] = d;  // no mass but the draft's (unreachable: it was accepted then)
  if (tid != owner) return;
  float c = tid > 0 ? incl_of[tid - 1] : 0.f;
  int32_t tok = -1, lastpos = -1;
  for (int64_t i = b0; i < b1; ++i) {
    const float v = z[i];
    if (!is_cand(v, lo) || i == d) continue;
    const float m = mass_of(v, zmax);
    if (!(m > 0.f)) continue;
    lastpos = int32_t(i);
    c += m;
    if (pick != INT_MAX && c > target) {
      tok = int32_t(i);
      break;
    }
  }
  ids[r] = tok >= 0 ? tok : lastpos;
}

// Backend::row_logprobs (cpu::row_logprobs is the specification), in two launches. k_row_logprobs_part: a grid of
// S slices × R rows, one block of kLpThreads per slice of a row (S = ceil(n / kLpSlice) up to 32, so a row spreads
// over many SMs). Each thread scans its slice's ids t, t + kLpThreads, ... (kLpUnroll loads in flight) for its max;
// the block max m. Then a threshold T no larger than the slice's k-th largest logit: the k-th largest of the threads'
// maxima (each one an id's logit), found on the top 16 bits of their order keys by a bit-by-bit search with
// __syncthreads_count, so every id of the slice's top k has a key >= T and few others do. A second pass over the ids
// (from L2) accumulates Σ expf(x − m) in double and appends each id with key >= T (never a NaN) to a shared candidate
// list; each candidate's rank among them (value, then lower id) places it, and ranks below k are the slice's top k
// (slots past the candidates: -inf, id INT_MAX). A list that overflows its kLpCand slots (thousands of ties at the
// threshold) falls back to per-thread top-KM lists of the ids >= T (KM the fewest of 1, 5, 10, 20 that cover k; a
// descending list that an id enters through a chain of compare-swaps with static indices) merged by k rounds of a
// block argmax. k_row_logprobs_merge (a warp per row): the row's max M over the slices, Σ sum_s · exp(m_s − M) in
// double, lse = M + log Σ (within ~1e-7 of the CPU's double exps), and the top k by k rounds of a warp argmax over
// the slices' list heads.
constexpr int kLpThreads = 512, kLpMaxK = 20, kLpUnroll = 4, kLpMaxSlices = 32, kLpCand = 512;
constexpr int64_t kLpSlice = 8192;

struct LpPartial {  // per (row, slice), in the scratch buffer
  float m;
  double sum;
  float v[kLpMaxK];
  int32_t id[kLpMaxK];
};

template <int KM>
__global__ void __launch_bounds__(kLpThreads) k_row_logprobs_part(const void* logits, int dt, int64_t V, int64_t n,
                                                                  const int32_t* rows, int k, LpPartial* part) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  __shared__ float sv[32];
  __shared__ int32_t si[32];
  __shared__ double sd[32];
  __shared__ float cv[kLpCand];
  __shared__ int32_t ci[kLpCand];
  __shared__ int ncand;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int S = gridDim.x;
  const int64_t per = (n + S - 1) / S, lo = blockIdx.x * per, hi = min(n, lo + per);
  const int64_t base = int64_t(rows[blockIdx.y]) * V;
  const int64_t B = blockDim.x;
  if (threadIdx.x == 0) ncand = 0;
  float mx = -INFINITY;
  for (int64_t j0 = lo + threadIdx.x; j0 < hi; j0 += kLpUnroll * B) {
    float xs[kLpUnroll];
#pragma unroll
    for (int u = 0; u < kLpUnroll; ++u) xs[u] = j0 + u * B < hi ? ldf(logits, dt, base + j0 + u * B) : NAN;
#pragma unroll
    for (int u = 0; u < kLpUnroll; ++u) mx = fmaxf(mx, xs[u]);  // NaN never taken (std::max(mx, x) keeps mx)
  }
  const float tmax = mx;  // this thread's: -inf when it has no id (or only -inf / NaN ones)
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if (lane == 0) sv[w] = mx;
  __syncthreads();
  mx = sv[0];
  for (int q = 1; q < nw; ++q) mx = fmaxf(mx, sv[q]);
  // T: the largest key with its low 16 bits clear that at least k of the threads' maxima reach. A thread without an
  // id counts as -inf, which is no more than any id's key, so T stays at or below the slice's k-th largest id key (or
  // at -inf's level when the slice has fewer than k ids: then every id that is not a NaN is a candidate).
  uint32_t T = 0;
  if (k > 0) {
    const uint32_t key = order_key(__float_as_uint(tmax));
    for (int bit = 31; bit >= 16; --bit) {
      const uint32_t c = T | (1u << bit);
      if (__syncthreads_count(key >= c) >= k) T = c;
    }
  }
  double s = 0;
  for (int64_t j0 = lo + threadIdx.x; j0 < hi; j0 += kLpUnroll * B) {
    float xs[kLpUnroll];
#pragma unroll
    for (int u = 0; u < kLpUnroll; ++u) xs[u] = j0 + u * B < hi ? ldf(logits, dt, base + j0 + u * B) : -INFINITY;
#pragma unroll
    for (int u = 0; u < kLpUnroll; ++u) {
      if (j0 + u * B >= hi) continue;
      const float x = xs[u];
      if (mx > -INFINITY) s += double(expf(x - mx));  // in id order; an all -inf slice: 0
      if (k > 0 && x == x && order_key(__float_as_uint(x)) >= T) {
        const int p = atomicAdd(&ncand, 1);
        if (p < kLpCand) {
          cv[p] = x;
          ci[p] = int32_t(j0 + u * B);
        }
      }
    }
  }
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) sd[w] = s;
  __syncthreads();  // also: every candidate is in place
  s = 0;
  for (int q = 0; q < nw; ++q) s += sd[q];
  LpPartial& P = part[int64_t(blockIdx.y) * S + blockIdx.x];
  if (threadIdx.x == 0) {
    P.m = mx;
    P.sum = s;
  }
  if (k <= 0) return;
  const int nc = ncand;
  if (nc <= kLpCand) {
    for (int t = threadIdx.x; t < nc; t += blockDim.x) {
      const float v = cv[t];
      const int32_t id = ci[t];
      int rank = 0;
      for (int q = 0; q < nc; ++q) rank += cv[q] > v || (cv[q] == v && ci[q] < id);
      if (rank < k) {
        P.v[rank] = v;
        P.id[rank] = id;
      }
    }
    for (int r = nc + int(threadIdx.x); r < k; r += blockDim.x) {
      P.v[r] = -INFINITY;
      P.id[r] = INT_MAX;
    }
    return;
  }
  // Overflow (block-uniform): per-thread lists of the ids at or above T, then k rounds of the block's best head.
  float tv[KM];
  int32_t ti[KM];
#pragma unroll
  for (int q = 0; q < KM; ++q) {
    tv[q] = -INFINITY;
    ti[q] = INT_MAX;  // empty: any id, even of a -inf logit, goes before it
  }
  for (int64_t j = lo + threadIdx.x; j < hi; j += B) {
    float v = ldf(logits, dt, base + j);
    int32_t vi = int32_t(j);
    if (!(v == v) || order_key(__float_as_uint(v)) < T) continue;
    if (v > tv[KM - 1] || (v == tv[KM - 1] && vi < ti[KM - 1])) {
#pragma unroll
      for (int q = 0; q < KM; ++q)
        if (v > tv[q] || (v == tv[q] && vi < ti[q])) {
          const float tf = tv[q];
          const int32_t tid = ti[q];
          tv[q] = v;
          ti[q] = vi;
          v = tf;
          vi = tid;
        }
    }
  }
  for (int r = 0; r < k; ++r) {
    float v = tv[0];
    int32_t id = ti[0];
    block_best(v, id, sv, si);
    if (ti[0] == id) {  // ids are unique: only the winner moves its list up
#pragma unroll
      for (int q = 0; q + 1 < KM; ++q) {
        tv[q] = tv[q + 1];
        ti[q] = ti[q + 1];
      }
      tv[KM - 1] = -INFINITY;
      ti[KM - 1] = INT_MAX;
    }
    if (threadIdx.x == 0) {
      P.v[r] = v;
      P.id[r] = id;
    }
  }
}

__global__ void k_row_logprobs_merge(const void* logits, int dt, int64_t V, int S, const int32_t* rows,
                                     const int32_t* chosen, int k, const LpPartial* part, int stride, float* out) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  const int lane = threadIdx.x;
  const LpPartial* P = part + int64_t(blockIdx.x) * S;
  float m = lane < S ? P[lane].m : -INFINITY;
  float M = m;
  for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
  // Σ_s sum_s · exp(m_s − M), the slices in order (lane order through a fixed tree).
  double t = lane < S && P[lane].sum != 0 ? P[lane].sum * exp(double(m) - double(M)) : 0.0;
  for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
  const double lse = double(M) + log(t);
  float* o = out + int64_t(blockIdx.x) * stride;
  if (lane == 0) o[0] = float(double(ldf(logits, dt, int64_t(rows[blockIdx.x]) * V + chosen[blockIdx.x])) - lse);
  int head = 0;
  for (int r = 0; r < k; ++r) {
    float v = lane < S && head < k ? P[lane].v[head] : -INFINITY;
    int32_t id = lane < S && head < k ? P[lane].id[head] : INT_MAX;
    warp_best(v, id);
    if (lane < S && head < k && P[lane].id[head] == id) ++head;
    if (lane == 0) {
      o[1 + 2 * r] = float(id);
      o[2 + 2 * r] = float(double(v) - lse);
    }
  }
}

// Backend::row_ranks (cpu::row_rank is the specification): a grid of slices × R rows, each thread counting the ids of
// its slice whose logit is >= the chosen one's, a block sum, one integer atomicAdd per block into out[row] (zeroed
// before; integer sums in any order are exact).
constexpr int kRankThreads = 256;
constexpr int64_t kRankSlice = 16384;

__global__ void __launch_bounds__(kRankThreads) k_row_rank(const void* logits, int dt, int64_t V, int64_t n,
                                                           const int32_t* rows, const int32_t* chosen, int32_t* out) {
  pdl_wait();
  pdl_trigger();
  __shared__ int ws[kRankThreads / 32];
  const int64_t base = int64_t(rows[blockIdx.y]) * V;
  const float c = ldf(logits, dt, base + chosen[blockIdx.y]);
  const int64_t per = (n + gridDim.x - 1) / gridDim.x, lo = blockIdx.x * per, hi = min(n, lo + per);
  int cnt = 0;
  for (int64_t j = lo + threadIdx.x; j < hi; j += kRankThreads) cnt += ldf(logits, dt, base + j) >= c;
  cnt = __reduce_add_sync(0xffffffffu, unsigned(cnt));
  if ((threadIdx.x & 31) == 0) ws[threadIdx.x >> 5] = cnt;
  __syncthreads();
  if (threadIdx.x == 0) {
    int t = 0;
    for (int w = 0; w < kRankThreads / 32; ++w) t += ws[w];
    if (t) atomicAdd(out + blockIdx.y, t);
  }
}

}  // namespace

int64_t row_logprobs_scratch_bytes(int R, int64_t n) {
  const int64_t S = std::min<int64_t>(kLpMaxSlices, std::max<int64_t>(1, (n + kLpSlice - 1) / kLpSlice));
  return int64_t(R) * S * int64_t(sizeof(LpPartial));
}

void launch_row_logprobs(const void* logits, int dt, int64_t V, int64_t n, int R, const int32_t* rows,
                         const int32_t* chosen, int k, int stride, float* out, void* scratch, cudaStream_t stream) {
  if (R <= 0) return;
  DS_CHECK(k >= 0 && k <= kLpMaxK, "row_logprobs: k ", k, " outside 0..", kLpMaxK);
  const int S = int(std::min<int64_t>(kLpMaxSlices, std::max<int64_t>(1, (n + kLpSlice - 1) / kLpSlice)));
  LpPartial* part = static_cast<LpPartial*>(scratch);
  // Each thread's list holds the fewest entries that cover k (its upkeep, a compare-swap chain per entering id, is
  // most of the kernel's time: each thread sees only ~16 ids of a 248k row, so nearly every id enters).
  const auto part_kernel = k <= 1 ? k_row_logprobs_part<1> : k <= 5 ? k_row_logprobs_part<5>
                           : k <= 10 ? k_row_logprobs_part<10> : k_row_logprobs_part<kLpMaxK>;
  DS_CUDA_CHECK(pdl_launch(part_kernel, dim3(unsigned(S), unsigned(R)), kLpThreads, 0, stream, logits, dt, V, n, rows, k,
                           part));
  DS_CUDA_CHECK(pdl_launch(k_row_logprobs_merge, unsigned(R), 32, 0, stream, logits, dt, V, S, rows, chosen, k,
                           static_cast<const LpPartial*>(part), stride, out));
}

void launch_row_ranks(const void* logits, int dt, int64_t V, int64_t n, int R, const int32_t* rows,
                      const int32_t* chosen, int32_t* out, cudaStream_t stream) {
  if (R <= 0) return;
  DS_CUDA_CHECK(cudaMemsetAsync(out, 0, size_t(R) * sizeof(int32_t), stream));
  const unsigned S = unsigned(std::min<int64_t>(64, std::max<int64_t>(1, (n + kRankSlice - 1) / kRankSlice)));
  DS_CUDA_CHECK(pdl_launch(k_row_rank, dim3(S, unsigned(R)), kRankThreads, 0, stream, logits, dt, V, n, rows, chosen,
                           out));
}

void launch_sample_rows(const void* logits, int dt, int64_t V, int64_t n, int R, const SampleRowParams* rows,
                        const SampleEdit* edits, int max_edits, const uint32_t* masks, float* z, int32_t* ids,
                        cudaStream_t stream) {
  if (R <= 0) return;
  const unsigned gx = unsigned(std::min<int64_t>((n + 255) / 256, 1024));
  DS_CUDA_CHECK(pdl_launch(k_sample_values, dim3(gx, unsigned(R)), 256, 0, stream, logits, dt, V, n, rows, masks, z));
  if (max_edits > 0) {
    const unsigned ge = unsigned(std::min<int64_t>((max_edits + 255) / 256, 1024));
    DS_CUDA_CHECK(pdl_launch(k_sample_edits, dim3(ge, unsigned(R)), 256, 0, stream, logits, dt, V, n, rows, edits,
                             masks, z));
  }
  DS_CUDA_CHECK(pdl_launch(k_sample_rows, unsigned(R), kThreads, 0, stream, z, n, rows, ids));
}

}  // namespace ds::cuda
