// Turning a row of logits into the next token: temperature, top-k, top-p, min-p, penalties, logit bias,
// seeded randomness, logprobs. The arithmetic is Backend::sample_rows' (backend/cpu/sample.cpp on the host, the
// CUDA kernel on the device): the same request draws the same uniforms and tokens on either path.
#pragma once
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "backend/sample_math.h"
#include "sampling/grammar.h"

namespace ds::sampling {

// Set by the server from the request (OpenAI / vLLM semantics).
struct SamplingParams {
  float temperature = 1.0f;       // 0 = greedy
  float top_p = 1.0f;             // 1 = off
  int32_t top_k = 0;              // 0 or -1 = off
  float min_p = 0.0f;             // 0 = off
  float presence_penalty = 0.0f;  // OpenAI: subtract once per token already generated
  float frequency_penalty = 0.0f; // OpenAI: subtract × count of generated occurrences
  float repetition_penalty = 1.0f;// vLLM/HF: divide positive / multiply negative logits of prompt+generated tokens
  std::optional<uint64_t> seed;   // same seed, same prompt, same params -> same output
  std::vector<std::pair<int32_t, float>> logit_bias;  // added to the raw logits
  int32_t logprobs = -1;          // -1: none; 0: the chosen token's logprob; n: plus the top-n alternatives
  // The prompt opened a think block (thinking on) that this id closes (</think>); -1: no open block. Structured
  // output applies after it, a thinking budget before it.
  int32_t think_end = -1;
  // vLLM's thinking_token_budget: with think_end, at most this many tokens of reasoning, then think_end is forced.
  // -1: no budget.
  int64_t thinking_budget = -1;
  // vLLM's min_tokens: the end ids cannot be sampled before this many tokens have been generated.
  int64_t min_tokens = 0;
  // vLLM's allowed_token_ids: only these ids may be sampled (empty: no restriction). Host sampling.
  std::vector<int32_t> allowed_ids;
  // vLLM's bad_words as token sequences (the server tokenizes each word with and without a leading space): the last
  // token of a sequence is banned where the generated tokens end with the rest of it (a one-token word: always).
  std::vector<std::vector<int32_t>> bad_words;
  // Structured output (docs/server.md "Structured outputs"): the tokens (after think_end when it is set) must spell
  // a string of the grammar's language, then one of `end_ids`, which are allowed only where that string is complete.
  GrammarPtr grammar;                          // null: unconstrained
  std::shared_ptr<const TokenMasker> masker;   // the vocabulary as byte strings (required with grammar)
  std::vector<int32_t> end_ids;                // set by the engine: its EOS set (unless ignore_eos), stop_token_ids
  // A grammar for one block at a time, engaged and released by tokens (tool calls: docs/server.md "Constrained tool
  // calls"). The matcher is engaged at the start (after think_end when it is set) unless grammar_lazy; accepting
  // grammar_trigger outside reasoning while it is not engaged engages a fresh one; where its text is complete the
  // only end allowed is grammar_close (not end_ids), and accepting that releases it (the trigger re-arms).
  int32_t grammar_trigger = -1;  // -1: none
  int32_t grammar_close = -1;    // -1: the end ids end the grammar's text, and the output (structured output)
  bool grammar_lazy = false;     // engaged only by the trigger
  std::string grammar_prefix;    // bytes the matcher advances over when it engages at the start (forced prompt text)
  // After grammar_close: free text (kFree), only the trigger or an end id (kCallOrEnd: another call or the end), or
  // only an end id (kEnd).
  enum class AfterClose : uint8_t { kFree, kCallOrEnd, kEnd };
  AfterClose after_close = AfterClose::kFree;
};

struct TokenLogprob {
  int32_t token = -1;
  float logprob = 0.f;                             // of the chosen token, from the raw (unprocessed) distribution
  int32_t rank = 0;                                // prompt logprobs: ids whose logit is >= the token's (vLLM's rank, >= 1); 0: unset
  std::vector<std::pair<int32_t, float>> top;      // top-n (token, logprob), most likely first
};

// Per-sequence sampling state: the random stream and the token counts penalties need.
struct SeqSampler {
  explicit SeqSampler(const SamplingParams& p, const std::vector<int32_t>& prompt);
  SamplingParams params;
  uint64_t seed = 0;   // params.seed, or one from std::random_device chosen at creation
  uint64_t draws = 0;  // uniforms drawn so far; the next is uniform_at(seed, draws) (backend/sample_math.h)
  std::unordered_map<int32_t, int32_t> generated_counts;  // token -> times generated
  std::unordered_map<int32_t, bool> prompt_tokens;        // for repetition_penalty
  std::vector<uint32_t> allowed_bits;  // params.allowed_ids as a bit mask (row_mask), made once
  int64_t generated = 0;  // tokens accepted (min_tokens)
  std::vector<int32_t> history;  // the tokens accepted, in order (bad_words)
  // Reasoning: inside the prompt's think block (params.think_end), with `reasoning` tokens so far.
  bool thinking = false;
  int64_t reasoning = 0;
  int64_t closed_at = -1;  // `generated` before the token that closed the think block (undo restores it)
  // The grammar's position while it applies (params.grammar: after think_end when set, or from the trigger to the
  // close token); engaged = constrained.
  std::optional<Matcher> matcher;
  bool closed = false;  // grammar_close accepted and no trigger since: params.after_close applies
  // A mask the host makes now (row_mask): a grammar's, what may follow grammar_close, or allowed_token_ids. A lazy
  // grammar waiting for its trigger is not one.
  bool constrained() const {
    return matcher.has_value() || !params.allowed_ids.empty() ||
           (closed && params.after_close != SamplingParams::AfterClose::kFree);
  }
  // The grammar's mask for the next token (bits as TokenMasker::allowed, plus the end ids or grammar_close where the
  // text is complete, or what after_close allows); false when no grammar constrains it.
  bool grammar_mask(std::vector<uint32_t>& bits) const;
  // grammar_mask() would return true: a grammar engaged, or after_close restricting what follows its close token.
  bool grammar_masked() const {
    return matcher.has_value() || (closed && params.after_close != SamplingParams::AfterClose::kFree);
  }
  // Changes whenever the grammar's position may change (every accept and undo): a mask made ahead (MaskAhead)
  // at one value is this sequence's mask only while the value is unchanged.
  uint64_t grammar_version = 0;
  // Reasoning tokens the budget still allows before think_end is forced (INT64_MAX: no budget or not thinking).
  int64_t budget_left() const;
  // The token the next draw must be (the thinking budget spent: params.think_end), or -1.
  int32_t forced() const { return budget_left() == 0 ? params.think_end : -1; }
  // Counts the token, closes the think block at think_end (engaging the grammar there unless it is lazy) and moves
  // the grammar over it (an end id leaves the matcher as it is); grammar_trigger engages it, grammar_close releases
  // it. Throws if a constrained sequence gets a token the grammar does not allow (the token counted: undo() takes it
  // back).
  void accept(int32_t token);
  // Accepting tokens on trial (a verify's rows on the device, each decided as if the drafts before it were accepted):
  // mark() before the accepts, undo(mark, tokens accepted since) after them puts the sampler back where it was —
  // counts, history, reasoning, the think block, the grammar's position and grammar_version: the same accepts again
  // reach the same versions, so masks made ahead at the trial's positions (MaskAhead) serve the real accepts of the
  // same tokens. Such masks live one step: a later accept of another token reaches a trial's version at another
  // position.
  struct Mark {
    std::optional<Matcher> matcher;
    bool closed = false, thinking = false;
    int64_t reasoning = 0, closed_at = -1, generated = 0;
    size_t history = 0;
    uint64_t grammar_version = 0;
  };
  Mark mark() const;
  void undo(const Mark& m, const std::vector<int32_t>& tokens);
  // Engages the grammar where it starts (not lazy), advanced over grammar_prefix.
  void engage_at_start();
  float next_uniform() { return uniform_at(seed, draws++); }
};

// A verify's rows one by one: f(j, reached) for j = 0..k with s at the position drafts[0..j) reach (accepted on
// trial: mark, accept, undo; s is back where it was at the end). After a draft s refuses (accept throws: its
// constrained grammar forbids it) the rows are never decided: f(j, false) for them, s left at the refusal's position.
void for_each_draft_prefix(SeqSampler& s, const int32_t* drafts, int64_t k,
                           const std::function<void(int64_t j, bool reached)>& f);

// A sequence's grammar mask made away from it: grammar_mask()'s inputs copied on the sequence's thread (mask_ahead()),
// the mask computed from the copy on any thread (compute(): touches nothing but the copy, the shared immutable
// grammar and the masker, whose cache is thread-safe), then given to sample(), which uses it while the sequence's
// grammar_version is still `version` (the same bits grammar_mask() would make now) and recomputes it otherwise.
struct MaskAhead {
  uint64_t version = 0;       // SeqSampler::grammar_version at the copy
  std::optional<Matcher> matcher;
  bool closed = false;
  std::shared_ptr<const TokenMasker> masker;
  int32_t grammar_close = -1, grammar_trigger = -1;
  SamplingParams::AfterClose after_close = SamplingParams::AfterClose::kFree;
  std::vector<int32_t> end_ids;
  // The result (compute()): grammar_mask()'s return value and bits, or the exception computing it threw, which
  // sample() rethrows where it would have thrown computing the mask itself.
  bool done = false;
  bool constrained = false;
  std::vector<uint32_t> bits;
  std::exception_ptr error;
  void compute();
};
// The copy of s's grammar mask inputs (cheap: the matcher's few small vectors, the end ids).
MaskAhead mask_ahead(const SeqSampler& s);

// What restricts a sequence's next token to a mask: nothing, its grammar (SeqSampler::grammar_masked, allowed_token_ids
// too where it has both), or allowed_token_ids alone.
enum class MaskKind : uint8_t { kNone, kGrammar, kAllowed };
// The ids s may sample next among [0, n) as one mask of mask_words(n) words (Backend::sample_rows' form): its
// grammar's mask (`ahead`'s bits where it was made for this very position: done, grammar_version unchanged; otherwise
// computed here) and allowed_token_ids, intersected; ids past the grammar's vocabulary forbidden. kNone leaves `bits`
// empty. Throws what computing the grammar's mask throws (an `ahead`'s error included).
MaskKind row_mask(const SeqSampler& s, const MaskAhead* ahead, int64_t n, std::vector<uint32_t>& bits);
// The kind of mask that restricts s's next token now (row_mask's return value at this position).
MaskKind mask_kind(const SeqSampler& s);
// The error of a row with nothing left to sample under a mask of that kind (or none).
const char* nothing_left(MaskKind k);

// Below this temperature a request is greedy (vLLM's _SAMPLING_EPS).
constexpr float kGreedyEps = 1e-5f;
inline bool is_greedy(const SamplingParams& p) { return p.temperature < kGreedyEps; }

// The tokens bias and penalties touch, one SampleEdit per distinct id, increasing, appended to `out`.
void collect_edits(const SeqSampler& s, std::vector<SampleEdit>& out);

// This sequence's next draw as one row of Backend::sample_rows: its edits appended to `edits`, and (unless greedy)
// the next uniform of its stream, so the caller must use the row (the stream has advanced, as sample() does).
SampleRowParams next_row(SeqSampler& s, std::vector<SampleEdit>& edits);

// Throws ds::Error naming the field, the allowed range and the value found when `p` is out of range for a
// vocabulary of `vocab` ids (temperature < 0, top_p outside (0, 1], top_k < -1, min_p outside [0, 1],
// repetition_penalty <= 0, a logit_bias id outside [0, vocab), logprobs < -1 or > vocab).
void check_params(const SamplingParams& p, int64_t vocab);

// Stage 1 of sample(), exposed for tests: logit_bias, then repetition, presence and frequency penalties,
// applied in place to x [n] (ids >= n are ignored).
void apply_bias_and_penalties(float* x, int64_t n, const SeqSampler& s);

// Picks the next token from logits [V] (fp32, raw): next_row() + the CPU sample_rows of that row, so the token is
// the one Backend::sample_rows picks for the same row. `vocab_limit` masks ids >= it (padding rows of the
// embedding that the tokenizer never produces); pass V to mask nothing. Fills `lp` when params.logprobs >= 0.
// Throws when no token is left (every logit -inf or NaN after logit_bias). A constrained sequence
// (SeqSampler::constrained) draws among the tokens its grammar allows (TokenMasker::allowed, plus the end ids
// where the text is complete); logprobs stay the raw distribution's. `ahead`: that mask computed ahead
// (MaskAhead::compute), used when it is done and s.grammar_version has not changed since its copy; otherwise (or
// null) sample() computes the mask itself.
int32_t sample(const float* logits, int64_t V, int64_t vocab_limit, SeqSampler& s, TokenLogprob* lp,
               const MaskAhead* ahead = nullptr);

// Speculative decoding: decides the token at one verified position given the target logits [V] of that
// position and the proposed `draft`. The target distribution p is exactly the one sample() draws from
// (bias, penalties, temperature, min_p, top_k, top_p). `draft_probs` [vocab_limit] is the draft's
// distribution q, or null for a deterministic (greedy) draft, q one-hot at `draft`. Rejection sampling
// (Leviathan et al. 2023): accept the draft with probability min(1, p(d)/q(d)); otherwise return a token
// drawn from normalize(max(0, p − q)). Either way the returned token is distributed as p. Greedy requests
// (temperature 0) accept iff the draft is the argmax and return the argmax, drawing nothing from the RNG.
// Sets *accepted; fills `lp` (the returned token's raw logprob) when params.logprobs >= 0.
// A constrained sequence is masked at its position (row_mask; `ahead` as sample() takes it).
int32_t verify_draft(const float* logits, int64_t V, int64_t vocab_limit, SeqSampler& s, int32_t draft,
                     const float* draft_probs, bool* accepted, TokenLogprob* lp, const MaskAhead* ahead = nullptr);

// A TokenLogprob from one row in cpu::row_logprobs' layout (Backend::row_logprobs): the chosen token's logprob, then
// k (id, logprob) pairs.
void set_logprobs(const float* row, int32_t chosen, int32_t k, TokenLogprob& lp);

// The draft head's proposal: the argmax of its logits over ids [0, vocab_limit) (deterministic, so q is one-hot).
int32_t draft_argmax(const float* logits, int64_t V, int64_t vocab_limit);

}  // namespace ds::sampling
