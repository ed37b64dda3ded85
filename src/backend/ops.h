// The backend contract: coarse, model-shaped ops that model/ composes into a forward pass.
//
// Letters: T tokens in the batch, H hidden, Nh/Nkv attention heads, Dh head dim, Hk/Hv DeltaNet key/value
// heads, Dk/Dv their dims, C DeltaNet conv channels (2·Hk·Dk + Hv·Dv), E experts, K top-k, V vocab.
// Activations have the backend's activation dtype (fp32 on CPU, bf16 on CUDA) unless noted.
// Every op has the same meaning on every backend; the CPU backend is the executable specification.
#pragma once
#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "backend/sample_math.h"
#include "core/tensor.h"

namespace ds {

// Where one linear layer's weights come from (checkpoint bytes, host memory; borrowed).
struct LinearSource {
  enum class Kind { Dense, Int4 } kind = Kind::Dense;
  int64_t N = 0, K = 0;  // out, in
  // Dense: [N, K] row-major in `dtype` (BF16, F16 or F32).
  DType dtype = DType::BF16;
  const void* data = nullptr;
  // Int4 (AutoRound auto_gptq / GPTQ v1, sym, group 128): qweight int32 [K/8, N] (nibble j of word r =
  // input row 8r+j), qzeros int32 [K/128, N/8] (zero point - 1), scales fp16 [K/128, N] (may be negative).
  const int32_t* qweight = nullptr;
  const int32_t* qzeros = nullptr;
  const uint16_t* scales = nullptr;
  int group_size = 128;
};

// Opaque weights, laid out by the backend at load time.
struct LinearWeight {
  virtual ~LinearWeight() = default;
  int64_t N = 0, K = 0;
  bool int4 = false;
};
using Linear = std::shared_ptr<LinearWeight>;

// Routed experts of one MoE layer: gate_up [E][2I, H] (gate rows first), down [E][H, I].
struct ExpertsWeight {
  virtual ~ExpertsWeight() = default;
  int64_t E = 0, I = 0, H = 0;
};
using Experts = std::shared_ptr<ExpertsWeight>;

struct RopeParams {
  int rotary_dim = 0;                  // leading dims of each head that rotate (NeoX halves)
  double theta = 10000000.0;
  std::array<int, 3> mrope_section{};  // frequencies taken from the T/H/W position rows
  bool mrope_interleaved = true;
};

// One forward call's batch: sequences laid out back to back along T. Host-side description; a backend
// may mirror it on the device in `prepare_batch`.
struct BatchMeta {
  struct Seq {
    int64_t q_start = 0;  // first row in T
    int64_t q_len = 0;    // new tokens this call (prefill chunk, or 1 for decode)
    int64_t ctx_len = 0;  // tokens already in this sequence's caches before this call
    int32_t state_slot = -1;
    std::vector<int32_t> blocks;  // KV block table (covers ctx_len + q_len tokens)
    // Speculative verify (model/, not read by backends): this chunk's DeltaNet state-update inputs are kept in
    // the caches' input log at rows log_row.. (ModelCaches::gdn_log); -1: not kept.
    int64_t log_row = -1;
  };
  std::vector<Seq> seqs;
  std::vector<int32_t> tokens;        // [T]
  std::vector<int32_t> positions;     // [3, T]: mRoPE t/h/w rows (identical for text)
  // Input-embedding rows replaced before layer 0 (image features at <|image_pad|> rows): row embed_rows[i]
  // of the embedding ← row i of embed_src (act dtype [len(embed_rows), H]). Set by whoever builds the batch.
  std::vector<int32_t> embed_rows;
  Tensor embed_src;
  int64_t num_tokens() const { return int64_t(tokens.size()); }
  std::shared_ptr<void> device;       // backend-private mirror

  // A decode step of B sequences of one new token each after ctx cached ones (benchmarks): sequence s is row s and
  // state slot s, its KV blocks s·stride .. s·stride + nblk − 1; every position ctx. The tokens are the caller's.
  static BatchMeta decode_step(int64_t B, int64_t ctx, int64_t nblk, int64_t stride) {
    BatchMeta b;
    for (int64_t s = 0; s < B; ++s) {
      Seq q;
      q.q_start = s;
      q.q_len = 1;
      q.ctx_len = ctx;
      q.state_slot = int32_t(s);
      for (int64_t i = 0; i < nblk; ++i) q.blocks.push_back(int32_t(s * stride + i));
      b.seqs.push_back(std::move(q));
    }
    b.positions.assign(size_t(3 * B), int32_t(ctx));
    return b;
  }
  // One sequence of q_len new rows after ctx cached tokens in state slot `slot`, with KV block table `blocks`, at text
  // positions ctx .. ctx + q_len − 1 (tests, benchmarks, the model commands). The tokens are the caller's.
  static BatchMeta one_sequence(int64_t q_len, int64_t ctx, int32_t slot, std::vector<int32_t> blocks = {}) {
    BatchMeta b;
    Seq q;
    q.q_len = q_len;
    q.ctx_len = ctx;
    q.state_slot = slot;
    q.blocks = std::move(blocks);
    b.seqs.push_back(std::move(q));
    b.positions.resize(size_t(3 * q_len));
    for (int r = 0; r < 3; ++r)
      for (int64_t i = 0; i < q_len; ++i) b.positions[size_t(r * q_len + i)] = int32_t(ctx + i);
    return b;
  }
};

// Paged KV storage of one full-attention layer: [num_blocks, block_size, Nkv, Dh] for K and for V.
struct KvLayer {
  Tensor k, v;
  int64_t block_size = 16;
};

// DeltaNet state of one linear-attention layer for all slots: conv [S, C, Kc-1] (raw pre-conv inputs,
// oldest first, fp32) and recurrent ssm [S, Hv, Dk, Dv], fp32 or bf16 (Model::ssm_state_dtype; the arithmetic is
// fp32 either way). A bf16 ssm is rounded to bf16 after every token of a chunk shorter than kStateTokenRoundMax
// tokens (decode, speculative verify and replay: one verify of k tokens leaves the state k one-token steps leave) and
// once at the end of a longer chunk (prefill).
struct StateLayer {
  Tensor conv, ssm;
};
constexpr int64_t kStateTokenRoundMax = 32;
// Whether a recurrent state is stored in bf16 (else fp32); fails for any other dtype, naming the op.
inline bool ssm_is_bf16(const Tensor& ssm, const char* op) {
  DS_CHECK(ssm.dtype == DType::BF16 || ssm.dtype == DType::F32, op, ": the recurrent state is ", dtype_name(ssm.dtype),
           " (expected F32 or BF16)");
  return ssm.dtype == DType::BF16;
}

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual DType act_dtype() const = 0;

  // ---- memory ----
  virtual Tensor alloc(DType dt, std::vector<int64_t> shape) = 0;  // zero-filled
  virtual Tensor upload_f32(const std::vector<float>& v, std::vector<int64_t> shape, DType dt) = 0;
  virtual std::vector<float> to_host_f32(const Tensor& t) = 0;
  virtual void zero(Tensor& t) = 0;
  // Same dtype and size: device to device, or between device memory and alloc_host memory (in stream order: the
  // host bytes are there once the stream reaches the copy, Backend::synchronize).
  virtual void copy(Tensor& dst, const Tensor& src) = 0;
  // Host memory (contents unspecified) the device copies to and from directly, without staging: pinned on CUDA,
  // plain memory on backends whose memory is the host's. Throws ds::Error when it cannot be had. Callable from any
  // thread (it touches no state of the backend's).
  virtual Tensor alloc_host(DType dt, std::vector<int64_t> shape) { return alloc(dt, std::move(shape)); }
  // Copies beside the ops (the prefix cache's demotions to host memory): every pair's src onto its dst on a stream of
  // their own, started where the ops' stream is now, so the ops go on meanwhile; returns a ticket. wait_aside(t): the
  // ops queued from now on wait for those copies (on the device: the host does not wait). synchronize() waits for
  // them too. Backends without a second stream copy at once and return 0.
  virtual uint64_t copy_aside(const std::vector<std::pair<Tensor, Tensor>>& dst_src) {
    for (auto [d, s] : dst_src) copy(d, s);
    return 0;
  }
  virtual void wait_aside(uint64_t ticket) {}
  virtual void synchronize() {}
  // Device memory: total bytes and bytes in use now (every process's, as the driver reports). False on
  // backends whose memory is the host's (the CPU backend): the runtime then keeps its fixed pool sizes.
  virtual bool device_memory(int64_t* total, int64_t* used) { return false; }

  // ---- weights ----
  // `parts` are concatenated along N (e.g. gate and up projections into one matrix).
  virtual Linear make_linear(const std::vector<LinearSource>& parts) = 0;
  // gate_up[e] = concat(gate_e, up_e) along N; down[e].
  virtual Experts make_experts(const std::vector<std::vector<LinearSource>>& gate_up,
                               const std::vector<LinearSource>& down) = 0;

  virtual void prepare_batch(BatchMeta& b) {}

  // ---- step capture (optional; the CUDA backend records CUDA graphs) ----
  // Between step_begin() and step_end(), temporaries (alloc and the backend's own scratch) come from a per-step
  // arena that step_begin() resets, so a step allocates nothing and its addresses repeat from step to step. alloc
  // still zero-fills; arena memory stays valid until the next step_begin(). Call prepare_batch inside the step.
  // graph_run(key, fn), inside a step: the first call for `key` runs fn eagerly (warm-up), the second records fn
  // and replays the recording, later calls replay it without calling fn. Returns whether fn was called. Inputs
  // that change between replays must live in device memory the recording reads (prepare_batch's mirror does,
  // once prepared outside the recording). Defaults: no arena, fn runs every time.
  // The stream all ops run on (cudaStream_t on CUDA; null elsewhere), for tools that time ops with device events.
  virtual void* stream_handle() const { return nullptr; }
  virtual void step_begin() {}
  virtual void step_end() {}
  virtual bool graph_run(const std::string& key, const std::function<void()>& fn) {
    fn();
    return true;
  }

  // ---- ops ----
  // out [T, H] = table[ids]; table is [V, H] (device, act dtype)
  virtual void embed(const Tensor& table, const BatchMeta& b, Tensor& out) = 0;
  // y [R, D] = x / sqrt(mean(x²) + eps) · w; w already includes the (1 + w) offset where the model uses it.
  virtual void rmsnorm(const Tensor& x, const Tensor& w, float eps, Tensor& y) = 0;
  // x += y (elementwise)
  virtual void add_inplace(Tensor& x, const Tensor& y) = 0;
  // y [T, N] = x [T, K] · Wᵀ
  virtual void linear(const Tensor& x, const Linear& w, Tensor& y) = 0;
  // y [T, I] = silu(gu[:, :I]) · gu[:, I:]   (gu [T, 2I])
  virtual void silu_mul(const Tensor& gu, Tensor& y) = 0;

  // Gated attention prologue. qg [T, Nh·2·Dh] holds per head [query(Dh) | gate(Dh)]; k [T, Nkv·Dh].
  // q [T, Nh·Dh] = rope(rmsnorm(query, qnorm)); gate [T, Nh·Dh]; k ← rope(rmsnorm(k, knorm)) in place.
  virtual void qk_norm_rope(const Tensor& qg, Tensor& k, const Tensor& qnorm, const Tensor& knorm, float eps,
                            const RopeParams& rope, const BatchMeta& b, Tensor& q, Tensor& gate) = 0;
  // Writes this call's k, v [T, Nkv·Dh] into the paged cache at positions ctx_len..ctx_len+q_len-1.
  virtual void kv_cache_write(KvLayer& kv, const Tensor& k, const Tensor& v, const BatchMeta& b) = 0;
  // o [T, Nh·Dh]: causal attention of q over each sequence's cache (GQA, scale 1/sqrt(Dh)).
  virtual void attention(const Tensor& q, const KvLayer& kv, const BatchMeta& b, Tensor& o) = 0;
  // x ← x · sigmoid(gate)
  virtual void sigmoid_gate_mul(Tensor& x, const Tensor& gate) = 0;

  // DeltaNet. mixed [T, C] → out [T, C] = silu(causal depthwise conv(mixed)), with each sequence's conv
  // window taken from and written back to state.conv[slot]. weight [C, Kc] fp32.
  // These two ops (only these) also take batches whose sequences leave rows of T uncovered (a speculative
  // rollback replays rows of the DeltaNet input log in place, Model::replay_deltanet): such rows are ignored, and
  // their outputs left unspecified.
  virtual void conv1d_causal(const Tensor& mixed, const Tensor& weight, StateLayer& st, const BatchMeta& b,
                             Tensor& out) = 0;
  // Gated delta rule. qkv [T, C] (post-conv: q | k | v), ba [T, 2·Hv] (b | a), A_log and dt_bias [Hv] fp32.
  // o [T, Hv·Dv]. Uses and updates state.ssm[slot]; chunked form for prefill, recurrent for decode.
  virtual void gated_delta_rule(const Tensor& qkv, const Tensor& ba, const Tensor& A_log, const Tensor& dt_bias,
                                int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv, StateLayer& st,
                                const BatchMeta& b, Tensor& o) = 0;
  // y [T, Hv·Dv] = rmsnorm(o per head, w [Dv], plain weight) · silu(z)
  virtual void gated_rmsnorm(const Tensor& o, const Tensor& z, const Tensor& w, float eps, Tensor& y) = 0;
  // The DeltaNet token mixer in one call: qkv = conv1d_causal(mixed), o = gated_delta_rule(qkv, ...), and with
  // z and norm_w given y = gated_rmsnorm(o, *z, *norm_w, eps), else y = o (the speculative replay, which wants only
  // the state update). Same contract as those ops (rows outside every sequence ignored, outputs unspecified); the
  // intermediate qkv and o may be kept at higher precision than act_dtype(). The default runs the three ops.
  // With ba_x and ba_w given, ba is an output: first ba = linear(*ba_x, *ba_w) (in_proj_b | in_proj_a of the layer
  // input, [T, 2·Hv] in ba's dtype), which a backend may fuse into the mixer (CUDA: the short-chunk kernels).
  virtual void deltanet_mix(const Tensor& mixed, const Tensor& conv_w, const Tensor& ba, const Tensor& A_log,
                            const Tensor& dt_bias, int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv, const Tensor* z,
                            const Tensor* norm_w, float eps, StateLayer& st, const BatchMeta& b, Tensor& y,
                            const Tensor* ba_x = nullptr, const Linear* ba_w = nullptr) {
    const int64_t T = mixed.dim(0);
    if (ba_x && ba_w) {
      Tensor bo = ba;
      linear(*ba_x, *ba_w, bo);
    }
    Tensor qkv = alloc(act_dtype(), {T, mixed.dim(1)});
    conv1d_causal(mixed, conv_w, st, b, qkv);
    if (!norm_w) {
      gated_delta_rule(qkv, ba, A_log, dt_bias, Hk, Hv, Dk, Dv, st, b, y);
      return;
    }
    Tensor o = alloc(act_dtype(), {T, Hv * Dv});
    gated_delta_rule(qkv, ba, A_log, dt_bias, Hk, Hv, Dk, Dv, st, b, o);
    gated_rmsnorm(o, *z, *norm_w, eps, y);
  }

  // MoE. router_logits [T, E] → ids [T, K] int32, weights [T, K] fp32 (softmax, top-k, renormalised).
  virtual void moe_route(const Tensor& router_logits, int64_t top_k, Tensor& ids, Tensor& weights) = 0;
  // y [T, H] = Σ_k weights[t,k] · down_e(silu(gate_e x) · up_e x), e = ids[t,k]
  virtual void moe_experts(const Tensor& x, const Experts& w, const Tensor& ids, const Tensor& weights,
                           Tensor& y) = 0;
  // y += sigmoid(gate_logit[t]) · s[t]   (gate_logit [T, 1])
  virtual void sigmoid_scale_add(Tensor& y, const Tensor& s, const Tensor& gate_logit) = 0;

  // out [R, H] = x[rows[i]]
  virtual void gather_rows(const Tensor& x, const std::vector<int32_t>& rows, Tensor& out) = 0;
  // ids [R] int32 = per row of logits [R, N] (fp32) the first column holding the largest value among columns
  // [0, limit), 1 <= limit <= N; NaN never wins (a row of NaNs gives 0). With `map` (int32 [N], device): map[that
  // column] instead (a reduced draft head's column -> token id). Speculative drafting: the MTP's argmax without
  // copying logits to the host.
  virtual void argmax_rows(const Tensor& logits, int64_t limit, Tensor& ids, const Tensor* map = nullptr) {
    unsupported("argmax_rows");
  }
  // Sets the token ids [T] of batch `b` (already prepared) from int32 `ids` [T] on the device instead of b.tokens:
  // the next op reading the batch's tokens (embed) reads these. On a backend with a device mirror of the batch
  // (CUDA) a device copy into the mirror, so no host round trip (inside a recording, a copy node: `ids` must then
  // stay at its address); the default reads them into b.tokens (the CPU backend, whose tensors are host memory).
  // Speculative drafting: a chained MTP step fed the previous step's argmax.
  virtual void batch_tokens_from(BatchMeta& b, const Tensor& ids) {
    DS_CHECK(ids.dtype == DType::I32 && ids.numel() == b.num_tokens(), "batch_tokens_from: ids must be I32 [",
             b.num_tokens(), "]");
    const std::vector<float> v = to_host_f32(ids);
    for (size_t i = 0; i < v.size(); ++i) b.tokens[i] = int32_t(v[i]);
  }

  // ---- fused ops ----
  // Each has a default composed of the ops above: that composition is its meaning and its CPU twin. A backend
  // overrides one to save launches and passes over memory (the CUDA backend's decode step), with the same
  // rounding of every intermediate as the composition (intermediates in the activation dtype).

  // x += d, then h = rmsnorm(x)·w: a residual add and the next norm in one pass.
  virtual void add_rmsnorm(Tensor& x, const Tensor& d, const Tensor& w, float eps, Tensor& h) {
    add_inplace(x, d);
    rmsnorm(x, w, eps, h);
  }
  // Linears that share their input. Each job: *y = x·Wᵀ; with `swiglu`, W = [gate rows; up rows] (N = 2I) and
  // *y [T, I] = silu(x·gateᵀ)·(x·upᵀ), the SwiGLU of a gate_up projection.
  struct LinearJob {
    const Linear* w = nullptr;
    Tensor* y = nullptr;
    bool swiglu = false;
  };
  virtual void linear_group(const Tensor& x, const std::vector<LinearJob>& jobs) {
    for (const auto& j : jobs) {
      if (!j.swiglu) {
        linear(x, *j.w, *j.y);
        continue;
      }
      Tensor gu = alloc(act_dtype(), {x.numel() / (*j.w)->K, (*j.w)->N});
      linear(x, *j.w, gu);
      silu_mul(gu, *j.y);
    }
  }
  // The gated attention prologue and the cache write: qk_norm_rope(qg, k, ...), then kv_cache_write(kv, k, v, b).
  // k's contents afterwards are unspecified (a backend may write the normed, rotated k straight into the cache).
  virtual void qk_norm_rope_kv(const Tensor& qg, Tensor& k, const Tensor& v, const Tensor& qnorm, const Tensor& knorm,
                               float eps, const RopeParams& rope, const BatchMeta& b, Tensor& q, Tensor& gate,
                               KvLayer& kv) {
    qk_norm_rope(qg, k, qnorm, knorm, eps, rope, b, q, gate);
    kv_cache_write(kv, k, v, b);
  }
  // attention(q, kv, b, o), then sigmoid_gate_mul(o, gate): the output gate of a gated attention layer.
  virtual void attention_gated(const Tensor& q, const KvLayer& kv, const BatchMeta& b, const Tensor& gate, Tensor& o) {
    attention(q, kv, b, o);
    sigmoid_gate_mul(o, gate);
  }
  // y += sigmoid(gate_logit[t]) · (x·Wᵀ)[t]   (gate_logit [T, 1]): the shared expert's down projection and gate.
  virtual void linear_gated_add(const Tensor& x, const Linear& w, const Tensor& gate_logit, Tensor& y) {
    Tensor s = alloc(act_dtype(), y.shape);
    linear(x, w, s);
    sigmoid_scale_add(y, s, gate_logit);
  }
  // The sparse MoE FFN after its input linears: moe_route(router_logits, top_k, ids, weights), moe_experts(x,
  // experts, ids, weights, y), then with a shared expert (shared_down non-null) linear_gated_add(*a, *shared_down,
  // *gate, y). One op so that a backend can fuse across the three (CUDA, small steps: routing and the expert tile
  // table in one kernel; the weighted sum of the routed outputs inside the shared expert's gated add).
  virtual void moe_ffn(const Tensor& router_logits, int64_t top_k, const Tensor& x, const Experts& experts, Tensor& ids,
                       Tensor& weights, const Tensor* a, const Linear* shared_down, const Tensor* gate, Tensor& y) {
    moe_route(router_logits, top_k, ids, weights);
    moe_experts(x, experts, ids, weights, y);
    if (shared_down) linear_gated_add(*a, *shared_down, *gate, y);
  }

  // ---- sampling (backend/cpu/sample.cpp is the specification; docs/engine.md "Sampler") ----
  // ids[r] = the token sampled from row r of logits [R, V] (F32, BF16 or F16) over ids [0, n), n = min(vocab_limit, V),
  // under rows[r] with its edits edits[edit_begin, edit_begin + edit_count). Per row:
  //   x_i = raw_i, edited (edit_logit) where an edit names i; z_i = scaled_logit(x_i) (sample_math.h); where the row
  //   has a mask (rows[r].mask >= 0: masks[mask · mask_words(n) ..], bit i % 32 of word i / 32), z_i = -inf for every
  //   id it forbids, edits or not (a grammar's or allowed_token_ids' ids, made on the host).
  //   greedy: the lowest i with the largest z_i (NaN counts as -inf).
  //   otherwise, with zmax the largest z and w_i = expf(z_i - zmax): a candidate is a z_i > -inf with
  //   z_i >= lo, lo starting at zmax + log_min_p; top_k (if more than k candidates): lo = the k-th largest
  //   candidate z (ties kept); top_p < 1: lo = the largest candidate z whose mass Σ_{z_j >= z} w_j reaches
  //   top_p × Σ w over the candidates; then, over the kept set in id order, the first i whose cumulative w
  //   exceeds u × Σ w (the last kept id with w > 0 if rounding leaves none).
  //   a draft d >= 0 (not greedy: speculative rejection sampling with a one-hot draft distribution, Leviathan et
  //   al.): d where u × Σ w < w_d (its probability; 0 outside the kept set), else the draw above with u2 over the
  //   kept set without d.
  // -1 for a row with nothing to sample (zmax not finite; a masked greedy row: zmax not above -inf). Sums are floating
  // point: a backend may add in another order, so a choice within rounding of a boundary (cumulative mass equal to the
  // target) may differ. Both backends implement it; the default throws (an inline default keeps libds_cuda free of
  // CPU symbols).
  virtual void sample_rows(const Tensor& logits, int64_t vocab_limit, const std::vector<SampleRowParams>& rows,
                           const std::vector<SampleEdit>& edits, const std::vector<uint32_t>& masks,
                           std::vector<int32_t>& ids) {
    unsupported("sample_rows");
  }
  // sample_rows' argument checks (both backends): every row's edits inside `edits`, its mask -1 or one of the
  // masks.size() / mask_words(n) masks given.
  static void check_sample_rows(const std::vector<SampleRowParams>& rows, const std::vector<SampleEdit>& edits,
                                const std::vector<uint32_t>& masks, int64_t n) {
    const int64_t W = mask_words(n), M = int64_t(masks.size()) / W;
    DS_CHECK(int64_t(masks.size()) % W == 0, "sample_rows: masks of ", masks.size(), " words, expected a multiple of ",
             W, " (", n, " ids)");
    for (size_t r = 0; r < rows.size(); ++r) {
      const SampleRowParams& p = rows[r];
      DS_CHECK(p.edit_begin >= 0 && p.edit_count >= 0 && size_t(p.edit_begin) + size_t(p.edit_count) <= edits.size(),
               "sample_rows: row ", r, " edits [", p.edit_begin, ", +", p.edit_count, ") outside ", edits.size());
      DS_CHECK(p.mask >= -1 && p.mask < M, "sample_rows: row ", r, " mask ", p.mask, " outside the ", M, " masks given");
    }
  }

  // Raw logprobs of the sampled tokens (vLLM's logprobs / top_logprobs) next to sample_rows, so the logits stay on the
  // device: for each i, out[i·(1 + 2k) .. +1 + 2k] = cpu::row_logprobs(row rows[i] of logits [R, V] (F32, BF16 or
  // F16), n = min(vocab_limit, V), chosen[i], k) (backend/cpu/sample.cpp is the specification; sums in another order
  // may differ by rounding). 0 <= k <= kMaxRowTopLogprobs; has_row_logprobs() says whether a backend has it.
  static constexpr int32_t kMaxRowTopLogprobs = 20;
  virtual bool has_row_logprobs() const { return false; }
  virtual void row_logprobs(const Tensor& logits, int64_t vocab_limit, const std::vector<int32_t>& rows,
                            const std::vector<int32_t>& chosen, int32_t k, std::vector<float>& out) {
    unsupported("row_logprobs");
  }
  // vLLM's rank of the chosen tokens (prompt logprobs): out[i] = cpu::row_rank(row rows[i] of logits, n, chosen[i]),
  // the number of ids in [0, n) whose logit is >= the chosen one's. Backends with row_logprobs have it.
  virtual void row_ranks(const Tensor& logits, int64_t vocab_limit, const std::vector<int32_t>& rows,
                         const std::vector<int32_t>& chosen, std::vector<int32_t>& out) {
    unsupported("row_ranks");
  }

  // ==== vision tower (model/vision.cpp, model-spec §5.3) ====================================================
  // D vision hidden, P patches of all images back to back, Nh/Dh vision heads. Each op has a default that
  // throws, so a backend can grow them one at a time; the CPU backend implements all (backend/cpu/vision_ops.cpp).

  // y [R, D] = (x − mean) / sqrt(var + eps) · w + b, biased variance over D (torch LayerNorm); w, b fp32 [D].
  virtual void layernorm(const Tensor& x, const Tensor& w, const Tensor& b, float eps, Tensor& y) {
    unsupported("layernorm");
  }
  // x [R, N] += bias [N] (fp32): the bias of a Linear.
  virtual void add_bias(Tensor& x, const Tensor& bias) { unsupported("add_bias"); }
  // y = gelu(x), elementwise: tanh approximation (gelu_pytorch_tanh) if `tanh_approx`, else exact erf form.
  virtual void gelu(const Tensor& x, bool tanh_approx, Tensor& y) { unsupported("gelu"); }
  // x [R, D] += Σ_j w[r·J + j] · table[idx[r·J + j]], J = idx.size() / R (bilinear position embedding: J = 4).
  virtual void embed_bilinear_add(Tensor& x, const Tensor& table, const std::vector<int32_t>& idx,
                                  const std::vector<float>& w) {
    unsupported("embed_bilinear_add");
  }
  // 2-D rotary embedding, in place on the q and k parts of qkv [P, 3·Nh·Dh] (rows q | k | v, head-major).
  // pos [2, P]: row then column of each patch. With half = Dh/2 and f[j] = theta^(−2j/half), j < half/2:
  // angle[i] = row·f[i] for i < half/2, col·f[i − half/2] otherwise; NeoX pairs (i, i + half).
  virtual void vision_rope(Tensor& qkv, int64_t Nh, int64_t Dh, const std::vector<int32_t>& pos, double theta) {
    unsupported("vision_rope");
  }
  // o [P, Nh·Dh] = softmax(q·kᵀ / sqrt(Dh))·v, bidirectional, each row attending only to rows of its own
  // segment [cu_seqlens[s], cu_seqlens[s+1]) (one image, or one temporal group of a video).
  virtual void vision_attention(const Tensor& qkv, int64_t Nh, int64_t Dh, const std::vector<int32_t>& cu_seqlens,
                                Tensor& o) {
    unsupported("vision_attention");
  }
  // x[rows[i]] = src[i] (x [T, H], src [R, H]): vision features into the placeholder rows of the embedding.
  virtual void scatter_rows(Tensor& x, const std::vector<int32_t>& rows, const Tensor& src) {
    unsupported("scatter_rows");
  }

 protected:
  [[noreturn]] void unsupported(const char* op) const { fail(op, ": not implemented on backend ", name()); }
  // ==== end of vision tower ops ================================================================================
};

std::unique_ptr<Backend> make_cpu_backend();
#ifdef DS_HAVE_CUDA
std::unique_ptr<Backend> make_cuda_backend(int device);
#endif
// "cpu" or "cuda"; a clear error if the build or machine lacks it.
std::unique_ptr<Backend> make_backend(const std::string& name);

}  // namespace ds
