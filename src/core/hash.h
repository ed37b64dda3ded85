// FNV-1a, 64-bit: a fingerprint of bytes (not for hash tables of adversarial keys). Chain buffers by passing the
// previous result as h. Used where two runs or builds must be shown to produce the same bytes.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ds {

constexpr uint64_t kFnv1aBasis = 0xcbf29ce484222325ull;  // the hash of no bytes

inline uint64_t fnv1a(const void* data, size_t n, uint64_t h = kFnv1aBasis) {
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

}  // namespace ds
