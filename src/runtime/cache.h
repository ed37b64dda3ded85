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
  int32_t slot = -1;
  std::vector<int32_t> blocks;
  int64_t len = 0;  // tokens already in the caches
};

class CacheManager {
 public:
  CacheManager(model::Model& m, int64_t num_blocks, int64_t block_size, int64_t num_slots);
  // Takes a state slot (zeroed) for a new sequence; false if none is free.
  bool start(SeqCache& s);
  // Ensures blocks for `new_tokens` more tokens; false (and no change) if the pool is short.
  bool reserve(SeqCache& s, int64_t new_tokens);
  // Returns every block and the slot.
  void release(SeqCache& s);
  int64_t free_blocks() const { return int64_t(free_blocks_.size()); }
  int64_t free_slots() const { return int64_t(free_slots_.size()); }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t num_slots() const { return num_slots_; }
  int64_t block_size() const { return block_size_; }
  model::ModelCaches& caches() { return caches_; }

 private:
  model::Model& m_;
  int64_t num_blocks_, block_size_, num_slots_;
  std::vector<int32_t> free_blocks_, free_slots_;
  model::ModelCaches caches_;
};

// One forward call's input: each entry is a sequence and the new tokens it contributes.
// Text positions (all three mRoPE rows = cache position).
BatchMeta make_batch(const std::vector<std::pair<const SeqCache*, std::vector<int32_t>>>& parts);

}  // namespace ds::runtime
