// Where image bytes come from: data: URLs (base64) and local files under an allow-list policy.
#include <algorithm>
#include <filesystem>
#include <fstream>

#include "core/status.h"
#include "vision/image.h"
#include "vision/video.h"

namespace ds::vision {

std::vector<uint8_t> base64_decode(std::string_view s) {
  auto val = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  std::vector<uint8_t> out;
  out.reserve(s.size() / 4 * 3 + 3);
  uint32_t acc = 0;
  int bits = 0, pad = 0;
  size_t nchars = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (c == ' ' || c == '\n' || c == '\r' || c == '\t') continue;
    if (c == '=') {
      ++pad;
      if (pad > 2) fail("base64: more than two '=' padding characters (offset ", i, ")");
      continue;
    }
    const int v = val(c);
    if (v < 0 || pad > 0)
      fail("base64: expected A-Z, a-z, 0-9, '+', '/' or trailing '=', found ",
           (c >= 32 && c < 127) ? std::string("'") + c + "'" : str_cat("byte 0x", std::hex, int(uint8_t(c))),
           " at offset ", i);
    acc = (acc << 6) | uint32_t(v);
    bits += 6;
    ++nchars;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(uint8_t((acc >> bits) & 0xFF));
    }
  }
  if (nchars % 4 == 1) fail("base64: ", nchars, " data characters is not a valid length (expected 4n, 4n+2 or 4n+3)");
  if (pad && (nchars + size_t(pad)) % 4 != 0)
    fail("base64: ", pad, " '=' after ", nchars, " data characters, expected padding to a multiple of 4");
  return out;
}

namespace {

std::vector<uint8_t> from_data_url(const std::string& url, const SourcePolicy& p, const std::string& kind) {
  const size_t comma = url.find(',');
  if (comma == std::string::npos) fail(kind, ": data URL without ',' (expected data:<type>;base64,<data>)");
  const std::string meta = url.substr(5, comma - 5);
  if (meta.size() < 7 || meta.compare(meta.size() - 7, 7, ";base64") != 0)
    fail(kind, ": data URL '", url.substr(0, std::min<size_t>(comma, 60)), ",…' is not base64 (expected ';base64')");
  const std::string type = meta.substr(0, meta.size() - 7);
  if (!type.empty() && type.rfind(kind + "/", 0) != 0)
    fail(kind, ": data URL media type '", type, "', expected ",
         kind == "image" ? "image/png, image/jpeg or image/webp" : "video/* (e.g. video/mp4, video/webm)");
  const size_t enc = url.size() - comma - 1;
  if (enc / 4 * 3 > p.limits.max_bytes + 3)
    fail(kind, ": data URL holds about ", enc / 4 * 3, " bytes, more than the limit of ", p.limits.max_bytes, " bytes");
  return base64_decode(std::string_view(url).substr(comma + 1));
}

bool inside(const std::filesystem::path& file, const std::filesystem::path& dir) {
  auto f = file.begin(), d = dir.begin();
  for (; d != dir.end(); ++d, ++f) {
    if (d->empty()) continue;  // trailing separator
    if (f == file.end() || *f != *d) return false;
  }
  return true;
}

std::vector<uint8_t> from_file(const std::string& path_str, const SourcePolicy& p, const std::string& kind) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path path = fs::canonical(fs::path(path_str), ec);
  if (ec) fail(kind, ": cannot open '", path_str, "': ", ec.message());
  if (!p.allow_any_file) {
    bool ok = false;
    for (auto& d : p.allowed_dirs) {
      fs::path cd = fs::canonical(fs::path(d), ec);
      if (!ec && inside(path, cd)) ok = true;
    }
    if (!ok)
      fail(kind, ": local file '", path_str, "' is not inside an allowed directory",
           p.allowed_dirs.empty() ? " (local files are disabled)" : "");
  }
  if (!fs::is_regular_file(path, ec)) fail(kind, ": '", path_str, "' is not a regular file");
  const auto size = fs::file_size(path, ec);
  if (ec) fail(kind, ": cannot stat '", path_str, "': ", ec.message());
  if (size > p.limits.max_bytes)
    fail(kind, ": '", path_str, "' has ", size, " bytes, more than the limit of ", p.limits.max_bytes, " bytes");
  std::ifstream f(path, std::ios::binary);
  std::vector<uint8_t> buf(static_cast<size_t>(size));
  if (!f.read(reinterpret_cast<char*>(buf.data()), std::streamsize(size))) fail(kind, ": cannot read '", path_str, "'");
  return buf;
}

}  // namespace

namespace {
std::vector<uint8_t> read_bytes(const std::string& ref, const SourcePolicy& p, const std::string& kind) {
  if (ref.rfind("data:", 0) == 0) return from_data_url(ref, p, kind);
  if (ref.rfind("http://", 0) == 0 || ref.rfind("https://", 0) == 0)
    fail(kind, ": http(s) URLs are not read here (got '", ref.substr(0, 80),
         "'); the server fetches them (server/media.h)");
  if (ref.rfind("file://", 0) == 0) return from_file(ref.substr(7), p, kind);
  if (ref.find("://") != std::string::npos)
    fail(kind, ": unsupported URL scheme in '", ref.substr(0, 80), "' (expected data:, file:// or a path)");
  return from_file(ref, p, kind);
}
}  // namespace

std::vector<uint8_t> read_image_bytes(const std::string& ref, const SourcePolicy& p) {
  return read_bytes(ref, p, "image");
}

std::vector<uint8_t> read_video_bytes(const std::string& ref, const SourcePolicy& policy, size_t max_bytes) {
  SourcePolicy p = policy;
  p.limits.max_bytes = max_bytes;
  return read_bytes(ref, p, "video");
}

Image load_image(const std::string& ref, const SourcePolicy& p) {
  auto bytes = read_image_bytes(ref, p);
  return decode_image(bytes, p.limits);
}

}  // namespace ds::vision
