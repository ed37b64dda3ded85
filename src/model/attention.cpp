// Gated full attention: q/k RMSNorm, partial interleaved mRoPE, paged GQA attention, sigmoid output gate.
#include "model/model.h"

namespace ds::model {

Tensor Model::attention_block(const LayerWeights& lw, const Tensor& x, BatchMeta& b, KvLayer& kv) {
  const auto& t = cfg_.text;
  const int64_t T = b.num_tokens(), Dh = t.head_dim, Nh = t.num_heads, Nkv = t.num_kv_heads;
  const DType act = be_.act_dtype();
  Tensor qg = be_.alloc(act, {T, Nh * 2 * Dh});  // per head [query | gate]
  Tensor k = be_.alloc(act, {T, Nkv * Dh});
  Tensor v = be_.alloc(act, {T, Nkv * Dh});
  be_.linear_group(x, {{&lw.attn.q, &qg}, {&lw.attn.k, &k}, {&lw.attn.v, &v}});
  Tensor q = be_.alloc(act, {T, Nh * Dh});
  Tensor gate = be_.alloc(act, {T, Nh * Dh});
  be_.qk_norm_rope_kv(qg, k, v, lw.attn.q_norm, lw.attn.k_norm, float(t.rms_norm_eps), rope_, b, q, gate, kv);
  Tensor o = be_.alloc(act, {T, Nh * Dh});
  be_.attention_gated(q, kv, b, gate, o);
  Tensor y = be_.alloc(act, {T, t.hidden_size});
  be_.linear(o, lw.attn.o, y);
  return y;
}

}  // namespace ds::model
