// tokenize / detokenize: one JSON object on stdin, one on stdout (the bodies of /tokenize and /detokenize).
#include <cstdio>
#include <iostream>
#include <iterator>
#include <memory>
#include <nlohmann/json.hpp>

#include "cli/args.h"
#include "cli/commands.h"
#include "server/http_error.h"
#include "server/tokenize_api.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"

namespace ds::cli {

namespace {

int run_text_command(int argc, char** argv, bool tokenize) {
  using json = nlohmann::ordered_json;
  auto error = [](const std::string& msg, const char* type) {
    json e = {{"error", {{"message", msg}, {"type", type}}}};
    std::printf("%s\n", e.dump(-1, ' ', false, json::error_handler_t::replace).c_str());
    return 1;
  };
  try {
    Args a(argc, argv, 2);
    a.only(tokenize ? "tokenize" : "detokenize", {});
    std::string dir = a.model_dir();
    std::string input((std::istreambuf_iterator<char>(std::cin)), {});
    json body = json::parse(input, nullptr, false);
    if (body.is_discarded()) return error("stdin is not valid JSON", "BadRequestError");
    auto tok = text::Tokenizer::load(dir);
    json out;
    if (tokenize) {
      std::unique_ptr<ChatTemplate> tmpl;
      if (body.is_object() && body.contains("messages")) tmpl = std::make_unique<ChatTemplate>(ChatTemplate::load(dir));
      out = server::tokenize_body(body, tok, tmpl.get());
    } else {
      out = server::detokenize_body(body, tok);
    }
    std::printf("%s\n", out.dump(-1, ' ', false, json::error_handler_t::replace).c_str());
    return 0;
  } catch (const server::HttpError& e) {
    return error(e.what(), "BadRequestError");
  } catch (const Error& e) {
    return error(e.what(), "Error");
  }
}

}  // namespace

int cmd_tokenize(int argc, char** argv) { return run_text_command(argc, argv, true); }
int cmd_detokenize(int argc, char** argv) { return run_text_command(argc, argv, false); }

}  // namespace ds::cli
