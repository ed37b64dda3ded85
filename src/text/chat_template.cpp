#include "text/chat_template.h"

#include <filesystem>

#include "core/file.h"
#include "core/status.h"

namespace ds {
namespace {

// tokenizer_config.json stores special tokens as a string or as an AddedToken object {"content": ...}.
std::string token_string(const nlohmann::ordered_json& cfg, const char* key) {
  auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) return "";
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string())
    return (*it)["content"].get<std::string>();
  fail("tokenizer_config.json: expected ", key, " to be a string or {\"content\": ...}, got ", it->type_name());
}

}  // namespace

ChatTemplate ChatTemplate::from_source(const std::string& source, std::string bos_token, std::string eos_token) {
  ChatTemplate t;
  t.source_ = source;
  t.bos_token_ = std::move(bos_token);
  t.eos_token_ = std::move(eos_token);
  try {
    t.tmpl_ = std::make_shared<const jinja::Template>(source);
  } catch (const Error& e) {
    fail("chat template: ", e.what());
  }
  return t;
}

ChatTemplate ChatTemplate::load(const std::string& model_dir) {
  namespace fs = std::filesystem;
  fs::path dir(model_dir);
  nlohmann::ordered_json cfg = nlohmann::ordered_json::object();
  fs::path cfg_path = dir / "tokenizer_config.json";
  if (fs::exists(cfg_path)) {
    try {
      cfg = nlohmann::ordered_json::parse(read_file(cfg_path.string(), "tokenizer_config.json"));
    } catch (const nlohmann::json::exception& e) {
      fail(cfg_path.string(), ": expected valid JSON, got parse error: ", e.what());
    }
  }
  std::string source;
  fs::path jinja_path = dir / "chat_template.jinja";
  if (fs::exists(jinja_path)) {
    source = read_file(jinja_path.string(), "chat template");
  } else if (cfg.contains("chat_template")) {
    const auto& ct = cfg["chat_template"];
    if (ct.is_string()) {
      source = ct.get<std::string>();
    } else if (ct.is_array()) {
      for (auto& e : ct)
        if (e.value("name", "") == "default" && e.contains("template")) source = e["template"].get<std::string>();
      if (source.empty())
        fail(cfg_path.string(), ": expected a chat_template entry named \"default\", got none among ", ct.size());
    } else {
      fail(cfg_path.string(), ": expected chat_template to be a string or a list, got ", ct.type_name());
    }
  } else {
    fail("chat template: expected ", jinja_path.string(), " or a chat_template in ", cfg_path.string(),
         ", found neither");
  }
  return from_source(source, token_string(cfg, "bos_token"), token_string(cfg, "eos_token"));
}

std::string ChatTemplate::render(const nlohmann::ordered_json& messages, const nlohmann::ordered_json& tools,
                                 bool add_generation_prompt, const nlohmann::ordered_json& kwargs) const {
  if (!messages.is_array()) fail("chat template: expected messages to be an array, got ", messages.type_name());
  if (!tools.is_null() && !tools.is_array()) fail("chat template: expected tools to be an array or null, got ", tools.type_name());
  if (!kwargs.is_null() && !kwargs.is_object())
    fail("chat template: expected template kwargs to be an object, got ", kwargs.type_name());
  jinja::Value vars = jinja::Value::dict();
  auto& d = vars.dict_ref();
  d.set("messages", jinja::from_json(messages));
  d.set("tools", jinja::from_json(tools));
  d.set("documents", jinja::Value::none());
  d.set("add_generation_prompt", jinja::Value(add_generation_prompt));
  if (!bos_token_.empty()) d.set("bos_token", jinja::Value(bos_token_));
  if (!eos_token_.empty()) d.set("eos_token", jinja::Value(eos_token_));
  if (kwargs.is_object())
    for (auto it = kwargs.begin(); it != kwargs.end(); ++it) d.set(it.key(), jinja::from_json(it.value()));
  return tmpl_->render(vars);
}

std::string ChatTemplate::render_continuing(const nlohmann::ordered_json& messages, const nlohmann::ordered_json& tools,
                                            const nlohmann::ordered_json& kwargs) const {
  static const std::string kTag = "CONTINUE_FINAL_MESSAGE_TAG ";
  if (!messages.is_array() || messages.empty() || !messages.back().is_object())
    fail("continue_final_message: there is no final message to continue");
  nlohmann::ordered_json msgs = messages;
  auto& last = msgs.back();
  if (!last.contains("content") || last["content"].is_null())
    fail("continue_final_message: the final message has no content to continue");
  auto& content = last["content"];
  std::string text;
  if (content.is_string()) {
    text = content.get<std::string>();
    content = text + kTag;
  } else if (content.is_array()) {
    bool found = false;
    for (auto it = content.rbegin(); it != content.rend() && !found; ++it)
      if (it->is_object() && it->contains("text") && (*it)["text"].is_string()) {
        text = (*it)["text"].get<std::string>();
        (*it)["text"] = text + kTag;
        found = true;
      }
    if (!found) fail("continue_final_message: the final message has no text part to continue");
  } else {
    fail("continue_final_message: expected the final message's content to be a string or a list of parts, got ",
         content.type_name());
  }
  std::string out = render(msgs, tools, false, kwargs);
  const char* ws = " \t\n\r\f\v";
  const size_t b = text.find_first_not_of(ws);
  const std::string core = b == std::string::npos ? "" : text.substr(b, text.find_last_not_of(ws) - b + 1);
  const std::string mark = kTag.substr(0, kTag.size() - 1);
  const size_t at = out.rfind(mark);
  if (at == std::string::npos || out.find(core) == std::string::npos)
    fail("continue_final_message: the final message's text does not appear in the rendered prompt (the chat template "
         "changed or dropped it), so there is nothing to continue from");
  const bool kept = out.compare(at, kTag.size(), kTag) == 0;  // the template kept the text's trailing spacing
  out.resize(at);
  if (!kept) out.resize(out.find_last_not_of(ws) == std::string::npos ? 0 : out.find_last_not_of(ws) + 1);
  return out;
}

}  // namespace ds
