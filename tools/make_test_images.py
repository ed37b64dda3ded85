#!/usr/bin/env python3
"""Writes the small test pictures of tests/data/vision/ (issue #7 item 1), deterministically, with Pillow and numpy.

Each picture is smooth colour gradients plus a few hard edges (so resampling is exercised in both regimes) from a
fixed seed; every file stays well under 50 KB. The set covers the sizes, aspect ratios and file formats the
preprocessing must handle beyond the fixture's 200x120 RGB PNG:

  wide_1000x40.png      very wide (aspect 25): upscaled to the min-pixels bound in one direction only
  small_20x12.png       smaller than one 32-pixel merge block in both directions (some transformers releases
                        refuse images under `factor` pixels: the dump then records the error instead)
  small_36x33.png       just over one merge block in both directions
  portrait_90x160.png   portrait
  grey_64x48.png        mode L (grey)
  palette_72x40.png     mode P (16-colour palette, no transparency)
  rgba_60x44.png        mode RGBA with varying alpha (composited over white)
  exif6_80x48.jpg       JPEG stored 80x48 with EXIF orientation 6 (shown 48x80), 4:4:4, quality 95
  lossless_50x70.webp   WebP (lossless)

usage: tools/make_test_images.py OUTDIR
"""
import os
import sys

import numpy as np
from PIL import Image


def picture(w, h, seed):
    """uint8 [h, w, 3]: gradients, a diagonal band and a few random rectangles."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255 * x / max(w - 1, 1)
    g = 255 * y / max(h - 1, 1)
    b = 127.5 + 127.5 * np.sin(2 * np.pi * (x / max(w, 8) * 3 + y / max(h, 8) * 2))
    img = np.stack([r, g, b], axis=-1)
    band = np.abs((x / w) - (y / h)) < 0.08
    img[band] = [250, 250, 20]
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = min(w, x0 + int(rng.integers(1, max(2, w // 3)))), min(h, y0 + int(rng.integers(1, max(2, h // 3))))
        img[y0:y1, x0:x1] = rng.integers(0, 256, 3)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)

    def save(img, name, **kw):
        path = os.path.join(out, name)
        img.save(path, **kw)
        size = os.path.getsize(path)
        if size >= 50_000:
            print(f"  warning: {name} is {size} bytes (meant to stay under 50 KB)")
        print(f"  {name}: {img.mode} {img.width}x{img.height}, {size} bytes")

    save(Image.fromarray(picture(1000, 40, 1)), "wide_1000x40.png", optimize=True)
    save(Image.fromarray(picture(20, 12, 2)), "small_20x12.png")
    save(Image.fromarray(picture(36, 33, 9)), "small_36x33.png")
    save(Image.fromarray(picture(90, 160, 3)), "portrait_90x160.png", optimize=True)
    save(Image.fromarray(picture(64, 48, 4)).convert("L"), "grey_64x48.png")
    # Palette: a fixed 16-colour quantisation (median cut, no dithering: deterministic).
    pal = Image.fromarray(picture(72, 40, 5)).quantize(colors=16, method=Image.Quantize.MEDIANCUT,
                                                             dither=Image.Dither.NONE)
    assert pal.mode == "P" and "transparency" not in pal.info
    save(pal, "palette_72x40.png")
    rgb = picture(60, 44, 6)
    yy, xx = np.mgrid[0:44, 0:60]
    alpha = np.clip(np.rint(255 * xx / 59), 0, 255).astype(np.uint8)
    alpha[yy < 8] = 0      # fully transparent rows (→ white)
    alpha[yy >= 36] = 255  # opaque rows
    save(Image.fromarray(np.dstack([rgb, alpha])), "rgba_60x44.png")
    # JPEG stored 80 wide x 48 high with orientation 6 (rotate 90° clockwise to display): shown 48 x 80.
    exif = Image.Exif()
    exif[0x0112] = 6
    save(Image.fromarray(picture(80, 48, 7)), "exif6_80x48.jpg", quality=95, subsampling=0,
         exif=exif.tobytes())
    save(Image.fromarray(picture(50, 70, 8)), "lossless_50x70.webp", lossless=True, quality=100)


if __name__ == "__main__":
    main()
