#include "runtime/scheduler.h"

#include <algorithm>

#include "core/status.h"
#include "runtime/engine.h"

namespace ds::runtime {

Scheduler::Scheduler(CacheManager& cm, int64_t max_num_seqs, int64_t max_num_batched_tokens, bool prefix_caching,
                     int64_t checkpoint_interval)
    : cm_(cm),
      max_num_seqs_(max_num_seqs),
      max_num_batched_tokens_(max_num_batched_tokens),
      prefix_caching_(prefix_caching && cm.checkpoint_capacity() > 0),
      interval_(std::max<int64_t>(0, checkpoint_interval)) {}

int64_t Scheduler::chunk(const Sequence* s, int64_t budget) const {
  int64_t n = std::min(s->pending_tokens(), budget);
  for (int64_t at : s->save_at)
    if (at > s->cache.len) {
      n = std::min(n, at - s->cache.len);
      break;
    }
  return n;
}

// Where a checkpoint pays off: the last block boundary before the prompt's last token (the same prompt again, or a
// longer conversation that starts with it, resumes there with at least one token to run); the request's hints
// (the server's: where a chat's second and last messages start, so a shared system prompt and the history before
// the newest message are kept); and the block boundary at or before the point where the prompt leaves the
// longest checkpoint it shares tokens with (prompts that share a head the hints do not mark: the second such
// request leaves a checkpoint the third resumes from). All rounded down to block boundaries.
// Images and videos: compared by Sequence::cache_key (each placeholder row keyed by its image's content), so a
// conversation that sends the same image again resumes past it; prompts whose images have no hashes neither resume
// nor leave checkpoints.
// A sequence that still owes prompt logprobs runs every prompt row, so it leaves checkpoints but resumes from none.
void Scheduler::admit_from_cache(Sequence* s) {
  s->save_at.clear();
  if (s->cached_tokens < 0) s->lookup = CacheLookup{};
  const std::vector<int32_t>* key = prefix_caching_ ? s->cache_key() : nullptr;
  if (!key) return;
  const std::string& salt = s->req->cache_salt;
  const int64_t bs = cm_.block_size();
  const PrefixHit h = s->prompt_lps_pending() ? PrefixHit{} : cm_.lookup(salt, *key, int64_t(key->size()) - 1);
  const bool hit = h.entry >= 0 && cm_.attach(s->cache, h);  // false (no block for a partial block's copy): a miss
  if (s->cached_tokens < 0) s->lookup = {!s->prompt_lps_pending(), h.common, hit && h.host};
  const int64_t end = (s->prompt_len - 1) / bs * bs;
  std::vector<int64_t> at = {h.common, end};
  at.insert(at.end(), s->req->cache_hints.begin(), s->req->cache_hints.end());
  // Every interval_ tokens too: a prompt that leaves this one anywhere (an edited message, a changed tool result)
  // resumes at most interval_ tokens before that point.
  if (interval_ > 0)
    for (int64_t p = (s->cache.len / interval_ + 1) * interval_; p < end; p += interval_) at.push_back(p);
  for (int64_t p : at) {
    p = p / bs * bs;
    if (p > s->cache.len && p <= end) s->save_at.push_back(p);
  }
  std::sort(s->save_at.begin(), s->save_at.end());
  s->save_at.erase(std::unique(s->save_at.begin(), s->save_at.end()), s->save_at.end());
}

// After an admission that got its blocks: the first one of a request sets what it took from a checkpoint (an
// admission that could not get its blocks is undone and not counted).
void Scheduler::count_admission(Sequence* s) {
  if (s->cached_tokens >= 0) return;
  s->cached_tokens = s->cache.len;
  s->admitted = std::chrono::steady_clock::now();
  if (!cacheable(s)) return;
  prefix_queries_ += s->prompt_len;
  prefix_hits_ += s->cache.len;
  if (s->lookup.from_host) prefix_host_hits_ += s->cache.len;
}

bool Sequence::keyed() const { return !req->mm || req->mm->hashes.size() == req->mm->grids.size(); }

const std::vector<int32_t>* Sequence::cache_key() const {
  const MultiModalInput* mm = req->mm.get();
  if (!mm) return &tokens;
  if (!keyed()) return nullptr;
  // Tokens are only ever appended (the placeholders lie in the prompt): once built, the key takes the new ones.
  DS_CHECK(key_.size() <= tokens.size(), "cache_key: ", key_.size(), " keyed tokens of ", tokens.size());
  if (!key_.empty()) {
    key_.insert(key_.end(), tokens.begin() + std::ptrdiff_t(key_.size()), tokens.end());
    return &key_;
  }
  key_ = tokens;
  // Patches per placeholder row (the merge size squared, the same for every grid; check_mm made the counts agree).
  int64_t patches = 0;
  for (const auto& g : mm->grids) patches += g[0] * g[1] * g[2];
  const int64_t per_row = mm->rows.empty() ? 1 : std::max<int64_t>(1, patches / int64_t(mm->rows.size()));
  size_t f = 0;
  for (size_t k = 0; k < mm->grids.size(); ++k) {
    const auto& g = mm->grids[k];
    const int64_t n = g[0] * g[1] * g[2] / per_row;
    for (int64_t j = 0; j < n && f < mm->rows.size(); ++j, ++f) {
      uint64_t x = (mm->hashes[k] ^ uint64_t(j) * 0x9E3779B97F4A7C15ull) * 0xC2B2AE3D27D4EB4Full;
      x ^= x >> 29;
      key_[size_t(mm->rows[f])] = -1 - int32_t(x & 0x3FFFFFFF);
    }
  }
  return &key_;
}

bool Sequence::prompt_lps_pending() const {
  return req->prompt_logprobs >= 0 && prompt_lps_done < prompt_len - 1;
}

void Scheduler::add(std::unique_ptr<Sequence> s) { waiting_.push_back(std::move(s)); }

Schedule Scheduler::schedule() {
  // A suspect runs alone until it has been recomputed and sampled, so a failing forward names its culprit.
  for (auto* q : all())
    if (q->suspect) return schedule_alone(q);

  Schedule out;
  int64_t budget = max_num_batched_tokens_;
  Sequence* urgent = make_room(out);
  for (size_t i = 0; i < running_.size() && budget > 0;) {
    Sequence* s = running_[i].get();
    const int64_t n = chunk(s, budget);
    if (n <= 0) {
      ++i;
      continue;
    }
    // Drafts ride along when the chunk reaches the end of the tokens and the budget has room for them.
    // (The engine reserved their blocks when it proposed them; if that is short, speculation waits, rather than
    // preempting someone.)
    int64_t nd = n == s->pending_tokens() ? std::min<int64_t>(int64_t(s->drafts.size()), budget - n) : 0;
    if (nd > 0 && !cm_.reserve(s->cache, n + nd)) nd = 0;
    bool self = false;
    while (!self && !cm_.reserve(s->cache, n + nd)) {
      // The victim is always at an index >= i: the sequences already in `out` keep their blocks.
      const size_t v = victim(i, nullptr);
      self = running_[v].get() == s;
      preempt(v);
      ++out.num_preempted;
    }
    if (self) continue;  // running_[i] is the next one now (with equal priorities s was the last: the loop ends)
    out.seqs.push_back({s, n, s->cache.len + n == int64_t(s->tokens.size()), nd});
    budget -= n + nd;
    ++i;
  }
  // Admit by priority, then in queue order (preempted sequences first, then arrival), while everything fits; a step
  // that had to preempt admits nobody (it would only take back what was just freed), except the urgent sequence
  // make_room() preempted for.
  // Prefix caching: a sequence whose prompt a running sequence is prefilling toward a checkpoint waits for it.
  while (budget > 0 && !waiting_.empty() && num_running() < max_num_seqs_) {
    auto next = pick();
    if (next == waiting_.end()) break;
    Sequence* s = next->get();
    if (out.num_preempted > 0 && s != urgent) break;
    if (!cm_.start(s->cache)) break;
    admit_from_cache(s);
    const int64_t n = chunk(s, budget);
    if (!cm_.reserve(s->cache, n)) {
      cm_.release(s->cache);
      break;
    }
    count_admission(s);
    running_.push_back(std::move(*next));
    waiting_.erase(next);
    out.seqs.push_back({s, n, s->cache.len + n == int64_t(s->tokens.size())});
    budget -= n;
  }
  return out;
}

// The waiting sequence admission takes next: the smallest priority value, queue order among equals, not deferred.
// (At most 32 deferral checks per pick: each compares token heads, and a queue of requests behind one long head is
// admitted as soon as its checkpoint exists anyway.)
std::deque<std::unique_ptr<Sequence>>::iterator Scheduler::pick() {
  auto next = waiting_.end();
  int checks = 0;
  for (auto it = waiting_.begin(); it != waiting_.end() && checks < 32; ++it)
    if (next == waiting_.end() || (*it)->req->priority < (*next)->req->priority) {
      if (!deferred(it->get())) next = it;
      else ++checks;
    }
  return next;
}

// A waiting sequence more urgent than a running one does not wait for it to finish: while the next sequence to admit
// has no slot (max_num_seqs running, or no state slot free) or not enough blocks for its first chunk beside what the
// running sequences need for theirs, the least urgent running sequence (largest priority value, most recently
// started among equals) is preempted, as long as it is strictly less urgent. Returns the sequence it preempted for
// (nullptr: none), which this step then admits.
Sequence* Scheduler::make_room(Schedule& out) {
  if (waiting_.empty() || running_.empty()) return nullptr;
  auto next = pick();
  if (next == waiting_.end()) return nullptr;
  Sequence* w = next->get();
  int64_t preempted = 0;
  while (!running_.empty()) {
    const size_t v = victim(0, nullptr);
    if (running_[v]->req->priority <= w->req->priority) break;
    const bool slot = num_running() < max_num_seqs_ && cm_.free_slots() > 0;
    int64_t need = cm_.blocks_short(w->cache, std::min(w->pending_tokens(), max_num_batched_tokens_));
    for (const auto& r : running_)
      need += cm_.blocks_short(r->cache, std::min(r->pending_tokens(), max_num_batched_tokens_) + int64_t(r->drafts.size()));
    if (slot && need <= cm_.free_blocks() + cm_.cached_blocks()) break;
    preempt(v);
    ++out.num_preempted;
    ++preempted;
  }
  return preempted > 0 ? w : nullptr;
}

Schedule Scheduler::schedule_alone(Sequence* s) {
  Schedule out;
  auto last_other = [&]() -> size_t {
    if (running_.empty() || (running_.size() == 1 && running_[0].get() == s))
      fail("scheduler: sequence ", s->req->id, " needs more KV blocks than the whole pool holds");
    return victim(0, s);
  };
  auto w = std::find_if(waiting_.begin(), waiting_.end(), [&](auto& p) { return p.get() == s; });
  if (w != waiting_.end()) {
    std::unique_ptr<Sequence> own = std::move(*w);
    waiting_.erase(w);
    while (cm_.free_slots() == 0 || num_running() >= max_num_seqs_) {
      if (running_.empty()) {  // cannot happen with a valid config; keep the sequence, not the loop
        waiting_.push_front(std::move(own));
        fail("scheduler: no state slot available (max_num_seqs ", max_num_seqs_, ", slots ", cm_.num_slots(), ")");
      }
      preempt(victim(0, nullptr));
      ++out.num_preempted;
    }
    DS_CHECK(cm_.start(s->cache));
    admit_from_cache(s);
    running_.push_back(std::move(own));
  }
  const int64_t n = chunk(s, max_num_batched_tokens_);
  while (!cm_.reserve(s->cache, n)) {
    preempt(last_other());
    ++out.num_preempted;
  }
  count_admission(s);
  out.seqs.push_back({s, n, s->cache.len + n == int64_t(s->tokens.size())});
  return out;
}

// Concurrent requests that share a long head (n > 1 choices of one prompt; an agent's parallel calls behind one
// system prompt): the first one admitted plans checkpoints (admit_from_cache); the others, admitted at once, would
// each prefill the shared head again. Instead a waiting sequence waits while a running one is still prefilling
// toward a planned checkpoint that it shares (same salt, same tokens up to there, and further than any checkpoint
// it could resume from now), and resumes from that checkpoint once it is saved.
bool Scheduler::deferred(const Sequence* s) const {
  if (!cacheable(s) || s->prompt_lps_pending()) return false;
  const std::vector<int32_t>& key = *s->cache_key();  // (the others' cache_key() fill their own buffers)
  const int64_t limit = int64_t(key.size()) - 1;
  int64_t best = 0;
  for (const auto& r : running_) {
    if (r->req->cache_salt != s->req->cache_salt || !cacheable(r.get())) continue;
    const std::vector<int32_t>* rk = r->cache_key();
    for (int64_t p : r->save_at)
      if (p > std::max(best, r->cache.len) && p <= limit && std::equal(rk->begin(), rk->begin() + p, key.begin()))
        best = p;
  }
  return best > 0 && best > cm_.lookup(s->req->cache_salt, key, limit).len;
}

size_t Scheduler::victim(size_t from, const Sequence* spare) const {
  size_t v = running_.size();
  for (size_t i = from; i < running_.size(); ++i)
    if (running_[i].get() != spare && (v == running_.size() || running_[i]->req->priority >= running_[v]->req->priority))
      v = i;
  DS_CHECK(v < running_.size(), "scheduler: no sequence to preempt");
  return v;
}

void Scheduler::preempt(size_t i) {
  std::unique_ptr<Sequence> s = std::move(running_[i]);
  running_.erase(running_.begin() + std::ptrdiff_t(i));
  cm_.release(s->cache);  // recompute from tokens later: exact, since sampling state is kept
  s->drafts.clear();      // the MTP KV they came from is gone with the blocks
  waiting_.push_front(std::move(s));
}

std::vector<Sequence*> Scheduler::forward_failed(const Schedule& sched) {
  if (sched.seqs.size() == 1) return {sched.seqs[0].seq};
  // Back to the front of the waiting queue in their running order, each to be retried alone.
  for (auto it = sched.seqs.rbegin(); it != sched.seqs.rend(); ++it) {
    auto r = std::find_if(running_.begin(), running_.end(), [&](auto& p) { return p.get() == it->seq; });
    DS_CHECK(r != running_.end());
    it->seq->suspect = true;
    preempt(size_t(r - running_.begin()));
  }
  return {};
}

std::unique_ptr<Sequence> Scheduler::remove(Sequence* s, bool release) {
  std::unique_ptr<Sequence> own;
  auto r = std::find_if(running_.begin(), running_.end(), [&](auto& p) { return p.get() == s; });
  if (r != running_.end()) {
    own = std::move(*r);
    running_.erase(r);
  } else {
    auto w = std::find_if(waiting_.begin(), waiting_.end(), [&](auto& p) { return p.get() == s; });
    DS_CHECK(w != waiting_.end(), "scheduler: removing an unknown sequence");
    own = std::move(*w);
    waiting_.erase(w);
  }
  if (release) cm_.release(own->cache);
  return own;
}

Sequence* Scheduler::find(uint64_t request_id) const {
  for (auto* s : all())
    if (s->req->id == request_id) return s;
  return nullptr;
}

std::vector<Sequence*> Scheduler::all() const {
  std::vector<Sequence*> v;
  for (auto& s : running_) v.push_back(s.get());
  for (auto& s : waiting_) v.push_back(s.get());
  return v;
}

void place_mm_rows(Backend& be, int64_t hidden_size, const std::vector<const Sequence*>& seqs, BatchMeta& b, int feed) {
  DS_CHECK(seqs.size() == b.seqs.size(), "place_mm_rows: ", seqs.size(), " sequences for ", b.seqs.size(), " batch parts");
  const int64_t T = b.num_tokens();
  std::vector<std::pair<const Sequence*, std::vector<int32_t>>> src;  // (sequence, its feature rows in batch order)
  int64_t nsrc = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const Sequence* s = seqs[i];
    const MultiModalInput* mm = s ? s->req->mm.get() : nullptr;
    if (!mm) continue;
    const int64_t P = s->prompt_len, ctx = b.seqs[i].ctx_len, q0 = b.seqs[i].q_start, n = b.seqs[i].q_len;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t p = ctx + j;
      for (int r = 0; r < 3; ++r)
        b.positions[size_t(r * T + q0 + j)] = p < P ? mm->positions[size_t(r * P + p)] : int32_t(p + mm->rope_delta);
    }
    if (feed < 0) continue;
    std::vector<int32_t> k;
    // Rows fed a placeholder: prompt rows ctx + feed .. ctx + feed + n - 1 (mm->rows is increasing).
    auto f = std::lower_bound(mm->rows.begin(), mm->rows.end(), int32_t(ctx + feed));
    for (; f != mm->rows.end() && *f < ctx + feed + n; ++f) {
      b.embed_rows.push_back(int32_t(q0 + *f - feed - ctx));
      k.push_back(int32_t(f - mm->rows.begin()));
    }
    if (!k.empty()) {
      DS_CHECK(s->mm_features.defined(), "place_mm_rows: request ", s->req->id, " reaches its placeholders before its "
               "image features were computed");
      nsrc += int64_t(k.size());
      src.push_back({s, std::move(k)});
    }
  }
  if (src.empty()) return;
  b.embed_src = be.alloc(be.act_dtype(), {nsrc, hidden_size});
  int64_t off = 0;
  for (auto& [s, k] : src) {
    Tensor dst = b.embed_src.rows(off, off + int64_t(k.size()));
    be.gather_rows(s->mm_features, k, dst);
    off += int64_t(k.size());
  }
}

}  // namespace ds::runtime
