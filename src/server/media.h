// Images in chat requests: where their bytes may come from (data: URLs, http(s) with size and time limits,
// local files under allow-listed directories), the per-request limits, and the turn from a rendered,
// tokenized prompt with one <|image_pad|> per image into the engine's MultiModalInput (docs/server.md).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/engine.h"
#include "vision/preprocess.h"
#include "vision/video.h"

namespace ds::server {

struct MediaConfig {
  int64_t max_images_per_prompt = 8;          // --limit-mm-per-prompt '{"image": N}'
  int64_t max_videos_per_prompt = 1;          // --limit-mm-per-prompt '{"video": M}'
  size_t max_video_bytes = size_t(64) << 20;  // --max-video-bytes: encoded size, from any source
  int64_t max_video_frames = 36000;           // --max-video-frames: frames in the stream (decoded to count them)
  int64_t max_image_pixels = int64_t(1) << 26;  // --max-image-pixels: width·height of one decoded image or frame
  size_t max_image_bytes = size_t(32) << 20;    // --max-image-bytes: encoded size, from any source
  bool fetch_http = true;                       // --disable-image-fetch turns http(s) URLs off
  double fetch_timeout_s = 10.0;                // --image-fetch-timeout: connect + read, whole transfer
  int max_redirects = 3;
  std::vector<std::string> allowed_local_paths; // --allowed-local-media-path (repeatable); none = no local files
  // vLLM's --allowed-media-domains: the only hosts (lower case, exact) http(s) URLs and their redirects may name;
  // empty = any host.
  std::vector<std::string> allowed_domains;
};

// One image part of a chat request, in conversation order.
struct ImageRef {
  std::string url;
  std::string where;  // "messages[1].content[0]" for error messages
};

// Downloads an http(s) URL with cpp-httplib's client: status 200 only, at most `max_bytes` (from
// Content-Length and while streaming), the whole transfer within `timeout_s`, up to `max_redirects` redirects.
// Errors are ds::Error naming the URL and what went wrong.
// `kind` ("image" or "video") prefixes the messages and picks the Accept header.
// `allowed_domains` (MediaConfig's): non-empty, a URL or redirect to another host is refused before connecting.
std::vector<uint8_t> fetch_url(const std::string& url, size_t max_bytes, double timeout_s, int max_redirects,
                               const std::string& kind = "image", const std::vector<std::string>& allowed_domains = {});

// Encoded bytes of one image: data: URL, http(s) (when enabled), or a local file (file:// or path) under an
// allowed directory.
// `kind` "video": data:video/* URLs and the video byte limit.
std::vector<uint8_t> read_media_bytes(const std::string& url, const MediaConfig& cfg, const std::string& kind = "image");

// One video of a request, decoded (the reference's frame sampling), preprocessed, with its temporal groups'
// timestamps for the prompt text (vision::expand_video_text).
struct PreparedVideo {
  vision::PixelValues pixels;
  std::vector<double> timestamps;
};
// Loads every video_url part (limits: count, bytes, frames; sampling and sizes from video_preprocessor_config.json).
// Errors are ds::Error prefixed with the part.
std::vector<PreparedVideo> load_videos(const std::vector<ImageRef>& videos, const MediaConfig& cfg,
                                       const vision::VideoConfig& vcfg);

// Loads, decodes and preprocesses every image, expands the placeholders of `tokens` in place and returns the
// engine's input. `image_token` is <|image_pad|>'s id; the prompt must hold exactly one per image. Errors are
// ds::Error (the caller answers 400), each prefixed with the part it concerns.
// prepare_images with videos too: `tokens` come from text expanded by vision::expand_video_text (one <|video_pad|>
// per temporal group, each between its own vision_start/end); each pad gets h·w/merge² copies. Images and videos
// may interleave; pixel values and feature rows follow the prompt order.
std::shared_ptr<runtime::MultiModalInput> prepare_media(const std::vector<ImageRef>& images,
                                                        const std::vector<PreparedVideo>& videos, const MediaConfig& cfg,
                                                        const vision::PreprocessConfig& pcfg, int32_t image_token,
                                                        int32_t video_token, std::vector<int32_t>& tokens);
// vLLM's mm_processor_kwargs (the Qwen-VL processors' keyword arguments; the server's --mm-processor-kwargs and a
// request's field) over the image and video preprocessing the model's configs give:
//   images: min_pixels, max_pixels, size {shortest_edge, longest_edge} (pixel counts, as in preprocessor_config.json),
//           also under images_kwargs;
//   videos: fps, min_frames, max_frames at the top, and under videos_kwargs those and the clip's pixel budget
//           (min_pixels, max_pixels, size).
// Throws ds::Error naming `what` + the key for an unknown key, a wrong type or value, or min above max.
void apply_mm_processor_kwargs(const nlohmann::ordered_json& kw, vision::PreprocessConfig& image,
                               vision::VideoConfig& video, const std::string& what);
std::shared_ptr<runtime::MultiModalInput> prepare_images(const std::vector<ImageRef>& images, const MediaConfig& cfg,
                                                         const vision::PreprocessConfig& pcfg, int32_t image_token,
                                                         std::vector<int32_t>& tokens);

}  // namespace ds::server
