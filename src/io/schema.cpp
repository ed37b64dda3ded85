#include "io/schema.h"

#include <nlohmann/json.hpp>

namespace ds::io {

int64_t TensorSpec::nbytes() const {
  int64_t n = int64_t(dtype_size(dtype));
  for (auto d : shape) n *= d;
  return n;
}

namespace {

// The seed recipe: which Linear modules are int4 (model-spec §2.4, quant-format §0).
bool seed_int4(const std::string& module) {
  if (module.rfind("mtp.", 0) == 0 || module == "lm_head") return false;
  auto has = [&](const char* s) { return module.find(s) != std::string::npos; };
  if (has(".shared_expert") || (has("mlp.gate") && !has("gate_proj")) || has("in_proj_a") || has("in_proj_b"))
    return false;
  return true;
}

struct Builder {
  const ModelConfig& cfg;
  bool int4;
  std::vector<TensorSpec> out;

  bool quantized(const std::string& module) const {
    if (!int4) return false;
    return cfg.quant.enabled() ? cfg.quant.is_quantized(module) : seed_int4(module);
  }
  void vec(const std::string& name, std::vector<int64_t> shape, TensorSpec::Role role) {
    out.push_back({name, DType::BF16, std::move(shape), role});
  }
  void linear(const std::string& m, int64_t N, int64_t K) {
    if (quantized(m)) {
      out.push_back({m + ".qweight", DType::I32, {K / 8, N}, TensorSpec::Role::QWeight});
      out.push_back({m + ".qzeros", DType::I32, {K / 128, N / 8}, TensorSpec::Role::QZeros});
      out.push_back({m + ".scales", DType::F16, {K / 128, N}, TensorSpec::Role::Scales});
    } else {
      out.push_back({m + ".weight", DType::BF16, {N, K}, TensorSpec::Role::Weight});
    }
  }
  void attn(const std::string& pre) {
    const auto& t = cfg.text;
    const int64_t H = t.hidden_size, Dh = t.head_dim;
    linear(pre + "self_attn.q_proj", t.num_heads * Dh * 2, H);
    linear(pre + "self_attn.k_proj", t.num_kv_heads * Dh, H);
    linear(pre + "self_attn.v_proj", t.num_kv_heads * Dh, H);
    linear(pre + "self_attn.o_proj", H, t.num_heads * Dh);
    vec(pre + "self_attn.q_norm.weight", {Dh}, TensorSpec::Role::Norm);
    vec(pre + "self_attn.k_norm.weight", {Dh}, TensorSpec::Role::Norm);
  }
  void ffn(const std::string& pre, bool per_expert) {
    const auto& t = cfg.text;
    const int64_t H = t.hidden_size;
    if (!t.moe) {
      linear(pre + "mlp.gate_proj", t.intermediate_size, H);
      linear(pre + "mlp.up_proj", t.intermediate_size, H);
      linear(pre + "mlp.down_proj", H, t.intermediate_size);
      return;
    }
    const int64_t E = t.num_experts, I = t.moe_intermediate_size, Is = t.shared_expert_intermediate_size;
    linear(pre + "mlp.gate", E, H);
    if (per_expert) {
      for (int64_t e = 0; e < E; ++e) {
        std::string ep = pre + "mlp.experts." + std::to_string(e) + ".";
        linear(ep + "gate_proj", I, H);
        linear(ep + "up_proj", I, H);
        linear(ep + "down_proj", H, I);
      }
    } else {
      out.push_back({pre + "mlp.experts.gate_up_proj", DType::BF16, {E, 2 * I, H}, TensorSpec::Role::Weight});
      out.push_back({pre + "mlp.experts.down_proj", DType::BF16, {E, H, I}, TensorSpec::Role::Weight});
    }
    if (Is > 0) {
      linear(pre + "mlp.shared_expert.gate_proj", Is, H);
      linear(pre + "mlp.shared_expert.up_proj", Is, H);
      linear(pre + "mlp.shared_expert.down_proj", H, Is);
      linear(pre + "mlp.shared_expert_gate", 1, H);
    }
  }
  void build() {
    const auto& t = cfg.text;
    const int64_t H = t.hidden_size, V = t.vocab_size;
    const std::string& lm = cfg.lm_prefix;
    out.push_back({lm + ".embed_tokens.weight", DType::BF16, {V, H}, TensorSpec::Role::Embed});
    vec(lm + ".norm.weight", {H}, TensorSpec::Role::Norm);
    if (!t.tie_word_embeddings) out.push_back({"lm_head.weight", DType::BF16, {V, H}, TensorSpec::Role::Weight});
    for (int64_t L = 0; L < t.num_layers; ++L) {
      std::string pre = lm + ".layers." + std::to_string(L) + ".";
      vec(pre + "input_layernorm.weight", {H}, TensorSpec::Role::Norm);
      vec(pre + "post_attention_layernorm.weight", {H}, TensorSpec::Role::Norm);
      if (t.layer_types[L] == LayerType::FullAttention) {
        attn(pre);
      } else {
        const std::string p = pre + "linear_attn.";
        const int64_t C = t.lin_conv_dim(), Hv = t.lin_num_v_heads;
        linear(p + "in_proj_qkv", C, H);
        linear(p + "in_proj_z", t.lin_value_dim(), H);
        linear(p + "in_proj_b", Hv, H);
        linear(p + "in_proj_a", Hv, H);
        out.push_back({p + "conv1d.weight", DType::BF16, {C, 1, t.conv_kernel}, TensorSpec::Role::Conv});
        vec(p + "A_log", {Hv}, TensorSpec::Role::ALog);
        vec(p + "dt_bias", {Hv}, TensorSpec::Role::DtBias);
        vec(p + "norm.weight", {t.lin_v_head_dim}, TensorSpec::Role::NormPlain);
        linear(p + "out_proj", H, t.lin_value_dim());
      }
      ffn(pre, int4);
    }
    if (t.mtp_num_hidden_layers > 0) {
      out.push_back({"mtp.fc.weight", DType::BF16, {H, 2 * H}, TensorSpec::Role::Weight});
      vec("mtp.pre_fc_norm_embedding.weight", {H}, TensorSpec::Role::Norm);
      vec("mtp.pre_fc_norm_hidden.weight", {H}, TensorSpec::Role::Norm);
      vec("mtp.norm.weight", {H}, TensorSpec::Role::Norm);
      vec("mtp.layers.0.input_layernorm.weight", {H}, TensorSpec::Role::Norm);
      vec("mtp.layers.0.post_attention_layernorm.weight", {H}, TensorSpec::Role::Norm);
      attn("mtp.layers.0.");
      ffn("mtp.layers.0.", int4);  // the seed splits MTP experts per expert too (BF16)
    }
  }
};

}  // namespace

std::vector<TensorSpec> checkpoint_schema(const ModelConfig& cfg, bool int4) {
  Builder b{cfg, int4, {}};
  b.build();
  return b.out;
}

std::vector<TensorSpec> vision_schema(const ModelConfig& cfg) {
  const auto& vc = cfg.vision;
  std::vector<TensorSpec> out;
  if (!vc.present) return out;
  using R = TensorSpec::Role;
  const int64_t D = vc.hidden_size, I = vc.intermediate_size, m2 = vc.spatial_merge_size * vc.spatial_merge_size;
  const std::string p = "model.visual.";
  auto add = [&](const std::string& name, std::vector<int64_t> shape, R role) {
    out.push_back({name, DType::BF16, std::move(shape), role});
  };
  // LayerNorm weights around 1 (NormPlain), biases and the position table small (Embed), linears uniform 1/K.
  auto lin = [&](const std::string& m, int64_t N, int64_t K) {
    add(m + ".weight", {N, K}, R::Weight);
    add(m + ".bias", {N}, R::Embed);
  };
  add(p + "patch_embed.proj.weight", {D, vc.in_channels, vc.temporal_patch_size, vc.patch_size, vc.patch_size},
      R::Weight);
  add(p + "patch_embed.proj.bias", {D}, R::Embed);
  add(p + "pos_embed.weight", {vc.num_position_embeddings, D}, R::Embed);
  for (int64_t i = 0; i < vc.depth; ++i) {
    const std::string b = p + "blocks." + std::to_string(i) + ".";
    for (const char* n : {"norm1", "norm2"}) {
      add(b + n + ".weight", {D}, R::NormPlain);
      add(b + n + ".bias", {D}, R::Embed);
    }
    lin(b + "attn.qkv", 3 * D, D);
    lin(b + "attn.proj", D, D);
    lin(b + "mlp.linear_fc1", I, D);
    lin(b + "mlp.linear_fc2", D, I);
  }
  add(p + "merger.norm.weight", {D}, R::NormPlain);
  add(p + "merger.norm.bias", {D}, R::Embed);
  lin(p + "merger.linear_fc1", m2 * D, m2 * D);
  lin(p + "merger.linear_fc2", vc.out_hidden_size, m2 * D);
  return out;
}

std::string seed_quantization_config_json(const ModelConfig& cfg) {
  nlohmann::ordered_json q = {{"autoround_version", "0.12.2"}, {"bits", 4}, {"data_type", "int"}, {"group_size", 128},
                              {"sym", true}, {"act_bits", 16}, {"packing_format", "auto_round:auto_gptq"},
                              {"quant_method", "auto-round"}, {"block_name_to_quantize", cfg.lm_prefix + ".layers"}};
  nlohmann::ordered_json extra = nlohmann::ordered_json::object();
  const nlohmann::ordered_json fp = {{"bits", 16}, {"data_type", "fp"}};
  for (int64_t L = 0; L < cfg.text.num_layers; ++L) {
    std::string pre = cfg.lm_prefix + ".layers." + std::to_string(L) + ".";
    if (cfg.text.layer_types[L] == LayerType::LinearAttention)
      for (auto m : {"linear_attn.in_proj_a", "linear_attn.in_proj_b", "linear_attn.in_proj_ba"}) extra[pre + m] = fp;
    if (cfg.text.moe)
      for (auto m : {"mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj",
                     "mlp.shared_expert_gate", "mlp.gate"})
        extra[pre + m] = fp;
  }
  q["extra_config"] = extra;
  return q.dump(2);
}

}  // namespace ds::io
