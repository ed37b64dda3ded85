#include "io/config.h"

#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/file.h"
#include "core/status.h"

namespace ds::io {

using nlohmann::json;

int TextConfig::num_full_layers() const {
  int n = 0;
  for (auto t : layer_types) n += t == LayerType::FullAttention;
  return n;
}
int TextConfig::num_linear_layers() const { return int(layer_types.size()) - num_full_layers(); }

namespace {

// Typed field readers: a present field of the wrong type is an error naming field, expected and found.
struct Reader {
  const json& j;
  std::string where;
  bool has(const char* k) const { return j.contains(k) && !j[k].is_null(); }
  int64_t i64(const char* k, std::optional<int64_t> def = std::nullopt) const {
    if (!has(k)) {
      if (def) return *def;
      fail(where, ": missing required integer field '", k, "'");
    }
    if (!j[k].is_number_integer()) fail(where, ": field '", k, "' must be an integer, got ", j[k].dump());
    return j[k].get<int64_t>();
  }
  double f64(const char* k, double def) const {
    if (!has(k)) return def;
    if (!j[k].is_number()) fail(where, ": field '", k, "' must be a number, got ", j[k].dump());
    return j[k].get<double>();
  }
  bool boolean(const char* k, bool def) const {
    if (!has(k)) return def;
    if (!j[k].is_boolean()) fail(where, ": field '", k, "' must be true or false, got ", j[k].dump());
    return j[k].get<bool>();
  }
  std::string str(const char* k, const std::string& def) const {
    if (!has(k)) return def;
    if (!j[k].is_string()) fail(where, ": field '", k, "' must be a string, got ", j[k].dump());
    return j[k].get<std::string>();
  }
};

void parse_rope(const json& tc, RopeConfig& rope, const std::string& where) {
  Reader r{tc, where};
  rope.partial_rotary_factor = r.f64("partial_rotary_factor", 0.25);
  rope.theta = r.f64("rope_theta", 10000000.0);
  const json* rp = nullptr;
  if (tc.contains("rope_parameters") && tc["rope_parameters"].is_object()) rp = &tc["rope_parameters"];
  else if (tc.contains("rope_scaling") && tc["rope_scaling"].is_object()) rp = &tc["rope_scaling"];
  if (!rp) return;
  Reader p{*rp, where + ".rope_parameters"};
  rope.type = p.str("rope_type", p.str("type", "default"));
  rope.theta = p.f64("rope_theta", rope.theta);
  rope.partial_rotary_factor = p.f64("partial_rotary_factor", rope.partial_rotary_factor);
  rope.mrope_interleaved = p.boolean("mrope_interleaved", rope.mrope_interleaved);
  if (p.has("mrope_section")) {
    const json& s = (*rp)["mrope_section"];
    if (!s.is_array() || s.size() != 3)
      fail(where, ".rope_parameters.mrope_section: expected 3 integers, got ", s.dump());
    for (int i = 0; i < 3; ++i) {
      if (!s[i].is_number_integer()) fail(where, ".rope_parameters.mrope_section: expected integers, got ", s.dump());
      rope.mrope_section[i] = s[i].get<int>();
    }
  }
  if (rope.type != "default")
    fail(where, ".rope_parameters.rope_type: '", rope.type, "' is not supported yet (supported: default)");
}

void parse_text(const json& tc, TextConfig& t, const std::string& where) {
  Reader r{tc, where};
  t.model_type = r.str("model_type", "");
  t.vocab_size = r.i64("vocab_size");
  t.hidden_size = r.i64("hidden_size");
  t.num_layers = r.i64("num_hidden_layers");
  t.num_heads = r.i64("num_attention_heads");
  t.num_kv_heads = r.i64("num_key_value_heads", t.num_heads);
  t.head_dim = r.i64("head_dim", t.hidden_size / t.num_heads);
  t.attn_output_gate = r.boolean("attn_output_gate", true);
  if (!t.attn_output_gate) fail(where, ": attn_output_gate false is not supported (this family gates attention)");
  if (r.boolean("attention_bias", false)) fail(where, ": attention_bias true is not supported");
  t.conv_kernel = r.i64("linear_conv_kernel_dim", 4);
  t.lin_k_head_dim = r.i64("linear_key_head_dim");
  t.lin_v_head_dim = r.i64("linear_value_head_dim");
  t.lin_num_k_heads = r.i64("linear_num_key_heads");
  t.lin_num_v_heads = r.i64("linear_num_value_heads");
  t.mamba_ssm_dtype = r.str("mamba_ssm_dtype", "float32");
  if (t.mamba_ssm_dtype != "float32" && t.mamba_ssm_dtype != "bfloat16")
    fail(where, ": mamba_ssm_dtype '", t.mamba_ssm_dtype, "' is not supported (expected float32 or bfloat16)");
  t.rms_norm_eps = r.f64("rms_norm_eps", 1e-6);
  t.max_position_embeddings = r.i64("max_position_embeddings", 262144);
  t.mtp_num_hidden_layers = r.i64("mtp_num_hidden_layers", 0);
  t.tie_word_embeddings = r.boolean("tie_word_embeddings", false);
  std::string act = r.str("hidden_act", "silu");
  if (act != "silu") fail(where, ": hidden_act '", act, "' is not supported (expected silu)");
  if (t.moe) {
    t.num_experts = r.i64("num_experts");
    t.num_experts_per_tok = r.i64("num_experts_per_tok");
    t.moe_intermediate_size = r.i64("moe_intermediate_size");
    t.shared_expert_intermediate_size = r.i64("shared_expert_intermediate_size", 0);
    if (tc.contains("mlp_only_layers") && tc["mlp_only_layers"].is_array() && !tc["mlp_only_layers"].empty())
      fail(where, ": mlp_only_layers ", tc["mlp_only_layers"].dump(), " is not supported (expected [])");
    if (t.num_experts_per_tok > t.num_experts || t.num_experts_per_tok <= 0)
      fail(where, ": num_experts_per_tok ", t.num_experts_per_tok, " must be in 1..num_experts (", t.num_experts, ")");
  } else {
    t.intermediate_size = r.i64("intermediate_size");
  }
  if (tc.contains("layer_types") && !tc["layer_types"].is_null()) {
    const json& lt = tc["layer_types"];
    if (!lt.is_array() || int64_t(lt.size()) != t.num_layers)
      fail(where, ": layer_types must list num_hidden_layers (", t.num_layers, ") entries, got ", lt.dump());
    for (auto& x : lt) {
      std::string s = x.is_string() ? x.get<std::string>() : x.dump();
      if (s == "linear_attention") t.layer_types.push_back(LayerType::LinearAttention);
      else if (s == "full_attention") t.layer_types.push_back(LayerType::FullAttention);
      else fail(where, ": layer_types entry '", s, "' (expected linear_attention or full_attention)");
    }
  } else {
    int64_t interval = r.i64("full_attention_interval", 4);
    if (interval <= 0) fail(where, ": full_attention_interval must be positive, got ", interval);
    for (int64_t i = 0; i < t.num_layers; ++i)
      t.layer_types.push_back((i + 1) % interval == 0 ? LayerType::FullAttention : LayerType::LinearAttention);
  }
  parse_rope(tc, t.rope, where);
  if (tc.contains("eos_token_id")) {
    const json& e = tc["eos_token_id"];
    if (e.is_number_integer()) t.eos_token_ids.push_back(e.get<int64_t>());
    else if (e.is_array())
      for (auto& x : e)
        if (x.is_number_integer()) t.eos_token_ids.push_back(x.get<int64_t>());
  }
  // Shape sanity: the forward pass relies on these divisibilities.
  auto need = [&](bool ok, const std::string& msg) {
    if (!ok) fail(where, ": ", msg);
  };
  need(t.hidden_size > 0 && t.vocab_size > 0 && t.num_layers > 0, "hidden_size, vocab_size, num_hidden_layers must be positive");
  need(t.num_kv_heads > 0 && t.num_heads % t.num_kv_heads == 0,
       str_cat("num_attention_heads (", t.num_heads, ") must be a multiple of num_key_value_heads (", t.num_kv_heads, ")"));
  need(t.lin_num_k_heads > 0 && t.lin_num_v_heads % t.lin_num_k_heads == 0,
       str_cat("linear_num_value_heads (", t.lin_num_v_heads, ") must be a multiple of linear_num_key_heads (",
               t.lin_num_k_heads, ")"));
  int64_t rd = t.rotary_dim();
  need(rd % 2 == 0 && rd <= t.head_dim, str_cat("rotary dim ", rd, " must be even and <= head_dim ", t.head_dim));
  int ms = t.rope.mrope_section[0] + t.rope.mrope_section[1] + t.rope.mrope_section[2];
  need(ms == rd / 2, str_cat("mrope_section sums to ", ms, ", expected rotary_dim/2 = ", rd / 2));
}

void parse_vision(const json& vc, VisionConfig& v, const std::string& where) {
  Reader r{vc, where};
  v.present = true;
  v.depth = r.i64("depth");
  v.hidden_size = r.i64("hidden_size");
  v.intermediate_size = r.i64("intermediate_size");
  v.num_heads = r.i64("num_heads");
  v.in_channels = r.i64("in_channels", 3);
  v.patch_size = r.i64("patch_size", 16);
  v.temporal_patch_size = r.i64("temporal_patch_size", 2);
  v.spatial_merge_size = r.i64("spatial_merge_size", 2);
  v.out_hidden_size = r.i64("out_hidden_size");
  v.num_position_embeddings = r.i64("num_position_embeddings", 2304);
  v.hidden_act = r.str("hidden_act", "gelu_pytorch_tanh");
}

void parse_quant(const json& q, QuantConfig& qc, const std::string& where) {
  Reader r{q, where};
  qc.method = r.str("quant_method", "");
  if (qc.method == "autoround" || qc.method == "auto_round") qc.method = "auto-round";
  if (qc.method != "auto-round" && qc.method != "gptq")
    fail(where, ".quant_method: '", qc.method, "' is not supported (expected auto-round or gptq)");
  qc.bits = int(r.i64("bits"));
  if (qc.bits != 4) fail(where, ".bits: ", qc.bits, " is not supported (expected 4)");
  qc.group_size = int(r.i64("group_size"));
  if (qc.group_size != 128) fail(where, ".group_size: ", qc.group_size, " is not supported (expected 128)");
  qc.sym = r.boolean("sym", true);
  if (!qc.sym) fail(where, ".sym: false (asymmetric) is not supported (expected true)");
  if (qc.method == "auto-round") {
    qc.packing_format = r.str("packing_format", "auto_round:auto_gptq");
    if (qc.packing_format != "auto_round:auto_gptq")
      fail(where, ".packing_format: '", qc.packing_format, "' is not supported (expected auto_round:auto_gptq)");
    std::string dt = r.str("data_type", "int");
    if (dt != "int") fail(where, ".data_type: '", dt, "' is not supported (expected int)");
    int64_t act = r.i64("act_bits", 16);
    if (act < 16) fail(where, ".act_bits: ", act, " is not supported (expected 16: weight-only)");
  } else {
    if (r.boolean("desc_act", false)) fail(where, ".desc_act: true is not supported (expected false)");
    std::string ckpt = r.str("checkpoint_format", "gptq");
    if (ckpt != "gptq") fail(where, ".checkpoint_format: '", ckpt, "' is not supported (expected gptq)");
  }
  if (q.contains("block_name_to_quantize") && !q["block_name_to_quantize"].is_null()) {
    const json& b = q["block_name_to_quantize"];
    auto add = [&](const std::string& s) {
      std::stringstream ss(s);
      std::string part;
      while (std::getline(ss, part, ','))
        if (!part.empty()) qc.block_name_to_quantize.push_back(part);
    };
    if (b.is_string()) add(b.get<std::string>());
    else if (b.is_array()) {
      for (auto& x : b) {
        if (!x.is_string()) fail(where, ".block_name_to_quantize: expected strings, got ", x.dump());
        add(x.get<std::string>());
      }
    } else fail(where, ".block_name_to_quantize: expected a string or list, got ", b.dump());
  }
  if (q.contains("extra_config") && q["extra_config"].is_object()) {
    for (auto it = q["extra_config"].begin(); it != q["extra_config"].end(); ++it) {
      const json& v = it.value();
      if (!v.is_object()) fail(where, ".extra_config['", it.key(), "']: expected an object, got ", v.dump());
      Reader e{v, where + ".extra_config['" + it.key() + "']"};
      int bits = int(e.i64("bits", qc.bits));
      std::string dt = e.str("data_type", bits >= 16 ? "fp" : "int");
      if (bits < 16 && bits != 4)
        fail(where, ".extra_config['", it.key(), "'].bits: ", bits, " is not supported (expected 4 or >= 16)");
      if (bits < 16 && dt != "int")
        fail(where, ".extra_config['", it.key(), "'].data_type: '", dt, "' is not supported with bits ", bits);
      if (bits < 16 && e.i64("group_size", qc.group_size) != qc.group_size)
        fail(where, ".extra_config['", it.key(), "'].group_size: only ", qc.group_size, " is supported");
      // Keys are module names; AutoRound also accepts regular expressions (matched with re.search).
      const std::string& key = it.key();
      bool is_regex = key.find_first_of("*+?[]()^$\\|") != std::string::npos;
      if (is_regex) {
        try {
          qc.extra_regex.emplace_back(std::regex(key), bits);
          qc.extra_regex_src.push_back(key);
        } catch (const std::regex_error& err) {
          fail(where, ".extra_config: key '", key, "' is not a valid regular expression: ", err.what());
        }
      } else {
        qc.extra_exact[key] = bits;
      }
    }
  }
}

}  // namespace

bool QuantConfig::is_quantized(const std::string& name) const {
  if (!enabled()) return false;
  if (!block_name_to_quantize.empty()) {
    bool in_block = false;
    for (auto& p : block_name_to_quantize)
      if (name.size() > p.size() && name.compare(0, p.size(), p) == 0 && name[p.size()] == '.') in_block = true;
    if (!in_block) return false;
  }
  auto lookup = [&](const std::string& n) -> std::optional<int> {
    auto it = extra_exact.find(n);
    if (it != extra_exact.end()) return it->second;
    return std::nullopt;
  };
  auto bits = lookup(name);
  if (!bits) {
    // Overrides may name a fused module that this family stores split (Qwen3-Next's in_proj_ba,
    // in_proj_qkvz): the split parts inherit the fused module's precision.
    auto ends = [&](const char* s) {
      size_t n = std::strlen(s);
      return name.size() >= n && name.compare(name.size() - n, n, s) == 0;
    };
    std::string base = name.substr(0, name.rfind('.') + 1);
    if (ends(".in_proj_a") || ends(".in_proj_b")) bits = lookup(base + "in_proj_ba");
    else if (ends(".in_proj_qkv") || ends(".in_proj_z")) bits = lookup(base + "in_proj_qkvz");
  }
  if (!bits)
    for (auto& [re, b] : extra_regex)
      if (std::regex_search(name, re)) {
        bits = b;
        break;
      }
  if (bits) return *bits < 16;
  return true;
}

ModelConfig parse_model_config(const std::string& config_json, const std::string& quant_json,
                               const std::string& what) {
  json j;
  try {
    j = json::parse(config_json);
  } catch (const json::exception& e) {
    fail(what, ": not valid JSON: ", e.what());
  }
  if (!j.is_object()) fail(what, ": expected a JSON object, got ", j.type_name());
  ModelConfig cfg;
  Reader top{j, what};
  cfg.model_type = top.str("model_type", "");
  if (j.contains("architectures") && j["architectures"].is_array() && !j["architectures"].empty() &&
      j["architectures"][0].is_string())
    cfg.architecture = j["architectures"][0].get<std::string>();
  const json* tc = &j;
  if (j.contains("text_config") && j["text_config"].is_object()) {
    tc = &j["text_config"];
    cfg.lm_prefix = "model.language_model";
  } else {
    cfg.lm_prefix = "model";
  }
  std::string tmt = tc->value("model_type", cfg.model_type);
  if (cfg.model_type.empty()) cfg.model_type = tmt;
  auto is = [&](const std::string& s, std::initializer_list<const char*> v) {
    for (auto x : v)
      if (s == x) return true;
    return false;
  };
  if (is(cfg.model_type, {"qwen3_5_moe", "qwen3_5_moe_text"})) cfg.text.moe = true;
  else if (is(cfg.model_type, {"qwen3_5", "qwen3_5_text"})) cfg.text.moe = false;
  else
    fail(what, ": model_type '", cfg.model_type,
         "' is not supported (expected qwen3_5_moe, qwen3_5, qwen3_5_moe_text or qwen3_5_text)");
  // A text-only *ForCausalLM checkpoint names its tensors model.layers.*; the multimodal one
  // model.language_model.layers.*. The loader double-checks against the tensors present.
  if (cfg.architecture.find("ForConditionalGeneration") != std::string::npos) cfg.lm_prefix = "model.language_model";
  parse_text(*tc, cfg.text, tc == &j ? what : what + ".text_config");
  if (cfg.text.eos_token_ids.empty() && j.contains("eos_token_id") && j["eos_token_id"].is_number_integer())
    cfg.text.eos_token_ids.push_back(j["eos_token_id"].get<int64_t>());
  if (j.contains("vision_config") && j["vision_config"].is_object())
    parse_vision(j["vision_config"], cfg.vision, what + ".vision_config");
  cfg.image_token_id = top.i64("image_token_id", -1);
  cfg.video_token_id = top.i64("video_token_id", -1);
  cfg.vision_start_token_id = top.i64("vision_start_token_id", -1);
  cfg.vision_end_token_id = top.i64("vision_end_token_id", -1);
  if (!quant_json.empty()) {
    json q;
    try {
      q = json::parse(quant_json);
    } catch (const json::exception& e) {
      fail(what, ": quantization_config.json is not valid JSON: ", e.what());
    }
    parse_quant(q, cfg.quant, "quantization_config");
  } else if (j.contains("quantization_config") && j["quantization_config"].is_object()) {
    parse_quant(j["quantization_config"], cfg.quant, what + ".quantization_config");
  } else if (tc->contains("quantization_config") && (*tc)["quantization_config"].is_object()) {
    parse_quant((*tc)["quantization_config"], cfg.quant, what + ".text_config.quantization_config");
  }
  return cfg;
}

QuantConfig parse_quant_config(const std::string& text, const std::string& what) {
  json q;
  try {
    q = json::parse(text);
  } catch (const json::exception& e) {
    fail(what, ": not valid JSON: ", e.what());
  }
  QuantConfig qc;
  parse_quant(q, qc, what);
  return qc;
}

ModelConfig load_model_config(const std::string& dir_or_file) {
  namespace fs = std::filesystem;
  fs::path p(dir_or_file);
  fs::path cfg_path = fs::is_directory(p) ? p / "config.json" : p;
  if (!fs::exists(cfg_path)) fail(cfg_path.string(), ": no config.json found");
  std::string qtext;
  fs::path qpath = cfg_path.parent_path() / "quantization_config.json";
  if (fs::is_directory(p) && fs::exists(qpath)) qtext = read_file(qpath.string(), "quantization_config.json");
  return parse_model_config(read_file(cfg_path.string(), "config.json"), qtext, cfg_path.string());
}

ParamCounts count_params(const ModelConfig& cfg) {
  const TextConfig& t = cfg.text;
  ParamCounts pc;
  const int64_t H = t.hidden_size;
  auto linear_bytes = [&](const std::string& name, int64_t N, int64_t K) -> int64_t {
    if (cfg.quant.is_quantized(name)) {
      pc.int4_params += N * K;
      return N * K / 2 + (K / 128) * N * 2 + (K / 128) * (N / 8) * 4;
    }
    return N * K * 2;
  };
  // Returns {params, active params, bytes} of one decoder layer's FFN.
  auto ffn = [&](const std::string& pre, int64_t& params, int64_t& active, int64_t& bytes) {
    if (t.moe) {
      int64_t E = t.num_experts, I = t.moe_intermediate_size, Is = t.shared_expert_intermediate_size;
      int64_t expert = 3 * I * H;
      params += E * H + E * expert + 3 * Is * H + H;
      active += E * H + t.num_experts_per_tok * expert + 3 * Is * H + H;
      bytes += linear_bytes(pre + "mlp.gate", E, H) + linear_bytes(pre + "mlp.shared_expert_gate", 1, H);
      bytes += linear_bytes(pre + "mlp.shared_expert.gate_proj", Is, H) * 2 +
               linear_bytes(pre + "mlp.shared_expert.down_proj", H, Is);
      bytes += E * (linear_bytes(pre + "mlp.experts.0.gate_proj", I, H) * 2 +
                    linear_bytes(pre + "mlp.experts.0.down_proj", H, I));
    } else {
      int64_t I = t.intermediate_size;
      params += 3 * I * H;
      active += 3 * I * H;
      bytes += linear_bytes(pre + "mlp.gate_proj", I, H) * 2 + linear_bytes(pre + "mlp.down_proj", H, I);
    }
  };
  auto attn = [&](const std::string& pre, int64_t& params, int64_t& bytes) {
    int64_t qw = t.num_heads * t.head_dim * 2, kv = t.num_kv_heads * t.head_dim, o = t.num_heads * t.head_dim;
    params += qw * H + 2 * kv * H + H * o + 2 * t.head_dim;
    bytes += linear_bytes(pre + "self_attn.q_proj", qw, H) + linear_bytes(pre + "self_attn.k_proj", kv, H) * 2 +
             linear_bytes(pre + "self_attn.o_proj", H, o) + 2 * t.head_dim * 2;
  };
  int64_t text = 0, active = 0, bytes = 0;
  text += t.vocab_size * H * (t.tie_word_embeddings ? 1 : 2) + H;
  bytes += (t.vocab_size * H * (t.tie_word_embeddings ? 1 : 2) + H) * 2;
  for (int64_t L = 0; L < t.num_layers; ++L) {
    std::string pre = cfg.lm_prefix + ".layers." + std::to_string(L) + ".";
    int64_t p = 2 * H;
    bytes += 2 * H * 2;
    if (t.layer_types[L] == LayerType::LinearAttention) {
      int64_t cd = t.lin_conv_dim(), vd = t.lin_value_dim(), Hv = t.lin_num_v_heads;
      p += cd * H + vd * H + 2 * Hv * H + cd * t.conv_kernel + 2 * Hv + t.lin_v_head_dim + H * vd;
      bytes += linear_bytes(pre + "linear_attn.in_proj_qkv", cd, H) + linear_bytes(pre + "linear_attn.in_proj_z", vd, H) +
               linear_bytes(pre + "linear_attn.in_proj_a", Hv, H) * 2 + linear_bytes(pre + "linear_attn.out_proj", H, vd) +
               (cd * t.conv_kernel + 2 * Hv + t.lin_v_head_dim) * 2;
    } else {
      attn(pre, p, bytes);
    }
    int64_t a = p;
    ffn(pre, p, a, bytes);
    text += p;
    active += a;
  }
  pc.text = text;
  pc.active = active + (t.vocab_size * H * (t.tie_word_embeddings ? 1 : 2) + H);
  if (t.mtp_num_hidden_layers > 0) {
    int64_t m = 0, ma = 0, mb = 0;
    for (int64_t i = 0; i < t.mtp_num_hidden_layers; ++i) {
      std::string pre = "mtp.layers." + std::to_string(i) + ".";
      int64_t p = 2 * H;
      attn(pre, p, mb);
      ffn(pre, p, ma, mb);
      m += p;
    }
    m += 2 * H * H + 3 * H;
    mb += (2 * H * H + 5 * H) * 2;
    pc.mtp = m;
    bytes += mb;
  }
  if (cfg.vision.present) {
    const VisionConfig& v = cfg.vision;
    int64_t D = v.hidden_size, F = v.intermediate_size, pd = v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size;
    int64_t mh = D * v.spatial_merge_size * v.spatial_merge_size;
    int64_t vis = pd * D + D + v.num_position_embeddings * D;
    vis += v.depth * (4 * D + 3 * D * D + 3 * D + D * D + D + F * D + F + D * F + D);
    vis += 2 * D + mh * mh + mh + v.out_hidden_size * mh + v.out_hidden_size;
    pc.vision = vis;
  }
  pc.weight_bytes = bytes;
  return pc;
}

}  // namespace ds::io
