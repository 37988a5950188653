"""PNG output: single images and labelled side-by-side comparisons, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

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
    # a hidden sibling created with the process umask (mkstemp would make it owner-only)
    tmp = path.with_name(f".deleaker-{os.getpid()}-{path.name}")
    try:
        with open(tmp, "xb") as f:
            image.save(f, format="PNG")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
