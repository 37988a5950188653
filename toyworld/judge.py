"""Exact evaluator for toy-world images: find the objects, classify each, score a prompt.

Objects are the connected regions of non-background pixels. Each is classified by matching
against the renderer's own definitions: colour = the palette colour (light or dark shade)
most of its pixels are nearest to; shape = the shape mask, drawn in the region's bounding box,
with the highest IoU; texture = the texture pattern (any phase) that best matches where the
region is dark. Named entities (phrases such as "red dotted circle") are then matched to
objects (an object stands for an entity when at least 2 of its 3 attributes are the entity's),
and leakage is the object of entity A showing an attribute value that belongs to another named
entity B and not to A.

    judge(image, entities) -> dict   (see `judge`)
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage

from . import world

BG_TOLERANCE = 40  # max |channel - background| for a background pixel
MIN_AREA = 12  # pixels; smaller regions are specks, not objects

_PALETTE_NAMES = list(world.COLOURS)
_LIGHT = np.array([world.COLOURS[c] for c in _PALETTE_NAMES], np.float32)  # [5, 3]
_DARK = _LIGHT * world.DARK


def shape_mask_hw(shape: str, h: int, w: int) -> np.ndarray:
    """A shape drawn into an h x w box (the renderer's own definition)."""
    return world.shape_mask(shape, h, w)


def _texture_templates(h: int, w: int) -> dict[str, list[np.ndarray]]:
    """Every texture at every phase (x and y phases independent), as float masks [h, w]."""
    return {tex: [world.texture_marks(tex, h, w, (py, px)).astype(np.float32)
                  for py, px in itertools.product(range(4), range(4))] for tex in world.TEXTURES}


def foreground(image: np.ndarray) -> np.ndarray:
    """[H, W] bool: pixels that are not background."""
    diff = np.abs(image.astype(np.int16) - np.array(world.BACKGROUND, np.int16)).max(axis=-1)
    return diff > BG_TOLERANCE


def classify_region(image: np.ndarray, mask: np.ndarray) -> dict:
    """Attributes of one object region: colour, shape, texture, plus the evidence behind them."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = mask[y0:y1, x0:x1]
    pix = image[y0:y1, x0:x1].astype(np.float32)  # [h, w, 3]
    # colour: nearest of the 10 shades, votes pooled per colour
    d_light = np.linalg.norm(pix[:, :, None, :] - _LIGHT, axis=-1)  # [h, w, 5]
    d_dark = np.linalg.norm(pix[:, :, None, :] - _DARK, axis=-1)
    nearest = np.minimum(d_light, d_dark).argmin(-1)  # [h, w]
    votes = np.bincount(nearest[box], minlength=len(_PALETTE_NAMES)).astype(np.float64)
    fractions = votes / votes.sum()
    ci = int(fractions.argmax())
    colour = _PALETTE_NAMES[ci]
    # shape: IoU with each shape drawn in the bounding box
    h, w = box.shape
    ious = {}
    for s in world.SHAPES:
        ref = shape_mask_hw(s, h, w)
        ious[s] = float((ref & box).sum() / max((ref | box).sum(), 1))
    shape = max(ious, key=ious.get)
    # texture: darkness in [0, 1] along the light->dark segment of the object's colour
    light, dark = _LIGHT[ci], _DARK[ci]
    seg = dark - light
    t = np.clip(((pix - light) @ seg) / float(seg @ seg), 0.0, 1.0)  # [h, w]
    interior = ndimage.binary_erosion(box) if box.sum() > 30 else box  # edges blur into background
    if interior.sum() < 4:
        interior = box
    tv = t[interior]
    tex_scores = {}
    for tex, variants in _texture_templates(h, w).items():
        tex_scores[tex] = max(float(1.0 - np.abs(tv - v[interior]).mean()) for v in variants)
    texture = max(tex_scores, key=tex_scores.get)
    return {"box": [int(x0), int(y0), int(x1), int(y1)], "area": int(mask.sum()), "colour": colour,
            "shape": shape, "texture": texture, "colour_fractions": dict(zip(_PALETTE_NAMES, fractions.round(3).tolist())),
            "shape_iou": round(ious[shape], 3), "texture_score": round(tex_scores[texture], 3)}


def find_objects(image: np.ndarray) -> list[dict]:
    """Every object region (>= MIN_AREA pixels) of an [H, W, 3] uint8 image, classified."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"judge expects an [H, W, 3] uint8 image, got {image.shape} {image.dtype}")
    labels, n = ndimage.label(foreground(image))
    out = []
    for i in range(1, n + 1):
        m = labels == i
        if m.sum() >= MIN_AREA:
            out.append(classify_region(image, m))
    return out


def _matches(obj: dict, thing: world.Thing) -> int:
    return sum(obj[a] == thing.attribute(a) for a in world.ATTRIBUTES)


def assign(objects: list[dict], things) -> list[int | None]:
    """Entity i -> index of its object (an object showing >= 2 of the entity's 3 attribute
    values), chosen to maximise the total number of matching attributes; None if none qualifies."""
    things = list(things)
    best, best_score = [None] * len(things), -1
    idx = list(range(len(objects)))
    for perm in itertools.permutations(idx + [None] * len(things), len(things)):
        score, ok = 0, True
        for t, o in zip(things, perm):
            if o is None:
                continue
            m = _matches(objects[o], t)
            if m < 2:
                ok = False
                break
            score += m
        if ok and score > best_score:
            best, best_score = list(perm), score
    return best


def parse_entities(entities) -> list[world.Thing]:
    """Entity phrases (or Things) -> Things; a one-line ValueError for anything else."""
    things = [e if isinstance(e, world.Thing) else world.parse_phrase(e) for e in entities]
    if len(set(things)) != len(things):
        raise ValueError(f"entities must be distinct objects, got {[t.phrase for t in things]}")
    return things


def judge(image: np.ndarray, entities) -> dict:
    """Score one generated image for the named entities (phrases, as in the prompt).

    Returns {"objects": [...], "entities": {phrase: {"present", "recognised", "object", "leaked"}},
    "all_present": bool, "all_recognised": bool, "leak": bool, "leaks": [[owner, attr, source], ...],
    "extra_objects": int}. present: some object shows >= 2 of the entity's attribute values;
    recognised: it shows all 3; leak: some present entity's object shows an attribute value of
    another named entity that is not its own."""
    things = parse_entities(entities)
    objects = find_objects(image)
    where = assign(objects, things)
    per, leaks = {}, []
    for t, o in zip(things, where):
        if o is None:
            per[t.phrase] = {"present": False, "recognised": False, "object": None, "leaked": []}
            continue
        shown = {a: objects[o][a] for a in world.ATTRIBUTES}
        leaked = [(a, things[j].phrase) for a, j in world.leaked_attributes(t, shown, things)]
        leaks += [[t.phrase, a, src] for a, src in leaked]
        per[t.phrase] = {"present": True, "recognised": _matches(objects[o], t) == 3, "object": o,
                         "leaked": [[a, src] for a, src in leaked]}
    used = {o for o in where if o is not None}
    return {"objects": objects, "entities": per, "all_present": all(p["present"] for p in per.values()),
            "all_recognised": all(p["recognised"] for p in per.values()), "leak": bool(leaks), "leaks": leaks,
            "extra_objects": len(objects) - len(used)}
