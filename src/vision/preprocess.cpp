#include "vision/preprocess.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/status.h"

namespace ds::vision {

PreprocessConfig parse_preprocess_config(const std::string& text, const std::string& what) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const std::exception& e) {
    fail(what, ": invalid JSON: ", e.what());
  }
  if (!j.is_object()) fail(what, ": expected a JSON object");
  PreprocessConfig c;
  auto get_int = [&](const nlohmann::json& o, const char* key, int64_t& dst, const std::string& path) {
    if (!o.contains(key)) return;
    if (!o[key].is_number_integer() || o[key].get<int64_t>() <= 0)
      fail(what, ": '", path, "' expected a positive integer, found ", o[key].dump());
    dst = o[key].get<int64_t>();
  };
  get_int(j, "patch_size", c.patch_size, "patch_size");
  get_int(j, "temporal_patch_size", c.temporal_patch_size, "temporal_patch_size");
  get_int(j, "merge_size", c.merge_size, "merge_size");
  get_int(j, "min_pixels", c.min_pixels, "min_pixels");
  get_int(j, "max_pixels", c.max_pixels, "max_pixels");
  if (j.contains("size") && j["size"].is_object()) {
    get_int(j["size"], "shortest_edge", c.min_pixels, "size.shortest_edge");
    get_int(j["size"], "longest_edge", c.max_pixels, "size.longest_edge");
  }
  for (const char* key : {"image_mean", "image_std"}) {
    if (!j.contains(key)) continue;
    const auto& a = j[key];
    if (!a.is_array() || a.size() != 3)
      fail(what, ": '", key, "' expected an array of 3 numbers, found ", a.dump());
    for (int i = 0; i < 3; ++i) {
      if (!a[i].is_number()) fail(what, ": '", key, "' expected numbers, found ", a.dump());
      (std::string(key) == "image_mean" ? c.mean : c.std)[i] = a[i].get<float>();
    }
  }
  for (float s : c.std)
    if (s == 0.f) fail(what, ": image_std has a zero entry");
  if (c.min_pixels > c.max_pixels) fail(what, ": min pixels ", c.min_pixels, " > max pixels ", c.max_pixels);
  return c;
}

PreprocessConfig load_preprocess_config(const std::string& dir) {
  const std::string path = dir + "/preprocessor_config.json";
  if (!std::filesystem::exists(path)) return {};
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return parse_preprocess_config(ss.str(), path);
}

std::array<int64_t, 2> smart_resize(int64_t height, int64_t width, int64_t factor, int64_t min_pixels,
                                    int64_t max_pixels) {
  if (height <= 0 || width <= 0) fail("smart_resize: image size ", width, "x", height, ", expected positive");
  const double h = double(height), w = double(width);
  if (std::max(h, w) / std::min(h, w) > 200)
    fail("smart_resize: aspect ratio ", std::max(h, w) / std::min(h, w), " of a ", width, "x", height,
         " image exceeds the limit of 200");
  const double f = double(factor);
  // Python's round(): ties to even (the default floating-point rounding mode).
  int64_t hb = int64_t(std::nearbyint(h / f)) * factor, wb = int64_t(std::nearbyint(w / f)) * factor;
  if (hb * wb > max_pixels) {
    const double beta = std::sqrt(h * w / double(max_pixels));
    hb = std::max<int64_t>(factor, int64_t(std::floor(h / beta / f)) * factor);
    wb = std::max<int64_t>(factor, int64_t(std::floor(w / beta / f)) * factor);
  } else if (hb * wb < min_pixels) {
    const double beta = std::sqrt(double(min_pixels) / (h * w));
    hb = int64_t(std::ceil(h * beta / f)) * factor;
    wb = int64_t(std::ceil(w * beta / f)) * factor;
  }
  return {hb, wb};
}

PixelValues preprocess_image(const Image& img, const PreprocessConfig& cfg) {
  const auto [H, W] = smart_resize(img.height, img.width, cfg.factor(), cfg.min_pixels, cfg.max_pixels);
  const Image r = (H == img.height && W == img.width) ? img : resize_bicubic(img, W, H);
  const int64_t ps = cfg.patch_size, tp = cfg.temporal_patch_size, m = cfg.merge_size;
  PixelValues pv;
  pv.grid = {1, H / ps, W / ps};
  const int64_t D = cfg.patch_dim();
  pv.data.resize(size_t(pv.grid.patches() * D));
  // Normalised plane per channel: the reference rescales (·1/255, fp32) then normalises.
  const float rescale = float(1.0 / 255.0);
  std::vector<float> lut(256 * 3);
  for (int c = 0; c < 3; ++c)
    for (int v = 0; v < 256; ++v) lut[c * 256 + v] = (float(v) * rescale - cfg.mean[c]) / cfg.std[c];
  const int64_t gh = pv.grid.h, gw = pv.grid.w;
  int64_t row = 0;
  for (int64_t bh = 0; bh < gh / m; ++bh)
    for (int64_t bw = 0; bw < gw / m; ++bw)
      for (int64_t mh = 0; mh < m; ++mh)
        for (int64_t mw = 0; mw < m; ++mw, ++row) {
          const int64_t y0 = (bh * m + mh) * ps, x0 = (bw * m + mw) * ps;
          float* out = pv.data.data() + row * D;
          for (int c = 0; c < 3; ++c)
            for (int64_t t = 0; t < tp; ++t)  // the single frame repeated temporal_patch_size times
              for (int64_t py = 0; py < ps; ++py)
                for (int64_t px = 0; px < ps; ++px)
                  *out++ = lut[c * 256 + r.at(x0 + px, y0 + py, c)];
        }
  return pv;
}

std::vector<int32_t> expand_image_placeholders(const std::vector<int32_t>& tokens, int32_t image_token,
                                               const std::vector<ImageGrid>& grids, int64_t merge) {
  const size_t n = size_t(std::count(tokens.begin(), tokens.end(), image_token));
  if (n != grids.size())
    fail("prompt has ", n, " image placeholder token(s) (id ", image_token, "), expected one per image: ",
         grids.size(), " image(s)");
  std::vector<int32_t> out;
  size_t k = 0;
  for (int32_t t : tokens) {
    if (t != image_token) {
      out.push_back(t);
      continue;
    }
    out.insert(out.end(), size_t(grids[k++].tokens(merge)), image_token);
  }
  return out;
}

MropePositions mrope_positions(const std::vector<int32_t>& tokens, int32_t image_token,
                               const std::vector<ImageGrid>& grids, int64_t merge) {
  const int64_t T = int64_t(tokens.size());
  MropePositions r;
  r.pos.assign(size_t(3 * T), 0);
  int64_t cur = 0, i = 0, maxp = -1;
  size_t k = 0;
  auto put = [&](int64_t at, int64_t pt, int64_t ph, int64_t pw) {
    r.pos[size_t(at)] = int32_t(pt);
    r.pos[size_t(T + at)] = int32_t(ph);
    r.pos[size_t(2 * T + at)] = int32_t(pw);
    maxp = std::max({maxp, pt, ph, pw});
  };
  while (i < T) {
    if (tokens[i] != image_token) {
      put(i, cur, cur, cur);
      ++cur;
      ++i;
      continue;
    }
    if (k >= grids.size()) fail("mrope: more image placeholder runs than the ", grids.size(), " image grid(s)");
    const ImageGrid& g = grids[k++];
    const int64_t lh = g.h / merge, lw = g.w / merge, n = g.t * lh * lw;
    if (i + n > T) fail("mrope: image ", k - 1, " needs ", n, " placeholder tokens, only ", T - i, " remain");
    for (int64_t j = 0; j < n; ++j) {
      if (tokens[i + j] != image_token)
        fail("mrope: image ", k - 1, " needs ", n, " consecutive placeholder tokens, found ", j);
      const int64_t tt = j / (lh * lw), rr = (j / lw) % lh, cc = j % lw;
      put(i + j, cur + tt, cur + rr, cur + cc);
    }
    cur += std::max({g.t, lh, lw});
    i += n;
  }
  if (k != grids.size()) fail("mrope: ", grids.size(), " image grid(s) but ", k, " placeholder run(s)");
  r.rope_delta = maxp + 1 - T;
  return r;
}

}  // namespace ds::vision
