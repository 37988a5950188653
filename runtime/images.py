"""PNG output: single images and labelled side-by-side comparisons, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .outputs import write_atomic

LABEL_HEIGHT = 18


def side_by_side(images: list[np.ndarray], labels: list[str]) -> Image.Image:
    """images: [H, W, 3] uint8 each, same size -> one image with a caption strip above each."""
    h, w = images[0].shape[:2]
    canvas = Image.new("RGB", (w * len(images), h + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (img, label) in enumerate(zip(images, labels)):
        canvas.paste(Image.fromarray(img), (i * w, LABEL_HEIGHT))
        draw.text((i * w + 4, 3), label, fill="black")
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
