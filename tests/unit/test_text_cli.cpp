// deltaserve tokenize / detokenize: JSON on stdin, JSON on stdout, exact against the reference tokenizer.
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <unistd.h>

#include "golden_util.h"

namespace ds {
namespace {

struct Out {
  int code;
  nlohmann::json j;
};

Out run(const std::string& cmd, const std::string& input) {
  // ctest runs tests in parallel processes: one input file per process and call.
  static int counter = 0;
  std::string in = testing::TempDir() + "ds_text_cli_in_" + std::to_string(getpid()) + "_" + std::to_string(counter++) + ".json";
  std::ofstream(in) << input;
  auto r = test::run_binary(cmd + " < " + in, /*merge_stderr=*/false);
  std::remove(in.c_str());
  return {r.code, nlohmann::json::parse(r.out, nullptr, false)};
}

const std::string kModel = std::string(DS_TEST_DATA_DIR) + "/tiny-moe/tiny-moe-int4";

TEST(TextCli, TokenizeAndDetokenizeMatchTheReference) {
  auto golden = test::read_json(test::data_dir() + "/tiny-moe/text/tokenizer-golden.json");
  int checked = 0;
  for (auto& c : golden["tiny"]["cases"]) {
    if (checked++ > 12) break;  // every case is covered in-process by test_tokenizer; this checks the CLI plumbing
    nlohmann::json in = {{"text", c["text"]}};
    auto t = run("tokenize --model " + kModel, in.dump());
    ASSERT_EQ(t.code, 0) << in.dump();
    EXPECT_EQ(t.j["ids"], c["ids"]) << in.dump();
    EXPECT_EQ(t.j["tokens"], c["ids"]);
    EXPECT_EQ(t.j["count"], c["ids"].size());
    auto d = run("detokenize --model " + kModel, nlohmann::json({{"ids", c["ids"]}}).dump());
    ASSERT_EQ(d.code, 0);
    EXPECT_EQ(d.j["text"], c["decode"]);
    EXPECT_EQ(d.j["prompt"], c["decode"]);
    auto ds = run("detokenize --model " + kModel,
                  nlohmann::json({{"tokens", c["ids"]}, {"skip_special_tokens", true}}).dump());
    EXPECT_EQ(ds.j["text"], c["decode_skip_special"]);
  }
}

TEST(TextCli, MessagesAreRenderedWithTheModelsTemplate) {
  auto t = run("tokenize --model " + kModel,
               R"({"messages": [{"role": "user", "content": "Hello!"}], "add_generation_prompt": true,
                   "chat_template_kwargs": {"enable_thinking": false}})");
  ASSERT_EQ(t.code, 0);
  std::string prompt = t.j["prompt"];
  EXPECT_NE(prompt.find("<|im_start|>user\nHello!<|im_end|>"), std::string::npos) << prompt;
  auto again = run("tokenize --model " + kModel, nlohmann::json({{"text", prompt}}).dump());
  EXPECT_EQ(again.j["ids"], t.j["ids"]);
}

TEST(TextCli, BadInputIsAJsonErrorAndNonZeroExit) {
  for (auto [cmd, in] : std::vector<std::pair<std::string, std::string>>{
           {"tokenize", "{"}, {"tokenize", R"({"text": 5})"}, {"detokenize", R"({"ids": [-1]})"},
           {"detokenize", R"({"ids": [99999]})"},
           {"tokenize", R"({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]})"}}) {
    auto r = run(cmd + " --model " + kModel, in);
    EXPECT_NE(r.code, 0) << in;
    ASSERT_TRUE(r.j.is_object()) << in;
    EXPECT_TRUE(r.j["error"]["message"].is_string()) << in;
  }
}

}  // namespace
}  // namespace ds
