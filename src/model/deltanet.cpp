// Gated DeltaNet: projections, causal conv1d (+SiLU) with state, gated delta rule with fp32 state,
// gated RMSNorm with silu(z), output projection.
#include "model/model.h"

namespace ds::model {

Tensor Model::deltanet_block(const LayerWeights& lw, const Tensor& x, BatchMeta& b, StateLayer& st) {
  const auto& t = cfg_.text;
  const int64_t T = b.num_tokens(), C = t.lin_conv_dim(), Hv = t.lin_num_v_heads, Vd = t.lin_value_dim();
  const DType act = be_.act_dtype();
  Tensor mixed = be_.alloc(act, {T, C});  // q | k | v before the conv
  Tensor z = be_.alloc(act, {T, Vd});
  Tensor ba = be_.alloc(act, {T, 2 * Hv});
  be_.linear_group(x, {{&lw.gdn.qkv, &mixed}, {&lw.gdn.z, &z}, {&lw.gdn.ba, &ba}});
  Tensor qkv = be_.alloc(act, {T, C});
  be_.conv1d_causal(mixed, lw.gdn.conv_w, st, b, qkv);
  Tensor o = be_.alloc(act, {T, Vd});
  be_.gated_delta_rule(qkv, ba, lw.gdn.A_log, lw.gdn.dt_bias, t.lin_num_k_heads, Hv, t.lin_k_head_dim,
                       t.lin_v_head_dim, st, b, o);
  Tensor normed = be_.alloc(act, {T, Vd});
  be_.gated_rmsnorm(o, z, lw.gdn.norm, float(t.rms_norm_eps), normed);
  Tensor y = be_.alloc(act, {T, t.hidden_size});
  be_.linear(normed, lw.gdn.out, y);
  return y;
}

}  // namespace ds::model
