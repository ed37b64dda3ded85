// libFuzzer target: the structured-output compilers see client text (a regex, a GBNF grammar, a JSON Schema, a tool
// list, a structural tag) and must accept or refuse any of it with ds::Error — never crash, read out of bounds, overflow, hang past their
// work budgets or allocate unboundedly — and a compiled grammar's Matcher must take any bytes after it.
// Input: one selector byte, then the client text, then (after the first NUL, if any) bytes fed to the matcher.
#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "core/status.h"
#include "sampling/grammar.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t mode = data[0] % 6;
  std::string_view rest(reinterpret_cast<const char*>(data + 1), size - 1);
  const size_t nul = rest.find('\0');
  const std::string_view text = rest.substr(0, nul);
  const std::string_view feed = nul == std::string_view::npos ? std::string_view() : rest.substr(nul + 1);
  using namespace ds::sampling;
  GrammarPtr g;
  try {
    switch (mode) {
      case 0: g = grammar_regex(text); break;
      case 1: g = grammar_ebnf(text); break;
      case 2:
      case 3: {
        auto j = nlohmann::ordered_json::parse(text, nullptr, false);
        if (j.is_discarded()) return 0;
        g = mode == 2 ? grammar_json_schema(j) : grammar_tool_call(j, "", true);
        break;
      }
      case 5: {
        auto j = nlohmann::ordered_json::parse(text, nullptr, false);
        if (j.is_discarded()) return 0;
        g = grammar_structural_tag(j);
        break;
      }
      default: {
        auto j = nlohmann::ordered_json::parse(text, nullptr, false);
        if (j.is_discarded() || !j.is_array()) return 0;
        std::vector<std::string> choices;
        for (auto& c : j)
          if (c.is_string()) choices.push_back(c.get<std::string>());
        g = grammar_choice(choices);
      }
    }
  } catch (const ds::Error&) {
    return 0;
  } catch (const nlohmann::json::exception&) {
    __builtin_trap();  // a schema's wrong type must be a ds::Error naming it, not a JSON library exception
  }
  Matcher m(g);
  for (size_t i = 0; i < feed.size(); ++i) {
    if (!m.advance(feed.substr(i, 1))) break;
  }
  (void)m.accepting();
  (void)m.state_key();
  return 0;
}
