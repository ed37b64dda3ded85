// CUPTI activity collection for per-kernel device times (design: kernel_times.h).
#include "backend/cuda/kernel_times.h"
#include "core/env.h"

#include <cxxabi.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <type_traits>
#include <vector>

#ifdef DS_HAVE_CUPTI
#include <cuda_runtime.h>
#include <cupti.h>
#include <dlfcn.h>
#endif

namespace ds::cuda {

std::string short_kernel_name(const std::string& mangled) {
  int status = -1;
  std::unique_ptr<char, void (*)(void*)> dem(abi::__cxa_demangle(mangled.c_str(), nullptr, nullptr, &status), std::free);
  if (status != 0 || !dem) return mangled;
  std::string s = dem.get();
  // The parameter list: the '(' that matches the last ')' (parameter types may hold "(anonymous namespace)" and
  // template arguments parentheses of their own, so neither the first nor the last '(' will do).
  size_t close = s.rfind(')');
  size_t cut = std::string::npos;
  for (size_t i = close, depth = 0; close != std::string::npos; --i) {
    if (s[i] == ')') ++depth;
    else if (s[i] == '(' && --depth == 0) {
      cut = i;
      break;
    }
    if (i == 0) break;
  }
  if (cut != std::string::npos && cut > 0) s.resize(cut);
  // The return type (a function template's demangled name starts with it) and the namespaces before the name, not
  // what is inside template arguments.
  int depth = 0;
  size_t start = 0;
  for (size_t i = 0; i + 1 < s.size(); ++i) {
    const char c = s[i];
    if (c == '<') ++depth;
    else if (c == '>') --depth;
    else if (depth == 0 && c == ':' && s[i + 1] == ':') start = i + 2;
    else if (depth == 0 && c == ' ') start = i + 1;
  }
  return s.substr(start);
}

#ifdef DS_HAVE_CUPTI
namespace {

// libcupti is opened at run time (dlopen), not linked: the server must start where the toolkit's profiling library
// is absent (a runtime-only image). DS_CUPTI_LIB names the file; else the usual names and the toolkit's directories.
struct Cupti {
  decltype(&cuptiActivityRegisterCallbacks) register_callbacks = nullptr;
  decltype(&cuptiActivityEnable) enable = nullptr;
  decltype(&cuptiActivityDisable) disable = nullptr;
  decltype(&cuptiActivityFlushAll) flush_all = nullptr;
  decltype(&cuptiActivityGetNextRecord) next_record = nullptr;
  decltype(&cuptiGetResultString) result_string = nullptr;
};
const Cupti* cupti(std::string* why_not) {
  static Cupti c;
  static std::string err;
  static bool tried = false;
  if (!tried) {
    tried = true;
    std::vector<std::string> names;
    if (const char* e = std::getenv("DS_CUPTI_LIB")) names.push_back(e);
    for (const char* n : {"libcupti.so", "libcupti.so.13", "libcupti.so.12"}) names.push_back(n);
    for (const char* d : {"/usr/local/cuda/lib64/", "/usr/local/cuda/lib/", "/usr/local/cuda/extras/CUPTI/lib64/"})
      names.push_back(std::string(d) + "libcupti.so");
    void* h = nullptr;
    for (auto& n : names)
      if ((h = dlopen(n.c_str(), RTLD_NOW | RTLD_LOCAL))) break;
    if (!h) {
      err = "CUPTI: libcupti.so not found (set DS_CUPTI_LIB to its path)";
    } else {
      auto sym = [&](auto& f, const char* name) {
        f = reinterpret_cast<std::remove_reference_t<decltype(f)>>(dlsym(h, name));
        if (!f && err.empty()) err = std::string("CUPTI: ") + name + " missing from libcupti";
      };
      sym(c.register_callbacks, "cuptiActivityRegisterCallbacks");
      sym(c.enable, "cuptiActivityEnable");
      sym(c.disable, "cuptiActivityDisable");
      sym(c.flush_all, "cuptiActivityFlushAll");
      sym(c.next_record, "cuptiActivityGetNextRecord");
      sym(c.result_string, "cuptiGetResultString");
    }
  }
  if (!err.empty()) {
    if (why_not) *why_not = err;
    return nullptr;
  }
  return &c;
}

struct Rec {
  uint64_t start, end;
  const std::string* name;  // into g_names
};
std::mutex g_mu;
std::set<std::string> g_names;  // mangled names seen (records point into it)
std::vector<Rec> g_recs;
bool g_registered = false, g_on = false;

constexpr size_t kBufBytes = size_t(8) << 20;

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufBytes));
  *size = *buffer ? kBufBytes : 0;
  *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  CUpti_Activity* rec = nullptr;
  {
    std::lock_guard<std::mutex> lk(g_mu);
    while (cupti(nullptr)->next_record(buffer, valid, &rec) == CUPTI_SUCCESS) {
      if (rec->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL && rec->kind != CUPTI_ACTIVITY_KIND_KERNEL) continue;
      const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(rec);
      if (k->start == 0 && k->end == 0) continue;  // no timestamps for this one
      // DS_KTIMES_GRID=1: launches of one kernel with different grids are kept apart (the grid after a '\x01',
      // shown as " [XxYxZ]"): the one template serves shapes whose times differ.
      static const bool by_grid = env_flag("DS_KTIMES_GRID");
      std::string key = k->name ? k->name : "?";
      if (by_grid)
        key += "\x01 [" + std::to_string(k->gridX) + "x" + std::to_string(k->gridY) + "x" + std::to_string(k->gridZ) + "]";
      const std::string* name = &*g_names.insert(key).first;
      g_recs.push_back({k->start, std::max(k->start, k->end), name});
    }
  }
  std::free(buffer);
}

std::string cupti_error(CUptiResult r) {
  const char* s = nullptr;
  cupti(nullptr)->result_string(r, &s);
  return s ? s : "unknown CUPTI error";
}

void clear_locked() { g_recs.clear(); }

}  // namespace

bool kernel_times_start(std::string* why_not) {
  const Cupti* cp = cupti(why_not);
  if (!cp) return false;
  if (g_on) {
    if (why_not) *why_not = "kernel times: a collection is already running";
    return false;
  }
  if (!g_registered) {
    const CUptiResult r = cp->register_callbacks(buffer_requested, buffer_completed);
    if (r != CUPTI_SUCCESS) {
      if (why_not) *why_not = "CUPTI: cuptiActivityRegisterCallbacks: " + cupti_error(r);
      return false;
    }
    g_registered = true;
  }
  {
    std::lock_guard<std::mutex> lk(g_mu);
    clear_locked();
  }
  const CUptiResult r = cp->enable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  if (r != CUPTI_SUCCESS) {
    if (why_not) *why_not = "CUPTI: cuptiActivityEnable(concurrent kernel): " + cupti_error(r);
    return false;
  }
  g_on = true;
  return true;
}

void kernel_times_reset() {
  if (!g_on) return;
  cudaDeviceSynchronize();
  cupti(nullptr)->flush_all(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  std::lock_guard<std::mutex> lk(g_mu);
  clear_locked();
}

std::vector<KernelTime> kernel_times_stop(double* span_ns, const char* skip) {
  std::vector<KernelTime> out;
  if (!g_on) return out;
  cudaDeviceSynchronize();
  cupti(nullptr)->flush_all(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  cupti(nullptr)->disable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  g_on = false;
  std::lock_guard<std::mutex> lk(g_mu);
  // Own time: in start order, the part of each kernel's interval not already covered by the kernels that started
  // before it, so the own times add up to the union of the intervals (the time the device ran a kernel at all).
  // Under programmatic dependent launch a kernel starts while its predecessor finishes and waits (griddepcontrol.
  // wait); that stretch is its predecessor's.
  if (skip && *skip)
    std::erase_if(g_recs, [skip](const Rec& r) { return r.name->find(skip) != std::string::npos; });
  std::sort(g_recs.begin(), g_recs.end(), [](const Rec& x, const Rec& y) { return x.start < y.start; });
  std::map<const std::string*, KernelTime> by;  // mangled names that shorten alike (overloads) stay apart
  uint64_t covered = 0;
  for (const Rec& r : g_recs) {
    KernelTime& k = by[r.name];
    k.launches += 1;
    k.total_ns += double(r.end - r.start);
    const uint64_t from = std::max(r.start, covered);
    if (r.end > from) k.own_ns += double(r.end - from);
    covered = std::max(covered, r.end);
  }
  for (auto& [name, k] : by) {
    const size_t cut = name->find('\x01');
    k.name = cut == std::string::npos ? short_kernel_name(*name)
                                      : short_kernel_name(name->substr(0, cut)) + name->substr(cut + 1);
    out.push_back(std::move(k));
  }
  std::sort(out.begin(), out.end(), [](const KernelTime& x, const KernelTime& y) { return x.own_ns > y.own_ns; });
  if (span_ns) *span_ns = g_recs.empty() ? 0 : double(covered - g_recs.front().start);
  clear_locked();
  return out;
}

#else  // built without CUPTI

bool kernel_times_start(std::string* why_not) {
  if (why_not) *why_not = "kernel times: this build has no CUPTI (cupti.h not found at configure time)";
  return false;
}
void kernel_times_reset() {}
std::vector<KernelTime> kernel_times_stop(double* span_ns, const char*) {
  if (span_ns) *span_ns = 0;
  return {};
}

#endif

}  // namespace ds::cuda
