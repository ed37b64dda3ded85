#include "runtime/spec_decode.h"

#include <algorithm>

#include "runtime/engine.h"
#include "sampling/sampling.h"

namespace ds::runtime {

void mtp_propose(model::Model& m, CacheManager& cm, const Tensor& hidden, std::vector<DraftJob>& jobs,
                 int64_t vocab_limit, const DraftHook& hook) {
  Backend& be = m.backend();
  const int64_t V = m.config().text.vocab_size, H = m.config().text.hidden_size;
  std::vector<std::pair<const SeqCache*, std::vector<int32_t>>> parts;
  std::vector<SeqCache> views;  // each sequence's cache as the MTP sees it: len = its valid MTP KV
  views.reserve(jobs.size());
  std::vector<int32_t> hrows, lrows;  // target hidden rows fed in; MTP rows whose logits draft d_1
  int64_t row = 0;
  for (auto& j : jobs) {
    j.seq->drafts.clear();
    if (j.rows <= 0) continue;
    views.push_back(j.seq->cache);
    views.back().len = j.ctx_len;
    auto next = j.seq->tokens.begin() + j.ctx_len + 1;  // row i is fed the token after position ctx_len + i
    parts.push_back({&views.back(), std::vector<int32_t>(next, next + j.rows)});
    for (int64_t i = 0; i < j.rows; ++i) hrows.push_back(int32_t(j.first_row + i));
    row += j.rows;
    if (j.num_drafts > 0) lrows.push_back(int32_t(row - 1));
  }
  if (parts.empty()) return;
  BatchMeta b = make_batch(parts);
  Tensor h = be.alloc(be.act_dtype(), {int64_t(hrows.size()), H});
  be.gather_rows(hidden, hrows, h);
  Tensor hout;  // MTP post-norm hidden of the drafting rows: the next chained step's input
  const bool any = !lrows.empty();
  std::vector<float> logits = be.to_host_f32(m.mtp_forward(b, cm.caches(), h, any ? lrows : std::vector<int32_t>{0}, &hout));
  if (!any) return;

  // Chained steps: one row per sequence still drafting.
  std::vector<DraftJob*> active;
  for (auto& j : jobs)
    if (j.rows > 0 && j.num_drafts > 0) active.push_back(&j);
  auto propose = [&](Sequence* s, const float* row) {
    int32_t d = sampling::draft_argmax(row, V, vocab_limit);
    if (hook) d = hook(s->req->id, int64_t(s->tokens.size() + s->drafts.size()), d);
    s->drafts.push_back(d);
  };
  for (size_t i = 0; i < active.size(); ++i) propose(active[i]->seq, logits.data() + int64_t(i) * V);
  for (int64_t k = 1;; ++k) {
    std::vector<int32_t> keep;  // rows of `hout` whose sequence drafts again
    std::vector<DraftJob*> next;
    for (size_t i = 0; i < active.size(); ++i)
      if (active[i]->num_drafts > k) {
        keep.push_back(int32_t(i));
        next.push_back(active[i]);
      }
    if (next.empty()) return;
    parts.clear();
    views.clear();
    views.reserve(next.size());
    for (DraftJob* j : next) {
      // d_k sits at position (last committed position) + k: the target's new length − 1 + k.
      views.push_back(j->seq->cache);
      views.back().len = j->seq->cache.len - 1 + k;
      parts.push_back({&views.back(), {j->seq->drafts.back()}});
    }
    BatchMeta cb = make_batch(parts);
    Tensor prev = hout;
    if (keep.size() != active.size()) {
      prev = be.alloc(be.act_dtype(), {int64_t(keep.size()), H});
      be.gather_rows(hout, keep, prev);
    }
    std::vector<int32_t> all(next.size());
    for (size_t i = 0; i < all.size(); ++i) all[i] = int32_t(i);
    logits = be.to_host_f32(m.mtp_forward(cb, cm.caches(), prev, all, &hout));
    for (size_t i = 0; i < next.size(); ++i) propose(next[i]->seq, logits.data() + int64_t(i) * V);
    active = std::move(next);
  }
}

}  // namespace ds::runtime
