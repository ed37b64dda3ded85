// The engine loop: schedule → forward → sample → post-process, one thread, continuous batching.
//
// Threads: submit() and abort() run on HTTP threads and only touch the hand-off state under `mu`
// (pending sequences, abort ids, live ids, the metrics snapshot). Everything else — scheduler, caches,
// sequences — belongs to whoever runs step(): the engine thread, or a test calling step() directly. The mask
// workers (MaskWorkers) compute grammar masks during a step from copies made for them (sampling::MaskAhead) and are
// joined inside that step (run()).
#include "runtime/engine.h"

#include <algorithm>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <unordered_map>

#include "backend/cpu/cpu_backend.h"
#include "core/env.h"
#include "core/status.h"
#include "runtime/mask_workers.h"
#include "runtime/scheduler.h"
#include "runtime/spec_decode.h"

namespace ds::runtime {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::None: return "none";
    case FinishReason::Stop: return "stop";
    case FinishReason::Length: return "length";
    case FinishReason::Abort: return "abort";
    case FinishReason::Error: return "error";
    case FinishReason::Repetition: return "repetition";
  }
  return "?";
}

void DeltaChannel::push(Delta d) {
  {
    std::lock_guard<std::mutex> l(mu_);
    q_.push_back(std::move(d));
  }
  cv_.notify_one();
}

std::optional<Delta> DeltaChannel::pop(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> l(mu_);
  if (!cv_.wait_for(l, timeout, [&] { return !q_.empty(); })) return std::nullopt;
  Delta d = std::move(q_.front());
  q_.pop_front();
  return d;
}

bool repeats_at_end(const int32_t* t, int64_t n, const Request::Repetition& r) {
  if (r.max_pattern <= 0 || r.min_count < 2) return false;
  for (int64_t len = std::max<int64_t>(r.min_pattern, 1); len <= r.max_pattern; ++len) {
    if (len * r.min_count > n) return false;
    bool all = true;
    for (int64_t k = 1; k < r.min_count && all; ++k)
      all = std::equal(t + n - len, t + n, t + n - (k + 1) * len);
    if (all) return true;
  }
  return false;
}

namespace {

EngineConfig resolve(const model::Model& m, EngineConfig c) {
  const int64_t V = m.config().text.vocab_size;
  if (c.max_num_seqs < 1) fail("engine: max_num_seqs must be >= 1, found ", c.max_num_seqs);
  if (c.max_num_batched_tokens < 1) fail("engine: max_num_batched_tokens must be >= 1, found ", c.max_num_batched_tokens);
  if (c.max_model_len < 2) fail("engine: max_model_len must be >= 2, found ", c.max_model_len);
  if (c.block_size < 1) fail("engine: block_size must be >= 1, found ", c.block_size);
  if (c.num_blocks < 0) fail("engine: num_blocks must be >= 0 (0 = automatic), found ", c.num_blocks);
  if (c.num_blocks == 0) c.num_blocks = c.max_num_seqs * ((c.max_model_len + c.block_size - 1) / c.block_size);
  if (c.vocab_limit <= 0 || c.vocab_limit > V) c.vocab_limit = V;
  if (c.num_speculative_tokens < 0 || c.num_speculative_tokens > 16)
    fail("engine: num_speculative_tokens must be in 0..16, found ", c.num_speculative_tokens);
  if (c.num_speculative_tokens > 0 && !m.has_mtp())
    fail("engine: speculative decoding (method mtp, num_speculative_tokens ", c.num_speculative_tokens,
         ") needs the checkpoint's MTP head (mtp.* tensors), found none");
  if (c.draft_vocab_size < 0) fail("engine: draft_vocab_size must be >= 0, found ", c.draft_vocab_size);
  if (c.draft_vocab_size > 0 && c.num_speculative_tokens == 0)
    fail("engine: draft_vocab_size ", c.draft_vocab_size, " needs speculative decoding (num_speculative_tokens > 0)");
  if (c.draft_vocab_size > 0 && int64_t(m.draft_vocab().size()) != c.draft_vocab_size)
    fail("engine: draft_vocab_size ", c.draft_vocab_size, " needs the model loaded with a reduced draft head of that many "
         "tokens (LoadOptions::draft_vocab), found ", m.draft_vocab().size());
  std::sort(c.eos_token_ids.begin(), c.eos_token_ids.end());
  // Before/after measurements: DS_HOST_SAMPLING=1 copies the logits and samples on the host in every step.
  if (env_flag("DS_HOST_SAMPLING")) c.device_sampling = false;
  // DS_CUDA_NO_DEVICE_VERIFY=1: verify steps copy the logits to the host (the old path).
  if (env_flag("DS_CUDA_NO_DEVICE_VERIFY")) c.device_verify = false;
  // DS_CUDA_NO_DRAFT_FEED=1: each draft step's tokens come back to the host and feed the next (the old path).
  if (env_flag("DS_CUDA_NO_DRAFT_FEED")) c.device_draft_feed = false;
  // DS_SPEC_PROFILE=1: time the phases of every step (EngineMetrics::phase_ms; syncs at each phase boundary).
  if (env_flag("DS_SPEC_PROFILE")) c.profile_phases = true;
  // DS_SERIAL_MASKS=1: grammar masks on the engine thread at sampling time (the old path).
  if (env_flag("DS_SERIAL_MASKS")) c.parallel_masks = false;
  if (c.mask_threads < 0) fail("engine: mask_threads must be >= 0 (0 = automatic), found ", c.mask_threads);
  if (c.mask_threads == 0) c.mask_threads = std::min<int64_t>(4, std::max(1u, std::thread::hardware_concurrency()));
  return c;
}

}  // namespace

struct Engine::Impl {
  Impl(model::Model& m, const EngineConfig& c)
      : model(m),
        cfg(c),
        cm(m, c.num_blocks, c.block_size, c.max_num_seqs,
           c.num_speculative_tokens > 0 ? c.num_speculative_tokens + 1 : 0,  // + spare slots and the input log
           c.prefix_cache_checkpoints, c.prefix_cache_host_checkpoints),
        sched(cm, c.max_num_seqs, c.max_num_batched_tokens, c.prefix_cache_checkpoints > 0, c.prefix_cache_interval) {
    snap.kv_blocks_total = c.num_blocks;
    snap.slots_total = c.max_num_seqs;
    counters.spec_accepted_per_pos.assign(size_t(c.num_speculative_tokens), 0);
    snap.spec_accepted_per_pos = counters.spec_accepted_per_pos;
  }

  model::Model& model;
  const EngineConfig& cfg;
  CacheManager cm;
  Scheduler sched;
  EngineMetrics counters;  // engine-thread copy of the counters; published into `snap` after each step

  // Hand-off state, shared with submit()/abort()/metrics() callers.
  mutable std::mutex mu;
  std::condition_variable cv;
  std::vector<std::unique_ptr<Sequence>> pending;
  std::vector<std::pair<uint64_t, uint64_t>> aborts;  // (request id, serial of the life it targets)
  std::unordered_map<uint64_t, uint64_t> live;        // request id -> serial, submitted and not yet finished
  uint64_t next_serial = 1;
  bool stopping = false;
  EngineMetrics snap;  // `waiting` excludes `pending` (added when read)
  std::thread thread;
  MaskWorkers mask_workers{int(cfg.mask_threads)};  // grammar masks during the forward (threads start when first needed)

  bool take_inbox();
  void run(const Schedule& s);
  Schedule encode_images(const Schedule& s);
  void place_images(const Schedule& s, BatchMeta& b);
  // `lp_row`: device sampling's logprobs of this sequence's rows (Backend::row_logprobs' layout, `lp_stride` floats
  // per row: its first row, then its verified rows), when the request wants them. `masks`: the host path's masks made
  // ahead, one per row (start_masks), or null. `mask_error`: device sampling's (row, error) of a mask not made.
  bool decide(const ScheduledSeq& x, const float* rows, int64_t* accepted, const int32_t* sampled = nullptr,
              const sampling::MaskAhead* masks = nullptr, const float* lp_row = nullptr, int32_t lp_stride = 0,
              const std::pair<int64_t, std::string>* mask_error = nullptr);
  // Counts a mask made ahead (or not) where s's grammar masks its next token: metrics' grammar_masks_ahead_total /
  // _stale_total.
  void count_mask(const sampling::SeqSampler& s, const sampling::MaskAhead* a) {
    if (!a || !s.grammar_masked()) return;
    ++(a->version == s.grammar_version ? counters.grammar_masks_ahead_total : counters.grammar_masks_stale_total);
  }
  struct StepMasks {                      // the grammar masks of one step's constrained rows (start_masks)
    std::vector<sampling::MaskAhead> ahead;
    std::vector<int32_t> of;              // schedule index -> its mask in `ahead`, or -1
    std::vector<int32_t> leader;          // per mask: the mask whose computation it copies, or -1 (its own)
    bool running = false;                 // jobs on the workers, not joined yet
  };
  // A prompt row whose logprob a sequence owes (Request::prompt_logprobs): its schedule index, batch row, next token.
  struct PromptRow {
    size_t seq;
    int32_t row;
    int32_t next;
  };
  // Logits of the rows' final-norm hiddens (`hidden` [T, H], row = batch row), Engine::kPromptLogprobRows at a time,
  // and each row's logprob, rank and top alternatives (on the backend where it has row_logprobs).
  void prompt_logprobs(const Schedule& sc, const std::vector<PromptRow>& rows, const Tensor& hidden,
                       std::vector<sampling::TokenLogprob>& out);
  void start_masks(const Schedule& sc, StepMasks& m);
  void join_masks(StepMasks& m);
  bool emit(Sequence* s, const std::vector<int32_t>& toks, std::vector<sampling::TokenLogprob>& lps);
  struct Redo {           // a sequence that rejected a draft
    Sequence* seq;
    int64_t rows;          // accepted rows [last token, d_1..d_a]
    int64_t log_row;       // where the verify logged them in the DeltaNet input log
  };
  // Prefix caching: a finished text sequence's caches become a checkpoint of the tokens it ran (the next turn of a
  // conversation repeats the answer: docs/engine.md "Prefix caching"), settled at the end of the step, once its state
  // is rolled back to the tokens it kept and (speculation) its MTP KV is filled.
  struct Retiring {
    std::unique_ptr<Sequence> seq;
    int32_t next = -1;     // the stop token that ended it (not in seq->tokens), -1: none
    int64_t len = -1;      // tokens its caches hold once settled; -1: cache.len (finished between steps); 0: keep none
    int64_t ctx = -1;      // finished in this step's decide: its length before the step (-1: not)
    int64_t first_row = 0; // and its first row in the step's batch
  };
  std::vector<Retiring> retiring;
  // Finished in this step's decide: the tokens whose state it keeps (the fed rows that are in its tokens), with a
  // rollback to them where the verify ran past them.
  void plan_retire(Retiring& r, const ScheduledSeq& x, const BatchMeta::Seq& bs, int64_t ctx, int64_t accepted,
                   std::vector<Redo>& redo);
  void settle_retiring();
  bool roll_back(const std::vector<Redo>& redo, bool graphed);
  int64_t drafts_wanted(Sequence* s);
  void finish(Sequence* s, FinishReason r, Delta d = {});
  void publish(const Schedule& s);
  bool has_work() const { return sched.num_running() + sched.num_waiting() > 0; }
  void loop(Engine& e);
};

Engine::Engine(model::Model& m, EngineConfig cfg) : cfg_(resolve(m, std::move(cfg))) {
  impl_ = std::make_unique<Impl>(m, cfg_);
}

Engine::~Engine() { stop(); }

void Engine::start() {
  std::lock_guard<std::mutex> l(impl_->mu);
  if (impl_->stopping) fail("engine: start() after stop()");
  if (impl_->thread.joinable()) return;
  impl_->thread = std::thread([this] { impl_->loop(*this); });
}

void Engine::stop() {
  {
    std::lock_guard<std::mutex> l(impl_->mu);
    if (impl_->stopping) return;
    impl_->stopping = true;
  }
  impl_->cv.notify_all();
  if (impl_->thread.joinable()) impl_->thread.join();
  // The engine thread is gone: end whatever is left, so no client waits forever.
  impl_->take_inbox();
  for (Sequence* s : impl_->sched.all()) impl_->finish(s, FinishReason::Abort);
  impl_->settle_retiring();
  impl_->publish({});
}

uint64_t media_hash(const float* pixels, size_t n, const std::array<int64_t, 3>& grid) {
  uint64_t h = 0x9E3779B97F4A7C15ull ^ uint64_t(n);
  auto mix = [&](uint64_t v) {
    h ^= v + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
    h *= 0xFF51AFD7ED558CCDull;
    h ^= h >> 33;
  };
  for (int64_t g : grid) mix(uint64_t(g));
  const size_t words = n / 2;
  const auto* w = reinterpret_cast<const uint8_t*>(pixels);
  for (size_t i = 0; i < words; ++i) {
    uint64_t v;
    std::memcpy(&v, w + 8 * i, 8);
    mix(v);
  }
  if (n % 2) {
    uint32_t v;
    std::memcpy(&v, pixels + n - 1, 4);
    mix(v);
  }
  return h;
}

// Images: the tower must exist and the layout must fit the prompt (the server builds it; tests may not).
void Engine::check_mm(const Request& r, int64_t P) const {
  const MultiModalInput& mm = *r.mm;
  model::Model& m = impl_->model;
  if (!m.has_vision()) fail("images: this model has no vision tower (no model.visual.* tensors)");
  if (mm.grids.empty()) fail("images: expected at least one image grid, found none");
  const int64_t merge = m.config().vision.spatial_merge_size;
  int64_t feats = 0;
  for (auto& g : mm.grids) feats += g[0] * (g[1] / merge) * (g[2] / merge);
  if (int64_t(mm.rows.size()) != feats)
    fail("images: ", mm.rows.size(), " placeholder rows for ", feats, " image feature rows");
  for (size_t i = 0; i < mm.rows.size(); ++i)
    if (mm.rows[i] < 0 || mm.rows[i] >= P || (i > 0 && mm.rows[i] <= mm.rows[i - 1]))
      fail("images: placeholder row ", mm.rows[i], " at index ", i, " is not increasing inside the prompt [0, ", P, ")");
  if (int64_t(mm.positions.size()) != 3 * P)
    fail("images: expected 3 x ", P, " mRoPE positions, found ", mm.positions.size());
}

void Engine::submit(std::shared_ptr<Request> r) {
  if (!r) fail("submit: expected a request, found null");
  const int64_t P = int64_t(r->prompt.size()), V = impl_->model.config().text.vocab_size;
  if (P == 0) fail("prompt: expected at least 1 token, found 0");
  if (r->max_tokens < 1) fail("max_tokens: expected at least 1, found ", r->max_tokens);
  if (P + r->max_tokens > cfg_.max_model_len)
    fail("this model's maximum context length is ", cfg_.max_model_len, " tokens, but the request needs ", P + r->max_tokens,
         " (", P, " in the prompt, ", r->max_tokens, " in the completion)");
  const int64_t blocks = (P + r->max_tokens + cfg_.block_size - 1) / cfg_.block_size;
  if (blocks > cfg_.num_blocks)
    fail("the request needs ", blocks, " KV blocks of ", cfg_.block_size, " tokens (", P, " prompt + ", r->max_tokens,
         " completion) but the pool holds only ", cfg_.num_blocks);
  if (cfg_.check_prompt_ids)
    for (int64_t i = 0; i < P; ++i)
      if (r->prompt[size_t(i)] < 0 || r->prompt[size_t(i)] >= V)
        fail("prompt: token id ", r->prompt[size_t(i)], " at position ", i, " is outside the vocabulary [0, ", V, ")");
  sampling::check_params(r->sampling, cfg_.vocab_limit);
  if (r->mm) check_mm(*r, P);
  // The ids that end the output: what a grammar allows once its text is complete, what min_tokens holds back.
  // (A tool-call grammar closes with its own token and, after_close kFree, leaves the end to the model.)
  if (r->sampling.grammar && r->ignore_eos &&
      (r->sampling.grammar_close < 0 || r->sampling.after_close != sampling::SamplingParams::AfterClose::kFree))
    fail("structured output: ignore_eos cannot be combined with a grammar (the output ends where the grammar's text "
         "is complete)");
  r->sampling.end_ids = r->ignore_eos ? std::vector<int32_t>{} : cfg_.eos_token_ids;
  r->sampling.end_ids.insert(r->sampling.end_ids.end(), r->stop_token_ids.begin(), r->stop_token_ids.end());
  const Request::Repetition& rep = r->repetition;
  if (rep.max_pattern < 0 || rep.min_pattern < 0 || rep.min_pattern > rep.max_pattern ||
      (rep.max_pattern > 0 && rep.min_count < 2))
    fail("repetition_detection: expected 0 <= min_pattern_size <= max_pattern_size and min_count >= 2, found ",
         rep.min_pattern, ", ", rep.max_pattern, ", ", rep.min_count);
  if (r->prompt_logprobs < -1 || r->prompt_logprobs > V)
    fail("prompt_logprobs: expected -1 (off) to ", V, ", found ", r->prompt_logprobs);
  if (r->prompt_logprobs >= 0)  // their logprobs are over the sampled ids [0, vocab_limit)
    for (int64_t i = 0; i < P; ++i)
      if (r->prompt[size_t(i)] >= cfg_.vocab_limit)
        fail("prompt_logprobs: prompt token ", r->prompt[size_t(i)], " at position ", i,
             " is outside the sampled vocabulary [0, ", cfg_.vocab_limit, ")");
  if (r->sampling.min_tokens < 0 || r->sampling.min_tokens > r->max_tokens)
    fail("min_tokens: expected 0 to max_tokens (", r->max_tokens, "), found ", r->sampling.min_tokens);
  // Built here, off the engine thread (copies the prompt, seeds the RNG).
  auto seq = std::make_unique<Sequence>(r, r->prompt, r->sampling);
  {
    std::lock_guard<std::mutex> l(impl_->mu);
    if (impl_->stopping) fail("engine: stopped, not accepting requests");
    if (impl_->live.count(r->id)) fail("request id ", r->id, " is already in flight");
    seq->serial = impl_->next_serial++;
    impl_->live[r->id] = seq->serial;
    impl_->pending.push_back(std::move(seq));
  }
  impl_->cv.notify_one();
}

void Engine::abort(uint64_t id) {
  {
    std::lock_guard<std::mutex> l(impl_->mu);
    // Bound to the request's current life: a late abort must not end a new request reusing the id.
    auto it = impl_->live.find(id);
    if (it == impl_->live.end()) return;  // finished already, or never submitted
    impl_->aborts.push_back({id, it->second});
  }
  impl_->cv.notify_one();
}

EngineMetrics Engine::metrics() const {
  std::lock_guard<std::mutex> l(impl_->mu);
  EngineMetrics m = impl_->snap;
  m.waiting += int64_t(impl_->pending.size());
  return m;
}

bool Engine::step() {
  const bool inbox = impl_->take_inbox();      // new requests, aborts
  impl_->settle_retiring();                    // aborted sequences' checkpoints
  const Schedule s = impl_->sched.schedule();  // who runs, how many tokens each
  if (!s.empty()) impl_->run(s);               // forward, sample, emit deltas, free finished
  impl_->settle_retiring();                    // finished sequences' checkpoints
  impl_->publish(s);
  return inbox || !s.empty();
}

// ---------------------------------------------------------------------------------------------------

void Engine::Impl::loop(Engine& e) {
  for (;;) {
    {
      std::unique_lock<std::mutex> l(mu);
      cv.wait(l, [&] { return stopping || !pending.empty() || !aborts.empty() || has_work(); });
      if (stopping) return;
    }
    try {
      if (!e.step()) {
        // Work exists but nothing could be scheduled: wait for a hand-off rather than spin.
        std::unique_lock<std::mutex> l(mu);
        cv.wait_for(l, std::chrono::milliseconds(5), [&] { return stopping || !pending.empty() || !aborts.empty(); });
      }
    } catch (const std::exception& ex) {
      // Failures of a forward or a sampler are contained per request inside step(); reaching here is an
      // engine bug. End every request with the message instead of taking the process down.
      std::fprintf(stderr, "deltaserve engine: step failed: %s\n", ex.what());
      for (auto& r : retiring) r.len = 0;  // their caches' state is not known
      settle_retiring();
      for (Sequence* s : sched.all()) {
        Delta d;
        d.error = std::string("engine step failed: ") + ex.what();
        finish(s, FinishReason::Error, std::move(d));
      }
      publish({});
    }
  }
}

bool Engine::Impl::take_inbox() {
  std::vector<std::unique_ptr<Sequence>> reqs;
  std::vector<std::pair<uint64_t, uint64_t>> ab;
  {
    std::lock_guard<std::mutex> l(mu);
    reqs.swap(pending);
    ab.swap(aborts);
  }
  const bool any = !reqs.empty() || !ab.empty();
  for (auto& s : reqs) sched.add(std::move(s));
  for (auto [id, serial] : ab)
    if (Sequence* s = sched.find(id); s && s->serial == serial) finish(s, FinishReason::Abort);  // else: finished
  return any;
}

// One forward over every scheduled chunk. With speculation a decoding sequence's chunk is [last token,
// d_1..d_k]: the rows are verified in order, the sequence keeps the accepted prefix plus one token, and its
// DeltaNet state, which the forward advanced over all k + 1 rows, is rolled back to the snapshot taken before
// and advanced again over the accepted prefix from the verify's logged DeltaNet inputs (no forward). Then the MTP
// head drafts the next step's tokens.
void Engine::Impl::run(const Schedule& sc_in) {
  PhaseClock clk(cfg.profile_phases ? &model.backend() : nullptr, &counters.phase_ms);
  clk.start();
  const Schedule sc = encode_images(sc_in);  // drops a sequence whose images fail to encode
  if (sc.empty()) return;
  // The grammar masks of the constrained rows, computed on the mask workers while the batch is built and the
  // forward runs; joined before the rows are sampled, and on every way out of this function (the guard: the jobs
  // write into `masks`).
  StepMasks masks;
  start_masks(sc, masks);
  struct Join {
    Impl& impl;
    StepMasks& m;
    ~Join() { impl.join_masks(m); }
  } join{*this, masks};
  const bool spec = cfg.num_speculative_tokens > 0;
  std::vector<std::pair<const SeqCache*, std::vector<int32_t>>> parts;
  for (auto& x : sc.seqs) {
    auto first = x.seq->tokens.begin() + x.seq->cache.len;
    std::vector<int32_t> toks(first, first + x.num_tokens);
    toks.insert(toks.end(), x.seq->drafts.begin(), x.seq->drafts.begin() + x.num_drafts);
    parts.push_back({&x.seq->cache, std::move(toks)});
  }
  BatchMeta b = make_batch(parts);
  place_images(sc, b);
  // Speculation: the verifying sequences' DeltaNet inputs go to the input log, for a rollback. When the batch fits
  // the log, every sequence logs at its own batch rows (the projections write straight into the log, and a
  // recorded step has one form); otherwise the verifying sequences only, back to back.
  if (spec) {
    if (b.num_tokens() <= cm.log_rows()) {
      for (auto& s : b.seqs) s.log_row = s.q_start;
    } else {
      int64_t next = 0;
      for (size_t i = 0; i < sc.seqs.size(); ++i)
        if (sc.seqs[i].num_drafts > 0) {
          b.seqs[i].log_row = next;
          next += b.seqs[i].q_len;
        }
    }
  }
  // Logit rows: the last row of every chunk that completes its sequence's tokens, and its drafts' rows.
  std::vector<int32_t> rows;
  for (size_t i = 0; i < sc.seqs.size(); ++i)
    if (sc.seqs[i].samples)
      for (int64_t j = 0; j <= sc.seqs[i].num_drafts; ++j)
        rows.push_back(int32_t(b.seqs[i].q_start + sc.seqs[i].num_tokens - 1 + j));
  // Prompt logprobs: the rows of prompt tokens whose next token is a prompt token too, of the sequences that still
  // owe them (in position order per sequence); their logits come from the final-norm hiddens after the forward.
  std::vector<PromptRow> prow;
  for (size_t i = 0; i < sc.seqs.size(); ++i) {
    Sequence* s = sc.seqs[i].seq;
    if (!s->prompt_lps_pending()) continue;
    const int64_t ctx = s->cache.len, end = std::min(ctx + sc.seqs[i].num_tokens, s->prompt_len - 1);
    DS_CHECK(ctx <= s->prompt_lps_done, "prompt logprobs: a chunk starts at ", ctx, " past the ", s->prompt_lps_done,
             " rows done");  // such a sequence resumes from no checkpoint (Scheduler::admit_from_cache)
    for (int64_t p = s->prompt_lps_done; p < end; ++p)
      prow.push_back({i, int32_t(b.seqs[i].q_start + p - ctx), s->tokens[size_t(p + 1)]});
  }
  const bool want_hidden = spec || !prow.empty();
  std::vector<int32_t> all_rows;  // MTP drafting reads the hidden state of every committed row
  if (want_hidden)
    for (int64_t i = 0; i < b.num_tokens(); ++i) all_rows.push_back(int32_t(i));
  std::vector<float> logits;  // fp32 [R, V] (host sampling)
  std::vector<int32_t> toks;  // one token per row (device sampling)
  std::vector<int32_t> lp_of(sc.seqs.size(), -1);  // device sampling: schedule index -> its row of lp_rows, or -1
  std::vector<float> lp_rows;                       // Backend::row_logprobs' rows
  int32_t lp_stride = 0;
  Tensor hidden;              // act [T, H] final-norm hiddens (speculation only)
  // Sampling on the backend: no sampled row wants more logprob alternatives than Backend::row_logprobs gives, and
  // verifying sequences verify there (device_verify): each verified row's choice comes back (the target's argmax, or
  // rejection sampling's draft or replacement) and is compared with the drafts here. A constrained row's mask,
  // made on the host (sampling::row_mask), goes with it; a forced row's token (a spent thinking budget) replaces the
  // backend's choice.
  const bool on_device = cfg.device_sampling && !rows.empty() && std::all_of(sc.seqs.begin(), sc.seqs.end(), [&](const ScheduledSeq& x) {
    const sampling::SamplingParams& sp = x.seq->req->sampling;
    // Logprobs (up to kMaxRowTopLogprobs alternatives) come from Backend::row_logprobs beside the sampled rows.
    const bool lp_ok = sp.logprobs < 0 || (sp.logprobs <= Backend::kMaxRowTopLogprobs && model.backend().has_row_logprobs());
    return !x.samples || (lp_ok && (x.num_drafts == 0 || cfg.device_verify));
  });
  // Device sampling: a row whose mask could not be made (the masker's exception; a forced id outside the vocabulary)
  // fails its request if decide reaches it: schedule index -> (row, error), row -1 = none.
  std::vector<std::pair<int64_t, std::string>> mask_error(sc.seqs.size(), {-1, std::string()});
  std::vector<sampling::TokenLogprob> plp;  // of `prow`
  std::vector<std::pair<Sequence*, uint64_t>> draws;  // each sampler's counter before this step's uniforms
  // Decode or verify only (every row a logit row): one recorded step per batch shape.
  // With speculation only where spec_step_graphs asks for it (engine.h: graphed verify/draft differ from eager on
  // CUDA today).
  // Never a step that places image features (scatter_rows uploads its row list: not recordable).
  const bool graphed = cfg.step_graphs && (!spec || cfg.spec_step_graphs) && b.embed_rows.empty() &&
                       std::all_of(sc.seqs.begin(), sc.seqs.end(), [](const ScheduledSeq& x) {
                         return x.samples && x.num_tokens == 1;
                       });
  clk.mark("build batch");
  // The state before the verify, for a rollback (recorded per slot pair when the step is).
  for (auto& x : sc.seqs)
    if (x.num_drafts > 0) cm.snapshot(x.seq->cache, graphed);
  clk.mark("snapshot");
  try {
    // A step of prefill chunks only still asks for one row: backends need not handle R = 0.
    DS_CHECK(!graphed || prow.empty(), "prompt logprobs in a recorded step");  // decode rows only there
    Tensor t = graphed ? model.forward_graphed(b, cm.caches(), rows, spec ? &hidden : nullptr)
                       : model.forward(b, cm.caches(), rows.empty() ? std::vector<int32_t>{0} : rows,
                                       want_hidden ? &hidden : nullptr, want_hidden ? &all_rows : nullptr);
    clk.mark(graphed ? "forward (graphed)" : "forward (eager)");
    if (on_device) {
      if (masks.running) {  // the constrained rows' masks go with them
        join_masks(masks);
        clk.mark("grammar masks (wait)");
      }
      std::vector<SampleRowParams> prm;
      std::vector<SampleEdit> edits;
      std::vector<std::pair<size_t, int32_t>> forced;  // (row, token) of the rows a spent thinking budget decides
      std::vector<uint32_t> mask_bits, bits;  // the rows' masks back to back (Backend::sample_rows)
      const int64_t V = model.config().text.vocab_size, n = cfg.vocab_limit > 0 ? std::min(cfg.vocab_limit, V) : V;
      for (size_t i = 0; i < sc.seqs.size(); ++i) {
        const ScheduledSeq& x = sc.seqs[i];
        if (!x.samples) continue;
        sampling::SeqSampler& sm = x.seq->sampler;
        draws.push_back({x.seq, sm.draws});
        if (const int32_t f = sm.forced(); f >= 0) {  // its token is known (no drafts): a placeholder row, no draw
          forced.push_back({prm.size(), f});
          if (f >= n) mask_error[i] = {0, str_cat("thinking budget: the end-of-thinking id ", f, " is outside the vocabulary")};
          SampleRowParams p;
          p.greedy = 1;
          p.edit_begin = int32_t(edits.size());
          prm.push_back(p);
          continue;
        }
        // Verified row j is decided as if d_1..d_j were accepted, the only case in which it counts: its penalties
        // see them and its mask is the grammar's after them, as verify_draft's would be. Greedy rows draw no
        // uniform; a sampled row j draws uniform c + j (its acceptance test, or the bonus row's draw) and, where
        // d_{j+1} is rejected, c + j + 1 for the rest of the distribution: verify_draft's order. After a draft the
        // grammar refuses, the rows are never decided: no mask, no accepts.
        sampling::for_each_draft_prefix(sm, x.seq->drafts.data(), x.num_drafts, [&](int64_t j, bool reached) {
          prm.push_back(sampling::next_row(sm, edits));
          if (j < x.num_drafts && !prm.back().greedy) {  // rejection sampling: row j verifies d_{j+1}
            prm.back().draft = x.seq->drafts[size_t(j)];
            prm.back().u2 = uniform_at(sm.seed, sm.draws);  // the next one; decide takes back what was not used
          }
          if (!reached || mask_error[i].first >= 0) return;
          const sampling::MaskAhead* a = masks.of[i] >= 0 ? &masks.ahead[size_t(masks.of[i] + j)] : nullptr;
          count_mask(sm, a);
          try {
            if (sampling::row_mask(sm, a, n, bits) != sampling::MaskKind::kNone) {
              prm.back().mask = int32_t(mask_bits.size() / size_t(mask_words(n)));
              mask_bits.insert(mask_bits.end(), bits.begin(), bits.end());
            }
          } catch (const std::exception& e) {  // the masker's: fails this request where decide reaches the row
            mask_error[i] = {j, e.what()};
          }
        });
      }
      model.backend().sample_rows(t, cfg.vocab_limit, prm, edits, mask_bits, toks);
      for (auto [row, f] : forced) toks[row] = f;
      // The logprobs of the rows that want them, from the logits still on the device: each row's of its sampled
      // token, which for a verified row j (greedy) is the token emitted there if d_1..d_j are accepted. A row with
      // nothing to sample (-1) ends its request in decide; its entry is never read.
      std::vector<int32_t> lrows, chosen;
      int32_t kmax = 0;
      for (size_t i = 0, r = 0; i < sc.seqs.size(); ++i) {
        const ScheduledSeq& x = sc.seqs[i];
        if (!x.samples) continue;
        const int64_t want = x.seq->req->sampling.logprobs;
        if (want >= 0) {
          lp_of[i] = int32_t(lrows.size());
          for (int64_t j = 0; j <= x.num_drafts; ++j) {
            lrows.push_back(int32_t(r + size_t(j)));
            chosen.push_back(std::max(toks[r + size_t(j)], 0));
          }
          kmax = std::max(kmax, int32_t(want));
        }
        r += size_t(x.num_drafts + 1);
      }
      if (!lrows.empty()) {
        model.backend().row_logprobs(t, cfg.vocab_limit, lrows, chosen, kmax, lp_rows);
        lp_stride = 1 + 2 * kmax;
      }
      ++counters.device_sample_steps_total;
      clk.mark(spec ? "sample/verify on device" : "sample on device");
    } else if (!rows.empty()) {
      logits = model.backend().to_host_f32(t);
      clk.mark("logits to host");
    }
    if (!prow.empty()) {
      prompt_logprobs(sc, prow, hidden, plp);
      clk.mark("prompt logprobs");
    }
    if (graphed) ++counters.graph_steps_total;
  } catch (const std::exception& e) {
    for (auto [s, d] : draws) s->sampler.draws = d;  // the recompute draws the same uniforms again
    // The caches of this batch may be half-written: the scheduler recomputes everyone (exact) and retries
    // them one by one, so only the request that fails on its own ends.
    for (Sequence* s : sched.forward_failed(sc)) {
      Delta d;
      d.error = e.what();
      finish(s, FinishReason::Error, std::move(d));
    }
    return;
  }
  ++counters.steps_total;
  {
    const int64_t T = b.num_tokens();
    size_t i = 0;
    while (i < std::size(EngineMetrics::kIterationTokenBounds) && T > EngineMetrics::kIterationTokenBounds[i]) ++i;
    ++counters.iteration_tokens[i];
    counters.iteration_tokens_sum += T;
  }
  for (size_t j = 0; j < prow.size(); ++j) {
    Sequence* s = sc.seqs[prow[j].seq].seq;
    s->prompt_lps.push_back(std::move(plp[j]));
    ++s->prompt_lps_done;
  }
  if (masks.running) {
    join_masks(masks);
    clk.mark("grammar masks (wait)");
  }
  const int64_t V = model.config().text.vocab_size;
  std::vector<DraftJob> jobs;                        // MTP work of the sequences still running
  std::vector<Redo> redo;                            // sequences to roll back after a rejection
  size_t r = 0;
  for (size_t i = 0; i < sc.seqs.size(); ++i) {
    const ScheduledSeq& x = sc.seqs[i];
    const int64_t ctx = x.seq->cache.len;
    int64_t accepted = 0;
    bool alive = true;
    if (x.samples) {
      alive = on_device ? decide(x, nullptr, &accepted, toks.data() + r, nullptr,
                                 lp_of[i] >= 0 ? lp_rows.data() + size_t(lp_of[i]) * size_t(lp_stride) : nullptr,
                                 lp_stride, &mask_error[i])
                        : decide(x, logits.data() + int64_t(r) * V, &accepted, nullptr,
                                 masks.of[i] >= 0 ? &masks.ahead[size_t(masks.of[i])] : nullptr);
      r += size_t(x.num_drafts + 1);
    }
    if (!alive) {  // finished: blocks and slots are back in the pool already, or retiring
      if (!retiring.empty() && retiring.back().seq.get() == x.seq)
        plan_retire(retiring.back(), x, b.seqs[i], ctx, accepted, redo);
      continue;
    }
    const int64_t committed = x.num_tokens + accepted;
    if (x.num_drafts > accepted) {
      redo.push_back({x.seq, committed, b.seqs[i].log_row});  // cache.len advances once the state is rolled back
    } else {
      x.seq->cache.len += committed;
      // A prefill chunk that ends where the scheduler planned a checkpoint (chunks end there; a sampling chunk
      // never does: the positions lie before the prompt's last token).
      std::vector<int64_t>& at = x.seq->save_at;
      while (!at.empty() && at.front() < x.seq->cache.len) at.erase(at.begin());
      if (!at.empty() && at.front() == x.seq->cache.len) {
        cm.save(x.seq->cache, x.seq->req->cache_salt, *x.seq->cache_key());
        at.erase(at.begin());
      }
    }
    if (spec) jobs.push_back({x.seq, ctx, b.seqs[i].q_start, committed, 0});
  }
  clk.mark("accept (host)");
  if (!redo.empty() && !roll_back(redo, graphed)) {
    // Those sequences were preempted (or one failed and is gone): no MTP work for them.
    jobs.erase(std::remove_if(jobs.begin(), jobs.end(),
                              [&](const DraftJob& j) {
                                return std::any_of(redo.begin(), redo.end(), [&](auto& p) { return p.seq == j.seq; });
                              }),
               jobs.end());
  }
  if (!redo.empty()) clk.mark("rollback replay");
  if (!spec) return;
  // Who drafts for the next step, and the blocks its chained drafts and their verify will write.
  for (auto& j : jobs) {
    const bool sampled = j.seq->cache.len + 1 == int64_t(j.seq->tokens.size());
    if (j.rows > 0 && sampled) j.num_drafts = drafts_wanted(j.seq);
  }
  // Retiring sequences: the MTP pass fills their checkpoint's MTP KV (position p is fed token p + 1, the last one the
  // stop token that ended them); one nominal draft keeps the pass in the shape of the others' (proposes nothing).
  for (auto& r : retiring) {
    Sequence* s = r.seq.get();
    if (r.ctx < 0 || r.len <= 0) continue;
    if (int64_t(s->tokens.size()) == r.len && r.next >= 0) s->tokens.push_back(r.next);
    if (int64_t(s->tokens.size()) > r.len) jobs.push_back({s, r.ctx, r.first_row, r.len - r.ctx, 1});
    else r.len = 0;  // the token after them is not known: their MTP KV could not be filled
  }
  try {
    DraftOptions o;
    o.vocab_limit = cfg.vocab_limit;
    o.reduced = cfg.draft_vocab_size > 0;
    o.graphs = graphed;
    o.hook = cfg.draft_hook;
    o.clock = &clk;
    o.device_feed = cfg.device_draft_feed;
    mtp_propose(model, cm, hidden, jobs, o);
    clk.mark("draft: other");
  } catch (const std::exception& e) {
    // Drafts are only proposals: without them the next step is a plain decode, and the MTP KV rows written
    // here are rewritten by the next first pass that covers them.
    std::fprintf(stderr, "deltaserve engine: MTP drafting failed, continuing without drafts: %s\n", e.what());
    for (auto& j : jobs) j.seq->drafts.clear();
    for (auto& r : retiring) r.len = 0;  // their MTP KV may be half-written
  }
}

// Runs the vision tower for each sequence whose chunk reaches its first placeholder row and has no features
// yet (once per request: the features stay with the sequence through preemption). A failure ends only that
// request, which is left out of the returned schedule.
Schedule Engine::Impl::encode_images(const Schedule& sc) {
  Schedule out = sc;
  out.seqs.clear();
  for (const ScheduledSeq& x : sc.seqs) {
    Sequence* s = x.seq;
    const MultiModalInput* mm = s->req->mm.get();
    if (mm && !s->mm_features.data && x.num_tokens > 0) {
      // Through the row after the chunk: the MTP pass of speculative decoding feeds each row the next row's token.
      const int64_t lo = s->cache.len, hi = lo + x.num_tokens;
      if (std::any_of(mm->rows.begin(), mm->rows.end(), [&](int32_t r) { return r >= lo && r <= hi; })) {
        try {
          s->mm_features = model.encode_images(mm->pixel_values, mm->grids);
          if (s->mm_features.dim(0) != int64_t(mm->rows.size()))
            fail("vision tower returned ", s->mm_features.dim(0), " feature rows for ", mm->rows.size(), " placeholders");
        } catch (const std::exception& e) {
          s->mm_features = Tensor{};
          Delta d;
          d.error = std::string("image encoding failed: ") + e.what();
          finish(s, FinishReason::Error, std::move(d));
          continue;
        }
      }
    }
    out.seqs.push_back(x);
  }
  return out;
}

// Image sequences of the batch: mRoPE positions for every row and their features in place of the placeholder rows'
// embeddings (place_mm_rows).
void Engine::Impl::place_images(const Schedule& sc, BatchMeta& b) {
  std::vector<const Sequence*> seqs;
  for (const ScheduledSeq& x : sc.seqs) seqs.push_back(x.seq);
  place_mm_rows(model.backend(), model.config().text.hidden_size, seqs, b, 0);
}

// Copies the grammar position of every sampled row that a grammar masks (sampling::mask_ahead) and starts computing
// their masks on the workers: plain decode rows and prefill chunks that sample alike (not a forced row, whose token
// needs no mask), and every row of a verifying sequence with a grammar, at the position its drafts reach (accepted on
// trial: SeqSampler::mark / undo; the rows after a draft its grammar refuses are never decided and get no mask).
// Rows at the same position of the same grammar (same masker, grammar, matcher state, close and end ids) share one
// computation; their copies are filled after the wait.
void Engine::Impl::start_masks(const Schedule& sc, StepMasks& m) {
  m.of.assign(sc.seqs.size(), -1);
  if (!cfg.parallel_masks) return;
  std::vector<uint64_t> ids;  // request id per mask (the test hook)
  std::unordered_map<std::string, int32_t> seen;
  auto add = [&](const ScheduledSeq& x, const sampling::SeqSampler& sm, bool refused) {  // sm's position's mask
    const int32_t k = int32_t(m.ahead.size());
    m.ahead.push_back(refused ? sampling::MaskAhead{} : sampling::mask_ahead(sm));
    if (refused) m.ahead.back().done = true;  // never read: no mask
    ids.push_back(x.seq->req->id);
    int32_t lead = -1;
    if (!m.ahead.back().done && sm.matcher && !cfg.mask_hook) {
      const sampling::SamplingParams& p = sm.params;
      const void* ptrs[2] = {p.masker.get(), sm.matcher->grammar().get()};
      std::string key(reinterpret_cast<const char*>(ptrs), sizeof(ptrs));
      const int32_t head[2] = {p.grammar_close, int32_t(p.end_ids.size())};
      key.append(reinterpret_cast<const char*>(head), sizeof(head));
      key.append(reinterpret_cast<const char*>(p.end_ids.data()), p.end_ids.size() * sizeof(int32_t));
      key += '|';
      key += sm.matcher->state_key();
      auto [it, fresh] = seen.emplace(std::move(key), k);
      if (!fresh) lead = it->second;
    }
    m.leader.push_back(lead);
  };
  for (size_t i = 0; i < sc.seqs.size(); ++i) {
    const ScheduledSeq& x = sc.seqs[i];
    sampling::SeqSampler& sm = x.seq->sampler;
    if (!x.samples || sm.forced() >= 0) continue;
    if (x.num_drafts == 0 ? !sm.grammar_masked() : !sm.params.grammar) continue;
    m.of[i] = int32_t(m.ahead.size());
    sampling::for_each_draft_prefix(sm, x.seq->drafts.data(), x.num_drafts,
                                    [&](int64_t, bool reached) { add(x, sm, !reached); });
  }
  // Only the leaders still to compute are jobs. Each job writes its own MaskAhead and reads nothing else that changes:
  // the copies made here, the grammar (immutable), the masker (its cache is mutex-guarded) and the config.
  std::vector<size_t> jobs;
  for (size_t k = 0; k < m.ahead.size(); ++k)
    if (m.leader[k] < 0 && !m.ahead[k].done) jobs.push_back(k);
  if (jobs.empty()) return;
  sampling::MaskAhead* ahead = m.ahead.data();  // not resized until joined
  mask_workers.start(jobs.size(), [this, ahead, ids = std::move(ids), jobs](size_t j) {
    sampling::MaskAhead& a = ahead[jobs[j]];
    if (cfg.mask_hook) {
      try {
        cfg.mask_hook(ids[jobs[j]]);
      } catch (...) {
        a.error = std::current_exception();
        a.done = true;
        return;
      }
    }
    a.compute();  // catches the masker's exceptions into a.error
  });
  m.running = true;
}

// Waits for the step's masks and gives the rows that share a leader's position its result.
void Engine::Impl::join_masks(StepMasks& m) {
  if (!m.running) return;
  mask_workers.wait();
  m.running = false;
  for (size_t k = 0; k < m.ahead.size(); ++k)
    if (const int32_t l = m.leader[k]; l >= 0) {
      const sampling::MaskAhead& src = m.ahead[size_t(l)];
      sampling::MaskAhead& a = m.ahead[k];
      a.constrained = src.constrained;
      a.bits = src.bits;
      a.error = src.error;
      a.done = src.done;
    }
}

// Drafts worth proposing: never more than the tokens the request may still produce minus the one the verify
// adds anyway, so a verify never runs past max_tokens or max_model_len; 0 when the pool cannot hold them.
int64_t Engine::Impl::drafts_wanted(Sequence* s) {
  const int64_t left = std::min(s->req->max_tokens - s->num_generated(), cfg.max_model_len - int64_t(s->tokens.size()));
  int64_t k = std::min(cfg.num_speculative_tokens, left - 1);
  // Constrained sequences (grammars, allowed_token_ids) are speculated too: each verified row is masked at the
  // position the drafts before it reach (start_masks, verify_draft), the grammar's position moving only with tokens
  // decided one by one. A thinking budget: no verified row may be the one whose token is forced (SeqSampler::forced:
  // decided without a draw, never compared with a draft).
  if (k <= 0) return 0;
  k = std::min(k, s->sampler.budget_left() - 1);
  if (k <= 0) return 0;
  // Positions len .. len + k (the verify); the chained MTP steps write len .. len + k − 2.
  return cm.reserve(s->cache, k + 1) ? k : 0;
}

// Decides the tokens of one sampled chunk: the sampled token, or with drafts each verified position in turn
// (the sampler sees the accepted ones, so penalties are exact) and the bonus token when all pass. `sampled`: the
// tokens Backend::sample_rows chose for the chunk's rows (with drafts: d_{j+1} is accepted iff it is row j's choice,
// the argmax or rejection sampling's; -1: nothing left to sample), `rows` unused; null: decide from the logit rows on
// the host.
bool Engine::Impl::decide(const ScheduledSeq& x, const float* rows, int64_t* accepted, const int32_t* sampled,
                          const sampling::MaskAhead* masks, const float* lp_row, int32_t lp_stride,
                          const std::pair<int64_t, std::string>* mask_error) {
  Sequence* s = x.seq;
  const int64_t V = model.config().text.vocab_size;
  const bool want_lp = s->req->sampling.logprobs >= 0;
  std::vector<int32_t> toks;
  std::vector<sampling::TokenLogprob> lps;
  int64_t a = 0;
  try {
    for (int64_t j = 0; j <= x.num_drafts; ++j) {
      sampling::TokenLogprob lp;
      const float* row = rows + j * V;
      bool ok = false;
      if (sampled) {
        if (mask_error && mask_error->first == j) fail(mask_error->second);
        const int32_t tok = sampled[j];
        if (tok < 0) fail(sampling::nothing_left(sampling::mask_kind(s->sampler)));
        s->sampler.accept(tok);
        toks.push_back(tok);
        if (want_lp) {
          DS_CHECK(lp_row, "device sampling: logprobs wanted but not computed");
          const int64_t n = cfg.vocab_limit > 0 ? std::min<int64_t>(cfg.vocab_limit, V) : V;
          sampling::set_logprobs(lp_row + j * lp_stride, tok, int32_t(std::min<int64_t>(s->req->sampling.logprobs, n)), lp);
          lps.push_back(std::move(lp));
        }
        if (j < x.num_drafts && tok != s->drafts[size_t(j)]) {
          // Rejection sampling drew a uniform per row ahead (next_row): a rejection at row j used j + 2 of the k + 1.
          if (!sampling::is_greedy(s->req->sampling)) s->sampler.draws -= uint64_t(x.num_drafts - j - 1);
          break;
        }
        if (j == x.num_drafts) break;
        ++a;
        continue;
      }
      // sample() and verify_draft use a mask made ahead only where it is this position's, else recompute it.
      const sampling::MaskAhead* mask = masks ? masks + j : nullptr;
      count_mask(s->sampler, mask);
      const int32_t tok =
          j < x.num_drafts
              ? sampling::verify_draft(row, V, cfg.vocab_limit, s->sampler, s->drafts[size_t(j)], nullptr, &ok,
                                       want_lp ? &lp : nullptr, mask)
              : sampling::sample(row, V, cfg.vocab_limit, s->sampler, want_lp ? &lp : nullptr, mask);
      s->sampler.accept(tok);
      toks.push_back(tok);
      if (want_lp) lps.push_back(std::move(lp));
      if (!ok) break;
      ++a;
    }
  } catch (const std::exception& e) {
    Delta d;
    d.error = std::string("sampling: ") + e.what();
    finish(s, FinishReason::Error, std::move(d));
    return false;
  }
  if (x.num_drafts > 0) {
    ++counters.spec_num_drafts_total;
    counters.spec_draft_tokens_total += x.num_drafts;
    counters.spec_accepted_tokens_total += a;
    for (int64_t j = 0; j < a; ++j) ++counters.spec_accepted_per_pos[size_t(j)];
  }
  *accepted = a;
  s->drafts.clear();
  return emit(s, toks, lps);
}

// DeltaNet state cannot be un-appended: the sequences that rejected a draft go back to their snapshot and advance
// it over their accepted rows [last token, d_1..d_a] again, from the verify's DeltaNet inputs in the input log: only
// conv1d + the gated delta rule of each linear-attention layer run (Model::replay_deltanet), all sequences in one
// batch. The verify already wrote the attention KV of the accepted positions; the rejected positions' KV is
// overwritten by later steps.
bool Engine::Impl::roll_back(const std::vector<Redo>& redo, bool graphed) {
  BatchMeta b;
  Schedule sc;
  for (const Redo& r : redo) {
    DS_CHECK(r.log_row >= 0, "speculative rollback: the verify did not log its DeltaNet inputs");
    cm.rollback(r.seq->cache);
    BatchMeta::Seq s;
    s.q_len = r.rows;
    s.ctx_len = r.seq->cache.len;
    s.state_slot = r.seq->cache.slot;
    s.log_row = r.log_row;
    b.seqs.push_back(std::move(s));
    sc.seqs.push_back({r.seq, r.rows, false, 0});
  }
  try {
    model.replay_deltanet(b, cm.caches(), graphed);
  } catch (const std::exception& e) {
    // Same containment as a failing step: recompute everyone from their tokens, the culprit alone. Retiring
    // sequences keep nothing.
    for (auto& r : retiring) r.len = 0;
    Schedule live;
    for (const ScheduledSeq& x : sc.seqs)
      if (!x.seq->retiring) live.seqs.push_back(x);
    if (!live.empty())
      for (Sequence* s : sched.forward_failed(live)) {
        Delta d;
        d.error = e.what();
        finish(s, FinishReason::Error, std::move(d));
      }
    return false;
  }
  for (const Redo& r : redo) r.seq->cache.len += r.rows;
  return true;
}

void Engine::Impl::prompt_logprobs(const Schedule& sc, const std::vector<PromptRow>& rows, const Tensor& hidden,
                                   std::vector<sampling::TokenLogprob>& out) {
  Backend& be = model.backend();
  const int64_t V = model.config().text.vocab_size, n = std::min(cfg.vocab_limit, V), H = hidden.dim(1);
  out.assign(rows.size(), {});
  const size_t per = size_t(std::max<int64_t>(1, env_int("DS_PROMPT_LOGPROB_ROWS", Engine::kPromptLogprobRows)));
  for (size_t a = 0; a < rows.size(); a += per) {
    const size_t e = std::min(rows.size(), a + per);
    const int32_t R = int32_t(e - a);
    std::vector<int32_t> hrows, local, chosen;
    int32_t k = 0;
    for (size_t j = a; j < e; ++j) {
      hrows.push_back(rows[j].row);
      local.push_back(int32_t(j - a));
      chosen.push_back(rows[j].next);
      k = std::max(k, sc.seqs[rows[j].seq].seq->req->prompt_logprobs);
    }
    Tensor hs = be.alloc(hidden.dtype, {R, H});
    be.gather_rows(hidden, hrows, hs);
    const Tensor logits = model.lm_head_logits(hs);
    const int32_t stride = 1 + 2 * k;
    std::vector<float> lp;
    std::vector<int32_t> rank;
    if (be.has_row_logprobs() && k <= Backend::kMaxRowTopLogprobs) {
      be.row_logprobs(logits, n, local, chosen, k, lp);
      be.row_ranks(logits, n, local, chosen, rank);
    } else {
      const std::vector<float> z = be.to_host_f32(logits);
      lp.assign(size_t(R) * size_t(stride), 0.f);
      rank.assign(size_t(R), 0);
      for (int32_t j = 0; j < R; ++j) {
        const float* row = z.data() + int64_t(j) * V;
        cpu::row_logprobs(row, n, chosen[size_t(j)], k, lp.data() + size_t(j) * size_t(stride));
        rank[size_t(j)] = cpu::row_rank(row, n, chosen[size_t(j)]);
      }
    }
    for (int32_t j = 0; j < R; ++j) {
      sampling::TokenLogprob& t = out[a + size_t(j)];
      const float* o = lp.data() + size_t(j) * size_t(stride);
      t.token = chosen[size_t(j)];
      t.logprob = o[0];
      t.rank = rank[size_t(j)];
      const int64_t want = std::min<int64_t>(sc.seqs[rows[a + size_t(j)].seq].seq->req->prompt_logprobs, n);
      for (int64_t q = 0; q < want; ++q) t.top.push_back({int32_t(o[1 + 2 * q]), o[2 + 2 * q]});
    }
  }
}

// Reports the decided tokens in one Delta, cut at the first that ends the request (EOS / stop id: reported as
// stop_token; max_tokens or max_model_len). Returns whether the sequence is still running.
bool Engine::Impl::emit(Sequence* s, const std::vector<int32_t>& toks, std::vector<sampling::TokenLogprob>& lps) {
  const Request& req = *s->req;
  const bool want_lp = req.sampling.logprobs >= 0;
  s->suspect = false;
  if (!s->prompt_counted) {
    s->prompt_counted = true;
    counters.prompt_tokens_total += s->prompt_len;
  }
  Delta d;
  if (s->completion_tokens == 0 && !toks.empty()) {  // the request's first token
    using secs = std::chrono::duration<double>;
    d.queue_seconds = secs(s->admitted - s->submitted).count();
    d.prefill_seconds = secs(std::chrono::steady_clock::now() - s->admitted).count();
    d.prompt_logprobs = std::move(s->prompt_lps);
  }
  for (size_t i = 0; i < toks.size(); ++i) {
    const int32_t tok = toks[i];
    ++s->completion_tokens;
    ++counters.generation_tokens_total;
    const bool stop = (!req.ignore_eos && std::binary_search(cfg.eos_token_ids.begin(), cfg.eos_token_ids.end(), tok)) ||
                      std::find(req.stop_token_ids.begin(), req.stop_token_ids.end(), tok) != req.stop_token_ids.end();
    if (stop) {
      d.stop_token = tok;
      finish(s, FinishReason::Stop, std::move(d));
      return false;
    }
    s->tokens.push_back(tok);
    d.tokens.push_back(tok);
    if (want_lp) d.logprobs.push_back(std::move(lps[i]));
    if (s->num_generated() >= req.max_tokens || int64_t(s->tokens.size()) >= cfg.max_model_len) {
      finish(s, FinishReason::Length, std::move(d));
      return false;
    }
    if (req.repetition.max_pattern > 0 && s->num_generated() >= req.sampling.min_tokens &&
        repeats_at_end(s->tokens.data() + s->prompt_len, s->num_generated(), req.repetition)) {
      finish(s, FinishReason::Repetition, std::move(d));
      return false;
    }
  }
  d.prompt_tokens = s->prompt_len;
  d.completion_tokens = s->completion_tokens;
  d.cached_tokens = std::max<int64_t>(s->cached_tokens, 0);
  d.cache_lookup = s->lookup;
  req.out->push(std::move(d));
  return true;
}

void Engine::Impl::finish(Sequence* s, FinishReason r, Delta d) {
  // Blocks and slot back to the pool now, or (prefix caching, a text sequence that did not fail) kept until the end
  // of the step, to become a checkpoint.
  const bool keep = sched.cacheable(s) && r != FinishReason::Error && !s->suspect && s->cache.slot >= 0;
  const int32_t next = d.stop_token;
  std::unique_ptr<Sequence> own = sched.remove(s, !keep);
  d.finish = r;
  d.prompt_tokens = own->prompt_len;
  d.completion_tokens = own->completion_tokens;
  d.cached_tokens = std::max<int64_t>(own->cached_tokens, 0);
  d.cache_lookup = own->lookup;
  ++counters.requests_finished[int(r)];
  {
    std::lock_guard<std::mutex> l(mu);
    live.erase(own->req->id);
  }
  own->req->out->push(std::move(d));
  if (keep) {
    own->retiring = true;
    retiring.push_back({std::move(own), next});
  }
}

void Engine::Impl::plan_retire(Retiring& r, const ScheduledSeq& x, const BatchMeta::Seq& bs, int64_t ctx,
                               int64_t accepted, std::vector<Redo>& redo) {
  Sequence* s = r.seq.get();
  const int64_t ran = ctx + x.num_tokens + x.num_drafts;  // the state is past every row the forward ran
  r.ctx = ctx;
  r.first_row = bs.q_start;
  r.len = std::min<int64_t>(ctx + x.num_tokens + accepted, int64_t(s->tokens.size()));
  if (r.len < ran) redo.push_back({s, r.len - ctx, bs.log_row});  // back to the snapshot, then the kept rows again
  else s->cache.len = r.len;
}

void Engine::Impl::settle_retiring() {
  for (Retiring& r : retiring) {
    SeqCache& c = r.seq->cache;
    if (r.len >= 0) c.len = r.len;
    try {
      if (c.len > 0) cm.retire(c, r.seq->req->cache_salt, *r.seq->cache_key());
    } catch (const std::exception& e) {
      std::fprintf(stderr, "deltaserve engine: keeping a finished sequence's prefix-cache checkpoint failed: %s\n",
                   e.what());
    }
    cm.release(c);  // (retire() released it already: a no-op then)
  }
  retiring.clear();
}

void Engine::Impl::publish(const Schedule& s) {
  counters.preemptions_total += s.num_preempted;
  std::lock_guard<std::mutex> l(mu);
  EngineMetrics m = counters;
  m.running = sched.num_running();
  m.waiting = sched.num_waiting();
  m.kv_blocks_total = cm.num_blocks();
  m.kv_blocks_used = cm.num_blocks() - cm.free_blocks() - cm.cached_blocks();  // checkpoints' blocks are evictable
  m.kv_blocks_cached = cm.cached_blocks();
  m.slots_total = cm.num_slots();
  m.slots_used = cm.num_slots() - cm.free_slots();
  m.prefix_cache_queries_total = sched.prefix_queries();
  m.prefix_cache_hits_total = sched.prefix_hits();
  m.prefix_cache_host_hits_total = sched.prefix_host_hits();
  m.prefix_cache_checkpoints = cm.num_checkpoints();
  m.prefix_cache_host_checkpoints = cm.host_checkpoints();
  snap = m;
}

}  // namespace ds::runtime
