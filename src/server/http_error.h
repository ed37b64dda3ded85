// Errors returned to HTTP clients in OpenAI's JSON schema.
#pragma once
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>

namespace ds::server {

// Thrown while handling a request; becomes {"error": {message, type, param, code}} with `status`.
class HttpError : public std::runtime_error {
 public:
  HttpError(int status, std::string message, std::string param = "", std::string type = "")
      : std::runtime_error(message), status(status), param(std::move(param)), type(std::move(type)) {
    if (this->type.empty()) this->type = default_type(status);
  }
  int status;
  std::string param, type;

  nlohmann::json body() const {
    nlohmann::json e = {{"message", what()}, {"type", type}, {"param", param.empty() ? nlohmann::json(nullptr) : nlohmann::json(param)},
                        {"code", status}};
    return {{"error", e}};
  }

  static std::string default_type(int status) {
    switch (status) {
      case 400: return "BadRequestError";
      case 401: return "AuthenticationError";
      case 404: return "NotFoundError";
      case 413: return "RequestTooLargeError";
      case 429: return "RateLimitError";
      case 503: return "ServiceUnavailableError";
      default: return status >= 500 ? "InternalServerError" : "BadRequestError";
    }
  }
};

inline HttpError bad_request(const std::string& msg, const std::string& param = "") { return HttpError(400, msg, param); }

// j[key] when it is a string, else `def` (missing, null or another type): for comparisons on client JSON, where
// nlohmann's value() would throw a type error (a 500) on a wrong type.
template <typename J>
std::string str_or(const J& j, const char* key, const std::string& def = "") {
  if (!j.is_object()) return def;
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->template get<std::string>() : def;
}

// body[key] as a boolean, `def` when missing or null; any other type is a 400 naming the key.
template <typename J>
bool bool_field(const J& body, const char* key, bool def) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return def;
  if (!it->is_boolean()) {
    std::string v = it->dump(-1, ' ', false, J::error_handler_t::replace);
    if (v.size() > 120) v = v.substr(0, 117) + "...";
    throw bad_request(std::string("'") + key + "' must be a boolean, got " + v, key);
  }
  return it->template get<bool>();
}

}  // namespace ds::server
