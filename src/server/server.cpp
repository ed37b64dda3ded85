#include "server/server.h"

#include <httplib.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <thread>

#include "backend/ops.h"
#include "core/env.h"
#include "core/file.h"
#include "core/status.h"
#include "model/model.h"
#include "runtime/cache.h"
#include "runtime/engine.h"
#include "server/anthropic.h"
#include "server/cors.h"
#include "server/media.h"
#include "runtime/spec_decode.h"
#include "server/metrics.h"
#include "server/openai.h"
#include "server/output.h"
#include "server/response_store.h"
#include "server/responses.h"
#include "server/tokenize_api.h"
#include "text/chat_template.h"
#include "text/reasoning_parser.h"
#include "text/tokenizer.h"

namespace ds::server {

namespace {

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

std::atomic<bool> g_stop_signal{false};
// When the HTTP request this thread is handling arrived (the access log's duration; a request is handled and its
// response written on one pool thread).
thread_local Clock::time_point t_request_start;
void on_signal(int) { g_stop_signal = true; }

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// JSON text for the wire. Strings from requests may hold invalid UTF-8 (echoed in error messages):
// replace it instead of throwing.
template <typename J>
std::string wire(const J& j) {
  return j.dump(-1, ' ', false, J::error_handler_t::replace);
}

int64_t unix_time() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// The loaded model and everything around it. Immutable after loading, except the engine's own state.
struct Runtime {
  std::unique_ptr<Backend> be;
  std::unique_ptr<model::Model> model;
  std::unique_ptr<runtime::Engine> engine;
  std::unique_ptr<text::Tokenizer> tok;
  std::unique_ptr<ChatTemplate> tmpl;
  sampling::SamplingParams defaults;
  int64_t max_model_len = 0;
  int32_t think_end_id = -1;
  int32_t im_start_id = -1;  // <|im_start|>: where chat messages start (prefix-cache hints)
  // Structured output's view of the vocabulary (sampling::TokenMasker), built by the first request that needs it.
  // Added tokens (<think>, <tool_call>, <|im_end|>, ...) never spell constrained text: they stay empty, as do ids the
  // tokenizer does not assign; the end of the output is the sampler's end ids. spell_added (structural tags): added
  // tokens that are not special spell their text, as in xgrammar's vocabulary.
  std::shared_ptr<const sampling::TokenMasker> masker(bool spell_added = false) {
    std::call_once(masker_once[spell_added], [&] {
      std::vector<std::string> bytes(size_t(tok->model_vocab_size()));
      for (int32_t id = 0; id < tok->vocab_size(); ++id)
        if (!tok->is_added(id) || (spell_added && !tok->is_special(id)))
          bytes[size_t(id)] = std::string(tok->token_bytes(id));
      masker_[spell_added] = std::make_shared<const sampling::TokenMasker>(std::move(bytes));
    });
    return masker_[spell_added];
  }
  std::once_flag masker_once[2];
  std::shared_ptr<const sampling::TokenMasker> masker_[2];
  int32_t image_token = -1;          // <|image_pad|> when the model has a vision tower
  int32_t video_token = -1;          // <|video_pad|> when the model has a vision tower and video ids
  vision::PreprocessConfig preprocess;
  vision::VideoConfig video;
};

struct ServerState {
  ServerConfig cfg;
  std::string model_name;                // what responses say (the first served name)
  std::vector<std::string> model_names;  // every name a request may give (model_name first)
  std::atomic<bool> ready{false}, draining{false};
  std::string load_error;
  Runtime rt;
  ServerMetrics metrics;
  std::atomic<uint64_t> next_engine_id{1};
  std::atomic<int64_t> active{0};  // generations in flight (admission control)
  int max_logprobs = 20;           // --max-logprobs (-1: the vocabulary), set at load
};

}  // namespace

void check_sampling_default(const std::string& what, const std::string& key, const nlohmann::json& value) {
  if (std::find(std::begin(kSamplingDefaultKeys), std::end(kSamplingDefaultKeys), key) == std::end(kSamplingDefaultKeys))
    fail(what, ": unknown parameter '", key, "' (expected temperature, top_p, top_k, min_p, repetition_penalty)");
  const bool integer = key == "top_k";
  if (integer ? !value.is_number_integer() : !value.is_number())
    fail(what, ": '", key, "' must be ", integer ? "an integer" : "a number", ", got ", value.dump());
}

namespace {

// On a device backend, sizes the paged KV pool and the DeltaNet slot pool from --gpu-memory-utilization
// (runtime::plan_pools) now that the weights are loaded, and logs the result. The CPU backend keeps the fixed
// sizes (max_num_seqs slots, blocks for max_num_seqs × max_model_len, or --num-gpu-blocks-override).
void size_pools_from_device_memory(const ServerConfig& cfg, model::Model& m, runtime::EngineConfig& ec) {
  int64_t total = 0, used = 0;
  if (!m.backend().device_memory(&total, &used)) return;
  runtime::PoolSizing in;
  in.total = total;
  in.used = used;
  in.utilization = cfg.gpu_memory_utilization;
  // Activations of a max_num_batched_tokens step, the step arena of the recorded decode graphs, cuBLAS and
  // allocator slack: 1 GiB plus 512 KiB per batched token (an estimate; docs/engine.md).
  in.scratch = (int64_t(1) << 30) + ec.max_num_batched_tokens * (int64_t(512) << 10);
  in.block_bytes = m.kv_block_bytes(ec.block_size);
  // With speculative decoding a sequence also holds a snapshot slot and K + 1 rows of DeltaNet input log.
  in.slot_bytes = ec.num_speculative_tokens > 0
                      ? 2 * m.state_slot_bytes() + (ec.num_speculative_tokens + 1) * m.gdn_log_row_bytes()
                      : m.state_slot_bytes();
  in.max_num_seqs = ec.max_num_seqs;
  in.max_model_len = ec.max_model_len;
  in.block_size = ec.block_size;
  in.num_blocks_override = ec.num_blocks;
  // The prefix cache's checkpoint states.
  in.fixed_bytes = runtime::CacheManager::checkpoint_slots(ec.prefix_cache_checkpoints, ec.prefix_cache_host_checkpoints) *
                   m.state_slot_bytes();
  in.checkpoint_blocks = ec.prefix_cache_checkpoints > 0;
  const runtime::PoolPlan p = runtime::plan_pools(in);
  ec.max_num_seqs = p.num_slots;
  ec.num_blocks = p.num_blocks;
  const double gib = 1024.0 * 1024.0 * 1024.0;
  std::fprintf(stderr,
               "deltaserve: device memory %.2f GiB, in use after loading %.2f GiB, utilization %.2f, scratch %.2f GiB: "
               "KV pool %lld blocks x %lld tokens (%.2f GiB, %lld tokens), %lld DeltaNet state slots (%.2f GiB, %s "
               "recurrent state), %lld prefix-cache checkpoints (%.2f GiB)\n",
               double(total) / gib, double(used) / gib, cfg.gpu_memory_utilization, double(in.scratch) / gib,
               (long long)p.num_blocks, (long long)ec.block_size, double(p.num_blocks * in.block_bytes) / gib,
               (long long)(p.num_blocks * ec.block_size), (long long)p.num_slots,
               double(p.num_slots * in.slot_bytes) / gib, m.ssm_state_dtype() == DType::BF16 ? "bf16" : "fp32",
               (long long)ec.prefix_cache_checkpoints, double(in.fixed_bytes) / gib);
}

void load_runtime(ServerState& st) {
  const auto& cfg = st.cfg;
  Runtime& rt = st.rt;
  rt.be = make_backend(cfg.backend);
  model::LoadOptions lo;
  lo.ssm_state_dtype = cfg.ssm_state_dtype;
  lo.vision = !cfg.language_model_only;
  if (cfg.num_speculative_tokens > 0 && (cfg.draft_vocab_size > 0 || !cfg.draft_vocab_file.empty()))
    lo.draft_vocab = runtime::draft_vocab_ids(cfg.draft_vocab_size, cfg.draft_vocab_file,
                                              io::load_model_config(cfg.model_dir).text.vocab_size);
  rt.model = model::Model::load(cfg.model_dir, *rt.be, nullptr, lo);
  const auto& mc = rt.model->config();
  st.max_logprobs = int(cfg.max_logprobs < 0 || cfg.max_logprobs > mc.text.vocab_size ? mc.text.vocab_size : cfg.max_logprobs);
  rt.tok = std::make_unique<text::Tokenizer>(text::Tokenizer::load(cfg.model_dir));
  rt.tok->set_model_vocab_size(int32_t(mc.text.vocab_size));
  if (cfg.chat_template_path.empty()) {
    // A model without a chat template still serves /v1/completions; chat requests get a clear 400.
    try {
      rt.tmpl = std::make_unique<ChatTemplate>(ChatTemplate::load(cfg.model_dir));
    } catch (const Error& e) {
      std::fprintf(stderr, "deltaserve: warning: %s; /v1/chat/completions will answer 400 (pass --chat-template)\n",
                   e.what());
    }
  } else {
    std::string src = read_file(cfg.chat_template_path, "--chat-template file");
    rt.tmpl = std::make_unique<ChatTemplate>(ChatTemplate::from_source(src));
  }
  if (auto id = rt.tok->token_id("</think>")) rt.think_end_id = *id;
  if (auto id = rt.tok->token_id("<|im_start|>")) rt.im_start_id = *id;
  if (rt.model->has_vision() && mc.image_token_id >= 0) {
    rt.image_token = int32_t(mc.image_token_id);
    rt.preprocess = vision::load_preprocess_config(cfg.model_dir);
    if (rt.preprocess.merge_size != mc.vision.spatial_merge_size || rt.preprocess.patch_size != mc.vision.patch_size ||
        rt.preprocess.temporal_patch_size != mc.vision.temporal_patch_size)
      fail(cfg.model_dir, ": preprocessor_config.json (patch ", rt.preprocess.patch_size, ", temporal ",
           rt.preprocess.temporal_patch_size, ", merge ", rt.preprocess.merge_size, ") disagrees with vision_config");
    if (mc.video_token_id >= 0 && mc.vision_start_token_id >= 0 && mc.vision_end_token_id >= 0) {
      rt.video_token = int32_t(mc.video_token_id);
      rt.video = vision::load_video_config(cfg.model_dir);
      const auto& v = rt.video.p;
      if (v.merge_size != mc.vision.spatial_merge_size || v.patch_size != mc.vision.patch_size ||
          v.temporal_patch_size != mc.vision.temporal_patch_size)
        fail(cfg.model_dir, ": video_preprocessor_config.json (patch ", v.patch_size, ", temporal ",
             v.temporal_patch_size, ", merge ", v.merge_size, ") disagrees with vision_config");
    }
  }
  apply_mm_processor_kwargs(cfg.mm_processor_kwargs, rt.preprocess, rt.video, "--mm-processor-kwargs");
  // EOS set: config, generation_config and the chat end-of-turn tokens (model-spec §6: stop on both).
  std::vector<int32_t> eos;
  for (auto e : mc.text.eos_token_ids) eos.push_back(int32_t(e));
  auto read_json = [](const fs::path& p) {
    std::ifstream f(p);
    return nlohmann::json::parse(f, nullptr, false);
  };
  const fs::path gen = fs::path(cfg.model_dir) / "generation_config.json";
  if (fs::exists(gen)) {
    auto j = read_json(gen);
    if (j.is_object() && j.contains("eos_token_id")) {
      if (j["eos_token_id"].is_number_integer()) eos.push_back(j["eos_token_id"].get<int32_t>());
      else if (j["eos_token_id"].is_array())
        for (auto& x : j["eos_token_id"])
          if (x.is_number_integer()) eos.push_back(x.get<int32_t>());
    }
  }
  // Default sampling parameters (vLLM's --generation-config / --override-generation-config).
  nlohmann::json sampling = nlohmann::json::object();
  if (cfg.generation_config != "vllm") {
    const fs::path from = cfg.generation_config == "auto" ? gen : fs::path(cfg.generation_config) / "generation_config.json";
    if (cfg.generation_config != "auto" && !fs::exists(from))
      fail("--generation-config: ", from.string(), " does not exist (expected auto, vllm or a folder holding one)");
    if (fs::exists(from)) {
      auto j = read_json(from);
      if (!j.is_object()) fail(from.string(), ": expected a JSON object");
      if (j.value("do_sample", true))  // greedy checkpoints keep the server's defaults, as vLLM does
        for (const char* k : kSamplingDefaultKeys)
          if (j.contains(k)) {
            check_sampling_default(from.string(), k, j[k]);
            sampling[k] = j[k];
          }
    }
  }
  for (auto& [k, v] : cfg.override_generation_config.items()) {
    check_sampling_default("--override-generation-config", k, v);
    sampling[k] = v;
  }
  for (auto& [k, v] : sampling.items()) {
    if (k == "temperature") rt.defaults.temperature = v.get<float>();
    if (k == "top_p") rt.defaults.top_p = v.get<float>();
    if (k == "top_k") rt.defaults.top_k = v.get<int32_t>();
    if (k == "min_p") rt.defaults.min_p = v.get<float>();
    if (k == "repetition_penalty") rt.defaults.repetition_penalty = v.get<float>();
  }
  if (!sampling.empty())
    std::fprintf(stderr, "deltaserve: default sampling parameters (generation config): %s\n", sampling.dump().c_str());
  for (const char* t : {"<|im_end|>", "<|endoftext|>"})
    if (auto id = rt.tok->token_id(t)) eos.push_back(*id);
  std::sort(eos.begin(), eos.end());
  eos.erase(std::unique(eos.begin(), eos.end()), eos.end());

  rt.max_model_len = cfg.max_model_len > 0 ? cfg.max_model_len
                                           : std::min<int64_t>(mc.text.max_position_embeddings,
                                                               cfg.backend == "cpu" ? 8192 : 32768);
  runtime::EngineConfig ec;
  ec.max_num_seqs = cfg.max_num_seqs;
  ec.max_num_batched_tokens = cfg.max_num_batched_tokens;
  ec.max_model_len = rt.max_model_len;
  ec.block_size = cfg.block_size;
  ec.num_blocks = cfg.num_kv_blocks;
  ec.eos_token_ids = eos;
  // Like the reference, ids the tokenizer does not assign stay samplable (they decode to nothing).
  ec.vocab_limit = mc.text.vocab_size;
  ec.num_speculative_tokens = cfg.num_speculative_tokens;
  ec.step_graphs = !cfg.enforce_eager;
  ec.prefix_cache_checkpoints = cfg.enable_prefix_caching ? cfg.prefix_cache_checkpoints : 0;
  ec.prefix_cache_interval = cfg.prefix_cache_interval;
  const int64_t slot_bytes = rt.model->state_slot_bytes();
  ec.prefix_cache_host_checkpoints =
      ec.prefix_cache_checkpoints > 0 && slot_bytes > 0
          ? std::min<int64_t>(runtime::kMaxHostCheckpoints, (cfg.cache_ram_mib << 20) / slot_bytes)
          : 0;
  if (ec.prefix_cache_host_checkpoints > 0)
    std::fprintf(stderr,
                 "deltaserve: prefix cache: up to %lld checkpoints in host memory (--cache-ram %lld MiB, %.1f MiB "
                 "each, taken as needed)\n",
                 (long long)ec.prefix_cache_host_checkpoints, (long long)cfg.cache_ram_mib,
                 double(slot_bytes) / (1 << 20));
  size_pools_from_device_memory(cfg, *rt.model, ec);
  ec.draft_vocab_size = int64_t(lo.draft_vocab.size());
  rt.engine = std::make_unique<runtime::Engine>(*rt.model, ec);
  rt.engine->start();
}

// ---------------------------------------------------------------------------------------------------
// One HTTP request's generation: its choices (prompts × n), each an engine request plus its output state.

struct Choice {
  int index = 0;
  std::shared_ptr<runtime::Request> req;
  std::unique_ptr<ChoiceOutput> out;
  bool done = false;
  std::string finish_reason;
  json stop_reason;  // vLLM: the stop string or stop_token_ids id that ended it, "repetition_detected", else null
  int64_t prompt_tokens = 0, completion_tokens = 0, cached_tokens = 0;
  runtime::CacheLookup cache_lookup;
  std::vector<int32_t> prompt, tokens;
  std::vector<sampling::TokenLogprob> logprobs;
  std::vector<sampling::TokenLogprob> prompt_logprobs;  // of prompt tokens 1.. (GenSpec::prompt_logprobs)
  int prompt_lp_from = -1;  // >= 0: the choice (same prompt, n > 1) whose prompt_logprobs are this one's too
  bool echoed = false;                                  // streaming echo: the prompt's chunk was sent
  size_t text_offset = 0;                               // streaming completions' logprobs: the next token's offset
  Clock::time_point last_token, first_token;
  bool got_first = false;
  double prefill_seconds = -1;  // the engine's, with the first token (metrics)
  std::string prompt_text;  // for echo
};

struct ChoiceUpdate {
  int index;
  OutputEvent ev;
  std::vector<int32_t> tokens;
  std::vector<sampling::TokenLogprob> logprobs;
  std::string finish_reason;  // set when this choice finished
  json stop_reason;           // with finish_reason
};

// Prefix-cache hints of a rendered chat prompt (runtime::Request::cache_hints): where its second message starts (a
// system prompt, often long and shared by every request of an agent) and where its last message before the
// generation prompt starts (the conversation so far, which the next turn repeats).
std::vector<int64_t> chat_cache_hints(const std::vector<int32_t>& prompt, int32_t im_start) {
  std::vector<int64_t> at;
  for (size_t i = 0; i < prompt.size(); ++i)
    if (prompt[i] == im_start) at.push_back(int64_t(i));
  std::vector<int64_t> hints;
  if (at.size() >= 3) hints = {at[1], at[at.size() - 2]};
  return hints;
}

class Generation {
 public:
  Generation(ServerState& st, GenSpec spec) : st_(st), spec_(std::move(spec)) {
    id_ = (spec_.chat ? "chatcmpl-" : "cmpl-") + random_hex(24);
    created_ = unix_time();
  }
  ~Generation() {
    abort_all();
    if (submitted_ && st_.cfg.log_requests) log_finished();
    st_.active.fetch_sub(1);
  }

  const GenSpec& spec() const { return spec_; }
  const std::string& id() const { return id_; }
  int64_t created() const { return created_; }
  std::vector<Choice>& choices() { return choices_; }
  Clock::time_point start() const { return start_; }

  // truncate_prompt_tokens' length (-1: --max-model-len), and whether it cuts prompt p.
  int64_t truncate_length() const {
    return *spec_.truncate_prompt_tokens < 0 ? st_.rt.max_model_len : *spec_.truncate_prompt_tokens;
  }
  bool truncated(const std::vector<int32_t>& p) const {
    return spec_.truncate_prompt_tokens && int64_t(p.size()) > truncate_length();
  }

  // Renders, tokenizes and validates; throws HttpError.
  void prepare() {
    Runtime& rt = st_.rt;
    image_cfg_ = rt.preprocess;
    video_cfg_ = rt.video;
    try {
      apply_mm_processor_kwargs(spec_.mm_processor_kwargs, image_cfg_, video_cfg_, "mm_processor_kwargs");
    } catch (const Error& e) {
      throw bad_request(e.what(), "mm_processor_kwargs");
    }
    std::vector<std::vector<int32_t>> prompts;
    std::vector<std::string> texts;
    ReasoningStart reasoning = ReasoningStart::kDisabled;
    bool tools = false;
    std::string forced;
    if (spec_.chat) {
      nlohmann::ordered_json kwargs = st_.cfg.default_chat_template_kwargs;
      // Top-level enable_thinking / reasoning_effort (none = off) over the server's default, under the request's own
      // chat_template_kwargs (docs/server.md "Request semantics").
      if (spec_.enable_thinking) kwargs["enable_thinking"] = *spec_.enable_thinking;
      for (auto it = spec_.chat_template_kwargs.begin(); it != spec_.chat_template_kwargs.end(); ++it)
        kwargs[it.key()] = it.value();
      tools = spec_.tools.is_array() && !spec_.tools.empty() && spec_.tool_choice != "none";
      std::string text;
      if (!rt.tmpl)
        throw bad_request("this model has no chat template (chat_template.jinja or tokenizer_config.json); start the "
                          "server with --chat-template FILE, or use /v1/completions", "messages");
      try {
        const auto messages = normalize_messages(spec_.messages);
        const auto tool_list = tools ? spec_.tools : nlohmann::ordered_json();
        // continue_final_message: the reply continues the final message (an assistant prefill) instead of opening a
        // new turn.
        text = spec_.continue_final_message ? rt.tmpl->render_continuing(messages, tool_list, kwargs)
                                            : rt.tmpl->render(messages, tool_list, spec_.add_generation_prompt, kwargs);
      } catch (const Error& e) {
        // The template's own raise_exception (e.g. "System message must be at the beginning.") is the
        // client's error; anything else too, since the template is a pure function of the request.
        throw bad_request(std::string("chat template: ") + e.what(), "messages");
      }
      reasoning = reasoning_start_for_prompt(text);
      // tool_choice required / named: start the assistant turn with the call's opening markup.
      if (tools && (spec_.tool_choice == "required" || spec_.tool_choice == "named") && spec_.sampling.grammar)
        throw bad_request("structured output (response_format / structured_outputs) cannot be combined with "
                          "tool_choice " + spec_.tool_choice + ": the reply is a tool call, not constrained text",
                          "tool_choice");
      if (tools && (spec_.tool_choice == "required" || spec_.tool_choice == "named")) {
        if (reasoning == ReasoningStart::kInReasoning) forced = "</think>\n\n";
        forced += "<tool_call>\n<function=";
        if (spec_.tool_choice == "named") forced += spec_.tool_choice_name + ">\n";
        text += forced;
      }
      if (tools) constrain_tool_calls();
      std::vector<PreparedVideo> videos;
      if (!spec_.videos.empty()) {
        videos = load_videos_checked();
        std::vector<std::vector<double>> ts;
        for (auto& v : videos) ts.push_back(v.timestamps);
        try {
          text = vision::expand_video_text(text, ts);  // as the reference processor does, before tokenizing
        } catch (const Error& e) {
          throw bad_request(e.what(), "messages");
        }
      }
      prompts.push_back(rt.tok->encode(text, true));
      texts.push_back(text);
      if ((!spec_.images.empty() || !videos.empty()) && truncated(prompts.back()))
        throw bad_request("'truncate_prompt_tokens' (" + std::to_string(*spec_.truncate_prompt_tokens) +
                              ") would cut a prompt of " + std::to_string(prompts.back().size()) +
                              " tokens that holds images or videos; send a shorter conversation",
                          "truncate_prompt_tokens");
      if (!spec_.images.empty() || !videos.empty()) mm_ = load_images(prompts.back(), videos);
    } else {
      for (auto& t : spec_.prompt_texts) {
        prompts.push_back(rt.tok->encode(t, true));
        texts.push_back(t);
      }
      for (auto& p : spec_.prompt_ids) {
        prompts.push_back(p);
        texts.push_back(spec_.echo ? rt.tok->decode(p) : "");  // echoed as its text (vLLM's)
      }
    }
    // vLLM's truncate_prompt_tokens: the last N tokens of each prompt (the echoed prompt is what was kept).
    for (size_t i = 0; i < prompts.size(); ++i)
      if (truncated(prompts[i])) {
        prompts[i].erase(prompts[i].begin(), prompts[i].end() - truncate_length());
        if (!spec_.chat) texts[i] = rt.tok->decode(prompts[i]);
      }
    const int64_t V = rt.model->config().text.vocab_size;
    for (auto& p : prompts) {
      if (p.empty()) throw bad_request("the prompt is empty after tokenization", spec_.chat ? "messages" : "prompt");
      for (auto t : p)
        if (t >= V)
          throw bad_request("token id " + std::to_string(t) + " is outside the vocabulary [0, " + std::to_string(V) + ")",
                            "prompt");
      const int64_t P = int64_t(p.size());
      const int64_t want = spec_.max_tokens.value_or(1);
      if (P + want > rt.max_model_len)
        throw bad_request("This model's maximum context length is " + std::to_string(rt.max_model_len) +
                              " tokens. However, you requested " + std::to_string(P + want) + " tokens (" +
                              std::to_string(P) + " in the " + (spec_.chat ? "messages" : "prompt") + ", " +
                              std::to_string(want) + " in the completion). Please reduce the length.",
                          spec_.chat ? "messages" : "prompt");
    }
    for (auto t : spec_.stop_token_ids)
      if (t >= V) throw bad_request("stop_token_ids: id " + std::to_string(t) + " is outside the vocabulary", "stop_token_ids");
    // bad_words as vLLM forms them: each word (leading whitespace stripped) tokenized as it is and after a space.
    for (const std::string& w : spec_.bad_words) {
      const std::string word = w.substr(std::min(w.find_first_not_of(" \t\n"), w.size()));
      if (word.empty()) continue;
      for (const std::string& text : {word, " " + word}) {
        std::vector<int32_t> ids = rt.tok->encode(text, false);
        if (!ids.empty() &&
            std::find(spec_.sampling.bad_words.begin(), spec_.sampling.bad_words.end(), ids) == spec_.sampling.bad_words.end())
          spec_.sampling.bad_words.push_back(std::move(ids));
      }
    }
    // The prompt leaves a think block open (and no forced prefix closed it): </think> ends the reasoning, which a
    // thinking budget bounds and after which structured output applies.
    if (reasoning == ReasoningStart::kInReasoning && forced.empty()) spec_.sampling.think_end = rt.think_end_id;
    if (spec_.sampling.grammar) {
      if (reasoning == ReasoningStart::kInReasoning && rt.think_end_id < 0)
        throw bad_request("structured output needs the tokenizer's </think> token when thinking is on", "messages");
      spec_.sampling.masker = rt.masker(spec_.grammar_spells_added);
    }
    int index = 0;
    for (size_t pi = 0; pi < prompts.size(); ++pi)
      for (int k = 0; k < spec_.n; ++k) {
        Choice c;
        c.index = index++;
        c.prompt = prompts[pi];
        c.prompt_text = texts[pi];
        auto r = std::make_shared<runtime::Request>();
        r->id = st_.next_engine_id.fetch_add(1);
        r->prompt = prompts[pi];
        r->sampling = spec_.sampling;
        if (r->sampling.seed && k > 0) r->sampling.seed = *r->sampling.seed + uint64_t(k);
        r->max_tokens = spec_.max_tokens.value_or(rt.max_model_len - int64_t(prompts[pi].size()));
        r->stop_token_ids = spec_.stop_token_ids;
        r->ignore_eos = spec_.ignore_eos;
        r->mm = mm_;
        r->cache_salt = spec_.cache_salt;
        r->priority = spec_.priority;
        // n > 1 without streaming: the prompt's logprobs once, by the prompt's first choice (the others then resume
        // from the prefix-cache checkpoint its prefill leaves, which a prompt owing logprobs cannot). A stream's echo
        // sends each choice's with its first token, so there every choice computes its own.
        const bool shared = spec_.prompt_logprobs >= 0 && k > 0 && !spec_.stream;
        r->prompt_logprobs = shared ? -1 : spec_.prompt_logprobs;
        if (shared) c.prompt_lp_from = c.index - k;
        r->repetition = {spec_.rep_max_pattern, spec_.rep_min_pattern, spec_.rep_min_count};
        if (spec_.chat) r->cache_hints = chat_cache_hints(prompts[pi], rt.im_start_id);
        c.req = r;
        c.out = std::make_unique<ChoiceOutput>(*rt.tok, spec_, reasoning, tools, spec_.tools);
        if (!forced.empty()) c.out->prime(forced);
        c.prompt_tokens = int64_t(prompts[pi].size());
        choices_.push_back(std::move(c));
      }
  }

  // Constrained tool calls (docs/server.md "Constrained tool calls"): tool_choice required / named constrain the call
  // the prompt opens (the whole block: name, parameters, values by the schemas), auto constrains the calls of tools
  // declared "strict": true from each <tool_call> the model writes to its </tool_call>.
  void constrain_tool_calls() {
    const bool forced = spec_.tool_choice == "required" || spec_.tool_choice == "named";
    bool strict = false;
    for (auto& t : spec_.tools) {
      const auto& fn = t["function"];
      strict |= fn.contains("strict") && fn["strict"].is_boolean() && fn["strict"].get<bool>();
    }
    if (!forced && !(spec_.tool_choice == "auto" && strict)) return;
    if (!forced && spec_.sampling.grammar)
      throw bad_request("structured output (response_format / structured_outputs) cannot be combined with tools "
                        "declared \"strict\": true under tool_choice auto: a reply would be constrained text and a "
                        "constrained tool call at once; drop one", "tools");
    if (forced && spec_.ignore_eos)
      throw bad_request("'ignore_eos' cannot be combined with tool_choice " + spec_.tool_choice + " (the output ends "
                        "after the tool call)", "ignore_eos");
    const auto open = st_.rt.tok->token_id("<tool_call>"), close = st_.rt.tok->token_id("</tool_call>");
    if (!open || !close)
      throw bad_request(std::string("constrained tool calls (tool_choice ") + spec_.tool_choice + (forced ? "" : " with strict tools") +
                        ") need the tokenizer's " + (!open ? "<tool_call>" : "</tool_call>") +
                        " token, which this model's tokenizer does not have", forced ? "tool_choice" : "tools");
    auto& sp = spec_.sampling;
    try {
      sp.grammar = sampling::grammar_tool_call(spec_.tools, spec_.tool_choice == "named" ? spec_.tool_choice_name : "",
                                               !forced);
    } catch (const Error& e) {
      throw bad_request(e.what(), "tools");
    }
    sp.grammar_trigger = *open;
    sp.grammar_close = *close;
    sp.grammar_lazy = !forced;
    using AC = sampling::SamplingParams::AfterClose;
    if (spec_.tool_choice == "named") {
      sp.grammar_prefix = "\n<function=" + spec_.tool_choice_name + ">\n";
      sp.after_close = AC::kEnd;
    } else if (forced) {
      sp.grammar_prefix = "\n<function=";
      sp.after_close = spec_.parallel_tool_calls ? AC::kCallOrEnd : AC::kEnd;
    }
  }

  // Images and videos of a chat request: checked against the model and backend, loaded, preprocessed; expands
  // the placeholders of `prompt`. Bad media are 400s naming the content part.
  void check_vision(const char* what, size_t n) {
    Runtime& rt = st_.rt;
    const bool video = std::string(what) == "video";
    if (st_.cfg.language_model_only || !rt.model->has_vision() || rt.image_token < 0 || (video && rt.video_token < 0))
      throw bad_request(std::string(st_.cfg.language_model_only
                                        ? "this server was started with --language-model-only (no vision tower)"
                                        : "this model has no vision tower") +
                            ", so it cannot take " + what + "s (found " + std::to_string(n) + " " + what +
                            " part(s)); send text only", "messages");
  }

  std::vector<PreparedVideo> load_videos_checked() {
    check_vision("video", spec_.videos.size());
    if (!vision::video_decoding_available())
      throw HttpError(501, "this deltaserve was built without FFmpeg (-DDS_WITH_VIDEO=OFF), so it cannot read videos",
                      "messages", "NotImplementedError");
    try {
      return load_videos(spec_.videos, st_.cfg.media, video_cfg_);
    } catch (const Error& e) {
      throw bad_request(e.what(), "messages");
    }
  }

  std::shared_ptr<const runtime::MultiModalInput> load_images(std::vector<int32_t>& prompt,
                                                              const std::vector<PreparedVideo>& videos) {
    Runtime& rt = st_.rt;
    if (!spec_.images.empty()) check_vision("image", spec_.images.size());
    try {
      return prepare_media(spec_.images, videos, st_.cfg.media, image_cfg_, rt.image_token, rt.video_token, prompt);
    } catch (const Error& e) {
      throw bad_request(e.what(), "messages");
    }
  }

  void submit() {
    for (auto& c : choices_) {
      try {
        st_.rt.engine->submit(c.req);
      } catch (const Error& e) {
        throw bad_request(e.what());
      }
    }
    submitted_ = true;
    if (st_.cfg.log_requests) log_received();
  }

  // --enable-log-requests: what was asked (sizes and sampling, not the prompt's text) and how it ended.
  void log_received() const {
    const auto& sp = spec_.sampling;
    std::string max_tokens = spec_.max_tokens ? std::to_string(*spec_.max_tokens) : "rest of the context";
    std::fprintf(stderr,
                 "deltaserve: request %s: %s, %zu choice(s), prompt %lld tokens, max_tokens %s, stream %s, "
                 "temperature %g, top_p %g, top_k %d, min_p %g%s%s\n",
                 id_.c_str(), spec_.chat ? "chat" : "completion", choices_.size(), (long long)prompt_tokens(),
                 max_tokens.c_str(), spec_.stream ? "yes" : "no", double(sp.temperature), double(sp.top_p), int(sp.top_k),
                 double(sp.min_p), sp.grammar ? ", constrained" : "",
                 spec_.tools.is_array() && !spec_.tools.empty() ? ", tools" : "");
  }
  void log_finished() const {
    std::string reasons;
    double ttft = -1;
    for (auto& c : choices_) {
      if (!reasons.empty()) reasons += ",";
      reasons += c.finish_reason.empty() ? "none" : c.finish_reason;
      if (c.got_first) {
        const double t = std::chrono::duration<double>(c.first_token - start_).count();
        ttft = ttft < 0 ? t : std::min(ttft, t);
      }
    }
    // Why the (first) prompt was or was not resumed from a checkpoint: a cache that silently hits nothing is what
    // users of hybrid models meet (serving.md, pain point 7).
    std::string why;
    if (!choices_.empty() && choices_[0].cache_lookup.looked_up) {
      const auto& c = choices_[0];
      if (c.cached_tokens > 0 && c.cache_lookup.from_host) why = " from host memory";
      else if (c.cached_tokens == 0 && c.cache_lookup.shared == 0) why = ": no checkpoint shares its first token";
      else if (c.cached_tokens == 0)
        why = str_cat(": checkpoints share its first ", c.cache_lookup.shared, " tokens, none ends within them");
    }
    std::fprintf(stderr,
                 "deltaserve: finished %s: %s, prompt %lld tokens (%lld cached%s), completion %lld tokens, time to "
                 "first token %.3f s, total %.3f s%s%s\n",
                 id_.c_str(), reasons.c_str(), (long long)prompt_tokens(), (long long)cached_tokens(), why.c_str(),
                 (long long)completion_tokens(), ttft, seconds_since(start_), error_.empty() ? "" : ", error: ",
                 error_.c_str());
  }

  // Collects what arrived within `wait`; returns updates (possibly none).
  std::vector<ChoiceUpdate> poll(std::chrono::milliseconds wait) {
    std::vector<ChoiceUpdate> ups;
    auto deadline = Clock::now() + wait;
    while (ups.empty()) {
      bool any_open = false;
      for (auto& c : choices_) {
        if (c.done) continue;
        any_open = true;
        while (auto d = c.req->out->pop(std::chrono::milliseconds(0))) handle(c, *d, ups);
      }
      if (!any_open || !ups.empty() || Clock::now() >= deadline) break;
      // Wait on the first open choice's channel briefly.
      for (auto& c : choices_)
        if (!c.done) {
          if (auto d = c.req->out->pop(std::chrono::milliseconds(5))) handle(c, *d, ups);
          break;
        }
    }
    return ups;
  }

  bool all_done() const {
    for (auto& c : choices_)
      if (!c.done) return false;
    return true;
  }

  void abort_all() {
    for (auto& c : choices_)
      if (!c.done && c.req) {
        st_.rt.engine->abort(c.req->id);
        c.done = true;
        if (c.finish_reason.empty()) c.finish_reason = "abort";
      }
  }

  int64_t prompt_tokens() const {
    int64_t n = 0;
    for (size_t i = 0; i < choices_.size(); i += size_t(spec_.n)) n += choices_[i].prompt_tokens;
    return n;
  }
  int64_t completion_tokens() const {
    int64_t n = 0;
    for (auto& c : choices_) n += c.completion_tokens;
    return n;
  }
  int64_t cached_tokens() const {  // of each prompt's first choice, as prompt_tokens counts
    int64_t n = 0;
    for (size_t i = 0; i < choices_.size(); i += size_t(spec_.n)) n += choices_[i].cached_tokens;
    return n;
  }

 private:
  // OpenAI clients send assistant tool_calls with JSON-string arguments; Qwen's template iterates
  // arguments as a mapping. Parse them (like vLLM does) and map developer -> system.
  static nlohmann::ordered_json normalize_messages(const nlohmann::ordered_json& msgs) {
    nlohmann::ordered_json out = nlohmann::ordered_json::array();
    for (auto m : msgs) {
      if (m["role"] == "developer") m["role"] = "system";
      if (m.contains("content") && m["content"].is_array()) {
        // Text parts are joined; with images or videos the list stays, their parts reduced to {"type": "image"} /
        // {"type": "video"} (the template emits <|vision_start|><|image_pad|> or <|video_pad|><|vision_end|> for
        // each; the URL is not its business).
        bool images = false;
        for (auto& part : m["content"]) images |= part["type"] == "image_url" || part["type"] == "video_url";
        if (images) {
          nlohmann::ordered_json parts = nlohmann::ordered_json::array();
          for (auto& part : m["content"])
            parts.push_back(part["type"] == "image_url"   ? nlohmann::ordered_json({{"type", "image"}})
                            : part["type"] == "video_url" ? nlohmann::ordered_json({{"type", "video"}})
                                                          : nlohmann::ordered_json({{"type", "text"}, {"text", part["text"]}}));
          m["content"] = parts;
        } else {
          std::string text;
          for (auto& part : m["content"]) text += part["text"].get<std::string>();
          m["content"] = text;
        }
      }
      if (m.contains("reasoning") && !m.contains("reasoning_content")) m["reasoning_content"] = m["reasoning"];
      if (m.contains("tool_calls") && m["tool_calls"].is_array())
        for (auto& tc : m["tool_calls"])
          if (tc.contains("function") && tc["function"].contains("arguments") && tc["function"]["arguments"].is_string()) {
            auto parsed = nlohmann::ordered_json::parse(tc["function"]["arguments"].get<std::string>(), nullptr, false);
            if (!parsed.is_discarded()) tc["function"]["arguments"] = parsed;
          }
      out.push_back(m);
    }
    return out;
  }

  void handle(Choice& c, runtime::Delta& d, std::vector<ChoiceUpdate>& ups) {
    ChoiceUpdate u;
    u.index = c.index;
    if (d.queue_seconds >= 0) {
      st_.metrics.queue.observe(d.queue_seconds);
      st_.metrics.prefill.observe(d.prefill_seconds);
      c.prefill_seconds = d.prefill_seconds;
    }
    if (!d.prompt_logprobs.empty()) c.prompt_logprobs = std::move(d.prompt_logprobs);
    if (!d.tokens.empty()) {
      auto now = Clock::now();
      if (!c.got_first) {
        c.first_token = now;
        st_.metrics.ttft.observe(seconds_since(start_));
        c.got_first = true;
      } else {
        st_.metrics.itl.observe(std::chrono::duration<double>(now - c.last_token).count() / double(d.tokens.size()));
      }
      c.last_token = now;
      c.tokens.insert(c.tokens.end(), d.tokens.begin(), d.tokens.end());
      c.completion_tokens += int64_t(d.tokens.size());
      u.tokens = d.tokens;
      u.logprobs = d.logprobs;
      c.logprobs.insert(c.logprobs.end(), d.logprobs.begin(), d.logprobs.end());
      u.ev = c.out->feed(d.tokens);
      if (c.out->stop_hit()) {
        st_.rt.engine->abort(c.req->id);
        c.done = true;
        c.finish_reason = "stop";
        c.stop_reason = c.out->stop_string();
      }
    }
    // The engine's count includes a final stop token (as vLLM's usage does).
    if (d.completion_tokens > c.completion_tokens) c.completion_tokens = d.completion_tokens;
    c.cached_tokens = d.cached_tokens;
    c.cache_lookup = d.cache_lookup;
    if (!c.done && d.finish != runtime::FinishReason::None) {
      c.done = true;
      switch (d.finish) {
        case runtime::FinishReason::Length: c.finish_reason = "length"; break;
        case runtime::FinishReason::Error: c.finish_reason = "error"; error_ = d.error; break;
        case runtime::FinishReason::Abort: c.finish_reason = "abort"; break;
        case runtime::FinishReason::Repetition:
          c.finish_reason = "repetition";
          c.stop_reason = "repetition_detected";
          break;
        default:
          c.finish_reason = "stop";
          // vLLM: a stop_token_ids id is named; the model's EOS is not.
          if (std::find(spec_.stop_token_ids.begin(), spec_.stop_token_ids.end(), d.stop_token) != spec_.stop_token_ids.end())
            c.stop_reason = d.stop_token;
      }
    }
    if (c.done) {
      OutputEvent tail = c.out->finish();
      u.ev.reasoning += tail.reasoning;
      u.ev.content += tail.content;
      u.ev.tool_calls.insert(u.ev.tool_calls.end(), tail.tool_calls.begin(), tail.tool_calls.end());
      if (spec_.chat && c.finish_reason == "stop" && !c.out->tool_calls().empty()) c.finish_reason = "tool_calls";
      u.finish_reason = c.finish_reason;
      u.stop_reason = c.stop_reason;
      st_.metrics.e2e.observe(seconds_since(start_));
      if (c.prefill_seconds >= 0) {  // it was admitted and sampled (not a request that failed or ended before)
        const double decode = c.got_first ? std::chrono::duration<double>(c.last_token - c.first_token).count() : 0.0;
        st_.metrics.decode.observe(decode);
        st_.metrics.inference.observe(c.prefill_seconds + decode);
        st_.metrics.prompt_tokens.observe(double(c.prompt_tokens));
        st_.metrics.generation_tokens.observe(double(c.completion_tokens));
      }
    }
    if (!u.tokens.empty() || !u.finish_reason.empty() || !u.ev.empty()) ups.push_back(std::move(u));
  }

 public:
  std::string error_;

 private:
  ServerState& st_;
  GenSpec spec_;
  std::string id_;
  int64_t created_ = 0;
  Clock::time_point start_ = Clock::now();
  bool submitted_ = false;
  std::vector<Choice> choices_;
  std::shared_ptr<const runtime::MultiModalInput> mm_;  // images of the chat prompt (shared by its n choices)
  // The model's image / video preprocessing with --mm-processor-kwargs and the request's mm_processor_kwargs applied.
  vision::PreprocessConfig image_cfg_;
  vision::VideoConfig video_cfg_;
};

// ---------------------------------------------------------------------------------------------------
// Response JSON.

std::string token_text(const text::Tokenizer& tok, int32_t id) {
  std::string b(tok.token_bytes(id));
  // Partial UTF-8 sequences are shown with replacement characters (the bytes field keeps them exact).
  std::string out;
  size_t i = 0;
  while (i < b.size()) {
    unsigned char c = static_cast<unsigned char>(b[i]);
    int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    bool ok = len > 0 && i + size_t(len) <= b.size();
    for (int k = 1; ok && k < len; ++k) ok = (static_cast<unsigned char>(b[i + k]) & 0xC0) == 0x80;
    if (ok) {
      out.append(b, i, size_t(len));
      i += size_t(len);
    } else {
      out += "\xEF\xBF\xBD";
      ++i;
    }
  }
  return out;
}

json bytes_json(const std::string& s) {
  json a = json::array();
  for (unsigned char c : s) a.push_back(int(c));
  return a;
}

// How logprobs name tokens: their text, or "token_id:N" (vLLM's return_tokens_as_token_ids: RL and evaluation
// clients that must not re-tokenize).
struct TokenNames {
  const text::Tokenizer& tok;
  bool ids = false;
  std::string operator()(int32_t id) const { return ids ? "token_id:" + std::to_string(id) : token_text(tok, id); }
};

json chat_logprobs(const TokenNames& name, const std::vector<int32_t>& tokens,
                   const std::vector<sampling::TokenLogprob>& lps) {
  json content = json::array();
  for (size_t i = 0; i < lps.size() && i < tokens.size(); ++i) {
    json top = json::array();
    for (auto& [t, lp] : lps[i].top)
      top.push_back({{"token", name(t)}, {"logprob", lp}, {"bytes", bytes_json(std::string(name.tok.token_bytes(t)))}});
    content.push_back({{"token", name(tokens[i])},
                       {"logprob", lps[i].logprob},
                       {"bytes", bytes_json(std::string(name.tok.token_bytes(tokens[i])))},
                       {"top_logprobs", top}});
  }
  return {{"content", content}};
}

// Characters (code points) of valid UTF-8 text: its bytes that do not continue a sequence.
size_t code_points(const std::string& s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

// `text_offset`: the first token's offset, advanced past the last (offsets count the characters of the tokens' texts,
// as vLLM's len(token) does).
json completion_logprobs(const TokenNames& name, const std::vector<int32_t>& tokens,
                         const std::vector<sampling::TokenLogprob>& lps, size_t& text_offset) {
  json toks = json::array(), tlps = json::array(), tops = json::array(), offs = json::array();
  for (size_t i = 0; i < lps.size() && i < tokens.size(); ++i) {
    std::string t = name(tokens[i]);
    toks.push_back(t);
    tlps.push_back(lps[i].logprob);
    json top = json::object();
    for (auto& [id, lp] : lps[i].top) top[name(id)] = lp;
    tops.push_back(top);
    offs.push_back(text_offset);
    text_offset += code_points(t);
  }
  return {{"tokens", toks}, {"token_logprobs", tlps}, {"top_logprobs", tops}, {"text_offset", offs}};
}

// A logprob as the wire carries it: -inf (no JSON number) as vLLM's -9999.0.
double wire_logprob(float lp) { return std::max(double(lp), -9999.0); }

// vLLM's prompt_logprobs: null for the first prompt token, then per token {"<id>": {"logprob", "rank",
// "decoded_token"}} for the prompt token itself (its rank among all ids) and its top alternatives (ranks 1..k).
json prompt_logprobs_json(const TokenNames& name, const std::vector<sampling::TokenLogprob>& lps) {
  json a = json::array();
  a.push_back(nullptr);
  for (const auto& t : lps) {
    json e = json::object();
    e[std::to_string(t.token)] = {{"logprob", wire_logprob(t.logprob)}, {"rank", t.rank}, {"decoded_token", name(t.token)}};
    for (size_t q = 0; q < t.top.size(); ++q) {
      const std::string id = std::to_string(t.top[q].first);
      if (!e.contains(id))
        e[id] = {{"logprob", wire_logprob(t.top[q].second)}, {"rank", int(q) + 1}, {"decoded_token", name(t.top[q].first)}};
    }
    a.push_back(e);
  }
  return a;
}

// The completions API's logprobs of an echoed prompt (its first token without a logprob: null entries), offsets from 0.
json echo_logprobs(const TokenNames& name, const std::vector<int32_t>& prompt,
                   const std::vector<sampling::TokenLogprob>& lps, size_t& text_offset) {
  json toks = json::array(), tlps = json::array(), tops = json::array(), offs = json::array();
  for (size_t i = 0; i < prompt.size(); ++i) {
    std::string t = name(prompt[i]);
    toks.push_back(t);
    offs.push_back(text_offset);
    text_offset += code_points(t);
    if (i == 0 || i - 1 >= lps.size()) {
      tlps.push_back(nullptr);
      tops.push_back(nullptr);
      continue;
    }
    tlps.push_back(wire_logprob(lps[i - 1].logprob));
    json top = json::object();
    for (auto& [id, lp] : lps[i - 1].top) top[name(id)] = wire_logprob(lp);
    tops.push_back(top);
  }
  return {{"tokens", toks}, {"token_logprobs", tlps}, {"top_logprobs", tops}, {"text_offset", offs}};
}

// a's arrays followed by b's (echo: the prompt's logprobs, then the generated tokens').
json concat_logprobs(json a, const json& b) {
  for (const char* k : {"tokens", "token_logprobs", "top_logprobs", "text_offset"})
    for (auto& x : b[k]) a[k].push_back(x);
  return a;
}

json tool_call_deltas(const std::vector<ToolCallDelta>& tcs) {
  json a = json::array();
  for (auto& t : tcs) {
    json d = {{"index", t.index}};
    json fn = json::object();
    if (!t.id.empty()) {
      d["id"] = t.id;
      d["type"] = "function";
      fn["name"] = t.name;
    }
    fn["arguments"] = t.arguments;
    d["function"] = fn;
    a.push_back(d);
  }
  return a;
}

json usage_json(const Generation& g) {
  int64_t p = g.prompt_tokens(), c = g.completion_tokens();
  return {{"prompt_tokens", p},
          {"completion_tokens", c},
          {"total_tokens", p + c},
          {"prompt_tokens_details", {{"cached_tokens", g.cached_tokens()}}}};
}

// ---------------------------------------------------------------------------------------------------

}  // namespace

// A background response's run (docs/server.md "Stored responses and background runs"): a thread of its own drives
// the generation (no client holds it), and every event it produced stays here, as its SSE text, for the streams that
// follow it (the creating request's, GET /v1/responses/{id}?stream=true&starting_after=N); `cancel` is honoured at
// the next poll.
struct ResponseRun {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::string> events;  // ResponsesOutput::sse of each event, in order
  int64_t event_bytes = 0;
  bool done = false;  // the last event is in
  std::atomic<bool> cancel{false};

  void push(const std::vector<json>& evs) {
    {
      std::lock_guard<std::mutex> lock(mu);
      for (auto& e : evs) {
        events.push_back(ResponsesOutput::sse(e));
        event_bytes += int64_t(events.back().size());
      }
    }
    cv.notify_all();
  }
  // The last events (already SSE text), and the end.
  void end(std::vector<std::string> last) {
    {
      std::lock_guard<std::mutex> lock(mu);
      for (auto& e : last) {
        event_bytes += int64_t(e.size());
        events.push_back(std::move(e));
      }
      done = true;
    }
    cv.notify_all();
  }
  bool ended() {
    std::lock_guard<std::mutex> lock(mu);
    return done;
  }
  int64_t bytes() {
    std::lock_guard<std::mutex> lock(mu);
    return event_bytes;
  }
  // The events from index `from` on, waiting up to `wait` for one; `finished`: nothing will come after them.
  std::vector<std::string> from(size_t from, std::chrono::milliseconds wait, bool& finished) {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait_for(lock, wait, [&] { return done || events.size() > from; });
    finished = done;
    return from < events.size() ? std::vector<std::string>(events.begin() + std::ptrdiff_t(from), events.end())
                                : std::vector<std::string>();
  }
  bool wait_done(std::chrono::milliseconds wait) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, wait, [&] { return done; });
  }
};

namespace {

class HttpServer {
 public:
  explicit HttpServer(ServerState& st)
      : st_(st),
        cors_(st.cfg.allowed_origins, st.cfg.allowed_methods, st.cfg.allowed_headers, st.cfg.allow_credentials) {
    if (st.cfg.responses_store_mib > 0) store_ = std::make_unique<ResponseStore>(st.cfg.responses_store_mib << 20);
  }

  // At shutdown, after the drain: background responses still running are cancelled and their threads joined, before
  // the engine stops.
  void stop_background() {
    std::vector<Background> all;
    {
      std::lock_guard<std::mutex> lock(bg_mu_);
      all.swap(bg_);
    }
    for (auto& b : all) b.run->cancel = true;
    for (auto& b : all) b.thread.join();
  }

  void install() {
    svr_.new_task_queue = [] { return new httplib::ThreadPool(96); };
    svr_.set_payload_max_length(st_.cfg.max_body_bytes);
    svr_.set_read_timeout(60, 0);
    svr_.set_write_timeout(60, 0);
    svr_.set_keep_alive_max_count(1000);
    svr_.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
      st_.metrics.http_requests_total++;
      t_request_start = Clock::now();
      // A CORS preflight is answered before routing and authentication (browsers send no credentials on it).
      if (req.method == "OPTIONS" && req.has_header("Origin") && req.has_header("Access-Control-Request-Method")) {
        const CorsPolicy::Preflight p = cors_.preflight(req.get_header_value("Origin"),
                                                        req.get_header_value("Access-Control-Request-Method"),
                                                        req.get_header_value("Access-Control-Request-Headers"));
        res.status = p.status;
        for (auto& [k, v] : p.headers) res.set_header(k, v);
        res.set_content(p.body, "text/plain; charset=utf-8");
        return httplib::Server::HandlerResponse::Handled;
      }
      if (!st_.cfg.api_keys.empty() && req.path.rfind("/v1/", 0) == 0) {
        const auto& keys = st_.cfg.api_keys;
        auto is_key = [&](const std::string& k) { return std::find(keys.begin(), keys.end(), k) != keys.end(); };
        const std::string auth = req.get_header_value("Authorization");
        const bool bearer = auth.rfind("Bearer ", 0) == 0 && is_key(auth.substr(7));
        // Anthropic's clients send x-api-key (Anthropic's error shape on its routes).
        const bool anthropic = is_anthropic(req);
        if (anthropic && !bearer && !is_key(req.get_header_value("x-api-key"))) {
          send_anthropic_error(res, 401, "invalid or missing API key: send 'x-api-key: <key>' or 'Authorization: Bearer <key>'");
          return httplib::Server::HandlerResponse::Handled;
        }
        if (!anthropic && !bearer) {
          send_error(res, HttpError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", "",
                                    "AuthenticationError"));
          return httplib::Server::HandlerResponse::Handled;
        }
      }
      return httplib::Server::HandlerResponse::Unhandled;
    });
    // CORS headers on every response to a request from another origin (errors and streams included: httplib calls
    // this before it writes the status line), except preflights, which carry their own.
    svr_.set_post_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
      if (!req.has_header("Origin") || res.has_header("Access-Control-Allow-Methods")) return;
      for (auto& [k, v] : cors_.response_headers(req.get_header_value("Origin"), req.has_header("Cookie")))
        res.set_header(k, v);
    });
    // The access log (uvicorn's, which vLLM prints): one line per request once its response is written (a stream:
    // when it ends). Health probes and metric scrapes that succeed are left out (one every few seconds).
    if (st_.cfg.access_log)
      svr_.set_logger([](const httplib::Request& req, const httplib::Response& res) {
        if ((req.path == "/health" || req.path == "/ping" || req.path == "/metrics") && res.status < 400) return;
        std::fprintf(stderr, "deltaserve: %s:%d \"%s %s %s\" %d %.3f s\n", req.remote_addr.c_str(), req.remote_port,
                     req.method.c_str(), req.path.c_str(), req.version.c_str(), res.status, seconds_since(t_request_start));
      });
    svr_.set_error_handler([this](const httplib::Request& req, httplib::Response& res) {
      if (!res.body.empty()) return;
      if (is_anthropic(req))
        return send_anthropic_error(res, res.status,
                                    res.status == 404   ? "no route for " + req.method + " " + req.path
                                    : res.status == 413 ? "request body exceeds " + std::to_string(st_.cfg.max_body_bytes) + " bytes"
                                                        : "request failed with HTTP " + std::to_string(res.status));
      if (res.status == 404) send_error(res, HttpError(404, "no route for " + req.method + " " + req.path, "", "NotFoundError"));
      else if (res.status == 413)
        send_error(res, HttpError(413, "request body exceeds " + std::to_string(st_.cfg.max_body_bytes) + " bytes"));
      else if (res.status >= 400) send_error(res, HttpError(res.status, "request failed with HTTP " + std::to_string(res.status)));
    });
    svr_.set_exception_handler([this](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
      try {
        std::rethrow_exception(ep);
      } catch (const HttpError& e) {
        send_error(res, e);
      } catch (const std::exception& e) {
        send_error(res, HttpError(500, std::string("internal error: ") + e.what()));
      } catch (...) {
        send_error(res, HttpError(500, "internal error"));
      }
    });

    const auto health = [this](const httplib::Request&, httplib::Response& res) {
      if (st_.ready && !st_.draining) return res.set_content(R"({"status":"ok"})", "application/json");
      res.status = 503;
      retry_after(res);
      json j = {{"status", st_.draining ? "draining" : st_.load_error.empty() ? "loading" : "error"}};
      if (!st_.load_error.empty()) j["error"] = st_.load_error;
      res.set_content(wire(j), "application/json");
    };
    svr_.Get("/health", health);
    svr_.Get("/ping", health);  // vLLM's (SageMaker's) liveness route, GET and POST
    svr_.Post("/ping", health);
    svr_.Get("/version", [](const httplib::Request&, httplib::Response& res) {
      res.set_content(R"({"version":"0.1.0"})", "application/json");
    });
    svr_.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      runtime::EngineMetrics em;
      if (st_.ready) em = st_.rt.engine->metrics();
      if (store_) {
        st_.metrics.responses_stored = int64_t(store_->size());
        st_.metrics.responses_store_bytes = store_->bytes();
      }
      res.set_content(st_.metrics.render(em, st_.model_name, st_.cfg.metrics_prefix), "text/plain; version=0.0.4");
    });
    const auto model_json = [this](const std::string& id) {
      return json({{"id", id}, {"object", "model"}, {"created", unix_time()}, {"owned_by", "deltaserve"},
                   {"root", st_.cfg.model_dir}, {"max_model_len", st_.rt.max_model_len}});
    };
    // One entry per served name (vLLM's), the first being the one responses report.
    svr_.Get("/v1/models", [this, model_json](const httplib::Request&, httplib::Response& res) {
      json data = json::array();
      for (auto& n : st_.model_names) data.push_back(model_json(n));
      res.set_content(wire(json({{"object", "list"}, {"data", data}})), "application/json");
    });
    // OpenAI's retrieve-model route (client.models.retrieve).
    svr_.Get(R"(/v1/models/(.+))", [this, model_json](const httplib::Request& req, httplib::Response& res) {
      const std::string id = req.matches[1];
      if (!serves(id))
        return send_error(res, HttpError(404, "The model '" + id + "' does not exist", "model", "NotFoundError"));
      res.set_content(wire(model_json(id)), "application/json");
    });
    svr_.Post("/v1/responses", [this](const httplib::Request& req, httplib::Response& res) { responses(req, res); });
    svr_.Post("/v1/responses/input_tokens",
              [this](const httplib::Request& req, httplib::Response& res) { responses_input_tokens(req, res); });
    svr_.Get(R"(/v1/responses/([^/]+))", [this](const httplib::Request& req, httplib::Response& res) {
      response_get(req, res);
    });
    svr_.Delete(R"(/v1/responses/([^/]+))", [this](const httplib::Request& req, httplib::Response& res) {
      const std::string id = req.matches[1];
      ResponseStore::Found f = stored(id);
      if (f.run && f.running) cancel_run(*f.run);
      store_->erase(id);
      res.set_content(wire(json({{"id", id}, {"object", "response.deleted"}, {"deleted", true}})), "application/json");
    });
    svr_.Post(R"(/v1/responses/([^/]+)/cancel)", [this](const httplib::Request& req, httplib::Response& res) {
      const std::string id = req.matches[1];
      ResponseStore::Found f = stored(id);
      if (!f.run) throw HttpError(400, "only background responses can be cancelled; '" + id + "' was not", "response_id");
      if (f.running) cancel_run(*f.run);
      res.set_content(wire(stored(id).response), "application/json");
    });
    svr_.Get(R"(/v1/responses/([^/]+)/input_items)", [this](const httplib::Request& req, httplib::Response& res) {
      input_items(req, res);
    });
    svr_.Post("/tokenize", [this](const httplib::Request& req, httplib::Response& res) { tokenize(req, res); });
    svr_.Post("/detokenize", [this](const httplib::Request& req, httplib::Response& res) { detokenize(req, res); });
    svr_.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) { generate(req, res, false); });
    svr_.Post("/v1/chat/completions",
              [this](const httplib::Request& req, httplib::Response& res) { generate(req, res, true); });
    svr_.Post("/v1/messages", [this](const httplib::Request& req, httplib::Response& res) { messages(req, res, false); });
    svr_.Post("/v1/messages/count_tokens",
              [this](const httplib::Request& req, httplib::Response& res) { messages(req, res, true); });
  }

  bool listen(const std::string& host, int port) { return svr_.listen(host, port); }
  bool bind(const std::string& host, int port) { return svr_.bind_to_port(host, port); }
  bool listen_after_bind() { return svr_.listen_after_bind(); }
  void stop() { svr_.stop(); }

 private:
  void send_error(httplib::Response& res, const HttpError& e) {
    if (e.status >= 400 && e.status < 500) st_.metrics.client_errors_total++;
    res.status = e.status;
    retry_after(res);
    res.set_content(wire(e.body()), "application/json");
  }

  // Retry-After on the refusals a client should retry (the SDKs honour it): admission control's 429 and the 503 while
  // the model loads; not while the server shuts down.
  void retry_after(httplib::Response& res) {
    if (res.status == 429) res.set_header("Retry-After", "1");
    else if (res.status == 503 && !st_.ready && !st_.draining && st_.load_error.empty()) res.set_header("Retry-After", "5");
  }

  void require_ready() {
    if (st_.draining) throw HttpError(503, "the server is shutting down");
    if (!st_.ready)
      throw HttpError(503, st_.load_error.empty() ? "the model is still loading" : "the model failed to load: " + st_.load_error);
  }

  // Admission control: a bounded number of generations in flight (--max-num-seqs + --max-queued-requests), else a
  // 429. Takes a slot of `active`, which the Generation made next gives back.
  void admit() {
    const int64_t limit = st_.cfg.max_num_seqs + st_.cfg.max_queued_requests;
    if (st_.active.fetch_add(1) >= limit) {
      st_.active.fetch_sub(1);
      st_.metrics.rejected_total++;
      throw HttpError(429, "the server is at capacity (" + std::to_string(limit) + " requests in flight); retry later");
    }
  }

  bool serves(const std::string& name) const {
    return std::find(st_.model_names.begin(), st_.model_names.end(), name) != st_.model_names.end();
  }
  std::string served_names() const {
    std::string s;
    for (auto& n : st_.model_names) s += (s.empty() ? "" : "', '") + n;
    return s;
  }

  void check_model(const GenSpec& g) {
    if (!g.model.empty() && !serves(g.model))
      throw HttpError(404, "The model '" + g.model + "' does not exist; this server serves '" + served_names() + "'",
                      "model", "NotFoundError");
  }

  void tokenize(const httplib::Request& req, httplib::Response& res) {
    require_ready();
    json out = tokenize_body(parse_body(req.body), *st_.rt.tok, st_.rt.tmpl.get());
    out["max_model_len"] = st_.rt.max_model_len;
    res.set_content(wire(out), "application/json");
  }

  void detokenize(const httplib::Request& req, httplib::Response& res) {
    require_ready();
    res.set_content(wire(detokenize_body(parse_body(req.body), *st_.rt.tok)), "application/json");
  }

  // A Responses request checked and converted: the chat GenSpec, the echo, the stored conversation it continues.
  struct ResponsesPlan {
    ResponsesRequest rr;
    GenSpec spec;
    std::shared_ptr<const ResponseStore::Node> prev;
    bool store = false, background = false;
  };
  // `body`'s item_reference items are replaced by the stored items they name.
  ResponsesPlan plan_responses(json& body) {
    ResponsesPlan pl;
    if (body.contains("input") && body["input"].is_array())
      for (size_t i = 0; i < body["input"].size(); ++i) {
        json& it = body["input"][i];
        if (str_or(it, "type") != "item_reference") continue;
        const std::string w = "input[" + std::to_string(i) + "]";
        if (!store_)
          throw bad_request(w + ": item_reference needs the response store, which --responses-store 0 turned off; "
                                "send the item itself", "input");
        if (!it.contains("id") || !it["id"].is_string())
          throw bad_request(w + ": an item_reference needs a string 'id', got " + brief(it), "input");
        auto found = store_->find_item(it["id"].get<std::string>());
        if (!found)
          throw bad_request(w + ": item_reference '" + it["id"].get<std::string>() + "' names no stored item " +
                                "(never stored, deleted, or evicted)", "input");
        it = std::move(*found);
      }
    if (body.contains("store") && !body["store"].is_null() && !body["store"].is_boolean())
      throw bad_request("'store' must be a boolean, got " + brief(body["store"]), "store");
    if (body.contains("background") && !body["background"].is_null() && !body["background"].is_boolean())
      throw bad_request("'background' must be a boolean, got " + brief(body["background"]), "background");
    pl.store = store_ && !(body.contains("store") && body["store"] == false);  // null: the default, true
    pl.background = body.contains("background") && body["background"] == true;
    if (pl.background && !pl.store)
      throw bad_request(store_ ? "'background' needs a stored response: 'store' must not be false"
                               : "'background' needs the response store, which --responses-store 0 turned off",
                        "background");
    json history = json::array();
    if (body.contains("previous_response_id") && !body["previous_response_id"].is_null()) {
      const json& p = body["previous_response_id"];
      if (!p.is_string())
        throw bad_request("'previous_response_id' must be a string, got " + brief(p), "previous_response_id");
      if (!store_)
        throw bad_request("'previous_response_id' needs the response store, which --responses-store 0 turned off; "
                          "send the whole conversation in 'input'", "previous_response_id");
      auto f = store_->get(p.get<std::string>());
      if (!f)
        throw bad_request("Previous response with id '" + p.get<std::string>() + "' not found (never stored, deleted, " +
                              "or evicted from the --responses-store budget); send the whole conversation in 'input'",
                          "previous_response_id");
      if (f->running)
        throw bad_request("previous response '" + p.get<std::string>() + "' is still in progress; continue it once it "
                          "has finished", "previous_response_id");
      pl.prev = f->node;
      history = ResponseStore::items(pl.prev.get(), true);
    }
    pl.rr = responses_to_chat(body, history);
    try {
      pl.spec = parse_generation_request(pl.rr.chat, true, st_.rt.defaults, st_.max_logprobs);
    } catch (const HttpError& e) {
      throw responses_error(e);
    }
    check_model(pl.spec);
    for (size_t i = 0; i < pl.spec.images.size() && i < pl.rr.image_where.size(); ++i)
      pl.spec.images[i].where = pl.rr.image_where[i];
    responses_echo_sampling(pl.rr.echo, pl.spec.sampling);
    pl.rr.echo["store"] = pl.store;
    return pl;
  }

  // POST /v1/responses/input_tokens: the prompt's token count as the request would render it (a stored conversation
  // included); nothing runs, so no admission control.
  void responses_input_tokens(const httplib::Request& req, httplib::Response& res) {
    require_ready();
    json body = parse_body(req.body);
    if (!body.contains("input")) body["input"] = json::array();  // instructions alone, or a stored conversation
    ResponsesPlan pl = plan_responses(body);
    st_.active.fetch_add(1);  // the Generation gives it back
    Generation g(st_, std::move(pl.spec));
    try {
      g.prepare();
    } catch (const HttpError& e) {
      throw responses_error(e);
    }
    res.set_content(wire(json({{"object", "response.input_tokens"}, {"input_tokens", g.prompt_tokens()}})),
                    "application/json");
  }

  // POST /v1/responses: OpenAI's Responses API (docs/server.md "Responses API"). The request becomes a chat request
  // (src/server/responses.h) run by the same Generation; its output events become Responses items, a response object
  // or SSE events. Chat-route errors are reworded with the Responses field names. Unless `store` is false (or the
  // store is off) the response is kept (response_store.h): previous_response_id continues it, GET reads it;
  // `background` runs it on a thread of its own (start_background).
  void responses(const httplib::Request& req, httplib::Response& res) {
    require_ready();
    json body = parse_body(req.body);
    ResponsesPlan pl = plan_responses(body);
    ResponsesRequest& rr = pl.rr;
    const bool store = pl.store, background = pl.background;
    const auto& prev = pl.prev;
    GenSpec& spec = pl.spec;
    admit();
    auto gen = std::make_shared<Generation>(st_, std::move(spec));  // takes over the `active` slot
    try {
      gen->prepare();
    } catch (const HttpError& e) {
      throw responses_error(e);
    }
    gen->submit();
    auto out = std::make_shared<ResponsesOutput>(new_response_id(), unix_time(), st_.model_name, std::move(rr.echo),
                                                 background);
    res.set_header("X-Request-Id", req.has_header("X-Request-Id") ? req.get_header_value("X-Request-Id") : out->id());
    std::shared_ptr<ResponseRun> run = background ? std::make_shared<ResponseRun>() : nullptr;
    if (store) store_->begin(out->id(), out->response(), store_->node(prev, stored_input_items(body["input"])), run);
    if (background) {
      const json queued = out->response();
      const bool stream = gen->spec().stream;
      start_background(gen, out, run);
      if (stream) follow(run, 0, res);
      else res.set_content(wire(queued), "application/json");
    } else if (gen->spec().stream) {
      responses_stream(gen, out, res, store);
    } else {
      responses_respond(gen, out, res, store);
    }
  }

  // The end of a response: response.completed / .incomplete with usage, or response.failed; a stored response's
  // final object and output items go to the store.
  std::vector<json> responses_finish(Generation& g, ResponsesOutput& out, bool store, bool cancelled = false) {
    ResponsesUsage u{g.prompt_tokens(), g.cached_tokens(), g.completion_tokens(), 0};
    if (out.has_reasoning()) {  // the output tokens up to </think>
      const auto& t = g.choices()[0].tokens;
      u.reasoning_tokens = std::find(t.begin(), t.end(), st_.rt.think_end_id) - t.begin();
    }
    std::vector<json> evs = cancelled               ? out.cancel(u)
                            : !g.error_.empty()     ? out.fail("generation failed: " + g.error_)
                                                    : out.finish(g.choices()[0].finish_reason, u);
    if (store) store_->finish(out.id(), out.response(), out.output());
    return evs;
  }

  // A client that left: the generation is aborted; a stored response ends incomplete (reason "abort").
  void responses_left(Generation& g, ResponsesOutput& out, bool store) {
    g.abort_all();
    if (!out.finished()) responses_finish(g, out, store);
  }

  // Non-streaming: chunked, with a leading space every 2 s while waiting (as respond()).
  void responses_respond(std::shared_ptr<Generation> gen, std::shared_ptr<ResponsesOutput> out, httplib::Response& res,
                         bool store) {
    res.set_chunked_content_provider(
        "application/json",
        [this, gen, out, store, last = Clock::now()](size_t, httplib::DataSink& sink) mutable {
          while (!gen->all_done()) {
            for (auto& u : gen->poll(std::chrono::milliseconds(200))) out->update(u.ev);
            if (!gen->all_done() && seconds_since(last) > 2.0) {
              if (!sink.write(" ", 1)) return abort(*gen);
              last = Clock::now();
            }
          }
          responses_finish(*gen, *out, store);
          std::string body = wire(out->response());
          if (!sink.write(body.data(), body.size())) return false;
          sink.done();
          return true;
        },
        [this, gen, out, store](bool) { responses_left(*gen, *out, store); });
  }

  // Streaming: "event: TYPE / data: JSON" per event, `: ping` comments during long silences; no [DONE].
  void responses_stream(std::shared_ptr<Generation> gen, std::shared_ptr<ResponsesOutput> out, httplib::Response& res,
                        bool store) {
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, gen, out, store, started = false, last = Clock::now()](size_t, httplib::DataSink& sink) mutable {
          auto send = [&](const std::vector<json>& events) {
            for (auto& e : events) {
              std::string s = ResponsesOutput::sse(e);
              if (!sink.write(s.data(), s.size())) return false;
              last = Clock::now();
            }
            return true;
          };
          if (!started) {
            started = true;
            if (!send(out->start())) return abort(*gen);
          }
          while (!gen->all_done()) {
            auto ups = gen->poll(std::chrono::milliseconds(100));
            for (auto& u : ups)
              if (!send(out->update(u.ev))) return abort(*gen);
            if (ups.empty() && seconds_since(last) > 2.0) {
              const char* ping = ": ping\n\n";
              if (!sink.write(ping, std::strlen(ping))) return abort(*gen);
              last = Clock::now();
            }
          }
          if (!send(responses_finish(*gen, *out, store))) return false;
          sink.done();
          return true;
        },
        [this, gen, out, store](bool) { responses_left(*gen, *out, store); });
  }

  // A background response: a thread polls its generation, keeps the events in `run` and the store's object current
  // (at most every half second while tokens come), and ends it completed, incomplete, failed or cancelled.
  void start_background(std::shared_ptr<Generation> gen, std::shared_ptr<ResponsesOutput> out,
                        std::shared_ptr<ResponseRun> run) {
    std::lock_guard<std::mutex> lock(bg_mu_);
    // Threads whose runs have ended are joined here (each has pushed its last event and is returning).
    for (size_t i = 0; i < bg_.size();) {
      if (!bg_[i].run->ended()) {
        ++i;
        continue;
      }
      bg_[i].thread.join();
      bg_.erase(bg_.begin() + std::ptrdiff_t(i));
    }
    bg_.push_back({std::thread([this, gen, out, run]() mutable {
                     std::vector<json> last;
                     try {
                       run->push(out->start());
                       store_->update(out->id(), out->response());
                       auto saved = Clock::now();
                       bool cancelled = false;
                       while (!gen->all_done()) {
                         if (run->cancel) {
                           gen->abort_all();
                           cancelled = true;
                           break;
                         }
                         std::vector<json> evs;
                         for (auto& u : gen->poll(std::chrono::milliseconds(50)))
                           for (auto& e : out->update(u.ev)) evs.push_back(std::move(e));
                         if (!evs.empty() && seconds_since(saved) > 0.5) {
                           store_->update(out->id(), out->response());
                           saved = Clock::now();
                         }
                         run->push(evs);
                       }
                       last = responses_finish(*gen, *out, false, cancelled);
                     } catch (const std::exception& e) {  // the run fails, the server stays up
                       gen->abort_all();
                       if (!out->finished()) last = out->fail(std::string("internal error: ") + e.what());
                     }
                     // The store has the final object before a follower sees the last event; it, the output items
                     // and every kept event count against the store's budget.
                     std::vector<std::string> text;
                     int64_t bytes = run->bytes();
                     for (auto& e : last) bytes += int64_t(text.emplace_back(ResponsesOutput::sse(e)).size());
                     store_->finish(out->id(), out->response(), out->output(), bytes);
                     gen.reset();  // gives back its `active` slot before the run says it is done
                     run->end(std::move(text));
                   }),
                   run});
  }

  void cancel_run(ResponseRun& run) {
    run.cancel = true;
    run.wait_done(std::chrono::seconds(30));
  }

  // A stored response, or a 404 naming it. (Readable while the server drains: background runs may still finish.)
  ResponseStore::Found stored(const std::string& id) {
    if (!st_.ready) require_ready();
    std::optional<ResponseStore::Found> f;
    if (store_) f = store_->get(id);
    if (!f)
      throw HttpError(404, "Response with id '" + id + "' not found" +
                               (store_ ? std::string(" (never stored, deleted, or evicted from the --responses-store "
                                                     "budget)")
                                       : std::string(": this server stores no responses (--responses-store 0)")),
                      "response_id", "NotFoundError");
    return *f;
  }

  // GET /v1/responses/{id}: the response as it stands; with ?stream=true a background response's events after
  // ?starting_after=N (all of them without it), then the live ones until it ends.
  void response_get(const httplib::Request& req, httplib::Response& res) {
    const std::string id = req.matches[1];
    ResponseStore::Found f = stored(id);
    if (req.get_param_value("stream") != "true") return res.set_content(wire(f.response), "application/json");
    if (!f.run) throw HttpError(400, "only background responses can be streamed again; '" + id + "' was not", "stream");
    size_t from = 0;
    if (req.has_param("starting_after")) {
      const std::string v = req.get_param_value("starting_after");
      char* end = nullptr;
      const long long n = std::strtoll(v.c_str(), &end, 10);
      if (v.empty() || *end || n < -1)
        throw HttpError(400, "'starting_after' must be an event's sequence_number (an integer >= -1), got '" + v + "'",
                        "starting_after");
      from = size_t(n + 1);
    }
    follow(f.run, from, res);
  }

  // SSE of a background run's events from index `from` until its last one; a client that leaves does not cancel it.
  void follow(std::shared_ptr<ResponseRun> run, size_t from, httplib::Response& res) {
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream", [run, next = from, last = Clock::now()](size_t, httplib::DataSink& sink) mutable {
          for (;;) {
            bool finished = false;
            auto evs = run->from(next, std::chrono::milliseconds(100), finished);
            for (auto& s : evs) {
              if (!sink.write(s.data(), s.size())) return false;
              ++next;
              last = Clock::now();
            }
            if (finished && evs.empty()) break;
            if (evs.empty() && seconds_since(last) > 2.0) {
              const char* ping = ": ping\n\n";
              if (!sink.write(ping, std::strlen(ping))) return false;
              last = Clock::now();
            }
          }
          sink.done();
          return true;
        });
  }

  // GET /v1/responses/{id}/input_items: the items the response was generated from (a continued conversation's earlier
  // items included), `order` desc (default) or asc, `limit` 1..100 (default 20), after / before an item id.
  void input_items(const httplib::Request& req, httplib::Response& res) {
    const std::string id = req.matches[1];
    ResponseStore::Found f = stored(id);
    json items = ResponseStore::items(f.node.get(), false);
    const std::string order = req.has_param("order") ? req.get_param_value("order") : "desc";
    if (order != "asc" && order != "desc")
      throw HttpError(400, "'order' must be asc or desc, got '" + order + "'", "order");
    if (order == "desc") std::reverse(items.begin(), items.end());
    int64_t limit = 20;
    if (req.has_param("limit")) {
      const std::string v = req.get_param_value("limit");
      char* end = nullptr;
      limit = std::strtoll(v.c_str(), &end, 10);
      if (v.empty() || *end || limit < 1 || limit > 100)
        throw HttpError(400, "'limit' must be an integer from 1 to 100, got '" + v + "'", "limit");
    }
    auto find = [&](const char* k) -> std::ptrdiff_t {
      const std::string v = req.get_param_value(k);
      for (size_t i = 0; i < items.size(); ++i)
        if (items[i].value("id", "") == v) return std::ptrdiff_t(i);
      throw HttpError(400, std::string("'") + k + "': no input item '" + v + "' in response '" + id + "'", k);
    };
    std::ptrdiff_t lo = 0, hi = std::ptrdiff_t(items.size());
    if (req.has_param("after")) lo = find("after") + 1;
    if (req.has_param("before")) hi = find("before");
    json data = json::array();
    for (std::ptrdiff_t i = lo; i < hi && std::ptrdiff_t(data.size()) < limit; ++i) data.push_back(items[size_t(i)]);
    const bool more = lo + std::ptrdiff_t(data.size()) < hi;
    json page = {{"object", "list"},
                 {"data", data},
                 {"first_id", data.empty() ? json(nullptr) : data.front()["id"]},
                 {"last_id", data.empty() ? json(nullptr) : data.back()["id"]},
                 {"has_more", more}};
    res.set_content(wire(page), "application/json");
  }

  void generate(const httplib::Request& req, httplib::Response& res, bool chat) {
    require_ready();
    json body = parse_body(req.body);
    GenSpec spec = parse_generation_request(body, chat, st_.rt.defaults, st_.max_logprobs);
    if (st_.cfg.force_include_usage) spec.include_usage = true;  // --enable-force-include-usage
    check_model(spec);
    admit();
    auto gen = std::make_shared<Generation>(st_, std::move(spec));  // takes over the `active` slot
    gen->prepare();
    gen->submit();
    res.set_header("X-Request-Id", req.has_header("X-Request-Id") ? req.get_header_value("X-Request-Id") : gen->id());
    if (gen->spec().stream) stream(gen, res);
    else respond(gen, res);
  }

  // Non-streaming: a chunked body so that a vanished client is noticed (leading whitespace is valid JSON).
  void respond(std::shared_ptr<Generation> gen, httplib::Response& res) {
    res.set_chunked_content_provider(
        "application/json",
        [this, gen, last = Clock::now()](size_t, httplib::DataSink& sink) mutable {
          while (!gen->all_done()) {
            gen->poll(std::chrono::milliseconds(200));
            if (!gen->all_done() && seconds_since(last) > 2.0) {
              if (!sink.write(" ", 1)) {
                gen->abort_all();
                return false;
              }
              last = Clock::now();
            }
          }
          std::string body = wire(final_json(*gen));
          if (!sink.write(body.data(), body.size())) return false;
          sink.done();
          return true;
        },
        [gen](bool) { gen->abort_all(); });
  }

  static const std::vector<sampling::TokenLogprob>& prompt_lps(Generation& g, const Choice& c) {
    return c.prompt_lp_from >= 0 ? g.choices()[size_t(c.prompt_lp_from)].prompt_logprobs : c.prompt_logprobs;
  }

  json final_json(Generation& g) {
    const auto& spec = g.spec();
    json choices = json::array();
    for (auto& c : g.choices()) {
      if (spec.chat) {
        json msg = {{"role", "assistant"}};
        auto tcs = c.out->tool_calls();
        msg["content"] = c.out->content().empty() && !tcs.empty() && spec.chat_echo.empty()
                             ? json(nullptr)
                             : json(spec.chat_echo + c.out->content());  // chat echo: the final message leads
        if (!c.out->reasoning().empty() && spec.include_reasoning) {
          msg["reasoning_content"] = c.out->reasoning();
          msg["reasoning"] = c.out->reasoning();
        }
        if (!tcs.empty()) msg["tool_calls"] = tcs;
        json ch = {{"index", c.index}, {"message", msg}, {"logprobs", nullptr}, {"finish_reason", c.finish_reason},
                   {"stop_reason", c.stop_reason}};
        if (spec.logprobs) ch["logprobs"] = chat_logprobs(names(spec), c.tokens, c.logprobs);
        if (spec.return_token_ids) ch["token_ids"] = c.tokens, ch["prompt_token_ids"] = c.prompt;
        choices.push_back(ch);
      } else {
        std::string text = (spec.echo ? c.prompt_text : "") + (spec.echo_only ? "" : c.out->content());
        json ch = {{"index", c.index}, {"text", text}, {"logprobs", nullptr}, {"finish_reason", c.finish_reason},
                   {"stop_reason", c.stop_reason}};
        if (spec.logprobs) {
          size_t off = 0;
          const json echoed = spec.echo ? echo_logprobs(names(spec), c.prompt, prompt_lps(g, c), off) : json();
          const json gen = completion_logprobs(names(spec), spec.echo_only ? std::vector<int32_t>{} : c.tokens, c.logprobs, off);
          ch["logprobs"] = spec.echo ? concat_logprobs(echoed, gen) : gen;
        }
        if (spec.prompt_logprobs >= 0) ch["prompt_logprobs"] = prompt_logprobs_json(names(spec), prompt_lps(g, c));
        if (spec.return_token_ids) ch["token_ids"] = c.tokens, ch["prompt_token_ids"] = c.prompt;
        choices.push_back(ch);
      }
    }
    if (!g.error_.empty()) {
      return HttpError(500, "generation failed: " + g.error_).body();
    }
    json out = {{"id", g.id()},
                {"object", spec.chat ? "chat.completion" : "text_completion"},
                {"created", g.created()},
                {"model", st_.model_name},
                {"choices", choices},
                {"usage", usage_json(g)}};
    // vLLM's chat response carries the prompt's logprobs once, at the top (every choice shares the prompt).
    if (spec.chat && spec.prompt_logprobs >= 0 && !g.choices().empty())
      out["prompt_logprobs"] = prompt_logprobs_json(names(spec), g.choices()[0].prompt_logprobs);
    return out;
  }

  json chunk(Generation& g, json choices) {
    return {{"id", g.id()},
            {"object", g.spec().chat ? "chat.completion.chunk" : "text_completion"},
            {"created", g.created()},
            {"model", st_.model_name},
            {"choices", std::move(choices)}};
  }

  void stream(std::shared_ptr<Generation> gen, httplib::Response& res) {
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, gen, started = false, last = Clock::now()](size_t, httplib::DataSink& sink) mutable {
          auto send = [&](const json& j) {
            std::string s = "data: " + wire(j) + "\n\n";
            last = Clock::now();
            return sink.write(s.data(), s.size());
          };
          const auto& spec = gen->spec();
          if (!started) {
            started = true;
            if (spec.chat) {
              json cs = json::array();
              for (auto& c : gen->choices())
                cs.push_back({{"index", c.index}, {"delta", {{"role", "assistant"}, {"content", ""}}}, {"logprobs", nullptr},
                              {"finish_reason", nullptr}});
              if (!send(chunk(*gen, cs))) return abort(*gen);
              if (!spec.chat_echo.empty()) {  // chat echo: the final message's text, a chunk of its own (vLLM's)
                cs = json::array();
                for (auto& c : gen->choices())
                  cs.push_back({{"index", c.index}, {"delta", {{"content", spec.chat_echo}}}, {"logprobs", nullptr},
                                {"finish_reason", nullptr}});
                if (!send(chunk(*gen, cs))) return abort(*gen);
              }
            }
          }
          while (!gen->all_done()) {
            auto ups = gen->poll(std::chrono::milliseconds(100));
            for (auto& u : ups) {
              Choice& c = gen->choices()[size_t(u.index)];
              // Completions' echo: the prompt (and its logprobs, which come with the first token) leads the choice.
              if (!spec.chat && spec.echo && !c.echoed) {
                c.echoed = true;
                json e = {{"index", c.index}, {"text", c.prompt_text}, {"logprobs", nullptr}, {"finish_reason", nullptr}};
                if (spec.logprobs) e["logprobs"] = echo_logprobs(names(spec), c.prompt, c.prompt_logprobs, c.text_offset);
                if (!send(chunk(*gen, json::array({e})))) return abort(*gen);
              }
              if (spec.echo_only) {  // the generated token is not part of the answer
                u.tokens.clear();
                u.logprobs.clear();
                u.ev = {};
              }
              json delta = json::object();
              if (!u.ev.reasoning.empty() && spec.include_reasoning)
                delta["reasoning_content"] = u.ev.reasoning, delta["reasoning"] = u.ev.reasoning;
              if (!u.ev.content.empty() || (!spec.chat && u.finish_reason.empty())) delta["content"] = u.ev.content;
              if (!u.ev.tool_calls.empty()) delta["tool_calls"] = tool_call_deltas(u.ev.tool_calls);
              json choice;
              if (spec.chat) {
                choice = {{"index", c.index}, {"delta", delta}, {"logprobs", nullptr}, {"finish_reason", nullptr}};
                if (spec.logprobs && !u.tokens.empty()) choice["logprobs"] = chat_logprobs(names(spec), u.tokens, u.logprobs);
              } else {
                choice = {{"index", c.index}, {"text", u.ev.content}, {"logprobs", nullptr}, {"finish_reason", nullptr}};
                if (spec.logprobs && !u.tokens.empty())
                  choice["logprobs"] = completion_logprobs(names(spec), u.tokens, u.logprobs, c.text_offset);
              }
              if (spec.return_token_ids && !u.tokens.empty()) choice["token_ids"] = u.tokens;
              bool has_payload = spec.chat ? !delta.empty() : !u.ev.content.empty();
              has_payload = has_payload || (spec.return_token_ids && !u.tokens.empty());
              if (has_payload || (!u.tokens.empty() && spec.logprobs)) {
                json ch = chunk(*gen, json::array({choice}));
                if (spec.continuous_usage) ch["usage"] = usage_json(*gen);
                if (!send(ch)) return abort(*gen);
              }
              if (!u.finish_reason.empty()) {
                json fin = spec.chat ? json({{"index", c.index}, {"delta", json::object()}, {"logprobs", nullptr},
                                             {"finish_reason", u.finish_reason}, {"stop_reason", u.stop_reason}})
                                     : json({{"index", c.index}, {"text", ""}, {"logprobs", nullptr},
                                             {"finish_reason", u.finish_reason}, {"stop_reason", u.stop_reason}});
                if (!send(chunk(*gen, json::array({fin})))) return abort(*gen);
              }
            }
            // SSE comment as keep-alive during long prefills; also how a vanished client is noticed.
            if (ups.empty() && seconds_since(last) > 2.0) {
              const char* ping = ": ping\n\n";
              if (!sink.write(ping, std::strlen(ping))) return abort(*gen);
              last = Clock::now();
            }
          }
          if (!gen->error_.empty()) {
            json e = HttpError(500, "generation failed: " + gen->error_).body();
            if (!send(e)) return false;
          }
          if (spec.include_usage) {
            json u = chunk(*gen, json::array());
            u["usage"] = usage_json(*gen);
            if (!send(u)) return false;
          }
          const char* done = "data: [DONE]\n\n";
          sink.write(done, std::strlen(done));
          sink.done();
          return true;
        },
        [gen](bool) { gen->abort_all(); });
  }

  // Anthropic's Messages API (src/server/anthropic.h; docs/server.md "Anthropic Messages API"): the request becomes a
  // chat request run by the same Generation; errors take Anthropic's shape.
  static bool is_anthropic(const httplib::Request& req) { return req.path.rfind("/v1/messages", 0) == 0; }

  void send_anthropic_error(httplib::Response& res, int status, const std::string& message) {
    if (status >= 400 && status < 500) st_.metrics.client_errors_total++;
    res.status = status;
    retry_after(res);
    res.set_content(wire(anthropic::error_body(status, message)), "application/json");
  }

  static anthropic::Usage anthropic_usage(const Generation& g) {
    return {g.prompt_tokens(), g.completion_tokens(), g.cached_tokens()};
  }

  void messages(const httplib::Request& req, httplib::Response& res, bool count_tokens) {
    try {
      require_ready();
      anthropic::ChatRequest cr = anthropic::to_chat_request(parse_body(req.body), count_tokens);
      GenSpec spec = parse_generation_request(cr.body, true, st_.rt.defaults, st_.max_logprobs);
      for (size_t i = 0; i < spec.images.size() && i < cr.image_where.size(); ++i) spec.images[i].where = cr.image_where[i];
      check_model(spec);
      if (count_tokens) {  // the prompt as a request would render it; nothing runs, so no admission control
        st_.active.fetch_add(1);  // the Generation gives it back
        Generation g(st_, std::move(spec));
        g.prepare();
        res.set_content(wire(json({{"input_tokens", g.prompt_tokens()}})), "application/json");
        return;
      }
      admit();
      auto gen = std::make_shared<Generation>(st_, std::move(spec));  // takes over the `active` slot
      gen->prepare();
      gen->submit();
      auto w = std::make_shared<anthropic::MessageWriter>("msg_" + random_hex(24), st_.model_name,
                                                          gen->spec().include_reasoning);
      res.set_header("X-Request-Id", req.has_header("X-Request-Id") ? req.get_header_value("X-Request-Id") : w->id());
      if (gen->spec().stream) anthropic_stream(gen, w, res);
      else anthropic_respond(gen, w, res);
    } catch (const HttpError& e) {
      send_anthropic_error(res, e.status, anthropic::rename_fields(e.what()));
    } catch (const std::exception& e) {
      send_anthropic_error(res, 500, std::string("internal error: ") + e.what());
    }
  }

  // Non-streaming: chunked, with a leading space every 2 s while waiting (valid JSON), as respond().
  void anthropic_respond(std::shared_ptr<Generation> gen, std::shared_ptr<anthropic::MessageWriter> w,
                         httplib::Response& res) {
    res.set_chunked_content_provider(
        "application/json",
        [this, gen, w, last = Clock::now()](size_t, httplib::DataSink& sink) mutable {
          while (!gen->all_done()) {
            for (auto& u : gen->poll(std::chrono::milliseconds(200))) {
              w->feed(u.ev);
              if (!u.finish_reason.empty()) w->finish(u.finish_reason, u.stop_reason, anthropic_usage(*gen));
            }
            if (!gen->all_done() && seconds_since(last) > 2.0) {
              if (!sink.write(" ", 1)) return abort(*gen);
              last = Clock::now();
            }
          }
          std::string body = gen->error_.empty() ? wire(w->message(anthropic_usage(*gen)))
                                                 : wire(anthropic::error_body(500, "generation failed: " + gen->error_));
          if (!sink.write(body.data(), body.size())) return false;
          sink.done();
          return true;
        },
        [gen](bool) { gen->abort_all(); });
  }

  // Streaming: message_start (once the prefill is done, or after 2 s of it), the content blocks' events in order,
  // message_delta, message_stop; `event: ping` every 2 s of silence.
  void anthropic_stream(std::shared_ptr<Generation> gen, std::shared_ptr<anthropic::MessageWriter> w,
                        httplib::Response& res) {
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, gen, w, started = false, t0 = Clock::now(), last = Clock::now()](size_t, httplib::DataSink& sink) mutable {
          auto send = [&](const anthropic::Event& e) {
            std::string s = e.sse();
            last = Clock::now();
            return sink.write(s.data(), s.size());
          };
          auto send_all = [&](const std::vector<anthropic::Event>& es) {
            for (auto& e : es)
              if (!send(e)) return false;
            return true;
          };
          while (!gen->all_done()) {
            auto ups = gen->poll(std::chrono::milliseconds(100));
            if (!started && (!ups.empty() || seconds_since(t0) > 2.0)) {
              started = true;
              if (!send(w->start(anthropic_usage(*gen)))) return abort(*gen);
            }
            for (auto& u : ups) {
              if (!send_all(w->feed(u.ev))) return abort(*gen);
              if (!u.finish_reason.empty() && gen->error_.empty() &&
                  !send_all(w->finish(u.finish_reason, u.stop_reason, anthropic_usage(*gen))))
                return abort(*gen);
            }
            if (ups.empty() && started && seconds_since(last) > 2.0 &&
                !send({"ping", json({{"type", "ping"}})}))
              return abort(*gen);
          }
          if (!started && !send(w->start(anthropic_usage(*gen)))) return false;
          if (!gen->error_.empty() && !send({"error", anthropic::error_body(500, "generation failed: " + gen->error_)}))
            return false;
          sink.done();
          return true;
        },
        [gen](bool) { gen->abort_all(); });
  }

  TokenNames names(const GenSpec& spec) const {
    return {*st_.rt.tok, spec.return_tokens_as_token_ids.value_or(st_.cfg.return_tokens_as_token_ids)};
  }

  bool abort(Generation& g) {
    g.abort_all();
    return false;
  }

  ServerState& st_;
  CorsPolicy cors_;
  httplib::Server svr_;
  std::unique_ptr<ResponseStore> store_;  // null with --responses-store 0
  struct Background {
    std::thread thread;
    std::shared_ptr<ResponseRun> run;
  };
  std::mutex bg_mu_;
  std::vector<Background> bg_;
};

}  // namespace

int serve(const ServerConfig& cfg) {
  ServerState st;
  st.cfg = cfg;
  st.model_name = cfg.served_model_name.empty() ? fs::path(cfg.model_dir).filename().string() : cfg.served_model_name;
  if (st.model_name.empty()) st.model_name = fs::path(cfg.model_dir).parent_path().filename().string();
  st.model_names = {st.model_name};
  for (auto& n : cfg.served_model_aliases)
    if (std::find(st.model_names.begin(), st.model_names.end(), n) == st.model_names.end()) st.model_names.push_back(n);
  limit_malloc_arenas(8);  // metrics.h: before the HTTP threads start
  HttpServer http(st);
  http.install();
  if (!http.bind(cfg.host, cfg.port)) {
    std::fprintf(stderr, "deltaserve serve: error: cannot listen on %s:%d (address in use or not permitted)\n",
                 cfg.host.c_str(), cfg.port);
    return 1;
  }
  signal(SIGTERM, on_signal);
  signal(SIGINT, on_signal);
  signal(SIGPIPE, SIG_IGN);
  std::thread loader([&] {
    try {
      load_runtime(st);
      st.ready = true;
      std::fprintf(stderr, "deltaserve: serving '%s' on http://%s:%d (backend %s, max_model_len %lld%s)\n",
                   st.model_name.c_str(), cfg.host.c_str(), cfg.port, cfg.backend.c_str(),
                   (long long)st.rt.max_model_len,
                   st.rt.model->has_vision()   ? ", images and videos"
                   : cfg.language_model_only ? ", text only: --language-model-only left the vision tower unloaded"
                                             : "");
    } catch (const std::exception& e) {
      st.load_error = e.what();
      std::fprintf(stderr, "deltaserve serve: error: %s\n", e.what());
      g_stop_signal = true;
    }
  });
  std::thread watcher([&] {
    while (!g_stop_signal) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    // Graceful shutdown: refuse new work, let running requests finish within the deadline.
    st.draining = true;
    auto deadline = Clock::now() + std::chrono::seconds(cfg.drain_seconds);
    while (st.active.load() > 0 && Clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    http.stop_background();  // before the HTTP threads are joined: streams following a run end with it
    http.stop();
  });
  // vLLM's periodic stats line, while there is work (metrics.h stats_line).
  std::thread stats([&] {
    if (!cfg.log_stats) return;
    runtime::EngineMetrics prev;
    auto last = Clock::now();
    bool logged = false;
    while (!g_stop_signal) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      if (!st.ready || seconds_since(last) < cfg.log_stats_interval) continue;
      const runtime::EngineMetrics cur = st.rt.engine->metrics();
      const std::string line = stats_line(prev, cur, seconds_since(last));
      if (!line.empty() || logged) {  // one idle line after work, then quiet
        std::fprintf(stderr, "deltaserve: stats: %s\n",
                     line.empty() ? "prompt throughput 0.0 tokens/s, generation throughput 0.0 tokens/s, idle" : line.c_str());
        logged = !line.empty();
      }
      prev = cur;
      last = Clock::now();
    }
  });
  // Free heap pages back to the system now and then (metrics.h trim_heap).
  std::thread trimmer([&] {
    const int64_t every_ms = env_int("DS_MALLOC_TRIM_MS", 10000);
    if (every_ms <= 0) return;
    auto last = Clock::now();
    while (!g_stop_signal) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      if (seconds_since(last) * 1000 < double(every_ms)) continue;
      const auto t0 = Clock::now();
      const int64_t released = trim_heap();
      if (env_flag("DS_MALLOC_TRIM_LOG"))
        std::fprintf(stderr, "deltaserve: malloc_trim gave back %.1f MB in %.2f ms\n", double(released) / 1048576.0,
                     1000 * seconds_since(t0));
      last = Clock::now();
    }
  });
  http.listen_after_bind();
  watcher.join();
  stats.join();
  trimmer.join();
  loader.join();
  if (st.rt.engine) st.rt.engine->stop();
  std::fprintf(stderr, "deltaserve: stopped\n");
  return st.load_error.empty() ? 0 : 1;
}

}  // namespace ds::server
