#!/usr/bin/env python3
"""Reference dump for issue #9: a tiny random dense Qwen3.5 model whose Gated DeltaNet has 3 value heads per key
head (like the real 27B: 48 value / 16 key heads), run by Hugging Face transformers in fp32.

Needs torch, transformers (5.17 was used for the project's fixtures) and safetensors; runs on the CPU on
purpose: transformers' torch fallbacks for the DeltaNet recurrence and the causal conv are then used (no
flash-linear-attention kernels, no TF32).

Writes under --out (default out/tiny-dense3):
  tiny-dense3-bf16/       complete model folder: config.json (written by transformers), model.safetensors (BF16,
                          text weights only: no vision tower, no MTP block), generation_config.json, tokenizer
                          files and the project's own chat_template.jinja copied from --src
  golden.safetensors      float32: prompt{i}.logits (all rows, or the last 16 rows of prompts > 64 tokens),
                          prompt{i}.gen_logits [8, V] (the logits of 8 cached greedy decoding steps; row 0 is the
                          prompt's last row)
  golden.json             prompts (token ids), greedy continuations, smallest top-1/top-2 margins, provenance

The model is derived from the tiny-dense BF16 config (--src): linear_num_value_heads = 3 x linear_num_key_heads
(2 key / 6 value heads), and smaller elsewhere to keep the committed data small (hidden 64, MLP 96, layers
[linear, linear, full]). Every parameter is random (norm weights, dt_bias and A_log included), the weights are
rounded to BF16 and the reference runs on the BF16 values upcast to fp32.

usage: tools/dense3_ref_dump.py [--src tests/data/tiny-dense/tiny-dense-bf16] [--out out/tiny-dense3]
"""
import argparse
import json
import os
import re
import shutil
import time

KEY_HEADS = 2
VALUE_HEADS = 3 * KEY_HEADS
SEED = 9  # issue #9
GEN_STEPS = 8
TAIL_ROWS = 16  # rows kept of prompts longer than 64 tokens
PROMPT_LENGTHS = [6, 20, 150]


def derived_config(src):
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    t = cfg["text_config"]
    t["linear_num_key_heads"] = KEY_HEADS
    t["linear_num_value_heads"] = VALUE_HEADS
    # Small, to keep the committed checkpoint small (the 2048-row embedding and lm_head dominate). Like the 27B
    # (hidden 5120, 24 x 256 query dims) the attention width exceeds the hidden size.
    t["hidden_size"] = 64
    t["intermediate_size"] = 96  # not square with hidden: a transposed MLP layout cannot pass
    t["layer_types"] = ["linear_attention", "linear_attention", "full_attention"]
    t["num_hidden_layers"] = 3
    t["mtp_num_hidden_layers"] = 0
    cfg["vision_config"]["out_hidden_size"] = t["hidden_size"]  # consistent, though no vision weights are saved
    return cfg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default="tests/data/tiny-dense/tiny-dense-bf16")
    ap.add_argument("--out", default="out/tiny-dense3")
    a = ap.parse_args()
    t0 = time.time()

    import torch
    import transformers
    from safetensors.torch import save_file

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    torch.manual_seed(SEED)

    mdir = os.path.join(a.out, "tiny-dense3-bf16")
    os.makedirs(mdir, exist_ok=True)
    with open(os.path.join(mdir, "config.json"), "w") as f:
        json.dump(derived_config(a.src), f, indent=2)
    cfg = transformers.AutoConfig.from_pretrained(mdir)
    tc = cfg.text_config
    assert tc.linear_num_value_heads == 3 * tc.linear_num_key_heads, (tc.linear_num_value_heads, tc.linear_num_key_heads)
    cls = getattr(transformers, cfg.architectures[0])  # Qwen3_5ForConditionalGeneration
    model = cls(cfg).float().eval()
    try:
        model.set_attn_implementation("eager")
    except Exception as e:  # older API: sdpa in fp32 on the CPU is exact enough too
        print(f"note: eager attention not set ({e})")

    # Every parameter random and every one of them mattering (fixtures README: "Norm weights, dt_bias and the router
    # are randomised so that every parameter matters").
    std = float(tc.initializer_range)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.empty_like(p).uniform_(1.0, 16.0)))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn_like(p) * 0.5)
            elif "norm" in name and p.dim() == 1:
                # Keeps the initial value (1 for plain norms, 0 for the (1 + w) norms) and perturbs it.
                p.add_(torch.randn_like(p) * 0.2)
            elif "bias" in name and p.dim() == 1:
                p.copy_(torch.randn_like(p) * std)
            else:
                p.copy_(torch.randn_like(p) * std)
        # BF16 checkpoint; the reference runs on exactly those values in fp32.
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())

    # Checkpoint: text weights only, under the names of the tiny-dense fixture (checked below).
    with open(os.path.join(a.src, "model.safetensors.index.json")) as f:
        fixture_names = set(json.load(f)["weight_map"])
    norm = lambda n: re.sub(r"\.layers\.\d+\.", ".layers.N.", n)
    known = {norm(n) for n in fixture_names}
    wanted = {norm(n) for n in fixture_names if n.startswith("model.language_model.") or n == "lm_head.weight"}
    text_only = lambda d: {k: v.detach().to(torch.bfloat16).contiguous() for k, v in d.items()
                           if not k.startswith("model.visual.") and not k.startswith("mtp.")}

    def mismatch(sd):
        unknown = sorted(n for n in sd if norm(n) not in known)
        missing = sorted(wanted - {norm(n) for n in sd})
        return (f"names unlike the tiny-dense fixture's {unknown[:6]}" if unknown else "") + \
               (f" fixture names missing {missing[:6]}" if missing else "")

    sd = text_only(model.state_dict())
    if mismatch(sd):
        # The module names differ from the checkpoint names: let transformers write the checkpoint (it applies its
        # own renaming) and read that back.
        print(f"note: state_dict {mismatch(sd)}; using save_pretrained's names")
        import glob
        import tempfile
        from safetensors.torch import load_file
        tmp = tempfile.mkdtemp()
        model.save_pretrained(tmp)
        saved = {}
        for fn in sorted(glob.glob(os.path.join(tmp, "*.safetensors"))):
            saved.update(load_file(fn))
        sd = text_only(saved)
        shutil.rmtree(tmp)
    if mismatch(sd):
        raise SystemExit(f"checkpoint tensor {mismatch(sd)}")
    save_file(sd, os.path.join(mdir, "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(mdir)  # config.json as transformers writes it
    for fn in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]:
        if os.path.exists(os.path.join(a.src, fn)):
            shutil.copy(os.path.join(a.src, fn), os.path.join(mdir, fn))

    # Prompts: random ids among the tokens the tiny tokenizer assigns to merges (< 1984, below the added tokens).
    V = tc.vocab_size
    g = torch.Generator().manual_seed(SEED)
    prompts = [torch.randint(0, 1984, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    golden, meta = {}, []
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            x = torch.tensor([ids])
            logits = model(input_ids=x, use_cache=False).logits[0].float()
            assert logits.shape == (len(ids), V), logits.shape
            rows = logits if len(ids) <= 64 else logits[-TAIL_ROWS:]
            golden[f"prompt{i}.logits"] = rows.contiguous()
            out = model.generate(x, max_new_tokens=GEN_STEPS, min_new_tokens=GEN_STEPS, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=0)
            gen = torch.stack([l[0].float() for l in out.logits])
            greedy = out.sequences[0, len(ids):].tolist()
            assert gen.shape == (GEN_STEPS, V) and len(greedy) == GEN_STEPS, (gen.shape, greedy)
            # The cached decode's first row is the prompt's last row: the two paths must agree.
            first = float((gen[0] - logits[-1]).norm() / logits[-1].norm())
            golden[f"prompt{i}.gen_logits"] = gen.contiguous()
            top2 = gen.topk(2, dim=-1).values
            meta.append({"prompt": ids, "greedy": greedy, "rows": int(rows.shape[0]),
                         "min_top2_margin": float((top2[:, 0] - top2[:, 1]).min()),
                         "prefill_vs_decode_row0_rel_l2": first})
            print(f"prompt{i}: {len(ids)} tokens, {rows.shape[0]} rows kept, greedy {greedy}, "
                  f"row0 agreement {first:.2g}")
    save_file(golden, os.path.join(a.out, "golden.safetensors"))
    with open(os.path.join(a.out, "golden.json"), "w") as f:
        json.dump({
            "provenance": (f"tools/dense3_ref_dump.py: transformers {transformers.__version__}, torch {torch.__version__}, "
                           f"{cls.__name__}, CPU, fp32 math (BF16-rounded weights upcast), TF32 off, seed {SEED}"),
            "linear_num_key_heads": tc.linear_num_key_heads, "linear_num_value_heads": tc.linear_num_value_heads,
            "gen_steps": GEN_STEPS, "tail_rows": TAIL_ROWS, "text": meta}, f, indent=1)
    print(f"wrote {a.out} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
