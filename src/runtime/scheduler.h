// Continuous batching with chunked prefill and preemption by recompute: which sequences run in the next
// forward call, how many of their tokens, and who gives memory back when the KV pool runs dry.
#pragma once
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <vector>

#include "runtime/cache.h"
#include "sampling/sampling.h"

namespace ds::runtime {

struct Request;

// A request inside the engine. Set by the engine at admission; `cache` by the scheduler and the forward;
// `tokens`, `completion_tokens`, `sampler` by post-processing.
struct Sequence {
  Sequence(std::shared_ptr<Request> r, const std::vector<int32_t>& prompt, const sampling::SamplingParams& sp)
      : req(std::move(r)), tokens(prompt), prompt_len(int64_t(prompt.size())), sampler(sp, prompt) {}
  std::shared_ptr<Request> req;
  std::vector<int32_t> tokens;    // prompt + generated (a final stop token is not appended)
  int64_t prompt_len = 0;
  SeqCache cache;                 // cache.len = tokens[0, len) are in the KV blocks and the state slot
  sampling::SeqSampler sampler;   // RNG and penalty counts survive preemption, so recompute is exact
  int64_t completion_tokens = 0;  // sampled so far, including a final stop token (vLLM's usage count)
  bool prompt_counted = false;    // prompt_tokens_total counts a prompt once, not per recompute
  uint64_t serial = 0;            // submission number: tells apart the lives of a reused request id
  // Was in a multi-sequence batch whose forward threw: recomputed alone until it samples again, so the
  // culprit fails on its own and the others carry on.
  bool suspect = false;
  // Speculative decoding: tokens the MTP head proposed after the last step, verified by the next forward
  // (set by the engine; dropped on preemption, since they lean on the MTP KV that goes with the blocks).
  std::vector<int32_t> drafts;
  // Image features of req->mm (act dtype [rows, H]), computed once by the engine and kept across preemption.
  Tensor mm_features;
  // The tokens as prefix caching compares them: `tokens`, but for image / video prompts each placeholder row holds
  // a negative id made from its image's hash and its index in it (a placeholder id alone does not say which image
  // it stands for). Null where the prompt cannot be keyed (images without hashes): such prompts are not cached.
  const std::vector<int32_t>* cache_key() const;
  bool keyed() const;  // cache_key() is not null
  // Prefix caching (docs/engine.md "Prefix caching"): the positions where this sequence's state is kept as a
  // checkpoint once its chunks reach them (increasing; chunks end there), planned at admission. `cached_tokens`:
  // prompt tokens its first admission (one that got its blocks) took from a checkpoint (-1: not admitted yet).
  std::vector<int64_t> save_at;
  int64_t cached_tokens = -1;
  CacheLookup lookup;  // the last admission's lookup; its first admission's once cached_tokens is set
  mutable std::vector<int32_t> key_;  // cache_key()'s for image prompts, extended as tokens are appended
  // When it was submitted and first admitted (the metrics' queue and prefill times).
  std::chrono::steady_clock::time_point submitted = std::chrono::steady_clock::now(), admitted;
  // Finished, its caches kept until the end of the step to become a checkpoint (Engine: retiring); its MTP pass
  // proposes nothing.
  bool retiring = false;
  // Request::prompt_logprobs: entry p for prompt token p + 1, computed as the prompt's chunks run (prompt_lps_done of
  // them), handed over with the first token.
  std::vector<sampling::TokenLogprob> prompt_lps;
  int64_t prompt_lps_done = 0;
  // Prompt rows whose logprobs are still to come: such a sequence computes every prompt row (no checkpoint resume).
  bool prompt_lps_pending() const;

  int64_t num_generated() const { return int64_t(tokens.size()) - prompt_len; }
  int64_t pending_tokens() const { return int64_t(tokens.size()) - cache.len; }  // to run through the model
};

// One sequence's share of a forward call: tokens[cache.len, cache.len + num_tokens), then drafts[0, num_drafts).
struct ScheduledSeq {
  Sequence* seq = nullptr;
  int64_t num_tokens = 0;
  bool samples = false;    // this chunk reaches the end of `tokens`, so its last row is sampled
  int64_t num_drafts = 0;  // speculative tokens verified after it (only when `samples`); blocks reserved for them
};

struct Schedule {
  std::vector<ScheduledSeq> seqs;
  int64_t num_preempted = 0;
  bool empty() const { return seqs.empty(); }
};

class Scheduler {
 public:
  // `prefix_caching`: admissions resume from the cache manager's checkpoints and plan new ones (docs/engine.md).
  // `checkpoint_interval` (prefix caching; 0: none): a prompt also leaves a checkpoint every that many tokens.
  Scheduler(CacheManager& cm, int64_t max_num_seqs, int64_t max_num_batched_tokens, bool prefix_caching = false,
            int64_t checkpoint_interval = 0);

  // Joins the back of the waiting queue (arrival order; admission takes the smallest Request::priority first).
  void add(std::unique_ptr<Sequence> s);
  // Picks the next forward call: running sequences first (decodes and unfinished prefill chunks, oldest
  // first), then waiting ones (by priority, then queue order) while slots, blocks and the token budget last. When a
  // running sequence needs a block and none is free, the least urgent running sequence not yet scheduled this step
  // (largest priority value, most recently started among equals) is preempted (memory freed, back to the front of
  // the waiting queue, recomputed later from its tokens); no new sequence is admitted in a step that preempted.
  // Before all that, a waiting sequence that is more urgent than running ones and has no room takes theirs (the least
  // urgent first) and is admitted in this step (make_room).
  Schedule schedule();
  // After a forward call that threw: every sequence of `s` is preempted and marked suspect (or, for a
  // single-sequence call, returned as the culprit). Returns the sequences that must fail.
  std::vector<Sequence*> forward_failed(const Schedule& s);
  // Frees the sequence's memory and forgets it (finished, failed or aborted). Returns its ownership.
  // `release` false: its slot and blocks stay with it (the engine retires it into a prefix-cache checkpoint).
  std::unique_ptr<Sequence> remove(Sequence* s, bool release = true);

  Sequence* find(uint64_t request_id) const;
  std::vector<Sequence*> all() const;  // running then waiting
  int64_t num_running() const { return int64_t(running_.size()); }
  int64_t num_waiting() const { return int64_t(waiting_.size()); }
  const CacheManager& cache() const { return cm_; }
  bool prefix_caching() const { return prefix_caching_; }
  // Prefix caching is on and the sequence's prompt can be keyed (Sequence::cache_key).
  bool cacheable(const Sequence* s) const { return prefix_caching_ && s->keyed(); }
  // Prefix caching: prompt tokens looked up and found at first admissions (vLLM's prefix_cache_queries / _hits).
  int64_t prefix_queries() const { return prefix_queries_; }
  int64_t prefix_hits() const { return prefix_hits_; }
  int64_t prefix_host_hits() const { return prefix_host_hits_; }  // of prefix_hits: from host-memory checkpoints

 private:
  // Tokens of `s` the next chunk may run: pending, at most `budget`, ending at its next checkpoint position.
  int64_t chunk(const Sequence* s, int64_t budget) const;
  // A fresh sequence that just got its slot: resumes from the longest usable checkpoint and plans its own.
  void admit_from_cache(Sequence* s);
  // Once admitted with its blocks: its first admission sets cached_tokens and the prefix-cache counters.
  void count_admission(Sequence* s);
  // Prefix caching: `s` (waiting) shares the head a running sequence is still prefilling toward a planned
  // checkpoint, further than any checkpoint it could resume from now: it waits for that one.
  bool deferred(const Sequence* s) const;
  // The waiting sequence admission takes next (waiting_.end(): none).
  std::deque<std::unique_ptr<Sequence>>::iterator pick();
  // Priority: preempts running sequences strictly less urgent than the next one to admit while it has no room;
  // returns it if any was preempted (this step admits it).
  Sequence* make_room(Schedule& out);
  // Schedules `s` alone (it is suspect); preempts others as needed to give it a slot and blocks.
  Schedule schedule_alone(Sequence* s);
  // The running sequence to preempt among running_[from..] other than `spare`: the largest priority value (the
  // least urgent), the most recently started among equals. Fails if there is none.
  size_t victim(size_t from, const Sequence* spare) const;
  // Moves running_[i] to the front of the waiting queue and frees its blocks and slot.
  void preempt(size_t i);

  CacheManager& cm_;
  int64_t max_num_seqs_, max_num_batched_tokens_;
  bool prefix_caching_;
  int64_t interval_ = 0;
  int64_t prefix_queries_ = 0, prefix_hits_ = 0, prefix_host_hits_ = 0;
  std::deque<std::unique_ptr<Sequence>> waiting_;
  std::vector<std::unique_ptr<Sequence>> running_;  // in start order: the back is preempted first
};

// Image / video sequences of a batch (seqs[i] is b.seqs[i]'s sequence, or null): every row takes its mRoPE position
// (the prompt's layout from req->mm, position + rope_delta after the prompt), and a row fed a placeholder takes
// that placeholder's vision features (seq->mm_features, which must be computed) as its embedding. `feed`: how far
// ahead of its position a row's token is — 0 for the target forward, 1 for the MTP pass (row p is fed token p + 1,
// model-spec §4), < 0 for rows fed no prompt token (the MTP's chained draft steps): positions only.
void place_mm_rows(Backend& be, int64_t hidden_size, const std::vector<const Sequence*>& seqs, BatchMeta& b, int feed);

}  // namespace ds::runtime
