#include "server/output.h"

#include "text/detokenizer.h"
#include "text/tokenizer.h"

namespace ds::server {

struct ChoiceOutput::Impl {
  text::Detokenizer detok;
  std::string content, reasoning;
  Impl(const text::Tokenizer& tok, const GenSpec& spec)
      : detok(tok, text::DetokenizerOptions{spec.skip_special_tokens, spec.stop}) {}
  OutputEvent route(std::string text) {
    OutputEvent ev;
    if (text.empty()) return ev;
    content += text;
    ev.content = std::move(text);
    return ev;
  }
};

ChoiceOutput::ChoiceOutput(const text::Tokenizer& tok, const GenSpec& spec, bool reasoning_active, bool parse_tools,
                           const nlohmann::ordered_json& tools)
    : impl_(std::make_unique<Impl>(tok, spec)) {}
ChoiceOutput::~ChoiceOutput() = default;

void ChoiceOutput::prime(const std::string& text) {}

OutputEvent ChoiceOutput::feed(const std::vector<int32_t>& ids) {
  std::string text;
  for (auto id : ids) text += impl_->detok.push(id);
  return impl_->route(std::move(text));
}

OutputEvent ChoiceOutput::finish() { return impl_->route(impl_->detok.flush()); }
bool ChoiceOutput::stop_hit() const { return impl_->detok.stopped(); }
const std::string& ChoiceOutput::content() const { return impl_->content; }
const std::string& ChoiceOutput::reasoning() const { return impl_->reasoning; }
nlohmann::ordered_json ChoiceOutput::tool_calls() const { return nlohmann::ordered_json::array(); }

}  // namespace ds::server
