#include "core/dtype.h"

#include <cmath>

namespace ds {

namespace {
struct DTypeInfo {
  DType t;
  const char* name;
  size_t size;
};
constexpr DTypeInfo kInfo[] = {
    {DType::F32, "F32", 4},  {DType::F16, "F16", 2},   {DType::BF16, "BF16", 2}, {DType::I32, "I32", 4},
    {DType::I64, "I64", 8},  {DType::U8, "U8", 1},     {DType::I8, "I8", 1},     {DType::BOOL, "BOOL", 1},
    {DType::F64, "F64", 8},  {DType::I16, "I16", 2},   {DType::U16, "U16", 2},   {DType::U32, "U32", 4},
    {DType::U64, "U64", 8},
};
}  // namespace

size_t dtype_size(DType t) {
  for (auto& i : kInfo)
    if (i.t == t) return i.size;
  return 0;
}
const char* dtype_name(DType t) {
  for (auto& i : kInfo)
    if (i.t == t) return i.name;
  return "?";
}
bool dtype_from_name(std::string_view name, DType* out) {
  for (auto& i : kInfo)
    if (name == i.name) {
      *out = i.t;
      return true;
    }
  return false;
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  int32_t exp = int32_t((u >> 23) & 0xff) - 127 + 15;
  uint32_t mant = u & 0x7fffffu;
  if (((u >> 23) & 0xff) == 0xff) return uint16_t(sign | 0x7c00u | (mant ? 0x200u : 0));
  if (exp >= 31) return uint16_t(sign | 0x7c00u);
  if (exp <= 0) {
    if (exp < -10) return uint16_t(sign);
    mant |= 0x800000u;
    uint32_t shift = uint32_t(14 - exp);
    uint32_t half = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1);
    uint32_t mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) ++half;
    return uint16_t(sign | half);
  }
  uint32_t half = sign | uint32_t(exp) << 10 | (mant >> 13);
  uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1))) ++half;
  return uint16_t(half);
}

}  // namespace ds
