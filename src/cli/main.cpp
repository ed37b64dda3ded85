// deltaserve: one binary, subcommands (design.md §1).
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include "cli/commands.h"
#include "core/status.h"

namespace {
void usage() {
  std::fprintf(stderr,
               "usage: deltaserve <command> [flags]\n"
               "commands:\n"
               "  serve     MODEL_DIR [--host 127.0.0.1] [--port 8000] [--backend cpu|cuda] [--served-model-name NAME]\n"
               "            [--max-model-len N] [--max-num-seqs N] [--max-num-batched-tokens N] [--api-key KEY]\n"
               "            [--default-chat-template-kwargs JSON] [--chat-template FILE] [--max-queued-requests N]\n"
               "            [--speculative-config '{\"method\": \"mtp\", \"num_speculative_tokens\": K}']\n"
               "            [--mamba-ssm-cache-dtype auto|float32|bfloat16]   (the DeltaNet state; also logits, generate, bench)\n"
               "            [--no-enable-prefix-caching] [--prefix-cache-checkpoints N] [--cache-ram MIB]\n"
               "            [--prefix-cache-interval N] [--responses-store MIB] [--language-model-only]\n"
               "            [--api-key-file F] [--allowed-media-domains HOSTS] [--config FILE.yaml]\n"
               "            (vLLM's recipe flags are accepted: --reasoning-parser, --tool-call-parser,\n"
               "             --enable-auto-tool-choice, --trust-remote-code, -tp 1, --kv-cache-dtype, ...; docs/server.md)\n"
               "            [--max-logprobs N] [--return-tokens-as-token-ids] [--disable-log-stats]\n"
               "            [--log-stats-interval S] [--disable-access-log] [--enable-log-requests]\n"
               "  tokenize  --model DIR < {\"text\": ...} | {\"messages\": [...], ...}\n"
               "  detokenize --model DIR < {\"ids\": [...], \"skip_special_tokens\": false}\n"
               "  logits    --model DIR --tokens 1,2,3 [--image F]... [--video F]... [--prefill N] [--backend cpu] --out F.safetensors\n"
               "  generate  --model DIR --tokens 1,2,3 [--max-tokens N] [--backend cpu]   (greedy)\n"
               "  mtp-logits --model DIR --tokens P --next T [--draft-steps K] --out F.safetensors\n"
               "  inspect   --model DIR|config.json\n"
               "  video-frames CLIP --out F.safetensors [--sampled]   (decoded RGB frames, fps, frame count)\n"
               "  bench     --random-weights --config config.json [--backend cuda] [--batch 1,8,32,64,128]\n"
               "            [--context 1024,8192] [--prefill 1024,4096,16384,32768] [--steps N] [--bf16] [--no-graph]\n"
               "            [--breakdown] [--kernel-times] [--prefill-chunk N] [--prefill-reps N]\n"
               "            [--variants \"name:no-graph,VAR=1;name2:ssm-dtype=bfloat16;name3:hog=16;name4:idle=16\"]\n"
               "            [--mamba-ssm-cache-dtype D] [--speculative K,..] [--spec-temperature T] [--prefix-cache L,..]\n"
               "            [--prompt-logprobs L,..] [--masked B,..] [--vision WxH,..]   (engine-path tables)\n"
               "  make-random-checkpoint --config config.json --out DIR [--bf16] [--seed S] [--shard-gb 4]\n");
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "-h") || !std::strcmp(argv[1], "--help")) {
    usage();
    return argc < 2 ? 2 : 0;
  }
  std::string cmd = argv[1];
  try {
    if (cmd == "serve") return ds::cli::cmd_serve(argc, argv);
    if (cmd == "tokenize") return ds::cli::cmd_tokenize(argc, argv);
    if (cmd == "detokenize") return ds::cli::cmd_detokenize(argc, argv);
    if (cmd == "logits") return ds::cli::cmd_logits(argc, argv);
    if (cmd == "inspect") return ds::cli::cmd_inspect(argc, argv);
    if (cmd == "generate") return ds::cli::cmd_generate(argc, argv);
    if (cmd == "make-random-checkpoint") return ds::cli::cmd_make_random_checkpoint(argc, argv);
    if (cmd == "mtp-logits") return ds::cli::cmd_mtp_logits(argc, argv);
    if (cmd == "bench") return ds::cli::cmd_bench(argc, argv);
    if (cmd == "video-frames") return ds::cli::cmd_video_frames(argc, argv);
    std::fprintf(stderr, "deltaserve: unknown command '%s'\n", cmd.c_str());
    usage();
    return 2;
  } catch (const ds::Error& e) {
    std::fprintf(stderr, "deltaserve %s: error: %s\n", cmd.c_str(), e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "deltaserve %s: internal error: %s\n", cmd.c_str(), e.what());
    return 3;
  }
}
