// Image sources and limits of the server (server/media.h): http(s) fetching against a real local httplib
// server (status, size, time and redirect limits), local-file policy, per-prompt image count, pixel budget,
// placeholder count, and the serve flags that set them.
#include <gtest/gtest.h>
#include <httplib.h>

#include <chrono>
#include <fstream>
#include <thread>

#include "core/status.h"
#include "golden_util.h"
#include "server/media.h"
#include "vision/image.h"
#include "vision/video.h"

namespace ds::server {
namespace {

#define EXPECT_ERROR(stmt, needle)                                                                   \
  do {                                                                                               \
    try {                                                                                            \
      stmt;                                                                                          \
      ADD_FAILURE() << #stmt << " did not throw; expected an error containing '" << (needle) << "'"; \
    } catch (const Error& e) {                                                                       \
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();                 \
    }                                                                                                \
  } while (0)

std::string png_path() { return test::data_dir() + "/tiny-moe/image.png"; }

std::string png_bytes() {
  std::ifstream f(png_path(), std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), {});
}

std::string base64(const std::string& s) {
  static const char* A = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  size_t i = 0;
  for (; i + 2 < s.size(); i += 3) {
    uint32_t v = (uint8_t(s[i]) << 16) | (uint8_t(s[i + 1]) << 8) | uint8_t(s[i + 2]);
    for (int k = 3; k >= 0; --k) out += A[(v >> (6 * k)) & 63];
  }
  if (i + 1 == s.size()) {
    uint32_t v = uint8_t(s[i]) << 16;
    out += A[(v >> 18) & 63], out += A[(v >> 12) & 63], out += "==";
  } else if (i + 2 == s.size()) {
    uint32_t v = (uint8_t(s[i]) << 16) | (uint8_t(s[i + 1]) << 8);
    out += A[(v >> 18) & 63], out += A[(v >> 12) & 63], out += A[(v >> 6) & 63], out += "=";
  }
  return out;
}

// A real HTTP server on a loopback port for the fetch tests.
struct LocalHttp {
  httplib::Server svr;
  std::thread th;
  int port = 0;
  LocalHttp() {
    const std::string png = png_bytes();
    svr.Get("/image.png", [png](const httplib::Request&, httplib::Response& r) { r.set_content(png, "image/png"); });
    svr.Get("/missing.png", [](const httplib::Request&, httplib::Response& r) { r.status = 404; });
    svr.Get("/redirect", [](const httplib::Request&, httplib::Response& r) { r.set_redirect("/image.png"); });
    svr.Get("/loop", [](const httplib::Request&, httplib::Response& r) { r.set_redirect("/loop"); });
    svr.Get("/slow.png", [png](const httplib::Request&, httplib::Response& r) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1500));
      r.set_content(png, "image/png");
    });
    // Streams without a Content-Length: the size limit must hold while reading.
    svr.Get("/endless", [](const httplib::Request&, httplib::Response& r) {
      r.set_chunked_content_provider("image/png", [](size_t, httplib::DataSink& sink) {
        std::string block(64 << 10, 'x');
        return sink.write(block.data(), block.size());
      });
    });
    std::ifstream clip(test::data_dir() + "/vision/clip_80x48_10fps.mp4", std::ios::binary);
    const std::string mp4((std::istreambuf_iterator<char>(clip)), {});
    svr.Get("/clip.mp4", [mp4](const httplib::Request&, httplib::Response& r) { r.set_content(mp4, "video/mp4"); });
    port = svr.bind_to_any_port("127.0.0.1");
    th = std::thread([this] { svr.listen_after_bind(); });
    while (!svr.is_running()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ~LocalHttp() {
    svr.stop();
    th.join();
  }
  std::string url(const std::string& p) const { return "http://127.0.0.1:" + std::to_string(port) + p; }
};

LocalHttp& http() {
  static LocalHttp h;
  return h;
}

TEST(Media, FetchesOverHttp) {
  auto bytes = fetch_url(http().url("/image.png"), 1 << 20, 5.0, 3);
  EXPECT_EQ(std::string(bytes.begin(), bytes.end()), png_bytes());
  auto via = fetch_url(http().url("/redirect"), 1 << 20, 5.0, 3);
  EXPECT_EQ(via.size(), png_bytes().size());
  MediaConfig c;
  auto img = vision::decode_image(read_media_bytes(http().url("/image.png"), c));
  EXPECT_EQ(img.width, 200);
  EXPECT_EQ(img.height, 120);
}

TEST(Media, FetchLimits) {
  EXPECT_ERROR(fetch_url(http().url("/missing.png"), 1 << 20, 5.0, 3), "returned HTTP 404 (expected 200)");
  EXPECT_ERROR(fetch_url(http().url("/image.png"), 100, 5.0, 3), "more than the limit of 100 bytes");
  EXPECT_ERROR(fetch_url(http().url("/endless"), 1 << 20, 5.0, 3), "larger than the limit of 1048576 bytes");
  EXPECT_ERROR(fetch_url(http().url("/loop"), 1 << 20, 5.0, 3), "more than 3 redirects");
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_ERROR(fetch_url(http().url("/slow.png"), 1 << 20, 0.3, 3), "timed out after 0.3 s");
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(1400));
  // Nothing listens on port 1.
  EXPECT_ERROR(fetch_url("http://127.0.0.1:1/x.png", 1 << 20, 2.0, 3), "failed: could not connect");
  MediaConfig off;
  off.fetch_http = false;
  EXPECT_ERROR(read_media_bytes(http().url("/image.png"), off), "http(s) URLs are disabled on this server");
}

TEST(Media, VideosOverHttp) {
  if (!vision::video_decoding_available()) GTEST_SKIP() << "built with -DDS_WITH_VIDEO=OFF";
  MediaConfig c;
  const auto vcfg = vision::load_video_config(test::data_dir() + "/tiny-moe/tiny-moe-bf16");
  auto v = load_videos({{http().url("/clip.mp4"), "messages[0].content[0]"}}, c, vcfg);
  ASSERT_EQ(v.size(), 1u);
  EXPECT_EQ(v[0].pixels.grid.t, 3);
  EXPECT_EQ(v[0].timestamps.size(), 3u);
  c.max_video_bytes = 1000;
  EXPECT_ERROR(load_videos({{http().url("/clip.mp4"), "messages[0].content[0]"}}, c, vcfg),
               "messages[0].content[0]: video: fetching '");
  c = {};
  c.fetch_http = false;
  EXPECT_ERROR(load_videos({{http().url("/clip.mp4"), "messages[0].content[3]"}}, c, vcfg),
               "messages[0].content[3]: video: http(s) URLs are disabled");
}

TEST(Media, LocalFilesOnlyUnderAllowedDirectories) {
  MediaConfig c;
  EXPECT_ERROR(read_media_bytes(png_path(), c), "local files are served only from --allowed-local-media-path");
  EXPECT_ERROR(read_media_bytes("file://" + png_path(), c), "not inside an allowed directory");
  c.allowed_local_paths = {test::data_dir() + "/tiny-dense"};
  EXPECT_ERROR(read_media_bytes(png_path(), c), "not inside an allowed directory");
  EXPECT_ERROR(read_media_bytes(test::data_dir() + "/tiny-dense/../tiny-moe/image.png", c), "not inside an allowed directory");
  c.allowed_local_paths = {test::data_dir() + "/tiny-moe"};
  EXPECT_EQ(read_media_bytes(png_path(), c).size(), png_bytes().size());
  EXPECT_EQ(read_media_bytes("file://" + png_path(), c).size(), png_bytes().size());
  EXPECT_ERROR(read_media_bytes("ftp://example.com/a.png", c), "unsupported URL scheme");
}

struct Prep {
  vision::PreprocessConfig pcfg = vision::load_preprocess_config(test::data_dir() + "/tiny-moe/tiny-moe-int4");
  static constexpr int32_t kPad = 1996;
};

TEST(Media, PrepareImagesExpandsAndLaysOut) {
  Prep p;
  MediaConfig c;
  const std::string url = "data:image/png;base64," + base64(png_bytes());
  std::vector<int32_t> toks = {10, Prep::kPad, 11, Prep::kPad, 12};
  auto mm = prepare_images({{url, "a"}, {http().url("/image.png"), "b"}}, c, p.pcfg, Prep::kPad, toks);
  ASSERT_EQ(mm->grids.size(), 2u);
  EXPECT_EQ(mm->grids[0], (std::array<int64_t, 3>{1, 14, 22}));
  EXPECT_EQ(toks.size(), 3u + 2 * 77);
  EXPECT_EQ(mm->rows.size(), 154u);
  EXPECT_EQ(mm->rows.front(), 1);
  EXPECT_EQ(mm->rows[77], 1 + 77 + 1);
  EXPECT_EQ(mm->positions.size(), 3 * toks.size());
  EXPECT_EQ(mm->pixel_values.size(), size_t(2 * 14 * 22 * p.pcfg.patch_dim()));
}

TEST(Media, PrepareImagesRejectsBadInput) {
  Prep p;
  MediaConfig c;
  const std::string png = png_bytes();
  auto url = [](const std::string& b) { return "data:image/png;base64," + base64(b); };
  auto run = [&](std::vector<ImageRef> imgs, std::vector<int32_t> toks, const MediaConfig& cfg) {
    prepare_images(imgs, cfg, p.pcfg, Prep::kPad, toks);
  };
  const std::vector<int32_t> one = {5, Prep::kPad, 6};
  EXPECT_ERROR(run({{url(png.substr(0, png.size() / 2)), "messages[0].content[1]"}}, one, c),
               "messages[0].content[1]: image: ");
  std::string corrupt = png;
  for (size_t i = 100; i < 200; ++i) corrupt[i] = char(corrupt[i] ^ 0x5a);
  EXPECT_ERROR(run({{url(corrupt), "x"}}, one, c), "x: image: ");
  EXPECT_ERROR(run({{"data:image/png;base64,", "x"}}, one, c), "empty data (0 bytes)");
  EXPECT_ERROR(run({{url("GIF89a\x01\x00\x01\x00"), "x"}}, one, c), "unsupported format (GIF)");
  EXPECT_ERROR(run({{"data:image/png;base64,@@@@", "x"}}, one, c), "base64");
  EXPECT_ERROR(run({{"data:text/plain;base64,QUJD", "x"}}, one, c), "media type 'text/plain'");
  MediaConfig small = c;
  small.max_image_pixels = 200 * 120 - 1;
  EXPECT_ERROR(run({{url(png), "x"}}, one, small), "x: image: ");
  small = c;
  small.max_images_per_prompt = 1;
  EXPECT_ERROR(run({{url(png), "x"}, {url(png), "y"}}, {Prep::kPad, Prep::kPad}, small),
               "at most 1 images per prompt are allowed (--limit-mm-per-prompt), got 2");
  EXPECT_ERROR(run({{url(png), "x"}}, {Prep::kPad, 3, Prep::kPad}, c),
               "the prompt holds 2 image placeholder tokens (<|image_pad|>) but the request has 1 images");
  EXPECT_ERROR(run({{png_path(), "x"}}, one, c), "x: image: expected a data:, http:// or https:// URL");
}

TEST(Media, PixelBudgetMessageNamesTheLimit) {
  Prep p;
  MediaConfig c;
  c.max_image_pixels = 1000;
  std::vector<int32_t> toks = {Prep::kPad};
  try {
    prepare_images({{"data:image/png;base64," + base64(png_bytes()), "m"}}, c, p.pcfg, Prep::kPad, toks);
    ADD_FAILURE() << "accepted a 200x120 image under a 1000-pixel budget";
  } catch (const Error& e) {
    const std::string w = e.what();
    EXPECT_NE(w.find("1000"), std::string::npos) << w;
    EXPECT_NE(w.find("200"), std::string::npos) << w;
  }
}

TEST(Media, ServeFlagsAreChecked) {
  const std::string model = test::data_dir() + "/tiny-moe/tiny-moe-int4";
  auto r = test::run_binary("serve " + model + " --port 0 --limit-mm-per-prompt '{\"audio\": 1}'");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find("--limit-mm-per-prompt: unknown modality 'audio' (expected image, video)"), std::string::npos) << r.out;
  r = test::run_binary("serve " + model + " --port 0 --limit-mm-per-prompt 4");
  EXPECT_NE(r.out.find("--limit-mm-per-prompt: expected a JSON object like {\"image\": 4}, got '4'"), std::string::npos) << r.out;
  r = test::run_binary("serve " + model + " --port 0 --limit-mm-per-prompt '{\"image\": -1}'");
  EXPECT_NE(r.out.find("'image' must be a non-negative integer, got -1"), std::string::npos) << r.out;
  r = test::run_binary("serve " + model + " --port 0 --allowed-local-media-path /nonexistent-dir");
  EXPECT_NE(r.out.find("--allowed-local-media-path: '/nonexistent-dir' is not a directory"), std::string::npos) << r.out;
  r = test::run_binary("serve " + model + " --port 0 --image-fetch-timeout 0");
  EXPECT_NE(r.out.find("--image-fetch-timeout: expected seconds in (0, 3600], got 0"), std::string::npos) << r.out;
  r = test::run_binary("serve " + model + " --port 0 --max-image-pixels 0");
  EXPECT_NE(r.out.find("--max-image-pixels: expected >= 1, got 0"), std::string::npos) << r.out;
  // --mm-processor-kwargs is checked over the model's own configs before the server listens.
  r = test::run_binary("serve " + model + " --port 0 --mm-processor-kwargs '{\"max_pixels\": 1000}'");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find("--mm-processor-kwargs: the images' min_pixels (65536) exceed their max_pixels (1000)"),
            std::string::npos) << r.out;
  r = test::run_binary("serve " + model + " --port 0 --mm-processor-kwargs '{\"do_resize\": false}'");
  EXPECT_NE(r.out.find("--mm-processor-kwargs: unknown key 'do_resize'"), std::string::npos) << r.out;
}

// vLLM's mm_processor_kwargs: the Qwen-VL processors' size keys over the model's configs, and what they change.
TEST(Media, MmProcessorKwargsSetTheSizesAndAreChecked) {
  Prep p;
  vision::VideoConfig v;
  vision::PreprocessConfig img = p.pcfg;
  apply_mm_processor_kwargs(nlohmann::ordered_json::parse(R"({"min_pixels": 3136, "max_pixels": 40000, "fps": 1.5,
      "videos_kwargs": {"size": {"shortest_edge": 1000, "longest_edge": 2000000}, "max_frames": 64}})"), img, v, "kw");
  EXPECT_EQ(img.min_pixels, 3136);
  EXPECT_EQ(img.max_pixels, 40000);
  EXPECT_EQ(v.p.min_pixels, 1000);
  EXPECT_EQ(v.p.max_pixels, 2000000);
  EXPECT_EQ(v.sampling.fps, 1.5);
  EXPECT_EQ(v.sampling.max_frames, 64);
  vision::PreprocessConfig img2 = p.pcfg;
  apply_mm_processor_kwargs(nlohmann::ordered_json::parse(R"({"images_kwargs": {"size": {"shortest_edge": 3136,
      "longest_edge": 30000}}})"), img2, v, "kw");
  EXPECT_EQ(img2.min_pixels, 3136);
  EXPECT_EQ(img2.max_pixels, 30000);
  // The image's grid is smart_resize's under the new budget (fewer patches than the model's default 14 x 22).
  const std::string url = "data:image/png;base64," + base64(png_bytes());
  std::vector<int32_t> toks = {10, Prep::kPad, 11};
  auto mm = prepare_images({{url, "a"}}, MediaConfig{}, img2, Prep::kPad, toks);
  const std::string png = png_bytes();
  const vision::Image decoded = vision::decode_image(reinterpret_cast<const uint8_t*>(png.data()), png.size());
  const auto hw = vision::smart_resize(decoded.height, decoded.width, img2.factor(), 3136, 30000);
  EXPECT_EQ(mm->grids[0], (std::array<int64_t, 3>{1, hw[0] / 16, hw[1] / 16}));
  EXPECT_LE(hw[0] * hw[1], 30000);
  EXPECT_LT(mm->grids[0][1] * mm->grids[0][2], 14 * 22);
  const std::pair<const char*, const char*> bad[] = {
      {R"({"max_pixels": "big"})", "kw.max_pixels must be a positive integer (a pixel count), got \"big\""},
      {R"({"min_pixels": 0})", "kw.min_pixels must be a positive integer"},
      {R"({"size": {"longest": 5}})", "kw.size: unknown key 'longest' (expected shortest_edge, longest_edge)"},
      {R"({"fps": 0})", "kw.fps must be a number in (0, 240], got 0"},
      {R"({"min_frames": 10, "max_frames": 5})", "kw: min_frames (10) exceeds max_frames (5)"},
      {R"({"images_kwargs": {"fps": 2}})", "kw.images_kwargs: unknown key 'fps' (expected min_pixels, max_pixels, size)"},
      {R"({"videos_kwargs": 3})", "kw.videos_kwargs must be an object, got 3"},
      {R"({"min_pixels": 900000, "max_pixels": 800000})", "kw: the images' min_pixels (900000) exceed their max_pixels (800000)"},
      {R"({"num_crops": 4})", "kw: unknown key 'num_crops' (expected min_pixels, max_pixels, size, fps, min_frames, max_frames, images_kwargs, videos_kwargs)"},
      {"[1]", "kw must be an object such as {\"max_pixels\": 1003520}, got [1]"},
  };
  for (auto& [kw, want] : bad) {
    vision::PreprocessConfig i = p.pcfg;
    vision::VideoConfig vv;
    try {
      apply_mm_processor_kwargs(nlohmann::ordered_json::parse(kw), i, vv, "kw");
      ADD_FAILURE() << kw << ": no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << kw << ": " << e.what();
    }
  }
}

}  // namespace
}  // namespace ds::server
