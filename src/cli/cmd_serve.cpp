// deltaserve serve: the OpenAI-compatible server (flags spelled like vLLM's where they mean the same).
#include <filesystem>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <unistd.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/config_file.h"
#include "model/model.h"
#include "server/server.h"

namespace ds::cli {

namespace {
// The JSON object a flag holds, or an error naming the flag with an example of the shape expected.
nlohmann::json json_object_flag(const Args& a, const char* flag, const char* example) {
  const std::string v = a.get(flag);
  auto j = nlohmann::json::parse(v, nullptr, false);
  if (j.is_discarded() || !j.is_object()) fail("--", flag, ": expected a JSON object like ", example, ", got '", v, "'");
  return j;
}

// vLLM's flags that mean nothing for this server (it does so always, or there is no such choice here), accepted so
// that a copied vLLM recipe starts; each given one prints a note saying why it is a no-op. (value: takes one)
struct VllmNoOp {
  const char* flag;
  bool value;
  const char* why;
};
constexpr VllmNoOp kVllmNoOps[] = {
    {"reasoning-parser", true, "Qwen's <think> reasoning is always parsed into message.reasoning / reasoning_content"},
    {"tool-call-parser", true, "Qwen's XML tool calls are always parsed (and typed by the tools' schemas)"},
    {"enable-auto-tool-choice", false, "tool_choice auto is always available"},
    {"trust-remote-code", false, "no model code is downloaded or run"},
    {"enable-chunked-prefill", false, "prefill is always chunked (--max-num-batched-tokens per step)"},
    {"no-enable-chunked-prefill", false, "prefill is always chunked (--max-num-batched-tokens per step)"},
    {"async-scheduling", false, "the engine thread never waits on the HTTP threads"},
    {"enable-prompt-tokens-details", false, "usage.prompt_tokens_details.cached_tokens is always reported"},
    {"disable-log-requests", false, "requests are logged only with --enable-log-requests"},
    {"enable-expert-parallel", false, "the model runs on one GPU"},
    {"quantization", true, "the weight format is read from config.json's quantization_config"},
    {"load-format", true, "the checkpoint's safetensors are read as they are"},
    {"download-dir", true, "the model is a local folder"},
    {"max-cudagraph-capture-size", true, "decode steps record a CUDA graph per batch size when first seen"},
    {"cuda-graph-sizes", true, "decode steps record a CUDA graph per batch size when first seen"},
    {"swap-space", true, "preempted sequences are recomputed, not swapped"},
    {"mamba-cache-mode", true, "prefix caching keeps DeltaNet state checkpoints of its own (--prefix-cache-checkpoints, "
                               "--cache-ram, --prefix-cache-interval)"},
    {"mm-encoder-tp-mode", true, "the vision tower runs on the one GPU"},
    {"mm-processor-cache-type", true, "images are preprocessed per request"},
    {"uvicorn-log-level", true, "logging is --disable-log-stats, --disable-access-log, --enable-log-requests"},
    {"seed", true, "requests without a seed draw their own random seed"},
    {"disable-fastapi-docs", false, "there are no /docs pages"},
};

// vLLM's short spellings of the parallel sizes.
std::vector<std::string> long_flags(std::vector<std::string> words) {
  for (auto& w : words) {
    if (w == "-tp") w = "--tensor-parallel-size";
    else if (w == "-dp") w = "--data-parallel-size";
    else if (w == "-pp") w = "--pipeline-parallel-size";
  }
  return words;
}

// vLLM's --served-model-name A B C: the words after the first name that are neither flags nor flag values become one
// --served-model-name each, once the model folder has been given (so `serve --served-model-name n MODEL` keeps MODEL as
// the folder, as vLLM reads `serve MODEL --served-model-name a b`).
std::vector<std::string> served_names_as_flags(const std::vector<std::string>& words,
                                               const std::vector<std::string>& bool_flags) {
  std::vector<std::string> out;
  bool have_model = false;
  auto is_bool = [&](const std::string& w) {
    return std::find(bool_flags.begin(), bool_flags.end(), w.substr(2)) != bool_flags.end();
  };
  for (size_t i = 0; i < words.size(); ++i) {
    const std::string& w = words[i];
    out.push_back(w);
    if (w.rfind("--", 0) != 0) {
      have_model = true;  // a positional: the model folder
      continue;
    }
    if (w.find('=') != std::string::npos || is_bool(w) || i + 1 >= words.size()) continue;
    out.push_back(words[++i]);  // the flag's value
    if (w == "--model") have_model = true;
    if (w != "--served-model-name" || !have_model) continue;
    while (i + 1 < words.size() && words[i + 1].rfind("-", 0) != 0) {
      out.push_back("--served-model-name");
      out.push_back(words[++i]);
    }
  }
  return out;
}

// llama.cpp's LLAMA_ARG_* as ours: DELTASERVE_ARG_MAX_MODEL_LEN=8192 is --max-model-len 8192 (a flag without a value:
// 1 / true / on, or 0 / false / off to leave it off). Read after the command line and a --config file, so both win. A
// DELTASERVE_ARG_ variable that names no flag is an error, as a misspelt flag is.
std::vector<std::string> env_args(const std::vector<std::string>& known, const std::vector<std::string>& bool_flags) {
  std::vector<std::string> out;
  const std::string pre = "DELTASERVE_ARG_";
  for (char** e = environ; e && *e; ++e) {
    const std::string kv = *e;
    if (kv.rfind(pre, 0) != 0) continue;
    const size_t eq = kv.find('=');
    std::string flag = kv.substr(pre.size(), eq - pre.size()), value = kv.substr(eq + 1);
    for (char& c : flag) c = c == '_' ? '-' : char(std::tolower(static_cast<unsigned char>(c)));
    if (std::find(known.begin(), known.end(), flag) == known.end())
      fail("environment: ", kv.substr(0, eq), " names no flag of serve (--", flag, ")");
    if (std::find(bool_flags.begin(), bool_flags.end(), flag) != bool_flags.end()) {
      if (value == "1" || value == "true" || value == "on") out.push_back("--" + flag);
      else if (value != "0" && value != "false" && value != "off")
        fail("environment: ", kv.substr(0, eq), " is a flag without a value: expected 1 or 0, got '", value, "'");
    } else {
      out.push_back("--" + flag);
      out.push_back(value);
    }
  }
  return out;
}

// --api-key (repeatable), --api-key-file (one key a line, llama.cpp's), else $DELTASERVE_API_KEY; none: no auth.
std::vector<std::string> api_keys(const Args& a) {
  std::vector<std::string> keys;
  for (auto& k : a.get_all("api-key")) {
    if (k.empty()) fail("--api-key: expected a key, got an empty string");
    keys.push_back(k);
  }
  for (auto& path : a.get_all("api-key-file")) {
    std::ifstream f(path);
    if (!f) fail("--api-key-file: cannot read '", path, "'");
    std::string line;
    size_t before = keys.size();
    while (std::getline(f, line)) {
      while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t')) line.pop_back();
      const size_t b = line.find_first_not_of(" \t");
      if (b == std::string::npos || line[b] == '#') continue;
      keys.push_back(line.substr(b));
    }
    if (keys.size() == before) fail("--api-key-file: '", path, "' holds no key (one a line; '#' starts a comment)");
  }
  if (keys.empty())
    if (const char* env = std::getenv("DELTASERVE_API_KEY"); env && *env) keys.push_back(env);
  return keys;
}
}  // namespace

int cmd_serve(int argc, char** argv) {
  std::vector<std::string> bool_flags = {"disable-image-fetch", "enforce-eager", "enable-prefix-caching", "no-enable-prefix-caching",
                         "disable-log-stats", "disable-access-log", "disable-uvicorn-access-log", "enable-log-requests",
                         "return-tokens-as-token-ids", "allow-credentials", "enable-force-include-usage",
                         "language-model-only"};
  std::vector<std::string> known = {"host", "port", "backend", "served-model-name", "api-key", "max-model-len", "max-num-seqs",
                   "max-num-batched-tokens", "max-queued-requests", "num-gpu-blocks-override", "block-size",
                   "gpu-memory-utilization", "enforce-eager", "mamba-ssm-cache-dtype", "shutdown-timeout",
                   "chat-template", "default-chat-template-kwargs", "speculative-config", "limit-mm-per-prompt",
                   "mm-processor-kwargs",
                   "max-image-pixels", "max-image-bytes", "max-video-bytes", "max-video-frames", "image-fetch-timeout",
                   "disable-image-fetch", "allowed-local-media-path", "enable-prefix-caching",
                   "no-enable-prefix-caching", "prefix-cache-checkpoints", "cache-ram", "prefix-cache-interval",
                   "disable-log-stats", "log-stats-interval",
                   "disable-access-log", "disable-uvicorn-access-log", "enable-log-requests", "max-logprobs",
                   "return-tokens-as-token-ids", "allowed-origins", "allowed-methods", "allowed-headers",
                   "allow-credentials", "generation-config", "override-generation-config",
                   "enable-force-include-usage", "responses-store", "language-model-only", "api-key-file",
                   "max-num-queued-reqs", "tensor-parallel-size", "data-parallel-size", "pipeline-parallel-size",
                   "dtype", "kv-cache-dtype", "hf-overrides", "allowed-media-domains", "metrics-prefix"};
  for (auto& n : kVllmNoOps) {
    known.push_back(n.flag);
    if (!n.value) bool_flags.push_back(n.flag);
  }
  std::vector<std::string> words = served_names_as_flags(long_flags(expand_config_args(argc, argv, 2)), bool_flags);
  for (auto& w : env_args(known, bool_flags)) words.push_back(w);
  const Args a(words, bool_flags);
  a.only("serve", known);
  if (a.positional().size() + (a.has("model") ? 1 : 0) > 1)
    fail("serve: expected one model folder, got '", a.has("model") ? a.get("model") : a.positional()[0], "' and '",
         a.positional()[a.has("model") ? 0 : 1], "'");
  for (auto& n : kVllmNoOps)
    if (a.has(n.flag))
      std::fprintf(stderr, "deltaserve serve: note: --%s%s is vLLM's; it changes nothing here: %s\n", n.flag,
                   n.value ? (" " + a.get(n.flag)).c_str() : "", n.why);
  for (const char* f : {"tensor-parallel-size", "data-parallel-size", "pipeline-parallel-size"})
    if (a.has(f) && a.get_int(f, 1) != 1)
      fail("--", f, ": expected 1, got ", a.get(f), " (deltaserve runs one model on one GPU; for more throughput run a ",
           "server per GPU behind a load balancer)");
  if (a.has("dtype")) {
    const std::string d = a.get("dtype");
    if (d != "auto" && d != "bfloat16" && d != "bf16")
      fail("--dtype: expected auto or bfloat16 (activations are bf16 on the GPU, fp32 on the CPU backend), got '", d, "'");
  }
  if (a.has("kv-cache-dtype")) {
    const std::string d = a.get("kv-cache-dtype");
    if (d == "fp8" || d == "fp8_e4m3" || d == "fp8_e5m2")
      std::fprintf(stderr, "deltaserve serve: note: --kv-cache-dtype %s is not implemented; the KV cache stays bf16 (20 "
                           "KiB per token for Qwen3.6-35B-A3B: its 10 attention layers are a small part of the memory)\n",
                   d.c_str());
    else if (d != "auto" && d != "bfloat16")
      fail("--kv-cache-dtype: expected auto, bfloat16 or fp8 (accepted, not implemented), got '", d, "'");
  }
  if (a.has("hf-overrides"))
    fail("--hf-overrides: not supported (it changes the model: deltaserve reads config.json as it is; edit a copy of "
         "the model folder's config.json instead)");
  server::ServerConfig c;
  c.model_dir = a.model_dir();
  c.host = a.get("host", c.host);
  int64_t port = a.get_int("port", c.port);
  if (port < 0 || port > 65535) fail("--port: expected 0..65535, got ", port);
  c.port = int(port);
  c.backend = a.get("backend", c.backend);
  const auto names = a.get_all("served-model-name");
  c.served_model_name = names.empty() ? "" : names[0];
  for (size_t i = 1; i < names.size(); ++i) c.served_model_aliases.push_back(names[i]);
  for (auto& n : names)
    if (n.empty()) fail("--served-model-name: expected a name, got an empty string");
  c.api_keys = api_keys(a);
  c.max_model_len = a.get_int("max-model-len", 0);
  c.max_num_seqs = a.get_int("max-num-seqs", c.max_num_seqs);
  c.max_num_batched_tokens = a.get_int("max-num-batched-tokens", c.max_num_batched_tokens);
  if (a.has("max-queued-requests") && a.has("max-num-queued-reqs"))
    fail("--max-queued-requests and --max-num-queued-reqs (vLLM's spelling) are the same flag: give one");
  c.max_queued_requests = a.get_int("max-queued-requests", a.get_int("max-num-queued-reqs", c.max_queued_requests));
  if (c.max_queued_requests < 0) fail("--max-queued-requests: expected >= 0, got ", c.max_queued_requests);
  c.num_kv_blocks = a.get_int("num-gpu-blocks-override", 0);
  c.block_size = a.get_int("block-size", c.block_size);
  c.gpu_memory_utilization = a.get_double("gpu-memory-utilization", c.gpu_memory_utilization);
  if (!(c.gpu_memory_utilization > 0.0 && c.gpu_memory_utilization <= 1.0))
    fail("--gpu-memory-utilization: expected a fraction in (0, 1], got ", c.gpu_memory_utilization);
  c.enforce_eager = a.has("enforce-eager");
  if (a.has("enable-prefix-caching") && a.has("no-enable-prefix-caching"))
    fail("--enable-prefix-caching and --no-enable-prefix-caching: expected one of them, got both");
  c.enable_prefix_caching = !a.has("no-enable-prefix-caching");
  c.prefix_cache_checkpoints = a.get_int("prefix-cache-checkpoints", c.prefix_cache_checkpoints);
  if (c.prefix_cache_checkpoints < 0 || c.prefix_cache_checkpoints > 4096)
    fail("--prefix-cache-checkpoints: expected 0..4096, got ", c.prefix_cache_checkpoints);
  if (c.prefix_cache_checkpoints == 0) c.enable_prefix_caching = false;
  c.prefix_cache_interval = a.get_int("prefix-cache-interval", c.prefix_cache_interval);
  if (c.prefix_cache_interval < 0) fail("--prefix-cache-interval: expected tokens >= 0 (0: off), got ", c.prefix_cache_interval);
  c.cache_ram_mib = a.get_int("cache-ram", c.cache_ram_mib);
  if (c.cache_ram_mib < 0 || c.cache_ram_mib > (int64_t(1) << 30))
    fail("--cache-ram: expected MiB of host memory, 0..", int64_t(1) << 30, ", got ", c.cache_ram_mib);
  c.responses_store_mib = a.get_int("responses-store", c.responses_store_mib);
  if (c.responses_store_mib < 0 || c.responses_store_mib > (int64_t(1) << 30))
    fail("--responses-store: expected MiB of host memory, 0..", int64_t(1) << 30, ", got ", c.responses_store_mib);
  c.ssm_state_dtype = a.get("mamba-ssm-cache-dtype", c.ssm_state_dtype);
  (void)model::Model::ssm_dtype_from_name(c.ssm_state_dtype, DType::F32, "--mamba-ssm-cache-dtype");  // fail early
  c.drain_seconds = int(a.get_int("shutdown-timeout", c.drain_seconds));
  c.chat_template_path = a.get("chat-template", "");
  // Logging (vLLM's flags): the periodic stats line, the access log (uvicorn's flag name accepted too), request lines.
  c.log_stats = !a.has("disable-log-stats");
  c.log_stats_interval = a.get_double("log-stats-interval", c.log_stats_interval);
  if (!(c.log_stats_interval >= 0.1 && c.log_stats_interval <= 86400))
    fail("--log-stats-interval: expected seconds in [0.1, 86400], got ", c.log_stats_interval);
  c.access_log = !a.has("disable-access-log") && !a.has("disable-uvicorn-access-log");
  c.log_requests = a.has("enable-log-requests");
  c.max_logprobs = a.get_int("max-logprobs", c.max_logprobs);
  c.return_tokens_as_token_ids = a.has("return-tokens-as-token-ids");
  c.generation_config = a.get("generation-config", c.generation_config);
  if (c.generation_config != "auto" && c.generation_config != "vllm" &&
      !std::filesystem::is_directory(c.generation_config))
    fail("--generation-config: expected auto, vllm or a folder, got '", c.generation_config, "'");
  if (a.has("override-generation-config")) {
    const auto j = json_object_flag(a, "override-generation-config", "{\"temperature\": 0.5}");
    for (auto& [k, x] : j.items()) server::check_sampling_default("--override-generation-config", k, x);
    c.override_generation_config = j;
  }
  // CORS (vLLM's flags: JSON lists of strings, "*" for any).
  auto string_list = [&](const char* flag, std::vector<std::string>& out) {
    if (!a.has(flag)) return;
    const std::string v = a.get(flag);
    auto j = nlohmann::json::parse(v, nullptr, false);
    bool ok = !j.is_discarded() && j.is_array();
    if (ok)
      for (auto& x : j) ok = ok && x.is_string() && !x.get<std::string>().empty();
    if (!ok) fail("--", flag, ": expected a JSON list of strings like '[\"*\"]', got '", v, "'");
    out = j.get<std::vector<std::string>>();
  };
  string_list("allowed-origins", c.allowed_origins);
  string_list("allowed-methods", c.allowed_methods);
  string_list("allowed-headers", c.allowed_headers);
  c.allow_credentials = a.has("allow-credentials");
  c.force_include_usage = a.has("enable-force-include-usage");
  c.metrics_prefix = a.get("metrics-prefix", c.metrics_prefix);
  {
    const std::string& mp = c.metrics_prefix;
    bool ok = !mp.empty() && !std::isdigit(static_cast<unsigned char>(mp[0]));
    for (char ch : mp) ok = ok && (std::isalnum(static_cast<unsigned char>(ch)) || ch == '_');
    if (!ok) fail("--metrics-prefix: expected a Prometheus name (letters, digits, '_'; not starting with a digit), got '", mp, "'");
  }
  if (c.max_logprobs < -1) fail("--max-logprobs: expected -1 (the whole vocabulary) or a count >= 0, got ", c.max_logprobs);
  if (c.max_num_seqs < 1) fail("--max-num-seqs: expected >= 1, got ", c.max_num_seqs);
  if (c.max_num_batched_tokens < 1) fail("--max-num-batched-tokens: expected >= 1, got ", c.max_num_batched_tokens);
  if (c.max_model_len < 0) fail("--max-model-len: expected >= 1, got ", c.max_model_len);
  if (a.has("default-chat-template-kwargs")) {
    auto j = nlohmann::ordered_json::parse(a.get("default-chat-template-kwargs"), nullptr, false);
    if (j.is_discarded() || !j.is_object())
      fail("--default-chat-template-kwargs: expected a JSON object, got '", a.get("default-chat-template-kwargs"), "'");
    c.default_chat_template_kwargs = j;
  }
  if (a.has("speculative-config")) {
    // vLLM's spelling; "mtp" (and Qwen3-Next's "qwen3_next_mtp") drafts with the checkpoint's own MTP head.
    const std::string v = a.get("speculative-config");
    const auto j = json_object_flag(a, "speculative-config", "{\"method\": \"mtp\", \"num_speculative_tokens\": 2}");
    for (auto& [k, _] : j.items())
      if (k != "method" && k != "num_speculative_tokens" && k != "draft_vocab_size" && k != "draft_vocab_file")
        fail("--speculative-config: unknown key '", k,
             "' (expected method, num_speculative_tokens, draft_vocab_size, draft_vocab_file)");
    const std::string method = j.value("method", std::string("mtp"));
    if (method != "mtp" && method != "qwen3_next_mtp")
      fail("--speculative-config: method must be \"mtp\", got \"", method, "\"");
    if (!j.contains("num_speculative_tokens") || !j["num_speculative_tokens"].is_number_integer())
      fail("--speculative-config: expected an integer num_speculative_tokens, got '", v, "'");
    c.num_speculative_tokens = j["num_speculative_tokens"].get<int64_t>();
    if (c.num_speculative_tokens < 1 || c.num_speculative_tokens > 16)
      fail("--speculative-config: num_speculative_tokens must be in 1..16, got ", c.num_speculative_tokens);
    // A reduced-vocabulary draft head: the N lowest ids, or the ids listed in a file (docs/engine.md).
    if (j.contains("draft_vocab_size")) {
      if (!j["draft_vocab_size"].is_number_integer() || j["draft_vocab_size"].get<int64_t>() < 1)
        fail("--speculative-config: draft_vocab_size must be a positive integer, got ", j["draft_vocab_size"].dump());
      c.draft_vocab_size = j["draft_vocab_size"].get<int64_t>();
    }
    if (j.contains("draft_vocab_file")) {
      if (!j["draft_vocab_file"].is_string())
        fail("--speculative-config: draft_vocab_file must be a path string, got ", j["draft_vocab_file"].dump());
      c.draft_vocab_file = j["draft_vocab_file"].get<std::string>();
    }
  }
  // Images (docs/server.md "Images").
  auto& md = c.media;
  if (a.has("limit-mm-per-prompt")) {
    const auto j = json_object_flag(a, "limit-mm-per-prompt", "{\"image\": 4}");
    for (auto& [k, x] : j.items()) {
      if (k != "image" && k != "video") fail("--limit-mm-per-prompt: unknown modality '", k, "' (expected image, video)");
      if (!x.is_number_integer() || x.get<int64_t>() < 0)
        fail("--limit-mm-per-prompt: '", k, "' must be a non-negative integer, got ", x.dump());
      if (k == "image") md.max_images_per_prompt = x.get<int64_t>();
      if (k == "video") md.max_videos_per_prompt = x.get<int64_t>();
    }
  }
  if (a.has("mm-processor-kwargs")) {
    const auto j = json_object_flag(a, "mm-processor-kwargs", "{\"max_pixels\": 1003520}");
    c.mm_processor_kwargs = nlohmann::ordered_json::parse(j.dump());  // checked at load, over the model's configs
  }
  md.max_image_pixels = a.get_int("max-image-pixels", md.max_image_pixels);
  if (md.max_image_pixels < 1) fail("--max-image-pixels: expected >= 1, got ", md.max_image_pixels);
  const int64_t mb = a.get_int("max-image-bytes", int64_t(md.max_image_bytes));
  if (mb < 1) fail("--max-image-bytes: expected >= 1, got ", mb);
  md.max_image_bytes = size_t(mb);
  const int64_t vb = a.get_int("max-video-bytes", int64_t(md.max_video_bytes));
  if (vb < 1) fail("--max-video-bytes: expected >= 1, got ", vb);
  md.max_video_bytes = size_t(vb);
  md.max_video_frames = a.get_int("max-video-frames", md.max_video_frames);
  if (md.max_video_frames < 1) fail("--max-video-frames: expected >= 1, got ", md.max_video_frames);
  md.fetch_timeout_s = a.get_double("image-fetch-timeout", md.fetch_timeout_s);
  if (!(md.fetch_timeout_s > 0) || md.fetch_timeout_s > 3600)
    fail("--image-fetch-timeout: expected seconds in (0, 3600], got ", md.fetch_timeout_s);
  if (a.has("disable-image-fetch")) md.fetch_http = false;
  c.language_model_only = a.has("language-model-only");
  // vLLM's --allowed-media-domains: the hosts image / video URLs (and their redirects) may point at.
  for (auto& v : a.get_all("allowed-media-domains")) {
    std::string list = v;
    if (auto j = nlohmann::json::parse(v, nullptr, false); !j.is_discarded() && j.is_array()) {
      list.clear();
      for (auto& x : j) {
        if (!x.is_string()) fail("--allowed-media-domains: expected host names, got ", x.dump());
        list += x.get<std::string>() + ",";
      }
    }
    size_t p = 0;
    while (p <= list.size()) {
      size_t e = list.find_first_of(", ", p);
      if (e == std::string::npos) e = list.size();
      std::string h = list.substr(p, e - p);
      for (char& ch : h) ch = char(std::tolower(static_cast<unsigned char>(ch)));
      if (!h.empty()) {
        if (h.find_first_of("/:@") != std::string::npos)
          fail("--allowed-media-domains: expected host names like upload.wikimedia.org, got '", h, "'");
        md.allowed_domains.push_back(h);
      }
      p = e + 1;
    }
  }
  md.allowed_local_paths = a.get_all("allowed-local-media-path");
  for (auto& d : md.allowed_local_paths) {
    std::error_code ec;
    if (!std::filesystem::is_directory(d, ec)) fail("--allowed-local-media-path: '", d, "' is not a directory");
  }
  return server::serve(c);
}

}  // namespace ds::cli
