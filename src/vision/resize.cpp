// PIL's 8-bit bicubic resampling (Image.resize(..., BICUBIC)), written from its published algorithm:
// per output pixel a window of input pixels weighted by the Keys cubic (a = −0.5) evaluated at
// (input centre − output centre)/filterscale, normalised to sum 1, then rounded to fixed point (22 fractional
// bits in PIL; the largest precision whose biggest weight fits int16 in torch's uint8 antialias kernels).
// The horizontal pass runs first and is rounded to uint8; the vertical pass reads that uint8 image.
#include <algorithm>
#include <cmath>

#include "core/status.h"
#include "vision/image.h"

namespace ds::vision {

namespace {

constexpr int kPilPrecisionBits = 32 - 8 - 2;

double cubic(double x) {
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
  return 0.0;
}

struct Coeffs {
  int64_t ksize = 0;
  int bits = kPilPrecisionBits;       // fractional bits of k
  std::vector<int64_t> xmin, xcount;  // per output pixel: first input index, number of taps
  std::vector<int32_t> k;             // [out, ksize] fixed point
};

Coeffs precompute(int64_t in_size, int64_t out_size, ResizePrecision prec) {
  const double scale = double(in_size) / double(out_size);
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = 2.0 * filterscale;
  Coeffs c;
  c.ksize = int64_t(std::ceil(support)) * 2 + 1;
  c.xmin.resize(size_t(out_size));
  c.xcount.resize(size_t(out_size));
  std::vector<double> w(size_t(out_size * c.ksize), 0.0);
  double wmax = 0.0;
  for (int64_t xx = 0; xx < out_size; ++xx) {
    const double center = (double(xx) + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int64_t xmin = int64_t(center - support + 0.5);  // truncation toward zero, as PIL's (int) cast
    if (xmin < 0) xmin = 0;
    int64_t xmax = int64_t(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double* wr = &w[size_t(xx * c.ksize)];
    double ww = 0.0;
    for (int64_t x = 0; x < xmax; ++x) {
      wr[x] = cubic((double(x + xmin) - center + 0.5) * ss);
      ww += wr[x];
    }
    for (int64_t x = 0; x < xmax; ++x) {
      if (ww != 0.0) wr[x] /= ww;
      wmax = std::max(wmax, std::fabs(wr[x]));
    }
    c.xmin[xx] = xmin;
    c.xcount[xx] = xmax;
  }
  if (prec == ResizePrecision::Int16) {
    // torch (ported from Pillow-SIMD): the largest precision < 22 bits at which the biggest weight stays
    // below 2^15 after rounding.
    int b = 0;
    for (; b < kPilPrecisionBits; ++b)
      if (int64_t(0.5 + wmax * double(int64_t(1) << (b + 1))) >= (1 << 15)) break;
    c.bits = b;
  }
  c.k.resize(w.size());
  const double one = double(int64_t(1) << c.bits);
  for (size_t i = 0; i < w.size(); ++i) c.k[i] = int32_t(w[i] < 0 ? -0.5 + w[i] * one : 0.5 + w[i] * one);
  return c;
}

inline uint8_t clip8(int64_t v, int bits) {
  if (v >= (int64_t(1) << bits << 8)) return 255;
  if (v <= 0) return 0;
  return uint8_t(v >> bits);
}

}  // namespace

Image resize_bicubic(const Image& in, int64_t W, int64_t H, ResizePrecision prec) {
  if (W <= 0 || H <= 0) fail("resize: target size ", W, "x", H, ", expected positive");
  if (in.width <= 0 || in.height <= 0) fail("resize: empty source image ", in.width, "x", in.height);
  Image cur = in;
  if (W != in.width) {
    const Coeffs c = precompute(in.width, W, prec);
    Image tmp;
    tmp.width = W;
    tmp.height = in.height;
    tmp.rgb.resize(size_t(W * in.height * 3));
#pragma omp parallel for
    for (int64_t y = 0; y < in.height; ++y)
      for (int64_t xx = 0; xx < W; ++xx) {
        const int32_t* k = &c.k[size_t(xx * c.ksize)];
        for (int ch = 0; ch < 3; ++ch) {
          int64_t ss = int64_t(1) << (c.bits - 1);
          for (int64_t x = 0; x < c.xcount[xx]; ++x) ss += int64_t(in.at(c.xmin[xx] + x, y, ch)) * k[x];
          tmp.rgb[size_t((y * W + xx) * 3 + ch)] = clip8(ss, c.bits);
        }
      }
    cur = std::move(tmp);
  }
  if (H != in.height) {
    const Coeffs c = precompute(in.height, H, prec);
    Image out;
    out.width = cur.width;
    out.height = H;
    out.rgb.resize(size_t(cur.width * H * 3));
#pragma omp parallel for
    for (int64_t yy = 0; yy < H; ++yy) {
      const int32_t* k = &c.k[size_t(yy * c.ksize)];
      for (int64_t x = 0; x < cur.width; ++x)
        for (int ch = 0; ch < 3; ++ch) {
          int64_t ss = int64_t(1) << (c.bits - 1);
          for (int64_t y = 0; y < c.xcount[yy]; ++y) ss += int64_t(cur.at(x, c.xmin[yy] + y, ch)) * k[y];
          out.rgb[size_t((yy * cur.width + x) * 3 + ch)] = clip8(ss, c.bits);
        }
    }
    cur = std::move(out);
  }
  return cur;
}

}  // namespace ds::vision
