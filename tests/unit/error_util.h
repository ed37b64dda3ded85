// Shared by the unit tests: the message of the ds::Error a statement throws, and EXPECT_ERROR on a substring of it.
#pragma once
#include <functional>
#include <string>

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

}  // namespace ds::test

// Expects `stmt` to throw a ds::Error whose message contains `substr`.
#define EXPECT_ERROR(stmt, substr)                                        \
  do {                                                                    \
    std::string _m = ::ds::test::error_of([&] { stmt; });                 \
    EXPECT_NE(_m.find(substr), std::string::npos) << "message: " << _m;   \
  } while (0)
