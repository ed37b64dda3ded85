// Videos at the request boundary (issue #7 item 3): bytes in any container/codec FFmpeg's libraries read →
// frame count and rate → the reference's frame sampling (Qwen3VLVideoProcessor.sample_frames: fps 2, min/max
// frames, rounded linspace) → the sampled frames as 8-bit RGB. Every bad input is a ds::Error that says what was
// expected and what was found.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "vision/image.h"

namespace ds::vision {

// video_preprocessor_config.json's sampling keys (class defaults of Qwen3VLVideoProcessor when absent).
struct VideoSampling {
  double fps = 2.0;             // frames sampled per second of video
  int64_t min_frames = 4, max_frames = 768;
};

// Checked before pixel memory is allocated and while decoding.
struct VideoLimits {
  size_t max_bytes = size_t(256) << 20;   // encoded size
  int64_t max_pixels = int64_t(1) << 24;  // width·height of one frame (16 Mpx)
  int64_t max_side = 1 << 14;             // either frame dimension
  int64_t max_decoded_frames = 36000;     // frames in the stream (20 min at 30 fps)
  int64_t max_sampled_frames = 768;       // frames kept after sampling (each becomes half a temporal patch)
};

// The reference's indices: n = int(total / video_fps · s.fps), clamped to [min_frames, max_frames] and to
// `total`; then numpy linspace(0, total − 1, n) rounded half to even. `total` ≥ 1, video_fps > 0.
std::vector<int64_t> sample_frame_indices(int64_t total, double video_fps, const VideoSampling& s);

// Qwen3VLProcessor._calculate_timestamps: the index list is padded to a multiple of `temporal_patch` by repeating
// its last entry; each group's timestamp is (first + last index of the group) / 2 / video_fps, in seconds.
std::vector<double> group_timestamps(const std::vector<int64_t>& indices, double video_fps, int64_t temporal_patch);
// "<%.1f seconds>" of one timestamp, as Python's f"<{t:.1f} seconds>" (correctly rounded binary value).
std::string timestamp_text(double seconds);

struct Video {
  int64_t width = 0, height = 0;
  double fps = 0;               // the stream's average frame rate (the reference's metadata.fps)
  int64_t total_frames = 0;     // frames decoded from the stream (the reference's metadata.total_num_frames)
  std::vector<int64_t> indices; // sampled frame indices, ascending (may repeat for very short clips)
  std::vector<Image> frames;    // frames[i] is frame indices[i], RGB8
  std::string codec, container; // FFmpeg's short names, for messages
};

// False when built with -DDS_WITH_VIDEO=OFF (decode_video then always fails, saying so).
bool video_decoding_available();

// Decodes the first (best) video stream of `data` and keeps the frames `sample_frame_indices` picks
// (`sample` = false keeps every frame, for tools and tests). Frames are converted to RGB24 with libswscale
// (SWS_BICUBIC like OpenCV's reader, the stream's colour matrix and range).
// Errors: not a container FFmpeg recognises, no video stream, an undecodable stream, zero frames, frame size or
// frame count over `lim`, frames that change size.
Video decode_video(const uint8_t* data, size_t n, const VideoSampling& s, const VideoLimits& lim = {},
                   bool sample = true);
inline Video decode_video(const std::vector<uint8_t>& bytes, const VideoSampling& s, const VideoLimits& lim = {},
                          bool sample = true) {
  return decode_video(bytes.data(), bytes.size(), s, lim, sample);
}

// Reads encoded video bytes from a data:video/*;base64 URL, a file:// URL or a path under `policy` (its
// `limits.max_bytes` is replaced by `max_bytes`).
std::vector<uint8_t> read_video_bytes(const std::string& ref, const SourcePolicy& policy, size_t max_bytes);

}  // namespace ds::vision
