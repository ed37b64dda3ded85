// Chat templates against the reference renderings of transformers' apply_chat_template
// (tests/data/tiny-moe/text/chat-golden.json), plus the project's own tiny-model template.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "text/chat_template.h"

namespace {

using json = nlohmann::ordered_json;

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string template_path(const std::string& name) {
  if (name == "qwen3.5") return DS_SHARED_DIR "/assets/qwen3.5-27b/chat_template.jinja";
  if (name == "qwen3.6") return DS_SHARED_DIR "/fixtures/tiny-moe/text/tokenizer/chat_template.jinja";
  return "";
}

json golden() { return json::parse(slurp(DS_TEST_DATA_DIR "/tiny-moe/text/chat-golden.json")); }

TEST(ChatTemplateGolden, EveryCaseMatchesTransformers) {
  json g = golden();
  ASSERT_TRUE(g.contains("cases"));
  int passed = 0, skipped = 0, total = 0;
  for (auto& c : g["cases"]) {
    ++total;
    std::string name = c["template"].get<std::string>() + "/" + c["name"].get<std::string>();
    std::string path = template_path(c["template"]);
    if (path.empty() || !std::filesystem::exists(path)) {
      ++skipped;
      continue;
    }
    ds::ChatTemplate t = ds::ChatTemplate::from_source(slurp(path), "", "<|im_end|>");
    json kwargs = c.value("kwargs", json::object());
    if (!c["error"].is_null()) {
      try {
        t.render(c["messages"], c["tools"], c["add_generation_prompt"].get<bool>(), kwargs);
        ADD_FAILURE() << name << ": expected raise_exception(" << c["error"] << "), rendered without error";
      } catch (const ds::jinja::TemplateRaise& e) {
        EXPECT_EQ(std::string(e.what()), c["error"].get<std::string>()) << name;
        if (std::string(e.what()) == c["error"].get<std::string>()) ++passed;
      }
      continue;
    }
    std::string got;
    try {
      got = t.render(c["messages"], c["tools"], c["add_generation_prompt"].get<bool>(), kwargs);
    } catch (const std::exception& e) {
      ADD_FAILURE() << name << ": threw " << e.what();
      continue;
    }
    EXPECT_EQ(got, c["rendered"].get<std::string>()) << name;
    if (got == c["rendered"].get<std::string>()) ++passed;
  }
  std::printf("chat-golden: %d/%d cases pass, %d skipped (template file absent)\n", passed, total, skipped);
  if (skipped == total) GTEST_SKIP() << "Qwen chat templates absent under " DS_SHARED_DIR;
}

TEST(ChatTemplateGolden, GoldenHasBothTemplatesAndErrors) {
  json g = golden();
  int errors = 0, q35 = 0, q36 = 0;
  for (auto& c : g["cases"]) {
    errors += !c["error"].is_null();
    q35 += c["template"] == "qwen3.5";
    q36 += c["template"] == "qwen3.6";
  }
  EXPECT_GT(errors, 0);
  EXPECT_GT(q35, 0);
  EXPECT_GT(q36, 0);
}

TEST(ChatTemplate, LoadPrefersJinjaFileAndReadsSpecialTokens) {
  namespace fs = std::filesystem;
  fs::path dir = fs::temp_directory_path() / ("ds_chat_tmpl_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  {
    std::ofstream(dir / "tokenizer_config.json")
        << R"({"bos_token": {"content": "<s>"}, "eos_token": "</s>", "chat_template": "CFG{{ bos_token }}"})";
  }
  ds::ChatTemplate a = ds::ChatTemplate::load(dir.string());
  EXPECT_EQ(a.render(json::array(), nullptr, false), "CFG<s>");
  EXPECT_EQ(a.eos_token(), "</s>");
  { std::ofstream(dir / "chat_template.jinja") << "FILE{{ eos_token }}{{ messages|length }}\n"; }
  ds::ChatTemplate b = ds::ChatTemplate::load(dir.string());
  EXPECT_EQ(b.render(json::array({json{{"role", "user"}, {"content", "x"}}}), nullptr, false), "FILE</s>1");
  fs::remove_all(dir);
  EXPECT_THROW(ds::ChatTemplate::load(dir.string()), ds::Error);
}

TEST(ChatTemplate, SyntaxErrorNamesLineAndColumn) {
  try {
    ds::ChatTemplate::from_source("line one\n{% if x %}\n  {{ x + }}\n{% endif %}");
    FAIL() << "expected a syntax error";
  } catch (const ds::Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("line 3"), std::string::npos) << m;
    EXPECT_NE(m.find("column"), std::string::npos) << m;
    EXPECT_NE(m.find("expected"), std::string::npos) << m;
  }
  try {
    ds::ChatTemplate::from_source("{% for x in y %}never closed");
    FAIL() << "expected a syntax error";
  } catch (const ds::Error& e) {
    EXPECT_NE(std::string(e.what()).find("'endfor'"), std::string::npos) << e.what();
  }
}

TEST(ChatTemplate, KwargsReachTheTemplate) {
  auto t = ds::ChatTemplate::from_source(
      "{{ 'T' if enable_thinking is not defined or enable_thinking else 'F' }}{{ tools is none }}");
  EXPECT_EQ(t.render(json::array(), nullptr, true), "TTrue");
  EXPECT_EQ(t.render(json::array(), nullptr, true, json{{"enable_thinking", false}}), "FTrue");
}

// continue_final_message against transformers 5.17's renderings (tests/data/tiny-moe/text/continue-golden.json, made
// by tools/continue_ref_dump.py): Qwen's templates (from ../shared; skipped where absent) and the tiny model's.
TEST(ChatTemplateContinue, EveryCaseMatchesTransformers) {
  const json g = json::parse(slurp(DS_TEST_DATA_DIR "/tiny-moe/text/continue-golden.json"));
  int checked = 0, skipped = 0;
  for (const auto& c : g["cases"]) {
    const std::string name = c["template"];
    const std::string path = name == "tiny" ? std::string(DS_TEST_DATA_DIR "/tiny-moe/tiny-moe-int4/chat_template.jinja")
                                            : template_path(name);
    if (!std::filesystem::exists(path)) {
      ++skipped;
      continue;
    }
    const auto t = ds::ChatTemplate::from_source(slurp(path));
    SCOPED_TRACE(name + " / " + c["name"].get<std::string>());
    if (c["error"].is_null()) {
      EXPECT_EQ(t.render_continuing(c["messages"], nullptr, c["kwargs"]), c["rendered"].get<std::string>());
    } else {
      EXPECT_THROW(t.render_continuing(c["messages"], nullptr, c["kwargs"]), ds::Error);
    }
    ++checked;
  }
  EXPECT_GE(checked, 11);  // the tiny template's cases at least
  if (skipped > 0) std::printf("  %d cases skipped: Qwen chat templates absent under " DS_SHARED_DIR "\n", skipped);
}

// What transformers' marker approach implies beyond the golden cases: a template that keeps the text's spacing keeps
// it; the last text part is the one continued; no text, or a template that drops the text, is an error naming it.
TEST(ChatTemplateContinue, SpacingPartsAndErrors) {
  auto t = ds::ChatTemplate::from_source(
      "{% for m in messages %}<{{ m.role }}>{% if m.content is string %}{{ m.content }}{% else %}"
      "{% for p in m.content %}{{ p.text }}{% endfor %}{% endif %}</{{ m.role }}>{% endfor %}");
  auto msgs = [](json content) {
    return json::array({json{{"role", "user"}, {"content", "q"}}, json{{"role", "assistant"}, {"content", content}}});
  };
  EXPECT_EQ(t.render_continuing(msgs("Hello "), nullptr), "<user>q</user><assistant>Hello ");
  EXPECT_EQ(t.render_continuing(msgs(json::parse(R"([{"type":"text","text":"a"},{"type":"image"},{"type":"text","text":"b"}])")), nullptr),
            "<user>q</user><assistant>ab");
  try {
    t.render_continuing(msgs(json::parse(R"([{"type":"image"}])")), nullptr);
    ADD_FAILURE() << "no text part: expected an error";
  } catch (const ds::Error& e) {
    EXPECT_NE(std::string(e.what()).find("no text part"), std::string::npos) << e.what();
  }
  EXPECT_THROW(t.render_continuing(json::array(), nullptr), ds::Error);
  EXPECT_THROW(t.render_continuing(json::array({json{{"role", "assistant"}}}), nullptr), ds::Error);
  auto drops = ds::ChatTemplate::from_source("{% for m in messages %}<{{ m.role }}>{% endfor %}");
  try {
    drops.render_continuing(msgs("Hello"), nullptr);
    ADD_FAILURE() << "a template that drops the text: expected an error";
  } catch (const ds::Error& e) {
    EXPECT_NE(std::string(e.what()).find("does not appear"), std::string::npos) << e.what();
  }
}

// ---- the project's own ChatML template for the bundled tiny model ------------------------------

class TinyTemplate : public ::testing::TestWithParam<const char*> {};

TEST_P(TinyTemplate, RendersChatMLWithThinkingAndTools) {
  std::string dir = std::string(DS_TEST_DATA_DIR "/tiny-moe/") + GetParam();
  ds::ChatTemplate t = ds::ChatTemplate::load(dir);
  EXPECT_EQ(t.eos_token(), "<|im_end|>");
  json msgs = json::parse(R"([{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"}])");
  EXPECT_EQ(t.render(msgs, nullptr, true),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n");
  EXPECT_EQ(t.render(msgs, nullptr, true, json{{"enable_thinking", false}}),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\n");
  EXPECT_EQ(t.render(msgs, nullptr, false), "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");

  // History: reasoning kept only after the last user turn; tool calls and tool results.
  json hist = json::parse(R"([
    {"role":"user","content":"q1"},
    {"role":"assistant","content":"a1","reasoning_content":"old"},
    {"role":"user","content":"weather?"},
    {"role":"assistant","content":"","reasoning_content":"need tool",
     "tool_calls":[{"type":"function","function":{"name":"get_weather","arguments":{"city":"Paris","days":2}}}]},
    {"role":"tool","content":"sunny"},
    {"role":"tool","content":"warm"}])");
  json tools = json::parse(R"([{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}])");
  std::string r = t.render(hist, tools, true);
  EXPECT_EQ(r.rfind("<|im_start|>system\n", 0), 0u) << r;
  EXPECT_NE(r.find("<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"parameters\": "
                   "{\"type\": \"object\"}}}\n</tools>"),
            std::string::npos)
      << r;
  EXPECT_NE(r.find("<|im_start|>assistant\na1<|im_end|>\n"), std::string::npos) << r;  // old reasoning dropped
  EXPECT_EQ(r.find("old"), std::string::npos) << r;
  EXPECT_NE(r.find("<|im_start|>assistant\n<think>\nneed tool\n</think>\n\n<tool_call>\n<function=get_weather>\n"
                   "<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n"
                   "</tool_call><|im_end|>\n"),
            std::string::npos)
      << r;
  EXPECT_NE(r.find("<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nwarm\n"
                   "</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n"),
            std::string::npos)
      << r;
  std::string kept = t.render(hist, tools, true, json{{"preserve_thinking", true}});
  EXPECT_NE(kept.find("<think>\nold\n</think>\n\na1"), std::string::npos) << kept;
}

TEST_P(TinyTemplate, RejectsUnknownRoles) {
  ds::ChatTemplate t = ds::ChatTemplate::load(std::string(DS_TEST_DATA_DIR "/tiny-moe/") + GetParam());
  json msgs = json::parse(R"([{"role":"wizard","content":"x"}])");
  EXPECT_THROW(t.render(msgs, nullptr, true), ds::jinja::TemplateRaise);
}

INSTANTIATE_TEST_SUITE_P(Both, TinyTemplate, ::testing::Values("tiny-moe-bf16", "tiny-moe-int4"));

}  // namespace
