#include "runtime/cache.h"

#include <algorithm>
#include <cstdio>
#include <utility>

#include "core/status.h"

namespace ds::runtime {

CacheManager::CacheManager(model::Model& m, int64_t num_blocks, int64_t block_size, int64_t num_slots,
                           int64_t verify_rows, int64_t num_checkpoints, int64_t num_host_checkpoints)
    : m_(m), num_blocks_(num_blocks), block_size_(block_size), num_slots_(num_slots), spare_(verify_rows > 0) {
  DS_CHECK(num_checkpoints >= 0 && num_host_checkpoints >= 0, "cache: checkpoint counts must be >= 0, found ",
           num_checkpoints, " and ", num_host_checkpoints);
  host_capacity_ = num_checkpoints > 0 ? num_host_checkpoints : 0;
  if (host_capacity_ > 0) maker_ = std::make_unique<HostSlotMaker>(m, host_capacity_, std::min<int64_t>(4, host_capacity_));
  device_cap_ = num_checkpoints;
  const int64_t ckpt_slots = checkpoint_slots(num_checkpoints, num_host_checkpoints);
  // Sequence i owns slot i and, with spares, slot i + num_slots (the two may swap roles; see rollback()). The
  // checkpoints' slots come after those.
  const int64_t seq_slots = spare_ ? 2 * num_slots : num_slots;
  caches_ = m.alloc_caches(num_blocks, block_size, seq_slots + ckpt_slots, spare_ ? num_slots * verify_rows : 0);
  slot_ticket_.assign(size_t(seq_slots + ckpt_slots), 0);
  for (int64_t i = num_blocks - 1; i >= 0; --i) free_blocks_.push_back(int32_t(i));
  for (int64_t i = num_slots - 1; i >= 0; --i) free_slots_.push_back(int32_t(i));
  refs_.assign(size_t(num_blocks), 0);
  ckpt_refs_.assign(size_t(num_blocks), 0);
  for (int64_t i = 0; i < ckpt_slots; ++i) ckpt_slots_.push_back(int32_t(seq_slots + i));
}

CacheManager::~CacheManager() {
  try {
    if (!host_bufs_.empty()) m_.backend().synchronize();
  } catch (const std::exception&) {  // a device that failed: nothing more to wait for
  }
}

bool CacheManager::start(SeqCache& s) {
  if (free_slots_.empty()) return false;
  s.slot = free_slots_.back();
  free_slots_.pop_back();
  s.spare_slot = spare_ ? int32_t(s.slot + num_slots_) : -1;
  s.blocks.clear();
  s.len = 0;
  m_.reset_slot(caches_, s.slot);
  return true;
}

void CacheManager::snapshot(SeqCache& s, bool graphed) {
  DS_CHECK(s.slot >= 0 && s.spare_slot >= 0, "cache: snapshot of a sequence without a spare state slot (slot ",
           s.slot, ", spare ", s.spare_slot, ")");
  m_.copy_slot(caches_, s.spare_slot, s.slot, graphed);
}

void CacheManager::rollback(SeqCache& s) {
  DS_CHECK(s.slot >= 0 && s.spare_slot >= 0, "cache: rollback of a sequence without a spare state slot");
  std::swap(s.slot, s.spare_slot);
}

bool CacheManager::reserve(SeqCache& s, int64_t new_tokens) {
  const int64_t need = blocks_short(s, new_tokens);
  if (need == 0) return true;
  while (need > int64_t(free_blocks_.size()) && evict_one()) {
  }
  if (need > int64_t(free_blocks_.size())) return false;
  for (int64_t i = 0; i < need; ++i) {
    s.blocks.push_back(free_blocks_.back());
    free_blocks_.pop_back();
    ref(s.blocks.back(), false);
  }
  return true;
}

void CacheManager::ref(int32_t b, bool checkpoint) {
  const bool before = cached_only(b);
  ++refs_[size_t(b)];
  if (checkpoint) ++ckpt_refs_[size_t(b)];
  cached_only_ += int64_t(cached_only(b)) - int64_t(before);
}

void CacheManager::unref(int32_t b, bool checkpoint) {
  DS_CHECK(refs_[size_t(b)] > 0 && (!checkpoint || ckpt_refs_[size_t(b)] > 0), "cache: block ", b,
           " released more often than taken");
  const bool before = cached_only(b);
  --refs_[size_t(b)];
  if (checkpoint) --ckpt_refs_[size_t(b)];
  cached_only_ += int64_t(cached_only(b)) - int64_t(before);
  if (refs_[size_t(b)] == 0) free_blocks_.push_back(b);
}

void CacheManager::release(SeqCache& s) {
  for (auto b : s.blocks) unref(b, false);
  s.blocks.clear();
  if (s.slot >= 0) free_slots_.push_back(int32_t(s.slot % num_slots_));
  s.slot = -1;
  s.spare_slot = -1;
  s.len = 0;
}

PrefixHit CacheManager::lookup(const std::string& salt, const std::vector<int32_t>& tokens, int64_t limit) const {
  PrefixHit h;
  limit = std::min<int64_t>(limit, int64_t(tokens.size()));
  for (size_t i = 0; i < ckpts_.size(); ++i) {
    const Checkpoint& c = ckpts_[i];
    if (c.salt != salt) continue;
    const int64_t n = std::min<int64_t>(int64_t(c.tokens.size()), int64_t(tokens.size()));
    const int64_t common = std::mismatch(c.tokens.begin(), c.tokens.begin() + n, tokens.begin()).first - c.tokens.begin();
    h.common = std::max(h.common, common);
    const int64_t len = int64_t(c.tokens.size());
    if (common == len && len <= limit && len > h.len) {
      h.entry = int32_t(i);
      h.len = len;
      h.host = c.slot < 0;
    }
  }
  return h;
}

bool CacheManager::attach(SeqCache& s, const PrefixHit& hit) {
  DS_CHECK(s.slot >= 0 && s.blocks.empty() && s.len == 0, "cache: attach to a sequence that is not fresh");
  DS_CHECK(hit.entry >= 0 && size_t(hit.entry) < ckpts_.size(), "cache: attach to checkpoint ", hit.entry, " of ",
           ckpts_.size());
  const uint64_t stamp = ckpts_[size_t(hit.entry)].used = ++clock_;
  ckpts_[size_t(hit.entry)].output = false;  // proven: an ordinary checkpoint from now on
  Checkpoint* c = &ckpts_[size_t(hit.entry)];
  const bool partial = int64_t(c->tokens.size()) % block_size_ != 0;
  if (partial) {
    // A copy of the last block: other checkpoints (never this one, the most recently used now) make room for it.
    while (free_blocks_.empty() && ckpts_.size() > 1 && evict_one()) {
    }
    if (free_blocks_.empty()) return false;
    c = &*find(stamp);
  }
  if (c->slot >= 0) {
    m_.copy_slot(caches_, s.slot, c->slot);
  } else {
    m_.backend().wait_aside(c->ticket);  // its copy to host memory first
    m_.slot_from_host(caches_, s.slot, host_bufs_[size_t(c->host)]);
  }
  s.blocks = c->blocks;
  if (partial) {
    s.blocks.back() = free_blocks_.back();
    free_blocks_.pop_back();
    m_.copy_kv_block(caches_, s.blocks.back(), c->blocks.back());
  }
  for (auto b : s.blocks) ref(b, false);
  s.len = int64_t(c->tokens.size());
  return true;
}

void CacheManager::save(SeqCache& s, const std::string& salt, const std::vector<int32_t>& tokens) {
  DS_CHECK(s.len > 0 && s.len % block_size_ == 0 && s.len <= int64_t(tokens.size()) &&
               s.len / block_size_ <= int64_t(s.blocks.size()),
           "cache: checkpoint of ", s.len, " tokens (block size ", block_size_, ", ", s.blocks.size(), " blocks, ",
           tokens.size(), " tokens)");
  keep(s, salt, tokens, false);
}

void CacheManager::retire(SeqCache& s, const std::string& salt, const std::vector<int32_t>& tokens) {
  DS_CHECK(s.len <= int64_t(tokens.size()) && (s.len + block_size_ - 1) / block_size_ <= int64_t(s.blocks.size()),
           "cache: retiring ", s.len, " tokens (block size ", block_size_, ", ", s.blocks.size(), " blocks, ",
           tokens.size(), " tokens)");
  if (s.slot >= 0 && s.len >= block_size_) keep(s, salt, tokens, true);
  release(s);
}

void CacheManager::keep(SeqCache& s, const std::string& salt, const std::vector<int32_t>& tokens, bool output) {
  if (ckpt_slots_.empty()) return;
  for (Checkpoint& c : ckpts_)
    if (c.salt == salt && int64_t(c.tokens.size()) == s.len && std::equal(c.tokens.begin(), c.tokens.end(), tokens.begin())) {
      c.used = ++clock_;
      return;
    }
  make_room(false, output);
  std::vector<int32_t> used;
  for (auto& c : ckpts_)
    if (c.slot >= 0) used.push_back(c.slot);
  Checkpoint c;
  for (int32_t slot : ckpt_slots_)  // a free slot; the one whose copy to host memory is oldest
    if (std::find(used.begin(), used.end(), slot) == used.end() &&
        (c.slot < 0 || slot_ticket_[size_t(slot)] < slot_ticket_[size_t(c.slot)]))
      c.slot = slot;
  DS_CHECK(c.slot >= 0);
  m_.backend().wait_aside(slot_ticket_[size_t(c.slot)]);  // (finished long ago, as a rule)
  c.salt = salt;
  c.tokens.assign(tokens.begin(), tokens.begin() + s.len);
  c.blocks.assign(s.blocks.begin(), s.blocks.begin() + (s.len + block_size_ - 1) / block_size_);
  m_.copy_slot(caches_, c.slot, s.slot);
  for (auto b : c.blocks) ref(b, true);
  c.used = ++clock_;
  c.output = output;
  ckpts_.push_back(std::move(c));
}

bool CacheManager::evict_one() {
  if (ckpts_.empty()) return false;
  drop(std::min_element(ckpts_.begin(), ckpts_.end(), [](auto& a, auto& b) { return a.used < b.used; }));
  return true;
}

void CacheManager::drop(std::vector<Checkpoint>::iterator it) {
  for (auto b : it->blocks) unref(b, true);
  if (it->host >= 0) free_host_.push_back(it->host);
  ckpts_.erase(it);
}

std::vector<CacheManager::Checkpoint>::iterator CacheManager::find(uint64_t stamp) {
  auto it = std::find_if(ckpts_.begin(), ckpts_.end(), [&](const Checkpoint& k) { return k.used == stamp; });
  DS_CHECK(it != ckpts_.end(), "cache: no checkpoint of clock ", stamp);
  return it;
}

void CacheManager::make_room(bool host, bool output) {
  const int64_t cap = host ? host_capacity_ : device_cap_;
  int64_t n = 0, outputs = 0;
  for (const Checkpoint& k : ckpts_)
    if ((k.slot < 0) == host) {
      ++n;
      outputs += k.output ? 1 : 0;
    }
  const bool outputs_full = output && outputs >= (cap + 1) / 2;
  if (!outputs_full && n < cap) return;
  auto victim = ckpts_.end();
  for (auto k = ckpts_.begin(); k != ckpts_.end(); ++k)
    if ((k->slot < 0) == host && (!outputs_full || k->output) && (victim == ckpts_.end() || k->used < victim->used))
      victim = k;
  if (victim == ckpts_.end()) return;  // a tier of capacity 0 holds nothing
  const uint64_t stamp = victim->used;
  if (host || host_capacity_ == 0 || !demote(stamp)) drop(find(stamp));
}

bool CacheManager::demote(uint64_t stamp) {
  make_room(true, find(stamp)->output);  // drops host checkpoints only: `stamp` stays
  if (host_capacity_ == 0) return false;
  if (free_host_.empty()) {  // every buffer taken so far is held, fewer than the capacity: one more
    std::string error;
    Tensor t = maker_->take(&error);
    if (t.defined()) {
      host_bufs_.push_back(std::move(t));
      free_host_.push_back(int32_t(host_bufs_.size() - 1));
    } else {
      host_capacity_ = int64_t(host_bufs_.size());
      if (!error.empty())
        std::fprintf(stderr, "deltaserve cache: prefix-cache checkpoints in host memory capped at %lld: %s\n",
                     (long long)host_capacity_, error.c_str());
      if (host_capacity_ == 0) return false;
      make_room(true, find(stamp)->output);
    }
  }
  if (free_host_.empty()) return false;
  auto it = find(stamp);
  it->host = free_host_.back();
  free_host_.pop_back();
  it->ticket = m_.slot_to_host(caches_, it->slot, host_bufs_[size_t(it->host)]);
  slot_ticket_[size_t(it->slot)] = it->ticket;
  it->slot = -1;
  return true;
}

HostSlotMaker::HostSlotMaker(model::Model& m, int64_t limit, int64_t ahead)
    : m_(m), limit_(limit), ahead_(std::max<int64_t>(1, ahead)), thread_([this] { run(); }) {}

HostSlotMaker::~HostSlotMaker() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void HostSlotMaker::run() {
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    cv_.wait(lk, [&] { return stop_ || (made_ < limit_ && int64_t(ready_.size()) < ahead_); });
    if (stop_) return;
    in_flight_ = true;
    lk.unlock();
    Tensor t;
    std::string error;
    try {
      t = m_.alloc_host_slot();
    } catch (const std::exception& e) {
      error = e.what();
    }
    lk.lock();
    in_flight_ = false;
    if (t.data) {
      ++made_;
      ready_.push_back(std::move(t));
    } else {
      limit_ = made_;  // no more: take() hands out what is ready, then reports the error
      error_ = error.empty() ? "no memory" : error;
    }
    cv_.notify_all();
  }
}

Tensor HostSlotMaker::take(std::string* error) {
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [&] { return !ready_.empty() || (!in_flight_ && made_ >= limit_); });
  if (ready_.empty()) {
    if (error) *error = std::exchange(error_, "");
    return Tensor{};
  }
  Tensor t = std::move(ready_.back());
  ready_.pop_back();
  lk.unlock();
  cv_.notify_all();  // room for the thread to make the next one
  return t;
}

BatchMeta make_batch(const std::vector<std::pair<const SeqCache*, std::vector<int32_t>>>& parts) {
  BatchMeta b;
  for (auto& [sc, toks] : parts) {
    BatchMeta::Seq s;
    s.q_start = b.num_tokens();
    s.q_len = int64_t(toks.size());
    s.ctx_len = sc->len;
    s.state_slot = sc->slot;
    s.blocks = sc->blocks;
    b.seqs.push_back(std::move(s));
    b.tokens.insert(b.tokens.end(), toks.begin(), toks.end());
  }
  const int64_t T = b.num_tokens();
  b.positions.assign(size_t(3 * T), 0);
  for (auto& s : b.seqs)
    for (int64_t i = 0; i < s.q_len; ++i)
      for (int r = 0; r < 3; ++r) b.positions[r * T + s.q_start + i] = int32_t(s.ctx_len + i);
  return b;
}

PoolPlan plan_pools(const PoolSizing& in) {
  if (!(in.utilization > 0.0 && in.utilization <= 1.0))
    fail("--gpu-memory-utilization: expected a fraction in (0, 1], found ", in.utilization);
  const double gib = 1024.0 * 1024.0 * 1024.0;
  PoolPlan p;
  p.budget = int64_t(in.utilization * double(in.total)) - in.used - in.scratch - in.fixed_bytes;
  const int64_t blocks_per_seq = (in.max_model_len + in.block_size - 1) / in.block_size;
  // With --num-gpu-blocks-override the KV pool is fixed (submit() rejects what it cannot hold).
  const int64_t fixed_blocks = in.num_blocks_override > 0 ? in.num_blocks_override : blocks_per_seq;
  const int64_t one_seq = in.slot_bytes + fixed_blocks * in.block_bytes;
  if (p.budget < one_seq)
    fail("not enough device memory for one sequence of max_model_len ", in.max_model_len, " tokens: it needs ",
         double(one_seq) / gib, " GiB (", fixed_blocks, " KV blocks of ", double(in.block_bytes) / (1 << 20),
         " MiB + DeltaNet state ", double(in.slot_bytes) / (1 << 20), " MiB), but ", in.utilization, " x ",
         double(in.total) / gib, " GiB total - ", double(in.used) / gib, " GiB in use (weights) - ",
         double(in.scratch) / gib, " GiB scratch - ", double(in.fixed_bytes) / gib, " GiB prefix-cache checkpoints leaves ",
         double(p.budget) / gib,
         " GiB; raise --gpu-memory-utilization or lower --max-model-len");
  p.num_slots = std::min<int64_t>(in.max_num_seqs,
                                  in.slot_bytes > 0 ? (p.budget - fixed_blocks * in.block_bytes) / in.slot_bytes
                                                    : in.max_num_seqs);
  if (in.num_blocks_override > 0) {
    p.num_blocks = in.num_blocks_override;
  } else {
    const int64_t left = p.budget - p.num_slots * in.slot_bytes;
    const int64_t cap = blocks_per_seq * p.num_slots;
    p.num_blocks = in.block_bytes > 0 ? left / in.block_bytes : cap;
    if (!in.checkpoint_blocks) p.num_blocks = std::min(p.num_blocks, cap);
  }
  return p;
}

}  // namespace ds::runtime
