// Byte-level BPE tokenizer loaded from a Hugging Face tokenizer.json, exact against HF `tokenizers` for the
// Qwen2/Qwen3/Qwen3.5 family (see docs/text.md).
//
// Encode pipeline (same order as HF):
//   1. added tokens (special and not) are split out of the raw text, longest match first, leftmost;
//      with allow_special=false, special ones are left in the text and tokenized as plain text;
//   2. each remaining piece is NFC-normalized (utf8proc);
//   3. split by the pre-tokenizer regex(es) from tokenizer.json (SplitRegex, Oniguruma semantics);
//   4. each pre-token's bytes are mapped to byte tokens and merged by rank (lowest rank first, leftmost on
//      ties); results are cached per pre-token.
// Decode: concatenate the raw bytes of the tokens, then lossy UTF-8 (each ill-formed subsequence -> U+FFFD,
// like Rust's String::from_utf8_lossy).
//
// Ids: nothing assumes that ids follow byte order or that added tokens come after the vocabulary.
// vocab_size() is the tokenizer's max id + 1. The model's embedding may be wider (Qwen3.5: 248320 rows
// for 248077 tokenizer ids): ids in [vocab_size(), model_vocab_size()) and holes below vocab_size() decode
// to nothing (as HF does); ids < 0 or >= model_vocab_size() are an error.
//
// Thread safety: a loaded Tokenizer is immutable apart from its internal, mutex-guarded BPE cache, so
// encode/decode may be called from several threads. Copies share the vocabulary and the cache.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace ds::text {

class Tokenizer {
 public:
  // `path` is a tokenizer.json file or a model directory holding tokenizer.json. A tokenizer_config.json
  // next to it (optional) provides eos/pad/bos; a config.json next to it (optional) provides the model's
  // vocab_size (top level or text_config). Throws ds::Error with a clear message on any malformed file.
  static Tokenizer load(const std::string& path);
  // Same from in-memory JSON texts (tests, tools). Empty config texts mean "absent".
  static Tokenizer from_json(std::string_view tokenizer_json, std::string_view tokenizer_config_json = {},
                             std::string_view model_config_json = {});

  std::vector<int32_t> encode(std::string_view text, bool allow_special = true) const;
  void encode_append(std::string_view text, bool allow_special, std::vector<int32_t>& out) const;

  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const;

  // Raw bytes of one token (possibly not valid UTF-8 on its own); empty for unassigned ids below
  // model_vocab_size(); throws for ids outside [0, model_vocab_size()). Valid while the tokenizer lives.
  std::string_view token_bytes(int32_t id) const;
  // Id of a token by its tokenizer.json spelling: "<|im_end|>" or a vocab key such as "Ġhello".
  std::optional<int32_t> token_id(std::string_view token) const;
  // The inverse: a token's tokenizer.json spelling (transformers' convert_ids_to_tokens): an added token's content,
  // a vocab token's bytes through GPT-2's byte-to-unicode map; "" for an unassigned id. Throws as token_bytes does.
  std::string token_string(int32_t id) const;
  // True for added tokens marked "special": true (skipped by decode(skip_special=true)).
  bool is_special(int32_t id) const;
  bool is_added(int32_t id) const;

  int32_t vocab_size() const;  // tokenizer's max id + 1
  int32_t model_vocab_size() const { return model_vocab_size_; }
  // Ids in [vocab_size(), n) decode to nothing; >= n is an error. n must be >= vocab_size().
  void set_model_vocab_size(int32_t n);

  // From tokenizer_config.json when present (eos_token / pad_token / bos_token), else nullopt.
  std::optional<int32_t> eos_token_id() const;
  std::optional<int32_t> pad_token_id() const;
  std::optional<int32_t> bos_token_id() const;

  // The pre-tokenizer regex pattern(s) in use, for diagnostics.
  std::vector<std::string> pretokenizer_patterns() const;

  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;
  int32_t model_vocab_size_ = 0;
};

}  // namespace ds::text
