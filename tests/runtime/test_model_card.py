"""The embedded default (the toy-world model) and model cards: `deleaker generate` with no --model
draws the toy world at its own preset and size, and a prompt outside its words is refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deleaker.runtime.config import PRESETS
from deleaker.runtime.embedded import default_model_dir
from deleaker.runtime.model_card import CARD_FILE, CardError, read_card

DEMO = ("a red striped circle and a blue dotted square", "red striped circle,blue dotted square")
EXE = str(Path(sys.executable).parent / "deleaker")


def test_the_embedded_model_has_a_card():
    card = read_card(default_model_dir())
    assert card.preset == "toyworld" and (card.height, card.width) == (32, 32)
    assert card.example_prompt == DEMO[0] and ",".join(card.example_entities) == DEMO[1]
    assert card.unknown_words(DEMO[0]) == []
    # every character is checked: unknown words, and punctuation (but the list comma) with its code point
    assert card.unknown_words("a red cat, a Red DOG and a cat") == ["'cat'", "'dog'"]
    assert card.unknown_words("a red cat; a red ,dog!") == ["'cat'", "';' (U+003B SEMICOLON)",
                                                            "',' (U+002C COMMA)", "'dog'",
                                                            "'!' (U+0021 EXCLAMATION MARK)"]


def test_generate_without_model_draws_the_toy_world(tmp_path):
    out = tmp_path / "toy.png"
    r = subprocess.run([EXE, "generate", "--prompt", DEMO[0], "--entities", DEMO[1], "--compare", "--quiet",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    im = np.asarray(Image.open(out))
    assert im.shape[0] >= 32 and im.shape[1] >= 64  # two 32x32 images side by side, with labels


def test_generate_refuses_foreign_words_in_one_line(tmp_path):
    out = tmp_path / "cat.png"
    r = subprocess.run([EXE, "generate", "--prompt", "a cat and a cheetah in a field", "--entities", "cat,cheetah",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and not out.exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deleaker: error: this model knows only the words of its world")
    assert "'cat', 'cheetah', 'in', 'field'" in lines[0] and f"for example the prompt '{DEMO[0]}'" in lines[0]


def test_library_default_uses_the_cards_preset_and_words():
    from deleaker.runtime import GenerateRequest, load_pipeline
    from deleaker.runtime.tokens import TokenizerError

    pipe = load_pipeline(progress=False)
    assert asdict(pipe.config) == asdict(PRESETS["toyworld"])
    with pytest.raises(TokenizerError, match="the prompt has 'cat'"):
        pipe.check(GenerateRequest("a cat and a red plain circle", entities=("cat",), height=32, width=32))
    r = pipe.generate(GenerateRequest(DEMO[0], entities=tuple(DEMO[1].split(",")), height=32, width=32))
    assert r.image.shape == (32, 32, 3) and r.request.steps == PRESETS["toyworld"].num_steps


@pytest.mark.parametrize("card, message", [
    ({"preset": "nope"}, "preset 'nope' is not a known preset"),
    ({"height": 30}, "height must be a positive multiple of 16"),
    ({"colour": "red"}, "unknown field 'colour'"),
    ({"vocabulary": []}, "vocabulary must be a non-empty list of words"),
    ({"vocabulary": ["a", "red"], "example": {"prompt": "a blue", "entities": []}}, "outside the vocabulary: 'blue'"),
])
def test_bad_cards_give_one_line_errors(tmp_path, card, message):
    (tmp_path / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(CardError, match=message):
        read_card(tmp_path)


def test_a_folder_without_a_card_has_none(tmp_path):
    assert read_card(tmp_path) is None
    (tmp_path / CARD_FILE).write_text("{not json")
    with pytest.raises(CardError, match="cannot read"):
        read_card(tmp_path)


def test_serve_without_model_serves_the_toy_world(tmp_path):
    """`deleaker serve` with no --model: warms up on the card's example, answers at the card's
    32x32 by default, and refuses a foreign word with a 400 naming the prompt field."""
    pytest.importorskip("fastapi")
    import base64
    import io

    import httpx
    from support.serve import ServerProcess

    from deleaker.runtime.serve.client import GENERATE_PATH

    s = ServerProcess([], tmp_path / "server.log")
    try:
        r = httpx.post(s.url + GENERATE_PATH, timeout=120,
                       json={"prompt": DEMO[0], "entities": DEMO[1].split(","), "seed": 0})
        assert r.status_code == 200, r.text
        assert Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).size == (32, 32)
        r = httpx.post(s.url + GENERATE_PATH, timeout=60,
                       json={"prompt": "a cat and a dog", "entities": ["cat", "dog"]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        assert "knows only the words of its world" in r.json()["error"]["message"]
    finally:
        s.stop()
