// libFuzzer target: the safetensors header parser must reject or accept any byte string without crashing,
// reading out of bounds, or allocating unboundedly.
#include <cstddef>
#include <cstdint>

#include "core/status.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    auto h = ds::io::safetensors_parse(data, size, "fuzz");
    // Every accepted entry must lie inside the input.
    for (auto& t : h.tensors)
      if (h.data_offset + t.end > size) __builtin_trap();
  } catch (const ds::Error&) {
  }
  return 0;
}
