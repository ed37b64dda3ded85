#include "text/reasoning_parser.h"

namespace ds {
namespace {

constexpr std::string_view kThinkOpen = "<think>";
constexpr std::string_view kThinkClose = "</think>";
constexpr std::string_view kToolCall = "<tool_call>";
constexpr std::string_view kFunction = "<function";

bool is_space(char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }

// Length of the longest suffix of s that is a proper prefix of tag.
size_t partial_suffix(std::string_view s, std::string_view tag) {
  for (size_t k = std::min(s.size(), tag.size() - 1); k > 0; --k)
    if (s.substr(s.size() - k) == tag.substr(0, k)) return k;
  return 0;
}

std::string_view rstrip_newlines(std::string_view s) {
  while (!s.empty() && s.back() == '\n') s.remove_suffix(1);
  return s;
}

enum class CallCheck { kYes, kNo, kMaybe };

// Does the text right after "<tool_call>" start a real call ("<function" after optional whitespace)?
CallCheck genuine_call(std::string_view after) {
  size_t i = 0;
  while (i < after.size() && is_space(after[i])) ++i;
  std::string_view rest = after.substr(i);
  if (rest.size() >= kFunction.size()) return rest.substr(0, kFunction.size()) == kFunction ? CallCheck::kYes : CallCheck::kNo;
  return kFunction.substr(0, rest.size()) == rest ? CallCheck::kMaybe : CallCheck::kNo;
}

}  // namespace

ReasoningStart reasoning_start_for_prompt(std::string_view prompt) {
  std::string_view p = prompt;
  while (!p.empty() && is_space(p.back())) p.remove_suffix(1);
  if (p.size() >= kThinkOpen.size() && p.substr(p.size() - kThinkOpen.size()) == kThinkOpen)
    return ReasoningStart::kInReasoning;
  if (p.size() >= kThinkClose.size() && p.substr(p.size() - kThinkClose.size()) == kThinkClose)
    return ReasoningStart::kDisabled;
  return ReasoningStart::kInContent;
}

ReasoningParser::ReasoningParser(ReasoningStart start)
    : start_(start), state_(start == ReasoningStart::kDisabled ? State::kContent : State::kOpening) {
  strip_leading_newlines_ = start == ReasoningStart::kInReasoning;
}

ReasoningDelta ReasoningParser::feed(std::string_view text) {
  ReasoningDelta out;
  buf_.append(text);
  step(out, false);
  return out;
}

ReasoningDelta ReasoningParser::finish() {
  ReasoningDelta out;
  step(out, true);
  if (!buf_.empty()) {  // held back at the end of generation: plain text of the current section
    (state_ == State::kReasoning ? out.reasoning : out.content) += buf_;
    buf_.clear();
  }
  return out;
}

void ReasoningParser::step(ReasoningDelta& out, bool final) {
  while (true) {
    if (strip_leading_newlines_) {
      size_t k = 0;
      while (k < buf_.size() && buf_[k] == '\n') ++k;
      buf_.erase(0, k);
      if (buf_.empty()) return;
      if (state_ != State::kOpening) strip_leading_newlines_ = false;
    }
    switch (state_) {
      case State::kOpening: {
        // An explicit <think> may open the output (older templates, or the model repeating it).
        size_t i = 0;
        while (i < buf_.size() && is_space(buf_[i])) ++i;
        std::string_view rest = std::string_view(buf_).substr(i);
        if (rest.size() >= kThinkOpen.size() && rest.substr(0, kThinkOpen.size()) == kThinkOpen) {
          buf_.erase(0, i + kThinkOpen.size());
          state_ = State::kReasoning;
          strip_leading_newlines_ = true;
          continue;
        }
        if (!final && kThinkOpen.substr(0, rest.size()) == rest) return;  // maybe "<think>" still coming
        state_ = start_ == ReasoningStart::kInReasoning ? State::kReasoning : State::kContent;
        if (state_ == State::kReasoning) {
          strip_leading_newlines_ = true;
        } else {
          strip_leading_newlines_ = false;
        }
        continue;
      }
      case State::kReasoning: {
        std::string_view b = buf_;
        size_t close = b.find(kThinkClose);
        // Earliest genuine "<tool_call><function" before any </think> ends reasoning implicitly.
        size_t call = std::string_view::npos;
        bool call_pending = false;
        for (size_t p = b.find(kToolCall); p != std::string_view::npos && p < close; p = b.find(kToolCall, p + 1)) {
          CallCheck c = genuine_call(b.substr(p + kToolCall.size()));
          if (c == CallCheck::kYes || (c == CallCheck::kMaybe && final)) {
            if (c == CallCheck::kYes) call = p;
            break;
          }
          if (c == CallCheck::kMaybe) {
            call = p;
            call_pending = true;
            break;
          }
        }
        if (call != std::string_view::npos && call < close) {
          size_t keep = rstrip_newlines(b.substr(0, call)).size();
          out.reasoning += b.substr(0, keep);
          if (call_pending) {  // hold "\n<tool_call>..." until we know whether a function follows
            buf_.erase(0, keep);
            return;
          }
          buf_.erase(0, call);
          state_ = State::kContent;
          continue;
        }
        if (close != std::string_view::npos) {
          out.reasoning += rstrip_newlines(b.substr(0, close));
          buf_.erase(0, close + kThinkClose.size());
          state_ = State::kContent;
          strip_leading_newlines_ = true;
          continue;
        }
        if (final) return;
        size_t hold = std::max(partial_suffix(b, kThinkClose), partial_suffix(b, kToolCall));
        size_t safe = b.size() - hold;
        while (safe > 0 && b[safe - 1] == '\n') --safe;  // may be the '\n' before </think>
        out.reasoning += b.substr(0, safe);
        buf_.erase(0, safe);
        return;
      }
      case State::kContent:
        out.content += buf_;
        buf_.clear();
        return;
    }
  }
}

ReasoningDelta ReasoningParser::parse(std::string_view text, ReasoningStart start) {
  ReasoningParser p(start);
  ReasoningDelta a = p.feed(text);
  ReasoningDelta b = p.finish();
  a.reasoning += b.reasoning;
  a.content += b.content;
  return a;
}

}  // namespace ds
