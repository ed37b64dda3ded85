// The CUDA backend: every op of ops.h on NVIDIA GPUs (sm_80/sm_90), bf16 activations, fp32 accumulation,
// fp32 DeltaNet state. Each kernel means exactly what the CPU reference (backend/cpu) means; see docs/cuda.md.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <deque>
#include <map>
#include <thread>
#include <tuple>
#include <vector>
#include <string>

#include "backend/cuda/attn_decode.h"
#include "backend/cuda/bf16_mma.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/dev_util.cuh"
#include "backend/cuda/flash_attn.h"
#include "backend/cuda/gdr_chunked.h"
#include "backend/cuda/gdr_decode.h"
#include "backend/cuda/int4_dequant.h"
#include "backend/cuda/int4_mma.h"
#include "backend/cuda/mma_util.cuh"
#include "backend/cuda/moe_fuse.cuh"
#include "backend/cuda/pdl.h"
#include "backend/cuda/sample.h"
#include "backend/cuda/vision_kernels.h"
#include "backend/ops.h"
#include "core/env.h"

namespace ds {
namespace cuda {

#define CKB(x)                                                                                   \
  do {                                                                                           \
    cublasStatus_t s_ = (x);                                                                     \
    if (s_ != CUBLAS_STATUS_SUCCESS) ::ds::fail("cuBLAS error ", int(s_), " at ", __FILE__, ":", __LINE__); \
  } while (0)

// A norm's weight columns threadIdx.x + j·stride (j < N; 0 past D) into registers. The norm kernels call it before
// their PDL wait: a model weight is no kernel's output, and read after the row's reduction it was a dependent DRAM
// round trip (the step's weight stream evicts it from L2).
template <int N>
__device__ __forceinline__ void load_cols(const float* w, int64_t D, unsigned stride, float (&wv)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const int64_t d = threadIdx.x + int64_t(j) * stride;
    wv[j] = d < D ? w[d] : 0.f;
  }
}

// ------------------------------------------------------------------------------------------------
// Device mirror of a BatchMeta: one int32 buffer.
struct DevBatch {
  int T = 0, nseq = 0, maxb = 0;
  Tensor buf;
  const int32_t* tokens = nullptr;     // [T]
  const int32_t* positions = nullptr;  // [3, T]
  const int32_t* seq_of = nullptr;     // [T] sequence index of each row
  const int32_t* seqinfo = nullptr;    // [nseq, 4] q_start, q_len, ctx_len, slot
  const int32_t* blocks = nullptr;     // [nseq, maxb]
};

// ------------------------------------------------------------------------------------------------
// Kernels. Those of the decode step (all but DeltaNet's, which keep plain launches for now) are launched with
// pdl_launch and begin with pdl_wait(); pdl_trigger(): nothing is read or written before the previous kernel is
// done, and the next kernel may be scheduled as soon as every block of this one has started (an early trigger
// cannot take SMs from this kernel: the next one launches only once all of this one's blocks are resident, so its
// waiting blocks fill only the slots this kernel's finished blocks leave). DS_CUDA_NO_PDL=1: plain launches.

__global__ void k_embed(const void* table, int tdt, const int32_t* tokens, int64_t H, void* out, int odt) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  const int64_t t = blockIdx.x;
  const int64_t id = tokens[t];
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) stf(out, odt, t * H + i, ldf(table, tdt, id * H + i));
}

__global__ void k_rmsnorm(const void* x, int xdt, const float* w, float eps, int64_t D, void* y, int ydt) {
  constexpr int kRmsPre = 8;  // the weight of the first kRmsPre·blockDim.x columns before the wait
  float wv[kRmsPre];
  load_cols(w, D, blockDim.x, wv);
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  const int64_t r = blockIdx.x;
  float ss = 0.f;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float v = ldf(x, xdt, r * D + d);
    ss += v * v;
  }
  ss = block_sum(ss);
  const float inv = 1.f / sqrtf(ss / float(D) + eps);
#pragma unroll
  for (int j = 0; j < kRmsPre; ++j) {
    const int64_t d = threadIdx.x + int64_t(j) * blockDim.x;
    if (d < D) stf(y, ydt, r * D + d, ldf(x, xdt, r * D + d) * inv * wv[j]);
  }
  for (int64_t d = threadIdx.x + int64_t(kRmsPre) * blockDim.x; d < D; d += blockDim.x)
    stf(y, ydt, r * D + d, ldf(x, xdt, r * D + d) * inv * w[d]);
}

__global__ void k_add(void* x, int xdt, const void* y, int ydt, int64_t n) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    stf(x, xdt, i, ldf(x, xdt, i) + ldf(y, ydt, i));
}

__global__ void k_silu_mul(const void* gu, int gdt, int64_t T, int64_t I, void* y, int ydt) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  const int64_t n = T * I;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t t = i / I, c = i % I;
    stf(y, ydt, i, silu_f(ldf(gu, gdt, t * 2 * I + c)) * ldf(gu, gdt, t * 2 * I + I + c));
  }
}

__global__ void k_sigmoid_gate_mul(void* x, int xdt, const void* g, int gdt, int64_t n) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    stf(x, xdt, i, ldf(x, xdt, i) * sigmoid_f(ldf(g, gdt, i)));
}

__global__ void k_sigmoid_scale_add(void* y, int ydt, const void* s, int sdt, const void* gl, int gdt, int64_t H) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  const int64_t t = blockIdx.x;
  const float g = sigmoid_f(ldf(gl, gdt, t));
  for (int64_t d = threadIdx.x; d < H; d += blockDim.x)
    stf(y, ydt, t * H + d, ldf(y, ydt, t * H + d) + g * ldf(s, sdt, t * H + d));
}

__global__ void k_gather(const void* x, int dt, const int32_t* rows, int64_t H, void* out) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  const int64_t i = blockIdx.x, r = rows[i];
  for (int64_t d = threadIdx.x; d < H; d += blockDim.x) stf(out, dt, i * H + d, ldf(x, dt, r * H + d));
}

// Per row: the first column of the largest non-NaN value among [0, limit) (0 if none). One block per row; each
// thread keeps its best (value, column), then the block reduces, ties to the smaller column.
__device__ __forceinline__ bool argmax_better(float v, int i, float bv, int bi) {
  return i >= 0 && (bi < 0 || v > bv || (v == bv && i < bi));
}
__global__ void k_argmax_rows(const float* x, int64_t N, int64_t limit, const int32_t* map, int32_t* ids) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  const int64_t r = blockIdx.x;
  const float* row = x + r * N;
  float bv = 0.f;
  int bi = -1;
  for (int64_t j = threadIdx.x; j < limit; j += blockDim.x) {
    const float v = row[j];
    if (!isnan(v) && argmax_better(v, int(j), bv, bi)) bv = v, bi = int(j);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, off);
    if (argmax_better(ov, oi, bv, bi)) bv = ov, bi = oi;
  }
  __shared__ float sv[32];
  __shared__ int si[32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  if (lane == 0) sv[w] = bv, si[w] = bi;
  __syncthreads();
  if (w == 0) {
    bv = lane < nw ? sv[lane] : 0.f;
    bi = lane < nw ? si[lane] : -1;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, off);
      if (argmax_better(ov, oi, bv, bi)) bv = ov, bi = oi;
    }
    if (lane == 0) ids[r] = map ? map[bi < 0 ? 0 : bi] : (bi < 0 ? 0 : bi);
  }
}

// y[t] = w · x[t] for a one-row bf16 weight (the shared expert's gate): one block per token. cuBLAS runs N = 1
// as two kernels (dot + reduction), ~8 us per layer at batch 1.
__global__ void k_linear_n1(const __nv_bfloat16* w, const __nv_bfloat16* x, int64_t K, void* y, int ydt) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  const int64_t t = blockIdx.x;
  float acc = 0.f;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
    acc += __bfloat162float(w[k]) * __bfloat162float(x[t * K + k]);
  acc = block_sum(acc);
  if (threadIdx.x == 0) stf(y, ydt, t, acc);
}
// x += d, then h = rmsnorm(x)·w; one block of 256 per row, D ≤ 256·kAddNormPer. Each thread loads all its
// elements before storing any (a store to x between loads would serialise them: x and d may alias as far as the
// compiler knows), rounds x to its dtype before the norm reads it, and sums the squares in k_rmsnorm's order (same
// thread mapping, same block size), so the result equals k_add + k_rmsnorm bit for bit. The norm weight is read
// before the PDL wait (load_cols).
constexpr int kAddNormPer = 16;
__global__ void __launch_bounds__(256) k_add_rmsnorm(void* x, int xdt, const void* d, int ddt, const float* w,
                                                     float eps, int64_t D, void* h, int hdt) {
  float wv[kAddNormPer];
  load_cols(w, D, 256, wv);
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  const int64_t r = blockIdx.x;
  float v[kAddNormPer];
#pragma unroll
  for (int j = 0; j < kAddNormPer; ++j) {
    const int64_t i = threadIdx.x + int64_t(j) * 256;
    v[j] = i < D ? ldf(x, xdt, r * D + i) + ldf(d, ddt, r * D + i) : 0.f;
  }
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < kAddNormPer; ++j) {
    const int64_t i = threadIdx.x + int64_t(j) * 256;
    if (i >= D) break;
    v[j] = round_dt(v[j], xdt);  // the value stored, as k_rmsnorm would read it back
    stf(x, xdt, r * D + i, v[j]);
    ss += v[j] * v[j];
  }
  ss = block_sum(ss);
  const float inv = 1.f / sqrtf(ss / float(D) + eps);
#pragma unroll
  for (int j = 0; j < kAddNormPer; ++j) {
    const int64_t i = threadIdx.x + int64_t(j) * 256;
    if (i >= D) break;
    stf(h, hdt, r * D + i, v[j] * inv * wv[j]);
  }
}

// k_add_rmsnorm with the dtypes (bf16 or fp32 each) and the columns per thread (PER) as template parameters
// (session 24): the same arithmetic and order (the same bits), without the three-way dtype branches around every
// element's loads and stores and with 32-bit indices — a shorter instruction path for a one-block launch that runs
// twice per layer (after the route launch's 7.2 → 3.8 µs from the same change). DS_CUDA_ADDNORM_T=0: the generic one.
template <typename XT, typename DT, typename HT, int PER>
__global__ void __launch_bounds__(256) k_add_rmsnorm_t(XT* x, const DT* d, const float* w, float eps, int D, HT* h) {
  float wv[PER];
  load_cols(w, D, 256, wv);
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  const size_t off = size_t(blockIdx.x) * size_t(D);
  XT* xr = x + off;
  const DT* dr = d + off;
  HT* hr = h + off;
  const int t = int(threadIdx.x);
  float v[PER];
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int i = t + j * 256;
    v[j] = i < D ? to_f32(xr[i]) + to_f32(dr[i]) : 0.f;
  }
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int i = t + j * 256;
    if (i >= D) break;
    const XT xs = from_f32<XT>(v[j]);
    v[j] = to_f32(xs);  // the value stored, as k_rmsnorm would read it back
    xr[i] = xs;
    ss += v[j] * v[j];
  }
  ss = block_sum(ss);
  const float inv = 1.f / sqrtf(ss / float(D) + eps);
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int i = t + j * 256;
    if (i >= D) break;
    hr[i] = from_f32<HT>(v[j] * inv * wv[j]);
  }
}
// Launches k_add_rmsnorm_t for bf16 / fp32 x, d, h and D ≤ 256·kAddNormPer; false for other dtypes.
bool launch_add_rmsnorm_t(void* x, DType xdt, const void* d, DType ddt, const float* w, float eps, int64_t D, void* h,
                          DType hdt, int64_t R, cudaStream_t s) {
  auto ok = [](DType t) { return t == DType::BF16 || t == DType::F32; };
  if (!ok(xdt) || !ok(ddt) || !ok(hdt) || D > 256 * kAddNormPer) return false;
  auto go = [&](auto xt, auto dt, auto ht) {
    using XT = decltype(xt);
    using DT = decltype(dt);
    using HT = decltype(ht);
    auto* xp = static_cast<XT*>(x);
    auto* dp = static_cast<const DT*>(d);
    auto* hp = static_cast<HT*>(h);
    if (D <= 256 * 8)
      DS_CUDA_CHECK(pdl_launch(k_add_rmsnorm_t<XT, DT, HT, 8>, unsigned(R), 256, 0, s, xp, dp, w, eps, int(D), hp));
    else
      DS_CUDA_CHECK(pdl_launch(k_add_rmsnorm_t<XT, DT, HT, kAddNormPer>, unsigned(R), 256, 0, s, xp, dp, w, eps, int(D),
                               hp));
  };
  auto go_h = [&](auto xt, auto dt) {
    if (hdt == DType::BF16) go(xt, dt, __nv_bfloat16{});
    else go(xt, dt, float{});
  };
  auto go_d = [&](auto xt) {
    if (ddt == DType::BF16) go_h(xt, __nv_bfloat16{});
    else go_h(xt, float{});
  };
  if (xdt == DType::BF16) go_d(__nv_bfloat16{});
  else go_d(float{});
  return true;
}

// Small bf16 linears for steps of up to kGemvMaxT rows with DS_CUDA_NO_BF16_MMA=1 (by default the tensor-core
// kernel of bf16_mma.h serves them; prefill chunks above go to cuBLAS), several weights of one input in one launch:
// one warp per output row and chunk of ≤ 4 rows of x (grid.y), lanes across K in 16-byte chunks (8 inputs), fp32
// accumulation, then a shuffle reduction. A row's result does not depend on how many rows the step has (the same
// lanes sum the same inputs in the same order), so a verify step's rows equal the plain decode step's bit for bit:
// greedy speculation depends on it (CudaSpec.GreedySpeculation*; with M ≤ 4 here and cuBLAS above, a 5-row verify
// picked other experts than a 1-row decode). Segment modes: plain y = x·Wᵀ; swiglu (row n computes the gate row n
// and the up row I + n and writes silu(g)·u, g and u rounded to y's dtype first, as linear + silu_mul would); gated
// add (y += sigmoid(gate)·s with s rounded to y's dtype, as linear + sigmoid_scale_add would).
constexpr int kGemvMaxT = 256, kGemvSegs = 4;
struct GemvSeg {
  const __nv_bfloat16* w = nullptr;
  void* y = nullptr;
  const void* gate = nullptr;  // gated add: [M] logits
  int ydt = 0, gdt = 0, mode = 0;  // 0 plain, 1 swiglu, 2 gated add
  int64_t rows = 0;                // output columns of y (N, or I for swiglu)
};
struct GemvJobs {
  GemvSeg s[kGemvSegs];
  int64_t start[kGemvSegs + 1] = {};
  int n = 0;
};
__device__ __forceinline__ void bf16x8(const uint4& u, float* f) {
  const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 v = __bfloat1622float2(p[i]);
    f[2 * i] = v.x, f[2 * i + 1] = v.y;
  }
}
template <int MB>  // M bound of this instantiation (M ≤ MB)
__global__ void __launch_bounds__(256) k_gemv_bf16(const GemvJobs j, const __nv_bfloat16* __restrict__ x, int Mall,
                                                   int64_t K) {
  // Rows [m0, m0 + M) of x (blockIdx.y: chunks of MB rows), staged in shared memory once per block (K·M·2 bytes)
  extern __shared__ uint4 xs[];
  const int64_t K8 = K / 8, m0 = int64_t(blockIdx.y) * MB;
  const int M = int(Mall - m0 < MB ? Mall - m0 : MB);
  pdl_wait();  // launched with pdl_launch
  pdl_trigger();
  for (int64_t i = threadIdx.x; i < M * K8; i += blockDim.x)
    xs[i] = __ldg(reinterpret_cast<const uint4*>(x) + m0 * K8 + i);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t r = int64_t(blockIdx.x) * 8 + (threadIdx.x >> 5);
  if (r >= j.start[j.n]) return;
  int si = 0;
  while (r >= j.start[si + 1]) ++si;
  const GemvSeg& g = j.s[si];
  const int64_t n = r - j.start[si];
  const bool two = g.mode == 1;
  const uint4* w0 = reinterpret_cast<const uint4*>(g.w + n * K);
  const uint4* w1 = two ? reinterpret_cast<const uint4*>(g.w + (n + g.rows) * K) : w0;
  float a0[MB], a1[MB];
#pragma unroll
  for (int m = 0; m < MB; ++m) a0[m] = a1[m] = 0.f;
  // U chunks of 16 bytes per lane in flight per row before any arithmetic (the row is read once: latency-bound)
  constexpr int U = 4;
  for (int64_t c0 = lane; c0 < K8; c0 += 32 * U) {
    uint4 wa[U], wb[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = c0 + 32 * u;
      if (c < K8) {
        wa[u] = __ldg(w0 + c);
        if (two) wb[u] = __ldg(w1 + c);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = c0 + 32 * u;
      if (c >= K8) break;
      float fa[8], fb[8], xv[8];
      bf16x8(wa[u], fa);
      if (two) bf16x8(wb[u], fb);
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        if (m >= M) break;
        bf16x8(xs[m * K8 + c], xv);
#pragma unroll
        for (int i = 0; i < 8; ++i) a0[m] += fa[i] * xv[i];
        if (two) {
#pragma unroll
          for (int i = 0; i < 8; ++i) a1[m] += fb[i] * xv[i];
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MB; ++m) {
    if (m >= M) break;
    a0[m] = warp_sum(a0[m]);
    if (two) a1[m] = warp_sum(a1[m]);
  }
  if (lane != 0) return;
#pragma unroll
  for (int m = 0; m < MB; ++m) {
    if (m >= M) break;
    const int64_t o = (m0 + m) * g.rows + n;
    if (g.mode == 0) {
      stf(g.y, g.ydt, o, a0[m]);
    } else if (g.mode == 1) {
      stf(g.y, g.ydt, o, silu_f(round_dt(a0[m], g.ydt)) * round_dt(a1[m], g.ydt));
    } else {
      const float s = round_dt(a0[m], g.ydt);
      stf(g.y, g.ydt, o, ldf(g.y, g.ydt, o) + sigmoid_f(ldf(g.gate, g.gdt, m0 + m)) * s);
    }
  }
}

__global__ void k_convert(const void* x, int xdt, void* y, int ydt, int64_t n) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    stf(y, ydt, i, ldf(x, xdt, i));
}

// q/k RMSNorm + partial NeoX rotary with interleaved mRoPE. One block per (token, head).
// src row stride `sstride` elements, head offset `hstride`; dst [T, N, Dh].
// One of the two head sets of k_norm_rope: heads [0, N) of rows sstride apart, head h at h·hstride; output [T, N, Dh].
struct NormRopeSet {
  const void* src;
  int sdt;
  int64_t sstride, hstride;
  const float* w;
  void* dst;
  int ddt;
  int64_t N;
  void* gate;  // (q only) the gate half of each head row, copied out: [T, N, Dh]
  int64_t goff;
};
// The paged KV cache as k_norm_rope's destination for set B (qk_norm_rope_kv): set B's output rows go to the
// cache (at the row k_kv_write would write) instead of B.dst, and blocks y ≥ A.N + B.N copy v head y − A.N − B.N
// into the v cache. kc == nullptr: no cache (B.dst as usual). cdt == B.ddt == v's dtype (the caller checks), so
// the cache holds the bits the separate write would copy.
// Element offset of token t's row in a paged KV cache [num_blocks, bs, row]: position ctx_len + (t − q_start) of
// its sequence, through the block table (k_kv_write, and k_norm_rope's cache destination).
__device__ __forceinline__ int64_t kv_row_offset(const int32_t* seq_of, const int32_t* seqinfo, const int32_t* blocks,
                                                 int maxb, int64_t bs, int64_t row, int64_t t) {
  const int s = seq_of[t];
  const int64_t pos = seqinfo[s * 4 + 2] + (t - seqinfo[s * 4 + 0]);
  const int64_t blk = blocks[int64_t(s) * maxb + pos / bs];
  return (blk * bs + pos % bs) * row;
}
struct KvDst {
  void *kc = nullptr, *vc = nullptr;
  const void* v = nullptr;
  int cdt = 0;
  int64_t row = 0, bs = 0;  // Nkv·Dh, block size
  const int32_t *seq_of = nullptr, *seqinfo = nullptr, *blocks = nullptr;
  int maxb = 0;
  __device__ int64_t row_offset(int64_t t) const { return kv_row_offset(seq_of, seqinfo, blocks, maxb, bs, row, t); }
};
// Blocks y < A.N take set A's head y, the rest set B's head y − A.N (q and k of an attention layer in one launch).
// meta_early: what comes from the batch table (uploaded before the step, written by no kernel) — the cache row and the
// positions of the rotary angles — is read before the PDL wait (session 21), else after it.
__global__ void k_norm_rope(const NormRopeSet A, const NormRopeSet B, float eps, int64_t Dh, int rot,
                            const float* inv_freq, const int32_t* axis, const int32_t* pos, int64_t T, const KvDst C,
                            int meta_early) {
  if (C.kc && blockIdx.y >= A.N + B.N) {  // a v head into the v cache
    if (!meta_early) {
      pdl_wait();  // PDL-launched (pdl.h)
      pdl_trigger();
    }
    const int64_t t = blockIdx.x, h = blockIdx.y - A.N - B.N, o = C.row_offset(t) + h * Dh;
    if (meta_early) {
      pdl_wait();
      pdl_trigger();
    }
    for (int64_t d = threadIdx.x; d < Dh; d += blockDim.x)
      stf(C.vc, C.cdt, o + d, ldf(C.v, C.cdt, t * C.row + h * Dh + d));
    return;
  }
  const bool second = blockIdx.y >= A.N;
  const NormRopeSet& S = second ? B : A;
  const void* const src = S.src;
  const int sdt = S.sdt, ddt = S.ddt;
  const int64_t sstride = S.sstride, hstride = S.hstride, N = S.N, goff = S.goff;
  void* const dst = S.dst;
  void* const gate = S.gate;
  float wv[4];  // the norm weight before the wait: Dh ≤ 512, blockDim.x ≥ 128, so ≤ 4 per thread
  load_cols(S.w, Dh, blockDim.x, wv);
  if (!meta_early) {
    pdl_wait();  // PDL-launched (pdl.h)
    pdl_trigger();
  }
  const int64_t t = blockIdx.x, h = second ? blockIdx.y - A.N : blockIdx.y;
  const int half = rot / 2;
  // Set B into the cache (KvDst): its row there, head h. ang[j]: the rotary angle of column threadIdx.x + j·blockDim.x.
  const bool to_cache = second && C.kc;
  void* const out_p = to_cache ? C.kc : dst;
  const int64_t out_o = to_cache ? C.row_offset(t) + h * Dh : (t * N + h) * Dh;
  float ang[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t d = threadIdx.x + int64_t(j) * blockDim.x;
    const int i = int(d < half ? d : d - half);
    ang[j] = d < rot ? float(pos[axis[i] * T + t]) * inv_freq[i] : 0.f;
  }
  if (meta_early) {
    pdl_wait();
    pdl_trigger();
  }
  __shared__ float v[512];
  const int64_t base = t * sstride + h * hstride;
  float ss = 0.f;
  for (int64_t d = threadIdx.x; d < Dh; d += blockDim.x) {
    float x = ldf(src, sdt, base + d);
    v[d] = x;
    ss += x * x;
    if (gate) stf(gate, ddt, (t * N + h) * Dh + d, ldf(src, sdt, base + goff + d));
  }
  ss = block_sum(ss);  // contains __syncthreads
  const float inv = 1.f / sqrtf(ss / float(Dh) + eps);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t d = threadIdx.x + int64_t(j) * blockDim.x;
    if (d < Dh) v[d] = v[d] * inv * wv[j];
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t d = threadIdx.x + int64_t(j) * blockDim.x;
    if (d >= Dh) break;
    float out;
    if (d < half) {
      out = v[d] * cosf(ang[j]) - v[d + half] * sinf(ang[j]);
    } else if (d < rot) {
      const int i = int(d) - half;
      out = v[d] * cosf(ang[j]) + v[i] * sinf(ang[j]);
    } else {
      out = v[d];
    }
    stf(out_p, ddt, out_o + d, out);
  }
}

__global__ void k_kv_write(void* kc, void* vc, int cdt, const void* k, const void* v, int sdt, int64_t row, int64_t bs,
                           const int32_t* seq_of, const int32_t* seqinfo, const int32_t* blocks, int maxb) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  const int64_t t = blockIdx.x;
  const int64_t dst = kv_row_offset(seq_of, seqinfo, blocks, maxb, bs, row, t);
  for (int64_t c = threadIdx.x; c < row; c += blockDim.x) {
    stf(kc, cdt, dst + c, ldf(k, sdt, t * row + c));
    stf(vc, cdt, dst + c, ldf(v, sdt, t * row + c));
  }
}

// Causal paged attention, online softmax in fp32. One block of 4 warps per (token, q head); the warps split
// the context and merge at the end. Dh ≤ 256, multiple of 32.
constexpr int kAttnWarps = 4;
__global__ void __launch_bounds__(kAttnWarps * 32) k_attention(const void* q, int qdt, const void* kc, const void* vc,
                                                                int cdt, int64_t Nh, int64_t Nkv, int64_t Dh,
                                                                int64_t bs, const int32_t* seq_of,
                                                                const int32_t* seqinfo, const int32_t* blocks, int maxb,
                                                                float scale, void* o, int odt) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  const int64_t t = blockIdx.x, h = blockIdx.y;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int nj = int(Dh / 32);
  const int64_t group = Nh / Nkv, g = h / group, row = Nkv * Dh;
  const int s = seq_of[t];
  const int64_t n_ctx = seqinfo[s * 4 + 2] + (t - seqinfo[s * 4 + 0]) + 1;
  const int32_t* bt = blocks + int64_t(s) * maxb;
  float qr[8], acc[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    qr[j] = j < nj ? ldf(q, qdt, (t * Nh + h) * Dh + lane + 32 * j) * scale : 0.f;
    acc[j] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int64_t p = w; p < n_ctx; p += kAttnWarps) {
    const int64_t off = (int64_t(bt[p / bs]) * bs + p % bs) * row + g * Dh;
    float d = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (j < nj) d += qr[j] * ldf(kc, cdt, off + lane + 32 * j);
    d = warp_sum(d);
    const float mn = fmaxf(m, d);
    const float corr = expf(m - mn), e = expf(d - mn);
    l = l * corr + e;
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (j < nj) acc[j] = acc[j] * corr + e * ldf(vc, cdt, off + lane + 32 * j);
    m = mn;
  }
  __shared__ float sm[kAttnWarps], sl[kAttnWarps], sacc[kAttnWarps][256];
  if (lane == 0) {
    sm[w] = m;
    sl[w] = l;
  }
#pragma unroll
  for (int j = 0; j < 8; ++j)
    if (j < nj) sacc[w][lane + 32 * j] = acc[j];
  __syncthreads();
  float M = -INFINITY;
  for (int i = 0; i < kAttnWarps; ++i) M = fmaxf(M, sm[i]);
  float L = 0.f;
  for (int i = 0; i < kAttnWarps; ++i) L += sm[i] == -INFINITY ? 0.f : sl[i] * expf(sm[i] - M);
  for (int64_t d = threadIdx.x; d < Dh; d += blockDim.x) {
    float sum = 0.f;
    for (int i = 0; i < kAttnWarps; ++i)
      if (sm[i] != -INFINITY) sum += sacc[i][d] * expf(sm[i] - M);
    stf(o, odt, (t * Nh + h) * Dh + d, sum / L);
  }
}

// Causal depthwise conv1d + SiLU with the state window. One thread per (channel, sequence).
template <int KC>
__global__ void k_conv1d(const void* mixed, int mdt, const float* weight, float* conv_state, const int32_t* seqinfo,
                         int64_t C, void* out, int odt) {
  const int64_t ch = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int s = blockIdx.y;
  if (ch >= C) return;
  constexpr int W = KC - 1;
  const int64_t qs = seqinfo[s * 4 + 0], ql = seqinfo[s * 4 + 1], slot = seqinfo[s * 4 + 3];
  float* st = conv_state + (slot * C + ch) * W;
  float wv[KC], win[KC];
#pragma unroll
  for (int j = 0; j < KC; ++j) wv[j] = weight[ch * KC + j];
#pragma unroll
  for (int j = 0; j < W; ++j) win[j] = st[j];
  for (int64_t i = 0; i < ql; ++i) {
    win[W] = ldf(mixed, mdt, (qs + i) * C + ch);
    float acc = 0.f;
#pragma unroll
    for (int j = 0; j < KC; ++j) acc += wv[j] * win[j];
    stf(out, odt, (qs + i) * C + ch, silu_f(acc));
#pragma unroll
    for (int j = 0; j < W; ++j) win[j] = win[j + 1];
  }
#pragma unroll
  for (int j = 0; j < W; ++j) st[j] = win[j];
}

// Prefill form of the same conv: one thread per (channel, token), reading the state window for the first
// KC − 1 positions of each sequence; k_conv1d_state then moves each sequence's last KC − 1 inputs into the state.
template <int KC>
__device__ __forceinline__ float conv_in(const void* mixed, int mdt, const float* st, int64_t qs, int64_t C,
                                         int64_t ch, int64_t j) {
  return j >= 0 ? ldf(mixed, mdt, (qs + j) * C + ch) : st[(KC - 1) + j];
}
template <int KC>
__global__ void k_conv1d_tokens(const void* mixed, int mdt, const float* weight, const float* conv_state,
                                const int32_t* seq_of, const int32_t* seqinfo, int64_t C, void* out, int odt,
                                int64_t min_ql) {
  const int64_t ch = blockIdx.x * int64_t(blockDim.x) + threadIdx.x, t = blockIdx.y;
  if (ch >= C) return;
  const int s = seq_of[t];
  const int64_t qs = seqinfo[s * 4 + 0], ql = seqinfo[s * 4 + 1], slot = seqinfo[s * 4 + 3], i = t - qs;
  if (i < 0 || i >= ql) return;  // a row outside every sequence (a speculative rollback's batch; ops.h)
  if (ql < min_ql) return;       // a short chunk the fused kernels took (deltanet_mix, gdr_decode.h)
  const float* st = conv_state + (slot * C + ch) * (KC - 1);
  float acc = 0.f;
#pragma unroll
  for (int j = 0; j < KC; ++j) acc += weight[ch * KC + j] * conv_in<KC>(mixed, mdt, st, qs, C, ch, i - (KC - 1) + j);
  stf(out, odt, t * C + ch, silu_f(acc));
}
// k_conv1d_tokens8's pieces (with bf16x8 for a row's 8 inputs): the state window's 8 channels at position jj < 0 of
// a sequence (slot's window, its last KC − 1 inputs); silu of 8 sums stored as 8 bf16.
template <int KC>
__device__ __forceinline__ void conv_state8(const float* __restrict__ conv_state, int64_t slot, int64_t C, int64_t c8,
                                            int64_t jj, float (&in)[8]) {
  const float* st = conv_state + (slot * C + c8) * (KC - 1) + (KC - 1) + jj;
#pragma unroll
  for (int e = 0; e < 8; ++e) in[e] = st[e * (KC - 1)];
}
__device__ __forceinline__ void store_silu8(__nv_bfloat16* o, const float (&acc)[8]) {
  uint4 u;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
  for (int e = 0; e < 4; ++e) h[e] = __floats2bfloat162_rn(silu_f(acc[2 * e]), silu_f(acc[2 * e + 1]));
  *reinterpret_cast<uint4*>(o) = u;
}
// The same for bf16 in and out with C % 8 == 0: one thread per (8 channels, kConvTT consecutive tokens), its 8 × KC
// taps in registers (loaded once), 16-byte activation loads and stores (the scalar form above spends its time on
// per-element dtype switches and re-reading the taps). Each channel's taps are added in the same order as above,
// so the bits are the same. A full tile inside one sequence loads each input row once per 8-token pass (the sliding
// window) instead of once per window it is in (CudaOps.DeltaNet compares both forms bit for bit).
constexpr int kConvTT = 16;
template <int KC>
__global__ void __launch_bounds__(128) k_conv1d_tokens8(const __nv_bfloat16* __restrict__ mixed,
                                                        const float* __restrict__ weight,
                                                        const float* __restrict__ conv_state,
                                                        const int32_t* __restrict__ seq_of,
                                                        const int32_t* __restrict__ seqinfo, int64_t C, int64_t T,
                                                        __nv_bfloat16* __restrict__ out, int64_t min_ql,
                                                        bool env_off_sliding) {
  const int64_t c8 = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) * 8, t0 = int64_t(blockIdx.y) * kConvTT;
  if (c8 >= C) return;
  float wv[8][KC];
#pragma unroll
  for (int e = 0; e < 8; ++e)
#pragma unroll
    for (int j = 0; j < KC; ++j) wv[e][j] = weight[(c8 + e) * KC + j];
  // The sequence table is read once when the thread's tokens all lie in one sequence (the usual case), so the tokens'
  // loads do not wait on a chain of table lookups each.
  const int64_t t1 = t0 + kConvTT < T ? t0 + kConvTT : T;
  const int s0 = seq_of[t0];
  const int64_t qs0 = seqinfo[s0 * 4 + 0], ql0 = seqinfo[s0 * 4 + 1], slot0 = seqinfo[s0 * 4 + 3];
  const bool one = qs0 <= t0 && t1 <= qs0 + ql0;  // every token of the thread inside sequence s0's rows
  // The usual case (a full run of kConvTT tokens inside one long sequence): every input row the thread's windows
  // touch loaded once, all loads issued before the first use (the loop below re-loads a row for each of the KC
  // windows it is in, one token at a time). The same products in the same order: the same bits.
  if (one && t1 - t0 == kConvTT && ql0 >= min_ql && !env_off_sliding) {
    constexpr int kHalf = kConvTT / 2;  // tokens per pass: its rows' loads all in flight, registers bounded
#pragma unroll 1
    for (int64_t tb = t0; tb < t1; tb += kHalf) {
      const int64_t i0 = tb - qs0;
      uint4 rows[kHalf + KC - 1];
#pragma unroll
      for (int r = 0; r < kHalf + KC - 1; ++r)
        if (i0 - (KC - 1) + r >= 0)
          rows[r] = *reinterpret_cast<const uint4*>(mixed + (qs0 + i0 - (KC - 1) + r) * C + c8);
#pragma unroll
      for (int tt = 0; tt < kHalf; ++tt) {
        float acc[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = 0.f;
#pragma unroll
        for (int j = 0; j < KC; ++j) {
          const int r = tt + j;
          const int64_t jj = i0 - (KC - 1) + r;
          float in[8];
          if (jj >= 0) bf16x8(rows[r], in);
          else conv_state8<KC>(conv_state, slot0, C, c8, jj, in);  // before the sequence's first token (first pass)
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[e] += wv[e][j] * in[e];
        }
        store_silu8(out + (tb + tt) * C + c8, acc);
      }
    }
    return;
  }
  for (int64_t t = t0; t < t1; ++t) {
    const int s = one ? s0 : seq_of[t];
    const int64_t qs = one ? qs0 : seqinfo[s * 4 + 0], ql = one ? ql0 : seqinfo[s * 4 + 1],
                  slot = one ? slot0 : seqinfo[s * 4 + 3], i = t - qs;
    if (i < 0 || i >= ql || ql < min_ql) continue;  // a row outside every sequence (ops.h) or a short chunk the
                                                     // fused kernels took (deltanet_mix, gdr_decode.h)
    float acc[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = 0.f;
#pragma unroll
    for (int j = 0; j < KC; ++j) {
      const int64_t jj = i - (KC - 1) + j;
      float in[8];
      if (jj >= 0) bf16x8(*reinterpret_cast<const uint4*>(mixed + (qs + jj) * C + c8), in);
      else conv_state8<KC>(conv_state, slot, C, c8, jj, in);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] += wv[e][j] * in[e];
    }
    store_silu8(out + t * C + c8, acc);
  }
}
template <int KC>
__global__ void k_conv1d_state(const void* mixed, int mdt, float* conv_state, const int32_t* seqinfo, int64_t C,
                               int64_t min_ql) {
  const int64_t ch = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int s = blockIdx.y;
  if (ch >= C) return;
  const int64_t qs = seqinfo[s * 4 + 0], ql = seqinfo[s * 4 + 1], slot = seqinfo[s * 4 + 3];
  if (ql < min_ql) return;
  float* st = conv_state + (slot * C + ch) * (KC - 1);
  float win[KC - 1];
#pragma unroll
  for (int j = 0; j < KC - 1; ++j) win[j] = conv_in<KC>(mixed, mdt, st, qs, C, ch, ql - (KC - 1) + j);
#pragma unroll
  for (int j = 0; j < KC - 1; ++j) st[j] = win[j];
}

// Gated delta rule, step 1: L2-normalised q (scaled) and k per key head, decay g and beta per value head.
__global__ void k_gdr_prep(const void* qkv, int qdt, const void* ba, int bdt, const float* A_log, const float* dt_bias,
                           int64_t C, int64_t Hk, int64_t Hv, int64_t Dk, float qscale, float* qn, float* kn, float* g,
                           float* beta) {
  const int64_t t = blockIdx.x;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int64_t hh = w; hh < 2 * Hk; hh += nw) {
    const int64_t src = t * C + hh * Dk;  // q heads then k heads, contiguous
    float ss = 0.f;
    for (int64_t d = lane; d < Dk; d += 32) {
      float x = ldf(qkv, qdt, src + d);
      ss += x * x;
    }
    ss = warp_sum(ss);
    const float inv = 1.f / sqrtf(ss + 1e-6f);
    const bool isq = hh < Hk;
    float* dst = isq ? qn + (t * Hk + hh) * Dk : kn + (t * Hk + hh - Hk) * Dk;
    const float mul = isq ? qscale : 1.f;
    for (int64_t d = lane; d < Dk; d += 32) dst[d] = ldf(qkv, qdt, src + d) * inv * mul;
  }
  for (int64_t j = threadIdx.x; j < Hv; j += blockDim.x) {
    beta[t * Hv + j] = sigmoid_f(ldf(ba, bdt, t * 2 * Hv + j));
    g[t * Hv + j] = -expf(A_log[j]) * softplus_f(ldf(ba, bdt, t * 2 * Hv + Hv + j) + dt_bias[j]);
  }
}

// Step 2: the recurrence, token by token. One warp per (32 value columns, value head, sequence); each lane owns
// one column of the fp32 state S[:, d] in registers (DK values).
// Sequences with at least this many tokens in the step run k_gdr_long, the others k_gdr_recurrent; the choice
// depends on the sequence's own chunk only, never on what else is in the batch.
constexpr int64_t kGdrLongMin = 32;
static_assert(kGdnShortMax == kGdrLongMin, "deltanet_mix's fused kernels take exactly the short chunks");
// Long chunks (prefill): the step is a chain of ql dependent updates, so the per-token latency is what counts.
// R lanes share one state column (each holds DK/R rows) and reduce with shuffles: R× shorter chains per token
// and R× more warps than k_gdr_recurrent. Next token's inputs are fetched during the current one.
// One token's decay, beta and this lane's v for the delta-rule kernels (k_gdr_recurrent, k_gdr_long).
__device__ __forceinline__ void gdr_scalars(const float* g, const float* beta, const void* qkv, int qdt, int64_t t,
                                            int64_t Hv, int64_t j, int64_t C, int64_t voff, float& gr, float& br,
                                            float& vr) {
  gr = g[t * Hv + j];
  br = beta[t * Hv + j];
  vr = ldf(qkv, qdt, t * C + voff);
}
// LONG: the sequences of kGdrLongMin <= ql < long_max tokens (one warp per block; longer ones take the chunked
// kernels, gdr_chunked.h); else the shorter ones (decode, speculative verify and replay), WPB warps per block.
template <int DK, int R, int WPB = 1, bool LONG = true>
__global__ void __launch_bounds__(32 * WPB) k_gdr_long(const float* qn, const float* kn, const float* g,
                                                       const float* beta, const void* qkv, int qdt, int64_t C,
                                                       int64_t Hk, int64_t Hv, int64_t Dv, float* ssm,
                                                       const int32_t* seqinfo, void* o, int odt, int64_t long_max,
                                                       int round_bf16 = 0) {
  constexpr int CPW = 32 / R, RP = DK / R;
  static_assert(RP % 4 == 0, "rows per lane: whole float4s");
  const int lane = threadIdx.x & 31, r = lane % R;
  const int64_t d = (blockIdx.x * int64_t(WPB) + (threadIdx.x >> 5)) * CPW + lane / R, j = blockIdx.y;
  const int s = blockIdx.z;
  const int64_t qs = seqinfo[s * 4 + 0], ql = seqinfo[s * 4 + 1], slot = seqinfo[s * 4 + 3];
  if (LONG ? (ql < kGdrLongMin || ql >= long_max) : (ql == 0 || ql >= kGdrLongMin)) return;
  if (d >= Dv) return;  // whole warps: Dv is a multiple of 32
  const int64_t kh = j / (Hv / Hk);
  float* S = ssm + ((slot * Hv + j) * DK + int64_t(r) * RP) * Dv + d;
  float st[RP];
#pragma unroll
  for (int i = 0; i < RP; ++i) st[i] = S[int64_t(i) * Dv];
  float kr[RP], qr[RP], gr, br, vr;
  auto fetch = [&](int64_t t) {
    const float4* kp = reinterpret_cast<const float4*>(kn + (t * Hk + kh) * DK + r * RP);
    const float4* qp = reinterpret_cast<const float4*>(qn + (t * Hk + kh) * DK + r * RP);
#pragma unroll
    for (int i = 0; i < RP / 4; ++i) {
      const float4 a = kp[i], b = qp[i];
      kr[4 * i] = a.x, kr[4 * i + 1] = a.y, kr[4 * i + 2] = a.z, kr[4 * i + 3] = a.w;
      qr[4 * i] = b.x, qr[4 * i + 1] = b.y, qr[4 * i + 2] = b.z, qr[4 * i + 3] = b.w;
    }
    gdr_scalars(g, beta, qkv, qdt, t, Hv, j, C, 2 * Hk * DK + j * Dv + d, gr, br, vr);
  };
  fetch(qs);
  for (int64_t i = 0; i < ql; ++i) {
    const int64_t t = qs + i;
    float k[RP], q[RP];
#pragma unroll
    for (int e = 0; e < RP; ++e) k[e] = kr[e], q[e] = qr[e];
    const float decay = expf(gr), b = br, v = vr;
    if (i + 1 < ql) fetch(t + 1);
    float u = 0.f;
#pragma unroll
    for (int e = 0; e < RP; ++e) {
      st[e] *= decay;
      u += st[e] * k[e];
    }
#pragma unroll
    for (int off = R / 2; off > 0; off >>= 1) u += __shfl_xor_sync(0xffffffffu, u, off);
    u = b * (v - u);
    float out = 0.f;
#pragma unroll
    for (int e = 0; e < RP; ++e) {
      st[e] += k[e] * u;
      out += st[e] * q[e];
    }
#pragma unroll
    for (int off = R / 2; off > 0; off >>= 1) out += __shfl_xor_sync(0xffffffffu, out, off);
    if (r == 0) stf(o, odt, (t * Hv + j) * Dv + d, out);
    if (round_bf16 && i + 1 < ql) {  // a bf16 state of a short chunk: rounded after every token (ops.h StateLayer)
#pragma unroll
      for (int e = 0; e < RP; ++e) st[e] = round_dt(st[e], int(DType::BF16));
    }
  }
#pragma unroll
  for (int i = 0; i < RP; ++i) S[int64_t(i) * Dv] = st[i];
}

template <int DK>
__global__ void __launch_bounds__(32) k_gdr_recurrent(const float* qn, const float* kn, const float* g,
                                                      const float* beta, const void* qkv, int qdt, int64_t C,
                                                      int64_t Hk, int64_t Hv, int64_t Dv, float* ssm,
                                                      const int32_t* seqinfo, void* o, int odt, int round_bf16 = 0) {
  const int lane = threadIdx.x;
  const int64_t d = blockIdx.x * 32 + lane, j = blockIdx.y;
  const int s = blockIdx.z;
  const int64_t qs = seqinfo[s * 4 + 0], ql = seqinfo[s * 4 + 1], slot = seqinfo[s * 4 + 3];
  if (ql == 0 || ql >= kGdrLongMin) return;  // long chunks: k_gdr_long
  const int64_t kh = j / (Hv / Hk);
  float* S = ssm + ((slot * Hv + j) * DK) * Dv + d;
  float st[DK];
#pragma unroll
  for (int i = 0; i < DK; ++i) st[i] = S[int64_t(i) * Dv];
  // Token i + 1's k, q, decay, beta and v are loaded while token i computes (prefill is a chain of ql dependent
  // steps, each otherwise waiting a full memory latency); k and q go through shared memory, double-buffered.
  __shared__ float ks[2][DK], qsh[2][DK];
  constexpr int KPL = DK / 32;
  float kr[KPL], qr[KPL], gr = 0.f, br = 0.f, vr = 0.f;
  auto fetch = [&](int64_t t) {
#pragma unroll
    for (int c = 0; c < KPL; ++c) {
      kr[c] = kn[(t * Hk + kh) * DK + lane + 32 * c];
      qr[c] = qn[(t * Hk + kh) * DK + lane + 32 * c];
    }
    gdr_scalars(g, beta, qkv, qdt, t, Hv, j, C, 2 * Hk * DK + j * Dv + d, gr, br, vr);
  };
  fetch(qs);
  for (int64_t i = 0; i < ql; ++i) {
    const int64_t t = qs + i;
    const int buf = int(i & 1);
#pragma unroll
    for (int c = 0; c < KPL; ++c) {
      ks[buf][lane + 32 * c] = kr[c];
      qsh[buf][lane + 32 * c] = qr[c];
    }
    const float decay = expf(gr), b = br, v = vr;
    __syncwarp();
    if (i + 1 < ql) fetch(t + 1);
    // four partial sums: shorter dependency chains than one running sum over DK
    float u4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int e = 0; e < DK; ++e) {
      st[e] *= decay;
      u4[e & 3] += st[e] * ks[buf][e];
    }
    const float u = b * (v - ((u4[0] + u4[1]) + (u4[2] + u4[3])));
    float o4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int e = 0; e < DK; ++e) {
      st[e] += ks[buf][e] * u;
      o4[e & 3] += st[e] * qsh[buf][e];
    }
    stf(o, odt, (t * Hv + j) * Dv + d, (o4[0] + o4[1]) + (o4[2] + o4[3]));
    if (round_bf16 && i + 1 < ql) {  // a bf16 state of a short chunk: rounded after every token (ops.h StateLayer)
#pragma unroll
      for (int e = 0; e < DK; ++e) st[e] = round_dt(st[e], int(DType::BF16));
    }
  }
#pragma unroll
  for (int i = 0; i < DK; ++i) S[int64_t(i) * Dv] = st[i];
}

// A bf16 recurrent state's slots for the fp32 delta-rule kernels (gdr_run): the sequences of >= lo tokens, in batch
// order, take local slots 0, 1, ... of `wide`; to_wide: widened into it, and `info` = the sequence table with those
// local slots (0 for the sequences the kernels skip); else rounded back to bf16. Block (x, s): sequence s.
__global__ void k_state_bf16(__nv_bfloat16* st, float* wide, const int32_t* seqinfo, int64_t lo, int64_t per_slot,
                             int32_t* info, int to_wide) {
  const int s = blockIdx.y;
  const int64_t ql = seqinfo[s * 4 + 1], slot = seqinfo[s * 4 + 3];
  int64_t local = 0;
  for (int k = 0; k < s; ++k) local += seqinfo[k * 4 + 1] >= lo ? 1 : 0;
  if (to_wide && blockIdx.x == 0 && threadIdx.x < 4)
    info[s * 4 + threadIdx.x] = threadIdx.x == 3 ? int32_t(ql >= lo ? local : 0) : seqinfo[s * 4 + threadIdx.x];
  if (ql < lo) return;
  __nv_bfloat16* h = st + slot * per_slot;
  float* f = wide + local * per_slot;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < per_slot; e += int64_t(gridDim.x) * blockDim.x)
    if (to_wide) f[e] = __bfloat162float(h[e]);
    else h[e] = __float2bfloat16_rn(f[e]);
}

__global__ void k_gated_rmsnorm(const void* x, int xdt, const void* z, int zdt, const float* w, float eps, int64_t D,
                                void* y, int ydt) {
  pdl_trigger();  // the next kernel may be PDL-launched (pdl.h)
  const int64_t r = blockIdx.x;
  float ss = 0.f;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float v = ldf(x, xdt, r * D + d);
    ss += v * v;
  }
  ss = block_sum(ss);
  const float inv = 1.f / sqrtf(ss / float(D) + eps);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
    stf(y, ydt, r * D + d, ldf(x, xdt, r * D + d) * inv * w[d] * silu_f(ldf(z, zdt, r * D + d)));
}

// The same for bf16 x, z and y with D = 128·NC (DeltaNet's head size 128: NC = 1): one warp per row, 8-byte loads,
// 8 rows per block (the form above runs one 128-thread block per 128-value row and spends its time in block
// scheduling and the block-wide sum at prefill sizes). Same formula and evaluation order per element; the sum of
// squares is added in a different order (per lane, then across the warp), for every row count alike.
template <int NC>
__global__ void __launch_bounds__(256) k_gated_rmsnorm_warp(const __nv_bfloat16* __restrict__ x,
                                                            const __nv_bfloat16* __restrict__ z,
                                                            const float* __restrict__ w, float eps, int64_t R,
                                                            __nv_bfloat16* __restrict__ y) {
  pdl_trigger();  // the next kernel may be PDL-launched (pdl.h)
  constexpr int D = 128 * NC;
  const int64_t r = blockIdx.x * int64_t(blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (r >= R) return;
  float xv[NC][4];
  float ss = 0.f;
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    const uint2 u = *reinterpret_cast<const uint2*>(x + r * D + (c * 32 + lane) * 4);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
    const float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
    xv[c][0] = a.x, xv[c][1] = a.y, xv[c][2] = b.x, xv[c][3] = b.y;
#pragma unroll
    for (int e = 0; e < 4; ++e) ss += xv[c][e] * xv[c][e];
  }
  ss = warp_sum(ss);
  const float inv = 1.f / sqrtf(ss / float(D) + eps);
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    const int d0 = (c * 32 + lane) * 4;
    const uint2 u = *reinterpret_cast<const uint2*>(z + r * D + d0);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
    const float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
    const float zv[4] = {a.x, a.y, b.x, b.y};
    const float4 wv = *reinterpret_cast<const float4*>(w + d0);
    const float ww[4] = {wv.x, wv.y, wv.z, wv.w};
    float o[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) o[e] = xv[c][e] * inv * ww[e] * silu_f(zv[e]);
    uint2 v;
    __nv_bfloat162* hv = reinterpret_cast<__nv_bfloat162*>(&v);
    hv[0] = __floats2bfloat162_rn(o[0], o[1]);
    hv[1] = __floats2bfloat162_rn(o[2], o[3]);
    *reinterpret_cast<uint2*>(y + r * D + d0) = v;
  }
}

// Router: softmax over E ≤ 1024, top-k (ties to the lower index, as a stable sort), renormalised. Warp per token.
__global__ void k_moe_route(const void* logits, int ldt, int64_t T, int64_t E, int64_t K, int32_t* ids, float* wts) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  const int64_t t = blockIdx.x * int64_t(blockDim.x >> 5) + (threadIdx.x >> 5);
  if (t >= T) return;
  moe_route_token(logits, ldt, t, E, K, ids, wts, threadIdx.x & 31);  // moe_fuse.cuh
}
// k_moe_route with the compact router (moe_fuse.cuh moe_route_token_c: E ≤ 256, top-8, bf16 / fp32 logits).
template <typename LT, int KK>
__global__ void k_moe_route_c(const LT* __restrict__ logits, int T, int E, int32_t* __restrict__ ids,
                              float* __restrict__ wts) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  const int t = int(blockIdx.x) * int(blockDim.x >> 5) + int(threadIdx.x >> 5), lane = int(threadIdx.x & 31);
  if (t < T) moe_route_token_c<LT, KK>(logits, t, E, lane, ids, wts);
}

// ---- dense bf16 weights (int4 weights: int4_mma.cu) and warp-level dot products ----
struct DenseView {
  const __nv_bfloat16* w;  // [N, K]
  int64_t N, K;
};

__device__ __forceinline__ void load8(const __nv_bfloat16* x, float* out) {
  uint4 u = *reinterpret_cast<const uint4*>(x);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f = __bfloat1622float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void load8(const float* x, float* out) {
  float4 a = *reinterpret_cast<const float4*>(x), b = *reinterpret_cast<const float4*>(x + 4);
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w, out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}

// Lane-partial dot of weight row n with x (K values); caller reduces over the warp.
template <class XT>
__device__ __forceinline__ float lane_dot(const DenseView& W, int64_t n, const XT* x, int lane) {
  const __nv_bfloat16* row = W.w + n * W.K;
  float acc = 0.f;
  for (int64_t c = lane; c < W.K / 8; c += 32) {
    float wv[8], xv[8];
    load8(row + c * 8, wv);
    load8(x + c * 8, xv);
#pragma unroll
    for (int j = 0; j < 8; ++j) acc += wv[j] * xv[j];
  }
  return acc;
}

// Split-context attention (decode and prefill): one block per (token, kv head, split); its warps are the q heads of
// the group, so each K/V row is fetched from memory once for the whole group (the other warps hit L1). Each
// split covers ceil(n_ctx / S) positions, computed on the device from the context length, so a recorded graph
// stays valid as sequences grow. Each lane owns DPL = Dh/32 contiguous dims (one 16-byte load at Dh = 256).
// Partials (m, l, acc[Dh]) go to part [T, Nh, S, Dh + 2] fp32; k_attn_merge combines them.
// Rows of sequences with q_len ≥ flash_min are the flash kernel's (flash_attn.h): both kernels skip them.
template <int DPL>
__device__ __forceinline__ void load_dpl(const __nv_bfloat16* p, float* out) {
  if constexpr (DPL == 8) {
    load8(p, out);
  } else if constexpr (DPL == 4) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
    float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
    out[0] = a.x, out[1] = a.y, out[2] = b.x, out[3] = b.y;
  } else {
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
    out[0] = a.x, out[1] = a.y;
  }
}
// SM: K/V rows are staged in shared memory 16 positions at a time (cp.async, double-buffered), so each row is read
// from memory once per block instead of once per warp (the 8 warps of a GQA group otherwise each fetch it, mostly
// from L2). The arithmetic (pairs of positions from p0, a single tail) is the same in both forms: same bits.
template <int DPL, bool SM>
__global__ void k_attn_split(const __nv_bfloat16* q, const __nv_bfloat16* kc, const __nv_bfloat16* vc, int64_t Nh,
                             int64_t Nkv, int64_t bs, const int32_t* seq_of, const int32_t* seqinfo,
                             const int32_t* blocks, int maxb, float scale, int S, float* part, int flash_min) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  constexpr int Dh = DPL * 32;
  const int64_t t = blockIdx.x, g = blockIdx.y;
  const int split = blockIdx.z;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int64_t group = Nh / Nkv, h = g * group + w, row = Nkv * Dh;
  const bool active = w < group;  // (blockDim is 32·group: always; kept for the barriers of SM)
  if (!SM && !active) return;
  const int s = seq_of[t];
  if (seqinfo[s * 4 + 1] >= flash_min) return;  // block-uniform
  const int64_t n_ctx = seqinfo[s * 4 + 2] + (t - seqinfo[s * 4 + 0]) + 1;
  const int64_t chunk = (n_ctx + S - 1) / S, p0 = split * chunk, p1 = min(n_ctx, p0 + chunk);
  const int32_t* bt = blocks + int64_t(s) * maxb;
  float qr[DPL], acc[DPL];
  if (active) load_dpl<DPL>(q + (t * Nh + h) * Dh + lane * DPL, qr);
#pragma unroll
  for (int j = 0; j < DPL; ++j) {
    qr[j] *= scale;
    acc[j] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  // Two positions (this lane's DPL dims of their K and V rows), then a single one.
  auto pair = [&](const __nv_bfloat16* k0p, const __nv_bfloat16* k1p, const __nv_bfloat16* v0p,
                  const __nv_bfloat16* v1p) {
    float k0[DPL], k1[DPL], v0[DPL], v1[DPL];
    load_dpl<DPL>(k0p, k0);
    load_dpl<DPL>(k1p, k1);
    load_dpl<DPL>(v0p, v0);
    load_dpl<DPL>(v1p, v1);
    float d0 = 0.f, d1 = 0.f;
#pragma unroll
    for (int j = 0; j < DPL; ++j) {
      d0 += qr[j] * k0[j];
      d1 += qr[j] * k1[j];
    }
    d0 = warp_sum(d0);
    d1 = warp_sum(d1);
    const float mn = fmaxf(m, fmaxf(d0, d1));
    const float corr = expf(m - mn), e0 = expf(d0 - mn), e1 = expf(d1 - mn);
    l = l * corr + e0 + e1;
#pragma unroll
    for (int j = 0; j < DPL; ++j) acc[j] = acc[j] * corr + e0 * v0[j] + e1 * v1[j];
    m = mn;
  };
  auto single = [&](const __nv_bfloat16* k0p, const __nv_bfloat16* v0p) {
    float k0[DPL], v0[DPL];
    load_dpl<DPL>(k0p, k0);
    load_dpl<DPL>(v0p, v0);
    float d0 = 0.f;
#pragma unroll
    for (int j = 0; j < DPL; ++j) d0 += qr[j] * k0[j];
    d0 = warp_sum(d0);
    const float mn = fmaxf(m, d0);
    const float corr = expf(m - mn), e0 = expf(d0 - mn);
    l = l * corr + e0;
#pragma unroll
    for (int j = 0; j < DPL; ++j) acc[j] = acc[j] * corr + e0 * v0[j];
    m = mn;
  };
  auto off = [&](int64_t pp) { return (int64_t(bt[pp / bs]) * bs + pp % bs) * row + g * Dh; };
  if constexpr (!SM) {
    int64_t p = p0;
    for (; p + 1 < p1; p += 2) {  // four 16-byte loads in flight per lane
      const int64_t o0 = off(p) + lane * DPL, o1 = off(p + 1) + lane * DPL;
      pair(kc + o0, kc + o1, vc + o0, vc + o1);
    }
    if (p < p1) single(kc + off(p) + lane * DPL, vc + off(p) + lane * DPL);
  } else {
    constexpr int TP = 16, CH = Dh / 8;  // positions per tile, 16-byte chunks per row
    __shared__ __align__(16) __nv_bfloat16 sk[2][TP * Dh], sv[2][TP * Dh];
    auto load_tile = [&](int buf, int64_t tp) {
      const int n = int(min(int64_t(TP), p1 - tp));
      for (int i = threadIdx.x; i < n * CH; i += blockDim.x) {
        const int pi = i / CH, c = i % CH;
        const int64_t o = off(tp + pi) + c * 8;
        cp_async16(&sk[buf][pi * Dh + c * 8], kc + o);
        cp_async16(&sv[buf][pi * Dh + c * 8], vc + o);
      }
      cp_async_commit();
    };
    if (p0 < p1) load_tile(0, p0);
    int buf = 0;
    for (int64_t tp = p0; tp < p1; tp += TP, buf ^= 1) {
      if (tp + TP < p1) {
        load_tile(buf ^ 1, tp + TP);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      if (active) {
        const int n = int(min(int64_t(TP), p1 - tp));
        const __nv_bfloat16 *K = sk[buf] + lane * DPL, *V = sv[buf] + lane * DPL;
        int i = 0;
        for (; i + 1 < n; i += 2) pair(K + i * Dh, K + (i + 1) * Dh, V + i * Dh, V + (i + 1) * Dh);
        if (i < n) single(K + i * Dh, V + i * Dh);
      }
      __syncthreads();  // the buffer is refilled next iteration
    }
    if (!active) return;
  }
  float* dst = part + ((t * Nh + h) * S + split) * (Dh + 2);
  if (lane == 0) {
    dst[0] = m;
    dst[1] = l;
  }
#pragma unroll
  for (int j = 0; j < DPL; ++j) dst[2 + lane * DPL + j] = acc[j];
}
// o[t, h] = Σ_s acc_s · e^{m_s − M} / Σ_s l_s · e^{m_s − M}. One block of Dh threads per (token, head).
__global__ void k_attn_merge(const float* part, int64_t Nh, int64_t Dh, int S, void* o, int odt, const int32_t* seq_of,
                             const int32_t* seqinfo, int flash_min) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  const int64_t t = blockIdx.x, h = blockIdx.y;
  if (seqinfo[seq_of[t] * 4 + 1] >= flash_min) return;
  const float* src = part + (t * Nh + h) * S * (Dh + 2);
  float M = -INFINITY;
  for (int s = 0; s < S; ++s) M = fmaxf(M, src[s * (Dh + 2)]);
  float L = 0.f;
  for (int s = 0; s < S; ++s) {
    const float ms = src[s * (Dh + 2)];
    if (ms != -INFINITY) L += src[s * (Dh + 2) + 1] * expf(ms - M);
  }
  for (int64_t d = threadIdx.x; d < Dh; d += blockDim.x) {
    float sum = 0.f;
    for (int s = 0; s < S; ++s) {
      const float ms = src[s * (Dh + 2)];
      if (ms != -INFINITY) sum += src[s * (Dh + 2) + 2 + d] * expf(ms - M);
    }
    stf(o, odt, (t * Nh + h) * Dh + d, sum / L);
  }
}

// The same bits (the same operations in the same order), with the splits' (m, l) loaded at once into shared memory
// and e^{m_s − M} formed once per split, instead of three serial passes over global memory per thread (at batch 1
// there are 64 splits: ~130 dependent L2 loads before the first output). S ≤ kMergeMaxS.
constexpr int kMergeMaxS = 64;
// gate (attention_gated): o ← o·sigmoid(gate) as k_sigmoid_gate_mul would do it after the store (o rounded to its
// dtype first): the same bits as the two launches.
// meta_early: the row's sequence (batch table, uploaded before the step) is looked up before the PDL wait (session 21).
// min_pos > 0 (the tensor-core kernel's splits): only the row's first Se splits hold data (attn_live_splits,
// attn_decode.h), the rest are empty (m = −inf), which add nothing to the max, L or the sums; the loops stop at Se
// (session 38: at batch 1 the merge walked 64 splits for 16 live ones at 1k). The same bits.
__global__ void k_attn_merge_sm(const float* part, int64_t Nh, int64_t Dh, int S, void* o, int odt,
                                const int32_t* seq_of, const int32_t* seqinfo, int flash_min, const void* gate,
                                int gdt, int meta_early, int min_pos) {
  __shared__ float sm[kMergeMaxS], sl[kMergeMaxS], sw[kMergeMaxS];
  if (!meta_early) {
    pdl_wait();  // PDL-launched (pdl.h)
    pdl_trigger();
  }
  const int64_t t = blockIdx.x, h = blockIdx.y;
  const int sq = seq_of[t];
  const bool flash_row = seqinfo[sq * 4 + 1] >= flash_min;
  const int Se = attn_live_splits(seqinfo[sq * 4 + 2] + (int(t) - seqinfo[sq * 4 + 0]) + 1, S, min_pos);
  if (meta_early) {
    pdl_wait();
    pdl_trigger();
  }
  if (flash_row) return;
  const float* src = part + (t * Nh + h) * S * (Dh + 2);
  for (int s = threadIdx.x; s < Se; s += blockDim.x) {
    sm[s] = src[s * (Dh + 2)];
    sl[s] = src[s * (Dh + 2) + 1];
  }
  __syncthreads();
  float M = -INFINITY;
  for (int s = 0; s < Se; ++s) M = fmaxf(M, sm[s]);
  for (int s = threadIdx.x; s < Se; s += blockDim.x) sw[s] = sm[s] != -INFINITY ? expf(sm[s] - M) : 0.f;
  __syncthreads();
  float L = 0.f;
  for (int s = 0; s < Se; ++s)
    if (sm[s] != -INFINITY) L += sl[s] * sw[s];
  for (int64_t d = threadIdx.x; d < Dh; d += blockDim.x) {
    float sum = 0.f;
#pragma unroll 8
    for (int s = 0; s < Se; ++s) {
      // An empty split (m = −inf) may have written no acc (attn_decode.h min_pos): not read.
      const float a = sm[s] != -INFINITY ? src[s * (Dh + 2) + 2 + d] : 0.f;
      if (sm[s] != -INFINITY) sum += a * sw[s];
    }
    const int64_t i = (t * Nh + h) * Dh + d;
    float v = sum / L;
    if (gate) v = round_dt(v, odt) * sigmoid_f(ldf(gate, gdt, i));
    stf(o, odt, i, v);
  }
}

// MoE, per (token, k) pair p = t·K + k (grid.y): act[p] = silu(gate_e x_t) · (up_e x_t), fp32.
template <class WV>
__global__ void k_moe_gate_up(WV W, int64_t per_expert_rows, const __nv_bfloat16* x, const int32_t* ids, int64_t K,
                              int64_t I, int64_t P, float* act) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  const int lane = threadIdx.x & 31;
  const int64_t n = blockIdx.x * int64_t(blockDim.x >> 5) + (threadIdx.x >> 5);
  if (n >= I) return;
  for (int64_t p = blockIdx.y; p < P; p += gridDim.y) {
    const int64_t t = p / K, e = ids[p];
    const __nv_bfloat16* xr = x + t * W.K;
    const int64_t r0 = e * per_expert_rows;
    float gsum = warp_sum(lane_dot(W, r0 + n, xr, lane));
    float usum = warp_sum(lane_dot(W, r0 + I + n, xr, lane));
    if (lane == 0) act[p * I + n] = silu_f(gsum) * usum;
  }
}
// out[p] = down_e act[p], fp32.
template <class WV>
__global__ void k_moe_down(WV W, int64_t per_expert_rows, const float* act, const int32_t* ids, int64_t H, int64_t P,
                           float* out) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  const int lane = threadIdx.x & 31;
  const int64_t n = blockIdx.x * int64_t(blockDim.x >> 5) + (threadIdx.x >> 5);
  if (n >= H) return;
  for (int64_t p = blockIdx.y; p < P; p += gridDim.y) {
    const int64_t e = ids[p];
    float v = warp_sum(lane_dot(W, e * per_expert_rows + n, act + p * W.K, lane));
    if (lane == 0) out[p * H + n] = v;
  }
}
// ---- MoE grouped by expert (decode and prefill): each touched expert's weights are read once per group of up
// to 8 of its (token, k) pairs, instead of once per pair. ----
// Pairs p = t·K + k sorted by expert, one block (E ≤ 1024): meta[0] = number of active experts A, then
// active[A] expert ids (ascending), off[A + 1] start of each expert's pairs in list[P]. Order inside an expert
// is arbitrary: each pair writes its own output row, and the combine sums in k order.
__global__ void k_moe_group(const int32_t* ids, int64_t P, int64_t E, int32_t* meta, int32_t* active, int32_t* off,
                            int32_t* list) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  __shared__ int32_t cnt[1024], start[1024];
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) cnt[e] = 0;
  __syncthreads();
  for (int64_t p = threadIdx.x; p < P; p += blockDim.x) atomicAdd(&cnt[ids[p]], 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t na = 0, pos = 0;
    for (int64_t e = 0; e < E; ++e) {
      start[e] = pos;
      if (cnt[e] > 0) {
        active[na] = int32_t(e);
        off[na] = pos;
        ++na;
        pos += cnt[e];
      }
    }
    off[na] = pos;
    meta[0] = na;
  }
  __syncthreads();
  for (int64_t p = threadIdx.x; p < P; p += blockDim.x) list[atomicAdd(&start[ids[p]], 1)] = int32_t(p);
}

// 32 consecutive weights of row `row` starting at input 32·c (s = 1: dense weights carry no scale).
__device__ __forceinline__ void chunk32(const DenseView& W, int64_t row, int64_t c, float* w, float& s) {
  const __nv_bfloat16* r = W.w + row * W.K + c * 32;
#pragma unroll
  for (int q = 0; q < 4; ++q) load8(r + 8 * q, w + 8 * q);
  s = 1.f;
}

// Grouped expert projection. Block (warps of one output column each) × active-expert slot (grid.y).
// GATED: rows n and N + n of the expert (gate, up) → out[p, n] = silu(gate·x) · (up·x) (the gate_up half);
// else row n → out[p, n] = W x (the down half). x row of pair p: x + (p / xdiv) · K.
constexpr int kMoeTile = 8;
constexpr int64_t kMoeGroupedMinT = 64;
template <bool GATED, class WV, class XT>
__global__ void k_moe_grouped(WV W, int64_t per_expert_rows, int64_t N, const XT* x, int64_t xdiv,
                              const int32_t* meta, const int32_t* active, const int32_t* off, const int32_t* list,
                              float* out) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  const int j = blockIdx.y;
  if (j >= meta[0]) return;
  const int lane = threadIdx.x & 31;
  const int64_t n = blockIdx.x * int64_t(blockDim.x >> 5) + (threadIdx.x >> 5);
  if (n >= N) return;
  const int64_t e = active[j], p0 = off[j], p1 = off[j + 1];
  const int64_t r0 = e * per_expert_rows + n, r1 = r0 + N;
  for (int64_t pb = p0; pb < p1; pb += kMoeTile) {
    const int nb = p1 - pb < kMoeTile ? int(p1 - pb) : kMoeTile;
    int32_t pr[kMoeTile];
    float a0[kMoeTile], a1[kMoeTile];
#pragma unroll
    for (int m = 0; m < kMoeTile; ++m) {
      pr[m] = list[pb + (m < nb ? m : 0)];
      a0[m] = 0.f;
      a1[m] = 0.f;
    }
    for (int64_t c = lane; c < W.K / 32; c += 32) {
      float w0[32], w1[32], s0, s1 = 0.f;
      chunk32(W, r0, c, w0, s0);
      if (GATED) chunk32(W, r1, c, w1, s1);
#pragma unroll
      for (int m = 0; m < kMoeTile; ++m) {
        if (m < nb) {
          const XT* xr = x + (int64_t(pr[m]) / xdiv) * W.K + c * 32;
          float q0 = 0.f, q1 = 0.f;
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            float xv[8];
            load8(xr + 8 * q, xv);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
              q0 += xv[i] * w0[8 * q + i];
              if (GATED) q1 += xv[i] * w1[8 * q + i];
            }
          }
          a0[m] += s0 * q0;
          if (GATED) a1[m] += s1 * q1;
        }
      }
    }
#pragma unroll
    for (int m = 0; m < kMoeTile; ++m) {
      if (m < nb) {
        const float g = warp_sum(a0[m]);
        const float u = GATED ? warp_sum(a1[m]) : 0.f;
        if (lane == 0) out[int64_t(pr[m]) * N + n] = GATED ? silu_f(g) * u : g;
      }
    }
  }
}

// y[t] = Σ_k w[t,k] · out[t·K + k], summed in k order.
__global__ void k_moe_combine(const float* out, const float* wts, int64_t K, int64_t H, void* y, int ydt) {
  pdl_wait();  // PDL-launched (pdl.h)
  pdl_trigger();
  const int64_t t = blockIdx.x;
  for (int64_t d = blockIdx.y * int64_t(blockDim.x) + threadIdx.x; d < H; d += int64_t(gridDim.y) * blockDim.x)
    stf(y, ydt, t * H + d, moe_routed_sum(out, wts, K, H, t, d));  // moe_fuse.cuh
}

// ------------------------------------------------------------------------------------------------
// Host side

struct CudaLinear : LinearWeight {
  Tensor dense;          // bf16 [N, K] (dense weights)
  Tensor qw, sc, z;      // int4 in the mma layout (int4_mma.h)
  int G = 128;
  int zu = -1;  // MmaInt4::zu
  MmaInt4 mma() const {
    MmaInt4 m;
    m.qw = qw.ptr<uint4>(), m.sc = sc.ptr<uint16_t>(), m.z = z.ptr<uint8_t>(), m.N = N, m.K = K, m.G = G;
    m.KS = mma_int4_slices(K, G);
    m.zu = env_flag("DS_CUDA_NO_UNIFORM_ZERO") ? -1 : zu;  // (benchmark knob: load z anyway; the same bits)
    return m;
  }
};

struct CudaExperts : ExpertsWeight {
  bool int4 = false;
  // gate_up: E × [2I, K=H] rows stacked along N; down: E × [H, K=I].
  std::shared_ptr<CudaLinear> gu, down;
};

// fn(i) for i in [0, n), split over up to 16 host threads (load-time layout work).
template <class F>
static void parallel_for(int64_t n, F&& fn) {
  const int64_t nt = std::min<int64_t>({16, int64_t(std::max(1u, std::thread::hardware_concurrency())), n / 256 + 1});
  if (nt <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::vector<std::thread> th;
  for (int64_t k = 0; k < nt; ++k)
    th.emplace_back([&, k] {
      for (int64_t i = n * k / nt; i < n * (k + 1) / nt; ++i) fn(i);
    });
  for (auto& x : th) x.join();
}

// Environment switches that turn an optimisation off (for before/after measurements): set and non-"0".
bool pdl_enabled() {
  static const bool sm90 = [] {
    int dev = 0, major = 0;
    return cudaGetDevice(&dev) == cudaSuccess &&
           cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major >= 9;
  }();
  return sm90 && !std::getenv("DS_CUDA_NO_PDL");
}
bool meta_early() { return env_int("DS_META_EARLY", 1) != 0; }

static int blocks_for(int64_t n, int threads, int cap = 65535 * 4) {
  return int(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, cap)));
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : dev_(device) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) fail("--backend cuda: no CUDA device is available");
    if (device >= n) fail("--backend cuda: device ", device, " requested, ", n, " present");
    DS_CUDA_CHECK(cudaSetDevice(device));
    DS_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    cudaMemPool_t pool;
    DS_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
    uint64_t thr = UINT64_MAX;
    DS_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &thr));
    CKB(cublasCreate(&cublas_));
    CKB(cublasSetStream(cublas_, stream_));
    // A fixed cuBLAS workspace, so that GEMMs recorded into a graph allocate nothing.
    DS_CUDA_CHECK(cudaMalloc(&cublas_ws_, kCublasWorkspace));
    CKB(cublasSetWorkspace(cublas_, cublas_ws_, kCublasWorkspace));
  }
  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);
    if (aside_) cudaStreamSynchronize(aside_);
    for (auto& [t, e] : aside_events_) cudaEventDestroy(e);
    for (auto e : aside_free_) cudaEventDestroy(e);
    for (auto& [k, g] : graphs_)
      if (g.exec) cudaGraphExecDestroy(g.exec);
    cublasDestroy(cublas_);
    cudaFree(cublas_ws_);
    for (auto& c : arena_) cudaFree(c.ptr);
    // The stream is kept: tensors may outlive the backend and free onto it.
  }

  std::string name() const override { return "cuda"; }
  bool device_memory(int64_t* total, int64_t* used) override {
    size_t f = 0, t = 0;
    DS_CUDA_CHECK(cudaMemGetInfo(&f, &t));
    *total = int64_t(t);
    *used = int64_t(t - f);
    return true;
  }
  DType act_dtype() const override { return DType::BF16; }

  // ---- memory ----
  Tensor alloc(DType dt, std::vector<int64_t> shape) override {
    Tensor t;
    t.dtype = dt;
    t.shape = std::move(shape);
    t.device = Device::CUDA;
    const size_t n = std::max<size_t>(t.nbytes(), 16);
    if (in_step_) {  // zero-filled like any alloc (while recording: by the memset before each launch, graph_run)
      t = arena_tensor(std::move(t), n);
      if (capturing_ && zero_hoist_) {
        auto& z = rec_zero_[arena_chunk_];
        const size_t lo = size_t(static_cast<char*>(t.data) - static_cast<char*>(arena_[arena_chunk_].ptr));
        z.first = std::min(z.first, lo);
        z.second = std::max(z.second, lo + n);
        return t;
      }
      DS_CUDA_CHECK(cudaMemsetAsync(t.data, 0, n, stream_));
      return t;
    }
    void* p = nullptr;
    DS_CUDA_CHECK(cudaMallocAsync(&p, n, stream_));
    DS_CUDA_CHECK(cudaMemsetAsync(p, 0, n, stream_));
    cudaStream_t s = stream_;
    t.data = p;
    t.owner = std::shared_ptr<void>(p, [s](void* q) { cudaFreeAsync(q, s); });
    return t;
  }
  Tensor upload_bytes(const void* src, size_t n, DType dt, std::vector<int64_t> shape) {
    Tensor t = alloc(dt, std::move(shape));
    DS_CHECK(t.nbytes() == n);
    if (n) DS_CUDA_CHECK(cudaMemcpyAsync(t.data, src, n, cudaMemcpyHostToDevice, stream_));
    return t;
  }
  Tensor upload_f32(const std::vector<float>& v, std::vector<int64_t> shape, DType dt) override {
    int64_t cnt = 1;
    for (auto d : shape) cnt *= d;
    DS_CHECK(int64_t(v.size()) == cnt);
    if (dt == DType::F32) return upload_bytes(v.data(), v.size() * 4, dt, std::move(shape));
    if (dt == DType::BF16) {
      std::vector<uint16_t> h(v.size());
      for (size_t i = 0; i < v.size(); ++i) h[i] = f32_to_bf16(v[i]);
      return upload_bytes(h.data(), h.size() * 2, dt, std::move(shape));
    }
    if (dt == DType::F16) {
      std::vector<uint16_t> h(v.size());
      for (size_t i = 0; i < v.size(); ++i) h[i] = f32_to_f16(v[i]);
      return upload_bytes(h.data(), h.size() * 2, dt, std::move(shape));
    }
    if (dt == DType::I32) {
      std::vector<int32_t> h(v.size());
      for (size_t i = 0; i < v.size(); ++i) h[i] = int32_t(v[i]);
      return upload_bytes(h.data(), h.size() * 4, dt, std::move(shape));
    }
    fail("cuda upload: unsupported dtype ", dtype_name(dt));
  }
  std::vector<float> to_host_f32(const Tensor& t) override {
    std::vector<float> v(size_t(t.numel()));
    std::vector<uint8_t> raw(t.nbytes());
    if (!raw.empty()) DS_CUDA_CHECK(cudaMemcpyAsync(raw.data(), t.data, raw.size(), cudaMemcpyDeviceToHost, stream_));
    DS_CUDA_CHECK(cudaStreamSynchronize(stream_));
    if (t.dtype == DType::F32) std::memcpy(v.data(), raw.data(), raw.size());
    else if (t.dtype == DType::BF16)
      for (size_t i = 0; i < v.size(); ++i) v[i] = bf16_to_f32(reinterpret_cast<uint16_t*>(raw.data())[i]);
    else if (t.dtype == DType::F16)
      for (size_t i = 0; i < v.size(); ++i) v[i] = f16_to_f32(reinterpret_cast<uint16_t*>(raw.data())[i]);
    else if (t.dtype == DType::I32)
      for (size_t i = 0; i < v.size(); ++i) v[i] = float(reinterpret_cast<int32_t*>(raw.data())[i]);
    else fail("cuda to_host: unsupported dtype ", dtype_name(t.dtype));
    return v;
  }
  void zero(Tensor& t) override {
    if (t.nbytes()) DS_CUDA_CHECK(cudaMemsetAsync(t.data, 0, t.nbytes(), stream_));
  }
  void copy(Tensor& dst, const Tensor& src) override {
    DS_CHECK(dst.nbytes() == src.nbytes() && dst.dtype == src.dtype);
    const cudaMemcpyKind kind = dst.device == Device::CUDA && src.device == Device::CUDA ? cudaMemcpyDeviceToDevice
                                                                                        : cudaMemcpyDefault;
    if (src.nbytes()) DS_CUDA_CHECK(cudaMemcpyAsync(dst.data, src.data, src.nbytes(), kind, stream_));
  }
  Tensor alloc_host(DType dt, std::vector<int64_t> shape) override {
    Tensor t;
    t.dtype = dt;
    t.shape = std::move(shape);
    t.device = Device::CPU;
    // Not cudaHostAlloc: it holds the driver's lock while it faults in and pins every page (~30 ms for 62.8 MiB on
    // the H200 machine), and every launch of other threads waits that long. Here the pages are faulted in first
    // (huge pages where the kernel gives them) and only registering them holds the lock (~1-4 ms; session 46).
    const size_t align = size_t(2) << 20, n = (std::max<size_t>(t.nbytes(), 16) + align - 1) / align * align;
    void* p = std::aligned_alloc(align, n);
    if (!p) fail("could not allocate ", double(n) / (1 << 20), " MiB of host memory");
    (void)madvise(p, n, MADV_HUGEPAGE);
    std::memset(p, 0, n);
    const cudaError_t e = cudaHostRegister(p, n, cudaHostRegisterDefault);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      std::free(p);
      fail("could not pin ", double(n) / (1 << 20), " MiB of host memory: ", cudaGetErrorString(e));
    }
    t.data = p;
    t.owner = std::shared_ptr<void>(p, [](void* q) {
      cudaHostUnregister(q);
      std::free(q);
    });
    return t;
  }
  void synchronize() override {
    DS_CUDA_CHECK(cudaStreamSynchronize(stream_));
    if (aside_) DS_CUDA_CHECK(cudaStreamSynchronize(aside_));
  }
  uint64_t copy_aside(const std::vector<std::pair<Tensor, Tensor>>& dst_src) override {
    if (!aside_) DS_CUDA_CHECK(cudaStreamCreateWithFlags(&aside_, cudaStreamNonBlocking));
    // Events of finished tickets go back (the aside stream is serial: a finished one means all before it are).
    while (!aside_events_.empty() && cudaEventQuery(aside_events_.front().second) == cudaSuccess) {
      aside_free_.push_back(aside_events_.front().second);
      aside_events_.pop_front();
    }
    (void)cudaGetLastError();  // cudaEventQuery's cudaErrorNotReady
    auto event = [&] {
      cudaEvent_t e;
      if (!aside_free_.empty()) {
        e = aside_free_.back();
        aside_free_.pop_back();
      } else {
        DS_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
      }
      return e;
    };
    cudaEvent_t start = event(), done = event();
    DS_CUDA_CHECK(cudaEventRecord(start, stream_));
    DS_CUDA_CHECK(cudaStreamWaitEvent(aside_, start, 0));
    for (const auto& [d, s] : dst_src) {
      DS_CHECK(d.nbytes() == s.nbytes() && d.dtype == s.dtype);
      if (s.nbytes()) DS_CUDA_CHECK(cudaMemcpyAsync(d.data, s.data, s.nbytes(), cudaMemcpyDefault, aside_));
    }
    DS_CUDA_CHECK(cudaEventRecord(done, aside_));
    aside_free_.push_back(start);  // reusable once recorded: the wait above took its state
    aside_events_.emplace_back(++aside_ticket_, done);
    return aside_ticket_;
  }
  void wait_aside(uint64_t ticket) override {
    for (const auto& [t, e] : aside_events_)
      if (t == ticket) DS_CUDA_CHECK(cudaStreamWaitEvent(stream_, e, 0));
    // Not pending: finished (its event went back), or 0.
  }

  // ---- weights ----
  std::shared_ptr<CudaLinear> build_linear(const std::vector<LinearSource>& parts, bool allow_int4 = true) {
    auto l = std::make_shared<CudaLinear>();
    l->K = parts.at(0).K;
    bool all_int4 = allow_int4;
    for (auto& p : parts) {
      DS_CHECK(p.K == l->K, "concatenated linears must share K");
      l->N += p.N;
      // int4 parts the tensor-core layout cannot hold (odd N, K or group size) are dequantized to bf16.
      if (p.kind != LinearSource::Kind::Int4 || p.group_size != parts[0].group_size ||
          !mma_int4_supported(p.N, p.K, p.group_size))
        all_int4 = false;
    }
    const int64_t N = l->N, K = l->K;
    if (all_int4) {
      const int G = parts[0].group_size;
      l->int4 = true;
      l->G = G;
      std::vector<uint32_t> qw(size_t(N * (K / 8)));
      std::vector<uint16_t> sc(size_t(N * (K / G)));  // fp16, the checkpoint's bits
      std::vector<uint8_t> z(size_t(N * (K / G)));
      int64_t n0 = 0;
      for (auto& p : parts) {
        const int64_t Np = p.N;
        // Host repack over threads (the 35B-A3B experts are ~17 GB of nibbles).
        parallel_for(Np / 16, [&](int64_t t) { mma_int4_pack_tile(p.qweight, Np, K, t, n0, qw.data()); });
        parallel_for(Np, [&](int64_t n) {
          for (int64_t g = 0; g < K / G; ++g) {
            sc[(n0 + n) * (K / G) + g] = p.scales[g * Np + n];
            z[(n0 + n) * (K / G) + g] =
                uint8_t(((uint32_t(p.qzeros[g * (Np / 8) + n / 8]) >> (4 * (n % 8))) & 0xF) + 1);
          }
        });
        n0 += Np;
      }
      l->qw = upload_bytes(qw.data(), qw.size() * 4, DType::U32, {N, K / 8});
      l->sc = upload_bytes(sc.data(), sc.size() * 2, DType::F16, {N, K / G});
      l->z = upload_bytes(z.data(), z.size(), DType::U8, {N, K / G});
      // One zero point everywhere (symmetric checkpoints): the decode kernels use it instead of loading z.
      if (!z.empty() && std::all_of(z.begin(), z.end(), [&](uint8_t v) { return v == z[0]; })) l->zu = z[0];
    } else {
      std::vector<uint16_t> h;
      h.reserve(size_t(N * K));
      for (auto& p : parts) append_bf16(p, h);
      l->dense = upload_bytes(h.data(), h.size() * 2, DType::BF16, {N, K});
    }
    DS_CUDA_CHECK(cudaStreamSynchronize(stream_));  // host staging buffers die here
    return l;
  }
  // Appends the [N, K] matrix of `p` as bf16 (int4 dequantized exactly in fp32, then rounded).
  static void append_bf16(const LinearSource& p, std::vector<uint16_t>& h) {
    const int64_t N = p.N, K = p.K, n = N * K;
    const size_t base = h.size();
    h.resize(base + size_t(n));
    uint16_t* W = h.data() + base;
    if (p.kind == LinearSource::Kind::Dense) {
      if (p.dtype == DType::BF16) std::memcpy(W, p.data, size_t(n) * 2);
      else if (p.dtype == DType::F32)
        for (int64_t i = 0; i < n; ++i) W[i] = f32_to_bf16(static_cast<const float*>(p.data)[i]);
      else if (p.dtype == DType::F16)
        for (int64_t i = 0; i < n; ++i) W[i] = f32_to_bf16(f16_to_f32(static_cast<const uint16_t*>(p.data)[i]));
      else
        fail("linear weight: expected F32, BF16 or F16, got ", dtype_name(p.dtype));
      return;
    }
    const int G = p.group_size;
    for (int64_t r = 0; r < K / 8; ++r)
      for (int64_t c = 0; c < N; ++c) {
        const uint32_t word = uint32_t(p.qweight[r * N + c]);
        for (int j = 0; j < 8; ++j) {
          const int64_t k = 8 * r + j, g = k / G;
          const int u = int((word >> (4 * j)) & 0xF);
          const int z = int((uint32_t(p.qzeros[g * (N / 8) + c / 8]) >> (4 * (c % 8))) & 0xF) + 1;
          W[c * K + k] = f32_to_bf16(f16_to_f32(p.scales[g * N + c]) * float(u - z));
        }
      }
  }

  Linear make_linear(const std::vector<LinearSource>& parts) override { return build_linear(parts); }

  Experts make_experts(const std::vector<std::vector<LinearSource>>& gate_up,
                       const std::vector<LinearSource>& down) override {
    auto e = std::make_shared<CudaExperts>();
    e->E = int64_t(down.size());
    e->H = down.at(0).N;
    e->I = down.at(0).K;
    std::vector<LinearSource> gu_all, dn_all;
    for (int64_t i = 0; i < e->E; ++i) {
      for (auto& p : gate_up[i]) gu_all.push_back(p);
      dn_all.push_back(down[i]);
    }
    e->gu = build_linear(gu_all);
    e->down = build_linear(dn_all);
    if (e->gu->int4 != e->down->int4) {  // one half cannot use the int4 layout: both run as bf16
      if (e->gu->int4) e->gu = build_linear(gu_all, false);
      else e->down = build_linear(dn_all, false);
    }
    DS_CHECK(e->gu->N == e->E * 2 * e->I && e->down->N == e->E * e->H);
    e->int4 = e->gu->int4;
    DS_CHECK(e->H % 32 == 0 && e->I % 32 == 0, "experts: H and I must be multiples of 32");
    return e;
  }

  // ---- batch ----
  void prepare_batch(BatchMeta& b) override {
    // While recording a step the mirror was prepared before the recording began (graph_run's contract).
    if (capturing_) {
      auto* d = static_cast<DevBatch*>(b.device.get());
      DS_CHECK(d && d->T == int(b.num_tokens()) && d->nseq == int(b.seqs.size()),
               "prepare_batch while recording a step graph: the batch must be prepared before the recording");
      return;
    }
    b.device = build_batch(b);
  }
  const DevBatch& dev(const BatchMeta& b) {
    auto* d = static_cast<DevBatch*>(b.device.get());
    if (!d || d->T != int(b.num_tokens()) || d->nseq != int(b.seqs.size())) {
      const_cast<BatchMeta&>(b).device = build_batch(b);
      d = static_cast<DevBatch*>(b.device.get());
    }
    return *d;
  }
  std::shared_ptr<void> build_batch(const BatchMeta& b) {
    auto d = std::make_shared<DevBatch>();
    const int T = int(b.num_tokens()), ns = int(b.seqs.size());
    int maxb = 1;
    for (auto& s : b.seqs) maxb = std::max(maxb, int(s.blocks.size()));
    // In a step the block table is padded to a power of two, so that the buffer (whose address a recorded
    // graph holds) keeps its size while sequences grow.
    if (in_step_) {
      int cap = 16;
      while (cap < maxb) cap *= 2;
      maxb = cap;
    }
    d->T = T;
    d->nseq = ns;
    d->maxb = maxb;
    std::vector<int32_t> h;
    h.insert(h.end(), b.tokens.begin(), b.tokens.end());
    const size_t o_pos = h.size();
    if (b.positions.size() == size_t(3 * T)) h.insert(h.end(), b.positions.begin(), b.positions.end());
    else h.resize(h.size() + 3 * T, 0);
    const size_t o_seq = h.size();
    h.resize(h.size() + T, 0);
    const size_t o_info = h.size();
    for (int s = 0; s < ns; ++s) {
      auto& q = b.seqs[s];
      for (int64_t i = 0; i < q.q_len; ++i) h[o_seq + q.q_start + i] = s;
      h.push_back(int32_t(q.q_start));
      h.push_back(int32_t(q.q_len));
      h.push_back(int32_t(q.ctx_len));
      h.push_back(q.state_slot);
    }
    const size_t o_blk = h.size();
    for (int s = 0; s < ns; ++s) {
      auto& bl = b.seqs[s].blocks;
      for (int i = 0; i < maxb; ++i) h.push_back(i < int(bl.size()) ? bl[i] : 0);
    }
    if (in_step_) {
      // One buffer per batch shape, outside the arena, at a fixed address while its shape lasts.
      Tensor& buf = step_batch_bufs_[{T, ns, maxb}];
      if (!buf.defined() || buf.numel() != int64_t(h.size())) {
        const bool was = in_step_;
        in_step_ = false;
        buf = alloc(DType::I32, {int64_t(h.size())});
        in_step_ = was;
      }
      DS_CUDA_CHECK(cudaMemcpyAsync(buf.data, h.data(), h.size() * 4, cudaMemcpyHostToDevice, stream_));
      d->buf = buf;
    } else {
      d->buf = upload_bytes(h.data(), h.size() * 4, DType::I32, {int64_t(h.size())});
    }
    last_batch_ = d->buf.data;
    const int32_t* base = d->buf.ptr<int32_t>();
    d->tokens = base;
    d->positions = base + o_pos;
    d->seq_of = base + o_seq;
    d->seqinfo = base + o_info;
    d->blocks = base + o_blk;
    return d;
  }

  // ---- ops ----
  void embed(const Tensor& table, const BatchMeta& b, Tensor& out) override {
    const int64_t H = table.dim(1), V = table.dim(0);
    for (int64_t t = 0; t < b.num_tokens(); ++t) {
      int32_t id = b.tokens[t];
      if (id < 0 || id >= V) fail("token id ", id, " is outside the vocabulary [0, ", V, ")");
    }
    if (b.num_tokens() == 0) return;
    auto& d = dev(b);
    DS_CUDA_CHECK(pdl_launch(k_embed, int(b.num_tokens()), 256, 0, stream_, table.data, int(table.dtype), d.tokens, H,
                             out.data, int(out.dtype)));
    DS_CUDA_CHECK_LAST();
  }

  void rmsnorm(const Tensor& x, const Tensor& w, float eps, Tensor& y) override {
    const int64_t D = w.numel(), R = x.numel() / D;
    if (R == 0) return;
    DS_CHECK(w.dtype == DType::F32);
    DS_CUDA_CHECK(pdl_launch(k_rmsnorm, unsigned(R), 256, 0, stream_, x.data, int(x.dtype), w.ptr<float>(), eps, D,
                             y.data, int(y.dtype)));
    DS_CUDA_CHECK_LAST();
  }

  void add_inplace(Tensor& x, const Tensor& y) override {
    const int64_t n = x.numel();
    if (!n) return;
    DS_CUDA_CHECK(
        pdl_launch(k_add, blocks_for(n, 256), 256, 0, stream_, x.data, int(x.dtype), y.data, int(y.dtype), n));
    DS_CUDA_CHECK_LAST();
  }

  // bf16 copy of x (x itself when it is already bf16)
  Tensor as_bf16(const Tensor& x) {
    if (x.dtype == DType::BF16) return x;
    Tensor c = alloc(DType::BF16, x.shape);
    DS_CUDA_CHECK(pdl_launch(k_convert, blocks_for(x.numel(), 256), 256, 0, stream_, x.data, int(x.dtype), c.data,
                             kBF16, x.numel()));
    DS_CUDA_CHECK_LAST();
    return c;
  }

  void gemm_bf16(const void* W, const void* x, int64_t T, int64_t N, int64_t K, Tensor& y) {
    const float alpha = 1.f, beta = 0.f;
    cudaDataType_t ct = y.dtype == DType::F32 ? CUDA_R_32F : y.dtype == DType::BF16 ? CUDA_R_16BF : CUDA_R_16F;
    CKB(cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, int(N), int(T), int(K), &alpha, W, CUDA_R_16BF, int(K), x,
                     CUDA_R_16BF, int(K), &beta, y.data, ct, int(N), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }

  // Whether bf16 weight l can run through the small-step kernel for T rows of xb (every decode and verify step): the
  // tensor-core kernel (bf16_mma.h; K a multiple of 8), or with DS_CUDA_NO_BF16_MMA=1 the GEMV (K in 16-byte chunks, x
  // of 4 rows in shared memory); both give rows whose bits do not depend on T. 16-byte aligned rows. Large N (lm_head)
  // and DS_CUDA_NO_GEMV=1: cuBLAS, which reads the lm_head at ~85% of bandwidth.
  static bool gemv_fits(const CudaLinear* l, const Tensor& xb, int64_t T) {
    if (l->int4 || T > kGemvMaxT || l->N > (int64_t(1) << 16) || env_flag("DS_CUDA_NO_GEMV")) return false;
    if (!env_flag("DS_CUDA_NO_BF16_MMA")) return bf16_mma_supported(l->K, l->dense.data, xb.data);
    auto al = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
    return l->K % 8 == 0 && 4 * l->K * 2 <= 48 * 1024 && al(l->dense.data) && al(xb.data);
  }
  // Weights of one input x through the small-step kernel (gemv_fits said yes for each).
  void gemv(const Tensor& xb, int64_t T, int64_t K, const std::vector<GemvSeg>& segs) {
    if (!env_flag("DS_CUDA_NO_BF16_MMA")) {
      std::vector<Bf16MmaSeg> ms(segs.size());
      for (size_t i = 0; i < segs.size(); ++i) {
        const GemvSeg& g = segs[i];
        ms[i].w = g.w, ms[i].y = g.y, ms[i].gate = g.gate, ms[i].ydt = g.ydt, ms[i].gdt = g.gdt, ms[i].mode = g.mode;
        ms[i].rows = g.rows;
      }
      bf16_mma_linear(ms.data(), int(ms.size()), xb.data, T, K, stream_);
      return;
    }
    for (size_t i0 = 0; i0 < segs.size(); i0 += kGemvSegs) {
      GemvJobs j;
      for (size_t i = i0; i < std::min(segs.size(), i0 + kGemvSegs); ++i) {
        j.s[j.n] = segs[i];
        j.start[j.n + 1] = j.start[j.n] + segs[i].rows;
        ++j.n;
      }
      const unsigned blocks = unsigned((j.start[j.n] + 7) / 8);
      const auto* xp = xb.ptr<__nv_bfloat16>();
      const int64_t mb = T <= 1 ? 1 : T <= 2 ? 2 : 4;
      const size_t sm = size_t(mb * K) * 2;
      auto* k = mb == 1 ? k_gemv_bf16<1> : mb == 2 ? k_gemv_bf16<2> : k_gemv_bf16<4>;
      DS_CUDA_CHECK(pdl_launch(k, dim3(blocks, unsigned((T + mb - 1) / mb)), dim3(256), sm, stream_, j, xp, int(T), K));
    }
  }
  static GemvSeg gemv_seg(const CudaLinear* l, Tensor& y, int mode) {
    GemvSeg g;
    g.w = l->dense.ptr<__nv_bfloat16>(), g.y = y.data, g.ydt = int(y.dtype), g.mode = mode;
    g.rows = mode == 1 ? l->N / 2 : l->N;
    return g;
  }

  // DS_CUDA_NO_FUSED=1: the fused ops run as their default compositions (for before/after benchmarks).
  void linear_group(const Tensor& x, const std::vector<LinearJob>& jobs) override {
    if (env_flag("DS_CUDA_NO_FUSED")) return Backend::linear_group(x, jobs);
    if (jobs.empty()) return;
    const int64_t K = (*jobs[0].w)->K, T = x.numel() / K;
    if (T == 0) return;
    Tensor xb = as_bf16(x);
    std::vector<GemvSeg> segs;
    std::vector<LinearJob> rest;
    std::vector<std::pair<const CudaLinear*, Tensor*>> q4;  // int4 jobs: up to three per launch
    for (const auto& j : jobs) {
      auto* l = static_cast<const CudaLinear*>(j.w->get());
      DS_CHECK(l->K == K, "linear_group: every weight must take the same input (K ", K, " vs ", l->K, ")");
      DS_CHECK(j.y->numel() == T * (j.swiglu ? l->N / 2 : l->N), "linear_group out ", shape_str(j.y->shape),
               " for N=", l->N, j.swiglu ? " (swiglu)" : "");
      const bool ydt_ok = j.y->dtype == DType::BF16 || j.y->dtype == DType::F32;
      if (gemv_fits(l, xb, T) && ydt_ok)
        segs.push_back(gemv_seg(l, *j.y, j.swiglu ? 1 : 0));
      else if (l->int4 && !j.swiglu && ydt_ok && (q4.empty() || q4[0].first->mma().KS == l->mma().KS))
        q4.push_back({l, j.y});
      else
        rest.push_back(j);
    }
    if (int4_via_cublas(T)) {
      for (auto& [l, y] : q4) int4_cublas(l, xb, T, *y);
      q4.clear();
    }
    // Three matrices per launch (the attention's q, k, v: the 512-row v alone was a 32-block launch, ~3 µs at
    // batch 1 and 9 µs at 64); DS_CUDA_INT4_GROUP=2: two, as before session 22.
    const size_t per = env_int("DS_CUDA_INT4_GROUP", 3) == 2 ? 2 : 3;
    for (size_t i = 0; i < q4.size(); i += per) {
      const size_t n = std::min(per, q4.size() - i);
      MmaInt4 m[3];
      void* y[3] = {};
      int dt[3] = {};
      for (size_t j = 0; j < n; ++j)
        m[j] = q4[i + j].first->mma(), y[j] = q4[i + j].second->data, dt[j] = int(q4[i + j].second->dtype);
      mma_int4_linear2(m[0], y[0], dt[0], n > 1 ? &m[1] : nullptr, y[1], dt[1], xb.data, T, stream_,
                       n > 2 ? &m[2] : nullptr, y[2], dt[2]);
    }
    Backend::linear_group(xb, rest);
    if (!segs.empty()) gemv(xb, T, K, segs);
  }

  void linear_gated_add(const Tensor& x, const Linear& w, const Tensor& gate_logit, Tensor& y) override {
    if (env_flag("DS_CUDA_NO_FUSED")) return Backend::linear_gated_add(x, w, gate_logit, y);
    auto* l = static_cast<const CudaLinear*>(w.get());
    const int64_t T = x.numel() / l->K;
    if (T == 0) return;
    Tensor xb = as_bf16(x);
    if (!gemv_fits(l, xb, T) || (y.dtype != DType::BF16 && y.dtype != DType::F32))
      return Backend::linear_gated_add(xb, w, gate_logit, y);
    DS_CHECK(y.numel() == T * l->N && gate_logit.numel() == T, "linear_gated_add: y ", shape_str(y.shape),
             ", gate ", shape_str(gate_logit.shape), " for T=", T, ", N=", l->N);
    GemvSeg g = gemv_seg(l, y, 2);
    g.gate = gate_logit.data, g.gdt = int(gate_logit.dtype);
    gemv(xb, T, l->K, {g});
  }

  void add_rmsnorm(Tensor& x, const Tensor& d, const Tensor& w, float eps, Tensor& h) override {
    if (env_flag("DS_CUDA_NO_FUSED")) return Backend::add_rmsnorm(x, d, w, eps, h);
    const int64_t D = w.numel(), R = x.numel() / D;
    DS_CHECK(d.numel() == x.numel() && h.numel() == x.numel(), "add_rmsnorm: x ", shape_str(x.shape), ", d ",
             shape_str(d.shape), ", h ", shape_str(h.shape));
    if (R == 0) return;
    if (D > 256 * kAddNormPer) return Backend::add_rmsnorm(x, d, w, eps, h);
    if (env_int("DS_CUDA_ADDNORM_T", 1) != 0 &&
        launch_add_rmsnorm_t(x.data, x.dtype, d.data, d.dtype, w.ptr<float>(), eps, D, h.data, h.dtype, R, stream_)) {
      DS_CUDA_CHECK_LAST();
      return;
    }
    DS_CUDA_CHECK(pdl_launch(k_add_rmsnorm, unsigned(R), 256, 0, stream_, x.data, int(x.dtype), d.data, int(d.dtype),
                             w.ptr<float>(), eps, D, h.data, int(h.dtype)));
    DS_CUDA_CHECK_LAST();
  }

  void linear(const Tensor& x, const Linear& w, Tensor& y) override {
    auto* l = static_cast<const CudaLinear*>(w.get());
    const int64_t T = x.numel() / l->K;
    DS_CHECK(x.numel() == T * l->K, "linear in ", shape_str(x.shape), " for K=", l->K);
    DS_CHECK(y.numel() == T * l->N, "linear out ", shape_str(y.shape), " for N=", l->N);
    if (T == 0) return;
    Tensor xb = as_bf16(x);
    if (!l->int4) {
      if (gemv_fits(l, xb, T) && (y.dtype == DType::BF16 || y.dtype == DType::F32)) {
        gemv(xb, T, l->K, {gemv_seg(l, y, 0)});
        return;
      }
      if (l->N == 1) {
        DS_CUDA_CHECK(pdl_launch(k_linear_n1, unsigned(T), 256, 0, stream_, l->dense.ptr<__nv_bfloat16>(),
                                 xb.ptr<__nv_bfloat16>(), l->K, y.data, int(y.dtype)));
        DS_CUDA_CHECK_LAST();
        return;
      }
      gemm_bf16(l->dense.data, xb.data, T, l->N, l->K, y);
      return;
    }
    DS_CHECK(y.dtype == DType::F32 || y.dtype == DType::BF16, "int4 linear: output F32 or BF16, got ",
             dtype_name(y.dtype));
    if (int4_via_cublas(T)) return int4_cublas(l, xb, T, y);
    mma_int4_linear(l->mma(), xb.data, T, y.data, int(y.dtype), stream_);
  }

  // Prefill-sized int4 linears (≥ DS_INT4_DEQUANT_MIN_M rows, default 512; never inside a recorded step): the weight
  // dequantised to a bf16 scratch copy (int4_dequant.h), then cuBLAS, which runs these shapes at ~3× the tensor-core
  // int4 kernel's rate (bench/RESULTS.md session 5). Rows here are not bit-identical to the ≤ 256-row kernels' (as
  // for the bf16 linears above 256 rows). Recorded decode / verify steps never take it; verify rows in an eager step
  // of ≥ 512 rows (beside a prefill chunk) do, and then differ from a plain decode step's bits.
  // DS_CUDA_NO_DEQUANT_GEMM=1: the int4 kernels for every size.
  bool int4_via_cublas(int64_t T) const {
    return !in_step_ && T >= env_int("DS_INT4_DEQUANT_MIN_M", 512) && !env_flag("DS_CUDA_NO_DEQUANT_GEMM");
  }
  void int4_cublas(const CudaLinear* l, const Tensor& xb, int64_t T, Tensor& y) {
    Tensor wb = alloc_scratch(DType::BF16, {l->N, l->K});
    int4_dequant_bf16(l->mma(), wb.data, stream_);
    gemm_bf16(wb.data, xb.data, T, l->N, l->K, y);
  }
  // Like alloc, without zero-fill.
  Tensor alloc_scratch(DType dt, std::vector<int64_t> shape) {
    Tensor t;
    t.dtype = dt;
    t.shape = std::move(shape);
    t.device = Device::CUDA;
    if (in_step_) return arena_tensor(std::move(t), std::max<size_t>(t.nbytes(), 16));
    void* p = nullptr;
    DS_CUDA_CHECK(cudaMallocAsync(&p, std::max<size_t>(t.nbytes(), 16), stream_));
    cudaStream_t s = stream_;
    t.data = p;
    t.owner = std::shared_ptr<void>(p, [s](void* q) { cudaFreeAsync(q, s); });
    return t;
  }

  void silu_mul(const Tensor& gu, Tensor& y) override {
    const int64_t T = gu.dim(0), I = gu.dim(1) / 2;
    if (T * I == 0) return;
    DS_CUDA_CHECK(pdl_launch(k_silu_mul, blocks_for(T * I, 256), 256, 0, stream_, gu.data, int(gu.dtype), T, I, y.data,
                             int(y.dtype)));
    DS_CUDA_CHECK_LAST();
  }

  struct RopeTables {
    Tensor inv, axis;
  };
  const RopeTables& rope_tables(const RopeParams& r) {
    std::string key = str_cat(r.rotary_dim, "/", r.theta, "/", r.mrope_section[0], ",", r.mrope_section[1], ",",
                              r.mrope_section[2], "/", r.mrope_interleaved);
    auto it = rope_cache_.find(key);
    if (it != rope_cache_.end()) return it->second;
    const int half = std::max(1, r.rotary_dim / 2);
    std::vector<float> inv(half, 0.f);
    std::vector<int32_t> axis(half, 0);
    for (int i = 0; i < r.rotary_dim / 2; ++i) {
      inv[i] = float(1.0 / std::pow(r.theta, double(2 * i) / r.rotary_dim));
      if (r.mrope_interleaved) {
        if (i % 3 == 1 && i < 3 * r.mrope_section[1]) axis[i] = 1;
        else if (i % 3 == 2 && i < 3 * r.mrope_section[2]) axis[i] = 2;
      } else {
        axis[i] = i < r.mrope_section[0] ? 0 : i < r.mrope_section[0] + r.mrope_section[1] ? 1 : 2;
      }
    }
    RopeTables t;
    const bool was = in_step_;
    in_step_ = false;  // a cache that outlives the step: not from the arena
    t.inv = upload_bytes(inv.data(), inv.size() * 4, DType::F32, {half});
    t.axis = upload_bytes(axis.data(), axis.size() * 4, DType::I32, {half});
    in_step_ = was;
    return rope_cache_[key] = t;
  }

  void qk_norm_rope(const Tensor& qg, Tensor& k, const Tensor& qnorm, const Tensor& knorm, float eps,
                    const RopeParams& rope, const BatchMeta& b, Tensor& q, Tensor& gate) override {
    qk_norm_rope_run(qg, k, qnorm, knorm, eps, rope, b, q, gate, nullptr, nullptr);
  }
  // One launch for q, k and the cache write (session 14: the k heads' output goes straight to the cache, extra
  // blocks copy v; one launch fewer per attention layer). DS_CUDA_NO_ATTN_FUSE=1: the two ops (the same bits;
  // CudaOps.AttentionFusedOps compares them).
  void qk_norm_rope_kv(const Tensor& qg, Tensor& k, const Tensor& v, const Tensor& qnorm, const Tensor& knorm,
                       float eps, const RopeParams& rope, const BatchMeta& b, Tensor& q, Tensor& gate,
                       KvLayer& kv) override {
    const bool fuse = !env_flag("DS_CUDA_NO_ATTN_FUSE") && !env_flag("DS_CUDA_NO_QK_FUSE") &&
                      k.dtype == kv.k.dtype && v.dtype == kv.k.dtype && kv.v.dtype == kv.k.dtype &&
                      k.dim(1) == kv.k.dim(2) * kv.k.dim(3) && v.dim(1) == k.dim(1);
    if (!fuse) return Backend::qk_norm_rope_kv(qg, k, v, qnorm, knorm, eps, rope, b, q, gate, kv);
    qk_norm_rope_run(qg, k, qnorm, knorm, eps, rope, b, q, gate, &kv, &v);
  }
  void qk_norm_rope_run(const Tensor& qg, Tensor& k, const Tensor& qnorm, const Tensor& knorm, float eps,
                        const RopeParams& rope, const BatchMeta& b, Tensor& q, Tensor& gate, KvLayer* kv,
                        const Tensor* v) {
    const int64_t T = b.num_tokens(), Dh = qnorm.numel();
    const int64_t Nh = qg.dim(1) / (2 * Dh), Nkv = k.dim(1) / Dh;
    DS_CHECK(Dh <= 512, "head_dim ", Dh, " > 512");
    if (T == 0) return;
    auto& d = dev(b);
    auto& rt = rope_tables(rope);
    // q (and its gate half) and k in one launch (session 12: one launch fewer per attention layer);
    // DS_CUDA_NO_QK_FUSE=1: one launch each (the same bits).
    const NormRopeSet qs{qg.data, int(qg.dtype), Nh * 2 * Dh, 2 * Dh, qnorm.ptr<float>(), q.data, int(q.dtype), Nh,
                         gate.data, Dh};
    const NormRopeSet ks{k.data, int(k.dtype), Nkv * Dh, Dh, knorm.ptr<float>(), k.data, int(k.dtype), Nkv, nullptr, 0};
    KvDst C;
    if (kv) {
      C.kc = kv->k.data;
      C.vc = kv->v.data;
      C.v = v->data;
      C.cdt = int(kv->k.dtype);
      C.row = Nkv * Dh;
      C.bs = kv->block_size;
      C.seq_of = d.seq_of;
      C.seqinfo = d.seqinfo;
      C.blocks = d.blocks;
      C.maxb = d.maxb;
    }
    auto launch = [&](const NormRopeSet& a, const NormRopeSet& bs, int64_t heads) {
      DS_CUDA_CHECK(pdl_launch(k_norm_rope, dim3(unsigned(T), unsigned(heads)), 128, 0, stream_, a, bs, eps, Dh,
                               rope.rotary_dim, rt.inv.ptr<float>(), rt.axis.ptr<int32_t>(), d.positions, T, C,
                               int(meta_early())));
      DS_CUDA_CHECK_LAST();
    };
    if (kv) {
      launch(qs, ks, Nh + 2 * Nkv);
    } else if (env_flag("DS_CUDA_NO_QK_FUSE")) {
      launch(qs, qs, Nh);
      launch(ks, ks, Nkv);
    } else {
      launch(qs, ks, Nh + Nkv);
    }
  }

  void kv_cache_write(KvLayer& kv, const Tensor& k, const Tensor& v, const BatchMeta& b) override {
    const int64_t T = b.num_tokens(), row = k.dim(1);
    if (T == 0) return;
    auto& d = dev(b);
    DS_CUDA_CHECK(pdl_launch(k_kv_write, unsigned(T), 256, 0, stream_, kv.k.data, kv.v.data, int(kv.k.dtype), k.data,
                             v.data, int(k.dtype), row, kv.block_size, d.seq_of, d.seqinfo, d.blocks, d.maxb));
    DS_CUDA_CHECK_LAST();
  }

  void attention(const Tensor& q, const KvLayer& kv, const BatchMeta& b, Tensor& o) override {
    attention_run(q, kv, b, o, nullptr);
  }
  // The output gate inside the merge when every row is the split kernel's (session 14: one launch fewer per
  // attention layer); else the two ops. DS_CUDA_NO_ATTN_FUSE=1: always the two ops (the same bits).
  void attention_gated(const Tensor& q, const KvLayer& kv, const BatchMeta& b, const Tensor& gate,
                       Tensor& o) override {
    DS_CHECK(gate.numel() == o.numel(), "attention_gated: gate has ", gate.numel(), " elements, o ", o.numel());
    if (!attention_run(q, kv, b, o, &gate)) sigmoid_gate_mul(o, gate);
  }
  // Returns whether o was multiplied by sigmoid(*gate) (only ever when gate is given).
  bool attention_run(const Tensor& q, const KvLayer& kv, const BatchMeta& b, Tensor& o, const Tensor* gate) {
    const int64_t Nkv = kv.k.dim(2), Dh = kv.k.dim(3);
    const int64_t Nh = q.dim(1) / Dh, T = b.num_tokens();
    DS_CHECK(Dh % 32 == 0 && Dh <= 256, "attention: head_dim ", Dh, " must be a multiple of 32, at most 256");
    DS_CHECK(Nh % Nkv == 0);
    if (T == 0) return gate != nullptr;
    auto& d = dev(b);
    const int64_t group = Nh / Nkv;
    if (group <= 32 && (Dh == 64 || Dh == 128 || Dh == 256) && q.dtype == DType::BF16 &&
        kv.k.dtype == DType::BF16 && !env_flag("DS_CUDA_NO_SPLIT_ATTN")) {
      // Prefill chunks (q_len ≥ kFlashMinQ) on tensor cores, the other rows on the split kernel (flash_attn.h). The
      // launches depend on T and the sequence count only (graph-safe: a recorded step's key holds both); eagerly,
      // a batch of prefill chunks only skips the split kernel. Every sequence has q_len ≥ 1, so no chunk reaches
      // kFlashMinQ when T − nseq + 1 < kFlashMinQ (a decode step of any batch): then the flash kernel, whose blocks
      // would all exit, is not launched (session 14; DS_CUDA_NO_ATTN_FUSE=1: launched whenever T ≥ kFlashMinQ).
      const bool fuse = !env_flag("DS_CUDA_NO_ATTN_FUSE");
      const int64_t nseq = int64_t(b.seqs.size());
      const bool may_flash =
          !fuse || T - nseq + 1 >= cuda::kFlashMinQ ||
          std::any_of(b.seqs.begin(), b.seqs.end(), [](const BatchMeta::Seq& s) { return s.q_len >= cuda::kFlashMinQ; });
      const bool flash = !env_flag("DS_CUDA_NO_FLASH") && T >= cuda::kFlashMinQ && o.dtype == DType::BF16 &&
                         cuda::flash_attn_supported(Nh, Nkv, Dh) && may_flash;
      const int flash_min = flash ? int(cuda::kFlashMinQ) : INT32_MAX;
      if (flash) {
        cuda::flash_attn_prefill(q.data, kv.k.data, kv.v.data, o.data, T, d.nseq, Nh, Nkv, Dh, kv.block_size,
                                 d.seqinfo, d.blocks, d.maxb, stream_);
        if (!in_step_ && std::all_of(b.seqs.begin(), b.seqs.end(),
                                     [](const BatchMeta::Seq& s) { return s.q_len >= cuda::kFlashMinQ; }))
          return false;
      }
      // S splits per (token, kv head), at most 64, fixed per T (graph-safe). The tensor-core kernel: as many as fit
      // its grid in one wave of the device (T·Nkv·S ≤ SMs × blocks per SM, 528 on an H100 / H200): at batch 64
      // (S = 4, 512 blocks) attention took 37.8 µs per layer at 1k against 40.8 with session 6's ~1024 blocks (two
      // waves) and 40.7 with 768 (a wave and a half; 270 against 250 µs at 8k) (session 34 run 3); steps at 1k: batch
      // 8 −0.05 ms, 32 −0.07, 64 −0.05, at 8k: 8–32 −0.06 to −0.13, 48–64 within noise (session 35 run 1). Otherwise about
      // 1024 blocks in all (session 6). Prefill (T large) runs one split per token, still reading each K/V row once
      // per group of q heads. DS_ATTN_BLOCKS=n: about n blocks instead (benchmark knob; 1024 = before session 34).
      const bool tc = !env_flag("DS_CUDA_NO_TC_DECODE") && cuda::attn_decode_tc_supported(Nh, Nkv, Dh);
      const int64_t nblk = env_int("DS_ATTN_BLOCKS", 0), tn = T * Nkv;
      const int64_t wave = nblk <= 0 && tc ? cuda::attn_decode_tc_wave(Dh) : 0;
      const int S = int(std::clamp<int64_t>(wave > 0 ? wave / tn : ((nblk > 0 ? nblk : 1024) + tn - 1) / tn, 1,
                                            kMergeMaxS));
      Tensor part = alloc_scratch(DType::F32, {T, Nh, S, Dh + 2});
      // The tensor-core kernel's splits of ≥ min_pos positions (attn_decode.h); the merge reads only the live ones
      // (DS_ATTN_MERGE_ALL=1: every split, as before session 38; the same bits).
      const int min_pos = int(env_int("DS_ATTN_MIN_POS", 64));
      const float scale = 1.f / std::sqrt(float(Dh));
      auto* qp = q.ptr<__nv_bfloat16>();
      auto* kp = kv.k.ptr<__nv_bfloat16>();
      auto* vp = kv.v.ptr<__nv_bfloat16>();
      // Tensor cores for the whole GQA group (attn_decode.h); DS_CUDA_NO_TC_DECODE=1: the CUDA-core kernel below.
      if (tc) {
        // Splits of ≥ DS_ATTN_MIN_POS positions (default 64; 0 = every split): at a short context a small batch's
        // 64 splits held one 16-position tile each, and the merge read 64 partials per head (session 14).
        cuda::attn_decode_tc(qp, kp, vp, T, Nh, Nkv, Dh, kv.block_size, d.seq_of, d.seqinfo, d.blocks, d.maxb, scale,
                             S, part.ptr<float>(), flash_min, min_pos, stream_);
      } else {
        // One warp per q head of the group. DS_CUDA_NO_ATTN_SMEM=1: K/V straight from global memory per warp (same
        // arithmetic, same bits).
        const bool sm = !env_flag("DS_CUDA_NO_ATTN_SMEM");
        const dim3 grid{unsigned(T), unsigned(Nkv), unsigned(S)};
        auto launch = [&](auto kern) {
          DS_CUDA_CHECK(pdl_launch(kern, grid, unsigned(32 * group), 0, stream_, qp, kp, vp, Nh, Nkv, kv.block_size,
                                   d.seq_of, d.seqinfo, d.blocks, d.maxb, scale, S, part.ptr<float>(), flash_min));
        };
        if (Dh == 256)
          sm ? launch(k_attn_split<8, true>) : launch(k_attn_split<8, false>);
        else if (Dh == 128)
          sm ? launch(k_attn_split<4, true>) : launch(k_attn_split<4, false>);
        else
          sm ? launch(k_attn_split<2, true>) : launch(k_attn_split<2, false>);
      }
      DS_CUDA_CHECK_LAST();
      // DS_ATTN_OLD_MERGE=1: the merge before session 12 (same bits; CudaOps.PagedAttention compares them).
      const bool old_merge = env_flag("DS_ATTN_OLD_MERGE");
      // The gate in the merge only when the merge writes every row (no flash rows).
      const Tensor* g = gate && fuse && !flash && !old_merge ? gate : nullptr;
      const dim3 mgrid{unsigned(T), unsigned(Nh)};
      const unsigned mthreads = unsigned(std::min<int64_t>(Dh, 256));
      if (old_merge)
        DS_CUDA_CHECK(pdl_launch(k_attn_merge, mgrid, mthreads, 0, stream_, part.ptr<float>(), Nh, Dh, S, o.data,
                                 int(o.dtype), d.seq_of, d.seqinfo, flash_min));
      else
        DS_CUDA_CHECK(pdl_launch(k_attn_merge_sm, mgrid, mthreads, 0, stream_, part.ptr<float>(), Nh, Dh, S, o.data,
                                 int(o.dtype), d.seq_of, d.seqinfo, flash_min, g ? g->data : nullptr,
                                 g ? int(g->dtype) : 0, int(meta_early()),
                                 tc && !env_flag("DS_ATTN_MERGE_ALL") ? min_pos : 0));
      DS_CUDA_CHECK_LAST();
      return g != nullptr;
    }
    DS_CUDA_CHECK(pdl_launch(k_attention, dim3(unsigned(T), unsigned(Nh)), kAttnWarps * 32, 0, stream_, q.data,
                             int(q.dtype), kv.k.data, kv.v.data, int(kv.k.dtype), Nh, Nkv, Dh, kv.block_size, d.seq_of,
                             d.seqinfo, d.blocks, d.maxb, 1.f / std::sqrt(float(Dh)), o.data, int(o.dtype)));
    DS_CUDA_CHECK_LAST();
    return false;
  }

  void sigmoid_gate_mul(Tensor& x, const Tensor& gate) override {
    const int64_t n = x.numel();
    if (!n) return;
    DS_CUDA_CHECK(pdl_launch(k_sigmoid_gate_mul, blocks_for(n, 256), 256, 0, stream_, x.data, int(x.dtype), gate.data,
                             int(gate.dtype), n));
    DS_CUDA_CHECK_LAST();
  }

  void conv1d_causal(const Tensor& mixed, const Tensor& weight, StateLayer& st, const BatchMeta& b,
                     Tensor& out) override {
    conv1d_run(mixed, weight, st, b, out, 0);
  }
  // Sequences with q_len < min_ql are left alone (deltanet_mix's fused kernels took them).
  void conv1d_run(const Tensor& mixed, const Tensor& weight, StateLayer& st, const BatchMeta& b, Tensor& out,
                  int64_t min_ql) {
    const int64_t C = weight.dim(0), Kc = weight.dim(1);
    if (b.seqs.empty()) return;
    auto& d = dev(b);
    const int64_t T = b.num_tokens();
    // one token per sequence: one thread walks each window
    const bool decode = T == int64_t(b.seqs.size()) && min_ql <= 1;
    dim3 grid(unsigned((C + 127) / 128), unsigned(b.seqs.size())), tgrid(unsigned((C + 127) / 128), unsigned(T)),
        vgrid(unsigned((C / 8 + 127) / 128), unsigned((T + kConvTT - 1) / kConvTT));
    // Prefill-sized chunks with bf16 activations: 8 channels per thread (k_conv1d_tokens8, same bits).
    const bool vec = mixed.dtype == DType::BF16 && out.dtype == DType::BF16 && C % 8 == 0 &&
                     !env_flag("DS_CUDA_NO_CONV_VEC");
    // DS_CUDA_NO_CONV_SLIDE=1: k_conv1d_tokens8's per-token loop for every tile (same bits; the sliding window saves
    // ~7 ms of a 32k prefill, docs/perf.md session 32).
    const bool no_slide = env_flag("DS_CUDA_NO_CONV_SLIDE");
#define DS_CONV(KC)                                                                                               \
  case KC:                                                                                                        \
    if (decode) {                                                                                                 \
      k_conv1d<KC><<<grid, 128, 0, stream_>>>(mixed.data, int(mixed.dtype), weight.ptr<float>(),                  \
                                              st.conv.ptr<float>(), d.seqinfo, C, out.data, int(out.dtype));      \
    } else if (vec) {                                                                                             \
      k_conv1d_tokens8<KC><<<vgrid, 128, 0, stream_>>>(mixed.ptr<__nv_bfloat16>(), weight.ptr<float>(),           \
                                                       st.conv.ptr<float>(), d.seq_of, d.seqinfo, C, T,           \
                                                       out.ptr<__nv_bfloat16>(), min_ql, no_slide);               \
      DS_CUDA_CHECK_LAST();                                                                                       \
      k_conv1d_state<KC><<<grid, 128, 0, stream_>>>(mixed.data, int(mixed.dtype), st.conv.ptr<float>(),           \
                                                    d.seqinfo, C, min_ql);                                        \
    } else {                                                                                                      \
      k_conv1d_tokens<KC><<<tgrid, 128, 0, stream_>>>(mixed.data, int(mixed.dtype), weight.ptr<float>(),          \
                                                      st.conv.ptr<float>(), d.seq_of, d.seqinfo, C, out.data,     \
                                                      int(out.dtype), min_ql);                                    \
      DS_CUDA_CHECK_LAST();                                                                                            \
      k_conv1d_state<KC><<<grid, 128, 0, stream_>>>(mixed.data, int(mixed.dtype), st.conv.ptr<float>(),           \
                                                    d.seqinfo, C, min_ql);                                        \
    }                                                                                                             \
    break;
    switch (Kc) {
      DS_CONV(2)
      DS_CONV(3)
      DS_CONV(4)
      DS_CONV(5)
      DS_CONV(6)
      default:
        fail("conv1d: kernel size ", Kc, " is not supported (2..6)");
    }
#undef DS_CONV
    DS_CUDA_CHECK_LAST();
  }

  void gated_delta_rule(const Tensor& qkv, const Tensor& ba, const Tensor& A_log, const Tensor& dt_bias, int64_t Hk,
                        int64_t Hv, int64_t Dk, int64_t Dv, StateLayer& st, const BatchMeta& b, Tensor& o) override {
    gdr_run(qkv, ba, A_log, dt_bias, Hk, Hv, Dk, Dv, st, b, o, false);
  }
  // skip_short: the short-chunk kernel is not launched (deltanet_mix's fused kernels took those sequences).
  void gdr_run(const Tensor& qkv, const Tensor& ba, const Tensor& A_log, const Tensor& dt_bias, int64_t Hk, int64_t Hv,
               int64_t Dk, int64_t Dv, StateLayer& st, const BatchMeta& b, Tensor& o, bool skip_short) {
    const int64_t T = b.num_tokens(), C = qkv.dim(1);
    DS_CHECK(Dv % 32 == 0 && Hv % Hk == 0);
    if (T == 0) return;
    auto& d = dev(b);
    Tensor qn = alloc_scratch(DType::F32, {T, Hk, Dk}), kn = alloc_scratch(DType::F32, {T, Hk, Dk});
    Tensor g = alloc_scratch(DType::F32, {T, Hv}), beta = alloc_scratch(DType::F32, {T, Hv});
    k_gdr_prep<<<unsigned(T), 256, 0, stream_>>>(qkv.data, int(qkv.dtype), ba.data, int(ba.dtype), A_log.ptr<float>(),
                                                 dt_bias.ptr<float>(), C, Hk, Hv, Dk, 1.f / std::sqrt(float(Dk)),
                                                 qn.ptr<float>(), kn.ptr<float>(), g.ptr<float>(), beta.ptr<float>());
    DS_CUDA_CHECK_LAST();
    // A bf16 state (ops.h StateLayer): the sequences these kernels take (q_len >= lo) are widened into an fp32 copy
    // at local slots 0, 1, ... (sinfo: the sequence table with those slots) and rounded back after the kernels; the
    // short-chunk kernels round it per token. Without skip_short a step may be recorded and replayed with other
    // lengths (DS_CUDA_NO_GDR_FUSE=1 decode steps), so the copy then has room for every sequence.
    const bool bf16_state = ssm_is_bf16(st.ssm, "gated_delta_rule");
    const int64_t lo = skip_short ? kGdnShortMax : 1, per_slot = Hv * Dk * Dv;
    const unsigned wblocks = unsigned(std::min<int64_t>((per_slot + 1023) / 1024, 1024));
    float* ssm = bf16_state ? nullptr : st.ssm.ptr<float>();
    const int32_t* sinfo = d.seqinfo;
    Tensor wide, winfo;
    if (bf16_state) {
      int64_t n = int64_t(b.seqs.size());
      if (skip_short) n = std::count_if(b.seqs.begin(), b.seqs.end(), [&](const auto& s) { return s.q_len >= lo; });
      wide = alloc_scratch(DType::F32, {std::max<int64_t>(n, 1), Hv, Dk, Dv});
      winfo = alloc_scratch(DType::I32, {int64_t(b.seqs.size()), 4});
      k_state_bf16<<<dim3(wblocks, unsigned(b.seqs.size())), 256, 0, stream_>>>(
          st.ssm.ptr<__nv_bfloat16>(), wide.ptr<float>(), d.seqinfo, lo, per_slot, winfo.ptr<int32_t>(), 1);
      DS_CUDA_CHECK_LAST();
      ssm = wide.ptr<float>();
      sinfo = winfo.ptr<int32_t>();
    }
    // Decode-only steps (one token per sequence) launch only the short-chunk kernel; any other step launches
    // both, and each sequence is taken by the one its own length selects (graph-safe, batch-invariant).
    const bool decode = T == int64_t(b.seqs.size()) && !skip_short;
    // Sequences of ≥ kGdrChunkMin tokens: the chunked tensor-core form (gdr_chunked.cu) instead of k_gdr_long.
    // Launched only when the batch has such a sequence (its scratch is ~16 KB per token): a step recorded without
    // one and replayed with one would still be right, k_gdr_long then taking every long sequence (recorded steps
    // are decode, verify and input-log replay steps, whose sequences are never that long).
    int64_t max_ql = 0;
    for (auto& s : b.seqs) max_ql = std::max(max_ql, s.q_len);
    const bool chunked =
        max_ql >= kGdrChunkMin && gdr_chunked_supported(Dk, Dv) && !env_flag("DS_CUDA_NO_GDR_CHUNK");
    const int64_t long_max = chunked ? kGdrChunkMin : std::numeric_limits<int64_t>::max();
    dim3 grid(unsigned(Dv / 32), unsigned(Hv), unsigned(b.seqs.size()));
    constexpr int kR = 8;
    dim3 lgrid(unsigned(Dv / (32 / kR)), unsigned(Hv), unsigned(b.seqs.size()));
    // Short chunks (decode, speculative verify and replay): 4 lanes per state column, 4 warps per block (H200:
    // batch 1 4.34 -> 4.20 ms, batch 64 20.25 -> 19.74 ms against one lane per column, bench/RESULTS.md session 4);
    // DS_GDR_SHORT_R = 1 (k_gdr_recurrent: one lane per column), 2 or 8 for comparison. Every short chunk of a
    // step takes the same kernel whatever its length, so verify, replay and decode stay bit-identical.
    const int64_t short_r_env = env_int("DS_GDR_SHORT_R", 4);
    const int short_r = short_r_env == 1 || short_r_env == 2 || short_r_env == 8 ? int(short_r_env) : 4;
    auto sgrid = [&](int r) { return dim3(unsigned((Dv / (32 / r) + 3) / 4), unsigned(Hv), unsigned(b.seqs.size())); };
#define DS_GDR_SHORT_RL(DK, RL)                                                                                    \
  k_gdr_long<DK, RL, 4, false><<<sgrid(RL), 128, 0, stream_>>>(qn.ptr<float>(), kn.ptr<float>(), g.ptr<float>(),   \
                                                               beta.ptr<float>(), qkv.data, int(qkv.dtype), C, Hk, \
                                                               Hv, Dv, ssm, sinfo, o.data, int(o.dtype),         \
                                                               int64_t(0), int(bf16_state));
#define DS_GDR(DK)                                                                                                 \
  case DK:                                                                                                         \
    if (skip_short) {                                                                                              \
    } else if (short_r == 1)                                                                                       \
      k_gdr_recurrent<DK><<<grid, 32, 0, stream_>>>(qn.ptr<float>(), kn.ptr<float>(), g.ptr<float>(),              \
                                                    beta.ptr<float>(), qkv.data, int(qkv.dtype), C, Hk, Hv, Dv,    \
                                                    ssm, sinfo, o.data, int(o.dtype), int(bf16_state));            \
    else if (short_r == 2) {                                                                                       \
      DS_GDR_SHORT_RL(DK, 2)                                                                                       \
    } else if (short_r == 8) {                                                                                     \
      DS_GDR_SHORT_RL(DK, 8)                                                                                       \
    } else {                                                                                                       \
      DS_GDR_SHORT_RL(DK, 4)                                                                                       \
    }                                                                                                              \
    if (!decode) {                                                                                                 \
      DS_CUDA_CHECK_LAST();                                                                                            \
      k_gdr_long<DK, kR><<<lgrid, 32, 0, stream_>>>(qn.ptr<float>(), kn.ptr<float>(), g.ptr<float>(),              \
                                                    beta.ptr<float>(), qkv.data, int(qkv.dtype), C, Hk, Hv, Dv,    \
                                                    ssm, sinfo, o.data, int(o.dtype), long_max);                   \
    }                                                                                                              \
    break;
    switch (Dk) {
      DS_GDR(32)
      DS_GDR(64)
      DS_GDR(128)
      default:
        fail("gated_delta_rule: key head dim ", Dk, " is not supported (32, 64, 128)");
    }
#undef DS_GDR
#undef DS_GDR_SHORT_RL
    DS_CUDA_CHECK_LAST();
    if (chunked) {
      Tensor Gc = alloc_scratch(DType::F32, {T, Hv}), Tb = alloc_scratch(DType::F32, {T, Hv, kGdrChunk}),
             P = alloc_scratch(DType::F32, {T, Hv, kGdrChunk});
      gdr_chunked(qn.ptr<float>(), kn.ptr<float>(), g.ptr<float>(), beta.ptr<float>(), qkv.data, int(qkv.dtype), C, T,
                  Hk, Hv, Dk, Dv, int(b.seqs.size()), sinfo, ssm, o.data, int(o.dtype),
                  Gc.ptr<float>(), Tb.ptr<float>(), P.ptr<float>(), stream_);
      DS_CUDA_CHECK_LAST();
    }
    if (bf16_state) {
      k_state_bf16<<<dim3(wblocks, unsigned(b.seqs.size())), 256, 0, stream_>>>(
          st.ssm.ptr<__nv_bfloat16>(), wide.ptr<float>(), d.seqinfo, lo, per_slot, nullptr, 0);
      DS_CUDA_CHECK_LAST();
    }
  }

  void gated_rmsnorm(const Tensor& o, const Tensor& z, const Tensor& w, float eps, Tensor& y) override {
    const int64_t D = w.numel(), R = o.numel() / D;
    if (!R) return;
    const bool bf = o.dtype == DType::BF16 && z.dtype == DType::BF16 && y.dtype == DType::BF16;
    const int nc = D % 128 == 0 ? int(D / 128) : 0;
    if (bf && (nc == 1 || nc == 2 || nc == 4) && !env_flag("DS_CUDA_NO_NORM_WARP")) {
      const unsigned blocks = unsigned((R + 7) / 8);
      const auto* xo = o.ptr<__nv_bfloat16>();
      const auto* xz = z.ptr<__nv_bfloat16>();
      auto* xy = y.ptr<__nv_bfloat16>();
      if (nc == 1) k_gated_rmsnorm_warp<1><<<blocks, 256, 0, stream_>>>(xo, xz, w.ptr<float>(), eps, R, xy);
      if (nc == 2) k_gated_rmsnorm_warp<2><<<blocks, 256, 0, stream_>>>(xo, xz, w.ptr<float>(), eps, R, xy);
      if (nc == 4) k_gated_rmsnorm_warp<4><<<blocks, 256, 0, stream_>>>(xo, xz, w.ptr<float>(), eps, R, xy);
    } else {
      k_gated_rmsnorm<<<unsigned(R), 128, 0, stream_>>>(o.data, int(o.dtype), z.data, int(z.dtype), w.ptr<float>(),
                                                       eps, D, y.data, int(y.dtype));
    }
    DS_CUDA_CHECK_LAST();
  }

  // The DeltaNet mixer: sequences of 1 <= q_len < kGdnShortMax (decode, speculative verify and replay) in two fused
  // kernels (gdr_decode.h: conv + prep, recurrence + gated RMSNorm; fp32 in between), the longer ones through the
  // three ops' kernels, which then skip the short ones. DS_CUDA_NO_GDR_FUSE=1: the three ops for every sequence.
  // Whether the unfused kernels run at all is the host's view of the lengths, as for the chunked kernels: recorded
  // steps (decode, verify, input-log replay) have only short sequences.
  // With ba_x / ba_w (in_proj_b | in_proj_a), the short sequences' ba is formed inside k_gdn_conv_prep (gdr_decode.h;
  // one launch fewer per DeltaNet layer), the long ones' by linear() on their rows; DS_CUDA_NO_BA_FUSE=1: linear()
  // on all rows first.
  void deltanet_mix(const Tensor& mixed, const Tensor& conv_w, const Tensor& ba, const Tensor& A_log,
                    const Tensor& dt_bias, int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv, const Tensor* z,
                    const Tensor* norm_w, float eps, StateLayer& st, const BatchMeta& b, Tensor& y,
                    const Tensor* ba_x = nullptr, const Linear* ba_w = nullptr) override {
    const int64_t T = b.num_tokens(), C = mixed.dim(1), Kc = conv_w.dim(1);
    if (env_flag("DS_CUDA_NO_GDR_FUSE") || !gdn_decode_supported(Kc, Hk, Hv, Dk, Dv) || C != 2 * Hk * Dk + Hv * Dv ||
        (norm_w && norm_w->numel() != Dv)) {
      Backend::deltanet_mix(mixed, conv_w, ba, A_log, dt_bias, Hk, Hv, Dk, Dv, z, norm_w, eps, st, b, y, ba_x, ba_w);
      return;
    }
    if (T == 0 || b.seqs.empty()) return;
    const CudaLinear* bl = ba_w ? static_cast<const CudaLinear*>(ba_w->get()) : nullptr;
    const bool fuse_ba = bl && ba_x && !bl->int4 && bl->dense.data && bl->N == 2 * Hv && ba_x->dim(1) == bl->K &&
                         ba_x->dtype == DType::BF16 && gdn_ba_fusable(bl->K, ba_x->data, bl->dense.data) &&
                         !env_flag("DS_CUDA_NO_BA_FUSE");
    if (bl && ba_x && !fuse_ba) {
      Tensor bo = ba;
      linear(*ba_x, *ba_w, bo);
    }
    auto& d = dev(b);
    Tensor qn = alloc_scratch(DType::F32, {T, Hk, Dk}), kn = alloc_scratch(DType::F32, {T, Hk, Dk});
    Tensor vv = alloc_scratch(DType::F32, {T, Hv, Dv});
    Tensor g = alloc_scratch(DType::F32, {T, Hv}), beta = alloc_scratch(DType::F32, {T, Hv});
    gdn_decode(mixed.data, int(mixed.dtype), conv_w.ptr<float>(), Kc, st.conv.ptr<float>(), ba.data, int(ba.dtype),
               A_log.ptr<float>(), dt_bias.ptr<float>(), z ? z->data : nullptr, z ? int(z->dtype) : 0,
               norm_w ? norm_w->ptr<float>() : nullptr, eps, T, Hk, Hv, Dk, Dv, int(b.seqs.size()), d.seqinfo,
               st.ssm.data, int(st.ssm.dtype), qn.ptr<float>(), kn.ptr<float>(), vv.ptr<float>(), g.ptr<float>(),
               beta.ptr<float>(), y.data, int(y.dtype), stream_, fuse_ba ? ba_x->data : nullptr,
               fuse_ba ? bl->dense.data : nullptr, fuse_ba ? bl->K : 0);
    int64_t max_ql = 0;
    for (auto& s : b.seqs) max_ql = std::max(max_ql, s.q_len);
    if (max_ql < kGdnShortMax) return;
    if (fuse_ba)  // the long sequences' ba (the fused kernel formed only the short ones')
      for (auto& s : b.seqs) {
        if (s.q_len < kGdnShortMax) continue;
        Tensor bo = ba.rows(s.q_start, s.q_start + s.q_len);
        linear(ba_x->rows(s.q_start, s.q_start + s.q_len), *ba_w, bo);
      }
    Tensor qkv = alloc_scratch(act_dtype(), {T, C});
    conv1d_run(mixed, conv_w, st, b, qkv, kGdnShortMax);
    Tensor o = norm_w ? alloc_scratch(act_dtype(), {T, Hv * Dv}) : y;
    gdr_run(qkv, ba, A_log, dt_bias, Hk, Hv, Dk, Dv, st, b, o, true);
    if (norm_w)
      for (auto& s : b.seqs) {
        if (s.q_len < kGdnShortMax) continue;
        Tensor yr = y.rows(s.q_start, s.q_start + s.q_len);
        gated_rmsnorm(o.rows(s.q_start, s.q_start + s.q_len), z->rows(s.q_start, s.q_start + s.q_len), *norm_w, eps,
                      yr);
      }
  }

  void moe_route(const Tensor& logits, int64_t top_k, Tensor& ids, Tensor& weights) override {
    const int64_t T = logits.dim(0), E = logits.dim(1);
    DS_CHECK(E <= 1024 && top_k <= E, "moe_route: E = ", E, " (at most 1024), top_k = ", top_k);
    DS_CHECK(ids.dtype == DType::I32 && weights.dtype == DType::F32);
    if (!T) return;
    // E ≤ 256, top-8, bf16 or fp32 logits: the compact router (DS_MOE_ROUTE_C=0: the generic one; same bits)
    if (moe_route_c_fits(E, top_k, int(logits.dtype)) && env_int("DS_MOE_ROUTE_C", 1) != 0 && T < (int64_t(1) << 27)) {
      if (logits.dtype == DType::BF16)
        DS_CUDA_CHECK(pdl_launch(k_moe_route_c<__nv_bfloat16, 8>, unsigned((T + 3) / 4), 128, 0, stream_,
                                 logits.ptr<__nv_bfloat16>(), int(T), int(E), ids.ptr<int32_t>(), weights.ptr<float>()));
      else
        DS_CUDA_CHECK(pdl_launch(k_moe_route_c<float, 8>, unsigned((T + 3) / 4), 128, 0, stream_, logits.ptr<float>(),
                                 int(T), int(E), ids.ptr<int32_t>(), weights.ptr<float>()));
      DS_CUDA_CHECK_LAST();
      return;
    }
    DS_CUDA_CHECK(pdl_launch(k_moe_route, unsigned((T + 3) / 4), 128, 0, stream_, logits.data, int(logits.dtype), T, E,
                             top_k, ids.ptr<int32_t>(), weights.ptr<float>()));
    DS_CUDA_CHECK_LAST();
  }

  void moe_experts(const Tensor& x, const Experts& w, const Tensor& ids, const Tensor& weights, Tensor& y) override {
    if (!x.dim(0)) return;
    moe_combine(moe_routed(x, static_cast<const CudaExperts*>(w.get()), ids, ids.dim(1), nullptr), weights, y);
  }
  // y[t] = Σ_k weights[t, k] · out[t·K + k]   (weights [T, K], out [T·K, H] fp32)
  void moe_combine(const Tensor& out, const Tensor& weights, Tensor& y) {
    const int64_t T = weights.dim(0), K = weights.dim(1), H = y.numel() / T;
    DS_CUDA_CHECK(pdl_launch(k_moe_combine, dim3(unsigned(T), unsigned((H + 255) / 256)), 256, 0, stream_,
                             out.ptr<float>(), weights.ptr<float>(), K, H, y.data, int(y.dtype)));
    DS_CUDA_CHECK_LAST();
  }
  // The routed experts' outputs out [T·K, H] fp32 per (token, k) pair (scratch); with `route` (int4 experts), the
  // routing into ids is done in the tile-table launch (int4_mma.h).
  Tensor moe_routed(const Tensor& x, const CudaExperts* ex, const Tensor& ids, int64_t K, const MoeRouteIn* route) {
    const int64_t T = x.dim(0), H = ex->H, I = ex->I, P = T * K;
    DS_CHECK(!route || ex->int4);
    Tensor xb = as_bf16(x);
    Tensor out = alloc_scratch(DType::F32, {P, H});
    if (ex->int4) {  // tensor cores, pairs grouped by expert (int4_mma.cu)
      Tensor act = alloc_scratch(DType::BF16, {P, I});
      Tensor scratch = alloc_scratch(DType::I32, {mma_moe_scratch_ints(P, ex->E)});
      mma_moe(ex->gu->mma(), ex->down->mma(), ex->E, I, H, xb.data, K, ids.ptr<int32_t>(), P, scratch.ptr<int32_t>(),
              act.data, out.ptr<float>(), stream_, route);
    } else {  // bf16 experts (the BF16 checkpoints): CUDA-core kernels
      Tensor act = alloc_scratch(DType::F32, {P, I});
      const int warps = 8;
      DenseView gu{ex->gu->dense.ptr<__nv_bfloat16>(), ex->gu->N, ex->gu->K};
      DenseView dn{ex->down->dense.ptr<__nv_bfloat16>(), ex->down->N, ex->down->K};
      // Grouped by expert for prefill-sized T (measured on int4, bench/RESULTS.md: 1.3× at 1k–4k prompts). At
      // decode sizes (≤ 2.3 pairs per touched expert) one block per pair was faster on H100.
      if (T > kMoeGroupedMinT && ex->E <= 1024 && !env_flag("DS_CUDA_NO_GROUPED_MOE")) {
        const int64_t E = ex->E, A = std::min(P, E);
        Tensor grp = alloc_scratch(DType::I32, {1 + A + (A + 1) + P});
        int32_t* meta = grp.ptr<int32_t>();
        int32_t *active = meta + 1, *off = active + A, *list = off + A + 1;
        DS_CUDA_CHECK(pdl_launch(k_moe_group, 1, 1024, 0, stream_, ids.ptr<int32_t>(), P, E, meta, active, off, list));
        DS_CUDA_CHECK_LAST();
        const dim3 g1(unsigned((I + warps - 1) / warps), unsigned(A)),
            g2(unsigned((H + warps - 1) / warps), unsigned(A));
        DS_CUDA_CHECK(pdl_launch(k_moe_grouped<true, DenseView, __nv_bfloat16>, g1, warps * 32, 0, stream_, gu, 2 * I,
                                 I, xb.ptr<__nv_bfloat16>(), K, meta, active, off, list, act.ptr<float>()));
        DS_CUDA_CHECK_LAST();
        DS_CUDA_CHECK(pdl_launch(k_moe_grouped<false, DenseView, float>, g2, warps * 32, 0, stream_, dn, H, H,
                                 act.ptr<float>(), int64_t(1), meta, active, off, list, out.ptr<float>()));
        DS_CUDA_CHECK_LAST();
      } else {
        const unsigned py = unsigned(std::min<int64_t>(P, 65535));
        DS_CUDA_CHECK(pdl_launch(k_moe_gate_up<DenseView>, dim3(unsigned((I + warps - 1) / warps), py), warps * 32, 0,
                                 stream_, gu, 2 * I, xb.ptr<__nv_bfloat16>(), ids.ptr<int32_t>(), K, I, P,
                                 act.ptr<float>()));
        DS_CUDA_CHECK_LAST();
        DS_CUDA_CHECK(pdl_launch(k_moe_down<DenseView>, dim3(unsigned((H + warps - 1) / warps), py), warps * 32, 0,
                                 stream_, dn, H, act.ptr<float>(), ids.ptr<int32_t>(), H, P, out.ptr<float>()));
        DS_CUDA_CHECK_LAST();
      }
    }
    return out;
  }
  // DS_CUDA_NO_MOE_FUSE=1: the composition (ops.h). For int4 experts, with a shared expert whose down projection
  // takes the tensor-core kernel, the routed sum is formed in its gated-add epilogue (bf16_mma.h mode 3) instead of
  // by k_moe_combine, at any T up to DS_CUDA_MOE_EPI_MAXT (256, the kernel's limit; 8 before session 10). At T ≤
  // DS_CUDA_MOE_FUSE_MAXT (8) the router also runs in the tile-table launch (one block routes every token:
  // k_moe_route_tiles; at 64 that one block made the batch-64 step 15.65 → 17.15 ms on the H200, session 5 run 4a,
  // so larger steps keep k_moe_route's grid). 6 launches per layer become 4 (T ≤ 8) or 5. Same device code as the
  // unfused kernels (moe_fuse.cuh), so the same bits, and a row's bits still depend on that row alone.
  void moe_ffn(const Tensor& router_logits, int64_t top_k, const Tensor& x, const Experts& experts, Tensor& ids,
               Tensor& weights, const Tensor* a, const Linear* shared_down, const Tensor* gate, Tensor& y) override {
    auto* ex = static_cast<const CudaExperts*>(experts.get());
    const int64_t T = x.dim(0), E = router_logits.dim(1);
    if (env_flag("DS_CUDA_NO_MOE_FUSE") || !ex->int4 || T == 0 || T > env_int("DS_CUDA_MOE_EPI_MAXT", 256) ||
        E != ex->E || E > 1024)
      return Backend::moe_ffn(router_logits, top_k, x, experts, ids, weights, a, shared_down, gate, y);
    const bool fuse_route = T <= env_int("DS_CUDA_MOE_FUSE_MAXT", 8);
    DS_CHECK(top_k <= E && router_logits.dim(0) == T, "moe_ffn: logits ", shape_str(router_logits.shape), ", top_k ",
             top_k);
    DS_CHECK(ids.dtype == DType::I32 && weights.dtype == DType::F32 && ids.numel() == T * top_k &&
                 weights.numel() == T * top_k && y.numel() == T * ex->H,
             "moe_ffn: ids ", shape_str(ids.shape), ", weights ", shape_str(weights.shape), ", y ", shape_str(y.shape));
    MoeRouteIn r;
    r.logits = router_logits.data, r.ldt = int(router_logits.dtype), r.T = T;
    r.ids = ids.ptr<int32_t>(), r.wts = weights.ptr<float>();
    if (!fuse_route) moe_route(router_logits, top_k, ids, weights);
    Tensor out = moe_routed(x, ex, ids, top_k, fuse_route ? &r : nullptr);
    if (shared_down) {
      auto* l = static_cast<const CudaLinear*>(shared_down->get());
      Tensor ab = as_bf16(*a);
      if (!env_flag("DS_CUDA_NO_FUSED") && !env_flag("DS_CUDA_NO_BF16_MMA") && gemv_fits(l, ab, T) && l->N == ex->H &&
          ab.numel() == T * l->K && gate->numel() == T && (y.dtype == DType::BF16 || y.dtype == DType::F32)) {
        Bf16MmaSeg g;
        g.w = l->dense.data, g.y = y.data, g.ydt = int(y.dtype), g.gate = gate->data, g.gdt = int(gate->dtype);
        g.mode = 3, g.rows = l->N, g.moe_out = out.ptr<float>(), g.moe_w = weights.ptr<float>(), g.moe_k = int(top_k);
        // a is two or more kernels back: moe_routed launched at least the tile table, gate_up and down since it was
        // written (and as_bf16 nothing, a being bf16), so the main loop runs beside the down projection
        // (bf16_mma.h x_early; DS_BF16_EARLY=0: after the wait, as every other launch)
        const bool early = a->dtype == DType::BF16 && env_int("DS_BF16_EARLY", 1) != 0;
        bf16_mma_linear(&g, 1, ab.data, T, l->K, stream_, early);
        return;
      }
    }
    moe_combine(out, weights, y);
    if (shared_down) linear_gated_add(*a, *shared_down, *gate, y);
  }

  void sigmoid_scale_add(Tensor& y, const Tensor& s, const Tensor& gate_logit) override {
    const int64_t T = y.dim(0), H = y.dim(1);
    if (!T) return;
    DS_CUDA_CHECK(pdl_launch(k_sigmoid_scale_add, unsigned(T), 256, 0, stream_, y.data, int(y.dtype), s.data,
                             int(s.dtype), gate_logit.data, int(gate_logit.dtype), H));
    DS_CUDA_CHECK_LAST();
  }

  void gather_rows(const Tensor& x, const std::vector<int32_t>& rows, Tensor& out) override {
    const int64_t H = x.numel() / x.dim(0);
    if (rows.empty()) return;
    for (auto r : rows) DS_CHECK(r >= 0 && r < x.dim(0), "gather_rows: row ", r, " of ", x.dim(0));
    DS_CHECK(out.dtype == x.dtype);
    bool identity = out.nbytes() == int64_t(rows.size()) * H * int64_t(dtype_size(x.dtype));
    for (size_t i = 0; identity && i < rows.size(); ++i) identity = rows[i] == int32_t(i);
    if (identity) {  // the decode case (every row): a device copy, which a step graph can record
      DS_CUDA_CHECK(cudaMemcpyAsync(out.data, x.data, out.nbytes(), cudaMemcpyDeviceToDevice, stream_));
      return;
    }
    Tensor r = upload_bytes(rows.data(), rows.size() * 4, DType::I32, {int64_t(rows.size())});
    DS_CUDA_CHECK(pdl_launch(k_gather, unsigned(rows.size()), 256, 0, stream_, x.data, int(x.dtype), r.ptr<int32_t>(),
                             H, out.data));
    DS_CUDA_CHECK_LAST();
  }

  // ---- sampling: kernels in sample.cu; R int32 ids come back, the logits stay on the device ----
  void sample_rows(const Tensor& logits, int64_t vocab_limit, const std::vector<SampleRowParams>& rows,
                   const std::vector<SampleEdit>& edits, const std::vector<uint32_t>& masks,
                   std::vector<int32_t>& ids) override {
    static_assert(sizeof(SampleRowParams) % 4 == 0 && sizeof(SampleEdit) % 4 == 0);
    DS_CHECK(logits.ndim() == 2 && logits.dim(0) >= int64_t(rows.size()), "sample_rows: logits [R, V] for ",
             rows.size(), " rows");
    DS_CHECK(logits.dtype == DType::F32 || logits.dtype == DType::BF16 || logits.dtype == DType::F16,
             "sample_rows: logits dtype ", dtype_name(logits.dtype));
    const int64_t V = logits.dim(1), n = vocab_limit > 0 ? std::min(vocab_limit, V) : V;
    const int R = int(rows.size());
    DS_CHECK(n > 0 && n < (int64_t(1) << 24), "sample_rows: vocabulary of ", n, " ids (at most 2^24)");
    ids.assign(rows.size(), -1);
    if (R == 0) return;
    check_sample_rows(rows, edits, masks, n);
    int max_edits = 0;
    for (const SampleRowParams& p : rows) max_edits = std::max(max_edits, p.edit_count);
    Tensor drows = upload_bytes(rows.data(), rows.size() * sizeof(SampleRowParams), DType::I32,
                                {int64_t(rows.size() * sizeof(SampleRowParams) / 4)});
    Tensor dedits = upload_bytes(edits.data(), edits.size() * sizeof(SampleEdit), DType::I32,
                                 {int64_t(edits.size() * sizeof(SampleEdit) / 4)});
    Tensor dmasks;  // only when a row has one (the grammars' and allowed_token_ids' masks, ~31 KB each at 248k ids)
    if (!masks.empty())
      dmasks = upload_bytes(masks.data(), masks.size() * 4, DType::I32, {int64_t(masks.size())});
    Tensor z = alloc_scratch(DType::F32, {int64_t(R), n});  // every element written by k_sample_values
    Tensor out = alloc(DType::I32, {int64_t(R)});
    launch_sample_rows(logits.data, int(logits.dtype), V, n, R, static_cast<const SampleRowParams*>(drows.data),
                       static_cast<const SampleEdit*>(dedits.data), max_edits,
                       masks.empty() ? nullptr : static_cast<const uint32_t*>(dmasks.data), z.ptr<float>(),
                       out.ptr<int32_t>(), stream_);
    DS_CUDA_CHECK_LAST();
    DS_CUDA_CHECK(cudaMemcpyAsync(ids.data(), out.data, size_t(R) * 4, cudaMemcpyDeviceToHost, stream_));
    DS_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  bool has_row_logprobs() const override { return true; }
  void row_logprobs(const Tensor& logits, int64_t vocab_limit, const std::vector<int32_t>& rows,
                    const std::vector<int32_t>& chosen, int32_t k, std::vector<float>& out) override {
    DS_CHECK(k >= 0 && k <= kMaxRowTopLogprobs, "row_logprobs: k in 0..", kMaxRowTopLogprobs, ", got ", k);
    const int64_t V = logits.ndim() == 2 ? logits.dim(1) : 0, n = vocab_limit > 0 ? std::min(vocab_limit, V) : V;
    const int R = int(rows.size()), stride = 1 + 2 * k, kk = int(std::min<int64_t>(k, n));
    Tensor d = upload_row_tokens("row_logprobs", logits, rows, chosen, n);
    out.assign(size_t(R) * size_t(stride), 0.f);
    if (R == 0) return;
    Tensor o = alloc(DType::F32, {int64_t(R) * stride});
    DS_CUDA_CHECK(cudaMemsetAsync(o.data, 0, size_t(o.nbytes()), stream_));
    Tensor scratch = alloc(DType::U8, {row_logprobs_scratch_bytes(R, n)});
    launch_row_logprobs(logits.data, int(logits.dtype), V, n, R, d.ptr<int32_t>(), d.ptr<int32_t>() + R, kk, stride,
                        o.ptr<float>(), scratch.data, stream_);
    DS_CUDA_CHECK_LAST();
    DS_CUDA_CHECK(cudaMemcpyAsync(out.data(), o.data, size_t(o.nbytes()), cudaMemcpyDeviceToHost, stream_));
    DS_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  void row_ranks(const Tensor& logits, int64_t vocab_limit, const std::vector<int32_t>& rows,
                 const std::vector<int32_t>& chosen, std::vector<int32_t>& out) override {
    const int64_t V = logits.ndim() == 2 ? logits.dim(1) : 0, n = vocab_limit > 0 ? std::min(vocab_limit, V) : V;
    const int R = int(rows.size());
    Tensor d = upload_row_tokens("row_ranks", logits, rows, chosen, V);
    out.assign(size_t(R), 0);
    if (R == 0) return;
    Tensor o = alloc(DType::I32, {int64_t(R)});
    launch_row_ranks(logits.data, int(logits.dtype), V, n, R, d.ptr<int32_t>(), d.ptr<int32_t>() + R, o.ptr<int32_t>(),
                     stream_);
    DS_CUDA_CHECK_LAST();
    DS_CUDA_CHECK(cudaMemcpyAsync(out.data(), o.data, size_t(R) * 4, cudaMemcpyDeviceToHost, stream_));
    DS_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  // row_logprobs / row_ranks: checks logits [·, V] (F32, BF16, F16), each row inside it and each chosen token below
  // `tokens`, and uploads rows then chosen as one int32 tensor (empty when there are no rows).
  Tensor upload_row_tokens(const char* what, const Tensor& logits, const std::vector<int32_t>& rows,
                           const std::vector<int32_t>& chosen, int64_t tokens) {
    DS_CHECK(logits.ndim() == 2 && rows.size() == chosen.size(), what, ": logits [R, V], one chosen token per row");
    DS_CHECK(logits.dtype == DType::F32 || logits.dtype == DType::BF16 || logits.dtype == DType::F16, what,
             ": logits dtype ", dtype_name(logits.dtype));
    for (size_t i = 0; i < rows.size(); ++i)
      DS_CHECK(rows[i] >= 0 && rows[i] < logits.dim(0) && chosen[i] >= 0 && chosen[i] < tokens, what, ": row ", rows[i],
               " of ", logits.dim(0), ", token ", chosen[i], " of ", tokens);
    if (rows.empty()) return Tensor();
    std::vector<int32_t> both(rows);
    both.insert(both.end(), chosen.begin(), chosen.end());
    return upload_bytes(both.data(), both.size() * 4, DType::I32, {int64_t(both.size())});
  }

  void argmax_rows(const Tensor& logits, int64_t limit, Tensor& ids, const Tensor* map = nullptr) override {
    const int64_t R = logits.dim(0), N = logits.numel() / std::max<int64_t>(R, 1);
    DS_CHECK(logits.dtype == DType::F32 && ids.dtype == DType::I32 && ids.numel() == R && limit >= 1 && limit <= N,
             "argmax_rows: logits F32 [R, N], ids I32 [R], limit in 1..N");
    DS_CHECK(!map || (map->dtype == DType::I32 && map->numel() == N), "argmax_rows: map must be I32 [", N, "]");
    if (R == 0) return;
    DS_CUDA_CHECK(pdl_launch(k_argmax_rows, unsigned(R), 512, 0, stream_, logits.ptr<float>(), N, limit,
                             map ? map->ptr<int32_t>() : nullptr, ids.ptr<int32_t>()));
    DS_CUDA_CHECK_LAST();
  }
  // The mirror's token row is its first T ints (build_batch): a device copy, stream-ordered after the upload (a copy
  // node when recorded: `ids` must then stay at its address).
  void batch_tokens_from(BatchMeta& b, const Tensor& ids) override {
    DS_CHECK(ids.dtype == DType::I32 && ids.numel() == b.num_tokens(), "batch_tokens_from: ids must be I32 [",
             b.num_tokens(), "]");
    if (b.num_tokens() == 0) return;
    auto& d = dev(b);
    DS_CUDA_CHECK(cudaMemcpyAsync(const_cast<int32_t*>(d.tokens), ids.data, size_t(b.num_tokens()) * 4,
                                  cudaMemcpyDeviceToDevice, stream_));
  }

  // ---- vision tower (vision_kernels.cu) ----
  void layernorm(const Tensor& x, const Tensor& w, const Tensor& b, float eps, Tensor& y) override {
    const int64_t D = w.numel(), R = D ? x.numel() / D : 0;
    DS_CHECK(w.dtype == DType::F32 && b.dtype == DType::F32 && b.numel() == D && R * D == x.numel() &&
                 y.numel() == x.numel(),
             "layernorm x ", shape_str(x.shape), " w ", shape_str(w.shape), " b ", shape_str(b.shape));
    vis_layernorm(x.data, int(x.dtype), w.ptr<float>(), b.ptr<float>(), eps, R, D, y.data, int(y.dtype), stream_);
  }
  void add_bias(Tensor& x, const Tensor& bias) override {
    const int64_t N = bias.numel(), R = N ? x.numel() / N : 0;
    DS_CHECK(bias.dtype == DType::F32 && R * N == x.numel(), "add_bias x ", shape_str(x.shape), " bias ",
             shape_str(bias.shape));
    vis_add_bias(x.data, int(x.dtype), bias.ptr<float>(), R, N, stream_);
  }
  void gelu(const Tensor& x, bool tanh_approx, Tensor& y) override {
    DS_CHECK(x.numel() == y.numel(), "gelu x ", shape_str(x.shape), " y ", shape_str(y.shape));
    vis_gelu(x.data, int(x.dtype), tanh_approx, x.numel(), y.data, int(y.dtype), stream_);
  }
  void embed_bilinear_add(Tensor& x, const Tensor& table, const std::vector<int32_t>& idx,
                          const std::vector<float>& w) override {
    const int64_t R = x.dim(0), D = R ? x.numel() / R : 0, V = table.dim(0);
    DS_CHECK(table.numel() == V * D && idx.size() == w.size() && R > 0 && int64_t(idx.size()) % R == 0,
             "embed_bilinear_add x ", shape_str(x.shape), " table ", shape_str(table.shape), " idx ", idx.size());
    for (int32_t id : idx) DS_CHECK(id >= 0 && id < V, "position-embedding index ", id, " outside [0, ", V, ")");
    const int64_t J = int64_t(idx.size()) / R;
    Tensor di = upload_bytes(idx.data(), idx.size() * 4, DType::I32, {int64_t(idx.size())});
    Tensor dw = upload_bytes(w.data(), w.size() * 4, DType::F32, {int64_t(w.size())});
    vis_embed_bilinear_add(x.data, int(x.dtype), table.data, int(table.dtype), di.ptr<int32_t>(), dw.ptr<float>(), R,
                           J, D, stream_);
  }
  void vision_rope(Tensor& qkv, int64_t Nh, int64_t Dh, const std::vector<int32_t>& pos, double theta) override {
    const int64_t P = qkv.dim(0), half = Dh / 2, quarter = half / 2;
    DS_CHECK(qkv.numel() == P * 3 * Nh * Dh && int64_t(pos.size()) == 2 * P && Dh % 4 == 0, "vision_rope qkv ",
             shape_str(qkv.shape), " Nh ", Nh, " Dh ", Dh, " pos ", pos.size());
    if (P == 0) return;
    // The CPU reference's frequencies: theta^(−2j/half) in double, then fp32.
    std::vector<float> f(size_t(std::max<int64_t>(quarter, 1)), 0.f);
    for (int64_t j = 0; j < quarter; ++j) f[size_t(j)] = float(1.0 / std::pow(theta, double(2 * j) / double(half)));
    Tensor df = upload_bytes(f.data(), f.size() * 4, DType::F32, {int64_t(f.size())});
    Tensor dp = upload_bytes(pos.data(), pos.size() * 4, DType::I32, {int64_t(pos.size())});
    vis_rope(qkv.data, int(qkv.dtype), P, Nh, Dh, dp.ptr<int32_t>(), df.ptr<float>(), stream_);
  }
  void vision_attention(const Tensor& qkv, int64_t Nh, int64_t Dh, const std::vector<int32_t>& cu,
                        Tensor& o) override {
    const int64_t P = qkv.dim(0);
    DS_CHECK(qkv.numel() == P * 3 * Nh * Dh && o.numel() == P * Nh * Dh && cu.size() >= 2 && cu.front() == 0 &&
                 cu.back() == P,
             "vision_attention qkv ", shape_str(qkv.shape), " o ", shape_str(o.shape));
    for (size_t i = 0; i + 1 < cu.size(); ++i) DS_CHECK(cu[i] <= cu[i + 1], "vision_attention: cu_seqlens decrease");
    DS_CHECK(vis_attention_supported(Dh), "vision_attention: head dim ", Dh,
             " is not supported on cuda (a multiple of 8, at most 128)");
    if (P == 0) return;
    Tensor qb = as_bf16(qkv);
    DS_CHECK(o.dtype == DType::BF16, "vision_attention: output must be BF16 on cuda, got ", dtype_name(o.dtype));
    const std::vector<int32_t> tiles = vis_attention_tiles(cu);
    Tensor dt = upload_bytes(tiles.data(), tiles.size() * 4, DType::I32, {int64_t(tiles.size())});
    vis_attention(qb.data, Nh, Dh, dt.ptr<int32_t>(), int64_t(tiles.size() / 3), o.data, stream_);
  }
  void scatter_rows(Tensor& x, const std::vector<int32_t>& rows, const Tensor& src) override {
    const int64_t T = x.dim(0), H = T ? x.numel() / T : 0;
    DS_CHECK(src.numel() == int64_t(rows.size()) * H && src.dtype == x.dtype, "scatter_rows src ",
             shape_str(src.shape), " for ", rows.size(), " rows of ", H);
    for (int32_t r : rows) DS_CHECK(r >= 0 && r < T, "scatter_rows row ", r, " outside [0, ", T, ")");
    if (rows.empty()) return;
    Tensor dr = upload_bytes(rows.data(), rows.size() * 4, DType::I32, {int64_t(rows.size())});
    vis_scatter_rows(x.data, src.data, int(x.dtype), dr.ptr<int32_t>(), int64_t(rows.size()), H, stream_);
  }

  // ---- step arena and graphs (ops.h) ----
  void step_begin() override {
    DS_CHECK(!in_step_, "step_begin: already in a step");
    in_step_ = true;
    arena_chunk_ = 0;
    arena_off_ = 0;
  }
  void step_end() override { in_step_ = false; }
  void* stream_handle() const override { return stream_; }
  bool graph_run(const std::string& key, const std::function<void()>& fn) override {
    DS_CHECK(in_step_, "graph_run outside step_begin/step_end");
    Graph& g = graphs_[key];
    if (g.calls == 0) {  // warm-up: first-use work (handles, caches, arena growth) happens outside a recording
      g.calls = 1;
      fn();
      return true;
    }
    if (!g.exec || g.batch != last_batch_) {  // record (again, if the batch mirror moved)
      if (g.exec) DS_CUDA_CHECK(cudaGraphExecDestroy(g.exec));
      g.exec = nullptr;
      const size_t nchunks = arena_.size();
      // The zero-fill of the step's allocs, one memset node each between kernels (~13 per layer, each a full
      // dependency that no PDL edge crosses), is hoisted: the recording notes the arena range its allocs span per
      // chunk, and each launch is preceded by one memset of that range (DS_CUDA_NO_ZERO_HOIST=1: memset nodes). The
      // range holds only this graph's allocs and scratch, which nothing outside it reads before it runs.
      zero_hoist_ = !env_flag("DS_CUDA_NO_ZERO_HOIST");
      rec_zero_.assign(nchunks, {SIZE_MAX, 0});
      DS_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
      capturing_ = true;
      cudaGraph_t graph = nullptr;
      try {
        fn();
      } catch (...) {
        capturing_ = false;
        cudaStreamEndCapture(stream_, &graph);
        if (graph) cudaGraphDestroy(graph);
        throw;
      }
      capturing_ = false;
      DS_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
      DS_CHECK(arena_.size() == nchunks, "step arena grew while recording a graph (warm-up should have grown it)");
      if (env_flag("DS_CUDA_GRAPH_STATS")) print_graph_stats(key, graph);
      DS_CUDA_CHECK(cudaGraphInstantiate(&g.exec, graph, 0));
      DS_CUDA_CHECK(cudaGraphDestroy(graph));
      g.batch = last_batch_;
      g.zero.clear();
      for (size_t c = 0; c < rec_zero_.size(); ++c)
        if (rec_zero_[c].first < rec_zero_[c].second)
          g.zero.push_back({static_cast<char*>(arena_[c].ptr) + rec_zero_[c].first,
                            rec_zero_[c].second - rec_zero_[c].first});
      launch_graph(g);
      return true;
    }
    launch_graph(g);
    return false;
  }

 private:
  struct Chunk {
    void* ptr = nullptr;
    size_t size = 0;
  };
  // Bump allocation from the step arena: chunks are never freed (recorded graphs hold their addresses).
  Tensor arena_tensor(Tensor t, size_t n) {
    n = (n + 255) & ~size_t(255);
    while (arena_chunk_ < arena_.size() && arena_off_ + n > arena_[arena_chunk_].size) {
      ++arena_chunk_;
      arena_off_ = 0;
    }
    if (arena_chunk_ == arena_.size()) {
      DS_CHECK(!capturing_, "step arena exhausted while recording a graph");
      Chunk c;
      c.size = std::max<size_t>(n, size_t(256) << 20);
      DS_CUDA_CHECK(cudaStreamSynchronize(stream_));
      DS_CUDA_CHECK(cudaMalloc(&c.ptr, c.size));
      arena_.push_back(c);
      arena_off_ = 0;
    }
    t.data = static_cast<char*>(arena_[arena_chunk_].ptr) + arena_off_;
    arena_off_ += n;
    t.owner.reset();
    return t;
  }
  struct Graph {
    int calls = 0;
    cudaGraphExec_t exec = nullptr;
    const void* batch = nullptr;                  // the batch mirror the recording reads
    std::vector<std::pair<void*, size_t>> zero;  // arena ranges its allocs span (zeroed before each launch)
  };
  // DS_CUDA_GRAPH_STATS=1: the node count of each recording by type (kernels, memsets, copies), on stderr.
  static void print_graph_stats(const std::string& key, cudaGraph_t graph) {
    size_t n = 0;
    DS_CUDA_CHECK(cudaGraphGetNodes(graph, nullptr, &n));
    std::vector<cudaGraphNode_t> nodes(n);
    if (n) DS_CUDA_CHECK(cudaGraphGetNodes(graph, nodes.data(), &n));
    int kernels = 0, memsets = 0, copies = 0, other = 0;
    for (cudaGraphNode_t nd : nodes) {
      cudaGraphNodeType t;
      DS_CUDA_CHECK(cudaGraphNodeGetType(nd, &t));
      if (t == cudaGraphNodeTypeKernel) ++kernels;
      else if (t == cudaGraphNodeTypeMemset) ++memsets;
      else if (t == cudaGraphNodeTypeMemcpy) ++copies;
      else ++other;
    }
    std::fprintf(stderr, "graph %s: %zu nodes: %d kernels, %d memsets, %d copies, %d other\n", key.c_str(), n, kernels,
                 memsets, copies, other);
  }
  void launch_graph(const Graph& g) {
    for (const auto& [p, n] : g.zero) DS_CUDA_CHECK(cudaMemsetAsync(p, 0, n, stream_));
    DS_CUDA_CHECK(cudaGraphLaunch(g.exec, stream_));
  }
  static constexpr size_t kCublasWorkspace = size_t(32) << 20;
  void* cublas_ws_ = nullptr;
  bool in_step_ = false, capturing_ = false, zero_hoist_ = false;
  std::vector<std::pair<size_t, size_t>> rec_zero_;  // while recording: per arena chunk, the [lo, hi) its allocs span
  std::vector<Chunk> arena_;
  size_t arena_chunk_ = 0, arena_off_ = 0;
  std::map<std::string, Graph> graphs_;
  std::map<std::tuple<int, int, int>, Tensor> step_batch_bufs_;
  const void* last_batch_ = nullptr;
  int dev_;
  cudaStream_t stream_ = nullptr;
  // copy_aside: the second stream (made at first use), the pending tickets' completion events (oldest first) and
  // events to reuse.
  cudaStream_t aside_ = nullptr;
  std::deque<std::pair<uint64_t, cudaEvent_t>> aside_events_;
  std::vector<cudaEvent_t> aside_free_;
  uint64_t aside_ticket_ = 0;
  cublasHandle_t cublas_ = nullptr;
  std::map<std::string, RopeTables> rope_cache_;
};

}  // namespace cuda

std::unique_ptr<Backend> make_cuda_backend(int device) { return std::make_unique<cuda::CudaBackend>(device); }

}  // namespace ds
