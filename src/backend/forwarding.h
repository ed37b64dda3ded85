// A Backend that forwards every operation to another one: the base of wrappers that observe a model's ops (the
// bench's per-op timer, the CUDA tests' input recorder). A wrapper derived from it overrides only what it observes,
// so it forwards every other op, including ones ops.h gains later, instead of silently running Backend's defaults.
// Fused ops (deltanet_mix, moe_ffn, add_rmsnorm, linear_group, linear_gated_add, qk_norm_rope_kv,
// attention_gated) go to the wrapped backend's own
// implementation; a wrapper that must see the ops inside one overrides it with Backend::op (the composition, which
// calls this wrapper's ops).
#pragma once

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "backend/ops.h"

namespace ds {

class ForwardingBackend : public Backend {
 public:
  explicit ForwardingBackend(Backend& in) : in_(in) {}
  Backend& inner() const { return in_; }

  std::string name() const override { return in_.name(); }
  DType act_dtype() const override { return in_.act_dtype(); }

  Tensor alloc(DType dt, std::vector<int64_t> shape) override { return in_.alloc(dt, std::move(shape)); }
  Tensor upload_f32(const std::vector<float>& v, std::vector<int64_t> shape, DType dt) override {
    return in_.upload_f32(v, std::move(shape), dt);
  }
  std::vector<float> to_host_f32(const Tensor& t) override { return in_.to_host_f32(t); }
  void zero(Tensor& t) override { in_.zero(t); }
  void copy(Tensor& dst, const Tensor& src) override { in_.copy(dst, src); }
  Tensor alloc_host(DType dt, std::vector<int64_t> shape) override { return in_.alloc_host(dt, std::move(shape)); }
  uint64_t copy_aside(const std::vector<std::pair<Tensor, Tensor>>& dst_src) override { return in_.copy_aside(dst_src); }
  void wait_aside(uint64_t ticket) override { in_.wait_aside(ticket); }
  void synchronize() override { in_.synchronize(); }
  bool device_memory(int64_t* total, int64_t* used) override { return in_.device_memory(total, used); }

  Linear make_linear(const std::vector<LinearSource>& parts) override { return in_.make_linear(parts); }
  Experts make_experts(const std::vector<std::vector<LinearSource>>& gate_up,
                       const std::vector<LinearSource>& down) override {
    return in_.make_experts(gate_up, down);
  }
  void prepare_batch(BatchMeta& b) override { in_.prepare_batch(b); }

  void* stream_handle() const override { return in_.stream_handle(); }
  void step_begin() override { in_.step_begin(); }
  void step_end() override { in_.step_end(); }
  bool graph_run(const std::string& key, const std::function<void()>& fn) override { return in_.graph_run(key, fn); }

  void embed(const Tensor& table, const BatchMeta& b, Tensor& out) override { in_.embed(table, b, out); }
  void rmsnorm(const Tensor& x, const Tensor& w, float eps, Tensor& y) override { in_.rmsnorm(x, w, eps, y); }
  void add_inplace(Tensor& x, const Tensor& y) override { in_.add_inplace(x, y); }
  void linear(const Tensor& x, const Linear& w, Tensor& y) override { in_.linear(x, w, y); }
  void silu_mul(const Tensor& gu, Tensor& y) override { in_.silu_mul(gu, y); }
  void qk_norm_rope(const Tensor& qg, Tensor& k, const Tensor& qnorm, const Tensor& knorm, float eps,
                    const RopeParams& rope, const BatchMeta& b, Tensor& q, Tensor& gate) override {
    in_.qk_norm_rope(qg, k, qnorm, knorm, eps, rope, b, q, gate);
  }
  void kv_cache_write(KvLayer& kv, const Tensor& k, const Tensor& v, const BatchMeta& b) override {
    in_.kv_cache_write(kv, k, v, b);
  }
  void attention(const Tensor& q, const KvLayer& kv, const BatchMeta& b, Tensor& o) override {
    in_.attention(q, kv, b, o);
  }
  void sigmoid_gate_mul(Tensor& x, const Tensor& gate) override { in_.sigmoid_gate_mul(x, gate); }
  void conv1d_causal(const Tensor& mixed, const Tensor& weight, StateLayer& st, const BatchMeta& b,
                     Tensor& out) override {
    in_.conv1d_causal(mixed, weight, st, b, out);
  }
  void gated_delta_rule(const Tensor& qkv, const Tensor& ba, const Tensor& A_log, const Tensor& dt_bias, int64_t Hk,
                        int64_t Hv, int64_t Dk, int64_t Dv, StateLayer& st, const BatchMeta& b, Tensor& o) override {
    in_.gated_delta_rule(qkv, ba, A_log, dt_bias, Hk, Hv, Dk, Dv, st, b, o);
  }
  void gated_rmsnorm(const Tensor& o, const Tensor& z, const Tensor& w, float eps, Tensor& y) override {
    in_.gated_rmsnorm(o, z, w, eps, y);
  }
  void deltanet_mix(const Tensor& mixed, const Tensor& conv_w, const Tensor& ba, const Tensor& A_log,
                    const Tensor& dt_bias, int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv, const Tensor* z,
                    const Tensor* norm_w, float eps, StateLayer& st, const BatchMeta& b, Tensor& y,
                    const Tensor* ba_x = nullptr, const Linear* ba_w = nullptr) override {
    in_.deltanet_mix(mixed, conv_w, ba, A_log, dt_bias, Hk, Hv, Dk, Dv, z, norm_w, eps, st, b, y, ba_x, ba_w);
  }
  void moe_route(const Tensor& router_logits, int64_t top_k, Tensor& ids, Tensor& weights) override {
    in_.moe_route(router_logits, top_k, ids, weights);
  }
  void moe_experts(const Tensor& x, const Experts& w, const Tensor& ids, const Tensor& weights, Tensor& y) override {
    in_.moe_experts(x, w, ids, weights, y);
  }
  void sigmoid_scale_add(Tensor& y, const Tensor& s, const Tensor& gate_logit) override {
    in_.sigmoid_scale_add(y, s, gate_logit);
  }
  void gather_rows(const Tensor& x, const std::vector<int32_t>& rows, Tensor& out) override {
    in_.gather_rows(x, rows, out);
  }
  void argmax_rows(const Tensor& logits, int64_t limit, Tensor& ids, const Tensor* map = nullptr) override {
    in_.argmax_rows(logits, limit, ids, map);
  }
  void batch_tokens_from(BatchMeta& b, const Tensor& ids) override { in_.batch_tokens_from(b, ids); }

  void add_rmsnorm(Tensor& x, const Tensor& d, const Tensor& w, float eps, Tensor& h) override {
    in_.add_rmsnorm(x, d, w, eps, h);
  }
  void linear_group(const Tensor& x, const std::vector<LinearJob>& jobs) override { in_.linear_group(x, jobs); }
  void qk_norm_rope_kv(const Tensor& qg, Tensor& k, const Tensor& v, const Tensor& qnorm, const Tensor& knorm, float eps,
                       const RopeParams& rope, const BatchMeta& b, Tensor& q, Tensor& gate, KvLayer& kv) override {
    in_.qk_norm_rope_kv(qg, k, v, qnorm, knorm, eps, rope, b, q, gate, kv);
  }
  void attention_gated(const Tensor& q, const KvLayer& kv, const BatchMeta& b, const Tensor& gate, Tensor& o) override {
    in_.attention_gated(q, kv, b, gate, o);
  }
  void linear_gated_add(const Tensor& x, const Linear& w, const Tensor& gate_logit, Tensor& y) override {
    in_.linear_gated_add(x, w, gate_logit, y);
  }
  void moe_ffn(const Tensor& router_logits, int64_t top_k, const Tensor& x, const Experts& experts, Tensor& ids,
               Tensor& weights, const Tensor* a, const Linear* shared_down, const Tensor* gate, Tensor& y) override {
    in_.moe_ffn(router_logits, top_k, x, experts, ids, weights, a, shared_down, gate, y);
  }
  bool has_row_logprobs() const override { return in_.has_row_logprobs(); }
  void row_logprobs(const Tensor& logits, int64_t vocab_limit, const std::vector<int32_t>& rows,
                    const std::vector<int32_t>& chosen, int32_t k, std::vector<float>& out) override {
    in_.row_logprobs(logits, vocab_limit, rows, chosen, k, out);
  }
  void row_ranks(const Tensor& logits, int64_t vocab_limit, const std::vector<int32_t>& rows,
                 const std::vector<int32_t>& chosen, std::vector<int32_t>& out) override {
    in_.row_ranks(logits, vocab_limit, rows, chosen, out);
  }
  void sample_rows(const Tensor& logits, int64_t vocab_limit, const std::vector<SampleRowParams>& rows,
                   const std::vector<SampleEdit>& edits, const std::vector<uint32_t>& masks,
                   std::vector<int32_t>& ids) override {
    in_.sample_rows(logits, vocab_limit, rows, edits, masks, ids);
  }

  void layernorm(const Tensor& x, const Tensor& w, const Tensor& b, float eps, Tensor& y) override {
    in_.layernorm(x, w, b, eps, y);
  }
  void add_bias(Tensor& x, const Tensor& bias) override { in_.add_bias(x, bias); }
  void gelu(const Tensor& x, bool tanh_approx, Tensor& y) override { in_.gelu(x, tanh_approx, y); }
  void embed_bilinear_add(Tensor& x, const Tensor& table, const std::vector<int32_t>& idx,
                          const std::vector<float>& w) override {
    in_.embed_bilinear_add(x, table, idx, w);
  }
  void vision_rope(Tensor& qkv, int64_t Nh, int64_t Dh, const std::vector<int32_t>& pos, double theta) override {
    in_.vision_rope(qkv, Nh, Dh, pos, theta);
  }
  void vision_attention(const Tensor& qkv, int64_t Nh, int64_t Dh, const std::vector<int32_t>& cu_seqlens,
                        Tensor& o) override {
    in_.vision_attention(qkv, Nh, Dh, cu_seqlens, o);
  }
  void scatter_rows(Tensor& x, const std::vector<int32_t>& rows, const Tensor& src) override {
    in_.scatter_rows(x, rows, src);
  }

 protected:
  Backend& in_;
};

}  // namespace ds
