// Shared by the engine tests that constrain the tiny models' output: their vocabulary as the server gives it to a
// grammar (added tokens spell nothing) and the text a list of its tokens spells.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "golden_util.h"
#include "sampling/grammar.h"
#include "text/tokenizer.h"

namespace ds::test {

inline std::shared_ptr<const sampling::TokenMasker> tiny_masker() {
  static const auto m = [] {
    const auto tok = text::Tokenizer::load(data_dir() + "/tiny-moe/tiny-moe-int4/tokenizer.json");
    std::vector<std::string> bytes(2048);
    for (int32_t id = 0; id < tok.vocab_size(); ++id)
      if (!tok.is_added(id)) bytes[size_t(id)] = std::string(tok.token_bytes(id));
    return std::make_shared<const sampling::TokenMasker>(std::move(bytes));
  }();
  return m;
}

inline std::string text_of(const std::vector<int32_t>& toks) {
  std::string t;
  for (int32_t id : toks) t += tiny_masker()->token_bytes(id);
  return t;
}

}  // namespace ds::test
