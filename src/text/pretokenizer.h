// The pre-tokenizer's regex: a small backtracking matcher over Unicode code points for the grammar subset
// that the Qwen2/Qwen3/Qwen3.5 (and GPT-2) split patterns use, with Oniguruma's semantics (leftmost match,
// alternatives tried in order, greedy quantifiers with backtracking) because that is what HF tokenizers runs.
//
// Supported: literals, escapes \r \n \t \f \v \0 \xHH \x{H..} and escaped punctuation; `.`; \s \S \d \D;
// \p{X} \P{X} \pX for general categories (L Lu Ll Lt Lm Lo M Mn Mc Me N Nd Nl No P.. S.. Z.. C..);
// classes [...] / [^...] with ranges, escapes and properties; groups (...) (?:...) (?i:...); lookahead
// (?=...) (?!...); alternation; greedy ? * + {n} {n,} {n,m}. Anything else (anchors, backreferences,
// lookbehind, lazy/possessive quantifiers, case-insensitive classes) is rejected at compile time with a
// message naming the construct and its position.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace ds::text {

class SplitRegex {
 public:
  // Throws ds::Error for syntax outside the supported subset.
  static SplitRegex compile(std::string_view pattern);

  // Code points of one text with their property bytes (unicode::properties), the matcher's input.
  struct Input {
    const uint32_t* cps;
    const uint8_t* props;
    size_t n;
  };

  // Longest-priority match starting exactly at `pos` (Oniguruma's choice, not POSIX longest). Returns the
  // end position, or -1 if no match starts there.
  int64_t match_at(const Input& in, size_t pos) const;

  // "Split" pre-tokenizer with behavior Isolated: every match is a piece, and so is every gap between
  // matches. Calls emit(start, end) in code-point positions, in order, covering [0, n).
  template <typename F>
  void split(const Input& in, F&& emit) const {
    size_t gap = 0, pos = 0;
    while (pos < in.n) {
      int64_t end = match_at(in, pos);
      if (end > int64_t(pos)) {
        if (gap < pos) emit(gap, pos);
        emit(pos, size_t(end));
        pos = size_t(end);
        gap = pos;
      } else {
        ++pos;  // empty or no match: this code point belongs to a gap
      }
    }
    if (gap < in.n) emit(gap, in.n);
  }

  // The same over UTF-8 text, in byte offsets. Decodes a window of code points at a time (the working set
  // stays in cache for multi-megabyte inputs); a match attempt that reached the window's end is retried on
  // a window starting at that position, so results are identical to matching on the whole text.
  // Throws ds::Error on invalid UTF-8.
  void split_text(std::string_view text, const std::function<void(size_t, size_t)>& emit) const;

  const std::string& pattern() const { return pattern_; }

  // Implementation types, public so that the compiler in pretokenizer.cpp can build them.
  struct CharClass {
    bool negate = false;
    uint32_t category_mask = 0;      // bit c set: general category c matches
    uint32_t not_category_mask = 0;  // bit c set: \P{..} inside a class: category c does NOT match
    bool white_space = false, not_white_space = false;
    std::vector<std::pair<uint32_t, uint32_t>> ranges;  // inclusive code point ranges
    uint64_t ascii[2] = {0, 0};                         // precomputed final answer (negation included) for cp < 128
    bool test_slow(uint32_t cp, uint8_t prop) const;
    bool test(uint32_t cp, uint8_t prop) const {
      if (cp < 128) return (ascii[cp >> 6] >> (cp & 63)) & 1;
      return test_slow(cp, prop);
    }
  };
  enum class Op : uint8_t { kChar, kCharFold, kClass, kAny, kRepeat, kSplit, kJmp, kLook, kMatch };
  struct Inst {
    Op op;
    bool negate = false;   // kLook: negative lookahead
    uint32_t arg = 0;      // kChar/kCharFold: code point (folded); kClass: class index; kRepeat: atom inst
    int32_t x = 0, y = 0;  // kSplit: first/second target; kJmp: x; kLook: x = sub-program start;
                           // kRepeat: x = min, y = max (-1 = unbounded)
  };

 private:
  bool atom_matches(const Inst& atom, uint32_t cp, uint8_t prop) const;
  // hit_end (optional) is set when the attempt looked at the end of `in` (its result could change if
  // more text followed).
  int64_t run(const Input& in, size_t pos, int32_t pc, bool* hit_end) const;

  std::string pattern_;
  std::vector<Inst> prog_;
  std::vector<CharClass> classes_;
  friend struct RegexCompiler;
};

}  // namespace ds::text
