// The Responses API conversions (src/server/responses.h): request bodies -> chat bodies (input items, tools,
// tool_choice, text.format, reasoning.effort, what is refused), chat-route errors reworded, and a generation's output
// events -> output items, the response object and its SSE events; the store of responses (response_store.h).
#include <gtest/gtest.h>

#include <regex>

#include "output_util.h"
#include "server/openai.h"
#include "server/response_store.h"
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
  expect_bad({{"input", "x"}, {"conversation", "conv_1"}}, "previous_response_id", "conversation");
  expect_bad({{"input", "x"}, {"background", "yes"}}, "'background' must be a boolean", "background");
  expect_bad({{"input", "x"}, {"store", 1}}, "'store' must be a boolean", "store");
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
             R"(input\[1\]: item_reference is not supported; send the item itself)", "input");
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

// previous_response_id: the stored conversation's items come first; errors in the request's own items name them
// input[i] as the client sent them, and the earlier items as the stored conversation's.
TEST(ResponsesRequest, HistoryFromAStoredConversationComesFirst) {
  const json history = json::parse(R"([
    {"id": "msg_1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
    {"id": "rs_1", "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "greeting"}]},
    {"id": "msg_2", "type": "message", "role": "assistant", "status": "completed",
     "content": [{"type": "output_text", "text": "hello", "annotations": [], "logprobs": []}]}])");
  auto r = responses_to_chat({{"input", "and now?"}, {"instructions", "brief"}, {"previous_response_id", "resp_1"}},
                             history);
  EXPECT_EQ(r.chat["messages"], json::parse(R"([{"role":"system","content":"brief"},
    {"role":"user","content":[{"type":"text","text":"hi"}]},
    {"role":"assistant","content":"hello","reasoning_content":"greeting"},
    {"role":"user","content":"and now?"}])"));
  EXPECT_EQ(r.echo["previous_response_id"], "resp_1");
  try {
    responses_to_chat(json::parse(R"({"input": [{"role": "user", "content": "a"}, {"role": "nobody"}]})"), history);
    FAIL();
  } catch (const HttpError& e) {
    EXPECT_TRUE(std::string(e.what()).rfind("input[1]: ", 0) == 0) << e.what();
  }
  try {
    responses_to_chat({{"input", "x"}}, json::array({{{"type", "mystery"}}}));
    FAIL();
  } catch (const HttpError& e) {
    EXPECT_TRUE(std::string(e.what()).rfind("previous_response_id's item 0: ", 0) == 0) << e.what();
  }
}

TEST(ResponsesRequest, StoredInputItemsHaveIdsAndParts) {
  json s = ds::server::stored_input_items("hi");
  ASSERT_EQ(s.size(), 1u);
  EXPECT_TRUE(std::regex_match(s[0]["id"].get<std::string>(), std::regex("msg_[0-9a-f]{32}"))) << s.dump();
  EXPECT_EQ(s[0]["type"], "message");
  EXPECT_EQ(s[0]["role"], "user");
  EXPECT_EQ(s[0]["status"], "completed");
  EXPECT_EQ(s[0]["content"], json::parse(R"([{"type":"input_text","text":"hi"}])"));
  json l = ds::server::stored_input_items(json::parse(R"([
    {"role": "assistant", "content": "ok"},
    {"type": "function_call", "id": "fc_mine", "call_id": "c1", "name": "f", "arguments": "{}"},
    {"type": "function_call_output", "call_id": "c1", "output": "42"}])"));
  ASSERT_EQ(l.size(), 3u);
  EXPECT_EQ(l[0]["content"], json::parse(R"([{"type":"output_text","text":"ok"}])"));
  EXPECT_EQ(l[1]["id"], "fc_mine");
  EXPECT_EQ(l[1]["call_id"], "c1");
  EXPECT_EQ(l[2]["type"], "function_call_output");
  EXPECT_EQ(l[2]["id"].get<std::string>().rfind("fco_", 0), 0u);
}

TEST(ResponsesOutput, BackgroundStartsQueuedAndCancelEndsCancelled) {
  ResponsesOutput o("resp_6", 1, "tiny", json::object(), true);
  EXPECT_EQ(o.response()["status"], "queued");
  EXPECT_EQ(o.response()["background"], true);
  EXPECT_FALSE(o.finished());
  auto es = o.start();
  EXPECT_EQ(es[0]["response"]["status"], "queued");
  EXPECT_EQ(es[1]["response"]["status"], "in_progress");
  o.update(ev("", "ab"));
  es = o.cancel({4, 0, 2, 0});
  EXPECT_EQ(es.back()["type"], "response.cancelled");
  EXPECT_TRUE(o.finished());
  json r = o.response();
  EXPECT_EQ(r["status"], "cancelled");
  EXPECT_EQ(r["output"][0]["status"], "incomplete");
  EXPECT_EQ(r["usage"]["output_tokens"], 2);
  EXPECT_EQ(ResponsesOutput("resp_7", 1, "tiny", json::object()).response()["background"], false);
}

using ds::server::ResponseStore;

// A conversation's chain: each response's context is its predecessors' inputs and outputs, then its own input.
TEST(ResponseStore, ChainsGiveEveryEarlierItemInOrder) {
  ResponseStore st(1 << 20);
  auto a = st.node(nullptr, json::array({"in1"}));
  st.begin("resp_a", {{"status", "in_progress"}}, a);
  EXPECT_TRUE(st.get("resp_a")->running);
  st.finish("resp_a", {{"status", "completed"}}, json::array({"out1"}));
  auto fa = st.get("resp_a");
  ASSERT_TRUE(fa);
  EXPECT_FALSE(fa->running);
  EXPECT_EQ(fa->response["status"], "completed");
  auto b = st.node(fa->node, json::array({"in2a", "in2b"}));
  st.begin("resp_b", json::object(), b);
  st.finish("resp_b", json::object(), json::array({"out2"}));
  auto fb = st.get("resp_b");
  EXPECT_EQ(ResponseStore::items(fb->node.get(), false), json::parse(R"(["in1","out1","in2a","in2b"])"));
  EXPECT_EQ(ResponseStore::items(fb->node.get(), true), json::parse(R"(["in1","out1","in2a","in2b","out2"])"));
  // Deleting the first response keeps the second's context (its chain holds the node).
  EXPECT_TRUE(st.erase("resp_a"));
  EXPECT_FALSE(st.erase("resp_a"));
  EXPECT_FALSE(st.get("resp_a"));
  EXPECT_EQ(ResponseStore::items(st.get("resp_b")->node.get(), true).size(), 5u);
  EXPECT_EQ(st.size(), 1u);
}

// The byte budget: the least recently used finished responses go first, running ones stay, and bytes come back when
// nothing holds a node any more.
TEST(ResponseStore, EvictsTheLeastRecentlyUsedWithinItsBudget) {
  const std::string big(1000, 'x');
  ResponseStore st(3500);
  for (const char* id : {"r1", "r2", "r3"}) {
    st.begin(id, json::object(), st.node(nullptr, json::array({big})));
    st.finish(id, json::object(), json::array());
  }
  EXPECT_EQ(st.size(), 3u);
  EXPECT_GT(st.bytes(), 3000);
  EXPECT_TRUE(st.get("r1"));  // r1 is now the most recently used: r2 goes first
  st.begin("r4", json::object(), st.node(nullptr, json::array({big})));
  EXPECT_FALSE(st.get("r2"));
  EXPECT_TRUE(st.get("r1") && st.get("r3") && st.get("r4"));
  EXPECT_LE(st.bytes(), 3500);
  // A running response is never evicted, even past the budget.
  st.begin("r5", json::object(), st.node(nullptr, json::array({big, big, big, big})));
  EXPECT_TRUE(st.get("r4") && st.get("r5"));
  EXPECT_FALSE(st.get("r1") || st.get("r3"));
  // Once it finishes it is the only finished one, and with the running r4 over the budget: it goes.
  st.finish("r5", json::object(), json::array());
  EXPECT_FALSE(st.get("r5"));
  st.finish("r4", json::object(), json::array());
  EXPECT_TRUE(st.get("r4"));
  EXPECT_LE(st.bytes(), 3500);
  // A node held outside the store (a later response's chain) still counts until dropped.
  ResponseStore s2(1 << 20);
  auto n = s2.node(nullptr, json::array({big}));
  s2.begin("x", json::object(), n);
  s2.finish("x", json::object(), json::array());
  const int64_t held = s2.bytes();
  EXPECT_GT(held, 1000);
  s2.erase("x");
  EXPECT_EQ(s2.bytes(), held);
  n.reset();
  EXPECT_EQ(s2.bytes(), 0);
}

// item_reference: an item of any stored conversation by its id (an index, not a scan); items leave with their node.
TEST(ResponseStore, FindsItemsByIdUntilTheirNodeIsGone) {
  ResponseStore st(1 << 20);
  auto a = st.node(nullptr, json::parse(R"([{"id": "msg_in", "type": "message", "v": 1}, "no id", {"id": 5}])"));
  EXPECT_FALSE(st.find_item("msg_in")) << "not stored yet";
  st.begin("ra", json::object(), a);
  a.reset();
  EXPECT_EQ((*st.find_item("msg_in"))["v"], 1);
  EXPECT_FALSE(st.find_item("msg_out")) << "not finished yet";
  st.finish("ra", json::object(), json::parse(R"([{"id": "msg_out", "v": 2}])"));
  EXPECT_EQ((*st.find_item("msg_out"))["v"], 2);
  // A later turn's chain holds the first node: its items stay findable after the first response is deleted.
  auto b = st.node(st.get("ra")->node, json::parse(R"([{"id": "msg_b", "v": 3}])"));
  st.begin("rb", json::object(), b);
  b.reset();
  st.erase("ra");
  EXPECT_EQ((*st.find_item("msg_in"))["v"], 1);
  EXPECT_EQ((*st.find_item("msg_b"))["v"], 3);
  st.erase("rb");  // the last holder of both nodes
  for (const char* id : {"msg_in", "msg_out", "msg_b"}) EXPECT_FALSE(st.find_item(id)) << id;
  EXPECT_EQ(st.bytes(), 0);
}

}  // namespace
