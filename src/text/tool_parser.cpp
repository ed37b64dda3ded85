#include "text/tool_parser.h"

#include <algorithm>
#include <cmath>
#include <mutex>
#include <random>

#include "text/jinja_value.h"

namespace ds {
namespace {

using json = nlohmann::ordered_json;

constexpr std::string_view kCallOpen = "<tool_call>";
constexpr std::string_view kCallClose = "</tool_call>";
constexpr std::string_view kFunctionOpen = "<function=";
constexpr std::string_view kFunctionClose = "</function>";
constexpr std::string_view kParamOpen = "<parameter=";
constexpr std::string_view kParamClose = "</parameter>";
constexpr size_t kMaxNameLen = 256;  // a longer "<function=..." without '>' is not a call

bool is_space(char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }

size_t skip_space(std::string_view s, size_t i = 0) {
  while (i < s.size() && is_space(s[i])) ++i;
  return i;
}

bool starts_with(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }

bool proper_prefix_of(std::string_view s, std::string_view tag) { return s.size() < tag.size() && starts_with(tag, s); }

size_t partial_suffix(std::string_view s, std::string_view tag) {
  for (size_t k = std::min(s.size(), tag.size() - 1); k > 0; --k)
    if (s.substr(s.size() - k) == tag.substr(0, k)) return k;
  return 0;
}

std::string_view trim(std::string_view s) {
  size_t b = skip_space(s);
  size_t e = s.size();
  while (e > b && is_space(s[e - 1])) --e;
  return s.substr(b, e - b);
}

std::string lower(std::string_view s) {
  std::string o(s);
  for (char& c : o) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return o;
}

std::string schema_type(const json& schema) {
  auto t = schema.find("type");
  if (t != schema.end()) {
    if (t->is_string()) return lower(t->get<std::string>());
    if (t->is_array())
      for (auto& x : *t)
        if (x.is_string() && x.get<std::string>() != "null") return lower(x.get<std::string>());
  }
  auto e = schema.find("enum");
  if (e != schema.end() && e->is_array() && !e->empty() &&
      std::all_of(e->begin(), e->end(), [](const json& x) { return x.is_string(); }))
    return "string";
  return "";
}

std::string py_json(const json& v) { return jinja::to_json(jinja::from_json(v)); }

// One entry per call and delta: argument fragments of the same call are joined (the first delta of a
// call, which carries id and name, stays separate).
void merge_fragments(ToolParseDelta& out) {
  std::vector<ToolCallDelta> merged;
  for (auto& d : out.tool_calls) {
    if (!merged.empty() && merged.back().index == d.index && d.id.empty() && merged.back().id.empty())
      merged.back().arguments += d.arguments;
    else
      merged.push_back(std::move(d));
  }
  out.tool_calls = std::move(merged);
}

}  // namespace

std::string tool_call_id() {
  static std::mutex mu;
  static std::mt19937_64 rng{std::random_device{}()};
  static const char kAlnum[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
  std::lock_guard<std::mutex> lock(mu);
  std::string id = "call_";
  for (int i = 0; i < 24; ++i) id += kAlnum[rng() % (sizeof(kAlnum) - 1)];
  return id;
}

json tool_param_value(const std::string& raw, const json* schema) {
  if (!schema || !schema->is_object()) return raw;
  std::string type = schema_type(*schema);
  auto t_it = schema->find("type");
  bool nullable = t_it != schema->end() && t_it->is_array() &&
                  std::any_of(t_it->begin(), t_it->end(), [](const json& x) { return x == "null"; });
  if (nullable && lower(trim(raw)) == "null") return nullptr;
  if (type == "string" || type == "str" || type == "text" || type == "varchar" || type == "char" || type == "enum")
    return raw;
  std::string_view t = trim(raw);
  if (lower(t) == "null") return nullptr;
  json parsed = json::parse(t.begin(), t.end(), nullptr, /*allow_exceptions=*/false);
  bool ok = !parsed.is_discarded();
  if (type.rfind("int", 0) == 0) {
    if (ok && parsed.is_number_integer()) return parsed;
    if (ok && parsed.is_number_float() && parsed.get<double>() == static_cast<double>(static_cast<int64_t>(parsed.get<double>())))
      return static_cast<int64_t>(parsed.get<double>());
    return raw;
  }
  if (type == "number" || type.rfind("float", 0) == 0 || type == "double") {
    if (!ok || !parsed.is_number()) return raw;
    if (parsed.is_number_float()) {
      double d = parsed.get<double>();  // vLLM keeps integral floats as ints (3.0 -> 3)
      if (d == static_cast<double>(static_cast<int64_t>(d)) && std::abs(d) < 9.0e15) return static_cast<int64_t>(d);
    }
    return parsed;
  }
  if (type == "boolean" || type == "bool" || type == "binary") {
    std::string l = lower(t);
    if (l == "true") return true;
    if (l == "false") return false;
    return raw;
  }
  if (type == "object" || type == "array" || type == "dict" || type == "list") {
    if (ok && (parsed.is_object() || parsed.is_array())) return parsed;
    return raw;
  }
  return ok ? parsed : json(raw);  // untyped (anyOf, ...): JSON if it parses
}

ToolCallParser::ToolCallParser(json tools, std::function<std::string()> make_id)
    : tools_(std::move(tools)), make_id_(make_id ? std::move(make_id) : std::function<std::string()>(tool_call_id)) {}

const json* ToolCallParser::param_schema(const std::string& param) const {
  if (!tools_.is_array()) return nullptr;
  for (auto& tool : tools_) {
    const json* fn = tool.contains("function") && tool["function"].is_object() ? &tool["function"] : &tool;
    auto n = fn->find("name");
    if (n == fn->end() || !n->is_string() || n->get<std::string>() != function_) continue;
    auto params = fn->find("parameters");
    if (params == fn->end() || !params->is_object()) return nullptr;
    auto props = params->find("properties");
    if (props == params->end() || !props->is_object()) return nullptr;
    auto p = props->find(param);
    return p == props->end() ? nullptr : &*p;
  }
  return nullptr;
}

void ToolCallParser::emit_content(ToolParseDelta& out, std::string_view text) {
  if (after_call_) {
    text = text.substr(skip_space(text));
    if (text.empty()) return;
    after_call_ = false;
  }
  out.content += text;
}

void ToolCallParser::finish_parameter(ToolParseDelta& out, std::string_view raw) {
  // The format puts the value on its own lines: drop one newline on each side.
  if (!raw.empty() && raw.front() == '\n') raw.remove_prefix(1);
  if (!raw.empty() && raw.back() == '\n') raw.remove_suffix(1);
  json v = tool_param_value(std::string(raw), param_schema(parameter_));
  std::string frag = params_emitted_++ ? ", " : "{";
  frag += py_json(json(parameter_)) + ": " + py_json(v);
  out.tool_calls.push_back(ToolCallDelta{calls_ - 1, "", "", std::move(frag)});
}

void ToolCallParser::close_arguments(ToolParseDelta& out) {
  out.tool_calls.push_back(ToolCallDelta{calls_ - 1, "", "", params_emitted_ ? "}" : "{}"});
}

ToolParseDelta ToolCallParser::feed(std::string_view text) {
  ToolParseDelta out;
  buf_.append(text);
  step(out, false);
  merge_fragments(out);
  return out;
}

ToolParseDelta ToolCallParser::finish() {
  ToolParseDelta out;
  step(out, true);
  switch (state_) {
    case State::kContent: {
      std::string_view rest = buf_;
      if (calls_ > 0) rest = trim(rest);
      emit_content(out, rest);
      break;
    }
    case State::kCallOpen: emit_content(out, held_space_ + std::string(kCallOpen) + buf_); break;
    case State::kFunction: close_arguments(out); break;
    case State::kParameter: {
      std::string_view v = buf_;  // cut short: drop a half-written closing tag
      size_t cut = 0;
      for (std::string_view t : {kParamClose, kFunctionClose, kCallClose, kParamOpen})
        cut = std::max(cut, partial_suffix(v, t));
      finish_parameter(out, v.substr(0, v.size() - cut));
      close_arguments(out);
      break;
    }
    case State::kAfterFunction: break;
  }
  buf_.clear();
  state_ = State::kContent;
  merge_fragments(out);
  return out;
}

void ToolCallParser::step(ToolParseDelta& out, bool final) {
  while (true) {
    std::string_view b = buf_;
    switch (state_) {
      case State::kContent: {
        size_t p = b.find(kCallOpen);
        if (p != std::string_view::npos) {
          std::string_view before = b.substr(0, p);
          while (!before.empty() && is_space(before.back())) before.remove_suffix(1);  // template's "\n\n"
          emit_content(out, before);
          held_space_ = std::string(b.substr(before.size(), p - before.size()));  // back if not a call
          buf_.erase(0, p + kCallOpen.size());
          state_ = State::kCallOpen;
          continue;
        }
        if (final) return;
        size_t safe = b.size() - partial_suffix(b, kCallOpen);
        while (safe > 0 && is_space(b[safe - 1])) --safe;  // might precede a call
        emit_content(out, b.substr(0, safe));
        buf_.erase(0, safe);
        return;
      }
      case State::kCallOpen: {
        size_t i = skip_space(b);
        std::string_view rest = b.substr(i);
        if (starts_with(rest, kFunctionOpen)) {
          size_t gt = rest.find('>');
          std::string_view name = gt == std::string_view::npos ? rest.substr(kFunctionOpen.size())
                                                               : rest.substr(kFunctionOpen.size(), gt - kFunctionOpen.size());
          bool bad = name.size() > kMaxNameLen || name.find('\n') != std::string_view::npos ||
                     name.find('<') != std::string_view::npos || (gt != std::string_view::npos && trim(name).empty());
          if (!bad && gt == std::string_view::npos) {
            if (final) bad = true;
            else return;  // the name is still arriving
          }
          if (!bad) {
            function_ = std::string(trim(name));
            params_emitted_ = 0;
            out.tool_calls.push_back(ToolCallDelta{calls_++, make_id_(), function_, ""});
            held_space_.clear();
            buf_.erase(0, i + gt + 1);
            state_ = State::kFunction;
            continue;
          }
        } else if (starts_with(rest, kCallClose)) {  // empty block
          buf_.erase(0, i + kCallClose.size());
          state_ = State::kContent;
          after_call_ = true;
          continue;
        } else if (!final && (proper_prefix_of(rest, kFunctionOpen) || proper_prefix_of(rest, kCallClose))) {
          return;
        }
        // Not a call after all: the tag is ordinary text.
        state_ = State::kContent;
        emit_content(out, held_space_ + std::string(kCallOpen));
        held_space_.clear();
        continue;
      }
      case State::kFunction: {
        size_t i = skip_space(b);
        std::string_view rest = b.substr(i);
        if (starts_with(rest, kParamOpen)) {
          size_t gt = rest.find('>');
          if (gt == std::string_view::npos) {
            if (rest.size() > kParamOpen.size() + kMaxNameLen) {  // garbage: skip the tag text
              buf_.erase(0, i + kParamOpen.size());
              continue;
            }
            return;
          }
          parameter_ = std::string(trim(rest.substr(kParamOpen.size(), gt - kParamOpen.size())));
          buf_.erase(0, i + gt + 1);
          state_ = State::kParameter;
          continue;
        }
        if (starts_with(rest, kFunctionClose)) {
          close_arguments(out);
          buf_.erase(0, i + kFunctionClose.size());
          state_ = State::kAfterFunction;
          continue;
        }
        if (starts_with(rest, kCallClose)) {  // "</function>" missing
          close_arguments(out);
          buf_.erase(0, i + kCallClose.size());
          state_ = State::kContent;
          after_call_ = true;
          continue;
        }
        if (rest.empty() || proper_prefix_of(rest, kParamOpen) || proper_prefix_of(rest, kFunctionClose) ||
            proper_prefix_of(rest, kCallClose))
          return;
        // Stray text inside a function: skip to the next tag.
        size_t lt = rest.find('<', 1);
        buf_.erase(0, lt == std::string_view::npos ? b.size() : i + lt);
        continue;
      }
      case State::kParameter: {
        size_t best = std::string_view::npos;
        std::string_view term;
        for (std::string_view t : {kParamClose, kParamOpen, kFunctionClose, kCallClose}) {
          size_t p = b.find(t);
          if (p < best) {
            best = p;
            term = t;
          }
        }
        if (best == std::string_view::npos) return;  // value still arriving (finish() takes it as is)
        finish_parameter(out, b.substr(0, best));
        buf_.erase(0, best + (term == kParamClose ? term.size() : 0));
        state_ = State::kFunction;
        continue;
      }
      case State::kAfterFunction: {
        size_t i = skip_space(b);
        std::string_view rest = b.substr(i);
        if (starts_with(rest, kCallClose)) {
          buf_.erase(0, i + kCallClose.size());
          state_ = State::kContent;
          after_call_ = true;
          continue;
        }
        if (starts_with(rest, kFunctionOpen)) {  // a second function in the same block
          state_ = State::kCallOpen;
          continue;
        }
        if (!final && (rest.empty() || proper_prefix_of(rest, kCallClose) || proper_prefix_of(rest, kFunctionOpen)))
          return;
        state_ = State::kContent;  // "</tool_call>" missing
        after_call_ = true;
        continue;
      }
    }
  }
}

ToolParseResult ToolCallParser::parse(std::string_view text, const json& tools, std::function<std::string()> make_id) {
  ToolCallParser p(tools, std::move(make_id));
  ToolParseResult r;
  auto absorb = [&](ToolParseDelta d) {
    r.content += d.content;
    for (auto& c : d.tool_calls) {
      if (c.index >= static_cast<int>(r.tool_calls.size())) r.tool_calls.push_back(ToolCall{c.id, c.name, ""});
      r.tool_calls[static_cast<size_t>(c.index)].arguments += c.arguments;
    }
  };
  absorb(p.feed(text));
  absorb(p.finish());
  return r;
}

}  // namespace ds
