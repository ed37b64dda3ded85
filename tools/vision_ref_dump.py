#!/usr/bin/env python3
"""Reference dump for deltaserve's vision stage (run where transformers + torch + Pillow exist, e.g. the GPU box).

For each image given, writes to OUT.safetensors (float32 unless noted):
  <name>.pil22          uint8 [H', W', 3]  PIL Image.resize(BICUBIC) to the smart-resize size (Pillow's 22-bit weights)
  <name>.torch_u8       uint8 [H', W', 3]  torchvision F.resize(antialias=True, BICUBIC) on the uint8 tensor
  <name>.pixel_values   [P, 1536]          the processor's output (AutoImageProcessor of --model)
  <name>.grid_thw       int64 [1, 3]
and, with --features, <name>.features [P/4, out_hidden] from the model's vision tower in fp32.
Compare with `deltaserve` through tests/unit/test_vision.cpp-style checks: vision::resize_bicubic with
ResizePrecision::Pil must equal .pil22 exactly, ResizePrecision::Int16 must equal .torch_u8 exactly, and
preprocess_image must equal .pixel_values to ~1e-7.

usage: tools/vision_ref_dump.py --model DIR --out ref.safetensors IMG [IMG ...] [--features]
"""
import argparse
import math
import os

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import save_file


def smart_resize(h, w, factor, min_pixels, max_pixels):
    if max(h, w) / min(h, w) > 200:
        raise ValueError("aspect ratio > 200")
    hb, wb = round(h / factor) * factor, round(w / factor) * factor
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb = max(factor, math.floor(h / beta / factor) * factor)
        wb = max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb = math.ceil(h * beta / factor) * factor
        wb = math.ceil(w * beta / factor) * factor
    return hb, wb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--features", action="store_true")
    ap.add_argument("images", nargs="+")
    a = ap.parse_args()

    from transformers import AutoImageProcessor
    import torchvision.transforms.v2.functional as F

    proc = AutoImageProcessor.from_pretrained(a.model)
    factor = proc.patch_size * proc.merge_size
    size = getattr(proc, "size", {}) or {}
    min_px = size.get("shortest_edge", getattr(proc, "min_pixels", 65536))
    max_px = size.get("longest_edge", getattr(proc, "max_pixels", 16777216))
    out = {}
    model = None
    if a.features:
        from transformers import AutoModelForImageTextToText
        model = AutoModelForImageTextToText.from_pretrained(a.model, torch_dtype=torch.float32).eval()
    for path in a.images:
        name = os.path.splitext(os.path.basename(path))[0]
        img = ImageOps.exif_transpose(Image.open(path))
        if img.mode != "RGB":  # transformers' convert_to_rgb: alpha over white
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255))
            img = Image.alpha_composite(bg, rgba).convert("RGB")
        h, w = smart_resize(img.height, img.width, factor, min_px, max_px)
        out[f"{name}.pil22"] = torch.from_numpy(np.array(img.resize((w, h), Image.BICUBIC)))
        t = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
        out[f"{name}.torch_u8"] = F.resize(t, [h, w], interpolation=F.InterpolationMode.BICUBIC,
                                           antialias=True).permute(1, 2, 0).contiguous()
        r = proc(images=[img], return_tensors="pt")
        out[f"{name}.pixel_values"] = r["pixel_values"].float()
        out[f"{name}.grid_thw"] = r["image_grid_thw"].long()
        if model is not None:
            with torch.no_grad():
                feats = model.model.get_image_features(r["pixel_values"], r["image_grid_thw"])
            feats = feats[0] if isinstance(feats, (list, tuple)) else getattr(feats, "pooler_output", feats)
            out[f"{name}.features"] = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats.float()
    save_file({k: v.contiguous() for k, v in out.items()}, a.out)
    print(f"wrote {a.out}: {', '.join(sorted(out))}")


if __name__ == "__main__":
    main()
