// Structured output's regular expressions (sampling/regex.h): the compiled automaton against std::regex (ECMAScript,
// whole-text match) on every short text over a small alphabet and on random longer ones, UTF-8 classes, the JSON
// string encoding and its character boundaries, and the errors for what is not supported.
#include <gtest/gtest.h>

#include <chrono>
#include <random>
#include <regex>

#include "core/status.h"
#include "error_util.h"
#include "sampling/regex.h"

namespace ds::sampling {
namespace {

using test::show;

// Every text over `alphabet` up to `len` characters, then `random` texts of 5-12 characters: the automaton says
// what std::regex_match says. Returns how many matched (so a test can require both answers to occur).
int64_t expect_same_as_std(const std::string& pattern, const std::string& alphabet, int len, int random,
                           const std::string& example) {
  SCOPED_TRACE("pattern: " + show(pattern));
  const RegexDfa d = compile_regex(pattern);
  const std::regex oracle(pattern, std::regex::ECMAScript);
  int64_t hits = 0, failures = 0;
  auto check = [&](const std::string& t) {
    const bool want = std::regex_match(t, oracle);
    hits += want;
    if (d.matches(t) != want && ++failures <= 5) ADD_FAILURE() << "text " << show(t) << ": std::regex says " << want;
  };
  check(example);
  std::vector<std::string> level{""};
  check("");
  for (int n = 1; n <= len; ++n) {
    std::vector<std::string> next;
    for (auto& t : level)
      for (char c : alphabet) {
        next.push_back(t + c);
        check(next.back());
      }
    level.swap(next);
  }
  std::mt19937_64 rng(7);
  for (int i = 0; i < random; ++i) {
    std::string t(5 + rng() % 8, ' ');
    for (auto& c : t) c = alphabet[rng() % alphabet.size()];
    check(t);
  }
  return hits;
}

TEST(Regex, MatchesAsStdRegexDoesOnEveryShortText) {
  struct Case {
    const char* pattern;
    const char* alphabet;
    const char* example = "";  // checked too (a match the short texts may not hold)
  };
  const Case cases[] = {
      {"a*b", "abc"},
      {"(ab|a)*b?", "abc"},
      {"[a-c]{2,4}", "abcd"},
      {"a{3}", "ab"},
      {"(a|b){0,3}c", "abc"},
      {"\\d+(\\.\\d{1,2})?", "01.a"},
      {"-?\\d+", "0-9a"},
      {"[^ab]+", "abc\n"},
      {"\\w+@\\w+\\.com", "a_@.com", "a_@b.com"},
      {"x{2,}y?", "xy"},
      {"(?:ab)+|ba", "ab"},
      {"a?a?a?aaa", "a"},
      {"[\\s\\S]{1,3}", "a \n\t"},
      {"\\D\\W\\S", "a1 _."},
      {"[-a]+", "a-b"},
      {"[a-]+", "a-b"},
      {"a.b", "ab\n."},
      {"", "a"},
      {"a|", "ab"},
      {"(|a)b", "ab"},
      {"[\\d.]+", "1.a"},
      {"\\(\\)\\[\\]\\{\\}\\*\\+\\?\\.\\|\\^\\$\\\\", "()[]{}", "()[]{}*+?.|^$\\"},
      {"(a+|b+)*c", "abc"},
      {"((a|b)(c|d)){1,2}", "abcd"},
      {"[a-cx-z]+", "abcdxyz"},
      {"[^\\d\\s]", "a1 \n"},
      {"\\x41\\u0042[\\x43-\\x45]", "ABCDEF"},
      {"a*?b+?c??", "abc"},
      {"a{2,3}?", "a"},
      {"(a){0}b", "ab"},
      {"^ab$", "ab"},
      {"a\\tb\\n", "ab\t\n"},
      {"[\\]\\-]+", "]-a"},
  };
  for (const Case& c : cases) {
    const int64_t hits =
        expect_same_as_std(c.pattern, c.alphabet, std::string(c.alphabet).size() > 4 ? 4 : 6, 2000, c.example);
    EXPECT_GT(hits, 0) << "the pattern " << c.pattern << " matched none of the texts: a weak case";
  }
}

TEST(Regex, PythonSpellingsAndLiteralBraces) {
  // {,m}, named groups (?P<n>...) and (?<n>...), a '{' that starts no quantifier, ']' first in a class.
  const RegexDfa d = compile_regex("(?P<x>a{,2})(?<y>b)c{d}[]e]+");
  for (const char* t : {"bc{d}]", "abc{d}e", "aabc{d}]e]"}) EXPECT_TRUE(d.matches(t)) << t;
  for (const char* t : {"aaabc{d}]", "bcd]", "bc{d}", "b{d}]"}) EXPECT_FALSE(d.matches(t)) << t;
  EXPECT_TRUE(compile_regex("\\Aab\\Z").matches("ab"));
  EXPECT_TRUE(compile_regex("a\\z").matches("a"));
  EXPECT_TRUE(compile_regex("x{1,}").matches("xxx"));
  EXPECT_TRUE(compile_regex("x{").matches("x{"));
  EXPECT_TRUE(compile_regex("x{a}").matches("x{a}"));
  EXPECT_TRUE(compile_regex("x{1,a}").matches("x{1,a}"));
  EXPECT_TRUE(compile_regex("\\U0001F600\\u{e9}\\e\\a\\0").matches("\xF0\x9F\x98\x80\xC3\xA9\x1B\x07" + std::string(1, '\0')));
  EXPECT_TRUE(compile_regex("[\\b]").matches("\b"));
}

TEST(Regex, CharactersAreUnicodeScalarValuesInUtf8) {
  const RegexDfa any = compile_regex(".");
  for (const char* t : {"a", "\xC3\xA9", "\xE4\xB8\xAD", "\xF0\x9F\x98\x80", "\xEF\xBF\xBF", "\xF4\x8F\xBF\xBF", "\x7F"})
    EXPECT_TRUE(any.matches(t)) << show(t);
  // Not: a newline, two characters, overlongs, surrogates, past U+10FFFF, stray continuations, truncations.
  for (const char* t : {"\n", "ab", "\xC0\x80", "\xC1\xBF", "\xE0\x80\x80", "\xED\xA0\x80", "\xED\xBF\xBF",
                        "\xF4\x90\x80\x80", "\xF5\x80\x80\x80", "\x80", "\xC3", "\xE4\xB8", ""})
    EXPECT_FALSE(any.matches(t)) << show(t);
  const RegexDfa greek = compile_regex("[\xCE\xB1-\xCF\x89]+");  // [α-ω]+
  EXPECT_TRUE(greek.matches("\xCE\xB1\xCE\xB2\xCF\x89"));
  EXPECT_FALSE(greek.matches("\xCE\xB1" "a"));
  EXPECT_FALSE(greek.matches("\xCE\x91"));  // Α (capital)
  const RegexDfa not_a = compile_regex("[^a]");
  EXPECT_TRUE(not_a.matches("\xF0\x9F\x98\x80"));
  EXPECT_TRUE(not_a.matches("\n"));
  EXPECT_FALSE(not_a.matches("\xED\xA0\x80")) << "a surrogate";
  // Ranges across the UTF-8 length boundaries: every code point of a range in, its neighbours out.
  auto utf8 = [](uint32_t c) {
    std::string s;
    if (c < 0x80) s += char(c);
    else if (c < 0x800) s += {char(0xC0 | (c >> 6)), char(0x80 | (c & 0x3F))};
    else if (c < 0x10000) s += {char(0xE0 | (c >> 12)), char(0x80 | ((c >> 6) & 0x3F)), char(0x80 | (c & 0x3F))};
    else
      s += {char(0xF0 | (c >> 18)), char(0x80 | ((c >> 12) & 0x3F)), char(0x80 | ((c >> 6) & 0x3F)),
            char(0x80 | (c & 0x3F))};
    return s;
  };
  for (auto [lo, hi] : std::vector<std::pair<uint32_t, uint32_t>>{
           {0x70, 0x90}, {0x7FE, 0x801}, {0x123, 0x12345}, {0xFFF0, 0x10010}, {0xD7F0, 0xE010}, {0x10FF00, 0x10FFFF}}) {
    char pat[64];
    std::snprintf(pat, sizeof pat, "[\\u{%X}-\\u{%X}]", lo, hi);
    SCOPED_TRACE(pat);
    const RegexDfa d = compile_regex(pat);
    std::mt19937 rng(lo);
    std::vector<uint32_t> probe{lo, hi, lo + 1, hi - 1, lo - 1, hi + 1};
    for (int i = 0; i < 300; ++i) probe.push_back(lo + rng() % (hi - lo + 1));
    for (uint32_t c : probe) {
      if (c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) continue;
      EXPECT_EQ(d.matches(utf8(c)), c >= lo && c <= hi) << std::hex << c;
    }
  }
}

TEST(Regex, JsonStringEncodingEscapesAndCountsCharacters) {
  const RegexDfa d = compile_regex("a\"b\\\\c/\\n\\t[\\x00-\\x02]\xC3\xA9", RegexEncoding::kJsonString);
  // The body of a JSON string: '"' and '\' escaped, '/' raw or escaped, \n \t short or \u00XX, U+0001 only \u0001.
  for (const char* t : {"a\\\"b\\\\c/\\n\\t\\u0001\xC3\xA9", "a\\\"b\\\\c\\/\\u000a\\u0009\\u0000\xC3\xA9",
                        "a\\\"b\\\\c/\\u000A\\t\\u0002\xC3\xA9"})
    EXPECT_TRUE(d.matches(t)) << show(t);
  for (const char* t : {"a\"b\\\\c/\\n\\t\\u0001\xC3\xA9", "a\\\"b\\c/\\n\\t\\u0001\xC3\xA9",
                        "a\\\"b\\\\c/\n\\t\\u0001\xC3\xA9", "a\\\"b\\\\c/\\n\\t\\u0003\xC3\xA9",
                        "a\\\"b\\\\c/\\n\\t\\u0001\\u00e9"})
    EXPECT_FALSE(d.matches(t)) << show(t);
  // Character boundaries: counted once per escape or UTF-8 sequence.
  const RegexDfa any = compile_regex("[\\s\\S]*", RegexEncoding::kJsonString);
  int32_t s = 0, chars = 0;
  for (char c : std::string("x\\u001f\\n\xE4\xB8\xAD\\\"")) {
    s = any.step(s, uint8_t(c));
    ASSERT_GE(s, 0);
    chars += any.boundary[size_t(s)];
  }
  EXPECT_EQ(chars, 5);
  EXPECT_TRUE(any.accept[size_t(s)]);
  // Nothing in the encoding is a raw '"' or control.
  for (int32_t st = 0; st < int32_t(any.states()); ++st)
    for (int b = 0; b < 0x20; ++b) EXPECT_LT(any.step(st, uint8_t(b)), 0);
  for (int32_t st = 0; st < int32_t(any.states()); ++st) {
    if (any.boundary[size_t(st)]) {
      EXPECT_LT(any.step(st, '"'), 0);
    }
  }
}

TEST(Regex, ErrorsNameTheConstructAndItsPosition) {
  EXPECT_ERROR(compile_regex("a(?=b)"), "regex: lookahead \"(?=\" is not supported at character 1 of the pattern \"a(?=b)\"");
  EXPECT_ERROR(compile_regex("a(?!b)"), "lookahead \"(?!\" is not supported at character 1");
  EXPECT_ERROR(compile_regex("(?<=a)b"), "lookbehind is not supported at character 0");
  EXPECT_ERROR(compile_regex("(?<!a)b"), "lookbehind is not supported");
  EXPECT_ERROR(compile_regex("(a)\\1"), "a backreference \\1 is not supported at character 3");
  EXPECT_ERROR(compile_regex("(?P<n>a)(?P=n)"), "a backreference \"(?P=\" is not supported");
  EXPECT_ERROR(compile_regex("\\bfoo"), "a word boundary \\b is not supported at character 0");
  EXPECT_ERROR(compile_regex("a^b"), "an anchor '^' that is not at the start of the pattern");
  EXPECT_ERROR(compile_regex("a$b"), "an anchor '$' that is not at the end of the pattern");
  EXPECT_ERROR(compile_regex("(a$)"), "an anchor '$' that is not at the end");
  EXPECT_ERROR(compile_regex("a**"), "a quantifier after a quantifier at character 2");
  EXPECT_ERROR(compile_regex("a{2}{3}"), "a quantifier after a quantifier at character 4");
  EXPECT_ERROR(compile_regex("a++"), "a possessive quantifier at character 2");
  EXPECT_ERROR(compile_regex("(?>a)"), "an atomic group");
  EXPECT_ERROR(compile_regex("*a"), "a quantifier '*' with nothing to repeat at character 0");
  EXPECT_ERROR(compile_regex("a|{2}"), "a quantifier '{' with nothing to repeat at character 2");
  EXPECT_ERROR(compile_regex("(a"), "a '(' that is never closed at character 0");
  EXPECT_ERROR(compile_regex("a)"), "unbalanced ')' at character 1");
  EXPECT_ERROR(compile_regex("x[ab"), "a '[' that is never closed at character 1");
  EXPECT_ERROR(compile_regex("[z-a]"), "a character range with its ends reversed at character 2");
  EXPECT_ERROR(compile_regex("[a-\\d]"), "a class shorthand (\\d, \\w, \\s ...) as a range's end");
  EXPECT_ERROR(compile_regex("a{5,2}"), "the repetition {5,2} has its bounds reversed");
  EXPECT_ERROR(compile_regex("a{1001}"), "a repetition bound of 1001 (at most 1000 is supported) at character 2");
  EXPECT_ERROR(compile_regex("\\p{L}"), "Unicode properties (\\p{...}) are not supported");
  EXPECT_ERROR(compile_regex("(?i)a"), "inline flags \"(?...)\" are not supported at character 0");
  EXPECT_ERROR(compile_regex("\\q"), "an unknown escape \\q at character 0");
  EXPECT_ERROR(compile_regex("ab\\"), "a pattern that ends in a lone backslash at character 2");
  EXPECT_ERROR(compile_regex("\\u12"), "an escape with too few hex digits at character 0");
  EXPECT_ERROR(compile_regex("\\uD800"), "an escape for U+d800, which is not a Unicode scalar value");
  EXPECT_ERROR(compile_regex("\\07"), "an octal escape is not supported");
  EXPECT_ERROR(compile_regex("a\xC3("), "regex: the pattern is not valid UTF-8 (at byte 1)");
  EXPECT_ERROR(compile_regex("(?P<>a)"), "a named group without a name");
  // Too large: an exponential DFA, a huge NFA.
  EXPECT_ERROR(compile_regex("[ab]*a[ab]{15}"), "its deterministic automaton needs more than 20000 states");
  EXPECT_ERROR(compile_regex("((a{1000}){1000})"), "its automaton needs more than 262144 states");
  // Sets of thousands of NFA states per DFA state: refused by the work budget (it took minutes without one).
  EXPECT_ERROR(compile_regex("(.{0,1000}){10}", RegexEncoding::kJsonString), "takes more than 20000000 steps to build");
  // Long patterns are shown cut.
  const std::string long_pattern = std::string(300, 'a') + "(?=b)";
  EXPECT_ERROR(compile_regex(long_pattern), "at character 300 of the pattern \"" + std::string(200, 'a') + "...\"");
  // A pattern that matches nothing compiles; no state accepts.
  const RegexDfa none = compile_regex("[^\\s\\S]");
  EXPECT_FALSE(std::find(none.accept.begin(), none.accept.end(), 1) != none.accept.end());
}

// Random patterns over the syntax's characters: each compiles or throws ds::Error (never crashes, hangs or throws
// anything else), and those that compile agree with std::regex where both read the same syntax (no '{', which
// Python and ECMAScript read differently in places, nor \a).
TEST(Regex, RandomPatternsCompileOrFailCleanly) {
  const std::string atoms = "ab.()[]^$|*+?{},-\\dws0";
  std::mt19937_64 rng(3);
  int compiled = 0, refused = 0, compared = 0;
  for (int i = 0; i < 4000; ++i) {
    std::string p(1 + rng() % 10, ' ');
    for (auto& c : p) c = atoms[rng() % atoms.size()];
    RegexDfa d;
    try {
      d = compile_regex(p, i % 2 ? RegexEncoding::kJsonString : RegexEncoding::kUtf8);
      ++compiled;
    } catch (const Error& e) {
      ++refused;
      EXPECT_EQ(std::string(e.what()).rfind("regex: ", 0), 0u) << e.what();
      continue;
    } catch (...) {
      ADD_FAILURE() << "pattern " << show(p) << " threw something other than ds::Error";
      continue;
    }
    // \a is BEL in Python, 'a' in ECMAScript.
    if (i % 2 || p.find_first_of("{}") != std::string::npos || p.find("\\a") != std::string::npos) continue;
    std::regex oracle;
    try {
      oracle = std::regex(p, std::regex::ECMAScript);
    } catch (const std::regex_error&) {
      continue;  // ECMAScript refuses what Python's syntax takes (e.g. a lone ']')
    }
    ++compared;
    for (const char* t : {"", "a", "b", "ab", "ba", "aab", "a0", "-", "0", "_", " ", "abab", "a-b", "()"})
      EXPECT_EQ(d.matches(t), std::regex_match(t, oracle)) << "pattern " << show(p) << " text " << show(t);
  }
  std::printf("  %d compiled, %d refused, %d compared with std::regex\n", compiled, refused, compared);
  EXPECT_GT(compiled, 500);
  EXPECT_GT(refused, 500);
  EXPECT_GT(compared, 200);
}

TEST(Regex, LongBoundedRepeatsOfAnyCharacterCompile) {
  // A character class's bytes share their states (one per UTF-8 tail and escape prefix, not per sequence), so a
  // schema's "^.{0,1000}$" fits: ~14 states per position in the JSON encoding.
  const RegexDfa d = compile_regex("^.{0,1000}$", RegexEncoding::kJsonString);
  EXPECT_LT(d.states(), size_t(15000));
  std::string t;
  for (int i = 0; i < 1000; ++i) t += i % 3 == 0 ? "\xC3\xA9" : i % 3 == 1 ? "\\u0001" : "x";
  EXPECT_TRUE(d.matches(t));
  EXPECT_FALSE(d.matches(t + "x"));
  EXPECT_TRUE(compile_regex("[^\"]{0,500}\"[^\"]{0,500}", RegexEncoding::kJsonString).matches("ab\\\"cd"));
}

TEST(Regex, IntersectionMatchesBoth) {
  const RegexDfa d = intersect(compile_regex("[a-c]+x?"), compile_regex("a*b*c*x*"));
  for (const char* t : {"abc", "aab", "cx", "a"}) EXPECT_TRUE(d.matches(t)) << t;
  for (const char* t : {"ba", "x", "abcxx", "", "abd"}) EXPECT_FALSE(d.matches(t)) << t;
}

// JSON Schema formats: dates against std::chrono's calendar, the other formats on examples.
TEST(Regex, FormatsDateAgainstTheCalendar) {
  const RegexDfa d = compile_regex(format_regex("date"));
  int64_t valid = 0;
  char buf[32];
  for (int y : {1, 4, 99, 100, 400, 1600, 1700, 1800, 1900, 1999, 2000, 2023, 2024, 2100, 2400, 9996, 9999, 0}) {
    for (int m = 0; m <= 13; ++m)
      for (int dd = 0; dd <= 32; ++dd) {
        std::snprintf(buf, sizeof buf, "%04d-%02d-%02d", y, m, dd);
        using namespace std::chrono;
        const bool ok = y >= 1 && year_month_day(year(y), month(unsigned(m)), day(unsigned(dd))).ok();
        valid += ok;
        EXPECT_EQ(d.matches(buf), ok) << buf;
      }
  }
  EXPECT_GT(valid, 5000);
  for (const char* t : {"2024-1-01", "2024-01-1", "24-01-01", "2024/01/01", "2024-01-01 ", "12024-01-01"})
    EXPECT_FALSE(d.matches(t)) << t;
}

TEST(Regex, FormatsOnExamples) {
  struct Case {
    const char* format;
    std::vector<const char*> yes, no;
  };
  const Case cases[] = {
      {"time",
       {"00:00:00Z", "23:59:60z", "12:34:56.789+05:30", "12:34:56-00:00", "01:02:03.123456789Z"},
       {"24:00:00Z", "12:60:00Z", "12:00:61Z", "12:00:00", "12:00Z", "12:00:00.Z", "12:00:00+5:30", "12:00:00.1234567890Z"}},
      {"date-time",
       {"2024-02-29T12:00:00Z", "1999-12-31t23:59:59.5+01:00"},
       {"2023-02-29T12:00:00Z", "2024-02-29 12:00:00Z", "2024-02-29T12:00:00", "2024-02-29"}},
      {"uuid",
       {"123e4567-e89b-12d3-a456-426614174000", "ABCDEF01-2345-6789-abcd-ef0123456789"},
       {"123e4567e89b12d3a456426614174000", "123e4567-e89b-12d3-a456-42661417400", "g23e4567-e89b-12d3-a456-426614174000"}},
      {"ipv4",
       {"0.0.0.0", "255.255.255.255", "192.168.1.10", "10.0.99.249"},
       {"256.1.1.1", "1.1.1", "01.1.1.1", "1.1.1.1.1", "1..1.1", "-1.1.1.1"}},
      {"hostname",
       {"localhost", "a.b-c.example", "x1", "A0-b.C9"},
       {"-a.com", "a-.com", "a..com", ".a", "a.", "a_b.com", ""}},
      {"email",
       {"user@example.com", "first.last+tag@sub.example.org", "x!#$%&'*+/=?^_`{|}~-@h"},
       {"user@", "@example.com", ".user@example.com", "us..er@example.com", "user@-example.com", "a b@c.d"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.format);
    ASSERT_NE(format_regex(c.format), nullptr);
    const RegexDfa d = compile_regex(format_regex(c.format));
    for (const char* t : c.yes) EXPECT_TRUE(d.matches(t)) << t;
    for (const char* t : c.no) EXPECT_FALSE(d.matches(t)) << t;
    // The same patterns in the JSON string encoding ('/' may be escaped there).
    EXPECT_TRUE(compile_regex(format_regex(c.format), RegexEncoding::kJsonString).matches(c.yes[0]));
  }
  const RegexDfa hl = compile_regex(format_regex("hostname"));
  EXPECT_TRUE(hl.matches(std::string(63, 'a') + ".b"));
  EXPECT_FALSE(hl.matches(std::string(64, 'a') + ".b")) << "a label holds at most 63 characters";
  EXPECT_TRUE(compile_regex(format_regex("email"), RegexEncoding::kJsonString).matches("a\\/b@c"));
  for (const char* f : {"uri", "ipv6", "duration", "regex", ""}) EXPECT_EQ(format_regex(f), nullptr) << f;
}

}  // namespace
}  // namespace ds::sampling
