// Errors at the boundaries: every failure names what was expected and what was found.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ds {

// Thrown for bad input (file, request, config). Caught at the boundary (CLI main, HTTP handler).
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

namespace detail {
inline void str_append(std::ostringstream&) {}
template <typename T, typename... Rest>
void str_append(std::ostringstream& os, const T& v, const Rest&... rest) {
  os << v;
  str_append(os, rest...);
}
}  // namespace detail

template <typename... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream os;
  detail::str_append(os, args...);
  return os.str();
}

template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  throw Error(str_cat(args...));
}

template <typename T>
std::string shape_str(const std::vector<T>& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

}  // namespace ds

// Internal invariant check (programming error, not user input): aborts with location.
#define DS_CHECK(cond, ...)                                                                   \
  do {                                                                                        \
    if (!(cond))                                                                              \
      throw ::ds::Error(::ds::str_cat(__FILE__, ":", __LINE__, ": check failed: " #cond " ",  \
                                      ##__VA_ARGS__));                                        \
  } while (0)
