// The OpenAI-compatible HTTP server: routes, validation, admission control, SSE streaming, metrics, and
// the hand-off to the engine thread. HTTP threads parse, render and tokenize; the engine never waits on them.
#pragma once
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "server/media.h"

namespace ds::server {

struct ServerConfig {
  std::string model_dir;
  std::string host = "127.0.0.1";
  int port = 8000;
  std::string backend = "cpu";
  std::string served_model_name;  // default: the model folder's name
  // vLLM's --served-model-name A B C: the names after the first, which requests may use too (responses say the first).
  std::vector<std::string> served_model_aliases;
  // --api-key (repeatable), --api-key-file, $DELTASERVE_API_KEY: any of them opens /v1/*; none: no auth.
  std::vector<std::string> api_keys;
  bool language_model_only = false;  // vLLM's --language-model-only: the vision tower is not loaded
  int64_t max_model_len = 0;      // 0: min(config max_position_embeddings, 8192 on CPU / 32768 on CUDA)
  int64_t max_num_seqs = 16;
  int64_t max_num_batched_tokens = 2048;
  int64_t max_queued_requests = 256;  // beyond running + this many waiting: 429
  int64_t num_kv_blocks = 0;          // 0: sized from max_num_seqs x max_model_len
  int64_t block_size = 16;
  double gpu_memory_utilization = 0.9; // device backends: sizes the KV and DeltaNet state pools (docs/engine.md)
  bool enforce_eager = false;         // --enforce-eager: no CUDA graphs for decode steps
  // --mamba-ssm-cache-dtype auto|float32|bfloat16: the DeltaNet recurrent state's storage dtype (auto: the checkpoint's
  // mamba_ssm_dtype; docs/engine.md "DeltaNet state dtype")
  std::string ssm_state_dtype = "auto";
  size_t max_body_bytes = 32u << 20;
  int drain_seconds = 30;             // graceful shutdown deadline
  nlohmann::ordered_json default_chat_template_kwargs = nlohmann::ordered_json::object();
  std::string chat_template_path;     // override the model's template
  // vLLM's --generation-config auto|vllm|FOLDER: where the default sampling parameters come from (auto: the model's
  // generation_config.json; vllm: none, the server's own defaults; a folder: its generation_config.json), and
  // --override-generation-config JSON: parameters set over them (docs/server.md "Request semantics").
  std::string generation_config = "auto";
  nlohmann::json override_generation_config = nlohmann::json::object();
  int64_t num_speculative_tokens = 0; // --speculative-config '{"method": "mtp", "num_speculative_tokens": K}'
  MediaConfig media;                  // images: sources, limits (docs/server.md)
  // vLLM's --mm-processor-kwargs: image / video preprocessing over the model's configs (apply_mm_processor_kwargs);
  // a request's mm_processor_kwargs go over these.
  nlohmann::ordered_json mm_processor_kwargs = nlohmann::ordered_json::object();
  int64_t draft_vocab_size = 0;        //   "draft_vocab_size": N (reduced draft head; 0 = full vocabulary)
  std::string draft_vocab_file;        //   "draft_vocab_file": token ids, most frequent first
  // Prefix caching (docs/engine.md "Prefix caching"): --enable-prefix-caching / --no-enable-prefix-caching,
  // --prefix-cache-checkpoints N (DeltaNet state checkpoints kept; each one state slot of device memory).
  bool enable_prefix_caching = true;
  int64_t prefix_cache_checkpoints = 16;
  // --cache-ram MIB (llama.cpp's flag and default): host memory for checkpoints pushed out of their device slots
  // (EngineConfig::prefix_cache_host_checkpoints = MIB / one state slot, at most 4096); 0 = none.
  int64_t cache_ram_mib = 8192;
  // --prefix-cache-interval N: a prompt also leaves a checkpoint every N tokens (EngineConfig::prefix_cache_interval).
  int64_t prefix_cache_interval = 8192;
  // Logging to stderr (docs/server.md "Logs"): vLLM's periodic stats line every log_stats_interval seconds while
  // there is work (--disable-log-stats, --log-stats-interval S); one access-log line per HTTP request
  // (--disable-access-log); a line per generation received and finished (--enable-log-requests).
  // vLLM's --max-logprobs: the most alternatives logprobs / top_logprobs / prompt_logprobs may ask for (-1: the whole
  // vocabulary). Up to 20 they are computed on the device; above, each step's rows are copied to the host.
  int64_t max_logprobs = 20;
  // vLLM's --return-tokens-as-token-ids: logprobs name tokens "token_id:N" unless a request says otherwise.
  bool return_tokens_as_token_ids = false;
  bool log_stats = true;
  double log_stats_interval = 10.0;
  bool access_log = true;
  bool log_requests = false;
  // CORS (docs/server.md "CORS"): vLLM's --allowed-origins / --allowed-methods / --allowed-headers (JSON lists, "*" any)
  // and --allow-credentials, with vLLM's defaults (any origin, method and header; no credentials).
  std::vector<std::string> allowed_origins{"*"}, allowed_methods{"*"}, allowed_headers{"*"};
  bool allow_credentials = false;
  // --responses-store MIB: memory for stored Responses (previous_response_id, GET /v1/responses/{id}, background
  // runs; response_store.h); 0 = none, every response as if store: false.
  int64_t responses_store_mib = 256;
  // --metrics-prefix NAME: /metrics names start with NAME: (default deltaserve; vllm for vLLM's dashboards).
  std::string metrics_prefix = "deltaserve";
  // vLLM's --enable-force-include-usage: every stream ends with a usage chunk, as if stream_options.include_usage.
  bool force_include_usage = false;
};

// vLLM's default sampling parameters from a generation config (--generation-config's file, --override-generation-config):
// the keys taken, and a check of one: throws ds::Error "WHAT: unknown parameter 'K' (expected ...)" or "WHAT: 'K' must
// be an integer / a number, got V".
inline constexpr const char* kSamplingDefaultKeys[] = {"temperature", "top_p", "top_k", "min_p", "repetition_penalty"};
void check_sampling_default(const std::string& what, const std::string& key, const nlohmann::json& value);

// Starts listening, loads the model in the background (/health answers 503 until ready), serves until
// SIGTERM/SIGINT, drains, returns the process exit code.
int serve(const ServerConfig& cfg);

}  // namespace ds::server
