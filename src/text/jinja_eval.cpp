// Evaluator of the Jinja subset: scopes, statements, operators with Python semantics, filters, tests,
// string/dict methods and the globals transformers provides to chat templates.
#include <algorithm>
#include <cmath>
#include <ctime>
#include <unordered_map>

#include <utf8proc.h>

#include "core/status.h"
#include "text/jinja.h"
#include "text/jinja_ast.h"

namespace ds::jinja {
namespace {

using detail::Body;
using detail::Expr;
using detail::Program;
using detail::Stmt;

// A ds::Error that already names its template location (inner nodes locate first; outer ones rethrow).
class LocatedError : public ds::Error {
 public:
  explicit LocatedError(const std::string& m) : ds::Error(m) {}
};

[[noreturn]] void undefined_error(const Value& v) {
  fail(v.str().empty() ? std::string("undefined value used") : v.str());
}

int64_t to_int_arg(const Value& v, const char* what) {
  if (v.is_int() || v.is_bool()) return v.as_int();
  fail(what, ": expected an integer, got ", v.type_name(), " ", repr(v));
}

std::string to_str_arg(const Value& v, const char* what) {
  if (v.is_string()) return v.str();
  fail(what, ": expected a string, got ", v.type_name(), " ", repr(v));
}

// Python's `a < b` style three-way compare for sorting and comparisons.
int py_compare(const Value& a, const Value& b, const char* op) {
  if (a.is_number() && b.is_number()) {
    if (a.is_float() || b.is_float()) {
      double x = a.as_float(), y = b.as_float();
      return x < y ? -1 : x > y ? 1 : 0;
    }
    int64_t x = a.as_int(), y = b.as_int();
    return x < y ? -1 : x > y ? 1 : 0;
  }
  if (a.is_string() && b.is_string()) {
    int c = a.str().compare(b.str());  // UTF-8 byte order == code point order
    return c < 0 ? -1 : c > 0 ? 1 : 0;
  }
  if (a.is_list() && b.is_list()) {
    auto &x = a.list(), &y = b.list();
    for (size_t i = 0; i < x.size() && i < y.size(); ++i) {
      if (equals(x[i], y[i])) continue;
      return py_compare(x[i], y[i], op);
    }
    return x.size() < y.size() ? -1 : x.size() > y.size() ? 1 : 0;
  }
  if (a.is_undefined()) undefined_error(a);
  if (b.is_undefined()) undefined_error(b);
  fail("'", op, "' not supported between instances of '", a.type_name(), "' and '", b.type_name(), "'");
}

bool contains(const Value& container, const Value& item) {
  switch (container.kind()) {
    case Value::Kind::kString:
      if (!item.is_string())
        fail("'in <string>' requires string as left operand, not ", item.type_name());
      return container.str().find(item.str()) != std::string::npos;
    case Value::Kind::kList:
      for (auto& x : container.list())
        if (equals(x, item)) return true;
      return false;
    case Value::Kind::kDict: return item.is_string() && container.dict_ref().find(item.str()) != nullptr;
    case Value::Kind::kUndefined: return false;
    default: fail("argument of type '", container.type_name(), "' is not iterable");
  }
}

// Items a for-loop / filter iterates: list items, dict keys, string characters.
List iterate(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::kList: return v.list();
    case Value::Kind::kDict: {
      List keys;
      for (auto& kv : v.dict_ref().items) keys.emplace_back(kv.first);
      return keys;
    }
    case Value::Kind::kString: {
      List chars;
      for (char32_t c : utf8_decode(v.str())) chars.emplace_back(utf8_encode(std::u32string(1, c)));
      return chars;
    }
    case Value::Kind::kUndefined: return {};
    default: fail("'", v.type_name(), "' object is not iterable");
  }
}

int64_t py_len(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::kString: return static_cast<int64_t>(utf8_decode(v.str()).size());
    case Value::Kind::kList: return static_cast<int64_t>(v.list().size());
    case Value::Kind::kDict: return static_cast<int64_t>(v.dict_ref().items.size());
    case Value::Kind::kUndefined: return 0;
    default: fail("object of type '", v.type_name(), "' has no len()");
  }
}

// ---- strings ---------------------------------------------------------------------------------

std::string py_strip(const std::string& s, const Value* chars, bool left, bool right) {
  std::u32string u = utf8_decode(s);
  std::u32string set;
  bool ws = !chars || chars->is_none() || chars->is_undefined();
  if (!ws) set = utf8_decode(to_str_arg(*chars, "strip"));
  auto strip_me = [&](char32_t c) { return ws ? py_isspace(c) : set.find(c) != std::u32string::npos; };
  size_t b = 0, e = u.size();
  if (left)
    while (b < e && strip_me(u[b])) ++b;
  if (right)
    while (e > b && strip_me(u[e - 1])) --e;
  return utf8_encode(u.substr(b, e - b));
}

List py_split(const std::string& s, const Value* sep, int64_t maxsplit) {
  List out;
  if (!sep || sep->is_none()) {
    std::u32string u = utf8_decode(s);
    size_t i = 0, n = u.size();
    while (true) {
      while (i < n && py_isspace(u[i])) ++i;
      if (i >= n) break;
      if (maxsplit >= 0 && static_cast<int64_t>(out.size()) == maxsplit) {
        size_t e = n;
        while (e > i && py_isspace(u[e - 1])) --e;
        out.emplace_back(utf8_encode(u.substr(i, e - i)));
        break;
      }
      size_t j = i;
      while (j < n && !py_isspace(u[j])) ++j;
      out.emplace_back(utf8_encode(u.substr(i, j - i)));
      i = j;
    }
    return out;
  }
  std::string d = to_str_arg(*sep, "split");
  if (d.empty()) fail("split: expected a non-empty separator, got ''");
  size_t pos = 0;
  while (true) {
    size_t p = s.find(d, pos);
    if (p == std::string::npos || (maxsplit >= 0 && static_cast<int64_t>(out.size()) == maxsplit)) break;
    out.emplace_back(s.substr(pos, p - pos));
    pos = p + d.size();
  }
  out.emplace_back(s.substr(pos));
  return out;
}

List py_rsplit(const std::string& s, const Value* sep, int64_t maxsplit) {
  if (maxsplit < 0 || !sep || sep->is_none()) {
    if (maxsplit < 0) return py_split(s, sep, -1);
  }
  if (!sep || sep->is_none()) fail("rsplit: a maxsplit without a separator is not supported");
  std::string d = to_str_arg(*sep, "rsplit");
  if (d.empty()) fail("rsplit: expected a non-empty separator, got ''");
  List rev;
  size_t end = s.size();
  while (static_cast<int64_t>(rev.size()) < maxsplit) {
    if (end < d.size()) break;
    size_t p = s.rfind(d, end - d.size());
    if (p == std::string::npos) break;
    rev.emplace_back(s.substr(p + d.size(), end - p - d.size()));
    end = p;
  }
  rev.emplace_back(s.substr(0, end));
  std::reverse(rev.begin(), rev.end());
  return rev;
}

std::string py_replace(const std::string& s, const std::string& a, const std::string& b, int64_t count) {
  if (a.empty()) {
    std::u32string u = utf8_decode(s);
    std::string out;
    int64_t n = 0;
    for (char32_t c : u) {
      if (count < 0 || n < count) {
        out += b;
        ++n;
      }
      out += utf8_encode(std::u32string(1, c));
    }
    if (count < 0 || n < count) out += b;
    return out;
  }
  std::string out;
  size_t pos = 0;
  int64_t n = 0;
  while (count < 0 || n < count) {
    size_t p = s.find(a, pos);
    if (p == std::string::npos) break;
    out.append(s, pos, p - pos);
    out += b;
    pos = p + a.size();
    ++n;
  }
  out.append(s, pos, std::string::npos);
  return out;
}

std::string map_case(const std::string& s, int mode) {  // 0 lower, 1 upper, 2 title, 3 capitalize
  std::u32string u = utf8_decode(s);
  bool prev_cased = false;
  for (size_t i = 0; i < u.size(); ++i) {
    auto c = static_cast<utf8proc_int32_t>(u[i]);
    bool cased = utf8proc_tolower(c) != c || utf8proc_toupper(c) != c;
    bool up = mode == 1 || (mode == 2 && !prev_cased) || (mode == 3 && i == 0);
    u[i] = static_cast<char32_t>(up ? utf8proc_toupper(c) : utf8proc_tolower(c));
    prev_cased = cased;
  }
  return utf8_encode(u);
}

bool starts_or_ends(const std::string& s, const Value& arg, bool start) {
  auto one = [&](const std::string& p) {
    if (p.size() > s.size()) return false;
    return start ? s.compare(0, p.size(), p) == 0 : s.compare(s.size() - p.size(), p.size(), p) == 0;
  };
  if (arg.is_list()) {
    for (auto& x : arg.list())
      if (one(to_str_arg(x, start ? "startswith" : "endswith"))) return true;
    return false;
  }
  return one(to_str_arg(arg, start ? "startswith" : "endswith"));
}

Value slice(const Value& obj, const Value& start, const Value& stop, const Value& step) {
  int64_t st = step.is_none() || step.is_undefined() ? 1 : to_int_arg(step, "slice step");
  if (st == 0) fail("slice step cannot be zero");
  std::u32string u;
  int64_t n;
  if (obj.is_string()) {
    u = utf8_decode(obj.str());
    n = static_cast<int64_t>(u.size());
  } else if (obj.is_list()) {
    n = static_cast<int64_t>(obj.list().size());
  } else if (obj.is_undefined()) {
    undefined_error(obj);
  } else {
    fail("'", obj.type_name(), "' object is not subscriptable");
  }
  auto norm = [&](const Value& v, int64_t def, bool is_stop) {
    if (v.is_none() || v.is_undefined()) return def;
    int64_t x = to_int_arg(v, "slice index");
    if (x < 0) x += n;
    if (st > 0) return std::clamp<int64_t>(x, 0, n);
    return std::clamp<int64_t>(x, -1, n - 1);
  };
  int64_t b = norm(start, st > 0 ? 0 : n - 1, false);
  int64_t e = norm(stop, st > 0 ? n : -1, true);
  std::vector<int64_t> idx;
  if (st > 0)
    for (int64_t i = b; i < e; i += st) idx.push_back(i);
  else
    for (int64_t i = b; i > e; i += st) idx.push_back(i);
  if (obj.is_string()) {
    std::u32string r;
    for (auto i : idx) r += u[static_cast<size_t>(i)];
    return Value(utf8_encode(r));
  }
  List r;
  for (auto i : idx) r.push_back(obj.list()[static_cast<size_t>(i)]);
  return Value(std::move(r));
}

Value string_method(const std::string& s, const std::string& name) {
  auto m = [&](auto fn) { return Value::function("str." + name, [s, fn](CallArgs& a) { return fn(s, a); }); };
  if (name == "startswith" || name == "endswith") {
    bool start = name == "startswith";
    return m([start](const std::string& s, CallArgs& a) {
      const Value* p = a.get(0, "prefix");
      if (!p) fail(start ? "startswith" : "endswith", ": expected 1 argument, got 0");
      return Value(starts_or_ends(s, *p, start));
    });
  }
  if (name == "strip" || name == "lstrip" || name == "rstrip") {
    bool l = name != "rstrip", r = name != "lstrip";
    return m([l, r](const std::string& s, CallArgs& a) { return Value(py_strip(s, a.get(0, "chars"), l, r)); });
  }
  if (name == "split" || name == "rsplit") {
    bool rs = name == "rsplit";
    return m([rs](const std::string& s, CallArgs& a) {
      const Value* ms = a.get(1, "maxsplit");
      int64_t maxsplit = ms ? to_int_arg(*ms, "split maxsplit") : -1;
      return Value(rs ? py_rsplit(s, a.get(0, "sep"), maxsplit) : py_split(s, a.get(0, "sep"), maxsplit));
    });
  }
  if (name == "upper" || name == "lower" || name == "title" || name == "capitalize") {
    int mode = name == "lower" ? 0 : name == "upper" ? 1 : name == "title" ? 2 : 3;
    return m([mode](const std::string& s, CallArgs&) { return Value(map_case(s, mode)); });
  }
  if (name == "replace") {
    return m([](const std::string& s, CallArgs& a) {
      const Value *o = a.get(0, "old"), *n = a.get(1, "new"), *c = a.get(2, "count");
      if (!o || !n) fail("replace: expected 2 arguments (old, new)");
      return Value(py_replace(s, to_str_arg(*o, "replace"), to_str_arg(*n, "replace"),
                              c ? to_int_arg(*c, "replace count") : -1));
    });
  }
  if (name == "find" || name == "rfind" || name == "index" || name == "count") {
    return m([name](const std::string& s, CallArgs& a) -> Value {
      const Value* x = a.get(0, "sub");
      if (!x) fail(name, ": expected 1 argument, got 0");
      std::string sub = to_str_arg(*x, name.c_str());
      if (name == "count") {
        if (sub.empty()) return Value(static_cast<int64_t>(utf8_decode(s).size() + 1));
        int64_t n = 0;
        for (size_t p = s.find(sub); p != std::string::npos; p = s.find(sub, p + sub.size())) ++n;
        return Value(n);
      }
      size_t p = name == "rfind" ? s.rfind(sub) : s.find(sub);
      if (p == std::string::npos) {
        if (name == "index") fail("substring not found");
        return Value(int64_t{-1});
      }
      return Value(static_cast<int64_t>(utf8_decode(s.substr(0, p)).size()));
    });
  }
  if (name == "join") {
    return m([](const std::string& s, CallArgs& a) {
      const Value* x = a.get(0, "iterable");
      if (!x) fail("join: expected 1 argument, got 0");
      std::string out;
      bool first = true;
      for (auto& v : iterate(*x)) {
        if (!first) out += s;
        first = false;
        out += to_str_arg(v, "join");
      }
      return Value(out);
    });
  }
  if (name == "splitlines") {
    return m([](const std::string& s, CallArgs&) {
      List out;
      size_t pos = 0;
      while (pos < s.size()) {
        size_t p = s.find_first_of("\r\n", pos);
        if (p == std::string::npos) {
          out.emplace_back(s.substr(pos));
          break;
        }
        out.emplace_back(s.substr(pos, p - pos));
        pos = p + ((s[p] == '\r' && p + 1 < s.size() && s[p + 1] == '\n') ? 2 : 1);
      }
      return Value(std::move(out));
    });
  }
  if (name == "isdigit" || name == "isalpha" || name == "isspace" || name == "isalnum" || name == "islower" ||
      name == "isupper") {
    return m([name](const std::string& s, CallArgs&) {
      std::u32string u = utf8_decode(s);
      if (u.empty()) return Value(false);
      bool any_cased = false;
      for (char32_t c : u) {
        auto cat = utf8proc_category(static_cast<utf8proc_int32_t>(c));
        bool alpha = cat >= UTF8PROC_CATEGORY_LU && cat <= UTF8PROC_CATEGORY_LO;
        bool digit = cat == UTF8PROC_CATEGORY_ND;
        if (name == "isdigit" && !digit) return Value(false);
        if (name == "isalpha" && !alpha) return Value(false);
        if (name == "isalnum" && !alpha && !digit) return Value(false);
        if (name == "isspace" && !py_isspace(c)) return Value(false);
        if (name == "islower" && cat == UTF8PROC_CATEGORY_LU) return Value(false);
        if (name == "isupper" && cat == UTF8PROC_CATEGORY_LL) return Value(false);
        any_cased |= cat == UTF8PROC_CATEGORY_LU || cat == UTF8PROC_CATEGORY_LL;
      }
      if (name == "islower" || name == "isupper") return Value(any_cased);
      return Value(true);
    });
  }
  return Value::undefined("'str object' has no attribute '" + name + "'");
}

Value dict_method(const Value& d, const std::string& name) {
  if (name == "items")
    return Value::function("dict.items", [d](CallArgs&) {
      List out;
      for (auto& [k, v] : d.dict_ref().items) out.emplace_back(List{Value(k), v});
      return Value(std::move(out));
    });
  if (name == "keys")
    return Value::function("dict.keys", [d](CallArgs&) { return Value(iterate(d)); });
  if (name == "values")
    return Value::function("dict.values", [d](CallArgs&) {
      List out;
      for (auto& kv : d.dict_ref().items) out.push_back(kv.second);
      return Value(std::move(out));
    });
  if (name == "get")
    return Value::function("dict.get", [d](CallArgs& a) {
      const Value* k = a.get(0, "key");
      if (!k) fail("get: expected 1 argument, got 0");
      const Value* v = k->is_string() ? d.dict_ref().find(k->str()) : nullptr;
      if (v) return *v;
      const Value* def = a.get(1, "default");
      return def ? *def : Value::none();
    });
  return Value();
}

Value get_attr(const Value& obj, const std::string& name) {
  switch (obj.kind()) {
    case Value::Kind::kUndefined: undefined_error(obj);
    case Value::Kind::kString: return string_method(obj.str(), name);
    case Value::Kind::kDict: {
      if (!obj.is_namespace()) {
        Value m = dict_method(obj, name);
        if (m.is_function()) return m;
      }
      if (const Value* v = obj.dict_ref().find(name)) return *v;
      return Value::undefined("'" + std::string(obj.is_namespace() ? "Namespace" : "dict") +
                              " object' has no attribute '" + name + "'");
    }
    default: return Value::undefined("'" + std::string(obj.type_name()) + " object' has no attribute '" + name + "'");
  }
}

Value get_item(const Value& obj, const Value& key) {
  switch (obj.kind()) {
    case Value::Kind::kUndefined: undefined_error(obj);
    case Value::Kind::kDict:
      if (key.is_string()) {
        if (const Value* v = obj.dict_ref().find(key.str())) return *v;
        return Value::undefined("'dict object' has no attribute '" + key.str() + "'");
      }
      return Value::undefined("'dict object' has no attribute " + repr(key));
    case Value::Kind::kList:
    case Value::Kind::kString: {
      if (key.is_string()) return get_attr(obj, key.str());
      if (!key.is_int() && !key.is_bool()) fail("indices must be integers, not ", key.type_name());
      int64_t i = key.as_int();
      if (obj.is_list()) {
        auto& l = obj.list();
        int64_t n = static_cast<int64_t>(l.size());
        if (i < 0) i += n;
        if (i < 0 || i >= n) return Value::undefined("list index out of range");
        return l[static_cast<size_t>(i)];
      }
      std::u32string u = utf8_decode(obj.str());
      int64_t n = static_cast<int64_t>(u.size());
      if (i < 0) i += n;
      if (i < 0 || i >= n) return Value::undefined("string index out of range");
      return Value(utf8_encode(std::u32string(1, u[static_cast<size_t>(i)])));
    }
    default:
      return Value::undefined("'" + std::string(obj.type_name()) + " object' has no attribute " + repr(key));
  }
}

Value arith(const std::string& op, const Value& a, const Value& b) {
  if (op == "~") return Value(to_str(a) + to_str(b));
  if (a.is_undefined()) undefined_error(a);
  if (b.is_undefined()) undefined_error(b);
  if (a.is_number() && b.is_number()) {
    bool fl = a.is_float() || b.is_float();
    if (op == "+") return fl ? Value(a.as_float() + b.as_float()) : Value(a.as_int() + b.as_int());
    if (op == "-") return fl ? Value(a.as_float() - b.as_float()) : Value(a.as_int() - b.as_int());
    if (op == "*") return fl ? Value(a.as_float() * b.as_float()) : Value(a.as_int() * b.as_int());
    if (op == "/") {
      if (b.as_float() == 0) fail("division by zero");
      return Value(a.as_float() / b.as_float());
    }
    if (op == "//" || op == "%") {
      if (b.as_float() == 0) fail(op == "%" ? "modulo by zero" : "integer division by zero");
      if (fl) {
        double q = std::floor(a.as_float() / b.as_float());
        return op == "//" ? Value(q) : Value(a.as_float() - q * b.as_float());
      }
      int64_t x = a.as_int(), y = b.as_int();
      int64_t q = x / y;
      if ((x % y != 0) && ((x < 0) != (y < 0))) --q;  // Python floors
      return op == "//" ? Value(q) : Value(x - q * y);
    }
    if (op == "**") {
      if (!fl && b.as_int() >= 0) {
        int64_t r = 1;
        for (int64_t k = 0; k < b.as_int(); ++k) r *= a.as_int();
        return Value(r);
      }
      return Value(std::pow(a.as_float(), b.as_float()));
    }
  }
  if (op == "+" && a.is_string() && b.is_string()) return Value(a.str() + b.str());
  if (op == "+" && a.is_list() && b.is_list()) {
    List l = a.list();
    l.insert(l.end(), b.list().begin(), b.list().end());
    return Value(std::move(l));
  }
  if (op == "*" && (a.is_string() || a.is_list()) && (b.is_int() || b.is_bool())) {
    if (a.is_string()) {
      std::string s;
      for (int64_t k = 0; k < b.as_int(); ++k) s += a.str();
      return Value(s);
    }
    List l;
    for (int64_t k = 0; k < b.as_int(); ++k) l.insert(l.end(), a.list().begin(), a.list().end());
    return Value(std::move(l));
  }
  if (op == "*" && (b.is_string() || b.is_list()) && (a.is_int() || a.is_bool())) return arith(op, b, a);
  fail("unsupported operand type(s) for ", op, ": '", a.type_name(), "' and '", b.type_name(), "'");
}

// ---- tests -----------------------------------------------------------------------------------

bool run_test(const std::string& name, const Value& v, const std::vector<Value>& args) {
  auto arg = [&](size_t i) -> const Value& {
    if (i >= args.size()) fail("test '", name, "': expected ", i + 1, " argument(s), got ", args.size());
    return args[i];
  };
  if (name == "defined") return !v.is_undefined();
  if (name == "undefined") return v.is_undefined();
  if (name == "none") return v.is_none();
  if (name == "boolean") return v.is_bool();
  if (name == "true") return v.is_bool() && v.as_bool();
  if (name == "false") return v.is_bool() && !v.as_bool();
  if (name == "integer") return v.is_int();
  if (name == "float") return v.is_float();
  if (name == "number") return v.is_number();
  if (name == "string") return v.is_string();
  if (name == "mapping") return v.is_dict() && !v.is_namespace();
  // Jinja: sequence = has len() and [], iterable = has iter(); its Undefined has both.
  if (name == "sequence") return v.is_string() || v.is_list() || (v.is_dict() && !v.is_namespace()) || v.is_undefined();
  if (name == "iterable") return v.is_string() || v.is_list() || (v.is_dict() && !v.is_namespace()) || v.is_undefined();
  if (name == "callable") return v.is_function();
  if (name == "odd") return to_int_arg(v, "odd") % 2 != 0;
  if (name == "even") return to_int_arg(v, "even") % 2 == 0;
  if (name == "divisibleby") return to_int_arg(v, "divisibleby") % to_int_arg(arg(0), "divisibleby") == 0;
  if (name == "eq" || name == "equalto" || name == "==") return equals(v, arg(0));
  if (name == "ne" || name == "!=") return !equals(v, arg(0));
  if (name == "lt" || name == "lessthan" || name == "<") return py_compare(v, arg(0), "<") < 0;
  if (name == "le" || name == "<=") return py_compare(v, arg(0), "<=") <= 0;
  if (name == "gt" || name == "greaterthan" || name == ">") return py_compare(v, arg(0), ">") > 0;
  if (name == "ge" || name == ">=") return py_compare(v, arg(0), ">=") >= 0;
  if (name == "in") return contains(arg(0), v);
  if (name == "sameas") {
    const Value& o = arg(0);
    if (v.kind() != o.kind()) return false;
    if (v.is_list()) return &v.list() == &o.list();
    if (v.is_dict()) return &v.dict_ref() == &o.dict_ref();
    return equals(v, o);
  }
  if (name == "lower") return v.is_string() && map_case(v.str(), 0) == v.str();
  if (name == "upper") return v.is_string() && map_case(v.str(), 1) == v.str();
  if (name == "escaped") return false;
  fail("expected a known test (defined, none, string, mapping, sequence, iterable, number, ...), got '", name, "'");
}

// ---- filters ---------------------------------------------------------------------------------

Value attr_path(const Value& v, const std::string& path) {  // "a.b" or "0"
  Value cur = v;
  size_t pos = 0;
  while (pos <= path.size()) {
    size_t d = path.find('.', pos);
    std::string part = path.substr(pos, d == std::string::npos ? std::string::npos : d - pos);
    bool digits = !part.empty() && std::all_of(part.begin(), part.end(), ::isdigit);
    cur = digits ? get_item(cur, Value(static_cast<int64_t>(std::stoll(part)))) : get_item(cur, Value(part));
    if (d == std::string::npos) break;
    pos = d + 1;
  }
  return cur;
}

std::string html_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    switch (c) {
      case '&': o += "&amp;"; break;
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '"': o += "&#34;"; break;
      case '\'': o += "&#39;"; break;
      default: o += c;
    }
  }
  return o;
}

}  // namespace

// ---- renderer --------------------------------------------------------------------------------

namespace detail {

class Renderer {
 public:
  Renderer(const Program& prog, const Value& vars) : prog_(prog) {
    if (!vars.is_dict()) fail("template variables: expected a dict, got ", vars.type_name());
    for (auto& [k, v] : vars.dict_ref().items) root_[k] = v;
    scopes_.push_back(&root_);
    install_globals();
  }

  std::string run() {
    std::string out;
    out_ = &out;
    exec_body(prog_.body);
    return out;
  }

 private:
  using Frame = std::unordered_map<std::string, Value>;
  enum class Flow { kNormal, kBreak, kContinue };

  void install_globals() {
    globals_["raise_exception"] = Value::function("raise_exception", [](CallArgs& a) -> Value {
      const Value* m = a.get(0, "message");
      throw TemplateRaise(m ? to_str(*m) : std::string("raise_exception called"));
    });
    globals_["namespace"] = Value::function("namespace", [](CallArgs& a) {
      Value ns = Value::namespace_();
      for (auto& p : a.pos) {
        if (!p.is_dict()) fail("namespace: expected a dict positional argument, got ", p.type_name());
        for (auto& [k, v] : p.dict_ref().items) ns.dict_ref().set(k, v);
      }
      for (auto& [k, v] : a.kw) ns.dict_ref().set(k, v);
      return ns;
    });
    globals_["dict"] = Value::function("dict", [](CallArgs& a) {
      Value d = Value::dict();
      for (auto& p : a.pos)
        if (p.is_dict())
          for (auto& [k, v] : p.dict_ref().items) d.dict_ref().set(k, v);
      for (auto& [k, v] : a.kw) d.dict_ref().set(k, v);
      return d;
    });
    globals_["range"] = Value::function("range", [](CallArgs& a) {
      if (a.pos.empty() || a.pos.size() > 3) fail("range: expected 1 to 3 integer arguments, got ", a.pos.size());
      int64_t start = 0, stop, step = 1;
      if (a.pos.size() == 1) {
        stop = to_int_arg(a.pos[0], "range");
      } else {
        start = to_int_arg(a.pos[0], "range");
        stop = to_int_arg(a.pos[1], "range");
        if (a.pos.size() == 3) step = to_int_arg(a.pos[2], "range");
      }
      if (step == 0) fail("range: step must not be zero");
      List l;
      for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) l.emplace_back(i);
      return Value(std::move(l));
    });
    globals_["strftime_now"] = Value::function("strftime_now", [](CallArgs& a) {
      const Value* f = a.get(0, "format");
      if (!f) fail("strftime_now: expected a format argument");
      std::time_t t = std::time(nullptr);
      std::tm tm{};
      localtime_r(&t, &tm);
      char buf[256];
      size_t n = std::strftime(buf, sizeof(buf), to_str_arg(*f, "strftime_now").c_str(), &tm);
      return Value(std::string(buf, n));
    });
  }

  [[noreturn]] static void relocate(int line, int col, const ds::Error& e) {
    throw LocatedError(str_cat("template line ", line, ", column ", col, ": ", e.what()));
  }

  Flow exec_body(const Body& body) {
    for (auto& s : body) {
      Flow f = exec(*s);
      if (f != Flow::kNormal) return f;
    }
    return Flow::kNormal;
  }

  Flow exec(const Stmt& s) {
    try {
      return exec_inner(s);
    } catch (const TemplateRaise&) {
      throw;
    } catch (const LocatedError&) {
      throw;
    } catch (const ds::Error& e) {
      relocate(s.line, s.col, e);
    }
  }

  void assign(const std::string& name, Value v) { (*scopes_.back())[name] = std::move(v); }

  void assign_targets(const std::vector<std::string>& targets, const Value& v) {
    if (targets.size() == 1) {
      assign(targets[0], v);
      return;
    }
    List items = iterate(v);
    if (items.size() != targets.size())
      fail("cannot unpack: expected ", targets.size(), " values, got ", items.size());
    for (size_t i = 0; i < targets.size(); ++i) assign(targets[i], items[i]);
  }

  std::string capture(const Body& body) {
    std::string buf;
    std::string* saved = out_;
    out_ = &buf;
    exec_body(body);
    out_ = saved;
    return buf;
  }

  Value apply_chain(const Expr& chain, Value operand) {
    Value saved = placeholder_;
    placeholder_ = std::move(operand);
    Value r = eval(chain);
    placeholder_ = std::move(saved);
    return r;
  }

  Flow exec_inner(const Stmt& s) {
    switch (s.kind) {
      case Stmt::Kind::kText: *out_ += s.text; return Flow::kNormal;
      case Stmt::Kind::kOutput: {
        Value v = eval(*s.expr);
        if (!v.is_undefined()) *out_ += to_str(v);
        return Flow::kNormal;
      }
      case Stmt::Kind::kIf:
        for (auto& [cond, body] : s.branches)
          if (eval(*cond).truthy()) return exec_body(body);
        return exec_body(s.else_body);
      case Stmt::Kind::kFor: return exec_for(s);
      case Stmt::Kind::kSet: {
        Value v = eval(*s.expr);
        if (!s.attr.empty()) {
          Value ns = lookup(s.targets[0]);
          if (!ns.is_namespace())
            fail("cannot assign attribute '", s.attr, "' on '", s.targets[0], "': expected a namespace(), got ",
                 ns.type_name());
          ns.dict_ref().set(s.attr, std::move(v));
        } else {
          assign_targets(s.targets, v);
        }
        return Flow::kNormal;
      }
      case Stmt::Kind::kSetBlock: {
        Value v(capture(s.body));
        if (s.expr) v = apply_chain(*s.expr, std::move(v));
        assign(s.targets[0], std::move(v));
        return Flow::kNormal;
      }
      case Stmt::Kind::kMacro: assign(s.name, make_macro(s)); return Flow::kNormal;
      case Stmt::Kind::kFilterBlock: *out_ += to_str(apply_chain(*s.expr, Value(capture(s.body)))); return Flow::kNormal;
      case Stmt::Kind::kBreak: return Flow::kBreak;
      case Stmt::Kind::kContinue: return Flow::kContinue;
      case Stmt::Kind::kDo: eval(*s.expr); return Flow::kNormal;
      case Stmt::Kind::kScope: return exec_body(s.body);
    }
    return Flow::kNormal;
  }

  Flow exec_for(const Stmt& s) {
    Value seq = eval(*s.expr);
    List items = iterate(seq);
    Frame frame;
    scopes_.push_back(&frame);
    struct Pop {
      std::vector<Frame*>& v;
      ~Pop() { v.pop_back(); }
    } pop{scopes_};
    if (s.cond) {  // `for x in xs if cond`: filter first, loop.length counts the kept items
      List kept;
      for (auto& it : items) {
        assign_targets(s.targets, it);
        if (eval(*s.cond).truthy()) kept.push_back(it);
      }
      items.swap(kept);
    }
    if (items.empty()) return exec_body(s.else_body) == Flow::kBreak ? Flow::kNormal : Flow::kNormal;
    int64_t n = static_cast<int64_t>(items.size());
    for (int64_t i = 0; i < n; ++i) {
      Value loop = Value::dict();
      Dict& d = loop.dict_ref();
      d.items.reserve(10);
      d.items.emplace_back("index0", Value(i));
      d.items.emplace_back("index", Value(i + 1));
      d.items.emplace_back("revindex0", Value(n - 1 - i));
      d.items.emplace_back("revindex", Value(n - i));
      d.items.emplace_back("first", Value(i == 0));
      d.items.emplace_back("last", Value(i == n - 1));
      d.items.emplace_back("length", Value(n));
      d.items.emplace_back("depth", Value(1));
      d.items.emplace_back("depth0", Value(0));
      if (i > 0) d.items.emplace_back("previtem", items[static_cast<size_t>(i - 1)]);
      if (i + 1 < n) d.items.emplace_back("nextitem", items[static_cast<size_t>(i + 1)]);
      d.items.emplace_back("cycle", Value::function("loop.cycle", [i](CallArgs& a) -> Value {
        if (a.pos.empty()) fail("loop.cycle: expected at least 1 argument");
        return a.pos[static_cast<size_t>(i) % a.pos.size()];
      }));
      frame["loop"] = std::move(loop);
      assign_targets(s.targets, items[static_cast<size_t>(i)]);
      Flow f = exec_body(s.body);
      if (f == Flow::kBreak) break;
    }
    return Flow::kNormal;
  }

  Value make_macro(const Stmt& s) {
    const Stmt* m = &s;
    return Value::function(s.name, [this, m](CallArgs& a) -> Value {
      Frame local;
      size_t np = m->params.size();
      for (size_t i = 0; i < np; ++i) {
        const auto& [pname, def] = m->params[i];
        if (const Value* v = a.get(i, pname)) local[pname] = *v;
      }
      List varargs;
      for (size_t i = np; i < a.pos.size(); ++i) varargs.push_back(a.pos[i]);
      Value kwargs = Value::dict();
      for (auto& [k, v] : a.kw) {
        bool known = false;
        for (auto& p : m->params) known |= p.first == k;
        if (!known) kwargs.dict_ref().set(k, v);
      }
      local["varargs"] = Value(std::move(varargs));
      local["kwargs"] = kwargs;
      std::vector<Frame*> saved;
      saved.swap(scopes_);
      scopes_ = {saved.front(), &local};
      std::string buf;
      std::string* saved_out = out_;
      out_ = &buf;
      try {
        for (auto& [pname, def] : m->params)
          if (!local.count(pname)) local[pname] = def ? eval(*def) : Value::undefined("'" + pname + "' is undefined");
        exec_body(m->body);
      } catch (...) {
        scopes_.swap(saved);
        out_ = saved_out;
        throw;
      }
      scopes_.swap(saved);
      out_ = saved_out;
      return Value(std::move(buf));
    });
  }

  Value lookup(const std::string& name) {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      auto f = (*it)->find(name);
      if (f != (*it)->end()) return f->second;
    }
    auto g = globals_.find(name);
    if (g != globals_.end()) return g->second;
    return Value::undefined("'" + name + "' is undefined");
  }

  CallArgs eval_args(const Expr& e, size_t first) {
    CallArgs a;
    for (size_t i = first; i < e.args.size(); ++i) a.pos.push_back(eval(*e.args[i]));
    for (auto& [k, v] : e.kwargs) a.kw.emplace_back(k, eval(*v));
    return a;
  }

  Value eval(const Expr& e) {
    try {
      return eval_inner(e);
    } catch (const TemplateRaise&) {
      throw;
    } catch (const LocatedError&) {
      throw;
    } catch (const ds::Error& err) {
      relocate(e.line, e.col, err);
    }
  }

  Value eval_inner(const Expr& e) {
    using K = Expr::Kind;
    switch (e.kind) {
      case K::kLiteral: return e.literal;
      case K::kName: return e.name.empty() ? placeholder_ : lookup(e.name);
      case K::kAttr: return get_attr(eval(*e.args[0]), e.name);
      case K::kItem: return get_item(eval(*e.args[0]), eval(*e.args[1]));
      case K::kSlice: {
        auto opt = [&](size_t i) { return e.args[i] ? eval(*e.args[i]) : Value::none(); };
        return slice(eval(*e.args[0]), opt(1), opt(2), opt(3));
      }
      case K::kCall: {
        Value fn = eval(*e.args[0]);
        CallArgs a = eval_args(e, 1);
        if (fn.is_undefined()) undefined_error(fn);
        if (!fn.is_function()) fail("'", fn.type_name(), "' object is not callable");
        return fn.fn().fn(a);
      }
      case K::kFilter: {
        Value v = eval(*e.args[0]);
        CallArgs a = eval_args(e, 1);
        return filter(e.name, v, a);
      }
      case K::kTest: {
        Value v = eval(*e.args[0]);
        CallArgs a = eval_args(e, 1);
        bool r = run_test(e.name, v, a.pos);
        return Value(e.negated ? !r : r);
      }
      case K::kNeg:
      case K::kPos: {
        Value v = eval(*e.args[0]);
        if (!v.is_number()) fail("bad operand type for unary ", e.kind == K::kNeg ? "-" : "+", ": '", v.type_name(), "'");
        if (e.kind == K::kPos) return v.is_bool() ? Value(v.as_int()) : v;
        return v.is_float() ? Value(-v.as_float()) : Value(-v.as_int());
      }
      case K::kBinary: return arith(e.name, eval(*e.args[0]), eval(*e.args[1]));
      case K::kCompare: {
        Value l = eval(*e.args[0]);
        for (size_t i = 0; i < e.ops.size(); ++i) {
          Value r = eval(*e.args[i + 1]);
          const std::string& op = e.ops[i];
          bool ok;
          if (op == "==") ok = equals(l, r);
          else if (op == "!=") ok = !equals(l, r);
          else if (op == "in") ok = contains(r, l);
          else if (op == "notin") ok = !contains(r, l);
          else {
            int c = py_compare(l, r, op.c_str());
            ok = op == "<" ? c < 0 : op == "<=" ? c <= 0 : op == ">" ? c > 0 : c >= 0;
          }
          if (!ok) return Value(false);
          l = std::move(r);
        }
        return Value(true);
      }
      case K::kAnd: {
        Value l = eval(*e.args[0]);
        return l.truthy() ? eval(*e.args[1]) : l;
      }
      case K::kOr: {
        Value l = eval(*e.args[0]);
        return l.truthy() ? l : eval(*e.args[1]);
      }
      case K::kNot: return Value(!eval(*e.args[0]).truthy());
      case K::kCond:
        if (eval(*e.args[1]).truthy()) return eval(*e.args[0]);
        return e.args[2] ? eval(*e.args[2]) : Value::undefined("the inline if-expression had no else branch");
      case K::kList:
      case K::kTuple: {
        List l;
        for (auto& x : e.args) l.push_back(eval(*x));
        return Value(std::move(l));
      }
      case K::kDict: {
        Value d = Value::dict();
        for (size_t i = 0; i + 1 < e.args.size(); i += 2) {
          Value k = eval(*e.args[i]);
          if (!k.is_string()) fail("dict literal: expected string keys, got ", k.type_name());
          d.dict_ref().set(k.str(), eval(*e.args[i + 1]));
        }
        return d;
      }
    }
    fail("unknown expression");
  }

  // select/reject/selectattr/rejectattr: (attribute?, test name, test args...)
  Value select(const Value& v, CallArgs& a, bool by_attr, bool keep) {
    size_t k = 0;
    std::string attr;
    if (by_attr) {
      if (a.pos.empty()) fail("selectattr: expected an attribute name");
      attr = to_str_arg(a.pos[k++], "selectattr");
    }
    std::string test = k < a.pos.size() ? to_str_arg(a.pos[k++], "select test") : std::string();
    std::vector<Value> targs(a.pos.begin() + static_cast<long>(std::min(k, a.pos.size())), a.pos.end());
    List out;
    for (auto& x : iterate(v)) {
      Value subject = by_attr ? attr_path(x, attr) : x;
      bool r = test.empty() ? subject.truthy() : run_test(test, subject, targs);
      if (r == keep) out.push_back(x);
    }
    return Value(std::move(out));
  }

  Value filter(const std::string& name, const Value& v, CallArgs& a) {
    auto arg = [&](size_t i, const char* n) { return a.get(i, n); };
    if (name == "safe" || name == "e" || name == "escape" || name == "forceescape") {
      if (name == "safe") return v;
      return Value(html_escape(to_str(v)));
    }
    if (name == "tojson") {
      const Value* ind = arg(0, "indent");
      return Value(to_json(v, ind && !ind->is_none() ? static_cast<int>(to_int_arg(*ind, "tojson indent")) : -1));
    }
    if (name == "string") return v.is_undefined() ? Value("") : Value(to_str(v));
    if (name == "trim") return Value(py_strip(to_str(v), arg(0, "chars"), true, true));
    if (name == "length" || name == "count") return Value(py_len(v));
    if (name == "upper") return Value(map_case(to_str(v), 1));
    if (name == "lower") return Value(map_case(to_str(v), 0));
    if (name == "title") return Value(map_case(to_str(v), 2));
    if (name == "capitalize") return Value(map_case(to_str(v), 3));
    if (name == "replace") {
      const Value *o = arg(0, "old"), *n = arg(1, "new"), *c = arg(2, "count");
      if (!o || !n) fail("replace: expected 2 arguments (old, new)");
      return Value(py_replace(to_str(v), to_str(*o), to_str(*n), c && !c->is_none() ? to_int_arg(*c, "replace") : -1));
    }
    if (name == "join") {
      const Value* d = arg(0, "d");
      const Value* attr = arg(1, "attribute");
      std::string sep = d ? to_str(*d) : "";
      std::string out;
      bool first = true;
      for (auto& x : iterate(v)) {
        if (!first) out += sep;
        first = false;
        out += to_str(attr && !attr->is_none() ? attr_path(x, to_str(*attr)) : x);
      }
      return Value(out);
    }
    if (name == "items") {
      if (v.is_undefined()) return Value(List{});
      if (!v.is_dict()) fail("items: can only get item pairs from a mapping, got ", v.type_name());
      List out;
      for (auto& [k, x] : v.dict_ref().items) out.emplace_back(List{Value(k), x});
      return Value(std::move(out));
    }
    if (name == "default" || name == "d") {
      const Value* def = arg(0, "default_value");
      const Value* boolean = arg(1, "boolean");
      bool use = v.is_undefined() || (boolean && boolean->truthy() && !v.truthy());
      return use ? (def ? *def : Value("")) : v;
    }
    if (name == "first" || name == "last") {
      List l = iterate(v);
      if (l.empty()) return Value::undefined("No " + name + " item, sequence was empty.");
      return name == "first" ? l.front() : l.back();
    }
    if (name == "list") return Value(iterate(v));
    if (name == "reverse") {
      if (v.is_string()) {
        std::u32string u = utf8_decode(v.str());
        std::reverse(u.begin(), u.end());
        return Value(utf8_encode(u));
      }
      List l = iterate(v);
      std::reverse(l.begin(), l.end());
      return Value(std::move(l));
    }
    if (name == "map") {
      List out;
      const Value* attr = a.get(99, "attribute");
      if (attr) {
        const Value* def = a.get(99, "default");
        for (auto& x : iterate(v)) {
          Value r = attr_path(x, to_str(*attr));
          out.push_back(r.is_undefined() && def ? *def : r);
        }
        return Value(std::move(out));
      }
      if (a.pos.empty()) fail("map: expected a filter name or attribute=");
      std::string f = to_str_arg(a.pos[0], "map");
      CallArgs rest;
      rest.pos.assign(a.pos.begin() + 1, a.pos.end());
      rest.kw = a.kw;
      for (auto& x : iterate(v)) {
        CallArgs c = rest;
        out.push_back(filter(f, x, c));
      }
      return Value(std::move(out));
    }
    if (name == "select") return select(v, a, false, true);
    if (name == "reject") return select(v, a, false, false);
    if (name == "selectattr") return select(v, a, true, true);
    if (name == "rejectattr") return select(v, a, true, false);
    if (name == "attr") {
      const Value* n = arg(0, "name");
      if (!n) fail("attr: expected an attribute name");
      return get_attr(v, to_str(*n));
    }
    if (name == "int") {
      if (v.is_number()) return Value(v.as_int());
      if (v.is_string()) {
        try {
          size_t used = 0;
          std::string s = py_strip(v.str(), nullptr, true, true);
          int64_t r = std::stoll(s, &used);
          if (used == s.size()) return Value(r);
          return Value(static_cast<int64_t>(std::stod(s)));
        } catch (...) {
        }
      }
      const Value* def = arg(0, "default");
      return def ? *def : Value(0);
    }
    if (name == "float") {
      if (v.is_number()) return Value(v.as_float());
      if (v.is_string()) {
        try {
          return Value(std::stod(v.str()));
        } catch (...) {
        }
      }
      const Value* def = arg(0, "default");
      return def ? *def : Value(0.0);
    }
    if (name == "abs") {
      if (v.is_float()) return Value(std::fabs(v.as_float()));
      if (v.is_number()) return Value(static_cast<int64_t>(std::llabs(v.as_int())));
      fail("abs: expected a number, got ", v.type_name());
    }
    if (name == "round") {
      const Value* p = arg(0, "precision");
      const Value* m = arg(1, "method");
      int64_t prec = p ? to_int_arg(*p, "round") : 0;
      std::string method = m ? to_str(*m) : "common";
      double scale = std::pow(10.0, static_cast<double>(prec));
      double x = v.as_float() * scale;
      x = method == "floor" ? std::floor(x) : method == "ceil" ? std::ceil(x) : std::round(x);
      return Value(x / scale);
    }
    if (name == "sum") {
      const Value* attr = arg(0, "attribute");
      const Value* start = arg(1, "start");
      Value acc = start ? *start : Value(0);
      for (auto& x : iterate(v)) acc = arith("+", acc, attr && !attr->is_none() ? attr_path(x, to_str(*attr)) : x);
      return acc;
    }
    if (name == "min" || name == "max" || name == "sort" || name == "unique") {
      const Value* attr = a.get(99, "attribute");
      bool reverse = false;
      if (name == "sort") {
        const Value* r = arg(0, "reverse");
        reverse = r && r->truthy();
      }
      auto key = [&](const Value& x) { return attr && !attr->is_none() ? attr_path(x, to_str(*attr)) : x; };
      List l = iterate(v);
      if (name == "unique") {
        List out;
        for (auto& x : l) {
          bool seen = false;
          for (auto& y : out) seen |= equals(key(x), key(y));
          if (!seen) out.push_back(x);
        }
        return Value(std::move(out));
      }
      std::stable_sort(l.begin(), l.end(), [&](const Value& x, const Value& y) {
        return py_compare(key(x), key(y), "<") < 0;
      });
      if (name == "sort") {
        if (reverse) std::reverse(l.begin(), l.end());
        return Value(std::move(l));
      }
      if (l.empty()) return Value::undefined("No aggregated item, sequence was empty.");
      return name == "min" ? l.front() : l.back();
    }
    if (name == "dictsort") {
      if (!v.is_dict()) fail("dictsort: expected a dict, got ", v.type_name());
      List out;
      for (auto& [k, x] : v.dict_ref().items) out.emplace_back(List{Value(k), x});
      std::stable_sort(out.begin(), out.end(), [](const Value& x, const Value& y) {
        return x.list()[0].str() < y.list()[0].str();
      });
      return Value(std::move(out));
    }
    if (name == "indent") {
      const Value* w = arg(0, "width");
      const Value* first = arg(1, "first");
      const Value* blank = arg(2, "blank");
      std::string pad = w ? (w->is_string() ? w->str() : std::string(static_cast<size_t>(to_int_arg(*w, "indent")), ' '))
                          : std::string(4, ' ');
      std::string s = to_str(v), out;
      size_t pos = 0;
      bool first_line = true;
      while (true) {
        size_t nl = s.find('\n', pos);
        std::string line = s.substr(pos, nl == std::string::npos ? std::string::npos : nl - pos);
        bool add = first_line ? (first && first->truthy()) : (!line.empty() || (blank && blank->truthy()));
        if (add) out += pad;
        out += line;
        if (nl == std::string::npos) break;
        out += '\n';
        pos = nl + 1;
        first_line = false;
      }
      return Value(out);
    }
    if (name == "wordcount") return Value(static_cast<int64_t>(py_split(to_str(v), nullptr, -1).size()));
    fail("expected a known filter (tojson, trim, length, string, join, items, default, ...), got '", name, "'");
  }

  const Program& prog_;
  Frame root_;
  Frame globals_;
  std::vector<Frame*> scopes_;
  std::string* out_ = nullptr;
  Value placeholder_;
};

}  // namespace detail

Template::Template(std::string_view source, Options options)
    : program_(detail::parse(source, options.trim_blocks, options.lstrip_blocks, options.keep_trailing_newline)) {}

std::string Template::render(const Value& vars) const { return detail::Renderer(*program_, vars).run(); }

}  // namespace ds::jinja
