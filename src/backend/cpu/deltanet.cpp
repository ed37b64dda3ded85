// Gated DeltaNet reference: the recurrent form (decode) and the chunked WY form (prefill).
#include <cmath>
#include <vector>

#include "backend/cpu/cpu_backend.h"

namespace ds::cpu {

void gdr_recurrent(const float* q, const float* k, const float* v, const float* g, const float* beta, int64_t L,
                   int64_t Dk, int64_t Dv, float* S, float* o) {
  std::vector<float> u(Dv);
  for (int64_t t = 0; t < L; ++t) {
    const float* kt = k + t * Dk;
    const float* qt = q + t * Dk;
    const float* vt = v + t * Dv;
    float decay = std::exp(g[t]);
    for (int64_t i = 0; i < Dk * Dv; ++i) S[i] *= decay;
    // u = Sᵀ k : the state's current prediction for this key
    for (int64_t d = 0; d < Dv; ++d) u[d] = 0.f;
    for (int64_t i = 0; i < Dk; ++i)
      for (int64_t d = 0; d < Dv; ++d) u[d] += S[i * Dv + d] * kt[i];
    for (int64_t d = 0; d < Dv; ++d) u[d] = beta[t] * (vt[d] - u[d]);
    for (int64_t i = 0; i < Dk; ++i)
      for (int64_t d = 0; d < Dv; ++d) S[i * Dv + d] += kt[i] * u[d];
    // the output reads the updated state
    float* ot = o + t * Dv;
    for (int64_t d = 0; d < Dv; ++d) ot[d] = 0.f;
    for (int64_t i = 0; i < Dk; ++i)
      for (int64_t d = 0; d < Dv; ++d) ot[d] += S[i * Dv + d] * qt[i];
  }
}

// Per chunk of c rows (G = cumulative log-decay within the chunk):
//   A[i,j] = β_i (k_i·k_j) e^{G_i−G_j} (j<i);  U = (I+A)⁻¹(β⊙V);  W = (I+A)⁻¹(β⊙e^G⊙K)
//   V' = U − W·S;  O = (Q⊙e^G)·S + [(QKᵀ)⊙M]·V' (M[i,j] = e^{G_i−G_j}, j≤i)
//   S ← e^{G_c}·S + (K⊙e^{G_c−G})ᵀ·V'
void gdr_chunked(const float* q, const float* k, const float* v, const float* g, const float* beta, int64_t L,
                 int64_t Dk, int64_t Dv, int64_t chunk, float* S, float* o) {
  std::vector<float> G(chunk), A(chunk * chunk), U(chunk * Dv), W(chunk * Dk), Vp(chunk * Dv), Snew(Dk * Dv);
  for (int64_t c0 = 0; c0 < L; c0 += chunk) {
    const int64_t c = std::min(chunk, L - c0);
    const float* Q = q + c0 * Dk;
    const float* K = k + c0 * Dk;
    const float* V = v + c0 * Dv;
    const float* B = beta + c0;
    float acc = 0.f;
    for (int64_t i = 0; i < c; ++i) G[i] = acc += g[c0 + i];
    for (int64_t i = 0; i < c; ++i)
      for (int64_t j = 0; j < i; ++j) {
        float dot = 0.f;
        for (int64_t d = 0; d < Dk; ++d) dot += K[i * Dk + d] * K[j * Dk + d];
        A[i * chunk + j] = B[i] * dot * std::exp(G[i] - G[j]);
      }
    // Forward substitution with the unit lower-triangular (I + A).
    for (int64_t i = 0; i < c; ++i) {
      for (int64_t d = 0; d < Dv; ++d) U[i * Dv + d] = B[i] * V[i * Dv + d];
      float eg = std::exp(G[i]);
      for (int64_t d = 0; d < Dk; ++d) W[i * Dk + d] = B[i] * eg * K[i * Dk + d];
      for (int64_t j = 0; j < i; ++j) {
        float a = A[i * chunk + j];
        for (int64_t d = 0; d < Dv; ++d) U[i * Dv + d] -= a * U[j * Dv + d];
        for (int64_t d = 0; d < Dk; ++d) W[i * Dk + d] -= a * W[j * Dk + d];
      }
    }
    // V' = U − W·S
    for (int64_t i = 0; i < c; ++i)
      for (int64_t d = 0; d < Dv; ++d) {
        float s = 0.f;
        for (int64_t e = 0; e < Dk; ++e) s += W[i * Dk + e] * S[e * Dv + d];
        Vp[i * Dv + d] = U[i * Dv + d] - s;
      }
    // O
    for (int64_t i = 0; i < c; ++i) {
      float* oi = o + (c0 + i) * Dv;
      float eg = std::exp(G[i]);
      for (int64_t d = 0; d < Dv; ++d) {
        float s = 0.f;
        for (int64_t e = 0; e < Dk; ++e) s += Q[i * Dk + e] * S[e * Dv + d];
        oi[d] = s * eg;
      }
      for (int64_t j = 0; j <= i; ++j) {
        float qk = 0.f;
        for (int64_t e = 0; e < Dk; ++e) qk += Q[i * Dk + e] * K[j * Dk + e];
        float m = qk * std::exp(G[i] - G[j]);
        for (int64_t d = 0; d < Dv; ++d) oi[d] += m * Vp[j * Dv + d];
      }
    }
    // S ← e^{G_c} S + Σ_j e^{G_c − G_j} k_j ⊗ v'_j
    const float Gc = G[c - 1], egc = std::exp(Gc);
    for (int64_t e = 0; e < Dk * Dv; ++e) Snew[e] = S[e] * egc;
    for (int64_t j = 0; j < c; ++j) {
      float w = std::exp(Gc - G[j]);
      for (int64_t e = 0; e < Dk; ++e) {
        float kw = K[j * Dk + e] * w;
        for (int64_t d = 0; d < Dv; ++d) Snew[e * Dv + d] += kw * Vp[j * Dv + d];
      }
    }
    std::copy(Snew.begin(), Snew.end(), S);
  }
}

}  // namespace ds::cpu
