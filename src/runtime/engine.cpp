// The engine loop: schedule → forward → sample → post-process, one thread, continuous batching.
//
// Threads: submit() and abort() run on HTTP threads and only touch the hand-off state under `mu`
// (pending sequences, abort ids, live ids, the metrics snapshot). Everything else — scheduler, caches,
// sequences — belongs to whoever runs step(): the engine thread, or a test calling step() directly.
#include "runtime/engine.h"

#include <algorithm>
#include <cstdio>
#include <unordered_map>

#include "core/status.h"
#include "runtime/scheduler.h"

namespace ds::runtime {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::None: return "none";
    case FinishReason::Stop: return "stop";
    case FinishReason::Length: return "length";
    case FinishReason::Abort: return "abort";
    case FinishReason::Error: return "error";
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
  std::sort(c.eos_token_ids.begin(), c.eos_token_ids.end());
  return c;
}

}  // namespace

struct Engine::Impl {
  Impl(model::Model& m, const EngineConfig& c)
      : model(m), cfg(c), cm(m, c.num_blocks, c.block_size, c.max_num_seqs), sched(cm, c.max_num_seqs, c.max_num_batched_tokens) {
    snap.kv_blocks_total = c.num_blocks;
    snap.slots_total = c.max_num_seqs;
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

  bool take_inbox();
  void run(const Schedule& s);
  void emit(Sequence* s, const float* logits_row);
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
  impl_->publish({});
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
  const Schedule s = impl_->sched.schedule();  // who runs, how many tokens each
  if (!s.empty()) impl_->run(s);               // forward, sample, emit deltas, free finished
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

void Engine::Impl::run(const Schedule& sc) {
  std::vector<std::pair<const SeqCache*, std::vector<int32_t>>> parts;
  for (auto& x : sc.seqs) {
    auto first = x.seq->tokens.begin() + x.seq->cache.len;
    parts.push_back({&x.seq->cache, std::vector<int32_t>(first, first + x.num_tokens)});
  }
  BatchMeta b = make_batch(parts);
  std::vector<int32_t> rows;  // the last row of every chunk that completes its sequence's tokens
  for (size_t i = 0; i < sc.seqs.size(); ++i)
    if (sc.seqs[i].samples) rows.push_back(int32_t(b.seqs[i].q_start + b.seqs[i].q_len - 1));
  std::vector<float> logits;  // fp32 [R, V]
  try {
    // A step of prefill chunks only still asks for one row: backends need not handle R = 0.
    Tensor t = model.forward(b, cm.caches(), rows.empty() ? std::vector<int32_t>{0} : rows);
    logits = model.backend().to_host_f32(t);
  } catch (const std::exception& e) {
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
  const int64_t V = model.config().text.vocab_size;
  size_t r = 0;
  for (auto& x : sc.seqs) {
    x.seq->cache.len += x.num_tokens;
    if (x.samples) emit(x.seq, logits.data() + int64_t(r++) * V);
  }
}

void Engine::Impl::emit(Sequence* s, const float* row) {
  const Request& req = *s->req;
  const bool want_lp = req.sampling.logprobs >= 0;
  sampling::TokenLogprob lp;
  int32_t tok;
  try {
    tok = sampling::sample(row, model.config().text.vocab_size, cfg.vocab_limit, s->sampler, want_lp ? &lp : nullptr);
  } catch (const std::exception& e) {
    Delta d;
    d.error = std::string("sampling: ") + e.what();
    finish(s, FinishReason::Error, std::move(d));
    return;
  }
  s->suspect = false;
  if (!s->prompt_counted) {
    s->prompt_counted = true;
    counters.prompt_tokens_total += s->prompt_len;
  }
  ++s->completion_tokens;
  ++counters.generation_tokens_total;

  Delta d;
  const bool stop = (!req.ignore_eos && std::binary_search(cfg.eos_token_ids.begin(), cfg.eos_token_ids.end(), tok)) ||
                    std::find(req.stop_token_ids.begin(), req.stop_token_ids.end(), tok) != req.stop_token_ids.end();
  if (stop) {
    d.stop_token = tok;
    finish(s, FinishReason::Stop, std::move(d));
    return;
  }
  s->tokens.push_back(tok);
  s->sampler.accept(tok);
  d.tokens = {tok};
  if (want_lp) d.logprobs = {std::move(lp)};
  if (s->num_generated() >= req.max_tokens || int64_t(s->tokens.size()) >= cfg.max_model_len) {
    finish(s, FinishReason::Length, std::move(d));
    return;
  }
  d.prompt_tokens = s->prompt_len;
  d.completion_tokens = s->completion_tokens;
  req.out->push(std::move(d));
}

void Engine::Impl::finish(Sequence* s, FinishReason r, Delta d) {
  std::unique_ptr<Sequence> own = sched.remove(s);  // blocks and slot back to the pool now
  d.finish = r;
  d.prompt_tokens = own->prompt_len;
  d.completion_tokens = own->completion_tokens;
  ++counters.requests_finished[int(r)];
  {
    std::lock_guard<std::mutex> l(mu);
    live.erase(own->req->id);
  }
  own->req->out->push(std::move(d));
}

void Engine::Impl::publish(const Schedule& s) {
  counters.preemptions_total += s.num_preempted;
  std::lock_guard<std::mutex> l(mu);
  EngineMetrics m = counters;
  m.running = sched.num_running();
  m.waiting = sched.num_waiting();
  m.kv_blocks_total = cm.num_blocks();
  m.kv_blocks_used = cm.num_blocks() - cm.free_blocks();
  m.slots_total = cm.num_slots();
  m.slots_used = cm.num_slots() - cm.free_slots();
  snap = m;
}

}  // namespace ds::runtime
