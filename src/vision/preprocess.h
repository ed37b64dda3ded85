// Qwen2-VL / Qwen3-VL image preprocessing (model-spec §5.1) and multimodal prompt layout (§5.2, §5.4):
// smart resize, normalisation, temporal repeat, merge-block-major patches; placeholder expansion and mRoPE
// t/h/w positions.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "vision/image.h"

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
MropePositions mrope_positions(const std::vector<int32_t>& tokens, int32_t image_token,
                               const std::vector<ImageGrid>& grids, int64_t merge);

}  // namespace ds::vision
