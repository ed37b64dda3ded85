// The bodies of /tokenize and /detokenize, shared by the HTTP routes and the CLI commands.
#pragma once
#include <nlohmann/json.hpp>

#include "server/http_error.h"

namespace ds {
class ChatTemplate;
namespace text {
class Tokenizer;
}
}  // namespace ds

namespace ds::server {

// {"text"|"prompt": "..."} or {"messages": [...], "tools", "add_generation_prompt", "continue_final_message", "chat_template_kwargs"},
// optional "add_special_tokens" (no effect for this family: it adds no BOS/EOS) and "return_token_strs" (vLLM's) ->
// {"ids", "tokens", ["token_strs": each token's tokenizer.json spelling], "count", ["prompt": rendered text]}.
// Throws HttpError 400.
nlohmann::ordered_json tokenize_body(const nlohmann::ordered_json& body, const text::Tokenizer& tok,
                                     const ChatTemplate* tmpl);
// {"ids"|"tokens": [...], "skip_special_tokens": false} -> {"text", "prompt"}. Throws HttpError 400.
nlohmann::ordered_json detokenize_body(const nlohmann::ordered_json& body, const text::Tokenizer& tok);

}  // namespace ds::server
