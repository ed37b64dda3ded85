// forward_graphed() / mtp_forward_graphed(): a decode, verify or draft step recorded once per batch shape and
// replayed (design.md §1, runtime's CUDA-graph buckets). The kernels of a step depend only on T and the number of
// sequences; everything else a step reads (tokens, positions, context lengths, block tables) is in
// prepare_batch's device mirror, and tensors passed between recorded steps live in per-shape buffers outside the
// step arena (a later step's arena reuses the addresses of an earlier one's temporaries).
#include <algorithm>

#include "core/status.h"
#include "model/model.h"
#include "model/step_scope.h"

namespace ds::model {

namespace {

std::vector<int32_t> iota_rows(int64_t n) {
  std::vector<int32_t> r(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) r[size_t(i)] = int32_t(i);
  return r;
}

}  // namespace

Tensor Model::forward_graphed(BatchMeta& b, ModelCaches& caches, const std::vector<int32_t>& logit_rows,
                              Tensor* hidden_out) {
  std::string key = str_cat("fwd/", b.num_tokens(), "/", b.seqs.size(), "/", logit_rows.size(), "/",
                            caches.id, hidden_out ? "/h" : "");
  for (auto r : logit_rows) key += str_cat(",", r);
  // A verify that logs its DeltaNet inputs (BatchMeta::Seq::log_row) records other writes than a step that does not;
  // logged at their batch rows (the engine's way) the writes do not depend on the sequences' row counts.
  const bool logged = std::any_of(b.seqs.begin(), b.seqs.end(), [](const BatchMeta::Seq& s) { return s.log_row >= 0; });
  const bool aligned = std::all_of(b.seqs.begin(), b.seqs.end(), [](const BatchMeta::Seq& s) {
    return s.log_row < 0 || s.log_row == s.q_start;
  });
  if (logged) key += aligned ? "/log" : "/log:";
  if (logged && !aligned)
    for (auto& s : b.seqs) key += str_cat(",", s.q_start, "+", s.q_len, ">", s.log_row);
  const std::vector<int32_t> all = iota_rows(b.num_tokens());
  GraphIo* io = nullptr;
  if (hidden_out) {
    DS_CHECK(logit_rows == all, "forward_graphed: with hidden_out the logit rows must be every row");
    io = &graph_io_[key];
    if (!io->hidden.defined() || io->hidden.numel() == 0)  // outside the step: not arena memory
      io->hidden = be_.alloc(be_.act_dtype(), {b.num_tokens(), cfg_.text.hidden_size});
  }
  StepScope scope(be_);
  be_.prepare_batch(b);  // in the step, outside the recording: this step's metadata into the shape's fixed buffer
  Tensor& out = graph_logits_[key];
  be_.graph_run(key, [&] {
    Tensor h;
    out = forward(b, caches, logit_rows, io ? &h : nullptr, io ? &logit_rows : nullptr);
    if (io) be_.copy(io->hidden, h);
  });
  if (io) *hidden_out = io->hidden;
  return out;
}

void Model::mtp_forward_graphed(BatchMeta& b, ModelCaches& caches, const Tensor& hidden, bool reduced, Tensor* logits,
                                Tensor* hidden_out, int64_t argmax_limit, Tensor* ids, const Tensor* tokens_in,
                                bool ids_as_tokens) {
  const int64_t T = b.num_tokens(), H = cfg_.text.hidden_size;
  DS_CHECK(hidden.dim(0) == T && hidden.numel() == T * H, "mtp_forward_graphed: hidden must be [", T, ", ", H, "]");
  DS_CHECK(!reduced || w_.mtp.draft_head, "this model has no reduced draft head loaded (LoadOptions::draft_vocab)");
  const int64_t N = reduced ? w_.mtp.draft_head->N : cfg_.text.vocab_size;
  DS_CHECK(argmax_limit <= N && (argmax_limit <= 0 || ids), "mtp_forward_graphed: argmax over ", argmax_limit,
           " of ", N, " columns needs `ids`");
  DS_CHECK(!tokens_in || (tokens_in->dtype == DType::I32 && tokens_in->numel() == T),
           "mtp_forward_graphed: tokens_in must be I32 [", T, "]");
  const Tensor* map = reduced && ids_as_tokens ? &w_.mtp.draft_ids_dev : nullptr;
  // Fed tokens: the recording copies them from the shape's token buffer into the batch mirror (a node of its own).
  const std::string key = str_cat("mtp/", T, "/", b.seqs.size(), "/", caches.id, reduced ? "/r" : "",
                                  argmax_limit > 0 ? str_cat("/a", argmax_limit) : std::string(), map ? "/m" : "",
                                  tokens_in ? "/f" : "");
  GraphIo& io = graph_io_[key];
  if (!io.in.defined() || io.in.numel() == 0) {  // outside the step: not arena memory
    io.in = be_.alloc(be_.act_dtype(), {T, H});
    io.hidden = be_.alloc(be_.act_dtype(), {T, H});
    io.logits = be_.alloc(DType::F32, {T, N});
    if (argmax_limit > 0) io.ids = be_.alloc(DType::I32, {T});
    if (tokens_in) io.tokens = be_.alloc(DType::I32, {T});
  }
  be_.copy(io.in, hidden);
  if (tokens_in) be_.copy(io.tokens, *tokens_in);
  const std::vector<int32_t> all = iota_rows(T);
  {
    StepScope scope(be_);
    be_.prepare_batch(b);
    be_.graph_run(key, [&] {
      Tensor h;
      Tensor l = mtp_forward(b, caches, io.in, all, &h, reduced, tokens_in ? &io.tokens : nullptr);
      be_.copy(io.logits, l);
      be_.copy(io.hidden, h);
      if (argmax_limit > 0) be_.argmax_rows(io.logits, argmax_limit, io.ids, map);
    });
  }
  *logits = io.logits;
  if (hidden_out) *hidden_out = io.hidden;
  if (argmax_limit > 0) *ids = io.ids;
}

}  // namespace ds::model
