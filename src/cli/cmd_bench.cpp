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
#include <map>
#include <random>
#include <sstream>

#include "backend/ops.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "io/config.h"
#include "io/schema.h"
#include "model/model.h"

#ifdef DS_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace ds::cli {
namespace {

using Clock = std::chrono::steady_clock;
double secs_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

std::vector<int64_t> int_list(const Args& a, const std::string& name, const std::string& def) {
  std::vector<int64_t> v;
  std::stringstream ss(a.get(name, def));
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
        bytes = params / 2 + params / 128 * 5;
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

// A backend that forwards every op and times it with a synchronisation on each side (--breakdown): per-op
// time includes one launch latency, so its sum exceeds an unsynchronised step.
class TimingBackend final : public Backend {
 public:
  TimingBackend(Backend& in, int64_t vocab) : in_(in), vocab_(vocab) {}
  bool on = false;
  std::map<std::string, double> ms;
  std::map<std::string, int64_t> calls;

  std::string name() const override { return in_.name(); }
  DType act_dtype() const override { return in_.act_dtype(); }
  Tensor alloc(DType dt, std::vector<int64_t> shape) override { return in_.alloc(dt, std::move(shape)); }
  Tensor upload_f32(const std::vector<float>& v, std::vector<int64_t> shape, DType dt) override {
    return in_.upload_f32(v, std::move(shape), dt);
  }
  std::vector<float> to_host_f32(const Tensor& t) override { return in_.to_host_f32(t); }
  void zero(Tensor& t) override { in_.zero(t); }
  void copy(Tensor& dst, const Tensor& src) override { in_.copy(dst, src); }
  void synchronize() override { in_.synchronize(); }
  Linear make_linear(const std::vector<LinearSource>& parts) override { return in_.make_linear(parts); }
  Experts make_experts(const std::vector<std::vector<LinearSource>>& gu, const std::vector<LinearSource>& d) override {
    return in_.make_experts(gu, d);
  }
  void prepare_batch(BatchMeta& b) override { in_.prepare_batch(b); }
  void step_begin() override { in_.step_begin(); }
  void step_end() override { in_.step_end(); }
  void* stream_handle() const override { return in_.stream_handle(); }
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

  template <class F>
  void timed(const char* family, F&& f) {
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
    ms[family] += secs_since(t0) * 1e3;
    calls[family] += 1;
  }
  void embed(const Tensor& table, const BatchMeta& b, Tensor& out) override {
    timed("other", [&] { in_.embed(table, b, out); });
  }
  void rmsnorm(const Tensor& x, const Tensor& w, float eps, Tensor& y) override {
    timed("other", [&] { in_.rmsnorm(x, w, eps, y); });
  }
  void add_inplace(Tensor& x, const Tensor& y) override {
    timed("other", [&] { in_.add_inplace(x, y); });
  }
  void linear(const Tensor& x, const Linear& w, Tensor& y) override {
    const char* fam = w->int4 ? "int4 linears" : w->N == vocab_ ? "lm_head" : "bf16 linears";
    timed(fam, [&] { in_.linear(x, w, y); });
  }
  void silu_mul(const Tensor& gu, Tensor& y) override {
    timed("other", [&] { in_.silu_mul(gu, y); });
  }
  void qk_norm_rope(const Tensor& qg, Tensor& k, const Tensor& qn, const Tensor& kn, float eps, const RopeParams& r,
                    const BatchMeta& b, Tensor& q, Tensor& gate) override {
    timed("attention", [&] { in_.qk_norm_rope(qg, k, qn, kn, eps, r, b, q, gate); });
  }
  void kv_cache_write(KvLayer& kv, const Tensor& k, const Tensor& v, const BatchMeta& b) override {
    timed("attention", [&] { in_.kv_cache_write(kv, k, v, b); });
  }
  void attention(const Tensor& q, const KvLayer& kv, const BatchMeta& b, Tensor& o) override {
    timed("attention", [&] { in_.attention(q, kv, b, o); });
  }
  void sigmoid_gate_mul(Tensor& x, const Tensor& gate) override {
    timed("attention", [&] { in_.sigmoid_gate_mul(x, gate); });
  }
  void conv1d_causal(const Tensor& m, const Tensor& w, StateLayer& st, const BatchMeta& b, Tensor& out) override {
    timed("DeltaNet", [&] { in_.conv1d_causal(m, w, st, b, out); });
  }
  void gated_delta_rule(const Tensor& qkv, const Tensor& ba, const Tensor& A_log, const Tensor& dt_bias, int64_t Hk,
                        int64_t Hv, int64_t Dk, int64_t Dv, StateLayer& st, const BatchMeta& b, Tensor& o) override {
    timed("DeltaNet", [&] { in_.gated_delta_rule(qkv, ba, A_log, dt_bias, Hk, Hv, Dk, Dv, st, b, o); });
  }
  void gated_rmsnorm(const Tensor& o, const Tensor& z, const Tensor& w, float eps, Tensor& y) override {
    timed("DeltaNet", [&] { in_.gated_rmsnorm(o, z, w, eps, y); });
  }
  void moe_route(const Tensor& l, int64_t k, Tensor& ids, Tensor& w) override {
    timed("MoE routed", [&] { in_.moe_route(l, k, ids, w); });
  }
  void moe_experts(const Tensor& x, const Experts& w, const Tensor& ids, const Tensor& wts, Tensor& y) override {
    timed("MoE routed", [&] { in_.moe_experts(x, w, ids, wts, y); });
  }
  void sigmoid_scale_add(Tensor& y, const Tensor& s, const Tensor& g) override {
    timed("other", [&] { in_.sigmoid_scale_add(y, s, g); });
  }
  void gather_rows(const Tensor& x, const std::vector<int32_t>& rows, Tensor& out) override {
    timed("other", [&] { in_.gather_rows(x, rows, out); });
  }

 private:
  Backend& in_;
  int64_t vocab_;
  int n_ = 0, recorded_ = 0;
  std::vector<std::string> fam_;
#ifdef DS_HAVE_CUDA
  std::vector<cudaEvent_t> ev_;
#endif
};

std::string human_bytes(double b) {
  char buf[64];
  if (b >= 1e9)
    std::snprintf(buf, sizeof buf, "%.2f GB", b / 1e9);
  else
    std::snprintf(buf, sizeof buf, "%.1f MB", b / 1e6);
  return buf;
}

}  // namespace

int cmd_bench(int argc, char** argv) {
  Args a(argc, argv, 2, {"random-weights", "bf16", "breakdown", "no-graph"});
  if (!a.has("random-weights")) fail("bench: only --random-weights is supported (give --config config.json)");
  const std::string cfg_path = a.require("config");
  const std::string backend_name = a.get("backend", "cuda");
  const bool int4 = !a.has("bf16");
  const bool use_graph = !a.has("no-graph");
  const auto batches = int_list(a, "batch", "1,8,32,64,128");
  const auto contexts = int_list(a, "context", "1024,8192");
  const auto prefills = int_list(a, "prefill", "1024,4096,16384,32768");
  const int steps = int(a.get_int("steps", 10));
  const int64_t bs = a.get_int("block-size", 16);
  const int64_t chunk = a.get_int("prefill-chunk", 0);  // 0: whole prompt in one forward
  const uint64_t seed = uint64_t(a.get_int("seed", 0));
  // --variants "name:opt,opt;name2:..." runs decode and prefill once per variant (one weight build); an opt is
  // `no-graph` or VAR=VALUE, an environment switch set for that variant (e.g. DS_CUDA_NO_GROUPED_MOE=1).
  struct Variant {
    std::string name;
    bool graph = true;
    std::vector<std::pair<std::string, std::string>> env;
  };
  std::vector<Variant> variants;
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
        else if (opt.find('=') != std::string::npos)
          v.env.push_back({opt.substr(0, opt.find('=')), opt.substr(opt.find('=') + 1)});
        else
          fail("--variants: option '", opt, "' is neither no-graph, graph nor VAR=VALUE");
      }
      variants.push_back(v);
    }
    if (variants.empty()) variants.push_back(Variant{use_graph ? "graph" : "eager", use_graph, {}});
  }
  DS_CHECK(steps >= 1, "--steps must be at least 1");

  io::ModelConfig cfg = io::load_model_config(cfg_path);
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
  {
    const int64_t n = gpu ? (int64_t(1) << 29) : (int64_t(1) << 24);  // bf16 elements: 1 GiB / 32 MiB
    Tensor src = be.alloc(DType::BF16, {n}), dst = be.alloc(DType::BF16, {n});
    be.copy(dst, src);
    be.synchronize();
    std::vector<double> ts;
    for (int i = 0; i < 5; ++i) {
      auto t0 = Clock::now();
      be.copy(dst, src);
      be.synchronize();
      ts.push_back(secs_since(t0));
    }
    std::sort(ts.begin(), ts.end());
    copy_bw = 2.0 * double(n) * 2 / ts[0];
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
    ts.clear();
    for (int i = 0; i < 5; ++i) {
      auto t0 = Clock::now();
      be.linear(x, W, y);
      be.synchronize();
      ts.push_back(secs_since(t0));
    }
    std::sort(ts.begin(), ts.end());
    mm_rate = 2.0 * double(M) * M * M / ts[0];
  }

  // ---- weights ----
  size_t free0 = 0, total_mem = 0;
#ifdef DS_HAVE_CUDA
  if (backend_name == "cuda") cudaMemGetInfo(&free0, &total_mem);
#endif
  auto t0 = Clock::now();
  model::LoadOptions lo;
  lo.mtp = false;
  lo.vision = false;
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
  model::ModelCaches caches = m->alloc_caches(num_blocks, bs, num_slots);
  int64_t n_attn = 0, n_lin = 0;
  for (auto lt : t.layer_types) (lt == io::LayerType::FullAttention ? n_attn : n_lin) += 1;
  const double kv_token_bytes = double(n_attn) * 2 * double(t.num_kv_heads * t.head_dim) * 2;  // K and V, bf16
  const double state_slot_bytes =
      double(n_lin) * 4.0 *
      double(t.lin_conv_dim() * (t.conv_kernel - 1) + t.lin_num_v_heads * t.lin_k_head_dim * t.lin_v_head_dim);
  const double ssm_slot_bytes = double(n_lin) * 4.0 * double(t.lin_num_v_heads * t.lin_k_head_dim * t.lin_v_head_dim);
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
  std::printf("| DeltaNet state: %lld slots × %s | %s |\n\n", (long long)num_slots,
              human_bytes(state_slot_bytes).c_str(), human_bytes(state_slot_bytes * double(num_slots)).c_str());

  std::mt19937 rng(seed + 17);
  auto random_tokens = [&](int64_t n) {
    std::vector<int32_t> v(static_cast<size_t>(n));
    for (auto& x : v) x = int32_t(rng() % uint32_t(std::min<int64_t>(t.vocab_size, 150000)));
    return v;
  };

  // ---- decode ----
  struct Breakdown {
    std::map<std::string, double> ms;
    double step_ms = 0, events_step_ms = 0;
    bool events = false;
  };
  std::vector<std::pair<std::string, Breakdown>> breakdowns;
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
    for (const Variant& var : variants) {
      set_env(var, true);
      be.key_suffix = "/" + var.name;
      const bool use_graph = var.graph;
      for (int64_t ctx : contexts)
        for (int64_t B : batches) {
          BatchMeta b;
          std::vector<int32_t> rows;
          const int64_t nblk = (ctx + steps + 8 + bs - 1) / bs;
          DS_CHECK(nblk <= per_seq_blocks, "internal: block budget");
          for (int64_t s = 0; s < B; ++s) {
            BatchMeta::Seq q;
            q.q_start = s;
            q.q_len = 1;
            q.ctx_len = ctx;
            q.state_slot = int32_t(s);
            for (int64_t i = 0; i < nblk; ++i) q.blocks.push_back(int32_t(s * per_seq_blocks + i));
            b.seqs.push_back(std::move(q));
            rows.push_back(int32_t(s));
          }
          b.tokens = random_tokens(B);
          b.positions.assign(size_t(3 * B), int32_t(ctx));
          // Distinct experts the step's routing touches (random weights route near-uniformly): measured would need
          // the ids; the expectation under uniform routing is E·(1 − (1 − k/E)^B).
          const double E = double(t.num_experts), K = double(t.num_experts_per_tok);
          const double touched = t.moe ? E * (1.0 - std::pow(1.0 - K / E, double(B))) : 0;
          double bytes = wb.dense + wb.lm_head + double(B) * wb.embed_row + double(t.num_layers) * touched * wb.expert;
          bytes += double(B) * 2.0 * ssm_slot_bytes + double(B) * double(ctx) * kv_token_bytes;
          auto one = [&](int i) {
            for (int64_t s = 0; s < B; ++s) {
              b.seqs[s].ctx_len = ctx + (i % 4);  // attention cost depends on length only
              b.positions[s] = b.positions[B + s] = b.positions[2 * B + s] = int32_t(b.seqs[s].ctx_len);
            }
            b.tokens = random_tokens(B);
            Tensor logits = use_graph ? m->forward_graphed(b, caches, rows) : m->forward(b, caches, rows);
            be.synchronize();
            (void)logits;
          };
          for (int i = 0; i < 3; ++i) one(i);
          std::vector<double> ts;
          for (int i = 0; i < steps; ++i) {
            auto t1 = Clock::now();
            one(i);
            ts.push_back(secs_since(t1) * 1e3);
          }
          std::sort(ts.begin(), ts.end());
          const double med = ts[ts.size() / 2];
          std::printf("| %s | %lld | %lld | %.3f | %.1f | %.0f | %s | %.0f | %.1f%% |\n", var.name.c_str(),
                      (long long)B, (long long)ctx, med, double(B) * 1e3 / med, touched, human_bytes(bytes).c_str(),
                      bytes / (med / 1e3) / 1e9, 100.0 * bytes / (med / 1e3) / copy_bw);
          std::fflush(stdout);
          if (a.has("breakdown") && ctx == contexts.front()) {
            // With graphs on a CUDA backend: device events around each op inside a recorded step (device time
            // per family; the rest of the step is gaps between kernels). Else: synchronise around each op.
            Breakdown bd;
            be.events = use_graph && be.stream_handle() != nullptr;
            be.on = true;
            const int reps = 3;
            for (int i = 0; i < 2 + reps; ++i) {  // warm-up and record, then timed replays
              be.ms.clear();
              be.step_ms = 0;
              Tensor logits = be.events ? m->forward_graphed(b, caches, rows) : m->forward(b, caches, rows);
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
        }
      set_env(var, false);
    }
    std::printf("\n");
  }
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
    std::printf("## Prefill (one sequence from empty caches; TTFT = all chunks + last-row logits)\n\n");
    std::printf(
        "| variant | prompt | chunk | TTFT ms | tok/s | TFLOP/s | of matmul peak |\n|---|---|---|---|---|---|---|\n");
    for (const Variant& var : variants) {
      set_env(var, true);
      bool warmed = false;
      for (int64_t P : prefills) {
        const int64_t ch = chunk > 0 ? std::min(chunk, P) : P;
        auto run = [&](int64_t len) {
          m->reset_slot(caches, 0);
          auto toks = random_tokens(len);
          Tensor logits;
          for (int64_t s0 = 0; s0 < len; s0 += ch) {
            const int64_t n = std::min(ch, len - s0);
            BatchMeta b;
            BatchMeta::Seq q;
            q.q_start = 0;
            q.q_len = n;
            q.ctx_len = s0;
            q.state_slot = 0;
            for (int64_t i = 0; i < (s0 + n + bs - 1) / bs; ++i) q.blocks.push_back(int32_t(i));
            b.seqs.push_back(q);
            b.tokens.assign(toks.begin() + s0, toks.begin() + s0 + n);
            b.positions.resize(size_t(3 * n));
            for (int r = 0; r < 3; ++r)
              for (int64_t i = 0; i < n; ++i) b.positions[size_t(r * n + i)] = int32_t(s0 + i);
            logits = m->forward(b, caches, {int32_t(n - 1)});
          }
          be.synchronize();
        };
        if (!warmed) {
          run(std::min<int64_t>(P, 512));
          warmed = true;
        }
        auto t1 = Clock::now();
        run(P);
        const double s = secs_since(t1);
        // FLOPs: 2 per active parameter per token, plus causal attention (QKᵀ and PV) over the prompt.
        const double attn = double(n_attn) * 4.0 * double(t.num_heads * t.head_dim) * double(P) * double(P) / 2;
        const double flops = 2.0 * wb.active_params * double(P) + attn;
        std::printf("| %s | %lld | %lld | %.1f | %.0f | %.3g | %.2g%% |\n", var.name.c_str(), (long long)P,
                    (long long)ch, s * 1e3, double(P) / s, flops / s / 1e12, 100.0 * flops / s / mm_rate);
        std::fflush(stdout);
      }
      set_env(var, false);
    }
    std::printf("\n");
  }
  return 0;
}

}  // namespace ds::cli
