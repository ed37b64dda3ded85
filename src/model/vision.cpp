// The vision tower (model-spec §5.3): patch embedding, interpolated learned position embeddings, 2-D rotary,
// per-image bidirectional attention blocks, and the 2×2 merger into one LLM token per merge unit.
#include <cmath>

#include "model/model.h"

namespace ds::model {

namespace {

// Host-side layout of the patches (cheap metadata, like text positions): per patch its (row, col) in the
// image's patch grid, recovered from the merge-block-major order, and its 4 bilinear position-embedding taps
// (align_corners = True on the side×side table).
struct PatchLayout {
  std::vector<int32_t> pos;        // [2, P]: rows then cols
  std::vector<int32_t> pe_idx;     // [P, 4]
  std::vector<float> pe_w;         // [P, 4]
  std::vector<int32_t> cu_seqlens; // segment bounds: one per image and temporal slice
};

PatchLayout patch_layout(const std::vector<std::array<int64_t, 3>>& grids, int64_t merge, int64_t side) {
  int64_t P = 0;
  for (auto& g : grids) P += g[0] * g[1] * g[2];
  PatchLayout L;
  L.pos.resize(size_t(2 * P));
  L.pe_idx.resize(size_t(4 * P));
  L.pe_w.resize(size_t(4 * P));
  L.cu_seqlens.push_back(0);
  int64_t p = 0;
  for (auto& g : grids) {
    const int64_t gt = g[0], gh = g[1], gw = g[2];
    // The reference interpolates with linspace(0, side−1, n) in fp32: coordinate i·(side−1)/(n−1).
    auto coord = [&](int64_t i, int64_t n) { return n == 1 ? 0.f : float(i) * float(side - 1) / float(n - 1); };
    for (int64_t t = 0; t < gt; ++t) {
      for (int64_t bh = 0; bh < gh / merge; ++bh)
        for (int64_t bw = 0; bw < gw / merge; ++bw)
          for (int64_t mh = 0; mh < merge; ++mh)
            for (int64_t mw = 0; mw < merge; ++mw, ++p) {
              const int64_t r = bh * merge + mh, c = bw * merge + mw;
              L.pos[size_t(p)] = int32_t(r);
              L.pos[size_t(P + p)] = int32_t(c);
              const float fr = coord(r, gh), fc = coord(c, gw);
              const int64_t r0 = int64_t(std::floor(fr)), c0 = int64_t(std::floor(fc));
              const int64_t r1 = std::min(r0 + 1, side - 1), c1 = std::min(c0 + 1, side - 1);
              const float dr = fr - float(r0), dc = fc - float(c0);
              const int32_t idx[4] = {int32_t(r0 * side + c0), int32_t(r0 * side + c1), int32_t(r1 * side + c0),
                                      int32_t(r1 * side + c1)};
              const float w[4] = {(1 - dr) * (1 - dc), (1 - dr) * dc, dr * (1 - dc), dr * dc};
              for (int j = 0; j < 4; ++j) {
                L.pe_idx[size_t(4 * p + j)] = idx[j];
                L.pe_w[size_t(4 * p + j)] = w[j];
              }
            }
      L.cu_seqlens.push_back(int32_t(p));
    }
  }
  return L;
}

}  // namespace

Tensor Model::encode_images(const std::vector<float>& pixel_values, const std::vector<std::array<int64_t, 3>>& grids) {
  const VisionWeights& v = w_.vision;
  if (!v.present) fail("this model has no vision tower loaded (no model.visual.* tensors or vision_config)");
  const auto& vc = cfg_.vision;
  const int64_t D = vc.hidden_size, Nh = vc.num_heads, Dh = D / Nh, m = vc.spatial_merge_size;
  const int64_t K = v.patch->K, O = vc.out_hidden_size;
  if (grids.empty()) fail("encode_images: expected at least one image grid");
  int64_t P = 0;
  for (auto& g : grids) {
    if (g[0] < 1 || g[1] < m || g[2] < m || g[1] % m || g[2] % m)
      fail("encode_images: grid [", g[0], ", ", g[1], ", ", g[2], "] must have t >= 1 and h, w positive multiples of ", m);
    P += g[0] * g[1] * g[2];
  }
  if (int64_t(pixel_values.size()) != P * K)
    fail("encode_images: pixel_values has ", pixel_values.size(), " values, expected ", P, " patches x ", K, " = ", P * K);
  const DType act = be_.act_dtype();
  const float eps = 1e-6f;
  const bool tanh_gelu = vc.hidden_act != "gelu";  // gelu_pytorch_tanh (all Qwen3.5/3.6 checkpoints)
  const PatchLayout L = patch_layout(grids, m, v.pos_side);

  // fp32 as given (the patch linear rounds its input to the backend's precision on the device)
  Tensor px = be_.upload_f32(pixel_values, {P, K}, DType::F32);
  Tensor x = be_.alloc(act, {P, D});  // residual stream
  be_.linear(px, v.patch, x);
  be_.add_bias(x, v.patch_b);
  be_.embed_bilinear_add(x, v.pos_embed, L.pe_idx, L.pe_w);

  Tensor h = be_.alloc(act, {P, D}), qkv = be_.alloc(act, {P, 3 * D}), o = be_.alloc(act, {P, D});
  Tensor f1 = be_.alloc(act, {P, vc.intermediate_size}), f1a = be_.alloc(act, {P, vc.intermediate_size});
  Tensor y = be_.alloc(act, {P, D});
  for (const auto& b : v.blocks) {
    be_.layernorm(x, b.norm1_w, b.norm1_b, eps, h);
    be_.linear(h, b.qkv, qkv);
    be_.add_bias(qkv, b.qkv_b);
    be_.vision_rope(qkv, Nh, Dh, L.pos, 10000.0);
    be_.vision_attention(qkv, Nh, Dh, L.cu_seqlens, o);
    be_.linear(o, b.proj, y);
    be_.add_bias(y, b.proj_b);
    be_.add_inplace(x, y);
    be_.layernorm(x, b.norm2_w, b.norm2_b, eps, h);
    be_.linear(h, b.fc1, f1);
    be_.add_bias(f1, b.fc1_b);
    be_.gelu(f1, tanh_gelu, f1a);
    be_.linear(f1a, b.fc2, y);
    be_.add_bias(y, b.fc2_b);
    be_.add_inplace(x, y);
  }
  // Merger: LayerNorm per patch, then each run of m² consecutive patches (one merge unit) is one row.
  be_.layernorm(x, v.merger_norm_w, v.merger_norm_b, eps, h);
  const int64_t U = P / (m * m);
  Tensor z = h.view({U, m * m * D});
  Tensor z1 = be_.alloc(act, {U, m * m * D}), z1a = be_.alloc(act, {U, m * m * D});
  be_.linear(z, v.merger_fc1, z1);
  be_.add_bias(z1, v.merger_fc1_b);
  be_.gelu(z1, false, z1a);
  Tensor out = be_.alloc(act, {U, O});
  be_.linear(z1a, v.merger_fc2, out);
  be_.add_bias(out, v.merger_fc2_b);
  return out;
}

}  // namespace ds::model
