// Incremental detokenizer for streaming: fed one token id at a time, it returns text as soon as that text
// is final — complete UTF-8 (never half a character) and not possibly the start of a stop string.
//
// Invariant (tested): with no stop strings, the concatenation of every push() result and flush() equals
// Tokenizer::decode(all ids, skip_special), including U+FFFD for invalid bytes, because bytes are decoded
// with the same lossy rule and only a trailing sequence that may still become valid is held back.
//
// Stop strings are matched on the decoded text, so they are found even when they span token boundaries
// or split a multi-byte character; the output ends just before the earliest match (ties: the first stop
// in the list), and the stop string itself is not emitted unless include_stop (vLLM's include_stop_str_in_output:
// the output ends with it, and no text is held back). Stop *tokens* (eos ids) are the engine's job.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "text/tokenizer.h"

namespace ds::text {

struct DetokenizerOptions {
  bool skip_special = true;        // drop tokens marked special (e.g. <|im_end|>); added non-special ones stay
  std::vector<std::string> stop;   // stop strings (empty strings are ignored)
  bool include_stop = false;       // the matched stop string ends the output instead of being cut
};

class Detokenizer {
 public:
  // Keeps a (cheap, shared) copy of the tokenizer.
  explicit Detokenizer(const Tokenizer& tok, DetokenizerOptions opts = {});

  // Feeds one id; returns the newly final text (often empty). Throws ds::Error for an id outside the
  // model vocab. After a stop string was found, returns "" and ignores the id.
  std::string push(int32_t id);
  // End of stream: an incomplete trailing UTF-8 sequence becomes U+FFFD and held-back text is released.
  std::string flush();

  bool stopped() const { return stop_match_.has_value(); }
  // The stop string that ended the output, if any.
  const std::optional<std::string>& stop_match() const { return stop_match_; }

 private:
  std::string release(bool final);

  Tokenizer tok_;
  DetokenizerOptions opts_;
  std::string bytes_;  // undecoded tail: a prefix of a UTF-8 sequence that may still complete
  std::string text_;   // decoded but not yet emitted (shorter than the longest stop string between calls)
  std::optional<std::string> stop_match_;
};

}  // namespace ds::text
