"""PNG output: single images and labelled side-by-side comparisons, written atomically; small images
enlarged without smoothing so that people can see them."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .outputs import write_atomic

LABEL_HEIGHT = 18
MIN_SHOWN_SIDE = 128  # a written image smaller than this is enlarged, pixel for pixel, to at least this
GAP = 4  # white pixels between the panels of a comparison


def display_scale(height: int, width: int) -> int:
    """The integer factor that makes the smaller side at least MIN_SHOWN_SIDE pixels (1: none needed)."""
    return max(1, math.ceil(MIN_SHOWN_SIDE / max(1, min(height, width))))


def enlarge(image: np.ndarray, scale: int) -> np.ndarray:
    """[H, W, 3] -> [H*scale, W*scale, 3]: every pixel a scale x scale block (nearest, no smoothing,
    so a 32x32 model's pixels stay visible as pixels)."""
    if scale == 1:
        return image
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """The label, cut with an ellipsis where it is wider than its panel (labels never overlap)."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def side_by_side(images: list[np.ndarray], labels: list[str], scale: int = 1) -> Image.Image:
    """images: [H, W, 3] uint8 each, same size -> one image: each enlarged `scale` times (nearest),
    GAP pixels apart, its label centred in a strip beneath it."""
    panels = [enlarge(img, scale) for img in images]
    h, w = panels[0].shape[:2]
    n = len(panels)
    canvas = Image.new("RGB", (w * n + GAP * (n - 1), h + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (img, label) in enumerate(zip(panels, labels)):
        x = i * (w + GAP)
        canvas.paste(Image.fromarray(img), (x, 0))
        text = _fit(draw, label, w - 2)
        draw.text((x + (w - draw.textlength(text)) / 2, h + 3), text, fill="black")
    return canvas


def save_png(image: Image.Image | np.ndarray, path: str | os.PathLike) -> Path:
    """Write to a temp file beside `path`, then rename: a failure leaves no half-written file."""
    path = Path(path)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if path.parent and not path.parent.exists():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")
    write_atomic(path, lambda f: image.save(f, format="PNG"))  # short temp name, fsync, rename
    return path
