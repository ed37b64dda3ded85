// The reference's frame sampling and timestamps (vision/video.h); no FFmpeg here.
#include <algorithm>
#include <cfenv>
#include <cmath>
#include <cstdint>
#include <cstdio>

#include "core/status.h"
#include "vision/video.h"

namespace ds::vision {

std::vector<int64_t> sample_frame_indices(int64_t total, double video_fps, const VideoSampling& s) {
  if (total < 1) fail("video: no frames to sample");
  if (!(video_fps > 0) || !std::isfinite(video_fps)) fail("video: frame rate ", video_fps, " is not positive");
  // Python: int(total / fps * s.fps) truncates toward zero; then min(max(n, min_frames), max_frames, total).
  const double want = double(total) / video_fps * s.fps;
  int64_t n = want >= 9e18 ? INT64_MAX : int64_t(std::trunc(want));
  n = std::min({std::max(n, s.min_frames), s.max_frames, total});
  if (n < 1) n = 1;
  // numpy.linspace(0, total − 1, n): i·step + 0 with step = (total − 1)/(n − 1), last = stop exactly; then
  // ndarray.round() (half to even) and astype(int).
  std::vector<int64_t> idx(static_cast<size_t>(n));
  const double stop = double(total - 1);
  const double step = n > 1 ? stop / double(n - 1) : 0.0;
  const int mode = std::fegetround();
  std::fesetround(FE_TONEAREST);
  for (int64_t i = 0; i < n; ++i) {
    const double y = (n > 1 && i == n - 1) ? stop : double(i) * step;
    idx[size_t(i)] = int64_t(std::nearbyint(y));
  }
  std::fesetround(mode);
  return idx;
}

std::vector<double> group_timestamps(const std::vector<int64_t>& indices, double video_fps, int64_t temporal_patch) {
  std::vector<int64_t> ix = indices;
  if (ix.empty()) return {};
  while (ix.size() % size_t(temporal_patch)) ix.push_back(ix.back());
  std::vector<double> out;
  for (size_t i = 0; i < ix.size(); i += size_t(temporal_patch)) {
    const double a = double(ix[i]) / video_fps, b = double(ix[i + size_t(temporal_patch) - 1]) / video_fps;
    out.push_back((a + b) / 2);
  }
  return out;
}

std::string timestamp_text(double seconds) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "<%.1f seconds>", seconds);
  return buf;
}

}  // namespace ds::vision
