#include "vision/preprocess.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/file.h"
#include "core/status.h"

namespace ds::vision {

namespace {
// The text as a JSON object; `what` names the file in the error.
nlohmann::json parse_json_object(const std::string& text, const std::string& what) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const std::exception& e) {
    fail(what, ": invalid JSON: ", e.what());
  }
  if (!j.is_object()) fail(what, ": expected a JSON object");
  return j;
}
}  // namespace

PreprocessConfig parse_preprocess_config(const std::string& text, const std::string& what) {
  nlohmann::json j = parse_json_object(text, what);
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

namespace {
// The config file `name` of a checkpoint directory parsed by `parse`, or defaults when the file is absent.
template <class Config, class Parse>
Config load_optional_config(const std::string& dir, const char* name, Parse parse) {
  const std::string path = dir + "/" + name;
  if (!std::filesystem::exists(path)) return {};
  return parse(read_file(path, name), path);
}
}  // namespace

PreprocessConfig load_preprocess_config(const std::string& dir) {
  return load_optional_config<PreprocessConfig>(dir, "preprocessor_config.json", parse_preprocess_config);
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

namespace {

// Normalises and patchifies `frames` (already at the target size, count a multiple of temporal_patch_size):
// rows ordered (t, bh, bw, mh, mw), each [c][tp][py][px].
PixelValues patchify(const std::vector<const Image*>& frames, const PreprocessConfig& cfg) {
  const int64_t ps = cfg.patch_size, tp = cfg.temporal_patch_size, m = cfg.merge_size;
  const int64_t H = frames[0]->height, W = frames[0]->width;
  PixelValues pv;
  pv.grid = {int64_t(frames.size()) / tp, H / ps, W / ps};
  const int64_t D = cfg.patch_dim();
  pv.data.resize(size_t(pv.grid.patches() * D));
  // Normalised value per channel and level: the reference rescales (·1/255, fp32) then normalises.
  const float rescale = float(1.0 / 255.0);
  std::vector<float> lut(256 * 3);
  for (int c = 0; c < 3; ++c)
    for (int v = 0; v < 256; ++v) lut[c * 256 + v] = (float(v) * rescale - cfg.mean[c]) / cfg.std[c];
  const int64_t gh = pv.grid.h, gw = pv.grid.w;
  int64_t row = 0;
  for (int64_t gt = 0; gt < pv.grid.t; ++gt)
    for (int64_t bh = 0; bh < gh / m; ++bh)
      for (int64_t bw = 0; bw < gw / m; ++bw)
        for (int64_t mh = 0; mh < m; ++mh)
          for (int64_t mw = 0; mw < m; ++mw, ++row) {
            const int64_t y0 = (bh * m + mh) * ps, x0 = (bw * m + mw) * ps;
            float* out = pv.data.data() + row * D;
            for (int c = 0; c < 3; ++c)
              for (int64_t t = 0; t < tp; ++t) {
                const Image& r = *frames[size_t(gt * tp + t)];
                for (int64_t py = 0; py < ps; ++py)
                  for (int64_t px = 0; px < ps; ++px) *out++ = lut[c * 256 + r.at(x0 + px, y0 + py, c)];
              }
          }
  return pv;
}

}  // namespace

PixelValues preprocess_image(const Image& img, const PreprocessConfig& cfg) {
  const auto [H, W] = smart_resize(img.height, img.width, cfg.factor(), cfg.min_pixels, cfg.max_pixels);
  const Image r = (H == img.height && W == img.width) ? img : resize_bicubic(img, W, H);
  // The single picture repeated temporal_patch_size times.
  return patchify(std::vector<const Image*>(size_t(cfg.temporal_patch_size), &r), cfg);
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
                               const std::vector<ImageGrid>& grids, int64_t merge, int32_t video_token) {
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
    const int32_t run = tokens[i];
    if (run != image_token && (video_token < 0 || run != video_token)) {
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
      if (tokens[i + j] != run)
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

VideoConfig parse_video_config(const std::string& text, const std::string& what) {
  VideoConfig c;
  // The image keys, with the video defaults underneath.
  {
    nlohmann::json j = parse_json_object(text, what);
    const bool has_budget = j.contains("min_pixels") || j.contains("max_pixels") ||
                            (j.contains("size") && j["size"].is_object());
    c.p = parse_preprocess_config(text, what);
    if (!has_budget) {
      c.p.min_pixels = VideoConfig{}.p.min_pixels;
      c.p.max_pixels = VideoConfig{}.p.max_pixels;
    } else {
      if (!(j.contains("min_pixels") || (j.contains("size") && j["size"].contains("shortest_edge"))))
        c.p.min_pixels = VideoConfig{}.p.min_pixels;
      if (!(j.contains("max_pixels") || (j.contains("size") && j["size"].contains("longest_edge"))))
        c.p.max_pixels = VideoConfig{}.p.max_pixels;
    }
    if (j.contains("fps") && !j["fps"].is_null()) {
      if (!j["fps"].is_number() || !(j["fps"].get<double>() > 0))
        fail(what, ": 'fps' expected a positive number, found ", j["fps"].dump());
      c.sampling.fps = j["fps"].get<double>();
    }
    for (const char* key : {"min_frames", "max_frames"}) {
      if (!j.contains(key) || j[key].is_null()) continue;
      if (!j[key].is_number_integer() || j[key].get<int64_t>() < 1)
        fail(what, ": '", key, "' expected a positive integer, found ", j[key].dump());
      (std::string(key) == "min_frames" ? c.sampling.min_frames : c.sampling.max_frames) = j[key].get<int64_t>();
    }
    if (j.contains("num_frames") && !j["num_frames"].is_null())
      fail(what, ": 'num_frames' (a fixed frame count) is not supported; deltaserve samples by 'fps'");
    if (c.sampling.min_frames > c.sampling.max_frames)
      fail(what, ": min_frames ", c.sampling.min_frames, " > max_frames ", c.sampling.max_frames);
  }
  return c;
}

VideoConfig load_video_config(const std::string& dir) {
  return load_optional_config<VideoConfig>(dir, "video_preprocessor_config.json", parse_video_config);
}

std::array<int64_t, 2> smart_resize_video(int64_t frames, int64_t height, int64_t width, int64_t temporal_factor,
                                          int64_t factor, int64_t min_pixels, int64_t max_pixels) {
  if (frames < temporal_factor)
    fail("smart_resize: ", frames, " frames, expected at least temporal_patch_size = ", temporal_factor);
  if (height <= 0 || width <= 0) fail("smart_resize: frame size ", width, "x", height, ", expected positive");
  double h = double(height), w = double(width);
  const double f = double(factor);
  if (height < factor || width < factor) {  // Python: scale = max(f/h, f/w); h = int(h·scale)
    const double scale = std::max(f / h, f / w);
    h = std::trunc(h * scale);
    w = std::trunc(w * scale);
  }
  if (std::max(h, w) / std::min(h, w) > 200)
    fail("smart_resize: aspect ratio ", std::max(h, w) / std::min(h, w), " of ", width, "x", height,
         " frames exceeds the limit of 200");
  int64_t hb = int64_t(std::nearbyint(h / f)) * factor, wb = int64_t(std::nearbyint(w / f)) * factor;
  const int64_t tb = int64_t(std::nearbyint(double(frames) / double(temporal_factor))) * temporal_factor;
  const double t = double(frames);
  if (tb * hb * wb > max_pixels) {
    const double beta = std::sqrt(t * h * w / double(max_pixels));
    hb = std::max<int64_t>(factor, int64_t(std::floor(h / beta / f)) * factor);
    wb = std::max<int64_t>(factor, int64_t(std::floor(w / beta / f)) * factor);
  } else if (tb * hb * wb < min_pixels) {
    const double beta = std::sqrt(double(min_pixels) / (t * h * w));
    hb = int64_t(std::ceil(h * beta / f)) * factor;
    wb = int64_t(std::ceil(w * beta / f)) * factor;
  }
  return {hb, wb};
}

PixelValues preprocess_video(const std::vector<Image>& frames, const PreprocessConfig& cfg) {
  if (frames.empty()) fail("video: no frames");
  const int64_t tp = cfg.temporal_patch_size;
  if (int64_t(frames.size()) < tp)
    fail("video: ", frames.size(), " frame(s) to sample from, at least temporal_patch_size = ", tp,
         " are needed (the reference refuses shorter clips too; send a still picture as an image_url part)");
  for (auto& fr : frames)
    if (fr.width != frames[0].width || fr.height != frames[0].height)
      fail("video: frames of different sizes (", frames[0].width, "x", frames[0].height, " and ", fr.width, "x",
           fr.height, ")");
  // The reference resizes the sampled frames (smart_resize needs at least temporal_patch_size of them) and pads
  // the count afterwards; a single sampled frame (a one-frame clip) is refused there too.
  const auto [H, W] = smart_resize_video(int64_t(frames.size()), frames[0].height, frames[0].width, tp,
                                         cfg.factor(), cfg.min_pixels, cfg.max_pixels);
  std::vector<Image> resized;
  resized.reserve(frames.size());
  for (auto& fr : frames)
    resized.push_back((H == fr.height && W == fr.width) ? fr : resize_bicubic(fr, W, H));
  std::vector<const Image*> ptrs;
  for (auto& r : resized) ptrs.push_back(&r);
  while (int64_t(ptrs.size()) % tp) ptrs.push_back(ptrs.back());
  return patchify(ptrs, cfg);
}

MediaLayout media_layout(const std::vector<int32_t>& tokens, int32_t image_token, const std::vector<ImageGrid>& images,
                         int32_t video_token, const std::vector<ImageGrid>& videos, int64_t merge) {
  MediaLayout L;
  size_t ki = 0, kv = 0;
  int64_t groups_left = 0;  // of the current video
  const size_t T = tokens.size();
  for (size_t i = 0; i < T;) {
    const int32_t t = tokens[i];
    if (t != image_token && (video_token < 0 || t != video_token)) {
      ++i;
      continue;
    }
    size_t n = 0;
    while (i + n < T && tokens[i + n] == t) ++n;
    ImageGrid g;
    if (t == image_token) {
      if (ki >= images.size()) fail("prompt: more image placeholder runs than the ", images.size(), " image(s)");
      g = images[ki];
      L.order.push_back({false, int64_t(ki++)});
      L.units.push_back(g);
    } else {
      if (groups_left == 0) {
        if (kv >= videos.size()) fail("prompt: more video placeholder runs than the ", videos.size(), " video(s)");
        groups_left = videos[kv].t;
        L.order.push_back({true, int64_t(kv++)});
      }
      g = {1, videos[kv - 1].h, videos[kv - 1].w};
      --groups_left;
      L.units.push_back(g);
    }
    if (int64_t(n) != g.tokens(merge))
      fail("prompt: a placeholder run of ", n, " tokens where ", g.tokens(merge), " were expected");
    i += n;
  }
  if (ki != images.size() || kv != videos.size() || groups_left != 0)
    fail("prompt: placeholders for ", ki, " image(s) and ", kv, " video(s), expected ", images.size(), " and ",
         videos.size());
  return L;
}

std::vector<ImageGrid> video_units(const ImageGrid& g) { return std::vector<ImageGrid>(size_t(g.t), {1, g.h, g.w}); }

std::string video_prompt_text(const std::vector<double>& group_seconds) {
  std::string s;
  for (double t : group_seconds) s += timestamp_text(t) + "<|vision_start|><|video_pad|><|vision_end|>";
  return s;
}

std::string expand_video_text(const std::string& text, const std::vector<std::vector<double>>& timestamps) {
  static const std::string pad = "<|video_pad|>", triple = "<|vision_start|><|video_pad|><|vision_end|>";
  std::string out;
  size_t i = 0, k = 0;
  for (;;) {
    const size_t at = text.find(pad, i);
    if (at == std::string::npos) break;
    if (k >= timestamps.size())
      fail("the prompt holds more video placeholders (<|video_pad|>) than the ", timestamps.size(),
           " video(s) of the request; the text must not contain <|video_pad|> itself");
    // Prefer the whole triple (the template's form); a bare pad is replaced alone.
    const size_t vs = std::string("<|vision_start|>").size();
    const bool whole = at >= vs && text.compare(at - vs, triple.size(), triple) == 0 && at - vs >= i;
    const size_t from = whole ? at - vs : at, len = whole ? triple.size() : pad.size();
    out.append(text, i, from - i);
    out += video_prompt_text(timestamps[k++]);
    i = from + len;
  }
  out.append(text, i, std::string::npos);
  if (k != timestamps.size())
    fail("the prompt holds ", k, " video placeholder(s) but the request has ", timestamps.size(), " video(s)");
  return out;
}

}  // namespace ds::vision
