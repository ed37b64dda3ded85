#pragma once
namespace ds::cli {
int cmd_logits(int argc, char** argv);
int cmd_inspect(int argc, char** argv);
int cmd_generate(int argc, char** argv);
int cmd_mtp_logits(int argc, char** argv);
int cmd_make_random_checkpoint(int argc, char** argv);
int cmd_serve(int argc, char** argv);
int cmd_tokenize(int argc, char** argv);
int cmd_detokenize(int argc, char** argv);
int cmd_bench(int argc, char** argv);
int cmd_video_frames(int argc, char** argv);
}  // namespace ds::cli
