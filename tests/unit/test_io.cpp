// Checkpoint parsing: safetensors header validation, config.json, quantization_config, loader strictness.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "backend/ops.h"
#include "core/file.h"
#include "core/status.h"
#include "golden_util.h"
#include "io/config.h"
#include "io/safetensors.h"
#include "model/model.h"

namespace ds {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::string make_file(const std::string& header, size_t data_bytes, int64_t len_override = -1) {
  std::string s(8, '\0');
  uint64_t n = len_override >= 0 ? uint64_t(len_override) : header.size();
  for (int i = 0; i < 8; ++i) s[i] = char((n >> (8 * i)) & 0xff);
  s += header;
  s += std::string(data_bytes, '\x01');
  return s;
}

std::string parse_error(const std::string& bytes) {
  try {
    io::safetensors_parse(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "t.safetensors");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Safetensors, ParsesValidHeader) {
  auto f = make_file(R"({"__metadata__":{"format":"pt"},"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},)"
                     R"("b":{"dtype":"F32","shape":[],"data_offsets":[12,16]}})",
                     16);
  auto h = io::safetensors_parse(reinterpret_cast<const uint8_t*>(f.data()), f.size(), "t");
  ASSERT_EQ(h.tensors.size(), 2u);
  EXPECT_EQ(h.metadata.at("format"), "pt");
  EXPECT_EQ(h.tensors[0].shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(h.tensors[1].numel(), 1);
}

TEST(Safetensors, RejectsMalformedFilesWithClearErrors) {
  const std::string ok = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  struct Case {
    std::string bytes, expect;
  } cases[] = {
      {"abc", "expected at least 8 bytes"},
      {make_file(ok, 8, 1000), "runs past the end of the file"},
      {make_file(ok, 4), "outside the data region"},
      {make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})", 8), "not valid JSON"},
      {make_file(R"([1,2])", 8), "must be a JSON object"},
      {make_file(R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", 8), "unknown dtype 'Q4'"},
      {make_file(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8), "needs 12 bytes"},
      {make_file(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8), "non-negative integers"},
      {make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8), "begin 8 > end 0"},
      {make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
       "overlap"},
      {make_file(R"({"a":{"dtype":"F32","shape":[2]}})", 8), "data_offsets must be [begin, end]"},
      {make_file(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", 8), "missing string field 'dtype'"},
      {make_file(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,8]}})", 8), "overflows"},
      {make_file(R"({"__metadata__":{"x":1}})", 0), "__metadata__[\"x\"] must be a string"},
      {make_file(R"({"__metadata__":[1]})", 0), "must be an object of strings"},
  };
  for (auto& c : cases) {
    std::string err = parse_error(c.bytes);
    EXPECT_NE(err.find(c.expect), std::string::npos) << "expected '" << c.expect << "' in: " << err;
  }
}

TEST(Safetensors, TruncatedRealShardIsAnErrorNotACrash) {
  const std::string src = test::data_dir() + "/tiny-moe/tiny-moe-int4/model-00002-of-00002.safetensors";
  std::ifstream f(src, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(f)), {});
  for (size_t cut : {size_t(0), size_t(5), size_t(100), bytes.size() / 2, bytes.size() - 1}) {
    std::string err = parse_error(bytes.substr(0, cut));
    EXPECT_FALSE(err.empty()) << "truncation at " << cut << " was accepted";
  }
  // Flipping bytes in the header must never crash.
  for (size_t i = 8; i < 200; i += 7) {
    std::string b = bytes;
    b[i] ^= 0x5a;
    parse_error(b);
  }
}

TEST(Safetensors, WriteReadRoundTrip) {
  fs::path p = fs::temp_directory_path() / "ds_roundtrip.safetensors";
  std::vector<float> a = {1, 2, 3, 4, 5, 6};
  std::vector<int32_t> b = {7, 8};
  io::safetensors_write(p.string(), {{"x", DType::F32, {2, 3}, a.data()}, {"y", DType::I32, {2}, b.data()}});
  io::SafetensorsFile f(p.string());
  ASSERT_EQ(f.header().tensors.size(), 2u);
  EXPECT_EQ(std::memcmp(f.header().tensors[0].data, a.data(), 24), 0);
  EXPECT_EQ(f.header().data_offset % 8, 0u);
}

TEST(Config, PublishedQwen36ConfigParsesWithExactParameterCounts) {
  auto path = std::string(DS_SHARED_DIR) + "/assets/qwen3.6-35b-a3b/config.json";
  if (!fs::exists(path)) GTEST_SKIP() << "../shared is absent";
  auto cfg = io::load_model_config(path);
  EXPECT_TRUE(cfg.text.moe);
  EXPECT_EQ(cfg.text.num_full_layers(), 10);
  EXPECT_EQ(cfg.text.layer_types[3], io::LayerType::FullAttention);
  EXPECT_EQ(cfg.text.rotary_dim(), 64);
  EXPECT_EQ(cfg.text.lin_conv_dim(), 8192);
  EXPECT_EQ(cfg.text.mtp_num_hidden_layers, 1);
  EXPECT_EQ(cfg.vision.depth, 27);
  auto pc = io::count_params(cfg);
  EXPECT_EQ(pc.text, 34660610688);   // model-spec §2.1: language model incl. lm_head
  EXPECT_EQ(pc.mtp, 844640768);
  EXPECT_EQ(pc.vision, 446571248);
  EXPECT_EQ(pc.active, 3454988928);
}

TEST(Config, TinyFixtureDefaultsAndQuantDecisions) {
  auto cfg = io::load_model_config(test::data_dir() + "/tiny-moe/tiny-moe-int4");
  EXPECT_TRUE(cfg.text.attn_output_gate);  // omitted by transformers 5.17: published default
  EXPECT_EQ(cfg.text.mamba_ssm_dtype, "float32");
  EXPECT_EQ(cfg.text.rope.mrope_section, (std::array<int, 3>{3, 3, 2}));
  EXPECT_TRUE(cfg.quant.enabled());
  const std::string L = "model.language_model.layers.";
  EXPECT_TRUE(cfg.quant.is_quantized(L + "0.linear_attn.in_proj_qkv"));
  EXPECT_FALSE(cfg.quant.is_quantized(L + "0.linear_attn.in_proj_a"));
  EXPECT_FALSE(cfg.quant.is_quantized(L + "0.mlp.gate"));
  EXPECT_TRUE(cfg.quant.is_quantized(L + "0.mlp.experts.5.down_proj"));
  EXPECT_FALSE(cfg.quant.is_quantized("lm_head"));           // outside block_name_to_quantize
  EXPECT_FALSE(cfg.quant.is_quantized("mtp.layers.0.self_attn.q_proj"));
}

std::string cfg_error(const json& cfg, const json& quant = nullptr) {
  try {
    io::parse_model_config(cfg.dump(), quant.is_null() ? "" : quant.dump(), "config.json");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

json tiny_config() {
  std::ifstream f(test::data_dir() + "/tiny-moe/tiny-moe-int4/config.json");
  return json::parse(f);
}

TEST(Config, QuantizationConfigVariants) {
  json c = tiny_config();
  json q = c["quantization_config"];
  c.erase("quantization_config");
  // Fused override name (Qwen3-Next's in_proj_ba) covers the split modules; regex keys work.
  json q2 = q;
  q2["extra_config"] = {{"model.language_model.layers.1.linear_attn.in_proj_qkvz", {{"bits", 16}}},
                        {".*shared_expert.*", {{"bits", 16}, {"data_type", "fp"}}}};
  auto cfg = io::parse_model_config(c.dump(), q2.dump(), "x");
  EXPECT_FALSE(cfg.quant.is_quantized("model.language_model.layers.1.linear_attn.in_proj_z"));
  EXPECT_TRUE(cfg.quant.is_quantized("model.language_model.layers.2.linear_attn.in_proj_z"));
  EXPECT_FALSE(cfg.quant.is_quantized("model.language_model.layers.2.mlp.shared_expert.up_proj"));
  // Plain GPTQ.
  json g = {{"quant_method", "gptq"}, {"bits", 4}, {"group_size", 128}, {"sym", true}, {"desc_act", false}};
  EXPECT_EQ(io::parse_model_config(c.dump(), g.dump(), "x").quant.method, "gptq");
  // Unsupported values name the field and the value.
  struct Bad {
    json q;
    std::string expect;
  } bad[] = {
      {{{"quant_method", "awq"}, {"bits", 4}, {"group_size", 128}}, "quant_method: 'awq'"},
      {{{"quant_method", "gptq"}, {"bits", 8}, {"group_size", 128}}, "bits: 8"},
      {{{"quant_method", "gptq"}, {"bits", 4}, {"group_size", 64}}, "group_size: 64"},
      {{{"quant_method", "gptq"}, {"bits", 4}, {"group_size", 128}, {"desc_act", true}}, "desc_act"},
      {{{"quant_method", "gptq"}, {"bits", 4}, {"group_size", 128}, {"sym", false}}, "sym: false"},
      {{{"quant_method", "auto-round"}, {"bits", 4}, {"group_size", 128}, {"packing_format", "auto_round:auto_awq"}},
       "packing_format: 'auto_round:auto_awq'"},
  };
  for (auto& b : bad) {
    std::string err = cfg_error(c, b.q);
    EXPECT_NE(err.find(b.expect), std::string::npos) << "expected '" << b.expect << "' in: " << err;
  }
}

TEST(Config, BadConfigsNameTheField) {
  json c = tiny_config();
  c.erase("quantization_config");
  json a = c;
  a["model_type"] = "llama";
  EXPECT_NE(cfg_error(a).find("model_type 'llama'"), std::string::npos);
  json b = c;
  b["text_config"]["hidden_size"] = "big";
  EXPECT_NE(cfg_error(b).find("'hidden_size' must be an integer"), std::string::npos);
  json d = c;
  d["text_config"]["layer_types"] = {"linear_attention"};
  EXPECT_NE(cfg_error(d).find("layer_types must list"), std::string::npos);
  json e = c;
  e["text_config"]["rope_parameters"]["rope_type"] = "longrope";
  EXPECT_NE(cfg_error(e).find("'longrope' is not supported"), std::string::npos);
  json f = c;
  f["text_config"].erase("layer_types");  // derived from full_attention_interval (default 4)
  EXPECT_EQ(io::parse_model_config(f.dump(), "", "x").text.layer_types[3], io::LayerType::FullAttention);
  json h = c;
  h["text_config"]["mamba_ssm_dtype"] = "float16";
  EXPECT_NE(cfg_error(h).find("mamba_ssm_dtype 'float16' is not supported (expected float32 or bfloat16)"),
            std::string::npos)
      << cfg_error(h);
  h["text_config"]["mamba_ssm_dtype"] = "bfloat16";  // a bf16 recurrent state (Model::ssm_state_dtype)
  EXPECT_EQ(io::parse_model_config(h.dump(), "", "x").text.mamba_ssm_dtype, "bfloat16");
  json g = c;
  g["some_future_key"] = {1, 2};  // unknown keys are ignored
  EXPECT_EQ(cfg_error(g), "");
  // Text-only *ForCausalLM config (no text_config).
  json t = c["text_config"];
  t["model_type"] = "qwen3_5_moe_text";
  t["architectures"] = {"Qwen3_5MoeForCausalLM"};
  auto cfg = io::parse_model_config(t.dump(), "", "x");
  EXPECT_EQ(cfg.lm_prefix, "model");
  EXPECT_FALSE(cfg.vision.present);
}

// Copies a model folder, rewriting one shard through `edit` (which may drop, rename or alter tensors).
struct TensorCopy {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};
std::string mutate_checkpoint(const std::string& variant, const std::function<void(std::vector<TensorCopy>&)>& edit) {
  static int counter = 0;
  fs::path src = test::data_dir() + "/tiny-moe/tiny-moe-" + variant;
  fs::path dst = fs::temp_directory_path() / ("ds_mut_" + std::to_string(getpid()) + "_" + std::to_string(counter++));
  fs::remove_all(dst);
  fs::create_directories(dst);
  for (auto& e : fs::directory_iterator(src)) fs::copy_file(e.path(), dst / e.path().filename());
  std::vector<TensorCopy> all;
  std::map<std::string, std::string> where;
  for (auto shard : {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}) {
    io::SafetensorsFile f((src / shard).string());
    for (auto& t : f.header().tensors) {
      all.push_back({t.name, t.dtype, t.shape, std::vector<uint8_t>(t.data, t.data + t.nbytes())});
    }
  }
  edit(all);
  // Write everything into one file and drop the index (single-file checkpoint).
  std::vector<io::TensorOut> outs;
  for (auto& t : all) outs.push_back({t.name, t.dtype, t.shape, t.bytes.data()});
  fs::remove(dst / "model-00001-of-00002.safetensors");
  fs::remove(dst / "model-00002-of-00002.safetensors");
  fs::remove(dst / "model.safetensors.index.json");
  io::safetensors_write((dst / "model.safetensors").string(), outs);
  return dst.string();
}

std::string load_error(const std::string& dir) {
  auto be = make_cpu_backend();
  try {
    model::Model::load(dir, *be);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Loader, SingleFileCheckpointLoadsAndDeclaresUnusedParts) {
  auto dir = mutate_checkpoint("int4", [](auto&) {});
  auto be = make_cpu_backend();
  model::LoadReport rep;
  auto m = model::Model::load(dir, *be, &rep);
  EXPECT_GT(rep.int4_linears, 0);
  EXPECT_TRUE(rep.not_yet_used.empty());  // text, MTP and vision: every tensor is consumed
  EXPECT_TRUE(m->has_mtp());
  // Parts left out on request are declared, not an error.
  model::LoadReport rep2;
  model::LoadOptions no_extras;
  no_extras.mtp = false;
  no_extras.vision = false;
  auto m2 = model::Model::load(dir, *be, &rep2, no_extras);
  EXPECT_GT(rep2.not_yet_used.size(), 0u);
  EXPECT_FALSE(m2->has_mtp());
}

TEST(Loader, StrictAboutEveryTensor) {
  const std::string L = "model.language_model.layers.";
  struct Case {
    std::string variant;
    std::function<void(std::vector<TensorCopy>&)> edit;
    std::string expect;
  } cases[] = {
      {"bf16",
       [&](auto& v) { std::erase_if(v, [&](auto& t) { return t.name == L + "2.linear_attn.A_log"; }); },
       "missing tensor '" + L + "2.linear_attn.A_log'"},
      {"bf16",
       [&](auto& v) {
         for (auto& t : v)
           if (t.name == L + "0.input_layernorm.weight") t.shape = {128}, t.bytes.resize(256);
       },
       "has shape [128], expected [256]"},
      {"bf16", [&](auto& v) { v.push_back({"model.language_model.extra.weight", DType::F32, {1}, {0, 0, 0, 0}}); },
       "no part of the model uses: model.language_model.extra.weight"},
      {"int4",
       [&](auto& v) {
         for (auto& t : v)
           if (t.name == L + "0.mlp.experts.3.up_proj.qzeros") t.bytes[0] = 0x88;
       },
       "expected 0x77777777"},
      {"int4",
       [&](auto& v) {
         for (auto& t : v)
           if (t.name == L + "1.mlp.experts.0.down_proj.scales") t.dtype = DType::BF16;
       },
       "has dtype BF16, expected F16"},
      {"int4",
       [&](auto& v) {
         std::erase_if(v, [&](auto& t) { return t.name.rfind(L + "3.self_attn.o_proj.", 0) == 0; });
         v.push_back({L + "3.self_attn.o_proj.weight", DType::BF16, {256, 256}, std::vector<uint8_t>(256 * 256 * 2)});
       },
       "so '" + L + "3.self_attn.o_proj.qweight' was expected, but only a dense '.weight' is present"},
  };
  for (auto& c : cases) {
    std::string err = load_error(mutate_checkpoint(c.variant, c.edit));
    EXPECT_NE(err.find(c.expect), std::string::npos) << "expected '" << c.expect << "' in: " << err;
  }
}

TEST(Loader, NegativeScalesAreHonoured) {
  // About half of AutoRound's scales are negative; the int4 golden test would fail if the sign were lost.
  io::SafetensorsFile f(test::data_dir() + "/tiny-moe/tiny-moe-int4/model-00001-of-00002.safetensors");
  int64_t neg = 0, total = 0;
  for (auto& t : f.header().tensors) {
    if (t.name.size() < 7 || t.name.compare(t.name.size() - 7, 7, ".scales") != 0) continue;
    for (int64_t i = 0; i < t.numel(); ++i) {
      uint16_t h;
      std::memcpy(&h, t.data + 2 * i, 2);
      neg += (h & 0x8000) != 0;
      ++total;
    }
  }
  ASSERT_GT(total, 0);
  EXPECT_GT(double(neg) / total, 0.3);
}

TEST(ReadFile, ReadsAllBytesAndNamesPathAndContentOnFailure) {
  fs::path p = fs::temp_directory_path() / ("ds_read_file_" + std::to_string(getpid()));
  std::string bytes = "a\0b\r\n";
  for (int i = 0; i < 20000; ++i) bytes += char(i * 7);  // larger than one read chunk
  {
    std::ofstream f(p, std::ios::binary);
    f.write(bytes.data(), std::streamsize(bytes.size()));
  }
  EXPECT_EQ(read_file(p.string(), "test file"), bytes);
  fs::remove(p);
  try {
    read_file(p.string(), "config.json");
    FAIL() << "no error for a missing file";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), "expected a readable config.json at '" + p.string() + "', got: cannot open the file");
  }
  try {
    read_file(fs::temp_directory_path().string(), "tokenizer.json");
    FAIL() << "no error for a directory";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("expected a readable tokenizer.json at '"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("got: a directory"), std::string::npos) << e.what();
  }
}

TEST(Dtype, HalfAndBf16ConversionsAreExact) {
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0xc000), -2.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(f16_to_f32(0x7bff), 65504.0f);
  for (uint32_t h = 0; h < 0x7c00; h += 13) EXPECT_EQ(f32_to_f16(f16_to_f32(uint16_t(h))), h);
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.5f)), 1.5f);
  EXPECT_EQ(f32_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);  // ties to even
}

}  // namespace
}  // namespace ds
