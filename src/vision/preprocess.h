// Qwen2-VL / Qwen3-VL image preprocessing (model-spec §5.1) and multimodal prompt layout (§5.2, §5.4):
// smart resize, normalisation, temporal repeat, merge-block-major patches; placeholder expansion and mRoPE
// t/h/w positions.
#pragma once
#include <array>
#include <utility>
#include <cstdint>
#include <string>
#include <vector>

#include "vision/image.h"
#include "vision/video.h"

namespace ds::vision {

// preprocessor_config.json (Qwen2VLImageProcessor keys; size.shortest_edge / size.longest_edge are pixel
// counts, not edges, as in the reference).
struct PreprocessConfig {
  int64_t patch_size = 16, temporal_patch_size = 2, merge_size = 2;
  int64_t min_pixels = 65536, max_pixels = 16777216;
  std::array<float, 3> mean{0.5f, 0.5f, 0.5f}, std{0.5f, 0.5f, 0.5f};
  int64_t factor() const { return patch_size * merge_size; }
  int64_t patch_dim() const { return 3 * temporal_patch_size * patch_size * patch_size; }
};
PreprocessConfig parse_preprocess_config(const std::string& json_text, const std::string& what);
// DIR/preprocessor_config.json; the Qwen3.5/3.6 defaults above when the file is absent.
PreprocessConfig load_preprocess_config(const std::string& dir);

// The reference's smart_resize: both sides multiples of `factor`, aspect ratio kept as well as possible,
// h·w within [min_pixels, max_pixels]. Python's round() (ties to even) for the first guess.
// Returns {height, width}. Aspect ratio > 200 is an error.
std::array<int64_t, 2> smart_resize(int64_t height, int64_t width, int64_t factor, int64_t min_pixels,
                                    int64_t max_pixels);

struct ImageGrid {
  int64_t t = 1, h = 0, w = 0;  // in patches
  int64_t patches() const { return t * h * w; }
  int64_t tokens(int64_t merge) const { return t * (h / merge) * (w / merge); }
};

// One image ready for the vision tower.
struct PixelValues {
  ImageGrid grid;
  std::vector<float> data;  // fp32 [grid.patches(), patch_dim], merge-block-major rows
};

// RGB → smart resize (PIL bicubic) → v/255 → (v − mean)/std → 2 identical frames → patches, each row
// ordered [c][tp][py][px] and rows ordered (t, bh, bw, mh, mw).
PixelValues preprocess_image(const Image& img, const PreprocessConfig& cfg);

// Replaces the k-th `image_token` of `tokens` by grids[k].tokens(merge) copies of it. The number of
// placeholders must equal grids.size().
std::vector<int32_t> expand_image_placeholders(const std::vector<int32_t>& tokens, int32_t image_token,
                                               const std::vector<ImageGrid>& grids, int64_t merge);

// mRoPE positions of an expanded prompt (HF get_rope_index): text runs count up on all three axes; each
// image's run of gh·gw/merge² tokens takes (cur, cur + r, cur + c) over its merged grid in row-major order,
// then cur advances by max(gh, gw)/merge. `rope_delta` = max position + 1 − T; later (decode) tokens use
// position cache_len + rope_delta on all axes.
struct MropePositions {
  std::vector<int32_t> pos;  // [3, T]: t row, h row, w row
  int64_t rope_delta = 0;
};
// `video_token` (optional): its runs are positioned like image runs; a video's grid is given as grid_t units of
// {1, h, w}, one per temporal group, in prompt order with the images (see video_units).
MropePositions mrope_positions(const std::vector<int32_t>& tokens, int32_t image_token,
                               const std::vector<ImageGrid>& grids, int64_t merge, int32_t video_token = -1);

// ---- video (Qwen3VLVideoProcessor + Qwen3VLProcessor; docs/vision.md "Video") -------------------------------

// video_preprocessor_config.json: the image keys (size.shortest_edge/longest_edge are the pixel budget of the
// whole clip, t·h·w) plus fps, min_frames, max_frames.
struct VideoConfig {
  PreprocessConfig p{.min_pixels = 4096, .max_pixels = 25165824};  // Qwen3.5/3.6's file
  VideoSampling sampling;
};
VideoConfig parse_video_config(const std::string& json_text, const std::string& what);
// DIR/video_preprocessor_config.json; Qwen3.5/3.6's values (above) when the file is absent.
VideoConfig load_video_config(const std::string& dir);

// The video smart_resize: frames smaller than `factor` on a side are first scaled up (int() of the product),
// aspect ratio > 200 is an error, and the budget applies to t'·h'·w' with t' = round(frames / temporal)·temporal
// (Python round, ties to even) while the rescale factor uses the sampled frame count. Needs frames ≥ temporal.
// Returns {height, width}.
std::array<int64_t, 2> smart_resize_video(int64_t frames, int64_t height, int64_t width, int64_t temporal_factor,
                                          int64_t factor, int64_t min_pixels, int64_t max_pixels);

// Sampled RGB frames (all the same size) → smart_resize_video → bicubic (torch's uint8 antialias kernel) →
// normalise → the frame count padded to a multiple of temporal_patch_size by repeating the last frame →
// patches ordered (t, bh, bw, mh, mw), each [c][tp][py][px]. grid = {frames'/tp, h'/ps, w'/ps}.
PixelValues preprocess_video(const std::vector<Image>& frames, const PreprocessConfig& cfg);

// A video's grid split into its temporal groups ({1, h, w} each), as the LLM sees them.
std::vector<ImageGrid> video_units(const ImageGrid& g);

// The processor's replacement text of one video: per temporal group "<t seconds>" + vision_start + ONE
// video_pad + vision_end (expand_image_placeholders with video_units then gives each pad h·w/merge² copies).
std::string video_prompt_text(const std::vector<double>& group_seconds);

// Replaces, in rendered chat text, the k-th "<|vision_start|><|video_pad|><|vision_end|>" (or a bare
// "<|video_pad|>", as the reference also accepts) by video_prompt_text(timestamps[k]). The number of
// placeholders must equal timestamps.size().
std::string expand_video_text(const std::string& text, const std::vector<std::vector<double>>& timestamps);

// Images and videos of one expanded prompt in the order they appear: `order` lists (is_video, index) per medium,
// `units` the grids mrope_positions walks (an image's grid; a video's video_units). Checks every run's length.
struct MediaLayout {
  std::vector<std::pair<bool, int64_t>> order;
  std::vector<ImageGrid> units;
};
MediaLayout media_layout(const std::vector<int32_t>& tokens, int32_t image_token, const std::vector<ImageGrid>& images,
                         int32_t video_token, const std::vector<ImageGrid>& videos, int64_t merge);

}  // namespace ds::vision
