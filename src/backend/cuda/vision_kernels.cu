// Vision-tower kernels (contract: vision_kernels.h; meaning: backend/ops.h, CPU twins in backend/cpu/vision_ops.cpp).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/dev_util.cuh"
#include "backend/cuda/mma_util.cuh"
#include "backend/cuda/vision_kernels.h"
#include "core/status.h"
#include "core/dtype.h"

namespace ds::cuda {

namespace {

int vblocks(int64_t n, int threads) {
  return int(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, 65535 * 4)));
}

// ---- elementwise and per-row ops ----

__global__ void k_vis_layernorm(const void* x, int xdt, const float* w, const float* b, float eps, int64_t D, void* y,
                                int ydt) {
  const int64_t r = blockIdx.x;
  float s = 0.f;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) s += ldf(x, xdt, r * D + d);
  const float mean = block_sum(s) / float(D);
  float ss = 0.f;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const float c = ldf(x, xdt, r * D + d) - mean;
    ss += c * c;
  }
  const float inv = 1.f / sqrtf(block_sum(ss) / float(D) + eps);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
    stf(y, ydt, r * D + d, (ldf(x, xdt, r * D + d) - mean) * inv * w[d] + b[d]);
}

__global__ void k_vis_add_bias(void* x, int xdt, const float* bias, int64_t N, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    stf(x, xdt, i, ldf(x, xdt, i) + bias[i % N]);
}

__global__ void k_vis_gelu(const void* x, int xdt, bool tanh_approx, int64_t n, void* y, int ydt) {
  const float k0 = 0.7978845608028654f, k1 = 0.044715f, rs2 = 0.7071067811865476f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float v = ldf(x, xdt, i);
    stf(y, ydt, i, tanh_approx ? 0.5f * v * (1.f + tanhf(k0 * (v + k1 * v * v * v))) : 0.5f * v * (1.f + erff(v * rs2)));
  }
}

// One block per row; the taps are added in j order in fp32, then the row is rounded once.
__global__ void k_vis_embed_bilinear_add(void* x, int xdt, const void* table, int tdt, const int32_t* idx,
                                         const float* w, int64_t J, int64_t D) {
  const int64_t r = blockIdx.x;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = ldf(x, xdt, r * D + d);
    for (int64_t j = 0; j < J; ++j) acc += w[r * J + j] * ldf(table, tdt, int64_t(idx[r * J + j]) * D + d);
    stf(x, xdt, r * D + d, acc);
  }
}

// One block per patch; a thread per (q|k, head, i < half) rotates the NeoX pair (i, i + half).
__global__ void k_vis_rope(void* qkv, int dt, int64_t P, int64_t Nh, int64_t Dh, const int32_t* pos,
                           const float* freq) {
  const int64_t p = blockIdx.x, half = Dh / 2, quarter = half / 2, row = 3 * Nh * Dh;
  const float rp = float(pos[p]), cp = float(pos[P + p]);
  for (int64_t u = threadIdx.x; u < 2 * Nh * half; u += blockDim.x) {
    const int64_t i = u % half, hh = u / half;  // hh = part·Nh + head: q heads then k heads, contiguous
    const float ang = i < quarter ? rp * freq[i] : cp * freq[i - quarter];
    const float c = cosf(ang), s = sinf(ang);
    const int64_t base = p * row + hh * Dh;
    const float a = ldf(qkv, dt, base + i), b = ldf(qkv, dt, base + i + half);
    stf(qkv, dt, base + i, a * c - b * s);
    stf(qkv, dt, base + i + half, b * c + a * s);
  }
}

__global__ void k_vis_scatter(void* x, const void* src, int dt, const int32_t* rows, int64_t H) {
  const int64_t i = blockIdx.x, r = rows[i];
  for (int64_t d = threadIdx.x; d < H; d += blockDim.x) stf(x, dt, r * H + d, ldf(src, dt, i * H + d));
}

// ---- attention ----

// One block of 4 warps per (query tile of 64 rows, head); warp w owns query rows 16w..16w+15 of the tile. Keys and
// values of the tile's segment stream through shared memory 64 rows at a time, double-buffered with cp.async (the
// next tile loads while this one computes), both row-major [key][DP + 8] (the +8 halves make every 16-byte row
// address land in a different bank group: conflict-free fragment loads). The head dim is zero-padded to DP (a
// multiple of 16) for the q·k products; S = QKᵀ stays in registers and becomes the A operand of P·V directly (the
// C layout of two n8 tiles is the A layout of one k16 step); V's B fragments come from ldmatrix.trans. P is
// rounded to bf16 for that product; the row sums l are taken from the fp32 probabilities.
constexpr int kVisKeys = 64;
template <int DP>
constexpr int vis_attn_smem() {
  return 2 * 2 * kVisKeys * (DP + 8) * 2;  // 2 stages × (K, V) × 64 rows × (DP + 8) bf16
}
template <int DP>
__global__ void __launch_bounds__(128) k_vis_attention(const __nv_bfloat16* qkv, int64_t Nh, int64_t Dh,
                                                       const int32_t* tiles, float scale_log2, __nv_bfloat16* o) {
  constexpr int BQ = kVisAttnRows, BK = kVisKeys, LD = DP + 8, CH = DP / 8, STAGE = BK * LD;
  static_assert(DP % 16 == 0 && DP <= 128 && BQ == BK, "padded head dim; Q's tile uses a K stage");
  extern __shared__ __align__(16) unsigned char vis_smem[];
  __nv_bfloat16* sK = reinterpret_cast<__nv_bfloat16*>(vis_smem);  // [2][BK][LD]
  __nv_bfloat16* sV = sK + 2 * STAGE;                               // [2][BK][LD]
  const int64_t tile = blockIdx.x, h = blockIdx.y;
  const int s0 = tiles[3 * tile], s1 = tiles[3 * tile + 1], q0 = tiles[3 * tile + 2];
  const int64_t row = 3 * Nh * Dh;
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, g = lane >> 2, t = lane & 3;
  const int dch = int(Dh / 8);  // 16-byte chunks of a real head row (Dh % 8 == 0)

  // Rows [r0, r0 + 64) of part `part` (0 q, 1 k, 2 v) → dst [64][LD], zeros past the segment and in the padding.
  auto load = [&](__nv_bfloat16* dst, int r0, int part) {
    for (int i = tid; i < BK * CH; i += blockDim.x) {
      const int r = i / CH, c = i % CH;
      const bool ok = r0 + r < s1 && c < dch;
      const __nv_bfloat16* src = ok ? qkv + int64_t(r0 + r) * row + part * Nh * Dh + h * Dh + c * 8 : qkv;
      cp_async16(dst + r * LD + c * 8, src, ok ? 16 : 0);
    }
  };

  // Q tile → stage 1 of K → A fragments in registers (rows past the segment are zeros and never stored).
  load(sK + STAGE, q0, 0);
  cp_async_commit();
  load(sK, s0, 1);  // the first K/V tile, in flight while Q's fragments are read
  load(sV, s0, 2);
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();
  uint32_t qf[DP / 16][4];
  const int qr = w * 16;
  {
    const __nv_bfloat16* sQ = sK + STAGE;
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
      qf[kk][0] = ld_u32(&sQ[(qr + g) * LD + kk * 16 + 2 * t]);
      qf[kk][1] = ld_u32(&sQ[(qr + g + 8) * LD + kk * 16 + 2 * t]);
      qf[kk][2] = ld_u32(&sQ[(qr + g) * LD + kk * 16 + 2 * t + 8]);
      qf[kk][3] = ld_u32(&sQ[(qr + g + 8) * LD + kk * 16 + 2 * t + 8]);
    }
  }
  __syncthreads();  // stage 1 is free for the second K/V tile

  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // rows g and g + 8 of the warp (log2 domain)
  float acc[DP / 8][4];
#pragma unroll
  for (int dt = 0; dt < DP / 8; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;

  int stage = 0;
  for (int kb = s0; kb < s1; kb += BK, stage ^= 1) {  // block-uniform trip count
    if (kb + BK < s1) {  // prefetch the next tile into the other stage (free since the end of the last iteration)
      load(sK + (stage ^ 1) * STAGE, kb + BK, 1);
      load(sV + (stage ^ 1) * STAGE, kb + BK, 2);
      cp_async_commit();
      cp_async_wait<1>();  // this tile's group is complete; the next one may still be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const __nv_bfloat16* K = sK + stage * STAGE;
    const __nv_bfloat16* V = sV + stage * STAGE;

    float s[BK / 8][4];
#pragma unroll
    for (int nt = 0; nt < BK / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < DP / 16; ++kk)
        mma16816(s[nt], qf[kk], ld_u32(&K[(nt * 8 + g) * LD + kk * 16 + 2 * t]),
                 ld_u32(&K[(nt * 8 + g) * LD + kk * 16 + 2 * t + 8]));
    }
    float mx0 = m0, mx1 = m1;
#pragma unroll
    for (int nt = 0; nt < BK / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = kb + nt * 8 + 2 * t + (e & 1);
        s[nt][e] = key < s1 ? s[nt][e] * scale_log2 : -INFINITY;
        if (e < 2) mx0 = fmaxf(mx0, s[nt][e]);
        else mx1 = fmaxf(mx1, s[nt][e]);
      }
    // The 4 lanes of a quad share rows g and g + 8. Key kb < s1 is in every tile, so the maxima are finite.
    online_softmax_tile(s, acc, mx0, mx1, m0, m1, l0, l1);  // acc × 0 on the first tile (m = −inf)
    // ldmatrix.x4.trans row addresses: matrix j = lane / 8 covers keys ks·16 + 8·(j & 1) + (lane % 8) and dims
    // (dt + j / 2)·8..+7, so r[0], r[1] are dt's B fragment (keys 2t.., 2t+8..) and r[2], r[3] are dt + 1's.
    const int mrow = 8 * ((lane >> 3) & 1) + (lane & 7), mcol = 8 * (lane >> 4);
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      uint32_t a[4];
      p_fragment(s[2 * ks], s[2 * ks + 1], a);
#pragma unroll
      for (int dt = 0; dt < DP / 8; dt += 2) {
        uint32_t b[4];
        ldsm_x4_t(b, &V[(ks * 16 + mrow) * LD + dt * 8 + mcol]);
        mma16816(acc[dt], a, b[0], b[1]);
        mma16816(acc[dt + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with this stage before the next iteration's prefetch overwrites it
  }
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float i0 = 1.f / l0, i1 = 1.f / l1;
  const int r0 = q0 + qr + g, r1 = r0 + 8;
#pragma unroll
  for (int dt = 0; dt < DP / 8; ++dt) {
    const int d = dt * 8 + 2 * t;  // even, and Dh is a multiple of 8: d < Dh ⇒ d + 1 < Dh
    if (d >= Dh) continue;
    if (r0 < s1)
      *reinterpret_cast<__nv_bfloat162*>(o + (int64_t(r0) * Nh + h) * Dh + d) =
          __floats2bfloat162_rn(acc[dt][0] * i0, acc[dt][1] * i0);
    if (r1 < s1)
      *reinterpret_cast<__nv_bfloat162*>(o + (int64_t(r1) * Nh + h) * Dh + d) =
          __floats2bfloat162_rn(acc[dt][2] * i1, acc[dt][3] * i1);
  }
}

}  // namespace

void vis_layernorm(const void* x, int xdt, const float* w, const float* b, float eps, int64_t R, int64_t D, void* y,
                   int ydt, cudaStream_t s) {
  if (R == 0) return;
  k_vis_layernorm<<<unsigned(R), 256, 0, s>>>(x, xdt, w, b, eps, D, y, ydt);
  DS_CUDA_CHECK_LAST();
}

void vis_add_bias(void* x, int xdt, const float* bias, int64_t R, int64_t N, cudaStream_t s) {
  const int64_t n = R * N;
  if (n == 0) return;
  k_vis_add_bias<<<vblocks(n, 256), 256, 0, s>>>(x, xdt, bias, N, n);
  DS_CUDA_CHECK_LAST();
}

void vis_gelu(const void* x, int xdt, bool tanh_approx, int64_t n, void* y, int ydt, cudaStream_t s) {
  if (n == 0) return;
  k_vis_gelu<<<vblocks(n, 256), 256, 0, s>>>(x, xdt, tanh_approx, n, y, ydt);
  DS_CUDA_CHECK_LAST();
}

void vis_embed_bilinear_add(void* x, int xdt, const void* table, int tdt, const int32_t* idx, const float* w, int64_t R,
                            int64_t J, int64_t D, cudaStream_t s) {
  if (R == 0) return;
  k_vis_embed_bilinear_add<<<unsigned(R), 256, 0, s>>>(x, xdt, table, tdt, idx, w, J, D);
  DS_CUDA_CHECK_LAST();
}

void vis_rope(void* qkv, int dt, int64_t P, int64_t Nh, int64_t Dh, const int32_t* pos, const float* freq,
              cudaStream_t s) {
  if (P == 0) return;
  const int64_t n = Nh * Dh;  // 2·Nh·(Dh/2) pairs
  k_vis_rope<<<unsigned(P), unsigned(std::min<int64_t>(1024, (n + 31) / 32 * 32)), 0, s>>>(qkv, dt, P, Nh, Dh, pos,
                                                                                       freq);
  DS_CUDA_CHECK_LAST();
}

bool vis_attention_supported(int64_t Dh) { return Dh > 0 && Dh % 8 == 0 && Dh <= 128; }

std::vector<int32_t> vis_attention_tiles(const std::vector<int32_t>& cu) {
  std::vector<int32_t> t;
  for (size_t i = 0; i + 1 < cu.size(); ++i)
    for (int32_t q = cu[i]; q < cu[i + 1]; q += kVisAttnRows) {
      t.push_back(cu[i]);
      t.push_back(cu[i + 1]);
      t.push_back(q);
    }
  return t;
}

void vis_attention(const void* qkv, int64_t Nh, int64_t Dh, const int32_t* tiles, int64_t ntiles, void* o,
                   cudaStream_t s) {
  if (ntiles == 0) return;
  DS_CHECK(vis_attention_supported(Dh), "vision_attention: head dim ", Dh, " must be a multiple of 8, at most 128");
  DS_CHECK(reinterpret_cast<uintptr_t>(qkv) % 16 == 0, "vision_attention: qkv must be 16-byte aligned");
  DS_CHECK(Nh <= 65535 && ntiles < (int64_t(1) << 31));
  const float scale_log2 = float(1.0 / std::sqrt(double(Dh)) * 1.4426950408889634);
  const dim3 grid{unsigned(ntiles), unsigned(Nh)};
  auto* q = static_cast<const __nv_bfloat16*>(qkv);
  auto* out = static_cast<__nv_bfloat16*>(o);
  switch ((Dh + 15) / 16 * 16) {
#define DS_VIS_ATTN(DP)                                                                                 \
  case DP:                                                                                              \
    DS_CUDA_CHECK(cudaFuncSetAttribute(k_vis_attention<DP>, cudaFuncAttributeMaxDynamicSharedMemorySize,          \
                             vis_attn_smem<DP>()));                                                     \
    k_vis_attention<DP><<<grid, 128, vis_attn_smem<DP>(), s>>>(q, Nh, Dh, tiles, scale_log2, out);      \
    break;
    DS_VIS_ATTN(16)
    DS_VIS_ATTN(32)
    DS_VIS_ATTN(48)
    DS_VIS_ATTN(64)
    DS_VIS_ATTN(80)
    DS_VIS_ATTN(96)
    DS_VIS_ATTN(112)
    DS_VIS_ATTN(128)
#undef DS_VIS_ATTN
    default:
      fail("vision_attention: head dim ", Dh, " is not supported");
  }
  DS_CUDA_CHECK_LAST();
}

void vis_scatter_rows(void* x, const void* src, int dt, const int32_t* rows, int64_t R, int64_t H, cudaStream_t s) {
  if (R == 0) return;
  k_vis_scatter<<<unsigned(R), 256, 0, s>>>(x, src, dt, rows, H);
  DS_CUDA_CHECK_LAST();
}

}  // namespace ds::cuda
