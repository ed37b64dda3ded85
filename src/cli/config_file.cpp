#include "cli/config_file.h"

#include <cctype>
#include <fstream>

#include "core/status.h"

namespace ds::cli {

namespace {

std::string trim(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t\r");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t\r") - b + 1);
}

// The line without a comment: '#' at the start or after whitespace, outside quotes.
std::string strip_comment(const std::string& s) {
  char quote = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (quote) {
      if (c == quote) quote = 0;
      else if (c == '\\' && quote == '"') ++i;
    } else if (c == '"' || c == '\'') {
      quote = c;
    } else if (c == '#' && (i == 0 || s[i - 1] == ' ' || s[i - 1] == '\t')) {
      return s.substr(0, i);
    }
  }
  return s;
}

}  // namespace

std::vector<std::string> config_file_args(const std::string& path) {
  std::ifstream f(path);
  if (!f) fail("--config: cannot read '", path, "'");
  std::vector<std::string> out;
  std::string line, list_key;  // list_key: the key whose block list is being read
  int n = 0;
  auto where = [&] { return "--config " + path + ": line " + std::to_string(n) + ": "; };
  auto scalar = [&](std::string v) -> std::string {
    if (v.size() >= 2 && (v.front() == '"' || v.front() == '\'')) {
      if (v.back() != v.front()) fail(where(), "unterminated quoted value ", v);
      const char q = v.front();
      std::string s;
      for (size_t i = 1; i + 1 < v.size(); ++i) {
        if (q == '\'' && v[i] == '\'' && v[i + 1] == '\'') {
          s += '\'';
          ++i;
        } else if (q == '"' && v[i] == '\\' && i + 2 < v.size()) {
          const char e = v[++i];
          s += e == 'n' ? '\n' : e == 't' ? '\t' : e;
        } else {
          s += v[i];
        }
      }
      return s;
    }
    if (!v.empty() && (v.front() == '&' || v.front() == '*' || v.front() == '|' || v.front() == '>' || v.front() == '!'))
      fail(where(), "anchors, aliases, tags and block strings are not supported; write the value on one line, got ", v);
    return v;
  };
  auto add = [&](const std::string& key, const std::string& raw) {
    const std::string v = scalar(raw);
    if (raw == "true" || raw == "True" || raw == "TRUE") {
      out.push_back("--" + key);
    } else if (raw == "false" || raw == "False" || raw == "FALSE") {
      // a boolean flag left off
    } else {
      out.push_back("--" + key);
      out.push_back(v);
    }
  };
  while (std::getline(f, line)) {
    ++n;
    const std::string body = strip_comment(line);
    const std::string t = trim(body);
    if (t.empty() || t == "---") continue;
    const bool indented = body[0] == ' ' || body[0] == '\t';
    if (t[0] == '-' && (t.size() == 1 || t[1] == ' ')) {
      if (list_key.empty()) fail(where(), "a list item '", t, "' outside a list (expected 'key:' on the line before)");
      add(list_key, trim(t.substr(1)));
      continue;
    }
    if (indented) fail(where(), "nested mappings are not supported (flags are one level: 'key: value'), got '", t, "'");
    const size_t colon = t.find(':');
    if (colon == std::string::npos || colon == 0 || (colon + 1 < t.size() && t[colon + 1] != ' ' && t[colon + 1] != '\t'))
      fail(where(), "expected 'flag-name: value', got '", t, "'");
    std::string key = trim(t.substr(0, colon));
    for (char& c : key)
      if (c == '_') c = '-';
    if (key.rfind("--", 0) == 0) key = key.substr(2);
    for (char c : key)
      if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-'))
        fail(where(), "'", key, "' is not a flag name");
    const std::string value = trim(t.substr(colon + 1));
    list_key.clear();
    if (value.empty()) {
      list_key = key;  // a block list follows (or nothing: an empty value)
      continue;
    }
    add(key, value);
  }
  return out;
}

std::vector<std::string> expand_config_args(int argc, char** argv, int first) {
  std::vector<std::string> rest, config;
  for (int i = first; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--config" || a.rfind("--config=", 0) == 0) {
      std::string path;
      if (a == "--config") {
        if (i + 1 >= argc) fail("flag --config expects a value (a YAML file)");
        path = argv[++i];
      } else {
        path = a.substr(9);
      }
      for (auto& w : config_file_args(path)) config.push_back(w);
    } else {
      rest.push_back(a);
    }
  }
  rest.insert(rest.end(), config.begin(), config.end());
  return rest;
}

}  // namespace ds::cli
