// The Jinja-subset engine, feature by feature, with the outputs Jinja2 (as configured by transformers:
// trim_blocks, lstrip_blocks) gives.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "text/jinja.h"

namespace {

using json = nlohmann::ordered_json;
using ds::jinja::Template;

std::string R(const std::string& src, const json& vars = json::object()) {
  return Template(src).render(ds::jinja::from_json(vars));
}

std::string error_of(const std::string& src, const json& vars = json::object()) {
  try {
    R(src, vars);
  } catch (const ds::Error& e) {
    return e.what();
  }
  return "<no error>";
}

TEST(Jinja, TextAndOutput) {
  EXPECT_EQ(R("Hello {{ name }}!", {{"name", "W"}}), "Hello W!");
  EXPECT_EQ(R("{{ missing }}|"), "|");
  EXPECT_EQ(R("a\n"), "a");  // one trailing newline dropped
  EXPECT_EQ(R("a\n\n"), "a\n");
  EXPECT_EQ(R("{# comment #}x"), "x");
  EXPECT_EQ(R("{% raw %}{{ not evaluated }}{% endraw %}"), "{{ not evaluated }}");
}

TEST(Jinja, WhitespaceControl) {
  // trim_blocks eats the newline after a block tag, lstrip_blocks the indentation before it.
  EXPECT_EQ(R("  {% if true %}\nyes\n  {% endif %}\nafter"), "yes\nafter");
  EXPECT_EQ(R("a  {%- if true %} b {% endif -%}  c"), "a b c");
  EXPECT_EQ(R("x {{- ' y ' -}} z"), "x y z");
  EXPECT_EQ(R("  {%+ if true %}y{% endif %}"), "  y");
  EXPECT_EQ(R("a {% if true %}b{% endif %}"), "a b");  // tag not at line start: no lstrip
  EXPECT_EQ(R("  {# c #}\nz"), "z");
  EXPECT_EQ(R("{{ 1 }}\n{{ 2 }}"), "1\n2");  // expressions keep their newline
}

TEST(Jinja, ValuesPrintLikePython) {
  EXPECT_EQ(R("{{ true }} {{ none }} {{ 1.0 }} {{ 0.1 + 0.2 }} {{ 1e-5 }} {{ 1e16 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 / 2 }}"),
            "True None 1.0 0.30000000000000004 1e-05 1e+16 3 -4 3.5");
  EXPECT_EQ(R("{{ [1, 'a', none, {'k': \"it's\"}] }}"), "[1, 'a', None, {'k': \"it's\"}]");
  EXPECT_EQ(R("{{ x }}", {{"x", json::parse("{\"b\":1,\"a\":[true,2.5]}")}}), "{'b': 1, 'a': [True, 2.5]}");
  EXPECT_EQ(R("{{ -7 % 3 }} {{ 2 ** 10 }} {{ 'ab' * 2 }}"), "2 1024 abab");
}

TEST(Jinja, ToJsonMatchesHuggingFace) {
  json v = json::parse(R"({"z": 1, "a": [1.5, true, null, 2.0], "s": "é\n\"q\"\u0001", "e": {}, "l": []})");
  EXPECT_EQ(R("{{ v|tojson }}", {{"v", v}}),
            R"({"z": 1, "a": [1.5, true, null, 2.0], "s": "é\n\"q\"\u0001", "e": {}, "l": []})");
  EXPECT_EQ(R("{{ v|tojson(indent=2) }}", {{"v", json::parse(R"({"a": [1], "b": {}})")}}),
            "{\n  \"a\": [\n    1\n  ],\n  \"b\": {}\n}");
  EXPECT_EQ(R("{{ 'x'|tojson }}{{ 3|tojson }}"), "\"x\"3");
}

TEST(Jinja, Conditionals) {
  const char* t = "{% if n > 2 %}big{% elif n == 2 %}two{% else %}small{% endif %}";
  EXPECT_EQ(R(t, {{"n", 3}}), "big");
  EXPECT_EQ(R(t, {{"n", 2}}), "two");
  EXPECT_EQ(R(t, {{"n", 1}}), "small");
  EXPECT_EQ(R("{{ 'y' if x else 'n' }}{{ 'z' if false }}", {{"x", json::array()}}), "n");
  EXPECT_EQ(R("{{ 0 or 'd' }} {{ 1 and 'b' }} {{ not 0 }}"), "d b True");
  EXPECT_EQ(R("{{ 1 < 2 < 3 }} {{ 3 > 2 > 2 }} {{ 1 == 1.0 }} {{ 'a' != 'b' }}"), "True False True True");
}

TEST(Jinja, ForLoops) {
  json v = {{"xs", {"a", "b", "c"}}};
  EXPECT_EQ(R("{% for x in xs %}{{ loop.index0 }}{{ loop.index }}{{ x }}{% if loop.first %}F{% endif %}"
              "{% if loop.last %}L{{ loop.length }}{% endif %},{% endfor %}",
              v),
            "01aF,12b,23cL3,");
  EXPECT_EQ(R("{% for x in xs %}{{ loop.previtem is defined }}{{ loop.nextitem|default('-') }} {% endfor %}", v),
            "Falseb Truec True- ");
  EXPECT_EQ(R("{% for x in [] %}x{% else %}empty{% endfor %}"), "empty");
  EXPECT_EQ(R("{% for x in xs if x != 'b' %}{{ x }}{{ loop.length }}{% endfor %}", v), "a2c2");
  EXPECT_EQ(R("{% for x in xs %}{% if x == 'b' %}{% continue %}{% endif %}{% if x == 'c' %}{% break %}{% endif %}"
              "{{ x }}{% endfor %}",
              v),
            "a");
  EXPECT_EQ(R("{% for k, v in d|items %}{{ k }}={{ v }};{% endfor %}", {{"d", json::parse(R"({"z":1,"a":2})")}}),
            "z=1;a=2;");
  EXPECT_EQ(R("{% for k in d %}{{ k }}{% endfor %}", {{"d", json::parse(R"({"z":1,"a":2})")}}), "za");
  EXPECT_EQ(R("{% for c in 'hé' %}[{{ c }}]{% endfor %}"), "[h][é]");
  EXPECT_EQ(R("{% for i in range(3) %}{{ i }}{% endfor %}{% for i in range(5, 1, -2) %}{{ i }}{% endfor %}"), "01253");
}

TEST(Jinja, ScopingAndNamespace) {
  EXPECT_EQ(R("{% set x = 1 %}{% for i in [1, 2] %}{% set x = i %}{% endfor %}{{ x }}"), "1");
  EXPECT_EQ(R("{% set ns = namespace(x=1) %}{% for i in [1, 2] %}{% set ns.x = ns.x + i %}{% endfor %}{{ ns.x }}"), "4");
  EXPECT_EQ(R("{% set x = 1 %}{% if true %}{% set x = 2 %}{% endif %}{{ x }}"), "2");
  EXPECT_EQ(R("{% set a, b = [1, 2] %}{{ b }}{{ a }}"), "21");
  EXPECT_EQ(R("{% set s %}in {{ 1 + 1 }}{% endset %}[{{ s }}]"), "[in 2]");
  EXPECT_NE(error_of("{% set x = 1 %}{% set x.y = 2 %}").find("namespace"), std::string::npos);
}

TEST(Jinja, Macros) {
  const char* m = "{% macro greet(name, punct='!', upper=false) %}{{ (name|upper) if upper else name }}{{ punct }}"
                  "{% endmacro %}";
  EXPECT_EQ(R(std::string(m) + "{{ greet('a') }} {{ greet('b', '?') }} {{ greet('c', upper=true) }}"), "a! b? C!");
  EXPECT_EQ(R(std::string(m) + "[{{ greet(' x ')|trim }}]"), "[x !]");
  EXPECT_EQ(R("{% set g = 'top' %}{% macro f() %}{{ g }}{% set g = 'local' %}{{ g }}{% endmacro %}{{ f() }}{{ g }}"),
            "toplocaltop");
}

TEST(Jinja, Filters) {
  EXPECT_EQ(R("{{ '  x  '|trim }}|{{ 'héllo'|length }}|{{ [1, 2]|length }}|{{ 5|string ~ '!' }}"), "x|5|2|5!");
  EXPECT_EQ(R("{{ ['a', 'b']|join(', ') }}|{{ 'aBc'|upper }}{{ 'AbC'|lower }}|{{ 'aaa'|replace('a', 'b', 2) }}"),
            "a, b|ABCabc|bba");
  EXPECT_EQ(R("{{ x|default('d') }}{{ ''|default('e', true) }}{{ none|default('f') }}"), "deNone");
  EXPECT_EQ(R("{{ [3, 1, 2]|first }}{{ [3, 1, 2]|last }}{{ [3, 1, 2]|sort|list }}{{ 'ab'|list }}{{ [1, 2]|reverse|list }}"),
            "32[1, 2, 3]['a', 'b'][2, 1]");
  json users = json::parse(R"([{"n":"a","ok":true},{"n":"b","ok":false},{"n":"c","ok":true}])");
  EXPECT_EQ(R("{{ u|map(attribute='n')|join }}|{{ u|selectattr('ok')|map(attribute='n')|join }}|"
              "{{ u|rejectattr('ok')|map(attribute='n')|join }}|{{ u|selectattr('n', 'equalto', 'c')|list|length }}",
              {{"u", users}}),
            "abc|ac|b|1");
  EXPECT_EQ(R("{{ ['a', 'b']|map('upper')|join }}{{ [0, 1, 2]|select|list }}"), "AB[1, 2]");
  EXPECT_EQ(R("{{ '<a>'|e }}{{ '<a>'|safe }}{{ 'a b'|title }}{{ 'x\ny'|indent(2) }}"), "&lt;a&gt;<a>A Bx\n  y");
  EXPECT_EQ(R("{{ '12'|int + 1 }} {{ 'x'|int }} {{ 2|float }} {{ -3|abs }} {{ [1, 2, 3]|sum }} {{ [2, 5, 1]|max }}"),
            "13 0 2.0 3 6 5");
  EXPECT_NE(error_of("{{ 'abc'|items }}").find("mapping"), std::string::npos);
}

TEST(Jinja, StringAndDictMethods) {
  EXPECT_EQ(R("{{ 'a,b,,c'.split(',') }}{{ ' a  b '.split() }}{{ 'a-b-c'.rsplit('-', 1) }}"),
            "['a', 'b', '', 'c']['a', 'b']['a-b', 'c']");
  EXPECT_EQ(R("{{ '\\n\\nx\\n'.lstrip('\\n') }}|{{ 'xyyx'.strip('x') }}|{{ '  y '.rstrip() }}|"),
            "x\n|yy|  y|");
  EXPECT_EQ(R("{{ 'hello'.startswith('he') }}{{ 'hello'.endswith(('x', 'lo')) }}{{ 'ab'.upper() }}"),
            "TrueTrueAB");
  EXPECT_EQ(R("{{ 'a</think>b'.split('</think>')[-1] }}{{ 'hello'.replace('l', 'L') }}{{ 'abc'.find('c') }}"),
            "bheLLo2");
  json d = json::parse(R"({"a": 1, "items": "field"})");
  EXPECT_EQ(R("{{ d.get('a') }}{{ d.get('x', 'dflt') }}{{ d.get('x') }}{% for k, v in d.items() %}{{ k }}{% endfor %}"
              "{{ d['items'] }}{{ d.keys()|list }}",
              {{"d", d}}),
            "1dfltNoneaitemsfield['a', 'items']");
}

TEST(Jinja, Tests) {
  json v = {{"s", "x"}, {"d", json::object()}, {"l", json::array()}, {"n", nullptr}, {"i", 1}, {"f", 1.5}, {"b", false}};
  EXPECT_EQ(R("{{ s is string }}{{ d is mapping }}{{ l is sequence }}{{ s is sequence }}{{ d is iterable }}"
              "{{ i is number }}{{ f is number }}{{ b is number }}{{ n is none }}{{ u is defined }}{{ u is undefined }}",
              v),
            "TrueTrueTrueTrueTrueTrueTrueTrueTrueFalseTrue");
  EXPECT_EQ(R("{{ b is false }}{{ b is true }}{{ 0 is false }}{{ i is integer }}{{ f is float }}{{ s is not mapping }}"
              "{{ l is not string }}{{ 4 is divisibleby 2 }}{{ 3 is odd }}{{ i is eq 1 }}",
              v),
            "TrueFalseFalseTrueTrueTrueTrueTrueTrueTrue");
}

TEST(Jinja, OperatorsAndIndexing) {
  json v = {{"xs", {1, 2, 3, 4}}, {"d", {{"k", "v"}}}};
  EXPECT_EQ(R("{{ xs[::-1] }}{{ xs[1:] }}{{ xs[:-1] }}{{ xs[::2] }}{{ xs[-1] }}{{ 'héllo'[1:3] }}{{ 'abc'[::-1] }}", v),
            "[4, 3, 2, 1][2, 3, 4][1, 2, 3][1, 3]4él" "cba");
  EXPECT_EQ(R("{{ 2 in xs }}{{ 9 not in xs }}{{ 'k' in d }}{{ 'b' in 'abc' }}{{ d.k }}{{ d['k'] }}", v),
            "TrueTrueTrueTruevv");
  EXPECT_EQ(R("{{ 'a' ~ 1 ~ none }}{{ 'a' + 'b' }}{{ [1] + [2] }}{{ 1 + 2 * 3 }}{{ (1 + 2) * 3 }}"), "a1Noneab[1, 2]79");
  EXPECT_EQ(R("{{ {'b': 1, 'a': 2}|tojson }}{{ xs|length - 1 }}", v), "{\"b\": 1, \"a\": 2}3");
  EXPECT_EQ(R("{{ xs[10] is defined }}{{ d.missing is defined }}", v), "FalseFalse");
}

TEST(Jinja, RaiseExceptionKeepsTheTemplatesWords) {
  try {
    R("{% if true %}{{ raise_exception('Bad input: ' ~ 3) }}{% endif %}");
    FAIL() << "expected TemplateRaise";
  } catch (const ds::jinja::TemplateRaise& e) {
    EXPECT_EQ(std::string(e.what()), "Bad input: 3");
  }
}

TEST(Jinja, ErrorsNameLineAndColumn) {
  EXPECT_NE(error_of("a\n{{ x.y.z }}").find("template line 2, column"), std::string::npos);
  EXPECT_NE(error_of("a\n{{ x.y.z }}").find("'x' is undefined"), std::string::npos);
  EXPECT_NE(error_of("{{ 1|nosuchfilter }}").find("nosuchfilter"), std::string::npos);
  EXPECT_NE(error_of("{{ 'a' + 1 }}").find("unsupported operand"), std::string::npos);
  std::string e = error_of("ok\n\n  {% if %}{% endif %}");
  EXPECT_NE(e.find("template line 3, column 9"), std::string::npos) << e;
  EXPECT_NE(e.find("expected an expression"), std::string::npos) << e;
  EXPECT_NE(error_of("{% frobnicate %}").find("'frobnicate'"), std::string::npos);
  EXPECT_NE(error_of("{{ 'unterminated }}").find("closing quote"), std::string::npos);
  EXPECT_NE(error_of("{% if x %}").find("'endif'"), std::string::npos);
  EXPECT_NE(error_of("{{ x ").find("'}}'"), std::string::npos);
}

}  // namespace
