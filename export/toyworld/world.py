"""The toy world: a few object kinds, each with its own shape, colour and texture.

Scenes are 32x32 RGB images of two (sometimes one or three) objects at random non-overlapping
positions and sizes on a plain background, captioned by the kinds they show ("a tent and a
kite"). Every attribute value belongs to exactly one kind, so an object of kind A that shows
an attribute value of kind B is unambiguous leakage. numpy only, fully seeded.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32
BACKGROUND = (235, 235, 235)
DARK = 0.5  # texture marks are the kind's colour times this
MIN_SIZE, MAX_SIZE = 10, 14  # object bounding-box side in pixels (two objects)
MIN_SIZE_3, MAX_SIZE_3 = 9, 11  # three objects
GAP = 2  # minimum pixels between object boxes

SHAPES = ("circle", "square", "triangle", "diamond", "plus")
COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 225), "green": (40, 170, 60), "yellow": (235, 200, 30),
           "purple": (150, 50, 200)}
TEXTURES = ("solid", "hstripes", "dots", "vstripes", "checker")
ATTRIBUTES = ("shape", "colour", "texture")


@dataclass(frozen=True)
class Kind:
    name: str
    shape: str
    colour: str
    texture: str

    def attribute(self, attr: str) -> str:
        return getattr(self, attr)


KINDS: tuple[Kind, ...] = (
    Kind("tomato", "circle", "red", "solid"),
    Kind("crate", "square", "blue", "hstripes"),
    Kind("tent", "triangle", "green", "dots"),
    Kind("kite", "diamond", "yellow", "vstripes"),
    Kind("badge", "plus", "purple", "checker"),
)
KIND_BY_NAME = {k.name: k for k in KINDS}


@dataclass(frozen=True)
class Placed:
    """One object in a scene: its kind and bounding box (x0, y0, size) in pixels."""

    kind: str
    x0: int
    y0: int
    size: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x0, self.y0, self.x0 + self.size, self.y0 + self.size


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # [32, 32, 3] uint8
    caption: str
    entities: tuple[str, ...]  # kind names in caption order
    layout: tuple[Placed, ...]  # ground truth, same order as entities


def caption_for(entities) -> str:
    """'a tent', 'a tent and a kite', 'a tent, a kite and a crate'."""
    parts = [f"a {e}" for e in entities]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def shape_mask(shape: str, size: int) -> np.ndarray:
    """[size, size] bool mask of a shape filling its box."""
    c = (np.arange(size) + 0.5) / size  # pixel centres in [0, 1]
    y, x = np.meshgrid(c, c, indexing="ij")
    if shape == "circle":
        return (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "triangle":  # apex at the top, base at the bottom
        return np.abs(x - 0.5) <= y / 2
    if shape == "diamond":
        return np.abs(x - 0.5) + np.abs(y - 0.5) <= 0.5
    if shape == "plus":
        return (np.abs(x - 0.5) <= 1 / 6) | (np.abs(y - 0.5) <= 1 / 6)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def texture_marks(texture: str, size: int, phase: int = 0) -> np.ndarray:
    """[size, size] bool: where the texture's dark marks are (period 4 px)."""
    y, x = np.meshgrid(np.arange(size) + phase, np.arange(size) + phase, indexing="ij")
    if texture == "solid":
        return np.zeros((size, size), bool)
    if texture == "hstripes":
        return (y % 4) < 2
    if texture == "vstripes":
        return (x % 4) < 2
    if texture == "checker":
        return ((x // 2) + (y // 2)) % 2 == 1
    if texture == "dots":
        return ((x % 4) < 2) & ((y % 4) < 2)
    raise ValueError(f"unknown texture {texture!r}; known: {', '.join(TEXTURES)}")


def render_object(canvas: np.ndarray, kind: Kind, x0: int, y0: int, size: int, phase: int = 0) -> None:
    """Paint one object into canvas [H, W, 3] uint8 in place."""
    mask = shape_mask(kind.shape, size)
    colour = np.array(COLOURS[kind.colour], np.float32)
    patch = np.broadcast_to(colour, (size, size, 3)).copy()
    patch[texture_marks(kind.texture, size, phase)] *= DARK
    region = canvas[y0:y0 + size, x0:x0 + size]
    region[mask] = patch[mask].round().astype(np.uint8)


def random_layout(rng: np.random.Generator, n: int, tries: int = 200) -> list[tuple[int, int, int]]:
    """n non-overlapping (x0, y0, size) boxes inside the image (GAP pixels apart)."""
    lo, hi = (MIN_SIZE, MAX_SIZE) if n <= 2 else (MIN_SIZE_3, MAX_SIZE_3)
    for _ in range(tries):
        boxes = []
        for _ in range(n):
            s = int(rng.integers(lo, hi + 1))
            x0, y0 = (int(v) for v in rng.integers(1, IMAGE_SIZE - s, size=2))
            if all(x0 + s + GAP <= bx or bx + bs + GAP <= x0 or y0 + s + GAP <= by or by + bs + GAP <= y0
                   for bx, by, bs in boxes):
                boxes.append((x0, y0, s))
            else:
                break
        if len(boxes) == n:
            return boxes
    raise RuntimeError(f"could not place {n} objects without overlap in {tries} tries")


def render_scene(entities, rng: np.random.Generator) -> Sample:
    """Render the named kinds (caption order) at a random layout."""
    canvas = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    canvas[:] = BACKGROUND
    layout = []
    for name, (x0, y0, s) in zip(entities, random_layout(rng, len(entities))):
        if name not in KIND_BY_NAME:
            raise ValueError(f"unknown kind {name!r}; known: {', '.join(KIND_BY_NAME)}")
        render_object(canvas, KIND_BY_NAME[name], x0, y0, s, phase=int(rng.integers(0, 4)))
        layout.append(Placed(name, x0, y0, s))
    return Sample(canvas, caption_for(entities), tuple(entities), tuple(layout))


def random_entities(rng: np.random.Generator, counts=(1, 2, 3), probs=(0.15, 0.6, 0.25)) -> tuple[str, ...]:
    """Distinct kinds for one scene, in random (caption) order."""
    n = int(rng.choice(counts, p=probs))
    return tuple(KINDS[i].name for i in rng.permutation(len(KINDS))[:n])


def sample(seed: int) -> Sample:
    """One random training scene, a pure function of the seed."""
    rng = np.random.default_rng(seed)
    return render_scene(random_entities(rng), rng)


def pairs() -> list[tuple[str, str]]:
    """All ordered pairs of distinct kinds (20 for five kinds)."""
    return list(itertools.permutations([k.name for k in KINDS], 2))


def all_captions() -> list[str]:
    """Every caption the world produces (for tokenizer corpora and text-embedding caches)."""
    names = [k.name for k in KINDS]
    out = []
    for n in (1, 2, 3):
        out += [caption_for(p) for p in itertools.permutations(names, n)]
    return out


def leaked_attributes(owner: str, shown: dict, others) -> list[tuple[str, str]]:
    """(attribute, source kind) for each attribute value in `shown` (attr -> value) that is not
    `owner`'s but belongs to one of `others`."""
    own = KIND_BY_NAME[owner]
    out = []
    for attr, value in shown.items():
        if value is None or value == own.attribute(attr):
            continue
        for o in others:
            if o != owner and KIND_BY_NAME[o].attribute(attr) == value:
                out.append((attr, o))
    return out
