// Speculative decoding with the checkpoint's MTP head (model-spec §4): the drafting half. The verifying half
// (one target forward over [last token, d_1..d_K], rejection sampling, DeltaNet state rollback) lives in the
// engine step; docs/engine.md describes both.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "backend/ops.h"
#include "model/model.h"
#include "runtime/cache.h"
#include "runtime/scheduler.h"

namespace ds::runtime {

// One sequence's MTP work after a target forward. Set by the engine.
struct DraftJob {
  Sequence* seq = nullptr;
  int64_t ctx_len = 0;    // MTP KV is valid for positions [0, ctx_len) (= the target's length before the step)
  int64_t first_row = 0;  // rows [first_row, first_row + rows) of the target forward's hidden states are the
  int64_t rows = 0;       //   positions ctx_len.. that the step committed; their next tokens are seq->tokens[ctx_len + 1 ..]
  int64_t num_drafts = 0; // drafts to propose (0: only fill the MTP KV, e.g. for a prefill chunk mid-prompt)
};

// MTP first pass over every job's committed rows (writes the MTP KV at their positions, overwriting what
// earlier chained drafts left there), then num_drafts − 1 chained steps for the jobs that draft, each fed the
// previous draft and the MTP's own post-norm hidden. Drafts are the MTP's argmax (deterministic, so the
// verifier's q is one-hot). Sets seq->drafts. `hidden` fp32/act [T, H]: the target forward's final-norm
// hiddens of every row. Blocks for the chained positions must already be reserved.
// `hook` (tests, benchmarks): EngineConfig::draft_hook.
using DraftHook = std::function<int32_t(uint64_t id, int64_t index, int32_t proposed)>;
void mtp_propose(model::Model& m, CacheManager& cm, const Tensor& hidden, std::vector<DraftJob>& jobs,
                 int64_t vocab_limit, const DraftHook& hook = nullptr);

}  // namespace ds::runtime
