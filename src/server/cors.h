// Cross-origin resource sharing (docs/server.md "CORS"), as vLLM's server answers it (FastAPI / Starlette's CORS
// middleware behind --allowed-origins, --allowed-methods, --allowed-headers, --allow-credentials; vLLM's defaults allow
// any origin, method and header, without credentials), so a browser page on another origin can call the API.
//
// A request with an Origin header gets Access-Control-Allow-Origin ("*" when any origin is allowed and the request
// carries no cookie, else the origin itself with "Vary: Origin", when it is allowed) and, with credentials,
// Access-Control-Allow-Credentials: true. A preflight (OPTIONS with Origin and Access-Control-Request-Method) is answered
// here, before routing and authentication (browsers send no credentials on it): 200 "OK", or 400 "Disallowed CORS
// origin, method, headers" naming what the policy refuses, with Allow-Methods, Allow-Headers (the requested ones where
// any is allowed), Max-Age 600.
#pragma once
#include <string>
#include <utility>
#include <vector>

namespace ds::server {

using HeaderList = std::vector<std::pair<std::string, std::string>>;

class CorsPolicy {
 public:
  // "*" in a list: any. Methods are compared as given (upper case), headers case-insensitively.
  CorsPolicy(std::vector<std::string> origins, std::vector<std::string> methods, std::vector<std::string> headers,
             bool credentials);

  // Headers to add to the response of a request from `origin` (an actual request, not a preflight).
  HeaderList response_headers(const std::string& origin, bool has_cookie) const;

  struct Preflight {
    int status = 200;
    HeaderList headers;
    std::string body;
  };
  // request_headers: the Access-Control-Request-Headers value (empty: none sent).
  Preflight preflight(const std::string& origin, const std::string& request_method,
                      const std::string& request_headers) const;

  bool origin_allowed(const std::string& origin) const;

 private:
  std::vector<std::string> origins_, methods_, headers_;  // headers_: lower case, the safelisted ones added
  bool any_origin_ = false, any_header_ = false, credentials_ = false;
};

}  // namespace ds::server
