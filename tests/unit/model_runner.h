// Drives a model through its caches the way the golden tests need (tests/unit and tests/cuda share it).
#pragma once
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "golden_util.h"

#include "model/model.h"
#include "runtime/cache.h"

namespace ds::test {

inline std::vector<int32_t> ids(const nlohmann::json& j) { return j.get<std::vector<int32_t>>(); }

// A tiny checkpoint on a backend with its golden outputs, loaded once per process and parameter: `param` is
// "<fixture>/<variant>" (e.g. "tiny-moe/int4"), `dir` the fixtures folder, make() the backend.
struct GoldenFixture {
  std::unique_ptr<Backend> be;
  std::unique_ptr<model::Model> m;
  nlohmann::json golden;
  nlohmann::json bf16err;  // the bf16 reference's errors where its tensors were trimmed (tests/data/README.md)
  std::unique_ptr<Golden> tensors;
};
template <class MakeBackend>
GoldenFixture& golden_fixture(const std::string& param, const std::string& dir, MakeBackend make) {
  static std::map<std::string, GoldenFixture> cache;
  auto it = cache.find(param);
  if (it != cache.end()) return it->second;
  GoldenFixture& f = cache[param];
  const std::string fx = param.substr(0, param.find('/')), variant = param.substr(param.find('/') + 1);
  const std::string d = dir + "/" + fx + "/";
  f.be = make();
  f.m = model::Model::load(d + fx + "-" + variant, *f.be);
  f.golden = read_json(d + "golden.json");
  f.tensors = std::make_unique<Golden>(d + "golden.safetensors");
  std::ifstream e(d + "bf16ref-errors.json");
  if (e) f.bf16err = nlohmann::json::parse(e)["errors"];
  return f;
}

// Runs several sequences through one cache pool. Each step's entry i feeds tokens to sequence i (an
// empty list skips it). Returns, per sequence, the logits rows of every token fed, concatenated.
inline std::vector<std::vector<float>> run_steps(model::Model& m, int nseq,
                                          const std::vector<std::vector<std::vector<int32_t>>>& steps) {
  runtime::CacheManager cm(m, 256, 16, nseq);
  std::vector<runtime::SeqCache> seqs(nseq);
  for (auto& s : seqs) cm.start(s);
  std::vector<std::vector<float>> out(nseq);
  const int64_t V = m.config().text.vocab_size;
  for (auto& step : steps) {
    std::vector<std::pair<const runtime::SeqCache*, std::vector<int32_t>>> parts;
    std::vector<int> who;
    for (int i = 0; i < nseq; ++i) {
      if (step[i].empty()) continue;
      EXPECT_TRUE(cm.reserve(seqs[i], int64_t(step[i].size())));
      parts.push_back({&seqs[i], step[i]});
      who.push_back(i);
    }
    BatchMeta b = runtime::make_batch(parts);
    std::vector<int32_t> rows(static_cast<size_t>(b.num_tokens()));
    for (size_t r = 0; r < rows.size(); ++r) rows[r] = int32_t(r);
    auto logits = m.backend().to_host_f32(m.forward(b, cm.caches(), rows));
    for (size_t p = 0; p < who.size(); ++p) {
      auto& s = b.seqs[p];
      out[who[p]].insert(out[who[p]].end(), logits.begin() + s.q_start * V, logits.begin() + (s.q_start + s.q_len) * V);
      seqs[who[p]].len += s.q_len;
    }
  }
  return out;
}

inline std::vector<float> run_one(model::Model& m, const std::vector<int32_t>& toks, size_t prefill) {
  std::vector<std::vector<std::vector<int32_t>>> steps;
  steps.push_back({std::vector<int32_t>(toks.begin(), toks.begin() + prefill)});
  for (size_t i = prefill; i < toks.size(); ++i) steps.push_back({{toks[i]}});
  return run_steps(m, 1, steps)[0];
}

inline std::vector<float> last_rows(const std::vector<float>& v, int64_t rows, int64_t V) {
  return std::vector<float>(v.end() - rows * V, v.end());
}

// A teacher-forced decode: `prompt` prefilled as one chunk, then a reference's greedy tokens, all but the last, fed
// one per step. Returns the logits rows of the last `steps` tokens fed: a reference's gen_logits rows (the prompt's
// last row, then one per greedy token fed) when steps = greedy.size().
inline std::vector<float> teacher_forced(model::Model& m, std::vector<int32_t> prompt,
                                         const std::vector<int32_t>& greedy, int64_t steps) {
  const size_t P = prompt.size();
  prompt.insert(prompt.end(), greedy.begin(), greedy.end() - 1);
  return last_rows(run_one(m, prompt, P), steps, m.config().text.vocab_size);
}

// Every prompt with its first 3 greedy tokens, run alone (a prefill, then 3 one-token steps) and all together in one
// cache pool, staggered: prompts 0..2 prefill together in step 1; in step 2 they decode while the others prefill (a
// mixed step); then each decodes its remaining tokens one per step. Returns {batched, alone}: each prompt's logits
// rows, in the order fed.
struct BatchedAlone {
  std::vector<std::vector<float>> batched, alone;
};
inline BatchedAlone staggered_batch(model::Model& m, const nlohmann::json& prompts) {
  const int n = int(prompts.size());
  std::vector<std::vector<int32_t>> toks(n);
  BatchedAlone r;
  r.alone.resize(size_t(n));
  for (int i = 0; i < n; ++i) {
    toks[i] = ids(prompts[i]["prompt"]);
    auto g = ids(prompts[i]["greedy"]);
    toks[i].insert(toks[i].end(), g.begin(), g.begin() + 3);
    r.alone[i] = run_one(m, toks[i], toks[i].size() - 3);
  }
  std::vector<std::vector<std::vector<int32_t>>> steps(5, std::vector<std::vector<int32_t>>(n));
  for (int i = 0; i < n; ++i) {
    const size_t P = toks[i].size() - 3;
    const int first = i < 3 ? 0 : 1;
    steps[first][i] = std::vector<int32_t>(toks[i].begin(), toks[i].begin() + P);
    for (int k = 0; k < 3; ++k) steps[first + 1 + k][i] = {toks[i][P + k]};
  }
  r.batched = run_steps(m, n, steps);
  return r;
}

}  // namespace ds::test
