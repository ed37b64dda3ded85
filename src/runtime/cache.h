// Paged KV blocks and DeltaNet state slots: who owns which piece of cache memory.
#pragma once
#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "backend/ops.h"
#include "model/model.h"

namespace ds::runtime {

// Cache memory held by one sequence. Set by CacheManager; `len` advanced by whoever ran the forward.
struct SeqCache {
  int32_t slot = -1;        // the DeltaNet state slot the forward reads and advances
  int32_t spare_slot = -1;  // speculative decoding: the slot's snapshot before a verify (see snapshot())
  std::vector<int32_t> blocks;
  int64_t len = 0;  // tokens already in the caches
};

// A prefix-cache lookup (CacheManager::lookup): the checkpoint to resume from, if any.
struct PrefixHit {
  int32_t entry = -1;  // index into the checkpoints, -1: none usable
  int64_t len = 0;     // tokens the checkpoint covers (a multiple of the block size); 0 without one
  int64_t common = 0;  // the longest prefix any checkpoint's tokens share with the looked-up tokens
  bool host = false;   // the checkpoint's state is in host memory
};

// A request's prefix-cache lookup (docs/engine.md "Prefix caching"): whether one ran (not with prefix caching off,
// images, prompt logprobs), the longest prefix any checkpoint of its salt shares with the prompt (a hit resumes at
// the longest checkpoint within it, a miss with shared > 0 means no checkpoint ends inside the shared part), and
// whether the checkpoint resumed from was in host memory.
struct CacheLookup {
  bool looked_up = false;
  int64_t shared = 0;
  bool from_host = false;
};

// Host images of DeltaNet state slots (Model::alloc_host_slot) for the prefix cache's host tier, made on a thread of
// their own: faulting in and pinning one slot's 62.8 MiB takes ~20-45 ms (H200 machine), too long for an engine
// step (the CUDA backend holds the driver's lock only while registering the pages, ~1-4 ms). The thread keeps
// `ahead` made buffers ready, up to `limit` in all; once the tier is full its buffers are used again and nothing more
// is made. alloc_host must be callable from another thread than the engine's (the CUDA and CPU backends' are).
class HostSlotMaker {
 public:
  HostSlotMaker(model::Model& m, int64_t limit, int64_t ahead);
  ~HostSlotMaker();
  HostSlotMaker(const HostSlotMaker&) = delete;
  HostSlotMaker& operator=(const HostSlotMaker&) = delete;
  // A made buffer, waiting for the thread when none is ready (a burst of more than `ahead` demotions); an undefined
  // tensor once no more can be had: the limit reached, or allocation failed (then *error says why, once).
  Tensor take(std::string* error);

 private:
  void run();
  model::Model& m_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Tensor> ready_;
  int64_t made_ = 0, limit_, ahead_;
  bool in_flight_ = false, stop_ = false;
  std::string error_;
  std::thread thread_;
};

// The most checkpoints serve keeps in host memory however much --cache-ram allows (a lookup compares the prompt
// with every checkpoint).
inline constexpr int64_t kMaxHostCheckpoints = 4096;

class CacheManager {
 public:
  // `verify_rows` (speculative decoding: K + 1, the rows of a verify; 0: off): each sequence also gets a second
  // DeltaNet slot for snapshots, so the caches hold 2 × num_slots slots (num_slots() and free_slots() still count
  // sequences), and the caches get a DeltaNet input log of num_slots × verify_rows rows (ModelCaches::gdn_log).
  // `num_checkpoints` (prefix caching, docs/engine.md "Prefix caching"; 0: off): DeltaNet slots beyond the
  // sequences' for the checkpoints' states. `num_host_checkpoints` (needs num_checkpoints > 0): checkpoints whose
  // state a newer one pushed out of its slot move to host memory (Model::alloc_host_slot, allocated as needed, up to
  // that many) instead of being dropped, their KV blocks still shared in the pool; a sequence resumes from one by a
  // copy from host memory (--cache-ram, docs/engine.md "Prefix caching"). The copy to host memory runs beside the
  // ops (Backend::copy_aside), so the caches get one checkpoint slot more than num_checkpoints: a new checkpoint
  // takes the slot whose copy is oldest, not the one just being copied out.
  CacheManager(model::Model& m, int64_t num_blocks, int64_t block_size, int64_t num_slots, int64_t verify_rows = 0,
               int64_t num_checkpoints = 0, int64_t num_host_checkpoints = 0);
  // Waits for the stream's copies into host buffers before they are freed.
  ~CacheManager();
  // The DeltaNet slots the checkpoints take: num_checkpoints, one more with a host tier (the slot being copied out).
  static int64_t checkpoint_slots(int64_t num_checkpoints, int64_t num_host_checkpoints) {
    return num_checkpoints + (num_checkpoints > 0 && num_host_checkpoints > 0 ? 1 : 0);
  }
  CacheManager(const CacheManager&) = delete;
  CacheManager& operator=(const CacheManager&) = delete;
  // Takes a state slot (zeroed), and its spare when configured, for a new sequence; false if none is free.
  bool start(SeqCache& s);
  // Copies the sequence's state slot onto its spare (device to device): the state before a speculative verify.
  // `graphed`: through a recording per slot pair (Model::copy_slot), one launch instead of two copies per layer.
  void snapshot(SeqCache& s, bool graphed = false);
  // Makes the snapshot current again (swaps slot and spare; no copy): the verify's state is discarded. The caller
  // then advances it over the accepted rows (Model::replay_deltanet).
  void rollback(SeqCache& s);
  // Blocks `s` still lacks for `new_tokens` more tokens (0 when it has them).
  int64_t blocks_short(const SeqCache& s, int64_t new_tokens) const {
    return std::max<int64_t>(0, (s.len + new_tokens + block_size_ - 1) / block_size_ - int64_t(s.blocks.size()));
  }
  // Ensures blocks for `new_tokens` more tokens, evicting prefix-cache checkpoints (least recently used first)
  // while the free blocks are short; false (and no change to `s`) if the pool is still short.
  bool reserve(SeqCache& s, int64_t new_tokens);
  // Returns the slot and the sequence's share of its blocks (a block goes back to the pool when no sequence and no
  // checkpoint holds it any more).
  void release(SeqCache& s);

  // Prefix caching. A checkpoint is a token prefix (a multiple of the block size long), the KV blocks that hold its
  // positions (shared, never written again: a sequence only writes positions >= its own length) and a copy of the
  // DeltaNet state after its last token. `salt` keeps apart the requests that may share (vLLM's cache_salt).
  int64_t num_checkpoints() const { return int64_t(ckpts_.size()); }  // on the device and in host memory
  int64_t host_checkpoints() const {  // those whose state is in host memory
    return std::count_if(ckpts_.begin(), ckpts_.end(), [](const Checkpoint& c) { return c.slot < 0; });
  }
  // Checkpoints host memory may hold: num_host_checkpoints, fewer after host memory could not be had.
  int64_t host_capacity() const { return host_capacity_; }
  // Blocks only checkpoints hold (no sequence): taken back by reserve() when the free blocks run short.
  int64_t cached_blocks() const { return cached_only_; }
  int64_t checkpoint_capacity() const { return device_cap_; }
  // The longest checkpoint of `salt` whose tokens are a prefix of tokens[0, limit).
  PrefixHit lookup(const std::string& salt, const std::vector<int32_t>& tokens, int64_t limit) const;
  // A fresh sequence (start()) resumes from the hit: the checkpoint's state copied into its slot, its blocks shared,
  // len = hit.len. A checkpoint that ends inside a block (retire()) shares its full blocks and gives the sequence a
  // copy of the last one (the sequence writes its next positions there); false, and `s` unchanged, when no block is
  // free for the copy even after evicting other checkpoints.
  bool attach(SeqCache& s, const PrefixHit& hit);
  // Keeps tokens[0, s.len) (s.len a multiple of the block size, > 0) as a checkpoint: the state of the sequence's
  // slot copied, its first s.len / block_size blocks shared. The same tokens again only refresh the checkpoint's
  // age; without a free checkpoint slot the least recently used checkpoint gives its slot up (and moves to host
  // memory, where there is a host tier).
  void save(SeqCache& s, const std::string& salt, const std::vector<int32_t>& tokens);
  // A finished sequence: keeps tokens[0, s.len) as a checkpoint at any length (a generation ends anywhere), its last,
  // partly filled block included (nothing writes it again: the sequence is released here, and a sequence that
  // resumes from it writes a copy), then releases the sequence. Lengths below one block keep nothing.
  // Such checkpoints are a guess (the next turn repeats the answer only if its template renders it as generated), so
  // until one is resumed from they hold at most half the checkpoint slots (rounded up) and take each other's slots
  // first: a stream of finished requests cannot push out the prompts' checkpoints. The host tier keeps the same
  // rule among its own checkpoints.
  void retire(SeqCache& s, const std::string& salt, const std::vector<int32_t>& tokens);
  // Drops the least recently used checkpoint (on the device or in host memory); false if there is none.
  bool evict_one();
  int64_t free_blocks() const { return int64_t(free_blocks_.size()); }
  int64_t free_slots() const { return int64_t(free_slots_.size()); }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t num_slots() const { return num_slots_; }
  int64_t block_size() const { return block_size_; }
  int64_t log_rows() const { return caches_.gdn_log.rows; }  // rows of the DeltaNet input log (0: none)
  model::ModelCaches& caches() { return caches_; }

 private:
  struct Checkpoint {
    std::string salt;
    std::vector<int32_t> tokens;
    std::vector<int32_t> blocks;
    int32_t slot = -1;  // its state's DeltaNet slot, or -1: the state is in host memory
    int32_t host = -1;  // index into host_bufs_ where slot == -1
    uint64_t ticket = 0;  // the copy into host_bufs_[host] (Backend::copy_aside)
    uint64_t used = 0;  // the clock at its last save or hit (unique: it names the checkpoint)
    bool output = false;  // retire()'s and not resumed from yet (see retire())
  };
  // Makes room for one more checkpoint in the device slots (`host` false) or in host memory: where the tier is full,
  // or `output` and its retire()'s checkpoints hold half of it, the least recently used checkpoint (of those
  // retire()'s) leaves it: from the device to host memory where there is a host tier, otherwise dropped.
  void make_room(bool host, bool output);
  // Moves the device checkpoint `stamp` names to host memory; false when host memory could not be had.
  bool demote(uint64_t stamp);
  std::vector<Checkpoint>::iterator find(uint64_t stamp);
  void drop(std::vector<Checkpoint>::iterator it);
  // save() at any length; `output`: retire()'s (Checkpoint::output).
  void keep(SeqCache& s, const std::string& salt, const std::vector<int32_t>& tokens, bool output);
  void ref(int32_t block, bool checkpoint);
  void unref(int32_t block, bool checkpoint);
  bool cached_only(int32_t b) const { return refs_[size_t(b)] > 0 && refs_[size_t(b)] == ckpt_refs_[size_t(b)]; }

  model::Model& m_;
  int64_t num_blocks_, block_size_, num_slots_;
  bool spare_;
  std::vector<int32_t> free_blocks_, free_slots_;
  std::vector<int32_t> refs_;        // per block: the sequences and checkpoints holding it
  std::vector<int32_t> ckpt_refs_;   // per block: the checkpoints holding it
  int64_t cached_only_ = 0;          // blocks with refs_ == ckpt_refs_ > 0
  std::vector<int32_t> ckpt_slots_;  // the checkpoints' DeltaNet slots (all of them)
  int64_t device_cap_ = 0;           // checkpoints on the device at once: ckpt_slots_, one fewer with a host tier
  std::vector<uint64_t> slot_ticket_;  // per DeltaNet slot: the last copy out of it to host memory (0: none)
  std::vector<Checkpoint> ckpts_;
  int64_t host_capacity_ = 0;
  std::vector<Tensor> host_bufs_;   // host images of state slots, taken from maker_ as the tier grows
  std::vector<int32_t> free_host_;  // indices into host_bufs_ no checkpoint holds
  std::unique_ptr<HostSlotMaker> maker_;  // with a host tier
  uint64_t clock_ = 0;
  model::ModelCaches caches_;
};

// Sizing the cache pools from device memory (serve's --gpu-memory-utilization), after the weights are loaded.
struct PoolSizing {
  int64_t total = 0, used = 0;   // device memory: total, and in use now (weights included)
  double utilization = 0.9;      // fraction of `total` this process may end up holding
  int64_t scratch = 0;           // kept free for activations, the step arena, cuBLAS workspaces
  int64_t block_bytes = 0;       // Model::kv_block_bytes(block_size)
  // Per sequence: Model::state_slot_bytes() × slots per sequence, with speculative decoding 2 slots plus
  // (K + 1) × Model::gdn_log_row_bytes() of DeltaNet input log.
  int64_t slot_bytes = 0;
  int64_t max_num_seqs = 1, max_model_len = 1, block_size = 16;
  int64_t num_blocks_override = 0;  // --num-gpu-blocks-override (0 = size from memory)
  int64_t fixed_bytes = 0;          // held apart from the pools (the prefix cache's checkpoint states)
  // Prefix caching: checkpoints hold KV blocks beyond the running sequences' (the more, the more conversations keep
  // theirs), so the pool takes the whole budget instead of stopping at max_num_seqs × max_model_len.
  bool checkpoint_blocks = false;
};
struct PoolPlan {
  int64_t budget = 0;      // utilization × total − used − scratch
  int64_t num_slots = 0;   // sequences that can run at once: max_num_seqs, fewer if memory is short
  int64_t num_blocks = 0;  // KV blocks: the rest of the budget, at most num_slots × blocks of max_model_len
};
// Slots first (up to max_num_seqs, leaving room for one max_model_len sequence's blocks), then blocks with
// what is left, capped where more could never be used (no cap with checkpoint_blocks). Throws ds::Error with the numbers when not even one
// sequence of max_model_len tokens (one slot + its blocks) fits.
PoolPlan plan_pools(const PoolSizing& in);

// One forward call's input: each entry is a sequence and the new tokens it contributes.
// Text positions (all three mRoPE rows = cache position).
BatchMeta make_batch(const std::vector<std::pair<const SeqCache*, std::vector<int32_t>>>& parts);

}  // namespace ds::runtime
