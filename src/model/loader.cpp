// Checkpoint names -> Weights: both expert layouts (fused BF16, per-expert BF16 or int4), int4 or BF16
// per module as quantization_config decides, strict about every tensor.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/status.h"
#include "io/safetensors.h"
#include "io/schema.h"
#include <nlohmann/json.hpp>
#include "model/model.h"

namespace ds::model {

namespace {

using io::TensorEntry;
using io::TensorIndex;

class Loader {
 public:
  Loader(const io::ModelConfig& cfg, TensorIndex& idx, Backend& be, LoadReport& rep)
      : cfg_(cfg), idx_(idx), be_(be), rep_(rep) {}

  const TensorEntry& tensor(const std::string& name, const std::vector<int64_t>& shape) {
    const TensorEntry* e = idx_.find(name);
    if (!e) fail("checkpoint: missing tensor '", name, "' (expected shape ", shape_str(shape), ")");
    if (e->shape != shape)
      fail("checkpoint: tensor '", name, "' has shape ", shape_str(e->shape), ", expected ", shape_str(shape));
    idx_.mark_used(name);
    return *e;
  }

  std::vector<float> f32(const TensorEntry& e) {
    std::vector<float> v(size_t(e.numel()));
    for (size_t i = 0; i < v.size(); ++i) {
      switch (e.dtype) {
        case DType::F32: {
          float f;
          std::memcpy(&f, e.data + 4 * i, 4);
          v[i] = f;
          break;
        }
        case DType::BF16: {
          uint16_t h;
          std::memcpy(&h, e.data + 2 * i, 2);
          v[i] = bf16_to_f32(h);
          break;
        }
        case DType::F16: {
          uint16_t h;
          std::memcpy(&h, e.data + 2 * i, 2);
          v[i] = f16_to_f32(h);
          break;
        }
        default:
          fail("checkpoint: tensor '", e.name, "' has dtype ", dtype_name(e.dtype), ", expected F32, BF16 or F16");
      }
    }
    return v;
  }

  // Small vectors (norms, gates) in fp32; `plus_one` folds the zero-centred RMSNorm's (1 + w).
  Tensor vec(const std::string& name, std::vector<int64_t> shape, bool plus_one = false,
             std::vector<int64_t> out_shape = {}) {
    auto v = f32(tensor(name, shape));
    if (plus_one)
      for (auto& x : v) x += 1.f;
    if (out_shape.empty()) out_shape = {int64_t(v.size())};
    return be_.upload_f32(v, out_shape, DType::F32);
  }

  LinearSource dense_src(const TensorEntry& e, int64_t N, int64_t K, const std::string& name) {
    if (e.dtype != DType::BF16 && e.dtype != DType::F16 && e.dtype != DType::F32)
      fail("checkpoint: tensor '", name, "' has dtype ", dtype_name(e.dtype), ", expected BF16, F16 or F32");
    LinearSource s;
    s.kind = LinearSource::Kind::Dense;
    s.N = N;
    s.K = K;
    s.dtype = e.dtype;
    s.data = e.data;
    return s;
  }

  // One Linear module [N out, K in]: int4 (qweight/qzeros/scales) or dense (.weight), as the quantization
  // config decides for this module name; the checkpoint must agree.
  LinearSource linear_src(const std::string& module, int64_t N, int64_t K) {
    const bool q = cfg_.quant.is_quantized(module);
    const bool has_w = idx_.has(module + ".weight"), has_q = idx_.has(module + ".qweight");
    if (q && !has_q)
      fail("checkpoint: quantization_config makes '", module, "' int4, so '", module,
           ".qweight' was expected, but ", has_w ? "only a dense '.weight' is present" : "neither it nor '.weight' exists");
    if (!q && !has_w)
      fail("checkpoint: '", module, "' is BF16 per quantization_config, so '", module, ".weight' was expected, but ",
           has_q ? "an int4 '.qweight' is present (check extra_config / block_name_to_quantize)" : "it is missing");
    if (!q) {
      ++rep_.bf16_linears;
      return dense_src(tensor(module + ".weight", {N, K}), N, K, module + ".weight");
    }
    const int G = cfg_.quant.group_size;
    if (K % G != 0 || N % 8 != 0)
      fail("checkpoint: int4 module '", module, "' [", N, ", ", K, "] needs K % ", G, " == 0 and N % 8 == 0");
    auto& qw = tensor(module + ".qweight", {K / 8, N});
    auto& qz = tensor(module + ".qzeros", {K / G, N / 8});
    auto& sc = tensor(module + ".scales", {K / G, N});
    auto expect = [&](const TensorEntry& e, DType dt) {
      if (e.dtype != dt) fail("checkpoint: tensor '", e.name, "' has dtype ", dtype_name(e.dtype), ", expected ", dtype_name(dt));
    };
    expect(qw, DType::I32);
    expect(qz, DType::I32);
    expect(sc, DType::F16);
    if (idx_.has(module + ".g_idx")) {
      // desc_act=false GPTQ may still write a trivial g_idx (k / G); anything else means act-order.
      auto& gi = tensor(module + ".g_idx", {K});
      expect(gi, DType::I32);
      for (int64_t k = 0; k < K; ++k) {
        int32_t g;
        std::memcpy(&g, gi.data + 4 * k, 4);
        if (g != k / G) fail("checkpoint: '", gi.name, "'[", k, "] = ", g, ", expected ", k / G, " (act-order is not supported)");
      }
    }
    // Symmetric checkpoints store zero point 8 as nibble 7 ("v1" convention, z = nibble + 1).
    for (int64_t i = 0; i < (K / G) * (N / 8); ++i) {
      uint32_t word;
      std::memcpy(&word, qz.data + 4 * i, 4);
      if (word != 0x77777777u) {
        int64_t g = i / (N / 8), c = i % (N / 8);
        fail("checkpoint: '", qz.name, "'[", g, "][", c, "] = 0x", std::hex, word, std::dec,
             ": expected 0x77777777 (zero point 8 in every symmetric checkpoint); other zero points are not supported");
      }
    }
    ++rep_.int4_linears;
    LinearSource s;
    s.kind = LinearSource::Kind::Int4;
    s.N = N;
    s.K = K;
    s.qweight = reinterpret_cast<const int32_t*>(qw.data);
    s.qzeros = reinterpret_cast<const int32_t*>(qz.data);
    s.scales = reinterpret_cast<const uint16_t*>(sc.data);
    s.group_size = G;
    return s;
  }

  Linear linear(const std::string& module, int64_t N, int64_t K) { return be_.make_linear({linear_src(module, N, K)}); }

  void load_ffn(const std::string& pre, FfnWeights& f) {
    const auto& t = cfg_.text;
    const int64_t H = t.hidden_size;
    f.moe = t.moe;
    if (!t.moe) {
      const int64_t I = t.intermediate_size;
      f.mlp_gu = be_.make_linear({linear_src(pre + "mlp.gate_proj", I, H), linear_src(pre + "mlp.up_proj", I, H)});
      f.mlp_down = linear(pre + "mlp.down_proj", H, I);
      return;
    }
    const int64_t E = t.num_experts, I = t.moe_intermediate_size, Is = t.shared_expert_intermediate_size;
    f.router = linear(pre + "mlp.gate", E, H);
    std::vector<std::vector<LinearSource>> gu(E);
    std::vector<LinearSource> down(E);
    const std::string fused = pre + "mlp.experts.gate_up_proj";
    if (idx_.has(fused)) {
      auto& g = tensor(fused, {E, 2 * I, H});
      auto& d = tensor(pre + "mlp.experts.down_proj", {E, H, I});
      for (int64_t e = 0; e < E; ++e) {
        LinearSource a = dense_src(g, 2 * I, H, fused);
        a.data = g.data + size_t(e * 2 * I * H) * dtype_size(g.dtype);
        gu[e] = {a};
        LinearSource b = dense_src(d, H, I, d.name);
        b.data = d.data + size_t(e * H * I) * dtype_size(d.dtype);
        down[e] = b;
      }
      rep_.bf16_linears += 2 * E;
    } else {
      if (!idx_.has(pre + "mlp.experts.0.gate_proj.weight") && !idx_.has(pre + "mlp.experts.0.gate_proj.qweight"))
        fail("checkpoint: no routed experts for '", pre, "mlp': expected fused '", fused,
             "' [E, 2I, H] or per-expert '", pre, "mlp.experts.{e}.gate_proj'");
      for (int64_t e = 0; e < E; ++e) {
        std::string ep = pre + "mlp.experts." + std::to_string(e) + ".";
        gu[e] = {linear_src(ep + "gate_proj", I, H), linear_src(ep + "up_proj", I, H)};
        down[e] = linear_src(ep + "down_proj", H, I);
      }
    }
    f.experts = be_.make_experts(gu, down);
    if (Is > 0) {
      f.shared_gu = be_.make_linear(
          {linear_src(pre + "mlp.shared_expert.gate_proj", Is, H), linear_src(pre + "mlp.shared_expert.up_proj", Is, H)});
      f.shared_down = linear(pre + "mlp.shared_expert.down_proj", H, Is);
      f.shared_gate = linear(pre + "mlp.shared_expert_gate", 1, H);
    }
  }

  void load_attn(const std::string& pre, AttnWeights& a) {
    const auto& t = cfg_.text;
    const int64_t H = t.hidden_size, Dh = t.head_dim;
    a.q = linear(pre + "self_attn.q_proj", t.num_heads * Dh * 2, H);
    a.k = linear(pre + "self_attn.k_proj", t.num_kv_heads * Dh, H);
    a.v = linear(pre + "self_attn.v_proj", t.num_kv_heads * Dh, H);
    a.o = linear(pre + "self_attn.o_proj", H, t.num_heads * Dh);
    a.q_norm = vec(pre + "self_attn.q_norm.weight", {Dh}, true);
    a.k_norm = vec(pre + "self_attn.k_norm.weight", {Dh}, true);
  }

  void load_gdn(const std::string& pre, GdnWeights& g) {
    const auto& t = cfg_.text;
    const int64_t H = t.hidden_size, C = t.lin_conv_dim(), Hv = t.lin_num_v_heads, Vd = t.lin_value_dim();
    const std::string p = pre + "linear_attn.";
    g.qkv = linear(p + "in_proj_qkv", C, H);
    g.z = linear(p + "in_proj_z", Vd, H);
    g.ba = be_.make_linear({linear_src(p + "in_proj_b", Hv, H), linear_src(p + "in_proj_a", Hv, H)});
    g.out = linear(p + "out_proj", H, Vd);
    g.conv_w = vec(p + "conv1d.weight", {C, 1, t.conv_kernel}, false, {C, t.conv_kernel});
    g.A_log = vec(p + "A_log", {Hv});
    g.dt_bias = vec(p + "dt_bias", {Hv});
    g.norm = vec(p + "norm.weight", {t.lin_v_head_dim});
  }

  void load_mtp(MtpWeights& m) {
    const auto& t = cfg_.text;
    const int64_t H = t.hidden_size;
    if (t.mtp_num_hidden_layers != 1)
      fail("config: mtp_num_hidden_layers = ", t.mtp_num_hidden_layers, " is not supported (expected 0 or 1)");
    // mtp.fc [H, 2H] takes concat(embedding, hidden): split its columns into two [H, H] matrices.
    auto& fc = tensor("mtp.fc.weight", {H, 2 * H});
    if (fc.dtype != DType::BF16 && fc.dtype != DType::F16 && fc.dtype != DType::F32)
      fail("checkpoint: 'mtp.fc.weight' has dtype ", dtype_name(fc.dtype), ", expected BF16, F16 or F32");
    const size_t es = dtype_size(fc.dtype);
    for (int half = 0; half < 2; ++half) {
      std::vector<uint8_t> buf(size_t(H * H) * es);
      for (int64_t r = 0; r < H; ++r)
        std::memcpy(buf.data() + size_t(r * H) * es, fc.data + size_t(r * 2 * H + half * H) * es, size_t(H) * es);
      LinearSource s;
      s.N = H;
      s.K = H;
      s.dtype = fc.dtype;
      s.data = buf.data();
      (half == 0 ? m.fc_e : m.fc_h) = be_.make_linear({s});
    }
    m.pre_fc_norm_embedding = vec("mtp.pre_fc_norm_embedding.weight", {H}, true);
    m.pre_fc_norm_hidden = vec("mtp.pre_fc_norm_hidden.weight", {H}, true);
    m.norm = vec("mtp.norm.weight", {H}, true);
    const std::string pre = "mtp.layers.0.";
    m.layer.type = io::LayerType::FullAttention;
    m.layer.in_norm = vec(pre + "input_layernorm.weight", {H}, true);
    m.layer.post_norm = vec(pre + "post_attention_layernorm.weight", {H}, true);
    load_attn(pre, m.layer.attn);
    load_ffn(pre, m.layer.ffn);
    m.present = true;
  }

  // Rows `ids` of lm_head (or of the tied embedding) as a Linear [N, H]: the reduced draft head.
  void load_draft_head(MtpWeights& m, const std::vector<int32_t>& ids) {
    const auto& t = cfg_.text;
    const int64_t H = t.hidden_size, V = t.vocab_size, N = int64_t(ids.size());
    std::vector<uint8_t> seen(size_t(V), 0);
    for (int32_t id : ids) {
      if (id < 0 || id >= V) fail("draft vocabulary: token id ", id, " is outside the vocabulary [0, ", V, ")");
      if (seen[size_t(id)]++) fail("draft vocabulary: token id ", id, " is listed twice");
    }
    const TensorEntry* e = nullptr;
    if (t.tie_word_embeddings && !idx_.has("lm_head.weight")) e = idx_.find(cfg_.lm_prefix + ".embed_tokens.weight");
    else if (idx_.has("lm_head.weight")) e = idx_.find("lm_head.weight");
    if (!e)
      fail("draft vocabulary: a reduced draft head needs a dense lm_head ('lm_head.weight'); this checkpoint's is ",
           idx_.has("lm_head.qweight") ? "int4" : "missing");
    if (e->dtype != DType::BF16 && e->dtype != DType::F16 && e->dtype != DType::F32)
      fail("draft vocabulary: '", e->name, "' has dtype ", dtype_name(e->dtype), ", expected BF16, F16 or F32");
    const size_t row = size_t(H) * dtype_size(e->dtype);
    std::vector<uint8_t> buf(size_t(N) * row);
    for (int64_t j = 0; j < N; ++j) std::memcpy(buf.data() + size_t(j) * row, e->data + size_t(ids[size_t(j)]) * row, row);
    LinearSource s;
    s.N = N;
    s.K = H;
    s.dtype = e->dtype;
    s.data = buf.data();
    m.draft_head = be_.make_linear({s});
    m.draft_ids = ids;
    m.draft_ids_max = *std::max_element(ids.begin(), ids.end());
    m.draft_ids_dev = be_.upload_f32(std::vector<float>(ids.begin(), ids.end()), {N}, DType::I32);  // ids < 2^24
  }

  // model.visual.* (model-spec §2.2 "Vision"): always high precision; LayerNorms keep plain w and b.
  void load_vision(VisionWeights& v) {
    const auto& vc = cfg_.vision;
    const std::string p = "model.visual.";
    const int64_t D = vc.hidden_size, I = vc.intermediate_size, C = vc.in_channels, Tp = vc.temporal_patch_size,
                  ps = vc.patch_size, m2 = vc.spatial_merge_size * vc.spatial_merge_size, O = vc.out_hidden_size;
    if (vc.num_heads <= 0 || D % vc.num_heads != 0 || (D / vc.num_heads) % 4 != 0)
      fail("config: vision hidden_size ", D, " / num_heads ", vc.num_heads, " must give a head dim divisible by 4");
    if (O != cfg_.text.hidden_size)
      fail("config: vision out_hidden_size ", O, " must equal the text hidden_size ", cfg_.text.hidden_size);
    const int64_t side = int64_t(std::llround(std::sqrt(double(vc.num_position_embeddings))));
    if (side * side != vc.num_position_embeddings)
      fail("config: vision num_position_embeddings ", vc.num_position_embeddings, " is not a square grid");
    auto lin_b = [&](const std::string& mod, int64_t N, int64_t K, Linear& w, Tensor& b) {
      w = linear(mod, N, K);
      b = vec(mod + ".bias", {N});
    };
    // Conv3d weight [D, C, Tp, ps, ps] is a Linear [D, C·Tp·ps·ps] over the same flattening as the patches.
    auto& pw = tensor(p + "patch_embed.proj.weight", {D, C, Tp, ps, ps});
    v.patch = be_.make_linear({dense_src(pw, D, C * Tp * ps * ps, pw.name)});
    ++rep_.bf16_linears;
    v.patch_b = vec(p + "patch_embed.proj.bias", {D});
    auto& pe = tensor(p + "pos_embed.weight", {side * side, D});
    v.pos_embed = be_.upload_f32(f32(pe), {side * side, D}, be_.act_dtype());
    v.pos_side = side;
    v.blocks.resize(size_t(vc.depth));
    for (int64_t i = 0; i < vc.depth; ++i) {
      auto& b = v.blocks[size_t(i)];
      const std::string bp = p + "blocks." + std::to_string(i) + ".";
      b.norm1_w = vec(bp + "norm1.weight", {D});
      b.norm1_b = vec(bp + "norm1.bias", {D});
      b.norm2_w = vec(bp + "norm2.weight", {D});
      b.norm2_b = vec(bp + "norm2.bias", {D});
      lin_b(bp + "attn.qkv", 3 * D, D, b.qkv, b.qkv_b);
      lin_b(bp + "attn.proj", D, D, b.proj, b.proj_b);
      lin_b(bp + "mlp.linear_fc1", I, D, b.fc1, b.fc1_b);
      lin_b(bp + "mlp.linear_fc2", D, I, b.fc2, b.fc2_b);
    }
    v.merger_norm_w = vec(p + "merger.norm.weight", {D});
    v.merger_norm_b = vec(p + "merger.norm.bias", {D});
    lin_b(p + "merger.linear_fc1", m2 * D, m2 * D, v.merger_fc1, v.merger_fc1_b);
    lin_b(p + "merger.linear_fc2", O, m2 * D, v.merger_fc2, v.merger_fc2_b);
    v.present = true;
  }

  void load(Weights& w) {
    const auto& t = cfg_.text;
    const int64_t H = t.hidden_size, V = t.vocab_size;
    const std::string& lm = cfg_.lm_prefix;
    auto& emb = tensor(lm + ".embed_tokens.weight", {V, H});
    w.embed = be_.upload_f32(f32(emb), {V, H}, be_.act_dtype());
    w.final_norm = vec(lm + ".norm.weight", {H}, true);
    if (t.tie_word_embeddings && !idx_.has("lm_head.weight")) {
      w.lm_head = be_.make_linear({dense_src(emb, V, H, emb.name)});
    } else {
      w.lm_head = linear("lm_head", V, H);
    }
    w.layers.resize(size_t(t.num_layers));
    for (int64_t L = 0; L < t.num_layers; ++L) {
      auto& lw = w.layers[L];
      std::string pre = lm + ".layers." + std::to_string(L) + ".";
      lw.type = t.layer_types[L];
      lw.in_norm = vec(pre + "input_layernorm.weight", {H}, true);
      lw.post_norm = vec(pre + "post_attention_layernorm.weight", {H}, true);
      if (lw.type == io::LayerType::FullAttention) load_attn(pre, lw.attn);
      else load_gdn(pre, lw.gdn);
      load_ffn(pre, lw.ffn);
    }
  }

 private:
  const io::ModelConfig& cfg_;
  TensorIndex& idx_;
  Backend& be_;
  LoadReport& rep_;
};

}  // namespace

std::unique_ptr<Model> Model::load(const std::string& dir, Backend& be, LoadReport* report, LoadOptions opts) {
  io::ModelConfig cfg = io::load_model_config(dir);
  auto idx = io::TensorIndex::open_dir(dir);
  // Text-only (*ForCausalLM) exports name the language model "model."; multimodal ones
  // "model.language_model.". Trust the tensors over the architecture string.
  if (!idx->has(cfg.lm_prefix + ".embed_tokens.weight")) {
    for (const char* alt : {"model.language_model", "model"})
      if (idx->has(std::string(alt) + ".embed_tokens.weight")) cfg.lm_prefix = alt;
  }
  try {
    return load_index(std::move(cfg), *idx, be, report, opts);
  } catch (const Error& e) {
    fail(dir, ": ", e.what());
  }
}

std::unique_ptr<Model> Model::load_random(const io::ModelConfig& cfg_in, Backend& be, uint64_t seed, bool int4,
                                          LoadOptions opts) {
  io::ModelConfig cfg = cfg_in;
  // Without a quantization_config of its own, an int4 random model follows the seed checkpoint's.
  if (int4 && !cfg.quant.enabled())
    cfg.quant = io::parse_quant_config(io::seed_quantization_config_json(cfg), "seed quantization_config");
  if (!int4) cfg.quant = io::QuantConfig{};
  auto specs = io::checkpoint_schema(cfg, int4);
  auto idx = io::TensorIndex::synthetic(specs, seed);
  return load_index(cfg, *idx, be, nullptr, opts);
}

std::unique_ptr<Model> Model::load_random_vision(const io::ModelConfig& cfg, Backend& be, uint64_t seed) {
  if (!cfg.vision.present) fail("load_random_vision: the config has no vision_config");
  auto idx = io::TensorIndex::synthetic(io::vision_schema(cfg), seed);
  LoadOptions o;
  o.text = false;
  o.mtp = false;
  return load_index(cfg, *idx, be, nullptr, o);
}

std::unique_ptr<Model> Model::load_index(io::ModelConfig cfg, io::TensorIndex& idx, Backend& be, LoadReport* report,
                                         LoadOptions opts) {
  std::unique_ptr<Model> m(new Model(cfg, be));
  m->set_ssm_state_dtype(ssm_dtype_from_name(opts.ssm_state_dtype, config_ssm_dtype(m->cfg_),
                                             "SSM state dtype (--mamba-ssm-cache-dtype)"));
  LoadReport local;
  LoadReport& rep = report ? *report : local;
  Loader loader(m->cfg_, idx, be, rep);
  if (opts.text) loader.load(m->w_);
  if (opts.text && opts.mtp && m->cfg_.text.mtp_num_hidden_layers > 0 && idx.has("mtp.fc.weight")) {
    loader.load_mtp(m->w_.mtp);
    if (!opts.draft_vocab.empty()) loader.load_draft_head(m->w_.mtp, opts.draft_vocab);
  } else if (!opts.draft_vocab.empty()) {
    fail("draft vocabulary: a reduced draft head needs the MTP head (mtp.* tensors), which is not loaded");
  }
  if (opts.vision && m->cfg_.vision.present && idx.has("model.visual.patch_embed.proj.weight"))
    loader.load_vision(m->w_.vision);
  std::vector<std::string> unknown;
  for (auto& n : idx.unused()) {
    if (n.rfind("mtp.", 0) == 0 || n.rfind("model.visual.", 0) == 0 || n.rfind("visual.", 0) == 0)
      rep.not_yet_used.push_back(n);
    else
      unknown.push_back(n);
  }
  if (!unknown.empty()) {
    std::string list;
    for (size_t i = 0; i < unknown.size() && i < 10; ++i) list += (i ? ", " : "") + unknown[i];
    fail(unknown.size(), " tensor(s) that no part of the model uses: ", list, unknown.size() > 10 ? ", ..." : "");
  }
  const auto& t = m->cfg_.text;
  m->rope_.rotary_dim = int(t.rotary_dim());
  m->rope_.theta = t.rope.theta;
  m->rope_.mrope_section = t.rope.mrope_section;
  m->rope_.mrope_interleaved = t.rope.mrope_interleaved;
  return m;
}

}  // namespace ds::model
