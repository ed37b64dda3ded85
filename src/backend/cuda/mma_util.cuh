// Device helpers shared by the tensor-core kernels: mma.sync (bf16 in, fp32 accumulate), cp.async copies from global
// to shared memory, ldmatrix, bf16 packing. Header-only (inline device functions).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace ds::cuda {

// c[16×8] += a[16×16] · b[16×8] on tensor cores (bf16 in, fp32 accumulate). Fragment layouts of PTX's
// mma.m16n8k16 (g = lane / 4, t = lane % 4): a: {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)};
// b: {(k 2t..2t+1, n g), (k 2t+8.., n g)}; c: {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}.
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16 bytes global → shared without a register round trip (.cg: cached in L2 only). The "memory" clobbers keep the
// compiler from moving shared-memory accesses across the copies and waits.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned sa = unsigned(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sa), "l"(gmem) : "memory");
}
// The same with src_bytes < 16 bytes read and the rest zero-filled (0: writes zeros; rows past the end, padding).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  const unsigned sa = unsigned(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sa), "l"(gmem), "r"(src_bytes) : "memory");
}
// 4 bytes (.ca: the only class for copies under 16 bytes).
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  const unsigned sa = unsigned(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(sa), "l"(gmem) : "memory");
}
// 8 bytes (.ca).
__device__ __forceinline__ void cp_async8(void* smem, const void* gmem) {
  const unsigned sa = unsigned(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(sa), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Wait until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8×8 bf16 matrices from shared memory: lane l gives the row address of matrix l / 8, row l % 8.
__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const void* p) {
  const unsigned s = unsigned(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}
// The same, each matrix transposed.
__device__ __forceinline__ void ldsm_x4_t(uint32_t r[4], const void* p) {
  const unsigned s = unsigned(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// Shared-memory tiles of [rows][DH] bf16 with the 16-byte chunks of row r XOR-swizzled by r % 8, so that the 8 row
// addresses of an ldmatrix (8 consecutive rows, one logical chunk) fall in 8 different bank groups: the element
// offset of chunk ch of row r.
template <int DH>
__device__ __forceinline__ int swz(int r, int ch) {
  return r * DH + ((ch ^ (r & 7)) << 3);
}
// Two consecutive bf16 (4-byte aligned) as one register: an mma fragment word.
__device__ __forceinline__ uint32_t ld_u32(const __nv_bfloat16* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Two floats as one bf16×2 register (round to nearest even), lo in the low half.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Flash-style attention on mma.sync C fragments: a lane holds rows g (elements 0, 1) and g + 8 (elements 2, 3) of
// each n-tile, and the 4 lanes of a quad share those rows.
// The rest of one tile's online-softmax update once the caller has scaled (log2 domain) and masked the scores s and
// taken this lane's maxima mx0 / mx1 of them and of the running maxima m0 / m1: the quad's maxima become m0 / m1,
// s becomes exp2(s − m), l0 / l1 (this lane's running sums of its own columns; the caller adds the quad's partial
// sums at the end) move on, and c0 / c1 = exp2(m_old − m_new) (0 on the first tile) is the factor the output
// accumulators take: softmax_scores returns it (for a caller whose accumulators may be in flight),
// online_softmax_tile applies it to acc at once.
// FTZ: 2^x by ex2.approx.ftz, one MUFU: exp2f's result wherever x ≥ −126 and 0 below (exp2f gives a denormal
// there through a range test, an add and a multiply around the MUFU).
template <bool FTZ>
__device__ __forceinline__ float exp2_sm(float x) {
  if constexpr (FTZ) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
  } else {
    return exp2f(x);
  }
}
template <int NS, bool FTZ = false>
__device__ __forceinline__ void softmax_scores(float (&s)[NS][4], float mx0, float mx1, float& m0, float& m1, float& l0,
                                               float& l1, float& c0, float& c1) {
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
  c0 = exp2_sm<FTZ>(m0 - mx0), c1 = exp2_sm<FTZ>(m1 - mx1);
  m0 = mx0;
  m1 = mx1;
  float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    s[i][0] = exp2_sm<FTZ>(s[i][0] - mx0);
    s[i][1] = exp2_sm<FTZ>(s[i][1] - mx0);
    s[i][2] = exp2_sm<FTZ>(s[i][2] - mx1);
    s[i][3] = exp2_sm<FTZ>(s[i][3] - mx1);
    sum0 += s[i][0] + s[i][1];
    sum1 += s[i][2] + s[i][3];
  }
  l0 = l0 * c0 + sum0;
  l1 = l1 * c1 + sum1;
}
template <int NS, int NA>
__device__ __forceinline__ void online_softmax_tile(float (&s)[NS][4], float (&acc)[NA][4], float mx0, float mx1,
                                                    float& m0, float& m1, float& l0, float& l1) {
  float c0, c1;
  softmax_scores(s, mx0, mx1, m0, m1, l0, l1, c0, c1);
#pragma unroll
  for (int i = 0; i < NA; ++i) {
    acc[i][0] *= c0;
    acc[i][1] *= c0;
    acc[i][2] *= c1;
    acc[i][3] *= c1;
  }
}
// The A fragment of a P·V k-step from the C fragments of S's n-tiles 2k and 2k + 1 (P rounded to bf16).
__device__ __forceinline__ void p_fragment(const float (&c0)[4], const float (&c1)[4], uint32_t a[4]) {
  a[0] = pack_bf16(c0[0], c0[1]);
  a[1] = pack_bf16(c0[2], c0[3]);
  a[2] = pack_bf16(c1[0], c1[1]);
  a[3] = pack_bf16(c1[2], c1[3]);
}

}  // namespace ds::cuda
