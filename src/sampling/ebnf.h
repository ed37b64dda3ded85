// Grammars in GBNF / EBNF text for structured output (docs/server.md "Structured outputs"): vLLM's
// structured_outputs.grammar / guided_grammar (xgrammar's EBNF) and llama.cpp's `grammar` (GBNF), parsed here into
// rules; grammar.cpp's grammar_ebnf compiles them into the byte-level automaton.
//
// Syntax (GBNF, as llama.cpp and xgrammar read it):
//   name ::= alternatives        a rule; names are letters, digits, '-', '_' and '.'; "root" is the start
//   a b c                        a sequence; a | b alternatives; ( ... ) a group
//   "text"                       a literal, escapes \n \r \t \\ \" \' \[ \] \xHH \uHHHH \UHHHHHHHH
//   [a-z0-9_] [^"\\]             a character class (ranges, negation, the same escapes); . any character
//   x* x+ x? x{m} x{m,} x{m,n}   repetitions (bounds up to 1000)
//   # ...                        a comment to the end of the line
// A rule runs until the next "name ::=" (or the end), so a definition may span lines as in either tool. Refused with
// the line and column: an undefined rule, a rule defined twice, no root, xgrammar's extensions (lookahead assertions
// "(= ...)", macros), anything else that is not the syntax above. Left recursion is refused when compiled.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ds::sampling {

struct EbnfExpr {
  enum Kind { kLiteral, kClass, kRef, kAlt, kSeq, kRepeat } kind = kSeq;
  // kLiteral: the text's UTF-8 bytes; kClass: the class as a regular expression (regex.h, code points escaped);
  // kRef: the rule's name.
  std::string text;
  std::vector<EbnfExpr> kids;  // kAlt: alternatives; kSeq: items (none: the empty text); kRepeat: the item
  int min = 0, max = 0;        // kRepeat; max < 0: unbounded
  size_t pos = 0;              // its byte offset in the text (errors)
};

struct EbnfGrammar {
  std::vector<std::pair<std::string, EbnfExpr>> rules;  // in the text's order
};

// Throws ds::Error ("grammar: ... at line L, column C") for text outside the syntax, an undefined or twice-defined
// rule, or no "root".
EbnfGrammar parse_ebnf(std::string_view text);

}  // namespace ds::sampling
