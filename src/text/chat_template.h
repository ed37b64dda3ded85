// The model's chat template: loaded from the checkpoint directory, rendered with transformers'
// conventions (messages, tools, add_generation_prompt, bos_token/eos_token, extra kwargs such as
// enable_thinking / preserve_thinking) so prompts match `apply_chat_template` byte for byte.
#pragma once
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "text/jinja.h"

namespace ds {

class ChatTemplate {
 public:
  // `chat_template.jinja` in model_dir if present, else tokenizer_config.json's `chat_template` (a string,
  // or a list of {name, template} where "default" is taken). bos/eos come from tokenizer_config.json.
  static ChatTemplate load(const std::string& model_dir);
  // From source text; empty bos/eos leave `bos_token`/`eos_token` undefined in the template.
  static ChatTemplate from_source(const std::string& source, std::string bos_token = "",
                                  std::string eos_token = "");

  // messages: array of {role, content, ...}; tools: array or null; kwargs: object or null, its keys become
  // template variables (they may override the defaults above). Throws jinja::TemplateRaise (a ds::Error)
  // with the template's own raise_exception message, ds::Error otherwise.
  std::string render(const nlohmann::ordered_json& messages, const nlohmann::ordered_json& tools,
                     bool add_generation_prompt,
                     const nlohmann::ordered_json& kwargs = nlohmann::ordered_json::object()) const;

  // transformers' continue_final_message (add_generation_prompt off): the prompt ends inside the final message, right
  // after its text, so the model continues that message instead of closing it. As transformers 5 does it: a marker is
  // appended to the final message's text (its `content` string, or the last of its content parts with a `text`), the
  // conversation rendered, and the rendering cut at the marker's last occurrence — and right-stripped of whitespace
  // where the template trimmed the marker's trailing space (a template that trims the text). Throws ds::Error when
  // there is no final message or text to continue, or the template dropped the text.
  std::string render_continuing(const nlohmann::ordered_json& messages, const nlohmann::ordered_json& tools,
                                const nlohmann::ordered_json& kwargs = nlohmann::ordered_json::object()) const;

  const std::string& source() const { return source_; }
  const std::string& bos_token() const { return bos_token_; }
  const std::string& eos_token() const { return eos_token_; }

 private:
  std::string source_;
  std::string bos_token_, eos_token_;
  std::shared_ptr<const jinja::Template> tmpl_;
};

}  // namespace ds
