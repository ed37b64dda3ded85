// safetensors files: mmap, strict header validation, sharded checkpoints.
//
// Layout of a file: u64 little-endian header length N, N bytes of JSON header, then the data region.
// Every tensor entry names dtype, shape and [begin, end) offsets relative to the data region.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace ds::io {

struct TensorEntry {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // relative to the data region
  const uint8_t* data = nullptr;  // into the mapping (set for opened files)
  std::string file;               // path of the shard holding it
  size_t nbytes() const { return size_t(end - begin); }
  int64_t numel() const;
};

struct SafetensorsHeader {
  std::vector<TensorEntry> tensors;  // in header order
  std::map<std::string, std::string> metadata;
  uint64_t data_offset = 0;  // 8 + N
};

// Validates and parses the header of an in-memory file image of `size` bytes. `what` names the file
// in error messages. Throws ds::Error on any violation: truncated file, header length beyond the file,
// malformed JSON, unknown dtype, negative/overflowing shapes, offsets outside the data region,
// overlapping tensors, shape x dtype != byte length.
SafetensorsHeader safetensors_parse(const uint8_t* bytes, size_t size, const std::string& what);

// A read-only memory mapping of one safetensors file.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  const SafetensorsHeader& header() const { return header_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  void* map_ = nullptr;
  size_t size_ = 0;
  SafetensorsHeader header_;
};

// All tensors of a checkpoint directory: `model.safetensors.index.json` (sharded) or the single
// `model.safetensors`. Tracks which tensors were consumed so the loader can be strict.
struct TensorSpec;

class TensorIndex {
 public:
  static std::unique_ptr<TensorIndex> open_dir(const std::string& dir);
  // Tensors that exist only as specs; each is generated (deterministically from `seed` and its name) the
  // first time it is looked up, and kept until the index is destroyed. For benchmarks of real shapes
  // without the real files.
  static std::unique_ptr<TensorIndex> synthetic(const std::vector<TensorSpec>& specs, uint64_t seed);
  const TensorEntry* find(const std::string& name) const;
  const TensorEntry& get(const std::string& name) const;  // throws with the name if missing
  bool has(const std::string& name) const { return find(name) != nullptr; }
  std::vector<std::string> names() const;
  void mark_used(const std::string& name) { used_[name] = true; }
  std::vector<std::string> unused() const;

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  mutable std::map<std::string, TensorEntry> entries_;
  // synthetic mode
  std::map<std::string, const TensorSpec*> specs_;
  std::vector<TensorSpec> spec_store_;
  mutable std::map<std::string, std::unique_ptr<uint8_t[]>> owned_;
  uint64_t seed_ = 0;
  std::map<std::string, bool> used_;
};

}  // namespace ds::io

namespace ds::io {
struct TensorOut {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const void* data;  // numel × dtype size bytes
};
// Writes a safetensors file (header entries sorted by name, data in that order).
void safetensors_write(const std::string& path, const std::vector<TensorOut>& tensors);
// Writes a safetensors file whose tensors are produced one at a time by `fill(spec, dst)` (in spec order),
// so that a large file never has to be held in memory.
void safetensors_write_streaming(const std::string& path, const std::vector<const TensorSpec*>& specs,
                                 const std::function<void(const TensorSpec&, uint8_t*)>& fill);
// Fills `dst` with plausible random values for `spec` (deterministic in seed and name).
void fill_random(const TensorSpec& spec, uint64_t seed, uint8_t* dst);
}  // namespace ds::io
