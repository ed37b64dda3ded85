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

}  // namespace ds::server
