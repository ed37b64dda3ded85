// bench: decode and prefill speed of a config's real shapes with random weights (Model::load_random, the seed
// recipe), on any backend. Decode runs B sequences that already hold `ctx` tokens: attention reads that many
// cached positions (their values do not change the cost) and DeltaNet state is fixed-size. Prints markdown
// tables with achieved GB/s (decode: bytes a step must read) or TFLOP/s (prefill) next to the device's
// measured copy bandwidth and bf16 matrix rate (docs/perf.md).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <thread>
#include <tuple>

#include "backend/forwarding.h"
#include "backend/ops.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "core/env.h"
#include "io/config.h"
#include "io/schema.h"
#include "model/model.h"
#include <nlohmann/json.hpp>
#include "runtime/engine.h"
#include "runtime/spec_decode.h"

#ifdef DS_HAVE_CUDA
#include <cuda_runtime.h>

#include "backend/cuda/kernel_times.h"
#include "backend/cuda/probe.h"
#endif

namespace ds::cli {
namespace {

using Clock = std::chrono::steady_clock;
double secs_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// n random token ids below min(V, 150000) (the random-weight bench's prompts).
std::vector<int32_t> random_tokens(int64_t n, int64_t V, std::mt19937& rng) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (auto& x : v) x = int32_t(rng() % uint32_t(std::min<int64_t>(V, 150000)));
  return v;
}

// Wall seconds of each of n calls f(0), ..., f(n − 1), sorted ascending (front: the best, [n / 2]: the median).
template <class F>
std::vector<double> sorted_secs(int n, F&& f) {
  std::vector<double> ts;
  for (int i = 0; i < n; ++i) {
    const auto t0 = Clock::now();
    f(i);
    ts.push_back(secs_since(t0));
  }
  std::sort(ts.begin(), ts.end());
  return ts;
}

// "none" (or "0") turns a default list off (e.g. --prefill none: decode only).
std::vector<int64_t> int_list(const Args& a, const std::string& name, const std::string& def) {
  std::vector<int64_t> v;
  const std::string val = a.get(name, def);
  if (val == "none" || val == "0") return v;
  std::stringstream ss(val);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    try {
      v.push_back(std::stoll(item));
    } catch (...) {
      fail("--", name, " expects a comma-separated list of integers, got '", a.get(name), "'");
    }
    if (v.back() <= 0) fail("--", name, ": values must be positive, got ", v.back());
  }
  return v;
}

// Bytes a forward reads from device memory, from the checkpoint schema in the backend's layouts: int4 as
// nibbles + fp32 scale + u8 zero per group of 128 (docs/cuda.md), everything else bf16.
struct WeightBytes {
  double dense = 0;   // every non-expert weight except the embedding table and lm_head (norms included)
  double expert = 0;  // one routed expert of one layer (gate, up, down)
  double lm_head = 0;
  double embed_row = 0;      // one embedding row
  double active_params = 0;  // per token: non-expert + top-k experts + lm_head (for FLOPs)
};

WeightBytes weight_bytes(const io::ModelConfig& cfg, bool int4) {
  const auto& t = cfg.text;
  WeightBytes w;
  auto specs = io::checkpoint_schema(cfg, int4);
  double expert_all = 0, expert_params = 0, dense_params = 0;
  for (auto& s : specs) {
    if (s.name.rfind("mtp.", 0) == 0 || s.name.find("visual.") != std::string::npos) continue;
    double numel = 1;
    for (auto d : s.shape) numel *= double(d);
    double bytes = 0, params = 0;
    switch (s.role) {
      case io::TensorSpec::Role::QWeight:
        params = numel * 8;
        // Nibbles and one fp16 scale per group of 128 (the CUDA kernels' reads since session 18: the scales kept
        // fp16, the symmetric checkpoints' single zero point not loaded; before, 5 bytes per group: fp32 + a byte).
        bytes = params / 2 + params / 128 * 2;
        break;
      case io::TensorSpec::Role::QZeros:
      case io::TensorSpec::Role::Scales:
        break;
      default:
        params = numel;
        bytes = numel * (s.dtype == DType::F32 ? 4 : 2);
    }
    const bool is_expert = s.name.find(".mlp.experts.") != std::string::npos;
    if (s.role == io::TensorSpec::Role::Embed) {
      w.embed_row = bytes / double(t.vocab_size);
    } else if (s.name == "lm_head.weight") {
      w.lm_head = bytes;
    } else if (is_expert) {
      expert_all += bytes;
      expert_params += params;
    } else {
      w.dense += bytes;
      dense_params += params;
    }
  }
  if (t.tie_word_embeddings) w.lm_head = w.embed_row * double(t.vocab_size);
  const double moe_layers = t.moe ? double(t.num_layers) : 0;
  if (moe_layers > 0) {
    w.expert = expert_all / moe_layers / double(t.num_experts);
    expert_params /= moe_layers * double(t.num_experts);
  }
  w.active_params = dense_params + moe_layers * double(t.num_experts_per_tok) * expert_params +
                    double(t.vocab_size) * double(t.hidden_size);
  return w;
}

// A backend that forwards every op (ForwardingBackend) and, when `on` (--breakdown), times the model's ops per kernel
// family (or per op): with a synchronisation on each side (per-op time includes one launch latency, so its sum
// exceeds an unsynchronised step), or with device events inside a recorded step (`events`).
class TimingBackend final : public ForwardingBackend {
 public:
  TimingBackend(Backend& in, int64_t vocab) : ForwardingBackend(in), vocab_(vocab) {}
  bool on = false;
  std::map<std::string, double> ms;
  std::map<std::string, int64_t> calls;

  // Appended to every graph key: recordings made under one variant's switches are never replayed under another's.
  std::string key_suffix;
  bool graph_run(const std::string& key, const std::function<void()>& fn) override {
    if (!on || !events) return in_.graph_run(key + key_suffix, fn);
    // A recording of its own, with an event pair around each op (event nodes in the graph).
    return in_.graph_run(key + key_suffix + "/timed", [&] {
      n_ = 0;
      fn();
      recorded_ = n_;
    });
  }
  // Event mode (CUDA): ops are bracketed by device events instead of synchronisations, and the step runs as a
  // recorded graph, so per-family times are device times without launch gaps. collect() after a synchronize.
  bool events = false;
  void collect() {
#ifdef DS_HAVE_CUDA
    for (int i = 0; i < recorded_; ++i) {
      float t = 0;
      if (cudaEventElapsedTime(&t, ev_[size_t(2 * i)], ev_[size_t(2 * i + 1)]) == cudaSuccess) ms[fam_[size_t(i)]] += t;
      calls[fam_[size_t(i)]] += 1;
    }
    float tot = 0;
    if (recorded_ > 0 && cudaEventElapsedTime(&tot, ev_[0], ev_[size_t(2 * recorded_ - 1)]) == cudaSuccess)
      step_ms += tot;
#endif
  }
  double step_ms = 0;
#ifdef DS_HAVE_CUDA
  static void check(cudaError_t e) {
    if (e != cudaSuccess) fail("bench --breakdown: CUDA event error: ", cudaGetErrorString(e));
  }
#endif

  // per_op (eager mode only): time under "family: op" instead of the family (the prefill breakdown).
  bool per_op = false;
  template <class F>
  void timed(const char* family, F&& f) { timed(family, nullptr, std::forward<F>(f)); }
  template <class F>
  void timed(const char* family, const char* op, F&& f) {
    if (!on) return f();
#ifdef DS_HAVE_CUDA
    if (events) {
      auto st = static_cast<cudaStream_t>(in_.stream_handle());
      while (ev_.size() < size_t(2 * (n_ + 1))) {
        cudaEvent_t e;
        check(cudaEventCreate(&e));
        ev_.push_back(e);
      }
      if (fam_.size() < size_t(n_ + 1)) fam_.resize(size_t(n_ + 1));
      fam_[size_t(n_)] = family;
      // Inside a recording, an event must be an external node to be timed at replay; outside, a plain record.
      cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
      cudaStreamIsCapturing(st, &cs);
      const unsigned fl = cs == cudaStreamCaptureStatusActive ? cudaEventRecordExternal : cudaEventRecordDefault;
      check(cudaEventRecordWithFlags(ev_[size_t(2 * n_)], st, fl));
      f();
      check(cudaEventRecordWithFlags(ev_[size_t(2 * n_ + 1)], st, fl));
      ++n_;
      return;
    }
#endif
    in_.synchronize();
    auto t0 = Clock::now();
    f();
    in_.synchronize();
    const std::string key = per_op && op ? str_cat(family, ": ", op) : std::string(family);
    ms[key] += secs_since(t0) * 1e3;
    calls[key] += 1;
  }
  void embed(const Tensor& table, const BatchMeta& b, Tensor& out) override {
    timed("other", "embed", [&] { in_.embed(table, b, out); });
  }
  void rmsnorm(const Tensor& x, const Tensor& w, float eps, Tensor& y) override {
    timed("other", "rmsnorm", [&] { in_.rmsnorm(x, w, eps, y); });
  }
  void add_inplace(Tensor& x, const Tensor& y) override {
    timed("other", "add_inplace", [&] { in_.add_inplace(x, y); });
  }
  void linear(const Tensor& x, const Linear& w, Tensor& y) override {
    const char* fam = w->int4 ? "int4 linears" : w->N == vocab_ ? "lm_head" : "bf16 linears";
    timed(fam, "linear", [&] { in_.linear(x, w, y); });
  }
  void silu_mul(const Tensor& gu, Tensor& y) override {
    timed("other", "silu_mul", [&] { in_.silu_mul(gu, y); });
  }
  void qk_norm_rope(const Tensor& qg, Tensor& k, const Tensor& qn, const Tensor& kn, float eps, const RopeParams& r,
                    const BatchMeta& b, Tensor& q, Tensor& gate) override {
    timed("attention", "qk_norm_rope", [&] { in_.qk_norm_rope(qg, k, qn, kn, eps, r, b, q, gate); });
  }
  void kv_cache_write(KvLayer& kv, const Tensor& k, const Tensor& v, const BatchMeta& b) override {
    timed("attention", "kv_cache_write", [&] { in_.kv_cache_write(kv, k, v, b); });
  }
  void attention(const Tensor& q, const KvLayer& kv, const BatchMeta& b, Tensor& o) override {
    timed("attention", "attention", [&] { in_.attention(q, kv, b, o); });
  }
  void sigmoid_gate_mul(Tensor& x, const Tensor& gate) override {
    timed("attention", "sigmoid_gate_mul", [&] { in_.sigmoid_gate_mul(x, gate); });
  }
  void qk_norm_rope_kv(const Tensor& qg, Tensor& k, const Tensor& v, const Tensor& qn, const Tensor& kn, float eps,
                       const RopeParams& r, const BatchMeta& b, Tensor& q, Tensor& gate, KvLayer& kv) override {
    timed("attention", "qk_norm_rope_kv", [&] { in_.qk_norm_rope_kv(qg, k, v, qn, kn, eps, r, b, q, gate, kv); });
  }
  void attention_gated(const Tensor& q, const KvLayer& kv, const BatchMeta& b, const Tensor& gate, Tensor& o) override {
    timed("attention", "attention_gated", [&] { in_.attention_gated(q, kv, b, gate, o); });
  }
  void conv1d_causal(const Tensor& m, const Tensor& w, StateLayer& st, const BatchMeta& b, Tensor& out) override {
    timed("DeltaNet", "conv1d_causal", [&] { in_.conv1d_causal(m, w, st, b, out); });
  }
  void gated_delta_rule(const Tensor& qkv, const Tensor& ba, const Tensor& A_log, const Tensor& dt_bias, int64_t Hk,
                        int64_t Hv, int64_t Dk, int64_t Dv, StateLayer& st, const BatchMeta& b, Tensor& o) override {
    timed("DeltaNet", "gated_delta_rule", [&] { in_.gated_delta_rule(qkv, ba, A_log, dt_bias, Hk, Hv, Dk, Dv, st, b, o); });
  }
  void gated_rmsnorm(const Tensor& o, const Tensor& z, const Tensor& w, float eps, Tensor& y) override {
    timed("DeltaNet", "gated_rmsnorm", [&] { in_.gated_rmsnorm(o, z, w, eps, y); });
  }
  void deltanet_mix(const Tensor& m, const Tensor& cw, const Tensor& ba, const Tensor& A_log, const Tensor& dt_bias,
                    int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv, const Tensor* z, const Tensor* nw, float eps,
                    StateLayer& st, const BatchMeta& b, Tensor& y, const Tensor* ba_x = nullptr,
                    const Linear* ba_w = nullptr) override {
    timed("DeltaNet", "deltanet_mix",
          [&] { in_.deltanet_mix(m, cw, ba, A_log, dt_bias, Hk, Hv, Dk, Dv, z, nw, eps, st, b, y, ba_x, ba_w); });
  }
  void moe_route(const Tensor& l, int64_t k, Tensor& ids, Tensor& w) override {
    timed("MoE routed", "moe_route", [&] { in_.moe_route(l, k, ids, w); });
  }
  void moe_experts(const Tensor& x, const Experts& w, const Tensor& ids, const Tensor& wts, Tensor& y) override {
    timed("MoE routed", "moe_experts", [&] { in_.moe_experts(x, w, ids, wts, y); });
  }
  // Fused on CUDA (routing, experts and the shared expert's down projection + gated add): all of it "MoE routed".
  void moe_ffn(const Tensor& l, int64_t k, const Tensor& x, const Experts& w, Tensor& ids, Tensor& wts, const Tensor* a,
               const Linear* sd, const Tensor* g, Tensor& y) override {
    timed("MoE routed", "moe_ffn", [&] { in_.moe_ffn(l, k, x, w, ids, wts, a, sd, g, y); });
  }
  void sigmoid_scale_add(Tensor& y, const Tensor& s, const Tensor& g) override {
    timed("other", "sigmoid_scale_add", [&] { in_.sigmoid_scale_add(y, s, g); });
  }
  void gather_rows(const Tensor& x, const std::vector<int32_t>& rows, Tensor& out) override {
    timed("other", "gather_rows", [&] { in_.gather_rows(x, rows, out); });
  }
  void add_rmsnorm(Tensor& x, const Tensor& d, const Tensor& w, float eps, Tensor& h) override {
    timed("other", "add_rmsnorm", [&] { in_.add_rmsnorm(x, d, w, eps, h); });
  }
  // the int4 jobs as one group, the rest as another (the CUDA backend launches them apart the same way)
  void linear_group(const Tensor& x, const std::vector<LinearJob>& jobs) override {
    std::vector<LinearJob> q4, rest;
    for (const auto& j : jobs) ((*j.w)->int4 && !j.swiglu ? q4 : rest).push_back(j);
    if (!q4.empty()) timed("int4 linears", "linear_group", [&] { in_.linear_group(x, q4); });
    if (!rest.empty()) timed((*rest[0].w)->int4 ? "int4 linears" : "bf16 linears", "linear_group", [&] { in_.linear_group(x, rest); });
  }
  void sample_rows(const Tensor& logits, int64_t vocab_limit, const std::vector<SampleRowParams>& rows,
                   const std::vector<SampleEdit>& edits, const std::vector<uint32_t>& masks,
                   std::vector<int32_t>& ids) override {
    timed("sampling", "sample_rows", [&] { in_.sample_rows(logits, vocab_limit, rows, edits, masks, ids); });
  }
  void linear_gated_add(const Tensor& x, const Linear& w, const Tensor& g, Tensor& y) override {
    timed(w->int4 ? "int4 linears" : "bf16 linears", "linear_gated_add", [&] { in_.linear_gated_add(x, w, g, y); });
  }

  void argmax_rows(const Tensor& logits, int64_t limit, Tensor& ids, const Tensor* map = nullptr) override {
    timed("other", "argmax_rows", [&] { in_.argmax_rows(logits, limit, ids, map); });
  }

 private:
  int64_t vocab_;
  int n_ = 0, recorded_ = 0;
  std::vector<std::string> fam_;
#ifdef DS_HAVE_CUDA
  std::vector<cudaEvent_t> ev_;
#endif
};

std::string str_fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

std::string human_bytes(double b) {
  char buf[64];
  if (b >= 1e9)
    std::snprintf(buf, sizeof buf, "%.2f GB", b / 1e9);
  else
    std::snprintf(buf, sizeof buf, "%.1f MB", b / 1e6);
  return buf;
}

// ---- speculative decoding through the engine (issue 8 item 4) ----
//
// Single-stream greedy decode through runtime::Engine (the serving path: scheduler, verify, rollback, MTP drafting,
// step graphs), with and without speculation. Random weights accept almost nothing, so an oracle
// (EngineConfig::draft_hook) replaces each draft position, independently with probability p, by the target's own
// next token, and otherwise keeps the MTP's proposal (or, if that happens to be the target's token, the next id).
// The MTP head still runs every draft step, so drafting costs what it costs. The target's tokens come from a
// deterministic pre-pass: the no-speculation baseline's own greedy output for the same prompt, which is also the
// baseline row; greedy verification is exact, so each speculative run must reproduce it ("= baseline").
struct SpecBench {
  std::vector<int64_t> Ks;
  std::vector<double> ps;
  int64_t draft_vocab = 0;  // > 0: also the reduced draft head (the model was loaded with it)
  int64_t prompt = 512, gen = 128;
  float temperature = 0.f;  // --spec-temperature: > 0 samples (seeded), verified by rejection sampling
  bool graph = true;
  uint64_t seed = 0;
  // --variants: the whole table once per variant, its environment switches set (e.g. DS_CUDA_NO_DEVICE_VERIFY=1;
  // DS_SPEC_PROFILE=1 adds each run's time per step phase).
  struct Variant {
    std::string name;
    std::vector<std::pair<std::string, std::string>> env;
  };
  std::vector<Variant> variants;
};

struct SpecRun {
  std::vector<int32_t> tokens;  // the timed request's output
  double secs = 0;              // decode phase: from the first token to the last
  int64_t decode_tokens = 0, steps = 0, rounds = 0, drafted = 0, accepted = 0;
  std::vector<int64_t> per_pos;
  std::vector<std::pair<std::string, double>> phase_ms;  // DS_SPEC_PROFILE=1: decode phase, ms per phase in all
};

// EngineMetrics::phase_ms (DS_SPEC_PROFILE=1) accumulated between two snapshots, in m1's order.
std::vector<std::pair<std::string, double>> phase_delta(const runtime::EngineMetrics& m0,
                                                        const runtime::EngineMetrics& m1) {
  std::vector<std::pair<std::string, double>> d;
  for (auto& [name, ms] : m1.phase_ms) {
    double before = 0;
    for (auto& [n0, v0] : m0.phase_ms)
      if (n0 == name) before = v0;
    d.push_back({name, ms - before});
  }
  return d;
}

// Those phases per step as table text: " name ms; ... sum ms".
std::string phase_cells(const std::vector<std::pair<std::string, double>>& phases, double steps) {
  std::string line;
  double total = 0;
  for (auto& [name, ms] : phases) {
    line += str_cat(" ", name, " ", str_fixed(ms / steps, 3), ";");
    total += ms;
  }
  return str_cat(line, " sum ", str_fixed(total / steps, 3));
}

SpecRun spec_run(model::Model& m, const SpecBench& o, const std::vector<int32_t>& prompt, int64_t K, int64_t dv,
                 double p, const std::vector<int32_t>* ref) {
  const int64_t V = m.config().text.vocab_size, P = int64_t(prompt.size());
  runtime::EngineConfig ec;
  ec.max_num_seqs = 1;
  ec.max_num_batched_tokens = std::max<int64_t>(P, 64);  // the prompt in one forward
  ec.max_model_len = P + o.gen + 1;
  ec.num_speculative_tokens = K;
  ec.draft_vocab_size = K > 0 ? dv : 0;
  ec.step_graphs = o.graph;
  std::mt19937_64 orng(o.seed * 7919 + uint64_t(K) * 101 + uint64_t(dv) + uint64_t(std::llround(p * 1000)));
  if (K > 0 && ref) {
    ec.draft_hook = [&, ref](uint64_t, int64_t index, int32_t proposed) {
      const int64_t g = index - P;
      if (g < 0 || g >= int64_t(ref->size())) return proposed;
      const int32_t want = (*ref)[size_t(g)];
      if (double(orng() >> 11) * 0x1.0p-53 < p) return want;
      return proposed != want ? proposed : int32_t((want + 1) % V);
    };
  }
  runtime::Engine e(m, ec);
  SpecRun r;
  // Request 1 warms up (every step shape is recorded by then); request 2, the same prompt, is timed.
  for (uint64_t id = 1; id <= 2; ++id) {
    auto q = std::make_shared<runtime::Request>();
    q->id = id;
    q->prompt = prompt;
    q->max_tokens = o.gen;
    q->sampling.temperature = o.temperature;
    q->sampling.seed = 1;
    q->ignore_eos = true;
    e.submit(q);
    std::vector<int32_t> out;
    Clock::time_point t_first{};
    runtime::EngineMetrics m0;
    int64_t n_first = 0;
    bool done = false;
    while (!done && e.step()) {
      while (auto d = q->out->pop(std::chrono::milliseconds(0))) {
        out.insert(out.end(), d->tokens.begin(), d->tokens.end());
        if (d->finish != runtime::FinishReason::None) {
          if (d->finish != runtime::FinishReason::Length) fail("bench --speculative: request ended early: ", d->error);
          done = true;
        }
      }
      if (n_first == 0 && !out.empty()) {  // the prefill step sampled the first token: decoding starts here
        t_first = Clock::now();
        n_first = int64_t(out.size());
        m0 = e.metrics();
      }
    }
    if (id == 1) continue;
    const runtime::EngineMetrics m1 = e.metrics();
    r.secs = secs_since(t_first);
    r.tokens = out;
    r.decode_tokens = int64_t(out.size()) - n_first;
    r.steps = m1.steps_total - m0.steps_total;
    r.rounds = m1.spec_num_drafts_total - m0.spec_num_drafts_total;
    r.drafted = m1.spec_draft_tokens_total - m0.spec_draft_tokens_total;
    r.accepted = m1.spec_accepted_tokens_total - m0.spec_accepted_tokens_total;
    for (size_t i = 0; i < m1.spec_accepted_per_pos.size(); ++i)
      r.per_pos.push_back(m1.spec_accepted_per_pos[i] - m0.spec_accepted_per_pos[i]);
    r.phase_ms = phase_delta(m0, m1);
  }
  return r;
}

void bench_speculative_variant(model::Model& m, const SpecBench& o, const std::vector<int32_t>& prompt,
                               const std::string& variant);

void bench_speculative(model::Model& m, const SpecBench& o, std::mt19937& rng) {
  const int64_t V = m.config().text.vocab_size;
  const std::vector<int32_t> prompt = random_tokens(o.prompt, V, rng);
  if (o.variants.empty()) return bench_speculative_variant(m, o, prompt, "");
  for (const auto& v : o.variants) {
    for (auto& [k, val] : v.env) setenv(k.c_str(), val.c_str(), 1);
    bench_speculative_variant(m, o, prompt, v.name);
    for (auto& [k, val] : v.env) unsetenv(k.c_str());
  }
}

void bench_speculative_variant(model::Model& m, const SpecBench& o, const std::vector<int32_t>& prompt,
                               const std::string& variant) {
  if (!variant.empty()) {
    std::string env;
    for (const auto& v : o.variants)
      if (v.name == variant)
        for (auto& [k, val] : v.env) env += str_cat(env.empty() ? "" : " ", k, "=", val);
    std::printf("## Variant %s%s\n\n", variant.c_str(), env.empty() ? "" : str_cat(" (", env, ")").c_str());
  }
  std::printf("## Speculative decoding, single stream (engine path; %lld-token prompt, %lld tokens generated, "
              "%s; %s)\n\n",
              (long long)o.prompt, (long long)o.gen,
              o.temperature > 0 ? str_cat("temperature ", str_fixed(o.temperature, 2), ", seeded").c_str() : "greedy",
              o.graph ? "step graphs" : "eager");
  std::printf("Oracle: each draft position is the target's own next token with probability p (independently), else "
              "the MTP's proposal; the MTP head runs every draft step. The target's tokens: the baseline's greedy "
              "output (a pre-pass), which every speculative run must reproduce (= baseline).\n\n");
  std::printf("| draft head | K | p | tok/s | × no spec | ms/step | tokens/step | accepted/drafted | "
              "acceptance by position | = baseline |\n|---|---|---|---|---|---|---|---|---|---|\n");
  const SpecRun base = spec_run(m, o, prompt, 0, 0, 0, nullptr);
  const double base_tps = double(base.decode_tokens) / base.secs;
  std::printf("| none (no speculation) | 0 | - | %.1f | 1.00 | %.3f | 1.00 | - | - | - |\n", base_tps,
              base.secs * 1e3 / double(std::max<int64_t>(base.steps, 1)));
  std::fflush(stdout);
  std::vector<int64_t> heads = {0};
  if (o.draft_vocab > 0) heads.push_back(o.draft_vocab);
  struct Best {
    double speedup = 0;
    int64_t K = 0;
  };
  std::map<std::pair<int64_t, double>, Best> best;
  std::vector<std::string> profiles;  // DS_SPEC_PROFILE=1: one line per run
  auto profile = [&](const std::string& what, const SpecRun& r) {
    if (r.phase_ms.empty()) return;
    const double steps = double(std::max<int64_t>(r.steps, 1));
    profiles.push_back(str_cat("| ", what, " | ", str_fixed(r.secs * 1e3 / steps, 3), " |",
                               phase_cells(r.phase_ms, steps), " |"));
  };
  profile("none (no speculation)", base);
  for (int64_t dv : heads)
    for (double p : o.ps)
      for (int64_t K : o.Ks) {
        const SpecRun r = spec_run(m, o, prompt, K, dv, p, &base.tokens);
        const double tps = double(r.decode_tokens) / r.secs;
        std::string pos;
        for (auto a : r.per_pos) pos += str_cat(pos.empty() ? "" : " / ", std::llround(100.0 * double(a) / double(std::max<int64_t>(r.rounds, 1))), "%");
        size_t diff = 0;
        while (diff < r.tokens.size() && diff < base.tokens.size() && r.tokens[diff] == base.tokens[diff]) ++diff;
        const bool same = r.tokens == base.tokens;
        std::printf("| %s | %lld | %.2f | %.1f | %.2f | %.3f | %.2f | %.3f | %s | %s |\n",
                    dv > 0 ? str_cat("reduced ", dv).c_str() : "full lm_head", (long long)K, p, tps, tps / base_tps,
                    r.secs * 1e3 / double(std::max<int64_t>(r.steps, 1)),
                    double(r.decode_tokens) / double(std::max<int64_t>(r.steps, 1)),
                    double(r.accepted) / double(std::max<int64_t>(r.drafted, 1)), pos.c_str(),
                    o.temperature > 0 ? "- (sampled)" : same ? "yes" : str_cat("no (from token ", diff, ")").c_str());
        std::fflush(stdout);
        Best& b = best[{dv, p}];
        if (tps / base_tps > b.speedup) b = {tps / base_tps, K};
        profile(str_cat(dv > 0 ? str_cat("reduced ", dv) : std::string("full lm_head"), " K=", K, " p=", str_fixed(p, 2)), r);
      }
  std::printf("\n| draft head | p | best K | × no spec |\n|---|---|---|---|\n");
  for (auto& [k, b] : best)
    std::printf("| %s | %.2f | %lld | %.2f |\n", k.first > 0 ? str_cat("reduced ", k.first).c_str() : "full lm_head",
                k.second, (long long)b.K, b.speedup);
  std::printf("\n");
  if (!profiles.empty()) {
    std::printf("Step phases (DS_SPEC_PROFILE=1: wall ms per target step, the device synchronised at every phase "
                "boundary, so the steps run slower than in the table above):\n\n| run | ms/step | phases |\n|---|---|---|\n");
    for (auto& l : profiles) std::printf("%s\n", l.c_str());
    std::printf("\n");
  }
}

// --vision WxH,..: the vision tower alone (Model::load_random_vision: random BF16 weights of cfg.vision's shapes),
// one image per call, from fp32 pixels in host memory to the features on the device. Sides are rounded to
// multiples of patch × merge (32), as the processor's resize does. FLOPs: 2 per weight per patch (patch
// embedding, blocks) or per merge unit (merger), plus the attention's QKᵀ and PV (4·P²·D per block).
std::vector<std::pair<int64_t, int64_t>> vision_sizes(const std::string& list) {
  std::vector<std::pair<int64_t, int64_t>> v;
  std::stringstream ss(list);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    const auto x = item.find_first_of("xX");
    long long w = 0, h = 0;
    char* e1 = nullptr;
    char* e2 = nullptr;
    if (x != std::string::npos) {
      const std::string ws = item.substr(0, x), hs = item.substr(x + 1);
      w = std::strtoll(ws.c_str(), &e1, 10);
      h = std::strtoll(hs.c_str(), &e2, 10);
      if (ws.empty() || hs.empty() || *e1 || *e2) w = h = 0;
    }
    if (w <= 0 || h <= 0 || w > 16384 || h > 16384)
      fail("--vision: expected image sizes WIDTHxHEIGHT (1..16384), comma-separated, got '", item, "'");
    v.push_back({w, h});
  }
  if (v.empty()) fail("--vision: expected at least one WIDTHxHEIGHT");
  return v;
}

void bench_vision(const io::ModelConfig& cfg, Backend& be, const std::vector<std::pair<int64_t, int64_t>>& sizes,
                  int steps, uint64_t seed, double mm_rate) {
  const auto& vc = cfg.vision;
  if (!vc.present) fail("--vision: the config has no vision_config");
  auto t0 = Clock::now();
  auto m = model::Model::load_random_vision(cfg, be, seed);
  be.synchronize();
  const double load_s = secs_since(t0);
  const double D = double(vc.hidden_size), I = double(vc.intermediate_size), O = double(vc.out_hidden_size);
  const int64_t ps = vc.patch_size, mg = vc.spatial_merge_size, M2 = mg * mg;
  const int64_t K = vc.in_channels * vc.temporal_patch_size * ps * ps;
  std::printf("## Vision tower (random BF16 weights, built in %.1f s: depth %lld, hidden %lld, %lld heads of %lld, "
              "MLP %lld, patch %lld, merge %lld; one image per call, median of %d)\n\n",
              load_s, (long long)vc.depth, (long long)vc.hidden_size, (long long)vc.num_heads,
              (long long)(vc.hidden_size / vc.num_heads), (long long)vc.intermediate_size, (long long)ps, (long long)mg,
              steps);
  std::printf("| image | patch grid | patches | LLM tokens | ms/image | TFLOP/s | of matmul peak |\n"
              "|---|---|---|---|---|---|---|\n");
  std::mt19937 rng(uint32_t(seed + 29));
  for (auto [W, H] : sizes) {
    const int64_t f = ps * mg;
    const int64_t gh = std::max<int64_t>(1, (H + f / 2) / f) * mg, gw = std::max<int64_t>(1, (W + f / 2) / f) * mg;
    const int64_t P = gh * gw, U = P / M2;
    std::vector<float> px(size_t(P * K));
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    for (auto& x : px) x = u(rng);
    auto run = [&] {
      Tensor feats = m->encode_images(px, {{1, gh, gw}});
      be.synchronize();
    };
    run();  // warm-up (cuBLAS heuristics, allocator)
    const std::vector<double> ts = sorted_secs(steps, [&](int) { run(); });
    const double med = ts[ts.size() / 2] * 1e3, p = double(P);
    const double flops = 2 * p * double(K) * D +
                         double(vc.depth) * (2 * p * (3 * D * D + D * D + 2 * D * I) + 4 * p * p * D) +
                         2 * double(U) * (double(M2) * D * double(M2) * D + double(M2) * D * O);
    std::printf("| %lldx%lld | %lldx%lld | %lld | %lld | %.2f | %.3g | %.2g%% |\n", (long long)W, (long long)H,
                (long long)gw, (long long)gh, (long long)P, (long long)U, med, flops / (med / 1e3) / 1e12,
                100.0 * flops / (med / 1e3) / mm_rate);
    std::fflush(stdout);
  }
  std::printf("\n");
}

// The read hogs of `hog=N` variants (probe.h ReadHog): one per N, made when first needed, each reading its own 1 GiB;
// on making one, its rate alone (50 ms with nothing beside it) is printed, so the rate beside a step can be read
// against it, and the device copy's rate beside it (a kernel that is bound by DRAM: how much of DRAM the hog takes
// from such a kernel). n < 0: −n SMs held without reading (`idle=N`).
class Hogs {
 public:
  explicit Hogs(std::function<double()> copy_rate) : copy_rate_(std::move(copy_rate)) {}
  void start(int n) {
    if (n == 0) return;
#ifdef DS_HAVE_CUDA
    auto& h = hogs_[n];
    if (!h) {
      h = std::make_unique<cuda::ReadHog>(n > 0 ? n : -n, int64_t(1) << 30, n > 0);
      h->start();
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      alone_[n] = h->stop();
      h->start();
      copy_[n] = copy_rate_();
      beside_copy_[n] = h->stop();
    }
    h->start();
#else
    fail("--variants: hog=", n, " needs the CUDA backend");
#endif
  }
  // Bytes per second the hog on n SMs read since start(n) (0 for n = 0).
  double stop(int n) {
#ifdef DS_HAVE_CUDA
    if (n != 0) return hogs_.at(n)->stop();
#endif
    return 0;
  }
  double alone(int n) const { return alone_.count(n) ? alone_.at(n) : 0; }
  // The device copy's rate (read + write) beside the hog, and the hog's rate then.
  double copy(int n) const { return copy_.count(n) ? copy_.at(n) : 0; }
  double beside_copy(int n) const { return beside_copy_.count(n) ? beside_copy_.at(n) : 0; }

 private:
  std::function<double()> copy_rate_;
#ifdef DS_HAVE_CUDA
  std::map<int, std::unique_ptr<cuda::ReadHog>> hogs_;
#endif
  std::map<int, double> alone_, copy_, beside_copy_;
};

// --kernel-times: per-kernel device times of `steps` replays of the recorded step (CUPTI activity records,
// backend/cuda/kernel_times.h), from a recording made while collecting (a graph key of its own): each kernel's
// launches and microseconds per step, next to the step's median from the timed runs.
template <class Step>
std::string kernel_times_table(const std::string& what, TimingBackend& be, bool use_graph, int steps, double step_ms,
                               Step&& one, Hogs& hogs, int hog) {
  std::string head = str_cat("### Kernel times, ", what);
  if (!use_graph || be.stream_handle() == nullptr) return head + ": CUDA step graphs only (not measured)\n";
#ifdef DS_HAVE_CUDA
  std::string why;
  if (!cuda::kernel_times_start(&why)) return str_cat(head, ": ", why, "\n");
  const std::string suffix = be.key_suffix;
  be.key_suffix += "/kernel-times";
  for (int i = 0; i < 2; ++i) one(i);  // warm-up, then the recording (kernels of both dropped)
  cuda::kernel_times_reset();
  hogs.start(hog);  // after the recording: a graph is captured with nothing beside it
  for (int i = 0; i < steps; ++i) one(i);
  const double hog_bw = hogs.stop(hog);
  if (hog > 0) head += str_cat(" (hog on ", hog, " SMs reading ", str_fixed(hog_bw / 1e9, 0), " GB/s beside the steps)");
  if (hog < 0) head += str_cat(" (", -hog, " SMs held by an idle hog)");
  double span = 0;
  const std::vector<cuda::KernelTime> kt = cuda::kernel_times_stop(&span, "k_read_hog");
  be.key_suffix = suffix;
  double own = 0, total = 0;
  int64_t launches = 0;
  for (auto& k : kt) own += k.own_ns, total += k.total_ns, launches += k.launches;
  const double n = double(steps);
  auto pct = [&](double x) { return str_fixed(own > 0 ? 100.0 * x / own : 0.0, 1); };
  // Own time (kernel_times.h): each kernel's interval less what kernels that started earlier already cover, so a
  // kernel launched early under programmatic dependent launch is not charged for waiting on its predecessor.
  std::string t = str_cat(
      head, " (CUPTI, ", steps, " replayed steps: ", str_fixed(double(launches) / n, 1), " kernels per step; a kernel ran ",
      str_fixed(own / n / 1e6, 3), " ms of the ", str_fixed(span / n / 1e6, 3),
      " ms from first start to last end, against a ", str_fixed(step_ms, 3),
      " ms step timed without CUPTI; Σ start→end ", str_fixed(total / n / 1e6, 3),
      " ms, more than the span where a launch overlaps its predecessor)\n\n"
      "| kernel | launches/step | own µs/step | own µs/launch | start→end µs/launch | share |\n"
      "|---|---|---|---|---|---|\n");
  const size_t shown = std::min<size_t>(kt.size(), 40);
  for (size_t i = 0; i < shown; ++i) {
    const auto& k = kt[i];
    const double l = double(std::max<int64_t>(k.launches, 1));
    std::string name = k.name.size() > 90 ? k.name.substr(0, 87) + "..." : k.name;
    t += str_cat("| `", name, "` | ", str_fixed(double(k.launches) / n, 1), " | ", str_fixed(k.own_ns / n / 1e3, 1),
                 " | ", str_fixed(k.own_ns / l / 1e3, 2), " | ", str_fixed(k.total_ns / l / 1e3, 2), " | ",
                 pct(k.own_ns), "% |\n");
  }
  if (kt.size() > shown) {
    double rest = 0, rl = 0;
    for (size_t i = shown; i < kt.size(); ++i) rest += kt[i].own_ns, rl += double(kt[i].launches);
    t += str_cat("| (", kt.size() - shown, " more kernels) | ", str_fixed(rl / n, 1), " | ", str_fixed(rest / n / 1e3, 1),
                 " | | | ", pct(rest), "% |\n");
  }
  return t;
#else
  (void)steps, (void)step_ms, (void)one, (void)hogs, (void)hog;
  return head + ": this build has no CUDA backend\n";
#endif
}

// Submits `q` and steps `e` on this thread until the request ends, handing each of its deltas to `on`; wall ms from
// the submission to the end, the backend synchronised. A request that fails ends the bench (`what` names it).
double run_timed(runtime::Engine& e, model::Model& m, const std::shared_ptr<runtime::Request>& q, const char* what,
                 const std::function<void(const runtime::Delta&)>& on) {
  const auto t0 = Clock::now();
  e.submit(q);
  bool done = false;
  while (!done && e.step())
    while (auto d = q->out->pop(std::chrono::milliseconds(0))) {
      if (d->finish == runtime::FinishReason::Error) fail(what, ": ", d->error);
      on(*d);
      done = d->finish != runtime::FinishReason::None;
    }
  m.backend().synchronize();
  return secs_since(t0) * 1e3;
}

// A greedy request of `prompt` (max_tokens, ignore_eos, cache_salt `salt`) through `e`, timed by run_timed: its
// tokens appended to *out and its cached prompt tokens into *cached where given.
double run_greedy(runtime::Engine& e, model::Model& m, uint64_t id, const std::vector<int32_t>& prompt,
                  int64_t max_tokens, const char* what, std::vector<int32_t>* out, int64_t* cached,
                  const std::string& salt = "") {
  auto q = std::make_shared<runtime::Request>();
  q->id = id;
  q->cache_salt = salt;
  q->prompt = prompt;
  q->max_tokens = max_tokens;
  q->sampling.temperature = 0.f;
  q->ignore_eos = true;
  return run_timed(e, m, q, what, [&](const runtime::Delta& d) {
    if (out) out->insert(out->end(), d.tokens.begin(), d.tokens.end());
    if (d.finish != runtime::FinishReason::None && cached) *cached = d.cached_tokens;
  });
}

// ---- prefix caching through the engine ----
//
// Time to first token of a prompt of L tokens through runtime::Engine (one sequence, prefill chunks of `chunk`
// tokens): cold, then the same prompt again (it resumes from the checkpoint its first run left at the last block
// boundary before its last token) and the prompt continued by `extra` new tokens (a conversation's next turn:
// resumes at the same checkpoint). Then the next turn after an answer: a request generates `answer` tokens, and the
// prompt + that answer + `extra` new tokens resumes from the checkpoint the finished request left (all but the
// answer's last token), against the same next turn after another answer, which only the prompt's checkpoint covers
// (what was there before finished requests left checkpoints: the answer recomputed). A warm-up request of another
// prompt of the same length runs first.
void bench_prefix_cache(model::Model& m, const std::vector<int64_t>& lengths, int64_t chunk, int64_t checkpoints,
                        std::mt19937& rng) {
  const int64_t V = m.config().text.vocab_size, extra = 64, answer = 256;
  std::printf("## Prefix caching, time to first token (engine path; prefill chunks of %lld tokens; %lld checkpoints; "
              "one DeltaNet checkpoint = %.1f MiB)\n\n",
              (long long)chunk, (long long)checkpoints, double(m.state_slot_bytes()) / (1 << 20));
  std::printf("| prompt | cold TTFT ms | same prompt: cached tokens | TTFT ms | × cold | continued (+%lld): cached "
              "| TTFT ms | its cold TTFT ms | × cold | after a %lld-token answer (+%lld): cached | TTFT ms | after "
              "another answer: cached | TTFT ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
              (long long)extra, (long long)answer, (long long)extra);
  for (int64_t L : lengths) {
    runtime::EngineConfig ec;
    ec.max_num_seqs = 1;
    ec.max_num_batched_tokens = chunk;
    ec.max_model_len = L + answer + extra + 8;
    ec.prefix_cache_checkpoints = checkpoints;
    runtime::Engine e(m, ec);
    auto random_prompt = [&](int64_t n) { return random_tokens(n, V, rng); };
    uint64_t id = 0;
    // Time to the end of the request (max_tokens 1: to the first token); `out`: its tokens.
    auto ttft = [&](const std::vector<int32_t>& prompt, int64_t* cached, const char* salt = "", int64_t max_tokens = 1,
                    std::vector<int32_t>* out = nullptr) {
      return run_greedy(e, m, ++id, prompt, max_tokens, "bench --prefix-cache", out, cached, salt);
    };
    ttft(random_prompt(L), nullptr);  // warm-up (its checkpoint shares nothing with what follows)
    const auto prompt = random_prompt(L);
    auto longer = prompt;
    const auto more = random_prompt(extra);
    longer.insert(longer.end(), more.begin(), more.end());
    int64_t c_same = 0, c_cont = 0;
    const double cold = ttft(prompt, nullptr);
    const double same = ttft(prompt, &c_same);
    const double cont = ttft(longer, &c_cont);
    // The continued prompt cold, its own baseline: another cache_salt shares no checkpoint.
    const double cont_cold = ttft(longer, nullptr, "cold");
    // The next turn after an answer (random weights: the answer is whatever greedy gives), against the same after
    // an answer no request generated.
    std::vector<int32_t> ans;
    ttft(prompt, nullptr, "", answer, &ans);
    auto after = prompt, other = prompt;
    after.insert(after.end(), ans.begin(), ans.end());
    after.insert(after.end(), more.begin(), more.end());
    const auto fake = random_prompt(int64_t(ans.size()));
    other.insert(other.end(), fake.begin(), fake.end());
    other.insert(other.end(), more.begin(), more.end());
    int64_t c_after = 0, c_other = 0;
    const double t_after = ttft(after, &c_after), t_other = ttft(other, &c_other);
    std::printf("| %lld | %.1f | %lld | %.1f | %.1f | %lld | %.1f | %.1f | %.1f | %lld | %.1f | %lld | %.1f |\n",
                (long long)L, cold, (long long)c_same, same, cold / same, (long long)c_cont, cont, cont_cold,
                cont_cold / cont, (long long)c_after, t_after, (long long)c_other, t_other);
    std::fflush(stdout);
  }
  std::printf("\n");
}

// ---- prefix caching: the host tier ----
//
// Checkpoints in host memory (--cache-ram; EngineConfig::prefix_cache_host_checkpoints). First the copy of one
// DeltaNet state slot to pinned host memory and back (Model::slot_to_host / slot_from_host, best of 5, the backend
// synchronised around each). Then, per prompt length L, C conversations one after another, each a prompt of L
// tokens answered with `answer` tokens, on an engine with 2 device checkpoint slots, then every conversation's next
// turn (the prompt, its answer and `extra` new tokens, to the first token): with no host tier (only the last
// conversations' checkpoints are left) and with room for 32 checkpoints in host memory (every answer's is).
void bench_prefix_cache_host(model::Model& m, const std::vector<int64_t>& lengths, int64_t chunk, std::mt19937& rng) {
  const int64_t V = m.config().text.vocab_size, C = 6, answer = 32, extra = 64, device = 2, host = 32;
  {
    model::ModelCaches caches = m.alloc_caches(1, 16, 1, 0);
    m.backend().synchronize();
    const auto t_alloc = Clock::now();
    Tensor h = m.alloc_host_slot();  // what the first demotion into each host buffer pays once
    const double alloc_ms = secs_since(t_alloc) * 1e3;
    auto best = [&](bool to_host) {
      double ms = 1e30;
      for (int rep = 0; rep < 5; ++rep) {
        m.backend().synchronize();
        const auto t0 = Clock::now();
        if (to_host) m.slot_to_host(caches, 0, h);
        else m.slot_from_host(caches, 0, h);
        m.backend().synchronize();
        ms = std::min(ms, secs_since(t0) * 1e3);
      }
      return ms;
    };
    const double bytes = double(m.state_slot_bytes()), down = best(true), up = best(false);
    std::printf("## Prefix caching, the host tier (--cache-ram)\n\nOne DeltaNet state slot (%.1f MiB): host buffer "
                "made (pinned on CUDA) in %.1f ms; to host memory %.3f ms (%.1f GB/s), back %.3f ms (%.1f GB/s)\n\n",
                bytes / (1 << 20), alloc_ms, down, bytes / down * 1e-6, up, bytes / up * 1e-6);
  }
  std::printf("%lld conversations one after another (prompt of L tokens, a %lld-token answer), then each one's next "
              "turn (+%lld tokens) to its first token; %lld device checkpoint slots; prefill chunks of %lld tokens\n\n"
              "| prompt | host checkpoints | first turns, ms each (mean) | next turns: cached tokens (mean) | TTFT ms "
              "(mean) |\n|---|---|---|---|---|\n",
              (long long)C, (long long)answer, (long long)extra, (long long)device, (long long)chunk);
  for (int64_t L : lengths) {
    std::vector<std::vector<int32_t>> prompts;
    for (int64_t i = 0; i < C; ++i) prompts.push_back(random_tokens(L, V, rng));
    const std::vector<int32_t> more = random_tokens(extra, V, rng);
    for (int64_t h : {int64_t(0), host}) {
      runtime::EngineConfig ec;
      ec.max_num_seqs = 1;
      ec.max_num_batched_tokens = chunk;
      ec.max_model_len = L + answer + extra + 8;
      // KV blocks for every conversation's checkpoints and one running sequence (the server sizes the pool from
      // memory: millions of tokens on an 80 GB device for 35B-A3B), so only the state slots decide what is kept.
      ec.num_blocks = (C + 2) * ((ec.max_model_len + ec.block_size - 1) / ec.block_size);
      ec.prefix_cache_checkpoints = device;
      ec.prefix_cache_host_checkpoints = h;
      runtime::Engine e(m, ec);
      uint64_t id = 0;
      auto go = [&](const std::vector<int32_t>& prompt, int64_t max_tokens, std::vector<int32_t>* out, int64_t* cached) {
        return run_greedy(e, m, ++id, prompt, max_tokens, "bench --prefix-cache (host tier)", out, cached);
      };
      go(std::vector<int32_t>(prompts[0].rbegin(), prompts[0].rend()), 2, nullptr, nullptr);  // warm-up
      std::vector<std::vector<int32_t>> answers(static_cast<size_t>(C));
      double first = 0, next = 0, cached = 0;
      for (int64_t i = 0; i < C; ++i) first += go(prompts[size_t(i)], answer, &answers[size_t(i)], nullptr);
      for (int64_t i = 0; i < C; ++i) {
        auto turn = prompts[size_t(i)];
        turn.insert(turn.end(), answers[size_t(i)].begin(), answers[size_t(i)].end());
        turn.insert(turn.end(), more.begin(), more.end());
        int64_t c = 0;
        next += go(turn, 1, nullptr, &c);
        cached += double(c);
      }
      std::printf("| %lld | %lld | %.1f | %.0f | %.1f |\n", (long long)L, (long long)h, first / double(C),
                  cached / double(C), next / double(C));
      std::fflush(stdout);
    }
  }
  std::printf("\n");
}

// ---- prompt logprobs through the engine ----
//
// Time to first token of a prompt of L tokens through runtime::Engine (one sequence, prefill chunks of `chunk`
// tokens), without prompt logprobs and with them (k = 0, 5, 20 alternatives: the lm_head over every prompt row,
// Engine::kPromptLogprobRows at a time, and Backend::row_logprobs / row_ranks on them). A warm-up request first; each
// configuration twice, the faster kept.
void bench_prompt_logprobs(model::Model& m, const std::vector<int64_t>& lengths, int64_t chunk, std::mt19937& rng) {
  const int64_t V = m.config().text.vocab_size;
  std::printf("## Prompt logprobs, time to first token (engine path; prefill chunks of %lld tokens; lm_head over %lld "
              "rows at a time)\n\n| prompt | without ms | k = 0 ms | k = 5 ms | k = 20 ms | k = 20 extra ms per 1k rows |\n"
              "|---|---|---|---|---|---|\n",
              (long long)chunk, (long long)env_int("DS_PROMPT_LOGPROB_ROWS", runtime::Engine::kPromptLogprobRows));
  for (int64_t L : lengths) {
    runtime::EngineConfig ec;
    ec.max_num_seqs = 1;
    ec.max_num_batched_tokens = chunk;
    ec.max_model_len = L + 8;
    runtime::Engine e(m, ec);
    const std::vector<int32_t> prompt = random_tokens(L, V, rng);
    uint64_t id = 0;
    auto ttft = [&](int32_t k) {
      double best = 1e30;
      for (int rep = 0; rep < 2; ++rep) {
        auto q = std::make_shared<runtime::Request>();
        q->id = ++id;
        q->prompt = prompt;
        q->max_tokens = 1;
        q->sampling.temperature = 0.f;
        q->ignore_eos = true;
        q->prompt_logprobs = k;
        size_t got = 0;
        const double ms = run_timed(e, m, q, "bench --prompt-logprobs",
                                    [&](const runtime::Delta& d) { got += d.prompt_logprobs.size(); });
        if (k >= 0 && got != size_t(L - 1)) fail("bench --prompt-logprobs: ", got, " prompt logprobs for ", L, " tokens");
        best = std::min(best, ms);
      }
      return best;
    };
    ttft(-1);  // warm-up
    const double off = ttft(-1), k0 = ttft(0), k5 = ttft(5), k20 = ttft(20);
    std::printf("| %lld | %.1f | %.1f | %.1f | %.1f | %.2f |\n", (long long)L, off, k0, k5, k20,
                (k20 - off) / double(L - 1) * 1e3);
    std::fflush(stdout);
  }
  std::printf("\n");
}

// ---- masked rows through the engine (structured output's sampling path) ----
//
// B sequences of `ctx`-token random prompts decode greedily through runtime::Engine with none, one or all of them
// restricted by allowed_token_ids to a random half of the vocabulary (a mask as dense as a grammar's inside a JSON
// string; the mask's computation is not what is timed: allowed_token_ids' is a few µs). ms per decode step over
// `steps` steps once every sequence has its first token and a few steps more: masked rows sampled on the device (Backend::sample_rows with
// their masks, since session 45) against the host path (the step's [B, V] fp32 logits copied back and every row
// sampled there: what a step with a constrained row did before).
void bench_masked(model::Model& m, const std::vector<int64_t>& batches, int64_t ctx, int steps, std::mt19937& rng) {
  const int64_t V = m.config().text.vocab_size;
  constexpr int kWarm = 4;  // untimed decode steps first
  std::vector<std::string> phases;  // DS_SPEC_PROFILE=1
  std::vector<int32_t> half;
  for (int32_t id = 0; id < int32_t(V); ++id)
    if (rng() % 2) half.push_back(id);
  std::printf("## Masked rows, decode steps through the engine (context %lld, greedy, a mask of %zu of %lld ids)\n\n"
              "| batch | masked rows | device ms/step | host path ms/step | host / device |\n|---|---|---|---|---|\n",
              (long long)ctx, half.size(), (long long)V);
  for (int64_t B : batches) {
    std::vector<int64_t> counts = {0, 1};
    if (B > 1) counts.push_back(B);
    for (int64_t masked : counts) {
      double ms[2] = {0, 0};
      for (int device = 1; device >= 0; --device) {
        runtime::EngineConfig ec;
        ec.max_num_seqs = B;
        ec.max_num_batched_tokens = std::max<int64_t>(8192, ctx);
        ec.max_model_len = ctx + steps + kWarm + 16;
        ec.device_sampling = device == 1;
        runtime::Engine e(m, ec);
        std::vector<std::shared_ptr<runtime::Request>> qs;
        for (int64_t i = 0; i < B; ++i) {
          auto q = std::make_shared<runtime::Request>();
          q->id = uint64_t(i + 1);
          q->prompt = random_tokens(ctx, V, rng);
          q->max_tokens = steps + kWarm + 4;
          q->sampling.temperature = 0.f;
          q->ignore_eos = true;
          if (i < masked) q->sampling.allowed_ids = half;
          e.submit(q);
          qs.push_back(q);
        }
        // Prefill: until every sequence has sampled its first token (the first ones decode meanwhile, beside the
        // others' chunks).
        std::vector<bool> started(size_t(B), false);
        for (int64_t left = B; left > 0;) {
          if (!e.step()) fail("bench --masked: the engine stopped before every sequence sampled");
          for (int64_t i = 0; i < B; ++i)
            while (auto d = qs[size_t(i)]->out->pop(std::chrono::milliseconds(0))) {
              if (d->finish == runtime::FinishReason::Error) fail("bench --masked: ", d->error);
              if (!d->tokens.empty() && !started[size_t(i)]) {
                started[size_t(i)] = true;
                --left;
              }
            }
        }
        for (int i = 0; i < kWarm; ++i) e.step();  // the batch's step graph recorded, pools grown
        m.backend().synchronize();
        const runtime::EngineMetrics m0 = e.metrics();
        const auto t0 = Clock::now();
        for (int i = 0; i < steps; ++i) e.step();
        m.backend().synchronize();
        ms[device] = secs_since(t0) * 1e3 / steps;
        const runtime::EngineMetrics m1 = e.metrics();
        if (!m1.phase_ms.empty()) {  // DS_SPEC_PROFILE=1: ms per step of each phase of Engine::Impl::run
          phases.push_back(str_cat("| ", B, " | ", masked, " | ", device ? "device" : "host", " | ",
                                   str_fixed(ms[device], 3), " |", phase_cells(phase_delta(m0, m1), steps), " | ",
                                   m1.graph_steps_total - m0.graph_steps_total, " of ", m1.steps_total - m0.steps_total,
                                   " | ", m1.preemptions_total - m0.preemptions_total, " |"));
        }
        if (const int64_t on = m1.device_sample_steps_total - m0.device_sample_steps_total; device && on != steps)
          fail("bench --masked: ", on, " of ", steps, " steps sampled on the device");
        while (e.step()) {
        }
        for (auto& q : qs)
          while (auto d = q->out->pop(std::chrono::milliseconds(0)))
            if (d->finish == runtime::FinishReason::Error) fail("bench --masked: ", d->error);
      }
      std::printf("| %lld | %lld | %.3f | %.3f | %.1f |\n", (long long)B, (long long)masked, ms[1], ms[0], ms[0] / ms[1]);
      std::fflush(stdout);
    }
  }
  std::printf("\n");
  if (!phases.empty()) {
    std::printf("Step phases (DS_SPEC_PROFILE=1: wall ms per step, the device synchronised at every phase)\n\n"
                "| batch | masked rows | sampling | ms/step | phases | steps graphed | preemptions |\n"
                "|---|---|---|---|---|---|---|\n");
    for (auto& l : phases) std::printf("%s\n", l.c_str());
    std::printf("\n");
  }
}

}  // namespace

int cmd_bench(int argc, char** argv) {
  Args a(argc, argv, 2, {"random-weights", "bf16", "breakdown", "no-graph", "kernel-times"});
  a.only("bench", {"random-weights", "config", "config-override", "backend", "bf16", "batch", "context", "prefill",
                   "steps", "no-graph", "breakdown", "kernel-times", "prefill-chunk", "prefill-reps", "block-size",
                   "seed", "variants", "mamba-ssm-cache-dtype", "speculative", "oracle-p", "draft-vocab",
                   "draft-vocab-file", "spec-prompt", "spec-tokens", "spec-temperature", "vision", "prefix-cache", "prompt-logprobs", "masked"});
  if (!a.has("random-weights")) fail("bench: only --random-weights is supported (give --config config.json)");
  const std::string cfg_path = a.require("config");
  const std::string backend_name = a.get("backend", "cuda");
  const bool int4 = !a.has("bf16");
  const bool use_graph = !a.has("no-graph");
  // --speculative K1,K2,..: the engine-path speculative table (oracle p from --oracle-p, optionally a reduced draft
  // head of --draft-vocab N lowest ids or --draft-vocab-file); the decode/prefill tables then run only if asked for.
  const bool spec = a.has("speculative");
  // --vision WxH,..: the vision-tower table (bench_vision); like --speculative, the text tables then run only if
  // asked for, and without them no text weights are built.
  const bool vis = a.has("vision");
  const auto vsizes = vis ? vision_sizes(a.get("vision")) : std::vector<std::pair<int64_t, int64_t>>{};
  // --prefix-cache L1,L2,..: the engine-path prefix-caching table (bench_prefix_cache); the text tables then run
  // only if asked for.
  const bool pc = a.has("prefix-cache");
  const auto pc_lengths = pc ? int_list(a, "prefix-cache", "4096,32768") : std::vector<int64_t>{};
  // --prompt-logprobs L1,L2,..: the engine-path prompt-logprobs table (bench_prompt_logprobs); likewise.
  const bool plp = a.has("prompt-logprobs");
  const auto plp_lengths = plp ? int_list(a, "prompt-logprobs", "4096") : std::vector<int64_t>{};
  // --masked B1,B2,..: the engine-path masked-rows table (bench_masked) at --context's first value; likewise.
  const bool msk = a.has("masked");
  const auto msk_batches = msk ? int_list(a, "masked", "1,64") : std::vector<int64_t>{};
  const bool text_default = !spec && !vis && !pc && !plp && !msk;
  const auto batches = int_list(a, "batch", text_default ? "1,8,32,64,128" : "");
  const auto contexts = int_list(a, "context", text_default ? "1024,8192" : "");
  const auto prefills = int_list(a, "prefill", text_default ? "1024,4096,16384,32768" : "");
  SpecBench sb;
  if (spec) {
    sb.Ks = int_list(a, "speculative", "1,2,3,4");
    for (auto k : sb.Ks)
      if (k > 16) fail("--speculative: K must be in 1..16, got ", k);
    std::stringstream ps(a.get("oracle-p", "0.6,0.8,0.9"));
    std::string item;
    while (std::getline(ps, item, ',')) {
      if (item.empty()) continue;
      char* end = nullptr;
      const double p = std::strtod(item.c_str(), &end);
      if (end == item.c_str() || *end || !(p >= 0 && p <= 1)) fail("--oracle-p: expected probabilities in [0, 1], got '", item, "'");
      sb.ps.push_back(p);
    }
    sb.prompt = a.get_int("spec-prompt", 512);
    sb.gen = a.get_int("spec-tokens", 128);
    sb.temperature = float(std::stod(a.get("spec-temperature", "0")));
    if (!(sb.temperature >= 0.f)) fail("--spec-temperature must be >= 0, got ", a.get("spec-temperature"));
    if (sb.prompt < 1 || sb.gen < 2) fail("--spec-prompt must be >= 1 and --spec-tokens >= 2");
  }
  const int steps = int(a.get_int("steps", 10));
  const int prefill_reps = int(a.get_int("prefill-reps", 3));
  DS_CHECK(prefill_reps >= 1, "--prefill-reps must be at least 1");
  const int64_t bs = a.get_int("block-size", 16);
  const int64_t chunk = a.get_int("prefill-chunk", 0);  // 0: whole prompt in one forward
  const uint64_t seed = uint64_t(a.get_int("seed", 0));
  // --variants "name:opt,opt;name2:..." runs decode and prefill once per variant (one weight build); an opt is
  // `no-graph`, `ssm-dtype=float32|bfloat16` (the DeltaNet state's dtype: the variant runs on caches of its own), or
  // VAR=VALUE, an environment switch set for that variant (e.g. DS_CUDA_NO_GROUPED_MOE=1).
  struct Variant {
    std::string name;
    bool graph = true;
    std::vector<std::pair<std::string, std::string>> env;
    std::string ssm;  // empty: --mamba-ssm-cache-dtype's
    int hog = 0;      // hog=N: decode steps timed beside a read hog on N SMs (Hogs, probe.h ReadHog); idle=N: −N
  };
  std::vector<Variant> variants;
  // hog=N → N, idle=N → −N (N ≥ 1 SMs).
  auto hog_sms = [](const std::string& opt) {
    const size_t eq = opt.find('=');
    const std::string key = opt.substr(0, eq), val = opt.substr(eq + 1);
    int n = 0;
    try {
      n = std::stoi(val);
    } catch (...) {
      fail("--variants: ", key, "= expects a number of SMs, got '", val, "'");
    }
    if (n < 1) fail("--variants: ", key, "= expects at least 1 SM, got ", n);
    return key == "hog" ? n : -n;
  };
  {
    std::stringstream vs(a.get("variants", ""));
    std::string item;
    while (std::getline(vs, item, ';')) {
      if (item.empty()) continue;
      Variant v;
      const auto colon = item.find(':');
      v.name = item.substr(0, colon);
      v.graph = use_graph;
      std::stringstream os(colon == std::string::npos ? "" : item.substr(colon + 1));
      std::string opt;
      while (std::getline(os, opt, ',')) {
        if (opt.empty()) continue;
        if (opt == "no-graph")
          v.graph = false;
        else if (opt == "graph")
          v.graph = true;
        else if (opt.rfind("ssm-dtype=", 0) == 0)
          v.ssm = opt.substr(10);
        else if (opt.rfind("hog=", 0) == 0 || opt.rfind("idle=", 0) == 0)
          v.hog = hog_sms(opt);
        else if (opt.find('=') != std::string::npos)
          v.env.push_back({opt.substr(0, opt.find('=')), opt.substr(opt.find('=') + 1)});
        else
          fail("--variants: option '", opt, "' is neither no-graph, graph, ssm-dtype=D, hog=N, idle=N nor VAR=VALUE");
      }
      variants.push_back(v);
    }
    if (variants.empty()) variants.push_back(Variant{use_graph ? "graph" : "eager", use_graph, {}, {}, 0});
    for (const Variant& v : variants)
      if (v.hog != 0 && backend_name != "cuda")
        fail("--variants: ", v.name, ": ", v.hog > 0 ? "hog=" : "idle=", std::abs(v.hog), " needs --backend cuda, got ",
             backend_name);
  }
  DS_CHECK(steps >= 1, "--steps must be at least 1");

  // --config-override JSON: merged into the config (RFC 7386 merge patch) before parsing, e.g. to run a config's
  // architecture at a tiny shape on the CPU.
  io::ModelConfig cfg;
  if (a.has("config-override")) {
    namespace fs = std::filesystem;
    const std::string file = fs::is_directory(cfg_path) ? cfg_path + "/config.json" : cfg_path;
    std::ifstream f(file);
    if (!f) fail("--config: cannot read '", file, "'");
    auto j = nlohmann::json::parse(f, nullptr, false);
    auto patch = nlohmann::json::parse(a.get("config-override"), nullptr, false);
    if (j.is_discarded() || patch.is_discarded() || !patch.is_object())
      fail("--config-override: expected a JSON object to merge into '", file, "'");
    j.merge_patch(patch);
    cfg = io::parse_model_config(j.dump(), "", file + " with --config-override");
  } else {
    cfg = io::load_model_config(cfg_path);
  }
  const auto& t = cfg.text;
  auto be_owned = make_backend(backend_name);
  TimingBackend be(*be_owned, t.vocab_size);
  const WeightBytes wb = weight_bytes(cfg, int4);

  // ---- device ceilings: copy bandwidth (read + write) and bf16 matrix rate ----
  std::string device = backend_name;
#ifdef DS_HAVE_CUDA
  if (backend_name == "cuda") {
    cudaDeviceProp p{};
    int dev = 0;
    cudaGetDevice(&dev);
    if (cudaGetDeviceProperties(&p, dev) == cudaSuccess) device = p.name;
  }
#endif
  const bool gpu = backend_name != "cpu";
  double copy_bw = 0, mm_rate = 0;
  // The device copy's rate: bytes read + written per second, the best of 5 copies of 1 GiB (CPU: 32 MiB).
  auto copy_rate = [&be, gpu] {
    const int64_t n = gpu ? (int64_t(1) << 29) : (int64_t(1) << 24);  // bf16 elements
    Tensor src = be.alloc(DType::BF16, {n}), dst = be.alloc(DType::BF16, {n});
    be.copy(dst, src);
    be.synchronize();
    return 2.0 * double(n) * 2 / sorted_secs(5, [&](int) {
             be.copy(dst, src);
             be.synchronize();
           }).front();
  };
  {
    copy_bw = copy_rate();
    const int64_t M = gpu ? 8192 : 256;
    std::vector<uint16_t> wh(size_t(M * M));
    std::mt19937 rng(1);
    for (auto& x : wh) x = f32_to_bf16(float(rng() % 2001) / 1000.f - 1.f);
    LinearSource ls;
    ls.N = ls.K = M;
    ls.data = wh.data();
    Linear W = be.make_linear({ls});
    std::vector<float> xh(size_t(M * M));
    for (auto& x : xh) x = float(rng() % 2001) / 1000.f - 1.f;
    Tensor x = be.upload_f32(xh, {M, M}, be.act_dtype()), y = be.alloc(be.act_dtype(), {M, M});
    be.linear(x, W, y);
    be.synchronize();
    mm_rate = 2.0 * double(M) * M * M / sorted_secs(5, [&](int) {
                be.linear(x, W, y);
                be.synchronize();
              }).front();
  }

  if (vis && !spec && (batches.empty() || contexts.empty()) && prefills.empty()) {  // the tower only
    std::printf("# deltaserve bench: %s, vision tower, backend %s (%s)\n\n", cfg_path.c_str(), backend_name.c_str(),
                device.c_str());
    std::printf("Device ceilings (measured): copy %.0f GB/s (read + write), bf16 matmul %.1f TFLOP/s.\n\n",
                copy_bw / 1e9, mm_rate / 1e12);
    bench_vision(cfg, *be_owned, vsizes, steps, seed, mm_rate);
    return 0;
  }

  // ---- weights ----
  [[maybe_unused]] size_t free0 = 0, total_mem = 0;  // device memory (CUDA builds)
#ifdef DS_HAVE_CUDA
  if (backend_name == "cuda") cudaMemGetInfo(&free0, &total_mem);
#endif
  auto t0 = Clock::now();
  model::LoadOptions lo;
  lo.mtp = spec;
  lo.vision = false;
  lo.ssm_state_dtype = a.get("mamba-ssm-cache-dtype", "auto");
  const DType ssm_default = model::Model::ssm_dtype_from_name(lo.ssm_state_dtype, model::Model::config_ssm_dtype(cfg),
                                                              "--mamba-ssm-cache-dtype");
  for (const Variant& v : variants)
    (void)model::Model::ssm_dtype_from_name(v.ssm, ssm_default, str_cat("--variants ", v.name, ": ssm-dtype"));
  if (spec && (a.has("draft-vocab") || a.has("draft-vocab-file"))) {
    lo.draft_vocab = runtime::draft_vocab_ids(a.get_int("draft-vocab", 0), a.get("draft-vocab-file", ""), t.vocab_size);
    sb.draft_vocab = int64_t(lo.draft_vocab.size());
  }
  sb.graph = use_graph;
  sb.seed = seed;
  if (a.has("variants"))
    for (const Variant& v : variants) sb.variants.push_back({v.name, v.env});
  auto m = model::Model::load_random(cfg, be, seed, int4, lo);
  be.synchronize();
  const double load_s = secs_since(t0);
  double weights_dev = 0;
#ifdef DS_HAVE_CUDA
  if (backend_name == "cuda") {
    size_t free1 = 0;
    cudaMemGetInfo(&free1, &total_mem);
    weights_dev = double(free0) - double(free1);
  }
#endif

  // ---- caches: enough for the largest decode batch × context and the longest prompt ----
  const int64_t maxB = batches.empty() ? 1 : *std::max_element(batches.begin(), batches.end());
  const int64_t maxC = contexts.empty() ? 0 : *std::max_element(contexts.begin(), contexts.end());
  const int64_t maxP = prefills.empty() ? 0 : *std::max_element(prefills.begin(), prefills.end());
  const int64_t per_seq_blocks = (maxC + steps + 8 + bs - 1) / bs;
  const int64_t num_blocks = std::max<int64_t>({maxB * per_seq_blocks, (maxP + bs - 1) / bs, 1});
  const int64_t num_slots = std::max<int64_t>(maxB, 1);
  // One cache set per DeltaNet state dtype a variant asks for (ssm-dtype=), made when first needed.
  std::map<DType, model::ModelCaches> cache_sets;
  auto caches_for = [&](const std::string& ssm) -> model::ModelCaches& {
    const DType dt = model::Model::ssm_dtype_from_name(ssm, ssm_default, "ssm-dtype");
    auto it = cache_sets.find(dt);
    if (it == cache_sets.end()) {
      m->set_ssm_state_dtype(dt);
      it = cache_sets.emplace(dt, m->alloc_caches(num_blocks, bs, num_slots)).first;
    }
    return it->second;
  };
  model::ModelCaches* cp = &caches_for("");
  int64_t n_attn = 0, n_lin = 0;
  for (auto lt : t.layer_types) (lt == io::LayerType::FullAttention ? n_attn : n_lin) += 1;
  const double kv_token_bytes = double(n_attn) * 2 * double(t.num_kv_heads * t.head_dim) * 2;  // K and V, bf16
  const double state_slot_bytes = double(m->state_slot_bytes());
  // The recurrent state's bytes per sequence (read and written once per step), of the current variant's dtype.
  auto ssm_slot_bytes = [&] {
    DType dt = DType::F32;
    for (const auto& l : cp->state)
      if (l.ssm.numel() > 0) dt = l.ssm.dtype;
    return double(n_lin) * double(dtype_size(dt)) * double(t.lin_num_v_heads * t.lin_k_head_dim * t.lin_v_head_dim);
  };
  be.synchronize();

  std::printf("# deltaserve bench: %s, %s weights (random, seed %llu), backend %s (%s)\n\n", cfg_path.c_str(),
              int4 ? "int4 W4A16 (seed recipe)" : "bf16", (unsigned long long)seed, backend_name.c_str(),
              device.c_str());
  std::printf("Device ceilings (measured): copy %.0f GB/s (read + write), bf16 matmul %.1f TFLOP/s.\n\n", copy_bw / 1e9,
              mm_rate / 1e12);
  std::printf("| memory | bytes |\n|---|---|\n");
  std::printf("| weights read per token (dense %s, lm_head %s, one expert %s) | %s |\n", human_bytes(wb.dense).c_str(),
              human_bytes(wb.lm_head).c_str(), human_bytes(wb.expert).c_str(),
              human_bytes(wb.dense + wb.lm_head + double(t.num_layers) * t.num_experts_per_tok * wb.expert).c_str());
  if (weights_dev > 0)
    std::printf("| weights on device (measured, %.1f s to build) | %s |\n", load_s, human_bytes(weights_dev).c_str());
  std::printf("| KV pool: %lld blocks × %lld tokens × %s/token | %s |\n", (long long)num_blocks, (long long)bs,
              human_bytes(kv_token_bytes).c_str(), human_bytes(kv_token_bytes * double(num_blocks * bs)).c_str());
  std::printf("| DeltaNet state (%s recurrent state): %lld slots × %s | %s |\n\n",
              ssm_default == DType::BF16 ? "bf16" : "fp32", (long long)num_slots, human_bytes(state_slot_bytes).c_str(),
              human_bytes(state_slot_bytes * double(num_slots)).c_str());

  std::mt19937 rng(seed + 17);
  auto random_ids = [&](int64_t n) { return random_tokens(n, t.vocab_size, rng); };

  // ---- decode ----
  struct Breakdown {
    std::map<std::string, double> ms;
    double step_ms = 0, events_step_ms = 0;
    bool events = false;
  };
  std::vector<std::pair<std::string, Breakdown>> breakdowns;
  std::vector<std::string> kernel_tables;  // --kernel-times, printed after the decode table
  // A step whose logits are not finite (a broken kernel, or a probe variant that reads garbage) leaves NaN in the
  // DeltaNet state and the KV cache, which the variants after it share: NaN hidden states route every token to the
  // same few experts, and those steps time faster than any real one (session 28: a probe's later variants read
  // 9.5 → 7.2 ms at batch 64). Said under the row, never silently timed.
  auto warn_nonfinite = [&](const Tensor& logits, const std::string& what) {
    const std::vector<float> v = be.to_host_f32(logits);
    const int64_t bad = std::count_if(v.begin(), v.end(), [](float x) { return !std::isfinite(x); });
    if (bad > 0)
      std::printf("\n**warning: %s: %lld of %lld logits are not finite; this step's numbers and those of every later "
                  "variant sharing its caches do not time a real model state**\n\n",
                  what.c_str(), (long long)bad, (long long)v.size());
  };
  auto set_env = [](const Variant& v, bool on) {
    for (auto& [k, val] : v.env) {
      if (on)
        setenv(k.c_str(), val.c_str(), 1);
      else
        unsetenv(k.c_str());
    }
  };
  if (!batches.empty() && !contexts.empty()) {
    std::printf("## Decode (median of %d steps)\n\n", steps);
    std::printf(
        "| variant | batch | context | ms/step | tok/s | distinct experts/layer | bytes/step | GB/s | of copy BW |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|\n");
    // A decode point: B sequences holding ctx tokens, and one step of them (i varies the lengths a little).
    struct Point {
      BatchMeta b;
      std::vector<int32_t> rows;
      double touched = 0, bytes = 0;
      Tensor logits;  // the last step's
    };
    auto make_point = [&](int64_t ctx, int64_t B) {
      Point pt;
      const int64_t nblk = (ctx + steps + 8 + bs - 1) / bs;
      DS_CHECK(nblk <= per_seq_blocks, "internal: block budget");
      pt.b = BatchMeta::decode_step(B, ctx, nblk, per_seq_blocks);
      for (int64_t s = 0; s < B; ++s) pt.rows.push_back(int32_t(s));
      pt.b.tokens = random_ids(B);
      // Distinct experts the step's routing touches (random weights route near-uniformly): measured would need
      // the ids; the expectation under uniform routing is E·(1 − (1 − k/E)^B).
      const double E = double(t.num_experts), K = double(t.num_experts_per_tok);
      pt.touched = t.moe ? E * (1.0 - std::pow(1.0 - K / E, double(B))) : 0;
      pt.bytes = wb.dense + wb.lm_head + double(B) * wb.embed_row + double(t.num_layers) * pt.touched * wb.expert;
      pt.bytes += double(B) * 2.0 * ssm_slot_bytes() + double(B) * double(ctx) * kv_token_bytes;
      return pt;
    };
    auto step_of = [&](Point& pt, int64_t ctx, int64_t B, bool use_graph) {
      return [&pt, &random_ids, &m, cp, &be, ctx, B, use_graph](int i) {
        BatchMeta& b = pt.b;
        for (int64_t s = 0; s < B; ++s) {
          b.seqs[s].ctx_len = ctx + (i % 4);  // attention cost depends on length only
          b.positions[s] = b.positions[B + s] = b.positions[2 * B + s] = int32_t(b.seqs[s].ctx_len);
        }
        b.tokens = random_ids(B);
        pt.logits = use_graph ? m->forward_graphed(b, *cp, pt.rows) : m->forward(b, *cp, pt.rows);
        be.synchronize();
      };
    };
    // Every (variant, context, batch) point in table order, the variant's switches set around it.
    auto each_point = [&](auto&& f) {
      for (size_t vi = 0; vi < variants.size(); ++vi) {
        const Variant& var = variants[vi];
        set_env(var, true);
        cp = &caches_for(var.ssm);
        be.key_suffix = "/" + var.name;
        for (int64_t ctx : contexts)
          for (int64_t B : batches) f(vi, var, ctx, B);
        set_env(var, false);
      }
    };
    Hogs hogs(copy_rate);
    std::map<std::tuple<size_t, int64_t, int64_t>, double> medians;  // (variant, context, batch) → ms/step
    each_point([&](size_t vi, const Variant& var, int64_t ctx, int64_t B) {
      const bool use_graph = var.graph;
      Point pt = make_point(ctx, B);
      BatchMeta& b = pt.b;
      const std::vector<int32_t>& rows = pt.rows;
      const double touched = pt.touched, bytes = pt.bytes;
      auto one = step_of(pt, ctx, B, use_graph);
      for (int i = 0; i < 3; ++i) one(i);
      hogs.start(var.hog);  // after the warm-up (and the graph's recording)
      const std::vector<double> ts = sorted_secs(steps, one);
      const double hog_bw = hogs.stop(var.hog);
      const double med = ts[ts.size() / 2] * 1e3;
      std::printf("| %s | %lld | %lld | %.3f | %.1f | %.0f | %s | %.0f | %.1f%% |\n", var.name.c_str(),
                  (long long)B, (long long)ctx, med, double(B) * 1e3 / med, touched, human_bytes(bytes).c_str(),
                  bytes / (med / 1e3) / 1e9, 100.0 * bytes / (med / 1e3) / copy_bw);
      if (var.hog < 0)
        std::printf("| ↳ %s: %d SMs held by an idle hog during these steps | | | | | | | | |\n", var.name.c_str(),
                    -var.hog);
      if (var.hog > 0)
        std::printf("| ↳ %s: a read hog on %d SMs took %.0f GB/s beside these steps (%.0f GB/s alone; beside the device "
                    "copy %.0f GB/s, the copy %.0f GB/s) | | | | | | | | |\n",
                    var.name.c_str(), var.hog, hog_bw / 1e9, hogs.alone(var.hog) / 1e9, hogs.beside_copy(var.hog) / 1e9,
                    hogs.copy(var.hog) / 1e9);
      warn_nonfinite(pt.logits, str_cat("variant ", var.name, ", batch ", B, ", context ", ctx));
      std::fflush(stdout);
      if (a.has("breakdown")) {  // every batch and context (before session 10: the first context only)
        // With graphs on a CUDA backend: device events around each op inside a recorded step (device time
        // per family; the rest of the step is gaps between kernels). Else: synchronise around each op.
        Breakdown bd;
        be.events = use_graph && be.stream_handle() != nullptr;
        be.on = true;
        const int reps = 3;
        for (int i = 0; i < 2 + reps; ++i) {  // warm-up and record, then timed replays
          be.ms.clear();
          be.step_ms = 0;
          Tensor logits = be.events ? m->forward_graphed(b, *cp, rows) : m->forward(b, *cp, rows);
          be.synchronize();
          if (be.events) be.collect();
          if (i >= 2)
            for (auto& [k, v] : be.ms) bd.ms[k] += v / reps;
          if (i >= 2) bd.events_step_ms += be.step_ms / reps;
        }
        be.on = false;
        bd.events = be.events;
        be.events = false;
        bd.step_ms = med;
        breakdowns.push_back({str_cat(var.name, ", batch ", B, ", context ", ctx), bd});
      }
      medians[{vi, ctx, B}] = med;
    });
    std::printf("\n");
    // --kernel-times after every point is timed: once CUPTI has collected in a process, later batch-1 steps of the
    // same code timed ~0.2 ms (~9%) slower on the H200 (session 16, run 5), so no step is timed after it.
    if (a.has("kernel-times"))
      each_point([&](size_t vi, const Variant& var, int64_t ctx, int64_t B) {
        Point pt = make_point(ctx, B);
        kernel_tables.push_back(kernel_times_table(str_cat(var.name, ", batch ", B, ", context ", ctx), be, var.graph,
                                                   steps, medians[{vi, ctx, B}], step_of(pt, ctx, B, var.graph), hogs,
                                                   var.hog));
      });
  }
  for (auto& tab : kernel_tables) std::printf("%s\n", tab.c_str());
  for (auto& [what, bd] : breakdowns) {
    double sum = 0;
    for (auto& [k, v] : bd.ms) sum += v;
    if (bd.events)
      std::printf(
          "### Device time by kernel family, %s (events around each op in a recorded step; first to last "
          "event %.3f ms, step %.3f ms)\n\n",
          what.c_str(), bd.events_step_ms, bd.step_ms);
    else
      std::printf("### Time by kernel family, %s (eager, synchronised around each op; sum %.3f ms vs %.3f ms/step)\n\n",
                  what.c_str(), sum, bd.step_ms);
    std::printf("| family | ms | share |\n|---|---|---|\n");
    std::vector<std::pair<double, std::string>> order;
    for (auto& [k, v] : bd.ms) order.push_back({v, k});
    if (bd.events && bd.events_step_ms > sum) {
      order.push_back({bd.events_step_ms - sum, "gaps between ops (launch ramp/tail, event nodes)"});
      sum = bd.events_step_ms;
    }
    std::sort(order.rbegin(), order.rend());
    for (auto& [v, k] : order) std::printf("| %s | %.3f | %.1f%% |\n", k.c_str(), v, 100.0 * v / sum);
    std::printf("\n");
  }

  // ---- prefill: one sequence, whole prompt (or --prefill-chunk pieces), time to the first token's logits ----
  if (!prefills.empty()) {
    std::vector<std::string> prefill_breakdowns;
    std::printf("## Prefill (one sequence from empty caches; TTFT = all chunks + last-row logits)\n\n");
    std::printf(
        "| variant | prompt | chunk | TTFT ms | tok/s | TFLOP/s | of matmul peak | first run ms |\n"
        "|---|---|---|---|---|---|---|---|\n");
    for (const Variant& var : variants) {
      set_env(var, true);
      cp = &caches_for(var.ssm);
      bool warmed = false;
      for (int64_t P : prefills) {
        const int64_t ch = chunk > 0 ? std::min(chunk, P) : P;
        auto run = [&](int64_t len) {
          m->reset_slot(*cp, 0);
          auto toks = random_ids(len);
          Tensor logits;
          for (int64_t s0 = 0; s0 < len; s0 += ch) {
            const int64_t n = std::min(ch, len - s0);
            std::vector<int32_t> blocks(size_t((s0 + n + bs - 1) / bs));
            std::iota(blocks.begin(), blocks.end(), 0);
            BatchMeta b = BatchMeta::one_sequence(n, s0, 0, std::move(blocks));
            b.tokens.assign(toks.begin() + s0, toks.begin() + s0 + n);
            logits = m->forward(b, *cp, {int32_t(n - 1)});
          }
          be.synchronize();
        };
        // Warm-up at the measured length (the first prompt of a size allocates its scratch and picks its cuBLAS
        // algorithms: ~4 ms more at 4k; reported as "first run ms", meaningful for the first variant only), then the
        // median of --prefill-reps runs.
        if (!warmed) {
          run(std::min<int64_t>(P, 512));
          warmed = true;
        }
        const auto tw = Clock::now();
        run(P);
        const double first = secs_since(tw);  // the first run at this length (scratch growth, cuBLAS choices)
        const std::vector<double> runs = sorted_secs(prefill_reps, [&](int) { run(P); });
        const double s = runs[runs.size() / 2];
        // FLOPs: 2 per active parameter per token, plus causal attention (QKᵀ and PV) over the prompt.
        const double attn = double(n_attn) * 4.0 * double(t.num_heads * t.head_dim) * double(P) * double(P) / 2;
        const double flops = 2.0 * wb.active_params * double(P) + attn;
        std::printf("| %s | %lld | %lld | %.1f | %.0f | %.3g | %.2g%% | %.1f |\n", var.name.c_str(), (long long)P,
                    (long long)ch, s * 1e3, double(P) / s, flops / s / 1e12, 100.0 * flops / s / mm_rate,
                    first * 1e3);
        std::fflush(stdout);
        if (a.has("breakdown")) {  // per op, synchronised around each (eager prefill: no graph to record)
          be.ms.clear();
          be.calls.clear();
          be.on = be.per_op = true;
          auto t2 = Clock::now();
          run(P);
          const double tot = secs_since(t2) * 1e3;
          be.on = be.per_op = false;
          std::vector<std::pair<double, std::string>> order;
          for (auto& [k, v] : be.ms) order.push_back({v, k});
          std::sort(order.rbegin(), order.rend());
          std::string tab = str_cat("### Prefill ", P, " (chunk ", ch, ") by op, ", var.name,
                                    " (synchronised around each op; total ", tot, " ms)\n\n| op | ms | calls | share |\n|---|---|---|---|\n");
          for (auto& [v, k] : order) {
            char line[256];
            std::snprintf(line, sizeof line, "| %s | %.2f | %lld | %.1f%% |\n", k.c_str(), v, (long long)be.calls[k],
                          100.0 * v / tot);
            tab += line;
          }
          prefill_breakdowns.push_back(tab);
        }
      }
      set_env(var, false);
    }
    std::printf("\n");
    for (auto& tab : prefill_breakdowns) std::printf("%s\n", tab.c_str());
  }

  if (spec) bench_speculative(*m, sb, rng);
  if (pc) bench_prefix_cache(*m, pc_lengths, chunk > 0 ? chunk : 8192, 4, rng);
  if (pc) bench_prefix_cache_host(*m, pc_lengths, chunk > 0 ? chunk : 8192, rng);
  if (plp) bench_prompt_logprobs(*m, plp_lengths, chunk > 0 ? chunk : 2048, rng);
  if (msk) bench_masked(*m, msk_batches, int_list(a, "context", "1024")[0], steps, rng);
  if (vis) bench_vision(cfg, *be_owned, vsizes, steps, seed, mm_rate);
  return 0;
}

}  // namespace ds::cli
