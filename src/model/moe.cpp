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
  auto swiglu = [&](const Linear& gu, const Linear& down, Tensor& out) {
    Tensor g = be_.alloc(act, {T, gu->N});
    be_.linear(x, gu, g);
    Tensor a = be_.alloc(act, {T, gu->N / 2});
    be_.silu_mul(g, a);
    be_.linear(a, down, out);
  };
  if (!f.moe) {
    swiglu(f.mlp_gu, f.mlp_down, y);
    return y;
  }
  const int64_t E = t.num_experts, K = t.num_experts_per_tok;
  Tensor router_logits = be_.alloc(act, {T, E});
  be_.linear(x, f.router, router_logits);
  Tensor ids = be_.alloc(DType::I32, {T, K});
  Tensor weights = be_.alloc(DType::F32, {T, K});
  be_.moe_route(router_logits, K, ids, weights);
  be_.moe_experts(x, f.experts, ids, weights, y);
  if (f.shared_gu) {
    Tensor s = be_.alloc(act, {T, H});
    swiglu(f.shared_gu, f.shared_down, s);
    Tensor gate = be_.alloc(act, {T, 1});
    be_.linear(x, f.shared_gate, gate);
    be_.sigmoid_scale_add(y, s, gate);
  }
  return y;
}

}  // namespace ds::model
