// logits / generate / inspect: run the text model from the command line.
#include <cstdio>
#include <cstring>

#include "backend/ops.h"
#include "cli/args.h"
#include "cli/commands.h"
#include "io/config.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "runtime/cache.h"
#include "text/tokenizer.h"
#include "vision/video.h"
#include "vision/preprocess.h"

namespace ds::cli {

std::vector<int32_t> parse_token_list(const std::string& s) {
  std::vector<int32_t> v;
  size_t i = 0;
  while (i < s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    std::string part = s.substr(i, j - i);
    try {
      size_t pos = 0;
      long long x = std::stoll(part, &pos);
      if (pos != part.size() || x < 0 || x > INT32_MAX) throw std::invalid_argument(part);
      v.push_back(int32_t(x));
    } catch (...) {
      fail("--tokens: expected comma-separated non-negative integers, got '", part, "'");
    }
    i = j + 1;
  }
  if (v.empty()) fail("--tokens: expected at least one token id");
  return v;
}

namespace {

// Images of one prompt, ready for the forward pass: the vision features and where they go.
struct PromptImages {
  Tensor features;                  // act dtype [R, H]: one row per expanded <|image_pad|> token
  std::vector<int32_t> rows;        // their rows in the expanded prompt
  std::vector<int32_t> positions;   // mRoPE [3, T] of the whole expanded prompt
  int64_t rope_delta = 0;
};

// Runs `tokens` through one sequence: the first `prefill` tokens in one call, the rest one at a time.
// Returns fp32 logits [T, V] for every position. With `img`, image features replace the placeholder rows
// of whichever call holds them, and positions are the prompt's mRoPE positions.
std::vector<float> run_logits(model::Model& m, const std::vector<int32_t>& tokens, int64_t prefill,
                              const PromptImages* img = nullptr) {
  const int64_t T = int64_t(tokens.size()), V = m.config().text.vocab_size, bs = 16;
  runtime::CacheManager cm(m, (T + bs - 1) / bs + 1, bs, 1);
  runtime::SeqCache seq;
  cm.start(seq);
  std::vector<float> out;
  out.reserve(size_t(T * V));
  int64_t pos = 0;
  while (pos < T) {
    int64_t n = pos == 0 ? prefill : 1;
    std::vector<int32_t> chunk(tokens.begin() + pos, tokens.begin() + pos + n);
    if (!cm.reserve(seq, n)) fail("internal: KV pool too small");
    BatchMeta b = runtime::make_batch({{&seq, chunk}});
    if (img) {
      for (int r = 0; r < 3; ++r)
        for (int64_t i = 0; i < n; ++i) b.positions[size_t(r * n + i)] = img->positions[size_t(r * T + pos + i)];
      std::vector<int32_t> src;
      for (size_t k = 0; k < img->rows.size(); ++k)
        if (img->rows[k] >= pos && img->rows[k] < pos + n) {
          b.embed_rows.push_back(int32_t(img->rows[k] - pos));
          src.push_back(int32_t(k));
        }
      if (!src.empty()) {
        b.embed_src = m.backend().alloc(m.backend().act_dtype(), {int64_t(src.size()), img->features.dim(1)});
        m.backend().gather_rows(img->features, src, b.embed_src);
      }
    }
    std::vector<int32_t> rows(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) rows[i] = int32_t(i);
    Tensor logits = m.forward(b, cm.caches(), rows);
    auto host = m.backend().to_host_f32(logits);
    out.insert(out.end(), host.begin(), host.end());
    seq.len += n;
    pos += n;
  }
  return out;
}

// --image FILE... / --video FILE...: preprocess, run the vision tower, expand each <|image_pad|> and each
// <|vision_start|><|video_pad|><|vision_end|> of `tokens` in place. The command line has token ids, so a video's
// timestamp text ("<0.3 seconds>") is tokenized on its own; the server expands the rendered text instead, as the
// reference processor does (the two agree unless the character before the placeholder merges with '<').
PromptImages prepare_images(model::Model& m, const std::string& model_dir, const std::vector<std::string>& files,
                            const std::vector<std::string>& videos, std::vector<int32_t>& tokens) {
  const auto& cfg = m.config();
  const char* flag = files.empty() ? "--video" : "--image";
  if (!m.has_vision()) fail(model_dir, ": ", flag, " needs a vision tower, but the checkpoint has none");
  if (!files.empty() && cfg.image_token_id < 0) fail(model_dir, ": config.json has no image_token_id");
  if (!videos.empty() && (cfg.video_token_id < 0 || cfg.vision_start_token_id < 0 || cfg.vision_end_token_id < 0))
    fail(model_dir, ": config.json lacks video_token_id / vision_start_token_id / vision_end_token_id");
  const auto pcfg = vision::load_preprocess_config(model_dir);
  const auto vcfg = vision::load_video_config(model_dir);
  for (auto* p : {&pcfg, &vcfg.p})
    if (p->merge_size != cfg.vision.spatial_merge_size || p->patch_size != cfg.vision.patch_size ||
        p->temporal_patch_size != cfg.vision.temporal_patch_size)
      fail(model_dir, ": ", p == &pcfg ? "preprocessor_config.json" : "video_preprocessor_config.json", " (patch ",
           p->patch_size, ", temporal ", p->temporal_patch_size, ", merge ", p->merge_size,
           ") disagrees with vision_config (patch ", cfg.vision.patch_size, ", temporal ",
           cfg.vision.temporal_patch_size, ", merge ", cfg.vision.spatial_merge_size, ")");
  vision::SourcePolicy policy;
  policy.allow_any_file = true;  // the command line names its own files
  std::vector<vision::PixelValues> ipv, vpv;
  std::vector<vision::ImageGrid> igrids, vgrids;
  for (auto& f : files) {
    ipv.push_back(vision::preprocess_image(vision::load_image(f, policy), pcfg));
    const auto& g = ipv.back().grid;
    igrids.push_back(g);
    std::fprintf(stderr, "image %s: grid [%lld, %lld, %lld], %lld tokens\n", f.c_str(), (long long)g.t,
                 (long long)g.h, (long long)g.w, (long long)g.tokens(pcfg.merge_size));
  }
  const int32_t pad = int32_t(cfg.image_token_id), vpad = int32_t(cfg.video_token_id);
  if (!files.empty()) tokens = vision::expand_image_placeholders(tokens, pad, igrids, pcfg.merge_size);
  if (!videos.empty()) {
    const int32_t vs = int32_t(cfg.vision_start_token_id), ve = int32_t(cfg.vision_end_token_id);
    auto tok = text::Tokenizer::load(model_dir);
    vision::VideoLimits lim;
    std::vector<int32_t> out;
    size_t k = 0;
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (tokens[i] != vpad) {
        out.push_back(tokens[i]);
        continue;
      }
      if (k >= videos.size()) fail("--tokens: more <|video_pad|> tokens than --video files (", videos.size(), ")");
      const auto& f = videos[k++];
      auto v = vision::decode_video(vision::read_video_bytes(f, policy, lim.max_bytes), vcfg.sampling, lim);
      vpv.push_back(vision::preprocess_video(v.frames, vcfg.p));
      const auto& g = vpv.back().grid;
      vgrids.push_back(g);
      const auto ts = vision::group_timestamps(v.indices, v.fps, vcfg.p.temporal_patch_size);
      std::string idx;
      for (auto x : v.indices) idx += (idx.empty() ? "" : ",") + std::to_string(x);
      std::fprintf(stderr, "video %s: %s/%s %lldx%lld, %.6g fps, %lld frames, sampled [%s], grid [%lld, %lld, %lld], "
                   "%lld tokens\n", f.c_str(), v.container.c_str(), v.codec.c_str(), (long long)v.width,
                   (long long)v.height, v.fps, (long long)v.total_frames, idx.c_str(), (long long)g.t,
                   (long long)g.h, (long long)g.w, (long long)g.tokens(vcfg.p.merge_size));
      // The triple (or a bare pad) becomes "<t seconds>" vs pad ve per temporal group.
      const bool whole = !out.empty() && out.back() == vs && i + 1 < tokens.size() && tokens[i + 1] == ve;
      if (whole) out.pop_back();
      auto rep = tok.encode(vision::video_prompt_text(ts), true);
      out.insert(out.end(), rep.begin(), rep.end());
      if (whole) ++i;
    }
    if (k != videos.size()) fail("--tokens holds ", k, " <|video_pad|> tokens but ", videos.size(), " --video files");
    std::vector<vision::ImageGrid> units;
    for (auto& g : vgrids)
      for (auto& u : vision::video_units(g)) units.push_back(u);
    tokens = vision::expand_image_placeholders(out, vpad, units, vcfg.p.merge_size);
  }
  const auto L = vision::media_layout(tokens, pad, igrids, videos.empty() ? -1 : vpad, vgrids, pcfg.merge_size);
  PromptImages img;
  auto mp = vision::mrope_positions(tokens, pad, L.units, pcfg.merge_size, videos.empty() ? -1 : vpad);
  img.positions = std::move(mp.pos);
  img.rope_delta = mp.rope_delta;
  for (size_t i = 0; i < tokens.size(); ++i)
    if (tokens[i] == pad || (!videos.empty() && tokens[i] == vpad)) img.rows.push_back(int32_t(i));
  std::vector<float> pixels;
  std::vector<std::array<int64_t, 3>> thw;
  for (auto [is_video, k] : L.order) {
    const auto& pv = is_video ? vpv[size_t(k)] : ipv[size_t(k)];
    pixels.insert(pixels.end(), pv.data.begin(), pv.data.end());
    thw.push_back({pv.grid.t, pv.grid.h, pv.grid.w});
  }
  img.features = m.encode_images(pixels, thw);
  return img;
}

// The --model checkpoint with the load options the model commands share: --mamba-ssm-cache-dtype.
std::unique_ptr<model::Model> load_model(const Args& a, Backend& be) {
  model::LoadOptions lo;
  lo.ssm_state_dtype = a.get("mamba-ssm-cache-dtype", "auto");
  return model::Model::load(a.model_dir(), be, nullptr, lo);
}

}  // namespace

int cmd_logits(int argc, char** argv) {
  Args a(argc, argv, 2);
  a.only("logits", {"tokens", "out", "image", "video", "prefill", "backend", "mamba-ssm-cache-dtype"});
  auto tokens = parse_token_list(a.require("tokens"));
  std::string out = a.require("out");
  auto images = a.get_all("image");
  auto videos = a.get_all("video");
  auto be = make_backend(a.get("backend", "cpu"));
  auto m = load_model(a, *be);
  const int64_t V = m->config().text.vocab_size;
  for (auto t : tokens)
    if (t >= V) fail("--tokens: id ", t, " is outside the model's vocabulary [0, ", V, ")");
  PromptImages img;
  const bool mm = !images.empty() || !videos.empty();
  if (mm) img = prepare_images(*m, a.model_dir(), images, videos, tokens);
  const int64_t T = int64_t(tokens.size());
  int64_t prefill = a.get_int("prefill", T);
  if (prefill < 1 || prefill > T) fail("--prefill: expected 1..", T, " (the number of tokens), got ", prefill);
  auto logits = run_logits(*m, tokens, prefill, mm ? &img : nullptr);
  std::vector<io::TensorOut> outs = {{"logits", DType::F32, {T, V}, logits.data()}};
  std::vector<float> feats;
  std::vector<int32_t> pos = img.positions;
  std::vector<int32_t> ids = tokens;
  if (mm) {
    feats = be->to_host_f32(img.features);
    outs.push_back({"input_ids", DType::I32, {T}, ids.data()});
    outs.push_back({"image_features", DType::F32, img.features.shape, feats.data()});
    outs.push_back({"position_ids", DType::I32, {3, T}, pos.data()});
  }
  io::safetensors_write(out, outs);
  std::fprintf(stderr, "wrote %s: logits [%lld, %lld]\n", out.c_str(), (long long)T, (long long)V);
  return 0;
}

int cmd_generate(int argc, char** argv) {
  Args a(argc, argv, 2);
  a.only("generate", {"tokens", "max-tokens", "backend", "mamba-ssm-cache-dtype"});
  auto tokens = parse_token_list(a.require("tokens"));
  int64_t max_tokens = a.get_int("max-tokens", 16);
  auto be = make_backend(a.get("backend", "cpu"));
  auto m = load_model(a, *be);
  const int64_t V = m->config().text.vocab_size, bs = 16;
  const int64_t total = int64_t(tokens.size()) + max_tokens;
  runtime::CacheManager cm(*m, (total + bs - 1) / bs + 1, bs, 1);
  runtime::SeqCache seq;
  cm.start(seq);
  std::vector<int32_t> feed = tokens, generated;
  for (int64_t step = 0; step < max_tokens; ++step) {
    cm.reserve(seq, int64_t(feed.size()));
    BatchMeta b = runtime::make_batch({{&seq, feed}});
    Tensor logits = m->forward(b, cm.caches(), {int32_t(feed.size() - 1)});
    auto host = be->to_host_f32(logits);
    seq.len += int64_t(feed.size());
    int32_t best = 0;
    for (int64_t v = 1; v < V; ++v)
      if (host[v] > host[best]) best = int32_t(v);
    generated.push_back(best);
    feed = {best};
  }
  for (size_t i = 0; i < generated.size(); ++i) std::printf("%s%d", i ? "," : "", generated[i]);
  std::printf("\n");
  return 0;
}

int cmd_inspect(int argc, char** argv) {
  Args a(argc, argv, 2);
  a.only("inspect", {});
  std::string path = a.model_dir();
  io::ModelConfig cfg = io::load_model_config(path);
  const auto& t = cfg.text;
  auto pc = io::count_params(cfg);
  std::printf("architecture: %s (model_type %s)\n", cfg.architecture.c_str(), cfg.model_type.c_str());
  std::printf("text: hidden %lld, %lld layers (%d gated DeltaNet, %d gated full attention), vocab %lld\n",
              (long long)t.hidden_size, (long long)t.num_layers, t.num_linear_layers(), t.num_full_layers(),
              (long long)t.vocab_size);
  std::printf("  layer types: ");
  for (auto lt : t.layer_types) std::printf("%c", lt == io::LayerType::FullAttention ? 'A' : 'L');
  std::printf("  (L = linear attention, A = full attention)\n");
  std::printf("  full attention: %lld q heads, %lld kv heads, head_dim %lld, rotary %lld dims, theta %g, "
              "mrope_section [%d, %d, %d]%s\n",
              (long long)t.num_heads, (long long)t.num_kv_heads, (long long)t.head_dim, (long long)t.rotary_dim(),
              t.rope.theta, t.rope.mrope_section[0], t.rope.mrope_section[1], t.rope.mrope_section[2],
              t.rope.mrope_interleaved ? " interleaved" : "");
  std::printf("  gated DeltaNet: %lld key heads x %lld, %lld value heads x %lld, conv kernel %lld\n",
              (long long)t.lin_num_k_heads, (long long)t.lin_k_head_dim, (long long)t.lin_num_v_heads,
              (long long)t.lin_v_head_dim, (long long)t.conv_kernel);
  if (t.moe)
    std::printf("  MoE: %lld experts, top-%lld, expert intermediate %lld, shared expert intermediate %lld\n",
                (long long)t.num_experts, (long long)t.num_experts_per_tok, (long long)t.moe_intermediate_size,
                (long long)t.shared_expert_intermediate_size);
  else
    std::printf("  dense MLP: intermediate %lld\n", (long long)t.intermediate_size);
  std::printf("  MTP layers: %lld\n", (long long)t.mtp_num_hidden_layers);
  if (cfg.vision.present)
    std::printf("vision: depth %lld, hidden %lld, %lld heads, patch %lld, merge %lld, out %lld\n",
                (long long)cfg.vision.depth, (long long)cfg.vision.hidden_size, (long long)cfg.vision.num_heads,
                (long long)cfg.vision.patch_size, (long long)cfg.vision.spatial_merge_size,
                (long long)cfg.vision.out_hidden_size);
  auto human = [](int64_t n) {
    char buf[32];
    if (n >= 100000000) std::snprintf(buf, sizeof buf, "%.2f B", double(n) / 1e9);
    else std::snprintf(buf, sizeof buf, "%.3f M", double(n) / 1e6);
    return std::string(buf);
  };
  std::printf("parameters: text %s (without MTP), MTP %s, vision %s; active per token %s\n", human(pc.text).c_str(),
              human(pc.mtp).c_str(), human(pc.vision).c_str(), human(pc.active).c_str());
  if (cfg.quant.enabled()) {
    std::printf("quantization: %s, %d-bit, group %d, %s, packing %s\n", cfg.quant.method.c_str(), cfg.quant.bits,
                cfg.quant.group_size, cfg.quant.sym ? "sym" : "asym", cfg.quant.packing_format.c_str());
    std::printf("  int4 parameters: %s; blocks quantized: ", human(pc.int4_params).c_str());
    for (auto& p : cfg.quant.block_name_to_quantize) std::printf("%s ", p.c_str());
    std::printf("\n  per module (layer 0 / first full-attention layer):\n");
    const std::string lm = cfg.lm_prefix;
    int first_full = -1;
    for (size_t i = 0; i < t.layer_types.size(); ++i)
      if (t.layer_types[i] == io::LayerType::FullAttention && first_full < 0) first_full = int(i);
    std::vector<std::string> mods;
    for (auto m : {"linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_a", "linear_attn.in_proj_b",
                   "linear_attn.out_proj"})
      mods.push_back(lm + ".layers.0." + m);
    if (first_full >= 0)
      for (auto m : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"})
        mods.push_back(lm + ".layers." + std::to_string(first_full) + "." + m);
    for (auto m : t.moe ? std::vector<std::string>{"mlp.gate", "mlp.experts.0.gate_proj", "mlp.experts.0.down_proj",
                                                  "mlp.shared_expert.gate_proj", "mlp.shared_expert_gate"}
                        : std::vector<std::string>{"mlp.gate_proj", "mlp.down_proj"})
      mods.push_back(lm + ".layers.0." + m);
    mods.push_back("lm_head");
    mods.push_back("mtp.layers.0.self_attn.q_proj");
    for (auto& m : mods) std::printf("    %-60s %s\n", m.c_str(), cfg.quant.is_quantized(m) ? "int4" : "bf16");
  } else {
    std::printf("quantization: none (BF16 checkpoint)\n");
  }
  std::printf("weights memory (text + MTP, checkpoint precision): %.2f GiB\n", double(pc.weight_bytes) / (1ull << 30));
  return 0;
}

}  // namespace ds::cli

namespace ds::cli {

// MTP head on a prompt: first pass over every prompt row (fed the next prompt token, or --next for the
// last row), then K-1 chained draft steps fed the previous step's argmax and MTP output hidden.
int cmd_mtp_logits(int argc, char** argv) {
  Args a(argc, argv, 2);
  a.only("mtp-logits", {"tokens", "next", "draft-steps", "out", "backend", "mamba-ssm-cache-dtype"});
  auto prompt = parse_token_list(a.require("tokens"));
  auto next = parse_token_list(a.require("next"));
  if (next.size() != 1) fail("--next: expected one token id, got ", next.size());
  const int64_t K = a.get_int("draft-steps", 1);
  if (K < 1 || K > 64) fail("--draft-steps: expected 1..64, got ", K);
  std::string out = a.require("out");
  auto be = make_backend(a.get("backend", "cpu"));
  auto m = load_model(a, *be);
  if (!m->has_mtp()) fail(a.model_dir(), ": the checkpoint has no MTP head (mtp.* tensors)");
  const int64_t N = int64_t(prompt.size()), V = m->config().text.vocab_size, bs = 16;
  for (auto t : prompt)
    if (t >= V) fail("--tokens: id ", t, " is outside the model's vocabulary [0, ", V, ")");
  if (next[0] >= V) fail("--next: id ", next[0], " is outside the model's vocabulary [0, ", V, ")");
  runtime::CacheManager cm(*m, (N + K + bs - 1) / bs + 1, bs, 1);
  runtime::SeqCache seq;
  cm.start(seq);
  cm.reserve(seq, N + K);
  // Main model: hidden states of every prompt row.
  BatchMeta b = runtime::make_batch({{&seq, prompt}});
  std::vector<int32_t> rows(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) rows[i] = int32_t(i);
  Tensor hidden;
  m->forward(b, cm.caches(), rows, &hidden);
  // MTP first pass: row j is fed y_j = x_{j+1} (next for the last row) at position j.
  BatchMeta mb = b;
  for (int64_t j = 0; j < N; ++j) mb.tokens[j] = j + 1 < N ? prompt[j + 1] : next[0];
  Tensor mh;
  Tensor logits = m->mtp_forward(mb, cm.caches(), hidden, rows, &mh);
  auto first = be->to_host_f32(logits);
  std::vector<float> chain;
  auto argmax = [&](const float* r) {
    int32_t best = 0;
    for (int64_t v = 1; v < V; ++v)
      if (r[v] > r[best]) best = int32_t(v);
    return best;
  };
  int32_t draft = argmax(first.data() + (N - 1) * V);
  Tensor prev = mh.rows(N - 1, N);
  for (int64_t k = 1; k < K; ++k) {
    BatchMeta cb = BatchMeta::one_sequence(1, N - 1 + k, seq.slot, seq.blocks);
    cb.tokens = {draft};
    Tensor h2;
    auto l = be->to_host_f32(m->mtp_forward(cb, cm.caches(), prev, {0}, &h2));
    chain.insert(chain.end(), l.begin(), l.end());
    draft = argmax(l.data());
    prev = h2;
  }
  std::vector<io::TensorOut> outs = {{"mtp_logits", DType::F32, {N, V}, first.data()}};
  if (K > 1) outs.push_back({"chain_logits", DType::F32, {K - 1, V}, chain.data()});
  io::safetensors_write(out, outs);
  std::fprintf(stderr, "wrote %s: mtp_logits [%lld, %lld], chain_logits [%lld, %lld]\n", out.c_str(), (long long)N,
               (long long)V, (long long)(K - 1), (long long)V);
  return 0;
}

}  // namespace ds::cli
