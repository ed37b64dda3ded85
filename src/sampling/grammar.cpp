// Structured output's grammar core: the automaton (Grammar), its builder, the JSON / JSON Schema / choice
// languages built with it, the position (Matcher) and the vocabulary walk (TokenMasker). See grammar.h.
#include "sampling/grammar.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <bitset>
#include <cctype>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <tuple>
#include <unordered_set>

#include <nlohmann/json.hpp>

#include "core/status.h"
#include "sampling/ebnf.h"
#include "sampling/regex.h"
#include "text/unicode.h"

namespace ds::sampling {

using ojson = nlohmann::ordered_json;
using Frame = Matcher::Frame;
using Thread = Matcher::Thread;

// ---------------------------------------------------------------------------------------------------------------
// The compiled automaton. Nodes of all rules share one id space; a call edge names the callee's start node and the
// node to continue at when it returns. Byte edges are a class map (byte -> class, 0 = no edge) shared between
// nodes with the same partition of the bytes, and one target per class.

class Grammar {
 public:
  enum : uint8_t {
    kFinal = 1,      // the rule may return here
    kBytes = 2,      // has byte edges (a thread can rest here)
    kSimple = 4,     // has byte edges and nothing else: stepping onto it needs no closure
    kPureFinal = 8,  // only returns: a call returning here is a tail call (no frame pushed)
    kBytesFinal = 16,  // byte edges and the return, no calls: at the bottom of the stack a step needs no closure
  };
  struct Node {
    int32_t cmap = 0;  // row of cmaps (row 0: no byte edges)
    int32_t tgt = 0;   // targets[tgt + class - 1]
    int32_t call_b = 0, call_e = 0;
    uint8_t flags = 0;
  };
  struct Call {
    int32_t start;  // callee's start node
    int32_t ret;
  };

  std::vector<Node> nodes;
  std::vector<uint8_t> cmaps;  // 256 per row
  std::vector<int32_t> targets;
  std::vector<Call> calls;
  int32_t root = 0;  // start node of the top rule
  uint64_t id = 0;   // unique per grammar object (TokenMasker's cache keys)

  // The node byte b leads to from `node`, or -1.
  int32_t next(int32_t node, uint8_t b) const {
    const Node& n = nodes[size_t(node)];
    const uint8_t c = cmaps[size_t(n.cmap) * 256 + b];
    return c ? targets[size_t(n.tgt) + c - 1] : -1;
  }
};

namespace {

constexpr int kMaxDepth = 32;         // nesting of "any" objects/arrays
constexpr int kMaxDigits = 16;        // integer part, fraction
// Exponent digits: 2, not 16, so every number is a finite double above the subnormals (|x| < 1e116, nonzero
// |x| > 1e-116); a longer exponent overflows strict parsers (nlohmann, serde_json, Go's encoding/json).
constexpr int kMaxExpDigits = 2;
constexpr int kMaxWsRun = 20;         // spaces/tabs after a newline
constexpr int64_t kMaxCount = 10000;  // minLength/maxLength/minItems/maxItems (each unrolls into nodes)
constexpr int kMaxSchemaDepth = 128;  // nesting of subschemas
constexpr int64_t kInlineChars = 256; // bounded strings up to this many characters: no calls per character
constexpr size_t kMaxThreads = 4096;  // a position with more threads is refused (pathological ambiguity only)
constexpr size_t kMaxNodes = size_t(1) << 20;  // builder nodes per grammar (Builder::node)

std::atomic<uint64_t> g_next_grammar_id{1};

using ByteSet = std::bitset<256>;

ByteSet range(int lo, int hi) {
  ByteSet s;
  for (int b = lo; b <= hi; ++b) s.set(size_t(b));
  return s;
}
ByteSet chars(std::string_view cs) {
  ByteSet s;
  for (char c : cs) s.set(uint8_t(c));
  return s;
}
const ByteSet kDigits = range('0', '9');
const ByteSet kHex = range('0', '9') | range('a', 'f') | range('A', 'F');

// ---------------------------------------------------------------------------------------------------------------
// Builder: rules as graphs of nodes; finish() prunes what cannot complete, rejects left recursion and compiles.

class Builder {
 public:
  int32_t node() {
    // A budget, so a hostile schema cannot take the server's memory: an object's optional properties cost a word per
    // (key position, candidate) pair, quadratic in their number (2,000 optional properties: ~2 GB without it).
    if (nodes_.size() >= kMaxNodes)
      fail("structured output: the constraint is too large (its automaton needs more than ", kMaxNodes,
           " states: e.g. an object with hundreds of optional properties, or many long bounded strings); simplify it");
    nodes_.emplace_back();
    return int32_t(nodes_.size() - 1);
  }
  // A new rule (its start node is created with it); `name` is for error messages.
  int32_t rule(std::string name) {
    const int32_t s = node();
    rules_.push_back({s, std::move(name)});
    return int32_t(rules_.size() - 1);
  }
  int32_t start(int32_t r) const { return rules_[size_t(r)].start; }

  void on(int32_t from, const ByteSet& s, int32_t to) {
    for (auto& [set, t] : nodes_[size_t(from)].bytes) DS_CHECK((set & s).none(), "grammar: overlapping byte edges");
    nodes_[size_t(from)].bytes.push_back({s, to});
  }
  void on(int32_t from, char b, int32_t to) {
    ByteSet s;
    s.set(uint8_t(b));
    on(from, s, to);
  }
  void call(int32_t from, int32_t r, int32_t to) { nodes_[size_t(from)].calls.push_back({r, to}); }
  void final(int32_t n) { nodes_[size_t(n)].final = true; }

  // The node after spelling `s` from `from`, reusing single-byte edges already there (so words from one node
  // form a trie).
  int32_t word(int32_t from, std::string_view s) {
    for (char ch : s) {
      int32_t next = -1;
      for (auto& [set, t] : nodes_[size_t(from)].bytes)
        if (set.test(uint8_t(ch))) {
          DS_CHECK(set.count() == 1, "grammar: a word through a byte class");
          next = t;
        }
      if (next < 0) {
        next = node();
        on(from, ch, next);
      }
      from = next;
    }
    return from;
  }
  // The node byte b leads to from `from` (builder edges), or -1.
  int32_t next(int32_t from, uint8_t b) const {
    for (auto& [set, t] : nodes_[size_t(from)].bytes)
      if (set.test(b)) return t;
    return -1;
  }
  const std::vector<std::pair<ByteSet, int32_t>>& edges(int32_t n) const { return nodes_[size_t(n)].bytes; }

  // A rule whose language is the union of the rules' (tail calls: no frame is pushed).
  int32_t alternatives(const std::vector<int32_t>& rs, std::string name) {
    if (rs.size() == 1) return rs[0];
    const int32_t r = rule(std::move(name)), end = node();
    final(end);
    for (int32_t a : rs) call(start(r), a, end);
    return r;
  }

  // Rule x repeated min..max times (max < 0: unbounded) as a rule: one node per count, the last one looping when
  // unbounded.
  int32_t repeat(int32_t x, int64_t min, int64_t max) {
    const int32_t r = rule("repetition");
    const int64_t last = max < 0 ? min : max;
    std::vector<int32_t> pos(size_t(last) + 1);
    pos[0] = start(r);
    for (int64_t k = 1; k <= last; ++k) pos[size_t(k)] = node();
    for (int64_t k = 0; k <= last; ++k) {
      if (k >= min) final(pos[size_t(k)]);
      if (k < last) call(pos[size_t(k)], x, pos[size_t(k + 1)]);
    }
    if (max < 0) call(pos[size_t(last)], x, pos[size_t(last)]);
    return r;
  }

  // Compiles the grammar whose language is rule `root`'s. `what` prefixes errors ("json_schema", ...).
  GrammarPtr finish(int32_t root, const std::string& what);

 private:
  struct BNode {
    std::vector<std::pair<ByteSet, int32_t>> bytes;
    std::vector<std::pair<int32_t, int32_t>> calls;  // (rule, return node)
    bool final = false;
  };
  struct BRule {
    int32_t start;
    std::string name;
  };
  void prune(int32_t root, const std::string& what);
  void check_left_recursion(const std::string& what);

  std::vector<BNode> nodes_;
  std::vector<BRule> rules_;
};

// Keeps only what can complete: a node is live when it can reach its rule's return through byte edges and calls of
// productive rules (a rule is productive when its start is live). Edges into dead nodes and calls of
// unproductive rules are dropped, so every thread of a position can still finish (can_continue() is honest).
void Builder::prune(int32_t root, const std::string& what) {
  const size_t n = nodes_.size();
  std::vector<std::vector<int32_t>> preds(n);  // byte-edge predecessors
  std::vector<std::vector<std::array<int32_t, 3>>> by_ret(n);  // call sites (from, rule, ret) by return node
  std::vector<std::vector<std::array<int32_t, 3>>> by_rule(rules_.size());
  std::vector<int32_t> rule_of_start(n, -1);
  for (size_t r = 0; r < rules_.size(); ++r) rule_of_start[size_t(rules_[r].start)] = int32_t(r);
  for (size_t i = 0; i < n; ++i) {
    for (auto& [set, t] : nodes_[i].bytes) preds[size_t(t)].push_back(int32_t(i));
    for (auto& [r, ret] : nodes_[i].calls) {
      by_ret[size_t(ret)].push_back({int32_t(i), r, ret});
      by_rule[size_t(r)].push_back({int32_t(i), r, ret});
    }
  }
  std::vector<char> live(n, 0), productive(rules_.size(), 0);
  std::vector<int32_t> work;
  auto mark = [&](int32_t x) {
    if (!live[size_t(x)]) {
      live[size_t(x)] = 1;
      work.push_back(x);
    }
  };
  for (size_t i = 0; i < n; ++i)
    if (nodes_[i].final) mark(int32_t(i));
  while (!work.empty()) {
    const int32_t x = work.back();
    work.pop_back();
    for (int32_t p : preds[size_t(x)]) mark(p);
    for (auto& c : by_ret[size_t(x)])
      if (productive[size_t(c[1])]) mark(c[0]);
    const int32_t r = rule_of_start[size_t(x)];
    if (r >= 0 && !productive[size_t(r)]) {
      productive[size_t(r)] = 1;
      for (auto& c : by_rule[size_t(r)])
        if (live[size_t(c[2])]) mark(c[0]);
    }
  }
  if (!productive[size_t(root)])
    fail(what, ": no finite ", what == "grammar" ? "text satisfies it (every way through the root reaches a rule that "
                                                   "never ends)"
                                                 : "value satisfies it (a required property, item or reference that "
                                                   "recurses forever, or constraints that contradict each other)");
  for (auto& nd : nodes_) {
    std::erase_if(nd.bytes, [&](auto& e) { return !live[size_t(e.second)]; });
    std::erase_if(nd.calls, [&](auto& c) { return !productive[size_t(c.first)] || !live[size_t(c.second)]; });
  }
}

// A rule that can reach a call of itself without consuming a byte would make the closure loop forever.
void Builder::check_left_recursion(const std::string& what) {
  const size_t R = rules_.size();
  // The calls reachable from rule r's start without consuming (past calls of nullable rules);
  // `nullable` says whether the return is reachable that way.
  std::vector<int32_t> seen(nodes_.size(), -1);  // the last walk that visited the node
  int32_t walk = 0;
  auto left = [&](size_t r, const std::vector<char>& nullable, std::vector<int32_t>* callees) {
    std::vector<int32_t> work{rules_[r].start};
    bool returns = false;
    ++walk;
    while (!work.empty()) {
      const int32_t x = work.back();
      work.pop_back();
      if (seen[size_t(x)] == walk) continue;
      seen[size_t(x)] = walk;
      const BNode& nd = nodes_[size_t(x)];
      returns |= nd.final;
      for (auto& [c, ret] : nd.calls) {
        if (callees) callees->push_back(c);
        if (nullable[size_t(c)]) work.push_back(ret);
      }
    }
    return returns;
  };
  std::vector<char> nullable(R, 0);
  for (bool changed = true; changed;) {
    changed = false;
    for (size_t r = 0; r < R; ++r)
      if (!nullable[r] && left(r, nullable, nullptr)) nullable[r] = 1, changed = true;
  }
  std::vector<std::vector<int32_t>> graph(R);
  for (size_t r = 0; r < R; ++r) left(r, nullable, &graph[r]);
  // Cycle search (iterative DFS, colours 0 new / 1 on the path / 2 done).
  std::vector<char> colour(R, 0);
  std::vector<std::pair<int32_t, size_t>> path;
  for (size_t s = 0; s < R; ++s) {
    if (colour[s]) continue;
    path.push_back({int32_t(s), 0});
    colour[s] = 1;
    while (!path.empty()) {
      auto& [r, i] = path.back();
      if (i == graph[size_t(r)].size()) {
        colour[size_t(r)] = 2;
        path.pop_back();
        continue;
      }
      const int32_t c = graph[size_t(r)][i++];
      if (colour[size_t(c)] == 1) {
        std::string cycle;
        bool on = false;
        for (auto& [p, unused] : path) {
          on |= p == c;
          if (on) cycle += rules_[size_t(p)].name + " -> ";
        }
        fail(what, ": ", cycle, rules_[size_t(c)].name,
             " refers back to itself before any text is produced (left recursion)");
      }
      if (colour[size_t(c)] == 0) {
        colour[size_t(c)] = 1;
        path.push_back({c, 0});
      }
    }
  }
}

GrammarPtr Builder::finish(int32_t root, const std::string& what) {
  prune(root, what);
  check_left_recursion(what);
  auto g = std::make_shared<Grammar>();
  g->id = g_next_grammar_id.fetch_add(1);
  g->root = rules_[size_t(root)].start;
  g->nodes.resize(nodes_.size());
  g->cmaps.assign(256, 0);  // row 0: no edges
  std::map<std::array<uint8_t, 256>, int32_t> rows;
  rows[std::array<uint8_t, 256>{}] = 0;
  for (size_t i = 0; i < nodes_.size(); ++i) {
    const BNode& b = nodes_[i];
    Grammar::Node& n = g->nodes[i];
    if (!b.bytes.empty()) {
      std::array<int32_t, 256> to;
      to.fill(-1);
      for (auto& [set, t] : b.bytes)
        for (size_t c = 0; c < 256; ++c)
          if (set.test(c)) to[c] = t;
      // Classes in order of first appearance; class k's target is targets[tgt + k - 1].
      std::array<uint8_t, 256> row{};
      std::vector<int32_t> tg;
      for (size_t c = 0; c < 256; ++c) {
        if (to[c] < 0) continue;
        auto it = std::find(tg.begin(), tg.end(), to[c]);
        if (it == tg.end()) tg.push_back(to[c]), it = tg.end() - 1;
        row[c] = uint8_t(it - tg.begin() + 1);
      }
      auto [it, added] = rows.emplace(row, int32_t(rows.size()));
      if (added) g->cmaps.insert(g->cmaps.end(), row.begin(), row.end());
      n.cmap = it->second;
      n.tgt = int32_t(g->targets.size());
      g->targets.insert(g->targets.end(), tg.begin(), tg.end());
    }
    n.call_b = int32_t(g->calls.size());
    for (auto& [r, ret] : b.calls) g->calls.push_back({rules_[size_t(r)].start, ret});
    n.call_e = int32_t(g->calls.size());
    const bool bytes = !b.bytes.empty(), others = !b.calls.empty();
    n.flags = uint8_t((b.final ? Grammar::kFinal : 0) | (bytes ? Grammar::kBytes : 0) |
                      (bytes && !others && !b.final ? Grammar::kSimple : 0) |
                      (b.final && !bytes && !others ? Grammar::kPureFinal : 0) |
                      (b.final && bytes && !others ? Grammar::kBytesFinal : 0));
  }
  return g;
}

// ---------------------------------------------------------------------------------------------------------------
// Tool-call values (grammar_tool_call): the tool-call parser (text/tool_parser.cpp) ends a parameter's value at the
// first of these tags, so no value may contain one, in raw text or inside a JSON string.

const std::vector<std::string> kToolTags = {"</parameter>", "<parameter=", "</function>", "</tool_call>"};
constexpr std::string_view kValueEnd = "\n</parameter>";  // what ends a value in the grammar's own text

// A multi-pattern (Aho-Corasick) automaton over ASCII bytes: state = the longest suffix of the text read that is a
// proper prefix of a pattern (kToolTags, plus kValueEnd when `with_end`). A byte that completes kValueEnd is kEnd,
// one that completes a tag otherwise is kTag (refused); bytes outside the patterns lead to state 0.
class TagScanner {
 public:
  enum Verdict : uint8_t { kOk, kTag, kEnd };
  explicit TagScanner(bool with_end) {
    std::vector<std::string> pats = kToolTags;
    if (with_end) pats.emplace_back(kValueEnd);
    std::vector<std::string> states{""};
    for (auto& p : pats)
      for (size_t n = 1; n < p.size(); ++n)
        if (std::find(states.begin(), states.end(), p.substr(0, n)) == states.end()) states.push_back(p.substr(0, n));
    auto ends_with = [](const std::string& t, std::string_view p) {
      return t.size() >= p.size() && t.compare(t.size() - p.size(), p.size(), p) == 0;
    };
    next_.resize(states.size());
    for (size_t s = 0; s < states.size(); ++s)
      for (int b = 0; b < 128; ++b) {
        const std::string t = states[s] + char(b);
        Verdict v = kOk;
        if (with_end && ends_with(t, kValueEnd)) v = kEnd;
        else
          for (auto& tag : kToolTags) v = ends_with(t, tag) ? kTag : v;
        int to = 0;
        if (v == kOk)
          for (size_t k = 0; k < t.size() && !to; ++k)  // the longest suffix that is a state
            for (size_t i = 1; i < states.size(); ++i)
              if (states[i] == std::string_view(t).substr(k)) {
                to = int(i);
                break;
              }
        next_[s][size_t(b)] = {to, v};
      }
    starts_nl_.resize(states.size());
    for (size_t s = 0; s < states.size(); ++s) starts_nl_[s] = !states[s].empty() && states[s][0] == '\n';
  }
  int size() const { return int(next_.size()); }
  // After byte b (< 0x80) from state s.
  std::pair<int, Verdict> next(int s, uint8_t b) const { return next_[size_t(s)][b]; }
  // Whether the state is a prefix of kValueEnd's "\n<..." (the text's last '\n' may be where the value ends).
  bool starts_with_newline(int s) const { return starts_nl_[size_t(s)]; }

 private:
  std::vector<std::array<std::pair<int, Verdict>, 128>> next_;
  std::vector<char> starts_nl_;
};

// Whether a text contains one of kToolTags (such a literal cannot be a tool-call value).
bool has_tool_tag(std::string_view t) {
  for (auto& tag : kToolTags)
    if (t.find(tag) != std::string_view::npos) return true;
  return false;
}

// A deterministic automaton from `start`: its states are discovered from s0 by step(state, byte, next, exit), which
// returns 0 (the byte is refused), 1 (to state `next`) or 2 (to the existing node `exit`). One node per state.
// Returns each state's node.
template <typename State, typename Step>
std::map<State, int32_t> build_dfa(Builder& b, int32_t start, const State& s0, Step step) {
  std::map<State, int32_t> ids{{s0, start}};
  std::vector<State> work{s0};
  while (!work.empty()) {
    const State s = work.back();
    work.pop_back();
    const int32_t from = ids.at(s);
    std::map<int32_t, ByteSet> edges;
    for (int c = 0; c < 256; ++c) {
      State next{};
      int32_t exit = -1;
      const int r = step(s, uint8_t(c), next, exit);
      if (r == 0) continue;
      if (r == 1) {
        auto [it, added] = ids.emplace(next, -1);
        if (added) {
          it->second = b.node();
          work.push_back(next);
        }
        exit = it->second;
      }
      edges[exit].set(size_t(c));
    }
    for (auto& [to, set] : edges) b.on(from, set, to);
  }
  return ids;
}

// One string matching a regex (RegexDfa) from `start`: nodes are (automaton state, characters read, tag scanner
// state); the characters are counted to min..max (max < 0: unbounded, the count saturating at min) and, with `scan`
// (tool values), no byte that completes a tool tag nor a control other than tab, LF, CR is taken (ASCII bytes step
// the scanner, others reset it). Returns the nodes
// where the text read is a whole match within the bounds: the caller closes them ('"' for a JSON string's body,
// final or a call for raw text). exit >= 0 (no count, no scanner): a byte into an accepting state with no transitions
// of its own goes to `exit` instead (one character of a class ends there), and such states are not returned.
std::vector<int32_t> regex_nodes(Builder& b, int32_t start, const RegexDfa& d, int64_t min, int64_t max,
                                 const TagScanner* scan, int32_t exit = -1) {
  const bool counting = min > 0 || max >= 0;
  DS_CHECK(exit < 0 || (!counting && !scan), "regex_nodes: an exit node with a count or a tag scanner");
  std::vector<char> terminal(d.states(), 0);
  if (exit >= 0)
    for (size_t x = 0; x < d.states(); ++x)
      terminal[x] = d.accept[x] && std::all_of(d.next.begin() + std::ptrdiff_t(x * 256),
                                               d.next.begin() + std::ptrdiff_t(x * 256 + 256), [](int32_t t) { return t < 0; });
  using S = std::array<int64_t, 3>;
  const auto ids = build_dfa(b, start, S{0, 0, 0}, [&](const S& s, uint8_t c, S& n, int32_t& to) {
    const int32_t t = d.step(int32_t(s[0]), c);
    if (t < 0) return 0;
    if (terminal[size_t(t)]) {
      to = exit;
      return 2;
    }
    n = s;
    n[0] = t;
    if (scan) {  // tool values: also no controls but tab, LF and CR (raw text; JSON escapes them anyway)
      if (c < 0x20 && c != '\t' && c != '\n' && c != '\r') return 0;
      if (c < 0x80) {
        const auto [ns, v] = scan->next(int(s[2]), c);
        if (v != TagScanner::kOk) return 0;
        n[2] = ns;
      } else {
        n[2] = 0;
      }
    }
    if (counting && d.boundary[size_t(t)]) {
      n[1] = s[1] + 1;
      if (max >= 0 && n[1] > max) return 0;
      if (max < 0 && n[1] > min) n[1] = min;
    }
    return 1;
  });
  std::vector<int32_t> out;
  for (auto& [s, node] : ids)
    if (d.accept[size_t(s[0])] && s[1] >= min) out.push_back(node);
  return out;
}

// Raw text the automaton matches as a whole, as a rule (grammar_regex, structural tags' regex format).
int32_t regex_rule(Builder& b, const RegexDfa& d) {
  const int32_t r = b.rule("regex");
  for (int32_t x : regex_nodes(b, b.start(r), d, 0, -1, nullptr)) b.final(x);
  return r;
}
bool matches_any(const RegexDfa& d) { return std::find(d.accept.begin(), d.accept.end(), 1) != d.accept.end(); }

// ---------------------------------------------------------------------------------------------------------------
// JSON building blocks (RFC 8259 over UTF-8 bytes), each a rule built once per grammar.

class JsonRules {
 public:
  // tool_value: the JSON is a tool-call parameter's value, so its strings never contain one of kToolTags (keys,
  // literals: the schema compiler checks them).
  // compact: no whitespace between tokens at all (vLLM's disable_any_whitespace).
  explicit JsonRules(Builder& b, bool tool_value = false, bool compact = false) : b_(b), compact_(compact) {
    if (tool_value) scan_ = std::make_unique<TagScanner>(false);
  }
  bool tool_value() const { return scan_ != nullptr; }

  // "" | " " | "\n" [ \t]{0,20}; compact: "".
  int32_t ws() {
    if (ws_ >= 0) return ws_;
    ws_ = b_.rule("whitespace");
    const int32_t s = b_.start(ws_), sp = b_.node();
    b_.final(s);
    if (compact_) return ws_;
    b_.final(sp);
    b_.on(s, ' ', sp);
    int32_t prev = b_.node();
    b_.final(prev);
    b_.on(s, '\n', prev);
    for (int k = 0; k < kMaxWsRun; ++k) {
      const int32_t n = b_.node();
      b_.final(n);
      b_.on(prev, chars(" \t"), n);
      prev = n;
    }
    return ws_;
  }

  // Edges from `from` to `to` spelling one character of a string's body: unescaped (well-formed UTF-8, no '"',
  // '\', controls) or an escape; \uD800-\uDBFF only as the first half of a surrogate pair.
  void char_edges(int32_t from, int32_t to) {
    b_.on(from, plain_ascii(), to);
    lead_edges(from, tails(to));
  }

  // The unescaped ASCII bytes of a string's body.
  static ByteSet plain_ascii() {
    ByteSet ascii = range(0x20, 0x7F);
    ascii.reset('"');
    ascii.reset('\\');
    return ascii;
  }

  // The rest of a character after its first byte (UTF-8 continuations, an escape's body), ending at `to`: the
  // nodes its first bytes lead to, shared by every node whose multi-byte characters continue at `to`.
  struct Tails {
    int32_t c1, c2, c3, e0, ed, f0, f4, esc;
  };
  Tails tails(int32_t to) {
    Tails t;
    const ByteSet cont = range(0x80, 0xBF);
    t.c1 = b_.node(), t.c2 = b_.node(), t.c3 = b_.node();  // 1, 2, 3 continuation bytes to go
    b_.on(t.c1, cont, to);
    b_.on(t.c2, cont, t.c1);
    b_.on(t.c3, cont, t.c2);
    // The leads whose second byte is narrower: no overlongs, no surrogates, nothing above U+10FFFF.
    t.e0 = b_.node(), t.ed = b_.node(), t.f0 = b_.node(), t.f4 = b_.node();
    b_.on(t.e0, range(0xA0, 0xBF), t.c1);
    b_.on(t.ed, range(0x80, 0x9F), t.c1);
    b_.on(t.f0, range(0x90, 0xBF), t.c2);
    b_.on(t.f4, range(0x80, 0x8F), t.c2);
    // Escapes.
    t.esc = b_.node();
    const int32_t u = b_.node();
    b_.on(t.esc, chars("\"\\/bfnrt"), to);
    b_.on(t.esc, 'u', u);
    const int32_t u1 = b_.node(), u2 = b_.node(), u3 = b_.node(), ud = b_.node();  // hex digits read so far
    ByteSet not_d = kHex;
    not_d.reset('d');
    not_d.reset('D');
    b_.on(u, not_d, u1);
    b_.on(u1, kHex, u2);
    b_.on(u2, kHex, u3);
    b_.on(u3, kHex, to);
    b_.on(u, chars("dD"), ud);
    b_.on(ud, range('0', '7'), u2);  // \uD000-\uD7FF
    // \uD800-\uDBFF: a high surrogate, then "\u" and a low one \uDC00-\uDFFF. A lone low surrogate has no edge.
    int32_t h = b_.node();
    b_.on(ud, chars("89abAB"), h);
    for (const ByteSet& set : {kHex, kHex, chars("\\"), chars("u"), chars("dD"), chars("cdefCDEF"), kHex}) {
      const int32_t n = b_.node();
      b_.on(h, set, n);
      h = n;
    }
    b_.on(h, kHex, to);
    return t;
  }
  // The first bytes of multi-byte characters and escapes from `from`, into `t`.
  void lead_edges(int32_t from, const Tails& t) {
    b_.on(from, range(0xC2, 0xDF), t.c1);
    b_.on(from, range(0xE1, 0xEC) | range(0xEE, 0xEF), t.c2);
    b_.on(from, range(0xF1, 0xF3), t.c3);
    b_.on(from, char(0xE0), t.e0);
    b_.on(from, char(0xED), t.ed);
    b_.on(from, char(0xF0), t.f0);
    b_.on(from, char(0xF4), t.f4);
    b_.on(from, '\\', t.esc);
  }

  // Any JSON string.
  int32_t string() {
    if (str_ >= 0) return str_;
    str_ = b_.rule("string");
    const int32_t end = b_.node();
    b_.final(end);
    b_.on(b_.start(str_), '"', body_into(end));
    return str_;
  }

  // A string's body (any characters, then '"' to `end`); returns its first node.
  int32_t body_into(int32_t end) {
    std::vector<int32_t> body(size_t(scan_ ? scan_->size() : 1));
    for (auto& x : body) x = b_.node();
    if (scan_) guarded(body, body);
    else char_edges(body[0], body[0]);
    for (int32_t x : body) b_.on(x, '"', end);
    return body[0];
  }

  // Tool values: one character of a string from from[s] (s: the tag scanner's state) to to[s'], where s' is the
  // state after it (an escape or a multi-byte character: 0); no edge for a byte that completes a tag.
  void guarded(const std::vector<int32_t>& from, const std::vector<int32_t>& to) {
    const Tails t = tails(to[0]);
    const ByteSet ascii = plain_ascii();
    for (int s = 0; s < scan_->size(); ++s) {
      std::map<int, ByteSet> by_state;
      for (int c = 0; c < 128; ++c)
        if (ascii.test(size_t(c)))
          if (auto [n, v] = scan_->next(s, uint8_t(c)); v == TagScanner::kOk) by_state[n].set(size_t(c));
      for (auto& [n, set] : by_state) b_.on(from[size_t(s)], set, to[size_t(n)]);
      lead_edges(from[size_t(s)], t);
    }
  }

  // One character of a string's body.
  int32_t character() {
    if (char_ >= 0) return char_;
    char_ = b_.rule("character");
    const int32_t end = b_.node();
    b_.final(end);
    if (scan_) {  // tool values: a long bounded string has no room for the scanner's state, so '<' only escaped
      ByteSet ascii = plain_ascii();
      ascii.reset('<');
      b_.on(b_.start(char_), ascii, end);
      lead_edges(b_.start(char_), tails(end));
    } else {
      char_edges(b_.start(char_), end);
    }
    return char_;
  }

  // A string of min..max characters (max < 0: no upper bound): one node per count. Up to kInlineChars counts,
  // each has its own copy of the character edges (~25 nodes, stepped without closures: as fast as a plain
  // string); beyond, each calls character() (one node per count, ~2.5x slower to mask).
  int32_t string(int64_t min, int64_t max) {
    if (min == 0 && max < 0) return string();
    const auto key = std::make_pair(min, max);
    if (auto it = bounded_.find(key); it != bounded_.end()) return it->second;
    const int32_t r = b_.rule("string of " + std::to_string(min) + ".." + std::to_string(max) + " characters");
    const int32_t end = b_.node();
    b_.final(end);
    const int64_t n = max < 0 ? min : max;
    const bool inline_chars = n <= kInlineChars;
    const int32_t ch = inline_chars ? -1 : character();
    // pos[k][s]: k characters read, the tag scanner in state s (tool values, inline only; else one state).
    const size_t S = scan_ && inline_chars ? size_t(scan_->size()) : 1;
    std::vector<std::vector<int32_t>> pos(size_t(n + 1), std::vector<int32_t>(S));
    for (auto& p : pos)
      for (auto& x : p) x = b_.node();
    b_.on(b_.start(r), '"', pos[0][0]);
    for (int64_t k = 0; k <= n; ++k) {
      if (k >= min)
        for (int32_t x : pos[size_t(k)]) b_.on(x, '"', end);
      const int64_t next = k < n ? k + 1 : max < 0 ? k : -1;
      if (next < 0) continue;
      if (inline_chars && S > 1) guarded(pos[size_t(k)], pos[size_t(next)]);
      else if (inline_chars) char_edges(pos[size_t(k)][0], pos[size_t(next)][0]);
      else b_.call(pos[size_t(k)][0], ch, pos[size_t(next)][0]);
    }
    bounded_[key] = r;
    return r;
  }

  // A string whose decoded text matches a pattern as a whole (`d`: compile_regex's kJsonString automaton), of
  // min..max characters (max < 0: unbounded). Tool values: no tool tag in its bytes.
  int32_t string_matching(const RegexDfa& d, int64_t min, int64_t max, std::string name) {
    const int32_t r = b_.rule(std::move(name)), body = b_.node(), end = b_.node();
    b_.final(end);
    b_.on(b_.start(r), '"', body);
    for (int32_t x : regex_nodes(b_, body, d, min, max, scan_.get())) b_.on(x, '"', end);
    return r;
  }

  // A string other than the given JSON string texts (each with its quotes): the plain string automaton, with a
  // trie in front that follows the excluded texts and drops the edge that would complete one. Other spellings of
  // an excluded name (escapes such as \u0061 for "a") are not excluded.
  int32_t string_except(const std::vector<std::string>& excluded) {
    if (excluded.empty()) return string();
    const int32_t r = b_.rule("key other than the listed properties");
    const int32_t s0 = b_.node(), end = b_.node();  // the plain automaton; s0 stays unreachable
    b_.final(end);
    b_.on(s0, '"', body_into(end));
    except_node(excluded, "", s0, b_.start(r));
    return r;
  }

  // At most 16 digits in the integer part and the fraction, 2 in the exponent; integers have neither.
  int32_t number(bool integer) {
    int32_t& memo = integer ? int_ : num_;
    if (memo >= 0) return memo;
    memo = b_.rule(integer ? "integer" : "number");
    const int32_t s = b_.start(memo), minus = b_.node(), zero = b_.node();
    b_.final(zero);
    b_.on(s, '-', minus);
    auto digits = [&](int n) {  // a chain of n digit nodes, each final (after 1, 2, ... n digits)
      std::vector<int32_t> d{}; d.resize(size_t(n));
      for (auto& x : d) x = b_.node(), b_.final(x);
      for (int k = 0; k + 1 < n; ++k) b_.on(d[size_t(k)], kDigits, d[size_t(k + 1)]);
      return d;
    };
    std::vector<int32_t> ip = digits(kMaxDigits);
    for (int32_t from : {s, minus}) {
      b_.on(from, '0', zero);
      b_.on(from, range('1', '9'), ip[0]);
    }
    if (!integer) {
      const int32_t dot = b_.node(), e = b_.node(), esign = b_.node();
      std::vector<int32_t> frac = digits(kMaxDigits), exp = digits(kMaxExpDigits);
      b_.on(dot, kDigits, frac[0]);
      b_.on(e, kDigits, exp[0]);
      b_.on(esign, kDigits, exp[0]);
      b_.on(e, chars("+-"), esign);
      std::vector<int32_t> int_ends = ip;
      int_ends.push_back(zero);
      for (int32_t x : int_ends) {
        b_.on(x, '.', dot);
        b_.on(x, chars("eE"), e);
      }
      for (int32_t x : frac) b_.on(x, chars("eE"), e);
    }
    return memo;
  }

  // Exactly one of the texts (a trie).
  int32_t words(const std::vector<std::string>& texts, std::string name) {
    const int32_t r = b_.rule(std::move(name));
    for (auto& t : texts) b_.final(b_.word(b_.start(r), t));
    return r;
  }
  int32_t null_rule() {
    if (null_ < 0) null_ = words({"null"}, "null");
    return null_;
  }
  int32_t bool_rule() {
    if (bool_ < 0) bool_ = words({"true", "false"}, "boolean");
    return bool_;
  }

  // Any JSON value whose objects/arrays are at nesting level `depth` (1 = outermost) or deeper; beyond kMaxDepth
  // only scalars.
  int32_t value(int depth) {
    if (values_.empty()) values_.assign(kMaxDepth + 2, -1);
    const size_t d = size_t(std::min(depth, kMaxDepth + 1));
    if (values_[d] >= 0) return values_[d];
    std::vector<int32_t> alts{string(), number(false), bool_rule(), null_rule()};
    if (int(d) <= kMaxDepth) alts.push_back(object(int(d))), alts.push_back(array(int(d)));
    return values_[d] = b_.alternatives(alts, "JSON value");
  }
  int32_t object(int depth) {
    if (objects_.empty()) objects_.assign(kMaxDepth + 1, -1);
    int32_t& r = objects_[size_t(depth)];
    if (r < 0) r = object({}, value(depth + 1), "JSON object");
    return r;
  }
  int32_t array(int depth) {
    if (arrays_.empty()) arrays_.assign(kMaxDepth + 1, -1);
    int32_t& r = arrays_[size_t(depth)];
    if (r < 0) r = array({}, value(depth + 1), 0, -1, "JSON array");
    return r;
  }

  struct Prop {
    std::string key;  // the name's JSON string text
    int32_t value;    // rule
    bool required;
  };
  // '{' members '}': the listed properties in order (optional ones may be skipped), then, when `extra` >= 0,
  // any number of other keys (strings other than the listed keys) with values of rule `extra`.
  int32_t object(const std::vector<Prop>& props, int32_t extra, std::string name) {
    const int n = int(props.size());
    std::vector<int> next_req(size_t(n + 1), n);  // the first required property at or after k
    for (int k = n - 1; k >= 0; --k) next_req[size_t(k)] = props[size_t(k)].required ? k : next_req[size_t(k + 1)];
    const int32_t r = b_.rule(std::move(name));
    const int32_t open = b_.node(), first = b_.node(), end = b_.node();
    b_.final(end);
    b_.on(b_.start(r), '{', open);
    b_.call(open, ws(), first);
    int32_t xkey = -1;
    if (extra >= 0) {
      std::vector<std::string> keys;
      for (auto& p : props) keys.push_back(p.key);
      xkey = string_except(keys);
    }
    std::vector<int32_t> after(size_t(n + 1), -1);  // after a member, the next candidate being property k
    auto after_node = [&](int k) {
      if (after[size_t(k)] < 0) after[size_t(k)] = b_.node();
      return after[size_t(k)];
    };
    // key ws ':' ws value, from key position K, continuing at after_node(next).
    auto member = [&](int32_t key_end, int32_t value, int next) {
      const int32_t c0 = b_.node(), c1 = b_.node(), c2 = b_.node();
      b_.call(key_end, ws(), c0);
      b_.on(c0, ':', c1);
      b_.call(c1, ws(), c2);
      b_.call(c2, value, after_node(next));
    };
    // The keys that may come at a key position whose next candidate is property k: k up to the first required
    // one; extra keys once no required property is left.
    auto keys_at = [&](int32_t K, int k) {
      const int last = next_req[size_t(k)] < n ? next_req[size_t(k)] : n - 1;
      for (int j = k; j <= last; ++j) member(b_.word(K, props[size_t(j)].key), props[size_t(j)].value, j + 1);
      if (next_req[size_t(k)] == n && extra >= 0) {
        const int32_t key_end = b_.node();
        b_.call(K, xkey, key_end);
        member(key_end, extra, n);
      }
    };
    if (next_req[0] == n) b_.on(first, '}', end);
    keys_at(first, 0);
    for (int k = 0; k <= n; ++k) {  // after_node(k) is only created by keys at positions < k (or k = n)
      if (after[size_t(k)] < 0) continue;
      const int32_t sep = b_.node();
      b_.call(after[size_t(k)], ws(), sep);
      if (next_req[size_t(k)] == n) b_.on(sep, '}', end);
      if (k < n || extra >= 0) {
        const int32_t comma = b_.node(), K = b_.node();
        b_.on(sep, ',', comma);
        b_.call(comma, ws(), K);
        keys_at(K, k);
      }
    }
    return r;
  }

  // '[' items ']': prefix[i] for the first items, then `items` (-1: none); between min and max items (max < 0:
  // no bound). The caller checks that min is reachable.
  int32_t array(const std::vector<int32_t>& prefix, int32_t items, int64_t min, int64_t max, std::string name) {
    const int64_t m = int64_t(prefix.size());
    if (items < 0) max = max < 0 ? m : std::min(max, m);
    const bool bounded = max >= 0;
    const int64_t last = bounded ? max : std::max<int64_t>({m, min, 1});  // unbounded: position `last` loops
    const int32_t r = b_.rule(std::move(name));
    const int32_t open = b_.node(), first = b_.node(), end = b_.node();
    b_.final(end);
    b_.on(b_.start(r), '[', open);
    b_.call(open, ws(), first);
    auto rule_for = [&](int64_t k) { return k < m ? prefix[size_t(k)] : items; };
    std::vector<int32_t> after(size_t(last + 1));  // after k items
    for (auto& a : after) a = b_.node();
    if (min == 0) b_.on(first, ']', end);
    if (max != 0) b_.call(first, rule_for(0), after[std::min<size_t>(1, size_t(last))]);
    for (int64_t k = 1; k <= last; ++k) {
      const int32_t sep = b_.node();
      b_.call(after[size_t(k)], ws(), sep);
      if (k >= min) b_.on(sep, ']', end);
      if (!bounded || k < max) {
        const int32_t comma = b_.node(), item = b_.node();
        b_.on(sep, ',', comma);
        b_.call(comma, ws(), item);
        b_.call(item, rule_for(k), after[size_t(std::min(k + 1, last))]);
      }
    }
    return r;
  }

 private:
  // Trie node `t` for the prefix p of the excluded texts, where the plain automaton is at q.
  void except_node(const std::vector<std::string>& excluded, const std::string& p, int32_t q, int32_t t) {
    ByteSet in_trie;
    for (auto& x : excluded)
      if (x.size() > p.size() && x.compare(0, p.size(), p) == 0) in_trie.set(uint8_t(x[p.size()]));
    const auto edges = b_.edges(q);  // a copy: nodes are added below
    for (auto& [set, target] : edges)
      if ((set & ~in_trie).any()) b_.on(t, set & ~in_trie, target);
    for (size_t c = 0; c < 256; ++c) {
      if (!in_trie.test(c)) continue;
      const std::string pc = p + char(c);
      const int32_t qc = b_.next(q, uint8_t(c));
      DS_CHECK(qc >= 0, "grammar: an excluded key that is not a JSON string");
      if (std::find(excluded.begin(), excluded.end(), pc) != excluded.end()) continue;  // completes one: no edge
      const int32_t child = b_.node();
      b_.on(t, char(c), child);
      except_node(excluded, pc, qc, child);
    }
  }

  Builder& b_;
  std::unique_ptr<TagScanner> scan_;  // tool values only
  int32_t ws_ = -1, str_ = -1, char_ = -1, num_ = -1, int_ = -1, null_ = -1, bool_ = -1;
  std::map<std::pair<int64_t, int64_t>, int32_t> bounded_;
  std::vector<int32_t> values_, objects_, arrays_;
  bool compact_ = false;
};

// ---------------------------------------------------------------------------------------------------------------
// JSON Schema -> rules.

const std::set<std::string, std::less<>> kIgnored = {
    "title",    "description", "default", "examples",  "$schema",  "$id",     "$comment",         "format",
    "deprecated", "readOnly",  "writeOnly", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"};
const std::vector<std::string> kSupported = {
    "type",  "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
    "maxItems", "minLength", "maxLength", "pattern", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs",
    "definitions", "nullable"};
constexpr const char* kFormats = "date, time, date-time, uuid, ipv4, hostname, email";  // regex.h format_regex
const std::vector<std::string> kTypes = {"object", "array", "string", "number", "integer", "boolean", "null"};

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

std::string brief(const ojson& v) {
  std::string s = v.dump(-1, ' ', false, ojson::error_handler_t::replace);
  return s.size() > 80 ? s.substr(0, 77) + "..." : s;
}

// Where a schema is, for messages: its JSON pointer, or "the root".
std::string at(const std::string& ptr) { return ptr.empty() ? "the root" : ptr; }

std::string ptr_token(const std::string& key) {
  std::string s;
  for (char c : key) s += c == '~' ? "~0" : c == '/' ? "~1" : std::string(1, c);
  return s;
}

bool is_type(const ojson& v, const std::string& t) {
  if (t == "null") return v.is_null();
  if (t == "boolean") return v.is_boolean();
  if (t == "integer")
    return v.is_number_integer() || (v.is_number_float() && v.get<double>() == double(int64_t(v.get<double>())));
  if (t == "number") return v.is_number();
  if (t == "string") return v.is_string();
  if (t == "array") return v.is_array();
  return v.is_object();
}

class SchemaCompiler {
 public:
  // `root`: the document $refs point into; `what` prefixes errors ("json_schema", "tools[0].function.parameters").
  SchemaCompiler(const ojson& root, Builder& b, JsonRules& j, std::string what = "json_schema")
      : root_(root), b_(b), j_(j), what_(std::move(what)) {}

  GrammarPtr compile() { return b_.finish(schema(root_, ""), what_); }
  // The rule for one JSON value satisfying the subschema `s` of the document, at JSON pointer `ptr`.
  int32_t rule(const ojson& s, const std::string& ptr) { return schema(s, ptr); }

 private:
  [[noreturn]] void bad(const std::string& ptr, const std::string& kw, const std::string& expected, const ojson& v) {
    fail(what_, ": \"", kw, "\" at ", at(ptr), " must be ", expected, ", found ", brief(v));
  }
  int64_t count(const ojson& s, const std::string& ptr, const char* kw, int64_t dflt) {
    if (!s.contains(kw)) return dflt;
    const ojson& v = s[kw];
    if (!v.is_number_integer() || v.get<int64_t>() < 0)
      bad(ptr, kw, "a non-negative integer", v);
    if (v.get<int64_t>() > kMaxCount)
      fail(what_, ": \"", kw, "\" at ", at(ptr), " is ", v.get<int64_t>(), "; at most ", kMaxCount,
           " is supported");
    return v.get<int64_t>();
  }

  // The rule for one JSON value satisfying schema `s` (at JSON pointer `ptr`).
  int32_t schema(const ojson& s, const std::string& ptr) {
    struct Nesting {  // bounds the recursion (a request's schema could nest arbitrarily deep)
      int& depth;
      explicit Nesting(int& d) : depth(d) { ++depth; }
      ~Nesting() { --depth; }
    } nesting(depth_);
    if (depth_ > kMaxSchemaDepth)
      fail(what_, ": the schema at ", at(ptr), " is nested more than ", kMaxSchemaDepth, " levels deep");
    if (s.is_boolean()) {
      if (s.get<bool>()) return j_.value(1);
      fail(what_, ": the schema at ", at(ptr), " is false: no value satisfies it");
    }
    if (!s.is_object()) fail(what_, ": expected a schema (an object or a boolean) at ", at(ptr), ", found ", brief(s));
    for (auto& [k, v] : s.items())
      if (!kIgnored.count(k) && std::find(kSupported.begin(), kSupported.end(), k) == kSupported.end())
        fail(what_, ": unsupported keyword \"", k, "\" at ", at(ptr), " (supported: ", join(kSupported),
             "; ignored: minimum, maximum, exclusiveMinimum, exclusiveMaximum, formats other than ", kFormats,
             ", and annotations)");
    // Identical subschemas (same text, so the same $refs) share one rule.
    const std::string text = s.dump(-1, ' ', false, ojson::error_handler_t::replace);
    if (auto it = by_text_.find(text); it != by_text_.end()) return it->second;
    for (const char* kw : {"$defs", "definitions"})
      if (s.contains(kw) && !s[kw].is_object()) bad(ptr, kw, "an object of schemas", s[kw]);
    bool nullable = false;
    if (s.contains("nullable")) {
      if (!s["nullable"].is_boolean()) bad(ptr, "nullable", "a boolean", s["nullable"]);
      nullable = s["nullable"].get<bool>();
    }
    // A combinator may only stand next to annotations, $defs and nullable.
    auto alone = [&](const char* kw) {
      for (auto& [k, v] : s.items())
        if (k != kw && !kIgnored.count(k) && k != "$defs" && k != "definitions" && k != "nullable")
          fail(what_, ": \"", kw, "\" at ", at(ptr), " cannot be combined with \"", k,
               "\" (only with annotations, $defs and nullable)");
    };
    std::vector<int32_t> alts;
    if (s.contains("$ref")) {
      alone("$ref");
      alts.push_back(ref(s["$ref"], ptr));
    } else if (s.contains("anyOf") || s.contains("oneOf")) {
      const char* kw = s.contains("anyOf") ? "anyOf" : "oneOf";
      alone(kw);
      const ojson& v = s[kw];
      if (!v.is_array() || v.empty()) bad(ptr, kw, "a non-empty array of schemas", v);
      for (size_t i = 0; i < v.size(); ++i) {
        const int32_t r = schema(v[i], ptr + "/" + kw + "/" + std::to_string(i));
        if (std::find(alts.begin(), alts.end(), r) == alts.end()) alts.push_back(r);
      }
    } else if (s.contains("allOf")) {
      alone("allOf");
      const ojson& v = s["allOf"];
      if (!v.is_array() || v.size() != 1) bad(ptr, "allOf", "an array of exactly one schema (no intersections)", v);
      alts.push_back(schema(v[0], ptr + "/allOf/0"));
    } else {
      std::vector<std::string> types;
      if (s.contains("type")) {
        const ojson& t = s["type"];
        std::vector<ojson> names = t.is_array() ? std::vector<ojson>(t.begin(), t.end()) : std::vector<ojson>{t};
        if (names.empty()) bad(ptr, "type", "a type name or a non-empty array of them (" + join(kTypes) + ")", t);
        for (auto& n : names) {
          if (!n.is_string() || std::find(kTypes.begin(), kTypes.end(), n.get<std::string>()) == kTypes.end())
            bad(ptr, "type", "one of " + join(kTypes) + " (or an array of them)", n);
          if (std::find(types.begin(), types.end(), n.get<std::string>()) == types.end())
            types.push_back(n.get<std::string>());
        }
      }
      if (s.contains("const") || s.contains("enum")) {
        alts.push_back(literals(s, ptr, types, nullable));
        nullable = false;  // null is among the literals if it may be
      } else {
        if (types.empty()) {  // the types the keywords imply; none: any value
          auto has = [&](std::initializer_list<const char*> kws) {
            for (const char* k : kws)
              if (s.contains(k)) return true;
            return false;
          };
          if (has({"properties", "required", "additionalProperties"})) types.push_back("object");
          if (has({"items", "prefixItems", "minItems", "maxItems"})) types.push_back("array");
          if (has({"minLength", "maxLength", "pattern"})) types.push_back("string");
        }
        if (types.empty()) alts.push_back(j_.value(1));
        const bool number = std::find(types.begin(), types.end(), "number") != types.end();
        for (auto& t : types) {
          if (t == "null") alts.push_back(j_.null_rule());
          if (t == "boolean") alts.push_back(j_.bool_rule());
          if (t == "number") alts.push_back(j_.number(false));
          if (t == "integer" && !number) alts.push_back(j_.number(true));  // number already has the integers
          if (t == "string") alts.push_back(string(s, ptr));
          if (t == "object") alts.push_back(object(s, ptr));
          if (t == "array") alts.push_back(array(s, ptr));
        }
        if (std::find(types.begin(), types.end(), "null") != types.end()) nullable = false;
      }
    }
    if (nullable && types_can_be_null(alts)) alts.push_back(j_.null_rule());
    const int32_t r = b_.alternatives(alts, at(ptr));
    by_text_[text] = r;
    return r;
  }
  bool types_can_be_null(const std::vector<int32_t>& alts) {
    return std::find(alts.begin(), alts.end(), j_.null_rule()) == alts.end();
  }

  // enum / const: the values' compact JSON texts, those of the listed types when `type` is given.
  int32_t literals(const ojson& s, const std::string& ptr, const std::vector<std::string>& types, bool nullable) {
    const char* kw = s.contains("const") ? "const" : "enum";
    if (s.contains("const") && s.contains("enum")) fail(what_, ": \"const\" and \"enum\" together at ", at(ptr));
    std::vector<ojson> values;
    if (s.contains("const")) {
      values.push_back(s["const"]);
    } else {
      if (!s["enum"].is_array() || s["enum"].empty()) bad(ptr, "enum", "a non-empty array", s["enum"]);
      values.assign(s["enum"].begin(), s["enum"].end());
    }
    if (nullable) values.push_back(nullptr);
    std::vector<std::string> texts;
    for (auto& v : values) {
      bool ok = types.empty() || (nullable && v.is_null());
      for (auto& t : types) ok |= is_type(v, t);
      if (!ok) continue;
      try {
        texts.push_back(v.dump());
      } catch (const nlohmann::json::exception&) {
        fail(what_, ": \"", kw, "\" at ", at(ptr), " holds a string that is not valid UTF-8");
      }
      if (j_.tool_value() && has_tool_tag(texts.back()))
        fail(what_, ": \"", kw, "\" at ", at(ptr), " holds ", brief(v), ", which contains a tool-call tag (",
             join(kToolTags), ") that would end the parameter's value");
    }
    if (texts.empty())
      fail(what_, ": no value of \"", kw, "\" at ", at(ptr), " has the schema's type (", join(types), ")");
    return j_.words(texts, std::string(kw) + " at " + at(ptr));
  }

  int32_t string(const ojson& s, const std::string& ptr) {
    const int64_t min = count(s, ptr, "minLength", 0), max = count(s, ptr, "maxLength", -1);
    if (max >= 0 && min > max)
      fail(what_, ": \"minLength\" ", min, " exceeds \"maxLength\" ", max, " at ", at(ptr));
    if (auto d = text_dfa(s, ptr, RegexEncoding::kJsonString))
      return j_.string_matching(*d, min, max, "pattern or format at " + at(ptr));
    return j_.string(min, max);
  }

 public:
  // The automaton of a string schema's "pattern" (matched as a whole) and "format" (format_regex's; others are
  // annotations), both where both are given; none when neither constrains the text.
  std::optional<RegexDfa> text_dfa(const ojson& s, const std::string& ptr, RegexEncoding enc) {
    std::optional<RegexDfa> d;
    if (s.contains("pattern")) {
      const ojson& v = s["pattern"];
      if (!v.is_string()) bad(ptr, "pattern", "a string (a regular expression)", v);
      try {
        d = compile_regex(v.get<std::string>(), enc);
      } catch (const Error& e) {
        fail(what_, ": \"pattern\" at ", at(ptr), ": ", e.what());
      }
    }
    if (s.contains("format")) {
      const ojson& v = s["format"];
      if (!v.is_string()) bad(ptr, "format", "a string", v);
      if (const char* re = format_regex(v.get<std::string>())) {
        RegexDfa f = compile_regex(re, enc);
        try {
          d = d ? intersect(*d, f) : std::move(f);
        } catch (const Error& e) {
          fail(what_, ": \"pattern\" and \"format\" at ", at(ptr), ": ", e.what());
        }
      }
    }
    return d;
  }

 private:

  int32_t object(const ojson& s, const std::string& ptr) {
    std::vector<JsonRules::Prop> props;
    std::vector<std::string> names;
    if (s.contains("properties")) {
      const ojson& p = s["properties"];
      if (!p.is_object()) bad(ptr, "properties", "an object of schemas", p);
      for (auto& [name, sub] : p.items()) {
        std::string key;
        try {
          key = ojson(name).dump();
        } catch (const nlohmann::json::exception&) {
          fail(what_, ": a property name at ", at(ptr), "/properties is not valid UTF-8");
        }
        if (j_.tool_value() && has_tool_tag(key))
          fail(what_, ": the property name ", key, " at ", at(ptr), "/properties contains a tool-call tag (",
               join(kToolTags), ") that would end the parameter's value");
        props.push_back({key, schema(sub, ptr + "/properties/" + ptr_token(name)), false});
        names.push_back(name);
      }
    }
    if (s.contains("required")) {
      const ojson& req = s["required"];
      if (!req.is_array()) bad(ptr, "required", "an array of property names", req);
      for (auto& n : req) {
        if (!n.is_string()) bad(ptr, "required", "an array of property names", n);
        auto it = std::find(names.begin(), names.end(), n.get<std::string>());
        if (it == names.end())
          fail(what_, ": \"required\" at ", at(ptr), " names ", brief(n),
               ", which is not in \"properties\" (required keys must be listed there)");
        props[size_t(it - names.begin())].required = true;
      }
    }
    int32_t extra = -1;  // additionalProperties absent: false when there are properties (OpenAI strict), else any
    if (s.contains("additionalProperties")) {
      const ojson& a = s["additionalProperties"];
      if (!a.is_boolean() && !a.is_object()) bad(ptr, "additionalProperties", "a boolean or a schema", a);
      if (!(a.is_boolean() && !a.get<bool>())) extra = schema(a, ptr + "/additionalProperties");
    } else if (!s.contains("properties")) {
      extra = j_.value(1);
    }
    return j_.object(props, extra, "object at " + at(ptr));
  }

  int32_t array(const ojson& s, const std::string& ptr) {
    std::vector<int32_t> prefix;
    if (s.contains("prefixItems")) {
      const ojson& p = s["prefixItems"];
      if (!p.is_array()) bad(ptr, "prefixItems", "an array of schemas", p);
      for (size_t i = 0; i < p.size(); ++i) prefix.push_back(schema(p[i], ptr + "/prefixItems/" + std::to_string(i)));
    }
    int32_t items = j_.value(1);  // absent: any further items
    if (s.contains("items")) {
      const ojson& it = s["items"];
      if (it.is_array()) bad(ptr, "items", "a schema or a boolean (for a tuple use prefixItems)", it);
      if (it.is_boolean() && !it.get<bool>()) items = -1;
      else items = schema(it, ptr + "/items");
    }
    const int64_t min = count(s, ptr, "minItems", 0), max = count(s, ptr, "maxItems", -1);
    if (max >= 0 && min > max) fail(what_, ": \"minItems\" ", min, " exceeds \"maxItems\" ", max, " at ", at(ptr));
    if (items < 0 && min > int64_t(prefix.size()))
      fail(what_, ": \"minItems\" ", min, " at ", at(ptr), " exceeds the ", prefix.size(),
           " prefixItems allowed when items is false");
    return j_.array(prefix, items, min, max, "array at " + at(ptr));
  }

  // $ref into this document: "#" + a JSON pointer. One rule per target (recursion refers back to it).
  int32_t ref(const ojson& v, const std::string& ptr) {
    if (!v.is_string()) bad(ptr, "$ref", "a string", v);
    const std::string r = v.get<std::string>();
    if (r.empty() || r[0] != '#')
      bad(ptr, "$ref", "a reference into the same schema (\"#/$defs/name\"; remote references are not supported)", v);
    const std::string target = r.substr(1);
    if (auto it = refs_.find(target); it != refs_.end()) return it->second;
    const ojson* t = nullptr;
    try {
      const ojson::json_pointer jp(target);
      if (root_.contains(jp)) t = &root_.at(jp);
    } catch (const nlohmann::json::exception&) {
      bad(ptr, "$ref", "\"#\" followed by a JSON pointer", v);
    }
    if (!t) fail(what_, ": \"$ref\" at ", at(ptr), " points to ", r, ", which is not in the schema");
    const int32_t w = b_.rule("$ref \"" + r + "\"");
    refs_[target] = w;
    const int32_t end = b_.node();
    b_.final(end);
    b_.call(b_.start(w), schema(*t, target), end);
    return w;
  }

  const ojson& root_;
  Builder& b_;
  JsonRules& j_;
  std::string what_;
  std::map<std::string, int32_t> refs_;
  std::unordered_map<std::string, int32_t> by_text_;
  int depth_ = 0;
};

// ---------------------------------------------------------------------------------------------------------------
// Tool calls (grammar_tool_call): Qwen3.5's XML format, the values as tool_param_value converts them.

// UTF-8 outside JSON: `u` is 0 at a character boundary, else what the next continuation byte must be. Returns 0 for
// a refused byte, 1 for a byte inside a character, 2 for the byte that completes one (u updated).
int utf8_step(int& u, uint8_t c) {
  static constexpr int lo[] = {0, 0x80, 0x80, 0x80, 0xA0, 0x80, 0x90, 0x80};
  static constexpr int hi[] = {0, 0xBF, 0xBF, 0xBF, 0xBF, 0x9F, 0xBF, 0x8F};
  static constexpr int then[] = {0, 0, 1, 2, 1, 1, 2, 2};  // 1, 2, 3: continuations left; 4 E0, 5 ED, 6 F0, 7 F4
  if (u) {
    if (c < lo[u] || c > hi[u]) return 0;
    u = then[u];
    return u ? 1 : 2;
  }
  if (c < 0x80) return 2;
  u = c >= 0xC2 && c <= 0xDF ? 1 : c == 0xE0 ? 4 : c == 0xED ? 5 : c >= 0xE1 && c <= 0xEF ? 2 : c == 0xF0 ? 6
      : c >= 0xF1 && c <= 0xF3 ? 3 : c == 0xF4 ? 7 : 0;
  return u ? 1 : 0;
}

// The type tool_param_value (text/tool_parser.cpp) converts a value by: `type` (a name, or a list's first name other
// than "null"), else "string" when `enum` holds only strings, else "" (JSON when the text parses, else the text).
std::string parser_type(const ojson& s) {
  if (!s.is_object()) return "";
  if (auto t = s.find("type"); t != s.end()) {
    if (t->is_string()) return t->get<std::string>();
    if (t->is_array())
      for (auto& x : *t)
        if (x.is_string() && x.get<std::string>() != "null") return x.get<std::string>();
  }
  if (auto e = s.find("enum"); e != s.end() && e->is_array() && !e->empty() &&
                               std::all_of(e->begin(), e->end(), [](const ojson& x) { return x.is_string(); }))
    return "string";
  return "";
}

bool is_space(char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }

// "null" in any case between whitespace: what tool_param_value reads as null.
bool null_text(std::string_view t) {
  while (!t.empty() && is_space(t.front())) t.remove_prefix(1);
  while (!t.empty() && is_space(t.back())) t.remove_suffix(1);
  std::string l(t);
  for (char& c : l) c = char(std::tolower(uint8_t(c)));
  return l == "null";
}

class ToolCallCompiler {
 public:
  ToolCallCompiler() : j_(b_, true), raw_scan_(true), tag_scan_(false) {}

  GrammarPtr compile(const ojson& tools, const std::string& only, bool strict_only) {
    if (!tools.is_array() || tools.empty()) fail("tools: expected a non-empty list of tools, found ", brief(tools));
    const int32_t root = b_.rule("tool call");
    std::set<std::string> seen;
    for (size_t i = 0; i < tools.size(); ++i) {
      const ojson& tool = tools[i];
      const std::string where = "tools[" + std::to_string(i) + "]";
      const bool wrapped = tool.is_object() && tool.contains("function") && tool["function"].is_object();
      const ojson& fn = wrapped ? tool["function"] : tool;
      const std::string fwhere = where + (wrapped ? ".function" : "");
      if (!fn.is_object() || !fn.contains("name") || !fn["name"].is_string())
        fail(where, ": expected {\"type\": \"function\", \"function\": {\"name\": ...}}, found ", brief(tool));
      const std::string name = fn["name"].get<std::string>();
      if (!only.empty() && name != only) continue;
      if (!seen.insert(name).second) continue;  // the parser reads a call by the first tool of its name
      if (name.empty() || name.find_first_of("<>\n") != std::string::npos || is_space(name.front()) ||
          is_space(name.back()))
        fail(fwhere, ".name: ", brief(fn["name"]), " cannot be spelled in a tool call (<function=NAME>: not empty, no "
             "'<', '>' or newline, no whitespace at either end)");
      const bool strict = fn.contains("strict") && fn["strict"].is_boolean() && fn["strict"].get<bool>();
      const int32_t header = b_.word(b_.start(root), "\n<function=" + name + ">\n");
      if (strict_only && !strict) free_parameters(header);
      else parameters(fn, fwhere + ".parameters", header);
    }
    if (seen.empty()) fail("tools: no tool named \"", only, "\"");
    return b_.finish(root, "tools");
  }

 private:
  // `<parameter=KEY>\nVALUE\n</parameter>\n` for the schema's properties in order, then `</function>\n`.
  void parameters(const ojson& fn, const std::string& what, int32_t header) {
    if (!fn.contains("parameters") || fn["parameters"].is_null()) {  // OpenAI: no parameters, no arguments
      b_.final(b_.word(header, "</function>\n"));
      return;
    }
    const ojson& p = fn["parameters"];
    if (!p.is_object()) fail(what, ": expected a JSON Schema of an object, found ", brief(p));
    SchemaCompiler sc(p, b_, j_, what);
    for (auto& [k, v] : p.items()) {
      if (k == "type") {
        if (!(v == "object" || v == ojson::array({"object"})))
          fail(what, ": \"type\" at the root must be \"object\" (the arguments are an object), found ", brief(v));
      } else if (k == "$defs" || k == "definitions") {
        if (!v.is_object()) fail(what, ": \"", k, "\" at the root must be an object of schemas, found ", brief(v));
      } else if (k != "properties" && k != "required" && k != "additionalProperties" && !kIgnored.count(k)) {
        fail(what, ": unsupported keyword \"", k, "\" at the root (a tool's parameters: type \"object\", properties, "
             "required, additionalProperties, $defs and annotations)");
      }
    }
    const ojson* props = nullptr;
    if (p.contains("properties")) {
      props = &p["properties"];
      if (!props->is_object()) fail(what, ": \"properties\" at the root must be an object of schemas, found ", brief(*props));
    }
    std::vector<std::string> names;
    if (props)
      for (auto& [name, sub] : props->items()) names.push_back(name);
    std::vector<char> required(names.size(), 0);
    if (p.contains("required")) {
      const ojson& req = p["required"];
      if (!req.is_array()) fail(what, ": \"required\" at the root must be an array of property names, found ", brief(req));
      for (auto& n : req) {
        auto it = n.is_string() ? std::find(names.begin(), names.end(), n.get<std::string>()) : names.end();
        if (!n.is_string()) fail(what, ": \"required\" at the root must be an array of property names, found ", brief(n));
        if (it == names.end())
          fail(what, ": \"required\" at the root names ", brief(n),
               ", which is not in \"properties\" (required keys must be listed there)");
        required[size_t(it - names.begin())] = 1;
      }
    }
    if (p.contains("additionalProperties")) {
      const ojson& a = p["additionalProperties"];
      if (!a.is_boolean() && !a.is_object())
        fail(what, ": \"additionalProperties\" at the root must be a boolean or a schema, found ", brief(a));
      if (!props && a.is_object() && !a.empty())
        fail(what, ": \"additionalProperties\" at the root: a schema for parameters not listed in \"properties\" is "
             "not supported in a constrained tool call (the tool-call parser reads unlisted parameters as strings); "
             "list the parameters in \"properties\"");
      if (!props && a == false) {
        b_.final(b_.word(header, "</function>\n"));
        return;
      }
    }
    if (!props) {  // {"type": "object"}: any parameters
      free_parameters(header);
      return;
    }
    // Listed properties only (additionalProperties true or a schema: extra parameters are not produced).
    struct Param {
      std::string open;  // "<parameter=KEY>\n"
      int32_t value;     // VALUE "\n</parameter>\n"
      bool required;
    };
    std::vector<Param> ps;
    for (size_t i = 0; i < names.size(); ++i) {
      const std::string& name = names[i];
      const std::string ptr = "/properties/" + ptr_token(name);
      if (name.find('>') != std::string::npos || (!name.empty() && (is_space(name.front()) || is_space(name.back()))))
        fail(what, ": the property name ", brief(ojson(name)), " cannot be spelled in a tool call "
             "(<parameter=KEY>: no '>', no whitespace at either end)");
      ps.push_back({"<parameter=" + name + ">\n", value(sc, (*props)[name], ptr, what), required[i] != 0});
    }
    // As JsonRules::object: at key position k (the next candidate is property k) any of k up to the first required
    // one, or the end when none is left.
    const int n = int(ps.size());
    std::vector<int> next_req(size_t(n + 1), n);
    for (int k = n - 1; k >= 0; --k) next_req[size_t(k)] = ps[size_t(k)].required ? k : next_req[size_t(k + 1)];
    std::vector<int32_t> at(size_t(n + 1), -1);
    at[0] = header;
    for (int k = 0; k <= n; ++k) {
      if (at[size_t(k)] < 0) continue;
      const int32_t K = at[size_t(k)];
      if (next_req[size_t(k)] == n) b_.final(b_.word(K, "</function>\n"));
      const int last = std::min(next_req[size_t(k)], n - 1);
      for (int j = k; j <= last; ++j) {
        if (at[size_t(j + 1)] < 0) at[size_t(j + 1)] = b_.node();
        b_.call(b_.word(K, ps[size_t(j)].open), ps[size_t(j)].value, at[size_t(j + 1)]);
      }
    }
  }

  // The value of one parameter and its end, VALUE "\n</parameter>\n", as tool_param_value will convert it.
  int32_t value(SchemaCompiler& sc, const ojson& s, const std::string& ptr, const std::string& what) {
    const int32_t json_rule = sc.rule(s, ptr);  // checks the schema (errors as json_schema's) and its JSON language
    const std::string t = parser_type(s);
    std::vector<std::string> types;
    if (s.is_object() && s.contains("type"))
      for (auto& x : s["type"].is_array() ? s["type"] : ojson::array({s["type"]})) types.push_back(x.get<std::string>());
    auto has = [&](const char* x) { return std::find(types.begin(), types.end(), x) != types.end(); };
    const bool literal = s.is_object() && (s.contains("enum") || s.contains("const"));
    if (t == "string" || (has("string") && t != "")) {
      // Raw text: converted as a string (type string first), or by another type first in the list with the text
      // itself as the fallback; then "null" would read as null, so it is excluded unless null is allowed.
      if (literal) {
        if (t != "string")
          fail(what, ": \"", s.contains("enum") ? "enum" : "const", "\" at ", at(ptr), " with a type list whose first "
               "type is ", t, " is not supported in a tool call (the parser would convert the strings by ", t, ")");
        std::vector<std::string> texts;
        const ojson values = s.contains("enum") ? s["enum"] : ojson::array({s["const"]});
        for (auto& v : values)
          if (v.is_string() && !(has("null") && null_text(v.get<std::string>()))) texts.push_back(v.get<std::string>());
        if (texts.empty()) fail(what, ": no value of \"", s.contains("enum") ? "enum" : "const", "\" at ", at(ptr),
                                " is a string that a tool call can carry as this type");
        for (auto& x : texts) {
          if (has_tool_tag(x))
            fail(what, ": a value at ", at(ptr), " contains a tool-call tag (", join(kToolTags),
                 ") that would end the parameter's value: ", brief(ojson(x)));
          x += std::string(kValueEnd) + "\n";
        }
        return j_.words(texts, "raw enum at " + at(ptr));
      }
      const int64_t min = s.value("minLength", int64_t(0)), max = s.value("maxLength", int64_t(-1));
      if (t != "string" && s.contains("pattern"))
        fail(what, ": \"pattern\" at ", at(ptr), " with a type list whose first type is ", t, " is not supported "
             "in a tool call (the parser would convert the text by ", t, ")");
      if (t == "string")  // else a format is left an annotation: the text may be a value of the first type
        if (auto d = sc.text_dfa(s, ptr, RegexEncoding::kUtf8)) return raw_matching(*d, min, max, "value at " + at(ptr));
      if ((max >= 0 ? max : min) > kInlineChars)
        fail(what, ": \"", max >= 0 ? "maxLength" : "minLength", "\" at ", at(ptr), " is ", max >= 0 ? max : min,
             "; a string parameter of a tool call supports length bounds up to ", kInlineChars, " characters");
      return raw_value(min, max, t != "string" && !has("null"));
    }
    int32_t r = json_rule;
    if ((t == "integer" || t == "number" || t == "boolean" || t == "object" || t == "array") &&
        std::any_of(types.begin(), types.end(), [&](const std::string& x) { return x != t && x != "null"; })) {
      // The parser converts by the first type only (anything else falls back to the text as a string): that type's
      // values (and null when listed).
      ojson only_first = s;
      only_first["type"] = has("null") ? ojson::array({t, "null"}) : ojson(t);
      r = sc.rule(only_first, ptr);
    }
    const int32_t w = b_.rule("value at " + at(ptr)), after = b_.node();
    b_.call(b_.start(w), r, after);
    b_.final(b_.word(after, std::string(kValueEnd) + "\n"));
    return w;
  }

  // VALUE "\n</parameter>\n" where VALUE is raw text: well-formed UTF-8 without controls other than tab, LF and
  // CR, with no tool-call tag in it, min..max characters (max < 0: unbounded) and, with no_null, not "null" in any
  // case between whitespace. The tag scanner, a character count, the UTF-8 position and a null tracker form its
  // states: (count, scanner, utf8, null tracker, the tracker before the last newline).
  int32_t raw_value(int64_t min, int64_t max, bool no_null) {
    const auto key = std::make_tuple(min, max, no_null);
    if (auto it = raw_.find(key); it != raw_.end()) return it->second;
    const int32_t r = b_.rule("raw value"), exit = b_.node(), end = b_.node();
    b_.on(exit, '\n', end);
    b_.final(end);
    const bool counting = min > 0 || max >= 0;
    const int E = int(kValueEnd.size());
    const int cap = int(max >= 0 ? max + E : min + E);  // counts include the end's characters
    // Null tracker: 0 only whitespace, 1-4 "n" "nu" "nul" "null", 5 "null" and whitespace, 6 anything else.
    auto track = [](int tr, uint8_t c) {
      if (tr == 6) return 6;
      if (is_space(char(c))) return tr == 0 ? 0 : tr >= 4 ? 5 : 6;
      const char l = char(std::tolower(c));
      const char want[] = {'n', 'u', 'l', 'l'};
      return tr < 4 && l == want[tr] ? tr + 1 : 6;
    };
    using S = std::array<int, 5>;
    build_dfa(b_, b_.start(r), S{0, 0, 0, 0, 0}, [&](const S& s, uint8_t c, S& n, int32_t& to) {
      n = s;
      int u = s[2];
      const int k = utf8_step(n[2], c);
      if (k == 0) return 0;
      if (u == 0 && c < 0x20 && c != '\t' && c != '\n' && c != '\r') return 0;
      if (no_null) n[3] = c < 0x80 ? track(s[3], c) : 6;
      if (c >= 0x80) {  // inside or the end of a multi-byte character: no tag, no newline
        n[1] = 0;
        n[4] = 0;
      } else {
        const auto [ac, v] = raw_scan_.next(s[1], c);
        if (v == TagScanner::kTag) return 0;
        n[1] = ac;
        if (no_null && c == '\n') n[4] = s[3];
        if (!raw_scan_.starts_with_newline(ac)) n[4] = 0;
        if (v == TagScanner::kEnd) {
          const int len = s[0] + 1 - E;  // the value's characters (saturated: at least that many)
          if (counting && (len < min || (max >= 0 && len > max))) return 0;
          if (no_null && (s[4] == 4 || s[4] == 5)) return 0;  // s[4]: the tracker before the end's newline
          to = exit;
          return 2;
        }
      }
      if (k == 2 && counting) {
        n[0] = s[0] + 1;
        if (n[0] > cap) {
          if (max >= 0) return 0;
          n[0] = cap;
        }
      }
      return 1;
    });
    raw_[key] = r;
    return r;
  }

  // VALUE "\n</parameter>\n" where VALUE is raw text matching a pattern as a whole (min..max characters), without a
  // tool-call tag or controls other than tab, LF and CR. The pattern's text is its own rule, so where it may go on
  // with a newline the end's newline is followed in parallel.
  int32_t raw_matching(const RegexDfa& d, int64_t min, int64_t max, const std::string& name) {
    const int32_t r = b_.rule(name), text = b_.rule("pattern of the " + name), after = b_.node();
    for (int32_t x : regex_nodes(b_, b_.start(text), d, min, max, &tag_scan_)) b_.final(x);
    b_.call(b_.start(r), text, after);
    b_.final(b_.word(after, std::string(kValueEnd) + "\n"));
    return r;
  }

  // Any parameters: (`<parameter=KEY>\nVALUE\n</parameter>\n`)* `</function>\n`, KEY 1 to 128 characters (UTF-8,
  // no whitespace, controls, '<' or '>'), VALUE raw text (raw_value).
  void free_parameters(int32_t header) {
    b_.final(b_.word(header, "</function>\n"));
    const int32_t gt = b_.node(), nl = b_.node();
    using S = std::array<int, 2>;  // characters read, UTF-8 position
    build_dfa(b_, b_.word(header, "<parameter="), S{0, 0}, [&](const S& s, uint8_t c, S& n, int32_t& to) {
      n = s;
      if (s[1] == 0 && c == '>') {
        if (s[0] == 0) return 0;
        to = gt;
        return 2;
      }
      if (s[1] == 0 && (c <= 0x20 || c == '<' || c == 0x7F)) return 0;
      const int k = utf8_step(n[1], c);
      if (k == 0) return 0;
      if (k == 2 && ++n[0] > 128) return 0;
      return 1;
    });
    b_.on(gt, '\n', nl);
    b_.call(nl, raw_value(0, -1, false), header);
  }

  Builder b_;
  JsonRules j_;
  TagScanner raw_scan_;
  TagScanner tag_scan_;  // tags only (raw_matching: the end is the grammar's, after the pattern's rule)
  std::map<std::tuple<int64_t, int64_t, bool>, int32_t> raw_;
};

// ---------------------------------------------------------------------------------------------------------------
// GBNF / EBNF grammars (grammar_ebnf): each rule of the text a rule here; every node gets the edges of one item at
// most (a sequence chains fresh nodes, alternatives and repetitions are rules of their own, called), so byte edges
// never overlap.

class EbnfCompiler {
 public:
  EbnfCompiler() : b_(own_) {}
  // Rules into another grammar's builder (structural tags' "grammar" format).
  explicit EbnfCompiler(Builder& b) : b_(b) {}

  GrammarPtr compile(const EbnfGrammar& g) { return b_.finish(root(g), "grammar"); }
  // Builds the grammar's rules; returns its "root" rule.
  int32_t root(const EbnfGrammar& g) {
    for (auto& [name, body] : g.rules) {
      rules_[name] = b_.rule("rule '" + name + "'");
      bodies_[name] = &body;
    }
    find_recursive(g);
    for (auto& [name, body] : g.rules) {
      const int32_t end = b_.node();
      b_.final(end);
      into(body, b_.start(rules_.at(name)), end);
    }
    return rules_.at("root");
  }

 private:
  // Spells `e` from node `from` (no byte edges yet) to node `to`.
  void into(const EbnfExpr& e, int32_t from, int32_t to) {
    // A regular part (no rule that can reach itself): one automaton, stepped without calls (a string's characters
    // in a loop: masks as fast as the JSON grammar's own strings instead of ~5x slower through calls).
    // After a few parts too large for one automaton (each refusal costs up to the regex work budget), the rest are
    // rules and calls: a hostile grammar cannot make the compile take long.
    if ((e.kind == EbnfExpr::kRepeat || e.kind == EbnfExpr::kAlt || e.kind == EbnfExpr::kSeq) && regex_refusals_ < 3) {
      std::string re;
      if (regex_of(e, re, 0)) {
        std::optional<RegexDfa> d;
        try {
          d = compile_regex(re);
        } catch (const Error&) {  // too large as one automaton: rules and calls instead
          ++regex_refusals_;
        }
        if (d) return embed(*d, from, to);
      }
    }
    switch (e.kind) {
      case EbnfExpr::kLiteral:
        if (e.text.empty()) return b_.call(from, empty(), to);
        for (size_t k = 0; k + 1 < e.text.size(); ++k) {
          const int32_t n = b_.node();
          b_.on(from, e.text[k], n);
          from = n;
        }
        return b_.on(from, e.text.back(), to);
      case EbnfExpr::kClass: {  // one character: its automaton, compiled once per class text
        auto it = classes_.find(e.text);
        if (it == classes_.end()) it = classes_.emplace(e.text, compile_regex(e.text)).first;
        return embed(it->second, from, to);
      }
      case EbnfExpr::kRef: return b_.call(from, rules_.at(e.text), to);
      case EbnfExpr::kSeq:
        if (e.kids.empty()) return b_.call(from, empty(), to);
        for (size_t k = 0; k < e.kids.size(); ++k) {
          const int32_t n = k + 1 == e.kids.size() ? to : b_.node();
          into(e.kids[k], from, n);
          from = n;
        }
        return;
      case EbnfExpr::kAlt:
        for (auto& k : e.kids) b_.call(from, as_rule(k), to);
        return;
      case EbnfExpr::kRepeat: return b_.call(from, b_.repeat(as_rule(e.kids[0]), e.min, e.max), to);
    }
  }

  // The rules on a cycle of references (recursive: they stay rules).
  void find_recursive(const EbnfGrammar& g) {
    std::map<std::string, std::set<std::string>> refs;
    std::function<void(const EbnfExpr&, std::set<std::string>&)> collect = [&](const EbnfExpr& e, auto& out) {
      if (e.kind == EbnfExpr::kRef) out.insert(e.text);
      for (auto& k : e.kids) collect(k, out);
    };
    for (auto& [name, body] : g.rules) collect(body, refs[name]);
    for (auto& [name, body] : g.rules) {  // name reaches itself?
      std::set<std::string> seen;
      std::vector<std::string> work(refs[name].begin(), refs[name].end());
      while (!work.empty()) {
        const std::string r = work.back();
        work.pop_back();
        if (r == name) {
          recursive_.insert(name);
          break;
        }
        if (seen.insert(r).second) work.insert(work.end(), refs[r].begin(), refs[r].end());
      }
    }
  }

  // `e` as a regular expression (regex.h) when it references no recursive rule (references expanded), within a
  // size budget; false otherwise.
  bool regex_of(const EbnfExpr& e, std::string& out, int depth) {
    if (depth > 32 || out.size() > 65536) return false;
    switch (e.kind) {
      case EbnfExpr::kLiteral: {
        out += "(?:";
        for (size_t i = 0; i < e.text.size();) {  // code points, escaped (the parser made the text UTF-8)
          uint32_t cp = 0;
          const size_t n = text::unicode::utf8_decode(e.text.data() + i, e.text.size() - i, &cp);
          DS_CHECK(n > 0, "grammar: a literal that is not UTF-8");
          char buf[16];
          std::snprintf(buf, sizeof buf, "\\u{%X}", cp);
          out += buf;
          i += n;
        }
        out += ")";
        return true;
      }
      case EbnfExpr::kClass: out += e.text; return true;
      case EbnfExpr::kRef:
        if (recursive_.count(e.text)) return false;
        out += "(?:";
        if (!regex_of(*bodies_.at(e.text), out, depth + 1)) return false;
        out += ")";
        return true;
      case EbnfExpr::kSeq:
        out += "(?:";
        for (auto& k : e.kids)
          if (!regex_of(k, out, depth + 1)) return false;
        out += ")";
        return true;
      case EbnfExpr::kAlt:
        out += "(?:";
        for (size_t i = 0; i < e.kids.size(); ++i) {
          if (i) out += "|";
          if (!regex_of(e.kids[i], out, depth + 1)) return false;
        }
        out += ")";
        return true;
      case EbnfExpr::kRepeat:
        out += "(?:";
        if (!regex_of(e.kids[0], out, depth + 1)) return false;
        out += e.max < 0 ? str_cat("){", e.min, ",}") : str_cat("){", e.min, ",", e.max, "}");
        return true;
    }
    return false;
  }

  // A rule spelling `e` (a reference: the rule itself).
  int32_t as_rule(const EbnfExpr& e) {
    if (e.kind == EbnfExpr::kRef) return rules_.at(e.text);
    const int32_t r = b_.rule("part of the grammar"), end = b_.node();
    b_.final(end);
    into(e, b_.start(r), end);
    return r;
  }

  // The rule of the empty text.
  int32_t empty() {
    if (empty_ < 0) {
      empty_ = b_.rule("empty");
      b_.final(b_.start(empty_));
    }
    return empty_;
  }

  // A regex automaton from `from` to `to`: its final states lead to `to` (by a byte, where nothing can follow them;
  // else through the empty rule).
  void embed(const RegexDfa& d, int32_t from, int32_t to) {
    for (int32_t x : regex_nodes(b_, from, d, 0, -1, nullptr, to)) b_.call(x, empty(), to);
  }

  Builder own_;
  Builder& b_;
  std::map<std::string, int32_t> rules_;
  std::map<std::string, const EbnfExpr*> bodies_;
  std::set<std::string> recursive_;
  std::map<std::string, RegexDfa> classes_;
  int32_t empty_ = -1;
  int regex_refusals_ = 0;
};

// ---------------------------------------------------------------------------------------------------------------
// Structural tags (grammar_structural_tag): xgrammar's format objects (vLLM's structural_tag), each a rule.

// A multi-pattern automaton over bytes (Aho-Corasick, every transition filled in): a state is the longest suffix of
// the text read that is a prefix of a pattern; hit(s) is the longest pattern the text read ends with there (-1: none).
class PatternScanner {
 public:
  explicit PatternScanner(const std::vector<std::string>& pats) {
    add();
    for (size_t p = 0; p < pats.size(); ++p) {
      int32_t s = 0;
      for (unsigned char c : pats[p]) {
        if (go_[size_t(s)][c] < 0) go_[size_t(s)][c] = add();
        s = go_[size_t(s)][c];
      }
      if (hit_[size_t(s)] < 0) hit_[size_t(s)] = int32_t(p);  // a pattern listed twice: its first place
    }
    std::vector<int32_t> fail(go_.size(), 0), queue;
    for (auto& t : go_[0])
      if (t < 0) t = 0;
      else queue.push_back(t);
    for (size_t i = 0; i < queue.size(); ++i) {  // breadth first: a state's fail link is shallower, so done
      const int32_t s = queue[i];
      if (hit_[size_t(s)] < 0) hit_[size_t(s)] = hit_[size_t(fail[size_t(s)])];
      for (int c = 0; c < 256; ++c) {
        int32_t& t = go_[size_t(s)][size_t(c)];
        if (t < 0) {
          t = go_[size_t(fail[size_t(s)])][size_t(c)];
        } else {
          fail[size_t(t)] = s == 0 ? 0 : go_[size_t(fail[size_t(s)])][size_t(c)];
          queue.push_back(t);
        }
      }
    }
  }
  int32_t next(int32_t s, uint8_t c) const { return go_[size_t(s)][c]; }
  int32_t hit(int32_t s) const { return hit_[size_t(s)]; }

 private:
  int32_t add() {
    go_.emplace_back();
    go_.back().fill(-1);
    hit_.push_back(-1);
    return int32_t(go_.size() - 1);
  }
  std::vector<std::array<int32_t, 256>> go_;
  std::vector<int32_t> hit_;
};

constexpr size_t kMaxPatternBytes = 16384;  // a free text's triggers, excludes and ends together
constexpr int kMaxFormatDepth = 64;         // nesting of format objects

class StructuralTagCompiler {
 public:
  StructuralTagCompiler() : j_(b_) {}

  GrammarPtr compile(const ojson& spec) {
    if (!spec.is_object() || (!spec.contains("format") && !spec.contains("structures")))
      fail("structural_tag: expected {\"type\": \"structural_tag\", \"format\": {...}} or the older {\"type\": "
           "\"structural_tag\", \"structures\": [...], \"triggers\": [...]}, found ", brief(spec));
    if (spec.contains("type") && spec["type"] != "structural_tag")
      fail("structural_tag: \"type\" must be \"structural_tag\", found ", brief(spec["type"]));
    if (spec.contains("format")) {
      known(spec, "", {"type", "format"});
      return b_.finish(format(spec["format"], "format", {}, 0), "structural_tag");
    }
    // The older form (vLLM's first structural_tag): tags of {begin, schema, end} and their triggers, as
    // triggered_tags of JSON Schema contents.
    known(spec, "", {"type", "structures", "triggers"});
    const ojson& st = spec["structures"];
    if (!st.is_array() || st.empty())
      fail("structural_tag: \"structures\" must be a non-empty list of {\"begin\", \"schema\", \"end\"}, found ", brief(st));
    ojson tags = ojson::array();
    for (size_t i = 0; i < st.size(); ++i) {
      const std::string p = str_cat("structures[", i, "]");
      known(st[i], p, {"begin", "schema", "end"});
      tags.push_back({{"type", "tag"},
                      {"begin", need(st[i], "begin", p)},
                      {"content", {{"type", "json_schema"}, {"json_schema", need(st[i], "schema", p)}}},
                      {"end", need(st[i], "end", p)}});
    }
    ojson tt = {{"type", "triggered_tags"}, {"triggers", need(spec, "triggers", "")}, {"tags", tags}};
    return b_.finish(format(tt, "structures", {}, 0), "structural_tag");
  }

 private:
  [[noreturn]] void bad(const std::string& ptr, const std::string& expected, const ojson& found) {
    fail("structural_tag: ", ptr.empty() ? "the object" : ptr, " must be ", expected, ", found ", brief(found));
  }
  const ojson& need(const ojson& f, const char* key, const std::string& ptr) {
    if (!f.contains(key)) fail("structural_tag: ", ptr.empty() ? "the object" : ptr, " needs \"", key, "\"");
    return f[key];
  }
  // Unknown fields are refused (a misspelt "stop_after_first" must not be ignored).
  void known(const ojson& f, const std::string& ptr, std::initializer_list<const char*> keys) {
    if (!f.is_object()) bad(ptr, "an object", f);
    for (auto it = f.begin(); it != f.end(); ++it)
      if (std::none_of(keys.begin(), keys.end(), [&](const char* k) { return it.key() == k; })) {
        std::vector<std::string> ks(keys.begin(), keys.end());
        fail("structural_tag: ", ptr.empty() ? "the object" : ptr, " has an unknown field \"", it.key(),
             "\" (expected ", join(ks), ")");
      }
  }
  std::string text(const ojson& v, const std::string& ptr, bool nonempty) {
    if (!v.is_string() || (nonempty && v.get<std::string>().empty()))
      bad(ptr, nonempty ? "a non-empty string" : "a string", v);
    return v.get<std::string>();
  }
  std::vector<std::string> texts(const ojson& f, const char* key, const std::string& ptr, bool required) {
    std::vector<std::string> out;
    if (!f.contains(key) || f[key].is_null()) {
      if (required) need(f, key, ptr);
      return out;
    }
    const ojson& v = f[key];
    const std::string p = ptr + "." + key;
    if (!v.is_array() || (required && v.empty())) bad(p, required ? "a non-empty list of strings" : "a list of strings", v);
    for (size_t i = 0; i < v.size(); ++i) out.push_back(text(v[i], str_cat(p, "[", i, "]"), true));
    return out;
  }
  bool flag(const ojson& f, const char* key, const std::string& ptr) {
    if (!f.contains(key) || f[key].is_null()) return false;
    if (!f[key].is_boolean()) bad(ptr + "." + key, "a boolean", f[key]);
    return f[key].get<bool>();
  }
  int64_t integer(const ojson& f, const char* key, const std::string& ptr, int64_t lo, int64_t hi) {
    const ojson& v = need(f, key, ptr);
    if (!v.is_number_integer() || v.get<int64_t>() < lo || v.get<int64_t>() > hi)
      bad(ptr + "." + key, str_cat("an integer in [", lo, ", ", hi, "]"), v);
    return v.get<int64_t>();
  }

  // A rule spelling s.
  int32_t literal(std::string_view s) {
    const int32_t r = b_.rule("const_string");
    b_.final(b_.word(b_.start(r), s));
    return r;
  }

  // Free text from `start` (a node without edges): well-formed UTF-8 in which none of `pats` occurs, except that the
  // byte completing pattern p (the longest one where several end together) goes to exits[p] instead (-1: refused).
  // Returns the nodes where the text read ends at a character boundary.
  std::vector<int32_t> free_text(int32_t start, const std::vector<std::string>& pats,
                                 const std::vector<int32_t>& exits, const std::string& ptr) {
    size_t bytes = 0;
    for (auto& p : pats) bytes += p.size();
    if (bytes > kMaxPatternBytes)
      fail("structural_tag: ", ptr, ": its triggers, excludes and enclosing ends hold ", bytes,
           " bytes together (at most ", kMaxPatternBytes, ")");
    const PatternScanner scan(pats);
    using S = std::array<int32_t, 2>;  // scanner state, UTF-8 position
    const auto ids = build_dfa(b_, start, S{0, 0}, [&](const S& s, uint8_t c, S& n, int32_t& to) {
      int u = s[1];
      if (utf8_step(u, c) == 0) return 0;
      const int32_t a = scan.next(s[0], c);
      if (const int32_t p = scan.hit(a); p >= 0) {
        if (exits[size_t(p)] < 0) return 0;
        to = exits[size_t(p)];
        return 2;
      }
      n = {a, int32_t(u)};
      return 1;
    });
    std::vector<int32_t> out;
    for (auto& [s, node] : ids)
      if (s[1] == 0) out.push_back(node);
    return out;
  }

  // The rule of format object f at `ptr`. `stops`: the ends of the tag whose content f is (or ends): unlimited
  // contents (any_text, triggered_tags, dispatch) never contain them, so the first one ends the tag.
  int32_t format(const ojson& f, const std::string& ptr, const std::vector<std::string>& stops, int depth) {
    if (depth > kMaxFormatDepth) fail("structural_tag: ", ptr, ": format objects nested more than ", kMaxFormatDepth, " deep");
    if (!f.is_object() || !f.contains("type") || !f["type"].is_string())
      bad(ptr, "a format object {\"type\": \"const_string\" | \"json_schema\" | ...}", f);
    const std::string t = f["type"].get<std::string>();
    if (t == "const_string") {
      known(f, ptr, {"type", "value"});
      return literal(text(need(f, "value", ptr), ptr + ".value", false));
    }
    if (t == "json_schema") return json_schema(f, ptr);
    if (t == "grammar") {
      known(f, ptr, {"type", "grammar"});
      const std::string g = text(need(f, "grammar", ptr), ptr + ".grammar", true);
      try {
        return EbnfCompiler(b_).root(parse_ebnf(g));
      } catch (const Error& e) {
        fail("structural_tag: ", ptr, ".grammar: ", e.what());
      }
    }
    if (t == "regex") {
      known(f, ptr, {"type", "pattern"});
      const std::string pat = text(need(f, "pattern", ptr), ptr + ".pattern", false);
      std::optional<RegexDfa> d;
      try {
        d = compile_regex(pat, RegexEncoding::kUtf8);
      } catch (const Error& e) {
        fail("structural_tag: ", ptr, ".pattern: ", e.what());
      }
      if (!matches_any(*d)) fail("structural_tag: ", ptr, ".pattern matches no text");
      return regex_rule(b_, *d);
    }
    if (t == "any_text") {
      known(f, ptr, {"type", "excludes", "max_tokens", "max_chars"});
      for (const char* k : {"max_tokens", "max_chars"})
        if (f.contains(k) && !f[k].is_null())
          fail("structural_tag: ", ptr, ".", k, " is not supported (an any_text region is bounded only by what ends it)");
      std::vector<std::string> pats = texts(f, "excludes", ptr, false);
      pats.insert(pats.end(), stops.begin(), stops.end());
      const int32_t r = b_.rule("any_text");
      for (int32_t x : free_text(b_.start(r), pats, std::vector<int32_t>(pats.size(), -1), ptr)) b_.final(x);
      return r;
    }
    if (t == "sequence" || t == "or") {
      known(f, ptr, {"type", "elements"});
      const ojson& el = need(f, "elements", ptr);
      if (!el.is_array() || el.empty()) bad(ptr + ".elements", "a non-empty list of format objects", el);
      std::vector<int32_t> rs;
      for (size_t i = 0; i < el.size(); ++i) {
        const bool last = i + 1 == el.size();
        rs.push_back(format(el[i], str_cat(ptr, ".elements[", i, "]"), t == "or" || last ? stops : std::vector<std::string>{},
                            depth + 1));
      }
      if (t == "or") return b_.alternatives(rs, "or");
      const int32_t r = b_.rule("sequence");
      int32_t at = b_.start(r);
      for (int32_t x : rs) {
        const int32_t n = b_.node();
        b_.call(at, x, n);
        at = n;
      }
      b_.final(at);
      return r;
    }
    if (t == "optional" || t == "star" || t == "plus" || t == "repeat") {
      if (t == "repeat") known(f, ptr, {"type", "content", "min", "max"});
      else known(f, ptr, {"type", "content"});
      int64_t min = t == "plus" ? 1 : 0, max = t == "optional" ? 1 : -1;
      if (t == "repeat") {
        min = integer(f, "min", ptr, 0, kMaxCount);
        max = integer(f, "max", ptr, -1, kMaxCount);
        if (max >= 0 && max < min) fail("structural_tag: ", ptr, ": \"max\" (", max, ") is below \"min\" (", min, ")");
      }
      // Only an optional's content can be what ends a tag: a repetition's next copy would follow the stop.
      const int32_t x = format(need(f, "content", ptr), ptr + ".content",
                               t == "optional" ? stops : std::vector<std::string>{}, depth + 1);
      return b_.repeat(x, min, max);
    }
    if (t == "tag") return tag(f, ptr, 0, depth);
    if (t == "triggered_tags") return triggered_tags(f, ptr, stops, depth);
    if (t == "tags_with_separator") {
      known(f, ptr, {"type", "tags", "separator", "at_least_one", "stop_after_first"});
      const int32_t d = tag_list(f, ptr, depth);
      const std::string sep = text(need(f, "separator", ptr), ptr + ".separator", false);
      const int32_t r = b_.rule("tags_with_separator"), s = b_.start(r), n = b_.node();
      if (!flag(f, "at_least_one", ptr)) b_.final(s);
      b_.call(s, d, n);
      b_.final(n);
      if (!flag(f, "stop_after_first", ptr)) b_.call(b_.word(n, sep), d, n);
      return r;
    }
    if (t == "dispatch") return dispatch(f, ptr, stops, depth);
    if (t == "token" || t == "exclude_token" || t == "any_tokens" || t == "token_triggered_tags" || t == "token_dispatch")
      fail("structural_tag: ", ptr, ": the token-level format \"", t, "\" is not supported (this server constrains "
           "text; spell tags as strings)");
    fail("structural_tag: ", ptr, ": unknown format type \"", t, "\" (supported: const_string, json_schema, grammar, "
         "regex, any_text, sequence, or, optional, star, plus, repeat, tag, triggered_tags, tags_with_separator, dispatch)");
  }

  int32_t json_schema(const ojson& f, const std::string& ptr) {
    known(f, ptr, {"type", "json_schema", "style", "any_order"});
    if (f.contains("style") && !f["style"].is_null() && f["style"] != "json")
      fail("structural_tag: ", ptr, ".style ", brief(f["style"]), " is not supported (supported: \"json\"; Qwen's XML "
           "tool calls are constrained through tools and tool_choice)");
    if (flag(f, "any_order", ptr)) fail("structural_tag: ", ptr, ".any_order is not supported (properties come in the "
                                        "schema's order)");
    const ojson& v = need(f, "json_schema", ptr);
    ojson s = v;
    if (v.is_string()) {
      try {
        s = ojson::parse(v.get<std::string>());
      } catch (const ojson::exception&) {
        bad(ptr + ".json_schema", "a JSON Schema (an object, or its JSON text)", v);
      }
    }
    if (!s.is_object() && !s.is_boolean()) bad(ptr + ".json_schema", "a JSON Schema (an object)", v);
    docs_.push_back(std::move(s));
    return SchemaCompiler(docs_.back(), b_, j_, "structural_tag: " + ptr + ".json_schema").rule(docs_.back(), "");
  }

  // begin + content + end, begin from its byte `skip` on (triggered_tags: the trigger was spelled already).
  int32_t tag(const ojson& f, const std::string& ptr, size_t skip, int depth) {
    known(f, ptr, {"type", "begin", "content", "end"});
    const std::string begin = tag_begin(f, ptr);
    const ojson& e = need(f, "end", ptr);
    std::vector<std::string> ends;
    if (e.is_array()) {
      if (e.empty()) bad(ptr + ".end", "a string or a non-empty list of strings", e);
      for (size_t i = 0; i < e.size(); ++i) ends.push_back(end_text(e[i], str_cat(ptr, ".end[", i, "]")));
    } else {
      ends.push_back(end_text(e, ptr + ".end"));
    }
    std::vector<std::string> stops;
    for (auto& s : ends)
      if (!s.empty()) stops.push_back(s);
    const int32_t content = format(need(f, "content", ptr), ptr + ".content", stops, depth + 1);
    const int32_t r = b_.rule("tag"), c = b_.node();
    b_.call(b_.word(b_.start(r), std::string_view(begin).substr(skip)), content, c);
    for (auto& s : ends) b_.final(b_.word(c, s));
    return r;
  }
  std::string tag_begin(const ojson& f, const std::string& ptr) {
    if (f.contains("type") && f["type"] != "tag") bad(ptr + ".type", "\"tag\"", f["type"]);
    const ojson& b = need(f, "begin", ptr);
    if (b.is_object())
      fail("structural_tag: ", ptr, ".begin: token-level delimiters are not supported (spell the tag as a string)");
    return text(b, ptr + ".begin", false);
  }
  std::string end_text(const ojson& v, const std::string& ptr) {
    if (v.is_object())
      fail("structural_tag: ", ptr, ": token-level delimiters are not supported (spell the tag as a string)");
    return text(v, ptr, false);
  }

  // The alternatives of f's "tags" (tags_with_separator).
  int32_t tag_list(const ojson& f, const std::string& ptr, int depth) {
    const ojson& ts = need(f, "tags", ptr);
    if (!ts.is_array() || ts.empty()) bad(ptr + ".tags", "a non-empty list of tag objects", ts);
    std::vector<int32_t> rs;
    for (size_t i = 0; i < ts.size(); ++i) rs.push_back(tag(ts[i], str_cat(ptr, ".tags[", i, "]"), 0, depth + 1));
    return b_.alternatives(rs, "tags");
  }

  // Free text that dispatches at patterns: a rule whose free text (nodes final) goes, at the byte completing
  // pats[k], to a node calling conts[k] (-1: that pattern is refused) and then on with the free text (`loop`) or
  // to the rule's end. Patterns after the routes' are refused (excludes, the enclosing tag's ends).
  int32_t free_dispatch(const std::vector<std::string>& pats, const std::vector<int32_t>& conts, bool loop,
                        const std::string& ptr, int32_t* after_out = nullptr) {
    const int32_t r = b_.rule("free text"), after = b_.node();
    if (loop) {
      const int32_t done = b_.node();
      b_.final(done);
      b_.call(after, r, done);  // a tail call: no frame per tag
    } else {
      b_.final(after);
    }
    std::vector<int32_t> exits(pats.size(), -1);
    for (size_t k = 0; k < conts.size(); ++k)
      if (conts[k] >= 0) {
        exits[k] = b_.node();
        b_.call(exits[k], conts[k], after);
      }
    for (int32_t x : free_text(b_.start(r), pats, exits, ptr)) b_.final(x);
    if (after_out) *after_out = after;
    return r;
  }

  int32_t triggered_tags(const ojson& f, const std::string& ptr, const std::vector<std::string>& stops, int depth) {
    known(f, ptr, {"type", "triggers", "tags", "at_least_one", "stop_after_first", "excludes"});
    const std::vector<std::string> triggers = texts(f, "triggers", ptr, true);
    const ojson& ts = need(f, "tags", ptr);
    if (!ts.is_array() || ts.empty()) bad(ptr + ".tags", "a non-empty list of tag objects", ts);
    // Each tag goes with the shortest trigger its begin starts with: the free text meets that one first.
    std::vector<std::vector<int32_t>> by_trigger(triggers.size());
    for (size_t i = 0; i < ts.size(); ++i) {
      const std::string p = str_cat(ptr, ".tags[", i, "]");
      if (!ts[i].is_object()) bad(p, "a tag object {\"begin\", \"content\", \"end\"}", ts[i]);
      const std::string begin = tag_begin(ts[i], p);
      size_t k = triggers.size();
      for (size_t t = 0; t < triggers.size(); ++t)
        if (begin.rfind(triggers[t], 0) == 0 && (k == triggers.size() || triggers[t].size() < triggers[k].size())) k = t;
      if (k == triggers.size())
        fail("structural_tag: ", p, ".begin ", brief(ojson(begin)), " starts with none of the triggers ",
             brief(f["triggers"]));
      by_trigger[k].push_back(tag(ts[i], p, triggers[k].size(), depth + 1));
    }
    std::vector<int32_t> conts;
    for (auto& rs : by_trigger) conts.push_back(rs.empty() ? -1 : b_.alternatives(rs, "tags"));
    std::vector<std::string> pats = triggers;
    for (auto& x : texts(f, "excludes", ptr, false)) pats.push_back(x);
    pats.insert(pats.end(), stops.begin(), stops.end());
    const bool at_least_one = flag(f, "at_least_one", ptr), first = flag(f, "stop_after_first", ptr);
    int32_t after = -1;
    const int32_t loop = free_dispatch(pats, conts, !first, ptr, &after);
    if (!at_least_one) return loop;
    // At least one: a tag first (no free text before it), then as above from the end of a tag.
    const int32_t r = b_.rule("triggered_tags");
    for (size_t k = 0; k < triggers.size(); ++k)
      if (conts[k] >= 0) b_.call(b_.word(b_.start(r), triggers[k]), conts[k], after);
    return r;
  }

  int32_t dispatch(const ojson& f, const std::string& ptr, const std::vector<std::string>& stops, int depth) {
    known(f, ptr, {"type", "rules", "loop", "excludes"});
    const ojson& rules = need(f, "rules", ptr);
    if (!rules.is_array() || rules.empty()) bad(ptr + ".rules", "a non-empty list of [pattern, format] pairs", rules);
    std::vector<std::string> pats;
    std::vector<int32_t> conts;
    for (size_t i = 0; i < rules.size(); ++i) {
      const std::string p = str_cat(ptr, ".rules[", i, "]");
      if (!rules[i].is_array() || rules[i].size() != 2) bad(p, "a [pattern, format] pair", rules[i]);
      pats.push_back(text(rules[i][0], p + "[0]", true));
      conts.push_back(format(rules[i][1], p + "[1]", {}, depth + 1));
    }
    for (auto& x : texts(f, "excludes", ptr, false)) pats.push_back(x);
    pats.insert(pats.end(), stops.begin(), stops.end());
    const bool loop = !f.contains("loop") || f["loop"].is_null() || flag(f, "loop", ptr);
    return free_dispatch(pats, conts, loop, ptr);
  }

  Builder b_;
  JsonRules j_;
  std::list<ojson> docs_;  // the json_schema documents, alive while their rules are built
};

// ---------------------------------------------------------------------------------------------------------------
// Stepping a position over one byte.

// An open-addressing set of 64-bit keys, cleared in time proportional to its use.
class FlatSet {
 public:
  FlatSet() : slots_(64, kEmpty) {}
  void clear() {
    for (uint32_t i : used_) slots_[i] = kEmpty;
    used_.clear();
  }
  bool insert(uint64_t k) {
    if (used_.size() * 2 >= slots_.size()) grow();
    const size_t mask = slots_.size() - 1;
    for (size_t i = mix(k) & mask;; i = (i + 1) & mask) {
      if (slots_[i] == k) return false;
      if (slots_[i] == kEmpty) {
        slots_[i] = k;
        used_.push_back(uint32_t(i));
        return true;
      }
    }
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t(0);
  static size_t mix(uint64_t k) { return size_t((k * 0x9E3779B97F4A7C15ull) >> 32); }
  void grow() {
    std::vector<uint64_t> keys;
    for (uint32_t i : used_) keys.push_back(slots_[i]);
    slots_.assign(slots_.size() * 2, kEmpty);
    used_.clear();
    for (uint64_t k : keys) insert(k);
  }
  std::vector<uint64_t> slots_;
  std::vector<uint32_t> used_;
};

// The successors of a set of threads over one byte, closed under calls and returns. Threads and frames are
// appended to the caller's vectors, so a caller can undo a step by truncating them (TokenMasker's walk).
class Stepper {
 public:
  explicit Stepper(const Grammar& g) : g_(g) {}

  // The closure of (node, stack) appended to `threads`; returns whether the text is complete there.
  bool start(std::vector<Frame>& frames, std::vector<Thread>& threads, int32_t node, int32_t stack) {
    seen_.clear();
    pushes_.clear();
    bool acc = false;
    close(frames, threads, node, stack, acc);
    return acc;
  }

  // Steps threads[b, e) over byte c, appending the successors; returns whether the text is complete after c.
  // No successor appended and false: c cannot come next.
  bool step(std::vector<Frame>& frames, std::vector<Thread>& threads, size_t b, size_t e, uint8_t c) {
    const size_t out = threads.size();
    if (e - b == 1) {  // the common case: one thread moving inside a string, a number, a literal
      const Thread t = threads[b];
      const int32_t to = g_.next(t.node, c);
      if (to < 0) return false;
      const uint8_t f = g_.nodes[size_t(to)].flags;
      if (f & Grammar::kSimple) {
        threads.push_back({to, t.stack});
        return false;
      }
      if ((f & Grammar::kBytesFinal) && t.stack < 0) {  // free text at top level: the text may end here too
        threads.push_back({to, -1});
        return true;
      }
    }
    seen_.clear();
    pushes_.clear();
    bool acc = false;
    for (size_t i = b; i < e; ++i) {
      const Thread t = threads[i];
      const int32_t to = g_.next(t.node, c);
      if (to >= 0) close(frames, threads, to, t.stack, acc);
    }
    if (threads.size() - out > kMaxThreads) {
      threads.resize(out);
      return false;
    }
    return acc;
  }

 private:
  int32_t push(std::vector<Frame>& frames, int32_t ret, int32_t parent) {
    // Equal frames pushed in one step share an id, so threads that meet again are merged by `seen_`.
    for (auto& p : pushes_)
      if (p[0] == ret && p[1] == parent) return p[2];
    frames.push_back({ret, parent});
    const int32_t id = int32_t(frames.size() - 1);
    if (pushes_.size() < 64) pushes_.push_back({ret, parent, id});
    return id;
  }

  void close(std::vector<Frame>& frames, std::vector<Thread>& threads, int32_t node, int32_t stack, bool& acc) {
    work_.clear();
    work_.push_back({node, stack});
    while (!work_.empty()) {
      const auto [n, st] = work_.back();
      work_.pop_back();
      if (!seen_.insert(uint64_t(uint32_t(n)) << 32 | uint32_t(st))) continue;
      const Grammar::Node& nd = g_.nodes[size_t(n)];
      if (nd.flags & Grammar::kBytes) threads.push_back({n, st});
      for (int32_t i = nd.call_b; i < nd.call_e; ++i) {
        const Grammar::Call& c = g_.calls[size_t(i)];
        const bool tail = g_.nodes[size_t(c.ret)].flags & Grammar::kPureFinal;
        work_.push_back({c.start, tail ? st : push(frames, c.ret, st)});
      }
      if (nd.flags & Grammar::kFinal) {
        if (st < 0) acc = true;
        else work_.push_back({frames[size_t(st)].ret, frames[size_t(st)].parent});
      }
    }
  }

  const Grammar& g_;
  FlatSet seen_;
  std::vector<std::pair<int32_t, int32_t>> work_;
  std::vector<std::array<int32_t, 3>> pushes_;
};

// Threads [b, e) of (frames, threads) in canonical form: sorted by (node, stack contents), duplicates removed,
// only the frames they use, each once.
void canonical(const std::vector<Frame>& frames, const std::vector<Thread>& threads, size_t b, size_t e,
               std::vector<Frame>& out_frames, std::vector<Thread>& out_threads) {
  std::vector<std::vector<int32_t>> seqs;  // node, then the return nodes from the top of the stack down
  for (size_t i = b; i < e; ++i) {
    std::vector<int32_t> s{threads[i].node};
    for (int32_t f = threads[i].stack; f >= 0; f = frames[size_t(f)].parent) s.push_back(frames[size_t(f)].ret);
    seqs.push_back(std::move(s));
  }
  std::sort(seqs.begin(), seqs.end());
  seqs.erase(std::unique(seqs.begin(), seqs.end()), seqs.end());
  out_frames.clear();
  out_threads.clear();
  std::map<std::pair<int32_t, int32_t>, int32_t> ids;
  for (auto& s : seqs) {
    int32_t parent = -1;
    for (size_t j = s.size() - 1; j >= 1; --j) {
      auto [it, added] = ids.emplace(std::make_pair(s[j], parent), int32_t(out_frames.size()));
      if (added) out_frames.push_back({s[j], parent});
      parent = it->second;
    }
    out_threads.push_back({s[0], parent});
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// The grammars.

namespace {
// The last few grammars compiled from request text, by that text: requests that repeat a schema, tools or a pattern
// share the grammar (and so the masks TokenMasker caches for it). One cache per kind of grammar.
class RecentGrammars {
 public:
  template <typename Make>
  GrammarPtr get(const std::string& key, Make&& make) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = recent_.begin(); it != recent_.end(); ++it)
        if (it->first == key) {
          recent_.splice(recent_.begin(), recent_, it);
          return recent_.front().second;
        }
    }
    GrammarPtr g = make();  // outside the lock: compiling may take a while
    std::lock_guard<std::mutex> lock(mu_);
    recent_.emplace_front(key, g);
    if (recent_.size() > kRecent) recent_.pop_back();
    return g;
  }

 private:
  static constexpr size_t kRecent = 32;
  std::mutex mu_;
  std::list<std::pair<std::string, GrammarPtr>> recent_;
};
}  // namespace

GrammarPtr grammar_json_object(bool compact) {
  auto make = [](bool c) {
    Builder b;
    JsonRules j(b, false, c);
    return b.finish(j.object(1), "json_object");
  };
  static const GrammarPtr g = make(false), gc = make(true);
  return compact ? gc : g;
}

GrammarPtr grammar_json_schema(const nlohmann::ordered_json& schema, bool compact) {
  static RecentGrammars recent;
  return recent.get((compact ? "c" : "w") + schema.dump(-1, ' ', false, ojson::error_handler_t::replace), [&] {
    Builder b;
    JsonRules j(b, false, compact);
    return SchemaCompiler(schema, b, j).compile();
  });
}

GrammarPtr grammar_json_schema(const nlohmann::json& schema, bool compact) {
  return grammar_json_schema(ojson(schema), compact);
}

GrammarPtr grammar_tool_call(const nlohmann::ordered_json& tools, const std::string& only, bool strict_only) {
  static RecentGrammars recent;
  const std::string key = std::string(strict_only ? "s" : "a") + only + '\0' +
                          tools.dump(-1, ' ', false, ojson::error_handler_t::replace);
  return recent.get(key, [&] { return ToolCallCompiler().compile(tools, only, strict_only); });
}

GrammarPtr grammar_regex(std::string_view pattern) {
  static RecentGrammars recent;
  return recent.get(std::string(pattern), [&] {
    const RegexDfa d = compile_regex(pattern, RegexEncoding::kUtf8);
    if (!matches_any(d)) fail("regex: the pattern matches no text (an empty class such as [^\\s\\S]?)");
    Builder b;
    return b.finish(regex_rule(b, d), "regex");
  });
}

GrammarPtr grammar_ebnf(std::string_view text) {
  static RecentGrammars recent;
  return recent.get(std::string(text), [&] { return EbnfCompiler().compile(parse_ebnf(text)); });
}

GrammarPtr grammar_structural_tag(const nlohmann::ordered_json& spec) {
  static RecentGrammars recent;
  return recent.get(spec.dump(-1, ' ', false, ojson::error_handler_t::replace),
                    [&] { return StructuralTagCompiler().compile(spec); });
}

GrammarPtr grammar_choice(const std::vector<std::string>& choices) {
  if (choices.empty()) fail("choice: expected at least one string, found an empty list");
  Builder b;
  JsonRules j(b);
  return b.finish(j.words(choices, "choice"), "choice");
}

// ---------------------------------------------------------------------------------------------------------------
// Matcher.

Matcher::Matcher(GrammarPtr g) : g_(std::move(g)) {
  DS_CHECK(g_, "Matcher: no grammar");
  std::vector<Frame> frames;
  std::vector<Thread> threads;
  Stepper st(*g_);
  accepting_ = st.start(frames, threads, g_->root, -1);
  canonical(frames, threads, 0, threads.size(), frames_, threads_);
}

bool Matcher::advance(std::string_view bytes) {
  if (bytes.empty()) return true;
  std::vector<Frame> frames = frames_;
  std::vector<Thread> threads = threads_;
  Stepper st(*g_);
  size_t b = 0, e = threads.size();
  bool acc = false;
  for (char ch : bytes) {
    acc = st.step(frames, threads, b, e, uint8_t(ch));
    if (threads.size() == e && !acc) return false;
    b = e;
    e = threads.size();
    if (b > 4096) {  // a long text: drop the spent ranges so the buffer stays small
      threads.erase(threads.begin(), threads.begin() + std::ptrdiff_t(b));
      e -= b;
      b = 0;
    }
  }
  canonical(frames, threads, b, e, frames_, threads_);
  accepting_ = acc;
  return true;
}

std::string Matcher::state_key() const {
  std::string k;
  auto put = [&](int32_t v) { k.append(reinterpret_cast<const char*>(&v), sizeof v); };
  put(accepting_ ? 1 : 0);
  for (const Thread& t : threads_) {
    put(t.node);
    for (int32_t f = t.stack; f >= 0; f = frames_[size_t(f)].parent) put(frames_[size_t(f)].ret);
    put(-1);
  }
  return k;
}

// ---------------------------------------------------------------------------------------------------------------
// TokenMasker.

TokenMasker::TokenMasker(std::vector<std::string> token_bytes, size_t cache_bytes) : tokens_(std::move(token_bytes)) {
  DS_CHECK(tokens_.size() < size_t(INT32_MAX), "TokenMasker: vocabulary too large");
  std::vector<int32_t> order;
  for (size_t i = 0; i < tokens_.size(); ++i)
    if (!tokens_[i].empty()) order.push_back(int32_t(i));
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return tokens_[size_t(a)] < tokens_[size_t(b)]; });
  // Preorder trie from the sorted strings: each one adds nodes for the bytes past its common prefix with the one
  // before; equal strings end at the same node.
  byte_.push_back(0);
  depth_.push_back(0);
  std::vector<int32_t> path{0};                   // path[d]: the node of the current string's prefix of length d
  std::vector<std::pair<int32_t, int32_t>> ends;  // (node, token), nodes non-decreasing
  std::string_view prev;
  for (int32_t id : order) {
    const std::string& t = tokens_[size_t(id)];
    if (t.size() > 65535) fail("TokenMasker: token ", id, " is ", t.size(), " bytes long (at most 65535)");
    size_t l = 0;
    while (l < prev.size() && l < t.size() && prev[l] == t[l]) ++l;
    path.resize(l + 1);
    for (size_t d = l; d < t.size(); ++d) {
      path.push_back(int32_t(byte_.size()));
      byte_.push_back(uint8_t(t[d]));
      depth_.push_back(uint16_t(d + 1));
    }
    ends.push_back({path[t.size()], id});
    max_depth_ = std::max(max_depth_, int32_t(t.size()));
    prev = t;
  }
  const size_t n = byte_.size();
  tok_off_.assign(n + 1, 0);
  for (auto& [node, id] : ends) ++tok_off_[size_t(node) + 1];
  for (size_t i = 0; i < n; ++i) tok_off_[i + 1] += tok_off_[i];
  for (auto& [node, id] : ends) tok_ids_.push_back(id);  // already in node order
  // skip_[i]: the first node after i's subtree (the next node not deeper than i).
  skip_.assign(n, int32_t(n));
  std::vector<int32_t> open;
  for (size_t i = 0; i < n; ++i) {
    while (!open.empty() && depth_[size_t(open.back())] >= depth_[i]) skip_[size_t(open.back())] = int32_t(i), open.pop_back();
    open.push_back(int32_t(i));
  }
  const size_t words = (tokens_.size() + 31) / 32;
  cache_capacity_ = cache_bytes / (words * 4 + 256);
}

void TokenMasker::walk(const Matcher& m, uint32_t* bits) const {
  const Grammar& g = *m.grammar();
  Stepper st(g);
  std::vector<Frame> frames = m.frames_;
  std::vector<Thread> threads = m.threads_;
  threads.reserve(threads.size() * size_t(max_depth_ + 1) + 1024);
  struct Level {
    size_t tb, te, nf;  // the level's threads [tb, te) and the frames it may use
  };
  std::vector<Level> lv(size_t(max_depth_ + 1));
  lv[0] = {0, threads.size(), frames.size()};
  const int32_t n = int32_t(byte_.size());
  for (int32_t i = 1; i < n;) {
    const Level p = lv[depth_[size_t(i)] - 1u];
    threads.resize(p.te);  // back to the parent's position (shrinking only)
    frames.resize(p.nf);
    const bool acc = st.step(frames, threads, p.tb, p.te, byte_[size_t(i)]);
    const size_t te = threads.size();
    if (te == p.te && !acc) {  // this prefix cannot come next: nor can any token below it
      i = skip_[size_t(i)];
      continue;
    }
    for (int32_t k = tok_off_[size_t(i)]; k < tok_off_[size_t(i) + 1]; ++k)
      bits[tok_ids_[size_t(k)] >> 5] |= 1u << (tok_ids_[size_t(k)] & 31);
    if (te == p.te) {  // complete and nothing can follow
      i = skip_[size_t(i)];
      continue;
    }
    lv[depth_[size_t(i)]] = {p.te, te, frames.size()};
    ++i;
  }
}

void TokenMasker::allowed_uncached(const Matcher& m, std::vector<uint32_t>& bits) const {
  bits.assign((tokens_.size() + 31) / 32, 0);
  if (m.can_continue()) walk(m, bits.data());
}

void TokenMasker::allowed(const Matcher& m, std::vector<uint32_t>& bits) const {
  if (cache_capacity_ == 0 || !m.can_continue()) return allowed_uncached(m, bits);
  const uint64_t gid = m.grammar()->id;
  std::string key(reinterpret_cast<const char*>(&gid), sizeof gid);
  key += m.state_key();
  Mask hit;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (auto it = index_.find(key); it != index_.end()) {
      lru_.splice(lru_.begin(), lru_, it->second);
      hit = it->second->second;
      ++hits_;
    } else {
      ++misses_;
    }
  }
  if (hit) {
    bits = *hit;
    return;
  }
  allowed_uncached(m, bits);
  auto mask = std::make_shared<const std::vector<uint32_t>>(bits);
  std::lock_guard<std::mutex> lock(mu_);
  if (index_.count(key)) return;  // another thread got there first
  lru_.emplace_front(key, std::move(mask));
  index_[key] = lru_.begin();
  while (lru_.size() > cache_capacity_) {
    index_.erase(lru_.back().first);
    lru_.pop_back();
  }
}

TokenMasker::CacheStats TokenMasker::cache_stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return {hits_, misses_, lru_.size()};
}

}  // namespace ds::sampling
