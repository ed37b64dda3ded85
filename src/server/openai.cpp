#include "server/openai.h"

#include <cmath>
#include <random>

namespace ds::server {

std::string brief(const json& v) {
  std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
  return s.size() > 120 ? s.substr(0, 117) + "..." : s;
}

std::string random_hex(int n) {
  static thread_local std::mt19937_64 rng(std::random_device{}());
  static const char* hex = "0123456789abcdef";
  std::string s;
  for (int i = 0; i < n; ++i) s.push_back(hex[rng() & 15]);
  return s;
}

namespace {

// Typed readers: absent or null -> default; wrong type or out of range -> 400 naming the field.
struct Body {
  const json& j;
  bool has(const char* k) const { return j.contains(k) && !j[k].is_null(); }
  double number(const char* k, double def, double lo, double hi) const {
    if (!has(k)) return def;
    if (!j[k].is_number()) throw bad_request(std::string("'") + k + "' must be a number, got " + brief(j[k]), k);
    double v = j[k].get<double>();
    if (!std::isfinite(v) || v < lo || v > hi)
      throw bad_request(std::string("'") + k + "' must be in [" + fmt(lo) + ", " + fmt(hi) + "], got " + brief(j[k]), k);
    return v;
  }
  int64_t integer(const char* k, int64_t def, int64_t lo, int64_t hi) const {
    if (!has(k)) return def;
    const json& v = j[k];
    bool integral = v.is_number_integer() || (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>() &&
                                              std::fabs(v.get<double>()) < 9e15);
    if (!integral) throw bad_request(std::string("'") + k + "' must be an integer, got " + brief(v), k);
    if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX))
      throw bad_request(std::string("'") + k + "' is out of range: " + brief(v), k);
    int64_t x = v.is_number_float() ? int64_t(v.get<double>()) : v.get<int64_t>();
    if (x < lo || x > hi)
      throw bad_request(std::string("'") + k + "' must be in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                            "], got " + brief(v),
                        k);
    return x;
  }
  bool boolean(const char* k, bool def) const {
    if (!has(k)) return def;
    if (!j[k].is_boolean()) throw bad_request(std::string("'") + k + "' must be a boolean, got " + brief(j[k]), k);
    return j[k].get<bool>();
  }
  std::string str(const char* k, const std::string& def) const {
    if (!has(k)) return def;
    if (!j[k].is_string()) throw bad_request(std::string("'") + k + "' must be a string, got " + brief(j[k]), k);
    return j[k].get<std::string>();
  }
  static std::string fmt(double x) {
    char b[32];
    std::snprintf(b, sizeof b, "%g", x);
    return b;
  }
};

std::vector<int32_t> token_ids(const json& v, const char* field) {
  std::vector<int32_t> out;
  for (auto& x : v) {
    if (!x.is_number_integer() || x.get<int64_t>() < 0 || x.get<int64_t>() > INT32_MAX)
      throw bad_request(std::string("'") + field + "' must hold non-negative token ids, got " + brief(x), field);
    out.push_back(int32_t(x.get<int64_t>()));
  }
  return out;
}

// Structured output (docs/server.md "Structured outputs"): OpenAI's response_format (json_object, json_schema;
// text = none), vLLM's structured_outputs {json | json_object | choice | regex | grammar}, its older guided_json /
// guided_choice / guided_regex / guided_grammar, and llama.cpp's grammar (GBNF) and json_schema; structural tags
// (response_format {"type": "structural_tag", ...} or structured_outputs.structural_tag, an object or its JSON text).
// One constraint per request; anything else is a 400, never ignored.
sampling::GrammarPtr parse_structured(const Body& b, bool& structural_tag) {
  const json& j = b.j;
  sampling::GrammarPtr g;
  const char* from = nullptr;
  auto one = [&](const char* field, auto&& make) {
    if (from)
      throw bad_request(std::string("'") + field + "' and '" + from + "' both constrain the output; send one", field);
    from = field;
    try {
      g = make();
    } catch (const Error& e) {
      const std::string prefix = std::string(field) + ": ";  // "grammar: grammar: ..." said once
      const std::string msg = e.what();
      throw bad_request(msg.rfind(prefix, 0) == 0 ? msg : prefix + msg, field);
    }
  };
  // A value vLLM also takes as its JSON text (a schema, a structural tag): parsed where it is a string.
  auto json_or_text = [](const json& v, const char* field, const char* param) -> json {
    if (!v.is_string()) return v;
    try {
      return json::parse(v.get<std::string>());
    } catch (const json::exception&) {
      throw bad_request(std::string("'") + field + "' is a string that is not JSON: " + brief(v), param);
    }
  };
  auto schema_of = [&](const json& v, const char* field) -> nlohmann::ordered_json {
    if (v.is_string()) return json_or_text(v, field, field);
    if (!v.is_object() && !v.is_boolean())
      throw bad_request(std::string("'") + field + "' must be a JSON Schema (an object), got " + brief(v), field);
    return v;
  };
  auto choices_of = [](const json& v, const char* field) {
    if (!v.is_array() || v.empty())
      throw bad_request(std::string("'") + field + "' must be a non-empty list of strings, got " + brief(v), field);
    std::vector<std::string> c;
    for (auto& x : v) {
      if (!x.is_string())
        throw bad_request(std::string("'") + field + "' must be a non-empty list of strings, got " + brief(x), field);
      c.push_back(x.get<std::string>());
    }
    return c;
  };
  auto text_of = [](const json& v, const char* field, const char* what) {
    if (!v.is_string() || v.get<std::string>().empty())
      throw bad_request(std::string("'") + field + "' must be " + what + " (a non-empty string), got " + brief(v),
                        field);
    return v.get<std::string>();
  };
  if (b.has("response_format")) {
    const json& rf = j["response_format"];
    if (!rf.is_object() || !rf.contains("type") || !rf["type"].is_string())
      throw bad_request("'response_format' must be {\"type\": \"text\" | \"json_object\" | \"json_schema\", ...}, got " +
                            brief(rf),
                        "response_format");
    const std::string t = rf["type"].get<std::string>();
    if (t == "json_object") {
      one("response_format", [] { return sampling::grammar_json_object(); });
    } else if (t == "json_schema") {
      const json* js = rf.contains("json_schema") && rf["json_schema"].is_object() ? &rf["json_schema"] : nullptr;
      const char* key = js && js->contains("schema") ? "schema" : js && js->contains("json_schema") ? "json_schema" : nullptr;
      if (!key)
        throw bad_request("'response_format' of type json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}, "
                          "got " + brief(rf),
                          "response_format");
      const auto schema = schema_of((*js)[key], "response_format.json_schema.schema");
      one("response_format", [&] { return sampling::grammar_json_schema(schema); });
    } else if (t == "structural_tag") {
      one("response_format", [&] { return sampling::grammar_structural_tag(rf); });
      structural_tag = true;
    } else if (t != "text") {
      throw bad_request("'response_format' type '" + t +
                            "' is not supported (expected text, json_object, json_schema or structural_tag)",
                        "response_format");
    }
  }
  if (b.has("structured_outputs")) {
    const json& so = j["structured_outputs"];
    if (!so.is_object()) throw bad_request("'structured_outputs' must be an object, got " + brief(so), "structured_outputs");
    // vLLM's disable_any_whitespace: JSON without whitespace between tokens.
    bool compact = false;
    if (so.contains("disable_any_whitespace") && !so["disable_any_whitespace"].is_null()) {
      if (!so["disable_any_whitespace"].is_boolean())
        throw bad_request("'structured_outputs.disable_any_whitespace' must be a boolean, got " +
                              brief(so["disable_any_whitespace"]),
                          "structured_outputs");
      compact = so["disable_any_whitespace"].get<bool>();
    }
    int kinds = 0;
    for (const char* k : {"json", "json_object", "choice", "regex", "grammar", "structural_tag"})
      kinds += so.contains(k) && !so[k].is_null();
    if (kinds > 1)
      throw bad_request("'structured_outputs' must hold one of json, json_object, choice, regex, grammar, structural_tag",
                        "structured_outputs");
    if (so.contains("json") && !so["json"].is_null()) {
      const auto schema = schema_of(so["json"], "structured_outputs.json");
      one("structured_outputs", [&] { return sampling::grammar_json_schema(schema, compact); });
    } else if (so.contains("json_object") && !so["json_object"].is_null()) {
      if (!so["json_object"].is_boolean())
        throw bad_request("'structured_outputs.json_object' must be a boolean", "structured_outputs");
      if (so["json_object"].get<bool>())
        one("structured_outputs", [&] { return sampling::grammar_json_object(compact); });
    } else if (so.contains("choice") && !so["choice"].is_null()) {
      const auto c = choices_of(so["choice"], "structured_outputs.choice");
      one("structured_outputs", [&] { return sampling::grammar_choice(c); });
    } else if (so.contains("regex") && !so["regex"].is_null()) {
      const std::string re = text_of(so["regex"], "structured_outputs.regex", "a regular expression");
      one("structured_outputs", [&] { return sampling::grammar_regex(re); });
    } else if (so.contains("grammar") && !so["grammar"].is_null()) {
      const std::string gr = text_of(so["grammar"], "structured_outputs.grammar", "a GBNF grammar");
      one("structured_outputs", [&] { return sampling::grammar_ebnf(gr); });
    } else if (so.contains("structural_tag") && !so["structural_tag"].is_null()) {
      // vLLM sends the structural tag as JSON text (its response_format, dumped).
      const json& st = so["structural_tag"];
      const json spec = json_or_text(st, "structured_outputs.structural_tag", "structured_outputs");
      if (!spec.is_object())
        throw bad_request("'structured_outputs.structural_tag' must be a structural tag ({\"type\": \"structural_tag\", "
                          "\"format\": {...}}, or its JSON text), got " + brief(st),
                          "structured_outputs");
      one("structured_outputs", [&] { return sampling::grammar_structural_tag(spec); });
      structural_tag = true;
    }
  }
  if (b.has("guided_json")) {
    const auto schema = schema_of(j["guided_json"], "guided_json");
    one("guided_json", [&] { return sampling::grammar_json_schema(schema); });
  }
  if (b.has("json_schema")) {  // llama.cpp's spelling
    const auto schema = schema_of(j["json_schema"], "json_schema");
    one("json_schema", [&] { return sampling::grammar_json_schema(schema); });
  }
  if (b.has("guided_choice")) {
    const auto c = choices_of(j["guided_choice"], "guided_choice");
    one("guided_choice", [&] { return sampling::grammar_choice(c); });
  }
  if (b.has("guided_regex")) {
    const std::string re = text_of(j["guided_regex"], "guided_regex", "a regular expression");
    one("guided_regex", [&] { return sampling::grammar_regex(re); });
  }
  for (const char* k : {"guided_grammar", "grammar"})
    if (b.has(k)) {
      const std::string gr = text_of(j[k], k, "a GBNF grammar");
      one(k, [&] { return sampling::grammar_ebnf(gr); });
    }
  return g;
}

}  // namespace

json parse_body(const std::string& text) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw bad_request(std::string("request body is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) throw bad_request(std::string("request body must be a JSON object, got ") + j.type_name());
  return j;
}

GenSpec parse_generation_request(const json& j, bool chat, const sampling::SamplingParams& d, int max_logprobs) {
  Body b{j};
  GenSpec g;
  g.chat = chat;
  // A logprobs count: 0..max_logprobs (vLLM's --max-logprobs, default 20).
  auto logprob_count = [&](const char* k) {
    const int64_t v = b.integer(k, 0, 0, INT32_MAX);
    if (v > max_logprobs)
      throw bad_request(std::string("'") + k + "' must be at most " + std::to_string(max_logprobs) +
                            " (the server's --max-logprobs), got " + std::to_string(v), k);
    return int(v);
  };
  g.model = b.str("model", "");
  g.stream = b.boolean("stream", false);
  if (b.has("stream_options")) {
    if (!j["stream_options"].is_object()) throw bad_request("'stream_options' must be an object", "stream_options");
    Body so{j["stream_options"]};
    g.include_usage = so.boolean("include_usage", false);
    g.continuous_usage = so.boolean("continuous_usage_stats", false);
  }
  g.n = int(b.integer("n", 1, 1, 16));
  auto& s = g.sampling;
  s.temperature = float(b.number("temperature", d.temperature, 0.0, 100.0));
  s.top_p = float(b.number("top_p", d.top_p, 0.0, 1.0));
  if (b.has("top_p") && s.top_p <= 0.f) throw bad_request("'top_p' must be in (0, 1], got 0", "top_p");
  s.top_k = int32_t(b.integer("top_k", d.top_k, -1, 1 << 30));
  s.min_p = float(b.number("min_p", d.min_p, 0.0, 1.0));
  s.presence_penalty = float(b.number("presence_penalty", d.presence_penalty, -2.0, 2.0));
  s.frequency_penalty = float(b.number("frequency_penalty", d.frequency_penalty, -2.0, 2.0));
  s.repetition_penalty = float(b.number("repetition_penalty", d.repetition_penalty, 1e-6, 100.0));
  if (b.has("seed")) s.seed = uint64_t(b.integer("seed", 0, INT64_MIN, INT64_MAX));
  if (b.has("logit_bias")) {
    if (!j["logit_bias"].is_object()) throw bad_request("'logit_bias' must be an object of token id -> bias", "logit_bias");
    for (auto it = j["logit_bias"].begin(); it != j["logit_bias"].end(); ++it) {
      int64_t id;
      try {
        size_t pos = 0;
        id = std::stoll(it.key(), &pos);
        if (pos != it.key().size() || id < 0 || id > INT32_MAX) throw std::invalid_argument("");
      } catch (...) {
        throw bad_request("'logit_bias' keys must be token ids, got '" + it.key() + "'", "logit_bias");
      }
      if (!it.value().is_number() || std::fabs(it.value().get<double>()) > 100)
        throw bad_request("'logit_bias' values must be numbers in [-100, 100], got " + brief(it.value()), "logit_bias");
      s.logit_bias.push_back({int32_t(id), float(it.value().get<double>())});
    }
  }
  const int64_t kMaxTok = int64_t(1) << 40;
  // 0 is taken for a completion's echo (the prompt alone, below); everywhere else at least 1.
  const int64_t min_tok = !chat && j.contains("echo") && j["echo"].is_boolean() && j["echo"].get<bool>() ? 0 : 1;
  if (b.has("max_completion_tokens")) g.max_tokens = b.integer("max_completion_tokens", 0, min_tok, kMaxTok);
  else if (b.has("max_tokens")) g.max_tokens = b.integer("max_tokens", 0, min_tok, kMaxTok);
  if (g.max_tokens && *g.max_tokens == 0) {
    g.echo_only = true;
    g.max_tokens = 1;
  }
  if (b.has("prompt_logprobs")) {
    g.prompt_logprobs = logprob_count("prompt_logprobs");
    if (g.stream)
      throw bad_request("'prompt_logprobs' is not available with 'stream' (as in vLLM; completions' echo with logprobs "
                        "streams the prompt's logprobs in its first chunk)", "prompt_logprobs");
  }
  if (b.has("stop")) {
    const json& st = j["stop"];
    if (st.is_string()) g.stop.push_back(st.get<std::string>());
    else if (st.is_array()) {
      for (auto& x : st) {
        if (!x.is_string()) throw bad_request("'stop' must be a string or a list of strings", "stop");
        g.stop.push_back(x.get<std::string>());
      }
    } else throw bad_request("'stop' must be a string or a list of strings, got " + brief(st), "stop");
    if (g.stop.size() > 16) throw bad_request("'stop' may hold at most 16 strings", "stop");
    for (auto& x : g.stop)
      if (x.empty()) throw bad_request("'stop' strings must not be empty", "stop");
  }
  if (b.has("allowed_token_ids")) {
    if (!j["allowed_token_ids"].is_array() || j["allowed_token_ids"].empty())
      throw bad_request("'allowed_token_ids' must be a non-empty list of token ids", "allowed_token_ids");
    g.sampling.allowed_ids = token_ids(j["allowed_token_ids"], "allowed_token_ids");
  }
  if (b.has("bad_words")) {
    const json& bw = j["bad_words"];
    if (!bw.is_array()) throw bad_request("'bad_words' must be a list of strings", "bad_words");
    for (auto& w : bw) {
      if (!w.is_string() || w.get<std::string>().empty())
        throw bad_request("'bad_words' must be a list of non-empty strings, got " + brief(w), "bad_words");
      g.bad_words.push_back(w.get<std::string>());
    }
  }
  if (b.has("stop_token_ids")) {
    if (!j["stop_token_ids"].is_array()) throw bad_request("'stop_token_ids' must be a list of token ids", "stop_token_ids");
    g.stop_token_ids = token_ids(j["stop_token_ids"], "stop_token_ids");
  }
  g.ignore_eos = b.boolean("ignore_eos", false);
  if (b.has("repetition_detection")) {
    const json& r = j["repetition_detection"];
    const char* f = "repetition_detection";
    if (!r.is_object())
      throw bad_request("'repetition_detection' must be an object {\"max_pattern_size\", \"min_pattern_size\", "
                        "\"min_count\"}, got " + brief(r), f);
    for (auto it = r.begin(); it != r.end(); ++it)
      if (it.key() != "max_pattern_size" && it.key() != "min_pattern_size" && it.key() != "min_count")
        throw bad_request("'repetition_detection' has an unknown key '" + it.key() +
                          "' (expected max_pattern_size, min_pattern_size, min_count)", f);
    auto get = [&](const char* k) -> int64_t {
      if (!r.contains(k) || r[k].is_null()) return 0;
      if (!r[k].is_number_integer() || r[k].get<int64_t>() < 0 || r[k].get<int64_t>() > 100000)
        throw bad_request(std::string("'repetition_detection.") + k + "' must be an integer in [0, 100000], got " +
                          brief(r[k]), f);
      return r[k].get<int64_t>();
    };
    g.rep_max_pattern = get("max_pattern_size");
    g.rep_min_pattern = get("min_pattern_size");
    g.rep_min_count = get("min_count");
    if (g.rep_min_pattern > g.rep_max_pattern)
      throw bad_request("'repetition_detection.min_pattern_size' (" + std::to_string(g.rep_min_pattern) +
                        ") must be at most max_pattern_size (" + std::to_string(g.rep_max_pattern) + ")", f);
    if (g.rep_max_pattern > 0 && g.rep_min_count < 2)
      throw bad_request("'repetition_detection.min_count' must be at least 2 with max_pattern_size > 0, got " +
                        std::to_string(g.rep_min_count), f);
  }
  g.priority = b.integer("priority", 0, INT32_MIN, INT32_MAX);
  if (b.has("cache_salt")) {
    if (!j["cache_salt"].is_string() || j["cache_salt"].get<std::string>().empty())
      throw bad_request("'cache_salt' must be a non-empty string, got " + brief(j["cache_salt"]), "cache_salt");
    g.cache_salt = j["cache_salt"].get<std::string>();
  }
  g.skip_special_tokens = b.boolean("skip_special_tokens", true);
  g.return_token_ids = b.boolean("return_token_ids", false);
  if (b.has("return_tokens_as_token_ids")) g.return_tokens_as_token_ids = b.boolean("return_tokens_as_token_ids", false);
  if (chat) {
    g.include_reasoning = b.boolean("include_reasoning", true);
    g.logprobs = b.boolean("logprobs", false);
    g.top_logprobs = logprob_count("top_logprobs");
    if (g.top_logprobs > 0 && !g.logprobs) throw bad_request("'top_logprobs' requires 'logprobs': true", "top_logprobs");
    if (!j.contains("messages")) throw bad_request("'messages' is required", "messages");
    if (!j["messages"].is_array() || j["messages"].empty())
      throw bad_request("'messages' must be a non-empty list", "messages");
    for (size_t mi = 0; mi < j["messages"].size(); ++mi) {
      const json& m = j["messages"][mi];
      if (!m.is_object()) throw bad_request("each message must be an object, got " + brief(m), "messages");
      if (!m.contains("role") || !m["role"].is_string()) throw bad_request("each message needs a string 'role'", "messages");
      std::string role = m["role"].get<std::string>();
      if (role != "system" && role != "user" && role != "assistant" && role != "tool" && role != "developer")
        throw bad_request("message role must be system, developer, user, assistant or tool, got '" + role + "'", "messages");
      if (m.contains("content") && !m["content"].is_null() && !m["content"].is_string() && !m["content"].is_array())
        throw bad_request("message 'content' must be a string or a list of parts", "messages");
      if (m.contains("content") && m["content"].is_array())
        for (size_t pi = 0; pi < m["content"].size(); ++pi) {
          const json& part = m["content"][pi];
          const std::string where = "messages[" + std::to_string(mi) + "].content[" + std::to_string(pi) + "]";
          if (!part.is_object() || !part.contains("type") || !part["type"].is_string())
            throw bad_request(where + ": content parts must be objects with a 'type', got " + brief(part), "messages");
          std::string t = part["type"].get<std::string>();
          // A media part's URL: {"type": K, K: {"url": ...}} (OpenAI; image_url may carry "detail"), or K: "url"
          // (vLLM takes a bare string too).
          auto media_url = [&](const char* key, const char* article, const char* example) {
            const json* u = part.contains(key) ? &part[key] : nullptr;
            if (u && u->is_object() && u->contains("url")) u = &(*u)["url"];
            if (!u || !u->is_string() || u->get<std::string>().empty())
              throw bad_request(where + ": " + article + " " + key + " part needs {\"" + key + "\": {\"url\": \"" +
                                    example + "\"}}, got " + brief(part),
                                "messages");
            return u->get<std::string>();
          };
          if (t == "video_url") {
            g.videos.push_back({media_url("video_url", "a", "data:video/...|http(s)://..."), where});
            continue;
          }
          if (t == "video")
            throw bad_request(where + ": content part type 'video' is not an OpenAI part; send {\"type\": \"video_url\", "
                                  "\"video_url\": {\"url\": ...}}", "messages");
          if (t == "image_url") {
            g.images.push_back({media_url("image_url", "an", "data:...|http(s)://..."), where});
            continue;
          }
          if (t != "text")
            throw bad_request(where + ": unsupported content part type '" + t + "' (expected text, image_url or video_url)",
                              "messages");
          if (!part.contains("text") || !part["text"].is_string())
            throw bad_request("a text content part needs a string 'text'", "messages");
        }
    }
    g.messages = j["messages"];
    if (b.has("tools")) {
      if (!j["tools"].is_array()) throw bad_request("'tools' must be a list", "tools");
      for (auto& t : j["tools"]) {
        if (!t.is_object() || str_or(t, "type") != "function" || !t.contains("function") || !t["function"].is_object() ||
            !t["function"].contains("name") || !t["function"]["name"].is_string())
          throw bad_request("each tool must be {\"type\": \"function\", \"function\": {\"name\": ...}}", "tools");
      }
      g.tools = j["tools"];
    }
    if (b.has("tool_choice")) {
      const json& tc = j["tool_choice"];
      if (tc.is_string()) {
        g.tool_choice = tc.get<std::string>();
        if (g.tool_choice != "auto" && g.tool_choice != "none" && g.tool_choice != "required")
          throw bad_request("'tool_choice' must be auto, none, required or a named function", "tool_choice");
      } else if (tc.is_object() && tc.contains("function") && tc["function"].is_object() &&
                 tc["function"].contains("name") && tc["function"]["name"].is_string()) {
        g.tool_choice = "named";
        g.tool_choice_name = tc["function"]["name"].get<std::string>();
        bool found = false;
        if (g.tools.is_array())
          for (auto& t : g.tools) found |= t["function"]["name"] == g.tool_choice_name;
        if (!found) throw bad_request("'tool_choice' names '" + g.tool_choice_name + "', which is not in 'tools'", "tool_choice");
      } else {
        throw bad_request("'tool_choice' must be a string or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                          "tool_choice");
      }
      if ((g.tool_choice == "required") && !g.tools.is_array())
        throw bad_request("'tool_choice': required needs 'tools'", "tool_choice");
    }
    g.parallel_tool_calls = b.boolean("parallel_tool_calls", true);
    if (b.has("mm_processor_kwargs")) {  // checked against the model's configs when the request is prepared
      if (!j["mm_processor_kwargs"].is_object())
        throw bad_request("'mm_processor_kwargs' must be an object such as {\"max_pixels\": 1003520}, got " +
                              brief(j["mm_processor_kwargs"]), "mm_processor_kwargs");
      g.mm_processor_kwargs = j["mm_processor_kwargs"];
    }
    if (b.has("chat_template_kwargs")) {
      if (!j["chat_template_kwargs"].is_object())
        throw bad_request("'chat_template_kwargs' must be an object", "chat_template_kwargs");
      g.chat_template_kwargs = j["chat_template_kwargs"];
    }
    if (b.has("enable_thinking")) g.enable_thinking = b.boolean("enable_thinking", true);
    if (b.has("reasoning_effort")) {
      const std::string e = b.str("reasoning_effort", "");
      if (e != "none" && e != "minimal" && e != "low" && e != "medium" && e != "high")
        throw bad_request("'reasoning_effort' must be none, minimal, low, medium or high, got " + brief(j["reasoning_effort"]),
                          "reasoning_effort");
      if (!g.enable_thinking) g.enable_thinking = e != "none";
    }
    g.add_generation_prompt = b.boolean("add_generation_prompt", true);
    g.continue_final_message = b.boolean("continue_final_message", false);
    if (b.boolean("echo", false) && !g.messages.empty()) {
      const json& last = g.messages.back();
      if (!g.add_generation_prompt || (last.is_object() && str_or(last, "role") == "assistant")) {
        const json c = last.is_object() && last.contains("content") ? last["content"] : json(nullptr);
        if (c.is_string()) {
          g.chat_echo = c.get<std::string>();
        } else if (c.is_array()) {
          for (auto& part : c)
            if (part.is_object() && str_or(part, "type") == "text" && part.contains("text") && part["text"].is_string())
              g.chat_echo += part["text"].get<std::string>();
        }
      }
    }
  } else {
    if (b.has("logprobs")) {
      if (j["logprobs"].is_boolean()) g.logprobs = j["logprobs"].get<bool>();
      else {
        g.top_logprobs = logprob_count("logprobs");
        g.logprobs = true;
      }
    }
    g.echo = b.boolean("echo", false);
    if (g.echo && g.logprobs && g.prompt_logprobs < 0) g.prompt_logprobs = g.top_logprobs;
    if (!j.contains("prompt") || j["prompt"].is_null()) throw bad_request("'prompt' is required", "prompt");
    const json& p = j["prompt"];
    if (p.is_string()) g.prompt_texts.push_back(p.get<std::string>());
    else if (p.is_array() && !p.empty() && p[0].is_number()) g.prompt_ids.push_back(token_ids(p, "prompt"));
    else if (p.is_array() && !p.empty()) {
      for (auto& x : p) {
        if (x.is_string()) g.prompt_texts.push_back(x.get<std::string>());
        else if (x.is_array() && !x.empty()) g.prompt_ids.push_back(token_ids(x, "prompt"));
        else throw bad_request("'prompt' must be a string, a list of strings, token ids, or a list of token-id lists",
                               "prompt");
      }
      if (!g.prompt_texts.empty() && !g.prompt_ids.empty())
        throw bad_request("'prompt' may not mix strings and token-id lists", "prompt");
    } else {
      throw bad_request("'prompt' must be a non-empty string, list of strings, token ids, or list of token-id lists",
                        "prompt");
    }
    if (g.prompt_texts.size() + g.prompt_ids.size() > 64) throw bad_request("at most 64 prompts per request", "prompt");
  }
  g.include_stop_str_in_output = b.boolean("include_stop_str_in_output", false);
  if (b.has("truncate_prompt_tokens")) {
    g.truncate_prompt_tokens = b.integer("truncate_prompt_tokens", -1, -1, INT32_MAX);
    if (*g.truncate_prompt_tokens == 0)
      throw bad_request("'truncate_prompt_tokens' must be -1 (the model's maximum length) or at least 1, got 0",
                        "truncate_prompt_tokens");
  }
  g.sampling.thinking_budget = b.integer("thinking_token_budget", -1, -1, INT32_MAX);
  g.sampling.min_tokens = b.integer("min_tokens", 0, 0, INT32_MAX);
  if (g.max_tokens && g.sampling.min_tokens > *g.max_tokens)
    throw bad_request("'min_tokens' (" + std::to_string(g.sampling.min_tokens) + ") must not exceed 'max_tokens' (" +
                          std::to_string(*g.max_tokens) + ")",
                      "min_tokens");
  g.sampling.grammar = parse_structured(b, g.grammar_spells_added);
  if (g.sampling.grammar && g.ignore_eos)
    throw bad_request("'ignore_eos' cannot be combined with structured output (the output ends where the constrained "
                      "text is complete)", "ignore_eos");
  if (g.sampling.temperature == 0.f) g.sampling.top_k = 0, g.sampling.top_p = 1.f, g.sampling.min_p = 0.f;
  if (g.logprobs) g.sampling.logprobs = g.top_logprobs;
  return g;
}

}  // namespace ds::server
