// Structured output's grammar core (docs/server.md "Structured outputs"): a byte-level matcher for a constrained
// output language (OpenAI response_format json_object / json_schema, vLLM's choice) and a token masker that says
// which tokens of a vocabulary may come next.
//
// A Grammar is a pushdown automaton over bytes: rules made of nodes with byte edges (at most one target per
// byte), calls of other rules (then continue at a given node; recursion allowed, left recursion rejected when
// built) and a flag "the rule may return here". A position is a set of threads, each a node and a stack of
// return nodes, so ambiguous grammars (anyOf of similar objects) are followed in parallel until the bytes tell
// them apart. Parts that cannot reach the end of their rule are pruned when the grammar is built, so every
// thread can still complete: can_continue() and accepting() never promise what the grammar cannot keep.
//
// The JSON languages (RFC 8259, UTF-8):
//   - no whitespace before or after the top-level value; between structural tokens at most "" or " " or "\n"
//     followed by up to 20 spaces/tabs (llama.cpp's json grammar), so a model cannot loop on whitespace;
//   - strings: any Unicode scalar value except '"', '\' and controls < 0x20 (those only escaped: \" \\ \/ \b \f
//     \n \r \t \uXXXX); only well-formed UTF-8 is accepted (no overlongs, surrogates or > U+10FFFF), bytes may be
//     split across tokens anywhere; \uD800-\uDBFF must be followed by \uDC00-\uDFFF (a scalar value as a pair);
//   - numbers: JSON syntax with at most 16 digits in the integer part and in the fraction, and 2 in the exponent
//     (a longer exponent would overflow a double: nlohmann, serde_json and Go refuse such numbers), so every
//     number is a finite double; integers (type integer) have no fraction or exponent;
//   - nesting of "any" values (json_object, {} / true schemas) is limited to 32 levels of objects/arrays; deeper,
//     only scalars; their objects may repeat a key (the matcher does not track key sets).
//
// JSON Schema subset (draft 2020-12 / OpenAI structured outputs), grammar_json_schema():
//   - type (a name or a list: object, array, string, number, integer, boolean, null), nullable: true (adds null);
//     without type, the types the keywords imply (properties -> object, items -> array, ...), else any value;
//   - objects: properties (emitted in the order the schema lists them, each key exactly as the JSON string of its
//     name; optional ones may be skipped), required, additionalProperties: false / true / a schema. When the
//     schema has `properties` and no additionalProperties, only the listed properties are produced (as if false:
//     OpenAI strict mode). With additionalProperties true or a schema, extra keys (any JSON string other than the
//     spelling of a listed name) come after the listed properties (and may repeat each other); without
//     `properties` and additionalProperties, any object;
//   - arrays: items (schema or false), prefixItems, minItems, maxItems (at most 10000);
//   - strings: minLength / maxLength in Unicode characters, an escape counts as one (at most 10000); pattern (a
//     regular expression in regex.h's syntax) matched by the decoded string as a whole, as vLLM's backends do (a
//     string that matches as a whole also satisfies JSON Schema's unanchored pattern), with the length bounds too;
//     format date, time, date-time, uuid, ipv4, hostname, email as regex.h's format_regex spells them (with a
//     pattern: both); other formats are annotations;
//   - enum, const: exactly the value's compact JSON text (dump(): no spaces, objects' keys in the schema's order),
//     filtered by `type` when both are present; other keywords next to enum/const are not applied to them;
//   - anyOf, oneOf (treated as anyOf: the matcher does not check that exactly one branch matches), allOf with one
//     element, $ref to a JSON pointer into the same document ("#", "#/$defs/x", "#/definitions/x", ...),
//     recursive references included. anyOf/oneOf/allOf/$ref may only stand next to annotations, $defs and nullable;
//   - ignored: minimum, maximum, exclusiveMinimum, exclusiveMaximum (type integer still produces integers only),
//     other formats, and the annotations title, description, default, examples, $schema, $id, $comment, deprecated,
//     readOnly, writeOnly;
//   - anything else (patternProperties, if/then/else, not, dependentRequired, multipleOf, minProperties,
//     unevaluatedProperties, ...) throws ds::Error naming the keyword and the JSON pointer of the schema that has
//     it, as do malformed values ("minItems" must be a non-negative integer, ...) and schemas no finite JSON value
//     satisfies (a required property that recurses forever, minItems > maxItems, false).
// nlohmann::json (std::map) sorts object keys, so properties would come out in alphabetical order: pass an
// nlohmann::ordered_json (the server does) to keep the schema's order.
#pragma once
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace ds::sampling {

class Grammar;  // immutable, shareable between threads (defined in grammar.cpp)
using GrammarPtr = std::shared_ptr<const Grammar>;

// Any JSON object at top level (response_format {"type": "json_object"}). Always the same grammar (one per flag).
// compact (here and in grammar_json_schema): no whitespace between tokens at all (vLLM's disable_any_whitespace).
GrammarPtr grammar_json_object(bool compact = false);
// A JSON Schema (response_format {"type": "json_schema", "json_schema": {"schema": ...}}); throws ds::Error for an
// invalid or unsupported schema, naming the JSON pointer and the keyword. The same schema text gives the same
// grammar object while it is among the last few compiled (so TokenMasker's cache serves later requests too).
GrammarPtr grammar_json_schema(const nlohmann::ordered_json& schema, bool compact = false);
// Properties in alphabetical order (see above).
GrammarPtr grammar_json_schema(const nlohmann::json& schema, bool compact = false);
// Raw text that a regular expression matches as a whole (vLLM's structured_outputs.regex / guided_regex; the
// syntax is regex.h's). Throws ds::Error naming an unsupported construct and its position, or for a pattern that
// matches nothing. Cached as grammar_json_schema's grammars are (by the pattern).
GrammarPtr grammar_regex(std::string_view pattern);
// Raw text of a GBNF / EBNF grammar's "root" rule (vLLM's structured_outputs.grammar / guided_grammar, llama.cpp's
// grammar; the syntax is ebnf.h's). Throws ds::Error with the line and column of a syntax error, for an undefined
// rule, left recursion, or a grammar that no finite text satisfies. Cached as grammar_json_schema's (by the text).
GrammarPtr grammar_ebnf(std::string_view text);
// Free text with structured regions: vLLM's structural_tag, xgrammar's format objects (docs/server.md "Structured
// outputs", its structural tags). `spec` is {"type": "structural_tag", "format": FORMAT} or the older {"structures": [{"begin", "schema",
// "end"}], "triggers": [...]} (= triggered_tags of json_schema contents). FORMAT is one of
//   const_string {value}; json_schema {json_schema} (grammar_json_schema's language; style "json" only);
//   grammar {grammar} (GBNF); regex {pattern}; any_text {excludes} (well-formed UTF-8 without those strings);
//   sequence / or {elements}; optional / star / plus {content}; repeat {content, min, max (-1: unbounded)};
//   tag {begin, content, end (a string or a list)}: begin, the content, one of the ends;
//   triggered_tags {triggers, tags, at_least_one, stop_after_first, excludes}: free text until a trigger, which
//     must go on as one of the tags whose begin starts with it (each tag belongs to the shortest such trigger),
//     then free text again (stop_after_first: the end); at_least_one: a tag first, no free text before it;
//   tags_with_separator {tags, separator, at_least_one, stop_after_first}: tags and separators only;
//   dispatch {rules: [[pattern, FORMAT], ...], loop, excludes}: free text until a pattern, then its format.
// Free text is well-formed UTF-8; the first trigger or pattern completed in it (the longest where several end at
// the same byte) decides; the excludes never occur in it. Unlimited contents (any_text, triggered_tags, dispatch)
// directly inside a tag, or ending it through sequence / or / optional, never contain the tag's ends, so the first
// end closes the tag. Not supported (a ds::Error naming the field): token-level formats and delimiters,
// any_text's max_tokens / max_chars, json_schema's other styles and any_order. Unknown fields are errors. Cached as
// grammar_json_schema's grammars are (by the spec's text).
GrammarPtr grammar_structural_tag(const nlohmann::ordered_json& spec);
// Exactly one of the given strings (vLLM guided_choice), as raw bytes; throws if the list is empty.
GrammarPtr grammar_choice(const std::vector<std::string>& choices);

// One tool call in Qwen3.5's XML format (docs/server.md "Constrained tool calls"; text/tool_parser.h): the text
// after the <tool_call> token up to the </tool_call> token, which is an added token the grammar never spells:
//   "\n<function=" NAME ">\n" ( "<parameter=" KEY ">\n" VALUE "\n</parameter>\n" )* "</function>\n"
// tools: OpenAI's `tools` ({"type": "function", "function": {"name", "parameters", "strict"}} or the bare function).
// NAME: one of the tools' names (`only` non-empty: that one; tool_choice named). Parameters: the schema's
// `properties` in their order, the `required` ones mandatory, the others skippable, no other keys (additionalProperties
// is not used; without `properties`: any keys as for a free tool below; no `parameters`: none). VALUE as
// tool_param_value converts it, by the parser's type (`type`, a list's first type other than null, or string for an
// all-string enum):
//   - string: raw text (well-formed UTF-8, no controls but tab/LF/CR), minLength/maxLength in characters (at most
//     256; with a pattern, 10000), matching `pattern` as a whole where it has one, or exactly one of the enum/const
//     strings;
//   - integer, number, boolean, object, array with "string" in the type list: raw text, not "null" (any case,
//     between whitespace) unless null is listed too; enum/const there are refused;
//   - integer, number, boolean, object, array otherwise: the JSON of the schema with the type narrowed to the first
//     one (and null when listed: the parser converts by the first type only);
//   - anything else (anyOf, oneOf, $ref, const, a mixed enum, no type): the JSON of the schema (grammar_json_schema's
//     language and rules; JSON strings count as strings).
// No VALUE contains a tag the parser ends a value at (</parameter>, <parameter=, </function>, </tool_call>), raw or
// inside a JSON string (strings with more than 256 characters of bounds: '<' only escaped); a schema whose enum,
// const or property names hold one is refused. strict_only (tool_choice auto): the tools without "strict": true
// are free: any parameters, KEY 1 to 128 characters without whitespace, controls, '<' or '>', VALUE raw text.
// Throws ds::Error naming the tool (tools[i].function.parameters) and the JSON pointer, as grammar_json_schema does,
// for an unsupported or invalid schema, a name that cannot be spelled, or `only` not among the tools. Cached as
// grammar_json_schema's grammars are (by the tools' text and the options).
GrammarPtr grammar_tool_call(const nlohmann::ordered_json& tools, const std::string& only = "",
                             bool strict_only = false);

// A position in a grammar: the bytes accepted so far. Copyable (a few small vectors: cheap enough per step).
class Matcher {
 public:
  explicit Matcher(GrammarPtr g);
  // Consumes the bytes if the text so far + bytes is a prefix of some string of the language; otherwise returns
  // false and leaves the matcher unchanged.
  bool advance(std::string_view bytes);
  bool accepting() const { return accepting_; }        // the text so far is a complete string of the language
  bool can_continue() const { return !threads_.empty(); }  // some non-empty continuation exists
  const GrammarPtr& grammar() const { return g_; }
  // The complete position (threads and their stacks) as bytes: equal keys <=> equal positions of one grammar.
  std::string state_key() const;

  // Internal representation, shared with TokenMasker's walk (grammar.cpp).
  struct Frame {
    int32_t ret;     // node to continue at when the called rule returns
    int32_t parent;  // the frame below, -1 = bottom
  };
  struct Thread {
    int32_t node;   // a node with byte edges
    int32_t stack;  // top frame, -1 = empty stack
  };

 private:
  friend class TokenMasker;
  GrammarPtr g_;
  std::vector<Frame> frames_;    // compacted after every advance: only frames the threads use, no duplicates
  std::vector<Thread> threads_;  // sorted by (node, stack contents), no duplicates
  bool accepting_ = false;
};

// The vocabulary's tokens as byte strings (index = token id; an empty string = a token never allowed by a grammar,
// e.g. special tokens). Built once per tokenizer: a byte trie of the vocabulary in preorder, 11 bytes per trie
// node (Qwen3's 151k tokens: 333k nodes, 3.7 MB, built in ~40 ms) plus the token strings. allowed() walks the
// trie depth-first, stepping the matcher's threads one byte per trie edge and pruning a subtree at the first byte
// refused; one thread inside a string or number steps without closures or copies. Measured on one core with
// Qwen3's vocabulary (tests/unit/test_grammar.cpp prints them): ~4 ms inside a string (nearly every token
// allowed), < 0.05 ms at structural positions, ~2 us from the cache; ~10 ms inside a string with the vocabulary
// padded to 248k tokens (866k trie nodes).
// Thread-safe to use from several threads afterwards: the cache is mutex-guarded and each allowed() call walks
// with its own scratch buffers.
class TokenMasker {
 public:
  // cache_bytes bounds the masks kept per (grammar, position), least recently used out first (0: no cache).
  explicit TokenMasker(std::vector<std::string> token_bytes, size_t cache_bytes = size_t(64) << 20);
  int64_t vocab() const { return int64_t(tokens_.size()); }
  std::string_view token_bytes(int32_t id) const { return tokens_[size_t(id)]; }

  // bits (resized to (vocab()+31)/32 words): bit (id % 32) of word id / 32 set iff token id's bytes can follow the
  // matcher's text (m.advance(bytes) would succeed; never for empty tokens). End-of-sequence is the caller's
  // business: allow EOS where m.accepting() (no bit is set once !m.can_continue()). Results are cached per
  // (grammar object, m.state_key()): positions inside one string repeat; a bounded string's (maxLength) change
  // with every character, so those steps are cold.
  void allowed(const Matcher& m, std::vector<uint32_t>& bits) const;
  // The same without the cache (tests, timing).
  void allowed_uncached(const Matcher& m, std::vector<uint32_t>& bits) const;

  struct CacheStats {
    uint64_t hits = 0, misses = 0;
    size_t entries = 0;
  };
  CacheStats cache_stats() const;
  size_t trie_nodes() const { return byte_.size(); }

 private:
  void walk(const Matcher& m, uint32_t* bits) const;

  std::vector<std::string> tokens_;
  // The trie in preorder; node 0 is the root (the empty prefix). Children follow their parent; skip_[i] is the
  // first node after i's subtree; tok_off_[i] .. tok_off_[i + 1] index tok_ids_, the tokens spelled by node i.
  std::vector<uint8_t> byte_;
  std::vector<uint16_t> depth_;
  std::vector<int32_t> skip_;
  std::vector<int32_t> tok_off_;
  std::vector<int32_t> tok_ids_;
  int32_t max_depth_ = 0;

  // LRU cache: key = grammar id + state key -> mask.
  using Mask = std::shared_ptr<const std::vector<uint32_t>>;
  size_t cache_capacity_ = 0;  // entries
  mutable std::mutex mu_;
  mutable std::list<std::pair<std::string, Mask>> lru_;  // most recent first
  mutable std::unordered_map<std::string, std::list<std::pair<std::string, Mask>>::iterator> index_;
  mutable uint64_t hits_ = 0, misses_ = 0;
};

}  // namespace ds::sampling
