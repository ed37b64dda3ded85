#include "server/media.h"

#include <httplib.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>

#include "core/status.h"
#include "vision/image.h"

namespace ds::server {

namespace {

struct UrlParts {
  std::string origin;  // scheme://host[:port]
  std::string path;    // /path?query (at least "/")
};

UrlParts split_url(const std::string& url) {
  const size_t s = url.find("://");
  if (s == std::string::npos) fail("image: '", url.substr(0, 80), "' is not a URL");
  const size_t p = url.find_first_of("/?#", s + 3);
  UrlParts u;
  u.origin = url.substr(0, p);
  u.path = p == std::string::npos ? "/" : url.substr(p);
  if (!u.path.empty() && u.path[0] == '?') u.path = "/" + u.path;
  if (const size_t h = u.path.find('#'); h != std::string::npos) u.path.resize(h);
  if (u.path.empty()) u.path = "/";
  if (u.origin.size() <= s + 3) fail("image: URL '", url.substr(0, 80), "' has no host");
  return u;
}

std::string brief_url(const std::string& url) { return url.size() > 100 ? url.substr(0, 97) + "..." : url; }

}  // namespace

std::vector<uint8_t> fetch_url(const std::string& url0, size_t max_bytes, double timeout_s, int max_redirects,
                               const std::string& kind, const std::vector<std::string>& allowed_domains) {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s));
  const time_t sec = time_t(std::floor(timeout_s));
  const time_t usec = time_t((timeout_s - double(sec)) * 1e6);
  std::string url = url0;
  for (int hop = 0;; ++hop) {
    const UrlParts u = split_url(url);
    if (!allowed_domains.empty()) {
      // The host of scheme://[user@]host[:port], lower case (an IPv6 literal keeps its brackets).
      std::string host = u.origin.substr(u.origin.find("://") + 3);
      if (const size_t at = host.rfind('@'); at != std::string::npos) host = host.substr(at + 1);
      const size_t colon = host[0] == '[' ? host.find(']') + 1 : host.find(':');
      if (colon != std::string::npos && colon < host.size()) host = host.substr(0, colon);
      for (char& c : host) c = char(std::tolower(static_cast<unsigned char>(c)));
      if (std::find(allowed_domains.begin(), allowed_domains.end(), host) == allowed_domains.end())
        fail(kind, ": '", brief_url(url), "'", url == url0 ? "" : " (a redirect of '" + brief_url(url0) + "')",
             " is on host '", host, "', which --allowed-media-domains does not list");
    }
    httplib::Client cli(u.origin);
    if (!cli.is_valid()) fail(kind, ": cannot fetch '", brief_url(url), "' (unsupported URL)");
    cli.set_connection_timeout(sec, usec);
    cli.set_read_timeout(sec, usec);
    cli.set_follow_location(false);
    std::vector<uint8_t> body;
    std::string why;  // set when we cancel the transfer
    int status = 0;
    std::string location;
    auto res = cli.Get(
        u.path, httplib::Headers{{"Accept", kind == "video" ? "video/*" : "image/png, image/jpeg, image/webp"}},
        [&](const httplib::Response& r) {
          status = r.status;
          if (r.status >= 300 && r.status < 400) {
            location = r.get_header_value("Location");
            return true;
          }
          if (r.status != 200) return true;  // reported below with the status
          if (r.has_header("Content-Length")) {
            const std::string cl = r.get_header_value("Content-Length");
            char* end = nullptr;
            const unsigned long long n = std::strtoull(cl.c_str(), &end, 10);
            if (end && *end == '\0' && n > max_bytes) {
              why = "its Content-Length is " + cl + " bytes, more than the limit of " + std::to_string(max_bytes) + " bytes";
              return false;
            }
          }
          return true;
        },
        [&](const char* data, size_t n) {
          if (status != 200) return true;  // redirect or error body: ignored
          if (body.size() + n > max_bytes) {
            why = "it is larger than the limit of " + std::to_string(max_bytes) + " bytes";
            return false;
          }
          body.insert(body.end(), reinterpret_cast<const uint8_t*>(data), reinterpret_cast<const uint8_t*>(data) + n);
          if (Clock::now() > deadline) {
            why = "the transfer took longer than the limit of " + std::to_string(timeout_s) + " s";
            return false;
          }
          return true;
        });
    if (!why.empty()) fail(kind, ": fetching '", brief_url(url0), "' stopped: ", why);
    if (!res) {
      const auto e = res.error();
      if (e == httplib::Error::Read || e == httplib::Error::Connection)
        if (Clock::now() > deadline - std::chrono::milliseconds(50))
          fail(kind, ": fetching '", brief_url(url0), "' timed out after ", timeout_s, " s");
      const char* what = e == httplib::Error::Connection         ? "could not connect"
                         : e == httplib::Error::SSLConnection        ? "TLS handshake failed"
                         : e == httplib::Error::SSLServerVerification ? "the server's TLS certificate did not verify"
                         : e == httplib::Error::Read                  ? "the connection broke while reading"
                                                                      : "transfer error";
      fail(kind, ": fetching '", brief_url(url0), "' failed: ", what, " (", httplib::to_string(e), ")");
    }
    if (Clock::now() > deadline) fail(kind, ": fetching '", brief_url(url0), "' timed out after ", timeout_s, " s");
    if (status >= 300 && status < 400 && !location.empty()) {
      if (hop >= max_redirects) fail(kind, ": fetching '", brief_url(url0), "': more than ", max_redirects, " redirects");
      if (location.find("://") != std::string::npos) {
        if (location.rfind("http://", 0) != 0 && location.rfind("https://", 0) != 0)
          fail(kind, ": fetching '", brief_url(url0), "': redirect to a non-http(s) URL '", brief_url(location), "'");
        url = location;
      } else if (!location.empty() && location[0] == '/') {
        url = u.origin + location;
      } else {
        const size_t slash = u.path.rfind('/');
        url = u.origin + u.path.substr(0, slash + 1) + location;
      }
      continue;
    }
    if (status != 200) fail(kind, ": fetching '", brief_url(url0), "' returned HTTP ", status, " (expected 200)");
    return body;
  }
}

std::vector<uint8_t> read_media_bytes(const std::string& url, const MediaConfig& cfg, const std::string& kind) {
  const bool video = kind == "video";
  const size_t max_bytes = video ? cfg.max_video_bytes : cfg.max_image_bytes;
  if (url.rfind("http://", 0) == 0 || url.rfind("https://", 0) == 0) {
    if (!cfg.fetch_http)
      fail(kind, ": http(s) URLs are disabled on this server (--disable-image-fetch); send a data: URL instead");
    return fetch_url(url, max_bytes, cfg.fetch_timeout_s, cfg.max_redirects, kind, cfg.allowed_domains);
  }
  vision::SourcePolicy p;
  p.allowed_dirs = cfg.allowed_local_paths;
  p.limits.max_bytes = max_bytes;
  if (url.rfind("data:", 0) != 0 && url.find("://") == std::string::npos && url.rfind("file:", 0) != 0 &&
      cfg.allowed_local_paths.empty())
    fail(kind, ": expected a data:, http:// or https:// URL, got '", brief_url(url),
         "' (local files are served only from --allowed-local-media-path directories)");
  return video ? vision::read_video_bytes(url, p, max_bytes) : vision::read_image_bytes(url, p);
}

std::vector<PreparedVideo> load_videos(const std::vector<ImageRef>& videos, const MediaConfig& cfg,
                                       const vision::VideoConfig& vcfg) {
  if (int64_t(videos.size()) > cfg.max_videos_per_prompt)
    fail("at most ", cfg.max_videos_per_prompt, " video(s) per prompt are allowed (--limit-mm-per-prompt), got ",
         videos.size());
  vision::VideoLimits lim;
  lim.max_bytes = cfg.max_video_bytes;
  lim.max_pixels = cfg.max_image_pixels;
  lim.max_decoded_frames = cfg.max_video_frames;
  lim.max_sampled_frames = vcfg.sampling.max_frames;
  std::vector<PreparedVideo> out;
  for (auto& v : videos) {
    try {
      auto dec = vision::decode_video(read_media_bytes(v.url, cfg, "video"), vcfg.sampling, lim);
      PreparedVideo pv;
      pv.pixels = vision::preprocess_video(dec.frames, vcfg.p);
      pv.timestamps = vision::group_timestamps(dec.indices, dec.fps, vcfg.p.temporal_patch_size);
      out.push_back(std::move(pv));
    } catch (const Error& e) {
      fail(v.where, ": ", e.what());
    }
  }
  return out;
}

std::shared_ptr<runtime::MultiModalInput> prepare_images(const std::vector<ImageRef>& images, const MediaConfig& cfg,
                                                         const vision::PreprocessConfig& pcfg, int32_t image_token,
                                                         std::vector<int32_t>& tokens) {
  return prepare_media(images, {}, cfg, pcfg, image_token, -1, tokens);
}

std::shared_ptr<runtime::MultiModalInput> prepare_media(const std::vector<ImageRef>& images,
                                                        const std::vector<PreparedVideo>& videos, const MediaConfig& cfg,
                                                        const vision::PreprocessConfig& pcfg, int32_t image_token,
                                                        int32_t video_token, std::vector<int32_t>& tokens) {
  if (int64_t(images.size()) > cfg.max_images_per_prompt)
    fail("at most ", cfg.max_images_per_prompt, " images per prompt are allowed (--limit-mm-per-prompt), got ",
         images.size());
  int64_t pads = 0, vpads = 0, groups = 0;
  for (auto t : tokens) {
    pads += t == image_token;
    vpads += video_token >= 0 && t == video_token;
  }
  for (auto& v : videos) groups += v.pixels.grid.t;
  if (pads != int64_t(images.size()))
    fail("the prompt holds ", pads, " image placeholder tokens (<|image_pad|>) but the request has ", images.size(),
         " images; the text must not contain <|image_pad|> itself");
  if (vpads != groups)
    fail("the prompt holds ", vpads, " video placeholder tokens (<|video_pad|>) where its ", videos.size(),
         " video(s) need ", groups, " (one per temporal group); the text must not contain <|video_pad|> itself");
  vision::DecodeLimits lim;
  lim.max_bytes = cfg.max_image_bytes;
  lim.max_pixels = cfg.max_image_pixels;
  std::vector<vision::PixelValues> ipv;
  std::vector<vision::ImageGrid> grids, vgrids, units;
  for (auto& im : images) {
    try {
      auto bytes = read_media_bytes(im.url, cfg);
      ipv.push_back(vision::preprocess_image(vision::decode_image(bytes, lim), pcfg));
      grids.push_back(ipv.back().grid);
    } catch (const Error& e) {
      fail(im.where, ": ", e.what());
    }
  }
  tokens = vision::expand_image_placeholders(tokens, image_token, grids, pcfg.merge_size);
  for (auto& v : videos) {
    vgrids.push_back(v.pixels.grid);
    for (auto& u : vision::video_units(v.pixels.grid)) units.push_back(u);
  }
  if (!videos.empty()) tokens = vision::expand_image_placeholders(tokens, video_token, units, pcfg.merge_size);
  const int32_t vt = videos.empty() ? -1 : video_token;
  const auto L = vision::media_layout(tokens, image_token, grids, vt, vgrids, pcfg.merge_size);
  auto mm = std::make_shared<runtime::MultiModalInput>();
  for (auto [is_video, k] : L.order) {
    const auto& pv = is_video ? videos[size_t(k)].pixels : ipv[size_t(k)];
    mm->pixel_values.insert(mm->pixel_values.end(), pv.data.begin(), pv.data.end());
    mm->grids.push_back({pv.grid.t, pv.grid.h, pv.grid.w});
    mm->hashes.push_back(runtime::media_hash(pv.data.data(), pv.data.size(), mm->grids.back()));
  }
  auto mp = vision::mrope_positions(tokens, image_token, L.units, pcfg.merge_size, vt);
  mm->positions = std::move(mp.pos);
  mm->rope_delta = mp.rope_delta;
  for (size_t i = 0; i < tokens.size(); ++i)
    if (tokens[i] == image_token || (vt >= 0 && tokens[i] == vt)) mm->rows.push_back(int32_t(i));
  return mm;
}

namespace {
// The pixel-budget keys of one modality's config; true where `key` was one of them.
bool pixel_key(const std::string& key, const nlohmann::ordered_json& v, vision::PreprocessConfig& c,
               const std::string& where) {
  auto count = [&](const nlohmann::ordered_json& x, const std::string& w) {
    if (!x.is_number_integer() || x.get<int64_t>() < 1 || x.get<int64_t>() > (int64_t(1) << 40))
      fail(w, " must be a positive integer (a pixel count), got ", x.dump());
    return x.get<int64_t>();
  };
  if (key == "min_pixels") c.min_pixels = count(v, where);
  else if (key == "max_pixels") c.max_pixels = count(v, where);
  else if (key == "size") {
    if (!v.is_object()) fail(where, " must be {\"shortest_edge\": N, \"longest_edge\": N} (pixel counts), got ", v.dump());
    for (auto& [k, x] : v.items()) {
      if (k == "shortest_edge") c.min_pixels = count(x, where + "." + k);
      else if (k == "longest_edge") c.max_pixels = count(x, where + "." + k);
      else fail(where, ": unknown key '", k, "' (expected shortest_edge, longest_edge)");
    }
  } else {
    return false;
  }
  return true;
}

bool sampling_key(const std::string& key, const nlohmann::ordered_json& v, vision::VideoSampling& s,
                  const std::string& where) {
  if (key == "fps") {
    if (!v.is_number() || !(v.get<double>() > 0) || v.get<double>() > 240)
      fail(where, " must be a number in (0, 240], got ", v.dump());
    s.fps = v.get<double>();
  } else if (key == "min_frames" || key == "max_frames") {
    if (!v.is_number_integer() || v.get<int64_t>() < 1 || v.get<int64_t>() > 100000)
      fail(where, " must be a positive integer, got ", v.dump());
    (key == "min_frames" ? s.min_frames : s.max_frames) = v.get<int64_t>();
  } else {
    return false;
  }
  return true;
}
}  // namespace

void apply_mm_processor_kwargs(const nlohmann::ordered_json& kw, vision::PreprocessConfig& image,
                               vision::VideoConfig& video, const std::string& what) {
  if (kw.is_null()) return;
  if (!kw.is_object()) fail(what, " must be an object such as {\"max_pixels\": 1003520}, got ", kw.dump());
  for (auto& [key, v] : kw.items()) {
    const std::string where = what + "." + key;
    if (pixel_key(key, v, image, where) || sampling_key(key, v, video.sampling, where)) continue;
    if (key == "images_kwargs" || key == "videos_kwargs") {
      if (!v.is_object()) fail(where, " must be an object, got ", v.dump());
      for (auto& [k, x] : v.items()) {
        const std::string w = where + "." + k;
        const bool ok = key == "images_kwargs" ? pixel_key(k, x, image, w)
                                               : pixel_key(k, x, video.p, w) || sampling_key(k, x, video.sampling, w);
        if (!ok)
          fail(where, ": unknown key '", k, "' (expected ",
               key == "images_kwargs" ? "min_pixels, max_pixels, size" : "min_pixels, max_pixels, size, fps, min_frames, "
                                                                          "max_frames", ")");
      }
      continue;
    }
    fail(what, ": unknown key '", key, "' (expected min_pixels, max_pixels, size, fps, min_frames, max_frames, "
         "images_kwargs, videos_kwargs)");
  }
  if (image.min_pixels > image.max_pixels)
    fail(what, ": the images' min_pixels (", image.min_pixels, ") exceed their max_pixels (", image.max_pixels, ")");
  if (video.p.min_pixels > video.p.max_pixels)
    fail(what, ": the videos' min_pixels (", video.p.min_pixels, ") exceed their max_pixels (", video.p.max_pixels, ")");
  if (video.sampling.min_frames > video.sampling.max_frames)
    fail(what, ": min_frames (", video.sampling.min_frames, ") exceeds max_frames (", video.sampling.max_frames, ")");
}

}  // namespace ds::server
