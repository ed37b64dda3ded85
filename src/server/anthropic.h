// Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens) on top of the chat pipeline:
// an Anthropic request body becomes an OpenAI-style chat body (then parse_generation_request, the same
// validation and Generation as /v1/chat/completions), and the generation's output events become Anthropic
// content blocks, a Message, or its SSE events. docs/server.md "Anthropic Messages API".
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "server/http_error.h"
#include "server/output.h"

namespace ds::server::anthropic {

using json = nlohmann::ordered_json;

struct ChatRequest {
  json body;                            // the OpenAI-style chat body for parse_generation_request
  std::vector<std::string> image_where;  // each image part's place in the Anthropic request, in conversation order
};

// Converts a /v1/messages body (count_tokens: a /v1/messages/count_tokens body; max_tokens is not required and
// stream is ignored). Unknown top-level fields are ignored; wrong shapes are HttpError 400 naming the field in
// Anthropic's terms (messages[1].content[0], tools[2].input_schema, ...).
ChatRequest to_chat_request(const json& body, bool count_tokens = false);

// Rewrites OpenAI field names in an error message of the shared chat pipeline into the Anthropic request's
// ('stop' -> 'stop_sequences', tools[i].function.parameters -> tools[i].input_schema).
std::string rename_fields(const std::string& message);

// Anthropic's error type for an HTTP status, and the error body {"type": "error", "error": {type, message}}.
std::string error_type(int status);
json error_body(int status, const std::string& message);

struct Usage {
  int64_t prompt_tokens = 0, output_tokens = 0, cached_tokens = 0;
};
// {input_tokens (prompt tokens not read from the prefix cache), output_tokens, cache_read_input_tokens,
// cache_creation_input_tokens: 0}: Anthropic's accounting, where the prompt is the sum of the three inputs.
json usage_json(const Usage& u);

// The chat route's finish_reason and vLLM stop_reason -> Anthropic's stop_reason and stop_sequence.
struct Stop {
  std::string reason;  // end_turn | max_tokens | stop_sequence | tool_use
  json sequence;       // the matched stop string, else null
};
Stop map_stop(const std::string& finish_reason, const json& stop_reason);

// One server-sent event: `event: name` and `data: JSON`.
struct Event {
  std::string name;
  json data;
  std::string sse() const;
};

// Turns one choice's output events into content blocks in order (thinking, text, tool_use ...), never
// interleaving them: a block is closed before the next opens. Text that is only whitespace opens no block
// (it is kept, and sent, once non-whitespace text follows). The events it returns are the stream; the
// blocks it keeps are the non-streaming Message's content, so both carry the same content.
class MessageWriter {
 public:
  MessageWriter(std::string id, std::string model, bool include_thinking = true);

  Event start(const Usage& u) const;                 // message_start
  std::vector<Event> feed(const OutputEvent& ev);    // content_block_start / _delta / _stop
  // Closes the open block; message_delta (stop_reason, stop_sequence, the final usage) and message_stop.
  std::vector<Event> finish(const std::string& finish_reason, const json& stop_reason, const Usage& u);
  // The whole Message (after finish()): content with each tool_use's input parsed into an object.
  json message(const Usage& u) const;

  const std::string& id() const { return id_; }

 private:
  void close(std::vector<Event>& out);
  void open(std::vector<Event>& out, json block);

  std::string id_, model_;
  bool include_thinking_;
  json blocks_ = json::array();
  std::vector<std::string> inputs_;    // per block: a tool_use's input JSON text so far
  int open_ = -1;                      // the open block's index
  std::string pending_ws_;             // whitespace-only text not yet in a block
  std::vector<int> call_block_;        // tool-call index -> block index
  Stop stop_;
};

}  // namespace ds::server::anthropic
