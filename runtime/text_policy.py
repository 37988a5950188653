"""What text a prompt (or an entity) may hold, stated once for every entry point.

- Any model: no control characters (C0/C1, except tab and line breaks, which tokenize as space)
  and no bidirectional-override or isolate characters (they make the text shown to a reader
  differ from the text the model reads); the refusal names the code point.
- A model with a vocabulary (its card, runtime/model_card.py): every character is checked, so
  the prompt is the model's words separated by white space (or ", " between two words, how the
  toy world lists three objects); anything else (a word it does not know, a digit, other
  punctuation, an emoji) is refused, named, with its code point when it is a single character.
- Messages quote user text through `short()`, so an error never echoes more than a bounded
  excerpt of a prompt or an entity.
"""

from __future__ import annotations

import re
import unicodedata

from .errors import FieldError

ECHO_LIMIT = 60  # characters of user text an error message quotes
_ALLOWED_CONTROLS = frozenset("\t\n\r")
# Unicode bidi embedding/override/isolate controls and the implicit marks (Bidi_Control property)
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")  # a word, for the vocabulary check
LIST_SEPARATOR = re.compile(r",\s+")  # between two words: how a vocabulary model's prompts list objects


class TextError(FieldError):
    """Text a model must not read; the message names the field and the character, `field` the
    request field (prompt or entities)."""


def short(text, limit: int = ECHO_LIMIT) -> str:
    """repr() of user text for one-line messages, cut to about `limit` characters."""
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 4] + "..." + r[-1]


def code_point(ch: str) -> str:
    name = unicodedata.name(ch, "")
    return f"U+{ord(ch):04X}" + (f" {name}" if name else "")


def forbidden_character(text: str) -> tuple[int, str] | None:
    """(index, character) of the first control or bidi-control character, else None."""
    for i, ch in enumerate(text):
        if ch in BIDI_CONTROLS or (unicodedata.category(ch) == "Cc" and ch not in _ALLOWED_CONTROLS):
            return i, ch
    return None


def check_text(text: str, what: str = "prompt", field: str = "prompt") -> None:
    """Refuse control and bidi-control characters in any model's input text."""
    bad = forbidden_character(text)
    if bad is not None:
        i, ch = bad
        kind = "a bidirectional-control" if ch in BIDI_CONTROLS else "a control"
        raise TextError(f"{what} holds {kind} character {code_point(ch)} at character {i}; remove it", field)


def check_request_text(prompt: str, entities=()) -> None:
    """The policy on a request's prompt and entities (the vocabulary part needs the model's card:
    ModelCard.vocabulary_error)."""
    check_text(prompt, "prompt")
    for i, e in enumerate(entities):
        try:
            e.encode("utf-8")
        except UnicodeEncodeError as err:
            raise TextError(f"entity {i} is not valid Unicode: {err.reason} at character {err.start}",
                            "entities") from None
        check_text(e, f"entity {i} {short(e)}", "entities")


def outside_vocabulary(text: str, vocabulary: frozenset[str]) -> list[str]:
    """Every piece of `text` a vocabulary model cannot read, in order, each once: unknown words
    (lower case), and each character that is neither part of a word nor white space, shown with
    its code point."""
    out: list[str] = []
    lowered = text.lower()
    pos = 0
    for m in list(WORD.finditer(lowered)) + [None]:
        gap = lowered[pos:m.start() if m else len(lowered)]
        if pos > 0 and m is not None and LIST_SEPARATOR.fullmatch(gap):
            gap = ""  # "a red circle, a blue square and ...": the comma that joins a list of objects
        for ch in gap:
            if not ch.isspace():
                item = f"{ch!r} ({code_point(ch)})"
                if item not in out:
                    out.append(item)
        if m is None:
            break
        word = m.group(0)
        if word not in vocabulary and short(word) not in out:
            out.append(short(word))
        pos = m.end()
    return out
