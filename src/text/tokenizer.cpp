#include "text/tokenizer.h"

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <unordered_map>

#include "core/file.h"
#include "core/status.h"
#include "text/pretokenizer.h"
#include "text/unicode.h"

namespace ds::text {

namespace {

using nlohmann::json;
namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------------------
// A minimal JSON scanner for tokenizer.json. The file is 11 MB for Qwen3 and nlohmann's DOM parse alone
// takes ~300 ms (std::map objects); we stream model.vocab and model.merges straight into our tables and
// hand the small remaining values to nlohmann.
class JsonScanner {
 public:
  JsonScanner(std::string_view src, std::string name) : s_(src), name_(std::move(name)) {}

  [[noreturn]] void error(const std::string& expected) const {
    std::string got = i_ < s_.size() ? "'" + std::string(s_.substr(i_, std::min<size_t>(20, s_.size() - i_))) + "'"
                                     : std::string("end of file");
    fail(name_, ": expected ", expected, " at byte ", i_, ", got ", got);
  }
  void ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t')) ++i_;
  }
  bool peek_is(char c) {
    ws();
    return i_ < s_.size() && s_[i_] == c;
  }
  void expect(char c) {
    ws();
    if (i_ >= s_.size() || s_[i_] != c) error(std::string("'") + c + "'");
    ++i_;
  }
  bool at_end() {
    ws();
    return i_ >= s_.size();
  }

  // JSON string -> UTF-8 (with \uXXXX escapes and surrogate pairs).
  void string(std::string& out) {
    expect('"');
    out.clear();
    while (true) {
      size_t j = i_;
      while (j < s_.size() && s_[j] != '"' && s_[j] != '\\' && uint8_t(s_[j]) >= 0x20) ++j;
      out.append(s_.data() + i_, j - i_);
      i_ = j;
      if (i_ >= s_.size()) error("closing '\"' of a string");
      char c = s_[i_++];
      if (c == '"') return;
      if (c != '\\') {
        --i_;
        error("no raw control characters inside a string");
      }
      if (i_ >= s_.size()) error("an escape character");
      char e = s_[i_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (i_ + 1 < s_.size() && s_[i_] == '\\' && s_[i_ + 1] == 'u') {
              i_ += 2;
              uint32_t lo = hex4();
              if (lo < 0xDC00 || lo > 0xDFFF) error("a low surrogate after a high surrogate escape");
              cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else {
              error("a low surrogate escape after a high surrogate");
            }
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            error("no lone low surrogate escape");
          }
          unicode::utf8_append(out, cp);
          break;
        }
        default: --i_; error("a valid escape (\\\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX)");
      }
    }
  }
  std::string string() {
    std::string s;
    string(s);
    return s;
  }

  int64_t integer() {
    ws();
    size_t j = i_;
    bool neg = false;
    if (j < s_.size() && s_[j] == '-') neg = true, ++j;
    int64_t v = 0;
    size_t digits = 0;
    while (j < s_.size() && s_[j] >= '0' && s_[j] <= '9') {
      v = v * 10 + (s_[j] - '0');
      if (v > (int64_t(1) << 40)) error("an integer of reasonable size");
      ++j, ++digits;
    }
    if (digits == 0 || (j < s_.size() && (s_[j] == '.' || s_[j] == 'e' || s_[j] == 'E'))) error("an integer");
    i_ = j;
    return neg ? -v : v;
  }

  // Skips one value and returns its raw text.
  std::string_view skip_value() {
    ws();
    size_t start = i_;
    if (i_ >= s_.size()) error("a value");
    char c = s_[i_];
    if (c == '"') {
      std::string tmp;
      string(tmp);
    } else if (c == '{' || c == '[') {
      int depth = 0;
      while (i_ < s_.size()) {
        char d = s_[i_];
        if (d == '"') {
          std::string tmp;
          string(tmp);
          continue;
        }
        if (d == '{' || d == '[') ++depth;
        if (d == '}' || d == ']') {
          if (--depth == 0) {
            ++i_;
            break;
          }
        }
        ++i_;
      }
      if (depth != 0) error("the end of an object or array");
    } else {
      while (i_ < s_.size() && s_[i_] != ',' && s_[i_] != '}' && s_[i_] != ']' && s_[i_] != ' ' &&
             s_[i_] != '\n' && s_[i_] != '\r' && s_[i_] != '\t')
        ++i_;
    }
    return s_.substr(start, i_ - start);
  }
  json value() {
    std::string_view raw = skip_value();
    try {
      return json::parse(raw);
    } catch (const json::exception& e) {
      fail(name_, ": expected valid JSON, got a parse error (", e.what(), ")");
    }
  }

  // Iterates an object: on_key(key) must consume the value.
  template <typename F>
  void object(F&& on_key) {
    expect('{');
    if (peek_is('}')) {
      ++i_;
      return;
    }
    std::string key;
    while (true) {
      string(key);
      expect(':');
      on_key(key);
      ws();
      if (peek_is(',')) {
        ++i_;
        continue;
      }
      expect('}');
      return;
    }
  }
  template <typename F>
  void array(F&& on_elem) {
    expect('[');
    if (peek_is(']')) {
      ++i_;
      return;
    }
    while (true) {
      on_elem();
      if (peek_is(',')) {
        ++i_;
        continue;
      }
      expect(']');
      return;
    }
  }
  bool peek_value_is(char c) { return peek_is(c); }

 private:
  uint32_t hex4() {
    if (i_ + 4 > s_.size()) error("4 hex digits");
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      char c = s_[i_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= uint32_t(c - '0');
      else if (c >= 'a' && c <= 'f') v |= uint32_t(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v |= uint32_t(c - 'A' + 10);
      else error("a hex digit");
    }
    return v;
  }

  std::string_view s_;
  size_t i_ = 0;
  std::string name_;
};

// ---------------------------------------------------------------------------------------------------------
// (left id, right id) -> (rank, merged id). Open addressing with linear probing: the BPE inner loop does
// one lookup per adjacent pair, and std::unordered_map's node chasing made that the hot spot.
class PairMap {
 public:
  void reserve(size_t n) {
    size_t cap = 16;
    while (cap < n * 2) cap <<= 1;
    keys_.assign(cap, kEmpty);
    vals_.assign(cap, 0);
    mask_ = cap - 1;
  }
  // Inserts or overwrites (HF builds its merge map the same way: a later duplicate wins).
  void put(int32_t a, int32_t b, int32_t rank, int32_t id) {
    uint64_t k = key(a, b);
    size_t h = hash(k);
    while (keys_[h] != kEmpty && keys_[h] != k) h = (h + 1) & mask_;
    keys_[h] = k;
    vals_[h] = (uint64_t(uint32_t(rank)) << 32) | uint32_t(id);
  }
  // Returns false if (a, b) is not a merge.
  bool get(int32_t a, int32_t b, int32_t* rank, int32_t* id) const {
    uint64_t k = key(a, b);
    size_t h = hash(k);
    while (true) {
      uint64_t kk = keys_[h];
      if (kk == k) {
        *rank = int32_t(vals_[h] >> 32);
        *id = int32_t(uint32_t(vals_[h]));
        return true;
      }
      if (kk == kEmpty) return false;
      h = (h + 1) & mask_;
    }
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t(0);
  static uint64_t key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }
  size_t hash(uint64_t k) const { return size_t((k * 0x9E3779B97F4A7C15ull) >> 20) & mask_; }
  std::vector<uint64_t> keys_, vals_;
  size_t mask_ = 0;
};

// GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100 + k in byte order.
std::array<uint32_t, 256> byte_to_char_table() {
  std::array<uint32_t, 256> t{};
  uint32_t next = 256;
  for (uint32_t b = 0; b < 256; ++b) {
    bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    t[b] = printable ? b : next++;
  }
  return t;
}

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

}  // namespace

// ---------------------------------------------------------------------------------------------------------
struct Tokenizer::Impl {
  // Vocabulary
  std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>> token_to_id;  // tokenizer.json spelling
  std::vector<std::string> bytes;  // [max id + 1] raw bytes per id (empty: unassigned)
  std::vector<uint8_t> kind;       // [max id + 1] 0 unassigned, 1 vocab, 2 added, 3 added+special
  std::array<int32_t, 256> byte_id;  // id of each single-byte token (-1: missing, the byte is dropped as in HF)
  PairMap merges;
  bool ignore_merges = false;

  // Added tokens, matched on raw text. By first byte, longest first.
  struct Added {
    std::string content;
    int32_t id;
    bool special;
  };
  std::array<std::vector<Added>, 256> added_by_first;

  bool nfc = false;
  std::vector<SplitRegex> splits;  // applied in order; each piece of one is split by the next

  std::optional<int32_t> eos, pad, bos;

  // BPE cache per pre-token, sharded to keep lock contention low between HTTP threads.
  static constexpr size_t kShards = 64, kShardCapacity = 1 << 14;
  struct Shard {
    std::mutex mu;
    std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>> map;
  };
  mutable std::array<Shard, kShards> cache;

  void bpe(std::string_view word, std::vector<int32_t>& out) const;
  void bpe_uncached(std::string_view word, std::vector<int32_t>& out) const;
  void encode_plain(std::string_view text, std::vector<int32_t>& out) const;
};

// Merges by rank: repeatedly merge the adjacent pair with the lowest rank, leftmost among equal ranks. That
// is exactly what HF's priority queue does (a stale queue entry can never pass its validity check, so its
// order equals this one). Short words scan; long ones use a heap to stay O(n log n).
void Tokenizer::Impl::bpe_uncached(std::string_view word, std::vector<int32_t>& out) const {
  std::vector<int32_t> sym;
  sym.reserve(word.size());
  for (unsigned char b : word)
    if (byte_id[b] >= 0) sym.push_back(byte_id[b]);
  if (ignore_merges) {
    // HF: a word that is itself in the vocabulary is one token, merges or not.
    static const std::array<uint32_t, 256> b2c = byte_to_char_table();
    std::string spelled;
    for (unsigned char b : word) unicode::utf8_append(spelled, b2c[b]);
    auto it = token_to_id.find(std::string_view(spelled));
    if (it != token_to_id.end()) {
      out.push_back(it->second);
      return;
    }
  }
  const size_t n = sym.size();
  if (n <= 1) {
    out.insert(out.end(), sym.begin(), sym.end());
    return;
  }
  constexpr int32_t kNone = INT32_MAX;
  if (n <= 48) {
    // rank[i] / merged[i]: the pair (sym[i], sym[i+1]).
    int32_t rank[48], merged[48];
    size_t m = n;
    for (size_t i = 0; i + 1 < m; ++i)
      if (!merges.get(sym[i], sym[i + 1], &rank[i], &merged[i])) rank[i] = kNone;
    while (m > 1) {
      size_t best = 0;
      int32_t best_rank = kNone;
      for (size_t i = 0; i + 1 < m; ++i)
        if (rank[i] < best_rank) best_rank = rank[i], best = i;
      if (best_rank == kNone) break;
      sym[best] = merged[best];
      // Remove sym[best+1] and the pair starting at best+1.
      for (size_t i = best + 1; i + 1 < m; ++i) sym[i] = sym[i + 1];
      for (size_t i = best + 1; i + 2 < m; ++i) rank[i] = rank[i + 1], merged[i] = merged[i + 1];
      --m;
      if (best > 0 && !merges.get(sym[best - 1], sym[best], &rank[best - 1], &merged[best - 1]))
        rank[best - 1] = kNone;
      if (best + 1 < m && !merges.get(sym[best], sym[best + 1], &rank[best], &merged[best])) rank[best] = kNone;
    }
    out.insert(out.end(), sym.begin(), sym.begin() + m);
    return;
  }
  // Long word: doubly linked symbols + min-heap of (rank, position).
  std::vector<int32_t> prev(n), next(n);
  std::vector<bool> alive(n, true);
  for (size_t i = 0; i < n; ++i) prev[i] = int32_t(i) - 1, next[i] = i + 1 < n ? int32_t(i + 1) : -1;
  struct Cand {
    int32_t rank, pos, merged;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto consider = [&](int32_t pos) {
    if (pos < 0 || next[pos] < 0) return;
    int32_t r, id;
    if (merges.get(sym[pos], sym[next[pos]], &r, &id)) heap.push({r, pos, id});
  };
  for (size_t i = 0; i + 1 < n; ++i) consider(int32_t(i));
  while (!heap.empty()) {
    Cand c = heap.top();
    heap.pop();
    if (!alive[c.pos] || next[c.pos] < 0) continue;
    int32_t r, id;
    if (!merges.get(sym[c.pos], sym[next[c.pos]], &r, &id) || id != c.merged) continue;  // stale
    int32_t right = next[c.pos];
    sym[c.pos] = id;
    alive[right] = false;
    next[c.pos] = next[right];
    if (next[right] >= 0) prev[next[right]] = c.pos;
    consider(prev[c.pos]);
    consider(c.pos);
  }
  for (int32_t i = 0; i >= 0; i = next[i]) out.push_back(sym[i]);
}

void Tokenizer::Impl::bpe(std::string_view word, std::vector<int32_t>& out) const {
  size_t h = StringHash{}(word);
  Shard& shard = cache[(h >> 7) % kShards];
  {
    std::lock_guard<std::mutex> lock(shard.mu);
    auto it = shard.map.find(word);
    if (it != shard.map.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  size_t start = out.size();
  bpe_uncached(word, out);
  std::lock_guard<std::mutex> lock(shard.mu);
  if (shard.map.size() >= kShardCapacity) shard.map.clear();  // bounded memory; refills with hot words
  shard.map.emplace(std::string(word), std::vector<int32_t>(out.begin() + long(start), out.end()));
}

void Tokenizer::Impl::encode_plain(std::string_view text, std::vector<int32_t>& out) const {
  if (text.empty()) return;
  std::string normalized;
  if (nfc && unicode::nfc_needed(text)) {
    normalized = unicode::nfc(text);
    text = normalized;
  }
  if (splits.empty()) {
    bpe(text, out);
    return;
  }
  if (splits.size() == 1) {
    splits[0].split_text(text, [&](size_t a, size_t b) { bpe(text.substr(a, b - a), out); });
    return;
  }
  std::vector<uint32_t> cps, offsets;
  unicode::utf8_to_code_points(text, cps, offsets);
  std::vector<uint8_t> props(cps.size());
  const uint8_t* table = unicode::property_table();
  for (size_t i = 0; i < cps.size(); ++i) props[i] = table[cps[i]];
  SplitRegex::Input in{cps.data(), props.data(), cps.size()};
  if (splits.size() == 1) {
    splits[0].split(in, [&](size_t a, size_t b) { bpe(text.substr(offsets[a], offsets[b] - offsets[a]), out); });
    return;
  }
  // Several Split stages: split recursively, BPE at the last stage.
  std::function<void(size_t, size_t, size_t)> stage = [&](size_t level, size_t a, size_t b) {
    if (level == splits.size()) {
      bpe(text.substr(offsets[a], offsets[b] - offsets[a]), out);
      return;
    }
    SplitRegex::Input sub{cps.data() + a, props.data() + a, b - a};
    splits[level].split(sub, [&](size_t x, size_t y) { stage(level + 1, a + x, a + y); });
  };
  stage(0, 0, cps.size());
}

// ---------------------------------------------------------------------------------------------------------
namespace {

std::optional<std::string> token_content(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  return std::nullopt;
}

std::string type_of(const json& j) { return j.is_object() && j.contains("type") && j["type"].is_string() ? j["type"].get<std::string>() : "?"; }

// Collects the Split regexes of a pre_tokenizer and checks that it is byte-level.
void parse_pretokenizer(const json& pt, std::vector<SplitRegex>& splits, bool& byte_level) {
  if (pt.is_null()) return;
  std::string type = type_of(pt);
  if (type == "Sequence") {
    if (!pt.contains("pretokenizers") || !pt["pretokenizers"].is_array())
      fail("tokenizer.json: expected pre_tokenizer.pretokenizers to be an array in a Sequence");
    for (auto& p : pt["pretokenizers"]) parse_pretokenizer(p, splits, byte_level);
  } else if (type == "Split") {
    const json& pat = pt.value("pattern", json());
    if (!pat.is_object() || !pat.contains("Regex") || !pat["Regex"].is_string())
      fail("tokenizer.json: expected pre_tokenizer Split.pattern to be {\"Regex\": \"...\"}, got ", pat.dump());
    std::string behavior = pt.value("behavior", std::string("?"));
    if (behavior != "Isolated")
      fail("tokenizer.json: expected Split.behavior \"Isolated\" (the only one implemented), got \"", behavior, "\"");
    if (pt.value("invert", false)) fail("tokenizer.json: expected Split.invert false, got true");
    splits.push_back(SplitRegex::compile(pat["Regex"].get<std::string>()));
  } else if (type == "ByteLevel") {
    if (pt.value("add_prefix_space", false))
      fail("tokenizer.json: expected ByteLevel.add_prefix_space false (prefix spaces are not implemented), got true");
    if (pt.value("use_regex", true)) {
      // The GPT-2 split that ByteLevel applies itself when use_regex is true.
      splits.push_back(SplitRegex::compile(
          R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)"));
    }
    byte_level = true;
  } else {
    fail("tokenizer.json: expected pre_tokenizer of type Sequence, Split or ByteLevel, got \"", type, "\"");
  }
}

bool parse_normalizer(const json& n) {
  if (n.is_null()) return false;
  std::string type = type_of(n);
  if (type == "NFC") return true;
  if (type == "Sequence" && n.contains("normalizers") && n["normalizers"].is_array()) {
    bool nfc = false;
    for (auto& x : n["normalizers"]) nfc = parse_normalizer(x) || nfc;
    return nfc;
  }
  fail("tokenizer.json: expected normalizer null, NFC or a Sequence of NFC, got \"", type, "\"");
}

void check_decoder(const json& d) {
  if (d.is_null()) fail("tokenizer.json: expected a ByteLevel decoder, got null");
  std::string type = type_of(d);
  if (type == "ByteLevel") return;
  if (type == "Sequence" && d.contains("decoders") && d["decoders"].is_array() && d["decoders"].size() == 1)
    return check_decoder(d["decoders"][0]);
  fail("tokenizer.json: expected a ByteLevel decoder, got \"", type, "\"");
}

}  // namespace

Tokenizer Tokenizer::from_json(std::string_view tokenizer_json, std::string_view tokenizer_config_json,
                               std::string_view model_config_json) {
  auto impl = std::make_shared<Impl>();
  Impl& m = *impl;
  JsonScanner js(tokenizer_json, "tokenizer.json");

  json added_tokens, normalizer, pre_tokenizer, decoder, post_processor;
  bool have_model = false, have_vocab = false, have_merges = false;
  std::string model_type;
  json model_meta = json::object();
  std::vector<std::pair<std::string, int32_t>> vocab;
  std::vector<std::pair<std::string, std::string>> merge_strings;

  js.object([&](const std::string& key) {
    if (key == "model") {
      have_model = true;
      js.object([&](const std::string& mk) {
        if (mk == "vocab") {
          have_vocab = true;
          vocab.reserve(200000);
          std::string tok;
          js.object([&](const std::string& t) {
            int64_t id = js.integer();
            if (id < 0 || id >= (int64_t(1) << 30)) js.error("a vocab id in [0, 2^30)");
            vocab.emplace_back(t, int32_t(id));
          });
        } else if (mk == "merges") {
          have_merges = true;
          merge_strings.reserve(200000);
          js.array([&]() {
            if (js.peek_value_is('[')) {
              std::string a, b;
              js.expect('[');
              js.string(a);
              js.expect(',');
              js.string(b);
              js.expect(']');
              merge_strings.emplace_back(std::move(a), std::move(b));
            } else {
              std::string line = js.string();
              size_t sp = line.find(' ');
              if (sp == std::string::npos || line.find(' ', sp + 1) != std::string::npos)
                fail("tokenizer.json: expected merge #", merge_strings.size(), " to be \"left right\", got \"", line, "\"");
              merge_strings.emplace_back(line.substr(0, sp), line.substr(sp + 1));
            }
          });
        } else {
          model_meta[mk] = js.value();
        }
      });
    } else if (key == "added_tokens") {
      added_tokens = js.value();
    } else if (key == "normalizer") {
      normalizer = js.value();
    } else if (key == "pre_tokenizer") {
      pre_tokenizer = js.value();
    } else if (key == "decoder") {
      decoder = js.value();
    } else if (key == "post_processor") {
      post_processor = js.value();
    } else {
      js.skip_value();
    }
  });
  if (!js.at_end()) js.error("end of file after the top-level object");

  // ---- model ----
  if (!have_model) fail("tokenizer.json: expected a \"model\" object, got none");
  model_type = model_meta.value("type", std::string("BPE"));
  if (model_type != "BPE") fail("tokenizer.json: expected model.type \"BPE\", got \"", model_type, "\"");
  if (!have_vocab) fail("tokenizer.json: expected model.vocab, got none");
  if (!have_merges) fail("tokenizer.json: expected model.merges, got none");
  if (model_meta.value("byte_fallback", false)) fail("tokenizer.json: expected model.byte_fallback false, got true");
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (model_meta.contains(k) && !model_meta[k].is_null() && model_meta[k] != "")
      fail("tokenizer.json: expected model.", k, " to be empty, got ", model_meta[k].dump());
  if (model_meta.contains("dropout") && !model_meta["dropout"].is_null() && model_meta["dropout"] != 0.0)
    fail("tokenizer.json: expected model.dropout null, got ", model_meta["dropout"].dump());
  m.ignore_merges = model_meta.value("ignore_merges", false);

  int32_t max_id = -1;
  for (auto& [t, id] : vocab) max_id = std::max(max_id, id);
  std::vector<std::pair<std::string, int32_t>> added_list;
  std::vector<bool> added_special;
  if (!added_tokens.is_null()) {
    if (!added_tokens.is_array()) fail("tokenizer.json: expected added_tokens to be an array, got ", added_tokens.type_name());
    for (auto& a : added_tokens) {
      if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() || !a.contains("content") ||
          !a["content"].is_string())
        fail("tokenizer.json: expected each added token to have an integer \"id\" and a string \"content\", got ", a.dump());
      int64_t id = a["id"].get<int64_t>();
      std::string content = a["content"].get<std::string>();
      if (id < 0 || id >= (int64_t(1) << 30)) fail("tokenizer.json: expected added token id in [0, 2^30), got ", id);
      if (content.empty()) fail("tokenizer.json: expected a non-empty added token content for id ", id);
      for (const char* flag : {"lstrip", "rstrip", "single_word"})
        if (a.value(flag, false))
          fail("tokenizer.json: added token '", content, "' has ", flag, "=true, which is not implemented");
      added_list.emplace_back(content, int32_t(id));
      added_special.push_back(a.value("special", false));
      max_id = std::max(max_id, int32_t(id));
    }
  }
  if (max_id < 0) fail("tokenizer.json: expected a non-empty vocabulary, got none");

  const size_t nid = size_t(max_id) + 1;
  m.bytes.assign(nid, std::string());
  m.kind.assign(nid, 0);
  m.token_to_id.reserve(vocab.size() + added_list.size());

  // Byte-level spelling -> raw bytes. HF's ByteLevel decoder maps every character of a token back to its
  // byte; if any character is outside the 256-entry table, the token's UTF-8 text is used as is.
  static const std::array<uint32_t, 256> b2c = byte_to_char_table();
  std::array<int16_t, 324> c2b;
  c2b.fill(-1);
  for (int b = 0; b < 256; ++b) c2b[b2c[size_t(b)]] = int16_t(b);
  auto spelled_to_bytes = [&](const std::string& t) {
    std::string out;
    out.reserve(t.size());
    size_t i = 0;
    while (i < t.size()) {
      uint8_t c = uint8_t(t[i]);
      if (c < 0x80) {
        if (c2b[c] < 0) return t;
        out += char(c2b[c]);
        ++i;
        continue;
      }
      uint32_t cp;
      size_t len = unicode::utf8_decode(t.data() + i, t.size() - i, &cp);
      if (len == 0 || cp >= c2b.size() || c2b[cp] < 0) return t;
      out += char(c2b[cp]);
      i += len;
    }
    return out;
  };

  for (auto& [t, id] : vocab) {
    if (m.kind[size_t(id)] != 0)
      fail("tokenizer.json: expected unique vocab ids, got id ", id, " a second time (for '", t, "')");
    m.kind[size_t(id)] = 1;
    m.bytes[size_t(id)] = spelled_to_bytes(t);
    if (!m.token_to_id.emplace(t, id).second) fail("tokenizer.json: expected unique vocab tokens, got '", t, "' twice");
  }
  // Single-byte tokens, found by spelling (never by assuming id == byte order).
  for (int b = 0; b < 256; ++b) {
    std::string spelled;
    unicode::utf8_append(spelled, b2c[size_t(b)]);
    auto it = m.token_to_id.find(std::string_view(spelled));
    m.byte_id[size_t(b)] = it == m.token_to_id.end() ? -1 : it->second;
  }

  // Merges: rank = position in the list; merged token = vocab[left + right].
  m.merges.reserve(merge_strings.size());
  for (size_t r = 0; r < merge_strings.size(); ++r) {
    auto& [a, b] = merge_strings[r];
    auto ia = m.token_to_id.find(std::string_view(a));
    auto ib = m.token_to_id.find(std::string_view(b));
    if (ia == m.token_to_id.end() || ib == m.token_to_id.end())
      fail("tokenizer.json: expected merge #", r, " (\"", a, "\", \"", b, "\") to use vocab tokens, got '",
           ia == m.token_to_id.end() ? a : b, "' which is not in model.vocab");
    std::string ab = a + b;
    auto iab = m.token_to_id.find(std::string_view(ab));
    if (iab == m.token_to_id.end())
      fail("tokenizer.json: expected the result of merge #", r, " '", ab, "' to be in model.vocab, got none");
    m.merges.put(ia->second, ib->second, int32_t(r), iab->second);
  }

  // Added tokens override the vocab entry of the same id (HF looks them up first).
  for (size_t k = 0; k < added_list.size(); ++k) {
    auto& [content, id] = added_list[k];
    m.kind[size_t(id)] = added_special[k] ? 3 : 2;
    m.bytes[size_t(id)] = spelled_to_bytes(content);
    m.token_to_id[content] = id;
    m.added_by_first[uint8_t(content[0])].push_back({content, id, bool(added_special[k])});
  }
  for (auto& list : m.added_by_first)
    std::stable_sort(list.begin(), list.end(),
                     [](const Impl::Added& x, const Impl::Added& y) { return x.content.size() > y.content.size(); });

  // ---- pipeline pieces ----
  m.nfc = parse_normalizer(normalizer);
  bool byte_level = false;
  parse_pretokenizer(pre_tokenizer, m.splits, byte_level);
  if (!byte_level) fail("tokenizer.json: expected a ByteLevel pre-tokenizer (byte-level BPE), got none");
  check_decoder(decoder);
  if (!post_processor.is_null()) {
    std::string t = type_of(post_processor);
    if (t != "ByteLevel")
      fail("tokenizer.json: expected post_processor null or ByteLevel (nothing added to encodings), got \"", t, "\"");
  }

  // ---- tokenizer_config.json ----
  if (!tokenizer_config_json.empty()) {
    json cfg;
    try {
      cfg = json::parse(tokenizer_config_json);
    } catch (const json::exception& e) {
      fail("tokenizer_config.json: expected valid JSON, got a parse error (", e.what(), ")");
    }
    if (!cfg.is_object()) fail("tokenizer_config.json: expected a JSON object, got ", cfg.type_name());
    auto lookup = [&](const char* key) -> std::optional<int32_t> {
      if (!cfg.contains(key) || cfg[key].is_null()) return std::nullopt;
      auto content = token_content(cfg[key]);
      if (!content) fail("tokenizer_config.json: expected ", key, " to be a string or {\"content\": ...}, got ", cfg[key].dump());
      auto it = m.token_to_id.find(std::string_view(*content));
      if (it == m.token_to_id.end())
        fail("tokenizer_config.json: expected ", key, " '", *content, "' to be a token of tokenizer.json, got none");
      return it->second;
    };
    m.eos = lookup("eos_token");
    m.pad = lookup("pad_token");
    m.bos = lookup("bos_token");
  }

  Tokenizer t;
  t.impl_ = impl;
  t.model_vocab_size_ = int32_t(nid);

  if (!model_config_json.empty()) {
    json cfg;
    try {
      cfg = json::parse(model_config_json);
    } catch (const json::exception& e) {
      fail("config.json: expected valid JSON, got a parse error (", e.what(), ")");
    }
    const json* vs = nullptr;
    if (cfg.contains("vocab_size")) vs = &cfg["vocab_size"];
    else if (cfg.contains("text_config") && cfg["text_config"].contains("vocab_size")) vs = &cfg["text_config"]["vocab_size"];
    if (vs) {
      if (!vs->is_number_integer()) fail("config.json: expected vocab_size to be an integer, got ", vs->dump());
      t.set_model_vocab_size(vs->get<int32_t>());
    }
  }
  return t;
}

Tokenizer Tokenizer::load(const std::string& path) {
  fs::path p(path);
  fs::path file = fs::is_directory(p) ? p / "tokenizer.json" : p;
  fs::path dir = file.parent_path();
  std::string text = read_file(file.string(), "tokenizer.json");
  std::string cfg, model_cfg;
  if (fs::exists(dir / "tokenizer_config.json")) cfg = read_file((dir / "tokenizer_config.json").string(), "tokenizer_config.json");
  if (fs::exists(dir / "config.json")) model_cfg = read_file((dir / "config.json").string(), "config.json");
  try {
    return from_json(text, cfg, model_cfg);
  } catch (const Error& e) {
    fail(e.what(), " (loading '", file.string(), "')");
  }
}

void Tokenizer::encode_append(std::string_view text, bool allow_special, std::vector<int32_t>& out) const {
  const Impl& m = *impl_;
  size_t start = 0, i = 0;
  while (i < text.size()) {
    const auto& cands = m.added_by_first[uint8_t(text[i])];
    const Impl::Added* hit = nullptr;
    for (const auto& a : cands) {  // longest first
      if (a.special && !allow_special) continue;
      if (text.size() - i >= a.content.size() && std::memcmp(text.data() + i, a.content.data(), a.content.size()) == 0) {
        hit = &a;
        break;
      }
    }
    if (!hit) {
      ++i;
      continue;
    }
    m.encode_plain(text.substr(start, i - start), out);
    out.push_back(hit->id);
    i += hit->content.size();
    start = i;
  }
  m.encode_plain(text.substr(start), out);
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool allow_special) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  encode_append(text, allow_special, out);
  return out;
}

std::string_view Tokenizer::token_bytes(int32_t id) const {
  if (id < 0 || id >= model_vocab_size_)
    fail("expected a token id in [0, ", model_vocab_size_, "), got ", id);
  if (size_t(id) >= impl_->bytes.size()) return {};
  return impl_->bytes[size_t(id)];
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  const Impl& m = *impl_;
  std::string raw;
  raw.reserve(ids.size() * 4);
  for (size_t k = 0; k < ids.size(); ++k) {
    int32_t id = ids[k];
    if (id < 0 || id >= model_vocab_size_)
      fail("expected token ids in [0, ", model_vocab_size_, "), got ", id, " at position ", k);
    if (size_t(id) >= m.bytes.size()) continue;  // padding rows of the embedding: no text
    if (skip_special && m.kind[size_t(id)] == 3) continue;
    raw += m.bytes[size_t(id)];
  }
  return unicode::utf8_lossy(raw);
}

std::optional<int32_t> Tokenizer::token_id(std::string_view token) const {
  auto it = impl_->token_to_id.find(token);
  if (it == impl_->token_to_id.end()) return std::nullopt;
  return it->second;
}

std::string Tokenizer::token_string(int32_t id) const {
  const std::string_view b = token_bytes(id);
  if (is_added(id)) return std::string(b);
  static const std::array<uint32_t, 256> to_char = byte_to_char_table();
  std::string out;
  for (unsigned char c : b) unicode::utf8_append(out, to_char[c]);
  return out;
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && size_t(id) < impl_->kind.size() && impl_->kind[size_t(id)] == 3;
}
bool Tokenizer::is_added(int32_t id) const {
  return id >= 0 && size_t(id) < impl_->kind.size() && impl_->kind[size_t(id)] >= 2;
}

int32_t Tokenizer::vocab_size() const { return int32_t(impl_->bytes.size()); }

void Tokenizer::set_model_vocab_size(int32_t n) {
  if (n < vocab_size())
    fail("expected the model vocab size to be >= the tokenizer's ", vocab_size(), " ids, got ", n);
  model_vocab_size_ = n;
}

std::optional<int32_t> Tokenizer::eos_token_id() const { return impl_->eos; }
std::optional<int32_t> Tokenizer::pad_token_id() const { return impl_->pad; }
std::optional<int32_t> Tokenizer::bos_token_id() const { return impl_->bos; }

std::vector<std::string> Tokenizer::pretokenizer_patterns() const {
  std::vector<std::string> r;
  for (auto& s : impl_->splits) r.push_back(s.pattern());
  return r;
}

}  // namespace ds::text
