// Video decoding with FFmpeg's libraries (libavformat, libavcodec, libswscale) from memory (vision/video.h);
// a stub that refuses every video when built with -DDS_WITH_VIDEO=OFF.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>

#if DS_HAVE_FFMPEG
extern "C" {
#include <libavcodec/avcodec.h>
#include <libavformat/avformat.h>
#include <libavutil/avutil.h>
#include <libavutil/imgutils.h>
#include <libavutil/pixdesc.h>
#include <libswscale/swscale.h>
}
#endif

#include "core/status.h"
#include "vision/video.h"

namespace ds::vision {

#if !DS_HAVE_FFMPEG
bool video_decoding_available() { return false; }
Video decode_video(const uint8_t*, size_t, const VideoSampling&, const VideoLimits&, bool) {
  fail("video: this deltaserve was built without FFmpeg (-DDS_WITH_VIDEO=OFF), so it cannot decode videos");
}
#else
bool video_decoding_available() { return true; }

namespace {

std::string av_err(int e) {
  char buf[AV_ERROR_MAX_STRING_SIZE] = {0};
  av_strerror(e, buf, sizeof buf);
  return buf;
}

struct MemReader {
  const uint8_t* data;
  size_t size, pos = 0;
};

int mem_read(void* opaque, uint8_t* buf, int n) {
  auto* m = static_cast<MemReader*>(opaque);
  const size_t left = m->size - m->pos;
  if (left == 0) return AVERROR_EOF;
  const size_t k = std::min(left, size_t(n));
  std::memcpy(buf, m->data + m->pos, k);
  m->pos += k;
  return int(k);
}

int64_t mem_seek(void* opaque, int64_t off, int whence) {
  auto* m = static_cast<MemReader*>(opaque);
  whence &= ~AVSEEK_FORCE;
  if (whence == AVSEEK_SIZE) return int64_t(m->size);
  int64_t base = whence == SEEK_SET ? 0 : whence == SEEK_CUR ? int64_t(m->pos) : whence == SEEK_END ? int64_t(m->size) : -1;
  if (base < 0) return AVERROR(EINVAL);
  const int64_t p = base + off;
  if (p < 0 || p > int64_t(m->size)) return AVERROR(EINVAL);
  m->pos = size_t(p);
  return p;
}

// One open input: demuxer over memory + decoder of its best video stream.
struct Input {
  MemReader mem;
  AVIOContext* io = nullptr;
  AVFormatContext* fmt = nullptr;
  AVCodecContext* dec = nullptr;
  int stream = -1;

  // The constructor only records the bytes; open() may throw, and the destructor then still frees what it made.
  Input(const uint8_t* data, size_t n) : mem{data, n} {}

  void open() {
    constexpr int kBuf = 1 << 16;
    auto* buf = static_cast<uint8_t*>(av_malloc(kBuf));
    if (!buf) fail("video: out of memory");
    io = avio_alloc_context(buf, kBuf, 0, &mem, mem_read, nullptr, mem_seek);
    if (!io) {
      av_free(buf);
      fail("video: out of memory");
    }
    fmt = avformat_alloc_context();
    if (!fmt) fail("video: out of memory");
    fmt->pb = io;
    fmt->flags |= AVFMT_FLAG_CUSTOM_IO;
    int e = avformat_open_input(&fmt, nullptr, nullptr, nullptr);  // frees fmt on failure
    if (e < 0) {
      fmt = nullptr;
      fail("video: not a video container FFmpeg can read (", av_err(e), "); expected e.g. MP4, WebM, MKV, AVI");
    }
    if ((e = avformat_find_stream_info(fmt, nullptr)) < 0)
      fail("video: cannot read the stream information of the ", fmt->iformat->name, " data (", av_err(e), ")");
    const AVCodec* codec = nullptr;
    stream = av_find_best_stream(fmt, AVMEDIA_TYPE_VIDEO, -1, -1, &codec, 0);
    if (stream == AVERROR_STREAM_NOT_FOUND) fail("video: the ", fmt->iformat->name, " data has no video stream");
    if (stream < 0 || !codec) {
      const AVStream* st = nullptr;
      for (unsigned i = 0; i < fmt->nb_streams; ++i)
        if (fmt->streams[i]->codecpar->codec_type == AVMEDIA_TYPE_VIDEO) st = fmt->streams[i];
      fail("video: no decoder for the video stream",
           st ? str_cat(" (codec ", avcodec_get_name(st->codecpar->codec_id), ")") : std::string());
    }
    dec = avcodec_alloc_context3(codec);
    if (!dec) fail("video: out of memory");
    if ((e = avcodec_parameters_to_context(dec, fmt->streams[stream]->codecpar)) < 0)
      fail("video: bad codec parameters (", av_err(e), ")");
    dec->thread_count = 1;
    if ((e = avcodec_open2(dec, codec, nullptr)) < 0)
      fail("video: cannot open the ", codec->name, " decoder (", av_err(e), ")");
  }
  ~Input() {
    avcodec_free_context(&dec);
    if (fmt) avformat_close_input(&fmt);
    if (io) {
      av_freep(&io->buffer);
      avio_context_free(&io);
    }
  }
  Input(const Input&) = delete;
  Input& operator=(const Input&) = delete;

  const AVStream* st() const { return fmt->streams[stream]; }

  // Calls on_frame(index, frame) for every decoded frame in order; stops early when it returns false.
  template <typename F>
  void decode_all(F&& on_frame) {
    std::unique_ptr<AVPacket, void (*)(AVPacket*)> pkt(av_packet_alloc(), [](AVPacket* p) { av_packet_free(&p); });
    std::unique_ptr<AVFrame, void (*)(AVFrame*)> frame(av_frame_alloc(), [](AVFrame* f) { av_frame_free(&f); });
    if (!pkt || !frame) fail("video: out of memory");
    int64_t index = 0;
    bool stop = false;
    auto drain = [&]() {
      for (;;) {
        int e = avcodec_receive_frame(dec, frame.get());
        if (e == AVERROR(EAGAIN) || e == AVERROR_EOF) return;
        if (e < 0) fail("video: frame ", index, " cannot be decoded (", av_err(e), ")");
        if (!on_frame(index++, frame.get())) stop = true;
        av_frame_unref(frame.get());
        if (stop) return;
      }
    };
    for (;;) {
      int e = av_read_frame(fmt, pkt.get());
      if (e == AVERROR_EOF) break;
      if (e < 0) fail("video: the ", fmt->iformat->name, " data is corrupt after frame ", index, " (", av_err(e), ")");
      if (pkt->stream_index == stream) {
        e = avcodec_send_packet(dec, pkt.get());
        if (e < 0 && e != AVERROR(EAGAIN))
          fail("video: the ", dec->codec->name, " stream is corrupt near frame ", index, " (", av_err(e), ")");
        drain();
      }
      av_packet_unref(pkt.get());
      if (stop) return;
    }
    avcodec_send_packet(dec, nullptr);
    drain();
  }
};

// RGB24 of one decoded frame: libswscale with the frame's matrix and range. Plain SWS_BICUBIC, as OpenCV's
// reader (transformers' "opencv" backend) converts: on the test clip our frames then differ from the
// full-chroma-interpolation conversion by exactly what the reference dump measured for OpenCV's frames (max 82,
// mean 4.8541 levels), see VideoDecode.ConversionLikeTheReferenceReader.
Image to_rgb(const AVFrame* f) {
  const auto src = static_cast<AVPixelFormat>(f->format);
  SwsContext* sws = sws_getContext(f->width, f->height, src, f->width, f->height, AV_PIX_FMT_RGB24, SWS_BICUBIC,
                                   nullptr, nullptr, nullptr);
  if (!sws) {
    const char* name = av_get_pix_fmt_name(src);
    fail("video: cannot convert pixel format ", name ? name : "unknown", " to RGB");
  }
  const AVPixFmtDescriptor* d = av_pix_fmt_desc_get(src);
  if (d && !(d->flags & AV_PIX_FMT_FLAG_RGB)) {
    int cs = f->colorspace == AVCOL_SPC_UNSPECIFIED ? SWS_CS_DEFAULT : int(f->colorspace);
    const int* coef = sws_getCoefficients(cs);
    const int full = f->color_range == AVCOL_RANGE_JPEG || src == AV_PIX_FMT_YUVJ420P || src == AV_PIX_FMT_YUVJ422P ||
                     src == AV_PIX_FMT_YUVJ444P;
    sws_setColorspaceDetails(sws, coef, full, sws_getCoefficients(SWS_CS_DEFAULT), 1, 0, 1 << 16, 1 << 16);
  }
  Image img;
  img.width = f->width;
  img.height = f->height;
  img.rgb.resize(size_t(f->width) * size_t(f->height) * 3);
  uint8_t* dst[4] = {img.rgb.data(), nullptr, nullptr, nullptr};
  int stride[4] = {int(f->width * 3), 0, 0, 0};
  sws_scale(sws, f->data, f->linesize, 0, f->height, dst, stride);
  sws_freeContext(sws);
  return img;
}

}  // namespace

Video decode_video(const uint8_t* data, size_t n, const VideoSampling& s, const VideoLimits& lim, bool sample) {
  if (n == 0) fail("video: empty data");
  if (n > lim.max_bytes) fail("video: ", n, " bytes, more than the limit of ", lim.max_bytes, " bytes");
  av_log_set_level(AV_LOG_QUIET);
  Video v;
  std::vector<int64_t> keep;
  {
    Input in(data, n);
    in.open();
    const auto* par = in.st()->codecpar;
    v.codec = avcodec_get_name(par->codec_id);
    v.container = in.fmt->iformat->name;
    v.width = par->width;
    v.height = par->height;
    if (v.width <= 0 || v.height <= 0)
      fail("video: the ", v.codec, " stream has no frame size (", v.width, "x", v.height, ")");
    if (v.width > lim.max_side || v.height > lim.max_side || v.width * v.height > lim.max_pixels)
      fail("video: frames of ", v.width, "x", v.height, " are over the limit (", lim.max_pixels, " pixels, ",
           lim.max_side, " per side)");
    AVRational r = in.st()->avg_frame_rate;
    if (r.num <= 0 || r.den <= 0) r = in.st()->r_frame_rate;
    v.fps = (r.num > 0 && r.den > 0) ? av_q2d(r) : 0.0;
    // Pass 1: count the frames (the reference samples from the decoded count, as torchvision/decord do).
    in.decode_all([&](int64_t i, const AVFrame* f) {
      if (i + 1 > lim.max_decoded_frames)
        fail("video: more than ", lim.max_decoded_frames, " frames (the limit); send a shorter clip");
      if (f->width != v.width || f->height != v.height)
        fail("video: frame ", i, " is ", f->width, "x", f->height, ", the stream's frames are ", v.width, "x",
             v.height, " (frame size changes are not supported)");
      v.total_frames = i + 1;
      return true;
    });
    if (v.total_frames == 0) fail("video: the ", v.codec, " stream has no decodable frames");
    if (!(v.fps > 0)) {
      const double dur = in.fmt->duration > 0 ? double(in.fmt->duration) / AV_TIME_BASE : 0.0;
      if (!(dur > 0)) fail("video: the ", v.codec, " stream has neither a frame rate nor a duration");
      v.fps = double(v.total_frames) / dur;
    }
  }
  const int64_t total = v.total_frames;
  if (sample) {
    keep = sample_frame_indices(total, v.fps, s);
    if (int64_t(keep.size()) > lim.max_sampled_frames)
      fail("video: ", keep.size(), " sampled frames, more than the limit of ", lim.max_sampled_frames);
  } else {
    if (total > lim.max_sampled_frames)
      fail("video: ", total, " frames, more than the limit of ", lim.max_sampled_frames, " kept frames");
    keep.resize(size_t(total));
    for (int64_t i = 0; i < total; ++i) keep[size_t(i)] = i;
  }
  v.indices = keep;
  v.frames.resize(keep.size());
  // Pass 2: a fresh demuxer over the same bytes; convert the kept frames (an index kept twice is converted once).
  Input in2(data, n);
  in2.open();
  size_t next = 0;
  in2.decode_all([&](int64_t i, const AVFrame* f) {
    bool have = false;
    Image img;
    while (next < keep.size() && keep[next] == i) {
      if (!have) {
        img = to_rgb(f);
        have = true;
      }
      v.frames[next++] = img;
    }
    return next < keep.size();
  });
  if (next < keep.size())
    fail("video: the stream gave fewer frames on the second read (", next, " of ", keep.size(), ")");
  return v;
}

#endif  // DS_HAVE_FFMPEG

}  // namespace ds::vision
