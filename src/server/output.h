// One choice's generated tokens -> what the client sees: incremental UTF-8-safe text, stop strings cut
// exactly, reasoning split from content (<think> ... </think>), tool calls parsed from the Qwen XML format.
#pragma once
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "server/openai.h"
#include "text/reasoning_parser.h"
#include "text/tool_parser.h"

namespace ds::text {
class Tokenizer;
}

namespace ds::server {

using ds::ToolCallDelta;

struct OutputEvent {
  std::string reasoning, content;
  std::vector<ToolCallDelta> tool_calls;
  bool empty() const { return reasoning.empty() && content.empty() && tool_calls.empty(); }
  void append(OutputEvent&& o) {
    reasoning += o.reasoning;
    content += o.content;
    for (auto& t : o.tool_calls) tool_calls.push_back(std::move(t));
  }
};

class ChoiceOutput {
 public:
  // `reasoning`: where the prompt left the model (ReasoningStart::kDisabled for raw completions).
  // `parse_tools`: tools were offered and tool_choice is not "none".
  ChoiceOutput(const text::Tokenizer& tok, const GenSpec& spec, ReasoningStart reasoning, bool parse_tools,
               const nlohmann::ordered_json& tools);
  ~ChoiceOutput();
  // Text the server itself put at the start of the assistant turn (a forced tool-call opening): parsed as
  // if generated; what it yields (a tool call's id and name) goes out with the next event.
  void prime(const std::string& text);
  OutputEvent feed(const std::vector<int32_t>& ids);
  OutputEvent finish();
  bool stop_hit() const;  // a stop string matched: the caller ends the engine request
  const std::string& stop_string() const;  // the stop string that matched (stop_hit())
  // Totals for non-streaming responses.
  const std::string& content() const;
  const std::string& reasoning() const;
  nlohmann::ordered_json tool_calls() const;  // OpenAI message.tool_calls array (may be empty)

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ds::server
