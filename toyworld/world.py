"""The toy world: objects described by three independent attribute words.

Scenes are 32x32 RGB images of one, two or three objects at random non-overlapping positions
and sizes on a plain background. Every object has a colour, a texture and a shape, each drawn
on its own, and the caption describes each object by a noun phrase of its three words:
"a red dotted circle and a blue striped square". The entity DeLeaker protects is the whole
phrase. Whether an object shows its own attribute values or another named object's is exactly
decidable from the image (judge.py), so attribute leakage between entities can be counted.

Training scenes (`sample`) may tie the objects together: with probability `shared` one
attribute, chosen at random, takes the same value on every object of the scene (the
correlation real captions have: objects that appear together tend to look alike). Evaluation
prompts (`distinct_things`) never share a value, so every wrong value has one source.
numpy only, fully seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32
BACKGROUND = (235, 235, 235)
DARK = 0.5  # texture marks are the object's colour times this
MIN_SIZE, MAX_SIZE = 10, 14  # object bounding-box side in pixels (one or two objects)
MIN_SIZE_3, MAX_SIZE_3 = 9, 11  # three objects
GAP = 2  # minimum pixels between object boxes

SHAPES = ("circle", "square", "triangle", "diamond", "plus")
COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 225), "green": (40, 170, 60), "yellow": (235, 200, 30),
           "purple": (150, 50, 200)}
TEXTURES = ("plain", "striped", "dotted", "barred", "checkered")  # barred: vertical stripes
ATTRIBUTES = ("colour", "texture", "shape")  # the order of the words in a phrase
VALUES = {"colour": tuple(COLOURS), "texture": TEXTURES, "shape": SHAPES}

COUNTS, COUNT_PROBS = (1, 2, 3), (0.15, 0.6, 0.25)  # objects per training scene
SHARED = 0.0  # default probability that a training scene's objects share one attribute value
TEXTURE_PERIOD = 4  # pixels


@dataclass(frozen=True)
class Mix:
    """How training scenes are drawn beyond the shared-value tie: the share of one-object scenes
    (the rest are two- and three-object scenes in the ratio 60:25), and whether textures are
    anchored to the canvas (the dark marks lie where the pattern, laid over the whole image, puts
    them: every token inside an object of one texture then holds the same pixels) or to the
    object (a random phase per object, the first worlds' way). The defaults are v2's world."""

    single: float = COUNT_PROBS[0]
    anchored: bool = False
    # objects SNAP px wide at positions on a SNAP px grid (0 = anywhere, 10-14 / 9-11 px): with SNAP
    # the token size (4 px through the factor-2 VAE), an object covers whole tokens and each shape
    # is one fixed pattern of token contents
    snap: int = 0

    @property
    def count_probs(self) -> tuple[float, float, float]:
        if self.single == COUNT_PROBS[0]:
            return COUNT_PROBS  # the literal, so the default draws exactly what earlier worlds drew
        rest = 1.0 - self.single
        return (self.single, rest * COUNT_PROBS[1] / (1 - COUNT_PROBS[0]), rest * COUNT_PROBS[2] / (1 - COUNT_PROBS[0]))


MIX = Mix()


@dataclass(frozen=True)
class Thing:
    """One object description: an attribute value per attribute."""

    colour: str
    texture: str
    shape: str

    def attribute(self, attr: str) -> str:
        return getattr(self, attr)

    @property
    def phrase(self) -> str:
        """The noun phrase a caption uses for it: 'red dotted circle'."""
        return " ".join(self.attribute(a) for a in ATTRIBUTES)


def parse_phrase(phrase: str) -> Thing:
    """'red dotted circle' -> Thing; a one-line ValueError naming the bad word otherwise."""
    words = str(phrase).lower().split()
    if len(words) != len(ATTRIBUTES):
        raise ValueError(f"a toy-world entity is '<colour> <texture> <shape>' (e.g. 'red dotted circle'), "
                         f"got {phrase!r}")
    for attr, word in zip(ATTRIBUTES, words):
        if word not in VALUES[attr]:
            raise ValueError(f"unknown {attr} {word!r} in {phrase!r}; known: {', '.join(VALUES[attr])}")
    return Thing(*words)


@dataclass(frozen=True)
class Placed:
    """One object in a scene: what it is and its bounding box (x0, y0, size) in pixels."""

    thing: Thing
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
    things: tuple[Thing, ...]  # caption order
    layout: tuple[Placed, ...]  # ground truth, same order as things

    @property
    def entities(self) -> tuple[str, ...]:
        return tuple(t.phrase for t in self.things)


def caption_for(things) -> str:
    """'a red dotted circle', '... and a blue striped square', 'a ..., a ... and a ...'."""
    parts = [f"a {t.phrase if isinstance(t, Thing) else t}" for t in things]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def shape_mask(shape: str, h: int, w: int | None = None) -> np.ndarray:
    """[h, w] bool mask of a shape filling an h x w box (square when w is None)."""
    w = h if w is None else w
    y, x = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")  # pixel centres in [0, 1]
    if shape == "circle":
        return (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25
    if shape == "square":
        return np.ones((h, w), bool)
    if shape == "triangle":  # apex at the top, base at the bottom
        return np.abs(x - 0.5) <= y / 2
    if shape == "diamond":
        return np.abs(x - 0.5) + np.abs(y - 0.5) <= 0.5
    if shape == "plus":
        return (np.abs(x - 0.5) <= 1 / 6) | (np.abs(y - 0.5) <= 1 / 6)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def texture_marks(texture: str, h: int, w: int | None = None, phase: tuple[int, int] = (0, 0)) -> np.ndarray:
    """[h, w] bool: where the texture's dark marks are (period 4 px), shifted by phase (y, x)."""
    w = h if w is None else w
    y, x = np.meshgrid(np.arange(h) + phase[0], np.arange(w) + phase[1], indexing="ij")
    if texture == "plain":
        return np.zeros((h, w), bool)
    if texture == "striped":
        return (y % 4) < 2
    if texture == "barred":
        return (x % 4) < 2
    if texture == "checkered":
        return ((x // 2) + (y // 2)) % 2 == 1
    if texture == "dotted":
        return ((x % 4) < 2) & ((y % 4) < 2)
    raise ValueError(f"unknown texture {texture!r}; known: {', '.join(TEXTURES)}")


def render_object(canvas: np.ndarray, thing: Thing, x0: int, y0: int, size: int,
                  phase: int | tuple[int, int] = 0) -> None:
    """Paint one object into canvas [H, W, 3] uint8 in place; phase: the texture's (y, x) shift
    (one int: the same on both axes)."""
    mask = shape_mask(thing.shape, size)
    colour = np.array(COLOURS[thing.colour], np.float32)
    patch = np.broadcast_to(colour, (size, size, 3)).copy()
    phase = (phase, phase) if isinstance(phase, (int, np.integer)) else tuple(phase)
    patch[texture_marks(thing.texture, size, size, phase)] *= DARK
    region = canvas[y0:y0 + size, x0:x0 + size]
    region[mask] = patch[mask].round().astype(np.uint8)


SNAPPED_SIZE = 12  # px, the object size of a snapped layout (3 x 3 tokens of 4 px)


def random_layout(rng: np.random.Generator, n: int, tries: int = 200, snap: int = 0) -> list[tuple[int, int, int]]:
    """n non-overlapping (x0, y0, size) boxes inside the image (GAP pixels apart); snap > 0:
    SNAPPED_SIZE px boxes at multiples of `snap` px."""
    lo, hi = (MIN_SIZE, MAX_SIZE) if n <= 2 else (MIN_SIZE_3, MAX_SIZE_3)
    for _ in range(tries):
        boxes = []
        for _ in range(n):
            if snap:
                s = SNAPPED_SIZE
                x0, y0 = (snap * int(v) for v in rng.integers(0, (IMAGE_SIZE - s) // snap + 1, size=2))
            else:
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


def render_scene(things, rng: np.random.Generator, anchored: bool = False, snap: int = 0) -> Sample:
    """Render the described objects (caption order) at a random layout; anchored: textures
    fixed to the canvas (Mix.anchored), else a random phase per object."""
    things = tuple(t if isinstance(t, Thing) else parse_phrase(t) for t in things)
    canvas = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    canvas[:] = BACKGROUND
    layout = []
    # a snapped layout has few places: three objects fit in about 1 random try in 100
    for thing, (x0, y0, s) in zip(things, random_layout(rng, len(things), tries=5000 if snap else 200, snap=snap)):
        phase = int(rng.integers(0, TEXTURE_PERIOD))  # drawn either way: the rest of the scene is the same
        render_object(canvas, thing, x0, y0, s, phase=(y0, x0) if anchored else phase)
        layout.append(Placed(thing, x0, y0, s))
    return Sample(canvas, caption_for(things), things, tuple(layout))


def random_things(rng: np.random.Generator, n: int, shared: float = 0.0) -> tuple[Thing, ...]:
    """n distinct objects, each attribute drawn independently; with probability `shared` one
    attribute (chosen uniformly) is given the first object's value on all of them."""
    tie = ATTRIBUTES[int(rng.integers(0, len(ATTRIBUTES)))] if n > 1 and rng.random() < shared else None
    while True:  # redraw the rare scene with two identical objects
        vals = {a: [VALUES[a][int(i)] for i in rng.integers(0, len(VALUES[a]), n)] for a in ATTRIBUTES}
        if tie is not None:
            vals[tie] = [vals[tie][0]] * n
        things = tuple(Thing(*(vals[a][i] for a in ATTRIBUTES)) for i in range(n))
        if len(set(things)) == n:
            return things


def distinct_things(rng: np.random.Generator, n: int) -> tuple[Thing, ...]:
    """n objects whose values differ on every attribute (evaluation prompts: a wrong value then
    belongs either to exactly one other named object or to none)."""
    vals = {a: [VALUES[a][int(i)] for i in rng.permutation(len(VALUES[a]))[:n]] for a in ATTRIBUTES}
    return tuple(Thing(*(vals[a][i] for a in ATTRIBUTES)) for i in range(n))


def sample(seed: int, shared: float = SHARED, mix: Mix = MIX) -> Sample:
    """One random training scene, a pure function of (seed, shared, mix)."""
    rng = np.random.default_rng(seed)
    n = int(rng.choice(COUNTS, p=mix.count_probs))
    return render_scene(random_things(rng, n, shared), rng, mix.anchored, mix.snap)


def corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Captions for training the tokenizers: every single-object caption plus random ones of two
    and three objects."""
    rng = np.random.default_rng(seed)
    out = [caption_for([Thing(c, t, s)]) for c in VALUES["colour"] for t in TEXTURES for s in SHAPES]
    out += [caption_for(random_things(rng, int(rng.integers(2, 4)))) for _ in range(n)]
    return out


def leaked_attributes(owner: Thing, shown: dict, others) -> list[tuple[str, int]]:
    """(attribute, index into `others`) for each attribute value in `shown` (attr -> value) that
    is not `owner`'s but is that of one of `others` (the first such)."""
    out = []
    for attr, value in shown.items():
        if value is None or value == owner.attribute(attr):
            continue
        for j, o in enumerate(others):
            if o is not owner and o != owner and o.attribute(attr) == value:
                out.append((attr, j))
                break
    return out
