"""Make sample_data/: a small labelled image set drawn by this script (no downloaded images).

Three classes of shapes (circle, square, triangle) in random colours, sizes and positions on
random backgrounds with noise, 96x96 JPEG. Deterministic: the same seed gives the same files.

    python scripts/make_sample_data.py [--out sample_data] [--per-class 30] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 96


def _colour(rng, avoid=None):
    while True:
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if avoid is None or sum(abs(a - b) for a, b in zip(colour, avoid)) > 180:
            return colour


def draw(shape: str, rng: np.random.Generator) -> Image.Image:
    background = _colour(rng)
    image = Image.new("RGB", (SIZE, SIZE), background)
    pen = ImageDraw.Draw(image)
    radius = rng.uniform(18, 34)
    cx, cy = rng.uniform(radius + 4, SIZE - radius - 4, 2)
    fill = _colour(rng, avoid=background)
    if shape == "circle":
        pen.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif shape == "square":
        angle = rng.uniform(0, math.pi / 2)
        corners = [(cx + radius * math.cos(angle + k * math.pi / 2), cy + radius * math.sin(angle + k * math.pi / 2)) for k in range(4)]
        pen.polygon(corners, fill=fill)
    else:
        angle = rng.uniform(0, 2 * math.pi)
        corners = [(cx + radius * math.cos(angle + k * 2 * math.pi / 3), cy + radius * math.sin(angle + k * 2 * math.pi / 3)) for k in range(3)]
        pen.polygon(corners, fill=fill)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2)))
    noise = rng.normal(0, 8, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "sample_data"))
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    rng = np.random.default_rng(args.seed)
    for shape in ("circle", "square", "triangle"):
        folder = out / shape
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for index in range(args.per_class):
            draw(shape, rng).save(folder / f"{shape}_{index:03d}.jpg", quality=85)
    print(f"wrote {3 * args.per_class} images to {out}")


if __name__ == "__main__":
    main()
