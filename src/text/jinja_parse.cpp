// Lexer and parser of the Jinja subset. Whitespace rules follow Jinja2's lexer: `-` strips all
// whitespace on its side, trim_blocks drops the newline after a block/comment tag, lstrip_blocks drops
// spaces/tabs before a block/comment tag that starts its line, `+` disables lstrip.
#include <algorithm>
#include <cstring>

#include "core/status.h"
#include "text/jinja_ast.h"

namespace ds::jinja::detail {
namespace {

enum class Tok { kText, kVarBegin, kVarEnd, kBlockBegin, kBlockEnd, kCommentBegin, kCommentEnd, kName,
                 kString, kInt, kFloat, kOp, kEof };

struct Token {
  Tok type;
  std::string text;  // text, name, operator, decoded string literal, number spelling
  int line = 0, col = 0;
  char ws = 0;  // begin/end tags: '-', '+' or 0
};

const char* tok_name(Tok t) {
  switch (t) {
    case Tok::kText: return "text";
    case Tok::kVarBegin: return "'{{'";
    case Tok::kVarEnd: return "'}}'";
    case Tok::kBlockBegin: return "'{%'";
    case Tok::kBlockEnd: return "'%}'";
    case Tok::kCommentBegin: return "'{#'";
    case Tok::kCommentEnd: return "'#}'";
    case Tok::kName: return "name";
    case Tok::kString: return "string";
    case Tok::kInt: return "integer";
    case Tok::kFloat: return "float";
    case Tok::kOp: return "operator";
    case Tok::kEof: return "end of template";
  }
  return "?";
}

std::string describe(const Token& t) {
  switch (t.type) {
    case Tok::kName: return "name '" + t.text + "'";
    case Tok::kOp: return "'" + t.text + "'";
    case Tok::kString: return "string literal";
    case Tok::kInt:
    case Tok::kFloat: return "number " + t.text;
    default: return tok_name(t.type);
  }
}

bool is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

class Lexer {
 public:
  explicit Lexer(std::string src) : src_(std::move(src)) {
    line_starts_.push_back(0);
    for (size_t i = 0; i < src_.size(); ++i)
      if (src_[i] == '\n') line_starts_.push_back(i + 1);
  }

  std::vector<Token> run() {
    size_t pos = 0;
    while (pos <= src_.size()) {
      size_t p = find_tag(pos);
      push(Tok::kText, src_.substr(pos, p - pos), pos);
      if (p >= src_.size()) break;
      char kind = src_[p + 1];
      size_t q = p + 2;
      char wsl = 0;
      if (q < src_.size() && (src_[q] == '-' || src_[q] == '+')) wsl = src_[q++];
      if (kind == '#') {
        size_t e = src_.find("#}", q);
        if (e == std::string::npos) error_at(p, "expected '#}' closing the comment, got end of template");
        push(Tok::kCommentBegin, "", p).ws = wsl;
        push(Tok::kCommentEnd, "", e).ws = (e > q && src_[e - 1] == '-') ? '-' : 0;
        pos = e + 2;
        continue;
      }
      bool block = kind == '%';
      push(block ? Tok::kBlockBegin : Tok::kVarBegin, "", p).ws = wsl;
      size_t tag_start = tokens_.size();
      pos = lex_tag(q, block);
      if (block && tokens_.size() == tag_start + 2 && tokens_[tag_start].type == Tok::kName &&
          tokens_[tag_start].text == "raw")
        pos = lex_raw(pos);
    }
    push(Tok::kEof, "", src_.size());
    return tokens_;
  }

  [[noreturn]] void error_at(size_t off, const std::string& msg) const {
    auto [l, c] = line_col(off);
    fail("template line ", l, ", column ", c, ": ", msg);
  }

  std::pair<int, int> line_col(size_t off) const {
    auto it = std::upper_bound(line_starts_.begin(), line_starts_.end(), off);
    size_t li = static_cast<size_t>(it - line_starts_.begin()) - 1;
    return {static_cast<int>(li + 1), static_cast<int>(off - line_starts_[li] + 1)};
  }

 private:
  size_t find_tag(size_t pos) const {
    while (true) {
      size_t p = src_.find('{', pos);
      if (p == std::string::npos || p + 1 >= src_.size()) return src_.size();
      char c = src_[p + 1];
      if (c == '{' || c == '%' || c == '#') return p;
      pos = p + 1;
    }
  }

  Token& push(Tok t, std::string text, size_t off) {
    auto [l, c] = line_col(off);
    tokens_.push_back(Token{t, std::move(text), l, c, 0});
    return tokens_.back();
  }

  // Tokens inside {{ }} or {% %} up to the closing marker (outside brackets); returns the offset after it.
  size_t lex_tag(size_t pos, bool block) {
    const char* close = block ? "%}" : "}}";
    int depth = 0;
    size_t n = src_.size();
    while (true) {
      while (pos < n && is_ws(src_[pos])) ++pos;
      if (pos >= n) error_at(pos, std::string("expected '") + close + "', got end of template");
      if (depth == 0) {
        if (src_[pos] == '-' && src_.compare(pos + 1, 2, close) == 0) {
          push(block ? Tok::kBlockEnd : Tok::kVarEnd, "", pos).ws = '-';
          return pos + 3;
        }
        if (src_.compare(pos, 2, close) == 0) {
          push(block ? Tok::kBlockEnd : Tok::kVarEnd, "", pos);
          return pos + 2;
        }
      }
      char c = src_[pos];
      if (c == '\'' || c == '"') {
        pos = lex_string(pos);
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        size_t s = pos;
        bool is_float = false;
        while (pos < n && (std::isdigit(static_cast<unsigned char>(src_[pos])) || src_[pos] == '_')) ++pos;
        if (pos + 1 < n && src_[pos] == '.' && std::isdigit(static_cast<unsigned char>(src_[pos + 1]))) {
          is_float = true;
          ++pos;
          while (pos < n && (std::isdigit(static_cast<unsigned char>(src_[pos])) || src_[pos] == '_')) ++pos;
        }
        if (pos < n && (src_[pos] == 'e' || src_[pos] == 'E')) {
          size_t e = pos + 1;
          if (e < n && (src_[e] == '+' || src_[e] == '-')) ++e;
          if (e < n && std::isdigit(static_cast<unsigned char>(src_[e]))) {
            is_float = true;
            pos = e;
            while (pos < n && std::isdigit(static_cast<unsigned char>(src_[pos]))) ++pos;
          }
        }
        std::string num;
        for (size_t k = s; k < pos; ++k)
          if (src_[k] != '_') num += src_[k];
        push(is_float ? Tok::kFloat : Tok::kInt, num, s);
      } else if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t s = pos;
        while (pos < n && (std::isalnum(static_cast<unsigned char>(src_[pos])) || src_[pos] == '_')) ++pos;
        push(Tok::kName, src_.substr(s, pos - s), s);
      } else {
        static const char* ops[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<",
                                    ">", "=", ".", ",", ":", "|", "(", ")", "[", "]", "{", "}"};
        const char* found = nullptr;
        for (const char* op : ops)
          if (src_.compare(pos, std::strlen(op), op) == 0) {
            found = op;
            break;
          }
        if (!found) error_at(pos, std::string("expected an expression token, got '") + c + "'");
        std::string op = found;
        if (op == "(" || op == "[" || op == "{") ++depth;
        if (op == ")" || op == "]" || op == "}") {
          if (depth == 0) error_at(pos, "unexpected '" + op + "'");
          --depth;
        }
        push(Tok::kOp, op, pos);
        pos += op.size();
      }
    }
  }

  size_t lex_string(size_t pos) {
    char q = src_[pos];
    size_t s = pos++;
    std::string out;
    while (true) {
      if (pos >= src_.size()) error_at(s, "expected the closing quote of this string, got end of template");
      char c = src_[pos];
      if (c == q) break;
      if (c == '\\' && pos + 1 < src_.size()) {
        char e = src_[pos + 1];
        pos += 2;
        switch (e) {
          case 'n': out += '\n'; break;
          case 't': out += '\t'; break;
          case 'r': out += '\r'; break;
          case '0': out += '\0'; break;
          case 'a': out += '\a'; break;
          case 'b': out += '\b'; break;
          case 'f': out += '\f'; break;
          case 'v': out += '\v'; break;
          case '\\': out += '\\'; break;
          case '\'': out += '\''; break;
          case '"': out += '"'; break;
          case '\n': break;
          case 'x':
          case 'u':
          case 'U': {
            size_t len = e == 'x' ? 2 : e == 'u' ? 4 : 8;
            if (pos + len > src_.size()) error_at(pos, "expected hex digits after \\" + std::string(1, e));
            char32_t cp = static_cast<char32_t>(std::stoul(src_.substr(pos, len), nullptr, 16));
            pos += len;
            out += utf8_encode(std::u32string(1, cp));
            break;
          }
          default: out += '\\'; out += e;
        }
        continue;
      }
      out += c;
      ++pos;
    }
    push(Tok::kString, out, s);
    return pos + 1;
  }

  // {% raw %}...{% endraw %}: the content is text, verbatim.
  size_t lex_raw(size_t pos) {
    tokens_.resize(tokens_.size() - 3);  // drop '{%' 'raw' '%}'
    size_t p = pos;
    while (true) {
      p = src_.find("{%", p);
      if (p == std::string::npos) error_at(pos, "expected '{% endraw %}', got end of template");
      size_t q = p + 2;
      if (q < src_.size() && (src_[q] == '-' || src_[q] == '+')) ++q;
      while (q < src_.size() && is_ws(src_[q])) ++q;
      if (src_.compare(q, 6, "endraw") == 0) {
        size_t e = src_.find("%}", q);
        if (e == std::string::npos) error_at(q, "expected '%}', got end of template");
        push(Tok::kText, src_.substr(pos, p - pos), pos);
        return e + 2;
      }
      p += 2;
    }
  }

  std::string src_;
  std::vector<size_t> line_starts_;
  std::vector<Token> tokens_;
};

void apply_whitespace(std::vector<Token>& toks, bool trim_blocks, bool lstrip_blocks) {
  for (size_t i = 0; i < toks.size(); ++i) {
    if (toks[i].type != Tok::kText) continue;
    std::string& t = toks[i].text;
    bool line_starting = i == 0;
    if (i > 0) {
      const Token& prev = toks[i - 1];
      bool block_like = prev.type == Tok::kBlockEnd || prev.type == Tok::kCommentEnd;
      if (prev.ws == '-') {
        size_t k = 0;
        while (k < t.size() && is_ws(t[k])) ++k;
        line_starting = k > 0 && t[k - 1] == '\n';
        t.erase(0, k);
      } else if (block_like && trim_blocks && !t.empty() && t[0] == '\n') {
        t.erase(0, 1);
        line_starting = true;
      }
    }
    if (i + 1 < toks.size()) {
      const Token& next = toks[i + 1];
      bool block_like = next.type == Tok::kBlockBegin || next.type == Tok::kCommentBegin;
      if (next.ws == '-' && next.type != Tok::kText) {
        size_t k = t.size();
        while (k > 0 && is_ws(t[k - 1])) --k;
        t.resize(k);
      } else if (block_like && lstrip_blocks && next.ws != '+') {
        size_t nl = t.rfind('\n');
        size_t l_pos = nl == std::string::npos ? 0 : nl + 1;
        if (l_pos > 0 || line_starting) {
          bool all_ws = l_pos < t.size();
          for (size_t k = l_pos; k < t.size(); ++k)
            if (!is_ws(t[k])) all_ws = false;
          if (all_ws) t.resize(l_pos);
        }
      }
    }
  }
  std::vector<Token> out;
  out.reserve(toks.size());
  for (auto& tk : toks) {
    if (tk.type == Tok::kCommentBegin || tk.type == Tok::kCommentEnd) continue;
    if (tk.type == Tok::kText && tk.text.empty()) continue;
    out.push_back(std::move(tk));
  }
  toks.swap(out);
}

class Parser {
 public:
  explicit Parser(std::vector<Token> toks) : t_(std::move(toks)) {}

  std::unique_ptr<Program> run() {
    auto prog = std::make_unique<Program>();
    std::string end = parse_body(prog->body, {});
    (void)end;
    return prog;
  }

 private:
  const Token& cur() const { return t_[i_]; }
  const Token& peek(size_t k = 1) const { return t_[std::min(i_ + k, t_.size() - 1)]; }
  Token next() { return t_[i_ < t_.size() - 1 ? i_++ : i_]; }

  [[noreturn]] void error(const Token& at, const std::string& msg) const {
    fail("template line ", at.line, ", column ", at.col, ": ", msg);
  }
  [[noreturn]] void expected(const std::string& what) const {
    error(cur(), "expected " + what + ", got " + describe(cur()));
  }

  bool is_op(const char* op) const { return cur().type == Tok::kOp && cur().text == op; }
  bool is_name(const char* n) const { return cur().type == Tok::kName && cur().text == n; }
  bool accept_op(const char* op) {
    if (!is_op(op)) return false;
    ++i_;
    return true;
  }
  bool accept_name(const char* n) {
    if (!is_name(n)) return false;
    ++i_;
    return true;
  }
  void expect_op(const char* op) {
    if (!accept_op(op)) expected(std::string("'") + op + "'");
  }
  std::string expect_name() {
    if (cur().type != Tok::kName) expected("a name");
    return next().text;
  }
  void expect_block_end() {
    if (cur().type != Tok::kBlockEnd) expected("'%}'");
    ++i_;
  }

  template <class N>
  std::unique_ptr<N> node(typename N::Kind k, const Token& at) {
    auto n = std::make_unique<N>();
    n->kind = k;
    n->line = at.line;
    n->col = at.col;
    return n;
  }

  // Parses statements until a block tag whose name is in `ends`; returns that name (consumed, its
  // `%}` not), or "" at end of template (an error when `ends` is non-empty).
  std::string parse_body(Body& body, std::initializer_list<const char*> ends) {
    while (true) {
      const Token& tk = cur();
      if (tk.type == Tok::kEof) {
        if (ends.size()) {
          std::string names;
          for (const char* e : ends) names += std::string(names.empty() ? "" : " or ") + "'" + e + "'";
          error(tk, "expected " + names + ", got end of template");
        }
        return "";
      }
      if (tk.type == Tok::kText) {
        auto s = node<Stmt>(Stmt::Kind::kText, tk);
        s->text = tk.text;
        body.push_back(std::move(s));
        ++i_;
        continue;
      }
      if (tk.type == Tok::kVarBegin) {
        ++i_;
        auto s = node<Stmt>(Stmt::Kind::kOutput, tk);
        s->expr = parse_tuple_expr();
        if (cur().type != Tok::kVarEnd) expected("'}}'");
        ++i_;
        body.push_back(std::move(s));
        continue;
      }
      if (tk.type != Tok::kBlockBegin) expected("text, '{{' or '{%'");
      ++i_;
      if (cur().type != Tok::kName) expected("a statement name");
      std::string kw = cur().text;
      for (const char* e : ends)
        if (kw == e) {
          ++i_;
          return kw;
        }
      body.push_back(parse_statement());
    }
  }

  std::unique_ptr<Stmt> parse_statement() {
    Token at = next();
    const std::string& kw = at.text;
    if (kw == "if") {
      auto s = node<Stmt>(Stmt::Kind::kIf, at);
      ExprPtr c = parse_expr();
      expect_block_end();
      while (true) {
        Body b;
        std::string end = parse_body(b, {"elif", "else", "endif"});
        s->branches.emplace_back(std::move(c), std::move(b));
        if (end == "elif") {
          c = parse_expr();
          expect_block_end();
          continue;
        }
        if (end == "else") {
          expect_block_end();
          parse_body(s->else_body, {"endif"});
        }
        expect_block_end();
        return s;
      }
    }
    if (kw == "for") {
      auto s = node<Stmt>(Stmt::Kind::kFor, at);
      do {
        s->targets.push_back(expect_name());
      } while (accept_op(","));
      if (!accept_name("in")) expected("'in'");
      s->expr = parse_tuple_expr(/*allow_cond=*/false);
      if (accept_name("if")) s->cond = parse_expr();
      if (accept_name("recursive")) error(at, "recursive loops are not supported");
      expect_block_end();
      std::string end = parse_body(s->body, {"else", "endfor"});
      if (end == "else") {
        expect_block_end();
        parse_body(s->else_body, {"endfor"});
      }
      expect_block_end();
      return s;
    }
    if (kw == "set") {
      std::string first = expect_name();
      if (accept_op(".")) {
        auto s = node<Stmt>(Stmt::Kind::kSet, at);
        s->targets.push_back(first);
        s->attr = expect_name();
        expect_op("=");
        s->expr = parse_tuple_expr();
        expect_block_end();
        return s;
      }
      std::vector<std::string> targets{first};
      while (accept_op(",")) targets.push_back(expect_name());
      if (accept_op("=")) {
        auto s = node<Stmt>(Stmt::Kind::kSet, at);
        s->targets = std::move(targets);
        s->expr = parse_tuple_expr();
        expect_block_end();
        return s;
      }
      if (targets.size() != 1) expected("'='");
      auto s = node<Stmt>(Stmt::Kind::kSetBlock, at);
      s->targets = std::move(targets);
      if (is_op("|")) s->expr = parse_filter_chain(at);
      expect_block_end();
      parse_body(s->body, {"endset"});
      expect_block_end();
      return s;
    }
    if (kw == "macro") {
      auto s = node<Stmt>(Stmt::Kind::kMacro, at);
      s->name = expect_name();
      expect_op("(");
      while (!accept_op(")")) {
        if (!s->params.empty()) expect_op(",");
        if (accept_op(")")) break;
        std::string p = expect_name();
        ExprPtr def;
        if (accept_op("=")) def = parse_expr();
        s->params.emplace_back(p, std::move(def));
      }
      expect_block_end();
      parse_body(s->body, {"endmacro"});
      if (cur().type == Tok::kName) ++i_;  // {% endmacro name %}
      expect_block_end();
      return s;
    }
    if (kw == "filter") {
      auto s = node<Stmt>(Stmt::Kind::kFilterBlock, at);
      --i_;  // the filter name follows 'filter' as if after '|'
      t_[i_] = Token{Tok::kOp, "|", at.line, at.col, 0};
      s->expr = parse_filter_chain(at);
      expect_block_end();
      parse_body(s->body, {"endfilter"});
      expect_block_end();
      return s;
    }
    if (kw == "break" || kw == "continue") {
      expect_block_end();
      return node<Stmt>(kw == "break" ? Stmt::Kind::kBreak : Stmt::Kind::kContinue, at);
    }
    if (kw == "do") {
      auto s = node<Stmt>(Stmt::Kind::kDo, at);
      s->expr = parse_tuple_expr();
      expect_block_end();
      return s;
    }
    if (kw == "generation") {
      auto s = node<Stmt>(Stmt::Kind::kScope, at);
      expect_block_end();
      parse_body(s->body, {"endgeneration"});
      expect_block_end();
      return s;
    }
    error(at, "expected a statement (if, for, set, macro, filter, break, continue, do), got '" + kw + "'");
  }

  // `| f(args) | g` applied to a placeholder operand (kName "").
  ExprPtr parse_filter_chain(const Token& at) {
    auto operand = node<Expr>(Expr::Kind::kName, at);
    return parse_filters(std::move(operand));
  }

  ExprPtr parse_tuple_expr(bool allow_cond = true) {
    const Token at = cur();
    ExprPtr e = allow_cond ? parse_expr() : parse_or();
    if (!is_op(",")) return e;
    auto t = node<Expr>(Expr::Kind::kTuple, at);
    t->args.push_back(std::move(e));
    while (accept_op(",")) {
      if (cur().type == Tok::kVarEnd || cur().type == Tok::kBlockEnd || is_op(")")) break;
      t->args.push_back(allow_cond ? parse_expr() : parse_or());
    }
    return t;
  }

  ExprPtr parse_expr() {  // conditional expression
    ExprPtr e = parse_or();
    while (is_name("if")) {
      Token at = next();
      auto c = node<Expr>(Expr::Kind::kCond, at);
      c->args.push_back(std::move(e));
      c->args.push_back(parse_or());
      if (accept_name("else")) c->args.push_back(parse_expr());
      else c->args.push_back(nullptr);
      e = std::move(c);
    }
    return e;
  }

  ExprPtr binary(Expr::Kind k, const Token& at, ExprPtr l, ExprPtr r, std::string op = "") {
    auto n = node<Expr>(k, at);
    n->name = std::move(op);
    n->args.push_back(std::move(l));
    n->args.push_back(std::move(r));
    return n;
  }

  ExprPtr parse_or() {
    ExprPtr l = parse_and();
    while (is_name("or")) {
      Token at = next();
      l = binary(Expr::Kind::kOr, at, std::move(l), parse_and());
    }
    return l;
  }
  ExprPtr parse_and() {
    ExprPtr l = parse_not();
    while (is_name("and")) {
      Token at = next();
      l = binary(Expr::Kind::kAnd, at, std::move(l), parse_not());
    }
    return l;
  }
  ExprPtr parse_not() {
    if (is_name("not")) {
      Token at = next();
      auto n = node<Expr>(Expr::Kind::kNot, at);
      n->args.push_back(parse_not());
      return n;
    }
    return parse_compare();
  }
  ExprPtr parse_compare() {
    const Token at = cur();
    ExprPtr l = parse_math1();
    ExprPtr cmp;
    while (true) {
      std::string op;
      if (cur().type == Tok::kOp && (cur().text == "==" || cur().text == "!=" || cur().text == "<" ||
                                     cur().text == "<=" || cur().text == ">" || cur().text == ">=")) {
        op = next().text;
      } else if (is_name("in")) {
        ++i_;
        op = "in";
      } else if (is_name("not") && peek().type == Tok::kName && peek().text == "in") {
        i_ += 2;
        op = "notin";
      } else {
        break;
      }
      if (!cmp) {
        cmp = node<Expr>(Expr::Kind::kCompare, at);
        cmp->args.push_back(std::move(l));
      }
      cmp->ops.push_back(op);
      cmp->args.push_back(parse_math1());
    }
    return cmp ? std::move(cmp) : std::move(l);
  }
  ExprPtr parse_math1() {
    ExprPtr l = parse_concat();
    while (is_op("+") || is_op("-")) {
      Token at = next();
      l = binary(Expr::Kind::kBinary, at, std::move(l), parse_concat(), at.text);
    }
    return l;
  }
  ExprPtr parse_concat() {
    ExprPtr l = parse_math2();
    while (is_op("~")) {
      Token at = next();
      l = binary(Expr::Kind::kBinary, at, std::move(l), parse_math2(), "~");
    }
    return l;
  }
  ExprPtr parse_math2() {
    ExprPtr l = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      Token at = next();
      l = binary(Expr::Kind::kBinary, at, std::move(l), parse_pow(), at.text);
    }
    return l;
  }
  ExprPtr parse_pow() {
    ExprPtr l = parse_unary(true);
    while (is_op("**")) {
      Token at = next();
      l = binary(Expr::Kind::kBinary, at, std::move(l), parse_unary(true), "**");
    }
    return l;
  }
  ExprPtr parse_unary(bool with_filter) {
    ExprPtr e;
    if (is_op("-") || is_op("+")) {
      Token at = next();
      e = node<Expr>(at.text == "-" ? Expr::Kind::kNeg : Expr::Kind::kPos, at);
      e->args.push_back(parse_unary(false));
    } else {
      e = parse_primary();
    }
    e = parse_postfix(std::move(e));
    if (with_filter) e = parse_filters(std::move(e));
    return e;
  }

  ExprPtr parse_primary() {
    const Token at = cur();
    switch (at.type) {
      case Tok::kName: {
        ++i_;
        if (at.text == "true" || at.text == "True") return literal(at, Value(true));
        if (at.text == "false" || at.text == "False") return literal(at, Value(false));
        if (at.text == "none" || at.text == "None") return literal(at, Value::none());
        auto n = node<Expr>(Expr::Kind::kName, at);
        n->name = at.text;
        return n;
      }
      case Tok::kString: {
        std::string s;
        while (cur().type == Tok::kString) s += next().text;  // adjacent literals concatenate
        return literal(at, Value(std::move(s)));
      }
      case Tok::kInt: {
        ++i_;
        try {
          return literal(at, Value(static_cast<int64_t>(std::stoll(at.text))));
        } catch (const std::out_of_range&) {
          return literal(at, Value(std::stod(at.text)));
        }
      }
      case Tok::kFloat: ++i_; return literal(at, Value(std::stod(at.text)));
      case Tok::kOp:
        if (at.text == "(") {
          ++i_;
          if (accept_op(")")) return node<Expr>(Expr::Kind::kTuple, at);
          ExprPtr e = parse_tuple_expr();
          expect_op(")");
          return e;
        }
        if (at.text == "[") {
          ++i_;
          auto l = node<Expr>(Expr::Kind::kList, at);
          while (!accept_op("]")) {
            if (!l->args.empty()) {
              expect_op(",");
              if (accept_op("]")) break;
            }
            l->args.push_back(parse_expr());
          }
          return l;
        }
        if (at.text == "{") {
          ++i_;
          auto d = node<Expr>(Expr::Kind::kDict, at);
          while (!accept_op("}")) {
            if (!d->args.empty()) {
              expect_op(",");
              if (accept_op("}")) break;
            }
            d->args.push_back(parse_expr());
            expect_op(":");
            d->args.push_back(parse_expr());
          }
          return d;
        }
        break;
      default: break;
    }
    expected("an expression");
  }

  ExprPtr literal(const Token& at, Value v) {
    auto n = node<Expr>(Expr::Kind::kLiteral, at);
    n->literal = std::move(v);
    return n;
  }

  void parse_call_args(Expr& call) {  // '(' already consumed
    size_t n = 0;
    while (!accept_op(")")) {
      if (n++ > 0) {
        expect_op(",");
        if (accept_op(")")) break;
      }
      if (cur().type == Tok::kName && peek().type == Tok::kOp && peek().text == "=") {
        std::string k = next().text;
        ++i_;
        call.kwargs.emplace_back(k, parse_expr());
      } else {
        if (!call.kwargs.empty()) expected("a keyword argument after keyword arguments");
        call.args.push_back(parse_expr());
      }
    }
  }

  ExprPtr parse_postfix(ExprPtr e) {
    while (true) {
      if (is_op(".")) {
        Token at = next();
        auto a = node<Expr>(Expr::Kind::kAttr, at);
        if (cur().type == Tok::kName) {
          a->name = next().text;
        } else if (cur().type == Tok::kInt) {
          a->kind = Expr::Kind::kItem;
          a->args.push_back(std::move(e));
          a->args.push_back(literal(cur(), Value(static_cast<int64_t>(std::stoll(next().text)))));
          e = std::move(a);
          continue;
        } else {
          expected("an attribute name after '.'");
        }
        a->args.push_back(std::move(e));
        e = std::move(a);
      } else if (is_op("[")) {
        Token at = next();
        e = parse_subscript(std::move(e), at);
      } else if (is_op("(")) {
        Token at = next();
        auto c = node<Expr>(Expr::Kind::kCall, at);
        c->args.push_back(std::move(e));
        parse_call_args(*c);
        e = std::move(c);
      } else {
        return e;
      }
    }
  }

  ExprPtr parse_subscript(ExprPtr obj, const Token& at) {
    ExprPtr parts[3];
    int n = 0;
    bool is_slice = false;
    while (true) {
      if (is_op(":")) {
        ++i_;
        is_slice = true;
        if (++n > 2) expected("']'");
        continue;
      }
      if (is_op("]")) {
        ++i_;
        break;
      }
      if (parts[n]) expected("':' or ']'");
      parts[n] = parse_expr();
    }
    if (!is_slice) {
      if (!parts[0]) error(at, "expected a subscript, got '[]'");
      auto it = node<Expr>(Expr::Kind::kItem, at);
      it->args.push_back(std::move(obj));
      it->args.push_back(std::move(parts[0]));
      return it;
    }
    auto s = node<Expr>(Expr::Kind::kSlice, at);
    s->args.push_back(std::move(obj));
    for (auto& p : parts) s->args.push_back(std::move(p));
    return s;
  }

  ExprPtr parse_filters(ExprPtr e) {
    while (true) {
      if (is_op("|")) {
        Token at = next();
        auto f = node<Expr>(Expr::Kind::kFilter, at);
        f->name = expect_name();
        while (accept_op(".")) f->name += "." + expect_name();
        f->args.push_back(std::move(e));
        if (accept_op("(")) parse_call_args(*f);
        e = std::move(f);
      } else if (is_name("is")) {
        Token at = next();
        auto t = node<Expr>(Expr::Kind::kTest, at);
        if (accept_name("not")) t->negated = true;
        t->name = expect_name();
        t->args.push_back(std::move(e));
        if (accept_op("(")) {
          parse_call_args(*t);
        } else if ((cur().type == Tok::kName && cur().text != "else" && cur().text != "or" &&
                    cur().text != "and" && cur().text != "if" && cur().text != "is" && cur().text != "in" &&
                    cur().text != "not") ||
                   cur().type == Tok::kString || cur().type == Tok::kInt || cur().type == Tok::kFloat ||
                   is_op("[") || is_op("{")) {
          t->args.push_back(parse_postfix(parse_primary()));
        }
        e = std::move(t);
      } else if (is_op("(")) {
        Token at = next();
        auto c = node<Expr>(Expr::Kind::kCall, at);
        c->args.push_back(std::move(e));
        parse_call_args(*c);
        e = std::move(c);
      } else {
        return e;
      }
    }
  }

  std::vector<Token> t_;
  size_t i_ = 0;
};

}  // namespace

std::unique_ptr<Program> parse(std::string_view source, bool trim_blocks, bool lstrip_blocks,
                               bool keep_trailing_newline) {
  std::string src;
  src.reserve(source.size());
  for (size_t i = 0; i < source.size(); ++i) {  // Jinja normalises newlines to '\n'
    if (source[i] == '\r') {
      src += '\n';
      if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
    } else {
      src += source[i];
    }
  }
  if (!keep_trailing_newline && !src.empty() && src.back() == '\n') src.pop_back();
  Lexer lexer(std::move(src));
  std::vector<Token> toks = lexer.run();
  apply_whitespace(toks, trim_blocks, lstrip_blocks);
  return Parser(std::move(toks)).run();
}

}  // namespace ds::jinja::detail
