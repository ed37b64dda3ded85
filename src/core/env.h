// Environment switches (benchmark variants, before/after measurements). Read on every call, so one process can
// measure several settings.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace ds {

// Whether `name` is set to something other than "" or "0".
inline bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v && *v && std::strcmp(v, "0") != 0;
}

// `name` as an integer (atoll), or dflt when it is unset or empty.
inline int64_t env_int(const char* name, int64_t dflt) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoll(v) : dflt;
}

}  // namespace ds
