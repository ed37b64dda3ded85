// CPU reference sampler. The order of processing follows vLLM's V1 sampler so that the same request gives
// the same distribution here and there: logit_bias → penalties → (greedy) → temperature → min_p → top_k →
// top_p → draw. Logprobs describe the model's raw distribution (vLLM's default `raw_logprobs` mode).
#include "sampling/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

#include "backend/cpu/cpu_backend.h"
#include "core/status.h"

namespace ds::sampling {
namespace {

uint64_t seed_of(const SamplingParams& p) {
  if (p.seed) return *p.seed;
  std::random_device rd;
  return (uint64_t(rd()) << 32) ^ uint64_t(rd());
}

}  // namespace

void set_logprobs(const float* row, int32_t chosen, int32_t k, TokenLogprob& lp) {
  lp.token = chosen;
  lp.logprob = row[0];
  lp.top.clear();
  for (int32_t j = 0; j < k; ++j) lp.top.push_back({int32_t(row[1 + 2 * j]), row[2 + 2 * j]});
}

namespace {

// Raw log-softmax over ids [0, n): the chosen token and the top `k` alternatives (cpu::row_logprobs, the
// specification Backend::row_logprobs shares).
void fill_logprobs(const float* logits, int64_t n, int32_t chosen, int32_t k, TokenLogprob& lp) {
  k = int32_t(std::min<int64_t>(std::max(k, 0), n));
  std::vector<float> out(size_t(1 + 2 * k));
  cpu::row_logprobs(logits, n, chosen, k, out.data());
  set_logprobs(out.data(), chosen, k, lp);
}

// The row parameters without the uniform and the edit range.
SampleRowParams row_of(const SamplingParams& p) {
  SampleRowParams r;
  r.greedy = is_greedy(p) ? 1 : 0;
  r.inv_temperature = r.greedy ? 1.f : 1.f / p.temperature;
  r.top_k = p.top_k > 0 ? p.top_k : 0;
  r.top_p = p.top_p;
  r.log_min_p = p.min_p > 0.f ? float(std::log(double(p.min_p))) : -std::numeric_limits<float>::infinity();
  r.repetition_penalty = p.repetition_penalty;
  r.presence_penalty = p.presence_penalty;
  r.frequency_penalty = p.frequency_penalty;
  return r;
}

}  // namespace

SeqSampler::SeqSampler(const SamplingParams& p, const std::vector<int32_t>& prompt) : params(p), seed(seed_of(p)) {
  for (int32_t t : prompt) prompt_tokens[t] = true;
  for (int32_t id : p.allowed_ids)
    if (id >= 0) {
      if (size_t(id) / 32 >= allowed_bits.size()) allowed_bits.resize(size_t(id) / 32 + 1, 0u);
      allowed_bits[size_t(id) / 32] |= 1u << (id % 32);
    }
  DS_CHECK(!p.grammar || p.masker, "structured output: a grammar without the vocabulary's token masker");
  thinking = p.think_end >= 0;
  if (!thinking) engage_at_start();
}

void SeqSampler::engage_at_start() {
  if (!params.grammar || params.grammar_lazy) return;
  ++grammar_version;
  matcher.emplace(params.grammar);
  if (!matcher->advance(params.grammar_prefix))
    fail("structured output: the grammar's prefix \"", params.grammar_prefix, "\" does not start a text of its language");
}

namespace {

// grammar_mask() from its inputs (a sequence's own, or a MaskAhead's copy of them).
bool grammar_mask_of(const Matcher* matcher, bool closed, const TokenMasker& masker, int32_t grammar_close,
                     int32_t grammar_trigger, SamplingParams::AfterClose after_close,
                     const std::vector<int32_t>& end_ids, std::vector<uint32_t>& bits) {
  auto allow = [&](int32_t id) {
    if (id >= 0 && size_t(id) / 32 < bits.size()) bits[size_t(id) / 32] |= 1u << (id % 32);
  };
  if (matcher) {
    masker.allowed(*matcher, bits);
    if (matcher->accepting()) {
      if (grammar_close >= 0) allow(grammar_close);
      else
        for (int32_t e : end_ids) allow(e);
    }
    return true;
  }
  if (!closed || after_close == SamplingParams::AfterClose::kFree) return false;
  bits.assign(size_t(masker.vocab() + 31) / 32, 0);
  for (int32_t e : end_ids) allow(e);
  if (after_close == SamplingParams::AfterClose::kCallOrEnd) allow(grammar_trigger);
  return true;
}

}  // namespace

bool SeqSampler::grammar_mask(std::vector<uint32_t>& bits) const {
  if (!grammar_masked()) return false;
  return grammar_mask_of(matcher ? &*matcher : nullptr, closed, *params.masker, params.grammar_close,
                         params.grammar_trigger, params.after_close, params.end_ids, bits);
}

MaskAhead mask_ahead(const SeqSampler& s) {
  MaskAhead a;
  a.version = s.grammar_version;
  if (!s.grammar_masked()) {  // nothing to compute: the answer is already known
    a.done = true;
    return a;
  }
  a.matcher = s.matcher;
  a.closed = s.closed;
  a.masker = s.params.masker;
  a.grammar_close = s.params.grammar_close;
  a.grammar_trigger = s.params.grammar_trigger;
  a.after_close = s.params.after_close;
  a.end_ids = s.params.end_ids;
  return a;
}

void for_each_draft_prefix(SeqSampler& s, const int32_t* drafts, int64_t k,
                           const std::function<void(int64_t j, bool reached)>& f) {
  const SeqSampler::Mark mark = s.mark();
  std::vector<int32_t> tried;
  bool reached = true;
  for (int64_t j = 0; j <= k; ++j) {
    f(j, reached);
    if (j == k || !reached) continue;
    tried.push_back(drafts[j]);
    try {
      s.accept(drafts[j]);
    } catch (const std::exception&) {
      reached = false;
    }
  }
  if (!tried.empty()) s.undo(mark, tried);
}

MaskKind row_mask(const SeqSampler& s, const MaskAhead* ahead, int64_t n, std::vector<uint32_t>& bits) {
  bits.clear();
  bool grammar;
  if (ahead && ahead->done && ahead->version == s.grammar_version) {  // made for this very position
    if (ahead->error) std::rethrow_exception(ahead->error);
    grammar = ahead->constrained;
    if (grammar) bits = ahead->bits;
  } else {
    grammar = s.grammar_mask(bits);
  }
  const std::vector<int32_t>& allowed = s.params.allowed_ids;
  if (!grammar && allowed.empty()) return MaskKind::kNone;
  const size_t W = size_t(mask_words(n));
  if (grammar) {
    bits.resize(W, 0u);  // ids past the grammar's vocabulary: forbidden
  } else {
    bits.assign(W, ~0u);
  }
  if (!allowed.empty())  // allowed_token_ids: everything else forbidden (over a grammar's mask too)
    for (size_t w = 0; w < W; ++w) bits[w] &= w < s.allowed_bits.size() ? s.allowed_bits[w] : 0u;
  return grammar ? MaskKind::kGrammar : MaskKind::kAllowed;
}

MaskKind mask_kind(const SeqSampler& s) {
  return s.grammar_masked() ? MaskKind::kGrammar : !s.params.allowed_ids.empty() ? MaskKind::kAllowed : MaskKind::kNone;
}

const char* nothing_left(MaskKind k) {
  switch (k) {
    case MaskKind::kGrammar: return "structured output: no token the grammar allows is left to sample";
    case MaskKind::kAllowed: return "allowed_token_ids: none of them is left to sample";
    default: return "no token left to sample (every logit is -inf or NaN after logit_bias)";
  }
}

void MaskAhead::compute() {
  if (done) return;
  try {
    constrained = grammar_mask_of(matcher ? &*matcher : nullptr, closed, *masker, grammar_close, grammar_trigger,
                                  after_close, end_ids, bits);
  } catch (...) {
    error = std::current_exception();
  }
  done = true;
}

int64_t SeqSampler::budget_left() const {
  if (!thinking || params.thinking_budget < 0) return INT64_MAX;
  return std::max<int64_t>(0, params.thinking_budget - reasoning);
}

void SeqSampler::accept(int32_t token) {
  ++grammar_version;
  ++generated_counts[token];
  ++generated;
  if (!params.bad_words.empty()) history.push_back(token);
  if (thinking) {
    if (token == params.think_end) {
      thinking = false;
      closed_at = generated - 1;
      engage_at_start();
    } else {
      ++reasoning;
    }
    return;
  }
  const bool end = std::find(params.end_ids.begin(), params.end_ids.end(), token) != params.end_ids.end();
  if (matcher) {
    if (params.grammar_close >= 0 && token == params.grammar_close) {
      if (!matcher->accepting())
        fail("structured output: the closing token ", token, " came before the grammar's text was complete");
      matcher.reset();
      closed = true;
      return;
    }
    if (end && params.grammar_close < 0) return;
    // A token without bytes (a special or added token) spells nothing, so it never continues a grammar's text.
    if (token < 0 || token >= params.masker->vocab() || params.masker->token_bytes(token).empty() ||
        !matcher->advance(params.masker->token_bytes(token)))
      fail("structured output: token ", token, " does not continue the grammar");
    return;
  }
  if (!params.grammar) return;
  const bool trigger = params.grammar_trigger >= 0 && token == params.grammar_trigger;
  if (closed && params.after_close != SamplingParams::AfterClose::kFree && !end &&
      !(trigger && params.after_close == SamplingParams::AfterClose::kCallOrEnd))
    fail("structured output: token ", token, " after the grammar's closing token, where only ",
         params.after_close == SamplingParams::AfterClose::kEnd ? "an end" : "another call or an end", " may come");
  if (trigger) {
    matcher.emplace(params.grammar);
    closed = false;
  }
}

SeqSampler::Mark SeqSampler::mark() const {
  return {matcher, closed, thinking, reasoning, closed_at, generated, history.size(), grammar_version};
}

void SeqSampler::undo(const Mark& m, const std::vector<int32_t>& tokens) {
  grammar_version = m.grammar_version;
  for (int32_t t : tokens) {
    auto it = generated_counts.find(t);
    if (it != generated_counts.end() && --it->second <= 0) generated_counts.erase(it);
  }
  matcher = m.matcher;
  closed = m.closed;
  thinking = m.thinking;
  reasoning = m.reasoning;
  closed_at = m.closed_at;
  generated = m.generated;
  history.resize(m.history);
}

void collect_edits(const SeqSampler& s, std::vector<SampleEdit>& out) {
  const SamplingParams& p = s.params;
  std::unordered_map<int32_t, SampleEdit> m;
  auto at = [&](int32_t t) -> SampleEdit& {
    SampleEdit& e = m[t];
    e.id = t;
    return e;
  };
  for (auto& [t, b] : p.logit_bias) at(t).bias += b;  // repeated ids: their biases summed in list order
  if (p.repetition_penalty != 1.f) {
    for (auto& [t, _] : s.prompt_tokens) at(t).repeated = 1;
    for (auto& [t, _] : s.generated_counts) at(t).repeated = 1;
  }
  if (p.presence_penalty != 0.f || p.frequency_penalty != 0.f)
    for (auto& [t, c] : s.generated_counts)
      if (c > 0) at(t).count = c;
  const float ninf = -std::numeric_limits<float>::infinity();
  if (s.generated < p.min_tokens)  // min_tokens: no end before it (a bias of -inf, on either sampling path)
    for (int32_t t : p.end_ids) at(t).bias = ninf;
  for (const auto& w : p.bad_words) {  // the last token of a bad word whose other tokens end the output
    if (w.empty() || w.size() - 1 > s.history.size()) continue;
    if (std::equal(w.begin(), w.end() - 1, s.history.end() - std::ptrdiff_t(w.size() - 1))) at(w.back()).bias = ninf;
  }
  const size_t first = out.size();
  for (auto& [t, e] : m) out.push_back(e);
  std::sort(out.begin() + std::ptrdiff_t(first), out.end(),
            [](const SampleEdit& a, const SampleEdit& b) { return a.id < b.id; });
}

SampleRowParams next_row(SeqSampler& s, std::vector<SampleEdit>& edits) {
  SampleRowParams r = row_of(s.params);
  r.edit_begin = int32_t(edits.size());
  collect_edits(s, edits);
  r.edit_count = int32_t(edits.size()) - r.edit_begin;
  if (!r.greedy) r.u = s.next_uniform();
  return r;
}

void check_params(const SamplingParams& p, int64_t vocab) {
  if (!(p.temperature >= 0.f) || !std::isfinite(p.temperature))
    fail("temperature: expected a finite value >= 0, found ", p.temperature);
  if (!(p.top_p > 0.f && p.top_p <= 1.f)) fail("top_p: expected a value in (0, 1], found ", p.top_p);
  if (p.top_k < -1) fail("top_k: expected -1 or 0 (off) or a positive count, found ", p.top_k);
  if (!(p.min_p >= 0.f && p.min_p <= 1.f)) fail("min_p: expected a value in [0, 1], found ", p.min_p);
  if (!(p.repetition_penalty > 0.f) || !std::isfinite(p.repetition_penalty))
    fail("repetition_penalty: expected a finite value > 0, found ", p.repetition_penalty);
  if (!std::isfinite(p.presence_penalty)) fail("presence_penalty: expected a finite value, found ", p.presence_penalty);
  if (!std::isfinite(p.frequency_penalty))
    fail("frequency_penalty: expected a finite value, found ", p.frequency_penalty);
  for (auto& [t, b] : p.logit_bias) {
    if (t < 0 || t >= vocab) fail("logit_bias: token id ", t, " is outside the vocabulary [0, ", vocab, ")");
    if (std::isnan(b)) fail("logit_bias: bias of token ", t, " is NaN");
  }
  for (int32_t t : p.allowed_ids)
    if (t < 0 || t >= vocab) fail("allowed_token_ids: token id ", t, " is outside the vocabulary [0, ", vocab, ")");
  for (const auto& w : p.bad_words)
    for (int32_t t : w)
      if (t < 0 || t >= vocab) fail("bad_words: token id ", t, " is outside the vocabulary [0, ", vocab, ")");
  if (p.logprobs < -1 || p.logprobs > vocab)
    fail("logprobs: expected -1 (off) or 0..", vocab, ", found ", p.logprobs);
}

void apply_bias_and_penalties(float* x, int64_t n, const SeqSampler& s) {
  std::vector<SampleEdit> edits;
  collect_edits(s, edits);
  const SampleRowParams r = row_of(s.params);
  for (const SampleEdit& e : edits)
    if (e.id >= 0 && e.id < n) x[e.id] = edit_logit(x[e.id], e, r);
}

int32_t sample(const float* logits, int64_t V, int64_t vocab_limit, SeqSampler& s, TokenLogprob* lp,
               const MaskAhead* ahead) {
  const int64_t n = vocab_limit > 0 ? std::min(vocab_limit, V) : V;  // ids >= n are never produced
  DS_CHECK(n > 0, "empty vocabulary");
  if (const int32_t f = s.forced(); f >= 0) {  // the thinking budget is spent: think_end, no draw
    if (f >= n) fail("thinking budget: the end-of-thinking id ", f, " is outside the vocabulary");
    if (lp && s.params.logprobs >= 0) fill_logprobs(logits, n, f, s.params.logprobs, *lp);
    return f;
  }
  std::vector<SampleEdit> edits;
  const SampleRowParams r = next_row(s, edits);
  std::vector<uint32_t> bits;  // a constrained row: the ids it may sample
  const MaskKind kind = row_mask(s, ahead, n, bits);
  const int32_t tok = cpu::sample_row(logits, n, r, edits.data(), int64_t(edits.size()),
                                      kind != MaskKind::kNone ? bits.data() : nullptr);
  if (tok < 0) fail(nothing_left(kind));
  if (lp && s.params.logprobs >= 0) fill_logprobs(logits, n, tok, s.params.logprobs, *lp);
  return tok;
}

int32_t verify_draft(const float* logits, int64_t V, int64_t vocab_limit, SeqSampler& s, int32_t draft,
                     const float* draft_probs, bool* accepted, TokenLogprob* lp, const MaskAhead* ahead) {
  const SamplingParams& p = s.params;
  const int64_t n = vocab_limit > 0 ? std::min(vocab_limit, V) : V;
  DS_CHECK(n > 0, "empty vocabulary");
  std::vector<SampleEdit> edits;
  collect_edits(s, edits);
  const SampleRowParams r = row_of(p);
  // A mask (a grammar's position, the accepted drafts included; allowed_token_ids): the ids it forbids at -inf, as
  // sample() does; a draft it forbids has p = 0 and is rejected.
  std::vector<uint32_t> bits;
  const MaskKind kind = row_mask(s, ahead, n, bits);
  std::vector<float> z;  // what sample() filters and draws from
  cpu::sample_values(logits, n, r, edits.data(), int64_t(edits.size()), z,
                     kind != MaskKind::kNone ? bits.data() : nullptr);

  int32_t tok = -1;
  bool acc = false;
  if (r.greedy) {
    // Greedy target: p is one-hot at the argmax, so the rule reduces to "accept iff equal" and uses no RNG.
    tok = cpu::sample_argmax(z.data(), n);
    if (kind != MaskKind::kNone && !(z[size_t(tok)] > -std::numeric_limits<float>::infinity()))
      fail(nothing_left(kind));
    acc = tok == draft;
  } else {
    cpu::SampleSet c;  // p = c.w / c.total over c.ids, exactly sample()'s distribution
    if (!cpu::sample_filter(z.data(), n, r, c)) fail(nothing_left(kind));
    // Leviathan et al., as Backend::sample_rows verifies a deterministic draft (cpu::sample_verify): u for the test,
    // the next uniform drawn only where the draft is rejected.
    const float u = s.next_uniform();
    tok = cpu::sample_verify(c, draft, draft_probs, u, uniform_at(s.seed, s.draws), &acc);
    if (!acc) ++s.draws;
  }
  if (accepted) *accepted = acc;
  if (lp && p.logprobs >= 0) fill_logprobs(logits, n, tok, p.logprobs, *lp);
  return tok;
}

int32_t draft_argmax(const float* logits, int64_t V, int64_t vocab_limit) {
  const int64_t n = vocab_limit > 0 ? std::min(vocab_limit, V) : V;
  return cpu::sample_argmax(logits, n);
}

}  // namespace ds::sampling
