// Vision: image decoding (PNG/JPEG/WebP made in the test), sources and limits, smart resize, bicubic
// resampling, preprocessing against the reference's pixel_values, mRoPE positions, and the vision tower and
// image-prompt logits against transformers on both tiny fixtures (bf16 and int4 checkpoints).
#include <gtest/gtest.h>
#include <jpeglib.h>
#include <png.h>
#include <unistd.h>
#include <webp/encode.h>
#include <zlib.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>

#include "backend/ops.h"
#include "error_util.h"
#include "golden_util.h"
#include "model/model.h"
#include "runtime/cache.h"
#include "vision/image.h"
#include "vision/preprocess.h"

namespace ds {
namespace {

using vision::Image;

// ---------------------------------------------------------------- encoders for test images

std::vector<uint8_t> png_encode(int w, int h, uint32_t format, const std::vector<uint8_t>& px,
                                const std::vector<uint8_t>& colormap = {}, int cmap_entries = 0) {
  png_image im{};
  im.version = PNG_IMAGE_VERSION;
  im.width = w;
  im.height = h;
  im.format = format;
  im.colormap_entries = cmap_entries;
  png_alloc_size_t size = 0;
  const void* cm = colormap.empty() ? nullptr : colormap.data();
  EXPECT_TRUE(png_image_write_to_memory(&im, nullptr, &size, 0, px.data(), 0, cm));
  std::vector<uint8_t> out(size);
  EXPECT_TRUE(png_image_write_to_memory(&im, out.data(), &size, 0, px.data(), 0, cm));
  out.resize(size);
  return out;
}

// JPEG (RGB or grey), optionally with an EXIF APP1 segment holding only the orientation tag.
std::vector<uint8_t> jpeg_encode(int w, int h, int comps, const std::vector<uint8_t>& px, int orientation = 0,
                                 bool big_endian_exif = false) {
  jpeg_compress_struct c;
  jpeg_error_mgr err;
  c.err = jpeg_std_error(&err);
  jpeg_create_compress(&c);
  unsigned char* buf = nullptr;
  unsigned long size = 0;
  jpeg_mem_dest(&c, &buf, &size);
  c.image_width = w;
  c.image_height = h;
  c.input_components = comps;
  c.in_color_space = comps == 3 ? JCS_RGB : JCS_GRAYSCALE;
  jpeg_set_defaults(&c);
  jpeg_set_quality(&c, 98, TRUE);
  jpeg_start_compress(&c, TRUE);
  if (orientation) {
    std::vector<uint8_t> e = {'E', 'x', 'i', 'f', 0, 0};
    auto u16 = [&](int v) {
      if (big_endian_exif) e.insert(e.end(), {uint8_t(v >> 8), uint8_t(v)});
      else e.insert(e.end(), {uint8_t(v), uint8_t(v >> 8)});
    };
    auto u32 = [&](uint32_t v) {
      if (big_endian_exif) e.insert(e.end(), {uint8_t(v >> 24), uint8_t(v >> 16), uint8_t(v >> 8), uint8_t(v)});
      else e.insert(e.end(), {uint8_t(v), uint8_t(v >> 8), uint8_t(v >> 16), uint8_t(v >> 24)});
    };
    if (big_endian_exif) e.insert(e.end(), {'M', 'M'});
    else e.insert(e.end(), {'I', 'I'});
    u16(42);
    u32(8);
    u16(1);  // one IFD entry
    u16(0x0112);
    u16(3);
    u32(1);
    u16(orientation);
    u16(0);
    u32(0);  // next IFD
    jpeg_write_marker(&c, JPEG_APP0 + 1, e.data(), unsigned(e.size()));
  }
  while (c.next_scanline < c.image_height) {
    JSAMPROW row = const_cast<uint8_t*>(px.data()) + size_t(c.next_scanline) * w * comps;
    jpeg_write_scanlines(&c, &row, 1);
  }
  jpeg_finish_compress(&c);
  jpeg_destroy_compress(&c);
  std::vector<uint8_t> out(buf, buf + size);
  free(buf);
  return out;
}

std::vector<uint8_t> random_rgb(int w, int h, uint32_t seed) {
  std::vector<uint8_t> v(size_t(w * h * 3));
  for (auto& x : v) x = uint8_t((seed = seed * 1664525u + 1013904223u) >> 24);
  return v;
}

// ---------------------------------------------------------------- decoding

TEST(VisionDecode, PngRgbRoundTripsExactly) {
  auto px = random_rgb(37, 21, 1);
  Image im = vision::decode_image(png_encode(37, 21, PNG_FORMAT_RGB, px));
  EXPECT_EQ(im.width, 37);
  EXPECT_EQ(im.height, 21);
  EXPECT_EQ(im.rgb, px);
}

TEST(VisionDecode, PngGreyPaletteAndSixteenBitBecomeRgb) {
  std::vector<uint8_t> g = {0, 50, 100, 150, 200, 255};
  Image im = vision::decode_image(png_encode(3, 2, PNG_FORMAT_GRAY, g));
  for (int i = 0; i < 6; ++i)
    for (int c = 0; c < 3; ++c) EXPECT_EQ(im.rgb[3 * i + c], g[i]);
  // Palette: indices into a 3-entry RGB colour map.
  std::vector<uint8_t> cmap = {255, 0, 0, 0, 255, 0, 10, 20, 30};
  std::vector<uint8_t> idx = {0, 1, 2, 2, 1, 0};
  im = vision::decode_image(png_encode(3, 2, PNG_FORMAT_RGB_COLORMAP, idx, cmap, 3));
  for (int i = 0; i < 6; ++i)
    for (int c = 0; c < 3; ++c) EXPECT_EQ(im.rgb[3 * i + c], cmap[3 * idx[i] + c]) << i;
  // 16-bit (the simplified writer stores linear 16-bit samples; we keep the high byte as PIL does).
  std::vector<uint16_t> s16 = {0x0000, 0x1234, 0x8000, 0xffff, 0x7f01, 0xabcd};
  std::vector<uint8_t> raw(s16.size() * 2);
  std::memcpy(raw.data(), s16.data(), raw.size());
  im = vision::decode_image(png_encode(2, 1, PNG_FORMAT_LINEAR_RGB, raw));
  for (int i = 0; i < 6; ++i) EXPECT_EQ(im.rgb[i], s16[i] >> 8) << i;
}

TEST(VisionDecode, AlphaIsCompositedOverWhiteLikePil) {
  // RGBA: (c, a) → PIL alpha_composite over white, integer arithmetic.
  std::vector<uint8_t> px = {10, 200, 30, 0, 10, 200, 30, 255, 10, 200, 30, 128, 0, 0, 0, 1};
  Image im = vision::decode_image(png_encode(4, 1, PNG_FORMAT_RGBA, px));
  auto expect = [](int c, int a) {  // exact rational, rounded: c·a/255 + 255·(255 − a)/255
    return a == 0 ? 255 : int(std::lround((c * a + 255.0 * (255 - a)) / 255.0));
  };
  for (int i = 0; i < 4; ++i)
    for (int c = 0; c < 3; ++c) EXPECT_NEAR(im.rgb[3 * i + c], expect(px[4 * i + c], px[4 * i + 3]), 1) << i;
  EXPECT_EQ(im.rgb[0], 255);  // fully transparent → white
  EXPECT_EQ(im.rgb[3], 10);   // opaque → unchanged
  EXPECT_EQ(im.rgb[4], 200);
  // Grey + alpha.
  std::vector<uint8_t> ga = {100, 255, 100, 0};
  im = vision::decode_image(png_encode(2, 1, PNG_FORMAT_GA, ga));
  EXPECT_EQ(im.rgb[0], 100);
  EXPECT_EQ(im.rgb[3], 255);
}

TEST(VisionDecode, JpegRgbAndGrey) {
  // Smooth image so that JPEG's loss stays small.
  const int w = 48, h = 32;
  std::vector<uint8_t> px(size_t(w * h * 3)), g(size_t(w * h));
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) {
      px[(y * w + x) * 3 + 0] = uint8_t(4 * x);
      px[(y * w + x) * 3 + 1] = uint8_t(6 * y);
      px[(y * w + x) * 3 + 2] = 128;
      g[y * w + x] = uint8_t(2 * x + 3 * y);
    }
  Image im = vision::decode_image(jpeg_encode(w, h, 3, px));
  ASSERT_EQ(im.width, w);
  ASSERT_EQ(im.height, h);
  int worst = 0;
  for (size_t i = 0; i < px.size(); ++i) worst = std::max(worst, std::abs(int(im.rgb[i]) - px[i]));
  EXPECT_LE(worst, 12);
  im = vision::decode_image(jpeg_encode(w, h, 1, g));
  worst = 0;
  for (int i = 0; i < w * h; ++i) {
    EXPECT_EQ(im.rgb[3 * i], im.rgb[3 * i + 1]);
    EXPECT_EQ(im.rgb[3 * i], im.rgb[3 * i + 2]);
    worst = std::max(worst, std::abs(int(im.rgb[3 * i]) - g[i]));
  }
  EXPECT_LE(worst, 6);
}

TEST(VisionDecode, JpegExifOrientationIsApplied) {
  // 48x32 image of six 16x16 blocks with distinct colours; each orientation must move the blocks like PIL's
  // exif_transpose. We check the block colours at the centre of every output block.
  const int w = 48, h = 32, B = 16;
  const uint8_t col[6][3] = {{255, 0, 0}, {0, 255, 0}, {0, 0, 255}, {255, 255, 0}, {0, 255, 255}, {255, 0, 255}};
  std::vector<uint8_t> px(size_t(w * h * 3));
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      for (int c = 0; c < 3; ++c) px[(y * w + x) * 3 + c] = col[(y / B) * 3 + x / B][c];
  for (int o = 1; o <= 8; ++o)
    for (bool be : {false, true}) {
      Image im = vision::decode_image(jpeg_encode(w, h, 3, px, o, be));
      const bool swap = o >= 5;
      ASSERT_EQ(im.width, swap ? h : w) << o;
      ASSERT_EQ(im.height, swap ? w : h) << o;
      for (int oy = B / 2; oy < im.height; oy += B)
        for (int ox = B / 2; ox < im.width; ox += B) {
          int sx = ox, sy = oy;  // source pixel per orientation (W, H of the source)
          switch (o) {
            case 2: sx = w - 1 - ox; break;
            case 3: sx = w - 1 - ox; sy = h - 1 - oy; break;
            case 4: sy = h - 1 - oy; break;
            case 5: sx = oy; sy = ox; break;
            case 6: sx = oy; sy = h - 1 - ox; break;
            case 7: sx = w - 1 - oy; sy = h - 1 - ox; break;
            case 8: sx = w - 1 - oy; sy = ox; break;
          }
          const uint8_t* want = col[(sy / B) * 3 + sx / B];
          for (int c = 0; c < 3; ++c)
            EXPECT_NEAR(im.at(ox, oy, c), want[c], 24) << "orientation " << o << " at " << ox << "," << oy;
        }
    }
}

TEST(VisionDecode, WebpLosslessAndAlpha) {
  auto px = random_rgb(19, 11, 7);
  uint8_t* out = nullptr;
  size_t n = WebPEncodeLosslessRGB(px.data(), 19, 11, 19 * 3, &out);
  ASSERT_GT(n, 0u);
  std::vector<uint8_t> bytes(out, out + n);
  WebPFree(out);
  Image im = vision::decode_image(bytes);
  EXPECT_EQ(im.width, 19);
  EXPECT_EQ(im.rgb, px);
  std::vector<uint8_t> rgba = {10, 20, 30, 0, 10, 20, 30, 255};
  n = WebPEncodeLosslessRGBA(rgba.data(), 2, 1, 8, &out);
  std::vector<uint8_t> b2(out, out + n);
  WebPFree(out);
  im = vision::decode_image(b2);
  EXPECT_EQ(im.rgb, (std::vector<uint8_t>{255, 255, 255, 10, 20, 30}));
  // Truncated WebP.
  std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + bytes.size() / 2);
  EXPECT_ERROR(vision::decode_image(cut), "WebP");
}

TEST(VisionDecode, BadInputIsAClearError) {
  auto png = png_encode(20, 20, PNG_FORMAT_RGB, random_rgb(20, 20, 3));
  EXPECT_ERROR(vision::decode_image(std::vector<uint8_t>{}), "empty data (0 bytes)");
  // Truncated PNG (header intact, data cut) and corrupt data after a valid signature.
  std::vector<uint8_t> cut(png.begin(), png.begin() + png.size() / 2);
  EXPECT_ERROR(vision::decode_image(cut), "corrupt or truncated PNG");
  std::vector<uint8_t> corrupt = png;
  for (size_t i = 40; i < corrupt.size(); ++i) corrupt[i] ^= 0x5a;
  EXPECT_ERROR(vision::decode_image(corrupt), "PNG");
  // JPEG truncated, JPEG garbage.
  std::vector<uint8_t> px(size_t(64 * 64 * 3), 90);
  auto jpg = jpeg_encode(64, 64, 3, px);
  std::vector<uint8_t> jcut(jpg.begin(), jpg.begin() + jpg.size() * 2 / 3);
  EXPECT_ERROR(vision::decode_image(jcut), "truncated");
  std::vector<uint8_t> jbad = {0xFF, 0xD8, 0xFF, 0x00, 1, 2, 3, 4, 5, 6, 7, 8};
  EXPECT_ERROR(vision::decode_image(jbad), "JPEG");
  // Unsupported formats.
  std::vector<uint8_t> gif = {'G', 'I', 'F', '8', '9', 'a', 1, 0, 1, 0};
  EXPECT_ERROR(vision::decode_image(gif), "unsupported format (GIF)");
  std::vector<uint8_t> text = {'h', 'e', 'l', 'l', 'o'};
  EXPECT_ERROR(vision::decode_image(text), "expected PNG, JPEG or WebP");
  // Limits: bytes and pixels (checked from the header, before decoding).
  vision::DecodeLimits small;
  small.max_bytes = 100;
  EXPECT_ERROR(vision::decode_image(png, small), "more than the limit of 100 bytes");
  vision::DecodeLimits few;
  few.max_pixels = 399;
  EXPECT_ERROR(vision::decode_image(png, few), "400 pixels (20x20), more than the limit of 399");
  EXPECT_ERROR(vision::decode_image(jpg, few), "JPEG has 4096 pixels");
  // Zero width: patch IHDR's width to 0 and fix its CRC.
  std::vector<uint8_t> zero = png;
  std::memset(&zero[16], 0, 4);
  uint32_t crc = uint32_t(crc32(0, &zero[12], 17));
  zero[29] = uint8_t(crc >> 24);
  zero[30] = uint8_t(crc >> 16);
  zero[31] = uint8_t(crc >> 8);
  zero[32] = uint8_t(crc);
  EXPECT_ERROR(vision::decode_image(zero), "PNG");
}

// ---------------------------------------------------------------- sources

std::string b64(const std::vector<uint8_t>& v) {
  static const char* A = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string s;
  for (size_t i = 0; i < v.size(); i += 3) {
    uint32_t n = uint32_t(v[i]) << 16 | (i + 1 < v.size() ? v[i + 1] << 8 : 0) | (i + 2 < v.size() ? v[i + 2] : 0);
    s += A[n >> 18];
    s += A[(n >> 12) & 63];
    s += i + 1 < v.size() ? A[(n >> 6) & 63] : '=';
    s += i + 2 < v.size() ? A[n & 63] : '=';
  }
  return s;
}

TEST(VisionSource, Base64AndDataUrls) {
  for (size_t n : {0, 1, 2, 3, 4, 5, 100}) {
    std::vector<uint8_t> v(n);
    for (size_t i = 0; i < n; ++i) v[i] = uint8_t(i * 37 + 11);
    EXPECT_EQ(vision::base64_decode(b64(v)), v) << n;
  }
  EXPECT_EQ(vision::base64_decode("aGk"), (std::vector<uint8_t>{'h', 'i'}));  // padding optional
  EXPECT_ERROR(vision::base64_decode("aGk*"), "found '*' at offset 3");
  EXPECT_ERROR(vision::base64_decode("a"), "not a valid length");
  auto px = random_rgb(5, 4, 9);
  auto png = png_encode(5, 4, PNG_FORMAT_RGB, px);
  vision::SourcePolicy p;  // no local files
  Image im = vision::load_image("data:image/png;base64," + b64(png), p);
  EXPECT_EQ(im.rgb, px);
  EXPECT_ERROR(vision::load_image("data:image/png," + b64(png), p), "is not base64");
  EXPECT_ERROR(vision::load_image("data:text/plain;base64,aGk=", p), "media type 'text/plain'");
  EXPECT_ERROR(vision::load_image("https://example.com/a.png", p), "http(s) URLs are not read here");
  EXPECT_ERROR(vision::load_image("ftp://x/a.png", p), "unsupported URL scheme");
}

TEST(VisionSource, LocalFilesFollowTheAllowList) {
  namespace fs = std::filesystem;
  const fs::path root = fs::temp_directory_path() / ("ds_vision_test_" + std::to_string(::getpid()));
  fs::create_directories(root / "allowed");
  fs::create_directories(root / "other");
  auto px = random_rgb(3, 3, 5);
  auto png = png_encode(3, 3, PNG_FORMAT_RGB, px);
  for (auto d : {"allowed", "other"}) {
    std::ofstream f(root / d / "a.png", std::ios::binary);
    f.write(reinterpret_cast<const char*>(png.data()), std::streamsize(png.size()));
  }
  fs::create_symlink(root / "other" / "a.png", root / "allowed" / "link.png");
  vision::SourcePolicy p;
  EXPECT_ERROR(vision::load_image((root / "allowed" / "a.png").string(), p), "local files are disabled");
  p.allowed_dirs = {(root / "allowed").string()};
  EXPECT_EQ(vision::load_image((root / "allowed" / "a.png").string(), p).rgb, px);
  EXPECT_EQ(vision::load_image("file://" + (root / "allowed" / "a.png").string(), p).rgb, px);
  EXPECT_ERROR(vision::load_image((root / "other" / "a.png").string(), p), "not inside an allowed directory");
  EXPECT_ERROR(vision::load_image((root / "allowed" / ".." / "other" / "a.png").string(), p), "not inside");
  EXPECT_ERROR(vision::load_image((root / "allowed" / "link.png").string(), p), "not inside");
  EXPECT_ERROR(vision::load_image((root / "allowed" / "missing.png").string(), p), "cannot open");
  p.limits.max_bytes = 10;
  EXPECT_ERROR(vision::load_image((root / "allowed" / "a.png").string(), p), "more than the limit of 10 bytes");
  fs::remove_all(root);
}

// ---------------------------------------------------------------- resize and preprocessing

TEST(VisionPreprocess, SmartResize) {
  using A = std::array<int64_t, 2>;
  EXPECT_EQ(vision::smart_resize(120, 200, 32, 65536, 16777216), (A{224, 352}));  // fixture image: min pixels
  EXPECT_EQ(vision::smart_resize(1000, 2000, 32, 65536, 16777216), (A{992, 1984}));  // 62.5 → 62 (ties to even)
  EXPECT_EQ(vision::smart_resize(10000, 10000, 32, 65536, 16777216), (A{4096, 4096}));  // max pixels
  EXPECT_EQ(vision::smart_resize(48, 80, 32, 0, 1 << 30), (A{64, 64}));  // round half to even: 1.5→2, 2.5→2
  EXPECT_ERROR(vision::smart_resize(10, 2001, 32, 65536, 16777216), "aspect ratio");
  EXPECT_ERROR(vision::smart_resize(0, 5, 32, 65536, 16777216), "expected positive");
}

TEST(VisionPreprocess, BicubicKeepsFlatImagesAndAntialiases) {
  Image flat;
  flat.width = 17;
  flat.height = 9;
  flat.rgb.assign(17 * 9 * 3, 77);
  for (auto prec : {vision::ResizePrecision::Pil, vision::ResizePrecision::Int16})
    for (auto [w, h] : {std::pair{40, 30}, {5, 3}, {17, 20}, {1, 1}}) {
      Image r = vision::resize_bicubic(flat, w, h, prec);
      ASSERT_EQ(r.width, w);
      for (auto v : r.rgb) EXPECT_EQ(v, 77);
    }
  // A 1-pixel checkerboard shrunk 4x averages to mid grey (antialiasing), not aliased black/white.
  Image cb;
  cb.width = cb.height = 64;
  cb.rgb.resize(64 * 64 * 3);
  for (int y = 0; y < 64; ++y)
    for (int x = 0; x < 64; ++x)
      for (int c = 0; c < 3; ++c) cb.rgb[(y * 64 + x) * 3 + c] = (x + y) % 2 ? 255 : 0;
  Image r = vision::resize_bicubic(cb, 16, 16, vision::ResizePrecision::Pil);
  for (int y = 2; y < 14; ++y)
    for (int x = 2; x < 14; ++x) EXPECT_NEAR(r.at(x, y, 0), 128, 2);
}

std::string fixture_dir(const std::string& fx) { return test::data_dir() + "/" + fx; }

vision::SourcePolicy any_file() {
  vision::SourcePolicy p;
  p.allow_any_file = true;
  return p;
}

TEST(VisionPreprocess, PixelValuesMatchReference) {
  auto img = vision::load_image(fixture_dir("tiny-moe") + "/image.png", any_file());
  auto cfg = vision::load_preprocess_config(fixture_dir("tiny-moe") + "/tiny-moe-bf16");
  EXPECT_EQ(cfg.min_pixels, 65536);
  EXPECT_EQ(cfg.max_pixels, 16777216);
  auto pv = vision::preprocess_image(img, cfg);
  test::Golden g(fixture_dir("tiny-moe") + "/golden.safetensors");
  std::vector<int64_t> shape;
  auto ref = g.f32("image.pixel_values", &shape);
  auto grid = g.f32("image.grid_thw");
  EXPECT_EQ(pv.grid.t, grid[0]);
  EXPECT_EQ(pv.grid.h, grid[1]);
  EXPECT_EQ(pv.grid.w, grid[2]);
  ASSERT_EQ(int64_t(pv.data.size()), shape[0] * shape[1]);
  double worst = 0;
  for (size_t i = 0; i < ref.size(); ++i) worst = std::max(worst, double(std::fabs(pv.data[i] - ref[i])));
  std::printf("  pixel_values [%lld, %lld]: max abs diff %.3g (one uint8 level = %.3g)\n", (long long)shape[0],
              (long long)shape[1], worst, 2.0 / 255);
  EXPECT_LT(worst, 1e-2);
  // PIL's own 22-bit arithmetic stays within two uint8 levels of the reference's int16 arithmetic.
  Image pil = vision::resize_bicubic(img, 352, 224, vision::ResizePrecision::Pil);
  Image ref16 = vision::resize_bicubic(img, 352, 224, vision::ResizePrecision::Int16);
  int diff = 0, count = 0;
  for (size_t i = 0; i < pil.rgb.size(); ++i) {
    diff = std::max(diff, std::abs(int(pil.rgb[i]) - ref16.rgb[i]));
    count += pil.rgb[i] != ref16.rgb[i];
  }
  std::printf("  PIL 22-bit vs int16 weights: %d of %zu values differ, max %d level(s)\n", count, pil.rgb.size(), diff);
  EXPECT_LE(diff, 2);
}

// Issue #7 item 1: decoding + preprocessing on more pictures than the fixture's 200x120 RGB PNG: other sizes and
// aspect ratios (very wide, smaller than one merge block, portrait) and file formats (grey, palette and RGBA PNG,
// JPEG with EXIF orientation 6, WebP). The pictures come from tools/make_test_images.py and the reference from
// transformers' image processor (tools/vision_ref_dump.py --compact), both committed under tests/data/vision/
// (see tests/data/README.md). Missing data is a failure, never a skip.
TEST(VisionPictures, PreprocessMatchesReferenceOnEveryPicture) {
  namespace fs = std::filesystem;
  const std::string vdir = test::data_dir() + "/vision";
  const std::vector<std::string> files = {"wide_1000x40.png", "small_20x12.png",   "small_36x33.png",
                                          "portrait_90x160.png", "grey_64x48.png", "palette_72x40.png",
                                          "rgba_60x44.png",   "exif6_80x48.jpg",   "lossless_50x70.webp"};
  for (auto p : std::vector<std::string>{"vision-ref.safetensors"})
    ASSERT_TRUE(fs::exists(vdir + "/" + p))
        << vdir + "/" + p << " is missing: the issue #7 reference data has not been added. Produce it with "
        << "tools/run_reference_dumps.sh OUTDIR on a machine with torch + transformers, copy OUTDIR/stage/vision "
        << "to tests/data/vision and run scripts/unpack-test-data.sh.";
  auto cfg = vision::load_preprocess_config(fixture_dir("tiny-moe") + "/tiny-moe-bf16");
  io::SafetensorsFile ref(vdir + "/vision-ref.safetensors");
  auto find = [&](const std::string& name) -> const io::TensorEntry* {
    for (auto& t : ref.header().tensors)
      if (t.name == name) return &t;
    return nullptr;
  };
  double worst_all = 0;
  for (const auto& file : files) {
    SCOPED_TRACE(file);
    const std::string name = file.substr(0, file.rfind('.'));
    ASSERT_TRUE(fs::exists(vdir + "/" + file)) << vdir + "/" + file << " is missing";
    Image img = vision::load_image(vdir + "/" + file, any_file());
    auto err = ref.header().metadata.find(name + ".error");
    if (err != ref.header().metadata.end()) {
      // The reference refused the picture: so must we, with an error rather than garbage.
      std::printf("  %s: the reference refused it (%s)\n", file.c_str(), err->second.c_str());
      EXPECT_THROW(vision::preprocess_image(img, cfg), Error)
          << "transformers refuses " << file << " (" << err->second << "); deltaserve preprocessed it";
      continue;
    }
    const io::TensorEntry* grid = find(name + ".grid_thw");
    ASSERT_NE(grid, nullptr) << "no " << name << ".grid_thw in the reference";
    ASSERT_EQ(grid->dtype, DType::I64);
    ASSERT_EQ(grid->numel(), 3);
    int64_t g[3];
    std::memcpy(g, grid->data, sizeof g);
    auto pv = vision::preprocess_image(img, cfg);
    EXPECT_EQ(pv.grid.t, g[0]);
    EXPECT_EQ(pv.grid.h, g[1]);
    EXPECT_EQ(pv.grid.w, g[2]);
    if (pv.grid.t != g[0] || pv.grid.h != g[1] || pv.grid.w != g[2]) continue;
    // Reference values: uint8 levels (value = (L / 255 − mean[c]) / std[c], exact to 1e-6 as the dump checked) or,
    // where the reference was not on that grid, float32 values.
    const int64_t D = cfg.patch_dim(), P = g[0] * g[1] * g[2];
    std::vector<float> want(size_t(P * D));
    if (const io::TensorEntry* lv = find(name + ".pixel_levels")) {
      ASSERT_EQ(lv->dtype, DType::U8);
      ASSERT_EQ(lv->shape, (std::vector<int64_t>{P, D}));
      for (int64_t i = 0; i < P * D; ++i) {
        const int c = int((i % D) / (D / 3));
        want[size_t(i)] = (float(lv->data[i]) * float(1.0 / 255.0) - cfg.mean[c]) / cfg.std[c];
      }
    } else {
      const io::TensorEntry* fv = find(name + ".pixel_values");
      ASSERT_NE(fv, nullptr) << "no " << name << ".pixel_levels or .pixel_values in the reference";
      ASSERT_EQ(fv->dtype, DType::F32);
      ASSERT_EQ(fv->shape, (std::vector<int64_t>{P, D}));
      std::memcpy(want.data(), fv->data, want.size() * 4);
    }
    ASSERT_EQ(pv.data.size(), want.size());
    double worst = 0;
    size_t differ = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      const double d = std::fabs(double(pv.data[i]) - want[i]);
      worst = std::max(worst, d);
      differ += d > 1e-6;
    }
    worst_all = std::max(worst_all, worst);
    std::printf("  %-20s %4dx%-4d -> grid [%lld, %lld, %lld]: max abs diff %.3g, %zu of %zu values differ\n",
                file.c_str(), int(img.width), int(img.height), (long long)g[0], (long long)g[1], (long long)g[2], worst, differ,
                want.size());
    EXPECT_LT(worst, 1e-2);
  }
  std::printf("  worst over all pictures: %.3g (one uint8 level = %.3g)\n", worst_all, 2.0 / 255);
}

TEST(VisionPreprocess, ConfigErrors) {
  EXPECT_ERROR(vision::parse_preprocess_config("{", "p.json"), "p.json: invalid JSON");
  EXPECT_ERROR(vision::parse_preprocess_config(R"({"patch_size": -1})", "p.json"), "'patch_size' expected a positive integer");
  EXPECT_ERROR(vision::parse_preprocess_config(R"({"image_mean": [1, 2]})", "p.json"), "array of 3 numbers");
}

// ---------------------------------------------------------------- placeholders and positions

std::vector<int32_t> collapse_pads(const std::vector<int32_t>& ids, int32_t pad) {
  std::vector<int32_t> out;
  for (auto t : ids)
    if (!(t == pad && !out.empty() && out.back() == pad)) out.push_back(t);
  return out;
}

TEST(VisionPrompt, ExpansionAndMropePositionsMatchReference) {
  auto golden = test::read_json(fixture_dir("tiny-moe") + "/golden.json");
  auto ids = golden["image"]["input_ids"].get<std::vector<int32_t>>();
  const int32_t pad = golden["special_tokens"]["<|image_pad|>"].get<int32_t>();
  std::vector<vision::ImageGrid> grids = {{1, 14, 22}};
  auto expanded = vision::expand_image_placeholders(collapse_pads(ids, pad), pad, grids, 2);
  EXPECT_EQ(expanded, ids);
  auto mp = vision::mrope_positions(expanded, pad, grids, 2);
  test::Golden g(fixture_dir("tiny-moe") + "/golden.safetensors");
  auto ref = g.f32("image.position_ids");
  ASSERT_EQ(mp.pos.size(), ref.size());
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_EQ(mp.pos[i], int32_t(ref[i])) << i;
  // Text after the image continues at max + 1: rope_delta = (max + 1) − T.
  EXPECT_EQ(mp.rope_delta, int64_t(*std::max_element(ref.begin(), ref.end())) + 1 - int64_t(ids.size()));
  // Two images, text between them.
  std::vector<int32_t> two = {5, pad, 6, 7, pad, 8};
  std::vector<vision::ImageGrid> g2 = {{1, 4, 6}, {1, 2, 2}};
  auto e2 = vision::expand_image_placeholders(two, pad, g2, 2);
  ASSERT_EQ(e2.size(), 6u + 5u + 0u);
  auto p2 = vision::mrope_positions(e2, pad, g2, 2);
  const int64_t T = int64_t(e2.size());
  // image 1 (2x3 merged) starts at 1: last token (r=1, c=2) → (1, 2, 3); then text at 1 + 3 = 4.
  EXPECT_EQ(p2.pos[6], 1);
  EXPECT_EQ(p2.pos[T + 6], 2);
  EXPECT_EQ(p2.pos[2 * T + 6], 3);
  EXPECT_EQ(p2.pos[7], 4);
  EXPECT_EQ(p2.pos[9], 6);  // image 2 (1x1) at 6, then text at 7
  EXPECT_EQ(p2.pos[10], 7);
  EXPECT_ERROR(vision::expand_image_placeholders(two, pad, {{1, 4, 6}}, 2), "2 image placeholder token(s)");
}

// ---------------------------------------------------------------- vision tower and image-prompt logits

struct VisionFixture {
  std::unique_ptr<Backend> be;
  std::unique_ptr<model::Model> m;
  std::unique_ptr<test::Golden> g;
  nlohmann::json golden;
};

VisionFixture& vfixture(const std::string& param) {
  static std::map<std::string, VisionFixture> cache;
  auto it = cache.find(param);
  if (it != cache.end()) return it->second;
  VisionFixture& f = cache[param];
  const std::string fx = param.substr(0, param.find('/')), variant = param.substr(param.find('/') + 1);
  f.be = make_cpu_backend();
  f.m = model::Model::load(fixture_dir(fx) + "/" + fx + "-" + variant, *f.be);
  f.g = std::make_unique<test::Golden>(fixture_dir(fx) + "/golden.safetensors");
  f.golden = test::read_json(fixture_dir(fx) + "/golden.json");
  return f;
}

// tiny-dense's golden has no pixel_values: it uses the same picture, so every fixture is fed tiny-moe's
// image.png through our own preprocessing.
vision::PixelValues fixture_pixels() {
  auto img = vision::load_image(fixture_dir("tiny-moe") + "/image.png", any_file());
  return vision::preprocess_image(img, vision::load_preprocess_config(fixture_dir("tiny-moe") + "/tiny-moe-bf16"));
}

class VisionGolden : public ::testing::TestWithParam<std::string> {
 protected:
  std::string variant() const { return GetParam().substr(GetParam().find('/') + 1); }
};

TEST_P(VisionGolden, FeaturesMatchReference) {
  auto& f = vfixture(GetParam());
  ASSERT_TRUE(f.m->has_vision());
  auto pv = fixture_pixels();
  auto ours = f.be->to_host_f32(f.m->encode_images(pv.data, {{pv.grid.t, pv.grid.h, pv.grid.w}}));
  std::vector<int64_t> shape;
  auto ref = f.g->f32(variant() + ".fp32.image.features", &shape);
  double err = test::rel_l2(ours, ref);
  std::printf("  %s image features [%lld, %lld]: rel L2 %.3g\n", GetParam().c_str(), (long long)shape[0],
              (long long)shape[1], err);
  EXPECT_LT(err, 1e-4);
}

TEST_P(VisionGolden, ImagePromptLogitsMatchReference) {
  auto& f = vfixture(GetParam());
  auto pv = fixture_pixels();
  const int32_t pad = int32_t(f.m->config().image_token_id);
  auto ids = f.golden["image"]["input_ids"].get<std::vector<int32_t>>();
  auto toks = vision::expand_image_placeholders(collapse_pads(ids, pad), pad, {pv.grid}, 2);
  ASSERT_EQ(toks, ids);
  auto mp = vision::mrope_positions(toks, pad, {pv.grid}, 2);
  Tensor feats = f.m->encode_images(pv.data, {{pv.grid.t, pv.grid.h, pv.grid.w}});
  const int64_t T = int64_t(toks.size()), V = f.m->config().text.vocab_size;
  runtime::CacheManager cm(*f.m, 16, 16, 1);
  runtime::SeqCache seq;
  cm.start(seq);
  ASSERT_TRUE(cm.reserve(seq, T));
  BatchMeta b = runtime::make_batch({{&seq, toks}});
  b.positions = mp.pos;
  for (int64_t i = 0; i < T; ++i)
    if (toks[i] == pad) b.embed_rows.push_back(int32_t(i));
  b.embed_src = feats;
  std::vector<int32_t> rows(static_cast<size_t>(T));
  for (int64_t i = 0; i < T; ++i) rows[i] = int32_t(i);
  auto ours = f.be->to_host_f32(f.m->forward(b, cm.caches(), rows));
  auto ref = f.g->f32(variant() + ".fp32.image.logits");
  ASSERT_EQ(int64_t(ours.size()), T * V);
  double err = test::rel_l2(ours, ref);
  std::printf("  %s image prompt logits [%lld, %lld]: rel L2 %.3g\n", GetParam().c_str(), (long long)T, (long long)V, err);
  EXPECT_LT(err, 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, VisionGolden, test::tiny_checkpoints(), test::CheckpointName());

// The same through the command line: `deltaserve logits --tokens <one image_pad> --image FILE`.
std::vector<float> read_f32(const std::string& path, const std::string& name, std::vector<int64_t>* shape) {
  io::SafetensorsFile f(path);
  for (auto& t : f.header().tensors)
    if (t.name == name) {
      *shape = t.shape;
      std::vector<float> v(size_t(t.numel()));
      std::memcpy(v.data(), t.data, v.size() * 4);
      return v;
    }
  throw std::runtime_error("missing " + name);
}

TEST(VisionCli, LogitsWithImageMatchReference) {
  for (std::string fx : {"tiny-moe", "tiny-dense"})
    for (std::string variant : {"bf16", "int4"}) {
      auto golden = test::read_json(fixture_dir(fx) + "/golden.json");
      const int32_t pad = golden["special_tokens"]["<|image_pad|>"].get<int32_t>();
      auto toks = collapse_pads(golden["image"]["input_ids"].get<std::vector<int32_t>>(), pad);
      std::string list;
      for (size_t i = 0; i < toks.size(); ++i) list += (i ? "," : "") + std::to_string(toks[i]);
      const std::string out = testing::TempDir() + "/vision_cli_" + fx + variant + ".safetensors";
      for (int prefill : {0, 40}) {  // 0: whole prompt in one call; 40: prefill splits the image run, then decode
        auto r = test::run_binary("logits --model " + fixture_dir(fx) + "/" + fx + "-" + variant + " --tokens " + list +
                                  " --image " + fixture_dir("tiny-moe") + "/image.png --out " + out +
                                  (prefill ? " --prefill " + std::to_string(prefill) : ""));
        ASSERT_EQ(r.code, 0) << r.out;
        std::vector<int64_t> shape;
        auto ours = read_f32(out, "logits", &shape);
        EXPECT_EQ(shape, (std::vector<int64_t>{91, 2048}));
        test::Golden g(fixture_dir(fx) + "/golden.safetensors");
        double err = test::rel_l2(ours, g.f32(variant + ".fp32.image.logits"));
        std::printf("  cli %s/%s --image (prefill %s): logits rel L2 %.3g\n", fx.c_str(), variant.c_str(),
                    prefill ? std::to_string(prefill).c_str() : "all", err);
        EXPECT_LT(err, 1e-4);
      }
    }
}

TEST(VisionCli, ImageErrorsAreClear) {
  const std::string model = fixture_dir("tiny-moe") + "/tiny-moe-bf16";
  auto run = [](const std::string& args) {
    auto r = test::run_binary(args);
    return std::make_pair(r.code, r.out);
  };
  auto [rc, log] = run("logits --model " + model + " --tokens 1,2 --image " + fixture_dir("tiny-moe") +
                       "/image.png --out /dev/null");
  EXPECT_NE(rc, 0);
  EXPECT_NE(log.find("0 image placeholder token(s)"), std::string::npos) << log;
  std::tie(rc, log) = run("logits --model " + model + " --tokens 1,1996 --image " + model + "/config.json --out /dev/null");
  EXPECT_NE(rc, 0);
  EXPECT_NE(log.find("unsupported format"), std::string::npos) << log;
}

}  // namespace
}  // namespace ds
