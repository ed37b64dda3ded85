// Image requests through the engine (tiny MoE int4, CPU backend): the prompt built by the server's
// prepare_images equals the reference's expanded input_ids; the engine's greedy tokens equal a hand-driven
// forward (vision tower once, features at the placeholder rows, mRoPE positions, decode at position +
// rope_delta) whose first token is the reference logits' argmax — alone, under chunked prefill that splits
// the image run, batched with text requests, and across preemption.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>

#include "backend/ops.h"
#include "core/status.h"
#include "golden_util.h"
#include "model/model.h"
#include "runtime/cache.h"
#include "runtime/engine.h"
#include "runtime/spec_decode.h"
#include "server/media.h"

namespace ds::runtime {
namespace {

struct Fixture {
  std::unique_ptr<Backend> be;
  std::unique_ptr<model::Model> m;
  nlohmann::json golden;
  std::vector<int32_t> prompt;  // expanded, from prepare_images
  std::shared_ptr<const MultiModalInput> mm;
  std::vector<int32_t> reference;  // hand-driven greedy continuation
};

constexpr int kTokens = 6;

int32_t argmax(const float* row, int64_t V) { return int32_t(std::max_element(row, row + V) - row); }

// The whole image prompt as one batch on a new sequence of `cm` (room for kTokens more): the features at the
// placeholder rows, the mRoPE positions.
BatchMeta prompt_batch(const Fixture& f, CacheManager& cm, SeqCache& seq, const Tensor& feats) {
  cm.start(seq);
  cm.reserve(seq, int64_t(f.prompt.size()) + kTokens);
  BatchMeta b = make_batch({{&seq, f.prompt}});
  b.positions = f.mm->positions;
  b.embed_rows = f.mm->rows;
  b.embed_src = feats;
  return b;
}

Fixture& fx() {
  static Fixture f = [] {
    Fixture f;
    const std::string dir = test::data_dir() + "/tiny-moe/";
    f.be = make_cpu_backend();
    f.m = model::Model::load(dir + "tiny-moe-int4", *f.be);
    f.golden = test::read_json(dir + "golden.json");
    const int32_t pad = int32_t(f.m->config().image_token_id);
    // The reference prompt with its image run collapsed to the one placeholder a chat template emits.
    for (int32_t t : f.golden["image"]["input_ids"].get<std::vector<int32_t>>())
      if (!(t == pad && !f.prompt.empty() && f.prompt.back() == pad)) f.prompt.push_back(t);
    server::MediaConfig mc;
    mc.allowed_local_paths = {dir};
    f.mm = server::prepare_images({{dir + "image.png", "test"}}, mc,
                                  vision::load_preprocess_config(dir + "tiny-moe-int4"), pad, f.prompt);
    // Hand-driven greedy: the whole prompt in one forward, then one token at a time.
    model::Model& m = *f.m;
    const int64_t P = int64_t(f.prompt.size()), V = m.config().text.vocab_size;
    CacheManager cm(m, (P + kTokens) / 16 + 2, 16, 1);
    SeqCache seq;
    BatchMeta b = prompt_batch(f, cm, seq, m.encode_images(f.mm->pixel_values, f.mm->grids));
    auto l = f.be->to_host_f32(m.forward(b, cm.caches(), {int32_t(P - 1)}));
    seq.len = P;
    f.reference.push_back(argmax(l.data(), V));
    while (int(f.reference.size()) < kTokens) {
      BatchMeta d = make_batch({{&seq, {f.reference.back()}}});
      for (int r = 0; r < 3; ++r) d.positions[size_t(r)] = int32_t(seq.len + f.mm->rope_delta);
      auto ld = f.be->to_host_f32(m.forward(d, cm.caches(), {0}));
      seq.len += 1;
      f.reference.push_back(argmax(ld.data(), V));
    }
    return f;
  }();
  return f;
}

EngineConfig config() {
  EngineConfig c;
  c.max_num_seqs = 8;
  c.max_num_batched_tokens = 2048;
  c.max_model_len = 512;
  c.block_size = 16;
  c.eos_token_ids = {1984, 1986};
  return c;
}

std::shared_ptr<Request> image_req(uint64_t id) {
  auto r = std::make_shared<Request>();
  r->id = id;
  r->prompt = fx().prompt;
  r->mm = fx().mm;
  r->max_tokens = kTokens;
  r->ignore_eos = true;
  r->sampling.temperature = 0.f;
  return r;
}

std::shared_ptr<Request> text_req(uint64_t id, size_t i) {
  auto r = std::make_shared<Request>();
  r->id = id;
  r->prompt = fx().golden["text"]["int4"][i]["prompt"].get<std::vector<int32_t>>();
  r->max_tokens = 8;
  r->ignore_eos = true;
  r->sampling.temperature = 0.f;
  return r;
}

struct Out {
  std::vector<int32_t> tokens;
  FinishReason finish = FinishReason::None;
  std::string error;
  int64_t prompt_tokens = 0, cached_tokens = 0;
};

Out collect(Request& r) {
  Out o;
  while (auto d = r.out->pop(std::chrono::milliseconds(0))) {
    o.tokens.insert(o.tokens.end(), d->tokens.begin(), d->tokens.end());
    o.finish = d->finish;
    o.error = d->error;
    o.prompt_tokens = d->prompt_tokens;
    o.cached_tokens = d->cached_tokens;
  }
  return o;
}

void drain(Engine& e) {
  while (e.step()) {
  }
}

TEST(EngineImages, PromptMatchesReferenceAndFirstTokenIsReferenceArgmax) {
  auto& f = fx();
  EXPECT_EQ(f.prompt, f.golden["image"]["input_ids"].get<std::vector<int32_t>>());
  EXPECT_EQ(f.mm->rows.size(), 77u);  // grid 14 x 22 / 4
  test::Golden g(test::data_dir() + "/tiny-moe/golden.safetensors");
  auto ref = g.f32("int4.fp32.image.logits");
  const int64_t V = f.m->config().text.vocab_size, P = int64_t(f.prompt.size());
  ASSERT_EQ(int64_t(ref.size()), P * V);
  EXPECT_EQ(f.reference[0], argmax(ref.data() + (P - 1) * V, V));
}

TEST(EngineImages, AloneMatchesHandDrivenForward) {
  Engine e(*fx().m, config());
  auto r = image_req(1);
  e.submit(r);
  drain(e);
  auto o = collect(*r);
  EXPECT_EQ(o.tokens, fx().reference);
  EXPECT_EQ(o.finish, FinishReason::Length);
  EXPECT_EQ(o.prompt_tokens, int64_t(fx().prompt.size()));
}

TEST(EngineImages, ChunkedPrefillAndBatchingWithTextRequests) {
  EngineConfig c = config();
  c.max_num_batched_tokens = 16;  // the 77-token image run spans six chunks; two images share steps
  Engine e(*fx().m, c);
  std::vector<std::shared_ptr<Request>> imgs = {image_req(1), image_req(2)}, texts = {text_req(3, 0), text_req(4, 1)};
  e.submit(imgs[0]);
  e.submit(texts[0]);
  e.submit(imgs[1]);
  e.submit(texts[1]);
  drain(e);
  for (auto& r : imgs) EXPECT_EQ(collect(*r).tokens, fx().reference) << "request " << r->id;
  for (size_t i = 0; i < texts.size(); ++i) {
    auto want = fx().golden["text"]["int4"][i]["greedy"].get<std::vector<int32_t>>();
    want.resize(8);
    EXPECT_EQ(collect(*texts[i]).tokens, want) << "text request " << i;
  }
}

// Prefix caching: placeholder rows are keyed by their image's content hash (Sequence::cache_key), so the same image
// again resumes past it (a multi-turn chat about a picture), while a text prompt of the very same ids or a different
// image shares only the text before it; images without hashes are not cached at all.
TEST(EngineImages, PrefixCachingKeysPlaceholdersByTheImage) {
  EngineConfig c = config();
  c.prefix_cache_checkpoints = 8;
  Engine e(*fx().m, c);
  auto run = [&](std::shared_ptr<Request> r) {
    e.submit(r);
    drain(e);
    return collect(*r);
  };
  const int64_t first_pad = fx().mm->rows.front(), last_pad = fx().mm->rows.back();
  ASSERT_EQ(fx().mm->hashes.size(), 1u);
  Out first = run(image_req(1));
  EXPECT_EQ(first.tokens, fx().reference);
  EXPECT_EQ(first.cached_tokens, 0);
  EXPECT_GT(e.metrics().prefix_cache_checkpoints, 0);
  const int64_t P = int64_t(fx().prompt.size());
  Out again = run(image_req(2));
  EXPECT_EQ(again.tokens, fx().reference);
  EXPECT_EQ(again.cached_tokens, (P - 1) / 16 * 16) << "the same prompt: its last whole block";
  // The next turn: the prompt, the answer and more text (text rows after the prompt at position + rope_delta).
  auto turn2 = image_req(6);
  turn2->prompt.insert(turn2->prompt.end(), fx().reference.begin(), fx().reference.end());
  for (int32_t t : {12, 13, 14, 15}) turn2->prompt.push_back(t);
  const int64_t P2 = int64_t(turn2->prompt.size());
  auto mm_next = std::make_shared<MultiModalInput>(*fx().mm);
  mm_next->positions.clear();
  for (int r = 0; r < 3; ++r)
    for (int64_t p = 0; p < P2; ++p)
      mm_next->positions.push_back(p < P ? fx().mm->positions[size_t(r * P + p)] : int32_t(p + fx().mm->rope_delta));
  turn2->mm = mm_next;
  Out next = run(turn2);
  EXPECT_EQ(next.cached_tokens, P + kTokens - 1) << "the next turn resumes after the answer (its last token not yet run)";
  EXPECT_GT(next.cached_tokens, last_pad) << "past the image's placeholders";
  auto cold = image_req(7);
  *cold = *turn2;
  cold->id = 7;
  cold->out = std::make_shared<DeltaChannel>();
  cold->cache_salt = "cold";
  Out recomputed = run(cold);
  EXPECT_EQ(recomputed.cached_tokens, 0);
  EXPECT_EQ(next.tokens, recomputed.tokens) << "resumed = computed from scratch (vision tower included)";
  auto same_ids = image_req(3);
  same_ids->mm = nullptr;
  EXPECT_LE(run(same_ids).cached_tokens, first_pad) << "placeholder ids without the image";
  auto other = image_req(4);
  auto mm = std::make_shared<MultiModalInput>(*fx().mm);
  mm->pixel_values[100] += 0.5f;  // another picture of the same size
  mm->hashes = {media_hash(mm->pixel_values.data(), mm->pixel_values.size(), mm->grids[0])};
  EXPECT_NE(mm->hashes[0], fx().mm->hashes[0]);
  other->mm = mm;
  Out o = run(other);
  EXPECT_LE(o.cached_tokens, first_pad) << "another image";
  EXPECT_EQ(o.tokens.size(), fx().reference.size());
  // Images without hashes (a caller that does not key them): neither resumed nor kept.
  const int64_t kept = e.metrics().prefix_cache_checkpoints;
  auto unkeyed = image_req(5);
  auto mm2 = std::make_shared<MultiModalInput>(*fx().mm);
  mm2->hashes.clear();
  unkeyed->mm = mm2;
  Out u = run(unkeyed);
  EXPECT_EQ(u.cached_tokens, 0);
  EXPECT_EQ(u.tokens, fx().reference);
  EXPECT_EQ(e.metrics().prefix_cache_checkpoints, kept);
}

TEST(EngineImages, PreemptionRecomputesWithTheSameFeatures) {
  EngineConfig c = config();
  c.max_num_seqs = 4;
  c.max_num_batched_tokens = 32;
  c.num_blocks = 10;  // 160 tokens: one image request (91 + 6) fits, two do not at once
  Engine e(*fx().m, c);
  std::vector<std::shared_ptr<Request>> rs = {image_req(1), image_req(2), image_req(3)};
  for (auto& r : rs) e.submit(r);
  drain(e);
  for (auto& r : rs) EXPECT_EQ(collect(*r).tokens, fx().reference) << "request " << r->id;
  EXPECT_GT(e.metrics().preemptions_total, 0);
  EXPECT_EQ(e.metrics().kv_blocks_used, 0);
}

TEST(EngineImages, AFailingVisionTowerEndsOnlyItsRequest) {
  Engine e(*fx().m, config());
  auto bad = image_req(1);
  auto mm = std::make_shared<MultiModalInput>(*fx().mm);
  mm->pixel_values.resize(mm->pixel_values.size() - 7);  // not grid patches x patch_dim: encode_images throws
  bad->mm = mm;
  auto good = image_req(2), text = text_req(3, 0);
  e.submit(bad);
  e.submit(good);
  e.submit(text);
  drain(e);
  auto o = collect(*bad);
  EXPECT_EQ(o.finish, FinishReason::Error);
  EXPECT_NE(o.error.find("image encoding failed: encode_images: pixel_values has"), std::string::npos) << o.error;
  EXPECT_TRUE(o.tokens.empty());
  EXPECT_EQ(collect(*good).tokens, fx().reference);
  EXPECT_EQ(collect(*text).tokens.size(), 8u);
  EXPECT_EQ(e.metrics().kv_blocks_used, 0);
}

// Speculative decoding with an image (model-spec §4 "Multimodal prompts"): an MTP row fed a placeholder takes that
// placeholder's vision features as its embedding and runs at the target token's mRoPE position. The greedy tokens
// stay the hand-driven forward's, and the first draft after the prompt is a hand-driven MTP pass's over the whole
// prompt — alone, and with the image run split into chunks (a chunk's last row is fed the next chunk's placeholder).
TEST(EngineImages, SpeculativeDecodingDraftsFromTheImageFeatures) {
  auto& f = fx();
  model::Model& m = *f.m;
  const int64_t P = int64_t(f.prompt.size()), V = m.config().text.vocab_size;
  // Hand-driven: the target's final-norm hidden state of every prompt row, then the MTP over rows 0..P-1 fed
  // prompt[1..P-1] and the first generated token.
  CacheManager cm(m, (P + kTokens) / 16 + 2, 16, 1);
  SeqCache seq;
  const Tensor feats = m.encode_images(f.mm->pixel_values, f.mm->grids);
  BatchMeta b = prompt_batch(f, cm, seq, feats);
  std::vector<int32_t> all(static_cast<size_t>(P));
  for (int64_t i = 0; i < P; ++i) all[size_t(i)] = int32_t(i);
  Tensor hidden;
  m.forward(b, cm.caches(), {int32_t(P - 1)}, &hidden, &all);
  std::vector<int32_t> fed(f.prompt.begin() + 1, f.prompt.end());
  fed.push_back(f.reference[0]);
  Tensor hout;  // the MTP's post-norm hidden of row P - 1: the chained step's input
  auto mtp_row = [&](bool with_image) {
    BatchMeta mb = make_batch({{&seq, fed}});  // seq.len is 0: the MTP KV is written from row 0
    mb.positions = f.mm->positions;
    if (with_image) {
      for (int32_t r : f.mm->rows) mb.embed_rows.push_back(r - 1);
      mb.embed_src = feats;
    }
    return f.be->to_host_f32(m.mtp_forward(mb, cm.caches(), hidden, {int32_t(P - 1)}, &hout, false));
  };
  const std::vector<float> without = mtp_row(false), with = mtp_row(true);  // cm's MTP KV: the image pass's
  const int32_t want = argmax(with.data(), V);
  // The chained step: the first draft at position P, all three mRoPE rows at P + rope_delta.
  SeqCache at_p = seq;
  at_p.len = P;
  BatchMeta cb = make_batch({{&at_p, {want}}});
  for (int r = 0; r < 3; ++r) cb.positions[size_t(r)] = int32_t(P + f.mm->rope_delta);
  const auto chained = f.be->to_host_f32(m.mtp_forward(cb, cm.caches(), hout, {0}, nullptr, false));
  const int32_t want2 = argmax(chained.data(), V);
  float diff = 0.f;
  for (int64_t v = 0; v < V; ++v) diff = std::max(diff, std::abs(with[size_t(v)] - without[size_t(v)]));
  EXPECT_GT(diff, 1e-3f) << "the image features change the draft logits";
  // The MTP KV of a position (k, v of every head) from a cache manager's MTP layer.
  auto kv_at = [&](CacheManager& c, const SeqCache& sc, int64_t p) {
    std::vector<float> out;
    for (const Tensor* t : {&c.caches().mtp_kv.k, &c.caches().mtp_kv.v}) {
      const Tensor row = t->rows(sc.blocks[size_t(p / 16)], sc.blocks[size_t(p / 16)] + 1);
      const std::vector<float> blk = f.be->to_host_f32(row);
      const size_t per = blk.size() / 16;
      out.insert(out.end(), blk.begin() + std::ptrdiff_t(size_t(p % 16) * per), blk.begin() + std::ptrdiff_t(size_t(p % 16 + 1) * per));
    }
    return out;
  };

  // mtp_propose, the prompt in one job and split inside the image run, two drafts: the MTP KV of every prompt position
  // and of the chained step's equals the hand-driven passes' (each row's KV depends on its own embedding and
  // position only), and the drafts are their argmaxes.
  const int64_t split = f.mm->rows[10];  // the row before it is fed a placeholder of the second job
  for (bool chunked : {false, true}) {
    SCOPED_TRACE(chunked ? "two jobs" : "one job");
    CacheManager c2(m, (P + kTokens) / 16 + 2, 16, 1);
    auto r = image_req(7);
    Sequence sq(r, f.prompt, r->sampling);
    sq.tokens.push_back(f.reference[0]);
    sq.mm_features = feats;
    c2.start(sq.cache);
    c2.reserve(sq.cache, P + kTokens);
    std::vector<DraftJob> jobs;
    // cache.len: the target's length after the step (the chained step's draft sits at cache.len - 1 + 1).
    if (chunked) {
      jobs = {{&sq, 0, 0, split, 0}};
      sq.cache.len = split;
      mtp_propose(m, c2, hidden, jobs, DraftOptions{});
      jobs = {{&sq, split, split, P - split, 2}};
    } else {
      jobs = {{&sq, 0, 0, P, 2}};
    }
    sq.cache.len = P;
    mtp_propose(m, c2, hidden, jobs, DraftOptions{});
    ASSERT_EQ(sq.drafts.size(), 2u);
    EXPECT_EQ(sq.drafts[0], want);
    EXPECT_EQ(sq.drafts[1], want2);
    for (int64_t p = 0; p <= P; ++p) {
      const auto a = kv_at(c2, sq.cache, p), e = kv_at(cm, seq, p);
      float d = 0.f;
      for (size_t i = 0; i < a.size(); ++i) d = std::max(d, std::abs(a[i] - e[i]));
      ASSERT_LE(d, 1e-6f) << "MTP KV at position " << p;
    }
  }

  for (int64_t chunk : {2048, 16}) {
    SCOPED_TRACE("max_num_batched_tokens " + std::to_string(chunk));
    EngineConfig c = config();
    c.max_num_batched_tokens = chunk;
    c.num_speculative_tokens = 2;
    std::map<uint64_t, std::pair<int64_t, int32_t>> first;  // request -> (index, draft) of its first proposal
    c.draft_hook = [&](uint64_t id, int64_t index, int32_t proposed) {
      auto [it, added] = first.emplace(id, std::make_pair(index, proposed));
      if (!added && index < it->second.first) it->second = {index, proposed};
      return proposed;
    };
    Engine e(m, c);
    auto r = image_req(1), text = text_req(2, 0);
    e.submit(r);
    e.submit(text);
    drain(e);
    EXPECT_EQ(collect(*r).tokens, f.reference);
    auto want_text = f.golden["text"]["int4"][0]["greedy"].get<std::vector<int32_t>>();
    want_text.resize(8);
    EXPECT_EQ(collect(*text).tokens, want_text);
    ASSERT_TRUE(first.count(1));
    EXPECT_EQ(first[1].first, P + 1) << "the first draft follows the prompt and its first token";
    EXPECT_EQ(first[1].second, want) << "the MTP pass fed the image features";
    EXPECT_GT(e.metrics().spec_draft_tokens_total, 0);
    EXPECT_EQ(e.metrics().kv_blocks_used, 0);
  }
}

TEST(EngineImages, InconsistentLayoutsAreRejectedAtSubmit) {
  Engine e(*fx().m, config());
  auto bad = [&](auto edit, const char* want) {
    auto r = image_req(9);
    auto mm = std::make_shared<MultiModalInput>(*fx().mm);
    edit(*mm);
    r->mm = mm;
    try {
      e.submit(r);
      ADD_FAILURE() << "accepted; expected an error containing '" << want << "'";
    } catch (const Error& ex) {
      EXPECT_NE(std::string(ex.what()).find(want), std::string::npos) << ex.what();
    }
  };
  bad([](MultiModalInput& m) { m.rows.pop_back(); }, "76 placeholder rows for 77 image feature rows");
  bad([](MultiModalInput& m) { m.positions.pop_back(); }, "mRoPE positions");
  bad([](MultiModalInput& m) { m.rows[3] = m.rows[2]; }, "not increasing");
  bad([](MultiModalInput& m) { m.grids.clear(); }, "at least one image grid");
}

}  // namespace
}  // namespace ds::runtime
