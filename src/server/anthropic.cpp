#include "server/anthropic.h"

namespace ds::server::anthropic {

namespace {

// A 400 whose message starts with the field it concerns; param is the top-level field.
[[noreturn]] void fail(const std::string& where, const std::string& what) {
  throw bad_request(where + ": " + what, where.substr(0, where.find_first_of("[.")));
}

bool has(const json& j, const char* k) { return j.is_object() && j.contains(k) && !j[k].is_null(); }

const std::string& str_field(const json& j, const char* k, const std::string& where) {
  if (!has(j, k) || !j[k].is_string()) fail(where + "." + k, "a string is required, got " + (has(j, k) ? brief(j[k]) : "nothing"));
  return j[k].get_ref<const std::string&>();
}

std::string block_type(const json& b, const std::string& where) {
  if (!b.is_object() || !has(b, "type") || !b["type"].is_string())
    fail(where, "content blocks must be objects with a string 'type', got " + brief(b));
  return b["type"].get<std::string>();
}

// An image block's source -> a URL the chat route reads (data: URL for base64).
std::string image_url(const json& b, const std::string& where) {
  if (!has(b, "source") || !b["source"].is_object())
    fail(where + ".source", "an image block needs a source {\"type\": \"base64\", \"media_type\", \"data\"} or "
                            "{\"type\": \"url\", \"url\"}, got " + (has(b, "source") ? brief(b["source"]) : "nothing"));
  const json& s = b["source"];
  const std::string w = where + ".source";
  const std::string t = str_field(s, "type", w);
  if (t == "base64") return "data:" + str_field(s, "media_type", w) + ";base64," + str_field(s, "data", w);
  if (t == "url") return str_field(s, "url", w);
  fail(w + ".type", "image source type '" + t + "' is not supported (supported: base64, url)");
}

// Text of a text block.
const std::string& text_of(const json& b, const std::string& where) { return str_field(b, "text", where); }

// System prompt: a string or a list of text blocks.
std::string system_text(const json& s) {
  if (s.is_string()) return s.get<std::string>();
  if (!s.is_array()) fail("system", "must be a string or a list of text blocks, got " + brief(s));
  std::string text;
  for (size_t i = 0; i < s.size(); ++i) {
    const std::string where = "system[" + std::to_string(i) + "]";
    if (block_type(s[i], where) != "text") fail(where, "only text blocks are allowed in the system prompt");
    if (!text.empty()) text += "\n";
    text += text_of(s[i], where);
  }
  return text;
}

// A tool_result's content: a string or text / image blocks -> the tool message's content.
// A text or image block (type t, at `where`) appended to `parts` as its OpenAI content part, an image's place noted in
// `images`; false for any other type.
bool append_part(const json& b, const std::string& t, const std::string& where, json& parts,
                 std::vector<std::string>& images) {
  if (t == "text") {
    parts.push_back({{"type", "text"}, {"text", text_of(b, where)}});
  } else if (t == "image") {
    parts.push_back({{"type", "image_url"}, {"image_url", {{"url", image_url(b, where)}}}});
    images.push_back(where);
  } else {
    return false;
  }
  return true;
}

json tool_result_content(const json& b, const std::string& where, std::vector<std::string>& image_where) {
  const bool error = has(b, "is_error") && b["is_error"].is_boolean() && b["is_error"].get<bool>();
  if (has(b, "is_error") && !b["is_error"].is_boolean()) fail(where + ".is_error", "must be a boolean, got " + brief(b["is_error"]));
  const std::string prefix = error ? "Error: " : "";
  if (!has(b, "content")) return prefix;
  const json& c = b["content"];
  if (c.is_string()) return prefix + c.get<std::string>();
  if (!c.is_array()) fail(where + ".content", "must be a string or a list of text / image blocks, got " + brief(c));
  json parts = json::array();
  if (error) parts.push_back({{"type", "text"}, {"text", prefix}});
  for (size_t i = 0; i < c.size(); ++i) {
    const std::string w = where + ".content[" + std::to_string(i) + "]";
    const std::string t = block_type(c[i], w);
    if (!append_part(c[i], t, w, parts, image_where))
      fail(w, "content block type '" + t + "' is not supported in a tool_result (supported: text, image)");
  }
  return parts;
}

void convert_messages(const json& msgs, json& out, std::vector<std::string>& image_where) {
  if (!msgs.is_array() || msgs.empty()) fail("messages", "must be a non-empty list of messages");
  for (size_t mi = 0; mi < msgs.size(); ++mi) {
    const std::string where = "messages[" + std::to_string(mi) + "]";
    const json& m = msgs[mi];
    if (!m.is_object()) fail(where, "each message must be an object, got " + brief(m));
    if (!has(m, "role") || !m["role"].is_string()) fail(where + ".role", "a string role (user or assistant) is required");
    const std::string role = m["role"].get<std::string>();
    if (role != "user" && role != "assistant")
      fail(where + ".role", "must be user or assistant, got '" + role + "' (a system prompt goes in the top-level 'system')");
    if (!has(m, "content")) fail(where + ".content", "is required (a string or a list of content blocks)");
    const json& c = m["content"];
    if (c.is_string()) {
      out.push_back({{"role", role}, {"content", c}});
      continue;
    }
    if (!c.is_array()) fail(where + ".content", "must be a string or a list of content blocks, got " + brief(c));
    if (role == "user") {
      // tool_result blocks become tool messages, in order, ahead of the turn's other content.
      json parts = json::array();
      std::vector<std::string> user_images;
      for (size_t bi = 0; bi < c.size(); ++bi) {
        const std::string w = where + ".content[" + std::to_string(bi) + "]";
        const std::string t = block_type(c[bi], w);
        if (t == "tool_result") {
          json tm = {{"role", "tool"}, {"tool_call_id", str_field(c[bi], "tool_use_id", w)}};
          tm["content"] = tool_result_content(c[bi], w, image_where);
          out.push_back(std::move(tm));
        } else if (!append_part(c[bi], t, w, parts, user_images)) {
          fail(w, "content block type '" + t + "' is not supported in a user message (supported: text, image, tool_result)");
        }
      }
      image_where.insert(image_where.end(), user_images.begin(), user_images.end());
      bool tools_only = !c.empty();
      for (auto& b : c) tools_only &= b["type"] == "tool_result";
      if (!tools_only) out.push_back({{"role", "user"}, {"content", parts}});
    } else {
      std::string text, reasoning;
      json calls = json::array();
      for (size_t bi = 0; bi < c.size(); ++bi) {
        const std::string w = where + ".content[" + std::to_string(bi) + "]";
        const std::string t = block_type(c[bi], w);
        if (t == "text") {
          text += text_of(c[bi], w);
        } else if (t == "thinking") {
          reasoning += str_field(c[bi], "thinking", w);
        } else if (t == "redacted_thinking") {
          // Another model's encrypted reasoning: nothing this model can read.
        } else if (t == "tool_use") {
          const std::string& id = str_field(c[bi], "id", w);
          const std::string& name = str_field(c[bi], "name", w);
          if (!has(c[bi], "input") || !c[bi]["input"].is_object())
            fail(w + ".input", "a tool_use block needs an object 'input', got " +
                                   (has(c[bi], "input") ? brief(c[bi]["input"]) : "nothing"));
          calls.push_back({{"id", id},
                           {"type", "function"},
                           {"function", {{"name", name}, {"arguments", c[bi]["input"].dump()}}}});
        } else {
          fail(w, "content block type '" + t +
                      "' is not supported in an assistant message (supported: text, thinking, redacted_thinking, tool_use)");
        }
      }
      json am = {{"role", "assistant"}, {"content", text}};
      if (!reasoning.empty()) am["reasoning_content"] = reasoning;
      if (!calls.empty()) am["tool_calls"] = calls;
      out.push_back(std::move(am));
    }
  }
}

json convert_tools(const json& tools) {
  if (!tools.is_array()) fail("tools", "must be a list of tools, got " + brief(tools));
  json out = json::array();
  std::vector<std::string> server_tools;
  for (size_t i = 0; i < tools.size(); ++i) {
    const std::string where = "tools[" + std::to_string(i) + "]";
    const json& t = tools[i];
    if (!t.is_object()) fail(where, "each tool must be an object {name, description, input_schema}, got " + brief(t));
    if (has(t, "type") && (!t["type"].is_string() || t["type"] != "custom")) {
      server_tools.push_back(where + " (type " + brief(t["type"]) +
                             (has(t, "name") && t["name"].is_string() ? ", name '" + t["name"].get<std::string>() + "'" : "") + ")");
      continue;
    }
    json fn = {{"name", str_field(t, "name", where)}};
    if (has(t, "description")) fn["description"] = str_field(t, "description", where);
    if (!has(t, "input_schema") || !t["input_schema"].is_object())
      fail(where + ".input_schema", "a JSON Schema object is required, got " +
                                        (has(t, "input_schema") ? brief(t["input_schema"]) : "nothing"));
    fn["parameters"] = t["input_schema"];
    if (has(t, "strict")) {
      if (!t["strict"].is_boolean()) fail(where + ".strict", "must be a boolean, got " + brief(t["strict"]));
      fn["strict"] = t["strict"];
    }
    out.push_back({{"type", "function"}, {"function", fn}});
  }
  if (!server_tools.empty()) {
    std::string list;
    for (auto& s : server_tools) list += (list.empty() ? "" : ", ") + s;
    fail("tools", "server tools are not supported by this server (only client tools {name, description, input_schema}): " +
                      list);
  }
  return out;
}

void convert_tool_choice(const json& tc, json& out) {
  if (!tc.is_object() || !has(tc, "type") || !tc["type"].is_string())
    fail("tool_choice", "must be {\"type\": \"auto\" | \"any\" | \"tool\" | \"none\"}, got " + brief(tc));
  const std::string t = tc["type"].get<std::string>();
  if (t == "auto") out["tool_choice"] = "auto";
  else if (t == "any") out["tool_choice"] = "required";
  else if (t == "none") out["tool_choice"] = "none";
  else if (t == "tool") out["tool_choice"] = {{"type", "function"}, {"function", {{"name", str_field(tc, "name", "tool_choice")}}}};
  else fail("tool_choice.type", "must be auto, any, tool or none, got '" + t + "'");
  if (has(tc, "disable_parallel_tool_use")) {
    if (!tc["disable_parallel_tool_use"].is_boolean())
      fail("tool_choice.disable_parallel_tool_use", "must be a boolean, got " + brief(tc["disable_parallel_tool_use"]));
    out["parallel_tool_calls"] = !tc["disable_parallel_tool_use"].get<bool>();
  }
}

void convert_thinking(const json& th, json& out) {
  if (!th.is_object() || !has(th, "type") || !th["type"].is_string())
    fail("thinking", "must be {\"type\": \"enabled\", \"budget_tokens\": N}, {\"type\": \"adaptive\"} or "
                     "{\"type\": \"disabled\"}, got " + brief(th));
  const std::string t = th["type"].get<std::string>();
  if (t == "disabled") {
    out["enable_thinking"] = false;
  } else if (t == "enabled" || t == "adaptive") {
    out["enable_thinking"] = true;
    if (t == "enabled") {
      if (!has(th, "budget_tokens") || !th["budget_tokens"].is_number_integer() || th["budget_tokens"].get<int64_t>() < 0 ||
          th["budget_tokens"].get<int64_t>() > INT32_MAX)
        fail("thinking.budget_tokens", "a non-negative integer is required with type enabled, got " +
                                           (has(th, "budget_tokens") ? brief(th["budget_tokens"]) : "nothing"));
      out["thinking_token_budget"] = th["budget_tokens"];
    }
  } else {
    fail("thinking.type", "must be enabled, adaptive or disabled, got '" + t + "'");
  }
}

// output_config.format (or the older output_format): {"type": "json_schema", "schema"} -> response_format.
void convert_output_format(const json& f, const std::string& where, json& out) {
  if (!f.is_object() || !has(f, "type") || f["type"] != "json_schema" || !has(f, "schema"))
    fail(where, "must be {\"type\": \"json_schema\", \"schema\": {...}}, got " + brief(f));
  out["response_format"] = {{"type", "json_schema"}, {"json_schema", {{"name", "output"}, {"schema", f["schema"]}}}};
}

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  for (size_t p = s.find(from); p != std::string::npos; p = s.find(from, p + to.size())) s.replace(p, from.size(), to);
}

}  // namespace

ChatRequest to_chat_request(const json& body, bool count_tokens) {
  ChatRequest r;
  json& out = r.body;
  out = json::object();
  // vLLM's extras the chat route takes, where they mean the same here.
  static const char* kExtras[] = {"chat_template_kwargs", "min_p", "presence_penalty", "frequency_penalty",
                                  "repetition_penalty", "seed", "min_tokens", "stop_token_ids", "ignore_eos", "priority",
                                  "cache_salt", "repetition_detection", "logit_bias", "bad_words", "allowed_token_ids",
                                  "skip_special_tokens", "thinking_token_budget", "include_reasoning", "enable_thinking",
                                  "reasoning_effort", "response_format", "structured_outputs", "guided_json",
                                  "guided_choice", "guided_regex", "guided_grammar", "grammar", "json_schema"};
  for (const char* k : kExtras)
    if (has(body, k)) out[k] = body[k];
  for (const char* k : {"model", "temperature", "top_p", "top_k"})
    if (has(body, k)) out[k] = body[k];
  if (!count_tokens) {
    if (!has(body, "max_tokens")) fail("max_tokens", "field required");
    out["max_tokens"] = body["max_tokens"];
    if (has(body, "stream")) out["stream"] = body["stream"];
  }
  if (has(body, "stop_sequences")) {
    const json& s = body["stop_sequences"];
    if (!s.is_array()) fail("stop_sequences", "must be a list of strings, got " + brief(s));
    for (size_t i = 0; i < s.size(); ++i)
      if (!s[i].is_string() || s[i].get<std::string>().empty())
        fail("stop_sequences[" + std::to_string(i) + "]", "must be a non-empty string, got " + brief(s[i]));
    if (!s.empty()) out["stop"] = s;
  }
  json messages = json::array();
  if (has(body, "system")) {
    std::string sys = system_text(body["system"]);
    if (!sys.empty()) messages.push_back({{"role", "system"}, {"content", sys}});
  }
  if (!has(body, "messages")) fail("messages", "field required");
  convert_messages(body["messages"], messages, r.image_where);
  // A final assistant message with text is a prefill: the reply continues it (Anthropic's semantics).
  if (!messages.empty()) {
    const json& last = messages.back();
    const bool text = has(last, "content") && last["content"].is_string() &&
                      last["content"].get<std::string>().find_first_not_of(" \t\n\r") != std::string::npos;
    if (str_or(last, "role") == "assistant" && text && !has(last, "tool_calls")) {
      out["continue_final_message"] = true;
      out["add_generation_prompt"] = false;
    }
  }
  out["messages"] = std::move(messages);
  if (has(body, "tools")) {
    json tools = convert_tools(body["tools"]);
    if (!tools.empty()) out["tools"] = std::move(tools);
  }
  if (has(body, "tool_choice")) convert_tool_choice(body["tool_choice"], out);
  if (has(body, "thinking")) convert_thinking(body["thinking"], out);
  if (has(body, "output_format")) convert_output_format(body["output_format"], "output_format", out);
  if (has(body, "output_config")) {
    const json& oc = body["output_config"];
    if (!oc.is_object()) fail("output_config", "must be an object, got " + brief(oc));
    if (has(oc, "format")) convert_output_format(oc["format"], "output_config.format", out);
  }
  return r;
}

std::string rename_fields(const std::string& message) {
  std::string m = message;
  replace_all(m, ".function.parameters", ".input_schema");
  replace_all(m, "'stop'", "'stop_sequences'");
  replace_all(m, "tool_choice required", "tool_choice any");
  replace_all(m, "tool_choice named", "tool_choice tool");
  replace_all(m, "'tool_choice': required", "'tool_choice': any");
  return m;
}

std::string error_type(int status) {
  switch (status) {
    case 401: return "authentication_error";
    case 403: return "permission_error";
    case 404: return "not_found_error";
    case 413: return "request_too_large";
    case 429: return "rate_limit_error";
    case 503: return "overloaded_error";
    default: return status >= 500 ? "api_error" : "invalid_request_error";
  }
}

json error_body(int status, const std::string& message) {
  return {{"type", "error"}, {"error", {{"type", error_type(status)}, {"message", message}}}};
}

json usage_json(const Usage& u) {
  return {{"input_tokens", u.prompt_tokens - u.cached_tokens},
          {"output_tokens", u.output_tokens},
          {"cache_creation_input_tokens", 0},
          {"cache_read_input_tokens", u.cached_tokens}};
}

Stop map_stop(const std::string& finish_reason, const json& stop_reason) {
  if (finish_reason == "tool_calls") return {"tool_use", nullptr};
  if (finish_reason == "length") return {"max_tokens", nullptr};
  if (finish_reason == "stop" && stop_reason.is_string()) return {"stop_sequence", stop_reason};
  return {"end_turn", nullptr};
}

std::string Event::sse() const {
  return "event: " + name + "\ndata: " + data.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n";
}

MessageWriter::MessageWriter(std::string id, std::string model, bool include_thinking)
    : id_(std::move(id)), model_(std::move(model)), include_thinking_(include_thinking) {}

Event MessageWriter::start(const Usage& u) const {
  Usage s = u;
  s.output_tokens = 0;
  json msg = {{"id", id_},          {"type", "message"},        {"role", "assistant"}, {"model", model_},
              {"content", json::array()}, {"stop_reason", nullptr}, {"stop_sequence", nullptr}, {"usage", usage_json(s)}};
  return {"message_start", {{"type", "message_start"}, {"message", msg}}};
}

void MessageWriter::close(std::vector<Event>& out) {
  if (open_ < 0) return;
  out.push_back({"content_block_stop", {{"type", "content_block_stop"}, {"index", open_}}});
  open_ = -1;
}

void MessageWriter::open(std::vector<Event>& out, json block) {
  close(out);
  blocks_.push_back(block);
  inputs_.emplace_back();
  open_ = int(blocks_.size()) - 1;
  out.push_back({"content_block_start", {{"type", "content_block_start"}, {"index", open_}, {"content_block", std::move(block)}}});
}

std::vector<Event> MessageWriter::feed(const OutputEvent& ev) {
  std::vector<Event> out;
  auto delta = [&](json d) {
    out.push_back({"content_block_delta", {{"type", "content_block_delta"}, {"index", open_}, {"delta", std::move(d)}}});
  };
  auto open_type = [&]() -> std::string { return open_ < 0 ? "" : blocks_[size_t(open_)]["type"].get<std::string>(); };
  if (!ev.reasoning.empty() && include_thinking_) {
    if (open_type() != "thinking") open(out, {{"type", "thinking"}, {"thinking", ""}, {"signature", ""}});
    inputs_[size_t(open_)] += ev.reasoning;
    delta({{"type", "thinking_delta"}, {"thinking", ev.reasoning}});
  }
  if (!ev.content.empty()) {
    if (open_type() == "text") {
      inputs_[size_t(open_)] += ev.content;
      delta({{"type", "text_delta"}, {"text", ev.content}});
    } else {
      pending_ws_ += ev.content;
      if (pending_ws_.find_first_not_of(" \t\r\n") != std::string::npos) {
        open(out, {{"type", "text"}, {"text", ""}});
        inputs_[size_t(open_)] = pending_ws_;
        delta({{"type", "text_delta"}, {"text", pending_ws_}});
        pending_ws_.clear();
      }
    }
  }
  for (const auto& d : ev.tool_calls) {
    if (!d.id.empty() || !d.name.empty()) {
      pending_ws_.clear();
      open(out, {{"type", "tool_use"}, {"id", d.id}, {"name", d.name}, {"input", json::object()}});
      if (call_block_.size() <= size_t(d.index)) call_block_.resize(size_t(d.index) + 1, -1);
      call_block_[size_t(d.index)] = open_;
    }
    // Arguments go to their call's block while it is open (the parser streams one call at a time).
    if (!d.arguments.empty() && size_t(d.index) < call_block_.size() && call_block_[size_t(d.index)] == open_ && open_ >= 0) {
      inputs_[size_t(open_)] += d.arguments;
      delta({{"type", "input_json_delta"}, {"partial_json", d.arguments}});
    }
  }
  return out;
}

std::vector<Event> MessageWriter::finish(const std::string& finish_reason, const json& stop_reason, const Usage& u) {
  std::vector<Event> out;
  close(out);
  pending_ws_.clear();
  stop_ = map_stop(finish_reason, stop_reason);
  out.push_back({"message_delta",
                 {{"type", "message_delta"},
                  {"delta", {{"stop_reason", stop_.reason}, {"stop_sequence", stop_.sequence}}},
                  {"usage", usage_json(u)}}});
  out.push_back({"message_stop", {{"type", "message_stop"}}});
  return out;
}

json MessageWriter::message(const Usage& u) const {
  json content = json::array();
  for (size_t i = 0; i < blocks_.size(); ++i) {
    json b = blocks_[i];
    const std::string t = b["type"].get<std::string>();
    if (t == "thinking") b["thinking"] = inputs_[i];
    else if (t == "text") b["text"] = inputs_[i];
    else if (t == "tool_use") {
      json input = json::parse(inputs_[i], nullptr, false);
      b["input"] = input.is_object() ? input : json::object();
    }
    content.push_back(std::move(b));
  }
  return {{"id", id_},
          {"type", "message"},
          {"role", "assistant"},
          {"model", model_},
          {"content", content},
          {"stop_reason", stop_.reason.empty() ? json(nullptr) : json(stop_.reason)},
          {"stop_sequence", stop_.sequence},
          {"usage", usage_json(u)}};
}

}  // namespace ds::server::anthropic
