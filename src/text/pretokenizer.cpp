#include "text/pretokenizer.h"

#include <utf8proc.h>

#include <memory>

#include "core/status.h"
#include "text/unicode.h"

namespace ds::text {

namespace {

using unicode::kCategoryMask;
using unicode::kWhiteSpace;

// Category bit masks over utf8proc's UTF8PROC_CATEGORY_* numbering.
constexpr uint32_t bit(int c) { return 1u << c; }
constexpr uint32_t kL = bit(UTF8PROC_CATEGORY_LU) | bit(UTF8PROC_CATEGORY_LL) | bit(UTF8PROC_CATEGORY_LT) |
                        bit(UTF8PROC_CATEGORY_LM) | bit(UTF8PROC_CATEGORY_LO);
constexpr uint32_t kM = bit(UTF8PROC_CATEGORY_MN) | bit(UTF8PROC_CATEGORY_MC) | bit(UTF8PROC_CATEGORY_ME);
constexpr uint32_t kN = bit(UTF8PROC_CATEGORY_ND) | bit(UTF8PROC_CATEGORY_NL) | bit(UTF8PROC_CATEGORY_NO);
constexpr uint32_t kP = bit(UTF8PROC_CATEGORY_PC) | bit(UTF8PROC_CATEGORY_PD) | bit(UTF8PROC_CATEGORY_PS) |
                        bit(UTF8PROC_CATEGORY_PE) | bit(UTF8PROC_CATEGORY_PI) | bit(UTF8PROC_CATEGORY_PF) |
                        bit(UTF8PROC_CATEGORY_PO);
constexpr uint32_t kS = bit(UTF8PROC_CATEGORY_SM) | bit(UTF8PROC_CATEGORY_SC) | bit(UTF8PROC_CATEGORY_SK) |
                        bit(UTF8PROC_CATEGORY_SO);
constexpr uint32_t kZ = bit(UTF8PROC_CATEGORY_ZS) | bit(UTF8PROC_CATEGORY_ZL) | bit(UTF8PROC_CATEGORY_ZP);
constexpr uint32_t kC = bit(UTF8PROC_CATEGORY_CN) | bit(UTF8PROC_CATEGORY_CC) | bit(UTF8PROC_CATEGORY_CF) |
                        bit(UTF8PROC_CATEGORY_CS) | bit(UTF8PROC_CATEGORY_CO);

bool category_mask_by_name(const std::string& name, uint32_t* mask) {
  static const struct {
    const char* name;
    uint32_t mask;
  } kNames[] = {
      {"L", kL}, {"Lu", bit(UTF8PROC_CATEGORY_LU)}, {"Ll", bit(UTF8PROC_CATEGORY_LL)},
      {"Lt", bit(UTF8PROC_CATEGORY_LT)}, {"Lm", bit(UTF8PROC_CATEGORY_LM)}, {"Lo", bit(UTF8PROC_CATEGORY_LO)},
      {"M", kM}, {"Mn", bit(UTF8PROC_CATEGORY_MN)}, {"Mc", bit(UTF8PROC_CATEGORY_MC)},
      {"Me", bit(UTF8PROC_CATEGORY_ME)}, {"N", kN}, {"Nd", bit(UTF8PROC_CATEGORY_ND)},
      {"Nl", bit(UTF8PROC_CATEGORY_NL)}, {"No", bit(UTF8PROC_CATEGORY_NO)}, {"P", kP},
      {"Pc", bit(UTF8PROC_CATEGORY_PC)}, {"Pd", bit(UTF8PROC_CATEGORY_PD)}, {"Ps", bit(UTF8PROC_CATEGORY_PS)},
      {"Pe", bit(UTF8PROC_CATEGORY_PE)}, {"Pi", bit(UTF8PROC_CATEGORY_PI)}, {"Pf", bit(UTF8PROC_CATEGORY_PF)},
      {"Po", bit(UTF8PROC_CATEGORY_PO)}, {"S", kS}, {"Sm", bit(UTF8PROC_CATEGORY_SM)},
      {"Sc", bit(UTF8PROC_CATEGORY_SC)}, {"Sk", bit(UTF8PROC_CATEGORY_SK)}, {"So", bit(UTF8PROC_CATEGORY_SO)},
      {"Z", kZ}, {"Zs", bit(UTF8PROC_CATEGORY_ZS)}, {"Zl", bit(UTF8PROC_CATEGORY_ZL)},
      {"Zp", bit(UTF8PROC_CATEGORY_ZP)}, {"C", kC}, {"Cc", bit(UTF8PROC_CATEGORY_CC)},
      {"Cf", bit(UTF8PROC_CATEGORY_CF)}, {"Cs", bit(UTF8PROC_CATEGORY_CS)}, {"Co", bit(UTF8PROC_CATEGORY_CO)},
      {"Cn", bit(UTF8PROC_CATEGORY_CN)},
  };
  for (auto& n : kNames)
    if (name == n.name) {
      *mask = n.mask;
      return true;
    }
  return false;
}

// Parsed pattern.
struct Node {
  enum Kind { kAlt, kCat, kRep, kChar, kClass, kAny, kLook } kind;
  std::vector<std::unique_ptr<Node>> kids;
  uint32_t cp = 0;
  bool fold = false;  // kChar: case-insensitive
  int cls = -1;       // kClass: index into classes
  int min = 0, max = 0;
  bool negate = false;  // kLook
  explicit Node(Kind k) : kind(k) {}
};
using NodeP = std::unique_ptr<Node>;

bool single_char(const Node& n) { return n.kind == Node::kChar || n.kind == Node::kClass || n.kind == Node::kAny; }

bool can_be_empty(const Node& n) {
  switch (n.kind) {
    case Node::kChar:
    case Node::kClass:
    case Node::kAny: return false;
    case Node::kLook: return true;
    case Node::kRep: return n.min == 0 || can_be_empty(*n.kids[0]);
    case Node::kCat:
      for (auto& k : n.kids)
        if (!can_be_empty(*k)) return false;
      return true;
    case Node::kAlt:
      for (auto& k : n.kids)
        if (can_be_empty(*k)) return true;
      return false;
  }
  return true;
}

}  // namespace

bool SplitRegex::CharClass::test_slow(uint32_t cp, uint8_t prop) const {
  int cat = prop & kCategoryMask;
  bool hit = (category_mask >> cat) & 1;
  if (!hit && not_category_mask) hit = !((not_category_mask >> cat) & 1);
  if (!hit && white_space) hit = prop & kWhiteSpace;
  if (!hit && not_white_space) hit = !(prop & kWhiteSpace);
  if (!hit)
    for (auto& r : ranges)
      if (cp >= r.first && cp <= r.second) {
        hit = true;
        break;
      }
  return hit != negate;
}

struct RegexCompiler {
  std::string pattern;
  std::vector<uint32_t> p;  // pattern as code points
  size_t i = 0;
  std::vector<SplitRegex::CharClass> classes;
  std::vector<SplitRegex::Inst> prog;

  [[noreturn]] void error(const std::string& what) {
    fail("unsupported or invalid pre-tokenizer regex: ", what, " at code point ", i, " of pattern '", pattern, "'");
  }
  bool at_end() const { return i >= p.size(); }
  uint32_t peek() const { return i < p.size() ? p[i] : 0; }

  NodeP parse_alt(bool& icase) {
    auto alt = std::make_unique<Node>(Node::kAlt);
    alt->kids.push_back(parse_cat(icase));
    while (!at_end() && peek() == '|') {
      ++i;
      alt->kids.push_back(parse_cat(icase));
    }
    if (alt->kids.size() == 1) return std::move(alt->kids[0]);
    return alt;
  }

  NodeP parse_cat(bool& icase) {
    auto cat = std::make_unique<Node>(Node::kCat);
    while (!at_end() && peek() != '|' && peek() != ')') {
      NodeP atom = parse_atom(icase);
      if (!atom) continue;  // inline flag group like (?i)
      cat->kids.push_back(parse_quantifiers(std::move(atom)));
    }
    return cat;
  }

  NodeP parse_quantifiers(NodeP atom) {
    while (!at_end()) {
      uint32_t c = peek();
      int mn, mx;
      if (c == '?') mn = 0, mx = 1;
      else if (c == '*') mn = 0, mx = -1;
      else if (c == '+') mn = 1, mx = -1;
      else if (c == '{') {
        size_t save = i;
        ++i;
        auto num = [&](int* out) {
          if (at_end() || peek() < '0' || peek() > '9') return false;
          int v = 0;
          while (!at_end() && peek() >= '0' && peek() <= '9') {
            v = v * 10 + int(peek() - '0');
            if (v > 100000) error("repeat count too large");
            ++i;
          }
          *out = v;
          return true;
        };
        if (!num(&mn)) {
          i = save;
          error("'{' that does not start a {n,m} quantifier (escape it as \\{)");
        }
        mx = mn;
        if (peek() == ',') {
          ++i;
          if (!num(&mx)) mx = -1;
        }
        if (peek() != '}') error("expected '}' to close {n,m}");
        if (mx != -1 && mx < mn) error("{n,m} with m < n");
      } else {
        break;
      }
      ++i;
      if (!at_end() && peek() == '?') error("lazy quantifier (not used by tokenizer patterns)");
      if (!at_end() && peek() == '+') error("possessive quantifier");
      if (atom->kind == Node::kLook) error("quantified lookahead");
      auto rep = std::make_unique<Node>(Node::kRep);
      rep->min = mn;
      rep->max = mx;
      rep->kids.push_back(std::move(atom));
      atom = std::move(rep);
    }
    return atom;
  }

  // Parses flags after "(?" up to ':' or ')'. Returns true for a scoped group "(?i:".
  bool parse_flags(bool& icase) {
    bool on = true;
    while (!at_end()) {
      uint32_t c = p[i++];
      if (c == 'i') icase = on;
      else if (c == '-') on = false;
      else if (c == ':') return true;
      else if (c == ')') return false;
      else error(str_cat("regex flag '", char(c), "' (only i is supported)"));
    }
    error("unterminated group");
  }

  NodeP make_class(SplitRegex::CharClass cc) {
    auto n = std::make_unique<Node>(Node::kClass);
    n->cls = int(classes.size());
    classes.push_back(std::move(cc));
    return n;
  }

  // \p{Name} or \pX after the 'p' / 'P'.
  uint32_t parse_property() {
    std::string name;
    if (peek() == '{') {
      ++i;
      while (!at_end() && peek() != '}') name += char(p[i++]);
      if (at_end()) error("unterminated \\p{...}");
      ++i;
    } else if (!at_end()) {
      name = char(p[i++]);
    }
    uint32_t mask;
    if (!category_mask_by_name(name, &mask)) error("unknown Unicode property '" + name + "' (general categories only)");
    return mask;
  }

  uint32_t parse_hex(size_t max_digits, bool braced) {
    uint32_t v = 0;
    size_t n = 0;
    while (!at_end() && n < max_digits) {
      uint32_t c = peek(), d;
      if (c >= '0' && c <= '9') d = c - '0';
      else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
      else break;
      v = v * 16 + d;
      ++i, ++n;
    }
    if (n == 0) error("expected hex digits");
    if (braced) {
      if (peek() != '}') error("expected '}' after \\x{...");
      ++i;
    }
    if (v > 0x10FFFF) error("code point out of range");
    return v;
  }

  // After a backslash: a class shorthand (fills cc, returns true) or a literal (sets *lit, returns false).
  bool parse_escape(SplitRegex::CharClass& cc, uint32_t* lit) {
    if (at_end()) error("pattern ends with a backslash");
    uint32_t c = p[i++];
    switch (c) {
      case 'r': *lit = '\r'; return false;
      case 'n': *lit = '\n'; return false;
      case 't': *lit = '\t'; return false;
      case 'f': *lit = '\f'; return false;
      case 'v': *lit = '\v'; return false;
      case '0': *lit = 0; return false;
      case 'x':
        if (peek() == '{') {
          ++i;
          *lit = parse_hex(8, true);
        } else {
          *lit = parse_hex(2, false);
        }
        return false;
      case 's': cc.white_space = true; return true;
      case 'S': cc.not_white_space = true; return true;
      case 'd': cc.category_mask |= bit(UTF8PROC_CATEGORY_ND); return true;
      case 'D': cc.not_category_mask |= bit(UTF8PROC_CATEGORY_ND); return true;
      case 'p': cc.category_mask |= parse_property(); return true;
      case 'P': {
        uint32_t m = parse_property();
        if (cc.not_category_mask && cc.not_category_mask != m) error("two different \\P{...} in one class");
        cc.not_category_mask = m;
        return true;
      }
      default:
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
          error(str_cat("escape \\", char(c)));
        *lit = c;  // escaped punctuation is itself
        return false;
    }
  }

  NodeP parse_bracket(bool icase) {
    // at '[' already consumed
    SplitRegex::CharClass cc;
    if (peek() == '^') {
      cc.negate = true;
      ++i;
    }
    bool first = true;
    while (true) {
      if (at_end()) error("unterminated [...] class");
      uint32_t c = p[i];
      if (c == ']' && !first) {
        ++i;
        break;
      }
      first = false;
      if (c == '[') error("nested [...] class or POSIX bracket");
      ++i;
      uint32_t lo;
      if (c == '\\') {
        if (parse_escape(cc, &lo)) continue;
      } else {
        lo = c;
      }
      uint32_t hi = lo;
      if (peek() == '-' && i + 1 < p.size() && p[i + 1] != ']') {
        ++i;
        uint32_t c2 = p[i++];
        if (c2 == '\\') {
          SplitRegex::CharClass dummy;
          if (parse_escape(dummy, &hi)) error("class shorthand as a range end");
        } else {
          hi = c2;
        }
        if (hi < lo) error("range with end before start");
      }
      cc.ranges.emplace_back(lo, hi);
    }
    if (icase && !cc.ranges.empty()) error("literal characters in a class inside a case-insensitive group");
    return make_class(std::move(cc));
  }

  NodeP parse_atom(bool& icase) {
    uint32_t c = p[i++];
    switch (c) {
      case '(': {
        bool inner_icase = icase;
        if (peek() == '?') {
          ++i;
          uint32_t k = peek();
          if (k == ':') {
            ++i;
          } else if (k == '=' || k == '!') {
            ++i;
            auto look = std::make_unique<Node>(Node::kLook);
            look->negate = (k == '!');
            look->kids.push_back(parse_alt(inner_icase));
            if (peek() != ')') error("expected ')' to close lookahead");
            ++i;
            return look;
          } else if (k == '<') {
            error("lookbehind or named group");
          } else if (!parse_flags(inner_icase)) {
            icase = inner_icase;  // (?i) applies to the rest of the enclosing group
            return nullptr;
          }
        }
        NodeP inner = parse_alt(inner_icase);
        if (peek() != ')') error("expected ')'");
        ++i;
        return inner;
      }
      case ')': error("unbalanced ')'");
      case '[': return parse_bracket(icase);
      case '.': {
        return std::make_unique<Node>(Node::kAny);
      }
      case '^':
      case '$': error(str_cat("anchor '", char(c), "'"));
      case '*':
      case '+':
      case '?':
      case '{': error(str_cat("quantifier '", char(c), "' with nothing to repeat"));
      case '\\': {
        SplitRegex::CharClass cc;
        uint32_t lit;
        // Note: properties keep their meaning under (?i); only \p{Lu}/\p{Ll}/\p{Lt} would differ from
        // Oniguruma there, and tokenizer patterns do not put them in case-insensitive groups.
        if (parse_escape(cc, &lit)) return make_class(std::move(cc));
        c = lit;
        break;
      }
      default: break;
    }
    auto n = std::make_unique<Node>(Node::kChar);
    n->fold = icase;
    n->cp = icase ? unicode::simple_fold(c) : c;
    return n;
  }

  // ---- code generation ----
  int emit(SplitRegex::Inst inst) {
    prog.push_back(inst);
    return int(prog.size()) - 1;
  }

  void gen_atom(const Node& n) {
    SplitRegex::Inst in{};
    if (n.kind == Node::kChar) {
      in.op = n.fold ? SplitRegex::Op::kCharFold : SplitRegex::Op::kChar;
      in.arg = n.cp;
    } else if (n.kind == Node::kClass) {
      in.op = SplitRegex::Op::kClass;
      in.arg = uint32_t(n.cls);
    } else {
      in.op = SplitRegex::Op::kAny;
    }
    emit(in);
  }

  void gen(const Node& n) {
    using Op = SplitRegex::Op;
    switch (n.kind) {
      case Node::kChar:
      case Node::kClass:
      case Node::kAny: gen_atom(n); break;
      case Node::kCat:
        for (auto& k : n.kids) gen(*k);
        break;
      case Node::kAlt: {
        // split L1, next; L1: alt1; jmp end; next: split L2, next2; ...
        std::vector<int> jumps;
        for (size_t a = 0; a < n.kids.size(); ++a) {
          int split = -1;
          if (a + 1 < n.kids.size()) split = emit({Op::kSplit});
          if (split >= 0) prog[split].x = split + 1;
          gen(*n.kids[a]);
          if (a + 1 < n.kids.size()) {
            jumps.push_back(emit({Op::kJmp}));
            prog[split].y = int(prog.size());
          }
        }
        for (int j : jumps) prog[j].x = int(prog.size());
        break;
      }
      case Node::kRep: {
        const Node& body = *n.kids[0];
        if (single_char(body)) {
          // One instruction consumes the whole run and backtracks one code point at a time.
          SplitRegex::Inst in{Op::kRepeat};
          in.x = n.min;
          in.y = n.max;
          emit(in);
          gen_atom(body);
          break;
        }
        if (can_be_empty(body) && n.max != n.min) error("quantified sub-expression that can match empty");
        size_t copies = size_t(n.min) + (n.max < 0 ? 1 : size_t(n.max - n.min));
        if (copies > 1000) error("repetition expands to more than 1000 copies");
        for (int k = 0; k < n.min; ++k) gen(body);
        if (n.max < 0) {
          int loop = emit({Op::kSplit});
          prog[loop].x = loop + 1;
          gen(body);
          SplitRegex::Inst j{Op::kJmp};
          j.x = loop;
          emit(j);
          prog[loop].y = int(prog.size());
        } else {
          std::vector<int> splits;
          for (int k = n.min; k < n.max; ++k) {
            int s = emit({Op::kSplit});
            prog[s].x = s + 1;
            splits.push_back(s);
            gen(body);
          }
          for (int s : splits) prog[s].y = int(prog.size());
        }
        break;
      }
      case Node::kLook: {
        // look (sub at +2); jmp after; sub...; match; after:
        SplitRegex::Inst look{Op::kLook};
        look.negate = n.negate;
        int l = emit(look);
        int j = emit({Op::kJmp});
        prog[l].x = l + 2;
        gen(*n.kids[0]);
        emit({Op::kMatch});
        prog[j].x = int(prog.size());
        break;
      }
    }
  }
};

SplitRegex SplitRegex::compile(std::string_view pattern) {
  RegexCompiler c;
  c.pattern = std::string(pattern);
  std::vector<uint32_t> offsets;
  try {
    unicode::utf8_to_code_points(pattern, c.p, offsets);
  } catch (const Error&) {
    fail("expected the pre-tokenizer regex to be valid UTF-8, got invalid bytes in '", pattern, "'");
  }
  if (c.p.empty()) fail("expected a non-empty pre-tokenizer regex, got an empty pattern");
  bool icase = false;
  NodeP root = c.parse_alt(icase);
  if (!c.at_end()) c.error("unbalanced ')'");
  c.gen(*root);
  c.emit({Op::kMatch});

  SplitRegex r;
  r.pattern_ = std::string(pattern);
  r.prog_ = std::move(c.prog);
  r.classes_ = std::move(c.classes);
  for (auto& cc : r.classes_)
    for (uint32_t cp = 0; cp < 128; ++cp)
      if (cc.test_slow(cp, unicode::properties(cp))) cc.ascii[cp >> 6] |= uint64_t(1) << (cp & 63);
  return r;
}

bool SplitRegex::atom_matches(const Inst& a, uint32_t cp, uint8_t prop) const {
  switch (a.op) {
    case Op::kChar: return cp == a.arg;
    case Op::kCharFold: return unicode::simple_fold(cp) == a.arg;
    case Op::kClass: return classes_[a.arg].test(cp, prop);
    case Op::kAny: return cp != '\n';
    default: return false;
  }
}

namespace {
// Backtracking stack with inline storage: most matches need a handful of frames, and run() is called once
// per pre-token, so avoid a heap allocation per call.
struct Frame {
  int32_t pc;
  bool repeat;   // true: a greedy run that can give back code points down to `lo`
  uint32_t pos;
  uint32_t lo;
};
class FrameStack {
 public:
  void push(Frame f) {
    if (n_ < kInline) inline_[n_] = f;
    else heap_.push_back(f);
    ++n_;
  }
  bool empty() const { return n_ == 0; }
  Frame pop() {
    --n_;
    if (n_ < kInline) return inline_[n_];
    Frame f = heap_.back();
    heap_.pop_back();
    return f;
  }

 private:
  static constexpr size_t kInline = 32;
  Frame inline_[kInline];
  std::vector<Frame> heap_;
  size_t n_ = 0;
};
}  // namespace

int64_t SplitRegex::run(const Input& in, size_t pos_in, int32_t pc, bool* hit_end) const {
  FrameStack stack;
  uint32_t pos = uint32_t(pos_in);
  const uint32_t n = uint32_t(in.n);
  while (true) {
    const Inst& ins = prog_[size_t(pc)];
    bool ok = true;
    switch (ins.op) {
      case Op::kChar:
      case Op::kCharFold:
      case Op::kClass:
      case Op::kAny:
        if (pos < n && atom_matches(ins, in.cps[pos], in.props[pos])) {
          ++pos;
          ++pc;
        } else {
          if (pos >= n && hit_end) *hit_end = true;
          ok = false;
        }
        break;
      case Op::kRepeat: {
        const Inst& atom = prog_[size_t(pc) + 1];
        uint32_t limit = ins.y < 0 ? n : std::min<uint32_t>(n, pos + uint32_t(ins.y));
        uint32_t e = pos;
        while (e < limit && atom_matches(atom, in.cps[e], in.props[e])) ++e;
        if (e >= n && hit_end) *hit_end = true;
        if (e - pos < uint32_t(ins.x)) {
          ok = false;
          break;
        }
        uint32_t lo = pos + uint32_t(ins.x);
        if (e > lo) stack.push({pc + 2, true, e - 1, lo});
        pos = e;
        pc += 2;
        break;
      }
      case Op::kSplit:
        stack.push({ins.y, false, pos, 0});
        pc = ins.x;
        break;
      case Op::kJmp: pc = ins.x; break;
      case Op::kLook: {
        bool matched = run(in, pos, ins.x, hit_end) >= 0;
        if (matched != ins.negate) ++pc;
        else ok = false;
        break;
      }
      case Op::kMatch: return pos;
    }
    if (ok) continue;
    if (stack.empty()) return -1;
    Frame f = stack.pop();
    pc = f.pc;
    pos = f.pos;
    if (f.repeat && f.pos > f.lo) stack.push({f.pc, true, f.pos - 1, f.lo});
  }
}

int64_t SplitRegex::match_at(const Input& in, size_t pos) const { return run(in, pos, 0, nullptr); }

void SplitRegex::split_text(std::string_view s, const std::function<void(size_t, size_t)>& emit) const {
  const uint8_t* table = unicode::property_table();
  size_t window = 8192;  // code points; grows if one match attempt needs more
  std::vector<uint32_t> cps, off;
  std::vector<uint8_t> props;
  size_t base = 0;  // byte offset where the next window starts
  size_t gap = 0;   // byte offset where the current unmatched gap starts (= end of the last piece)
  while (base < s.size()) {
    cps.resize(window);
    props.resize(window);
    off.resize(window + 1);
    size_t n = 0, i = base;
    while (i < s.size() && n < window) {
      uint8_t b = uint8_t(s[i]);
      uint32_t cp;
      size_t len = 1;
      if (b < 0x80) {
        cp = b;
      } else {
        len = unicode::utf8_decode(s.data() + i, s.size() - i, &cp);
        if (len == 0) fail("expected valid UTF-8 text, got an invalid byte sequence at byte ", i);
      }
      cps[n] = cp;
      props[n] = table[cp];
      off[n] = uint32_t(i - base);
      ++n;
      i += len;
    }
    off[n] = uint32_t(i - base);
    const bool last = i == s.size();
    Input in{cps.data(), props.data(), n};
    size_t pos = 0;
    bool need_more = false;
    while (pos < n) {
      bool hit_end = false;
      int64_t end = run(in, pos, 0, last ? nullptr : &hit_end);
      if (hit_end) {
        need_more = true;
        break;
      }
      if (end > int64_t(pos)) {
        size_t a = base + off[pos], e = base + off[size_t(end)];
        if (gap < a) emit(gap, a);
        emit(a, e);
        gap = e;
        pos = size_t(end);
      } else {
        ++pos;
      }
    }
    if (need_more && pos == 0) {
      window *= 2;  // one attempt spans the whole window
      continue;
    }
    base += off[pos];
  }
  if (gap < s.size()) emit(gap, s.size());
}

}  // namespace ds::text
