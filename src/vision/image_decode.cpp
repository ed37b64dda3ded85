// PNG (libpng), JPEG (libjpeg-turbo) and WebP (libwebp) decoding to RGB, alpha compositing over white and
// EXIF orientation. libpng and libjpeg report errors by longjmp: the functions that call them keep no C++
// object whose state changes after setjmp in a register (all output goes through a pointer set up before).
#include <algorithm>
#include <csetjmp>
#include <cstddef>
#include <cstdio>
#include <cstring>

// jpeglib.h needs size_t and FILE declared first.
#include <jpeglib.h>
#include <jerror.h>
#include <png.h>
#include <webp/decode.h>

#include "core/status.h"
#include "vision/image.h"

namespace ds::vision {

ImageFormat sniff_format(const uint8_t* d, size_t n) {
  static const uint8_t png_sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (n >= 8 && std::memcmp(d, png_sig, 8) == 0) return ImageFormat::Png;
  if (n >= 3 && d[0] == 0xFF && d[1] == 0xD8 && d[2] == 0xFF) return ImageFormat::Jpeg;
  if (n >= 12 && std::memcmp(d, "RIFF", 4) == 0 && std::memcmp(d + 8, "WEBP", 4) == 0) return ImageFormat::Webp;
  return ImageFormat::Unknown;
}

const char* format_name(ImageFormat f) {
  switch (f) {
    case ImageFormat::Png: return "PNG";
    case ImageFormat::Jpeg: return "JPEG";
    case ImageFormat::Webp: return "WebP";
    default: return "unknown";
  }
}

namespace {

void check_dims(const char* fmt, int64_t w, int64_t h, const DecodeLimits& lim) {
  if (w <= 0 || h <= 0) fail("image: ", fmt, " has size ", w, "x", h, ", expected a positive width and height");
  if (w > lim.max_side || h > lim.max_side)
    fail("image: ", fmt, " is ", w, "x", h, ", larger than the limit of ", lim.max_side, " pixels per side");
  if (w * h > lim.max_pixels)
    fail("image: ", fmt, " has ", w * h, " pixels (", w, "x", h, "), more than the limit of ", lim.max_pixels);
}

// PIL Image.alpha_composite(white, src) then .convert("RGB"), with its integer arithmetic (AlphaComposite.c,
// 7 extra bits, rounded divisions by 255). On an opaque white background this reduces to the formula below.
inline uint8_t over_white(uint8_t c, uint8_t a) {
  if (a == 0) return 255;
  const uint32_t coef1 = uint32_t(a) * 128u, coef2 = 255u * 128u - coef1;
  uint32_t t = uint32_t(c) * coef1 + 255u * coef2 + (0x80u << 7);
  t = ((t >> 8) + t) >> 8;
  return uint8_t(t >> 7);
}

void rgba_to_rgb_over_white(const uint8_t* rgba, int64_t npix, uint8_t* rgb) {
  for (int64_t i = 0; i < npix; ++i) {
    const uint8_t a = rgba[4 * i + 3];
    for (int c = 0; c < 3; ++c) rgb[3 * i + c] = over_white(rgba[4 * i + c], a);
  }
}

// ---------------------------------------------------------------- PNG

struct PngCtx {
  const uint8_t* data;
  size_t n, pos;
  char err[200];
  jmp_buf jb;
};

void png_err(png_structp p, png_const_charp msg) {
  auto* c = static_cast<PngCtx*>(png_get_error_ptr(p));
  std::snprintf(c->err, sizeof c->err, "%s", msg);
  longjmp(c->jb, 1);
}
void png_warn(png_structp, png_const_charp) {}
void png_read_mem(png_structp p, png_bytep out, png_size_t len) {
  auto* c = static_cast<PngCtx*>(png_get_io_ptr(p));
  if (len > c->n - c->pos) png_error(p, "truncated data (unexpected end of file)");
  std::memcpy(out, c->data + c->pos, len);
  c->pos += len;
}

struct PngOut {
  int64_t w = 0, h = 0;
  int channels = 0;
  std::vector<uint8_t> px;
  std::vector<png_bytep> rows;
};

// Returns "" on success, else the libpng or limit message.
std::string png_decode_raw(PngCtx* ctx, PngOut* out, const DecodeLimits* lim) {
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, ctx, png_err, png_warn);
  if (!png) return "out of memory";
  png_infop info = png_create_info_struct(png);
  if (!info) {
    png_destroy_read_struct(&png, nullptr, nullptr);
    return "out of memory";
  }
  if (setjmp(ctx->jb)) {
    png_destroy_read_struct(&png, &info, nullptr);
    return ctx->err;
  }
  png_set_read_fn(png, ctx, png_read_mem);
  png_set_user_limits(png, 0x7fffffff, 0x7fffffff);
  png_read_info(png, info);
  const png_uint_32 w = png_get_image_width(png, info), h = png_get_image_height(png, info);
  const int64_t npix = int64_t(w) * int64_t(h);
  if (w == 0 || h == 0 || int64_t(w) > lim->max_side || int64_t(h) > lim->max_side || npix > lim->max_pixels) {
    std::snprintf(ctx->err, sizeof ctx->err, "@dims %u %u", unsigned(w), unsigned(h));
    png_destroy_read_struct(&png, &info, nullptr);
    return ctx->err;
  }
  const int color = png_get_color_type(png, info);
  png_set_strip_16(png);  // keep the high byte of 16-bit samples (PIL's RGB;16B unpacker does the same)
  png_set_packing(png);
  if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if (color == PNG_COLOR_TYPE_GRAY) png_set_expand_gray_1_2_4_to_8(png);
  if (png_get_valid(png, info, PNG_INFO_tRNS)) png_set_tRNS_to_alpha(png);
  if (color == PNG_COLOR_TYPE_GRAY || color == PNG_COLOR_TYPE_GRAY_ALPHA) png_set_gray_to_rgb(png);
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  out->channels = png_get_channels(png, info);
  if (out->channels != 3 && out->channels != 4) png_error(png, "unexpected channel count after conversion");
  out->w = w;
  out->h = h;
  out->px.resize(size_t(npix) * out->channels);
  out->rows.resize(h);
  for (png_uint_32 y = 0; y < h; ++y) out->rows[y] = out->px.data() + size_t(y) * w * out->channels;
  png_read_image(png, out->rows.data());
  png_read_end(png, nullptr);
  png_destroy_read_struct(&png, &info, nullptr);
  return "";
}

Image decode_png(const uint8_t* data, size_t n, const DecodeLimits& lim) {
  // A zero width or height is "Invalid IHDR data" to libpng; say what it is (IHDR follows the signature).
  if (n >= 24 && std::memcmp(data + 12, "IHDR", 4) == 0) {
    auto be32 = [&](size_t o) { return uint32_t(data[o]) << 24 | uint32_t(data[o + 1]) << 16 | uint32_t(data[o + 2]) << 8 | data[o + 3]; };
    if (be32(16) == 0 || be32(20) == 0) check_dims("PNG", be32(16), be32(20), lim);
  }
  PngCtx ctx{data, n, 0, {}, {}};
  PngOut out;
  std::string err = png_decode_raw(&ctx, &out, &lim);
  if (err.rfind("@dims ", 0) == 0) {
    unsigned w = 0, h = 0;
    std::sscanf(err.c_str() + 6, "%u %u", &w, &h);
    check_dims("PNG", w, h, lim);
  }
  if (!err.empty()) fail("image: corrupt or truncated PNG (", n, " bytes): ", err);
  Image im;
  im.width = out.w;
  im.height = out.h;
  if (out.channels == 3) {
    im.rgb = std::move(out.px);
  } else {
    im.rgb.resize(size_t(out.w * out.h * 3));
    rgba_to_rgb_over_white(out.px.data(), out.w * out.h, im.rgb.data());
  }
  return im;
}

// ---------------------------------------------------------------- JPEG

struct JpegErr {
  jpeg_error_mgr mgr;
  jmp_buf jb;
  char msg[JMSG_LENGTH_MAX];
  bool truncated;
};

void jpeg_err_exit(j_common_ptr c) {
  auto* e = reinterpret_cast<JpegErr*>(c->err);
  (*c->err->format_message)(c, e->msg);
  longjmp(e->jb, 1);
}
// Warnings: a premature end of data is an error for us (PIL raises "image file is truncated"); other
// recoverable warnings (extraneous bytes before a marker) are tolerated as PIL tolerates them.
void jpeg_emit(j_common_ptr c, int level) {
  auto* e = reinterpret_cast<JpegErr*>(c->err);
  if (level < 0 && c->err->msg_code == JWRN_JPEG_EOF) {
    e->truncated = true;
    (*c->err->format_message)(c, e->msg);
  }
}

struct JpegOut {
  int64_t w = 0, h = 0;
  int orientation = 1;
  bool cmyk = false, adobe = false;
  std::vector<uint8_t> px;
};

// TIFF/EXIF: IFD0 tag 0x0112 (Orientation, SHORT). Returns 1 when absent or malformed.
int exif_orientation(const uint8_t* d, size_t n) {
  if (n < 14 || std::memcmp(d, "Exif\0\0", 6) != 0) return 1;
  const uint8_t* t = d + 6;
  const size_t tn = n - 6;
  bool le;
  if (t[0] == 'I' && t[1] == 'I') le = true;
  else if (t[0] == 'M' && t[1] == 'M') le = false;
  else return 1;
  auto u16 = [&](size_t o) -> uint32_t { return le ? t[o] | (t[o + 1] << 8) : (t[o] << 8) | t[o + 1]; };
  auto u32 = [&](size_t o) -> uint32_t {
    return le ? uint32_t(t[o]) | (uint32_t(t[o + 1]) << 8) | (uint32_t(t[o + 2]) << 16) | (uint32_t(t[o + 3]) << 24)
              : (uint32_t(t[o]) << 24) | (uint32_t(t[o + 1]) << 16) | (uint32_t(t[o + 2]) << 8) | uint32_t(t[o + 3]);
  };
  if (u16(2) != 42) return 1;
  const size_t ifd = u32(4);
  if (ifd + 2 > tn) return 1;
  const uint32_t count = u16(ifd);
  for (uint32_t i = 0; i < count; ++i) {
    const size_t e = ifd + 2 + size_t(i) * 12;
    if (e + 12 > tn) return 1;
    if (u16(e) == 0x0112 && u16(e + 2) == 3) {
      uint32_t v = u16(e + 8);
      return v >= 1 && v <= 8 ? int(v) : 1;
    }
  }
  return 1;
}

std::string jpeg_decode_raw(const uint8_t* data, size_t n, JpegOut* out, const DecodeLimits* lim) {
  jpeg_decompress_struct cinfo;
  JpegErr jerr;
  cinfo.err = jpeg_std_error(&jerr.mgr);
  jerr.mgr.error_exit = jpeg_err_exit;
  jerr.mgr.emit_message = jpeg_emit;
  jerr.truncated = false;
  jerr.msg[0] = 0;
  jpeg_create_decompress(&cinfo);
  if (setjmp(jerr.jb)) {
    jpeg_destroy_decompress(&cinfo);
    return jerr.msg;
  }
  jpeg_mem_src(&cinfo, data, static_cast<unsigned long>(n));
  jpeg_save_markers(&cinfo, JPEG_APP0 + 1, 0xFFFF);
  jpeg_read_header(&cinfo, TRUE);
  if (jerr.truncated) {
    jpeg_destroy_decompress(&cinfo);
    return std::string("truncated data: ") + jerr.msg;
  }
  const int64_t w = cinfo.image_width, h = cinfo.image_height;
  if (w <= 0 || h <= 0 || w > lim->max_side || h > lim->max_side || w * h > lim->max_pixels) {
    jpeg_destroy_decompress(&cinfo);
    std::snprintf(jerr.msg, sizeof jerr.msg, "@dims %lld %lld", (long long)w, (long long)h);
    return jerr.msg;
  }
  for (jpeg_saved_marker_ptr m = cinfo.marker_list; m; m = m->next)
    if (m->marker == JPEG_APP0 + 1) {
      int o = exif_orientation(m->data, m->data_length);
      if (o != 1) {
        out->orientation = o;
        break;
      }
    }
  out->cmyk = cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK;
  out->adobe = cinfo.saw_Adobe_marker;
  cinfo.out_color_space = out->cmyk ? JCS_CMYK : JCS_RGB;
  jpeg_start_decompress(&cinfo);
  const int comps = cinfo.output_components;
  out->w = cinfo.output_width;
  out->h = cinfo.output_height;
  out->px.resize(size_t(out->w * out->h * comps));
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW row = out->px.data() + size_t(cinfo.output_scanline) * out->w * comps;
    jpeg_read_scanlines(&cinfo, &row, 1);
    if (jerr.truncated) break;
  }
  if (jerr.truncated) {
    jpeg_destroy_decompress(&cinfo);
    return std::string("truncated data: ") + jerr.msg;
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return "";
}

// PIL ImageOps.exif_transpose for orientations 2..8.
Image apply_orientation(const Image& in, int o) {
  if (o == 1) return in;
  const int64_t W = in.width, H = in.height;
  const bool swap = o >= 5;
  Image out;
  out.width = swap ? H : W;
  out.height = swap ? W : H;
  out.rgb.resize(in.rgb.size());
  for (int64_t y = 0; y < out.height; ++y)
    for (int64_t x = 0; x < out.width; ++x) {
      int64_t sx = x, sy = y;
      switch (o) {
        case 2: sx = W - 1 - x; sy = y; break;              // FLIP_LEFT_RIGHT
        case 3: sx = W - 1 - x; sy = H - 1 - y; break;      // ROTATE_180
        case 4: sx = x; sy = H - 1 - y; break;              // FLIP_TOP_BOTTOM
        case 5: sx = y; sy = x; break;                      // TRANSPOSE
        case 6: sx = y; sy = H - 1 - x; break;              // ROTATE_270 (90° clockwise)
        case 7: sx = W - 1 - y; sy = H - 1 - x; break;      // TRANSVERSE
        case 8: sx = W - 1 - y; sy = x; break;              // ROTATE_90 (90° counter-clockwise)
      }
      std::memcpy(&out.rgb[size_t((y * out.width + x) * 3)], &in.rgb[size_t((sy * W + sx) * 3)], 3);
    }
  return out;
}

Image decode_jpeg(const uint8_t* data, size_t n, const DecodeLimits& lim) {
  JpegOut out;
  std::string err = jpeg_decode_raw(data, n, &out, &lim);
  if (err.rfind("@dims ", 0) == 0) {
    long long w = 0, h = 0;
    std::sscanf(err.c_str() + 6, "%lld %lld", &w, &h);
    check_dims("JPEG", w, h, lim);
  }
  if (!err.empty()) fail("image: corrupt or truncated JPEG (", n, " bytes): ", err);
  Image im;
  im.width = out.w;
  im.height = out.h;
  if (!out.cmyk) {
    im.rgb = std::move(out.px);
  } else {
    // Adobe CMYK JPEGs store inverted ink values. PIL's cmyk2rgb: R = (255 − K) − C·(255 − K)/255, with its
    // rounded division by 255.
    im.rgb.resize(size_t(out.w * out.h * 3));
    for (int64_t i = 0; i < out.w * out.h; ++i) {
      int k = out.px[4 * i + 3];
      if (out.adobe) k = 255 - k;
      const int nk = 255 - k;
      for (int c = 0; c < 3; ++c) {
        int v = out.px[4 * i + c];
        if (out.adobe) v = 255 - v;
        const int t = v * nk + 128;
        im.rgb[3 * i + c] = uint8_t(std::max(0, nk - (((t >> 8) + t) >> 8)));
      }
    }
  }
  return apply_orientation(im, out.orientation);
}

// ---------------------------------------------------------------- WebP

Image decode_webp(const uint8_t* data, size_t n, const DecodeLimits& lim) {
  WebPBitstreamFeatures f;
  VP8StatusCode st = WebPGetFeatures(data, n, &f);
  if (st == VP8_STATUS_NOT_ENOUGH_DATA) fail("image: truncated WebP (", n, " bytes): header incomplete");
  if (st != VP8_STATUS_OK) fail("image: corrupt WebP (", n, " bytes): bitstream status ", int(st));
  if (f.has_animation) fail("image: animated WebP is not supported (expected a still image)");
  check_dims("WebP", f.width, f.height, lim);
  Image im;
  im.width = f.width;
  im.height = f.height;
  const int64_t npix = im.width * im.height;
  im.rgb.resize(size_t(npix * 3));
  if (f.has_alpha) {
    std::vector<uint8_t> rgba(size_t(npix * 4));
    if (!WebPDecodeRGBAInto(data, n, rgba.data(), rgba.size(), int(im.width * 4)))
      fail("image: corrupt or truncated WebP (", n, " bytes): decoding failed");
    rgba_to_rgb_over_white(rgba.data(), npix, im.rgb.data());
  } else if (!WebPDecodeRGBInto(data, n, im.rgb.data(), im.rgb.size(), int(im.width * 3))) {
    fail("image: corrupt or truncated WebP (", n, " bytes): decoding failed");
  }
  return im;
}

}  // namespace

Image decode_image(const uint8_t* data, size_t n, const DecodeLimits& lim) {
  if (n == 0) fail("image: empty data (0 bytes), expected a PNG, JPEG or WebP file");
  if (n > lim.max_bytes) fail("image: ", n, " bytes, more than the limit of ", lim.max_bytes, " bytes");
  switch (sniff_format(data, n)) {
    case ImageFormat::Png: return decode_png(data, n, lim);
    case ImageFormat::Jpeg: return decode_jpeg(data, n, lim);
    case ImageFormat::Webp: return decode_webp(data, n, lim);
    default: break;
  }
  char head[64] = {0};
  size_t k = 0;
  for (size_t i = 0; i < n && i < 8; ++i) k += size_t(std::snprintf(head + k, sizeof head - k, "%s%02x", i ? " " : "", data[i]));
  const char* hint = n >= 6 && std::memcmp(data, "GIF8", 4) == 0 ? " (GIF)" : n >= 2 && data[0] == 'B' && data[1] == 'M' ? " (BMP)" : "";
  fail("image: unsupported format", hint, ": expected PNG, JPEG or WebP data, found bytes ", head);
}

}  // namespace ds::vision
