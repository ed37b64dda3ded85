#include "server/responses.h"

#include <cstdio>
#include <regex>

namespace ds::server {

namespace {

bool has(const json& j, const char* k) { return j.is_object() && j.contains(k) && !j[k].is_null(); }

std::string str_field(const json& j, const char* k, const std::string& where, const std::string& param) {
  if (!has(j, k) || !j[k].is_string())
    throw bad_request(where + " needs a string '" + k + "', got " + (j.contains(k) ? brief(j[k]) : "none"), param);
  return j[k].get<std::string>();
}

// A message item's content (a string, or a list of parts) as chat content. input_text / output_text / refusal parts
// become text parts; input_image parts image_url parts (their places go to `images`) unless text_only.
json content_of(const json& item, const std::string& where, bool text_only, std::vector<std::string>& images) {
  if (!item.contains("content") || item["content"].is_null())
    throw bad_request(where + ": a message item needs 'content' (a string or a list of content parts)", "input");
  const json& c = item["content"];
  if (c.is_string()) return c;
  if (!c.is_array())
    throw bad_request(where + ".content must be a string or a list of content parts, got " + brief(c), "input");
  json parts = json::array();
  for (size_t i = 0; i < c.size(); ++i) {
    const json& p = c[i];
    const std::string pw = where + ".content[" + std::to_string(i) + "]";
    if (!p.is_object() || !p.contains("type") || !p["type"].is_string())
      throw bad_request(pw + ": content parts must be objects with a 'type', got " + brief(p), "input");
    const std::string t = p["type"].get<std::string>();
    if (t == "input_text" || t == "output_text" || t == "text") {
      parts.push_back({{"type", "text"}, {"text", str_field(p, "text", pw, "input")}});
    } else if (t == "refusal") {
      parts.push_back({{"type", "text"}, {"text", str_field(p, "refusal", pw, "input")}});
    } else if (t == "input_image" && !text_only) {
      if (!has(p, "image_url") && has(p, "file_id"))
        throw bad_request(pw + ": input_image by 'file_id' is not supported (this server has no files API); send "
                          "'image_url' (an http(s) or data: URL)", "input");
      const std::string url = str_field(p, "image_url", pw, "input");
      if (url.empty()) throw bad_request(pw + ": input_image needs a non-empty 'image_url'", "input");
      json iu = {{"url", url}};
      if (has(p, "detail")) iu["detail"] = p["detail"];
      parts.push_back({{"type", "image_url"}, {"image_url", iu}});
      images.push_back(pw);
    } else if (t == "input_image") {
      throw bad_request(pw + ": an assistant message carries text only (output_text), got input_image", "input");
    } else {
      throw bad_request(pw + ": content part type '" + t + "' is not supported (input_text, output_text, refusal, " +
                            "input_image)", "input");
    }
  }
  return parts;
}

// Text of chat content (a string or text parts); false if it holds anything else.
bool plain_text(const json& c, std::string& out) {
  if (c.is_string()) {
    out = c.get<std::string>();
    return true;
  }
  out.clear();
  for (auto& p : c) {
    if (p["type"] != "text") return false;
    out += p["text"].get<std::string>();
  }
  return true;
}

// Input items -> chat messages. An assistant turn gathers what belongs to it in the chat format: reasoning items
// (reasoning_content), assistant message items (content) and function_call items (tool_calls), in that order; any
// other item, or a reasoning / message item after the turn's calls, starts a new message. Items before `first_own`
// came from a stored conversation (previous_response_id) and are named so in errors; the others are input[i].
json input_messages(const json& input, size_t first_own, std::vector<std::string>& images) {
  json messages = json::array();
  json turn = nullptr;
  auto flush = [&] {
    if (!turn.is_null()) messages.push_back(std::move(turn));
    turn = nullptr;
  };
  auto has_calls = [&] { return !turn.is_null() && turn.contains("tool_calls"); };
  auto has_text = [&] { return !turn.is_null() && !turn["content"].get<std::string>().empty(); };
  auto open_turn = [&] {
    if (turn.is_null()) turn = {{"role", "assistant"}, {"content", ""}};
  };
  for (size_t i = 0; i < input.size(); ++i) {
    const json& it = input[i];
    const std::string w = i < first_own ? "previous_response_id's item " + std::to_string(i)
                                        : "input[" + std::to_string(i - first_own) + "]";
    if (!it.is_object()) throw bad_request(w + ": each input item must be an object, got " + brief(it), "input");
    std::string type;
    if (has(it, "type")) {
      if (!it["type"].is_string()) throw bad_request(w + ": 'type' must be a string, got " + brief(it["type"]), "input");
      type = it["type"].get<std::string>();
    } else if (it.contains("role")) {
      type = "message";
    }
    if (type == "message") {
      const std::string role = str_field(it, "role", w, "input");
      if (role != "user" && role != "assistant" && role != "system" && role != "developer")
        throw bad_request(w + ": message role must be user, assistant, system or developer, got '" + role + "'", "input");
      if (role == "assistant") {
        std::string text;
        plain_text(content_of(it, w, true, images), text);
        if (has_calls()) flush();
        open_turn();
        turn["content"] = turn["content"].get<std::string>() + text;
      } else {
        flush();
        messages.push_back({{"role", role == "developer" ? "system" : role}, {"content", content_of(it, w, false, images)}});
      }
    } else if (type == "function_call") {
      const std::string call_id = str_field(it, "call_id", w, "input"), name = str_field(it, "name", w, "input");
      std::string args = "{}";
      if (has(it, "arguments")) {
        if (it["arguments"].is_string()) args = it["arguments"].get<std::string>();
        else if (it["arguments"].is_object()) args = it["arguments"].dump();
        else throw bad_request(w + ": 'arguments' must be a JSON string, got " + brief(it["arguments"]), "input");
      }
      open_turn();
      turn["tool_calls"].push_back(
          {{"id", call_id}, {"type", "function"}, {"function", {{"name", name}, {"arguments", args}}}});
    } else if (type == "function_call_output") {
      flush();
      const std::string call_id = str_field(it, "call_id", w, "input");
      if (!it.contains("output") || !(it["output"].is_string() || it["output"].is_array()))
        throw bad_request(w + ": a function_call_output item needs 'output' (a string or a list of content parts)",
                          "input");
      json tmp = {{"content", it["output"]}};
      messages.push_back({{"role", "tool"}, {"tool_call_id", call_id}, {"content", content_of(tmp, w + ".output", false, images)}});
    } else if (type == "reasoning") {
      // The reasoning text: its content (reasoning_text parts), else its summary; encrypted_content is not ours.
      std::string text;
      for (const char* k : {"content", "summary"}) {
        if (!has(it, k)) continue;
        if (!it[k].is_array()) throw bad_request(w + ": reasoning '" + k + "' must be a list, got " + brief(it[k]), "input");
        for (auto& p : it[k]) {
          if (!p.is_object() || !has(p, "text") || !p["text"].is_string())
            throw bad_request(w + ": reasoning " + k + " parts must be objects with a string 'text', got " + brief(p),
                              "input");
          if (!text.empty()) text += "\n\n";
          text += p["text"].get<std::string>();
        }
        if (!text.empty()) break;
      }
      if (text.empty()) continue;
      if (has_calls() || has_text()) flush();
      open_turn();
      std::string prev = turn.value("reasoning_content", "");
      turn["reasoning_content"] = prev.empty() ? text : prev + "\n\n" + text;
    } else if (type == "item_reference") {
      throw bad_request(w + ": item_reference is not supported; send the item itself, or continue a stored "
                        "response with 'previous_response_id'", "input");
    } else {
      throw bad_request(w + ": input item type '" + (type.empty() ? std::string("(none)") : type) +
                            "' is not supported (message, function_call, function_call_output, reasoning)", "input");
    }
  }
  flush();
  return messages;
}

}  // namespace

std::string new_response_id() { return "resp_" + random_hex(32); }

json stored_input_items(const json& input) {
  json items = json::array();
  auto text_parts = [](const json& content, bool assistant) {
    if (!content.is_string()) return content;
    return json::array({{{"type", assistant ? "output_text" : "input_text"}, {"text", content}}});
  };
  auto add = [&](const json& it) {
    std::string type = it.value("type", std::string(it.contains("role") ? "message" : ""));
    const char* prefix = type == "message" ? "msg_" : type == "function_call" ? "fc_"
                         : type == "function_call_output" ? "fco_" : type == "reasoning" ? "rs_" : "item_";
    json item = {{"id", has(it, "id") && it["id"].is_string() ? it["id"] : json(prefix + random_hex(32))},
                 {"type", type}};
    for (auto kv = it.begin(); kv != it.end(); ++kv)
      if (kv.key() != "id" && kv.key() != "type") item[kv.key()] = kv.value();
    if (type == "message") {
      item["content"] = text_parts(item["content"], item.value("role", "") == "assistant");
      if (!item.contains("status")) item["status"] = "completed";
    }
    items.push_back(std::move(item));
  };
  if (input.is_string()) add({{"role", "user"}, {"content", input}});
  else
    for (auto& it : input) add(it);
  return items;
}

ResponsesRequest responses_to_chat(const json& b, const json& history) {
  ResponsesRequest r;
  json& chat = r.chat = json::object();
  json& echo = r.echo = json::object();
  if (has(b, "conversation"))
    throw bad_request("'conversation' is not supported (no Conversations API): continue a conversation with "
                      "'previous_response_id', or send the whole of it in 'input'", "conversation");
  for (const char* k : {"store", "background"})
    if (has(b, k) && !b[k].is_boolean())
      throw bad_request(std::string("'") + k + "' must be a boolean, got " + brief(b[k]), k);
  if (has(b, "prompt"))
    throw bad_request("'prompt' (a stored prompt template) is not supported; send 'instructions' and 'input'", "prompt");
  if (has(b, "model")) chat["model"] = b["model"];

  // Messages: instructions (a system message first), then the input items.
  json messages = json::array();
  if (has(b, "instructions")) {
    if (!b["instructions"].is_string())
      throw bad_request("'instructions' must be a string, got " + brief(b["instructions"]), "instructions");
    messages.push_back({{"role", "system"}, {"content", b["instructions"]}});
  }
  if (!has(b, "input")) throw bad_request("'input' is required (a string or a list of input items)", "input");
  const json& input = b["input"];
  if (!input.is_string() && !input.is_array())
    throw bad_request("'input' must be a string or a list of input items, got " + brief(input), "input");
  json all = history;
  if (input.is_string()) all.push_back({{"role", "user"}, {"content", input}});
  else
    for (auto& it : input) all.push_back(it);
  for (auto& m : input_messages(all, history.size(), r.image_where)) messages.push_back(m);
  if (messages.empty()) throw bad_request("'input' must hold at least one item", "input");
  // Chat templates take one system message, first: instructions and leading system / developer messages are joined.
  size_t lead = 0;
  std::string joined;
  for (; lead < messages.size() && messages[lead]["role"] == "system"; ++lead) {
    std::string t;
    if (!plain_text(messages[lead]["content"], t)) break;
    joined += (lead ? "\n\n" : "") + t;
  }
  if (lead > 1) {
    messages.erase(messages.begin(), messages.begin() + std::ptrdiff_t(lead));
    messages.insert(messages.begin(), json{{"role", "system"}, {"content", joined}});
  }
  chat["messages"] = messages;

  if (has(b, "max_output_tokens")) chat["max_tokens"] = b["max_output_tokens"];
  for (const char* k : {"temperature", "top_p", "stream", "parallel_tool_calls"})
    if (has(b, k)) chat[k] = b[k];
  // vLLM's extras the chat route takes.
  for (const char* k : {"top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "stop",
                        "stop_token_ids", "ignore_eos", "min_tokens", "logit_bias", "bad_words", "allowed_token_ids",
                        "chat_template_kwargs", "enable_thinking", "thinking_token_budget", "priority", "cache_salt",
                        "repetition_detection", "skip_special_tokens"})
    if (b.contains(k)) chat[k] = b[k];

  // tools: the Responses shape is flat ({type, name, description, parameters, strict}); only function tools.
  json tools_echo = json::array();
  if (has(b, "tools")) {
    if (!b["tools"].is_array()) throw bad_request("'tools' must be a list, got " + brief(b["tools"]), "tools");
    json tools = json::array();
    for (size_t i = 0; i < b["tools"].size(); ++i) {
      const json& t = b["tools"][i];
      const std::string w = "tools[" + std::to_string(i) + "]";
      if (!t.is_object() || !t.contains("type") || !t["type"].is_string())
        throw bad_request(w + ": each tool must be an object with a 'type', got " + brief(t), "tools");
      const std::string type = t["type"].get<std::string>();
      if (type != "function")
        throw bad_request(w + ": tool type '" + type + "' is not supported: this server runs no built-in tools (web " +
                              "search, file search, code interpreter, ...); declare 'function' tools and run them " +
                              "yourself", "tools");
      if (!has(t, "name") || !t["name"].is_string())
        throw bad_request(w + ": a function tool needs a string 'name' ({\"type\": \"function\", \"name\": ..., "
                              "\"parameters\": {...}}: flat, not nested under \"function\"), got " + brief(t), "tools");
      json fn = {{"name", t["name"]}};
      if (has(t, "description")) fn["description"] = t["description"];
      if (has(t, "parameters")) fn["parameters"] = t["parameters"];
      if (has(t, "strict")) fn["strict"] = t["strict"];
      tools.push_back({{"type", "function"}, {"function", fn}});
      tools_echo.push_back({{"type", "function"},
                            {"name", t["name"]},
                            {"description", has(t, "description") ? t["description"] : json(nullptr)},
                            {"parameters", has(t, "parameters") ? t["parameters"] : json(nullptr)},
                            {"strict", has(t, "strict") ? t["strict"] : json(false)}});
    }
    chat["tools"] = tools;
  }
  json tool_choice_echo = "auto";
  if (has(b, "tool_choice")) {
    const json& tc = b["tool_choice"];
    if (tc.is_string()) {
      chat["tool_choice"] = tc;
    } else if (tc.is_object() && str_or(tc, "type") == "function") {
      if (!has(tc, "name") || !tc["name"].is_string())
        throw bad_request("'tool_choice' {\"type\": \"function\"} needs a string 'name', got " + brief(tc), "tool_choice");
      chat["tool_choice"] = {{"type", "function"}, {"function", {{"name", tc["name"]}}}};
    } else {
      throw bad_request("'tool_choice' must be auto, none, required or {\"type\": \"function\", \"name\": ...}, got " +
                            brief(tc), "tool_choice");
    }
    tool_choice_echo = tc;
  }

  // reasoning.effort: none = thinking off, any other effort on (the chat route's reasoning_effort); summary ignored.
  json reasoning_echo = {{"effort", nullptr}, {"summary", nullptr}};
  if (has(b, "reasoning")) {
    const json& rs = b["reasoning"];
    if (!rs.is_object()) throw bad_request("'reasoning' must be an object {\"effort\": ...}, got " + brief(rs), "reasoning");
    if (has(rs, "effort")) {
      const json& e = rs["effort"];
      const std::string s = e.is_string() ? e.get<std::string>() : "";
      if (s != "none" && s != "minimal" && s != "low" && s != "medium" && s != "high" && s != "xhigh")
        throw bad_request("'reasoning.effort' must be none, minimal, low, medium, high or xhigh, got " + brief(e),
                          "reasoning.effort");
      chat["reasoning_effort"] = s == "xhigh" ? "high" : s;
      reasoning_echo["effort"] = e;
    }
    if (has(rs, "summary")) reasoning_echo["summary"] = rs["summary"];
  }

  // text.format -> response_format.
  json text_echo = {{"format", {{"type", "text"}}}};
  if (has(b, "text")) {
    const json& t = b["text"];
    if (!t.is_object()) throw bad_request("'text' must be an object {\"format\": {...}}, got " + brief(t), "text");
    text_echo = t;
    if (has(t, "format")) {
      const json& f = t["format"];
      if (!f.is_object() || !has(f, "type") || !f["type"].is_string())
        throw bad_request("'text.format' must be {\"type\": \"text\" | \"json_object\" | \"json_schema\", ...}, got " +
                              brief(f), "text.format");
      const std::string type = f["type"].get<std::string>();
      if (type == "text" || type == "json_object") {
        chat["response_format"] = {{"type", type}};
      } else if (type == "json_schema") {
        if (!has(f, "schema"))
          throw bad_request("'text.format' of type json_schema needs 'schema' ({\"type\": \"json_schema\", \"name\": "
                            "..., \"schema\": {...}}), got " + brief(f), "text.format");
        json js = {{"name", f.value("name", json("response"))}, {"schema", f["schema"]}};
        if (has(f, "strict")) js["strict"] = f["strict"];
        chat["response_format"] = {{"type", "json_schema"}, {"json_schema", js}};
      } else {
        throw bad_request("'text.format' type '" + type + "' is not supported (text, json_object or json_schema)",
                          "text.format");
      }
    } else {
      text_echo["format"] = {{"type", "text"}};
    }
  }

  echo["instructions"] = has(b, "instructions") ? b["instructions"] : json(nullptr);
  echo["max_output_tokens"] = has(b, "max_output_tokens") ? b["max_output_tokens"] : json(nullptr);
  echo["metadata"] = has(b, "metadata") ? b["metadata"] : json::object();
  echo["parallel_tool_calls"] = has(b, "parallel_tool_calls") ? b["parallel_tool_calls"] : json(true);
  echo["previous_response_id"] = has(b, "previous_response_id") ? b["previous_response_id"] : json(nullptr);
  echo["reasoning"] = reasoning_echo;
  echo["store"] = false;  // the server sets it where it stores the response
  echo["temperature"] = has(b, "temperature") ? b["temperature"] : json(nullptr);
  echo["text"] = text_echo;
  echo["tool_choice"] = tool_choice_echo;
  echo["tools"] = tools_echo;
  echo["top_p"] = has(b, "top_p") ? b["top_p"] : json(nullptr);
  echo["truncation"] = "disabled";
  if (has(b, "user") && b["user"].is_string()) echo["user"] = b["user"];
  return r;
}

void responses_echo_sampling(json& echo, const sampling::SamplingParams& used) {
  // The float parameters as the short decimal they came from (0.7f -> 0.7, not 0.699999988).
  auto shortest = [](float x) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.6g", double(x));
    return std::stod(buf);
  };
  if (echo["temperature"].is_null()) echo["temperature"] = shortest(used.temperature);
  if (echo["top_p"].is_null()) echo["top_p"] = shortest(used.top_p);
}

HttpError responses_error(const HttpError& e) {
  std::string msg = e.what(), param = e.param;
  auto replace_all = [](std::string& s, const std::string& from, const std::string& to) {
    for (size_t p = s.find(from); p != std::string::npos; p = s.find(from, p + to.size())) s.replace(p, from.size(), to);
  };
  static const std::pair<const char*, const char*> kNames[] = {
      {"max_completion_tokens", "max_output_tokens"}, {"max_tokens", "max_output_tokens"},
      {"response_format", "text.format"},             {"reasoning_effort", "reasoning.effort"},
      {"messages", "input"}};
  for (auto& [from, to] : kNames)
    if (param == from) param = to;
  replace_all(msg, "response_format.json_schema.schema", "text.format.schema");
  replace_all(msg, "response_format", "text.format");
  replace_all(msg, "'max_tokens'", "'max_output_tokens'");
  replace_all(msg, "'reasoning_effort'", "'reasoning.effort'");
  replace_all(msg, "'messages'", "'input'");
  replace_all(msg, " in the messages", " in the input");
  msg = std::regex_replace(msg, std::regex(R"(tools\[(\d+)\]\.function\.)"), "tools[$1].");
  return HttpError(e.status, msg, param, e.type);
}

// ---------------------------------------------------------------------------------------------------

ResponsesOutput::ResponsesOutput(std::string id, int64_t created_at, std::string model, json echo, bool background)
    : id_(std::move(id)),
      model_(std::move(model)),
      created_at_(created_at),
      echo_(std::move(echo)),
      background_(background),
      status_(background ? "queued" : "in_progress") {}

std::string ResponsesOutput::sse(const json& event) {
  return "event: " + event["type"].get<std::string>() + "\ndata: " +
         event.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n";
}

json ResponsesOutput::response() const {
  json r = {{"id", id_},          {"object", "response"},         {"created_at", created_at_},
            {"status", status_},  {"background", background_},    {"error", error_},
            {"incomplete_details", incomplete_}, {"model", model_}, {"output", output_}};
  for (auto it = echo_.begin(); it != echo_.end(); ++it) r[it.key()] = it.value();
  r["usage"] = usage_;
  return r;
}

json ResponsesOutput::event(const char* type, json fields) {
  json e = {{"type", type}};
  for (auto it = fields.begin(); it != fields.end(); ++it) e[it.key()] = std::move(it.value());
  e["sequence_number"] = seq_++;
  return e;
}

std::vector<json> ResponsesOutput::start() {
  std::vector<json> out;
  out.push_back(event("response.created", {{"response", response()}}));
  status_ = "in_progress";
  out.push_back(event("response.in_progress", {{"response", response()}}));
  return out;
}

void ResponsesOutput::open(Kind kind, std::vector<json>& out, const ToolCallDelta* call) {
  const int64_t index = int64_t(output_.size());
  json item;
  open_ = kind;
  text_.clear();
  if (kind == Kind::kMessage) {
    item = {{"id", "msg_" + random_hex(32)}, {"type", "message"}, {"status", "in_progress"}, {"content", json::array()},
            {"role", "assistant"}};
  } else if (kind == Kind::kReasoning) {
    item = {{"id", "rs_" + random_hex(32)}, {"type", "reasoning"}, {"summary", json::array()},
            {"content", json::array()}, {"status", "in_progress"}};
    has_reasoning_ = true;
  } else {
    item = {{"id", "fc_" + random_hex(32)}, {"type", "function_call"}, {"status", "in_progress"}, {"arguments", ""},
            {"call_id", call->id}, {"name", call->name}};
  }
  out.push_back(event("response.output_item.added", {{"output_index", index}, {"item", item}}));
  if (kind != Kind::kCall) {
    json part = kind == Kind::kMessage
                    ? json{{"type", "output_text"}, {"annotations", json::array()}, {"logprobs", json::array()}, {"text", ""}}
                    : json{{"type", "reasoning_text"}, {"text", ""}};
    out.push_back(event("response.content_part.added",
                        {{"item_id", item["id"]}, {"output_index", index}, {"content_index", 0}, {"part", part}}));
    item["content"].push_back(part);
  }
  output_.push_back(std::move(item));
}

void ResponsesOutput::close(std::vector<json>& out, bool complete) {
  if (open_ == Kind::kNone) return;
  const int64_t index = int64_t(output_.size()) - 1;
  json& item = output_.back();
  const json id = item["id"];
  if (open_ == Kind::kCall) {
    out.push_back(event("response.function_call_arguments.done",
                        {{"item_id", id}, {"output_index", index}, {"name", item["name"]}, {"arguments", text_}}));
  } else {
    if (open_ == Kind::kMessage)
      out.push_back(event("response.output_text.done", {{"item_id", id},
                                                        {"output_index", index},
                                                        {"content_index", 0},
                                                        {"text", text_},
                                                        {"logprobs", json::array()}}));
    else
      out.push_back(event("response.reasoning_text.done",
                          {{"item_id", id}, {"output_index", index}, {"content_index", 0}, {"text", text_}}));
    out.push_back(event("response.content_part.done",
                        {{"item_id", id}, {"output_index", index}, {"content_index", 0}, {"part", item["content"][0]}}));
  }
  item["status"] = complete ? "completed" : "incomplete";
  out.push_back(event("response.output_item.done", {{"output_index", index}, {"item", item}}));
  open_ = Kind::kNone;
  text_.clear();
}

void ResponsesOutput::text(Kind kind, const std::string& delta, std::vector<json>& out) {
  if (open_ != kind) {
    close(out, true);
    open(kind, out);
  }
  text_ += delta;
  const int64_t index = int64_t(output_.size()) - 1;
  json& item = output_.back();
  item["content"][0]["text"] = text_;
  if (kind == Kind::kMessage)
    out.push_back(event("response.output_text.delta", {{"item_id", item["id"]},
                                                       {"output_index", index},
                                                       {"content_index", 0},
                                                       {"delta", delta},
                                                       {"logprobs", json::array()}}));
  else
    out.push_back(event("response.reasoning_text.delta",
                        {{"item_id", item["id"]}, {"output_index", index}, {"content_index", 0}, {"delta", delta}}));
}

std::vector<json> ResponsesOutput::update(const OutputEvent& ev) {
  std::vector<json> out;
  if (!ev.reasoning.empty()) text(Kind::kReasoning, ev.reasoning, out);
  if (!ev.content.empty()) {
    // A message opens at its first non-whitespace text: whitespace between the reasoning and a tool call (or the end)
    // makes no empty-looking message item.
    if (open_ == Kind::kMessage) {
      text(Kind::kMessage, ev.content, out);
    } else {
      pending_ += ev.content;
      if (pending_.find_first_not_of(" \t\r\n") != std::string::npos) {
        text(Kind::kMessage, pending_, out);
        pending_.clear();
      }
    }
  }
  for (const auto& d : ev.tool_calls) {
    if (!d.id.empty() || !d.name.empty()) {
      pending_.clear();
      close(out, true);
      open(Kind::kCall, out, &d);
    }
    if (!d.arguments.empty() && open_ == Kind::kCall) {
      text_ += d.arguments;
      output_.back()["arguments"] = text_;
      out.push_back(event("response.function_call_arguments.delta",
                          {{"item_id", output_.back()["id"]},
                           {"output_index", int64_t(output_.size()) - 1},
                           {"delta", d.arguments}}));
    }
  }
  return out;
}

std::vector<json> ResponsesOutput::finish(const std::string& finish_reason, const ResponsesUsage& u) {
  std::vector<json> out;
  const bool incomplete = finish_reason == "length" || finish_reason == "repetition" || finish_reason == "abort";
  close(out, !incomplete);
  status_ = incomplete ? "incomplete" : "completed";
  if (incomplete) incomplete_ = {{"reason", finish_reason == "length" ? "max_output_tokens" : finish_reason}};
  set_usage(u);
  out.push_back(event(incomplete ? "response.incomplete" : "response.completed", {{"response", response()}}));
  return out;
}

void ResponsesOutput::set_usage(const ResponsesUsage& u) {
  usage_ = {{"input_tokens", u.input_tokens},
            {"input_tokens_details", {{"cached_tokens", u.cached_tokens}}},
            {"output_tokens", u.output_tokens},
            {"output_tokens_details", {{"reasoning_tokens", u.reasoning_tokens}}},
            {"total_tokens", u.input_tokens + u.output_tokens}};
}

std::vector<json> ResponsesOutput::cancel(const ResponsesUsage& u) {
  std::vector<json> out;
  close(out, false);
  status_ = "cancelled";
  set_usage(u);
  out.push_back(event("response.cancelled", {{"response", response()}}));
  return out;
}

std::vector<json> ResponsesOutput::fail(const std::string& message) {
  std::vector<json> out;
  close(out, false);
  status_ = "failed";
  error_ = {{"code", "server_error"}, {"message", message}};
  out.push_back(event("response.failed", {{"response", response()}}));
  return out;
}

}  // namespace ds::server
