// The tensors a checkpoint of a given config holds, in the layout of the seed checkpoint: AutoRound
// W4A16 (per-expert int4 experts, int4 attention / DeltaNet projections, BF16 everything else) or plain
// BF16 with fused experts. Used to write random checkpoints in the real file format and to build random
// weights for benchmarks without the real files.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "io/config.h"

namespace ds::io {

struct TensorSpec {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  // What the values mean, so generators can make plausible ones.
  enum class Role { Weight, Norm, NormPlain, QWeight, QZeros, Scales, ALog, DtBias, Conv, Embed } role = Role::Weight;
  int64_t nbytes() const;
};

// Text model (+ MTP when the config has one). `int4` selects the AutoRound layout; which modules are int4
// follows cfg.quant when it is enabled, else the seed recipe (experts, attention q/k/v/o, DeltaNet
// in_proj_qkv, in_proj_z, out_proj; the rest BF16).
std::vector<TensorSpec> checkpoint_schema(const ModelConfig& cfg, bool int4);

// The vision tower's tensors (model.visual.*, all BF16 as in the seed checkpoint) of cfg.vision: random towers for
// the vision benchmark (Model::load_random_vision). Empty when the config has no vision_config.
std::vector<TensorSpec> vision_schema(const ModelConfig& cfg);

// The quantization_config the seed checkpoint carries for this layout (auto-round, extra_config overrides).
std::string seed_quantization_config_json(const ModelConfig& cfg);

}  // namespace ds::io
