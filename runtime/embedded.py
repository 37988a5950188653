"""The model that ships inside the package and runs when no --model is given: the toy-world model.

It was trained on CPU in 35 minutes (benchmarks/toyworld/train.py) to draw a world of coloured,
textured shapes from captions such as "a red striped circle and a blue dotted square"; its
vanilla images copy attributes from the other named object, and DeLeaker removes part of that
(docs/toyworld.md). Its card (deleaker.json) gives the preset, the 32x32 size and its words.
The random-weight tiny model (built by the torch side, for tests) is not here.
"""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).parent / "models"
DEFAULT_MODEL = "toyworld"


def default_model_dir() -> Path:
    """The folder of the embedded default model (diffusers layout, with its card)."""
    return MODELS_DIR / DEFAULT_MODEL
