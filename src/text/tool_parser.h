// Parser for the Qwen3.5/3.6 tool-call format (vLLM's `qwen3_coder`), streaming and whole-text:
//   <tool_call>
//   <function=NAME>
//   <parameter=ARG>
//   VALUE
//   </parameter>
//   </function>
//   </tool_call>
// Parameter values are converted with the tool's JSON schema (string stays a string; integer, number,
// boolean, object, array are parsed as JSON; anything unparsable falls back to the string). Arguments are
// emitted as a JSON object string in Python json.dumps style ({"a": 1, "b": "x"}), the way vLLM does.
// Content outside the calls is passed through; whitespace around calls is dropped; text that only looks
// like a call ("<tool_call>" not followed by "<function=") stays content.
#pragma once
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

namespace ds {

struct ToolCall {
  std::string id;
  std::string name;
  std::string arguments;  // JSON object text
};

// One streamed piece of a call, as OpenAI's `delta.tool_calls[]`: the first delta of a call carries
// id and name (type is always "function") with empty arguments, later ones carry argument fragments;
// concatenating the fragments of an index gives the full arguments JSON.
struct ToolCallDelta {
  int index = 0;
  std::string id;    // set on the first delta of a call only
  std::string name;  // set on the first delta of a call only
  std::string arguments;
};

struct ToolParseDelta {
  std::string content;
  std::vector<ToolCallDelta> tool_calls;
};

struct ToolParseResult {
  std::string content;
  std::vector<ToolCall> tool_calls;
};

// A fresh OpenAI-style id: "call_" + 24 random alphanumerics.
std::string tool_call_id();

// Converts one raw parameter text (already without the newline after <parameter=…> and before
// </parameter>) using its JSON schema (null: no schema, the value stays a string).
nlohmann::ordered_json tool_param_value(const std::string& raw, const nlohmann::ordered_json* schema);

class ToolCallParser {
 public:
  // tools: the request's `tools` array (OpenAI {"type":"function","function":{...}} or bare {name,
  // parameters}); null or empty is fine. make_id defaults to tool_call_id().
  explicit ToolCallParser(nlohmann::ordered_json tools = nullptr, std::function<std::string()> make_id = {});

  ToolParseDelta feed(std::string_view text);
  // End of generation: a call cut short is closed with the parameters seen so far; a "<tool_call>" that
  // never became a call is returned as content.
  ToolParseDelta finish();

  int calls_started() const { return calls_; }

  // Whole-text parse; identical to feeding any chunking and finishing.
  static ToolParseResult parse(std::string_view text, const nlohmann::ordered_json& tools = nullptr,
                               std::function<std::string()> make_id = {});

 private:
  enum class State { kContent, kCallOpen, kFunction, kParameter, kAfterFunction };
  void step(ToolParseDelta& out, bool final);
  void emit_content(ToolParseDelta& out, std::string_view text);
  void finish_parameter(ToolParseDelta& out, std::string_view raw);
  void close_arguments(ToolParseDelta& out);
  const nlohmann::ordered_json* param_schema(const std::string& param) const;

  nlohmann::ordered_json tools_;
  std::function<std::string()> make_id_;
  State state_ = State::kContent;
  std::string buf_;
  std::string held_space_;  // whitespace before a "<tool_call>" not yet known to be a call
  bool after_call_ = false;  // drop whitespace that follows a call
  int calls_ = 0;
  std::string function_;   // current call's function name
  std::string parameter_;  // current parameter name
  int params_emitted_ = 0;
};

}  // namespace ds
