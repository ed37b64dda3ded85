// The engine: one thread that owns the model and runs step() = schedule → forward → sample → post-process,
// with continuous batching (requests join and leave the running batch at every step) and chunked prefill.
// HTTP threads hand it Requests and read Deltas from per-request channels; it never waits on a client.
#pragma once
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "model/model.h"
#include "runtime/cache.h"
#include "sampling/sampling.h"

namespace ds::runtime {

enum class FinishReason { None, Stop, Length, Abort, Error, Repetition };
const char* finish_reason_name(FinishReason r);  // "stop", "length", "abort", "error", "repetition"

// Output of one engine step for one request (set by the engine).
struct Delta {
  std::vector<int32_t> tokens;                     // newly generated ids (usually one)
  std::vector<sampling::TokenLogprob> logprobs;    // parallel to tokens when requested
  FinishReason finish = FinishReason::None;
  int32_t stop_token = -1;                         // the EOS / stop_token_id that ended it (not in tokens)
  std::string error;                               // for FinishReason::Error
  // Usage so far; completion_tokens counts every sampled token, a final stop token included (vLLM's usage).
  int64_t prompt_tokens = 0, completion_tokens = 0;
  int64_t cached_tokens = 0;  // prompt tokens taken from a prefix-cache checkpoint (usage.prompt_tokens_details)
  // The prefix-cache lookup of the request's first admission, for the logs (why a prompt was or was not cached).
  CacheLookup cache_lookup;
  // Request::prompt_logprobs: entry i for prompt token i + 1 (token 0 has none), each with its rank; on the delta that
  // carries the request's first token (or its end, when that comes first).
  std::vector<sampling::TokenLogprob> prompt_logprobs;
  // On the delta that carries a request's first token (else -1): seconds from submit() to its first admission (the
  // queue) and from there to this token (the prefill), vLLM's request_queue_time / request_prefill_time.
  double queue_seconds = -1, prefill_seconds = -1;
};

// Thread-safe single-consumer queue of Deltas. The engine pushes without blocking.
class DeltaChannel {
 public:
  void push(Delta d);
  // Waits up to `timeout` for the next delta; nullopt on timeout.
  std::optional<Delta> pop(std::chrono::milliseconds timeout);

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Delta> q_;
};

// Images of one prompt (set by the server after decoding and preprocessing, docs/vision.md). The prompt's
// <|image_pad|> runs are already expanded; the engine runs the vision tower once, on the first forward chunk
// that reaches a placeholder row, keeps the features with the sequence (so chunked prefill and recompute after
// preemption reuse them), puts them in place of those rows' embeddings, and gives every row its mRoPE position:
// `positions` for prompt rows, position + rope_delta (on all three axes) for generated ones.
struct MultiModalInput {
  std::vector<float> pixel_values;                // fp32 [Σ t·h·w, patch_dim], images back to back
  std::vector<std::array<int64_t, 3>> grids;      // per image {t, h, w} in patches
  std::vector<int32_t> rows;                      // prompt rows of the placeholders, one per feature row, in order
  std::vector<int32_t> positions;                 // [3, prompt length]: t, h, w rows
  int64_t rope_delta = 0;
  // Per grid: a hash of what its features are computed from (its pixel values and grid: media_hash). With one per
  // grid the prompt takes part in prefix caching, its placeholders keyed by them (Sequence::cache_key); empty: not.
  std::vector<uint64_t> hashes;
};

// A 64-bit hash of an image's or video's preprocessed pixels and grid (MultiModalInput::hashes).
uint64_t media_hash(const float* pixels, size_t n, const std::array<int64_t, 3>& grid);

// Set by the server (after validation and tokenisation).
struct Request {
  uint64_t id = 0;
  std::vector<int32_t> prompt;
  sampling::SamplingParams sampling;
  int64_t max_tokens = 16;            // generated tokens at most
  std::vector<int32_t> stop_token_ids;// in addition to the model's EOS set unless ignore_eos
  bool ignore_eos = false;
  std::shared_ptr<const MultiModalInput> mm;  // null: text only
  // vLLM's repetition_detection: the output ends (FinishReason::Repetition) once its last L tokens, for some L in
  // [min_pattern, max_pattern], have occurred min_count times in a row at its end. max_pattern 0 = off. Checked from
  // min_tokens on, after max_tokens (vLLM's check_stop order).
  struct Repetition {
    int64_t max_pattern = 0, min_pattern = 0, min_count = 0;
  } repetition;
  // vLLM's priority: lower values are admitted first, and preempted last (docs/engine.md "Scheduling").
  int64_t priority = 0;
  // Prefix caching: only requests with the same salt share checkpoints (vLLM's cache_salt; "" = the default).
  std::string cache_salt;
  // Prefix caching: prompt positions worth a checkpoint besides the engine's own choices (the server's: where the
  // chat's second and last messages start); rounded down to a block boundary.
  std::vector<int64_t> cache_hints;
  // vLLM's prompt_logprobs: -1 off; k >= 0: the raw log-softmax of every prompt token after the first under the
  // prompt before it, its rank and the top k alternatives (Delta::prompt_logprobs). Every prompt row's logits are
  // computed (Engine::kPromptLogprobRows at a time), so such a prompt never resumes from a prefix-cache checkpoint.
  int32_t prompt_logprobs = -1;
  std::shared_ptr<DeltaChannel> out = std::make_shared<DeltaChannel>();
  std::chrono::steady_clock::time_point arrival = std::chrono::steady_clock::now();
};

// Whether the last L of the n tokens at t, for some L in [max(min_pattern, 1), max_pattern], occur min_count times in
// a row at the end (vLLM's check_sequence_repetition).
bool repeats_at_end(const int32_t* t, int64_t n, const Request::Repetition& r);

struct EngineConfig {
  int64_t max_num_seqs = 16;           // running sequences (= DeltaNet state slots)
  int64_t max_num_batched_tokens = 2048;  // tokens per forward call (decode + prefill chunks)
  int64_t max_model_len = 8192;        // prompt + generated
  int64_t block_size = 16;
  int64_t num_blocks = 0;              // KV blocks; 0 = enough for max_num_seqs × max_model_len
  std::vector<int32_t> eos_token_ids;  // the model's EOS set (<|im_end|>, <|endoftext|>)
  int64_t vocab_limit = 0;             // ids >= this are never sampled (0 = the model's vocab)
  // submit() rejects prompt ids outside the model's vocabulary. Tests switch it off to make a step fail
  // and check that only the offending request ends (FinishReason::Error).
  bool check_prompt_ids = true;
  // Speculative decoding with the checkpoint's MTP head (--speculative-config '{"method": "mtp",
  // "num_speculative_tokens": K}'): each decode step verifies up to K drafted tokens. 0 = off. Needs an MTP
  // head; doubles the DeltaNet state slots (one snapshot per sequence, docs/engine.md).
  int64_t num_speculative_tokens = 0;
  // Draft with the model's reduced-vocabulary head (Model::draft_vocab(), LoadOptions::draft_vocab) of this many
  // tokens instead of the full lm_head ("draft_vocab_size" in --speculative-config). 0 = full vocabulary. Output
  // stays exact (the target verifies); only the acceptance rate can change.
  int64_t draft_vocab_size = 0;
  // Decode-only steps (every scheduled sequence decodes or verifies drafts) run through Model::forward_graphed and
  // the MTP drafts through mtp_forward_graphed: one recording per batch shape (CUDA graphs on CUDA; the same code
  // eagerly elsewhere). Prefill chunks and mixed batches stay eager. false = always eager (serve's
  // --enforce-eager); the engine tests require identical greedy output either way.
  bool step_graphs = true;
  // Sample on the backend (Backend::sample_rows: on CUDA only R int32 ids come back, not [R, V] logits) in steps
  // where no sampled sequence wants logprobs or verifies drafts; those steps copy the logits and sample on the
  // host. Either way the same tokens (docs/engine.md "Sampler"). false = always the host sampler (also set by the
  // environment switch DS_HOST_SAMPLING=1, for before/after measurements).
  bool device_sampling = true;
  // Speculative verify and draft steps through the recordings too (with step_graphs). Step graphs are keyed by
  // ModelCaches::id, so a new engine never replays a recording made with another engine's caches.
  bool spec_step_graphs = true;
  // Verification on the backend: when every sampled row of a verify step wants at most 20 logprob alternatives, the
  // choice per verified row comes from Backend::sample_rows (on CUDA K + 1 ints per sequence come back, not [K + 1, V]
  // fp32 logits): a greedy row's argmax, a sampled row's rejection sampling of its draft (the draft, or a draw from
  // the rest), and the engine compares it with the drafts (logprobs: Backend::row_logprobs over the verified rows).
  // The same tokens as the host's verify_draft (sampled rows: up to the rounding of sums, ops.h). false (or
  // DS_CUDA_NO_DEVICE_VERIFY=1): the logits of every verify step come back to the host (sampling::verify_draft).
  bool device_verify = true;
  // Recorded draft steps (step graphs, the draft argmax on the device) feed each chained MTP step its token ids from
  // the previous step's argmax on the device, and read the drafts back once after the last step: no host round trip
  // between the K draft steps (docs/engine.md "Host syncs"). false (or DS_CUDA_NO_DRAFT_FEED=1): one read back per
  // draft step, the next step's tokens through the host.
  bool device_draft_feed = true;
  // Grammar masks ahead (docs/engine.md "Sampler"): the masks of a step's grammar-constrained rows (structured output,
  // tool-call grammars) are computed on `mask_threads` worker threads while the step's forward runs, from copies of
  // the sequences' grammar positions, and joined before sampling; identical positions in one step share one mask.
  // The same tokens either way. false = each mask is computed on the engine thread when its row is sampled, after
  // the forward (also set by the environment switch DS_SERIAL_MASKS=1, for before/after measurements).
  bool parallel_masks = true;
  int64_t mask_threads = 0;  // 0 = min(4, hardware threads)
  // Tests only: called on the thread that computes a mask ahead, with the request id, before computing it; what it
  // throws ends that request as an exception of the masker would. Null = off.
  std::function<void(uint64_t id)> mask_hook;
  // Prefix caching (docs/engine.md "Prefix caching"): DeltaNet state checkpoints kept beyond the sequences' slots,
  // each with the KV blocks of its prefix; a new sequence whose tokens start with a checkpoint's resumes there.
  // 0 = off.
  int64_t prefix_cache_checkpoints = 0;
  // Checkpoints a newer one pushed out of its device slot are kept in host memory, up to this many (allocated as
  // needed; pinned on CUDA), their KV blocks still in the pool; resuming from one copies its state back (llama.cpp's
  // --cache-ram). 0 = none: such checkpoints are dropped. Needs prefix_cache_checkpoints > 0.
  int64_t prefix_cache_host_checkpoints = 0;
  // A prompt also leaves a checkpoint every this many tokens (rounded down to blocks; 0 = only at the planned points:
  // after the system prompt, before the last message, at the prompt's end, where it leaves a cached prefix).
  int64_t prefix_cache_interval = 0;
  // Tests and benchmarks only (issue 8's oracle mode; random weights accept almost nothing): replaces the MTP's
  // proposal for token index `index` (into prompt + generated) of request `id`. The MTP still runs. Without the
  // device draft feed the chained steps are fed the replaced token; with it (the MTP's drafts stay on the device
  // until the last step) they are fed the MTP's own proposals and the hook replaces the proposals afterwards, in
  // the same order. Null = off.
  std::function<int32_t(uint64_t id, int64_t index, int32_t proposed)> draft_hook;
  // Benchmarks (bench --speculative; also DS_SPEC_PROFILE=1): wall time per phase of every step
  // (EngineMetrics::phase_ms), the backend synchronised at each phase boundary, so the phases do not overlap and
  // the step gets slower by the syncs. Off: no syncs, no clock reads.
  bool profile_phases = false;
};

// Counters and gauges for /metrics (snapshot).
struct EngineMetrics {
  int64_t running = 0, waiting = 0;
  int64_t kv_blocks_used = 0, kv_blocks_total = 0, slots_used = 0, slots_total = 0;
  int64_t kv_blocks_cached = 0;  // held by prefix-cache checkpoints only (evictable; not in kv_blocks_used)
  int64_t prompt_tokens_total = 0, generation_tokens_total = 0;
  int64_t requests_finished[6] = {0, 0, 0, 0, 0, 0};  // by FinishReason
  int64_t preemptions_total = 0, steps_total = 0;
  // Prefix caching: prompt tokens looked up / found in checkpoints (at first admission), checkpoints held.
  // prefix_cache_checkpoints counts those in host memory too (prefix_cache_host_checkpoints).
  int64_t prefix_cache_queries_total = 0, prefix_cache_hits_total = 0, prefix_cache_checkpoints = 0;
  int64_t prefix_cache_host_checkpoints = 0;
  int64_t prefix_cache_host_hits_total = 0;  // of prefix_cache_hits_total: tokens resumed from host-memory checkpoints
  int64_t graph_steps_total = 0;  // steps that ran through Model::forward_graphed (decode-only)
  int64_t device_sample_steps_total = 0;  // steps whose tokens came from Backend::sample_rows
  // Grammar masks made ahead, during the forward (EngineConfig::parallel_masks), and used; made ahead but found
  // stale at sampling (the sequence's grammar position had moved: recomputed there; never expected).
  int64_t grammar_masks_ahead_total = 0, grammar_masks_stale_total = 0;
  // Speculative decoding (vLLM's spec_decode_* counters): verify rounds, drafted tokens verified, drafts
  // accepted, and accepted per draft position (index i = the (i+1)-th draft of a round; size K).
  int64_t spec_num_drafts_total = 0, spec_draft_tokens_total = 0, spec_accepted_tokens_total = 0;
  std::vector<int64_t> spec_accepted_per_pos;
  // EngineConfig::profile_phases: accumulated wall ms per step phase (in order of first appearance).
  std::vector<std::pair<std::string, double>> phase_ms;
  // Tokens per forward step (prefill chunks, decode and verify rows; vLLM's iteration_tokens_total): steps counted per
  // bucket of kIterationTokenBounds (index i: at most bound i and more than bound i - 1; the last: above them all),
  // and the tokens' sum.
  static constexpr int64_t kIterationTokenBounds[] = {1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384};
  std::vector<int64_t> iteration_tokens = std::vector<int64_t>(std::size(kIterationTokenBounds) + 1, 0);
  int64_t iteration_tokens_sum = 0;
};

class Engine {
 public:
  // Prompt logprobs: the lm_head runs over at most this many prompt rows at a time (fp32 logits [rows, V]: 508 MB
  // for a 248k vocabulary, within the scratch serve keeps besides the pools; each pass reads the lm_head again:
  // bench/RESULTS.md "Prompt logprobs"). The environment switch DS_PROMPT_LOGPROB_ROWS=N overrides it (measurements).
  static constexpr int64_t kPromptLogprobRows = 512;
  Engine(model::Model& m, EngineConfig cfg);
  ~Engine();
  void start();  // spawns the engine thread
  void stop();   // finishes the thread; pending requests end with FinishReason::Abort
  // Validates and queues: prompt non-empty, max_tokens >= 1, prompt + max_tokens <= max_model_len and within
  // the KV pool, token ids inside the vocabulary, sampling params in range (sampling::check_params), images
  // (if any) laid out consistently for a model with a vision tower, id not already in flight, engine not stopped. Throws ds::Error naming expected vs found, before queueing.
  void submit(std::shared_ptr<Request> r);
  // Ends a request (client gone, stop string matched) with FinishReason::Abort; its memory is freed at the
  // next step. Ignored if the id is not in flight; never reaches a later request that reuses the id.
  void abort(uint64_t id);
  EngineMetrics metrics() const;
  const EngineConfig& config() const { return cfg_; }
  // One scheduling + forward step (the engine thread calls this in a loop; tests may call it directly
  // without start()). Returns false if there was nothing to do.
  bool step();

 private:
  struct Impl;
  void check_mm(const Request& r, int64_t P) const;
  std::unique_ptr<Impl> impl_;
  EngineConfig cfg_;
};

}  // namespace ds::runtime
