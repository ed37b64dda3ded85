// Splits generated text into reasoning (<think>…</think>) and content, incrementally and streaming-safe
// (qwen3 style). Qwen3.5/3.6 prompts end in "<think>\n", so generation starts inside the think block and
// only "</think>" appears; thinking off renders an empty think block in the prompt, so all output is
// content. Newlines are normalised the way the chat template re-renders history
// ("<think>\n{reasoning}\n</think>\n\n{content}"): leading/trailing '\n' of the reasoning and leading '\n'
// of the content are dropped. A "<tool_call>" followed by "<function" inside reasoning ends the reasoning
// (the call becomes content, for the tool-call parser).
#pragma once
#include <string>
#include <string_view>

namespace ds {

enum class ReasoningStart {
  kInReasoning,  // the prompt ends inside an open <think> block (thinking on)
  kInContent,    // no think block in the prompt: an explicit <think> at the very start opens reasoning
  kDisabled,     // thinking off (the prompt closed an empty think block): everything is content
};

// Decides the parser's initial state from the rendered prompt's tail, not from request flags.
ReasoningStart reasoning_start_for_prompt(std::string_view prompt);

struct ReasoningDelta {
  std::string reasoning;
  std::string content;
};

class ReasoningParser {
 public:
  explicit ReasoningParser(ReasoningStart start);

  // Feed the next piece of generated text; returns what can be emitted safely now. Text that might
  // still be the start of "</think>" (or of "<tool_call><function") is held back, never split.
  ReasoningDelta feed(std::string_view text);
  // End of generation: flushes what was held back (a truncated reasoning stays reasoning).
  ReasoningDelta finish();

  bool in_reasoning() const { return state_ == State::kReasoning; }

  // Whole-text parse; identical to feeding any chunking and finishing.
  static ReasoningDelta parse(std::string_view text, ReasoningStart start);

 private:
  enum class State { kOpening, kReasoning, kContent };
  void step(ReasoningDelta& out, bool final);

  ReasoningStart start_;
  State state_;
  std::string buf_;
  bool strip_leading_newlines_ = false;  // at the start of reasoning or of the content after </think>
};

}  // namespace ds
