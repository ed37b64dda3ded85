// Anthropic Messages API conversions (src/server/anthropic.h): request -> chat body (and through
// parse_generation_request), output events -> content blocks, Message and stream events.
#include <gtest/gtest.h>

#include "server/anthropic.h"
#include "output_util.h"
#include "server/openai.h"

namespace {

using json = nlohmann::ordered_json;
using namespace ds::server;
using anthropic::MessageWriter;
using anthropic::to_chat_request;

json base() { return json::parse(R"({"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})"); }

// The 400 a body gets; its message.
std::string error_of(const json& body, bool count = false) {
  try {
    to_chat_request(body, count);
  } catch (const HttpError& e) {
    EXPECT_EQ(e.status, 400);
    return e.what();
  }
  ADD_FAILURE() << "no error for " << body.dump();
  return "";
}

TEST(AnthropicRequest, SystemMessagesAndSampling) {
  json b = base();
  b["system"] = json::parse(R"([{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
                                {"type": "text", "text": "Be kind."}])");
  b["stop_sequences"] = {"END"};
  b["temperature"] = 0.5;
  b["top_p"] = 0.9;
  b["top_k"] = 7;
  b["stream"] = true;
  b["metadata"] = {{"user_id", "u"}};
  b["unknown_field"] = 1;
  b["chat_template_kwargs"] = {{"x", 1}};
  b["n"] = 4;  // not Anthropic's, not taken
  const json c = to_chat_request(b).body;
  EXPECT_EQ(c["messages"], json::parse(R"([{"role": "system", "content": "Be brief.\nBe kind."},
                                           {"role": "user", "content": "hi"}])"));
  EXPECT_EQ(c["stop"], json({"END"}));
  EXPECT_EQ(c["max_tokens"], 16);
  EXPECT_EQ(c["top_k"], 7);
  EXPECT_EQ(c["stream"], true);
  EXPECT_EQ(c["chat_template_kwargs"], json({{"x", 1}}));
  EXPECT_FALSE(c.contains("metadata"));
  EXPECT_FALSE(c.contains("n"));
  GenSpec g = parse_generation_request(c, true, {});
  EXPECT_EQ(g.stop, std::vector<std::string>{"END"});
  EXPECT_EQ(g.n, 1);
  EXPECT_FLOAT_EQ(g.sampling.temperature, 0.5f);
  EXPECT_EQ(g.sampling.top_k, 7);
  EXPECT_TRUE(g.stream);
  EXPECT_EQ(*g.max_tokens, 16);
}

// A final assistant message with text is a prefill (continue_final_message); one that ends in a tool call, or has no
// text, is history; so is any earlier assistant message.
TEST(AnthropicRequest, FinalAssistantTextIsAPrefill) {
  auto convert = [](const char* messages) {
    json b = base();
    b["messages"] = json::parse(messages);
    return to_chat_request(b).body;
  };
  json out = convert(R"([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "{\"a\": "}])");
  EXPECT_EQ(out["continue_final_message"], true);
  EXPECT_EQ(out["add_generation_prompt"], false);
  out = convert(R"([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [{"type": "text", "text": "Sure"}]}])");
  EXPECT_EQ(out["continue_final_message"], true);
  for (const char* history : {
           R"([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Go"}])",
           R"([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}])",
           R"([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [{"type": "text", "text": "Calling."},
               {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}])"}) {
    out = convert(history);
    EXPECT_FALSE(out.contains("continue_final_message")) << history;
    EXPECT_FALSE(out.contains("add_generation_prompt")) << history;
  }
}

TEST(AnthropicRequest, BlocksImagesToolUseAndToolResultOrder) {
  json b = base();
  b["messages"] = json::parse(R"([
    {"role": "user", "content": [{"type": "text", "text": "Look: "},
                                 {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]},
    {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "sig"},
                                      {"type": "redacted_thinking", "data": "xyz"},
                                      {"type": "text", "text": "Calling."},
                                      {"type": "tool_use", "id": "toolu_1", "name": "get", "input": {"city": "Paris", "n": 2}},
                                      {"type": "tool_use", "id": "toolu_2", "name": "put", "input": {}}]},
    {"role": "user", "content": [{"type": "text", "text": "after"},
                                 {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                                 {"type": "image", "source": {"type": "url", "url": "http://x/b.png"}},
                                 {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": true,
                                  "content": [{"type": "text", "text": "denied"},
                                              {"type": "image", "source": {"type": "url", "url": "http://x/a.png"}}]}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_3"}]}
  ])");
  const auto r = to_chat_request(b);
  const json& m = r.body["messages"];
  ASSERT_EQ(m.size(), 6u);
  EXPECT_EQ(m[0], json::parse(R"({"role": "user", "content": [{"type": "text", "text": "Look: "},
      {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]})"));
  EXPECT_EQ(m[1]["role"], "assistant");
  EXPECT_EQ(m[1]["content"], "Calling.");
  EXPECT_EQ(m[1]["reasoning_content"], "hmm");
  ASSERT_EQ(m[1]["tool_calls"].size(), 2u);
  EXPECT_EQ(m[1]["tool_calls"][0]["id"], "toolu_1");
  EXPECT_EQ(m[1]["tool_calls"][0]["function"]["name"], "get");
  EXPECT_EQ(json::parse(m[1]["tool_calls"][0]["function"]["arguments"].get<std::string>()),
            json::parse(R"({"city": "Paris", "n": 2})"));
  EXPECT_EQ(m[1]["tool_calls"][1]["function"]["arguments"], "{}");
  // Tool results first, in order, then the turn's text and image.
  EXPECT_EQ(m[2], json::parse(R"({"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"})"));
  EXPECT_EQ(m[3], json::parse(R"({"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "Error: "},
      {"type": "text", "text": "denied"}, {"type": "image_url", "image_url": {"url": "http://x/a.png"}}]})"));
  EXPECT_EQ(m[4], json::parse(R"({"role": "user", "content": [{"type": "text", "text": "after"},
      {"type": "image_url", "image_url": {"url": "http://x/b.png"}}]})"));
  EXPECT_EQ(m[5], json::parse(R"({"role": "tool", "tool_call_id": "toolu_3", "content": ""})"));
  // Images in the order the chat body holds them, named by their place in the Anthropic request.
  EXPECT_EQ(r.image_where, (std::vector<std::string>{"messages[0].content[1]", "messages[2].content[3].content[1]",
                                                     "messages[2].content[2]"}));
  GenSpec g = parse_generation_request(r.body, true, {});
  ASSERT_EQ(g.images.size(), 3u);
  EXPECT_EQ(g.images[1].url, "http://x/a.png");
  EXPECT_EQ(g.images[2].url, "http://x/b.png");
}

TEST(AnthropicRequest, ToolsToolChoiceThinking) {
  json b = base();
  b["tools"] = json::parse(R"([{"name": "get", "description": "Gets", "input_schema": {"type": "object"}},
                               {"type": "custom", "name": "put", "input_schema": {"type": "object"}, "strict": true}])");
  b["tool_choice"] = {{"type", "tool"}, {"name", "put"}, {"disable_parallel_tool_use", true}};
  b["thinking"] = {{"type", "enabled"}, {"budget_tokens", 64}};
  json c = to_chat_request(b).body;
  EXPECT_EQ(c["tools"], json::parse(R"([{"type": "function", "function": {"name": "get", "description": "Gets", "parameters": {"type": "object"}}},
      {"type": "function", "function": {"name": "put", "parameters": {"type": "object"}, "strict": true}}])"));
  EXPECT_EQ(c["tool_choice"], json::parse(R"({"type": "function", "function": {"name": "put"}})"));
  EXPECT_EQ(c["parallel_tool_calls"], false);
  GenSpec g = parse_generation_request(c, true, {});
  EXPECT_EQ(g.tool_choice, "named");
  EXPECT_EQ(g.tool_choice_name, "put");
  EXPECT_FALSE(g.parallel_tool_calls);
  EXPECT_EQ(g.enable_thinking, std::optional<bool>(true));
  EXPECT_EQ(g.sampling.thinking_budget, 64);

  for (auto [type, want] : {std::pair{"auto", "auto"}, {"any", "required"}, {"none", "none"}}) {
    b["tool_choice"] = {{"type", type}};
    EXPECT_EQ(parse_generation_request(to_chat_request(b).body, true, {}).tool_choice, want);
  }
  b["thinking"] = {{"type", "disabled"}};
  EXPECT_EQ(parse_generation_request(to_chat_request(b).body, true, {}).enable_thinking, std::optional<bool>(false));
  b["thinking"] = {{"type", "adaptive"}};
  EXPECT_EQ(parse_generation_request(to_chat_request(b).body, true, {}).enable_thinking, std::optional<bool>(true));
  b.erase("thinking");
  EXPECT_EQ(parse_generation_request(to_chat_request(b).body, true, {}).enable_thinking, std::nullopt);
  // output_config.format -> a JSON schema constraint
  json s = base();
  s["output_config"] = json::parse(R"({"format": {"type": "json_schema", "schema": {"type": "object"}}})");
  EXPECT_TRUE(parse_generation_request(to_chat_request(s).body, true, {}).sampling.grammar);
}

TEST(AnthropicRequest, ErrorsNameTheField) {
  json b = base();
  b.erase("max_tokens");
  EXPECT_EQ(error_of(b), "max_tokens: field required");
  EXPECT_NO_THROW(to_chat_request(b, true));  // count_tokens needs none
  auto with = [](const char* key, const char* value) {
    json b = base();
    b[key] = json::parse(value);
    return b;
  };
  EXPECT_EQ(error_of(with("messages", "[]")), "messages: must be a non-empty list of messages");
  EXPECT_EQ(error_of(with("messages", R"([{"role": "system", "content": "x"}])")).rfind("messages[0].role: must be user or assistant", 0), 0u);
  EXPECT_EQ(error_of(with("messages", R"([{"role": "user", "content": [{"type": "document", "source": {}}]}])")),
            "messages[0].content[0]: content block type 'document' is not supported in a user message (supported: text, "
            "image, tool_result)");
  EXPECT_EQ(error_of(with("messages", R"([{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b", "input": {}}]}])"))
                .rfind("messages[0].content[0]: content block type 'tool_use' is not supported in a user message", 0), 0u);
  EXPECT_EQ(error_of(with("messages", R"([{"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "b", "input": 3}]}])"))
                .rfind("messages[0].content[0].input: a tool_use block needs an object 'input'", 0), 0u);
  EXPECT_EQ(error_of(with("messages", R"([{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}])")),
            "messages[0].content[0].source.type: image source type 'file' is not supported (supported: base64, url)");
  EXPECT_EQ(error_of(with("messages", R"([{"role": "user", "content": [{"type": "tool_result"}]}])")),
            "messages[0].content[0].tool_use_id: a string is required, got nothing");
  const std::string tools = error_of(with("tools", R"([{"name": "ok", "input_schema": {}},
      {"type": "web_search_20250305", "name": "web_search"}, {"type": "bash_20250124", "name": "bash"}])"));
  EXPECT_NE(tools.find("server tools are not supported"), std::string::npos) << tools;
  EXPECT_NE(tools.find("tools[1] (type \"web_search_20250305\", name 'web_search')"), std::string::npos) << tools;
  EXPECT_NE(tools.find("tools[2] (type \"bash_20250124\", name 'bash')"), std::string::npos) << tools;
  EXPECT_EQ(error_of(with("tools", R"([{"name": "x"}])")).rfind("tools[0].input_schema: a JSON Schema object is required", 0), 0u);
  EXPECT_EQ(error_of(with("tool_choice", R"({"type": "some"})")), "tool_choice.type: must be auto, any, tool or none, got 'some'");
  EXPECT_EQ(error_of(with("tool_choice", R"({"type": "tool"})")), "tool_choice.name: a string is required, got nothing");
  EXPECT_EQ(error_of(with("thinking", R"({"type": "enabled"})")).rfind("thinking.budget_tokens: a non-negative integer", 0), 0u);
  EXPECT_EQ(error_of(with("stop_sequences", R"("END")")).rfind("stop_sequences: must be a list of strings", 0), 0u);
  EXPECT_EQ(error_of(with("system", R"([{"type": "image"}])")), "system[0]: only text blocks are allowed in the system prompt");
  // The shared pipeline's messages, in Anthropic's terms.
  EXPECT_EQ(anthropic::rename_fields("tools[0].function.parameters: unsupported keyword \"patternProperties\""),
            "tools[0].input_schema: unsupported keyword \"patternProperties\"");
  EXPECT_EQ(anthropic::rename_fields("'stop' may hold at most 16 strings"), "'stop_sequences' may hold at most 16 strings");
}

TEST(AnthropicErrors, Shape) {
  EXPECT_EQ(anthropic::error_body(400, "bad"),
            json::parse(R"({"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}})"));
  EXPECT_EQ(anthropic::error_type(401), "authentication_error");
  EXPECT_EQ(anthropic::error_type(404), "not_found_error");
  EXPECT_EQ(anthropic::error_type(429), "rate_limit_error");
  EXPECT_EQ(anthropic::error_type(503), "overloaded_error");
  EXPECT_EQ(anthropic::error_type(500), "api_error");
}

TEST(AnthropicResponse, StopReasons) {
  EXPECT_EQ(anthropic::map_stop("stop", nullptr).reason, "end_turn");
  EXPECT_EQ(anthropic::map_stop("stop", 1986).reason, "end_turn");  // a stop_token_ids id
  auto s = anthropic::map_stop("stop", "END");
  EXPECT_EQ(s.reason, "stop_sequence");
  EXPECT_EQ(s.sequence, "END");
  EXPECT_EQ(anthropic::map_stop("length", nullptr).reason, "max_tokens");
  EXPECT_EQ(anthropic::map_stop("tool_calls", nullptr).reason, "tool_use");
  EXPECT_EQ(anthropic::map_stop("repetition", "repetition_detected").reason, "end_turn");
}

using ds::test::ev;

// The stream folded back into content blocks (as the SDK's MessageStream does), checking the order rules: one
// block open at a time, deltas only to the open block, of its kind.
json fold(const std::vector<anthropic::Event>& events, std::string* names = nullptr) {
  json content = json::array();
  int open = -1;
  std::vector<std::string> input;
  for (const auto& e : events) {
    EXPECT_EQ(e.data["type"], e.name);
    if (names) *names += (names->empty() ? "" : " ") + e.name;
    if (e.name == "content_block_start") {
      EXPECT_EQ(open, -1) << "a block opened while another is open";
      open = e.data["index"].get<int>();
      EXPECT_EQ(size_t(open), content.size());
      content.push_back(e.data["content_block"]);
      input.emplace_back();
    } else if (e.name == "content_block_delta") {
      EXPECT_EQ(e.data["index"], open);
      json& b = content[size_t(open)];
      const json& d = e.data["delta"];
      auto append = [&](const char* kind, const char* key) {
        EXPECT_EQ(b["type"], kind);
        b[key] = b[key].get<std::string>() + d[key].get<std::string>();
      };
      if (d["type"] == "text_delta") {
        append("text", "text");
      } else if (d["type"] == "thinking_delta") {
        append("thinking", "thinking");
      } else if (d["type"] == "input_json_delta") {
        EXPECT_EQ(b["type"], "tool_use");
        input[size_t(open)] += d["partial_json"].get<std::string>();
      } else {
        ADD_FAILURE() << d.dump();
      }
    } else if (e.name == "content_block_stop") {
      EXPECT_EQ(e.data["index"], open);
      if (content[size_t(open)]["type"] == "tool_use" && !input[size_t(open)].empty())
        content[size_t(open)]["input"] = json::parse(input[size_t(open)]);
      open = -1;
    }
  }
  EXPECT_EQ(open, -1);
  return content;
}

TEST(AnthropicResponse, ThinkingTextToolCallsStreamEqualsMessage) {
  MessageWriter w("msg_1", "tiny");
  anthropic::Usage u{100, 0, 32};
  std::vector<anthropic::Event> events = {w.start(u)};
  auto add = [&](std::vector<anthropic::Event> es) { events.insert(events.end(), es.begin(), es.end()); };
  add(w.feed(ev("Let me ", "")));
  add(w.feed(ev("think.", "")));
  add(w.feed(ev("", "\n")));  // whitespace alone opens no block yet
  add(w.feed(ev("", "Sure")));
  add(w.feed(ev("", ", calling.", {{0, "call_a", "get", ""}})));
  add(w.feed(ev("", "", {{0, "", "", "{\"city\": "}})));
  add(w.feed(ev("", "", {{0, "", "", "\"Paris\"}"}, {1, "call_b", "put", "{}"}})));
  add(w.feed(ev("", "\n")));  // whitespace between calls: dropped
  add(w.feed(ev("", "", {{2, "call_c", "del", ""}})));
  u.output_tokens = 40;
  add(w.finish("tool_calls", nullptr, u));
  std::string names;
  const json streamed = fold(events, &names);
  EXPECT_EQ(names,
            "message_start content_block_start content_block_delta content_block_delta content_block_stop "
            "content_block_start content_block_delta content_block_delta content_block_stop "
            "content_block_start content_block_delta content_block_delta content_block_stop "
            "content_block_start content_block_delta content_block_stop content_block_start content_block_stop "
            "message_delta message_stop");
  const json msg = w.message(u);
  EXPECT_EQ(msg["content"], json::parse(R"([
    {"type": "thinking", "thinking": "Let me think.", "signature": ""},
    {"type": "text", "text": "\nSure, calling."},
    {"type": "tool_use", "id": "call_a", "name": "get", "input": {"city": "Paris"}},
    {"type": "tool_use", "id": "call_b", "name": "put", "input": {}},
    {"type": "tool_use", "id": "call_c", "name": "del", "input": {}}])"));
  EXPECT_EQ(streamed, msg["content"]);
  EXPECT_EQ(msg["id"], "msg_1");
  EXPECT_EQ(msg["type"], "message");
  EXPECT_EQ(msg["role"], "assistant");
  EXPECT_EQ(msg["model"], "tiny");
  EXPECT_EQ(msg["stop_reason"], "tool_use");
  EXPECT_EQ(msg["stop_sequence"], nullptr);
  EXPECT_EQ(msg["usage"], json::parse(R"({"input_tokens": 68, "output_tokens": 40, "cache_creation_input_tokens": 0,
                                          "cache_read_input_tokens": 32})"));
  EXPECT_EQ(events.front().data["message"]["content"], json::array());
  EXPECT_EQ(events.front().data["message"]["usage"]["output_tokens"], 0);
  EXPECT_EQ(events.front().data["message"]["stop_reason"], nullptr);
  const json& md = events[events.size() - 2].data;
  EXPECT_EQ(md["delta"], json::parse(R"({"stop_reason": "tool_use", "stop_sequence": null})"));
  EXPECT_EQ(md["usage"]["output_tokens"], 40);
  EXPECT_EQ(events.back().sse(), "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
}

TEST(AnthropicResponse, StopSequenceAndNoThinking) {
  MessageWriter w("msg_2", "tiny", /*include_thinking=*/false);
  std::vector<anthropic::Event> events;
  auto add = [&](std::vector<anthropic::Event> es) { events.insert(events.end(), es.begin(), es.end()); };
  add(w.feed(ev("hidden", "")));
  add(w.feed(ev("", "Hello")));
  add(w.feed(ev("", " world")));
  add(w.finish("stop", "END", {5, 2, 0}));
  const json msg = w.message({5, 2, 0});
  EXPECT_EQ(msg["content"], json::parse(R"([{"type": "text", "text": "Hello world"}])"));
  EXPECT_EQ(fold(events), msg["content"]);
  EXPECT_EQ(msg["stop_reason"], "stop_sequence");
  EXPECT_EQ(msg["stop_sequence"], "END");
  // Nothing but whitespace: no block at all.
  MessageWriter e("msg_3", "tiny");
  EXPECT_TRUE(e.feed(ev("", " \n")).size() == 0);
  e.finish("length", nullptr, {});
  EXPECT_EQ(e.message({})["content"], json::array());
  EXPECT_EQ(e.message({})["stop_reason"], "max_tokens");
}

TEST(AnthropicResponse, TextAfterToolCallOpensANewBlock) {
  MessageWriter w("m", "tiny");
  std::vector<anthropic::Event> events;
  auto add = [&](std::vector<anthropic::Event> es) { events.insert(events.end(), es.begin(), es.end()); };
  add(w.feed(ev("", "", {{0, "call_a", "get", "{\"a\": 1}"}})));
  add(w.feed(ev("", "then more")));
  add(w.finish("stop", nullptr, {}));
  const json msg = w.message({});
  EXPECT_EQ(msg["content"], json::parse(R"([{"type": "tool_use", "id": "call_a", "name": "get", "input": {"a": 1}},
                                            {"type": "text", "text": "then more"}])"));
  EXPECT_EQ(fold(events), msg["content"]);
}

}  // namespace
