// The text model: weights laid out on a backend, and forward() written once over backend ops.
#pragma once
#include <array>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "backend/ops.h"
#include "io/config.h"

namespace ds::io {
class TensorIndex;
}

namespace ds::model {

struct AttnWeights {
  Linear q, k, v, o;        // q: [Nh·2·Dh, H] (query | gate per head)
  Tensor q_norm, k_norm;    // fp32 [Dh], (1 + w) folded
};

struct GdnWeights {
  Linear qkv, z, ba, out;   // ba = concat(in_proj_b, in_proj_a): [2·Hv, H]
  Tensor conv_w;            // fp32 [C, Kc]
  Tensor A_log, dt_bias;    // fp32 [Hv]
  Tensor norm;              // fp32 [Dv], plain weight
};

struct FfnWeights {
  bool moe = true;
  Linear router;            // [E, H]
  Experts experts;
  Linear shared_gu, shared_down, shared_gate;  // [2·Is, H], [H, Is], [1, H]
  Linear mlp_gu, mlp_down;  // dense MLP: [2·I, H], [H, I]
};

struct LayerWeights {
  io::LayerType type = io::LayerType::LinearAttention;
  Tensor in_norm, post_norm;  // fp32 [H], (1 + w) folded
  AttnWeights attn;
  GdnWeights gdn;
  FfnWeights ffn;
};

// Multi-token-prediction head (model-spec §4): one full-attention decoder layer fed with
// fc([norm_e(embed(next token)), norm_h(main final hidden)]). Shares embed and lm_head.
struct MtpWeights {
  bool present = false;
  Linear fc_e, fc_h;               // the two column halves of mtp.fc [H, 2H]: embedding part, hidden part
  Tensor pre_fc_norm_embedding;    // fp32 [H], (1 + w) folded
  Tensor pre_fc_norm_hidden;
  Tensor norm;                     // mtp.norm
  LayerWeights layer;              // mtp.layers.0 (full attention + FFN)
  // Optional reduced-vocabulary draft head (LoadOptions::draft_vocab): rows draft_ids of lm_head, so a draft
  // step reads N·H weights instead of V·H. Logits column j is token draft_ids[j].
  Linear draft_head;
  std::vector<int32_t> draft_ids;
  int32_t draft_ids_max = -1;  // the largest of draft_ids
  Tensor draft_ids_dev;        // draft_ids on the backend (I32 [N]): Backend::argmax_rows' column -> token map
};

// Vision tower (model-spec §5.3, model/vision.cpp). Linear biases fp32 [N]; LayerNorm weight/bias fp32 [D].
struct VisionBlockWeights {
  Tensor norm1_w, norm1_b, norm2_w, norm2_b;
  Linear qkv, proj, fc1, fc2;  // [3·D, D], [D, D], [I, D], [D, I]
  Tensor qkv_b, proj_b, fc1_b, fc2_b;
};

struct VisionWeights {
  bool present = false;
  Linear patch;          // Conv3d(3→D, k = s = (Tp, ps, ps)) as a Linear [D, 3·Tp·ps·ps]
  Tensor patch_b;
  Tensor pos_embed;      // act dtype [side², D], row-major learned grid
  int64_t pos_side = 0;  // sqrt(num_position_embeddings)
  std::vector<VisionBlockWeights> blocks;
  Tensor merger_norm_w, merger_norm_b;       // [D]
  Linear merger_fc1, merger_fc2;             // [4D, 4D], [out, 4D]
  Tensor merger_fc1_b, merger_fc2_b;
};

struct Weights {
  MtpWeights mtp;
  VisionWeights vision;
  Tensor embed;       // act dtype [V, H]
  Tensor final_norm;  // fp32 [H], (1 + w) folded
  Linear lm_head;     // [V, H]
  std::vector<LayerWeights> layers;
};

// Per-layer caches of one model instance (allocated by runtime/).
struct ModelCaches {
  std::vector<KvLayer> kv;        // indexed by layer; empty tensors for linear-attention layers
  std::vector<StateLayer> state;  // indexed by layer; empty tensors for full-attention layers
  KvLayer mtp_kv;                 // the MTP layer's own KV (same block ids as the main sequence)
  // Speculative decoding: the DeltaNet input log. Every linear-attention layer's inputs to its state update (the
  // pre-conv `mixed` rows and the `ba` rows, act dtype) of the rows a verify logged (BatchMeta::Seq::log_row), so
  // that a rejection re-runs only conv1d + the gated delta rule over the accepted rows (Model::replay_deltanet).
  // Layer L's rows are log_index[L]·log_rows .. + log_rows of `mixed` [n·log_rows, C] and `ba` [n·log_rows, 2·Hv]
  // (n linear-attention layers). Fixed addresses per cache set, so a recorded verify can write them.
  struct GdnLog {
    Tensor mixed, ba;
    int64_t rows = 0;                // log_rows: rows per layer (0: no log)
    std::vector<int32_t> index;      // by layer: its block of rows, −1 for full attention
  } gdn_log;
  // Unique per alloc_caches() call: step-graph keys name the cache set by it, not by an address a later cache
  // set could reuse (a recording holds the tensor addresses of the caches it was recorded with).
  uint64_t id = 0;
};

struct LoadOptions {
  bool mtp = true;     // load the MTP head when the checkpoint has one
  bool vision = true;  // load the vision tower when the checkpoint has one (model.visual.*)
  bool text = true;    // load the language model (false: a tower-only model, for the vision benchmark)
  // Token ids of a reduced-vocabulary MTP draft head (speculative decoding, docs/engine.md), built from those
  // rows of lm_head (dense lm_head only) next to the full one. Empty: none. Ids must be distinct, in [0, V).
  std::vector<int32_t> draft_vocab;
  // The DeltaNet recurrent state's storage dtype (vLLM's --mamba-ssm-cache-dtype): "" or "auto" = the config's
  // mamba_ssm_dtype (float32 in the Qwen3.5 / 3.6 checkpoints), "float32", or "bfloat16" (half the state's memory and
  // traffic; the arithmetic stays fp32; docs/engine.md "DeltaNet state dtype").
  std::string ssm_state_dtype;
};

struct LoadReport {
  std::vector<std::string> not_yet_used;  // tensors of parts we declare but do not run yet (mtp., visual.)
  int64_t int4_linears = 0, bf16_linears = 0;
};

class Model {
 public:
  // Loads and validates every tensor of the checkpoint in `dir` onto `be`. Strict: a missing or mis-shaped
  // tensor, or a tensor no part of the model claims, is an error naming it.
  static std::unique_ptr<Model> load(const std::string& dir, Backend& be, LoadReport* report = nullptr,
                                     LoadOptions opts = {});
  // The same from an already opened (or synthetic) tensor index.
  static std::unique_ptr<Model> load_index(io::ModelConfig cfg, io::TensorIndex& idx, Backend& be,
                                           LoadReport* report = nullptr, LoadOptions opts = {});
  // Random weights of the config's real shapes and formats (the seed recipe: int4 experts and attention /
  // DeltaNet projections, BF16 shared experts, router, in_proj_a/b, lm_head), generated on the host one
  // tensor at a time and laid out on `be` as a checkpoint would be.
  static std::unique_ptr<Model> load_random(const io::ModelConfig& cfg, Backend& be, uint64_t seed, bool int4 = true,
                                            LoadOptions opts = {});
  // A vision tower alone with random weights of cfg.vision's shapes (io::vision_schema): encode_images only.
  static std::unique_ptr<Model> load_random_vision(const io::ModelConfig& cfg, Backend& be, uint64_t seed);
  bool has_mtp() const { return w_.mtp.present; }
  bool has_vision() const { return w_.vision.present; }
  // Token ids of the reduced MTP draft head's logit columns (empty: none loaded).
  const std::vector<int32_t>& draft_vocab() const { return w_.mtp.draft_ids; }
  int32_t draft_vocab_max() const { return w_.mtp.draft_ids_max; }  // the largest id of draft_vocab() (−1: none)

  // Vision tower over images laid out back to back (model/vision.cpp). pixel_values fp32 host
  // [Σ t·h·w, 3·Tp·ps·ps] in merge-block-major row order; grids_thw[i] = {t, h, w} in patches of image i.
  // Returns act-dtype features [Σ t·(h/2)·(w/2), text hidden]: one row per LLM placeholder token, in order.
  Tensor encode_images(const std::vector<float>& pixel_values, const std::vector<std::array<int64_t, 3>>& grids_thw);

  const io::ModelConfig& config() const { return cfg_; }
  Backend& backend() { return be_; }

  // The DeltaNet recurrent state's storage dtype (F32 or BF16) of the caches alloc_caches makes from now on; the conv
  // window stays F32. set_ssm_state_dtype: a later alloc_caches uses `dt` (bench variants; LoadOptions sets it at load).
  DType ssm_state_dtype() const { return ssm_dtype_; }
  void set_ssm_state_dtype(DType dt);
  // "auto" / "" → `config_default`, "float32" / "fp32" → F32, "bfloat16" / "bf16" → BF16; anything else fails naming
  // the accepted values (`what`: the option's name).
  static DType ssm_dtype_from_name(const std::string& name, DType config_default, const std::string& what);
  // The config's mamba_ssm_dtype as a DType (what "auto" means for it).
  static DType config_ssm_dtype(const io::ModelConfig& cfg) {
    return cfg.text.mamba_ssm_dtype == "bfloat16" ? DType::BF16 : DType::F32;
  }

  // Allocates caches for `num_blocks` KV blocks of `block_size` tokens and `num_slots` DeltaNet slots, and a
  // DeltaNet input log of `log_rows` rows (speculative decoding: max sequences × (K + 1); 0: none).
  ModelCaches alloc_caches(int64_t num_blocks, int64_t block_size, int64_t num_slots, int64_t log_rows = 0);
  // What alloc_caches allocates per KV block (every full-attention layer's K and V, and the MTP layer's when
  // loaded), per DeltaNet slot (conv window + recurrent state of every linear-attention layer) and per row of the
  // DeltaNet input log (`mixed` + `ba` of every linear-attention layer), in bytes.
  int64_t kv_block_bytes(int64_t block_size) const;
  int64_t state_slot_bytes() const;
  int64_t gdn_log_row_bytes() const;
  // Zeroes slot `slot` of every DeltaNet layer (a fresh sequence starts from zero state).
  void reset_slot(ModelCaches& c, int32_t slot);

  // Copies DeltaNet slot `src` onto slot `dst` in every linear-attention layer (conv window + recurrent state),
  // device to device: speculative decoding snapshots a sequence's state before a verify it may have to undo.
  // `graphed`: recorded once per (cache set, dst, src) and replayed (Backend::graph_run), in a step of its own.
  void copy_slot(ModelCaches& c, int32_t dst, int32_t src, bool graphed = false);
  // One DeltaNet slot in host memory (Backend::alloc_host: pinned on CUDA), state_slot_bytes() long, and the copies
  // of a slot to and from it: the prefix cache's checkpoints kept in host memory (--cache-ram). slot_to_host copies
  // beside the ops (Backend::copy_aside: from where the ops' stream is now, while it goes on) and returns the ticket
  // that Backend::wait_aside takes before anything writes that slot or reads `host`; slot_from_host is in stream order.
  Tensor alloc_host_slot();
  uint64_t slot_to_host(ModelCaches& c, int32_t slot, Tensor& host);
  void slot_from_host(ModelCaches& c, int32_t slot, const Tensor& host);
  // Copies KV block `src` onto block `dst` in every full-attention layer and the MTP layer (prefix caching: a
  // sequence that resumes from a checkpoint ending inside a block writes its own copy of that block).
  void copy_kv_block(ModelCaches& c, int32_t dst, int32_t src);

  // Speculative rollback: for each sequence of `b` — state_slot holding its state from before the verify (the
  // snapshot), q_len accepted rows, log_row where the verify logged them (BatchMeta::Seq::log_row) — re-runs every
  // linear-attention layer's conv1d_causal + gated_delta_rule over those rows of the caches' input log: the state
  // becomes what it would be after the accepted tokens. Nothing else runs (the verify already wrote the attention KV
  // of those positions). The rows are read in place (no copy): sets q_start = log_row, and b's tokens and positions.
  // `graphed`: one recording per shape (T = the last row used, sequence count; Backend::graph_run).
  void replay_deltanet(BatchMeta& b, ModelCaches& caches, bool graphed = false);

  // Runs the batch through every layer and returns fp32 logits [R, V] for token rows `logit_rows`.
  // If `hidden_out` is given it receives the final-norm hidden states [Rh, H] of rows `hidden_rows`, or of
  // the logit rows when `hidden_rows` is null (MTP drafting wants the hiddens of every verified row, the
  // logits of fewer).
  Tensor forward(BatchMeta& b, ModelCaches& caches, const std::vector<int32_t>& logit_rows,
                 Tensor* hidden_out = nullptr, const std::vector<int32_t>* hidden_rows = nullptr);

  // forward() recorded once per batch shape and replayed (Backend::graph_run; CUDA graphs on CUDA): for decode
  // steps, whose kernels depend only on the number of tokens and sequences. The returned logits live in the
  // backend's step arena: valid until the next forward/forward_graphed call. `b` must not change shape between
  // calls with the same key (tokens, positions, context lengths and block ids may). Backends without graphs run
  // forward() each time.
  // `hidden_out` (speculative verify): receives the final-norm hiddens of every row [T, H], in a per-shape buffer
  // outside the arena (valid until the next call of the same shape); the logit rows must then be every row.
  Tensor forward_graphed(BatchMeta& b, ModelCaches& caches, const std::vector<int32_t>& logit_rows,
                         Tensor* hidden_out = nullptr);

  // mtp_forward() recorded once per shape, every row a logit row (so the recording gathers nothing): `hidden`
  // [T, H] is first copied into the shape's input buffer; `logits` [T, V or N] and `hidden_out` [T, H] receive
  // per-shape buffers outside the arena (valid until the next call of the same shape). Eager where the backend
  // has no graphs (Backend::graph_run's fallback runs the same code).
  // `argmax_limit` > 0: `ids` receives each row's argmax over logit columns [0, argmax_limit) (Backend::argmax_rows),
  // int32 [T], computed inside the recording into a per-shape buffer: the draft tokens without reading logits back;
  // with `ids_as_tokens` and a reduced head, already mapped to token ids (draft_vocab()[column]).
  // `tokens_in` (int32 [T] on the backend): the batch's token ids come from there instead of b.tokens (a chained
  // draft step fed the previous step's `ids` without a host round trip); copied into the shape's buffer first.
  void mtp_forward_graphed(BatchMeta& b, ModelCaches& caches, const Tensor& hidden, bool reduced, Tensor* logits,
                           Tensor* hidden_out, int64_t argmax_limit = 0, Tensor* ids = nullptr,
                           const Tensor* tokens_in = nullptr, bool ids_as_tokens = false);

  // MTP head over a batch whose tokens are the *next* tokens y_j and whose positions are those of the
  // hidden states' tokens; `hidden` [T, H] are main-model final-norm hiddens (or the MTP's own previous
  // output when chaining drafts). Attends over caches.mtp_kv. Returns fp32 logits [R, V] of `logit_rows`;
  // `hidden_out` receives the MTP's post-norm output of those rows (the next chain step's hidden).
  // `reduced`: logits [R, N] over the reduced draft head's tokens (draft_vocab()) instead of [R, V].
  // `token_ids` (int32 [T] on the backend): the tokens are read from there (Backend::batch_tokens_from), not b.tokens.
  Tensor mtp_forward(BatchMeta& b, ModelCaches& caches, const Tensor& hidden, const std::vector<int32_t>& logit_rows,
                     Tensor* hidden_out = nullptr, bool reduced = false, const Tensor* token_ids = nullptr);

  // fp32 logits [R, N] = head · hf (lm_head: N = V), hf final-norm hiddens [R, H] (forward's hidden_out; the engine's
  // prompt logprobs).
  Tensor lm_head_logits(const Tensor& hf, const Linear* head = nullptr);

 private:
  Model(io::ModelConfig cfg, Backend& be) : cfg_(std::move(cfg)), be_(be) {}
  Tensor attention_block(const LayerWeights& lw, const Tensor& x, BatchMeta& b, KvLayer& kv);
  // `log_mixed`, `log_ba`: the layer's rows of the DeltaNet input log (undefined: no log).
  Tensor deltanet_block(const LayerWeights& lw, const Tensor& x, BatchMeta& b, StateLayer& st, const Tensor& log_mixed,
                        const Tensor& log_ba);
  Tensor ffn_block(const LayerWeights& lw, const Tensor& x);
  // `layer`: index into the caches' per-layer tables (the input log), −1 for the MTP layer.
  Tensor decoder_layer(const LayerWeights& lw, Tensor& x, Tensor& h, BatchMeta& b, ModelCaches& caches, KvLayer* kv,
                       StateLayer* st, int64_t layer = -1);
  // rmsnorm(x[rows], norm) [R, H]: the final hidden states of the chosen rows.
  Tensor normed_rows(const Tensor& x, const std::vector<int32_t>& rows, const Tensor& norm);

  io::ModelConfig cfg_;
  Backend& be_;
  DType ssm_dtype_ = DType::F32;
  Weights w_;
  RopeParams rope_;
  std::map<std::string, Tensor> graph_logits_;  // forward_graphed: output of each recorded shape
  struct GraphIo {  // per recorded shape: buffers outside the step arena that a recording reads or writes
    Tensor in, logits, hidden, ids, tokens;
  };
  std::map<std::string, GraphIo> graph_io_;
};

}  // namespace ds::model
