"""runtime/tokens.py: encoder inputs as FluxPipeline makes them, and entity location (docs/semantics.md)."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from deleaker.runtime.tokens import (EntityError, TextTokenizer, TokenizerError, clip_input_ids, entity_tokens,
                                     load_tokenizer, locate_entities, t5_input_ids)

PROMPTS = [
    "a cat and a cheetah in a field",
    "A Dog, a bear and a zebra-crossing!  x\n y",
    "two cats " * 80,  # longer than 77 CLIP tokens and than short T5 lengths
    "",
    "héllo wörld 日本 <|endoftext|> </s>",
]


@pytest.fixture(scope="module")
def t5(tiny_model_dir):
    return load_tokenizer(tiny_model_dir / "tokenizer_2")


@pytest.fixture(scope="module")
def clip(tiny_model_dir):
    return load_tokenizer(tiny_model_dir / "tokenizer")


def tokens_at(tok, prompt, span):
    return tok.backend.encode(prompt).tokens[span.start:span.end]


# --- encoder inputs ---------------------------------------------------------------------------

@pytest.mark.parametrize("max_len", [512, 16, 3])
def test_t5_ids_match_transformers(tiny_model_dir, t5, max_len):
    from transformers import T5TokenizerFast

    ref = T5TokenizerFast.from_pretrained(tiny_model_dir / "tokenizer_2")
    # exactly FluxPipeline._get_t5_prompt_embeds' call
    want = ref(PROMPTS, padding="max_length", max_length=max_len, truncation=True, return_length=False,
               return_overflowing_tokens=False, return_tensors="np").input_ids
    got = t5_input_ids(t5, PROMPTS, max_len)
    assert got.dtype == np.int64 and got.shape == (len(PROMPTS), max_len)
    np.testing.assert_array_equal(got, want)


def test_clip_ids_match_transformers(tiny_model_dir, clip):
    from transformers import CLIPTokenizerFast

    ref = CLIPTokenizerFast.from_pretrained(tiny_model_dir / "tokenizer")
    want = ref(PROMPTS, padding="max_length", max_length=ref.model_max_length, truncation=True,
               return_tensors="np").input_ids
    got = clip_input_ids(clip, PROMPTS)
    assert got.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(got, want)


def test_clip_from_vocab_and_merges_equals_tokenizer_json(tiny_model_dir, clip, tmp_path):
    # FLUX.1-dev's tokenizer/ ships vocab.json + merges.txt only
    folder = tmp_path / "tokenizer"
    shutil.copytree(tiny_model_dir / "tokenizer", folder)
    (folder / "tokenizer.json").unlink()
    np.testing.assert_array_equal(clip_input_ids(load_tokenizer(folder), PROMPTS), clip_input_ids(clip, PROMPTS))


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load"):
        load_tokenizer(tmp_path)


def test_max_sequence_length_bounds(t5):
    for bad in (0, 513, 1.5):
        with pytest.raises(TokenizerError, match="max_sequence_length"):
            t5_input_ids(t5, "a cat", bad)


# --- entity location --------------------------------------------------------------------------

def test_locate_entities_basic(t5):
    prompt = "a cat and a cheetah in a field"
    cat, cheetah = locate_entities(t5, prompt, ["cat", "cheetah"])
    assert tokens_at(t5, prompt, cat) == ["▁cat"]
    assert tokens_at(t5, prompt, cheetah) == t5.backend.encode("cheetah", add_special_tokens=False).tokens
    assert cat.end <= cheetah.start
    assert (cat.matched, cheetah.matched) == ("cat", "cheetah")


def test_entity_tokens_array(t5):
    prompt = "a cat and a cheetah in a field"
    et = entity_tokens(t5, prompt, ["cat", "cheetah"], num_slots=4, max_sequence_length=32)
    assert et.shape == (1, 4, 32) and et.dtype == np.float32
    spans = locate_entities(t5, prompt, ["cat", "cheetah"], 32)
    for e, span in enumerate(spans):
        want = np.zeros(32, np.float32)
        want[span.start:span.end] = 1
        np.testing.assert_array_equal(et[0, e], want)
    assert not et[0, 2:].any()  # unused slots inactive
    assert not entity_tokens(t5, prompt, [], 4, 32).any()


def test_entity_tokens_batch(t5):
    prompts = ["a cat and a dog", "a bear next to a dog"]
    per_prompt = entity_tokens(t5, prompts, [["cat", "dog"], ["bear"]], 3, 16)
    assert per_prompt.shape == (2, 3, 16)
    np.testing.assert_array_equal(per_prompt[1], entity_tokens(t5, prompts[1], ["bear"], 3, 16)[0])
    shared = entity_tokens(t5, prompts, ["dog"], 2, 16)  # one flat list for every prompt
    assert shared[0, 0].sum() >= 1 and shared[1, 0].sum() >= 1
    with pytest.raises(EntityError, match="1 entity lists for 2 prompts"):
        entity_tokens(t5, prompts, [["cat"]], 2, 16)


def test_first_occurrence(t5):
    prompt = "a cat and a cat"
    (span,) = locate_entities(t5, prompt, ["cat"])
    ids = t5.ids(prompt)
    assert span.start == ids.index(t5.ids("cat", add_special_tokens=False)[0])


def test_lower_case_retry(t5):
    prompt = "a cat and a dog"
    assert t5.ids("Cat", False) != t5.ids("cat", False)  # T5 is case sensitive
    (span,) = locate_entities(t5, prompt, ["Cat"])
    assert span.matched == "cat" and span.entity == "Cat"
    assert tokens_at(t5, prompt, span) == ["▁cat"]


def test_leading_space_retry():
    # A tokenizer where a word's token depends on the space before it (T5's Metaspace with
    # prepend_scheme="always" makes both forms equal, so the retry needs another tokenizer).
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "▁a": 4, "cat": 5, "▁cat": 6, "▁and": 7, "▁dog": 8}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = TextTokenizer(folder=None, backend=backend, pad_id=0, pad_token="<pad>", model_max_length=None)
    assert t5_input_ids(tok, "a cat and a dog", 8).tolist() == [[3, 6, 7, 4, 8, 1, 0, 0]]
    (span,) = locate_entities(tok, "a cat and a dog", ["cat"], 8)
    assert (span.start, span.end, span.matched) == (1, 2, " cat")
    (span,) = locate_entities(tok, "a cat and a dog", ["Cat"], 8)  # lower-cased and spaced
    assert (span.start, span.matched) == (1, " cat")


def error_message(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, "errors are one line"
    return msg


def test_entity_not_found(t5):
    with pytest.raises(EntityError) as ei:
        locate_entities(t5, "a cat and a dog\nin a field", ["zebra"])
    msg = error_message(ei)
    assert "'zebra'" in msg and "a cat and a dog" in msg and "not found" in msg


def test_overlapping_entities(t5):
    with pytest.raises(EntityError) as ei:
        locate_entities(t5, "a cat and a dog", ["a cat", "cat"])
    msg = error_message(ei)
    assert "overlap" in msg and "'a cat'" in msg and "'cat'" in msg and "no other occurrences" in msg


# --- an entity that occurs more than once -------------------------------------------------------

def test_repeated_entity_uses_first_occurrence_and_logs(t5, caplog):
    prompt = "a cat and a cat"
    with caplog.at_level(logging.INFO, logger="deleaker"):
        (span,) = locate_entities(t5, prompt, ["cat"])
    cat_id = t5.ids("cat", add_special_tokens=False)[0]
    ids = t5.ids(prompt)
    second = len(ids) - 1 - ids[::-1].index(cat_id)
    assert span.start == ids.index(cat_id) < second  # the authors' rule: the first occurrence
    (rec,) = [r for r in caplog.records if r.name == "deleaker"]
    assert rec.levelno == logging.INFO
    assert "'cat' occurs 2 times" in rec.getMessage() and "using the first" in rec.getMessage()
    assert f"{span.start}..{span.start}" in rec.getMessage() and f"{second}..{second}" in rec.getMessage()


def test_no_log_for_a_single_occurrence(t5, caplog):
    with caplog.at_level(logging.INFO, logger="deleaker"):
        locate_entities(t5, "a cat and a dog", ["cat", "dog"])
    assert not [r for r in caplog.records if r.name == "deleaker"]


@pytest.mark.parametrize("order", [("cat", "cat food"), ("cat food", "cat")])
def test_overlap_resolved_by_a_separate_occurrence(t5, caplog, order):
    prompt = "a bowl of cat food next to a cat"
    with caplog.at_level(logging.INFO, logger="deleaker"):
        spans = dict((s.entity, s) for s in locate_entities(t5, prompt, list(order)))
    cat, food = spans["cat"], spans["cat food"]
    tokens = t5.backend.encode(prompt).tokens
    assert tokens_at(t5, prompt, food)[0] == "▁cat" and len(tokens_at(t5, prompt, food)) > 1
    assert tokens_at(t5, prompt, cat) == ["▁cat"]
    assert cat.start == len(tokens) - 2  # the separate "cat" at the end (before </s>), not the one in "cat food"
    assert food.start < food.end <= cat.start
    msgs = [r for r in caplog.records if r.name == "deleaker" and "'cat' occurs 2 times" in r.getMessage()]
    assert len(msgs) == 1 and msgs[0].levelno == logging.WARNING
    assert "using occurrence 2" in msgs[0].getMessage() and "overlap" in msgs[0].getMessage()


def test_same_entity_twice_takes_both_occurrences(t5):
    a, b = locate_entities(t5, "a cat and a cat", ["cat", "cat"])
    (first,) = locate_entities(t5, "a cat and a cat", ["cat"])
    assert a == first and b.start > a.end - 1 and tokens_at(t5, "a cat and a cat", b) == ["▁cat"]
    with pytest.raises(EntityError, match="overlap"):
        locate_entities(t5, "a cat and a dog", ["cat", "cat"])  # one occurrence for two entities


def test_placement_backtracks_deterministically(t5):
    # greedy first choices (cat -> 1st, cat -> 2nd) leave no room for "cat food"; the search moves
    # the earlier entities to the earliest choice that fits everything
    prompt = "cat food and a cat and a cat"
    cat_id = t5.ids("cat", add_special_tokens=False)[0]
    ids = t5.ids(prompt)
    positions = [i for i, v in enumerate(ids) if v == cat_id]
    assert len(positions) == 3
    for _ in range(2):
        c1, c2, food = locate_entities(t5, prompt, ["cat", "cat", "cat food"])
        assert (c1.start, c2.start, food.start) == (positions[1], positions[2], positions[0])


def test_later_occurrence_cut_off_by_truncation_is_not_used(t5):
    prompt = "a cat food and a cat"
    spans = locate_entities(t5, prompt, ["cat food", "cat"])
    last_cat = spans[1]
    # at a length that cuts the separate "cat" off, only the overlapping one is left
    with pytest.raises(EntityError, match="overlap"):
        locate_entities(t5, prompt, ["cat food", "cat"], last_cat.start + 1)
    assert locate_entities(t5, prompt, ["cat food", "cat"], last_cat.end + 1) == spans


# --- entities the tokenizer cannot represent ----------------------------------------------------

@pytest.mark.parametrize("entities", [["🐱"], ["🐱", "🐶"], ["cat", "日本"]])
def test_entity_that_does_not_survive_tokenization(t5, entities):
    prompt = "a cat, a 🐱 and a 🐶 in 日本"
    unk = t5.backend.id_to_token(t5.unk_id)
    assert unk == "<unk>" and t5.ids("🐱", False)[-1] == t5.unk_id == t5.ids("🐶", False)[-1]
    with pytest.raises(EntityError) as ei:
        locate_entities(t5, prompt, entities)
    msg = error_message(ei)
    bad = entities[-1] if entities[0] == "cat" else entities[0]
    assert f"entity '{bad}' does not survive tokenization (" in msg and "overlap" not in msg
    assert "'<unk>'" in msg


def test_partly_unknown_entity_matches_only_its_own_text(t5):
    prompt = "a x🐶 and a x🐱"
    assert t5.ids("x🐶", False) == t5.ids("x🐱", False)  # same ids: only the text tells them apart
    (span,) = locate_entities(t5, prompt, ["x🐱"])
    enc = t5.backend.encode(prompt)
    assert prompt[enc.offsets[span.start][0]:enc.offsets[span.end - 1][1]].strip() == "x🐱"
    with pytest.raises(EntityError, match="not found"):
        locate_entities(t5, "a x🐶", ["x🐱"])


def test_entity_with_no_tokens():
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "cat": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Replace("!", "")
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = TextTokenizer(folder=None, backend=backend, pad_id=0, pad_token="<pad>", model_max_length=None)
    assert tok.unk_id == 2
    with pytest.raises(EntityError) as ei:
        locate_entities(tok, "cat !!", ["!!"], 8)
    assert "entity '!!' does not survive tokenization (" in error_message(ei) and "no tokens" in str(ei.value)


@pytest.mark.parametrize("empty", ["", "   "])
def test_empty_entity(t5, empty):
    with pytest.raises(EntityError) as ei:
        entity_tokens(t5, "a cat", ["cat", empty], 4, 16)
    assert "empty entity" in error_message(ei)


def test_more_entities_than_slots(t5):
    with pytest.raises(EntityError) as ei:
        entity_tokens(t5, "a cat, a dog and a bear", ["cat", "dog", "bear"], num_slots=2, max_sequence_length=32)
    assert "3 entities" in error_message(ei) and "2 entity slots" in str(ei.value)


def test_entity_cut_off_by_truncation(t5):
    prompt = "a cat and a cheetah in a field"
    ids = t5.ids(prompt, add_special_tokens=False)
    (cat,) = locate_entities(t5, prompt, ["cat"])
    # T5 keeps max_len - 1 content tokens (the last position is </s>)
    assert locate_entities(t5, prompt, ["cat"], cat.end + 1)[0] == cat  # just fits
    with pytest.raises(EntityError) as ei:
        locate_entities(t5, prompt, ["cat"], cat.end)
    msg = error_message(ei)
    assert "cut off by truncation" in msg and "'cat'" in msg
    # an entity straddling the cut is an error too
    (span,) = locate_entities(t5, prompt, ["a cheetah"])
    assert span.end - span.start > 1
    with pytest.raises(EntityError, match="cut off"):
        locate_entities(t5, prompt, ["a cheetah"], span.start + 2)
    # the ids the encoder sees end with </s> right after the kept tokens
    short = t5_input_ids(t5, prompt, cat.end)[0]
    assert short.tolist() == ids[:cat.end - 1] + [t5.backend.token_to_id("</s>")]


def test_entity_on_clip_style_tokenizer_offsets(clip):
    # positions are encoder positions: CLIP's <|startoftext|> shifts them by one
    (span,) = locate_entities(clip, "a cat and a dog", ["dog"], 77)
    assert clip_input_ids(clip, "a cat and a dog")[0, span.start] == clip.ids("dog", False)[0]
    assert span.start == 1 + clip.ids("a cat and a dog", False).index(clip.ids("dog", False)[0])


def test_entities_must_be_a_list(t5):
    with pytest.raises(EntityError, match="list of strings"):
        entity_tokens(t5, "a cat", "cat", 4, 16)
