// config.json -> ModelConfig, quantization_config -> QuantConfig (per-module int4 or BF16).
#pragma once
#include <array>
#include <cstdint>
#include <map>
#include <optional>
#include <regex>
#include <string>
#include <vector>

namespace ds::io {

enum class LayerType { LinearAttention, FullAttention };

struct RopeConfig {
  std::string type = "default";  // "default" (yarn etc. are rejected until supported)
  double theta = 10000000.0;
  double partial_rotary_factor = 0.25;
  std::array<int, 3> mrope_section{11, 11, 10};
  bool mrope_interleaved = true;
};

struct TextConfig {
  std::string model_type;  // qwen3_5_moe_text | qwen3_5_text
  bool moe = true;
  int64_t vocab_size = 0, hidden_size = 0, num_layers = 0;
  std::vector<LayerType> layer_types;
  // full attention
  int64_t num_heads = 0, num_kv_heads = 0, head_dim = 0;
  bool attn_output_gate = true;
  // gated deltanet
  int64_t conv_kernel = 4, lin_k_head_dim = 0, lin_v_head_dim = 0, lin_num_k_heads = 0, lin_num_v_heads = 0;
  std::string mamba_ssm_dtype = "float32";  // the recurrent state's storage dtype: "float32" or "bfloat16"
  // ffn
  int64_t num_experts = 0, num_experts_per_tok = 0, moe_intermediate_size = 0,
          shared_expert_intermediate_size = 0, intermediate_size = 0;
  double rms_norm_eps = 1e-6;
  RopeConfig rope;
  int64_t max_position_embeddings = 262144;
  int64_t mtp_num_hidden_layers = 0;
  bool tie_word_embeddings = false;
  std::vector<int64_t> eos_token_ids;

  int64_t rotary_dim() const { return int64_t(head_dim * rope.partial_rotary_factor); }
  int64_t lin_key_dim() const { return lin_num_k_heads * lin_k_head_dim; }
  int64_t lin_value_dim() const { return lin_num_v_heads * lin_v_head_dim; }
  int64_t lin_conv_dim() const { return 2 * lin_key_dim() + lin_value_dim(); }
  int num_full_layers() const;
  int num_linear_layers() const;
};

struct VisionConfig {
  bool present = false;
  int64_t depth = 0, hidden_size = 0, intermediate_size = 0, num_heads = 0, in_channels = 3, patch_size = 16,
          temporal_patch_size = 2, spatial_merge_size = 2, out_hidden_size = 0, num_position_embeddings = 0;
  std::string hidden_act = "gelu_pytorch_tanh";
};

// Per-module precision, decided from quantization_config (AutoRound or GPTQ).
struct QuantConfig {
  std::string method;  // "" (none) | "auto-round" | "gptq"
  int bits = 16, group_size = 128;
  bool sym = true;
  std::string packing_format;
  std::vector<std::string> block_name_to_quantize;  // prefixes
  std::map<std::string, int> extra_exact;           // module name -> bits
  std::vector<std::pair<std::regex, int>> extra_regex;
  std::vector<std::string> extra_regex_src;

  bool enabled() const { return !method.empty(); }
  // True if the Linear module `name` (e.g. "model.language_model.layers.0.self_attn.q_proj") is int4.
  bool is_quantized(const std::string& name) const;
};

struct ModelConfig {
  std::string architecture;  // e.g. Qwen3_5MoeForConditionalGeneration
  std::string model_type;    // qwen3_5_moe | qwen3_5
  TextConfig text;
  VisionConfig vision;
  QuantConfig quant;
  int64_t image_token_id = -1, video_token_id = -1, vision_start_token_id = -1, vision_end_token_id = -1;
  // Checkpoint tensor-name prefix of the language model: "model.language_model" (multimodal) or "model".
  std::string lm_prefix = "model.language_model";
};

// Parses config.json text (and optional quantization_config.json text, "" if absent).
// `what` names the source in errors.
ModelConfig parse_model_config(const std::string& config_json, const std::string& quant_json,
                               const std::string& what);
// Parses a quantization_config object (the text of quantization_config.json).
QuantConfig parse_quant_config(const std::string& json_text, const std::string& what);
// Reads DIR/config.json (+ DIR/quantization_config.json if present), or a config.json path.
ModelConfig load_model_config(const std::string& dir_or_file);

struct ParamCounts {
  int64_t text = 0;    // embeddings + layers + final norm + lm_head (no MTP)
  int64_t mtp = 0;
  int64_t vision = 0;
  int64_t active = 0;  // per token: text with only top-k routed experts
  int64_t weight_bytes = 0;  // bytes the text+mtp weights need in their checkpoint precision
  int64_t int4_params = 0;
};
ParamCounts count_params(const ModelConfig& cfg);

}  // namespace ds::io
