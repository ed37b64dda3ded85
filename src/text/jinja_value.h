// Values of the Jinja-subset template engine: Python semantics (truthiness, str(), ==, json.dumps) over
// none/bool/int/float/str/list/dict, with dicts in insertion order like Python's.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ds::jinja {

class Value;
struct Dict;
struct CallArgs;

using List = std::vector<Value>;
using NativeFn = std::function<Value(CallArgs&)>;

struct Function {
  std::string name;
  NativeFn fn;
};

class Value {
 public:
  // Undefined is Jinja's "missing variable/attribute": prints as '', is falsy, fails on attribute access.
  enum class Kind : uint8_t { kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kFunction };

  Value() = default;
  Value(bool b) : kind_(Kind::kBool), i_(b) {}
  Value(int v) : kind_(Kind::kInt), i_(v) {}
  Value(int64_t v) : kind_(Kind::kInt), i_(v) {}
  Value(double v) : kind_(Kind::kFloat), f_(v) {}
  Value(std::string s) : kind_(Kind::kString), s_(std::move(s)) {}
  Value(std::string_view s) : kind_(Kind::kString), s_(s) {}
  Value(const char* s) : kind_(Kind::kString), s_(s) {}
  Value(List l) : kind_(Kind::kList), l_(std::make_shared<List>(std::move(l))) {}

  static Value none() { Value v; v.kind_ = Kind::kNone; return v; }
  // `hint` names what was missing, for the error raised when the undefined value is used.
  static Value undefined(std::string hint) { Value v; v.s_ = std::move(hint); return v; }
  static Value dict();
  static Value namespace_();
  static Value function(std::string name, NativeFn fn);

  Kind kind() const { return kind_; }
  bool is_undefined() const { return kind_ == Kind::kUndefined; }
  bool is_none() const { return kind_ == Kind::kNone; }
  bool is_bool() const { return kind_ == Kind::kBool; }
  bool is_int() const { return kind_ == Kind::kInt; }
  bool is_float() const { return kind_ == Kind::kFloat; }
  bool is_number() const { return kind_ == Kind::kInt || kind_ == Kind::kFloat || kind_ == Kind::kBool; }
  bool is_string() const { return kind_ == Kind::kString; }
  bool is_list() const { return kind_ == Kind::kList; }
  bool is_dict() const { return kind_ == Kind::kDict; }
  bool is_namespace() const;
  bool is_function() const { return kind_ == Kind::kFunction; }

  bool as_bool() const { return i_ != 0; }
  int64_t as_int() const { return kind_ == Kind::kFloat ? static_cast<int64_t>(f_) : i_; }
  double as_float() const { return kind_ == Kind::kFloat ? f_ : static_cast<double>(i_); }
  const std::string& str() const { return s_; }  // string value, or the hint of an undefined
  List& list() const { return *l_; }
  Dict& dict_ref() const { return *d_; }
  const Function& fn() const { return *fn_; }

  bool truthy() const;
  // Python type name for error messages ("str", "dict", "NoneType", ...).
  const char* type_name() const;

 private:
  Kind kind_ = Kind::kUndefined;
  int64_t i_ = 0;
  double f_ = 0;
  std::string s_;
  std::shared_ptr<List> l_;  // shared: Jinja values are references (namespace mutation must be visible)
  std::shared_ptr<Dict> d_;
  std::shared_ptr<Function> fn_;
};

struct Dict {
  std::vector<std::pair<std::string, Value>> items;
  bool is_namespace = false;  // namespace() objects accept `set ns.attr = ...`

  const Value* find(std::string_view key) const;
  void set(std::string key, Value v);
};

struct CallArgs {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;

  // Python-style binding: argument `i` by position or by keyword `name`; nullptr when absent.
  const Value* get(size_t i, std::string_view name) const;
};

// Python str(): True/None, ints, shortest-repr floats, lists and dicts as Python reprs.
std::string to_str(const Value& v);
// Python repr() (strings quoted).
std::string repr(const Value& v);
// Python float repr: shortest round-trip digits, '1.0', '1e-05', '1e+16'.
std::string format_float(double v);
// Python json.dumps(v, ensure_ascii=False, indent=indent) with default separators ', ' and ': '
// (',' and ': ' when indented); indent < 0 means None. Undefined and functions are errors.
std::string to_json(const Value& v, int indent = -1);
// Python ==.
bool equals(const Value& a, const Value& b);

Value from_json(const nlohmann::ordered_json& j);
nlohmann::ordered_json to_nlohmann(const Value& v);

// UTF-8 helpers (strings are UTF-8; Python indexes code points).
std::u32string utf8_decode(std::string_view s);
std::string utf8_encode(std::u32string_view s);
bool py_isspace(char32_t c);

}  // namespace ds::jinja
