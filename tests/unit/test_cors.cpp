// The CORS policy (server/cors.h) against the behaviour of the middleware vLLM's server runs (Starlette's
// CORSMiddleware, as documented: simple responses, preflights, explicit origins with credentials or cookies).
#include <gtest/gtest.h>

#include "server/cors.h"

namespace ds::server {
namespace {

std::string header(const HeaderList& h, const std::string& k) {
  std::string v;
  int n = 0;
  for (auto& [a, b] : h)
    if (a == k) v = b, ++n;
  EXPECT_LE(n, 1) << k << " set twice";
  return n ? v : "(none)";
}

TEST(Cors, DefaultsAllowAnyOriginWithoutCredentials) {
  const CorsPolicy p({"*"}, {"*"}, {"*"}, false);
  auto h = p.response_headers("https://app.example", false);
  EXPECT_EQ(header(h, "Access-Control-Allow-Origin"), "*");
  EXPECT_EQ(header(h, "Vary"), "(none)");
  EXPECT_EQ(header(h, "Access-Control-Allow-Credentials"), "(none)");
  // A request with cookies gets its origin back, never "*".
  h = p.response_headers("https://app.example", true);
  EXPECT_EQ(header(h, "Access-Control-Allow-Origin"), "https://app.example");
  EXPECT_EQ(header(h, "Vary"), "Origin");
  // Preflight: any method of the list, the requested headers mirrored.
  const auto f = p.preflight("https://app.example", "POST", "authorization, content-type, x-stainless-os");
  EXPECT_EQ(f.status, 200);
  EXPECT_EQ(f.body, "OK");
  EXPECT_EQ(header(f.headers, "Access-Control-Allow-Origin"), "*");
  EXPECT_EQ(header(f.headers, "Access-Control-Allow-Methods"), "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT");
  EXPECT_EQ(header(f.headers, "Access-Control-Allow-Headers"), "authorization, content-type, x-stainless-os");
  EXPECT_EQ(header(f.headers, "Access-Control-Max-Age"), "600");
}

TEST(Cors, ListedOriginsMethodsAndHeaders) {
  const CorsPolicy p({"https://a.example", "http://localhost:3000"}, {"GET", "POST"}, {"Authorization"}, true);
  auto h = p.response_headers("http://localhost:3000", false);
  EXPECT_EQ(header(h, "Access-Control-Allow-Origin"), "http://localhost:3000");
  EXPECT_EQ(header(h, "Vary"), "Origin");
  EXPECT_EQ(header(h, "Access-Control-Allow-Credentials"), "true");
  h = p.response_headers("https://evil.example", false);
  EXPECT_EQ(header(h, "Access-Control-Allow-Origin"), "(none)") << "an origin not listed gets no allow-origin";
  auto f = p.preflight("https://a.example", "POST", "Authorization, Content-Type");
  EXPECT_EQ(f.status, 200) << f.body;
  EXPECT_EQ(header(f.headers, "Access-Control-Allow-Origin"), "https://a.example");
  EXPECT_EQ(header(f.headers, "Access-Control-Allow-Methods"), "GET, POST");
  EXPECT_EQ(header(f.headers, "Access-Control-Allow-Headers"),
            "accept, accept-language, authorization, content-language, content-type");
  EXPECT_EQ(header(f.headers, "Access-Control-Allow-Credentials"), "true");
  f = p.preflight("https://evil.example", "PUT", "x-other");
  EXPECT_EQ(f.status, 400);
  EXPECT_EQ(f.body, "Disallowed CORS origin, method, headers");
  EXPECT_EQ(header(f.headers, "Access-Control-Allow-Origin"), "(none)");
  f = p.preflight("https://a.example", "POST", "");
  EXPECT_EQ(f.status, 200) << "no requested headers";
  // Any origin with credentials: explicit origins (a "*" cannot carry credentials).
  const CorsPolicy c({"*"}, {"*"}, {"*"}, true);
  f = c.preflight("https://x.example", "GET", "");
  EXPECT_EQ(header(f.headers, "Access-Control-Allow-Origin"), "https://x.example");
  EXPECT_EQ(header(f.headers, "Vary"), "Origin");
  EXPECT_EQ(header(c.response_headers("https://x.example", false), "Access-Control-Allow-Origin"), "*");
}

}  // namespace
}  // namespace ds::server
