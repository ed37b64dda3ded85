// The Responses API conversions (src/server/responses.h): request bodies -> chat bodies (input items, tools,
// tool_choice, text.format, reasoning.effort, what is refused), chat-route errors reworded, and a generation's output
// events -> output items, the response object and its SSE events.
#include <gtest/gtest.h>

#include <regex>

#include "output_util.h"
#include "server/openai.h"
#include "server/responses.h"

namespace {

using ds::server::HttpError;
using ds::server::json;
using ds::server::OutputEvent;
using ds::server::ResponsesOutput;
using ds::server::ResponsesUsage;
using ds::server::responses_error;
using ds::server::responses_to_chat;

json chat_of(const json& body) { return responses_to_chat(body).chat; }

// The 400 a body gets: its message must match `re` and its param be `param`.
void expect_bad(const json& body, const std::string& re, const std::string& param) {
  try {
    responses_to_chat(body);
    FAIL() << "accepted: " << body.dump();
  } catch (const HttpError& e) {
    EXPECT_EQ(e.status, 400);
    EXPECT_TRUE(std::regex_search(std::string(e.what()), std::regex(re))) << e.what() << "  !~  " << re;
    EXPECT_EQ(e.param, param) << e.what();
  }
}

TEST(ResponsesRequest, StringInputAndInstructions) {
  json c = chat_of({{"model", "m"}, {"input", "hi"}, {"instructions", "be brief"}, {"max_output_tokens", 7},
                    {"temperature", 0.5}, {"top_p", 0.9}, {"stream", true}});
  EXPECT_EQ(c["model"], "m");
  EXPECT_EQ(c["messages"], json::parse(R"([{"role":"system","content":"be brief"},{"role":"user","content":"hi"}])"));
  EXPECT_EQ(c["max_tokens"], 7);
  EXPECT_EQ(c["temperature"], 0.5);
  EXPECT_EQ(c["top_p"], 0.9);
  EXPECT_EQ(c["stream"], true);
  EXPECT_FALSE(c.contains("max_output_tokens"));
}

TEST(ResponsesRequest, MessagesPartsAndImages) {
  auto r = responses_to_chat(json::parse(R"({"input": [
    {"role": "developer", "content": "rules"},
    {"type": "message", "role": "user", "content": [
      {"type": "input_text", "text": "look: "},
      {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"},
      {"type": "input_text", "text": "ok?"}]},
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "yes", "annotations": []}]},
    {"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}
  ]})"));
  const json& m = r.chat["messages"];
  ASSERT_EQ(m.size(), 4u);
  EXPECT_EQ(m[0], json::parse(R"({"role":"system","content":"rules"})"));
  EXPECT_EQ(m[1]["role"], "user");
  EXPECT_EQ(m[1]["content"], json::parse(R"([{"type":"text","text":"look: "},
    {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA","detail":"low"}},{"type":"text","text":"ok?"}])"));
  EXPECT_EQ(m[2], json::parse(R"({"role":"assistant","content":"yes"})"));
  EXPECT_EQ(m[3]["content"][0]["image_url"]["url"], "https://x/y.png");
  EXPECT_EQ(r.image_where, (std::vector<std::string>{"input[1].content[1]", "input[3].content[0]"}));
}

TEST(ResponsesRequest, InstructionsAndLeadingSystemMessagesAreOneSystemMessage) {
  json c = chat_of(json::parse(R"({"instructions": "A", "input": [
    {"role": "developer", "content": "B"}, {"role": "system", "content": [{"type": "input_text", "text": "C"}]},
    {"role": "user", "content": "u"}, {"role": "developer", "content": "late"}]})"));
  EXPECT_EQ(c["messages"], json::parse(R"([{"role":"system","content":"A\n\nB\n\nC"},{"role":"user","content":"u"},
    {"role":"system","content":"late"}])"));
}

TEST(ResponsesRequest, FunctionCallsAndOutputsKeepTheirOrder) {
  // reasoning + message + two calls are one assistant turn; the outputs follow as tool messages, in order; a
  // second turn (reasoning, a call) after them.
  json c = chat_of(json::parse(R"({"input": [
    {"role": "user", "content": "weather in Paris and Rome?"},
    {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "two calls"}]},
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
    {"type": "function_call", "call_id": "call_a", "name": "weather", "arguments": "{\"city\": \"Paris\"}"},
    {"type": "function_call", "call_id": "call_b", "name": "weather", "arguments": "{\"city\": \"Rome\"}"},
    {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
    {"type": "function_call_output", "call_id": "call_b", "output": [{"type": "input_text", "text": "rain"}]},
    {"type": "reasoning", "summary": [{"type": "summary_text", "text": "s1"}, {"type": "summary_text", "text": "s2"}]},
    {"type": "function_call", "call_id": "call_c", "name": "weather", "arguments": "{}"},
    {"type": "reasoning", "summary": [], "encrypted_content": "opaque"},
    {"type": "function_call_output", "call_id": "call_c", "output": "fog"}
  ]})"));
  EXPECT_EQ(c["messages"], json::parse(R"([
    {"role":"user","content":"weather in Paris and Rome?"},
    {"role":"assistant","content":"Checking.","reasoning_content":"two calls","tool_calls":[
      {"id":"call_a","type":"function","function":{"name":"weather","arguments":"{\"city\": \"Paris\"}"}},
      {"id":"call_b","type":"function","function":{"name":"weather","arguments":"{\"city\": \"Rome\"}"}}]},
    {"role":"tool","tool_call_id":"call_a","content":"sunny"},
    {"role":"tool","tool_call_id":"call_b","content":[{"type":"text","text":"rain"}]},
    {"role":"assistant","content":"","reasoning_content":"s1\n\ns2","tool_calls":[
      {"id":"call_c","type":"function","function":{"name":"weather","arguments":"{}"}}]},
    {"role":"tool","tool_call_id":"call_c","content":"fog"}])"));
}

TEST(ResponsesRequest, ToolsToolChoiceAndEcho) {
  auto r = responses_to_chat(json::parse(R"({"input": "x", "parallel_tool_calls": false,
    "tools": [{"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"}, "strict": true},
              {"type": "function", "name": "g"}],
    "tool_choice": {"type": "function", "name": "g"}})"));
  EXPECT_EQ(r.chat["tools"], json::parse(R"([
    {"type":"function","function":{"name":"f","description":"d","parameters":{"type":"object"},"strict":true}},
    {"type":"function","function":{"name":"g"}}])"));
  EXPECT_EQ(r.chat["tool_choice"], json::parse(R"({"type":"function","function":{"name":"g"}})"));
  EXPECT_EQ(r.chat["parallel_tool_calls"], false);
  EXPECT_EQ(r.echo["tools"][1], json::parse(R"({"type":"function","name":"g","description":null,"parameters":null,"strict":false})"));
  EXPECT_EQ(r.echo["tool_choice"], json::parse(R"({"type":"function","name":"g"})"));
  EXPECT_EQ(r.echo["parallel_tool_calls"], false);
  for (const char* tc : {"auto", "none", "required"})
    EXPECT_EQ(chat_of({{"input", "x"}, {"tool_choice", tc}})["tool_choice"], tc);
  // The chat route then takes it: the named choice must be among the tools.
  auto spec = ds::server::parse_generation_request(r.chat, true, {});
  EXPECT_EQ(spec.tool_choice, "named");
  EXPECT_EQ(spec.tool_choice_name, "g");
  EXPECT_FALSE(spec.parallel_tool_calls);
}

TEST(ResponsesRequest, TextFormatAndReasoningEffort) {
  json c = chat_of(json::parse(R"({"input": "x", "text": {"format": {"type": "json_schema", "name": "p", "strict": true,
    "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}, "reasoning": {"effort": "none", "summary": "auto"}})"));
  EXPECT_EQ(c["response_format"], json::parse(R"({"type":"json_schema","json_schema":{"name":"p",
    "schema":{"type":"object","properties":{"a":{"type":"integer"}}},"strict":true}})"));
  EXPECT_EQ(c["reasoning_effort"], "none");
  EXPECT_EQ(chat_of(json::parse(R"({"input":"x","text":{"format":{"type":"json_object"}}})"))["response_format"],
            json::parse(R"({"type":"json_object"})"));
  EXPECT_EQ(chat_of(json::parse(R"({"input":"x","text":{"format":{"type":"text"}}})"))["response_format"],
            json::parse(R"({"type":"text"})"));
  EXPECT_EQ(chat_of(json::parse(R"({"input":"x","reasoning":{"effort":"high"}})"))["reasoning_effort"], "high");
  EXPECT_EQ(chat_of(json::parse(R"({"input":"x","reasoning":{"effort":"xhigh"}})"))["reasoning_effort"], "high");
  EXPECT_FALSE(chat_of(json::parse(R"({"input":"x","reasoning":{"summary":"auto"}})")).contains("reasoning_effort"));
  // Through the chat route: effort none turns thinking off, the schema is compiled.
  auto spec = ds::server::parse_generation_request(c, true, {});
  EXPECT_EQ(spec.enable_thinking, std::optional<bool>(false));
  EXPECT_TRUE(spec.sampling.grammar != nullptr);
  auto echo = responses_to_chat(json::parse(R"({"input":"x"})")).echo;
  EXPECT_EQ(echo["text"], json::parse(R"({"format":{"type":"text"}})"));
  EXPECT_EQ(echo["reasoning"], json::parse(R"({"effort":null,"summary":null})"));
  EXPECT_EQ(echo["store"], false);
}

TEST(ResponsesRequest, VllmExtrasPassThroughAndStoreMetadataUserAreIgnored) {
  json c = chat_of(json::parse(R"({"input":"x","top_k":5,"min_p":0.1,"repetition_penalty":1.1,
    "chat_template_kwargs":{"enable_thinking":false},"store":true,"metadata":{"k":"v"},"user":"u"})"));
  EXPECT_EQ(c["top_k"], 5);
  EXPECT_EQ(c["min_p"], 0.1);
  EXPECT_EQ(c["repetition_penalty"], 1.1);
  EXPECT_EQ(c["chat_template_kwargs"], json::parse(R"({"enable_thinking":false})"));
  for (const char* k : {"store", "metadata", "user", "input"}) EXPECT_FALSE(c.contains(k)) << k;
}

TEST(ResponsesRequest, ErrorsNameTheField) {
  expect_bad({{"input", "x"}, {"previous_response_id", "resp_1"}}, "stateless", "previous_response_id");
  expect_bad({{"input", "x"}, {"conversation", "conv_1"}}, "stateless", "conversation");
  expect_bad({{"input", "x"}, {"background", true}}, "background", "background");
  expect_bad(json::object(), "'input' is required", "input");
  expect_bad({{"input", 3}}, "'input' must be a string or a list", "input");
  expect_bad({{"input", json::array()}}, "at least one", "input");
  expect_bad({{"input", "x"}, {"instructions", json::array()}}, "'instructions' must be a string", "instructions");
  expect_bad(json::parse(R"({"input":"x","tools":[{"type":"web_search"}]})"),
             R"(tools\[0\]: tool type 'web_search' is not supported)", "tools");
  expect_bad(json::parse(R"({"input":"x","tools":[{"type":"function","name":"f"},{"type":"file_search"}]})"),
             R"(tools\[1\]: tool type 'file_search')", "tools");
  expect_bad(json::parse(R"({"input":"x","tools":[{"type":"code_interpreter"}]})"), "code_interpreter", "tools");
  expect_bad(json::parse(R"({"input":"x","tools":[{"type":"function","function":{"name":"f"}}]})"),
             "flat, not nested", "tools");
  expect_bad(json::parse(R"({"input":"x","tool_choice":{"type":"web_search_preview"}})"), "tool_choice", "tool_choice");
  expect_bad(json::parse(R"({"input":"x","reasoning":{"effort":"max"}})"), "reasoning.effort", "reasoning.effort");
  expect_bad(json::parse(R"({"input":"x","text":{"format":{"type":"json_schema","name":"n"}}})"), "needs 'schema'",
             "text.format");
  expect_bad(json::parse(R"({"input":"x","text":{"format":{"type":"grammar"}}})"), "'grammar' is not supported",
             "text.format");
  expect_bad(json::parse(R"({"input":[{"role":"user","content":"a"},{"type":"item_reference","id":"msg_1"}]})"),
             R"(input\[1\]: item_reference is not supported: this server is stateless)", "input");
  expect_bad(json::parse(R"({"input":[{"type":"web_search_call","id":"ws_1"}]})"),
             R"(input\[0\]: input item type 'web_search_call' is not supported)", "input");
  expect_bad(json::parse(R"({"input":[{"role":"tool","content":"a"}]})"), "role must be user, assistant", "input");
  expect_bad(json::parse(R"({"input":[{"role":"user","content":[{"type":"input_file","file_id":"f"}]}]})"),
             R"(input\[0\]\.content\[0\]: content part type 'input_file' is not supported)", "input");
  expect_bad(json::parse(R"({"input":[{"role":"user","content":[{"type":"input_image","file_id":"f"}]}]})"),
             "file_id", "input");
  expect_bad(json::parse(R"({"input":[{"type":"function_call","name":"f","arguments":"{}"}]})"),
             R"(input\[0\] needs a string 'call_id')", "input");
  expect_bad(json::parse(R"({"input":[{"type":"function_call_output","call_id":"c"}]})"), "needs 'output'", "input");
}

TEST(ResponsesRequest, ChatRouteErrorsAreRewordedWithResponsesNames) {
  auto reworded = [](const json& body) -> HttpError {
    try {
      ds::server::parse_generation_request(chat_of(body), true, {});
    } catch (const HttpError& e) {
      return responses_error(e);
    }
    ADD_FAILURE() << "accepted " << body.dump();
    return HttpError(200, "");
  };
  HttpError e = reworded({{"input", "x"}, {"max_output_tokens", 0}});
  EXPECT_EQ(e.param, "max_output_tokens");
  EXPECT_NE(std::string(e.what()).find("'max_output_tokens' must be in"), std::string::npos) << e.what();
  e = reworded(json::parse(R"({"input":"x","text":{"format":{"type":"json_schema","name":"n",
    "schema":{"type":"string","pattern":"(?=b)a"}}}})"));
  EXPECT_EQ(e.param, "text.format");
  EXPECT_NE(std::string(e.what()).find("text.format"), std::string::npos) << e.what();
  EXPECT_EQ(std::string(e.what()).find("response_format"), std::string::npos) << e.what();
  e = responses_error(ds::server::bad_request("tools[2].function.parameters: unsupported keyword", "tools"));
  EXPECT_STREQ(e.what(), "tools[2].parameters: unsupported keyword");
}

// ---- output ------------------------------------------------------------------------------------------------

using ds::test::ev;

std::vector<std::string> types(const std::vector<json>& events) {
  std::vector<std::string> t;
  for (auto& e : events) t.push_back(e["type"]);
  return t;
}

TEST(ResponsesOutput, ReasoningThenMessage) {
  ResponsesOutput o("resp_1", 42, "tiny", responses_to_chat({{"input", "x"}}).echo);
  std::vector<json> all;
  auto add = [&](std::vector<json> es) { all.insert(all.end(), es.begin(), es.end()); };
  add(o.start());
  add(o.update(ev("thin", "")));
  add(o.update(ev("king", "\n\n")));  // leading whitespace waits for text
  add(o.update(ev("", "Hel")));
  add(o.update(ev("", "lo")));
  add(o.finish("stop", {10, 4, 6, 3}));
  EXPECT_EQ(types(all), (std::vector<std::string>{
      "response.created", "response.in_progress",
      "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
      "response.reasoning_text.delta",
      "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
      "response.output_item.added", "response.content_part.added", "response.output_text.delta",
      "response.output_text.delta",
      "response.output_text.done", "response.content_part.done", "response.output_item.done",
      "response.completed"}));
  for (size_t i = 0; i < all.size(); ++i) EXPECT_EQ(all[i]["sequence_number"], i);
  EXPECT_EQ(all[0]["response"]["status"], "in_progress");
  EXPECT_EQ(all[0]["response"]["output"], json::array());
  EXPECT_EQ(all[12]["delta"], "lo");
  EXPECT_EQ(all[12]["output_index"], 1);
  EXPECT_EQ(all[13]["text"], "\n\nHello");
  json r = o.response();
  EXPECT_EQ(r, all.back()["response"]);
  EXPECT_EQ(r["id"], "resp_1");
  EXPECT_EQ(r["object"], "response");
  EXPECT_EQ(r["created_at"], 42);
  EXPECT_EQ(r["status"], "completed");
  EXPECT_EQ(r["model"], "tiny");
  EXPECT_TRUE(r["incomplete_details"].is_null());
  ASSERT_EQ(r["output"].size(), 2u);
  const json& rs = r["output"][0];
  EXPECT_EQ(rs["type"], "reasoning");
  EXPECT_TRUE(std::regex_match(rs["id"].get<std::string>(), std::regex("rs_[0-9a-f]+")));
  EXPECT_EQ(rs["summary"], json::array());
  EXPECT_EQ(rs["content"], json::parse(R"([{"type":"reasoning_text","text":"thinking"}])"));
  const json& msg = r["output"][1];
  EXPECT_EQ(msg["type"], "message");
  EXPECT_EQ(msg["role"], "assistant");
  EXPECT_EQ(msg["status"], "completed");
  EXPECT_EQ(msg["content"][0]["type"], "output_text");
  EXPECT_EQ(msg["content"][0]["text"], "\n\nHello");
  EXPECT_EQ(msg["content"][0]["annotations"], json::array());
  EXPECT_EQ(all[9]["item"]["id"], msg["id"]);
  EXPECT_EQ(all[11]["item_id"], msg["id"]);
  EXPECT_EQ(r["usage"], json::parse(R"({"input_tokens":10,"input_tokens_details":{"cached_tokens":4},"output_tokens":6,
    "output_tokens_details":{"reasoning_tokens":3},"total_tokens":16})"));
  for (const char* k : {"tools", "tool_choice", "temperature", "top_p", "parallel_tool_calls", "max_output_tokens",
                        "text", "reasoning", "instructions", "metadata", "error"})
    EXPECT_TRUE(r.contains(k)) << k;
  EXPECT_TRUE(o.has_reasoning());
  EXPECT_EQ(ResponsesOutput::sse(all[0]).rfind("event: response.created\ndata: {\"type\":\"response.created\"", 0), 0u);
}

TEST(ResponsesOutput, FunctionCallsAfterText) {
  ResponsesOutput o("resp_2", 1, "tiny", json::object());
  std::vector<json> all;
  auto add = [&](std::vector<json> es) { all.insert(all.end(), es.begin(), es.end()); };
  add(o.update(ev("", "Calling.", {{0, "call_a", "f", ""}})));
  add(o.update(ev("", "", {{0, "", "", "{\"x\": "}, {0, "", "", "1}"}})));
  add(o.update(ev("", "", {{1, "call_b", "g", "{}"}})));
  add(o.finish("tool_calls", {}));
  EXPECT_EQ(types(all), (std::vector<std::string>{
      "response.output_item.added", "response.content_part.added", "response.output_text.delta",
      "response.output_text.done", "response.content_part.done", "response.output_item.done",
      "response.output_item.added", "response.function_call_arguments.delta", "response.function_call_arguments.delta",
      "response.function_call_arguments.done", "response.output_item.done",
      "response.output_item.added", "response.function_call_arguments.delta",
      "response.function_call_arguments.done", "response.output_item.done", "response.completed"}));
  json r = o.response();
  ASSERT_EQ(r["output"].size(), 3u);
  const json& f = r["output"][1];
  EXPECT_EQ(f["type"], "function_call");
  EXPECT_EQ(f["call_id"], "call_a");
  EXPECT_EQ(f["name"], "f");
  EXPECT_EQ(f["arguments"], "{\"x\": 1}");
  EXPECT_EQ(f["status"], "completed");
  EXPECT_TRUE(std::regex_match(f["id"].get<std::string>(), std::regex("fc_[0-9a-f]+")));
  EXPECT_EQ(all[6]["item"]["arguments"], "");
  EXPECT_EQ(all[6]["item"]["status"], "in_progress");
  EXPECT_EQ(all[9]["arguments"], "{\"x\": 1}");
  EXPECT_EQ(all[9]["name"], "f");
  EXPECT_EQ(r["output"][2]["call_id"], "call_b");
  EXPECT_EQ(r["output"][2]["arguments"], "{}");
  EXPECT_EQ(r["status"], "completed");
  EXPECT_FALSE(o.has_reasoning());
}

TEST(ResponsesOutput, WhitespaceBeforeACallMakesNoMessage) {
  ResponsesOutput o("resp_3", 1, "tiny", json::object());
  o.update(ev("r", "\n\n"));
  o.update(ev("", "", {{0, "call_a", "f", "{}"}}));
  o.finish("tool_calls", {});
  json r = o.response();
  ASSERT_EQ(r["output"].size(), 2u);
  EXPECT_EQ(r["output"][0]["type"], "reasoning");
  EXPECT_EQ(r["output"][1]["type"], "function_call");
}

TEST(ResponsesOutput, LengthIsIncompleteAndErrorsFail) {
  ResponsesOutput o("resp_4", 1, "tiny", json::object());
  o.update(ev("", "abc"));
  auto es = o.finish("length", {5, 0, 3, 0});
  EXPECT_EQ(es.back()["type"], "response.incomplete");
  json r = o.response();
  EXPECT_EQ(r["status"], "incomplete");
  EXPECT_EQ(r["incomplete_details"], json::parse(R"({"reason":"max_output_tokens"})"));
  EXPECT_EQ(r["output"][0]["status"], "incomplete");
  EXPECT_EQ(r["output"][0]["content"][0]["text"], "abc");

  ResponsesOutput f("resp_5", 1, "tiny", json::object());
  f.update(ev("", "ab"));
  es = f.fail("generation failed: boom");
  EXPECT_EQ(es.back()["type"], "response.failed");
  EXPECT_EQ(f.response()["status"], "failed");
  EXPECT_EQ(f.response()["error"], json::parse(R"({"code":"server_error","message":"generation failed: boom"})"));
}

TEST(ResponsesOutput, EchoedSamplingDefaults) {
  json echo = responses_to_chat({{"input", "x"}, {"top_p", 0.5}}).echo;
  ds::sampling::SamplingParams used;
  used.temperature = 0.7f;
  used.top_p = 0.95f;
  ds::server::responses_echo_sampling(echo, used);
  EXPECT_EQ(echo["temperature"], 0.7);
  EXPECT_EQ(echo["top_p"], 0.5);
}

}  // namespace
