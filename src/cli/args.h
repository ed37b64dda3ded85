// A small flag parser: --name value, --name=value, boolean --flag, positional arguments.
#pragma once
#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include "core/status.h"

namespace ds::cli {

class Args {
 public:
  // `bool_flags` take no value.
  Args(int argc, char** argv, int first, std::vector<std::string> bool_flags = {})
      : Args(std::vector<std::string>(argv + std::min(first, argc), argv + argc), std::move(bool_flags)) {}
  // The words after the command. A flag given twice keeps both (get_all); get() returns the first.
  Args(const std::vector<std::string>& words, std::vector<std::string> bool_flags) {
    const int argc = int(words.size());
    for (int i = 0; i < argc; ++i) {
      std::string a = words[size_t(i)];
      if (a.rfind("--", 0) == 0) {
        std::string name = a.substr(2), value;
        auto eq = name.find('=');
        bool is_bool = false;
        for (auto& b : bool_flags) is_bool |= name == b;
        if (eq != std::string::npos) {
          value = name.substr(eq + 1);
          name = name.substr(0, eq);
        } else if (is_bool) {
          value = "true";
        } else {
          if (i + 1 >= argc) fail("flag --", name, " expects a value");
          value = words[size_t(++i)];
        }
        flags_.emplace(name, value);
      } else {
        positional_.push_back(a);
      }
    }
  }
  // Fails on the first flag the command does not take (vLLM rejects unknown flags too: a misspelt flag silently ignored
  // is worse than an error), naming the closest known flag or listing them. --model is always allowed.
  void only(const std::string& command, const std::vector<std::string>& known) const {
    for (const auto& [name, value] : flags_) {
      if (name == "model") continue;
      bool ok = false;
      for (const auto& k : known) ok |= k == name;
      if (ok) continue;
      std::string best, list;
      size_t best_d = std::string::npos;
      for (const auto& k : known) {
        const size_t d = edit_distance(name, k);
        if (d < best_d) best_d = d, best = k;
        list += (list.empty() ? "--" : ", --") + k;
      }
      if (best_d <= 3) fail(command, ": unknown flag --", name, " (did you mean --", best, "?)");
      fail(command, ": unknown flag --", name, " (", command, " takes ", list, ")");
    }
  }
  bool has(const std::string& n) const { return flags_.count(n) > 0; }
  std::string get(const std::string& n, const std::string& def = "") const {
    auto r = flags_.equal_range(n);  // the first given (the command line's before a --config file's)
    return r.first == r.second ? def : r.first->second;
  }
  std::vector<std::string> get_all(const std::string& n) const {
    std::vector<std::string> v;
    auto r = flags_.equal_range(n);
    for (auto it = r.first; it != r.second; ++it) v.push_back(it->second);
    return v;
  }
  std::string require(const std::string& n) const {
    if (!has(n)) fail("missing required flag --", n);
    return get(n);
  }
  int64_t get_int(const std::string& n, int64_t def) const {
    if (!has(n)) return def;
    std::string v = get(n);
    try {
      size_t pos = 0;
      long long x = std::stoll(v, &pos);
      if (pos != v.size()) throw std::invalid_argument(v);
      return x;
    } catch (...) {
      fail("flag --", n, " expects an integer, got '", v, "'");
    }
  }
  double get_double(const std::string& n, double def) const {
    if (!has(n)) return def;
    std::string v = get(n);
    try {
      size_t pos = 0;
      double x = std::stod(v, &pos);
      if (pos != v.size()) throw std::invalid_argument(v);
      return x;
    } catch (...) {
      fail("flag --", n, " expects a number, got '", v, "'");
    }
  }
  const std::vector<std::string>& positional() const { return positional_; }
  // --model DIR or the first positional argument.
  std::string model_dir() const {
    if (has("model")) return get("model");
    if (!positional_.empty()) return positional_[0];
    fail("missing model: pass --model DIR or DIR as the first argument");
  }

 private:
  static size_t edit_distance(const std::string& a, const std::string& b) {
    std::vector<size_t> row(b.size() + 1);
    for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
    for (size_t i = 1; i <= a.size(); ++i) {
      size_t diag = row[0];
      row[0] = i;
      for (size_t j = 1; j <= b.size(); ++j) {
        const size_t up = row[j];
        row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
        diag = up;
      }
    }
    return row[b.size()];
  }
  std::multimap<std::string, std::string> flags_;
  std::vector<std::string> positional_;
};

std::vector<int32_t> parse_token_list(const std::string& s);

}  // namespace ds::cli
