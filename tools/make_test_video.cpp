// Writes the short test clip committed under tests/data/vision/ (docs/vision.md "Video"): a moving colour
// pattern, every frame different, encoded with libavcodec's built-in MPEG-4 part 2 encoder (no external
// libraries) into an MP4 container. Deterministic for a given FFmpeg build.
//
// usage: make_test_video OUT.mp4 [WIDTH HEIGHT FPS FRAMES]   (defaults 80 48 10 25)
// Build: cmake --build build --target make_test_video
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

extern "C" {
#include <libavcodec/avcodec.h>
#include <libavformat/avformat.h>
#include <libavutil/opt.h>
}

static void die(const char* what, int e = 0) {
  char buf[AV_ERROR_MAX_STRING_SIZE] = {0};
  if (e) av_strerror(e, buf, sizeof buf);
  std::fprintf(stderr, "make_test_video: %s%s%s\n", what, e ? ": " : "", buf);
  std::exit(1);
}

// RGB of pixel (x, y) in frame t: diagonal colour bands sliding right, a white-ish square moving down-right,
// and a red ramp that brightens over time.
static void pixel(int x, int y, int t, int w, int h, double rgb[3]) {
  const double u = double(x) / w, v = double(y) / h, s = double(t);
  rgb[0] = 127.5 + 127.5 * std::sin(6.2831853 * (u + 0.07 * s)) * (0.4 + 0.6 * v);
  rgb[1] = 127.5 + 127.5 * std::cos(6.2831853 * (v * 1.5 - 0.05 * s + u * 0.5));
  rgb[2] = 255.0 * std::fmod(u * 0.5 + v * 0.5 + 0.03 * s, 1.0);
  const int sx = (t * 3) % (w - 12), sy = (t * 2) % (h - 12);
  if (x >= sx && x < sx + 12 && y >= sy && y < sy + 12) rgb[0] = rgb[1] = rgb[2] = 235.0;
}

int main(int argc, char** argv) {
  if (argc != 2 && argc != 6) {
    std::fprintf(stderr, "usage: %s OUT.mp4 [WIDTH HEIGHT FPS FRAMES]\n", argv[0]);
    return 2;
  }
  const std::string out = argv[1];
  const int W = argc == 6 ? std::atoi(argv[2]) : 80, H = argc == 6 ? std::atoi(argv[3]) : 48;
  const int fps = argc == 6 ? std::atoi(argv[4]) : 10, N = argc == 6 ? std::atoi(argv[5]) : 25;
  if (W < 16 || H < 16 || W % 2 || H % 2 || fps < 1 || N < 1) die("bad size, rate or frame count");

  AVFormatContext* fmt = nullptr;
  int e = avformat_alloc_output_context2(&fmt, nullptr, "mp4", out.c_str());
  if (e < 0 || !fmt) die("mp4 muxer", e);
  const AVCodec* codec = avcodec_find_encoder(AV_CODEC_ID_MPEG4);
  if (!codec) die("this libavcodec has no MPEG-4 part 2 encoder");
  AVStream* st = avformat_new_stream(fmt, nullptr);
  AVCodecContext* enc = avcodec_alloc_context3(codec);
  enc->width = W;
  enc->height = H;
  enc->pix_fmt = AV_PIX_FMT_YUV420P;
  enc->time_base = AVRational{1, fps};
  enc->framerate = AVRational{fps, 1};
  enc->gop_size = 10;
  enc->max_b_frames = 0;
  enc->thread_count = 1;
  enc->flags |= AV_CODEC_FLAG_QSCALE | AV_CODEC_FLAG_BITEXACT;
  enc->global_quality = FF_QP2LAMBDA * 3;
  if (fmt->oformat->flags & AVFMT_GLOBALHEADER) enc->flags |= AV_CODEC_FLAG_GLOBAL_HEADER;
  if ((e = avcodec_open2(enc, codec, nullptr)) < 0) die("open encoder", e);
  avcodec_parameters_from_context(st->codecpar, enc);
  st->time_base = enc->time_base;
  st->avg_frame_rate = enc->framerate;
  fmt->flags |= AVFMT_FLAG_BITEXACT;
  if ((e = avio_open(&fmt->pb, out.c_str(), AVIO_FLAG_WRITE)) < 0) die("open output", e);
  if ((e = avformat_write_header(fmt, nullptr)) < 0) die("write header", e);

  AVFrame* fr = av_frame_alloc();
  fr->format = enc->pix_fmt;
  fr->width = W;
  fr->height = H;
  if ((e = av_frame_get_buffer(fr, 0)) < 0) die("frame buffer", e);
  AVPacket* pkt = av_packet_alloc();
  auto drain = [&]() {
    for (;;) {
      int r = avcodec_receive_packet(enc, pkt);
      if (r == AVERROR(EAGAIN) || r == AVERROR_EOF) return;
      if (r < 0) die("encode", r);
      av_packet_rescale_ts(pkt, enc->time_base, st->time_base);
      pkt->stream_index = st->index;
      if ((r = av_interleaved_write_frame(fmt, pkt)) < 0) die("write packet", r);
    }
  };
  for (int t = 0; t < N; ++t) {
    av_frame_make_writable(fr);
    // BT.601 limited-range RGB → YUV 4:2:0 (chroma from the mean of each 2×2 block).
    for (int y = 0; y < H; ++y)
      for (int x = 0; x < W; ++x) {
        double c[3];
        pixel(x, y, t, W, H, c);
        const double Y = 16 + (65.481 * c[0] + 128.553 * c[1] + 24.966 * c[2]) / 255;
        fr->data[0][y * fr->linesize[0] + x] = uint8_t(std::lround(std::fmin(235, std::fmax(16, Y))));
      }
    for (int y = 0; y < H / 2; ++y)
      for (int x = 0; x < W / 2; ++x) {
        double cb = 0, cr = 0;
        for (int dy = 0; dy < 2; ++dy)
          for (int dx = 0; dx < 2; ++dx) {
            double c[3];
            pixel(2 * x + dx, 2 * y + dy, t, W, H, c);
            cb += 128 + (-37.797 * c[0] - 74.203 * c[1] + 112.0 * c[2]) / 255;
            cr += 128 + (112.0 * c[0] - 93.786 * c[1] - 18.214 * c[2]) / 255;
          }
        fr->data[1][y * fr->linesize[1] + x] = uint8_t(std::lround(std::fmin(240, std::fmax(16, cb / 4))));
        fr->data[2][y * fr->linesize[2] + x] = uint8_t(std::lround(std::fmin(240, std::fmax(16, cr / 4))));
      }
    fr->pts = t;
    if ((e = avcodec_send_frame(enc, fr)) < 0) die("send frame", e);
    drain();
  }
  avcodec_send_frame(enc, nullptr);
  drain();
  av_write_trailer(fmt);
  avio_closep(&fmt->pb);
  av_packet_free(&pkt);
  av_frame_free(&fr);
  avcodec_free_context(&enc);
  avformat_free_context(fmt);
  std::printf("wrote %s: %dx%d, %d fps, %d frames, MPEG-4 part 2 in MP4\n", out.c_str(), W, H, fps, N);
  return 0;
}
