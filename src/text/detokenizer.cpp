#include "text/detokenizer.h"

#include <algorithm>
#include <utility>

#include "text/unicode.h"

namespace ds::text {

Detokenizer::Detokenizer(const Tokenizer& tok, DetokenizerOptions opts) : tok_(tok), opts_(std::move(opts)) {
  std::erase_if(opts_.stop, [](const std::string& s) { return s.empty(); });
}

std::string Detokenizer::push(int32_t id) {
  if (stopped()) return {};
  std::string_view b = tok_.token_bytes(id);  // validates the id
  if (opts_.skip_special && tok_.is_special(id)) return {};
  bytes_.append(b);
  size_t used = unicode::utf8_lossy_append(bytes_, /*final=*/false, text_);
  bytes_.erase(0, used);
  return release(false);
}

std::string Detokenizer::flush() {
  if (stopped()) return {};
  unicode::utf8_lossy_append(bytes_, /*final=*/true, text_);
  bytes_.clear();
  return release(true);
}

std::string Detokenizer::release(bool final) {
  if (opts_.stop.empty()) return std::exchange(text_, std::string());
  // Earliest complete stop string wins. text_ only holds what was held back plus the new text, so this
  // search is short.
  size_t best = std::string::npos;
  const std::string* which = nullptr;
  for (const std::string& s : opts_.stop) {
    size_t pos = text_.find(s);
    if (pos < best) best = pos, which = &s;
  }
  if (which) {
    std::string out = text_.substr(0, best + (opts_.include_stop ? which->size() : 0));
    stop_match_ = *which;
    text_.clear();
    bytes_.clear();
    return out;
  }
  // Hold back the longest suffix that is a proper prefix of some stop string: more text could complete
  // it. Such a suffix starts where a stop string starts, so it never splits a UTF-8 character. With include_stop
  // that text goes out either way: nothing is held.
  size_t hold = 0;
  if (!final && !opts_.include_stop) {
    for (const std::string& s : opts_.stop) {
      for (size_t k = std::min(s.size() - 1, text_.size()); k > hold; --k) {
        if (text_.compare(text_.size() - k, k, s, 0, k) == 0) {
          hold = k;
          break;
        }
      }
    }
  }
  std::string out = text_.substr(0, text_.size() - hold);
  text_.erase(0, text_.size() - hold);
  return out;
}

}  // namespace ds::text
