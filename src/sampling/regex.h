// Regular expressions for structured output (docs/server.md "Structured outputs"): vLLM's structured_outputs.regex /
// guided_regex and JSON Schema's "pattern". A pattern is parsed and compiled to a deterministic automaton over the
// bytes of its matches; the language is the set of texts the pattern matches *as a whole* (Python's re.fullmatch),
// which is what vLLM's backends generate for a regex and for a schema's pattern (a text that matches as a whole
// also satisfies JSON Schema's unanchored pattern).
//
// Syntax (the common ground of Python's re and ECMAScript; code points from the pattern's UTF-8):
//   - literals; escapes \n \r \t \f \v \0 \a \e, \xHH, \uHHHH, \u{H...}, \UHHHHHHHH, \N is refused; a backslash before
//     any other ASCII punctuation or space is that character;
//   - . (any character but \n), classes [...] / [^...] with ranges, escapes and \d \w \s \D \W \S inside; a ']'
//     right after '[' or '[^' is literal, '-' first or last is literal;
//   - \d = [0-9], \w = [A-Za-z0-9_], \s = [ \t\n\r\f\v] (ASCII meanings, as ECMAScript; Python's str patterns
//     give \d and \w their Unicode meanings), \D \W \S their complements;
//   - groups (...), (?:...), (?P<name>...), (?<name>...); alternation |;
//   - quantifiers ? * + {n} {n,} {n,m} {,m} (bounds up to 1000), each optionally lazy (a trailing ?: same language);
//     a '{' that does not start a quantifier is literal, as in Python;
//   - ^ / \A only at the start of the pattern and $ / \Z / \z only at its end (they are implied anyway).
// Refused with an error naming the construct and its position: lookaround, backreferences, \b \B, anchors elsewhere,
// possessive quantifiers, atomic groups, inline flags ((?i) ...), \p{..} properties, conditionals.
// Characters are Unicode scalar values (no surrogates); texts are well-formed UTF-8.
//
// Encodings: kUtf8 spells each character as its UTF-8 bytes; kJsonString as inside a JSON string (RFC 8259): '"' as
// \", '\' as \\, controls U+0000-U+001F as \b \f \n \r \t or \u00XX (either hex case), '/' raw or as \/, every
// other character as its UTF-8 bytes. So the automaton of a schema's pattern reads a string's body without its
// quotes, and its character count (RegexDfa::boundary) counts an escape as one character.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ds::sampling {

enum class RegexEncoding { kUtf8, kJsonString };

struct RegexDfa {
  std::vector<int32_t> next;      // [state * 256 + byte] -> state, -1 = refused; state 0 is the start
  std::vector<uint8_t> accept;    // the bytes read so far spell a match
  std::vector<uint8_t> boundary;  // the bytes read so far end at a character boundary (not inside one)
  size_t states() const { return accept.size(); }
  int32_t step(int32_t s, uint8_t b) const { return next[size_t(s) * 256 + b]; }
  // Whether the whole text is a match (encoded as the automaton's encoding).
  bool matches(std::string_view text) const;
};

// At most this many states (a larger automaton is refused: e.g. [ab]*a[ab]{15}, 2^16 states), built within a work
// budget (nested bounded repeats such as (.{0,1000}){10} are refused by it). A character class's bytes share their
// states, so a JSON string's ".{0,1000}" is ~14,000 states.
constexpr size_t kMaxRegexStates = 20000;
constexpr int64_t kMaxRegexWork = 20'000'000;  // NFA states visited while building it (a time bound: ~0.1-0.3 s)
constexpr int kMaxRegexRepeat = 1000;

// Throws ds::Error for syntax outside the subset above or an automaton over kMaxRegexStates, naming the construct
// and its position ("... at character 5 of the pattern"). A pattern that matches nothing compiles (no state
// accepts); callers decide whether that is an error.
RegexDfa compile_regex(std::string_view pattern, RegexEncoding enc = RegexEncoding::kUtf8);

// The texts both automata match (of one encoding): the product of their states reachable from the start. Throws
// ds::Error past kMaxRegexStates.
RegexDfa intersect(const RegexDfa& a, const RegexDfa& b);

// JSON Schema's "format" as a pattern in the syntax above, for the formats a string can be generated in (RFC 3339
// date, time, date-time with valid days per month and leap years, uuid, ipv4, hostname (RFC 1123 labels), email (a
// dot-atom local part at a hostname)); nullptr for any other format (an annotation only, as JSON Schema's default).
const char* format_regex(std::string_view format);

}  // namespace ds::sampling
