// OpenAI request bodies -> validated generation specs (vLLM's dialect: top_k, min_p, repetition_penalty,
// chat_template_kwargs, stop_token_ids, ignore_eos ...). Unknown fields are ignored; wrong types and
// out-of-range values are HttpError 400 naming the field.
#pragma once
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "sampling/sampling.h"
#include "server/media.h"
#include "server/http_error.h"

namespace ds::server {

using json = nlohmann::ordered_json;

struct GenSpec {
  bool chat = false;
  std::string model;
  bool stream = false, include_usage = false, continuous_usage = false;
  int n = 1;
  sampling::SamplingParams sampling;
  std::optional<int64_t> max_tokens;
  std::vector<std::string> stop;
  nlohmann::ordered_json mm_processor_kwargs;  // chat: vLLM's, over --mm-processor-kwargs (null: none)
  bool include_stop_str_in_output = false;  // vLLM's: the stop string that ended the output stays in it
  // vLLM's truncate_prompt_tokens: only the prompt's last N tokens are kept (-1: --max-model-len's worth).
  std::optional<int64_t> truncate_prompt_tokens;
  std::vector<int32_t> stop_token_ids;
  std::vector<std::string> bad_words;  // vLLM: tokenized by the server (sampling.bad_words)
  // The constraint is a structural tag: added tokens that are not special (<tool_call>, </tool_call>, <think>, ...)
  // spell their text under it, as in xgrammar's vocabulary (a trigger "<tool_call>" meets the model's own token).
  bool grammar_spells_added = false;
  bool ignore_eos = false, skip_special_tokens = true, echo = false;
  bool return_token_ids = false;  // vLLM extension: choices carry prompt_token_ids and token_ids
  // vLLM's return_tokens_as_token_ids: logprobs name tokens "token_id:N" (unset: the server's
  // --return-tokens-as-token-ids).
  std::optional<bool> return_tokens_as_token_ids;
  bool logprobs = false;
  int top_logprobs = 0;
  // vLLM's prompt_logprobs (alternatives per prompt token, -1 = off); completions' echo with logprobs sets it to
  // top_logprobs (the echoed prompt tokens carry logprobs). echo_only: completions' echo with max_tokens 0 (one
  // token is generated and dropped: the response is the prompt alone, lm-evaluation-harness' loglikelihood call).
  int prompt_logprobs = -1;
  bool echo_only = false;
  // completions: each prompt is a string or token ids
  std::vector<std::string> prompt_texts;
  std::vector<std::vector<int32_t>> prompt_ids;
  // chat
  json messages = json::array();
  std::vector<ImageRef> images;    // image_url parts, in conversation order
  std::vector<ImageRef> videos;    // video_url parts, in conversation order
  json tools;                      // null or array
  std::string tool_choice = "auto";  // auto | none | required | named
  std::string tool_choice_name;
  bool parallel_tool_calls = true;
  json chat_template_kwargs = json::object();
  // Top-level enable_thinking, or reasoning_effort ("none" = false, any other effort = true): under
  // chat_template_kwargs' own enable_thinking, over the server's default.
  std::optional<bool> enable_thinking;
  bool add_generation_prompt = true, continue_final_message = false;
  // vLLM's chat echo: the final message's text, which the reply's content is prefixed with, where that message is the
  // reply's role's (an assistant message; any with add_generation_prompt false); empty otherwise.
  std::string chat_echo;
  std::string request_id;
  std::string cache_salt;  // vLLM: prefix-cache checkpoints are shared only between requests with the same salt
  // vLLM's repetition_detection {max_pattern_size, min_pattern_size, min_count} (runtime::Request::repetition);
  // max_pattern 0 = off.
  int64_t rep_max_pattern = 0, rep_min_pattern = 0, rep_min_count = 0;
  bool include_reasoning = true;  // vLLM (chat): false leaves reasoning / reasoning_content out of the response
  int64_t priority = 0;           // vLLM: lower values are admitted first and preempted last
};

// Parses a /v1/chat/completions or /v1/completions body. `defaults` are generation_config.json's
// sampling defaults (applied where the request is silent).
// `max_logprobs`: the most logprob alternatives (logprobs, top_logprobs, prompt_logprobs) a request may ask for.
GenSpec parse_generation_request(const json& body, bool chat, const sampling::SamplingParams& defaults,
                                 int max_logprobs = 20);

// Parses the JSON body text; malformed JSON or a non-object is a 400.
json parse_body(const std::string& text);

// A value quoted in an error message, cut to a readable length (120 characters).
std::string brief(const json& v);
// n random hex digits (ids: chatcmpl-, msg_, resp_, ...).
std::string random_hex(int n);

}  // namespace ds::server
