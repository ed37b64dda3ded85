// forward_graphed(): a decode step recorded once per batch shape and replayed (design.md §1, runtime's
// CUDA-graph buckets). The kernels of a step depend only on T and the number of sequences; everything else a
// step reads (tokens, positions, context lengths, block tables) is in prepare_batch's device mirror.
#include "core/status.h"
#include "model/model.h"

namespace ds::model {

Tensor Model::forward_graphed(BatchMeta& b, ModelCaches& caches, const std::vector<int32_t>& logit_rows) {
  std::string key = str_cat("fwd/", b.num_tokens(), "/", b.seqs.size(), "/", logit_rows.size(), "/",
                            reinterpret_cast<uintptr_t>(&caches));
  for (auto r : logit_rows) key += str_cat(",", r);
  struct StepScope {  // ends the step on every path, so an error leaves the backend usable
    Backend& be;
    explicit StepScope(Backend& b) : be(b) { be.step_begin(); }
    ~StepScope() { be.step_end(); }
  } scope(be_);
  be_.prepare_batch(b);  // in the step, outside the recording: this step's metadata into the shape's fixed buffer
  Tensor& out = graph_logits_[key];
  be_.graph_run(key, [&] { out = forward(b, caches, logit_rows); });
  return out;
}

}  // namespace ds::model
