#include "server/tokenize_api.h"

#include "text/chat_template.h"
#include "text/tokenizer.h"

namespace ds::server {

using json = nlohmann::ordered_json;

json tokenize_body(const json& body, const text::Tokenizer& tok, const ChatTemplate* tmpl) {
  if (!body.is_object()) throw bad_request("expected a JSON object");
  for (const char* flag : {"add_special_tokens", "return_token_strs"})
    if (body.contains(flag) && !body[flag].is_boolean())
      throw bad_request(std::string("'") + flag + "' must be a boolean", flag);
  json out = json::object();
  std::vector<int32_t> ids;
  if (body.contains("messages")) {
    const json& msgs = body["messages"];
    if (!msgs.is_array()) throw bad_request("'messages' must be a list", "messages");
    if (!tmpl) throw bad_request("this model has no chat template", "messages");
    json tools = body.contains("tools") ? body["tools"] : json();
    if (!tools.is_null() && !tools.is_array()) throw bad_request("'tools' must be a list", "tools");
    const bool agp = bool_field(body, "add_generation_prompt", true);
    json kwargs = body.contains("chat_template_kwargs") ? body["chat_template_kwargs"] : json::object();
    if (!kwargs.is_object()) throw bad_request("'chat_template_kwargs' must be an object", "chat_template_kwargs");
    const bool cont = bool_field(body, "continue_final_message", false);
    std::string text;
    try {
      text = cont ? tmpl->render_continuing(msgs, tools, kwargs) : tmpl->render(msgs, tools, agp, kwargs);
    } catch (const Error& e) {
      throw bad_request(std::string("chat template: ") + e.what(), "messages");
    }
    ids = tok.encode(text, true);
    out["prompt"] = text;
  } else {
    const char* key = body.contains("text") ? "text" : "prompt";
    if (!body.contains(key) || !body[key].is_string())
      throw bad_request("expected 'text' (or 'prompt'), a string, or 'messages'", key);
    ids = tok.encode(body[key].get<std::string>(), true);
  }
  out["ids"] = ids;
  out["tokens"] = ids;
  if (bool_field(body, "return_token_strs", false)) {  // vLLM's: the tokens' spellings (convert_ids_to_tokens)
    json strs = json::array();
    for (int32_t id : ids) strs.push_back(tok.token_string(id));
    out["token_strs"] = std::move(strs);
  }
  out["count"] = ids.size();
  return out;
}

json detokenize_body(const json& body, const text::Tokenizer& tok) {
  if (!body.is_object()) throw bad_request("expected a JSON object");
  const char* key = body.contains("ids") ? "ids" : "tokens";
  if (!body.contains(key) || !body[key].is_array()) throw bad_request("expected 'ids' (or 'tokens'), a list of token ids", key);
  std::vector<int32_t> ids;
  for (auto& x : body[key]) {
    if (!x.is_number_integer() || x.get<int64_t>() < 0 || x.get<int64_t>() > INT32_MAX)
      throw bad_request("'" + std::string(key) + "' must hold non-negative token ids, got " + x.dump(), key);
    ids.push_back(int32_t(x.get<int64_t>()));
  }
  if (body.contains("skip_special_tokens") && !body["skip_special_tokens"].is_boolean())
    throw bad_request("'skip_special_tokens' must be a boolean", "skip_special_tokens");
  std::string text;
  try {
    text = tok.decode(ids, bool_field(body, "skip_special_tokens", false));
  } catch (const Error& e) {
    throw bad_request(e.what(), key);
  }
  return {{"text", text}, {"prompt", text}};
}

}  // namespace ds::server
