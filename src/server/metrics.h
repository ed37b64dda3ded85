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
};

// vLLM's periodic stats line (--disable-log-stats turns it off): throughput over the `seconds` between two engine
// snapshots, the running and waiting requests, KV-cache and state-slot use, the interval's prefix-cache hit rate (when
// prompts were looked up) and, with speculative decoding, the interval's acceptance. "" when nothing happened in the
// interval and nothing is running or waiting.
std::string stats_line(const runtime::EngineMetrics& prev, const runtime::EngineMetrics& cur, double seconds);

}  // namespace ds::server
