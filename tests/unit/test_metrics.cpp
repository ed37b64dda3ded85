// The periodic stats line (server/metrics.h stats_line) from two engine snapshots: rates over the interval, gauges,
// the interval's prefix-cache hit rate and speculative acceptance, and silence when nothing happened.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "runtime/engine.h"
#include "server/metrics.h"

namespace ds::server {
namespace {

TEST(StatsLine, RatesGaugesHitRateAndAcceptanceOfTheInterval) {
  runtime::EngineMetrics a, b;
  EXPECT_EQ(stats_line(a, b, 10.0), "");  // idle: nothing to say
  a.prompt_tokens_total = 1000, a.generation_tokens_total = 200;
  a.prefix_cache_queries_total = 500, a.prefix_cache_hits_total = 100;
  b = a;
  b.prompt_tokens_total += 4000, b.generation_tokens_total += 451;
  b.prefix_cache_queries_total += 4000, b.prefix_cache_hits_total += 1000;
  b.running = 3, b.waiting = 1, b.kv_blocks_used = 25, b.kv_blocks_total = 1000, b.slots_used = 3, b.slots_total = 16;
  EXPECT_EQ(stats_line(a, b, 10.0),
            "prompt throughput 400.0 tokens/s, generation throughput 45.1 tokens/s, running 3, waiting 1, KV cache 2.5%, "
            "state slots 3/16, prefix cache hit rate 25.0%");
  // Speculative decoding: 100 verify rounds of K = 3 in the interval, 150 of 300 drafts accepted.
  a.spec_accepted_per_pos = {10, 5, 1};
  b.spec_accepted_per_pos = {10 + 80, 5 + 50, 1 + 20};
  a.spec_num_drafts_total = 20, b.spec_num_drafts_total = 120;
  a.spec_draft_tokens_total = 60, b.spec_draft_tokens_total = 360;
  a.spec_accepted_tokens_total = 16, b.spec_accepted_tokens_total = 166;
  b.prefix_cache_queries_total = a.prefix_cache_queries_total;  // no lookups: no hit rate
  EXPECT_EQ(stats_line(a, b, 10.0),
            "prompt throughput 400.0 tokens/s, generation throughput 45.1 tokens/s, running 3, waiting 1, KV cache 2.5%, "
            "state slots 3/16; speculative: mean acceptance length 2.50, accepted 150 of 300 drafted (50.0%), per "
            "position 0.80, 0.50, 0.20");
  // Running requests keep the line going even in an interval without tokens (a long prefill).
  runtime::EngineMetrics c = b;
  c.running = 1, c.waiting = 0;
  c.spec_accepted_per_pos = b.spec_accepted_per_pos;
  EXPECT_EQ(stats_line(b, c, 5.0),
            "prompt throughput 0.0 tokens/s, generation throughput 0.0 tokens/s, running 1, waiting 0, KV cache 2.5%, "
            "state slots 3/16");
}

// The process metrics (render_process_metrics): Prometheus' standard process_* gauges read from /proc and getrusage,
// and malloc_in_use_bytes following what this process allocates and frees.
TEST(StatsLine, ProcessMetrics) {
  auto value = [](const std::string& t, const std::string& name) {
    const size_t at = t.find("\n" + name + " ");
    EXPECT_NE(at, std::string::npos) << name << " missing in\n" << t;
    return at == std::string::npos ? -1.0 : std::stod(t.substr(at + name.size() + 2));
  };
  const std::string t = render_process_metrics("deltaserve", 1.7e9);
  EXPECT_NE(t.find("# TYPE process_resident_memory_bytes gauge\n"), std::string::npos);
  EXPECT_NE(t.find("# TYPE process_cpu_seconds_total counter\n"), std::string::npos);
  EXPECT_GT(value(t, "process_resident_memory_bytes"), 1e6);
  EXPECT_GE(value(t, "process_virtual_memory_bytes"), value(t, "process_resident_memory_bytes"));
  EXPECT_GE(value(t, "process_open_fds"), 3);  // stdin, stdout, stderr at least
  EXPECT_GT(value(t, "process_cpu_seconds_total"), 0);
  EXPECT_EQ(value(t, "process_start_time_seconds"), 1.7e9);
  // A descriptor opened shows; 64 MiB malloc'ed and touched shows in resident memory and malloc_in_use_bytes.
  FILE* f = std::fopen("/proc/self/status", "r");
  ASSERT_NE(f, nullptr);
  const std::string t1 = render_process_metrics("deltaserve", 0);
  EXPECT_EQ(value(t1, "process_open_fds"), value(t, "process_open_fds") + 1);
  std::fclose(f);
  constexpr size_t kBytes = 64 << 20;
  char* p = static_cast<char*>(std::malloc(kBytes));
  ASSERT_NE(p, nullptr);
  std::memset(p, 1, kBytes);
  const std::string t2 = render_process_metrics("vllm", 0);
  EXPECT_GT(value(t2, "process_resident_memory_bytes"), value(t1, "process_resident_memory_bytes") + 0.9 * kBytes);
#if defined(__GLIBC__) && !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
  // (sanitizers replace malloc, and mallinfo2 with it)
  EXPECT_GE(value(t2, "vllm:malloc_in_use_bytes"), value(t1, "deltaserve:malloc_in_use_bytes") + double(kBytes));
  std::free(p);
  const std::string t3 = render_process_metrics("deltaserve", 0);
  EXPECT_LE(value(t3, "deltaserve:malloc_in_use_bytes"), value(t2, "vllm:malloc_in_use_bytes") - double(kBytes));
#else
  std::free(p);
#endif
}

// /metrics renders the engine's tokens-per-step counts as a cumulative histogram (vLLM's iteration_tokens_total).
TEST(StatsLine, IterationTokensHistogram) {
  runtime::EngineMetrics e;
  e.iteration_tokens[0] = 9, e.iteration_tokens[2] = 2, e.iteration_tokens.back() = 1;
  e.iteration_tokens_sum = 9 + 32 + 20000;
  ServerMetrics sm;
  const std::string t = sm.render(e, "m");
  EXPECT_NE(t.find("# TYPE deltaserve:iteration_tokens_total histogram\n"), std::string::npos);
  EXPECT_NE(t.find("deltaserve:iteration_tokens_total_bucket{model_name=\"m\",le=\"1\"} 9\n"), std::string::npos);
  EXPECT_NE(t.find("deltaserve:iteration_tokens_total_bucket{model_name=\"m\",le=\"8\"} 9\n"), std::string::npos);
  EXPECT_NE(t.find("deltaserve:iteration_tokens_total_bucket{model_name=\"m\",le=\"16\"} 11\n"), std::string::npos);
  EXPECT_NE(t.find("deltaserve:iteration_tokens_total_bucket{model_name=\"m\",le=\"16384\"} 11\n"), std::string::npos);
  EXPECT_NE(t.find("deltaserve:iteration_tokens_total_bucket{model_name=\"m\",le=\"+Inf\"} 12\n"), std::string::npos);
  EXPECT_NE(t.find("deltaserve:iteration_tokens_total_sum{model_name=\"m\"} 20041\n"), std::string::npos);
  EXPECT_NE(t.find("deltaserve:iteration_tokens_total_count{model_name=\"m\"} 12\n"), std::string::npos);
}

// --metrics-prefix vllm: every name vLLM's (Grafana dashboards query vllm:...), none left with ours.
TEST(StatsLine, MetricsPrefix) {
  runtime::EngineMetrics e;
  e.running = 3;
  ServerMetrics sm;
  sm.ttft.observe(0.2);
  const std::string t = sm.render(e, "m", "vllm");
  EXPECT_EQ(t.find("deltaserve"), std::string::npos);
  EXPECT_NE(t.find("# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"m\"} 3\n"),
            std::string::npos);
  EXPECT_NE(t.find("vllm:time_to_first_token_seconds_count{model_name=\"m\"} 1\n"), std::string::npos);
  EXPECT_NE(t.find("vllm:request_success_total{model_name=\"m\",finished_reason=\"stop\"} 0\n"), std::string::npos);
  // every sample line names a vllm: metric, or one of Prometheus' standard process_ ones (unprefixed, as in vLLM's)
  std::istringstream lines(t);
  for (std::string l; std::getline(lines, l);) {
    if (l.empty() || l[0] == '#') continue;
    EXPECT_TRUE(l.rfind("vllm:", 0) == 0 || l.rfind("process_", 0) == 0) << l;
  }
  EXPECT_NE(t.find("\nprocess_resident_memory_bytes "), std::string::npos);
}

}  // namespace
}  // namespace ds::server
