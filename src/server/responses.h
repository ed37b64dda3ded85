// OpenAI's Responses API (POST /v1/responses) on top of the chat pipeline: a Responses body becomes a chat completions
// body (parse_generation_request(chat, true, ...) then validates it as usual), and the generation's output events
// become Responses output items, a response object and its SSE events (docs/server.md "Responses API"). Stored
// responses, previous_response_id and background runs: response_store.h and the server.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "sampling/sampling.h"
#include "server/http_error.h"
#include "server/output.h"

namespace ds::server {

using json = nlohmann::ordered_json;

struct ResponsesRequest {
  json chat;  // the equivalent /v1/chat/completions body
  // Each input_image part's place in the Responses body ("input[2].content[1]"), in the order the chat body holds
  // them (GenSpec::images), so that image errors name the Responses field.
  std::vector<std::string> image_where;
  json echo;  // the request's settings as a response object repeats them (tools, tool_choice, text, reasoning, ...)
};

// Converts a Responses request body; what this server cannot do (conversations, non-function tools, files, item
// references, ...) and wrong types are HttpError 400 naming the field. `history`: the items of a stored conversation
// the request continues (previous_response_id; ResponseStore::items), before its own input.
ResponsesRequest responses_to_chat(const json& body, const json& history = json::array());

// A request's own input (a string or a list of items, already checked by responses_to_chat) as stored input items:
// a string is a user message, content strings become input_text / output_text parts, and each item gets an id
// ("msg_", "fc_", "fco_", "rs_" + hex) where it has none.
json stored_input_items(const json& input);

// A chat-route error (parse_generation_request, template rendering, tool grammars) reworded with the Responses
// request's field names (max_tokens -> max_output_tokens, response_format -> text.format, messages -> input, ...).
HttpError responses_error(const HttpError& e);

// Fills the echoed temperature / top_p the request left out with the values used (generation_config's defaults).
void responses_echo_sampling(json& echo, const sampling::SamplingParams& used);

// "resp_" + 32 random hex digits.
std::string new_response_id();

struct ResponsesUsage {
  int64_t input_tokens = 0, cached_tokens = 0, output_tokens = 0, reasoning_tokens = 0;
};

// One generation's output as a Responses response: fed the generation's OutputEvents in order, it keeps the output
// items (a reasoning item, message items, function_call items; one open at a time, never interleaved) and returns
// the SSE events each step produces (each with its type and a sequence_number counting from 0). A non-streaming
// request feeds the same events and sends response().
class ResponsesOutput {
 public:
  // background: the response starts queued (response.created with status queued) and says background: true.
  ResponsesOutput(std::string id, int64_t created_at, std::string model, json echo, bool background = false);

  std::vector<json> start();  // response.created, response.in_progress
  std::vector<json> update(const OutputEvent& ev);
  // Closes the open item; response.completed, or response.incomplete when finish_reason is "length" (or
  // "repetition"). An abort also ends as incomplete.
  std::vector<json> finish(const std::string& finish_reason, const ResponsesUsage& usage);
  std::vector<json> fail(const std::string& message);  // response.failed (status failed, error server_error)
  // A background response cancelled (POST /v1/responses/{id}/cancel): the open item ends incomplete, status
  // cancelled, usage so far; the last event is response.cancelled.
  std::vector<json> cancel(const ResponsesUsage& usage);

  json response() const;  // the response object as it stands
  const json& output() const { return output_; }
  bool finished() const { return status_ != "queued" && status_ != "in_progress"; }
  const std::string& id() const { return id_; }
  bool has_reasoning() const { return has_reasoning_; }

  // One event as SSE: "event: TYPE\ndata: JSON\n\n".
  static std::string sse(const json& event);

 private:
  enum class Kind { kNone, kReasoning, kMessage, kCall };
  json event(const char* type, json fields);
  void open(Kind kind, std::vector<json>& out, const ToolCallDelta* call = nullptr);
  void close(std::vector<json>& out, bool complete);
  void text(Kind kind, const std::string& delta, std::vector<json>& out);
  void set_usage(const ResponsesUsage& u);

  std::string id_, model_;
  int64_t created_at_;
  json echo_;
  bool background_;
  std::string status_;
  json incomplete_ = nullptr, error_ = nullptr, usage_ = nullptr;
  json output_ = json::array();
  int64_t seq_ = 0;
  Kind open_ = Kind::kNone;
  std::string text_;     // the open item's text (message, reasoning) or arguments (function_call)
  std::string pending_;  // whitespace content not yet in a message item
  bool has_reasoning_ = false;
};

}  // namespace ds::server
