#include "server/output.h"

#include "text/detokenizer.h"
#include "text/tokenizer.h"

namespace ds::server {

// Pipeline: ids -> Detokenizer (UTF-8 safe, stop strings) -> ReasoningParser -> ToolCallParser (content).
struct ChoiceOutput::Impl {
  text::Detokenizer detok;
  ReasoningParser reasoning_parser;
  std::unique_ptr<ToolCallParser> tools;
  std::string content, reasoning;
  nlohmann::ordered_json calls = nlohmann::ordered_json::array();
  OutputEvent pending;  // from prime(), sent with the next event

  Impl(const text::Tokenizer& tok, const GenSpec& spec, ReasoningStart start, bool parse_tools,
       const nlohmann::ordered_json& tool_defs)
      : detok(tok, text::DetokenizerOptions{spec.skip_special_tokens, spec.stop, spec.include_stop_str_in_output}), reasoning_parser(start) {
    if (parse_tools) tools = std::make_unique<ToolCallParser>(tool_defs);
  }

  void record(const ToolCallDelta& d) {
    if (!d.id.empty() || !d.name.empty())
      calls.push_back({{"id", d.id}, {"type", "function"}, {"function", {{"name", d.name}, {"arguments", ""}}}});
    if (!calls.empty() && !d.arguments.empty()) {
      auto& args = calls[size_t(d.index) < calls.size() ? size_t(d.index) : calls.size() - 1]["function"]["arguments"];
      args = args.get<std::string>() + d.arguments;
    }
  }

  OutputEvent route(const ReasoningDelta& rd, bool final) {
    OutputEvent ev;
    ev.reasoning = rd.reasoning;
    if (tools) {
      ToolParseDelta td = tools->feed(rd.content);
      if (final) {
        ToolParseDelta tail = tools->finish();
        td.content += tail.content;
        td.tool_calls.insert(td.tool_calls.end(), tail.tool_calls.begin(), tail.tool_calls.end());
      }
      ev.content = std::move(td.content);
      ev.tool_calls = std::move(td.tool_calls);
    } else {
      ev.content = rd.content;
    }
    reasoning += ev.reasoning;
    content += ev.content;
    for (auto& d : ev.tool_calls) record(d);
    return ev;
  }

  OutputEvent take_pending(OutputEvent ev) {
    if (pending.empty()) return ev;
    OutputEvent out = std::move(pending);
    pending = {};
    out.append(std::move(ev));
    return out;
  }
};

ChoiceOutput::ChoiceOutput(const text::Tokenizer& tok, const GenSpec& spec, ReasoningStart reasoning, bool parse_tools,
                           const nlohmann::ordered_json& tools)
    : impl_(std::make_unique<Impl>(tok, spec, reasoning, parse_tools, tools)) {}
ChoiceOutput::~ChoiceOutput() = default;

void ChoiceOutput::prime(const std::string& text) {
  OutputEvent ev = impl_->route(impl_->reasoning_parser.feed(text), false);
  // The primed markup itself is not content the model produced; only the tool-call deltas it opens count.
  impl_->content.clear();
  impl_->reasoning.clear();
  ev.content.clear();
  ev.reasoning.clear();
  impl_->pending.append(std::move(ev));
}

OutputEvent ChoiceOutput::feed(const std::vector<int32_t>& ids) {
  std::string text;
  for (auto id : ids) text += impl_->detok.push(id);
  return impl_->take_pending(impl_->route(impl_->reasoning_parser.feed(text), false));
}

OutputEvent ChoiceOutput::finish() {
  ReasoningDelta rd = impl_->reasoning_parser.feed(impl_->detok.flush());
  ReasoningDelta tail = impl_->reasoning_parser.finish();
  rd.reasoning += tail.reasoning;
  rd.content += tail.content;
  return impl_->take_pending(impl_->route(rd, true));
}

bool ChoiceOutput::stop_hit() const { return impl_->detok.stopped(); }
const std::string& ChoiceOutput::stop_string() const {
  static const std::string none;
  return impl_->detok.stop_match() ? *impl_->detok.stop_match() : none;
}
const std::string& ChoiceOutput::content() const { return impl_->content; }
const std::string& ChoiceOutput::reasoning() const { return impl_->reasoning; }
nlohmann::ordered_json ChoiceOutput::tool_calls() const { return impl_->calls; }

}  // namespace ds::server
