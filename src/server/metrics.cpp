#include "server/metrics.h"

#include <dirent.h>
#include <malloc.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <sstream>

namespace ds::server {

void Histogram::observe(double v) {
  std::lock_guard<std::mutex> l(mu_);
  size_t i = 0;
  while (i < bounds_.size() && v > bounds_[i]) ++i;
  ++counts_[i];
  sum_ += v;
}

std::string render_histogram(const std::string& name, const std::string& help, const std::string& labels,
                             const std::vector<double>& bounds, const std::vector<uint64_t>& counts, double sum) {
  std::ostringstream os;
  os.precision(15);  // sums of token counts run to millions: no rounding to the default 6 digits
  os << "# HELP " << name << " " << help << "\n# TYPE " << name << " histogram\n";
  uint64_t cum = 0;
  for (size_t i = 0; i < bounds.size(); ++i) {
    cum += counts[i];
    os << name << "_bucket{" << labels << ",le=\"" << bounds[i] << "\"} " << cum << "\n";
  }
  cum += counts.back();
  os << name << "_bucket{" << labels << ",le=\"+Inf\"} " << cum << "\n";
  os << name << "_sum{" << labels << "} " << sum << "\n" << name << "_count{" << labels << "} " << cum << "\n";
  return os.str();
}

std::string Histogram::render(const std::string& name, const std::string& help, const std::string& labels) const {
  std::lock_guard<std::mutex> l(mu_);
  return render_histogram(name, help, labels, bounds_, counts_, sum_);
}

namespace {
// vLLM's request-latency buckets (the per-request phases; e2e keeps its shorter list).
std::vector<double> request_time_bounds() {
  return {0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
          1920.0, 7680.0};
}
// 1, 2, 5, 10, 20, 50, ... up to 1M tokens (vLLM's 1-2-5 series, to its max_model_len).
std::vector<double> token_bounds() {
  std::vector<double> b;
  for (double m = 1; m <= 1e6; m *= 10)
    for (double k : {1.0, 2.0, 5.0}) b.push_back(k * m);
  return b;
}
}  // namespace

ServerMetrics::ServerMetrics()
    : ttft({0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0}),
      itl({0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5}),
      e2e({0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0}),
      queue(request_time_bounds()), prefill(request_time_bounds()), decode(request_time_bounds()),
      inference(request_time_bounds()),
      prompt_tokens(token_bounds()), generation_tokens(token_bounds()),
      start_time(std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count()) {}

namespace {
// The process's virtual and resident sizes in bytes (/proc/self/statm); zeros where it cannot be read.
struct MemorySizes {
  int64_t virtual_bytes = 0, resident_bytes = 0;
};
MemorySizes memory_sizes() {
  long long vm = 0, rss = 0;
  if (FILE* f = std::fopen("/proc/self/statm", "r")) {
    if (std::fscanf(f, "%lld %lld", &vm, &rss) != 2) vm = rss = 0;
    std::fclose(f);
  }
  const int64_t page = sysconf(_SC_PAGESIZE);
  return {int64_t(vm) * page, int64_t(rss) * page};
}
}  // namespace

int64_t trim_heap() {
#if defined(__GLIBC__)
  const int64_t before = memory_sizes().resident_bytes;
  malloc_trim(0);
  return before - memory_sizes().resident_bytes;
#else
  return 0;
#endif
}

void limit_malloc_arenas(int arenas) {
#if defined(__GLIBC__)
  if (!std::getenv("MALLOC_ARENA_MAX")) mallopt(M_ARENA_MAX, arenas);
#endif
}

std::string render_process_metrics(const std::string& prefix, double start_time) {
  std::ostringstream os;
  os.precision(15);
  auto metric = [&](const std::string& name, const char* type, const char* help, double v) {
    os << "# HELP " << name << " " << help << "\n# TYPE " << name << " " << type << "\n" << name << " " << v << "\n";
  };
  const MemorySizes mem = memory_sizes();
  int fds = 0;
  if (DIR* d = opendir("/proc/self/fd")) {
    while (const dirent* e = readdir(d))
      if (e->d_name[0] != '.') ++fds;
    closedir(d);
    --fds;  // the directory's own descriptor
  }
  rlimit lim{};
  getrlimit(RLIMIT_NOFILE, &lim);
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  const double cpu = double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + 1e-6 * double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
  metric("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", double(mem.resident_bytes));
  metric("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", double(mem.virtual_bytes));
  metric("process_open_fds", "gauge", "Number of open file descriptors.", double(fds));
  metric("process_max_fds", "gauge", "Maximum number of open file descriptors.",
         lim.rlim_cur == RLIM_INFINITY ? -1.0 : double(lim.rlim_cur));
  metric("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.", cpu);
  metric("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.", start_time);
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
  const struct mallinfo2 mi = mallinfo2();
  metric(prefix + ":malloc_in_use_bytes", "gauge",
         "Bytes malloc has handed out and not had back (arena and mmapped chunks in use).",
         double(mi.uordblks + mi.hblkhd));
#endif
  return os.str();
}

std::string ServerMetrics::render(const runtime::EngineMetrics& e, const std::string& model,
                                  const std::string& prefix) const {
  std::ostringstream os;
  const std::string L = "model_name=\"" + model + "\"", P = prefix + ":";
  auto gauge = [&](const char* name, const char* help, double v) {
    os << "# HELP " << P << name << " " << help << "\n# TYPE " << P << name << " gauge\n"
       << P << name << "{" << L << "} " << v << "\n";
  };
  auto counter = [&](const char* name, const char* help, double v) {
    os << "# HELP " << P << name << " " << help << "\n# TYPE " << P << name << " counter\n"
       << P << name << "{" << L << "} " << v << "\n";
  };
  gauge("num_requests_running", "Number of requests in the running batch.", double(e.running));
  gauge("num_requests_waiting", "Number of requests waiting to be scheduled.", double(e.waiting));
  gauge("kv_cache_usage_perc", "Fraction of paged KV blocks in use (full-attention layers).",
        e.kv_blocks_total ? double(e.kv_blocks_used) / double(e.kv_blocks_total) : 0.0);
  gauge("kv_blocks_used", "Paged KV blocks in use.", double(e.kv_blocks_used));
  gauge("kv_blocks_total", "Paged KV blocks in the pool.", double(e.kv_blocks_total));
  gauge("state_slots_used", "DeltaNet state slots in use (one per running sequence).", double(e.slots_used));
  gauge("state_slots_total", "DeltaNet state slots in the pool.", double(e.slots_total));
  counter("prompt_tokens_total", "Prefill tokens processed.", double(e.prompt_tokens_total));
  counter("generation_tokens_total", "Generated tokens.", double(e.generation_tokens_total));
  counter("prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache (vLLM's prefix_cache_queries).",
          double(e.prefix_cache_queries_total));
  counter("prefix_cache_hits_total", "Prompt tokens resumed from prefix-cache checkpoints (vLLM's prefix_cache_hits).",
          double(e.prefix_cache_hits_total));
  counter("prefix_cache_host_hits_total", "Of prefix_cache_hits_total: tokens resumed from checkpoints in host memory (--cache-ram).",
          double(e.prefix_cache_host_hits_total));
  gauge("prefix_cache_blocks", "Paged KV blocks held only by prefix-cache checkpoints (evictable).",
        double(e.kv_blocks_cached));
  gauge("prefix_cache_checkpoints", "DeltaNet state checkpoints held by the prefix cache (on the device and in host memory).",
        double(e.prefix_cache_checkpoints));
  gauge("prefix_cache_host_checkpoints", "Prefix-cache checkpoints whose DeltaNet state is in host memory (--cache-ram).",
        double(e.prefix_cache_host_checkpoints));
  counter("grammar_masks_ahead_total", "Grammar masks computed during the forward and used at sampling.",
          double(e.grammar_masks_ahead_total));
  counter("grammar_masks_stale_total", "Grammar masks computed ahead but recomputed at sampling (position moved).",
          double(e.grammar_masks_stale_total));
  counter("num_preemptions_total", "Sequences preempted (recomputed later) for lack of KV blocks or for a more urgent request.",
          double(e.preemptions_total));
  os << "# HELP " << P << "request_success_total Finished requests by reason.\n"
     << "# TYPE " << P << "request_success_total counter\n";
  const char* reasons[] = {"none", "stop", "length", "abort", "error", "repetition"};
  for (int i = 1; i < 6; ++i)
    os << P << "request_success_total{" << L << ",finished_reason=\"" << reasons[i] << "\"} "
       << e.requests_finished[i] << "\n";
  if (!e.spec_accepted_per_pos.empty()) {  // speculative decoding on (vLLM's spec_decode_* names)
    counter("spec_decode_num_drafts_total", "Verify rounds with at least one draft token.",
            double(e.spec_num_drafts_total));
    counter("spec_decode_num_draft_tokens_total", "Draft tokens verified.", double(e.spec_draft_tokens_total));
    counter("spec_decode_num_accepted_tokens_total", "Draft tokens accepted.", double(e.spec_accepted_tokens_total));
    os << "# HELP " << P << "spec_decode_num_accepted_tokens_per_pos Draft tokens accepted, by draft position.\n"
       << "# TYPE " << P << "spec_decode_num_accepted_tokens_per_pos counter\n";
    for (size_t i = 0; i < e.spec_accepted_per_pos.size(); ++i)
      os << P << "spec_decode_num_accepted_tokens_per_pos{" << L << ",position=\"" << i << "\"} "
         << e.spec_accepted_per_pos[i] << "\n";
  }
  if (responses_stored.load() >= 0) {
    gauge("responses_stored", "Responses in the Responses store (--responses-store), running ones included.",
          double(responses_stored.load()));
    gauge("responses_store_bytes", "Bytes of stored responses' items and objects held (--responses-store budget).",
          double(responses_store_bytes.load()));
  }
  counter("http_requests_total", "HTTP requests received.", double(http_requests_total.load()));
  counter("request_rejected_total", "Requests rejected by admission control (429/503).", double(rejected_total.load()));
  counter("request_client_errors_total", "Requests answered with a 4xx error.", double(client_errors_total.load()));
  os << ttft.render(P + "time_to_first_token_seconds", "Time to first token.", L);
  os << itl.render(P + "inter_token_latency_seconds", "Time between consecutive output tokens.", L);
  os << e2e.render(P + "e2e_request_latency_seconds", "End-to-end request latency.", L);
  os << queue.render(P + "request_queue_time_seconds", "Time in the engine's waiting queue before the first admission.", L);
  os << prefill.render(P + "request_prefill_time_seconds", "Time from the first admission to the first token.", L);
  os << decode.render(P + "request_decode_time_seconds", "Time from the first token to the last.", L);
  os << inference.render(P + "request_inference_time_seconds", "Time from the first admission to the last token (prefill + decode).", L);
  os << prompt_tokens.render(P + "request_prompt_tokens", "Prompt tokens per finished request.", L);
  os << generation_tokens.render(P + "request_generation_tokens", "Generated tokens per finished request.", L);
  const std::vector<double> it_bounds(std::begin(runtime::EngineMetrics::kIterationTokenBounds),
                                      std::end(runtime::EngineMetrics::kIterationTokenBounds));
  os << render_histogram(P + "iteration_tokens_total", "Tokens per engine step (prefill chunks, decode and verify rows).",
                         L, it_bounds, std::vector<uint64_t>(e.iteration_tokens.begin(), e.iteration_tokens.end()),
                         double(e.iteration_tokens_sum));
  os << render_process_metrics(prefix, start_time);
  return os.str();
}

std::string stats_line(const runtime::EngineMetrics& a, const runtime::EngineMetrics& b, double seconds) {
  const int64_t prompt = b.prompt_tokens_total - a.prompt_tokens_total, gen = b.generation_tokens_total - a.generation_tokens_total;
  const int64_t queries = b.prefix_cache_queries_total - a.prefix_cache_queries_total;
  const int64_t hits = b.prefix_cache_hits_total - a.prefix_cache_hits_total;
  const int64_t drafts = b.spec_num_drafts_total - a.spec_num_drafts_total;
  const int64_t drafted = b.spec_draft_tokens_total - a.spec_draft_tokens_total;
  const int64_t accepted = b.spec_accepted_tokens_total - a.spec_accepted_tokens_total;
  if (prompt == 0 && gen == 0 && b.running == 0 && b.waiting == 0) return "";
  const double s = std::max(seconds, 1e-9);
  char buf[512];
  std::string out;
  std::snprintf(buf, sizeof buf,
                "prompt throughput %.1f tokens/s, generation throughput %.1f tokens/s, running %lld, waiting %lld, "
                "KV cache %.1f%%, state slots %lld/%lld",
                double(prompt) / s, double(gen) / s, (long long)b.running, (long long)b.waiting,
                b.kv_blocks_total > 0 ? 100.0 * double(b.kv_blocks_used) / double(b.kv_blocks_total) : 0.0,
                (long long)b.slots_used, (long long)b.slots_total);
  out = buf;
  if (queries > 0) {
    std::snprintf(buf, sizeof buf, ", prefix cache hit rate %.1f%%", 100.0 * double(hits) / double(queries));
    out += buf;
  }
  if (drafts > 0) {
    // vLLM's: mean acceptance length = 1 + accepted per verify round; per-position rates of the interval.
    std::snprintf(buf, sizeof buf, "; speculative: mean acceptance length %.2f, accepted %lld of %lld drafted (%.1f%%), per position",
                  1.0 + double(accepted) / double(drafts), (long long)accepted, (long long)drafted,
                  drafted > 0 ? 100.0 * double(accepted) / double(drafted) : 0.0);
    out += buf;
    for (size_t i = 0; i < b.spec_accepted_per_pos.size(); ++i) {
      const int64_t was = i < a.spec_accepted_per_pos.size() ? a.spec_accepted_per_pos[i] : 0;
      std::snprintf(buf, sizeof buf, "%s %.2f", i ? "," : "", double(b.spec_accepted_per_pos[i] - was) / double(drafts));
      out += buf;
    }
  }
  return out;
}

}  // namespace ds::server
