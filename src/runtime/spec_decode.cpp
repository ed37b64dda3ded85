#include "runtime/spec_decode.h"

#include <algorithm>
#include <functional>
#include <sstream>

#include "core/file.h"
#include "core/status.h"
#include "runtime/engine.h"
#include "sampling/sampling.h"

namespace ds::runtime {

void PhaseClock::start() {
  if (!be_) return;
  be_->synchronize();
  t_ = std::chrono::steady_clock::now();
}

void PhaseClock::mark(const char* phase) {
  if (!be_) return;
  be_->synchronize();
  const auto now = std::chrono::steady_clock::now();
  const double ms = std::chrono::duration<double, std::milli>(now - t_).count();
  t_ = now;
  for (auto& [name, v] : *ms_)
    if (name == phase) {
      v += ms;
      return;
    }
  ms_->push_back({phase, ms});
}

int32_t draft_pick(const float* row, int64_t V, int64_t vocab_limit, const std::vector<int32_t>* ids) {
  if (!ids) return sampling::draft_argmax(row, V, vocab_limit);
  const int64_t lim = vocab_limit > 0 ? vocab_limit : V;
  int64_t best = -1;
  for (size_t j = 0; j < ids->size(); ++j)
    if ((*ids)[j] < lim && (best < 0 || row[j] > row[best])) best = int64_t(j);
  DS_CHECK(best >= 0, "draft vocabulary: no token below the vocabulary limit ", lim);
  return (*ids)[size_t(best)];
}

std::vector<int32_t> draft_vocab_ids(int64_t n, const std::string& file, int64_t V) {
  if (n < 0 || n > V) fail("draft vocabulary: size must be in 1..", V, ", found ", n);
  std::vector<int32_t> ids;
  if (file.empty()) {
    if (n == 0) fail("draft vocabulary: give a size (draft_vocab_size) or a file of token ids");
    for (int64_t i = 0; i < n; ++i) ids.push_back(int32_t(i));
    return ids;
  }
  std::string text = read_file(file, "draft vocabulary file");
  std::replace(text.begin(), text.end(), ',', ' ');
  std::istringstream ss(text);
  std::string w;
  std::vector<uint8_t> seen(size_t(V), 0);
  while ((n == 0 || int64_t(ids.size()) < n) && ss >> w) {
    size_t used = 0;
    long long v = -1;
    try {
      v = std::stoll(w, &used);
    } catch (...) {
      used = 0;
    }
    if (used != w.size()) fail("draft vocabulary: '", file, "': expected token ids, found '", w, "'");
    if (v < 0 || v >= V) fail("draft vocabulary: '", file, "': token id ", v, " is outside the vocabulary [0, ", V, ")");
    if (seen[size_t(v)]++) fail("draft vocabulary: '", file, "': token id ", v, " is listed twice");
    ids.push_back(int32_t(v));
  }
  if (ids.empty() || (n > 0 && int64_t(ids.size()) < n))
    fail("draft vocabulary: '", file, "' lists ", ids.size(), " token ids, ", n > 0 ? "fewer than the " : "",
         n > 0 ? std::to_string(n) : std::string("expected at least one"), n > 0 ? " asked for" : "");
  return ids;
}

namespace {

// dst[off + i] = src[rows[i]] for int32 tensors on the backend: device copies, one per run of consecutive rows.
void copy_ids(Backend& be, Tensor& dst, int64_t off, const Tensor& src, const std::vector<int32_t>& rows) {
  for (size_t i = 0; i < rows.size();) {
    size_t j = i + 1;
    while (j < rows.size() && rows[j] == rows[j - 1] + 1) ++j;
    Tensor d = dst.rows(off + int64_t(i), off + int64_t(j));
    be.copy(d, src.rows(rows[i], rows[i] + int64_t(j - i)));
    i = j;
  }
}

// The jobs that draft (rows committed this step and drafts wanted), in job order: the rows of a chained step.
std::vector<DraftJob*> drafting_jobs(std::vector<DraftJob>& jobs) {
  std::vector<DraftJob*> active;
  for (auto& j : jobs)
    if (j.rows > 0 && j.num_drafts > 0) active.push_back(&j);
  return active;
}

// Appends d to s's drafts, through the hook (tests, benchmarks) when one is set.
// A retiring sequence (finished; its pass only fills the MTP KV of its checkpoint) proposes nothing.
void propose(const DraftOptions& opt, Sequence* s, int32_t d) {
  if (s->retiring) return;
  if (opt.hook) d = opt.hook(s->req->id, int64_t(s->tokens.size() + s->drafts.size()), d);
  s->drafts.push_back(d);
}

// Chained draft step k (k >= 1) after a step whose rows were `active` with MTP hidden rows `hout`: the sequences
// that still draft (next), their rows of the previous step (keep), their batch (d_k sits at position (last
// committed position) + k: the target's new length − 1 + k; its token is token(job)) and their input hidden rows
// (prev). False when no sequence drafts again.
struct ChainStep {
  std::vector<DraftJob*> next;
  std::vector<int32_t> keep;
  BatchMeta batch;
  Tensor prev;
};
bool chain_step(Backend& be, const std::vector<DraftJob*>& active, int64_t k, const Tensor& hout,
                const std::function<int32_t(const DraftJob&)>& token, ChainStep& st) {
  st.next.clear();
  st.keep.clear();
  for (size_t i = 0; i < active.size(); ++i)
    if (active[i]->num_drafts > k) {
      st.keep.push_back(int32_t(i));
      st.next.push_back(active[i]);
    }
  if (st.next.empty()) return false;
  std::vector<std::pair<const SeqCache*, std::vector<int32_t>>> parts;
  std::vector<SeqCache> views;
  views.reserve(st.next.size());
  for (DraftJob* j : st.next) {
    views.push_back(j->seq->cache);
    views.back().len = j->seq->cache.len - 1 + k;
    parts.push_back({&views.back(), {token(*j)}});
  }
  st.batch = make_batch(parts);
  std::vector<const Sequence*> seqs;
  for (DraftJob* j : st.next) seqs.push_back(j->seq);
  place_mm_rows(be, hout.dim(1), seqs, st.batch, -1);  // drafts at position + rope_delta
  st.prev = hout;
  if (st.keep.size() != active.size()) {
    st.prev = be.alloc(be.act_dtype(), {int64_t(st.keep.size()), hout.dim(1)});
    be.gather_rows(hout, st.keep, st.prev);
  }
  return true;
}

// mtp_propose's drafting when every step is recorded and the argmax runs on the device (DraftOptions::device_feed):
// each chained step reads its token ids from the previous step's argmax on the device (mtp_forward_graphed's
// tokens_in), and every step's drafts collect in one device buffer read once at the end, so the K draft steps run
// back to back without a host round trip. The hook then replaces proposals in the same order as the stepwise path;
// the chained steps were fed the MTP's own proposals.
void propose_fed(model::Model& m, CacheManager& cm, BatchMeta& b, const Tensor& h, std::vector<DraftJob>& jobs,
                 const std::vector<int32_t>& lrows, int64_t dev_limit, const DraftOptions& opt) {
  Backend& be = m.backend();
  const int64_t H = m.config().text.hidden_size;
  auto mark = [&](const char* phase) {
    if (opt.clock) opt.clock->mark(phase);
  };
  std::vector<DraftJob*> active = drafting_jobs(jobs);
  int64_t total = 0;
  for (const DraftJob* j : active) total += j->num_drafts;
  DS_CHECK(active.size() == lrows.size(), "propose_fed: drafting rows and jobs disagree");
  Tensor L, hall, A;
  m.mtp_forward_graphed(b, cm.caches(), h, opt.reduced, &L, &hall, dev_limit, &A, nullptr, true);
  // acc: step k's drafts of its drafting sequences (steps[k]) back to back from offset[k].
  Tensor acc = be.alloc(DType::I32, {total});
  copy_ids(be, acc, 0, A, lrows);
  Tensor hout = be.alloc(be.act_dtype(), {int64_t(lrows.size()), H});
  be.gather_rows(hall, lrows, hout);
  std::vector<std::vector<DraftJob*>> steps = {active};
  std::vector<int64_t> offset = {0};
  int64_t used = int64_t(active.size());
  mark("draft: first pass");
  ChainStep st;
  // The batch's token is a placeholder: the step reads it from the device (tokens_in).
  for (int64_t k = 1; chain_step(be, active, k, hout, [](const DraftJob&) { return 0; }, st); ++k) {
    const int64_t n = int64_t(st.next.size());
    Tensor tok = be.alloc(DType::I32, {n});
    copy_ids(be, tok, 0, acc.rows(offset.back(), offset.back() + int64_t(active.size())), st.keep);
    mark("draft: chain build");
    m.mtp_forward_graphed(st.batch, cm.caches(), st.prev, opt.reduced, &L, &hout, dev_limit, &A, &tok, true);
    Tensor dst = acc.rows(used, used + n);
    be.copy(dst, A);
    offset.push_back(used);
    steps.push_back(st.next);
    used += n;
    active = st.next;
    mark("draft: chain step");
  }
  const std::vector<float> ids = be.to_host_f32(acc.rows(0, used));  // the one host sync of the drafting
  mark("draft: readback");
  for (size_t k = 0; k < steps.size(); ++k)
    for (size_t i = 0; i < steps[k].size(); ++i) propose(opt, steps[k][i]->seq, int32_t(ids[size_t(offset[k]) + i]));
}

// Rows `rows` of a device tensor to the host (one read; a gather first unless they are a prefix).
std::vector<float> rows_to_host(Backend& be, const Tensor& t, const std::vector<int32_t>& rows) {
  bool prefix = true;
  for (size_t i = 0; prefix && i < rows.size(); ++i) prefix = rows[i] == int32_t(i);
  if (prefix) return be.to_host_f32(t.rows(0, int64_t(rows.size())));
  Tensor g = be.alloc(t.dtype, {int64_t(rows.size()), t.numel() / t.dim(0)});
  be.gather_rows(t, rows, g);
  return be.to_host_f32(g);
}

}  // namespace

void mtp_propose(model::Model& m, CacheManager& cm, const Tensor& hidden, std::vector<DraftJob>& jobs,
                 const DraftOptions& opt) {
  Backend& be = m.backend();
  const int64_t V = m.config().text.vocab_size, H = m.config().text.hidden_size;
  const std::vector<int32_t>* ids = opt.reduced ? &m.draft_vocab() : nullptr;
  DS_CHECK(!opt.reduced || !ids->empty(), "speculative decoding: reduced draft head requested but none is loaded");
  const int64_t N = ids ? int64_t(ids->size()) : V;  // columns of a draft logits row
  std::vector<std::pair<const SeqCache*, std::vector<int32_t>>> parts;
  std::vector<SeqCache> views;  // each sequence's cache as the MTP sees it: len = its valid MTP KV
  views.reserve(jobs.size());
  std::vector<int32_t> hrows, lrows;  // target hidden rows fed in; MTP rows whose logits draft d_1
  int64_t row = 0;
  bool graphed = opt.graphs;
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
    else graphed = false;  // a prefill chunk mid-prompt: a one-off shape
  }
  if (parts.empty()) return;
  graphed = graphed && row <= kMaxGraphRows;
  // The drafts are argmaxes of MTP logit rows. Where the columns a draft may take are a prefix of the row (the full
  // head's [0, vocab_limit); a reduced head whose tokens are all below vocab_limit) the argmax runs on the device
  // (Backend::argmax_rows, inside the recording when graphed) and one int per row comes back instead of the row.
  const int64_t lim = opt.vocab_limit > 0 ? std::min(opt.vocab_limit, V) : V;
  const int64_t dev_limit = !ids ? lim : m.draft_vocab_max() < lim ? N : 0;
  auto token = [&](int32_t col) { return ids ? (*ids)[size_t(col)] : col; };
  // Draft tokens of rows `rows` (empty: all) of logits L [R, N], or of their device argmaxes A [R] when defined.
  auto pick = [&](const Tensor& L, const Tensor& A, const std::vector<int32_t>& rows) {
    std::vector<int32_t> out;
    const int64_t R = L.dim(0);
    if (dev_limit > 0) {
      Tensor a = A;
      if (!a.defined() || a.numel() == 0) {
        a = be.alloc(DType::I32, {R});
        be.argmax_rows(L, dev_limit, a);
      }
      const std::vector<float> cols = be.to_host_f32(a);
      if (rows.empty())
        for (float c : cols) out.push_back(token(int32_t(c)));
      for (int32_t r : rows) out.push_back(token(int32_t(cols[size_t(r)])));
      return out;
    }
    const std::vector<float> lg = rows.empty() ? be.to_host_f32(L) : rows_to_host(be, L, rows);
    const int64_t n = rows.empty() ? R : int64_t(rows.size());
    for (int64_t i = 0; i < n; ++i) out.push_back(draft_pick(lg.data() + i * N, V, opt.vocab_limit, ids));
    return out;
  };
  auto mark = [&](const char* phase) {
    if (opt.clock) opt.clock->mark(phase);
  };
  BatchMeta b = make_batch(parts);
  // Image / video sequences: the target tokens' mRoPE positions, vision features where a row is fed a placeholder.
  std::vector<const Sequence*> seqs;
  for (auto& j : jobs)
    if (j.rows > 0) seqs.push_back(j.seq);
  place_mm_rows(be, H, seqs, b, 1);
  if (!b.embed_rows.empty()) graphed = false;  // a recording has no place for them
  Tensor h = be.alloc(be.act_dtype(), {int64_t(hrows.size()), H});
  be.gather_rows(hidden, hrows, h);
  mark("draft: build");
  Tensor hout;  // MTP post-norm hidden of the drafting rows: the next chained step's input
  const bool any = !lrows.empty();
  std::vector<int32_t> toks;  // the draft of each drafting row
  if (graphed && any && dev_limit > 0 && opt.device_feed) return propose_fed(m, cm, b, h, jobs, lrows, dev_limit, opt);
  if (graphed) {
    // Every row is a logit row in the recording; the drafting rows are picked out here.
    Tensor L, hall, A;
    m.mtp_forward_graphed(b, cm.caches(), h, opt.reduced, &L, &hall, any ? dev_limit : 0, &A);
    mark("draft: first pass");
    if (!any) return;
    toks = pick(L, A, lrows);
    mark("draft: readback");
    hout = be.alloc(be.act_dtype(), {int64_t(lrows.size()), H});
    be.gather_rows(hall, lrows, hout);
  } else {
    Tensor L = m.mtp_forward(b, cm.caches(), h, any ? lrows : std::vector<int32_t>{0}, &hout, opt.reduced);
    mark("draft: first pass");
    if (!any) return;
    toks = pick(L, Tensor{}, {});
    mark("draft: readback");
  }

  // Chained steps: one row per sequence still drafting.
  std::vector<DraftJob*> active = drafting_jobs(jobs);
  for (size_t i = 0; i < active.size(); ++i) propose(opt, active[i]->seq, toks[i]);
  ChainStep st;
  for (int64_t k = 1; chain_step(be, active, k, hout, [](const DraftJob& j) { return j.seq->drafts.back(); }, st);
       ++k) {
    mark("draft: chain build");
    if (graphed) {
      Tensor L, A;
      m.mtp_forward_graphed(st.batch, cm.caches(), st.prev, opt.reduced, &L, &hout, dev_limit, &A);
      mark("draft: chain step");
      toks = pick(L, A, {});
    } else {
      std::vector<int32_t> all(st.next.size());
      for (size_t i = 0; i < all.size(); ++i) all[i] = int32_t(i);
      Tensor L = m.mtp_forward(st.batch, cm.caches(), st.prev, all, &hout, opt.reduced);
      mark("draft: chain step");
      toks = pick(L, Tensor{}, {});
    }
    mark("draft: readback");
    for (size_t i = 0; i < st.next.size(); ++i) propose(opt, st.next[i]->seq, toks[i]);
    active = st.next;
  }
}

}  // namespace ds::runtime
