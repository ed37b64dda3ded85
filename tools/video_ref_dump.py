#!/usr/bin/env python3
"""Reference dump for deltaserve's video path (issue #7 items 3-4). Runs where torch + transformers +
safetensors + numpy exist (the GPU host; everything here runs on its CPU in fp32, TF32 off). Needs no
video reader: the frames come from deltaserve's own decoder (`deltaserve video-frames CLIP --sampled --out F`,
committed as tests/data/vision/<clip>.frames.safetensors.xz: the sampled frames with their indices, the frame
rate and the frame count; see load_frames). If a reader transformers knows (pyav, decord, torchvision, torchcodec, opencv) is installed,
the clip is also read with it and compared to our frames (informative only).

Writes into --out DIR (flat):
  video-ref.safetensors   float32 unless noted
      indices              int64 [F]     frame indices the video processor sampled (before even padding)
      timestamps           float64 [G]   per temporal group, processor._calculate_timestamps
      pixel_values_videos  [P, 1536]     the processor's output   (pixel_levels: uint8 level form, as images)
      video_grid_thw       int64 [1, 3]
      input_ids            int64 [T]     chat template + processor expansion (timestamps, pads)
      mm_token_type_ids    int64 [T]     when the processor returns them
      position_ids         int64 [3, T]  model.model.get_rope_index;  rope_deltas int64 [1]
      features             [G·h·w/4, D]  model.model.get_video_features (vision tower, fp32)
      logits               [T, V]        tiny-moe fp32 logits of the whole prompt
  video-ref.json          the texts (template output, expanded prompt), sampling and smart_resize cases
                          computed by the reference's own functions, versions, and everything found missing.
usage: tools/video_ref_dump.py --model DIR --frames F.safetensors[.xz] [--video CLIP] --out DIR
"""
import argparse
import inspect
import json
import lzma
import os
import sys
import traceback

import numpy as np

MISSING = []


def note_missing(what, e=None):
    msg = what + (f": {type(e).__name__}: {e}" if e is not None else "")
    MISSING.append(msg)
    print("MISSING/FAILED:", msg, flush=True)


def unpack_xz_dir(d):
    for root, _, files in os.walk(d):
        for f in files:
            if f.endswith(".safetensors.xz"):
                src = os.path.join(root, f)
                dst = src[:-3]
                if not os.path.exists(dst) or os.path.getmtime(dst) < os.path.getmtime(src):
                    with lzma.open(src) as fi, open(dst + ".tmp", "wb") as fo:
                        fo.write(fi.read())
                    os.replace(dst + ".tmp", dst)
                    print(f"unpacked {src}")


def load_frames(path):
    """deltaserve video-frames output: frames uint8 [K, H, W, 3] (the sampled ones, or all), frame_indices int64 [K],
    fps float64 [1], total_num_frames int64 [1]. Returns the whole clip as [total, H, W, 3] with the frames we do
    not have left black: the reference samples its own indices, and a frame it takes that we did not sample
    shows up as a gross pixel mismatch (and in the dumped indices)."""
    from safetensors.numpy import load
    raw = lzma.open(path).read() if path.endswith(".xz") else open(path, "rb").read()
    t = load(raw)
    fr, idx = t["frames"], t["frame_indices"].astype(np.int64)
    total, fps = int(t["total_num_frames"][0]), float(t["fps"][0])
    full = np.zeros((total,) + fr.shape[1:], dtype=np.uint8)
    full[idx] = fr
    return full, {"fps": fps, "total_num_frames": total, "our_indices": idx.tolist(),
                  "our_sampled_indices": t["sampled_indices"].astype(np.int64).tolist()}


def call_with_accepted(fn, **kw):
    try:
        params = inspect.signature(fn).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            kw = {k: v for k, v in kw.items() if k in params}
    except (TypeError, ValueError):
        pass
    return fn(**kw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--frames", required=True)
    ap.add_argument("--video")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompt", default="Describe this video.")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)

    import torch
    import transformers
    from safetensors.torch import save_file
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]}
    print(info, flush=True)
    for mod in ["av", "decord", "torchvision", "torchcodec", "cv2", "PIL"]:
        try:
            __import__(mod)
            info[f"has_{mod}"] = True
        except Exception as e:  # noqa: BLE001
            info[f"has_{mod}"] = False
            note_missing(f"python module {mod}", e)
    unpack_xz_dir(a.model)

    frames, fmeta = load_frames(a.frames)
    N, H, W, _ = frames.shape
    fps = float(fmeta["fps"])
    total = int(fmeta["total_num_frames"])
    print(f"our frames: {frames.shape} {frames.dtype}, fps {fps}, total_num_frames {total}", flush=True)
    out, js = {}, {"versions": info, "frames_meta": fmeta, "missing": MISSING}

    # --- video processor alone ------------------------------------------------------------------
    vp = None
    try:
        from transformers import AutoVideoProcessor
        vp = AutoVideoProcessor.from_pretrained(a.model)
    except Exception as e:  # noqa: BLE001
        note_missing("AutoVideoProcessor.from_pretrained", e)
        try:
            from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
            cfg = json.load(open(os.path.join(a.model, "video_preprocessor_config.json")))
            vp = Qwen3VLVideoProcessor(**{k: v for k, v in cfg.items() if k not in ("processor_class",
                                                                                 "video_processor_type")})
        except Exception as e2:  # noqa: BLE001
            note_missing("Qwen3VLVideoProcessor direct", e2)
    if vp is not None:
        attrs = {k: getattr(vp, k, None) for k in ["fps", "min_frames", "max_frames", "num_frames", "patch_size",
                                                   "temporal_patch_size", "merge_size", "do_sample_frames",
                                                   "cap_pixels_per_frame", "image_mean", "image_std"]}
        size = getattr(vp, "size", None)
        attrs["size"] = {k: getattr(size, k, None) if not isinstance(size, dict) else size.get(k)
                         for k in ["shortest_edge", "longest_edge"]}
        js["video_processor"] = {"class": type(vp).__name__, **{k: (v if isinstance(v, (int, float, str, bool, list,
                                 dict, type(None))) else str(v)) for k, v in attrs.items()}}
        print("video processor:", js["video_processor"], flush=True)

        # Sampling cases through the reference's own sample_frames.
        from transformers.video_utils import VideoMetadata
        cases = []
        for tot, f in [(25, 10.0), (30, 10.0), (7, 30.0), (3, 10.0), (1, 25.0), (2000, 30.0), (100000, 30.0),
                       (299, 29.97), (61, 24.0), (10, 2.0), (9, 1.0), (150, 25.0), (47, 7.5)]:
            try:
                md = VideoMetadata(total_num_frames=tot, fps=f, duration=tot / f)
                idx = call_with_accepted(vp.sample_frames, metadata=md)
                cases.append({"total": tot, "fps": f, "indices": [int(i) for i in np.asarray(idx).tolist()]})
            except Exception as e:  # noqa: BLE001
                cases.append({"total": tot, "fps": f, "error": f"{type(e).__name__}: {e}"})
        js["sampling_cases"] = cases
        # smart_resize cases through the module's function.
        try:
            mod = sys.modules[type(vp).__module__]
            sr = getattr(mod, "smart_resize")
            fac = vp.patch_size * vp.merge_size
            mn, mx = attrs["size"]["shortest_edge"], attrs["size"]["longest_edge"]
            rc = []
            for t, h, w in [(5, 48, 80), (4, 48, 80), (6, 240, 320), (768, 1080, 1920), (2, 20, 12), (4, 16, 600),
                            (3, 1000, 40), (64, 720, 1280), (4, 31, 33), (2, 5000, 30)]:
                try:
                    rh, rw = sr(num_frames=t, height=h, width=w, temporal_factor=vp.temporal_patch_size,
                                factor=fac, min_pixels=mn, max_pixels=mx)
                    rc.append({"t": t, "h": h, "w": w, "rh": int(rh), "rw": int(rw)})
                except Exception as e:  # noqa: BLE001
                    rc.append({"t": t, "h": h, "w": w, "error": f"{type(e).__name__}: {e}"})
            js["smart_resize_cases"] = rc
        except Exception as e:  # noqa: BLE001
            note_missing("video smart_resize", e)

    # --- the whole processor: chat template + expansion ------------------------------------------
    proc = None
    try:
        from transformers import AutoProcessor
        proc = AutoProcessor.from_pretrained(a.model)
        print("processor:", type(proc).__name__, flush=True)
    except Exception as e:  # noqa: BLE001
        note_missing("AutoProcessor.from_pretrained", e)
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()  # [N, 3, H, W]
    md = {"total_num_frames": total, "fps": fps, "duration": total / fps, "width": W, "height": H}
    try:
        from transformers.video_utils import VideoMetadata
        md = VideoMetadata(**md)
    except Exception as e:  # noqa: BLE001
        note_missing("VideoMetadata(**dict); passing a dict", e)
    inputs = None
    if proc is not None:
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": a.prompt}]}]
        try:
            text = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001
            note_missing("processor.apply_chat_template", e)
            text = proc.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        js["template_text"] = text
        try:
            inputs = proc(text=[text], videos=[video], video_metadata=[md], do_sample_frames=True,
                          return_tensors="pt", return_metadata=True)
        except Exception as e:  # noqa: BLE001
            note_missing("processor(text, videos, video_metadata)", e)
            traceback.print_exc()
    if inputs is None and vp is not None:
        try:
            inputs = vp(videos=[video], video_metadata=[md], do_sample_frames=True, return_tensors="pt",
                        return_metadata=True)
        except Exception as e:  # noqa: BLE001
            note_missing("video processor call", e)
            traceback.print_exc()
    if inputs is not None:
        print("processor outputs:", {k: (tuple(v.shape) if hasattr(v, "shape") else type(v).__name__)
                                     for k, v in inputs.items()}, flush=True)
        vmd = inputs.get("video_metadata")
        if vmd is not None:
            m0 = vmd[0]
            fi = getattr(m0, "frames_indices", None)
            if fi is None and isinstance(m0, dict):
                fi = m0.get("frames_indices")
            if fi is not None:
                out["indices"] = torch.tensor(np.asarray(fi).astype(np.int64))
                js["indices"] = [int(i) for i in np.asarray(fi).tolist()]
                if proc is not None and hasattr(proc, "_calculate_timestamps"):
                    ts = proc._calculate_timestamps(list(js["indices"]), fps, vp.temporal_patch_size)
                    out["timestamps"] = torch.tensor(ts, dtype=torch.float64)
                    js["timestamps"] = ts
                    js["timestamp_texts"] = [f"<{t:.1f} seconds>" for t in ts]
        if "indices" not in js and vp is not None:
            try:
                from transformers.video_utils import VideoMetadata
                idx = call_with_accepted(vp.sample_frames, metadata=VideoMetadata(total_num_frames=total, fps=fps,
                                                                                 duration=total / fps))
                js["indices"] = [int(i) for i in np.asarray(idx).tolist()]
                js["indices_from"] = "video_processor.sample_frames (the processor returned no metadata)"
                out["indices"] = torch.tensor(js["indices"], dtype=torch.int64)
                if proc is not None and hasattr(proc, "_calculate_timestamps"):
                    ts = proc._calculate_timestamps(list(js["indices"]), fps, vp.temporal_patch_size)
                    out["timestamps"] = torch.tensor(ts, dtype=torch.float64)
                    js["timestamps"] = ts
            except Exception as e:  # noqa: BLE001
                note_missing("sample_frames fallback", e)
        pv = inputs["pixel_values_videos"].float()
        grid = inputs["video_grid_thw"].long()
        out["pixel_values_videos"] = pv
        out["video_grid_thw"] = grid
        mean = np.array(vp.image_mean, dtype=np.float64)
        std = np.array(vp.image_std, dtype=np.float64)
        D = pv.shape[1]
        ch = np.repeat(np.arange(3), D // 3)
        v = pv.double().numpy()
        lv = np.rint((v * std[ch] + mean[ch]) * 255)
        back = ((lv / 255).astype(np.float32) - mean[ch].astype(np.float32)) / std[ch].astype(np.float32)
        err = float(np.abs(back - v).max()) if v.size else 0.0
        js["pixel_levels_reconstruction_error"] = err
        if lv.min() >= 0 and lv.max() <= 255 and err <= 1e-6:
            out["pixel_levels"] = torch.from_numpy(lv.astype(np.uint8))
        print(f"grid {grid.tolist()}, pixel_values_videos {list(pv.shape)}, level reconstruction err {err:.3g}")
        if js.get("indices") is not None and js["indices"] != fmeta["our_sampled_indices"]:
            print(f"NOTE: the reference sampled {js['indices']}, we sampled {fmeta['our_sampled_indices']}")
        if "input_ids" in inputs:
            ids = inputs["input_ids"][0].long()
            out["input_ids"] = ids
            js["input_ids"] = ids.tolist()
            js["expanded_text"] = proc.tokenizer.decode(ids.tolist()) if proc is not None else None
            print("expanded prompt:", repr(js["expanded_text"]), flush=True)
        if "mm_token_type_ids" in inputs:
            out["mm_token_type_ids"] = inputs["mm_token_type_ids"][0].long()

    # --- model: positions, features, logits -------------------------------------------------------
    if inputs is not None and "input_ids" in inputs:
        model = None
        try:
            from transformers import AutoModelForImageTextToText
            model = AutoModelForImageTextToText.from_pretrained(a.model, dtype=torch.float32).eval()
        except Exception as e:  # noqa: BLE001
            note_missing("AutoModelForImageTextToText.from_pretrained", e)
        if model is not None:
            with torch.no_grad():
                try:
                    kw = dict(input_ids=inputs["input_ids"], image_grid_thw=None,
                              video_grid_thw=inputs["video_grid_thw"], attention_mask=inputs.get("attention_mask"))
                    if "mm_token_type_ids" in inputs:
                        kw["mm_token_type_ids"] = inputs["mm_token_type_ids"]
                    pos, deltas = call_with_accepted(model.model.get_rope_index, **kw)
                    out["position_ids"] = pos[:, 0, :].long().contiguous()
                    out["rope_deltas"] = torch.as_tensor(deltas).reshape(-1).long()
                    print(f"position_ids {list(pos.shape)}, rope_deltas {torch.as_tensor(deltas).tolist()}")
                except Exception as e:  # noqa: BLE001
                    note_missing("model.model.get_rope_index", e)
                    traceback.print_exc()
                try:
                    f = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
                    f = getattr(f, "pooler_output", f)
                    if isinstance(f, (list, tuple)):
                        f = torch.cat(list(f))
                    out["features"] = f.float()
                    print(f"features {list(f.shape)}")
                except Exception as e:  # noqa: BLE001
                    note_missing("model.model.get_video_features", e)
                    traceback.print_exc()
                fwd = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask",
                                                                "pixel_values_videos", "video_grid_thw",
                                                                "mm_token_type_ids")}
                try:
                    try:
                        lg = model(**fwd).logits
                    except TypeError:
                        fwd.pop("mm_token_type_ids", None)
                        lg = model(**fwd).logits
                    out["logits"] = lg[0].float().contiguous()
                    print(f"logits {list(lg.shape)}, last-row argmax {int(lg[0, -1].argmax())}")
                except Exception as e:  # noqa: BLE001
                    note_missing("model forward with video", e)
                    traceback.print_exc()

    # --- optional: a real reader on the clip ---------------------------------------------------------
    if a.video:
        try:
            from transformers.video_utils import load_video
        except Exception as e:  # noqa: BLE001
            load_video = None
            note_missing("transformers.video_utils.load_video", e)
        js["readers"] = {}
        for backend in ["pyav", "decord", "torchvision", "torchcodec", "opencv"]:
            if load_video is None:
                break
            try:
                vid, vmeta = load_video(a.video, backend=backend)
                arr = np.asarray(vid)
                if arr.ndim == 4 and arr.shape[1] == 3 and arr.shape[-1] != 3:
                    arr = arr.transpose(0, 2, 3, 1)
                r = {"shape": list(arr.shape), "meta": {k: (v if isinstance(v, (int, float, str, type(None)))
                                                            else str(v)) for k, v in vars(vmeta).items()}
                     if hasattr(vmeta, "__dict__") else str(vmeta)}
                if arr.shape == frames.shape:
                    have = fmeta["our_indices"]
                    d = np.abs(arr[have].astype(np.int32) - frames[have].astype(np.int32))
                    r["max_abs_diff_vs_ours"] = int(d.max())
                    r["mean_abs_diff_vs_ours"] = float(d.mean())
                    out[f"reader_{backend}_frames"] = torch.from_numpy(np.ascontiguousarray(arr[have]).astype(np.uint8))
                js["readers"][backend] = r
                print(f"reader {backend}: {r}", flush=True)
            except Exception as e:  # noqa: BLE001
                js["readers"][backend] = f"{type(e).__name__}: {e}"
                note_missing(f"reader {backend}", e)

    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(a.out, "video-ref.safetensors"),
              metadata={"transformers": transformers.__version__})
    with open(os.path.join(a.out, "video-ref.json"), "w") as f:
        json.dump(js, f, indent=1, default=str)
    print(f"wrote {a.out}/video-ref.safetensors: {', '.join(f'{k}{list(v.shape)}' for k, v in sorted(out.items()))}")
    print(f"missing/failed ({len(MISSING)}):", *MISSING, sep="\n  ")


if __name__ == "__main__":
    main()
