// Video (issue #7 items 3-4): the reference's frame sampling, timestamps and video smart_resize; FFmpeg decoding of
// the committed test clip (tests/data/vision/clip_80x48_10fps.mp4, tools/make_test_video.cpp) and its errors;
// temporal patches; the prompt text with timestamps; media layout and mRoPE positions over video groups.
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <filesystem>
#include <fstream>

#include "core/status.h"
#include "error_util.h"
#include "golden_util.h"
#include "backend/ops.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "runtime/cache.h"
#include "server/media.h"
#include "text/tokenizer.h"
#include "vision/preprocess.h"
#include "vision/video.h"

namespace ds {
namespace {

#define REQUIRE_FFMPEG() \
  if (!vision::video_decoding_available()) GTEST_SKIP() << "built with -DDS_WITH_VIDEO=OFF (no FFmpeg)"

std::string vdir() { return test::data_dir() + "/vision"; }
std::string clip_path() { return vdir() + "/clip_80x48_10fps.mp4"; }

std::vector<uint8_t> read_file(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  EXPECT_TRUE(f.good()) << p;
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(f)), {});
}

vision::VideoConfig tiny_video_config() {
  return vision::load_video_config(test::data_dir() + "/tiny-moe/tiny-moe-bf16");
}

// ---------------------------------------------------------------- sampling, timestamps, sizes

TEST(VideoSampling, MatchesTheReferenceFormula) {
  const vision::VideoSampling s;  // fps 2, 4..768 frames
  using V = std::vector<int64_t>;
  EXPECT_EQ(vision::sample_frame_indices(25, 10, s), (V{0, 6, 12, 18, 24}));  // the test clip: 5 frames
  EXPECT_EQ(vision::sample_frame_indices(30, 10, s), (V{0, 6, 12, 17, 23, 29}));
  EXPECT_EQ(vision::sample_frame_indices(7, 30, s), (V{0, 2, 4, 6}));  // min_frames
  EXPECT_EQ(vision::sample_frame_indices(3, 10, s), (V{0, 1, 2}));     // never more than the clip has
  EXPECT_EQ(vision::sample_frame_indices(1, 25, s), (V{0}));
  EXPECT_EQ(vision::sample_frame_indices(2000, 30, s).size(), 133u);   // int(2000 / 30 · 2)
  EXPECT_EQ(vision::sample_frame_indices(100000, 30, s).size(), 768u); // max_frames
  // numpy's round is half to even: linspace(0, 5, 5) = 0, 1.25, 2.5, 3.75, 5 -> 0, 1, 2, 4, 5.
  vision::VideoSampling five{.fps = 2, .min_frames = 5, .max_frames = 5};
  EXPECT_EQ(vision::sample_frame_indices(6, 30, five), (V{0, 1, 2, 4, 5}));
  EXPECT_ERROR(vision::sample_frame_indices(0, 10, s), "no frames");
  EXPECT_ERROR(vision::sample_frame_indices(5, 0, s), "not positive");
}

TEST(VideoSampling, TimestampsPerTemporalGroup) {
  // Odd count: the last index repeats (0.3, 1.5, (2.4 + 2.4)/2).
  auto ts = vision::group_timestamps({0, 6, 12, 18, 24}, 10, 2);
  ASSERT_EQ(ts.size(), 3u);
  EXPECT_EQ(vision::timestamp_text(ts[0]), "<0.3 seconds>");
  EXPECT_EQ(vision::timestamp_text(ts[1]), "<1.5 seconds>");
  EXPECT_EQ(vision::timestamp_text(ts[2]), "<2.4 seconds>");
  // (1.2 + 1.7) / 2 is 1.4499999999999999556 in binary: Python's f"{t:.1f}" gives 1.4, and so must we.
  ts = vision::group_timestamps({0, 6, 12, 17, 23, 29}, 10, 2);
  EXPECT_EQ(vision::timestamp_text(ts[1]), "<1.4 seconds>");
  EXPECT_EQ(vision::timestamp_text(ts[2]), "<2.6 seconds>");
  EXPECT_EQ(vision::video_prompt_text({0.25, 1.0}),
            "<0.2 seconds><|vision_start|><|video_pad|><|vision_end|><1.0 seconds><|vision_start|><|video_pad|>"
            "<|vision_end|>");
}

TEST(VideoSampling, SmartResizeVideo) {
  const auto c = tiny_video_config().p;
  EXPECT_EQ(c.min_pixels, 4096);
  EXPECT_EQ(c.max_pixels, 25165824);
  using A = std::array<int64_t, 2>;
  // The test clip: 48/32 = 1.5 rounds to 2 (even), 80/32 = 2.5 rounds to 2.
  EXPECT_EQ(vision::smart_resize_video(5, 48, 80, 2, 32, c.min_pixels, c.max_pixels), (A{64, 64}));
  // Budget over t·h·w: 768 frames of 1080p shrink.
  auto big = vision::smart_resize_video(768, 1080, 1920, 2, 32, c.min_pixels, c.max_pixels);
  EXPECT_LE(768 * big[0] * big[1], c.max_pixels);
  EXPECT_EQ(big[0] % 32, 0);
  // Frames under one factor are scaled up first (int() of h·scale, w·scale): 20x12 → 53x32 → 64x32.
  EXPECT_EQ(vision::smart_resize_video(2, 20, 12, 2, 32, c.min_pixels, c.max_pixels), (A{64, 32}));
  EXPECT_ERROR(vision::smart_resize_video(1, 48, 80, 2, 32, c.min_pixels, c.max_pixels), "at least");
  EXPECT_ERROR(vision::smart_resize_video(2, 5000, 20, 2, 32, c.min_pixels, c.max_pixels), "aspect ratio");
}

TEST(VideoConfig, ParsesTheVideoKeys) {
  auto c = vision::parse_video_config(R"({"size": {"shortest_edge": 100, "longest_edge": 200000}, "fps": 1.5,
      "min_frames": 2, "max_frames": 10})", "t");
  EXPECT_EQ(c.p.min_pixels, 100);
  EXPECT_EQ(c.p.max_pixels, 200000);
  EXPECT_EQ(c.sampling.fps, 1.5);
  EXPECT_EQ(c.sampling.min_frames, 2);
  EXPECT_EQ(c.sampling.max_frames, 10);
  auto d = vision::parse_video_config("{}", "t");  // Qwen3.5/3.6 values
  EXPECT_EQ(d.p.min_pixels, 4096);
  EXPECT_EQ(d.p.max_pixels, 25165824);
  EXPECT_EQ(d.sampling.fps, 2.0);
  EXPECT_ERROR(vision::parse_video_config(R"({"fps": 0})", "t"), "'fps' expected a positive number");
  EXPECT_ERROR(vision::parse_video_config(R"({"num_frames": 8})", "t"), "not supported");
  EXPECT_ERROR(vision::parse_video_config(R"({"min_frames": 9, "max_frames": 4})", "t"), "min_frames 9 > max_frames 4");
}

// ---------------------------------------------------------------- decoding

TEST(VideoDecode, TestClipFramesAndSampling) {
  REQUIRE_FFMPEG();
  auto bytes = read_file(clip_path());
  auto v = vision::decode_video(bytes, vision::VideoSampling{});
  EXPECT_EQ(v.width, 80);
  EXPECT_EQ(v.height, 48);
  EXPECT_EQ(v.fps, 10.0);
  EXPECT_EQ(v.total_frames, 25);
  EXPECT_EQ(v.codec, "mpeg4");
  EXPECT_EQ(v.indices, (std::vector<int64_t>{0, 6, 12, 18, 24}));
  ASSERT_EQ(v.frames.size(), 5u);
  // Every frame differs from the next (the clip moves).
  for (size_t k = 1; k < 5; ++k) EXPECT_NE(v.frames[k].rgb, v.frames[k - 1].rgb);
  auto all = vision::decode_video(bytes, vision::VideoSampling{}, {}, /*sample=*/false);
  ASSERT_EQ(all.frames.size(), 25u);
  EXPECT_EQ(all.frames[12].rgb, v.frames[2].rgb);
}

TEST(VideoDecode, BadInputsAreErrors) {
  REQUIRE_FFMPEG();
  auto bytes = read_file(clip_path());
  const vision::VideoSampling s;
  EXPECT_ERROR(vision::decode_video(std::vector<uint8_t>{}, s), "empty data");
  EXPECT_ERROR(vision::decode_video(std::vector<uint8_t>(1000, 0x41), s), "not a video container");
  std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + bytes.size() / 3);
  EXPECT_THROW(vision::decode_video(cut, s), Error);
  vision::VideoLimits lim;
  lim.max_bytes = 1000;
  EXPECT_ERROR(vision::decode_video(bytes, s, lim), "more than the limit of 1000 bytes");
  lim = {};
  lim.max_pixels = 80 * 47;
  EXPECT_ERROR(vision::decode_video(bytes, s, lim), "frames of 80x48 are over the limit");
  lim = {};
  lim.max_decoded_frames = 20;
  EXPECT_ERROR(vision::decode_video(bytes, s, lim), "more than 20 frames");
  lim = {};
  lim.max_sampled_frames = 4;
  EXPECT_ERROR(vision::decode_video(bytes, s, lim), "5 sampled frames, more than the limit of 4");
  // A PNG is one frame to FFmpeg: decodable, but too short to be a video.
  auto png = read_file(vdir() + "/small_36x33.png");
  EXPECT_ERROR(vision::preprocess_video(vision::decode_video(png, s).frames, tiny_video_config().p),
               "1 frame(s) to sample from");
  vision::SourcePolicy p;
  EXPECT_ERROR(vision::read_video_bytes("data:image/png;base64,AAAA", p, 100), "video: data URL media type 'image/png'");
  EXPECT_ERROR(vision::read_video_bytes(clip_path(), p, 1 << 20), "not inside an allowed directory");
  p.allowed_dirs = {vdir()};
  EXPECT_EQ(vision::read_video_bytes(clip_path(), p, 1 << 20), bytes);
}

// The frames given to the reference (tests/data/vision/clip_80x48_10fps.frames.safetensors) were converted with full
// chroma interpolation; the reference host's OpenCV reader (transformers' "opencv" backend) gave frames that differ
// from them by the max / mean recorded in video-ref.json. Our decoder now converts like OpenCV: it must differ from
// the committed frames by exactly those numbers.
std::vector<uint8_t> committed_frames() {
  io::SafetensorsFile f(vdir() + "/clip_80x48_10fps.frames.safetensors");
  for (auto& t : f.header().tensors)
    if (t.name == "frames") {
      EXPECT_EQ(t.shape, (std::vector<int64_t>{5, 48, 80, 3}));
      return std::vector<uint8_t>(t.data, t.data + t.numel());
    }
  ADD_FAILURE() << "no frames";
  return {};
}

TEST(VideoDecode, ConversionLikeTheReferenceReader) {
  REQUIRE_FFMPEG();
  auto v = vision::decode_video(read_file(clip_path()), vision::VideoSampling{});
  auto ref = committed_frames();
  ASSERT_EQ(ref.size(), size_t(5 * 48 * 80 * 3));
  int worst = 0;
  double sum = 0;
  for (size_t k = 0; k < 5; ++k)
    for (size_t i = 0; i < v.frames[k].rgb.size(); ++i) {
      const int d = std::abs(int(v.frames[k].rgb[i]) - int(ref[k * 80 * 48 * 3 + i]));
      worst = std::max(worst, d);
      sum += d;
    }
  const auto js = test::read_json(vdir() + "/video-ref.json");
  const auto& cv = js["readers"]["opencv"];
  EXPECT_EQ(worst, cv["max_abs_diff_vs_ours"].get<int>());
  EXPECT_NEAR(sum / double(ref.size()), cv["mean_abs_diff_vs_ours"].get<double>(), 1e-12);
}

// Corrupted and truncated copies of the clip: each either decodes to well-formed frames or is a ds::Error (never a
// crash, hang or other exception); ASan builds make this a memory-safety check of our FFmpeg glue too.
TEST(VideoDecode, CorruptClipsAreErrorsOrFrames) {
  REQUIRE_FFMPEG();
  const auto bytes = read_file(clip_path());
  uint64_t rng = 12345;
  auto next = [&] { return rng = rng * 6364136223846793005ull + 1442695040888963407ull, rng >> 33; };
  int ok = 0, refused = 0;
  for (int k = 0; k < 60; ++k) {
    std::vector<uint8_t> b = bytes;
    if (k % 3 == 0) {
      b.resize(size_t(next() % b.size()));
    } else {
      for (int j = 0; j < 1 + k % 7; ++j) b[size_t(next() % b.size())] ^= uint8_t(1 + next() % 255);
    }
    try {
      auto v = vision::decode_video(b, vision::VideoSampling{});
      ASSERT_EQ(v.frames.size(), v.indices.size());
      for (auto& f : v.frames) ASSERT_EQ(f.rgb.size(), size_t(f.width * f.height * 3));
      ++ok;
    } catch (const Error&) {
      ++refused;
    }
  }
  std::printf("  60 damaged clips: %d decoded, %d refused\n", ok, refused);
  EXPECT_GT(refused, 0);
}

// ---------------------------------------------------------------- patches and prompt

TEST(VideoPreprocess, TemporalPatchesOfTheClip) {
  REQUIRE_FFMPEG();
  auto v = vision::decode_video(read_file(clip_path()), vision::VideoSampling{});
  const auto cfg = tiny_video_config().p;
  auto pv = vision::preprocess_video(v.frames, cfg);
  EXPECT_EQ(pv.grid.t, 3);
  EXPECT_EQ(pv.grid.h, 4);
  EXPECT_EQ(pv.grid.w, 4);
  ASSERT_EQ(pv.data.size(), size_t(48 * 1536));
  // Row layout [c][tp][16][16]: in the last group both temporal halves are the last frame (padding); in the
  // first they are frames 0 and 6, which differ.
  auto halves_equal = [&](int64_t row) {
    const float* r = pv.data.data() + row * 1536;
    for (int c = 0; c < 3; ++c)
      if (std::memcmp(r + c * 512, r + c * 512 + 256, 256 * sizeof(float))) return false;
    return true;
  };
  for (int64_t row = 32; row < 48; ++row) EXPECT_TRUE(halves_equal(row)) << row;
  int differing = 0;
  for (int64_t row = 0; row < 16; ++row) differing += !halves_equal(row);
  EXPECT_GT(differing, 8);
}

TEST(VideoPrompt, ExpandsTheTemplatePlaceholder) {
  const std::string t = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Hi<|im_end|>\n";
  EXPECT_EQ(vision::expand_video_text(t, {{0.3, 1.5}}),
            "<|im_start|>user\n<0.3 seconds><|vision_start|><|video_pad|><|vision_end|><1.5 seconds>"
            "<|vision_start|><|video_pad|><|vision_end|>Hi<|im_end|>\n");
  EXPECT_EQ(vision::expand_video_text("a<|video_pad|>b", {{2.0}}),
            "a<2.0 seconds><|vision_start|><|video_pad|><|vision_end|>b");
  EXPECT_ERROR(vision::expand_video_text(t, {}), "more video placeholders");
  EXPECT_ERROR(vision::expand_video_text(t, {{1}, {2}}), "1 video placeholder(s) but the request has 2");
}

// Text, an image (2×2 merged), then a video of 2 groups of 1×2 merged tokens: each group is positioned like an
// image at the running position, the text between groups counts up.
TEST(VideoPrompt, LayoutAndMropeOverGroups) {
  const int32_t I = 90, V = 91, S = 80, E = 81;
  std::vector<int32_t> tok = {1, S, I, I, I, I, E, 5, S, V, V, E, 7, S, V, V, E, 2};
  const vision::ImageGrid img{1, 4, 4}, vid{2, 2, 4};
  auto L = vision::media_layout(tok, I, {img}, V, {vid}, 2);
  ASSERT_EQ(L.order.size(), 2u);
  EXPECT_EQ(L.order[0], (std::pair<bool, int64_t>{false, 0}));
  EXPECT_EQ(L.order[1], (std::pair<bool, int64_t>{true, 0}));
  ASSERT_EQ(L.units.size(), 3u);
  EXPECT_EQ(L.units[1].t, 1);
  auto mp = vision::mrope_positions(tok, I, L.units, 2, V);
  const int64_t T = int64_t(tok.size());
  auto at = [&](int r, int64_t i) { return mp.pos[size_t(r * T + i)]; };
  // image at 2..5: cur 2, rows/cols 0..1; cur += 2 → E at 4
  EXPECT_EQ(at(0, 2), 2);
  EXPECT_EQ(at(1, 5), 3);
  EXPECT_EQ(at(2, 5), 3);
  EXPECT_EQ(at(0, 6), 4);
  // 5 at 5, S at 6, group 1 at 9..10: t 7, h 7, w 7..8; cur += 2 → E at 9, 7 at 10, S 11, group 2 at 12
  EXPECT_EQ(at(0, 9), 7);
  EXPECT_EQ(at(2, 10), 8);
  EXPECT_EQ(at(0, 11), 9);
  EXPECT_EQ(at(0, 14), 12);
  EXPECT_EQ(at(2, 16 - 1), 13);
  EXPECT_EQ(at(0, 17), 15);
  EXPECT_EQ(mp.rope_delta, 15 + 1 - T);
  EXPECT_ERROR(vision::media_layout({S, V, V, V, E}, I, {}, V, {vid}, 2), "run of 3 tokens where 2 were expected");
  EXPECT_ERROR(vision::media_layout({S, V, V, E}, I, {}, V, {vid}, 2), "placeholders for 0 image(s) and 1 video(s)");
}

// The server's path: load_videos → expand_video_text → tokenize → prepare_media, with an image before or after
// the video; pixel values, grids and feature rows follow the prompt order.
TEST(VideoServer, ImagesAndVideosInPromptOrder) {
  REQUIRE_FFMPEG();
  server::MediaConfig mc;
  mc.allowed_local_paths = {vdir()};
  const auto vcfg = tiny_video_config();
  const auto pcfg = vision::load_preprocess_config(test::data_dir() + "/tiny-moe/tiny-moe-bf16");
  auto videos = server::load_videos({{clip_path(), "messages[0].content[1]"}}, mc, vcfg);
  ASSERT_EQ(videos.size(), 1u);
  EXPECT_EQ(videos[0].timestamps, (std::vector<double>{0.3, 1.5, 2.4}));
  auto tok = text::Tokenizer::load(test::data_dir() + "/tiny-moe/tiny-moe-bf16");
  const std::string img = "<|vision_start|><|image_pad|><|vision_end|>", vid = "<|vision_start|><|video_pad|><|vision_end|>";
  for (bool video_first : {false, true}) {
    SCOPED_TRACE(video_first);
    std::string text = "<|im_start|>user\n" + (video_first ? vid + "and " + img : img + "and " + vid) + "?<|im_end|>\n";
    auto ids = tok.encode(vision::expand_video_text(text, {videos[0].timestamps}), true);
    auto mm = server::prepare_media({{vdir() + "/small_36x33.png", "messages[0].content[0]"}}, videos, mc, pcfg, 1996,
                                    1997, ids);
    ASSERT_EQ(mm->grids.size(), 2u);
    const auto& g_img = mm->grids[video_first ? 1 : 0];
    const auto& g_vid = mm->grids[video_first ? 0 : 1];
    EXPECT_EQ(g_vid, (std::array<int64_t, 3>{3, 4, 4}));
    EXPECT_EQ(g_img[0], 1);
    const int64_t img_tokens = g_img[1] * g_img[2] / 4;
    EXPECT_EQ(int64_t(mm->rows.size()), img_tokens + 12);
    EXPECT_EQ(mm->pixel_values.size(), size_t((g_img[1] * g_img[2] + 48) * 1536));
    // The first feature row belongs to whichever medium comes first.
    EXPECT_EQ(ids[size_t(mm->rows[0])], video_first ? 1997 : 1996);
    EXPECT_EQ(ids[size_t(mm->rows.back())], video_first ? 1996 : 1997);
    // Pixel values in the same order: the video's block first or last.
    const auto& vp = videos[0].pixels.data;
    const float* at = mm->pixel_values.data() + (video_first ? 0 : mm->pixel_values.size() - vp.size());
    EXPECT_EQ(std::memcmp(at, vp.data(), vp.size() * 4), 0);
  }
  EXPECT_ERROR(server::load_videos({{clip_path(), "messages[0].content[2]"}, {clip_path(), "x"}}, mc, vcfg),
               "at most 1 video(s) per prompt");
  mc.max_video_bytes = 100;
  EXPECT_ERROR(server::load_videos({{clip_path(), "messages[0].content[2]"}}, mc, vcfg),
               "messages[0].content[2]: video: '");
  std::vector<int32_t> bad = tok.encode("<|vision_start|><|video_pad|><|vision_end|>", true);
  EXPECT_ERROR(server::prepare_media({}, videos, mc, pcfg, 1996, 1997, bad),
               "holds 1 video placeholder tokens (<|video_pad|>) where its 1 video(s) need 3");
}

// ---------------------------------------------------------------- against the reference (tools/video_ref_dump.py)

// tests/data/vision/video-ref.safetensors + .json: transformers' Qwen3VLVideoProcessor / Qwen3VLProcessor / the
// tiny-moe model on the test clip's frames (our decoder's, see tests/data/README.md).
struct Ref {
  std::unique_ptr<io::SafetensorsFile> f;
  nlohmann::json js;
  const io::TensorEntry* get(const std::string& name) const {
    for (auto& t : f->header().tensors)
      if (t.name == name) return &t;
    return nullptr;
  }
  template <typename T>
  std::vector<T> vec(const std::string& name) const {
    auto* t = get(name);
    if (!t) throw std::runtime_error("video-ref: missing " + name);
    std::vector<T> v(size_t(t->numel()));
    if (t->dtype == DType::I64 && !std::is_same_v<T, int64_t>) {
      for (size_t i = 0; i < v.size(); ++i) {
        int64_t x;
        std::memcpy(&x, t->data + 8 * i, 8);
        v[i] = T(x);
      }
    } else {
      std::memcpy(v.data(), t->data, v.size() * sizeof(T));
    }
    return v;
  }
};

// The frames the reference was given (see ConversionLikeTheReferenceReader).
std::vector<vision::Image> reference_input_frames() {
  auto raw = committed_frames();
  std::vector<vision::Image> out(5);
  for (size_t k = 0; k < 5; ++k) {
    out[k].width = 80;
    out[k].height = 48;
    out[k].rgb.assign(raw.begin() + k * 80 * 48 * 3, raw.begin() + (k + 1) * 80 * 48 * 3);
  }
  return out;
}

Ref load_ref() {
  namespace fs = std::filesystem;
  const std::string p = vdir() + "/video-ref.safetensors";
  Ref r;
  if (!fs::exists(p)) return r;
  r.f = std::make_unique<io::SafetensorsFile>(p);
  r.js = test::read_json(vdir() + "/video-ref.json");
  return r;
}

// Missing reference data is a failure, never a skip.
#define REQUIRE_REF(r) \
  ASSERT_TRUE((r).f) << "tests/data/vision/video-ref.safetensors is missing (tools/video_ref_dump.py)"

TEST(VideoReference, SamplingAndSizeCasesOfTheReferenceFunctions) {
  Ref r = load_ref();
  REQUIRE_REF(r);
  ASSERT_TRUE(r.js.contains("sampling_cases"));
  int n = 0;
  for (auto& c : r.js["sampling_cases"]) {
    SCOPED_TRACE(c.dump());
    if (c.contains("error")) continue;
    EXPECT_EQ(vision::sample_frame_indices(c["total"], c["fps"], vision::VideoSampling{}),
              c["indices"].get<std::vector<int64_t>>());
    ++n;
  }
  EXPECT_GE(n, 10);
  const auto cfg = tiny_video_config().p;
  for (auto& c : r.js["smart_resize_cases"]) {
    SCOPED_TRACE(c.dump());
    if (c.contains("error")) {
      EXPECT_THROW(vision::smart_resize_video(c["t"], c["h"], c["w"], 2, 32, cfg.min_pixels, cfg.max_pixels), Error);
      continue;
    }
    auto hw = vision::smart_resize_video(c["t"], c["h"], c["w"], 2, 32, cfg.min_pixels, cfg.max_pixels);
    EXPECT_EQ(hw[0], c["rh"].get<int64_t>());
    EXPECT_EQ(hw[1], c["rw"].get<int64_t>());
  }
}

// transformers 5.17's Qwen3VLProcessor replaces only the <|video_pad|> of the template's triple, so its prompt keeps
// the template's outer <|vision_start|> … <|vision_end|> around the timestamped groups. Qwen's original processor
// (transformers 4.57, qwen-vl-utils) and vLLM replace the whole triple; we do that too (docs/vision.md "Video").
// `wrap` puts the outer pair back around our groups: the result must equal the reference's ids exactly.
std::vector<int32_t> wrap_like_transformers5(const std::vector<int32_t>& ours, size_t first_ts) {
  size_t last_ve = 0;
  for (size_t i = 1; i < ours.size(); ++i)
    if (ours[i] == 1994 && ours[i - 1] == 1997) last_ve = i;
  std::vector<int32_t> w(ours.begin(), ours.begin() + first_ts);
  w.push_back(1993);
  w.insert(w.end(), ours.begin() + first_ts, ours.begin() + last_ve + 1);
  w.push_back(1994);
  w.insert(w.end(), ours.begin() + last_ve + 1, ours.end());
  return w;
}

TEST(VideoReference, ClipPreprocessingAndPromptMatch) {
  Ref r = load_ref();
  REQUIRE_REF(r);
  REQUIRE_FFMPEG();
  auto v = vision::decode_video(read_file(clip_path()), vision::VideoSampling{});
  EXPECT_EQ(v.indices, r.vec<int64_t>("indices"));
  const auto cfg = tiny_video_config();
  const auto ts = vision::group_timestamps(v.indices, v.fps, 2);
  EXPECT_EQ(ts, r.vec<double>("timestamps"));  // exact: same arithmetic
  auto pv = vision::preprocess_video(reference_input_frames(), cfg.p);
  auto grid = r.vec<int64_t>("video_grid_thw");
  EXPECT_EQ(grid, (std::vector<int64_t>{pv.grid.t, pv.grid.h, pv.grid.w}));
  // Pixel values (the reference's are uint8 levels L: (L/255 − 0.5)/0.5).
  std::vector<float> want;
  if (auto* lv = r.get("pixel_levels")) {
    for (int64_t i = 0; i < lv->numel(); ++i) want.push_back((float(lv->data[i]) * float(1.0 / 255.0) - 0.5f) / 0.5f);
  } else {
    want = r.vec<float>("pixel_values_videos");
  }
  ASSERT_EQ(want.size(), pv.data.size());
  double worst = 0;
  int64_t off = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double d = std::abs(double(want[i]) - double(pv.data[i]));
    worst = std::max(worst, d);
    off += d > 1e-6;
  }
  std::printf("  pixel_values_videos: max abs diff %.3g, %lld of %zu values off by more than 1e-6\n", worst,
              (long long)off, want.size());
  EXPECT_LT(worst, 1e-2);
  // Prompt: the reference's template text, expanded like the server does, tokenized, pads expanded.
  auto tok = text::Tokenizer::load(test::data_dir() + "/tiny-moe/tiny-moe-bf16");
  const std::string tmpl = r.js["template_text"].get<std::string>();
  const std::string text = vision::expand_video_text(tmpl, {ts});
  auto ids = vision::expand_image_placeholders(tok.encode(text, true), 1997, vision::video_units(pv.grid), 2);
  const size_t first_ts = tok.encode(tmpl.substr(0, tmpl.find("<|vision_start|>")), true).size();
  const auto ref_ids = r.vec<int32_t>("input_ids");
  EXPECT_EQ(ids.size() + 2, ref_ids.size());
  EXPECT_EQ(wrap_like_transformers5(ids, first_ts), ref_ids);
  // mRoPE positions of the reference's prompt, computed our way.
  auto L = vision::media_layout(ref_ids, 1996, {}, 1997, {pv.grid}, 2);
  auto mp = vision::mrope_positions(ref_ids, 1996, L.units, 2, 1997);
  EXPECT_EQ(mp.pos, r.vec<int32_t>("position_ids"));
  EXPECT_EQ(mp.rope_delta, r.vec<int64_t>("rope_deltas")[0]);
}

// The tiny-moe model on the reference's prompt with our pixel values and positions: vision features and the last
// rows of the logits (fp32 CPU backend).
TEST(VideoReference, FeaturesAndLogitsMatch) {
  Ref r = load_ref();
  REQUIRE_REF(r);
  auto pv = vision::preprocess_video(reference_input_frames(), tiny_video_config().p);
  auto be = make_backend("cpu");
  auto m = model::Model::load(test::data_dir() + "/tiny-moe/tiny-moe-bf16", *be);
  Tensor feats = m->encode_images(pv.data, {{pv.grid.t, pv.grid.h, pv.grid.w}});
  auto of = be->to_host_f32(feats);
  const double fe = test::rel_l2(of, r.vec<float>("features"));
  std::printf("  video features [%lld, %lld] rel L2 %.3g\n", (long long)feats.dim(0), (long long)feats.dim(1), fe);
  EXPECT_LT(fe, 1e-4);

  const auto ids = r.vec<int32_t>("input_ids");
  const int64_t T = int64_t(ids.size()), V = m->config().text.vocab_size;
  auto L = vision::media_layout(ids, 1996, {}, 1997, {pv.grid}, 2);
  auto mp = vision::mrope_positions(ids, 1996, L.units, 2, 1997);
  runtime::CacheManager cm(*m, T / 16 + 2, 16, 1);
  runtime::SeqCache seq;
  cm.start(seq);
  ASSERT_TRUE(cm.reserve(seq, T));
  BatchMeta b = runtime::make_batch({{&seq, ids}});
  for (size_t i = 0; i < size_t(3 * T); ++i) b.positions[i] = mp.pos[i];
  for (int64_t i = 0; i < T; ++i)
    if (ids[size_t(i)] == 1997) b.embed_rows.push_back(int32_t(i));
  ASSERT_EQ(int64_t(b.embed_rows.size()), feats.dim(0));
  b.embed_src = feats;
  auto rows = r.vec<int64_t>("logits_rows");
  std::vector<int32_t> out_rows(rows.begin(), rows.end());
  auto lg = be->to_host_f32(m->forward(b, cm.caches(), out_rows));
  const double err = test::rel_l2(lg, r.vec<float>("logits_last"));
  std::printf("  video-prompt logits (last %zu of %lld rows, V %lld) rel L2 %.3g\n", rows.size(), (long long)T,
              (long long)V, err);
  EXPECT_LT(err, 1e-4);
}

// `deltaserve logits --video` (decode, preprocess, tower, expansion, positions, forward) on the template's ids: its
// expanded ids are the server's (the reference's without the outer wrapper).
TEST(VideoReference, CliMatches) {
  Ref r = load_ref();
  REQUIRE_REF(r);
  REQUIRE_FFMPEG();
  auto tok = text::Tokenizer::load(test::data_dir() + "/tiny-moe/tiny-moe-bf16");
  const std::string tmpl = r.js["template_text"].get<std::string>();
  auto ids = tok.encode(tmpl, true);
  std::string list;
  for (size_t i = 0; i < ids.size(); ++i) list += (i ? "," : "") + std::to_string(ids[i]);
  const std::string out = testing::TempDir() + "/video_cli.safetensors";
  auto res = test::run_binary("logits --model " + test::data_dir() + "/tiny-moe/tiny-moe-bf16 --tokens " + list +
                              " --video " + clip_path() + " --out " + out);
  ASSERT_EQ(res.code, 0) << res.out;
  io::SafetensorsFile f(out);
  const io::TensorEntry *in = nullptr, *feat = nullptr;
  for (auto& t : f.header().tensors) {
    if (t.name == "input_ids") in = &t;
    if (t.name == "image_features") feat = &t;
  }
  ASSERT_TRUE(in && feat);
  std::vector<int32_t> cli_ids(size_t(in->numel()));
  std::memcpy(cli_ids.data(), in->data, cli_ids.size() * 4);
  const size_t first_ts = tok.encode(tmpl.substr(0, tmpl.find("<|vision_start|>")), true).size();
  EXPECT_EQ(wrap_like_transformers5(cli_ids, first_ts), r.vec<int32_t>("input_ids"));
  // Features of the frames our decoder gives now (converted like OpenCV, not like the reference's input): same
  // shape, close but not equal to the reference's.
  EXPECT_EQ(feat->shape, (std::vector<int64_t>{12, 256}));
  auto wf = r.vec<float>("features");
  std::vector<float> of(wf.size());
  std::memcpy(of.data(), feat->data, of.size() * 4);
  const double fe = test::rel_l2(of, wf);
  std::printf("  cli features (frames converted like OpenCV) vs the reference's input frames: rel L2 %.3g\n", fe);
  EXPECT_LT(fe, 0.5);
}

}  // namespace
}  // namespace ds
