// Speculative decoding with the checkpoint's MTP head (model-spec §4): the drafting half. The verifying half
// (one target forward over [last token, d_1..d_K], rejection sampling, DeltaNet state rollback) lives in the
// engine step; docs/engine.md describes both.
#pragma once
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "backend/ops.h"
#include "model/model.h"
#include "runtime/cache.h"
#include "runtime/scheduler.h"

namespace ds::runtime {

// EngineConfig::profile_phases: wall time per phase of an engine step. Each mark synchronises the backend and adds
// the time since the previous mark (or start) to its phase in `ms`. Constructed with a null backend: off (no syncs,
// no clock reads).
class PhaseClock {
 public:
  PhaseClock(Backend* be, std::vector<std::pair<std::string, double>>* ms) : be_(ms ? be : nullptr), ms_(ms) {}
  bool on() const { return be_ != nullptr; }
  void start();
  void mark(const char* phase);

 private:
  Backend* be_;
  std::vector<std::pair<std::string, double>>* ms_;
  std::chrono::steady_clock::time_point t_{};
};

// One sequence's MTP work after a target forward. Set by the engine.
struct DraftJob {
  Sequence* seq = nullptr;
  int64_t ctx_len = 0;    // MTP KV is valid for positions [0, ctx_len) (= the target's length before the step)
  int64_t first_row = 0;  // rows [first_row, first_row + rows) of the target forward's hidden states are the
  int64_t rows = 0;       //   positions ctx_len.. that the step committed; their next tokens are seq->tokens[ctx_len + 1 ..]
  int64_t num_drafts = 0; // drafts to propose (0: only fill the MTP KV, e.g. for a prefill chunk mid-prompt)
};

// `hook` (tests, benchmarks): EngineConfig::draft_hook.
using DraftHook = std::function<int32_t(uint64_t id, int64_t index, int32_t proposed)>;

struct DraftOptions {
  int64_t vocab_limit = 0;  // ids >= this are never proposed
  // Use the model's reduced-vocabulary draft head (Model::draft_vocab()): the argmax over those tokens only.
  bool reduced = false;
  // Run the MTP steps through Model::mtp_forward_graphed (one recording per shape) when every job is a decode or
  // verify (each drafts, at most kMaxGraphRows rows in all); eager mtp_forward otherwise.
  bool graphs = false;
  DraftHook hook;
  PhaseClock* clock = nullptr;  // profiling (phases "draft: ..."); null: off
  // With `graphs` and the argmax on the device: chained steps read their tokens from the previous step's argmax on
  // the device and the drafts come back once after the last step (EngineConfig::device_draft_feed); false: each
  // step's drafts come back and the next step's tokens go through the host.
  bool device_feed = true;
};
constexpr int64_t kMaxGraphRows = 64;

// MTP first pass over every job's committed rows (writes the MTP KV at their positions, overwriting what
// earlier chained drafts left there), then num_drafts − 1 chained steps for the jobs that draft, each fed the
// previous draft and the MTP's own post-norm hidden. Drafts are the MTP's argmax (deterministic, so the
// verifier's q is one-hot). Sets seq->drafts. `hidden` fp32/act [T, H]: the target forward's final-norm
// hiddens of every row. Blocks for the chained positions must already be reserved.
void mtp_propose(model::Model& m, CacheManager& cm, const Tensor& hidden, std::vector<DraftJob>& jobs,
                 const DraftOptions& opt);

// The draft's token from one row of MTP logits: the argmax over [0, vocab_limit) of a full-vocabulary row [V], or
// over the reduced head's tokens `ids` below vocab_limit for a reduced row [ids.size()] (first maximum wins).
int32_t draft_pick(const float* row, int64_t V, int64_t vocab_limit, const std::vector<int32_t>* ids);

// Token ids of a reduced draft vocabulary (LoadOptions::draft_vocab): the first `n` ids listed in `file` (integers
// separated by whitespace or commas, most frequent first, e.g. counted on a corpus; all of them when n = 0), or
// without a file the n lowest ids 0..n−1 — in byte-level BPE the lowest ids are the bytes and the earliest merges,
// a proxy for the most frequent tokens. Checks 0 < n <= V, ids in [0, V) and distinct.
std::vector<int32_t> draft_vocab_ids(int64_t n, const std::string& file, int64_t V);

}  // namespace ds::runtime
