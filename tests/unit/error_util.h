// Shared by the unit tests: the message of the ds::Error a statement throws, EXPECT_ERROR on a substring of it, and
// bytes shown readably in failure messages.
#pragma once
#include <cstdio>
#include <functional>
#include <string>
#include <string_view>

#include "core/status.h"

namespace ds::test {

// The what() of the ds::Error that f throws, or "(no error)".
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// Printable ASCII as is, every other byte (and '\\') as \xNN.
inline std::string show(std::string_view s) {
  std::string o;
  for (unsigned char c : s) {
    if (c >= 0x20 && c < 0x7F && c != '\\') {
      o += char(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02X", c);
      o += buf;
    }
  }
  return o;
}

}  // namespace ds::test

// Expects `stmt` to throw a ds::Error whose message contains `substr`.
#define EXPECT_ERROR(stmt, substr)                                        \
  do {                                                                    \
    std::string _m = ::ds::test::error_of([&] { stmt; });                 \
    EXPECT_NE(_m.find(substr), std::string::npos) << "message: " << _m;   \
  } while (0)
