// The deltaserve binary's model commands, run as a user would.
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <filesystem>

#include "golden_util.h"

namespace ds {
namespace {

namespace fs = std::filesystem;

using test::run_binary;

std::string join(const std::vector<int32_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s;
}

TEST(Cli, LogitsTeacherForcedDecodeMatchesGolden) {
  const std::string dir = test::data_dir() + "/tiny-moe/";
  auto golden = test::read_json(dir + "golden.json");
  test::Golden g(dir + "golden.safetensors");
  auto& p = golden["text"]["int4"][1];
  auto toks = p["prompt"].get<std::vector<int32_t>>();
  auto greedy = p["greedy"].get<std::vector<int32_t>>();
  const size_t P = toks.size();
  toks.insert(toks.end(), greedy.begin(), greedy.end() - 1);
  fs::path out = fs::temp_directory_path() / "ds_cli_logits.safetensors";
  auto r = run_binary("logits --model " + dir + "tiny-moe-int4 --tokens " + join(toks) + " --prefill " + std::to_string(P) +
               " --backend cpu --out " + out.string());
  ASSERT_EQ(r.code, 0) << r.out;
  test::Golden ours(out.string());
  std::vector<int64_t> shape;
  auto logits = ours.f32("logits", &shape);
  ASSERT_EQ(shape, (std::vector<int64_t>{int64_t(toks.size()), 2048}));
  auto prompt_ref = g.f32("int4.fp32.prompt1.logits");
  EXPECT_LT(test::rel_l2(logits.data(), prompt_ref.data(), prompt_ref.size()), 1e-4);
  auto gen_ref = g.f32("int4.fp32.prompt1.gen_logits");
  EXPECT_LT(test::rel_l2(logits.data() + (toks.size() - 24) * 2048, gen_ref.data(), gen_ref.size()), 1e-4);
}

TEST(Cli, GenerateIsGreedy) {
  const std::string dir = test::data_dir() + "/tiny-moe/";
  auto golden = test::read_json(dir + "golden.json");
  auto& p = golden["text"]["bf16"][2];
  auto r = run_binary("generate " + dir + "tiny-moe-bf16 --tokens " + join(p["prompt"].get<std::vector<int32_t>>()) +
               " --max-tokens 8");
  ASSERT_EQ(r.code, 0) << r.out;
  auto g = p["greedy"].get<std::vector<int32_t>>();
  EXPECT_EQ(r.out, join(std::vector<int32_t>(g.begin(), g.begin() + 8)) + "\n");
}

TEST(Cli, InspectWorksFromConfigAlone) {
  auto path = std::string(DS_SHARED_DIR) + "/assets/qwen3.6-35b-a3b/config.json";
  if (!fs::exists(path)) GTEST_SKIP() << "../shared is absent";
  auto r = run_binary("inspect --model " + path);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("text 34.66 B (without MTP), MTP 0.84 B"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("30 gated DeltaNet, 10 gated full attention"), std::string::npos);
}

TEST(Cli, InspectShowsPerModulePrecision) {
  auto r = run_binary("inspect " + test::data_dir() + "/tiny-moe/tiny-moe-int4");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("auto-round, 4-bit, group 128"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("model.language_model.layers.0.linear_attn.in_proj_a          bf16"), std::string::npos);
  EXPECT_NE(r.out.find("model.language_model.layers.0.mlp.experts.0.gate_proj        int4"), std::string::npos);
}

TEST(Cli, BadArgumentsAreClearErrors) {
  const std::string m = test::data_dir() + "/tiny-moe/tiny-moe-int4";
  struct Case {
    std::string args, expect;
  } cases[] = {
      {"logits --model " + m + " --tokens 1,x --out /tmp/x", "expected comma-separated non-negative integers"},
      {"logits --model " + m + " --tokens 1,2 --prefill 5 --out /tmp/x", "--prefill: expected 1..2"},
      {"logits --model " + m + " --tokens 1,99999 --out /tmp/x", "outside the model's vocabulary"},
      {"logits --model /nonexistent --tokens 1 --out /tmp/x", "no config.json"},
      {"logits --model " + m + " --tokens 1 --backend tpu --out /tmp/x", "expected cpu or cuda"},
      {"frobnicate", "unknown command"},
      // (serve fails on it before it listens or loads anything)
      {"serve " + m + " --mamba-ssm-cache-dtype fp8", "--mamba-ssm-cache-dtype: 'fp8' is not one of auto, float32, bfloat16"},
      {"logits --model " + m + " --tokens 1 --mamba-ssm-cache-dtype half --out /tmp/x", "'half' is not one of"},
      {"serve " + m + " --cache-ram -1", "--cache-ram: expected MiB of host memory, 0..1073741824, got -1"},
      {"serve " + m + " --cache-ram 8G", "--cache-ram"},
      {"serve " + m + " --prefix-cache-interval -5", "--prefix-cache-interval: expected tokens >= 0 (0: off), got -5"},
      {"serve " + m + " --responses-store -1", "--responses-store: expected MiB of host memory, 0..1073741824, got -1"},
      // vLLM's recipe flags: accepted where they change nothing, errors where they would change the model or need
      // what this server does not do
      {"serve " + m + " " + m + "2", "serve: expected one model folder, got '" + m + "' and '" + m + "2'"},
      {"serve " + m + " --metrics-prefix vllm:x", "--metrics-prefix: expected a Prometheus name"},
      {"serve " + m + " -tp 2", "--tensor-parallel-size: expected 1, got 2 (deltaserve runs one model on one GPU"},
      {"serve " + m + " --data-parallel-size 8", "--data-parallel-size: expected 1, got 8"},
      {"serve " + m + " --dtype float16", "--dtype: expected auto or bfloat16"},
      {"serve " + m + " --kv-cache-dtype int8", "--kv-cache-dtype: expected auto, bfloat16 or fp8"},
      {"serve " + m + " --hf-overrides {}", "--hf-overrides: not supported (it changes the model"},
      {"serve " + m + " --max-num-queued-reqs 4 --max-queued-requests 4", "are the same flag: give one"},
      {"serve " + m + " --max-num-queued-reqs -1", "--max-queued-requests: expected >= 0, got -1"},
      {"serve " + m + " --api-key-file /nonexistent/keys", "--api-key-file: cannot read '/nonexistent/keys'"},
      {"serve " + m + " --allowed-media-domains https://a.org/x", "--allowed-media-domains: expected host names"},
      {"serve " + m + " --config /nonexistent/c.yaml", "--config: cannot read '/nonexistent/c.yaml'"},
      {"serve " + m + " --reasoning-parser qwen3 --max-num-seqs 0",
       "note: --reasoning-parser qwen3 is vLLM's; it changes nothing here"},
      // unknown flags are errors, with the closest known one or the list
      {"serve " + m + " --mamba-ssm-cache-dtpye bfloat16",
       "serve: unknown flag --mamba-ssm-cache-dtpye (did you mean --mamba-ssm-cache-dtype?)"},
      {"serve " + m + " --max-num-seq 4", "did you mean --max-num-seqs?"},
      {"generate --model " + m + " --tokens 1 --temperature 0.5",
       "generate: unknown flag --temperature (generate takes --tokens, --max-tokens, --backend, --mamba-ssm-cache-dtype)"},
      {"bench --random-weights --config x.json --batchs 4", "bench: unknown flag --batchs (did you mean --batch?)"},
      {"inspect --model " + m + " --verbose 1", "inspect: unknown flag --verbose"},
  };
  for (auto& c : cases) {
    auto r = run_binary(c.args);
    EXPECT_NE(r.code, 0) << c.args;
    EXPECT_NE(r.out.find(c.expect), std::string::npos) << c.args << " -> " << r.out;
  }
}

// vLLM's --config FILE.yaml: flags as `name: value` lines, the command line winning; malformed lines name the line.
TEST(Cli, ConfigFileFlags) {
  const std::string m = test::data_dir() + "/tiny-moe/tiny-moe-int4";
  const fs::path f = fs::temp_directory_path() / "ds_cli_config.yaml";
  auto write = [&](const std::string& text) {
    std::FILE* fp = std::fopen(f.string().c_str(), "w");
    std::fputs(text.c_str(), fp);
    std::fclose(fp);
  };
  struct Case {
    std::string yaml, args, expect;
  };
  const std::vector<Case> cases = {
      // a value from the file reaches its flag (underscores, quotes, comments, booleans as flags)
      {"# a vLLM-style config\nmax_num_seqs: 0   # bad on purpose\n", "", "--max-num-seqs: expected >= 1, got 0"},
      {"max-num-seqs: '0'\n", "", "--max-num-seqs: expected >= 1, got 0"},
      {"trust-remote-code: true\nmax-num-seqs: 0\n", "", "note: --trust-remote-code is vLLM's"},
      {"enforce-eager: false\nmax-num-batched-tokens: 0\n", "", "--max-num-batched-tokens: expected >= 1, got 0"},
      // the command line wins over the file
      {"max-num-seqs: 4\n", "--max-num-seqs 0", "--max-num-seqs: expected >= 1, got 0"},
      // a block list repeats the flag; JSON passes through as text
      {"allowed-media-domains:\n  - a.org\n  - https://b.org\n", "", "expected host names like upload.wikimedia.org, got 'https://b.org'"},
      {"speculative-config: {\"method\": \"eagle\", \"num_speculative_tokens\": 2}\n", "",
       "--speculative-config: method must be \"mtp\", got \"eagle\""},
      // unknown flags, bad lines
      {"max-num-seq: 4\n", "", "serve: unknown flag --max-num-seq (did you mean --max-num-seqs?)"},
      {"speculative-config:\n  method: mtp\n", "", "line 2: nested mappings are not supported"},
      {"just words\n", "", "line 1: expected 'flag-name: value', got 'just words'"},
      {"chat-template: |\n", "", "line 1: anchors, aliases, tags and block strings are not supported"},
      {"- a\n", "", "line 1: a list item '- a' outside a list"},
  };
  for (auto& c : cases) {
    write(c.yaml);
    auto r = run_binary("serve " + m + " --host 256.0.0.1 --config " + f.string() + " " + c.args);
    EXPECT_NE(r.code, 0) << c.yaml;
    EXPECT_NE(r.out.find(c.expect), std::string::npos) << c.yaml << " -> " << r.out;
  }
  fs::remove(f);
}

// DELTASERVE_ARG_<FLAG> (llama.cpp's LLAMA_ARG_* as ours): a flag from the environment, after the command line.
TEST(Cli, FlagsFromTheEnvironment) {
  const std::string m = test::data_dir() + "/tiny-moe/tiny-moe-int4";
  struct Case {
    const char* var;
    const char* value;
    std::string args, expect;
  };
  const std::vector<Case> cases = {
      {"DELTASERVE_ARG_MAX_NUM_SEQS", "0", "", "--max-num-seqs: expected >= 1, got 0"},
      {"DELTASERVE_ARG_MAX_NUM_SEQS", "4", "--max-num-seqs 0", "--max-num-seqs: expected >= 1, got 0"},  // the line wins
      {"DELTASERVE_ARG_TRUST_REMOTE_CODE", "1", "--max-num-seqs 0", "note: --trust-remote-code is vLLM's"},
      {"DELTASERVE_ARG_ENFORCE_EAGER", "maybe", "", "DELTASERVE_ARG_ENFORCE_EAGER is a flag without a value"},
      {"DELTASERVE_ARG_MAX_NUM_SEQ", "4", "", "DELTASERVE_ARG_MAX_NUM_SEQ names no flag of serve (--max-num-seq)"},
  };
  for (auto& c : cases) {
    setenv(c.var, c.value, 1);
    auto r = run_binary("serve " + m + " --host 256.0.0.1 " + c.args);
    unsetenv(c.var);
    EXPECT_NE(r.code, 0) << c.var;
    EXPECT_NE(r.out.find(c.expect), std::string::npos) << c.var << "=" << c.value << " -> " << r.out;
  }
}

}  // namespace
}  // namespace ds
