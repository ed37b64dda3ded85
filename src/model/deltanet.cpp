// Gated DeltaNet: projections, causal conv1d (+SiLU) with state, gated delta rule with fp32 state,
// gated RMSNorm with silu(z), output projection. And the speculative rollback that re-runs only the state update.
#include <algorithm>

#include "core/status.h"
#include "model/model.h"
#include "model/step_scope.h"

namespace ds::model {

Tensor Model::deltanet_block(const LayerWeights& lw, const Tensor& x, BatchMeta& b, StateLayer& st,
                             const Tensor& log_mixed, const Tensor& log_ba) {
  const auto& t = cfg_.text;
  const int64_t T = b.num_tokens(), C = t.lin_conv_dim(), Hv = t.lin_num_v_heads, Vd = t.lin_value_dim();
  const DType act = be_.act_dtype();
  // Speculative verify: the state-update inputs of the logged rows go to the input log. When every logged
  // sequence's rows sit at its batch rows (the engine's choice whenever the batch fits the log) the projections
  // write straight into the log: no copy, and fixed addresses for a recorded step.
  bool logged = false, direct = log_mixed.defined() && log_mixed.numel() > 0 && T <= log_mixed.dim(0);
  if (log_mixed.defined() && log_mixed.numel() > 0)
    for (auto& s : b.seqs)
      if (s.log_row >= 0) {
        logged = true;
        direct = direct && s.log_row == s.q_start;
      }
  direct = direct && logged;
  Tensor mixed = direct ? log_mixed.rows(0, T) : be_.alloc(act, {T, C});  // q | k | v before the conv
  Tensor z = be_.alloc(act, {T, Vd});
  Tensor ba = direct ? log_ba.rows(0, T) : be_.alloc(act, {T, 2 * Hv});
  // in_proj_b | in_proj_a (ba) is computed inside deltanet_mix, which a backend may fuse into the mixer (the CUDA
  // short-chunk kernels: one launch fewer per layer).
  be_.linear_group(x, {{&lw.gdn.qkv, &mixed}, {&lw.gdn.z, &z}});
  Tensor normed = be_.alloc(act, {T, Vd});
  be_.deltanet_mix(mixed, lw.gdn.conv_w, ba, lw.gdn.A_log, lw.gdn.dt_bias, t.lin_num_k_heads, Hv, t.lin_k_head_dim,
                   t.lin_v_head_dim, &z, &lw.gdn.norm, float(t.rms_norm_eps), st, b, normed, &x, &lw.gdn.ba);
  if (logged && !direct)
    for (auto& s : b.seqs) {
      if (s.log_row < 0) continue;
      DS_CHECK(s.log_row + s.q_len <= log_mixed.dim(0), "DeltaNet input log: rows ", s.log_row, "..",
               s.log_row + s.q_len, " of ", log_mixed.dim(0));
      Tensor dm = log_mixed.rows(s.log_row, s.log_row + s.q_len), db = log_ba.rows(s.log_row, s.log_row + s.q_len);
      be_.copy(dm, mixed.rows(s.q_start, s.q_start + s.q_len));
      be_.copy(db, ba.rows(s.q_start, s.q_start + s.q_len));
    }
  Tensor y = be_.alloc(act, {T, t.hidden_size});
  be_.linear(normed, lw.gdn.out, y);
  return y;
}

void Model::replay_deltanet(BatchMeta& b, ModelCaches& c, bool graphed) {
  const auto& t = cfg_.text;
  const ModelCaches::GdnLog& lg = c.gdn_log;
  const int64_t R = lg.rows, Hv = t.lin_num_v_heads, Vd = t.lin_value_dim();
  DS_CHECK(R > 0, "replay_deltanet: these caches have no DeltaNet input log (alloc_caches' log_rows)");
  if (b.seqs.empty()) return;
  // The rows are read in place: sequence i's rows are the log's rows log_row.. (q_start = log_row), and rows of the
  // log between sequences (rejected drafts) are left out of every sequence, which the two ops allow (ops.h).
  int64_t T = 0;
  for (auto& s : b.seqs) {
    DS_CHECK(s.log_row >= 0 && s.q_len > 0 && s.log_row + s.q_len <= R, "replay_deltanet: rows ", s.log_row, "..",
             s.log_row + s.q_len, " are outside the input log's ", R);
    s.q_start = s.log_row;
    T = std::max(T, s.log_row + s.q_len);
  }
  for (size_t i = 0; i < b.seqs.size(); ++i)
    for (size_t k = 0; k < i; ++k)
      DS_CHECK(b.seqs[i].q_start >= b.seqs[k].q_start + b.seqs[k].q_len ||
                   b.seqs[k].q_start >= b.seqs[i].q_start + b.seqs[i].q_len,
               "replay_deltanet: sequences ", k, " and ", i, " overlap in the input log");
  b.tokens.assign(size_t(T), 0);
  b.positions.assign(size_t(3 * T), 0);
  b.embed_rows.clear();
  const DType act = be_.act_dtype();
  auto body = [&] {
    for (size_t L = 0; L < w_.layers.size(); ++L) {
      if (w_.layers[L].type == io::LayerType::FullAttention) continue;
      const GdnWeights& g = w_.layers[L].gdn;
      const int64_t r0 = int64_t(lg.index[L]) * R;
      Tensor mixed = lg.mixed.rows(r0, r0 + T), ba = lg.ba.rows(r0, r0 + T);
      Tensor o = be_.alloc(act, {T, Vd});
      be_.deltanet_mix(mixed, g.conv_w, ba, g.A_log, g.dt_bias, t.lin_num_k_heads, Hv, t.lin_k_head_dim,
                       t.lin_v_head_dim, nullptr, nullptr, 0.f, c.state[L], b, o);
    }
  };
  if (!graphed) {
    be_.prepare_batch(b);
    body();
    return;
  }
  // Recorded per shape: the kernels depend only on T and the sequence count (rows, lengths and slots of the
  // sequences are in prepare_batch's mirror); the log's address is fixed per cache set.
  const std::string key = str_cat("gdn/", T, "/", b.seqs.size(), "/", c.id);
  StepScope scope(be_);
  be_.prepare_batch(b);
  be_.graph_run(key, body);
}

}  // namespace ds::model
