#include "text/unicode.h"

#include <utf8proc.h>

#include <cstdlib>
#include <cstring>
#include <mutex>

#include "core/status.h"

namespace ds::text::unicode {

namespace {

// Unicode White_Space (PropList.txt). Oniguruma's \s in Unicode mode is exactly this set; note that it
// excludes U+200B ZERO WIDTH SPACE and U+001C..U+001F (which Python's re would include).
bool is_white_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

uint8_t g_table[0x110000];

void build_table() {
  for (uint32_t c = 0; c < 0x110000; ++c) {
    const utf8proc_property_t* p = utf8proc_get_property(int32_t(c));
    uint8_t v = uint8_t(p->category) & kCategoryMask;
    if (is_white_space(c)) v |= kWhiteSpace;
    // A code point is NFC-unsafe if NFC could reorder it (combining class != 0), replace it (it has a
    // canonical decomposition), or compose it with an earlier starter. The last set is approximated from
    // above by "appears after the first position of some canonical decomposition", plus the Hangul
    // vowel/trailing jamo that compose algorithmically. Over-marking only costs speed, never correctness.
    if (p->combining_class != 0) v |= kNfcUnsafe;
    if (c >= 0x1160 && c <= 0x11FF) v |= kNfcUnsafe;
    g_table[c] |= v;
    if (p->decomp_seqindex != UINT16_MAX && p->decomp_type == 0) {  // canonical (not compat) mapping
      utf8proc_int32_t buf[8];
      int last_boundclass = 0;
      utf8proc_ssize_t n = utf8proc_decompose_char(int32_t(c), buf, 8, UTF8PROC_DECOMPOSE, &last_boundclass);
      if (!(n == 1 && uint32_t(buf[0]) == c)) {
        g_table[c] |= kNfcUnsafe;
        for (utf8proc_ssize_t i = 1; i < n && i < 8; ++i)
          if (buf[i] >= 0 && buf[i] < 0x110000) g_table[buf[i]] |= kNfcUnsafe;
      }
    }
  }
}

std::string utf8proc_nfc(std::string_view s) {
  utf8proc_uint8_t* out = nullptr;
  utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()), utf8proc_ssize_t(s.size()),
                                    &out, utf8proc_option_t(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
  if (n < 0) fail("expected valid UTF-8 text to normalize, got utf8proc error: ", utf8proc_errmsg(n));
  std::string r(reinterpret_cast<char*>(out), size_t(n));
  std::free(out);
  return r;
}

}  // namespace

const uint8_t* property_table() {
  static std::once_flag once;
  std::call_once(once, build_table);
  return g_table;
}

size_t utf8_decode(const char* s, size_t n, uint32_t* cp) {
  const auto* b = reinterpret_cast<const uint8_t*>(s);
  if (n == 0) return 0;
  uint8_t b0 = b[0];
  if (b0 < 0x80) {
    *cp = b0;
    return 1;
  }
  size_t len;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) len = 2;
  else if (b0 >= 0xE0 && b0 <= 0xEF) {
    len = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;  // no surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    len = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if (n < len || b[1] < lo || b[1] > hi) return 0;
  uint32_t v = b0 & (0x7F >> len);
  for (size_t i = 1; i < len; ++i) {
    if ((b[i] & 0xC0) != 0x80) return 0;
    v = (v << 6) | (b[i] & 0x3F);
  }
  *cp = v;
  return len;
}

void utf8_append(std::string& out, uint32_t c) {
  if (c < 0x80) {
    out += char(c);
  } else if (c < 0x800) {
    out += char(0xC0 | (c >> 6));
    out += char(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += char(0xE0 | (c >> 12));
    out += char(0x80 | ((c >> 6) & 0x3F));
    out += char(0x80 | (c & 0x3F));
  } else {
    out += char(0xF0 | (c >> 18));
    out += char(0x80 | ((c >> 12) & 0x3F));
    out += char(0x80 | ((c >> 6) & 0x3F));
    out += char(0x80 | (c & 0x3F));
  }
}

void utf8_to_code_points(std::string_view s, std::vector<uint32_t>& cps, std::vector<uint32_t>& offsets) {
  cps.clear();
  offsets.clear();
  cps.reserve(s.size());
  offsets.reserve(s.size() + 1);
  size_t i = 0;
  while (i < s.size()) {
    uint8_t b = uint8_t(s[i]);
    if (b < 0x80) {  // ASCII fast path
      cps.push_back(b);
      offsets.push_back(uint32_t(i));
      ++i;
      continue;
    }
    uint32_t cp;
    size_t len = utf8_decode(s.data() + i, s.size() - i, &cp);
    if (len == 0) fail("expected valid UTF-8 text, got an invalid byte sequence at byte ", i);
    cps.push_back(cp);
    offsets.push_back(uint32_t(i));
    i += len;
  }
  offsets.push_back(uint32_t(s.size()));
}

std::string nfc(std::string_view s) {
  const uint8_t* table = property_table();
  // Find the first unsafe code point; most text (ASCII, CJK, emoji, precomposed Latin) has none.
  size_t i = 0, n = s.size();
  size_t last_safe = 0;  // byte offset of the last safe code point seen
  bool any = false;
  while (i < n) {
    uint8_t b = uint8_t(s[i]);
    if (b < 0x80) {
      last_safe = i++;
      continue;
    }
    uint32_t cp;
    size_t len = utf8_decode(s.data() + i, n - i, &cp);
    if (len == 0) fail("expected valid UTF-8 text, got an invalid byte sequence at byte ", i);
    if (table[cp] & kNfcUnsafe) {
      any = true;
      break;
    }
    last_safe = i;
    i += len;
  }
  if (!any) return std::string(s);

  // NFC(A + B) == NFC(A) + NFC(B) when B starts with a safe code point: it has combining class 0 (blocks
  // reordering), no decomposition, and cannot be the second half of a composition. So normalize only the
  // regions [last safe before an unsafe run, next safe code point).
  std::string out;
  out.reserve(n + 16);
  size_t copied = 0;
  while (i < n) {
    // i is at an unsafe code point; region starts at the preceding safe starter (it may compose with it).
    size_t region_start = (last_safe < i && last_safe >= copied) ? last_safe : i;
    out.append(s.data() + copied, region_start - copied);
    size_t j = i;
    while (j < n) {
      uint32_t cp;
      size_t len = utf8_decode(s.data() + j, n - j, &cp);
      if (len == 0) fail("expected valid UTF-8 text, got an invalid byte sequence at byte ", j);
      if (!(table[cp] & kNfcUnsafe)) break;
      j += len;
    }
    out += utf8proc_nfc(s.substr(region_start, j - region_start));
    copied = j;
    // Scan on for the next unsafe code point.
    i = j;
    last_safe = i;
    while (i < n) {
      uint32_t cp;
      size_t len = utf8_decode(s.data() + i, n - i, &cp);
      if (len == 0) fail("expected valid UTF-8 text, got an invalid byte sequence at byte ", i);
      if (table[cp] & kNfcUnsafe) break;
      last_safe = i;
      i += len;
    }
  }
  out.append(s.data() + copied, n - copied);
  return out;
}

size_t utf8_lossy_append(std::string_view bytes, bool final, std::string& out) {
  static const char kReplacement[] = "\xEF\xBF\xBD";
  const auto* b = reinterpret_cast<const uint8_t*>(bytes.data());
  size_t n = bytes.size(), i = 0;
  while (i < n) {
    uint8_t b0 = b[i];
    if (b0 < 0x80) {
      out += char(b0);
      ++i;
      continue;
    }
    size_t len;
    uint8_t lo = 0x80, hi = 0xBF;
    if (b0 >= 0xC2 && b0 <= 0xDF) len = 2;
    else if (b0 >= 0xE0 && b0 <= 0xEF) {
      len = 3;
      if (b0 == 0xE0) lo = 0xA0;
      if (b0 == 0xED) hi = 0x9F;
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
      len = 4;
      if (b0 == 0xF0) lo = 0x90;
      if (b0 == 0xF4) hi = 0x8F;
    } else {
      out += kReplacement;  // a byte that can never start a sequence
      ++i;
      continue;
    }
    // Count how many bytes of the sequence are well-formed so far (Unicode's "maximal subpart").
    size_t k = 1;
    while (k < len && i + k < n) {
      uint8_t c = b[i + k];
      bool ok = (k == 1) ? (c >= lo && c <= hi) : (c >= 0x80 && c <= 0xBF);
      if (!ok) break;
      ++k;
    }
    if (k == len) {
      out.append(bytes.data() + i, len);
      i += len;
    } else if (i + k == n && !final) {
      return i;  // incomplete tail that may still become valid: leave it for the next call
    } else {
      out += kReplacement;  // the well-formed prefix (possibly just b0) becomes one U+FFFD
      i += k;
    }
  }
  return n;
}

bool nfc_needed(std::string_view s) {
  const uint8_t* table = property_table();
  size_t i = 0, n = s.size();
  while (i < n) {
    if (uint8_t(s[i]) < 0x80) {
      ++i;
      continue;
    }
    uint32_t cp;
    size_t len = utf8_decode(s.data() + i, n - i, &cp);
    if (len == 0) fail("expected valid UTF-8 text, got an invalid byte sequence at byte ", i);
    if (table[cp] & kNfcUnsafe) return true;
    i += len;
  }
  return false;
}

uint32_t simple_fold(uint32_t cp) {
  if (cp < 0x80) return (cp >= 'A' && cp <= 'Z') ? cp + 32 : cp;
  return uint32_t(utf8proc_tolower(utf8proc_toupper(int32_t(cp))));
}

}  // namespace ds::text::unicode
