// Paged KV blocks and DeltaNet state slots: who owns which piece of cache memory.
#pragma once
#include <cstdint>
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

class CacheManager {
 public:
  // `verify_rows` (speculative decoding: K + 1, the rows of a verify; 0: off): each sequence also gets a second
  // DeltaNet slot for snapshots, so the caches hold 2 × num_slots slots (num_slots() and free_slots() still count
  // sequences), and the caches get a DeltaNet input log of num_slots × verify_rows rows (ModelCaches::gdn_log).
  CacheManager(model::Model& m, int64_t num_blocks, int64_t block_size, int64_t num_slots, int64_t verify_rows = 0);
  // Takes a state slot (zeroed), and its spare when configured, for a new sequence; false if none is free.
  bool start(SeqCache& s);
  // Copies the sequence's state slot onto its spare (device to device): the state before a speculative verify.
  // `graphed`: through a recording per slot pair (Model::copy_slot), one launch instead of two copies per layer.
  void snapshot(SeqCache& s, bool graphed = false);
  // Makes the snapshot current again (swaps slot and spare; no copy): the verify's state is discarded. The caller
  // then advances it over the accepted rows (Model::replay_deltanet).
  void rollback(SeqCache& s);
  // Ensures blocks for `new_tokens` more tokens; false (and no change) if the pool is short.
  bool reserve(SeqCache& s, int64_t new_tokens);
  // Returns every block and the slot.
  void release(SeqCache& s);
  int64_t free_blocks() const { return int64_t(free_blocks_.size()); }
  int64_t free_slots() const { return int64_t(free_slots_.size()); }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t num_slots() const { return num_slots_; }
  int64_t block_size() const { return block_size_; }
  int64_t log_rows() const { return caches_.gdn_log.rows; }  // rows of the DeltaNet input log (0: none)
  model::ModelCaches& caches() { return caches_; }

 private:
  model::Model& m_;
  int64_t num_blocks_, block_size_, num_slots_;
  bool spare_;
  std::vector<int32_t> free_blocks_, free_slots_;
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
};
struct PoolPlan {
  int64_t budget = 0;      // utilization × total − used − scratch
  int64_t num_slots = 0;   // sequences that can run at once: max_num_seqs, fewer if memory is short
  int64_t num_blocks = 0;  // KV blocks: the rest of the budget, at most num_slots × blocks of max_model_len
};
// Slots first (up to max_num_seqs, leaving room for one max_model_len sequence's blocks), then blocks with
// what is left, capped where more could never be used. Throws ds::Error with the numbers when not even one
// sequence of max_model_len tokens (one slot + its blocks) fits.
PoolPlan plan_pools(const PoolSizing& in);

// One forward call's input: each entry is a sequence and the new tokens it contributes.
// Text positions (all three mRoPE rows = cache position).
BatchMeta make_batch(const std::vector<std::pair<const SeqCache*, std::vector<int32_t>>>& parts);

}  // namespace ds::runtime
