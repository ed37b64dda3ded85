// make-random-checkpoint: a checkpoint of a config's real shapes and the seed's file format (AutoRound
// W4A16 per-expert int4, or BF16 fused), random values, written in safetensors shards with an index —
// to measure load time and run the server without the real weights.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "cli/args.h"
#include "cli/commands.h"
#include "io/config.h"
#include "io/safetensors.h"
#include "io/schema.h"

namespace ds::cli {

int cmd_make_random_checkpoint(int argc, char** argv) {
  namespace fs = std::filesystem;
  Args a(argc, argv, 2, {"bf16"});
  a.only("make-random-checkpoint", {"config", "out", "bf16", "seed", "shard-gb"});
  std::string cfg_path = a.require("config");
  std::string out = a.require("out");
  const bool int4 = !a.has("bf16");
  const uint64_t seed = uint64_t(a.get_int("seed", 0));
  const int64_t shard_bytes = int64_t(a.get_double("shard-gb", 4.0) * double(1ull << 30));
  io::ModelConfig cfg = io::load_model_config(cfg_path);
  std::string quant_json;
  if (int4) {
    if (!cfg.quant.enabled()) {
      quant_json = io::seed_quantization_config_json(cfg);
      cfg.quant = io::parse_quant_config(quant_json, "seed quantization_config");
    }
  } else {
    cfg.quant = io::QuantConfig{};
  }
  auto specs = io::checkpoint_schema(cfg, int4);
  fs::create_directories(out);
  // config.json: the given one, with the quantization_config the weights follow.
  std::ifstream cf(fs::is_directory(cfg_path) ? (fs::path(cfg_path) / "config.json").string() : cfg_path);
  nlohmann::ordered_json cj = nlohmann::ordered_json::parse(cf);
  if (!quant_json.empty()) {
    cj["quantization_config"] = nlohmann::ordered_json::parse(quant_json);
    std::ofstream(fs::path(out) / "quantization_config.json") << quant_json << "\n";
  }
  if (!int4) cj.erase("quantization_config");
  std::ofstream(fs::path(out) / "config.json") << cj.dump(2) << "\n";
  // Shards of about shard_bytes each.
  std::vector<std::vector<const io::TensorSpec*>> shards(1);
  int64_t cur = 0, total = 0;
  for (auto& s : specs) {
    if (cur > 0 && cur + s.nbytes() > shard_bytes) {
      shards.emplace_back();
      cur = 0;
    }
    shards.back().push_back(&s);
    cur += s.nbytes();
    total += s.nbytes();
  }
  nlohmann::ordered_json wm = nlohmann::ordered_json::object();
  auto t0 = std::chrono::steady_clock::now();
  for (size_t i = 0; i < shards.size(); ++i) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
    io::safetensors_write_streaming((fs::path(out) / name).string(), shards[i],
                                    [&](const io::TensorSpec& s, uint8_t* dst) { io::fill_random(s, seed, dst); });
    for (auto* s : shards[i]) wm[s->name] = name;
    std::fprintf(stderr, "wrote %s (%zu tensors)\n", name, shards[i].size());
  }
  nlohmann::ordered_json idx = {{"metadata", {{"total_size", total}}}, {"weight_map", wm}};
  std::ofstream(fs::path(out) / "model.safetensors.index.json") << idx.dump(2) << "\n";
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("wrote %s: %zu tensors, %.2f GiB in %zu shards, %.1f s (%.2f GB/s)\n", out.c_str(), specs.size(),
              double(total) / (1ull << 30), shards.size(), secs, double(total) / secs / 1e9);
  return 0;
}

}  // namespace ds::cli
