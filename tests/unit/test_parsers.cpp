// Reasoning and tool-call parsers: whole-text results, and the same results under every chunking
// (one char at a time, random splits, whole), with no markup leaking into streamed pieces.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <random>

#include "text/reasoning_parser.h"
#include "text/tool_parser.h"

namespace {

using json = nlohmann::ordered_json;
using ds::ReasoningStart;

// Splits text into pieces: size 0 = whole, >0 = fixed size, <0 = random sizes 1..8 seeded by -size.
std::vector<std::string> chunk(const std::string& text, int size) {
  std::vector<std::string> out;
  if (size == 0) return {text};
  std::mt19937 rng(static_cast<unsigned>(-size));
  for (size_t i = 0; i < text.size();) {
    size_t n = size > 0 ? static_cast<size_t>(size) : 1 + rng() % 8;
    out.push_back(text.substr(i, n));
    i += n;
  }
  return out;
}

const int kChunkings[] = {0, 1, 2, 3, 5, 7, -1, -2, -3, -4, -5, -6, -7, -8};

// ---- reasoning -------------------------------------------------------------------------------

struct RCase {
  const char* name;
  ReasoningStart start;
  std::string text, reasoning, content;
};

void check_reasoning(const RCase& c) {
  for (int size : kChunkings) {
    ds::ReasoningParser p(c.start);
    std::string r, k;
    for (auto& piece : chunk(c.text, size)) {
      ds::ReasoningDelta d = p.feed(piece);
      r += d.reasoning;
      k += d.content;
      // nothing emitted is ever taken back: no partial tag, no newline that later turns out to precede </think>
      EXPECT_EQ(c.reasoning.compare(0, r.size(), r), 0) << c.name << " chunking " << size << ": " << r;
      EXPECT_EQ(c.content.compare(0, k.size(), k), 0) << c.name << " chunking " << size << ": " << k;
    }
    ds::ReasoningDelta d = p.finish();
    r += d.reasoning;
    k += d.content;
    EXPECT_EQ(r, c.reasoning) << c.name << " chunking " << size;
    EXPECT_EQ(k, c.content) << c.name << " chunking " << size;
  }
  ds::ReasoningDelta whole = ds::ReasoningParser::parse(c.text, c.start);
  EXPECT_EQ(whole.reasoning, c.reasoning) << c.name;
  EXPECT_EQ(whole.content, c.content) << c.name;
}

TEST(ReasoningParser, EveryChunkingGivesTheSameSplit) {
  const RCase cases[] = {
      {"implicit_open", ReasoningStart::kInReasoning, "Let me think.\nStep 2.\n</think>\n\nThe answer is 4.",
       "Let me think.\nStep 2.", "The answer is 4."},
      {"explicit_open", ReasoningStart::kInContent, "<think>\nhmm\n</think>\n\nok", "hmm", "ok"},
      {"explicit_open_in_reasoning", ReasoningStart::kInReasoning, "<think>\nx\n</think>\n\ny", "x", "y"},
      {"disabled", ReasoningStart::kDisabled, "<think>a</think>b", "", "<think>a</think>b"},
      {"no_think", ReasoningStart::kInContent, "Hello\n", "", "Hello\n"},
      {"no_think_lt", ReasoningStart::kInContent, "<thin>x", "", "<thin>x"},
      {"truncated", ReasoningStart::kInReasoning, "thinking forever\n", "thinking forever\n", ""},
      {"look_alike_tags", ReasoningStart::kInReasoning, "x </thinker> y\n\n</think>z", "x </thinker> y", "z"},
      {"empty_reasoning", ReasoningStart::kInReasoning, "\n\n</think>\n\nonly content", "", "only content"},
      {"content_keeps_inner_newlines", ReasoningStart::kInReasoning, "r</think>\n\na\n\nb\n", "r", "a\n\nb\n"},
      {"tool_call_ends_reasoning", ReasoningStart::kInReasoning,
       "I should call.\n<tool_call>\n<function=f>\n</function>\n</tool_call>", "I should call.",
       "<tool_call>\n<function=f>\n</function>\n</tool_call>"},
      {"tool_call_mention_stays_reasoning", ReasoningStart::kInReasoning, "use <tool_call> tags\n</think>\n\nok",
       "use <tool_call> tags", "ok"},
      {"unicode", ReasoningStart::kInReasoning, "考える😀\n</think>\n\n答え", "考える😀", "答え"},
  };
  for (auto& c : cases) check_reasoning(c);
}

TEST(ReasoningParser, HoldsBackOnlyWhatCouldBeTheTag) {
  ds::ReasoningParser p(ReasoningStart::kInReasoning);
  EXPECT_EQ(p.feed("Let me").reasoning, "Let me");
  ds::ReasoningDelta d = p.feed(" think\n</th");
  EXPECT_EQ(d.reasoning, " think");  // "\n</th" held
  EXPECT_TRUE(p.in_reasoning());
  d = p.feed("ink>\n");
  EXPECT_EQ(d.reasoning, "");
  EXPECT_EQ(d.content, "");
  EXPECT_FALSE(p.in_reasoning());
  EXPECT_EQ(p.feed("\nHi").content, "Hi");
  d = p.feed("</think> again");  // after the block everything is content
  EXPECT_EQ(d.content, "</think> again");
}

TEST(ReasoningParser, StartStateComesFromThePromptTail) {
  EXPECT_EQ(ds::reasoning_start_for_prompt("<|im_start|>assistant\n<think>\n"), ReasoningStart::kInReasoning);
  EXPECT_EQ(ds::reasoning_start_for_prompt("<|im_start|>assistant\n<think>\n\n</think>\n\n"), ReasoningStart::kDisabled);
  EXPECT_EQ(ds::reasoning_start_for_prompt("<|im_start|>assistant\n"), ReasoningStart::kInContent);
}

// ---- tool calls ------------------------------------------------------------------------------

json tools() {
  return json::parse(R"([
    {"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{
      "city":{"type":"string"},"days":{"type":"integer"},"metric":{"type":"boolean"},
      "opts":{"type":"object"},"ratio":{"type":"number"},"tags":{"type":"array"},"note":{"type":["string","null"]}}}}},
    {"type":"function","function":{"name":"search","parameters":{"type":"object","properties":{
      "query":{"type":"string"},"top_k":{"type":"integer"}}}}}])");
}

std::function<std::string()> counter_ids() {
  auto n = std::make_shared<int>(0);
  return [n] { return "call_" + std::to_string((*n)++); };
}

struct Streamed {
  ds::ToolParseResult result;
  int first_deltas = 0;
};

// Streams text through the parser, checking the OpenAI delta contract on the way.
Streamed stream_tools(const std::string& text, int size, const json& t) {
  ds::ToolCallParser p(t, counter_ids());
  Streamed s;
  std::vector<bool> started;
  auto absorb = [&](const ds::ToolParseDelta& d) {
    for (const char* tag : {"<tool_call", "<function", "<parameter", "</parameter", "</function", "</tool_call"})
      EXPECT_EQ(d.content.find(tag), std::string::npos) << "markup leaked into content: " << d.content;
    s.result.content += d.content;
    for (auto& c : d.tool_calls) {
      if (c.index >= static_cast<int>(started.size())) {
        EXPECT_EQ(c.index, static_cast<int>(started.size())) << "calls must start in order";
        EXPECT_FALSE(c.id.empty());
        EXPECT_FALSE(c.name.empty());
        EXPECT_EQ(c.arguments, "");
        started.push_back(true);
        s.result.tool_calls.push_back(ds::ToolCall{c.id, c.name, ""});
        ++s.first_deltas;
        continue;
      }
      EXPECT_TRUE(c.id.empty());
      EXPECT_TRUE(c.name.empty());
      s.result.tool_calls[static_cast<size_t>(c.index)].arguments += c.arguments;
    }
  };
  for (auto& piece : chunk(text, size)) absorb(p.feed(piece));
  absorb(p.finish());
  return s;
}

struct TCase {
  const char* name;
  std::string text;
  std::string content;
  std::vector<std::pair<std::string, std::string>> calls;  // name, arguments
};

void check_tools(const TCase& c, const json& t) {
  ds::ToolParseResult whole = ds::ToolCallParser::parse(c.text, t, counter_ids());
  EXPECT_EQ(whole.content, c.content) << c.name;
  ASSERT_EQ(whole.tool_calls.size(), c.calls.size()) << c.name;
  for (size_t i = 0; i < c.calls.size(); ++i) {
    EXPECT_EQ(whole.tool_calls[i].name, c.calls[i].first) << c.name;
    EXPECT_EQ(whole.tool_calls[i].arguments, c.calls[i].second) << c.name;
    EXPECT_EQ(whole.tool_calls[i].id, "call_" + std::to_string(i));
    EXPECT_TRUE(json::accept(whole.tool_calls[i].arguments)) << c.name;
  }
  for (int size : kChunkings) {
    Streamed s = stream_tools(c.text, size, t);
    EXPECT_EQ(s.result.content, c.content) << c.name << " chunking " << size;
    ASSERT_EQ(s.result.tool_calls.size(), c.calls.size()) << c.name << " chunking " << size;
    for (size_t i = 0; i < c.calls.size(); ++i) {
      EXPECT_EQ(s.result.tool_calls[i].name, c.calls[i].first) << c.name << " chunking " << size;
      EXPECT_EQ(s.result.tool_calls[i].arguments, c.calls[i].second) << c.name << " chunking " << size;
    }
  }
}

TEST(ToolCallParser, EveryChunkingGivesTheSameCalls) {
  const TCase cases[] = {
      {"parallel_typed",
       "Let me check.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n"
       "<parameter=days>\n3\n</parameter>\n<parameter=metric>\ntrue\n</parameter>\n<parameter=opts>\n"
       "{\"a\": [1, 2], \"b\": \"é\"}\n</parameter>\n<parameter=ratio>\n0.5\n</parameter>\n<parameter=tags>\n"
       "[\"x\"]\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=search>\n<parameter=query>\n"
       "rome weather\n</parameter>\n<parameter=top_k>\n5\n</parameter>\n</function>\n</tool_call>",
       "Let me check.",
       {{"get_weather",
         R"({"city": "New York", "days": 3, "metric": true, "opts": {"a": [1, 2], "b": "é"}, "ratio": 0.5, "tags": ["x"]})"},
        {"search", R"({"query": "rome weather", "top_k": 5})"}}},
      {"no_calls", "Just an answer.\nWith lines.\n", "Just an answer.\nWith lines.\n", {}},
      {"multiline_string", "<tool_call>\n<function=search>\n<parameter=query>\nline one\nline \"two\"\n</parameter>\n"
                           "</function>\n</tool_call>",
       "", {{"search", R"({"query": "line one\nline \"two\""})"}}},
      {"no_parameters", "<tool_call>\n<function=search>\n</function>\n</tool_call>", "", {{"search", "{}"}}},
      {"content_after_call", "<tool_call>\n<function=search>\n<parameter=query>\nq\n</parameter>\n</function>\n"
                             "</tool_call>\n\nDone.",
       "Done.", {{"search", R"({"query": "q"})"}}},
      {"fallbacks_to_string", "<tool_call>\n<function=get_weather>\n<parameter=days>\nthree\n</parameter>\n"
                              "<parameter=unknown>\n42\n</parameter>\n<parameter=note>\nnull\n</parameter>\n"
                              "</function>\n</tool_call>",
       "", {{"get_weather", R"({"days": "three", "unknown": "42", "note": null})"}}},
      {"missing_close_parameter", "<tool_call>\n<function=search>\n<parameter=query>\nq\n<parameter=top_k>\n2\n"
                                  "</function>\n</tool_call>",
       "", {{"search", R"({"query": "q", "top_k": 2})"}}},
      {"truncated", "Sure.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nPar", "Sure.",
       {{"get_weather", R"({"city": "Par"})"}}},
      {"truncated_in_close_tag", "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</para", "",
       {{"get_weather", R"({"city": "Paris"})"}}},
      {"not_a_call", "Use the <tool_call> tag to call tools.", "Use the <tool_call> tag to call tools.", {}},
      {"unknown_function", "<tool_call>\n<function=other>\n<parameter=x>\n1\n</parameter>\n</function>\n</tool_call>",
       "", {{"other", R"({"x": "1"})"}}},
  };
  json t = tools();
  for (auto& c : cases) {
    if (std::string(c.name) == "not_a_call") {
      // markup here is the model's prose, not a call: check whole-text only (the leak check is for calls)
      ds::ToolParseResult r = ds::ToolCallParser::parse(c.text, t);
      EXPECT_EQ(r.content, c.content);
      EXPECT_TRUE(r.tool_calls.empty());
      for (int size : kChunkings) {
        ds::ToolCallParser p(t);
        std::string content;
        for (auto& piece : chunk(c.text, size)) content += p.feed(piece).content;
        content += p.finish().content;
        EXPECT_EQ(content, c.content) << "chunking " << size;
      }
      continue;
    }
    check_tools(c, t);
  }
}

TEST(ToolCallParser, FirstDeltaCarriesIdAndNameBeforeArguments) {
  ds::ToolCallParser p(tools(), counter_ids());
  ds::ToolParseDelta d = p.feed("<tool_call>\n<function=search>\n");
  ASSERT_EQ(d.tool_calls.size(), 1u);
  EXPECT_EQ(d.tool_calls[0].id, "call_0");
  EXPECT_EQ(d.tool_calls[0].name, "search");
  EXPECT_EQ(d.tool_calls[0].arguments, "");
  d = p.feed("<parameter=query>\nabc");
  EXPECT_TRUE(d.tool_calls.empty());  // a value is emitted once complete (its type decides its JSON)
  d = p.feed("\n</parameter>\n");
  ASSERT_EQ(d.tool_calls.size(), 1u);
  EXPECT_EQ(d.tool_calls[0].arguments, R"({"query": "abc")");
  d = p.feed("</function>\n</tool_call>");
  ASSERT_EQ(d.tool_calls.size(), 1u);
  EXPECT_EQ(d.tool_calls[0].arguments, "}");
  EXPECT_EQ(p.calls_started(), 1);
}

TEST(ToolCallParser, RandomIdsLookLikeOpenAIs) {
  std::string a = ds::tool_call_id(), b = ds::tool_call_id();
  EXPECT_EQ(a.rfind("call_", 0), 0u);
  EXPECT_EQ(a.size(), 29u);
  EXPECT_NE(a, b);
}

TEST(ToolParamValue, ConvertsBySchemaType) {
  auto conv = [](const std::string& raw, const char* schema) {
    json s = json::parse(schema);
    return ds::tool_param_value(raw, &s).dump();
  };
  EXPECT_EQ(conv("42", R"({"type":"string"})"), "\"42\"");
  EXPECT_EQ(conv(" 42 ", R"({"type":"integer"})"), "42");
  EXPECT_EQ(conv("4x", R"({"type":"integer"})"), "\"4x\"");
  EXPECT_EQ(conv("3.0", R"({"type":"number"})"), "3");
  EXPECT_EQ(conv("2.5", R"({"type":"number"})"), "2.5");
  EXPECT_EQ(conv("False", R"({"type":"boolean"})"), "false");
  EXPECT_EQ(conv("yes", R"({"type":"boolean"})"), "\"yes\"");
  EXPECT_EQ(conv("[1, 2]", R"({"type":"array"})"), "[1,2]");
  EXPECT_EQ(conv("{bad", R"({"type":"object"})"), "\"{bad\"");
  EXPECT_EQ(conv("null", R"({"type":"integer"})"), "null");
  EXPECT_EQ(conv("c", R"({"enum":["c","f"]})"), "\"c\"");
  EXPECT_EQ(conv("7", R"({"anyOf":[{"type":"integer"},{"type":"string"}]})"), "7");
  EXPECT_EQ(ds::tool_param_value("7", nullptr).dump(), "\"7\"");
}

// ---- both, the way the server chains them ----------------------------------------------------

TEST(Parsers, ReasoningThenToolsAcrossTheThinkBoundary) {
  const std::string outputs[] = {
      "plan the call\n</think>\n\n<tool_call>\n<function=search>\n<parameter=query>\nx\n</parameter>\n</function>\n</tool_call>",
      "plan the call\n<tool_call>\n<function=search>\n<parameter=query>\nx\n</parameter>\n</function>\n</tool_call>",
  };
  for (auto& out : outputs) {
    for (int size : kChunkings) {
      ds::ReasoningParser rp(ReasoningStart::kInReasoning);
      ds::ToolCallParser tp(tools(), counter_ids());
      std::string reasoning, content, args, name;
      auto take = [&](const ds::ToolParseDelta& d) {
        content += d.content;
        for (auto& c : d.tool_calls) {
          name += c.name;
          args += c.arguments;
        }
      };
      for (auto& piece : chunk(out, size)) {
        ds::ReasoningDelta r = rp.feed(piece);
        reasoning += r.reasoning;
        take(tp.feed(r.content));
      }
      ds::ReasoningDelta r = rp.finish();
      reasoning += r.reasoning;
      take(tp.feed(r.content));
      take(tp.finish());
      EXPECT_EQ(reasoning, "plan the call") << size;
      EXPECT_EQ(content, "") << size;
      EXPECT_EQ(name, "search") << size;
      EXPECT_EQ(args, R"({"query": "x"})") << size;
    }
  }
}

}  // namespace
