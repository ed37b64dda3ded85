// One choice's generated tokens -> what the client sees: incremental UTF-8-safe text, stop strings cut
// exactly, reasoning split from content (<think> ... </think>), tool calls parsed from the Qwen XML format.
#pragma once
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "server/openai.h"

namespace ds::text {
class Tokenizer;
}

namespace ds::server {

struct ToolCallDelta {
  int index = 0;
  std::string id, name;  // set on a call's first delta only
  std::string arguments; // a piece of the arguments JSON
};

struct OutputEvent {
  std::string reasoning, content;
  std::vector<ToolCallDelta> tool_calls;
  bool empty() const { return reasoning.empty() && content.empty() && tool_calls.empty(); }
};

class ChoiceOutput {
 public:
  // `reasoning_active`: the prompt left the model inside <think> (thinking on), so output starts as
  // reasoning. `parse_tools`: tools were offered and tool_choice is not "none".
  ChoiceOutput(const text::Tokenizer& tok, const GenSpec& spec, bool reasoning_active, bool parse_tools,
               const nlohmann::ordered_json& tools);
  ~ChoiceOutput();
  // Text the server itself put at the start of the assistant turn (a forced tool-call opening): parsed as
  // if generated, never sent as content.
  void prime(const std::string& text);
  OutputEvent feed(const std::vector<int32_t>& ids);
  OutputEvent finish();
  bool stop_hit() const;  // a stop string matched: the caller ends the engine request
  // Totals for non-streaming responses.
  const std::string& content() const;
  const std::string& reasoning() const;
  nlohmann::ordered_json tool_calls() const;  // OpenAI message.tool_calls array (may be empty)

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ds::server
