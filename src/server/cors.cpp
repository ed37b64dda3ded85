// CORS policy. See cors.h.
#include "server/cors.h"

#include <algorithm>
#include <cctype>
#include <set>

namespace ds::server {

namespace {

std::string lower(std::string s) {
  for (char& c : s) c = char(std::tolower(uint8_t(c)));
  return s;
}
std::string trim(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e && std::isspace(uint8_t(s[b]))) ++b;
  while (e > b && std::isspace(uint8_t(s[e - 1]))) --e;
  return s.substr(b, e - b);
}
std::string join(const std::vector<std::string>& v) {
  std::string o;
  for (auto& x : v) o += (o.empty() ? "" : ", ") + x;
  return o;
}
bool has(const std::vector<std::string>& v, const std::string& x) { return std::find(v.begin(), v.end(), x) != v.end(); }

}  // namespace

CorsPolicy::CorsPolicy(std::vector<std::string> origins, std::vector<std::string> methods,
                       std::vector<std::string> headers, bool credentials)
    : origins_(std::move(origins)), credentials_(credentials) {
  any_origin_ = has(origins_, "*");
  methods_ = has(methods, "*") ? std::vector<std::string>{"DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"}
                               : methods;
  any_header_ = has(headers, "*");
  // The CORS-safelisted request headers are always allowed.
  std::set<std::string> h{"accept", "accept-language", "content-language", "content-type"};
  for (auto& x : headers)
    if (x != "*") h.insert(lower(x));
  headers_.assign(h.begin(), h.end());
}

bool CorsPolicy::origin_allowed(const std::string& origin) const { return any_origin_ || has(origins_, origin); }

HeaderList CorsPolicy::response_headers(const std::string& origin, bool has_cookie) const {
  HeaderList out;
  const bool explicit_origin = (any_origin_ && has_cookie) || (!any_origin_ && origin_allowed(origin));
  if (explicit_origin) {
    out.emplace_back("Access-Control-Allow-Origin", origin);
    out.emplace_back("Vary", "Origin");
  } else if (any_origin_) {
    out.emplace_back("Access-Control-Allow-Origin", "*");
  }
  if (credentials_) out.emplace_back("Access-Control-Allow-Credentials", "true");
  return out;
}

CorsPolicy::Preflight CorsPolicy::preflight(const std::string& origin, const std::string& request_method,
                                            const std::string& request_headers) const {
  Preflight p;
  // An explicit origin where the policy lists origins or sends credentials (a "*" is not allowed with them).
  const bool explicit_origin = !any_origin_ || credentials_;
  if (explicit_origin) p.headers.emplace_back("Vary", "Origin");
  else p.headers.emplace_back("Access-Control-Allow-Origin", "*");
  p.headers.emplace_back("Access-Control-Allow-Methods", join(methods_));
  p.headers.emplace_back("Access-Control-Max-Age", "600");
  if (!any_header_) p.headers.emplace_back("Access-Control-Allow-Headers", join(headers_));
  if (credentials_) p.headers.emplace_back("Access-Control-Allow-Credentials", "true");
  std::vector<std::string> failures;
  if (origin_allowed(origin)) {
    if (explicit_origin) p.headers.emplace_back("Access-Control-Allow-Origin", origin);
  } else {
    failures.push_back("origin");
  }
  if (!has(methods_, request_method)) failures.push_back("method");
  if (!request_headers.empty()) {
    if (any_header_) {
      p.headers.emplace_back("Access-Control-Allow-Headers", request_headers);
    } else {
      size_t b = 0;
      while (b <= request_headers.size()) {
        size_t e = request_headers.find(',', b);
        if (e == std::string::npos) e = request_headers.size();
        const std::string h = lower(trim(request_headers.substr(b, e - b)));
        if (!h.empty() && !has(headers_, h)) {
          failures.push_back("headers");
          break;
        }
        b = e + 1;
      }
    }
  }
  if (failures.empty()) {
    p.body = "OK";
  } else {
    p.status = 400;
    p.body = "Disallowed CORS " + join(failures);
  }
  return p;
}

}  // namespace ds::server
