// GBNF / EBNF grammar text -> rules. See ebnf.h.
#include "sampling/ebnf.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <set>

#include "core/status.h"
#include "sampling/regex.h"
#include "text/unicode.h"

namespace ds::sampling {

namespace {

bool name_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.';
}

class Parser {
 public:
  explicit Parser(std::string_view t) : t_(t) {}

  EbnfGrammar parse() {
    EbnfGrammar g;
    std::set<std::string> names;
    skip();
    if (end()) fail("grammar: the text defines no rules (expected \"root ::= ...\")");
    while (!end()) {
      const size_t at = i_;
      if (!name_char(t_[i_])) error("expected a rule name");
      std::string name = read_name();
      skip();
      if (t_.substr(i_, 3) != "::=") error("expected '::=' after the rule name '" + name + "'");
      i_ += 3;
      if (!names.insert(name).second) error("the rule '" + name + "' is defined twice", at);
      EbnfExpr body = alternatives(0);
      if (at_char(')')) error("unbalanced ')'");
      g.rules.emplace_back(std::move(name), std::move(body));
      skip();
    }
    if (!names.count("root")) fail("grammar: no rule named \"root\" (the grammar's start: \"root ::= ...\")");
    for (auto& [name, body] : g.rules) check_refs(body, names);
    return g;
  }

 private:
  [[noreturn]] void error(const std::string& what, size_t at) const {
    size_t line = 1, col = 1;
    for (size_t k = 0; k < at && k < t_.size(); ++k) {
      if (t_[k] == '\n') ++line, col = 1;
      else ++col;
    }
    fail("grammar: ", what, " at line ", line, ", column ", col);
  }
  [[noreturn]] void error(const std::string& what) const { error(what, i_); }
  bool end() const { return i_ >= t_.size(); }
  bool at_char(char c) const { return i_ < t_.size() && t_[i_] == c; }

  // Whitespace (newlines included) and comments.
  void skip() {
    while (!end()) {
      if (t_[i_] == ' ' || t_[i_] == '\t' || t_[i_] == '\n' || t_[i_] == '\r') {
        ++i_;
      } else if (t_[i_] == '#') {
        while (!end() && t_[i_] != '\n') ++i_;
      } else {
        break;
      }
    }
  }
  std::string read_name() {
    const size_t s = i_;
    while (!end() && name_char(t_[i_])) ++i_;
    return std::string(t_.substr(s, i_ - s));
  }
  // Whether a new rule starts at i_ ("name ::=").
  bool rule_starts() const {
    size_t j = i_;
    while (j < t_.size() && name_char(t_[j])) ++j;
    if (j == i_) return false;
    while (j < t_.size() && (t_[j] == ' ' || t_[j] == '\t' || t_[j] == '\n' || t_[j] == '\r')) ++j;
    return t_.substr(j, 3) == "::=";
  }

  EbnfExpr alternatives(int depth) {
    if (depth > 100) error("groups nested more than 100 deep");
    EbnfExpr alt;
    alt.kind = EbnfExpr::kAlt;
    alt.kids.push_back(sequence(depth));
    while (at_char('|')) {
      ++i_;
      alt.kids.push_back(sequence(depth));
    }
    return alt.kids.size() == 1 ? std::move(alt.kids[0]) : std::move(alt);
  }

  EbnfExpr sequence(int depth) {
    EbnfExpr seq;
    seq.kind = EbnfExpr::kSeq;
    for (;;) {
      skip();
      if (end() || at_char('|') || at_char(')') || (depth == 0 && rule_starts())) break;
      seq.kids.push_back(repeated(item(depth)));
    }
    return seq.kids.size() == 1 ? std::move(seq.kids[0]) : std::move(seq);
  }

  EbnfExpr repeated(EbnfExpr x) {
    for (;;) {
      const size_t at = i_;
      int min = 0, max = 0;
      if (at_char('*')) min = 0, max = -1, ++i_;
      else if (at_char('+')) min = 1, max = -1, ++i_;
      else if (at_char('?')) min = 0, max = 1, ++i_;
      else if (at_char('{')) braces(min, max);
      else return x;
      EbnfExpr r;
      r.kind = EbnfExpr::kRepeat;
      r.min = min;
      r.max = max;
      r.pos = at;
      r.kids.push_back(std::move(x));
      x = std::move(r);
    }
  }

  void braces(int& min, int& max) {
    const size_t at = i_;
    ++i_;
    auto number = [&](int& v) {
      skip();
      const size_t s = i_;
      int64_t x = 0;
      while (!end() && t_[i_] >= '0' && t_[i_] <= '9') x = std::min<int64_t>(x * 10 + (t_[i_++] - '0'), 1 << 30);
      if (i_ == s) return false;
      if (x > kMaxRegexRepeat)
        error(str_cat("a repetition bound of ", x, " (at most ", kMaxRegexRepeat, " is supported)"), s);
      v = int(x);
      skip();
      return true;
    };
    if (!number(min)) error("expected a number after '{'", at);
    max = min;
    if (at_char(',')) {
      ++i_;
      if (!number(max)) max = -1;
    }
    if (!at_char('}')) error("expected '}' to close the repetition", at);
    ++i_;
    if (max >= 0 && min > max) error(str_cat("the repetition {", min, ",", max, "} has its bounds reversed"), at);
  }

  EbnfExpr item(int depth) {
    const size_t at = i_;
    EbnfExpr e;
    e.pos = at;
    const char c = t_[i_];
    if (c == '"' || c == '\'') {
      ++i_;
      e.kind = EbnfExpr::kLiteral;
      for (;;) {
        if (end() || t_[i_] == '\n') error("a string that is never closed", at);
        if (t_[i_] == c) break;
        text::unicode::utf8_append(e.text, character(at));
      }
      ++i_;
      return e;
    }
    if (c == '[') {
      ++i_;
      e.kind = EbnfExpr::kClass;
      e.text = "[";
      if (at_char('^')) e.text += '^', ++i_;
      for (;;) {
        if (end()) error("a '[' that is never closed", at);
        if (at_char(']')) break;
        const uint32_t lo = character(at);
        uint32_t hi = lo;
        if (at_char('-') && i_ + 1 < t_.size() && t_[i_ + 1] != ']') {
          ++i_;
          hi = character(at);
          if (hi < lo) error("a character range with its ends reversed", at);
        }
        char buf[40];
        std::snprintf(buf, sizeof buf, "\\u{%X}-\\u{%X}", lo, hi);
        e.text += buf;
      }
      ++i_;
      e.text += ']';
      if (e.text == "[]") error("an empty character class", at);
      if (e.text == "[^]") e.text = "[\\s\\S]";
      return e;
    }
    if (c == '.') {
      ++i_;
      e.kind = EbnfExpr::kClass;
      e.text = "[\\s\\S]";
      return e;
    }
    if (c == '(') {
      ++i_;
      skip();
      if (at_char('=') || at_char('!')) error("lookahead assertions are not supported", at);
      EbnfExpr inner = alternatives(depth + 1);
      skip();
      if (!at_char(')')) error("a '(' that is never closed", at);
      ++i_;
      return inner;
    }
    if (name_char(c)) {
      e.kind = EbnfExpr::kRef;
      e.text = read_name();
      if (at_char('(')) error("macros (a rule name followed by '(') are not supported", at);
      return e;
    }
    error(std::string("unexpected '") + c + "'");
  }

  // One character of a literal or class (an escape or a UTF-8 sequence) at i_.
  uint32_t character(size_t item_at) {
    const uint8_t c = uint8_t(t_[i_]);
    if (c == '\\') {
      const size_t at = i_;
      ++i_;
      if (end()) error("a backslash at the end of the text", at);
      const char e = t_[i_++];
      auto hex = [&](int n) {
        uint32_t v = 0;
        for (int k = 0; k < n; ++k) {
          if (end() || !std::isxdigit(uint8_t(t_[i_]))) error("an escape with too few hex digits", at);
          const char h = t_[i_++];
          v = v * 16 + uint32_t(h <= '9' ? h - '0' : (h | 0x20) - 'a' + 10);
        }
        if (v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) error("an escape that is not a Unicode scalar value", at);
        return v;
      };
      switch (e) {
        case 'n': return '\n';
        case 'r': return '\r';
        case 't': return '\t';
        case '0': return 0;
        case 'x': return hex(2);
        case 'u': return hex(4);
        case 'U': return hex(8);
        case '\\': case '"': case '\'': case '[': case ']': case '-': case '^': case '/': return uint8_t(e);
        default: error(std::string("an unknown escape \\") + e, at);
      }
    }
    // UTF-8.
    uint32_t cp = 0;
    const size_t n = text::unicode::utf8_decode(t_.data() + i_, t_.size() - i_, &cp);
    if (n == 0) error("text that is not valid UTF-8", item_at);
    i_ += n;
    return cp;
  }

  void check_refs(const EbnfExpr& e, const std::set<std::string>& names) const {
    if (e.kind == EbnfExpr::kRef && !names.count(e.text))
      error("the rule '" + e.text + "' is used but never defined", e.pos);
    for (auto& k : e.kids) check_refs(k, names);
  }

  std::string_view t_;
  size_t i_ = 0;
};

}  // namespace

EbnfGrammar parse_ebnf(std::string_view text) { return Parser(text).parse(); }

}  // namespace ds::sampling
