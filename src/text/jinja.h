// A Jinja2-subset template engine, enough for Hugging Face chat templates (Qwen3.5/3.6 and the common
// ones): if/for/set/macro/filter blocks, namespace(), loop.*, filters, tests, raise_exception.
// Configured like transformers' chat-template environment: trim_blocks, lstrip_blocks, no autoescape,
// one trailing newline of the source dropped.
#pragma once
#include <memory>
#include <string>
#include <string_view>

#include "core/status.h"
#include "text/jinja_value.h"

namespace ds::jinja {

// Raised by the template's own raise_exception(msg): what() is exactly msg, so a server can answer 400
// with the template's words.
class TemplateRaise : public ds::Error {
 public:
  explicit TemplateRaise(const std::string& msg) : ds::Error(msg) {}
};

struct Options {
  bool trim_blocks = true;
  bool lstrip_blocks = true;
  bool keep_trailing_newline = false;
};

namespace detail {
struct Program;
}

class Template {
 public:
  // Parses once; throws ds::Error "template line L, column C: expected ..., got ..." on syntax errors.
  explicit Template(std::string_view source, Options options = {});

  // `vars` must be a dict (the top-level names); raise_exception, namespace, range, dict and
  // strftime_now are always available. Throws TemplateRaise for raise_exception, ds::Error (with the
  // template line/column) for other failures.
  std::string render(const Value& vars) const;

 private:
  std::shared_ptr<const detail::Program> program_;
};

}  // namespace ds::jinja
