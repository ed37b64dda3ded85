// FFN: sparse MoE (softmax → top-k → renormalise, SwiGLU experts, sigmoid-gated shared expert) or the
// dense SwiGLU MLP of the dense sibling.
#include "model/model.h"

namespace ds::model {

Tensor Model::ffn_block(const LayerWeights& lw, const Tensor& x) {
  const auto& t = cfg_.text;
  const int64_t T = x.dim(0), H = t.hidden_size;
  const DType act = be_.act_dtype();
  const FfnWeights& f = lw.ffn;
  Tensor y = be_.alloc(act, {T, H});
  if (!f.moe) {
    Tensor a = be_.alloc(act, {T, f.mlp_gu->N / 2});
    be_.linear_group(x, {{&f.mlp_gu, &a, true}});
    be_.linear(a, f.mlp_down, y);
    return y;
  }
  // The router, the shared expert's gate_up (with its SwiGLU) and its gate read the same x: one group.
  const int64_t E = t.num_experts, K = t.num_experts_per_tok;
  Tensor router_logits = be_.alloc(act, {T, E});
  std::vector<Backend::LinearJob> jobs{{&f.router, &router_logits}};
  Tensor a, gate;
  if (f.shared_gu) {
    a = be_.alloc(act, {T, f.shared_gu->N / 2});
    gate = be_.alloc(act, {T, 1});
    jobs.push_back({&f.shared_gu, &a, true});
    jobs.push_back({&f.shared_gate, &gate});
  }
  be_.linear_group(x, jobs);
  Tensor ids = be_.alloc(DType::I32, {T, K});
  Tensor weights = be_.alloc(DType::F32, {T, K});
  be_.moe_ffn(router_logits, K, x, f.experts, ids, weights, f.shared_gu ? &a : nullptr,
              f.shared_gu ? &f.shared_down : nullptr, f.shared_gu ? &gate : nullptr, y);
  return y;
}

}  // namespace ds::model
