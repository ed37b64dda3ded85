// Images at the request boundary: bytes (PNG, JPEG, WebP) → 8-bit RGB, from data: URLs or local files, and
// PIL-exact bicubic resampling. Every bad input is a ds::Error that says what was expected and what was found.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ds::vision {

// 8-bit RGB, row-major, 3 bytes per pixel (R, G, B), no padding: rgb.size() == width·height·3.
struct Image {
  int64_t width = 0, height = 0;
  std::vector<uint8_t> rgb;
  uint8_t at(int64_t x, int64_t y, int c) const { return rgb[size_t((y * width + x) * 3 + c)]; }
};

// Limits applied before any pixel memory is allocated (decompression bombs) and to the encoded bytes.
struct DecodeLimits {
  size_t max_bytes = size_t(32) << 20;       // encoded size
  int64_t max_pixels = int64_t(1) << 26;     // width·height of the decoded image (64 Mpx)
  int64_t max_side = 1 << 16;                // either dimension
};

enum class ImageFormat { Unknown, Png, Jpeg, Webp };
// From the magic bytes; never from a file name or a declared media type.
ImageFormat sniff_format(const uint8_t* data, size_t n);
const char* format_name(ImageFormat f);

// Decodes PNG, JPEG or WebP bytes to RGB the way the reference (PIL + transformers' convert_to_rgb) does:
// grey and palette images are expanded, 16-bit samples keep their high byte, images with alpha (RGBA, grey +
// alpha, palette or grey with tRNS) are composited over white with PIL's alpha_composite integer arithmetic,
// and a JPEG's EXIF orientation (tag 0x0112) is applied like PIL's ImageOps.exif_transpose.
// Truncated or corrupt data, zero-sized images, animated WebP and other formats are errors.
Image decode_image(const uint8_t* data, size_t n, const DecodeLimits& lim = {});
inline Image decode_image(const std::vector<uint8_t>& bytes, const DecodeLimits& lim = {}) {
  return decode_image(bytes.data(), bytes.size(), lim);
}

// Standard base64 (RFC 4648 alphabet, '=' padding optional, ASCII whitespace ignored); an error names the
// first offending character and its offset.
std::vector<uint8_t> base64_decode(std::string_view s);

// Where images may come from. `data:` URLs are always accepted. Local files (a plain path or file:// URL) only
// if `allow_any_file`, or if their canonical path (symlinks resolved) lies inside one of `allowed_dirs`.
// http(s) URLs are not fetched here (an error says so).
struct SourcePolicy {
  bool allow_any_file = false;
  std::vector<std::string> allowed_dirs;
  DecodeLimits limits;
};

// Reads the encoded bytes named by `ref` (data: URL, file:// URL or path) under `policy`.
std::vector<uint8_t> read_image_bytes(const std::string& ref, const SourcePolicy& policy);
// read_image_bytes + decode_image.
Image load_image(const std::string& ref, const SourcePolicy& policy);

// Fixed-point precision of the resampling weights. Pil: 22 fractional bits (Pillow's Resample.c). Int16: the
// largest precision at which every weight fits int16 (14 bits when upscaling), as torch's uint8 antialias
// kernels do (torchvision F.resize(antialias=True) on uint8, used by transformers' Qwen2-VL image processor);
// this is what the reference fixtures were made with (bit-exact on tests/data/tiny-moe/image.png, where Pil
// differs by one level in 0.26% of the values and by two in one).
enum class ResizePrecision { Pil, Int16 };

// PIL's Image.resize(size, Image.BICUBIC) algorithm for 8-bit images: separable (horizontal pass first, rounded
// to uint8 in between), Keys cubic with a = −0.5, support 2 widened by the scale when shrinking (antialias),
// coefficients normalised then rounded to fixed point, results rounded and clipped. Bit-exact with Pillow for
// ResizePrecision::Pil.
Image resize_bicubic(const Image& in, int64_t out_width, int64_t out_height,
                     ResizePrecision prec = ResizePrecision::Int16);

}  // namespace ds::vision
