"""A model folder's card: what a checkpoint declares about its own use (optional file deleaker.json).

A FLUX.1 checkpoint needs none: the runtime's defaults are its defaults (flux-dev settings, 256x256).
A model trained for one narrow world (the embedded toy-world model) declares the DeLeaker preset its
settings were chosen for, the image size it was trained at, the only words its tokenizers know and
an example prompt, so that `deleaker generate` with no options draws what the model can draw, and a
prompt outside its words gets a one-line error instead of a noise image.

    {"preset": "toyworld", "height": 32, "width": 32,
     "vocabulary": ["a", "and", "red", ...],
     "example": {"prompt": "a red striped circle and a blue dotted square",
                 "entities": ["red striped circle", "blue dotted square"]},
     "about": "the toy world of docs/toyworld.md"}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import DEFAULT_PRESET, PRESETS
from .text_policy import WORD, outside_vocabulary

CARD_FILE = "deleaker.json"
DEFAULT_SIDE = 256  # image side (pixels) of a model whose card names no size
_FIELDS = {"preset", "height", "width", "vocabulary", "example", "about"}


class CardError(ValueError):
    """The card file is unreadable or has a bad field; the message names the file and the field."""


@dataclass(frozen=True)
class ModelCard:
    preset: str | None = None  # DeLeaker preset the model's settings were chosen for (runtime/config.py)
    height: int | None = None  # image size the model was trained at, pixels
    width: int | None = None
    vocabulary: frozenset[str] | None = None  # every word a prompt may use (lower case); None: any
    example_prompt: str | None = None
    example_entities: tuple[str, ...] = ()
    about: str = ""

    def unknown_words(self, prompt: str) -> list[str]:
        """What of `prompt` the vocabulary does not cover, in order, each once ([] when any text
        goes): unknown words and every other character that is not white space
        (text_policy.outside_vocabulary), each quoted."""
        if self.vocabulary is None:
            return []
        return outside_vocabulary(prompt, self.vocabulary)

    def vocabulary_error(self, prompt: str) -> str | None:
        """A one-line error for a prompt with unknown words or characters, naming them and the words the model knows."""
        unknown = self.unknown_words(prompt)
        if not unknown:
            return None
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        msg = (f"this model knows only the words of its world ({', '.join(sorted(self.vocabulary))}); "
               f"the prompt has {shown}")
        if self.example_prompt:  # words that read the same on the command line, in the API and on a web page
            msg += f"; for example the prompt {self.example_prompt!r}"
            if self.example_entities:
                msg += f" with the entities {', '.join(repr(e) for e in self.example_entities)}"
        return msg


def _positive_side(path: Path, data: dict, key: str) -> int | None:
    v = data.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 16 or v % 16:
        raise CardError(f"{path}: {key} must be a positive multiple of 16 (pixels), got {v!r}")
    return v


def read_card(folder: str | Path) -> ModelCard | None:
    """The card of a model folder, None when it has none; CardError on a bad file."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CardError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise CardError(f"{path}: not a JSON object")
    extra = sorted(set(data) - _FIELDS)
    if extra:
        raise CardError(f"{path}: unknown field {extra[0]!r}; known: {', '.join(sorted(_FIELDS))}")
    name = data.get("preset")
    if name is not None and name not in PRESETS:
        raise CardError(f"{path}: preset {name!r} is not a known preset ({', '.join(sorted(PRESETS))})")
    vocab = data.get("vocabulary")
    if vocab is not None and (not isinstance(vocab, list) or not vocab
                              or not all(isinstance(w, str) and WORD.fullmatch(w.lower()) for w in vocab)):
        raise CardError(f"{path}: vocabulary must be a non-empty list of words")
    ex = data.get("example") or {}
    if not isinstance(ex, dict) or not isinstance(ex.get("prompt", ""), str) \
            or not all(isinstance(e, str) for e in ex.get("entities", [])):
        raise CardError(f"{path}: example must be {{\"prompt\": str, \"entities\": [str, ...]}}")
    about = data.get("about", "")
    if not isinstance(about, str):
        raise CardError(f"{path}: about must be a string")
    card = ModelCard(preset=name, height=_positive_side(path, data, "height"), width=_positive_side(path, data, "width"),
                     vocabulary=frozenset(w.lower() for w in vocab) if vocab is not None else None,
                     example_prompt=ex.get("prompt") or None, example_entities=tuple(ex.get("entities", ())),
                     about=about)
    if card.example_prompt and card.vocabulary_error(card.example_prompt):
        raise CardError(f"{path}: the example prompt has words outside the vocabulary: "
                        f"{', '.join(card.unknown_words(card.example_prompt))}")
    return card


def default_preset(card: ModelCard | None) -> str:
    """The preset the card names, else the runtime's default."""
    return card.preset if card is not None and card.preset else DEFAULT_PRESET


def default_size(card: ModelCard | None) -> tuple[int, int]:
    """(height, width) the card names (width defaults to height), else DEFAULT_SIDE square."""
    if card is None or card.height is None:
        return DEFAULT_SIDE, DEFAULT_SIDE
    return card.height, card.width or card.height


def card_config(card: ModelCard | None) -> dict | None:
    """The DeLeakerConfig fields of the card's preset (ModelInfo.default_config), None without one."""
    if card is None or card.preset is None:
        return None
    from dataclasses import asdict

    return asdict(PRESETS[card.preset])  # read_card checked the name
