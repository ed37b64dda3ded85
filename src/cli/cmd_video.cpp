// video-frames: decode a clip with deltaserve's decoder and write its frames (the reference dump's input,
// tools/video_ref_dump.py, and a debugging aid).
#include <cstdio>

#include "cli/args.h"
#include "cli/commands.h"
#include "io/safetensors.h"
#include "vision/video.h"

namespace ds::cli {

int cmd_video_frames(int argc, char** argv) {
  Args a(argc, argv, 2, {"sampled"});
  a.only("video-frames", {"out", "sampled"});
  if (a.positional().size() != 1) fail("usage: deltaserve video-frames CLIP --out F.safetensors [--sampled]");
  const std::string clip = a.positional()[0], out = a.require("out");
  vision::SourcePolicy policy;
  policy.allow_any_file = true;
  vision::VideoLimits lim;
  const bool sampled = a.has("sampled");
  auto bytes = vision::read_video_bytes(clip, policy, lim.max_bytes);
  auto v = vision::decode_video(bytes, vision::VideoSampling{}, lim, sampled);
  const int64_t N = int64_t(v.frames.size());
  std::vector<uint8_t> frames;
  frames.reserve(size_t(N * v.width * v.height * 3));
  for (auto& f : v.frames) frames.insert(frames.end(), f.rgb.begin(), f.rgb.end());
  double fps = v.fps;
  int64_t total = v.total_frames;
  std::vector<int64_t> idx = v.indices;
  auto sampled_idx = vision::sample_frame_indices(v.total_frames, v.fps, vision::VideoSampling{});
  std::vector<io::TensorOut> outs = {
      {"frames", DType::U8, {N, v.height, v.width, 3}, frames.data()},
      {"fps", DType::F64, {1}, &fps},
      {"total_num_frames", DType::I64, {1}, &total},
      {"frame_indices", DType::I64, {N}, idx.data()},
      {"sampled_indices", DType::I64, {int64_t(sampled_idx.size())}, sampled_idx.data()},
  };
  io::safetensors_write(out, outs);
  std::fprintf(stderr, "%s: %s/%s %lldx%lld, %.6g fps, %lld frames; wrote %lld frames to %s\n", clip.c_str(),
               v.container.c_str(), v.codec.c_str(), (long long)v.width, (long long)v.height, fps, (long long)total,
               (long long)N, out.c_str());
  return 0;
}

}  // namespace ds::cli
