// Prometheus text exposition of the server's and engine's counters (prefix deltaserve:, names after vLLM's).
#pragma once
#include <array>
#include <atomic>
#include <mutex>
#include <string>
#include <vector>

#include "runtime/engine.h"

namespace ds::server {

// Prometheus text of a histogram: counts per bucket (index i: at most bounds[i]; the last: above every bound).
std::string render_histogram(const std::string& name, const std::string& help, const std::string& labels,
                             const std::vector<double>& bounds, const std::vector<uint64_t>& counts, double sum);

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}
  void observe(double v);
  std::string render(const std::string& name, const std::string& help, const std::string& labels) const;

 private:
  mutable std::mutex mu_;
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;
  double sum_ = 0;
};

struct ServerMetrics {
  ServerMetrics();
  std::atomic<int64_t> http_requests_total{0}, rejected_total{0}, client_errors_total{0};
  // The Responses store (response_store.h), as the server last read it; -1 while it is off (not rendered then).
  std::atomic<int64_t> responses_stored{-1}, responses_store_bytes{0};
  Histogram ttft, itl, e2e;
  // vLLM's per-request phases (seconds) and sizes (tokens).
  Histogram queue, prefill, decode, inference, prompt_tokens, generation_tokens;
  // Renders everything, engine gauges included; every name starts with `prefix` + ":" (--metrics-prefix: vllm makes
  // vLLM's Grafana dashboards read them).
  std::string render(const runtime::EngineMetrics& e, const std::string& model_name,
                     const std::string& prefix = "deltaserve") const;
  double start_time;  // seconds since the epoch, at construction (process_start_time_seconds)
};

// The process itself, as Prometheus' client libraries export it (unprefixed standard names, as vLLM's /metrics has
// them): process_resident_memory_bytes, process_virtual_memory_bytes, process_open_fds, process_max_fds,
// process_cpu_seconds_total, process_start_time_seconds; and `prefix`:malloc_in_use_bytes, the bytes malloc has handed
// out and not had back (glibc's mallinfo2: arena and mmapped chunks in use), which tells a leak (it grows) from
// allocator fragmentation (resident memory grows, it does not). What the soak test (tools/soak.py) samples.
std::string render_process_metrics(const std::string& prefix, double start_time);

// Gives the free pages of every malloc arena back to the system (glibc's malloc_trim): with ~100 HTTP threads, each
// allocating in an arena of its own, freed memory scattered over the arenas otherwise stays resident and the server's
// resident memory creeps up under a steady load while the bytes in use do not (tools/soak.py measured it). The
// server calls it every DS_MALLOC_TRIM_MS (default 10000; 0 = never). Returns the resident bytes it gave back.
int64_t trim_heap();

// Caps glibc's malloc arenas at `arenas` unless $MALLOC_ARENA_MAX sets them (glibc's default, 8 per core, gives each of
// the ~100 HTTP threads an arena of its own on a large host; on a 16-core H200 host under tools/soak.py's load that
// took resident memory from 1.6 to 2.4 GB in 8 minutes, still climbing, against 1.5 GB flat with 8 arenas and
// trim_heap; bench/RESULTS.md "Session 48"). Called once at server start, before any thread.
void limit_malloc_arenas(int arenas);

// vLLM's periodic stats line (--disable-log-stats turns it off): throughput over the `seconds` between two engine
// snapshots, the running and waiting requests, KV-cache and state-slot use, the interval's prefix-cache hit rate (when
// prompts were looked up) and, with speculative decoding, the interval's acceptance. "" when nothing happened in the
// interval and nothing is running or waiting.
std::string stats_line(const runtime::EngineMetrics& prev, const runtime::EngineMetrics& cur, double seconds);

}  // namespace ds::server
