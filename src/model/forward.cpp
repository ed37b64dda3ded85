// forward(): one loop over layers, one branch on the layer type, residuals visible.
#include "model/model.h"
#include "model/step_scope.h"

#include <atomic>

namespace ds::model {

Tensor Model::forward(BatchMeta& b, ModelCaches& caches, const std::vector<int32_t>& logit_rows, Tensor* hidden_out,
                      const std::vector<int32_t>* hidden_rows) {
  const auto& t = cfg_.text;
  const int64_t T = b.num_tokens(), H = t.hidden_size;
  const DType act = be_.act_dtype();
  be_.prepare_batch(b);

  Tensor x = be_.alloc(act, {T, H});  // residual stream
  be_.embed(w_.embed, b, x);
  if (!b.embed_rows.empty()) be_.scatter_rows(x, b.embed_rows, b.embed_src);  // image features
  // h = the current layer's input norm of x; each layer's FFN output is added to x together with the next
  // layer's input norm (add_rmsnorm). The last one: with the final norm when the logit rows are every row (decode
  // and verify steps: no row gather, one launch fewer; the same values), else alone, and the final norm runs on the
  // logit rows only.
  const float eps = float(t.rms_norm_eps);
  bool all_rows = int64_t(logit_rows.size()) == T;
  for (int64_t i = 0; all_rows && i < T; ++i) all_rows = logit_rows[size_t(i)] == int32_t(i);
  Tensor h = be_.alloc(act, {T, H}), hf;
  if (!w_.layers.empty()) be_.rmsnorm(x, w_.layers[0].in_norm, eps, h);
  for (size_t L = 0; L < w_.layers.size(); ++L) {
    Tensor f = decoder_layer(w_.layers[L], x, h, b, caches, &caches.kv[L], &caches.state[L], int64_t(L));
    if (L + 1 < w_.layers.size()) {
      be_.add_rmsnorm(x, f, w_.layers[L + 1].in_norm, eps, h);
    } else if (all_rows) {
      hf = be_.alloc(act, {T, H});
      be_.add_rmsnorm(x, f, w_.final_norm, eps, hf);
    } else {
      be_.add_inplace(x, f);
    }
  }
  if (!all_rows || w_.layers.empty()) hf = normed_rows(x, logit_rows, w_.final_norm);
  if (hidden_out)
    *hidden_out = hidden_rows && *hidden_rows != logit_rows ? normed_rows(x, *hidden_rows, w_.final_norm) : hf;
  return lm_head_logits(hf);
}

Tensor Model::normed_rows(const Tensor& x, const std::vector<int32_t>& rows, const Tensor& norm) {
  const int64_t R = int64_t(rows.size()), H = cfg_.text.hidden_size;
  Tensor picked = be_.alloc(be_.act_dtype(), {R, H});
  be_.gather_rows(x, rows, picked);
  Tensor out = be_.alloc(be_.act_dtype(), {R, H});
  be_.rmsnorm(picked, norm, float(cfg_.text.rms_norm_eps), out);
  return out;
}

Tensor Model::lm_head_logits(const Tensor& hf, const Linear* head) {
  const Linear& w = head ? *head : w_.lm_head;
  Tensor logits = be_.alloc(DType::F32, {hf.dim(0), w->N});
  be_.linear(hf, w, logits);
  return logits;
}

// One decoder layer on the residual stream x, with h = rmsnorm(x, in_norm) given: x += mixer(h), h =
// rmsnorm(x, post_norm); returns the FFN's output, which the caller adds to x (fused with the next norm).
Tensor Model::decoder_layer(const LayerWeights& lw, Tensor& x, Tensor& h, BatchMeta& b, ModelCaches& caches,
                            KvLayer* kv, StateLayer* st, int64_t layer) {
  const float eps = float(cfg_.text.rms_norm_eps);
  Tensor log_mixed, log_ba;  // this layer's rows of the DeltaNet input log, if the caches have one
  const auto& lg = caches.gdn_log;
  if (lw.type != io::LayerType::FullAttention && lg.rows > 0 && layer >= 0) {
    const int64_t r0 = int64_t(lg.index[size_t(layer)]) * lg.rows;
    log_mixed = lg.mixed.rows(r0, r0 + lg.rows);
    log_ba = lg.ba.rows(r0, r0 + lg.rows);
  }
  Tensor mix = lw.type == io::LayerType::FullAttention ? attention_block(lw, h, b, *kv)
                                                       : deltanet_block(lw, h, b, *st, log_mixed, log_ba);
  be_.add_rmsnorm(x, mix, lw.post_norm, eps, h);
  return ffn_block(lw, h);
}

Tensor Model::mtp_forward(BatchMeta& b, ModelCaches& caches, const Tensor& hidden,
                          const std::vector<int32_t>& logit_rows, Tensor* hidden_out, bool reduced,
                          const Tensor* token_ids) {
  DS_CHECK(w_.mtp.present, "this model has no MTP head loaded");
  DS_CHECK(!reduced || w_.mtp.draft_head, "this model has no reduced draft head loaded (LoadOptions::draft_vocab)");
  const auto& t = cfg_.text;
  const int64_t T = b.num_tokens(), H = t.hidden_size;
  const float eps = float(t.rms_norm_eps);
  const DType act = be_.act_dtype();
  be_.prepare_batch(b);
  if (token_ids) be_.batch_tokens_from(b, *token_ids);
  const MtpWeights& m = w_.mtp;
  Tensor e = be_.alloc(act, {T, H});
  be_.embed(w_.embed, b, e);
  if (!b.embed_rows.empty()) be_.scatter_rows(e, b.embed_rows, b.embed_src);  // rows fed an image placeholder
  be_.rmsnorm(e, m.pre_fc_norm_embedding, eps, e);
  Tensor hh = be_.alloc(act, {T, H});
  be_.rmsnorm(hidden, m.pre_fc_norm_hidden, eps, hh);
  // fc(concat(e, hh)) as the sum of its two column halves
  Tensor x = be_.alloc(act, {T, H});
  be_.linear(e, m.fc_e, x);
  Tensor x2 = be_.alloc(act, {T, H});
  be_.linear(hh, m.fc_h, x2);
  be_.add_inplace(x, x2);
  Tensor h = be_.alloc(act, {T, H});
  be_.rmsnorm(x, m.layer.in_norm, eps, h);
  be_.add_inplace(x, decoder_layer(m.layer, x, h, b, caches, &caches.mtp_kv, nullptr));
  Tensor hf = normed_rows(x, logit_rows, m.norm);
  if (hidden_out) *hidden_out = hf;
  return lm_head_logits(hf, reduced ? &m.draft_head : nullptr);
}

ModelCaches Model::alloc_caches(int64_t num_blocks, int64_t block_size, int64_t num_slots, int64_t log_rows) {
  const auto& t = cfg_.text;
  static std::atomic<uint64_t> next_id{1};
  ModelCaches c;
  c.id = next_id++;
  c.kv.resize(t.layer_types.size());
  c.state.resize(t.layer_types.size());
  for (size_t L = 0; L < t.layer_types.size(); ++L) {
    if (t.layer_types[L] == io::LayerType::FullAttention) {
      c.kv[L].block_size = block_size;
      c.kv[L].k = be_.alloc(be_.act_dtype(), {num_blocks, block_size, t.num_kv_heads, t.head_dim});
      c.kv[L].v = be_.alloc(be_.act_dtype(), {num_blocks, block_size, t.num_kv_heads, t.head_dim});
    } else {
      c.state[L].conv = be_.alloc(DType::F32, {num_slots, t.lin_conv_dim(), t.conv_kernel - 1});
      c.state[L].ssm = be_.alloc(ssm_dtype_, {num_slots, t.lin_num_v_heads, t.lin_k_head_dim, t.lin_v_head_dim});
    }
  }
  if (log_rows > 0) {
    auto& lg = c.gdn_log;
    lg.rows = log_rows;
    lg.index.assign(t.layer_types.size(), -1);
    int32_t n = 0;
    for (size_t L = 0; L < t.layer_types.size(); ++L)
      if (t.layer_types[L] != io::LayerType::FullAttention) lg.index[L] = n++;
    lg.mixed = be_.alloc(be_.act_dtype(), {n * log_rows, t.lin_conv_dim()});
    lg.ba = be_.alloc(be_.act_dtype(), {n * log_rows, 2 * t.lin_num_v_heads});
  }
  if (w_.mtp.present) {
    c.mtp_kv.block_size = block_size;
    c.mtp_kv.k = be_.alloc(be_.act_dtype(), {num_blocks, block_size, t.num_kv_heads, t.head_dim});
    c.mtp_kv.v = be_.alloc(be_.act_dtype(), {num_blocks, block_size, t.num_kv_heads, t.head_dim});
  }
  return c;
}

int64_t Model::kv_block_bytes(int64_t block_size) const {
  const auto& t = cfg_.text;
  int64_t layers = w_.mtp.present ? 1 : 0;
  for (auto lt : t.layer_types) layers += lt == io::LayerType::FullAttention ? 1 : 0;
  return layers * 2 * block_size * t.num_kv_heads * t.head_dim * int64_t(dtype_size(be_.act_dtype()));
}

int64_t Model::state_slot_bytes() const {
  const auto& t = cfg_.text;
  int64_t layers = 0;
  for (auto lt : t.layer_types) layers += lt == io::LayerType::FullAttention ? 0 : 1;
  const int64_t per_layer =
      t.lin_conv_dim() * (t.conv_kernel - 1) * int64_t(dtype_size(DType::F32)) +
      t.lin_num_v_heads * t.lin_k_head_dim * t.lin_v_head_dim * int64_t(dtype_size(ssm_dtype_));
  return layers * per_layer;
}

void Model::set_ssm_state_dtype(DType dt) {
  DS_CHECK(dt == DType::F32 || dt == DType::BF16, "SSM state dtype: expected float32 or bfloat16, got ",
           dtype_name(dt));
  ssm_dtype_ = dt;
}

DType Model::ssm_dtype_from_name(const std::string& name, DType config_default, const std::string& what) {
  if (name.empty() || name == "auto") return config_default;
  if (name == "float32" || name == "fp32") return DType::F32;
  if (name == "bfloat16" || name == "bf16") return DType::BF16;
  fail(what, ": '", name, "' is not one of auto, float32, bfloat16");
}

int64_t Model::gdn_log_row_bytes() const {
  const auto& t = cfg_.text;
  int64_t layers = 0;
  for (auto lt : t.layer_types) layers += lt == io::LayerType::FullAttention ? 0 : 1;
  return layers * (t.lin_conv_dim() + 2 * t.lin_num_v_heads) * int64_t(dtype_size(be_.act_dtype()));
}

void Model::copy_slot(ModelCaches& c, int32_t dst, int32_t src, bool graphed) {
  if (dst == src) return;
  auto body = [&] {
    for (auto& s : c.state) {
      if (!s.conv.defined() || s.conv.numel() == 0) continue;
      Tensor cd = s.conv.rows(dst, dst + 1), sd = s.ssm.rows(dst, dst + 1);
      be_.copy(cd, s.conv.rows(src, src + 1));
      be_.copy(sd, s.ssm.rows(src, src + 1));
    }
  };
  if (!graphed) return body();
  // One recording per (cache set, dst, src): a graph launch instead of two copies per linear-attention layer. The
  // copies read no batch, but a recording is redone when the batch mirror moved since (CUDA backend), so the step
  // prepares a fixed one-token batch.
  StepScope scope(be_);
  BatchMeta b;
  b.seqs.push_back({0, 1, 0, dst, {}});
  b.tokens = {0};
  b.positions = {0, 0, 0};
  be_.prepare_batch(b);
  be_.graph_run(str_cat("slot/", c.id, "/", dst, "/", src), body);
}

Tensor Model::alloc_host_slot() {
  return be_.alloc_host(DType::U8, {state_slot_bytes()});
}

// Calls fn(slot's row of a DeltaNet tensor, the same bytes' view in `host`) for the conv window and the recurrent
// state of every linear-attention layer, in order: a slot's host image is those rows back to back.
template <typename Fn>
static void for_each_host_row(ModelCaches& c, int32_t slot, const Tensor& host, int64_t slot_bytes, Fn&& fn) {
  DS_CHECK(int64_t(host.nbytes()) == slot_bytes, "host state slot of ", host.nbytes(), " bytes, expected ", slot_bytes);
  size_t off = 0;
  for (auto& s : c.state) {
    if (!s.conv.defined() || s.conv.numel() == 0) continue;
    for (Tensor* t : {&s.conv, &s.ssm}) {
      Tensor row = t->rows(slot, slot + 1), h = row;
      h.data = static_cast<char*>(host.data) + off;
      h.device = host.device;
      h.owner = nullptr;
      off += row.nbytes();
      DS_CHECK(int64_t(off) <= slot_bytes, "host state slot: the caches' rows are longer than state_slot_bytes()");
      fn(row, h);
    }
  }
}

uint64_t Model::slot_to_host(ModelCaches& c, int32_t slot, Tensor& host) {
  std::vector<std::pair<Tensor, Tensor>> copies;
  for_each_host_row(c, slot, host, state_slot_bytes(), [&](Tensor& row, Tensor& h) { copies.emplace_back(h, row); });
  return be_.copy_aside(copies);
}

void Model::slot_from_host(ModelCaches& c, int32_t slot, const Tensor& host) {
  for_each_host_row(c, slot, host, state_slot_bytes(), [&](Tensor& row, Tensor& h) { be_.copy(row, h); });
}

void Model::copy_kv_block(ModelCaches& c, int32_t dst, int32_t src) {
  if (dst == src) return;
  auto one = [&](KvLayer& kv) {
    if (!kv.k.defined() || kv.k.numel() == 0) return;
    Tensor kd = kv.k.rows(dst, dst + 1), vd = kv.v.rows(dst, dst + 1);
    be_.copy(kd, kv.k.rows(src, src + 1));
    be_.copy(vd, kv.v.rows(src, src + 1));
  };
  for (auto& kv : c.kv) one(kv);
  one(c.mtp_kv);
}

void Model::reset_slot(ModelCaches& c, int32_t slot) {
  for (auto& s : c.state) {
    if (!s.conv.defined() || s.conv.numel() == 0) continue;
    Tensor conv = s.conv.rows(slot, slot + 1), ssm = s.ssm.rows(slot, slot + 1);
    be_.zero(conv);
    be_.zero(ssm);
  }
}

}  // namespace ds::model
