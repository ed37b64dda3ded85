#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "core/status.h"
#include "io/schema.h"

namespace ds::io {

using nlohmann::json;

int64_t TensorEntry::numel() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

namespace {
// Headers of real checkpoints are well under a few MB; a bound keeps a corrupt length from
// making us allocate or parse gigabytes.
constexpr uint64_t kMaxHeader = 100ull << 20;
}

SafetensorsHeader safetensors_parse(const uint8_t* bytes, size_t size, const std::string& what) {
  SafetensorsHeader h;
  if (size < 8) fail(what, ": not a safetensors file: expected at least 8 bytes, file has ", size);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];
  if (n > size - 8)
    fail(what, ": header length ", n, " runs past the end of the file (", size - 8, " bytes after the length)");
  if (n > kMaxHeader) fail(what, ": header length ", n, " exceeds the limit of ", kMaxHeader, " bytes");
  if (n < 2) fail(what, ": header length ", n, " is too small for a JSON object");
  h.data_offset = 8 + n;
  const uint64_t data_size = size - h.data_offset;
  json j;
  try {
    j = json::parse(bytes + 8, bytes + 8 + n);
  } catch (const json::exception& e) {
    fail(what, ": header is not valid JSON: ", e.what());
  }
  if (!j.is_object()) fail(what, ": header must be a JSON object, got ", j.type_name());
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) fail(what, ": __metadata__ must be an object of strings, got ", v.type_name());
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string())
          fail(what, ": __metadata__[\"", m.key(), "\"] must be a string, got ", m.value().type_name());
        h.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!v.is_object()) fail(what, ": tensor '", name, "': expected an object, got ", v.type_name());
    TensorEntry e;
    e.name = name;
    auto dt = v.find("dtype");
    if (dt == v.end() || !dt->is_string()) fail(what, ": tensor '", name, "': missing string field 'dtype'");
    if (!dtype_from_name(dt->get<std::string>(), &e.dtype))
      fail(what, ": tensor '", name, "': unknown dtype '", dt->get<std::string>(),
           "' (expected one of F64 F32 F16 BF16 I64 I32 I16 I8 U64 U32 U16 U8 BOOL)");
    auto sh = v.find("shape");
    if (sh == v.end() || !sh->is_array()) fail(what, ": tensor '", name, "': missing array field 'shape'");
    unsigned __int128 numel = 1;
    for (auto& d : *sh) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0)
        fail(what, ": tensor '", name, "': shape entries must be non-negative integers, got ", d.dump());
      int64_t dv = d.get<int64_t>();
      e.shape.push_back(dv);
      numel *= uint64_t(dv);
      if (numel > (unsigned __int128)(1ull << 62)) fail(what, ": tensor '", name, "': shape ", sh->dump(), " overflows");
    }
    auto off = v.find("data_offsets");
    if (off == v.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
        !(*off)[1].is_number_unsigned())
      fail(what, ": tensor '", name, "': data_offsets must be [begin, end] of non-negative integers, got ",
           off == v.end() ? std::string("nothing") : off->dump());
    e.begin = (*off)[0].get<uint64_t>();
    e.end = (*off)[1].get<uint64_t>();
    if (e.begin > e.end) fail(what, ": tensor '", name, "': data_offsets begin ", e.begin, " > end ", e.end);
    if (e.end > data_size)
      fail(what, ": tensor '", name, "': data_offsets end ", e.end, " lies outside the data region of ",
           data_size, " bytes (file truncated?)");
    unsigned __int128 expect = numel * dtype_size(e.dtype);
    if (expect != (unsigned __int128)(e.end - e.begin))
      fail(what, ": tensor '", name, "': shape ", shape_str(e.shape), " x ", dtype_name(e.dtype), " needs ",
           uint64_t(expect), " bytes, data_offsets span ", e.end - e.begin);
    h.tensors.push_back(std::move(e));
  }
  // No two tensors may share bytes.
  std::vector<const TensorEntry*> order;
  for (auto& t : h.tensors) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](auto a, auto b) { return a->begin < b->begin; });
  for (size_t i = 1; i < order.size(); ++i)
    if (order[i]->begin < order[i - 1]->end)
      fail(what, ": tensors '", order[i - 1]->name, "' [", order[i - 1]->begin, ", ", order[i - 1]->end,
           ") and '", order[i]->name, "' [", order[i]->begin, ", ", order[i]->end, ") overlap");
  return h;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) fail(path, ": cannot open: ", std::strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    fail(path, ": cannot stat: ", std::strerror(errno));
  }
  size_ = size_t(st.st_size);
  if (size_ > 0) {
    map_ = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map_ == MAP_FAILED) {
      map_ = nullptr;
      ::close(fd);
      fail(path, ": mmap failed: ", std::strerror(errno));
    }
  }
  ::close(fd);
  header_ = safetensors_parse(static_cast<const uint8_t*>(map_), size_, path);
  for (auto& t : header_.tensors) {
    t.data = static_cast<const uint8_t*>(map_) + header_.data_offset + t.begin;
    t.file = path;
  }
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) munmap(map_, size_);
}

std::unique_ptr<TensorIndex> TensorIndex::open_dir(const std::string& dir) {
  namespace fs = std::filesystem;
  auto idx = std::make_unique<TensorIndex>();
  fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  std::vector<std::string> shards;
  std::map<std::string, std::string> weight_map;
  if (fs::exists(index_path)) {
    std::ifstream f(index_path);
    json j;
    try {
      j = json::parse(f);
    } catch (const json::exception& e) {
      fail(index_path.string(), ": not valid JSON: ", e.what());
    }
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      fail(index_path.string(), ": expected an object with a 'weight_map' object");
    std::set<std::string> seen;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string()) fail(index_path.string(), ": weight_map['", it.key(), "'] must be a file name");
      std::string shard = it.value().get<std::string>();
      if (shard.find('/') != std::string::npos || shard.find("..") != std::string::npos)
        fail(index_path.string(), ": weight_map['", it.key(), "'] = '", shard, "' must be a file in the same folder");
      weight_map[it.key()] = shard;
      if (seen.insert(shard).second) shards.push_back(shard);
    }
  } else if (fs::exists(fs::path(dir) / "model.safetensors")) {
    shards.push_back("model.safetensors");
  } else {
    fail(dir, ": no checkpoint found: expected model.safetensors.index.json or model.safetensors");
  }
  for (auto& s : shards) {
    std::string p = (fs::path(dir) / s).string();
    if (!fs::exists(p)) fail(index_path.string(), ": shard '", s, "' listed in the index does not exist");
    idx->files_.push_back(std::make_unique<SafetensorsFile>(p));
    for (auto& t : idx->files_.back()->header().tensors) {
      if (idx->entries_.count(t.name)) fail(p, ": tensor '", t.name, "' also appears in ", idx->entries_[t.name].file);
      if (!weight_map.empty()) {
        auto w = weight_map.find(t.name);
        if (w == weight_map.end()) fail(p, ": tensor '", t.name, "' is not listed in the index's weight_map");
        if (w->second != s)
          fail(p, ": tensor '", t.name, "' is in shard ", s, " but the index says ", w->second);
      }
      idx->entries_[t.name] = t;
    }
  }
  for (auto& [name, shard] : weight_map)
    if (!idx->entries_.count(name))
      fail(index_path.string(), ": tensor '", name, "' is listed for shard ", shard, " but that shard lacks it");
  return idx;
}

const TensorEntry* TensorIndex::find(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) return nullptr;
  if (!it->second.data && !specs_.empty()) {
    const TensorSpec& sp = *specs_.at(name);
    auto buf = std::unique_ptr<uint8_t[]>(new uint8_t[std::max<int64_t>(sp.nbytes(), 1)]);
    fill_random(sp, seed_, buf.get());
    it->second.data = buf.get();
    owned_[name] = std::move(buf);
  }
  return &it->second;
}

std::unique_ptr<TensorIndex> TensorIndex::synthetic(const std::vector<TensorSpec>& specs, uint64_t seed) {
  auto idx = std::make_unique<TensorIndex>();
  idx->seed_ = seed;
  idx->spec_store_ = specs;
  uint64_t off = 0;
  for (auto& s : idx->spec_store_) {
    TensorEntry e;
    e.name = s.name;
    e.dtype = s.dtype;
    e.shape = s.shape;
    e.begin = off;
    e.end = off + uint64_t(s.nbytes());
    e.file = "<synthetic>";
    off = e.end;
    idx->entries_[s.name] = e;
    idx->specs_[s.name] = &s;
  }
  return idx;
}

namespace {
inline uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
inline float unit(uint64_t r) { return float(r >> 40) * (1.0f / float(1ull << 24)) * 2.f - 1.f; }  // [-1, 1)
}  // namespace

void fill_random(const TensorSpec& sp, uint64_t seed, uint8_t* dst) {
  uint64_t key = seed;
  for (char c : sp.name) key = splitmix(key ^ uint64_t(uint8_t(c)));
  int64_t n = 1;
  for (auto d : sp.shape) n *= d;
  const int64_t K = sp.shape.empty() ? 1 : sp.shape.back();
  using R = TensorSpec::Role;
  // Magnitudes keep activations of a random 40-layer model finite: uniform weights with variance 1/K.
  const float a = std::sqrt(3.0f / float(std::max<int64_t>(K, 1)));
#pragma omp parallel for schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) {
    uint64_t r = splitmix(key + uint64_t(i));
    float u = unit(r);
    switch (sp.role) {
      case R::QWeight: reinterpret_cast<uint32_t*>(dst)[i] = uint32_t(r); break;
      case R::QZeros: reinterpret_cast<uint32_t*>(dst)[i] = 0x77777777u; break;
      case R::Scales: {
        // |scale| ~ a/8 for codes in [-8, 7]; about half negative like AutoRound's.
        const float kin = float(sp.shape[0] * 128);
        float mag = std::sqrt(3.0f / kin) / 8.f * (0.5f + 0.5f * std::fabs(u));
        reinterpret_cast<uint16_t*>(dst)[i] = f32_to_f16((r & 1) ? -mag : mag);
        break;
      }
      default: {
        float v;
        switch (sp.role) {
          case R::Norm: v = 0.05f * u; break;
          case R::NormPlain: v = 1.f + 0.05f * u; break;
          case R::ALog: v = std::log(1.f + 7.5f * (u + 1.f)); break;
          case R::DtBias: v = u; break;
          case R::Conv: v = 0.5f * u; break;
          case R::Embed: v = 0.05f * u; break;
          default: v = a * u;
        }
        if (sp.dtype == DType::BF16) reinterpret_cast<uint16_t*>(dst)[i] = f32_to_bf16(v);
        else if (sp.dtype == DType::F16) reinterpret_cast<uint16_t*>(dst)[i] = f32_to_f16(v);
        else reinterpret_cast<float*>(dst)[i] = v;
      }
    }
  }
}

namespace {
struct HeaderItem {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t nbytes() const {
    uint64_t n = dtype_size(dtype);
    for (auto d : shape) n *= uint64_t(d);
    return n;
  }
};

// Opens `path` and writes the length-prefixed header for tensors stored back to back in `items` order;
// the caller writes the data in that order.
std::ofstream open_with_header(const std::string& path, const std::vector<HeaderItem>& items) {
  json h = json::object();
  uint64_t off = 0;
  for (auto& t : items) {
    h[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {off, off + t.nbytes()}}};
    off += t.nbytes();
  }
  std::string hs = h.dump();
  while ((hs.size() + 8) % 8) hs.push_back(' ');  // keep the data region 8-byte aligned
  std::ofstream f(path, std::ios::binary);
  if (!f) fail(path, ": cannot open for writing");
  uint64_t n = hs.size();
  char len[8];
  for (int i = 0; i < 8; ++i) len[i] = char((n >> (8 * i)) & 0xff);
  f.write(len, 8);
  f.write(hs.data(), std::streamsize(hs.size()));
  return f;
}
}  // namespace

void safetensors_write_streaming(const std::string& path, const std::vector<const TensorSpec*>& specs,
                                 const std::function<void(const TensorSpec&, uint8_t*)>& fill) {
  std::vector<HeaderItem> items;
  for (auto* s : specs) items.push_back({s->name, s->dtype, s->shape});
  std::ofstream f = open_with_header(path, items);
  std::vector<uint8_t> buf;
  for (auto* s : specs) {
    buf.resize(size_t(s->nbytes()));
    fill(*s, buf.data());
    f.write(reinterpret_cast<const char*>(buf.data()), std::streamsize(buf.size()));
  }
  if (!f) fail(path, ": write failed (disk full?)");
}

const TensorEntry& TensorIndex::get(const std::string& name) const {
  auto* e = find(name);
  if (!e) fail("checkpoint: missing tensor '", name, "'");
  return *e;
}

std::vector<std::string> TensorIndex::names() const {
  std::vector<std::string> v;
  for (auto& [n, _] : entries_) v.push_back(n);
  return v;
}

std::vector<std::string> TensorIndex::unused() const {
  std::vector<std::string> v;
  for (auto& [n, _] : entries_)
    if (!used_.count(n)) v.push_back(n);
  return v;
}

}  // namespace ds::io

namespace ds::io {
void safetensors_write(const std::string& path, const std::vector<TensorOut>& tensors) {
  std::vector<const TensorOut*> sorted;
  for (auto& t : tensors) sorted.push_back(&t);
  std::sort(sorted.begin(), sorted.end(), [](auto a, auto b) { return a->name < b->name; });
  std::vector<HeaderItem> items;
  for (auto* t : sorted) items.push_back({t->name, t->dtype, t->shape});
  std::ofstream f = open_with_header(path, items);
  for (size_t i = 0; i < sorted.size(); ++i)
    f.write(static_cast<const char*>(sorted[i]->data), std::streamsize(items[i].nbytes()));
  if (!f) fail(path, ": write failed");
}
}  // namespace ds::io
