// Unicode helpers for the tokenizer: a per-code-point property table (general category, White_Space,
// "may change under NFC"), UTF-8 decoding/encoding, NFC through utf8proc, and lossy UTF-8 decoding that
// matches Rust's String::from_utf8_lossy (what HF tokenizers' ByteLevel decoder uses).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ds::text::unicode {

// One byte per code point: low 5 bits are the utf8proc general category (UTF8PROC_CATEGORY_*, 0..29).
enum : uint8_t {
  kCategoryMask = 0x1F,
  kWhiteSpace = 0x20,  // Unicode White_Space (what Oniguruma's \s matches)
  kNfcUnsafe = 0x40,   // NFC may change or combine this code point (see unicode.cpp)
};

// Property table, 0x110000 entries, built once per process on first use (~10 ms).
const uint8_t* property_table();
inline uint8_t properties(uint32_t cp) { return cp < 0x110000 ? property_table()[cp] : 0; }

// Decodes one strict UTF-8 sequence at s[0..n). Returns its length (1..4), or 0 if the bytes there are
// not valid UTF-8 (overlong forms, surrogates and values above U+10FFFF are invalid).
size_t utf8_decode(const char* s, size_t n, uint32_t* cp);
void utf8_append(std::string& out, uint32_t cp);

// Decodes `s` to code points; also returns the byte offset of each code point (offsets has n+1 entries).
// Throws ds::Error on invalid UTF-8.
void utf8_to_code_points(std::string_view s, std::vector<uint32_t>& cps, std::vector<uint32_t>& offsets);

// NFC. Fast path: text with no kNfcUnsafe code point is returned unchanged; otherwise only the regions
// around unsafe code points go through utf8proc. Throws ds::Error on invalid UTF-8.
std::string nfc(std::string_view s);
// False when nfc(s) == s is certain (no kNfcUnsafe code point): callers skip the copy.
bool nfc_needed(std::string_view s);

// Appends the lossy decoding of `bytes` to `out`: every maximal ill-formed subsequence becomes one U+FFFD,
// exactly like Rust's String::from_utf8_lossy. With final=false, a trailing sequence that is incomplete but
// could still become valid is left unconsumed (for streaming). Returns the number of bytes consumed.
size_t utf8_lossy_append(std::string_view bytes, bool final, std::string& out);
inline std::string utf8_lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  utf8_lossy_append(bytes, true, out);
  return out;
}

// Simple case folding used for case-insensitive regex literals: lower(upper(cp)), so that e.g. U+017F
// LONG S matches 's' and U+212A KELVIN SIGN matches 'k', as in Oniguruma.
uint32_t simple_fold(uint32_t cp);

}  // namespace ds::text::unicode
