// Shared by the unit tests of the routes that convert the chat pipeline's output (Anthropic, Responses).
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "server/output.h"

namespace ds::test {

// One OutputEvent of reasoning, content and tool-call deltas.
inline server::OutputEvent ev(std::string reasoning, std::string content, std::vector<ToolCallDelta> calls = {}) {
  server::OutputEvent e;
  e.reasoning = std::move(reasoning);
  e.content = std::move(content);
  e.tool_calls = std::move(calls);
  return e;
}

}  // namespace ds::test
