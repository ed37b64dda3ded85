// Regular expressions for structured output: parser, byte-level NFA, subset construction. See regex.h.
#include "sampling/regex.h"

#include <algorithm>
#include <map>
#include <memory>

#include "core/status.h"
#include "text/unicode.h"

namespace ds::sampling {

namespace {

constexpr uint32_t kMaxCp = 0x10FFFF;
constexpr size_t kMaxNfaStates = 1u << 18;

// A set of code points: sorted, disjoint, non-adjacent inclusive ranges.
using CpSet = std::vector<std::pair<uint32_t, uint32_t>>;

CpSet normalized(CpSet s) {
  std::sort(s.begin(), s.end());
  CpSet out;
  for (auto& r : s) {
    if (!out.empty() && r.first <= out.back().second + 1) out.back().second = std::max(out.back().second, r.second);
    else out.push_back(r);
  }
  return out;
}
// Everything but s (scalar values only: the surrogates are removed when a set is encoded).
CpSet complement(const CpSet& s) {
  CpSet out;
  uint32_t lo = 0;
  for (auto& [a, b] : s) {
    if (a > lo) out.push_back({lo, a - 1});
    lo = b + 1;
  }
  if (lo <= kMaxCp) out.push_back({lo, kMaxCp});
  return out;
}
CpSet minus(const CpSet& s, uint32_t lo, uint32_t hi) {
  CpSet out;
  for (auto [a, b] : s) {
    if (b < lo || a > hi) {
      out.push_back({a, b});
      continue;
    }
    if (a < lo) out.push_back({a, lo - 1});
    if (b > hi) out.push_back({hi + 1, b});
  }
  return out;
}
bool contains(const CpSet& s, uint32_t c) {
  for (auto& [a, b] : s)
    if (c >= a && c <= b) return true;
  return false;
}

const CpSet kDigit = {{'0', '9'}};
const CpSet kWord = normalized({{'0', '9'}, {'A', 'Z'}, {'_', '_'}, {'a', 'z'}});
const CpSet kSpace = normalized({{'\t', '\r'}, {' ', ' '}});  // \t \n \v \f \r and space

// Parsed pattern.
struct Node {
  enum Kind { kSet, kCat, kAlt, kRep } kind = kSet;
  CpSet set;
  std::vector<Node> kids;
  int min = 0, max = 0;  // kRep; max < 0: unbounded
};
Node make_node(Node::Kind k) {
  Node n;
  n.kind = k;
  return n;
}

class Parser {
 public:
  explicit Parser(std::string_view pattern) : text_(pattern) {
    for (size_t i = 0; i < pattern.size();) {  // decode UTF-8
      uint32_t cp = 0;
      const size_t n = text::unicode::utf8_decode(pattern.data() + i, pattern.size() - i, &cp);
      if (n == 0) fail("regex: the pattern is not valid UTF-8 (at byte ", i, ")");
      p_.push_back(cp);
      i += n;
    }
  }

  Node parse() {
    if (at('^')) ++i_;
    else if (at('\\') && i_ + 1 < p_.size() && p_[i_ + 1] == 'A') i_ += 2;
    Node n = alternation(0);
    if (i_ < p_.size()) error("unbalanced ')'");  // alternation stops only at ')' or the end
    return n;
  }

 private:
  [[noreturn]] void error(const std::string& what, size_t at) const {
    std::string shown(text_.substr(0, 200));
    if (text_.size() > 200) shown += "...";
    fail("regex: ", what, " at character ", at, " of the pattern \"", shown, "\"");
  }
  [[noreturn]] void error(const std::string& what) const { error(what, i_); }
  bool at(uint32_t c) const { return i_ < p_.size() && p_[i_] == c; }
  bool end() const { return i_ >= p_.size(); }
  // Whether position i_ is the pattern's end, or an end anchor that closes it.
  bool end_anchor() const {
    if (at('$')) return i_ + 1 == p_.size();
    return at('\\') && i_ + 2 == p_.size() && (p_[i_ + 1] == 'Z' || p_[i_ + 1] == 'z');
  }

  Node alternation(int depth) {
    if (depth > 200) error("groups nested more than 200 deep");
    Node alt = make_node(Node::kAlt);
    alt.kids.push_back(sequence(depth));
    while (at('|')) {
      ++i_;
      alt.kids.push_back(sequence(depth));
    }
    return alt.kids.size() == 1 ? std::move(alt.kids[0]) : std::move(alt);
  }

  Node sequence(int depth) {
    Node cat = make_node(Node::kCat);
    while (!end() && !at('|') && !at(')')) {
      if (end_anchor()) {
        i_ = p_.size();
        break;
      }
      Node atom_node = atom(depth);
      cat.kids.push_back(quantified(std::move(atom_node)));
    }
    return cat.kids.size() == 1 ? std::move(cat.kids[0]) : std::move(cat);
  }

  // {n}, {n,}, {n,m}, {,m} at i_ (i_ on '{'): true and the bounds when it is one; i_ moves past it.
  bool braces(int& min, int& max) {
    size_t j = i_ + 1;
    auto number = [&](int& v) {
      const size_t s = j;
      int64_t x = 0;
      while (j < p_.size() && p_[j] >= '0' && p_[j] <= '9') {
        x = std::min<int64_t>(x * 10 + (p_[j] - '0'), int64_t(1) << 40);
        ++j;
      }
      if (j == s) return false;
      if (x > kMaxRegexRepeat)
        error(str_cat("a repetition bound of ", x, " (at most ", kMaxRegexRepeat, " is supported)"), s);
      v = int(x);
      return true;
    };
    min = 0;
    max = -1;
    const bool has_min = number(min);
    if (j < p_.size() && p_[j] == '}') {
      if (!has_min) return false;
      max = min;
    } else if (j < p_.size() && p_[j] == ',') {
      ++j;
      const bool has_max = number(max);
      if (!has_min && !has_max) return false;
      if (j >= p_.size() || p_[j] != '}') return false;
      if (!has_max) max = -1;
    } else {
      return false;
    }
    if (max >= 0 && min > max) error(str_cat("the repetition {", min, ",", max, "} has its bounds reversed"));
    i_ = j + 1;
    return true;
  }

  Node quantified(Node atom_node) {
    for (;;) {
      int min = 0, max = 0;
      const size_t q = i_;
      if (at('*')) min = 0, max = -1, ++i_;
      else if (at('+')) min = 1, max = -1, ++i_;
      else if (at('?')) min = 0, max = 1, ++i_;
      else if (!(at('{') && braces(min, max))) return atom_node;
      if (at('?')) ++i_;  // lazy: the same language
      else if (at('+')) error("a possessive quantifier", i_);
      if (atom_node.kind == Node::kRep && rep_ends_at_ == q) error("a quantifier after a quantifier", q);
      Node r = make_node(Node::kRep);
      r.min = min;
      r.max = max;
      r.kids.push_back(std::move(atom_node));
      atom_node = std::move(r);
      rep_ends_at_ = i_;
    }
  }

  Node atom(int depth) {
    const size_t start = i_;
    const uint32_t c = p_[i_];
    switch (c) {
      case '(': {
        ++i_;
        if (at('?')) {
          ++i_;
          if (at(':')) {
            ++i_;
          } else if (at('P') && i_ + 1 < p_.size() && p_[i_ + 1] == '<') {
            i_ += 2;
            group_name(start);
          } else if (at('<') && i_ + 1 < p_.size() && p_[i_ + 1] != '=' && p_[i_ + 1] != '!') {
            ++i_;
            group_name(start);
          } else if (at('=') || at('!')) {
            error("lookahead \"(?" + std::string(1, char(p_[i_])) + "\" is not supported", start);
          } else if (at('<')) {
            error("lookbehind is not supported", start);
          } else if (at('>')) {
            error("an atomic group \"(?>\" is not supported", start);
          } else if (at('(')) {
            error("a conditional \"(?(\" is not supported", start);
          } else if (at('P') && i_ + 1 < p_.size() && p_[i_ + 1] == '=') {
            error("a backreference \"(?P=\" is not supported", start);
          } else if (at('#')) {
            error("a comment group \"(?#\" is not supported", start);
          } else {
            error("inline flags \"(?...)\" are not supported", start);
          }
        }
        Node inner = alternation(depth + 1);
        if (!at(')')) error("a '(' that is never closed", start);
        ++i_;
        return inner;
      }
      case ')': error("unbalanced ')'");
      case '[': return set_node(bracket());
      case '.': ++i_; return set_node(complement({{'\n', '\n'}}));
      case '^': error("an anchor '^' that is not at the start of the pattern (it is implied there)");
      case '$': error("an anchor '$' that is not at the end of the pattern (it is implied there)");
      case '*':
      case '+':
      case '?': error(str_cat("a quantifier '", char(c), "' with nothing to repeat"));
      case '{': {
        int a, b;
        if (braces(a, b)) error("a quantifier '{' with nothing to repeat", start);
        ++i_;
        return set_node({{c, c}});
      }
      case '\\': {
        CpSet s;
        escape(false, s);
        return set_node(s);
      }
      default: ++i_; return set_node({{c, c}});
    }
  }

  void group_name(size_t start) {
    const size_t s = i_;
    while (!end() && !at('>')) {
      const uint32_t c = p_[i_];
      if (!(c == '_' || (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c >= 0x80))
        error("a group name with a character other than letters, digits and '_'", i_);
      ++i_;
    }
    if (end() || i_ == s) error("a named group without a name or its '>'", start);
    ++i_;
  }

  static Node set_node(CpSet s) {
    Node n = make_node(Node::kSet);
    n.set = normalized(std::move(s));
    return n;
  }

  uint32_t hex(size_t digits, size_t start) {
    uint32_t v = 0;
    for (size_t k = 0; k < digits; ++k) {
      if (end()) error("an escape with too few hex digits", start);
      const uint32_t c = p_[i_];
      const int d = c >= '0' && c <= '9' ? int(c - '0') : c >= 'a' && c <= 'f' ? int(c - 'a' + 10)
                  : c >= 'A' && c <= 'F' ? int(c - 'A' + 10) : -1;
      if (d < 0) error("an escape with too few hex digits", start);
      v = v * 16 + uint32_t(d);
      ++i_;
    }
    return v;
  }

  // An escape at i_ (on the backslash), added to `out`; returns true for a single character (a class bound).
  bool escape(bool in_class, CpSet& out) {
    const size_t start = i_;
    ++i_;
    if (end()) error("a pattern that ends in a lone backslash", start);
    const uint32_t c = p_[i_++];
    auto one = [&](uint32_t x) {
      if (x > kMaxCp || (x >= 0xD800 && x <= 0xDFFF))
        error(str_cat("an escape for U+", std::hex, x, ", which is not a Unicode scalar value"), start);
      out.push_back({x, x});
      return true;
    };
    switch (c) {
      case 'n': return one('\n');
      case 'r': return one('\r');
      case 't': return one('\t');
      case 'f': return one('\f');
      case 'v': return one('\v');
      case 'a': return one(0x07);
      case 'e': return one(0x1B);
      case '0':
        if (!end() && p_[i_] >= '0' && p_[i_] <= '7') error("an octal escape is not supported", start);
        return one(0);
      case 'x': return one(hex(2, start));
      case 'U': return one(hex(8, start));
      case 'u':
        if (at('{')) {
          ++i_;
          uint32_t v = 0;
          size_t n = 0;
          while (!end() && !at('}')) {
            if (++n > 6) error("a \\u{...} escape with more than 6 hex digits", start);
            v = v * 16 + hex(1, start);
          }
          if (end() || n == 0) error("a \\u{ escape without its hex digits and '}'", start);
          ++i_;
          return one(v);
        }
        return one(hex(4, start));
      case 'd': out.insert(out.end(), kDigit.begin(), kDigit.end()); return false;
      case 'w': out.insert(out.end(), kWord.begin(), kWord.end()); return false;
      case 's': out.insert(out.end(), kSpace.begin(), kSpace.end()); return false;
      case 'D': for (auto r : complement(kDigit)) out.push_back(r); return false;
      case 'W': for (auto r : complement(kWord)) out.push_back(r); return false;
      case 'S': for (auto r : complement(kSpace)) out.push_back(r); return false;
      case 'b':
        if (in_class) return one(0x08);  // [\b] is a backspace
        error("a word boundary \\b is not supported", start);
      case 'B': error("\\B is not supported", start);
      case 'A': error("an anchor \\A that is not at the start of the pattern", start);
      case 'Z':
      case 'z': error(str_cat("an anchor \\", char(c), " that is not at the end of the pattern"), start);
      case 'p':
      case 'P': error("Unicode properties (\\p{...}) are not supported", start);
      case 'N': error("named characters (\\N{...}) are not supported", start);
      case 'k': error("a backreference \\k is not supported", start);
      case 'G': error("\\G is not supported", start);
      default: break;
    }
    if (c >= '1' && c <= '9') error("a backreference \\" + std::string(1, char(c)) + " is not supported", start);
    if (c < 0x80 && ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')))
      error("an unknown escape \\" + std::string(1, char(c)), start);
    return one(c);  // punctuation, space or a non-ASCII character: itself
  }

  CpSet bracket() {
    const size_t start = i_;
    ++i_;
    bool negate = false;
    if (at('^')) negate = true, ++i_;
    CpSet s;
    bool first = true;
    for (;;) {
      if (end()) error("a '[' that is never closed", start);
      if (at(']') && !first) {
        ++i_;
        break;
      }
      first = false;
      // One item: a character (maybe a range's start) or a class shorthand.
      uint32_t lo = 0;
      if (at('\\')) {
        CpSet one;
        if (!escape(true, one)) {
          s.insert(s.end(), one.begin(), one.end());
          continue;
        }
        lo = one[0].first;
      } else {
        lo = p_[i_++];
      }
      if (at('-') && i_ + 1 < p_.size() && p_[i_ + 1] != ']') {
        const size_t dash = i_;
        ++i_;
        uint32_t hi = 0;
        if (at('\\')) {
          CpSet one;
          if (!escape(true, one)) error("a class shorthand (\\d, \\w, \\s ...) as a range's end", dash);
          hi = one[0].first;
        } else {
          hi = p_[i_++];
        }
        if (hi < lo) error("a character range with its ends reversed", dash);
        s.push_back({lo, hi});
      } else {
        s.push_back({lo, lo});
      }
    }
    s = normalized(std::move(s));
    return negate ? complement(s) : s;
  }

  std::string_view text_;
  std::vector<uint32_t> p_;
  size_t i_ = 0;
  size_t rep_ends_at_ = size_t(-1);
};

// ---------------------------------------------------------------------------------------------------------------
// Thompson NFA over bytes.

struct Nfa {
  struct Edge {
    uint8_t lo, hi;
    int32_t to;
  };
  struct State {
    std::vector<Edge> edges;
    std::vector<int32_t> eps;
    bool mid = false;  // inside a character's bytes
  };
  std::vector<State> s;

  int32_t add(bool mid = false) {
    if (s.size() >= kMaxNfaStates)
      fail("regex: the pattern is too large (its automaton needs more than ", kMaxNfaStates,
           " states: large bounded repetitions, nested); simplify it");
    s.emplace_back();
    s.back().mid = mid;
    return int32_t(s.size() - 1);
  }
};

int utf8_len(uint32_t c) { return c < 0x80 ? 1 : c < 0x800 ? 2 : c < 0x10000 ? 3 : 4; }

using Seq = std::vector<std::pair<uint8_t, uint8_t>>;  // byte ranges, one per byte position

// The byte-range sequences spelling the code points lo..hi in UTF-8 (the usual split into ranges where every
// byte position is a full range between the ends' bytes).
void utf8_ranges(uint32_t lo, uint32_t hi, std::vector<Seq>& out) {
  static constexpr uint32_t kLenMax[] = {0x7F, 0x7FF, 0xFFFF};
  for (uint32_t m : kLenMax)
    if (lo <= m && hi > m) {
      utf8_ranges(lo, m, out);
      utf8_ranges(m + 1, hi, out);
      return;
    }
  const int n = utf8_len(lo);
  for (int i = 1; i < n; ++i) {
    const uint32_t m = (uint32_t(1) << (6 * i)) - 1;
    if ((lo & ~m) != (hi & ~m)) {
      if ((lo & m) != 0) {
        utf8_ranges(lo, lo | m, out);
        utf8_ranges((lo | m) + 1, hi, out);
        return;
      }
      if ((hi & m) != m) {
        utf8_ranges(lo, (hi & ~m) - 1, out);
        utf8_ranges(hi & ~m, hi, out);
        return;
      }
    }
  }
  std::string a, b;
  text::unicode::utf8_append(a, lo);
  text::unicode::utf8_append(b, hi);
  Seq seq;
  for (int k = 0; k < n; ++k) seq.push_back({uint8_t(a[size_t(k)]), uint8_t(b[size_t(k)])});
  out.push_back(std::move(seq));
}

class NfaBuilder {
 public:
  NfaBuilder(Nfa& nfa, RegexEncoding enc) : n_(nfa), enc_(enc) {}

  // The node's automaton from `in`; returns its end state.
  int32_t build(const Node& node, int32_t in) {
    switch (node.kind) {
      case Node::kSet: {
        const int32_t out = n_.add();
        chars(node.set, in, out);
        return out;
      }
      case Node::kCat:
        for (auto& k : node.kids) in = build(k, in);
        return in;
      case Node::kAlt: {
        const int32_t out = n_.add();
        for (auto& k : node.kids) {
          const int32_t s = n_.add();
          n_.s[size_t(in)].eps.push_back(s);
          n_.s[size_t(build(k, s))].eps.push_back(out);
        }
        return out;
      }
      case Node::kRep: {
        const Node& k = node.kids[0];
        for (int r = 0; r < node.min; ++r) in = build(k, in);
        if (node.max < 0) {
          const int32_t loop = n_.add();
          n_.s[size_t(in)].eps.push_back(loop);
          n_.s[size_t(build(k, loop))].eps.push_back(loop);
          return loop;
        }
        const int32_t out = n_.add();
        for (int r = node.min; r < node.max; ++r) {
          n_.s[size_t(in)].eps.push_back(out);
          in = build(k, in);
        }
        n_.s[size_t(in)].eps.push_back(out);
        return out;
      }
    }
    return in;
  }

 private:
  // Edges from `in` to `out` spelling one character of the set, in the encoding.
  void chars(CpSet set, int32_t in, int32_t out) {
    set = minus(set, 0xD800, 0xDFFF);
    if (enc_ == RegexEncoding::kJsonString) {
      // The escapes, as a trie from `in` (all of a set's escapes share "\\", "\\u00", ...: a handful of states).
      std::vector<std::string> escapes;
      for (char c : {'"', '\\', '/'})
        if (contains(set, uint8_t(c))) escapes.push_back(std::string("\\") + c);
      static constexpr std::pair<uint32_t, char> kShort[] = {{0x08, 'b'}, {0x0C, 'f'}, {'\n', 'n'}, {'\r', 'r'},
                                                              {'\t', 't'}};
      for (auto [cp, e] : kShort)
        if (contains(set, cp)) escapes.push_back(std::string("\\") + e);
      for (uint32_t cp = 0; cp < 0x20; ++cp) {
        if (!contains(set, cp)) continue;
        const std::string head = std::string("\\u00") + char('0' + (cp >> 4));
        const uint32_t d = cp & 15;
        if (d < 10) {
          escapes.push_back(head + char('0' + d));
        } else {
          escapes.push_back(head + char('a' + d - 10));
          escapes.push_back(head + char('A' + d - 10));
        }
      }
      std::map<std::string, int32_t> prefix;
      for (const std::string& e : escapes) {
        int32_t at = in;
        for (size_t k = 0; k + 1 < e.size(); ++k) {
          auto [it, added] = prefix.emplace(e.substr(0, k + 1), -1);
          if (added) {
            it->second = n_.add(true);
            n_.s[size_t(at)].edges.push_back({uint8_t(e[k]), uint8_t(e[k]), it->second});
          }
          at = it->second;
        }
        n_.s[size_t(at)].edges.push_back({uint8_t(e.back()), uint8_t(e.back()), out});
      }
      set = minus(minus(minus(set, 0, 0x1F), '"', '"'), '\\', '\\');
    }
    // UTF-8: each sequence's first byte from `in`, its rest through states shared by every sequence with the same
    // rest (a whole-Unicode class needs ~10 states, not one chain per sequence).
    std::vector<Seq> seqs;
    for (auto [lo, hi] : set) utf8_ranges(lo, hi, seqs);
    std::map<Seq, int32_t> tails;
    for (const Seq& seq : seqs) {
      const int32_t next = tail(seq, 1, out, tails);  // first: it may grow n_.s
      n_.s[size_t(in)].edges.push_back({seq[0].first, seq[0].second, next});
    }
  }

  // The state from which seq[i..] leads to `out` (memoized by the rest).
  int32_t tail(const Seq& seq, size_t i, int32_t out, std::map<Seq, int32_t>& tails) {
    if (i == seq.size()) return out;
    Seq rest(seq.begin() + std::ptrdiff_t(i), seq.end());
    if (auto it = tails.find(rest); it != tails.end()) return it->second;
    const int32_t node = n_.add(true);
    const int32_t next = tail(seq, i + 1, out, tails);
    n_.s[size_t(node)].edges.push_back({seq[i].first, seq[i].second, next});
    tails.emplace(std::move(rest), node);
    return node;
  }

  Nfa& n_;
  RegexEncoding enc_;
};

}  // namespace

bool RegexDfa::matches(std::string_view text) const {
  if (accept.empty()) return false;
  int32_t s = 0;
  for (char c : text) {
    s = step(s, uint8_t(c));
    if (s < 0) return false;
  }
  return accept[size_t(s)] != 0;
}

RegexDfa compile_regex(std::string_view pattern, RegexEncoding enc) {
  const Node tree = Parser(pattern).parse();
  Nfa nfa;
  const int32_t start = nfa.add();
  const int32_t final_state = NfaBuilder(nfa, enc).build(tree, start);

  // Subset construction: DFA states are epsilon-closed sets of NFA states.
  std::vector<char> seen(nfa.s.size(), 0);
  // A work budget (NFA states visited), so an automaton of a few thousand states whose sets hold thousands of NFA
  // states each ((.{0,1000}){10}) is refused in well under a second instead of taking minutes.
  int64_t budget = kMaxRegexWork;
  auto spend = [&](int64_t n) {
    if ((budget -= n) < 0)
      fail("regex: the pattern is too large (its deterministic automaton takes more than ", kMaxRegexWork,
           " steps to build: nested or overlapping bounded repetitions); simplify it");
  };
  auto closure = [&](std::vector<int32_t> set) {
    spend(int64_t(set.size()));
    std::vector<int32_t> work = set;
    for (int32_t x : set) seen[size_t(x)] = 1;
    while (!work.empty()) {
      const int32_t x = work.back();
      work.pop_back();
      spend(int64_t(nfa.s[size_t(x)].eps.size()));
      for (int32_t e : nfa.s[size_t(x)].eps)
        if (!seen[size_t(e)]) {
          seen[size_t(e)] = 1;
          set.push_back(e);
          work.push_back(e);
        }
    }
    for (int32_t x : set) seen[size_t(x)] = 0;
    // Only states with byte edges and the final state tell sets apart.
    std::erase_if(set, [&](int32_t x) { return nfa.s[size_t(x)].edges.empty() && x != final_state; });
    std::sort(set.begin(), set.end());
    return set;
  };
  RegexDfa d;
  std::map<std::vector<int32_t>, int32_t> ids;
  std::vector<std::vector<int32_t>> sets;
  auto id_of = [&](std::vector<int32_t> set) {
    auto [it, added] = ids.emplace(std::move(set), int32_t(sets.size()));
    if (added) {
      if (sets.size() >= kMaxRegexStates)
        fail("regex: the pattern is too large (its deterministic automaton needs more than ", kMaxRegexStates,
             " states: e.g. bounded repetitions of alternatives that overlap); simplify it");
      sets.push_back(it->first);
      d.next.resize(d.next.size() + 256, -1);
      const auto& st = it->first;
      d.accept.push_back(std::binary_search(st.begin(), st.end(), final_state) ? 1 : 0);
      const bool mid = std::any_of(st.begin(), st.end(), [&](int32_t x) { return nfa.s[size_t(x)].mid; });
      d.boundary.push_back(mid ? 0 : 1);
    }
    return it->second;
  };
  id_of(closure({start}));
  for (size_t k = 0; k < sets.size(); ++k) {
    const std::vector<int32_t> set = sets[k];  // copy: id_of may grow `sets`
    std::vector<uint16_t> cuts{0, 256};
    for (int32_t x : set)
      for (auto& e : nfa.s[size_t(x)].edges) cuts.insert(cuts.end(), {uint16_t(e.lo), uint16_t(e.hi + 1)});
    std::sort(cuts.begin(), cuts.end());
    cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
    for (size_t c = 0; c + 1 < cuts.size(); ++c) {
      const uint16_t lo = cuts[c], hi = uint16_t(cuts[c + 1] - 1);
      std::vector<int32_t> to;
      spend(int64_t(set.size()));
      for (int32_t x : set)
        for (auto& e : nfa.s[size_t(x)].edges)
          if (e.lo <= lo && hi <= e.hi) to.push_back(e.to);
      if (to.empty()) continue;
      std::sort(to.begin(), to.end());
      to.erase(std::unique(to.begin(), to.end()), to.end());
      const int32_t t = id_of(closure(std::move(to)));
      for (uint32_t b = lo; b <= hi; ++b) d.next[k * 256 + b] = t;
    }
  }
  return d;
}

RegexDfa intersect(const RegexDfa& a, const RegexDfa& b) {
  RegexDfa d;
  std::map<std::pair<int32_t, int32_t>, int32_t> ids;
  std::vector<std::pair<int32_t, int32_t>> pairs;
  auto id_of = [&](int32_t x, int32_t y) {
    auto [it, added] = ids.emplace(std::make_pair(x, y), int32_t(pairs.size()));
    if (added) {
      if (pairs.size() >= kMaxRegexStates)
        fail("regex: the intersection of two patterns needs more than ", kMaxRegexStates, " states; simplify them");
      pairs.push_back({x, y});
      d.next.resize(d.next.size() + 256, -1);
      d.accept.push_back(a.accept[size_t(x)] && b.accept[size_t(y)]);
      d.boundary.push_back(a.boundary[size_t(x)]);
    }
    return it->second;
  };
  id_of(0, 0);
  for (size_t k = 0; k < pairs.size(); ++k) {
    const auto [x, y] = pairs[k];
    for (int c = 0; c < 256; ++c) {
      const int32_t tx = a.step(x, uint8_t(c)), ty = b.step(y, uint8_t(c));
      if (tx >= 0 && ty >= 0) d.next[k * 256 + size_t(c)] = id_of(tx, ty);
    }
  }
  return d;
}

const char* format_regex(std::string_view format) {
#define DS_DAY28 "(0[1-9]|1[0-9]|2[0-8])"
// Years 0001-9999 (Python's date range); February 29 in leap years only (divisible by 4, centuries by 400).
#define DS_YEAR "(000[1-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-9][0-9]{3})"
#define DS_DATE                                                                                             \
  "(" DS_YEAR "-((0[13578]|1[02])-(" DS_DAY28 "|29|30|31)|(0[469]|11)-(" DS_DAY28 "|29|30)|02-" DS_DAY28 ")" \
  "|([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)-02-29)"
#define DS_TIME "([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\\.[0-9]{1,9})?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
#define DS_LABEL "[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
#define DS_HOST "(" DS_LABEL "\\.)*" DS_LABEL
#define DS_ATOM "[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
#define DS_OCTET "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
#define DS_HEX(n) "[0-9a-fA-F]{" #n "}"
  static const std::pair<std::string_view, const char*> kFormats[] = {
      {"date", DS_DATE},
      {"time", DS_TIME},
      {"date-time", DS_DATE "[Tt]" DS_TIME},
      {"uuid", DS_HEX(8) "-" DS_HEX(4) "-" DS_HEX(4) "-" DS_HEX(4) "-" DS_HEX(12)},
      {"ipv4", "(" DS_OCTET "\\.){3}" DS_OCTET},
      {"hostname", DS_HOST},
      {"email", DS_ATOM "(\\." DS_ATOM ")*@" DS_HOST},
  };
#undef DS_DAY28
#undef DS_YEAR
#undef DS_DATE
#undef DS_TIME
#undef DS_LABEL
#undef DS_HOST
#undef DS_ATOM
#undef DS_OCTET
#undef DS_HEX
  for (auto& [name, re] : kFormats)
    if (name == format) return re;
  return nullptr;
}

}  // namespace ds::sampling
