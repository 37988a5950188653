"""Property-based tests (Hypothesis) of the input parsers: for any generated input the answer is
a clean one-line error of the documented type, or a valid result; never another exception, and
never a partial file. Example counts: the "ci" profile (tests/conftest.py, a few hundred per
property); DELEAKER_HYPOTHESIS=long for thousands."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given
from hypothesis import strategies as st

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                  max_size=4), max_leaves=20)
FIELDS = ["prompt", "n", "size", "seed", "entities", "steps", "guidance", "deleaker", "deleaker_settings",
          "response_format", "model", "user", "stream"]


def _one_line(e: Exception) -> None:
    assert str(e) and "\n" not in str(e), repr(e)


# -- request schema and body parser ------------------------------------------------------------------


@given(st.one_of(
    st.binary(max_size=300),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6).map(lambda v: json.dumps(v).encode()),
    st.integers(1, 3000).map(lambda d: b'{"prompt": "a", "user": ' + b"[" * d + b"]" * d + b"}"),
))
def test_body_parser_gives_a_request_or_a_400(raw):
    from deleaker.runtime.serve.app import parse_body
    from deleaker.runtime.serve.schema import FieldError, ImageGenerationRequest, error_body

    try:
        req = parse_body(raw, "application/json")
    except FieldError as e:
        _one_line(e)
        assert e.field is not None
        json.dumps(error_body(str(e), e.field, "invalid_request"))  # the answer can be written
    else:
        assert isinstance(req, ImageGenerationRequest)


# -- size parsing --------------------------------------------------------------------------------


@given(st.one_of(st.text(max_size=20), st.from_regex(r"\s*[0-9]{1,6}\s*[xX]\s*[0-9]{1,6}\s*", fullmatch=True)))
def test_size_parses_or_is_a_field_error(size):
    from deleaker.runtime.serve.schema import FieldError, parse_size

    try:
        w, h = parse_size(size)
    except FieldError as e:
        _one_line(e)
        assert e.field == "size" and len(str(e)) < 200
    else:
        assert w >= 0 and h >= 0 and f"{w}" in size and f"{h}" in size


@given(st.integers(-100, 5000), st.integers(-100, 5000))
def test_latent_geometry_is_valid_or_a_size_error(height, width):
    from deleaker.runtime import latents as lat

    try:
        geo = lat.geometry(height, width)
    except ValueError as e:
        _one_line(e)
    else:
        assert height % 16 == 0 and width % 16 == 0 and geo.image_seq_len == (height // 16) * (width // 16)


# -- entity localisation ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def t5(tiny_model_dir):
    from deleaker.runtime import tokens as tok

    return tok.load_tokenizer(tiny_model_dir / "tokenizer_2")


WORDS = st.sampled_from(["a", "cat", "cheetah", "red", "dog", "in", "field", "and", "the", "Cat", "x🐱", "日本"])


@given(prompt=st.lists(WORDS | st.text(max_size=6), min_size=1, max_size=12).map(" ".join),
       entities=st.lists(WORDS | st.text(max_size=8), max_size=5), max_len=st.integers(1, 64))
def test_entities_are_located_or_refused(t5, prompt, entities, max_len):
    from deleaker.runtime import tokens as tok

    try:
        spans = tok.locate_entities(t5, prompt, entities, max_len)
    except (tok.EntityError, tok.TokenizerError) as e:
        _one_line(e)
        assert len(str(e)) < 600  # echoes are cut (text_policy.short)
    else:
        assert len(spans) == len(entities)
        taken = set()
        for s in spans:
            pos = set(s.positions)
            assert pos and max(pos) < max_len and not (pos & taken)
            taken |= pos


# -- the prompt text policy ---------------------------------------------------------------------------


@given(st.text(max_size=40))
def test_text_policy_names_the_character_or_passes(text):
    from deleaker.runtime.model_card import ModelCard
    from deleaker.runtime.text_policy import BIDI_CONTROLS, TextError, check_text

    try:
        check_text(text)
    except TextError as e:
        _one_line(e)
        assert "U+" in str(e)
    else:
        assert not any(c in BIDI_CONTROLS for c in text)
    card = ModelCard(vocabulary=frozenset({"a", "red", "circle"}))
    err = card.vocabulary_error(text)
    if err is None:  # only vocabulary words and white space
        assert all(w.removesuffix(",") in {"a", "red", "circle"} for w in text.lower().split())
    else:
        assert "\n" not in err


# -- the artifact manifest loader ------------------------------------------------------------------------


MANIFEST_KEYS = ["format", "format_version", "model", "models", "backends", "files", "tokenizers", "profiles",
                 "deleaker"]


@given(st.one_of(
    st.binary(max_size=200),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(MANIFEST_KEYS), JSON, max_size=9).map(lambda v: json.dumps(v).encode()),
    st.tuples(st.sampled_from(["model", "profiles", "deleaker", "backends", "files", "tokenizers"]), JSON),
))
def test_manifest_loader_gives_an_artifact_or_an_artifact_error(tmp_path_factory, manifest):
    from deleaker.runtime.artifact import Artifact, ArtifactError, load_artifact
    from deleaker.runtime.scheduler import FLUX_DEV_SCHEDULER_CONFIG

    d = tmp_path_factory.mktemp("art")
    if isinstance(manifest, tuple):  # a valid manifest with one section replaced by generated JSON
        key, value = manifest
        m = {"format": "deleaker-artifact", "format_version": 2,
             "model": {"in_channels": 64, "latent_channels": 16, "vae_scale_factor": 8, "vae_scaling_factor": 0.36,
                       "vae_shift_factor": 0.11, "max_text_tokens": 64, "clip_max_length": 77, "entity_slots": 4,
                       "guidance_embeds": True, "blocks_per_step": 4,
                       "scheduler_config": dict(FLUX_DEV_SCHEDULER_CONFIG)},
             "models": {}, "backends": {"onnxruntime": {}}, "files": {}, "tokenizers": {},
             "profiles": {"image_side": [32, 128]}, "deleaker": {"config": {}, "op_version": 2}}
        m[key] = value
        manifest = json.dumps(m).encode()
    (d / "manifest.json").write_bytes(manifest)
    try:
        art = load_artifact(d)
    except ArtifactError as e:
        _one_line(e)
    else:
        assert isinstance(art, Artifact)
        art.model_info()  # a loaded artifact answers what the backends ask
    finally:
        shutil.rmtree(d)
