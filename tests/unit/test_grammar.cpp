// Structured output's grammar core (sampling/grammar.h): documents accepted byte by byte and in random chunks,
// invalid ones refused at the right byte, the token masker against advance() on every token, random walks over
// allowed tokens that must end in valid JSON of the schema, schema errors, and the masker's timings on a real
// vocabulary (printed, not asserted).
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <optional>
#include <random>
#include <regex>
#include <set>
#include <thread>

#include <nlohmann/json.hpp>

#include "core/status.h"
#include "error_util.h"
#include "sampling/grammar.h"
#include "text/tokenizer.h"
#include "text/tool_parser.h"

namespace ds::sampling {
namespace {

using ojson = nlohmann::ordered_json;
namespace fs = std::filesystem;

GrammarPtr schema_of(const char* text) { return grammar_json_schema(ojson::parse(text)); }

using test::show;

// Feeds `text` byte by byte: the index of the first byte refused, or -1 when all were taken.
int64_t first_refused(Matcher& m, std::string_view text) {
  for (size_t i = 0; i < text.size(); ++i) {
    const std::string before = m.state_key();
    if (!m.advance(text.substr(i, 1))) {
      EXPECT_EQ(m.state_key(), before) << "a refused byte changed the matcher";
      return int64_t(i);
    }
  }
  return -1;
}

// The whole document is accepted byte by byte and in random chunks, and is complete at the end (and not before
// its last byte, unless a prefix is itself a document).
void expect_accepts(const GrammarPtr& g, std::string_view doc, uint64_t seed = 1) {
  SCOPED_TRACE("document: " + show(doc));
  Matcher m(g);
  ASSERT_EQ(first_refused(m, doc), -1);
  EXPECT_TRUE(m.accepting());
  std::mt19937_64 rng(seed);
  for (int round = 0; round < 4; ++round) {
    Matcher c(g);
    for (size_t i = 0; i < doc.size();) {
      const size_t n = std::min(doc.size() - i, size_t(1 + rng() % 7));
      ASSERT_TRUE(c.advance(doc.substr(i, n))) << "chunk at " << i;
      i += n;
    }
    EXPECT_TRUE(c.accepting());
    EXPECT_EQ(c.state_key(), m.state_key());
  }
  // All at once.
  Matcher w(g);
  ASSERT_TRUE(w.advance(doc));
  EXPECT_TRUE(w.accepting());
}

// Every byte before `at` is taken, the byte at `at` is refused. at = doc.size(): all taken, but not complete.
void expect_refuses_at(const GrammarPtr& g, std::string_view doc, int64_t at) {
  SCOPED_TRACE("document: " + show(doc));
  Matcher m(g);
  const int64_t got = first_refused(m, doc);
  if (at == int64_t(doc.size())) {
    EXPECT_EQ(got, -1);
    EXPECT_FALSE(m.accepting()) << "an incomplete document is complete";
  } else {
    EXPECT_EQ(got, at);
    Matcher w(g);
    EXPECT_FALSE(w.advance(doc)) << "the whole document was taken at once";
  }
}

// ---------------------------------------------------------------------------------------------------------------
// json_object

TEST(GrammarJsonObject, AcceptsObjects) {
  const auto g = grammar_json_object();
  EXPECT_EQ(g, grammar_json_object()) << "one shared grammar";
  for (const char* doc : {
           "{}", "{ }", "{\n}", "{\"a\":1}", "{\"a\": 1, \"b\": [true, false, null]}",
           "{\"a\":{\"b\":{\"c\":[]}},\"d\":[[],[{}]]}", "{\"n\":[0,-0,12,-3.25,1e5,1E+2,2.5e-3,0.0]}",
           "{\"s\":\"\\\" \\\\ \\/ \\b \\f \\n \\r \\t \\u0000 \\u00e9 \\uD83D\\uDE00 \\uffff\"}",
           "{\"\xC3\xA9\xE4\xB8\xAD\xF0\x9F\x98\x80\":\"\xE2\x82\xAC\x7F\xF4\x8F\xBF\xBF\xEE\x80\x80\"}",
           "{\n  \"a\": 1,\n  \"b\": {\n\t\t\"c\": \"d\"\n  }\n}", "{\"a\" : 1 , \"a\" : 2}",
           "{\"big\":1234567890123456,\"f\":-0.1234567890123456e-99,\"g\":9999999999999999.9999999999999999E+99}"})
    expect_accepts(g, doc);
}

TEST(GrammarJsonObject, RefusesAtTheRightByte) {
  const auto g = grammar_json_object();
  struct Case {
    std::string doc;
    int64_t at;
  };
  const std::string ws21 = std::string("{\n") + std::string(21, ' ') + "}";
  const std::vector<Case> cases = {
      {"[1]", 0},                          // not an object
      {"\"x\"", 0},
      {"1", 0},
      {" {}", 0},                          // leading whitespace
      {"{} ", 2},                          // trailing text
      {"{}x", 2},
      {"{}\n", 2},
      {ws21, 22},                          // 21 spaces after the newline
      {"{  }", 2},                         // two spaces without a newline
      {"{\t}", 1},                         // a tab must follow a newline
      {"{\"a\":12345678901234567}", 21},   // 17 integer digits
      {"{\"a\":1.12345678901234567}", 23},  // 17 fraction digits
      {"{\"a\":1e123}", 9},              // 3 exponent digits
      {"{\"a\":1.5E-100}", 12},
      {"{\"a\":01}", 6},                   // leading zero
      {"{\"a\":-}", 6},
      {"{\"a\":1.}", 7},
      {"{\"a\":.5}", 5},
      {"{\"a\":+1}", 5},
      {"{\"a\":1,}", 7},                   // trailing comma
      {"{'a':1}", 1},
      {"{\"a\"}", 4},
      {"{a:1}", 1},
      {"{\"a\":tru}", 8},
      {"{\"a\":nul", 8},                   // unterminated
      {"{\"a\":\"x", 7},
      {"{\"a\":[1,2", 9},
      {"{\"a\":\"\\x\"}", 7},              // bad escape
      {"{\"a\":\"\\u12g4\"}", 10},
      {"{\"a\":\"\n\"}", 6},               // raw control character
      {"{\"a\":\"\x1F\"}", 6},
      {"{\"a\":\"\xC0\x80\"}", 6},         // overlong
      {"{\"a\":\"\xC1\xBF\"}", 6},
      {"{\"a\":\"\xE0\x80\x80\"}", 7},     // overlong 3-byte
      {"{\"a\":\"\xED\xA0\x80\"}", 7},     // UTF-16 surrogate in UTF-8
      {"{\"a\":\"\xF4\x90\x80\x80\"}", 7},  // above U+10FFFF
      {"{\"a\":\"\xF5\x80\x80\x80\"}", 6},
      {"{\"a\":\"\x80\"}", 6},             // lone continuation byte
      {"{\"a\":\"\xC3\"}", 7},             // truncated sequence
      {"{\"a\":\"\xE4\xB8x\"}", 8},
      {"{\"a\":\"\xFF\"}", 6},
      {"{\"a\":\"\\udc00\"}", 9},          // lone low surrogate
      {"{\"a\":\"\\ud800x\"}", 12},        // high surrogate not followed by a low one
      {"{\"a\":\"\\ud800\\u0041\"}", 14},
      {"{\"a\":\"\\ud800\\udbff\"}", 15},
  };
  for (auto& c : cases) expect_refuses_at(g, c.doc, c.at);
}

TEST(GrammarJsonObject, NestingIsLimitedTo32Levels) {
  const auto g = grammar_json_object();
  std::string deep32 = "{\"a\":", close32 = "}";
  for (int d = 2; d <= 32; ++d) {
    deep32 += d % 2 ? "{\"a\":" : "[";
    close32 = (d % 2 ? "}" : "]") + close32;
  }
  expect_accepts(g, deep32 + "1" + close32);
  expect_refuses_at(g, deep32 + "[1]" + close32, int64_t(deep32.size()));
  expect_refuses_at(g, deep32 + "{}" + close32, int64_t(deep32.size()));
}

// Multi-byte characters split at every byte boundary, in keys and values.
TEST(GrammarJsonObject, Utf8SplitAtEveryBoundary) {
  const auto g = grammar_json_object();
  const std::string doc = "{\"\xE4\xB8\xAD\xC3\xA9\":\"a\xF0\x9F\x98\x80\xE2\x82\xAC\\u00e9\xF4\x8F\xBF\xBF\"}";
  for (size_t i = 0; i <= doc.size(); ++i)
    for (size_t j = i; j <= doc.size(); ++j) {
      Matcher m(g);
      ASSERT_TRUE(m.advance(doc.substr(0, i)) && m.advance(doc.substr(i, j - i)) && m.advance(doc.substr(j)))
          << "split at " << i << ", " << j;
      EXPECT_TRUE(m.accepting());
    }
}

TEST(GrammarMatcher, CopiesAreIndependentAndRefusalsChangeNothing) {
  const auto g = grammar_json_object();
  Matcher a(g);
  ASSERT_TRUE(a.advance("{\"k\":"));
  Matcher b = a;
  ASSERT_TRUE(b.advance("[1]}"));
  EXPECT_TRUE(b.accepting());
  EXPECT_FALSE(b.can_continue());
  EXPECT_FALSE(a.accepting());
  const std::string key = a.state_key();
  EXPECT_FALSE(a.advance("[1]]"));
  EXPECT_EQ(a.state_key(), key);
  EXPECT_TRUE(a.advance("\"v\"}"));
  EXPECT_TRUE(a.accepting());
  EXPECT_TRUE(a.advance(""));
  EXPECT_FALSE(a.advance(" "));
}

// ---------------------------------------------------------------------------------------------------------------
// json_schema

const char* kPerson = R"({
  "type": "object",
  "properties": {
    "name": {"type": "string", "maxLength": 10},
    "age": {"type": "integer"},
    "member": {"type": "boolean"},
    "color": {"enum": ["red", "green", "blue"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2}
  },
  "required": ["name", "age", "member", "color"],
  "additionalProperties": false
})";

TEST(GrammarJsonSchema, ObjectPropertiesInOrderRequiredAndOptional) {
  const auto g = schema_of(kPerson);
  expect_accepts(g, R"({"name":"Ann","age":30,"member":true,"color":"red"})");
  expect_accepts(g, R"({"name": "\u00c9\u00e9\n\"x\"", "age": -7, "member": false, "color": "blue", "tags": []})");
  expect_accepts(g, "{\n  \"name\": \"\xE4\xB8\xAD\xE6\x96\x87\",\n  \"age\": 0,\n  \"member\": true,\n  \"color\": "
                    "\"green\",\n  \"tags\": [\"ab\", \"\xF0\x9F\x98\x80\"]\n}");
  const std::string pre = R"({"name":"Ann","age":30,"member":true,"color":"red")";
  expect_refuses_at(g, R"({"age":30})", 2);                                  // name is required first
  expect_refuses_at(g, R"({"name":"Ann","member":true})", 15);               // age missing
  expect_refuses_at(g, pre + R"(,"extra":1})", int64_t(pre.size()) + 2);     // no extra keys
  expect_refuses_at(g, pre + "}}", int64_t(pre.size()) + 1);                 // complete, nothing may follow
  expect_refuses_at(g, R"({"name":"Ann","age":3.5})", 21);                   // integer only
  expect_refuses_at(g, R"({"name":"Ann","age":1e3})", 21);
  expect_refuses_at(g, R"({"name":1})", 8);                                  // wrong type
  expect_refuses_at(g, R"({"name":"Ann","age":30,"member":true,"color":"pink"})", 46);
  expect_refuses_at(g, R"({"name":"Ann","age":30,"member":true,"color":"red","tags":["a","b","c"]})", 66);
  expect_refuses_at(g, R"({"name":"Ann","age":30,"member":true,"color":"red","tags":["abcde"]})", 64);
  expect_refuses_at(g, R"({"name":"Ann","age":30,"member":true,"color":"red","tags":["a",)", 63);   // unterminated
}

TEST(GrammarJsonSchema, StringLengthCountsCharactersAndEscapes) {
  const auto g = schema_of(R"({"type": "string", "minLength": 2, "maxLength": 3})");
  expect_accepts(g, "\"ab\"");
  expect_accepts(g, "\"\xE4\xB8\xAD\xF0\x9F\x98\x80\xC3\xA9\"");          // 3 characters, 9 bytes
  expect_accepts(g, "\"\\n\\u00e9\\uD83D\\uDE00\"");                     // 3 escapes (a pair is one)
  expect_refuses_at(g, "\"a\"", 2);
  expect_refuses_at(g, "\"abcd\"", 4);
  expect_refuses_at(g, "\"ab\\n\\t\"", 5);
  expect_refuses_at(g, "\"\xE4\xB8\xAD\xE4\xB8\xAD\xE4\xB8\xAD\xE4\"", 10);
  // Split at every byte.
  const std::string doc = "\"\xF0\x9F\x98\x80\xE4\xB8\xAD\"";
  for (size_t i = 0; i <= doc.size(); ++i) {
    Matcher m(g);
    ASSERT_TRUE(m.advance(doc.substr(0, i)) && m.advance(doc.substr(i))) << i;
    EXPECT_TRUE(m.accepting());
  }
}

TEST(GrammarJsonSchema, ArraysPrefixItemsMinMax) {
  const auto g = schema_of(R"({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3})");
  expect_accepts(g, "[1,2]");
  expect_accepts(g, "[1, 2, 3]");
  expect_refuses_at(g, "[]", 1);
  expect_refuses_at(g, "[1]", 2);
  expect_refuses_at(g, "[1,2,3,4]", 6);
  const auto t = schema_of(R"({"type": "array", "prefixItems": [{"type": "string"}, {"type": "boolean"}],
                               "items": false})");
  expect_accepts(t, "[]");
  expect_accepts(t, "[\"a\"]");
  expect_accepts(t, "[\"a\",true]");
  expect_refuses_at(t, "[true]", 1);
  expect_refuses_at(t, "[\"a\",true,1]", 9);
  const auto u = schema_of(R"({"type": "array", "prefixItems": [{"const": 1}], "items": {"type": "null"},
                               "minItems": 3})");
  expect_accepts(u, "[1,null,null,null,null]");
  expect_refuses_at(u, "[1,null]", 7);
  expect_refuses_at(u, "[2]", 1);
  // items absent: anything after the prefix.
  expect_accepts(schema_of(R"({"prefixItems": [{"type": "integer"}]})"), "[1,\"x\",{\"a\":[]}]");
}

TEST(GrammarJsonSchema, EnumConstAnyOfNullable) {
  const auto e = schema_of(R"({"enum": ["a", "ab", 1, 10, -2.5, null, true, {"k": [1]}, [1, "x"]]})");
  for (const char* doc : {"\"a\"", "\"ab\"", "1", "10", "-2.5", "null", "true", "{\"k\":[1]}", "[1,\"x\"]"})
    expect_accepts(e, doc);
  expect_refuses_at(e, "\"abc\"", 3);
  expect_refuses_at(e, "100", 2);
  expect_refuses_at(e, "{\"k\": [1]}", 5);  // the compact text only
  expect_refuses_at(e, "false", 0);
  // type filters enum values.
  const auto f = schema_of(R"({"type": "integer", "enum": [1, 2.5, "3", 4]})");
  expect_accepts(f, "1");
  expect_accepts(f, "4");
  expect_refuses_at(f, "2", 0);
  expect_refuses_at(f, "\"3\"", 0);
  const auto c = schema_of(R"({"const": "x\ny"})");
  expect_accepts(c, "\"x\\ny\"");
  expect_refuses_at(c, "\"x\\u000ay\"", 3);
  const auto a = schema_of(R"({"anyOf": [{"type": "object", "properties": {"x": {"type": "number"}},
      "required": ["x"]}, {"type": "object", "properties": {"y": {"type": "string"}}, "required": ["y"]},
      {"type": "null"}]})");
  expect_accepts(a, "{\"x\":1.5}");
  expect_accepts(a, "{\"y\":\"s\"}");
  expect_accepts(a, "null");
  expect_refuses_at(a, "{\"z\":1}", 2);
  expect_refuses_at(a, "{\"x\":\"s\"}", 5);
  const auto n = schema_of(R"({"type": "string", "nullable": true, "maxLength": 1})");
  expect_accepts(n, "null");
  expect_accepts(n, "\"a\"");
  expect_refuses_at(n, "\"ab\"", 2);
  const auto t = schema_of(R"({"type": ["integer", "null", "boolean"]})");
  for (const char* doc : {"12", "null", "false"}) expect_accepts(t, doc);
  expect_refuses_at(t, "1.5", 1);
  const auto num = schema_of(R"({"type": "number"})");
  for (const char* doc : {"12", "-0.5", "1e-7", "0"}) expect_accepts(num, doc);
  expect_refuses_at(num, "1 ", 1);
  expect_refuses_at(num, "00", 1);
}

TEST(GrammarJsonSchema, RecursiveRefTree) {
  const auto g = schema_of(R"({
    "$defs": {"node": {"type": "object",
      "properties": {"value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
      "required": ["value", "children"]}},
    "$ref": "#/$defs/node"})");
  expect_accepts(g, R"({"value":1,"children":[]})");
  std::string deep = R"({"value":0,"children":[)";
  std::string tail = "]}";
  for (int d = 1; d < 60; ++d) {  // deeper than the 32 levels of "any" JSON: a schema's recursion is not limited
    deep += R"({"value":)" + std::to_string(d) + R"(,"children":[{"value":-1,"children":[]},)";
    tail = "]}" + tail;
  }
  expect_accepts(g, deep + R"({"value":99,"children":[]})" + tail);
  expect_refuses_at(g, R"({"value":1,"children":[{"value":2}]})", 33);
  // Recursion through the root and through definitions.
  const auto r = schema_of(R"({"definitions": {"list": {"anyOf": [{"type": "null"},
      {"type": "object", "properties": {"head": {"type": "string"}, "tail": {"$ref": "#/definitions/list"}},
       "required": ["head", "tail"]}]}}, "$ref": "#/definitions/list"})");
  expect_accepts(r, R"({"head":"a","tail":{"head":"b","tail":null}})");
  const auto root = schema_of(R"({"type": "array", "items": {"$ref": "#"}, "maxItems": 2})");
  expect_accepts(root, "[[],[[],[[]]]]");
  expect_refuses_at(root, "[[],[],[]]", 6);
}

TEST(GrammarJsonSchema, AdditionalProperties) {
  const auto free = schema_of(R"({"type": "object", "additionalProperties": {"type": "integer"}})");
  expect_accepts(free, "{}");
  expect_accepts(free, R"({"a":1,"b":-2,"a":3})");
  expect_refuses_at(free, R"({"a":"x"})", 5);
  const auto both = schema_of(R"({"type": "object", "properties": {"id": {"type": "string"}, "ix": {"type": "null"}},
                                  "required": ["id"], "additionalProperties": {"type": "boolean"}})");
  expect_accepts(both, R"({"id":"x"})");
  expect_accepts(both, R"({"id":"x","ix":null,"i":true,"idx":false,"\u0069d":true})");
  expect_refuses_at(both, R"({"id":"x","id":true})", 13);   // a listed name is not an extra key
  expect_refuses_at(both, R"({"id":"x","ix":true})", 15);
  expect_refuses_at(both, R"({"extra":true,"id":"x"})", 2);  // listed properties come first
  const auto none = schema_of(R"({"type": "object", "properties": {}})");
  expect_accepts(none, "{}");
  expect_refuses_at(none, R"({"a":1})", 1);
  const auto any = schema_of(R"({"type": "object"})");
  expect_accepts(any, R"({"a":[1,{"b":null}]})");
  const auto key = schema_of(R"({"type": "object", "properties": {"a\"b/\u00e9": {"const": 1}}, "required": ["a\"b/\u00e9"]})");
  expect_accepts(key, "{\"a\\\"b/\xC3\xA9\":1}");
}

TEST(GrammarJsonSchema, EmptyAndTrueSchemasAreAnyValue) {
  for (const char* s : {"{}", "true", R"({"description": "anything", "title": "t"})"}) {
    const auto g = schema_of(s);
    for (const char* doc : {"1", "\"s\"", "null", "[1,{}]", "{\"a\":false}", "-2.5e3"}) expect_accepts(g, doc);
    expect_refuses_at(g, " 1", 0);
  }
}

TEST(GrammarJsonSchema, ErrorsNameThePointerAndTheKeyword) {
  EXPECT_ERROR(schema_of(R"({"type": "object", "properties": {"a": {"type": "object", "patternProperties": {}}}})"),
               "unsupported keyword \"patternProperties\" at /properties/a (supported: type, properties");
  EXPECT_ERROR(schema_of(R"j({"properties": {"p": {"type": "string", "pattern": "a(?=b)"}}})j"),
               "json_schema: \"pattern\" at /properties/p: regex: lookahead \"(?=\" is not supported at character 1");
  EXPECT_ERROR(schema_of(R"({"type": "string", "pattern": 5})"),
               "\"pattern\" at the root must be a string (a regular expression), found 5");
  for (const char* kw : {"if", "not", "dependentRequired", "multipleOf", "minProperties", "unevaluatedProperties"}) {
    const std::string s = std::string(R"({"type": "array", "items": {")") + kw + R"(": 1}})";
    EXPECT_ERROR(grammar_json_schema(ojson::parse(s)), std::string("unsupported keyword \"") + kw + "\" at /items");
  }
  EXPECT_ERROR(schema_of(R"({"properties": {"a/b": {"type": "strin"}}})"),
               "\"type\" at /properties/a~1b must be one of object, array, string");
  EXPECT_ERROR(schema_of(R"({"type": "array", "minItems": "3"})"),
               "\"minItems\" at the root must be a non-negative integer, found \"3\"");
  EXPECT_ERROR(schema_of(R"({"type": "array", "minItems": 3, "maxItems": 2})"), "\"minItems\" 3 exceeds \"maxItems\" 2");
  EXPECT_ERROR(schema_of(R"({"type": "string", "maxLength": 1000000})"), "\"maxLength\" at the root is 1000000");
  EXPECT_ERROR(schema_of(R"({"enum": []})"), "\"enum\" at the root must be a non-empty array");
  EXPECT_ERROR(schema_of(R"({"anyOf": {}})"), "\"anyOf\" at the root must be a non-empty array");
  EXPECT_ERROR(schema_of(R"({"allOf": [{}, {}]})"), "\"allOf\" at the root must be an array of exactly one");
  EXPECT_ERROR(schema_of(R"({"type": "object", "anyOf": [{}]})"), "\"anyOf\" at the root cannot be combined with \"type\"");
  EXPECT_ERROR(schema_of(R"({"$ref": "other.json#/a"})"), "\"$ref\" at the root must be a reference into the same");
  EXPECT_ERROR(schema_of(R"({"properties": {"a": {"$ref": "#/$defs/missing"}}})"),
               "\"$ref\" at /properties/a points to #/$defs/missing, which is not in the schema");
  EXPECT_ERROR(schema_of(R"({"properties": {"a": {}}, "required": ["b"]})"), "\"required\" at the root names \"b\"");
  EXPECT_ERROR(schema_of(R"({"required": "a"})"), "\"required\" at the root must be an array");
  EXPECT_ERROR(schema_of(R"({"items": [{}]})"), "\"items\" at the root must be a schema or a boolean");
  EXPECT_ERROR(schema_of(R"({"properties": {"a": false}, "required": ["a"]})"),
               "the schema at /properties/a is false");
  EXPECT_ERROR(schema_of("[1]"), "expected a schema (an object or a boolean) at the root, found [1]");
  EXPECT_ERROR(schema_of(R"({"type": "string", "enum": [1, 2]})"), "no value of \"enum\" at the root has the schema's type");
  // A tree whose children are required forever has no finite value; a reference to itself before any text is
  // left recursion.
  EXPECT_ERROR(schema_of(R"({"$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}},
                            "required": ["c"]}}, "$ref": "#/$defs/n"})"),
               "json_schema: no finite value satisfies it");
  EXPECT_ERROR(schema_of(R"({"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}},
                            "$ref": "#/$defs/a"})"),
               "left recursion");
  EXPECT_ERROR(grammar_choice({}), "choice: expected at least one string, found an empty list");
  std::string deep = "{}";
  for (int i = 0; i < 200; ++i) deep = "{\"items\": " + deep + "}";
  EXPECT_ERROR(grammar_json_schema(ojson::parse(deep)), "is nested more than 128 levels deep");
  // An optional property whose schema has no value is never produced (not an error).
  const auto g = schema_of(R"({"$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}},
                              "required": ["c"]}}, "properties": {"x": {"$ref": "#/$defs/n"}, "y": {"type": "null"}}})");
  expect_accepts(g, "{\"y\":null}");
  expect_refuses_at(g, "{\"x\"", 2);
}

TEST(GrammarJsonSchema, CompactHasNoWhitespaceBetweenTokens) {
  const auto g = grammar_json_schema(ojson::parse(kPerson), true);
  expect_accepts(g, R"({"name":"a b","age":1,"member":true,"color":"red","tags":["x"]})");
  expect_refuses_at(g, R"({ "name")", 1);
  expect_refuses_at(g, R"({"name": )", 8);
  expect_refuses_at(g, R"({"name":"a","age":1 ,)", 19);
  EXPECT_NE(g, grammar_json_schema(ojson::parse(kPerson))) << "compact and not are two grammars";
  const auto o = grammar_json_object(true);
  expect_accepts(o, R"({"a":[1,{"b":null}],"c":"d e"})");
  expect_refuses_at(o, "{\n", 1);
  expect_refuses_at(o, R"({"a":[1, 2]})", 8);
}

TEST(GrammarJsonSchema, PlainJsonSortsPropertiesOrderedJsonKeepsThem) {
  const char* s = R"({"properties": {"b": {"type": "null"}, "a": {"type": "null"}}, "required": ["a", "b"]})";
  expect_accepts(grammar_json_schema(ojson::parse(s)), R"({"b":null,"a":null})");
  expect_accepts(grammar_json_schema(nlohmann::json::parse(s)), R"({"a":null,"b":null})");
  EXPECT_EQ(grammar_json_schema(ojson::parse(s)), grammar_json_schema(ojson::parse(s))) << "recent schemas are shared";
}

TEST(GrammarChoice, ExactlyOneString) {
  const auto g = grammar_choice({"yes", "no", "no way", "", "\xE4\xB8\xAD"});
  Matcher m(g);
  EXPECT_TRUE(m.accepting()) << "the empty choice";
  for (const char* doc : {"yes", "no", "no way", "\xE4\xB8\xAD"}) expect_accepts(g, doc);
  expect_refuses_at(g, "ye", 2);
  expect_refuses_at(g, "yes!", 3);
  expect_refuses_at(g, "\"yes\"", 0);
  Matcher n(g);
  ASSERT_TRUE(n.advance("no"));
  EXPECT_TRUE(n.accepting());
  EXPECT_TRUE(n.can_continue());
}

// ---------------------------------------------------------------------------------------------------------------
// TokenMasker against Matcher::advance

// Token strings of every kind: single bytes (printable, controls, UTF-8 leads and continuations), JSON
// punctuation runs, whitespace runs, keywords, numbers, escapes, multi-byte characters whole and in pieces.
std::vector<std::string> synthetic_vocab() {
  std::vector<std::string> v{""};  // id 0: a special token (never allowed)
  for (int c = 0x20; c < 0x7F; ++c) v.push_back(std::string(1, char(c)));
  for (int c = 0; c < 0x20; ++c) v.push_back(std::string(1, char(c)));
  for (int c = 0x7F; c < 0x100; ++c) v.push_back(std::string(1, char(c)));
  for (const char* s : {"{\"", "\":", "\",", "\"}", "}}", "]}", "],", "[{", "{}", "[]", "\": \"", "\", \"", " {",
                        " \"", "  ", "    ", "\n  ", "\n\n", " \n", "\t\t", "\n\t", "\n", " ", ",\n", ": ", ", ",
                        "true", "false", "null", "tr", "ue", "nul", "fals", "12", "123", "0.", ".5", "e+", "E-1",
                        "-0", "00", "1e", "3.14", "-1", "\\n", "\\\"", "\\u", "\\u00", "e9", "\\ud83d", "\\ude00",
                        "\\udc00", "\\", "\\\\", "ab", "abc", "name", "\"name\"", "\"name\":", "\"age\": ", "age",
                        "red", "\"red\"", "green", "blue", "\"blue\"}", "member", "color", "tags", "value",
                        "children", "\"children\":[", "\"value\":", "head", "tail", "id", "x", "y", "\"x\"",
                        "\xC3\xA9", "\xE4\xB8\xAD", "\xF0\x9F\x98\x80", "\xC3\xA9\"", "\xE4\xB8", "\xAD",
                        "\x9F\x98", "\x98\x80\"", "\xF0\x9F", "\xB8\xAD\xE4", "a\"", "\"a", ",\"", "\"}}",
                        "}\n", "\"\n", "1}", "0]", "null}", "true,", "[\"", "\"]", "yes", "no", " way"})
    v.push_back(s);
  v.push_back("");  // another special
  return v;
}

int64_t count_bits(const std::vector<uint32_t>& bits) {
  int64_t n = 0;
  for (uint32_t w : bits) n += __builtin_popcount(w);
  return n;
}

// At every prefix of each document: allowed() (cached and not) == {tokens t : copy of matcher advances over t}.
void expect_masks_match(const GrammarPtr& g, const TokenMasker& tm, const std::vector<std::string>& docs,
                        size_t stride = 1) {
  std::vector<uint32_t> bits, cached;
  int64_t states = 0, allowed = 0;
  for (auto& doc : docs) {
    Matcher m(g);
    for (size_t i = 0; i <= doc.size(); i += stride) {
      if (i > 0) {
        ASSERT_TRUE(m.advance(std::string_view(doc).substr(i - stride, stride))) << show(doc) << " at " << i;
      }
      tm.allowed_uncached(m, bits);
      tm.allowed(m, cached);
      ASSERT_EQ(bits, cached);
      for (int64_t id = 0; id < tm.vocab(); ++id) {
        Matcher c = m;
        const std::string_view t = tm.token_bytes(int32_t(id));
        const bool want = !t.empty() && c.advance(t);
        const bool got = bits[size_t(id) / 32] >> (id % 32) & 1u;
        if (want != got) {
          ADD_FAILURE() << "token " << id << " " << show(t) << " after " << show(doc.substr(0, i)) << ": allowed() "
                        << got << ", advance " << want;
          return;
        }
      }
      ++states;
      allowed += count_bits(bits);
      if (i + stride > doc.size()) break;
    }
  }
  EXPECT_GT(allowed, states) << "the masks allow something";
}

// Above 256 characters a bounded string calls a character rule per count instead of unrolling the characters.
TEST(GrammarJsonSchema, LongBoundedStrings) {
  const auto g = schema_of(R"({"type": "string", "minLength": 300, "maxLength": 301})");
  std::string body;
  for (int i = 0; i < 300; ++i) body += i % 3 == 0 ? "\xE4\xB8\xAD" : i % 3 == 1 ? "\\n" : "a";
  expect_accepts(g, "\"" + body + "\"");
  expect_accepts(g, "\"" + body + "\\u00e9\"");
  expect_refuses_at(g, "\"" + body.substr(0, body.size() - 1) + "\"", int64_t(body.size()));
  expect_refuses_at(g, "\"" + body + "ab\"", int64_t(body.size()) + 2);
  const auto u = schema_of(R"({"type": "string", "minLength": 257})");
  expect_refuses_at(u, "\"" + std::string(256, 'x') + "\"", 257);
  expect_accepts(u, "\"" + std::string(2000, 'x') + "\"");
  const TokenMasker tm(synthetic_vocab());
  expect_masks_match(g, tm, {"\"" + body + "\""}, 7);
}

TEST(GrammarMasker, EqualsAdvanceOnEveryTokenAlongDocuments) {
  const TokenMasker tm(synthetic_vocab());
  expect_masks_match(grammar_json_object(), tm,
                     {"{\"name\": \"\xC3\xA9\\n\\ud83d\\ude00\xE4\xB8\xAD\", \"x\":[1.5e+3,true,null,{}],\n  \"y\":-0}",
                      "{\"a\":{\"b\":[[\"\xF0\x9F\x98\x80\"]]}}"});
  expect_masks_match(schema_of(kPerson), tm,
                     {R"({"name":"ab\u00e9","age":-12,"member":true,"color":"blue","tags":["x","yes"]})",
                      "{\n  \"name\": \"\xE4\xB8\xAD\xE4\xB8\xAD\",\n  \"age\": 0, \"member\": false, \"color\": \"red\"}"});
  expect_masks_match(schema_of(R"({"$defs": {"node": {"type": "object", "properties": {"value": {"type": "integer"},
                         "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
                         "required": ["value", "children"]}}, "$ref": "#/$defs/node"})"),
                     tm, {R"({"value":1,"children":[{"value":2,"children":[]},{"value":3,"children":[]}]})"});
  expect_masks_match(schema_of(R"({"anyOf": [{"type": "object", "properties": {"x": {"type": "number"}}},
                         {"type": "object", "properties": {"id": {"type": "string"}}, "additionalProperties": true},
                         {"type": "null"}, {"enum": [1, 12, "red"]}]})"),
                     tm, {R"({"id":"a","x":[1]})", "null", "12", R"({"x":3.14})"});
  expect_masks_match(grammar_choice({"yes", "no", "no way"}), tm, {"no way"});
}

// Every token of the real vocabulary against advance() at a few states (the byte-level BPE has tokens that end
// inside a UTF-8 sequence and lone continuation bytes).
std::string real_tokenizer_path() {
  for (const std::string& p : {std::string(DS_SHARED_DIR) + "/assets/qwen3-tokenizer/tokenizer.json",
                              std::string(DS_TEST_DATA_DIR) + "/tiny-moe/text/tokenizer/tokenizer.json"})
    if (fs::exists(p)) return p;
  return "";
}

std::vector<std::string> real_vocab(const std::string& path) {
  const text::Tokenizer tok = text::Tokenizer::load(path);
  std::vector<std::string> bytes(size_t(tok.vocab_size()));
  for (int32_t id = 0; id < tok.vocab_size(); ++id)
    if (!tok.is_added(id)) bytes[size_t(id)] = std::string(tok.token_bytes(id));
  return bytes;
}

TEST(GrammarMasker, EqualsAdvanceOnTheRealVocabulary) {
  const std::string path = real_tokenizer_path();
  if (path.empty()) GTEST_SKIP() << "no tokenizer.json";
  const TokenMasker tm(real_vocab(path));
  std::printf("vocabulary %s: %lld tokens, %zu trie nodes\n", path.c_str(), (long long)tm.vocab(), tm.trie_nodes());
  expect_masks_match(grammar_json_object(), tm,
                     {"{\"name\": \"\xC3\xA9\xE4\xB8\xAD\xF0\x9F\x98\x80 x\", \"n\":[-1.5e3]}"}, 3);
  expect_masks_match(schema_of(kPerson), tm, {R"({"name":"a b","age":-12,"member":true,"color":"blue"})"}, 5);
}

// ---------------------------------------------------------------------------------------------------------------
// Random walks: what the server does with a random-weight model.

// A checker for the supported subset: does v satisfy schema s (properties in the schema's order)?
bool valid(const ojson& v, const ojson& s, const ojson& root, std::string& why) {
  auto no = [&](const std::string& w) {
    why = w + " in " + v.dump();
    return false;
  };
  if (s.is_boolean()) return s.get<bool>() || no("false schema");
  if (s.contains("nullable") && s["nullable"].get<bool>() && v.is_null()) return true;
  if (s.contains("$ref")) {
    const std::string r = s["$ref"].get<std::string>();
    return valid(v, root.at(ojson::json_pointer(r.substr(1))), root, why);
  }
  for (const char* kw : {"anyOf", "oneOf"})
    if (s.contains(kw)) {
      for (auto& alt : s[kw])
        if (valid(v, alt, root, why)) return true;
      return no(std::string("no ") + kw + " branch");
    }
  if (s.contains("allOf")) return valid(v, s["allOf"][0], root, why);
  if (s.contains("const")) return v == s["const"] || no("not the const");
  if (s.contains("enum")) {
    for (auto& e : s["enum"])
      if (v == e) return true;
    return no("not in enum");
  }
  if (s.contains("type")) {
    std::vector<std::string> types;
    if (s["type"].is_array())
      for (auto& t : s["type"]) types.push_back(t.get<std::string>());
    else
      types.push_back(s["type"].get<std::string>());
    bool ok = false;
    for (auto& t : types)
      ok |= (t == "null" && v.is_null()) || (t == "boolean" && v.is_boolean()) ||
            (t == "integer" && v.is_number_integer()) || (t == "number" && v.is_number()) ||
            (t == "string" && v.is_string()) || (t == "array" && v.is_array()) || (t == "object" && v.is_object());
    if (!ok) return no("wrong type");
  }
  if (v.is_string()) {
    const std::string str = v.get<std::string>();
    int64_t chars = 0;
    for (unsigned char c : str) chars += (c & 0xC0) != 0x80;
    if (s.contains("minLength") && chars < s["minLength"].get<int64_t>()) return no("too short");
    if (s.contains("maxLength") && chars > s["maxLength"].get<int64_t>()) return no("too long");
    // std::regex (ECMAScript, bytes): the tests' patterns are ASCII, and the grammar matches them as a whole.
    if (s.contains("pattern") && !std::regex_match(str, std::regex(s["pattern"].get<std::string>())))
      return no("does not match the pattern");
  }
  if (v.is_array()) {
    const int64_t n = int64_t(v.size());
    if (s.contains("minItems") && n < s["minItems"].get<int64_t>()) return no("too few items");
    if (s.contains("maxItems") && n > s["maxItems"].get<int64_t>()) return no("too many items");
    const size_t m = s.contains("prefixItems") ? s["prefixItems"].size() : 0;
    for (size_t i = 0; i < v.size(); ++i) {
      const ojson sub = i < m ? s["prefixItems"][i] : s.contains("items") ? s["items"] : ojson(true);
      if (!valid(v[i], sub, root, why)) return false;
    }
  }
  if (v.is_object()) {
    const ojson props = s.contains("properties") ? s["properties"] : ojson::object();
    const ojson extra = s.contains("additionalProperties") ? s["additionalProperties"]
                        : s.contains("properties")         ? ojson(false)
                                                           : ojson(true);
    if (s.contains("required"))
      for (auto& r : s["required"])
        if (!v.contains(r.get<std::string>())) return no("missing " + r.get<std::string>());
    size_t last = 0;  // listed properties in the schema's order, before any extra key
    bool extras = false;
    for (auto& [k, x] : v.items()) {
      size_t idx = 0;
      for (auto& [pk, pv] : props.items()) {
        if (pk == k) break;
        ++idx;
      }
      if (idx < props.size()) {
        if (extras || idx < last) return no("property " + k + " out of order");
        last = idx + 1;
        if (!valid(x, props[k], root, why)) return false;
      } else {
        extras = true;
        if (!valid(x, extra, root, why)) return false;
      }
    }
  }
  return true;
}

struct WalkStats {
  int complete = 0, capped = 0;
  int64_t tokens = 0;
};

// Walks from the start: a random allowed token each step (seeded); stops when complete with probability 1/3 or when
// nothing can follow, or after `cap` tokens (then only the prefix is checked: every step was allowed).
WalkStats random_walks(const GrammarPtr& g, const TokenMasker& tm, int walks, int cap, uint64_t seed,
                       const std::function<void(const std::string&)>& check) {
  std::mt19937_64 rng(seed);
  std::vector<uint32_t> bits;
  std::vector<int32_t> ids;
  WalkStats st;
  for (int w = 0; w < walks; ++w) {
    Matcher m(g);
    std::string text;
    bool done = false;
    for (int step = 0; step < cap && !done; ++step) {
      if (m.accepting() && (!m.can_continue() || rng() % 3 == 0)) {
        done = true;
        break;
      }
      tm.allowed(m, bits);
      ids.clear();
      for (int64_t id = 0; id < tm.vocab(); ++id)
        if (bits[size_t(id) / 32] >> (id % 32) & 1u) ids.push_back(int32_t(id));
      if (ids.empty()) {
        ADD_FAILURE() << "no token allowed and the text is not complete: " << show(text);
        return st;
      }
      const int32_t t = ids[rng() % ids.size()];
      if (!m.advance(tm.token_bytes(t))) {
        ADD_FAILURE() << "an allowed token was refused: " << show(tm.token_bytes(t)) << " after " << show(text);
        return st;
      }
      text += tm.token_bytes(t);
      ++st.tokens;
    }
    if (!done && m.accepting()) done = true;
    if (done) {
      ++st.complete;
      check(text);
    } else {
      ++st.capped;
    }
  }
  return st;
}

void walk_schema(const char* schema_text, const TokenMasker& tm, int walks, int cap, int min_complete) {
  SCOPED_TRACE(schema_text);
  const ojson schema = ojson::parse(schema_text);
  const GrammarPtr g = grammar_json_schema(schema);
  const WalkStats st = random_walks(g, tm, walks, cap, 42, [&](const std::string& text) {
    ojson v;
    try {
      v = ojson::parse(text);
    } catch (const std::exception& e) {
      ADD_FAILURE() << "not JSON: " << show(text) << ": " << e.what();
      return;
    }
    std::string why;
    EXPECT_TRUE(valid(v, schema, schema, why)) << why << "\ntext: " << show(text);
  });
  std::printf("  %d walks: %d complete, %d capped at %d tokens, %.1f tokens per walk\n", walks, st.complete, st.capped,
              cap, double(st.tokens) / walks);
  EXPECT_GE(st.complete, min_complete);
}

TEST(GrammarRandomWalk, EndsInValidJsonOfTheSchema) {
  const TokenMasker tm(synthetic_vocab());
  walk_schema(kPerson, tm, 300, 400, 290);
  walk_schema(R"({"type": "object", "properties": {
      "a": {"type": "object", "properties": {"b": {"type": "array", "items": {"type": "number"}, "minItems": 1,
                                                   "maxItems": 3}}, "required": ["b"]},
      "c": {"anyOf": [{"type": "object", "properties": {"x": {"const": 5}}, "required": ["x"]}, {"type": "null"}]},
      "d": {"enum": [1, 2.5, -3, "x", null, true, {"k": [1]}]},
      "e": {"type": ["integer", "boolean"]}},
    "required": ["a", "c"]})",
              tm, 300, 400, 290);
  walk_schema(R"({"$defs": {"node": {"type": "object", "properties": {"value": {"type": "integer"},
      "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
      "required": ["value", "children"]}}, "$ref": "#/$defs/node"})",
              tm, 300, 1500, 200);
  walk_schema(R"({"type": "object", "properties": {"id": {"type": "string", "minLength": 1, "maxLength": 3}},
      "required": ["id"], "additionalProperties": {"type": "string", "maxLength": 2}})",
              tm, 300, 400, 250);
  walk_schema(R"({"type": "array", "prefixItems": [{"type": "string", "maxLength": 2}, {"type": "number"}],
      "items": {"type": "boolean"}, "minItems": 2, "maxItems": 4})",
              tm, 300, 400, 290);
  walk_schema(R"({"type": "string", "minLength": 2, "maxLength": 5})", tm, 300, 100, 300);
  walk_schema(R"({"type": "integer", "nullable": true})", tm, 300, 100, 300);
}

TEST(GrammarRandomWalk, JsonObjectAndChoice) {
  const TokenMasker tm(synthetic_vocab());
  size_t members = 0;
  const WalkStats st = random_walks(grammar_json_object(), tm, 300, 600, 7, [&](const std::string& text) {
    nlohmann::json v;
    ASSERT_NO_THROW(v = nlohmann::json::parse(text)) << show(text);
    EXPECT_TRUE(v.is_object()) << show(text);
    members += v.size();
  });
  std::printf("  json_object: %d complete, %d capped, %zu members in all\n", st.complete, st.capped, members);
  EXPECT_GE(st.complete, 100);
  EXPECT_GE(members, size_t(st.complete) / 2) << "the walks produce more than {}";
  const std::vector<std::string> choices{"yes", "no", "no way", "\xE4\xB8\xAD"};
  random_walks(grammar_choice(choices), tm, 200, 20, 9, [&](const std::string& text) {
    EXPECT_NE(std::find(choices.begin(), choices.end(), text), choices.end()) << show(text);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Regular expressions: vLLM's structured_outputs.regex (raw text) and JSON Schema's pattern

TEST(GrammarRegex, RawTextMatchesThePatternAsAWhole) {
  const auto g = grammar_regex("(\\d{3})-\\d{4}( ext\\. \\d+)?");
  for (const char* t : {"555-1234", "555-1234 ext. 9", "000-0000 ext. 12345"}) expect_accepts(g, t);
  expect_refuses_at(g, "55-1234", 2);
  expect_refuses_at(g, "555-12345", 8);
  expect_refuses_at(g, "555-123", 7);  // a prefix: taken, not complete
  expect_refuses_at(g, "555-1234 ext 9", 12);
  EXPECT_EQ(grammar_regex("(\\d{3})-\\d{4}( ext\\. \\d+)?"), g) << "recent patterns share their grammar";
  // Unicode, and a text that may go on after a complete match.
  const auto u = grammar_regex("[\xCE\xB1-\xCF\x89]+!*");
  expect_accepts(u, "\xCE\xB1\xCE\xB2!!");
  Matcher m(u);
  ASSERT_TRUE(m.advance("\xCE\xB1"));
  EXPECT_TRUE(m.accepting());
  EXPECT_TRUE(m.can_continue());
  ASSERT_TRUE(m.advance("\xCF"));
  EXPECT_FALSE(m.accepting()) << "inside a character";
  expect_refuses_at(u, "\xCE\xB1" "a", 2);
  EXPECT_ERROR(grammar_regex("[^\\s\\S]"), "regex: the pattern matches no text");
  EXPECT_ERROR(grammar_regex("(a|b"), "regex: a '(' that is never closed at character 0");
}

TEST(GrammarRegex, MasksEqualAdvanceAndWalksMatch) {
  const TokenMasker tm(synthetic_vocab());
  const auto g = grammar_regex("(yes|no way)|\\d{1,3}(\\.\\d+)?|[a-c]+\"?");
  expect_masks_match(g, tm, {"no way", "123.5", "abc\"", "12"});
  const std::regex oracle("(yes|no way)|\\d{1,3}(\\.\\d+)?|[a-c]+\"?");
  const WalkStats st = random_walks(g, tm, 300, 40, 11, [&](const std::string& text) {
    EXPECT_TRUE(std::regex_match(text, oracle)) << show(text);
  });
  EXPECT_GE(st.complete, 250);
  // A pattern with a bounded repeat of a class: walks end inside the bounds.
  const auto h = grammar_regex("[0-9a-f]{8}-[0-9a-f]{4}");
  random_walks(h, tm, 200, 40, 12, [&](const std::string& text) {
    EXPECT_TRUE(std::regex_match(text, std::regex("[0-9a-f]{8}-[0-9a-f]{4}"))) << show(text);
  });
}

// GBNF / EBNF grammars (structured_outputs.grammar, llama.cpp's grammar)

// JSON in GBNF, close to llama.cpp's grammars/json.gbnf (written here): walks must parse with nlohmann::json.
const char* kJsonGbnf = R"(# a JSON value
root   ::= value
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" hex4) )* "\"" ws
hex4   ::= [0-9a-cA-CefEF] [0-9a-fA-F]{3} | [dD] [0-7] [0-9a-fA-F]{2}   # no surrogate halves
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,2})? ws
ws ::= | " " | "\n" [ \t]{0,20}
)";

TEST(GrammarEbnf, JsonGrammarAcceptsJsonAndWalksParse) {
  const auto g = grammar_ebnf(kJsonGbnf);
  for (const char* t : {R"({"a": [1, -2.5e+3, true, null], "b": {"c": "d\n\u00e9"}})", "[]", "\"\xE4\xB8\xAD\"", "0",
                        "{}\n  "})
    expect_accepts(g, t);
  expect_refuses_at(g, "[1,]", 3);
  expect_refuses_at(g, "01", 1);
  expect_refuses_at(g, "{\"a\" 1}", 5);
  expect_refuses_at(g, "\"\x01\"", 1);
  EXPECT_EQ(grammar_ebnf(kJsonGbnf), g) << "recent grammars are shared";
  const TokenMasker tm(synthetic_vocab());
  expect_masks_match(g, tm, {R"({"name": "ab\u00e9", "x": [1.5e+3, true, null, {}]})"});
  const WalkStats st = random_walks(g, tm, 300, 300, 21, [&](const std::string& text) {
    nlohmann::json v;
    EXPECT_NO_THROW(v = nlohmann::json::parse(text)) << show(text);
  });
  EXPECT_GE(st.complete, 200);
}

TEST(GrammarEbnf, RegularGrammarEqualsItsRegex) {
  // The same language as a regular expression: walks and short texts agree with std::regex.
  const auto g = grammar_ebnf(R"(
    root ::= item ("," item){0,3} end?
    item ::= [a-c]+ | 'x' digit{1,2} | "\u00e9"
    digit ::= [0-9]
    end ::= ";"
  )");
  const std::regex re("([a-c]+|x[0-9]{1,2}|\xC3\xA9)(,([a-c]+|x[0-9]{1,2}|\xC3\xA9)){0,3};?");
  const TokenMasker tm(synthetic_vocab());
  const WalkStats st = random_walks(g, tm, 300, 60, 22, [&](const std::string& text) {
    EXPECT_TRUE(std::regex_match(text, re)) << show(text);
  });
  EXPECT_GE(st.complete, 250);
  for (const char* t : {"a", "x1,b;", "x12,\xC3\xA9,cc,a", "", "x", "x123", "a,b,c,a,b", "a;;", "ab,", "d"}) {
    Matcher m(g);
    EXPECT_EQ(m.advance(t) && m.accepting(), std::regex_match(t, re)) << show(t);
  }
  expect_masks_match(g, tm, {"x12,\xC3\xA9,cc;", "abc"});
}

TEST(GrammarEbnf, RecursionDotAndEmptyAlternatives) {
  // Balanced parentheses (right recursion through a group), any character, empty alternatives.
  const auto g = grammar_ebnf("root ::= p . opt\np ::= \"(\" p* \")\"\nopt ::= | \"!\"");
  for (const char* t : {"()x", "(()())\n", "((()))\xF0\x9F\x98\x80!"}) expect_accepts(g, t);
  expect_refuses_at(g, ")", 0);
  expect_refuses_at(g, "(()", 3);
  expect_refuses_at(g, "()ab", 3);
  // A regular part too large for one automaton (2^16 states) is compiled as rules and calls instead, same language.
  const auto big = grammar_ebnf(R"(root ::= [ab]* "a" [ab]{15})");
  expect_accepts(big, "b" "a" "bbbbbbbbbbbbbbb");
  expect_accepts(big, "aaaaaaaaaaaaaaaaaa");
  Matcher m(big);
  ASSERT_TRUE(m.advance("bbbbbbbbbbbbbbbbb"));
  EXPECT_FALSE(m.accepting());
}

TEST(GrammarEbnf, ErrorsNameTheLineAndColumn) {
  EXPECT_ERROR(grammar_ebnf("root ::= a"), "grammar: the rule 'a' is used but never defined at line 1, column 10");
  EXPECT_ERROR(grammar_ebnf("root ::= \"a\"\nroot ::= \"b\""), "the rule 'root' is defined twice at line 2, column 1");
  EXPECT_ERROR(grammar_ebnf("start ::= \"a\""), "grammar: no rule named \"root\"");
  EXPECT_ERROR(grammar_ebnf(""), "grammar: the text defines no rules");
  EXPECT_ERROR(grammar_ebnf("root = \"a\""), "expected '::=' after the rule name 'root' at line 1, column 6");
  EXPECT_ERROR(grammar_ebnf("root ::= \"a"), "a string that is never closed at line 1, column 10");
  EXPECT_ERROR(grammar_ebnf("root ::= [a-"), "a '[' that is never closed");
  EXPECT_ERROR(grammar_ebnf("root ::= [z-a]"), "a character range with its ends reversed");
  EXPECT_ERROR(grammar_ebnf("root ::= (\"a\""), "a '(' that is never closed at line 1, column 10");
  EXPECT_ERROR(grammar_ebnf("root ::= \"a\")"), "unbalanced ')' at line 1, column 13");
  EXPECT_ERROR(grammar_ebnf("root ::= \"a\"{3,2}"), "the repetition {3,2} has its bounds reversed");
  EXPECT_ERROR(grammar_ebnf("root ::= \"a\"{2000}"), "a repetition bound of 2000 (at most 1000 is supported)");
  EXPECT_ERROR(grammar_ebnf("root ::= \"a\" (= \"b\")"), "lookahead assertions are not supported");
  EXPECT_ERROR(grammar_ebnf("root ::= \"\\q\""), "an unknown escape \\q");
  EXPECT_ERROR(grammar_ebnf("root ::= \"a\" @"), "unexpected '@' at line 1, column 14");
  EXPECT_ERROR(grammar_ebnf("root ::= a \"x\"\na ::= root | \"y\""),
               "grammar: rule 'root' -> rule 'a' -> rule 'root' refers back to itself before any text is produced");
  EXPECT_ERROR(grammar_ebnf("root ::= \"a\" root"), "grammar: no finite text satisfies it");
}

// Random grammar texts over GBNF's characters: each compiles or throws ds::Error (never crashes or hangs), and a
// compiled one's matcher can take a few bytes.
TEST(GrammarEbnf, RandomTextsCompileOrFailCleanly) {
  const std::vector<std::string> pieces = {"root", " ::= ", "a", "b", " ", "\n", "|", "(", ")", "\"x\"", "\"\"", "[a-c]",
                                           "[^a]", ".", "*", "+", "?", "{2}", "{1,3}", "{0,}", "#c\n", "a ::= ", "'y'",
                                           "\\", "\"", "[", "]", "::="};
  std::mt19937_64 rng(8);
  int compiled = 0, refused = 0;
  for (int i = 0; i < 3000; ++i) {
    std::string t = "root ::= ";
    const int n = 1 + int(rng() % 12);
    for (int k = 0; k < n; ++k) t += pieces[rng() % pieces.size()];
    try {
      const auto g = grammar_ebnf(t);
      ++compiled;
      Matcher m(g);
      for (const char* b : {"x", "a", "y", "b"}) (void)m.advance(b);
    } catch (const Error& e) {
      ++refused;
      EXPECT_EQ(std::string(e.what()).rfind("grammar: ", 0), 0u) << e.what() << "\n" << show(t);
    } catch (...) {
      ADD_FAILURE() << "grammar " << show(t) << " threw something other than ds::Error";
    }
  }
  std::printf("  %d compiled, %d refused\n", compiled, refused);
  EXPECT_GT(compiled, 150);
  EXPECT_GT(refused, 300);
}

TEST(GrammarJsonSchema, PatternStringsWithEscapesAndLengths) {
  const auto g = schema_of(R"({"type": "object", "properties": {
      "zip": {"type": "string", "pattern": "^\\d{5}(-\\d{4})?$"},
      "q": {"type": "string", "pattern": "say \"[a-z]+\"\\\\/"},
      "w": {"type": "string", "pattern": "[a-z]*", "minLength": 2, "maxLength": 3},
      "n": {"pattern": "x+"}},
    "required": ["zip"]})");
  expect_accepts(g, R"({"zip":"12345"})");
  expect_accepts(g, R"({"zip": "12345-6789", "q": "say \"hi\"\\/", "w": "ab", "n": "xx"})");
  expect_accepts(g, R"({"zip":"12345","q":"say \"hi\"\\\/"})");  // '/' escaped as \/
  expect_accepts(g, R"({"zip":"12345","w":"abc"})");
  expect_refuses_at(g, R"({"zip":"1234")", 12);
  expect_refuses_at(g, R"({"zip":"12345-")", 14);
  expect_refuses_at(g, R"({"zip":"a)", 8);
  expect_refuses_at(g, R"({"zip":"12345","q":"say "hi)", 24);  // an unescaped quote ends the string early
  expect_refuses_at(g, R"({"zip":"12345","w":"a")", 21);
  expect_refuses_at(g, R"({"zip":"12345","w":"abcd)", 23);
  expect_refuses_at(g, R"({"zip":"12345","n":1)", 19);  // pattern implies a string
  const TokenMasker tm(synthetic_vocab());
  expect_masks_match(g, tm, {R"({"zip": "12345-6789", "q": "say \"hi\"\\/", "w": "ab", "n": "xx"})"});
  walk_schema(R"j({"type": "object", "properties": {
      "id": {"type": "string", "pattern": "^[A-Z]{2}-\\d{2,4}$"},
      "tag": {"type": "string", "pattern": "(red|green|b[a-z]*)", "maxLength": 4},
      "note": {"type": "string", "pattern": "[ -~]*", "minLength": 1, "maxLength": 6}},
    "required": ["id", "tag"]})j",
              tm, 300, 400, 280);
}

// ---------------------------------------------------------------------------------------------------------------
// Cache and threads

TEST(GrammarMasker, CacheHitsAndConcurrentUse) {
  const TokenMasker tm(synthetic_vocab());
  const auto a = grammar_json_object();
  const auto b = schema_of(R"({"type": "object", "properties": {"q": {"type": "integer"}}})");
  Matcher ma(a), mb(b);
  ASSERT_TRUE(ma.advance("{\"q\":"));
  ASSERT_TRUE(mb.advance("{\"q\":"));
  std::vector<uint32_t> x, y, z;
  tm.allowed(ma, x);
  tm.allowed(mb, y);
  const auto s0 = tm.cache_stats();
  tm.allowed(ma, z);
  EXPECT_EQ(z, x);
  EXPECT_EQ(tm.cache_stats().hits, s0.hits + 1);
  EXPECT_NE(x, y);
  // Same automaton shape, same state keys, different languages: the cache must tell the grammars apart.
  const Matcher c1(grammar_choice({"ab"})), c2(grammar_choice({"cd"}));
  ASSERT_EQ(c1.state_key(), c2.state_key());
  tm.allowed(c1, x);
  tm.allowed(c2, y);
  EXPECT_NE(x, y) << "two grammars' positions share a cache entry";
  // Several threads on several positions: the same masks as one thread.
  std::vector<Matcher> ms;
  const std::string doc = R"({"name": "ab", "age": 1, "member": true, "color": "red"})";
  const auto g = schema_of(kPerson);
  for (size_t i = 0; i < doc.size(); ++i) {
    Matcher m(g);
    ASSERT_TRUE(m.advance(doc.substr(0, i)));
    ms.push_back(m);
  }
  std::vector<std::vector<uint32_t>> want(ms.size()), got(ms.size());
  for (size_t i = 0; i < ms.size(); ++i) tm.allowed_uncached(ms[i], want[i]);
  const TokenMasker small(synthetic_vocab(), 8 * 1024);  // ~26 entries: evictions under contention
  std::vector<std::thread> ts;
  std::vector<std::vector<std::vector<uint32_t>>> per(4, std::vector<std::vector<uint32_t>>(ms.size()));
  for (int t = 0; t < 4; ++t)
    ts.emplace_back([&, t] {
      for (int r = 0; r < 5; ++r)
        for (size_t i = 0; i < ms.size(); ++i) {
          const size_t k = (i + size_t(t) * 5) % ms.size();  // each thread in another order
          small.allowed(ms[k], per[size_t(t)][k]);
        }
    });
  for (auto& t : ts) t.join();
  for (int t = 0; t < 4; ++t)
    for (size_t i = 0; i < ms.size(); ++i) EXPECT_EQ(per[size_t(t)][i], want[i]) << "thread " << t << " position " << i;
  EXPECT_LT(small.cache_stats().entries, ms.size()) << "the cache is bounded";
}

// ---------------------------------------------------------------------------------------------------------------
// Timings (printed, not asserted)

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

void time_positions(const TokenMasker& tm) {
  const GrammarPtr tool_tags = grammar_structural_tag(ojson::parse(R"({"type": "structural_tag", "format": {
      "type": "triggered_tags", "triggers": ["<function="], "tags": [{"begin": "<function=get_weather>",
      "content": {"type": "json_schema", "json_schema": {"properties": {"city": {"type": "string"}}}},
      "end": "</function>"}]}})"));
  struct Pos {
    const char* what;
    GrammarPtr g;
    std::string prefix;
  };
  const std::vector<Pos> positions = {
      {"json_object, inside a string", grammar_json_object(), "{\"a\": \"hel"},
      {"json_object, after '{'", grammar_json_object(), "{"},
      {"json_object, value position", grammar_json_object(), "{\"a\":"},
      {"json_object, in a number", grammar_json_object(), "{\"a\": 12"},
      {"json_object, after a value", grammar_json_object(), "{\"a\": [1, {\"b\": null}"},
      {"schema, inside a maxLength-10 string", schema_of(kPerson), "{\"name\": \"ab"},
      {"schema, after '{'", schema_of(kPerson), "{"},
      {"schema, enum value", schema_of(kPerson), "{\"name\": \"ab\", \"age\": 1, \"member\": true, \"color\": "},
      {"schema, inside a pattern string", schema_of(R"({"type": "string", "pattern": "[a-z ]+[0-9]*"})"), "\"ab"},
      {"regex, free text [^\\n]*", grammar_regex("[^\n]*\n"), "ab"},
      {"regex, a code", grammar_regex("[A-Z]{2}-\\d{3,6}"), "AB-1"},
      {"GBNF JSON, inside a string", grammar_ebnf(kJsonGbnf), "{\"a\": \"hel"},
      {"GBNF JSON, value position", grammar_ebnf(kJsonGbnf), "{\"a\": [1, "},
      {"structural tag, free text", tool_tags, "Let me check. "},
      {"structural tag, free text after '<func'", tool_tags, "Let me check. <func"},
      {"structural tag, a tag's JSON string", tool_tags, "ok <function=get_weather>{\"city\": \"Par"},
      {"structural tag, any_text in <think>", grammar_structural_tag(ojson::parse(R"({"type": "structural_tag",
           "format": {"type": "tag", "begin": "<think>", "content": {"type": "any_text"}, "end": "</think>"}})")),
       "<think>hmm "},
  };
  std::vector<uint32_t> bits;
  for (auto& p : positions) {
    Matcher m(p.g);
    ASSERT_TRUE(m.advance(p.prefix));
    double cold = 1e9;
    for (int r = 0; r < 3; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      tm.allowed_uncached(m, bits);
      cold = std::min(cold, ms_since(t0));
    }
    tm.allowed(m, bits);  // fill the cache
    const auto t1 = std::chrono::steady_clock::now();
    for (int r = 0; r < 10; ++r) tm.allowed(m, bits);
    std::printf("  %-40s cold %7.2f ms, cached %6.3f ms, %lld tokens allowed\n", p.what, cold, ms_since(t1) / 10,
                (long long)count_bits(bits));
  }
}

TEST(GrammarMasker, TimingsOnTheRealVocabulary) {
  const std::string path = real_tokenizer_path();
  if (path.empty()) GTEST_SKIP() << "no tokenizer.json";
  std::vector<std::string> vocab = real_vocab(path);
  auto t0 = std::chrono::steady_clock::now();
  {
    const TokenMasker tm(vocab);
    std::printf("%s: %lld tokens, %zu trie nodes, built in %.0f ms\n", path.c_str(), (long long)tm.vocab(),
                tm.trie_nodes(), ms_since(t0));
    time_positions(tm);
  }
  // Qwen3.5's vocabulary is ~248k tokens: pad this one to that size with concatenations of two of its tokens
  // (what BPE merges look like), for an estimate at that size.
  if (vocab.size() < 248077) {
    std::mt19937_64 rng(5);
    std::set<std::string> have(vocab.begin(), vocab.end());
    const size_t n0 = vocab.size();
    while (vocab.size() < 248077) {
      std::string s = vocab[rng() % n0] + vocab[rng() % n0];
      if (s.size() > 1 && s.size() <= 16 && have.insert(s).second) vocab.push_back(s);
    }
    t0 = std::chrono::steady_clock::now();
    const TokenMasker tm(vocab);
    std::printf("padded to %lld tokens: %zu trie nodes, built in %.0f ms\n", (long long)tm.vocab(), tm.trie_nodes(),
                ms_since(t0));
    time_positions(tm);
  }
}

}  // namespace
}  // namespace ds::sampling

namespace ds::sampling {
namespace {

// A schema whose automaton would take the server's memory (2,000 optional properties: a word per key position and
// candidate, ~2 GB) is refused with a message saying so; 300 still compile.
TEST(GrammarJsonSchema, TooLargeSchemasAreRefused) {
  auto schema = [](int n) {
    nlohmann::ordered_json props = nlohmann::ordered_json::object();
    for (int i = 0; i < n; ++i) props["p" + std::to_string(i)] = {{"type", "string"}, {"maxLength", 10000}};
    return nlohmann::ordered_json{{"type", "object"}, {"properties", props}};
  };
  EXPECT_NO_THROW(grammar_json_schema(schema(300)));
  try {
    grammar_json_schema(schema(2000));
    ADD_FAILURE() << "2,000 optional properties compiled";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("too large"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace ds::sampling

// ---------------------------------------------------------------------------------------------------------------
// Tool calls (grammar_tool_call): Qwen3.5's XML format after the <tool_call> token.

namespace ds::sampling {
namespace {

using ojson = nlohmann::ordered_json;

GrammarPtr tools_of(const char* text, const std::string& only = "", bool strict_only = false) {
  return grammar_tool_call(ojson::parse(text), only, strict_only);
}

std::string call(const std::string& name, const std::vector<std::pair<std::string, std::string>>& params) {
  std::string t = "\n<function=" + name + ">\n";
  for (auto& [k, v] : params) t += "<parameter=" + k + ">\n" + v + "\n</parameter>\n";
  return t + "</function>\n";
}

const char* kWeather = R"([
  {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
      "city": {"type": "string", "description": "the city"},
      "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
      "days": {"type": "integer"},
      "alerts": {"type": "boolean"}},
    "required": ["city", "days"]}}},
  {"type": "function", "function": {"name": "ping"}},
  {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}])";

TEST(GrammarToolCall, NamesOrderRequiredAndOptionalParameters) {
  const auto g = tools_of(kWeather);
  expect_accepts(g, call("get_weather", {{"city", "Paris"}, {"days", "3"}}));
  expect_accepts(g, call("get_weather", {{"city", "Paris"}, {"unit", "celsius"}, {"days", "-12"}, {"alerts", "true"}}));
  expect_accepts(g, call("get_weather", {{"city", ""}, {"days", "0"}, {"alerts", "false"}}));
  expect_accepts(g, call("ping", {}));
  expect_accepts(g, call("get_time", {}));
  // Unknown function, a name's prefix, no newline before <function=.
  expect_refuses_at(g, "\n<function=get_x", 15);
  expect_refuses_at(g, "\n<function=ping_", 15);
  expect_refuses_at(g, "<function=ping>", 0);
  // Required city first, days required: unit cannot come first, the call cannot end without days.
  const std::string head = "\n<function=get_weather>\n";
  expect_refuses_at(g, head + "<parameter=unit>", int64_t(head.size()) + 11);
  const std::string city = head + "<parameter=city>\nParis\n</parameter>\n";
  expect_refuses_at(g, city + "</function>\n", int64_t(city.size()) + 1);
  // Order: days before unit is refused; an unknown key is refused; a repeated key is refused.
  const std::string days = city + "<parameter=days>\n3\n</parameter>\n";
  expect_refuses_at(g, days + "<parameter=unit>", int64_t(days.size()) + 11);
  expect_refuses_at(g, days + "<parameter=x>", int64_t(days.size()) + 11);
  expect_refuses_at(g, days + "<parameter=days>", int64_t(days.size()) + 11);
  // Values: an enum is exactly one of its strings; integers and booleans are JSON.
  expect_refuses_at(g, city + "<parameter=unit>\nkelvin", int64_t(city.size()) + 17);
  expect_refuses_at(g, city + "<parameter=unit>\ncelsiusx", int64_t(city.size()) + 24);
  expect_refuses_at(g, city + "<parameter=days>\nabc", int64_t(city.size()) + 17);
  expect_refuses_at(g, city + "<parameter=days>\n1.5", int64_t(city.size()) + 18);
  expect_refuses_at(g, city + "<parameter=days>\n 3", int64_t(city.size()) + 17);
  expect_refuses_at(g, days + "<parameter=alerts>\nTrue", int64_t(days.size()) + 19);
  // The whitespace is exact: "\n" after the value, "\n" after </parameter>, after </function>.
  expect_refuses_at(g, city + "<parameter=days>\n3</parameter>", int64_t(city.size()) + 18);
  expect_refuses_at(g, days + "</function>", int64_t(days.size()) + 11);
  // Complete only at the end: nothing follows "</function>\n" (the </tool_call> token is the sampler's).
  Matcher m(g);
  ASSERT_TRUE(m.advance(call("ping", {})));
  EXPECT_TRUE(m.accepting());
  EXPECT_FALSE(m.can_continue());
  // A named tool: that one only.
  const auto n = tools_of(kWeather, "ping");
  expect_accepts(n, call("ping", {}));
  expect_refuses_at(n, "\n<function=get_weather>", 11);
}

TEST(GrammarToolCall, RawStringsEndOnlyAtTheirTerminator) {
  const auto g = tools_of(R"([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
      "properties": {"s": {"type": "string"}}, "required": ["s"]}}}])");
  const std::string open = "\n<function=f>\n<parameter=s>\n";
  const int64_t o = int64_t(open.size());
  for (const std::string v : {"plain", "two\nlines\n\nand a blank", "", "\n", "\n\n", " spaced ", "tab\there\r\n",
                              "</parameter", "\n</parameter", "</parameter >", "a\n</parameterx", "<parameter", "</function",
                              "<tool_call>", "</tool_call", "<function=g>", "x < y && y > z", "\xC3\xA9\xE4\xB8\xAD\xF0\x9F\x98\x80",
                              "{\"json\": [1, 2]}", "null", "</", "<<//"})
    expect_accepts(g, open + v + "\n</parameter>\n</function>\n");
  // A tag the parser ends a value at is refused at its last byte, with or without the newline before it.
  expect_refuses_at(g, open + "a</parameter>", o + 12);
  expect_refuses_at(g, open + "</parameter>", o + 11);
  expect_refuses_at(g, open + "x\n\n</parameter>\nmore", o + 16);  // the value "x\n" ended; no text after the end
  expect_refuses_at(g, open + "a<parameter=", o + 11);
  expect_refuses_at(g, open + "a</function>", o + 11);
  expect_refuses_at(g, open + "a</tool_call>", o + 12);
  expect_refuses_at(g, open + "<</tool_call>", o + 12);
  // Well-formed UTF-8 only, no controls other than tab, LF, CR.
  expect_refuses_at(g, open + "a\xC3(", o + 2);
  expect_refuses_at(g, open + "\xC0\x80", o);
  expect_refuses_at(g, open + "\xED\xA0\x80", o + 1);
  expect_refuses_at(g, open + "a\x01", o + 1);
  expect_refuses_at(g, open + std::string(1, '\0'), o);
  // The value may end with newlines: the last one before </parameter> is the format's.
  Matcher m(g);
  ASSERT_TRUE(m.advance(open + "x\n\n</parameter>\n</function>\n"));
  EXPECT_TRUE(m.accepting());
  const auto r = ToolCallParser::parse("<tool_call>" + open + "x\n\n</parameter>\n</function>\n</tool_call>");
  ASSERT_EQ(r.tool_calls.size(), 1u);
  EXPECT_EQ(r.tool_calls[0].arguments, R"({"s": "x\n"})");
}

TEST(GrammarJsonSchema, FormatsConstrainStrings) {
  const auto g = schema_of(R"({"type": "object", "properties": {
      "day": {"type": "string", "format": "date"},
      "id": {"format": "uuid", "type": "string", "pattern": "^0.*"},
      "site": {"type": "string", "format": "uri"}},
    "required": ["day"]})");
  expect_accepts(g, R"({"day":"2024-02-29","id":"0bcdef01-2345-6789-abcd-ef0123456789","site":"anything"})");
  expect_refuses_at(g, R"({"day":"2023-02-29")", 17);
  expect_refuses_at(g, R"({"day":"2024-02-29","id":"1)", 26);  // the pattern: a uuid starting with 0
  EXPECT_ERROR(schema_of(R"({"type": "string", "format": 3})"), "\"format\" at the root must be a string, found 3");
  // Walks over a synthetic vocabulary end in real calendar dates.
  const TokenMasker tm(synthetic_vocab());
  const auto dg = schema_of(R"({"type": "string", "format": "date"})");
  const WalkStats st = random_walks(dg, tm, 300, 40, 13, [&](const std::string& text) {
    int y = 0, m = 0, d = 0;
    ASSERT_EQ(std::sscanf(text.c_str(), "\"%4d-%2d-%2d\"", &y, &m, &d), 3) << show(text);
    using namespace std::chrono;
    EXPECT_TRUE(y >= 1 && year_month_day(year(y), month(unsigned(m)), day(unsigned(d))).ok()) << show(text);
  });
  EXPECT_GE(st.complete, 290);
}

TEST(GrammarToolCall, RawStringsMatchTheirPattern) {
  const auto g = tools_of(R"([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
      "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{2}\\d+$"},
        "lines": {"type": "string", "pattern": "(a\n)*a?", "maxLength": 5},
        "any": {"type": "string", "pattern": "[\\s\\S]*"},
        "j": {"type": "object", "properties": {"k": {"type": "string", "pattern": "x{2}"}}},
        "when": {"type": "string", "format": "date"},
        "n": {"type": ["integer", "string"], "format": "date"}}}}}])");
  auto one = [](const std::string& k, const std::string& v) { return call("f", {{k, v}}); };
  for (auto& v : {"AB1", "ZZ0123"}) expect_accepts(g, one("code", v));
  const std::string oc = "\n<function=f>\n<parameter=code>\n";
  expect_refuses_at(g, oc + "A1", int64_t(oc.size()) + 1);
  expect_refuses_at(g, oc + "AB\n", int64_t(oc.size()) + 2);
  // A newline the pattern allows and the end's newline are followed together.
  for (auto& v : {"a", "a\n", "a\na", "a\na\n", ""}) expect_accepts(g, one("lines", v));
  const std::string ol = "\n<function=f>\n<parameter=lines>\n";
  expect_refuses_at(g, ol + "a\na\na\na", int64_t(ol.size()) + 6);  // the 6th character can only be the end's
  // No tool tag and no control but tab / LF / CR, whatever the pattern allows.
  expect_accepts(g, one("any", "x </parameterx \t\r\n y"));
  const std::string oa = "\n<function=f>\n<parameter=any>\n";
  expect_refuses_at(g, oa + "a</function>", int64_t(oa.size()) + 11);
  expect_refuses_at(g, oa + "\x01", int64_t(oa.size()));
  expect_accepts(g, one("j", R"({"k": "xx"})"));
  const std::string oj = "\n<function=f>\n<parameter=j>\n{\"k\": \"x";
  expect_refuses_at(g, oj + "y", int64_t(oj.size()));
  expect_accepts(g, one("when", "2024-01-31"));
  const std::string ow = "\n<function=f>\n<parameter=when>\n2024-1";
  expect_refuses_at(g, ow + "3", int64_t(ow.size()));
  for (auto& v : {"12", "2024-01-31", "soon"}) expect_accepts(g, one("n", v));  // integer first: format not applied
  const auto r = ToolCallParser::parse("<tool_call>" + one("lines", "a\n") + "</tool_call>");
  ASSERT_EQ(r.tool_calls.size(), 1u);
  EXPECT_EQ(r.tool_calls[0].arguments, R"({"lines": "a\n"})");
  EXPECT_ERROR(tools_of(R"([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
      "properties": {"i": {"type": ["integer", "string"], "pattern": "\\d+"}}}}}])"),
               "\"pattern\" at /properties/i with a type list whose first type is integer is not supported in a tool call");
  EXPECT_ERROR(tools_of(R"([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
      "properties": {"s": {"type": "string", "pattern": "\\1"}}}}}])"),
               "tools[0].function.parameters: \"pattern\" at /properties/s: regex: a backreference \\1 is not supported");
}

TEST(GrammarToolCall, StringBoundsEnumsAndTypeLists) {
  const auto g = tools_of(R"([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
      "properties": {
        "b": {"type": "string", "minLength": 2, "maxLength": 3},
        "e": {"enum": ["a b", "</x>", "c"]},
        "n": {"type": ["string", "null"]},
        "i": {"type": ["integer", "string"], "maxLength": 6},
        "k": {"type": ["integer", "boolean"]},
        "o": {"type": "object", "properties": {"t": {"type": "string"}}},
        "a": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "integer"}}]},
        "z": {"type": "null"}}}}}])");
  auto one = [](const std::string& k, const std::string& v) { return call("f", {{k, v}}); };
  for (auto& v : {"ab", "abc", "\xE4\xB8\xAD\xE4\xB8\xAD", "\n\n", "</"}) expect_accepts(g, one("b", v));
  const std::string ob = "\n<function=f>\n<parameter=b>\n";
  // "a\n<" may still be a 3-character value; "a\n</" can only end too long (4+) or too short ("a").
  expect_refuses_at(g, ob + "a\n</parameter>", int64_t(ob.size()) + 3);
  expect_refuses_at(g, ob + "abcd", int64_t(ob.size()) + 3);              // 4 characters, no end possible
  for (auto& v : {"a b", "</x>", "c"}) expect_accepts(g, one("e", v));
  expect_refuses_at(g, "\n<function=f>\n<parameter=e>\nab", 29);
  for (auto& v : {"text", "null", ""}) expect_accepts(g, one("n", v));
  // integer first, string too: raw text (numbers convert to integers, the rest stays a string), but not null.
  for (auto& v : {"12", "abc", "nul", "nulls", " nu"}) expect_accepts(g, one("i", v));
  const std::string oi = "\n<function=f>\n<parameter=i>\n";
  for (auto& v : {"null", "NULL", " null", "Null\n"}) {
    SCOPED_TRACE(v);
    Matcher m(g);
    ASSERT_TRUE(m.advance(oi + v));
    EXPECT_FALSE(m.advance("\n</parameter>")) << "null where null is not allowed";
  }
  // integer or boolean: the parser converts by integer only, so booleans are not offered.
  expect_accepts(g, one("k", "7"));
  expect_refuses_at(g, "\n<function=f>\n<parameter=k>\ntrue", 28);
  expect_accepts(g, one("o", R"({"t": "a</b>"})"));
  expect_accepts(g, one("o", "{\n  \"t\": \"x\"\n}"));
  const std::string oo = "\n<function=f>\n<parameter=o>\n{\"t\": \"a</function";
  expect_refuses_at(g, oo + ">", int64_t(oo.size()));
  expect_refuses_at(g, "\n<function=f>\n<parameter=o>\nnull", 28);
  // anyOf: JSON, a string as a JSON string.
  for (auto& v : {"\"text\"", "[1, 2]", "[]"}) expect_accepts(g, one("a", v));
  expect_refuses_at(g, "\n<function=f>\n<parameter=a>\ntext", 28);
  expect_accepts(g, one("z", "null"));
}

TEST(GrammarToolCall, StrictOnlyLeavesOtherToolsFree) {
  const char* tools = R"([
    {"type": "function", "function": {"name": "strict_one", "strict": true, "parameters": {"type": "object",
        "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": false}}},
    {"type": "function", "function": {"name": "loose", "parameters": {"type": "object",
        "properties": {"n": {"type": "integer"}}, "required": ["n"]}}},
    {"type": "function", "function": {"name": "any_args", "strict": true, "parameters": {"type": "object"}}}])";
  const auto g = tools_of(tools, "", true);
  expect_accepts(g, call("strict_one", {{"n", "5"}}));
  expect_refuses_at(g, "\n<function=strict_one>\n<parameter=n>\nx", 37);
  expect_accepts(g, call("loose", {}));
  expect_accepts(g, call("loose", {{"n", "not a number"}, {"other", "x"}, {"n", "1"}, {"\xC3\xA9t\xC3\xA9", ""}}));
  expect_accepts(g, call("any_args", {{"k", "v"}}));
  expect_refuses_at(g, "\n<function=loose>\n<parameter=>", 29);
  expect_refuses_at(g, "\n<function=loose>\n<parameter=a b>", 30);
  expect_refuses_at(g, "\n<function=loose>\n<parameter=" + std::string(129, 'k'), 29 + 128);
  expect_refuses_at(g, "\n<function=loose>\n<parameter=k>\na</function>", 43);
  // Without strict_only every tool is constrained.
  expect_refuses_at(tools_of(tools), "\n<function=loose>\n<parameter=n>\nx", 32);
  // The cache: the same tools and options give the same grammar, other options another.
  EXPECT_EQ(tools_of(tools, "", true).get(), g.get());
  EXPECT_NE(tools_of(tools).get(), g.get());
}

TEST(GrammarToolCall, ErrorsNameTheToolAndThePointer) {
  EXPECT_ERROR(tools_of(R"([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
      "properties": {"x": {"type": "string", "patternProperties": {}}}}}}])"),
               "tools[0].function.parameters: unsupported keyword \"patternProperties\" at /properties/x");
  EXPECT_ERROR(tools_of(R"([{"type": "function", "function": {"name": "g"}}, {"type": "function", "function":
      {"name": "f", "parameters": {"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}}}])"),
               "tools[1].function.parameters: \"$ref\" at /properties/x points to #/$defs/missing");
  EXPECT_ERROR(tools_of(R"([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}])"),
               "tools[0].function.parameters: \"type\" at the root must be \"object\"");
  EXPECT_ERROR(tools_of(R"([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
      "minProperties": 1}}}])"),
               "unsupported keyword \"minProperties\" at the root");
  EXPECT_ERROR(tools_of(R"([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
      "properties": {"a": {}}, "required": ["b"]}}}])"),
               "\"required\" at the root names \"b\"");
  EXPECT_ERROR(tools_of(R"([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
      "properties": {"e": {"enum": ["ok", "a</parameter>b"]}}}}}])"),
               "contains a tool-call tag");
  EXPECT_ERROR(tools_of(R"([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
      "properties": {"o": {"type": "object", "properties": {"</function>": {}}}}}}}])"),
               "contains a tool-call tag");
  EXPECT_ERROR(tools_of(R"([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
      "properties": {"s": {"type": "string", "maxLength": 1000}}}}}])"),
               "\"maxLength\" at /properties/s is 1000; a string parameter of a tool call supports length bounds up to 256");
  EXPECT_ERROR(tools_of(R"([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
      "properties": {"i": {"type": ["integer", "string"], "enum": [1, "a"]}}}}}])"),
               "with a type list whose first type is integer is not supported");
  EXPECT_ERROR(tools_of(R"([{"type": "function", "function": {"name": "a>b"}}])"), "tools[0].function.name");
  EXPECT_ERROR(tools_of(R"([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
      "properties": {"a>b": {}}}}}])"),
               "the property name \"a>b\" cannot be spelled");
  EXPECT_ERROR(tools_of(R"([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
      "additionalProperties": {"type": "integer"}}}}])"),
               "\"additionalProperties\" at the root: a schema for parameters not listed");
  EXPECT_ERROR(tools_of(kWeather, "nope"), "no tool named \"nope\"");
  EXPECT_ERROR(grammar_tool_call(ojson::array()), "tools: expected a non-empty list");
}

// The token masker over a small vocabulary with the format's pieces: its masks equal advance() along calls.
std::vector<std::string> tool_vocab() {
  std::vector<std::string> v = synthetic_vocab();
  for (const char* s : {"\n<", "<function=", "function", "=get", "_weather", ">\n", "<parameter=", "parameter", "city",
                        "days", "unit", "celsius", "fahrenheit", "\n</parameter>\n", "</parameter>", "</", "</function>\n",
                        "</function>", "Paris", "</tool_call>", ">\n<parameter=", "\n\n", "\n</", "<p", "ping", "alerts"})
    v.push_back(s);
  return v;
}

TEST(GrammarToolCall, MasksEqualAdvanceOnEveryToken) {
  const TokenMasker tm(tool_vocab());
  expect_masks_match(tools_of(kWeather), tm,
                     {call("get_weather", {{"city", "Pa</ris\n</parameter"}, {"unit", "fahrenheit"}, {"days", "12"},
                                           {"alerts", "false"}}),
                      call("ping", {})});
  expect_masks_match(tools_of(R"([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
      "properties": {"i": {"type": ["integer", "string"]}, "o": {"type": "object"}}}}}])"),
                     tm, {call("f", {{"i", "nul"}, {"o", R"({"a": ["</f", 1]})"}})});
}

// Random walks over allowed tokens (the longest one a quarter of the time, so values end) parse with the tool-call
// parser into a call whose arguments the tool's schema accepts.
TEST(GrammarToolCall, RandomWalksParseIntoValidArguments) {
  const TokenMasker tm(tool_vocab());
  const ojson tools = ojson::parse(R"([
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"},
        "alerts": {"type": ["boolean", "null"]},
        "where": {"type": "object", "properties": {"lat": {"type": "number"}, "tag": {"type": "string"}},
                  "required": ["lat"]},
        "ids": {"type": "array", "items": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]},
                "maxItems": 3},
        "any": {"type": ["integer", "string"], "maxLength": 5}},
      "required": ["city", "days"]}}},
    {"type": "function", "function": {"name": "ping"}}])");
  const GrammarPtr g = grammar_tool_call(tools);
  std::mt19937_64 rng(11);
  std::vector<uint32_t> bits;
  int complete = 0;
  for (int w = 0; w < 200; ++w) {
    Matcher m(g);
    std::string text;
    for (int step = 0; step < 300 && m.can_continue(); ++step) {
      tm.allowed(m, bits);
      std::vector<int32_t> ids;
      for (int64_t id = 0; id < tm.vocab(); ++id)
        if (bits[size_t(id) / 32] >> (id % 32) & 1u) ids.push_back(int32_t(id));
      ASSERT_FALSE(ids.empty()) << show(text);
      int32_t t = ids[rng() % ids.size()];
      if (rng() % 4 == 0)
        for (int32_t id : ids)
          if (tm.token_bytes(id).size() > tm.token_bytes(t).size()) t = id;
      ASSERT_TRUE(m.advance(tm.token_bytes(t)));
      text += tm.token_bytes(t);
    }
    if (!m.accepting()) continue;
    ++complete;
    const auto r = ToolCallParser::parse("<tool_call>" + text + "</tool_call>", tools);
    ASSERT_EQ(r.tool_calls.size(), 1u) << show(text);
    EXPECT_EQ(r.content, "") << show(text);
    const ojson args = ojson::parse(r.tool_calls[0].arguments);
    for (auto& tool : tools)
      if (tool["function"]["name"] == r.tool_calls[0].name) {
        const ojson params = tool["function"].value("parameters", ojson{{"type", "object"}, {"properties", ojson::object()}});
        std::string why;
        EXPECT_TRUE(valid(args, params, params, why)) << why << "\ntext: " << show(text);
      }
  }
  std::printf("  200 walks: %d complete calls\n", complete);
  EXPECT_GE(complete, 100);
}

// Timings of the tool grammar's positions on the real vocabulary (printed, not asserted).
TEST(GrammarToolCall, TimingsOnTheRealVocabulary) {
  const std::string path = real_tokenizer_path();
  if (path.empty()) GTEST_SKIP() << "no tokenizer.json";
  const TokenMasker tm(real_vocab(path));
  const auto g = tools_of(kWeather);
  auto t0 = std::chrono::steady_clock::now();
  const auto fresh = grammar_tool_call(ojson::parse(kWeather), "", true);  // not cached yet: a compile
  std::printf("  compile (strict_only variant): %.2f ms\n", ms_since(t0));
  const std::string h = "\n<function=get_weather>\n";
  for (const std::string& prefix : {std::string("\n<function="), h, h + "<parameter=city>\nPar",
                                    h + "<parameter=city>\nParis\n</param", h + "<parameter=city>\nP\n</parameter>\n",
                                    h + "<parameter=city>\nP\n</parameter>\n<parameter=days>\n1"}) {
    Matcher m(g);
    ASSERT_TRUE(m.advance(prefix));
    std::vector<uint32_t> bits;
    double cold = 1e9;
    for (int r = 0; r < 3; ++r) {
      const auto t1 = std::chrono::steady_clock::now();
      tm.allowed_uncached(m, bits);
      cold = std::min(cold, ms_since(t1));
    }
    std::printf("  after %-60s cold %7.2f ms, %lld tokens allowed\n", show(prefix).c_str(), cold,
                (long long)count_bits(bits));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Structural tags (vLLM's structural_tag, xgrammar's format objects)

GrammarPtr stag(const std::string& format) {
  return grammar_structural_tag(ojson::parse(R"({"type": "structural_tag", "format": )" + format + "}"));
}

const char* kWeatherTags = R"([
  {"type": "tag", "begin": "<function=get_weather>",
   "content": {"type": "json_schema", "json_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                                       "required": ["city"]}},
   "end": "</function>"},
  {"type": "tag", "begin": "<function=get_time>",
   "content": {"type": "json_schema", "json_schema": {"type": "object", "properties": {"timezone": {"type": "string"}},
                                                       "required": ["timezone"]}},
   "end": "</function>"}])";

GrammarPtr weather_tags(bool at_least_one, bool stop_after_first) {
  return stag(std::string(R"({"type": "triggered_tags", "triggers": ["<function="], "tags": )") + kWeatherTags +
              ", \"at_least_one\": " + (at_least_one ? "true" : "false") +
              ", \"stop_after_first\": " + (stop_after_first ? "true" : "false") + "}");
}

// Whether the matcher can still go on (it completed a structure that ends the output).
bool open_ended(const GrammarPtr& g, std::string_view doc) {
  Matcher m(g);
  EXPECT_TRUE(m.advance(doc));
  return m.can_continue();
}

TEST(GrammarStructuralTag, TriggeredTagsLeaveTextFreeAndConstrainTheTags) {
  const auto g = weather_tags(false, false);
  const std::string call = "<function=get_weather>{\"city\": \"San Francisco\"}</function>";
  for (const std::string& doc :
       {std::string(""), std::string("I will call a tool now. ") + call, call + " and then\n" + call,
        std::string("free text with a partial trigger <function"), std::string("<func <function=get_time>{\"timezone\": "
        "\"UTC\"}</function> \xE4\xB8\xAD\xF0\x9F\x98\x80 </function> <function>"), std::string("a\tb\n\x01 {\"x\"}")})
    expect_accepts(g, doc);
  expect_refuses_at(g, "see <function=get_date>", 18);                       // no tag begins "<function=get_d"
  expect_refuses_at(g, "<function=get_weather>{\"town\": \"x\"}", 24);     // the schema's property is city
  const std::string open = "<function=get_weather>{\"city\": \"x\"}";
  expect_refuses_at(g, open, int64_t(open.size()));  // inside the tag: not complete
  expect_refuses_at(g, open + "</func", int64_t(open.size() + 6));
  expect_refuses_at(g, "bad \xC3(", 5);                                      // free text is well-formed UTF-8
  EXPECT_TRUE(open_ended(g, call)) << "free text again after a tag";
  EXPECT_EQ(g, weather_tags(false, false)) << "the same spec gives the same grammar object";
}

TEST(GrammarStructuralTag, AtLeastOneAndStopAfterFirst) {
  const std::string call = "<function=get_time>{\"timezone\": \"UTC\"}</function>";
  {  // exactly one call, nothing around it
    const auto g = weather_tags(true, true);
    expect_accepts(g, call);
    expect_refuses_at(g, "hello " + call, 0);
    expect_refuses_at(g, call + " more", int64_t(call.size()));
    expect_refuses_at(g, "", 0);
    EXPECT_FALSE(open_ended(g, call));
  }
  {  // a call first, then free text and more calls
    const auto g = weather_tags(true, false);
    expect_accepts(g, call + " then " + call + " end");
    expect_refuses_at(g, " " + call, 0);
  }
  {  // free text, at most one call, nothing after it
    const auto g = weather_tags(false, true);
    expect_accepts(g, "thinking aloud " + call);
    expect_accepts(g, "no call at all");
    expect_refuses_at(g, call + "\n", int64_t(call.size()));
  }
}

TEST(GrammarStructuralTag, TagContentsEndAtTheFirstEnd) {
  const auto think = stag(R"({"type": "tag", "begin": "<think>", "content": {"type": "any_text"}, "end": "</think>"})");
  expect_accepts(think, "<think>a < b, </thin </think>");
  expect_accepts(think, "<think></think>");
  expect_refuses_at(think, "<think>x</think>y", 16);
  expect_refuses_at(think, "<thinkx", 6);
  EXPECT_FALSE(open_ended(think, "<think>x</think>"));
  // Several ends; an unlimited content through sequence and optional stops at any of them.
  const auto ends = stag(R"({"type": "tag", "begin": "[", "content": {"type": "sequence", "elements": [
      {"type": "const_string", "value": "v:"}, {"type": "optional", "content": {"type": "any_text", "excludes": ["#"]}}]},
      "end": ["]", "|end"]})");
  expect_accepts(ends, "[v:abc]");
  expect_accepts(ends, "[v:ab|end");
  expect_accepts(ends, "[v:]");
  expect_refuses_at(ends, "[v:a]b", 5);
  expect_refuses_at(ends, "[v:a#", 4);
  expect_refuses_at(ends, "[x", 1);
  // The recipe "reasoning, then free text with tool calls".
  const auto recipe = stag(std::string(R"({"type": "sequence", "elements": [
      {"type": "tag", "begin": "<think>", "content": {"type": "any_text"}, "end": "</think>"},
      {"type": "triggered_tags", "triggers": ["<function="], "tags": )") + kWeatherTags + "}]}");
  expect_accepts(recipe, "<think>hmm</think>Calling <function=get_weather>{\"city\":\"Oslo\"}</function>.");
  expect_refuses_at(recipe, "Calling", 0);
}

TEST(GrammarStructuralTag, PrimitiveAndCompositionFormats) {
  const auto g = stag(R"({"type": "sequence", "elements": [
      {"type": "const_string", "value": "Answer: "},
      {"type": "regex", "pattern": "[A-Z]{3}-[0-9]{2}"},
      {"type": "optional", "content": {"type": "const_string", "value": "!"}},
      {"type": "repeat", "min": 1, "max": 2, "content": {"type": "or", "elements": [
          {"type": "const_string", "value": " x"}, {"type": "grammar", "grammar": "root ::= \" y\" [0-9]+"}]}},
      {"type": "star", "content": {"type": "const_string", "value": "."}},
      {"type": "plus", "content": {"type": "json_schema", "json_schema": "{\"type\": \"integer\"}"}}]})");
  expect_accepts(g, "Answer: ABC-12 x7");
  expect_accepts(g, "Answer: ABC-12! y42 x...-3");
  expect_refuses_at(g, "Answer: AB1", 10);
  expect_refuses_at(g, "Answer: ABC-12 x x x", 18);  // repeat: at most two
  expect_refuses_at(g, "Answer: ABC-12.", 14);       // repeat: at least one
  expect_refuses_at(g, "Answer: ABC-12 y", 16);      // the grammar needs a digit
}

TEST(GrammarStructuralTag, TagsWithSeparatorAndDispatch) {
  const std::string item = R"({"type": "tag", "begin": "<a>", "content": {"type": "json_schema", "json_schema": {"type": "object"}}, "end": "</a>"})";
  const auto list = stag(R"({"type": "tags_with_separator", "separator": ",", "tags": [)" + item + "]}");
  expect_accepts(list, "");
  expect_accepts(list, "<a>{}</a>");
  expect_accepts(list, "<a>{}</a>,<a>{\"k\": 1}</a>");
  expect_refuses_at(list, "x", 0);
  expect_refuses_at(list, "<a>{}</a> ,", 9);
  const auto one = stag(R"({"type": "tags_with_separator", "separator": ",", "at_least_one": true,
                           "stop_after_first": true, "tags": [)" + item + "]}");
  expect_refuses_at(one, "", 0);
  expect_refuses_at(one, "<a>{}</a>,", 9);
  const auto d = stag(R"({"type": "dispatch", "rules": [["<f1>", {"type": "json_schema", "json_schema": {"type": "object"}}],
      ["<f2>", {"type": "const_string", "value": "ok"}]], "excludes": ["<stop>"]})");
  expect_accepts(d, "hi <f1>{} there <f2>ok end <f");
  expect_refuses_at(d, "hi <f2>no", 7);
  expect_refuses_at(d, "a <stop>", 7);
  const auto once = stag(R"({"type": "dispatch", "loop": false, "rules": [["<f2>", {"type": "const_string", "value": "ok"}]]})");
  expect_accepts(once, "text <f2>ok");
  EXPECT_FALSE(open_ended(once, "text <f2>ok"));
}

TEST(GrammarStructuralTag, TheOlderFormIsTriggeredTagsOfSchemas) {
  const auto g = grammar_structural_tag(ojson::parse(R"({"type": "structural_tag",
      "structures": [{"begin": "<function=get_weather>", "schema": {"type": "object", "properties": {"city": {"type": "string"}}},
                      "end": "</function>"}],
      "triggers": ["<function="]})"));
  expect_accepts(g, "ok <function=get_weather>{\"city\": \"Rome\"}</function> done");
  expect_refuses_at(g, "<function=other>", 10);
}

TEST(GrammarStructuralTag, ErrorsNameTheField) {
  auto err = [](const std::string& spec) { return grammar_structural_tag(ojson::parse(spec)); };
  EXPECT_ERROR(err(R"({"type": "structural_tag"})"), "expected {\"type\": \"structural_tag\", \"format\": {...}}");
  EXPECT_ERROR(err(R"({"type": "json_schema", "format": {}})"), "\"type\" must be \"structural_tag\"");
  EXPECT_ERROR(stag(R"({"type": "nope"})"), "format: unknown format type \"nope\" (supported: const_string");
  EXPECT_ERROR(stag(R"({"value": "x"})"), "format must be a format object");
  EXPECT_ERROR(stag(R"({"type": "const_string", "value": "x", "extra": 1})"),
               "format has an unknown field \"extra\" (expected type, value)");
  EXPECT_ERROR(stag(R"({"type": "const_string"})"), "format needs \"value\"");
  EXPECT_ERROR(stag(R"({"type": "sequence", "elements": []})"), "format.elements must be a non-empty list");
  EXPECT_ERROR(stag(R"({"type": "token", "token": "<|x|>"})"), "format: the token-level format \"token\" is not supported");
  EXPECT_ERROR(stag(R"({"type": "tag", "begin": {"type": "token", "token": 5}, "content": {"type": "any_text"}, "end": "x"})"),
               "format.begin: token-level delimiters are not supported");
  EXPECT_ERROR(stag(R"({"type": "any_text", "max_tokens": 5})"), "format.max_tokens is not supported");
  EXPECT_ERROR(stag(R"({"type": "json_schema", "json_schema": {}, "style": "qwen_xml"})"),
               "format.style \"qwen_xml\" is not supported");
  EXPECT_ERROR(stag(R"({"type": "json_schema", "json_schema": {"type": "object", "patternProperties": {}}})"),
               "structural_tag: format.json_schema: unsupported keyword \"patternProperties\"");
  EXPECT_ERROR(stag(R"j({"type": "regex", "pattern": "a(?=b)"})j"), "format.pattern: ");
  EXPECT_ERROR(stag(R"({"type": "grammar", "grammar": "root ::= a"})"), "format.grammar: grammar: the rule 'a' is used");
  EXPECT_ERROR(stag(R"({"type": "repeat", "min": 3, "max": 2, "content": {"type": "const_string", "value": "x"}})"),
               "format: \"max\" (2) is below \"min\" (3)");
  EXPECT_ERROR(stag(R"({"type": "triggered_tags", "triggers": ["<f="], "tags": [{"type": "tag", "begin": "<g=x>",
               "content": {"type": "any_text"}, "end": "</g>"}]})"),
               "format.tags[0].begin \"<g=x>\" starts with none of the triggers [\"<f=\"]");
  EXPECT_ERROR(stag(R"({"type": "triggered_tags", "triggers": [""], "tags": []})"), "format.triggers[0] must be a non-empty string");
  EXPECT_ERROR(stag(R"({"type": "triggered_tags", "triggers": ["<f"], "tags": [], "stop_after_frist": true})"),
               "unknown field \"stop_after_frist\"");
  EXPECT_ERROR(stag(R"({"type": "any_text", "excludes": [")" + std::string(20000, 'x') + R"("]})"),
               "format: its triggers, excludes and enclosing ends hold 20000 bytes together (at most 16384)");
  std::string deep = R"({"type": "const_string", "value": "x"})";
  for (int i = 0; i < 70; ++i) deep = R"({"type": "optional", "content": )" + deep + "}";
  EXPECT_ERROR(stag(deep), "format objects nested more than 64 deep");
}

// Every text up to 8 bytes over a small alphabet: the matcher accepts exactly what a direct reading of the spec
// accepts (free text until the first trigger, which must go on as a tag; excludes never in free text), and refuses
// a prefix only when nothing longer is accepted either.
TEST(GrammarStructuralTag, EqualsADirectReadingOnEveryShortText) {
  const std::string alphabet = "ab<>/";
  for (int variant = 0; variant < 8; ++variant) {
    const bool at_least_one = variant & 1, first = variant & 2, excl = variant & 4;
    SCOPED_TRACE(str_cat("at_least_one ", at_least_one, ", stop_after_first ", first, ", excludes ", excl));
    const auto g = stag(str_cat(R"({"type": "triggered_tags", "triggers": ["<a"], "tags": [
        {"type": "tag", "begin": "<a>", "content": {"type": "const_string", "value": "b"}, "end": "</a>"},
        {"type": "tag", "begin": "<ab>", "content": {"type": "any_text"}, "end": "</>"}],
        "at_least_one": )", at_least_one ? "true" : "false", ", \"stop_after_first\": ", first ? "true" : "false",
                                excl ? ", \"excludes\": [\"//\"]" : "", "}"));
    auto free_ok = [&](const std::string& t) { return !excl || t.find("//") == std::string::npos; };
    std::function<bool(const std::string&, size_t, int)> ref = [&](const std::string& s, size_t pos, int seen) {
      const size_t e = s.find("<a", pos);
      if (e == std::string::npos) return free_ok(s.substr(pos)) && (seen > 0 || !at_least_one);
      if (!free_ok(s.substr(pos, e - pos)) || (at_least_one && seen == 0 && e != pos)) return false;
      size_t after = std::string::npos;
      if (s.compare(e, 4, "<a>b") == 0 && s.compare(e + 4, 4, "</a>") == 0) after = e + 8;
      if (s.compare(e, 4, "<ab>") == 0) {
        const size_t q = s.find("</>", e + 4);
        if (q != std::string::npos) after = q + 3;
      }
      if (after == std::string::npos) return false;
      return first ? after == s.size() : ref(s, after, seen + 1);
    };
    int64_t accepted = 0, texts = 0;
    std::function<void(const std::string&, const Matcher*)> walk = [&](const std::string& s, const Matcher* m) {
      ++texts;
      const bool got = m && m->accepting();
      if (got != ref(s, 0, 0)) {
        ADD_FAILURE() << show(s) << ": matcher " << got << (m ? "" : " (a prefix was refused)");
        return;
      }
      accepted += got;
      if (s.size() == 8) return;
      for (char c : alphabet) {
        std::optional<Matcher> n;
        if (m) {
          n = *m;
          if (!n->advance(std::string(1, c))) n.reset();
        }
        walk(s + c, n ? &*n : nullptr);
      }
    };
    const Matcher m0(g);
    walk("", &m0);
    EXPECT_GT(accepted, at_least_one ? 4 : 100);
    std::printf("  variant %d: %lld of %lld texts accepted\n", variant, (long long)accepted, (long long)texts);
  }
}

TEST(GrammarStructuralTag, MasksEqualAdvance) {
  const TokenMasker tm(synthetic_vocab());
  expect_masks_match(weather_tags(false, false), tm,
                     {"Let me see. <function=get_weather>{\"city\": \"name\"}</function> yes <func", "\xE4\xB8\xAD"});
  expect_masks_match(stag(R"({"type": "tag", "begin": "<think>", "content": {"type": "any_text"}, "end": "</think>"})"),
                     tm, {"<think>a</think>"});
}

}  // namespace
}  // namespace ds::sampling
