"""Prompt tokenization for FLUX's two text encoders, and entity location (semantics section 5).

Uses only the `tokenizers` library (no transformers at import or run time). A tokenizer is a
folder in the diffusers/transformers layout: `tokenizer.json`, or for CLIP-style BPE
`vocab.json` + `merges.txt` (as FLUX.1-dev's `tokenizer/` ships), with `tokenizer_config.json` /
`special_tokens_map.json` for the pad token and model_max_length.

The encoder inputs reproduce FluxPipeline's tokenizer calls (padding="max_length",
truncation=True): content tokens cut to max_length minus the special tokens, special tokens
added by the tokenizer's post-processor, then right-padded with the pad id.

Entities (docs/semantics.md, "Entity tokens"): the entity is tokenized alone without special
tokens and its id run is searched in the prompt's (untruncated) token ids; variants tried in
order: as given, lower-cased, with a leading space, lower-cased with a leading space. The first
variant that occurs wins. Each entity takes its first occurrence (the authors' rule) unless that
makes two entities overlap: then, entity by entity in the order given, the earliest occurrences
that keep every pair apart are used (deterministic), and the log says so. Positions are indices
into the encoder's input sequence (length max_sequence_length).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from .errors import FieldError
from .step_io import DEFAULT_ENTITY_SLOTS  # E is fixed at export
from .text_policy import ECHO_LIMIT, short

T5_MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default and upper bound for max_sequence_length
CLIP_MAX_LENGTH = 77
# Bound on the occurrence search (entities x occurrences); far above any real prompt's needs.
_MAX_PLACEMENT_TRIES = 100_000

log = logging.getLogger("deleaker")

# transformers' CLIPTokenizer pre-tokenizer pattern (the tokenizer.json-less path below).
_CLIP_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
               r"""|[^\s\p{L}\p{N}]+""")


class TokenizerError(FieldError):
    """A tokenizer folder is missing or unusable, or a prompt does not fit it (field "prompt"); the message
    names it."""


class EntityError(FieldError):
    """An entity cannot be placed in the prompt's tokens; one-line message naming both."""

    field = "entities"


def _short(text: str, limit: int = 120) -> str:
    """repr() of text for one-line messages: escapes newlines, cuts very long prompts."""
    return short(text, limit)


def _token_content(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as {"content": ..., ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e
    return data if isinstance(data, dict) else {}


def clip_bpe_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], bos: str = "<|startoftext|>",
                       eos: str = "<|endoftext|>", unk: str = "<|endoftext|>") -> Tokenizer:
    """CLIP byte-level BPE with its normalizer, pre-tokenizer and BOS/EOS post-processor, built
    exactly as transformers' CLIPTokenizer builds it (which ignores tokenizer.json's pipeline)."""
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = list(dict.fromkeys((bos, eos, unk)))
    missing = [t for t in specials if t not in vocab]
    if missing:
        raise TokenizerError(f"CLIP special token(s) {missing} not in the vocabulary")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.post_processor = processors.RobertaProcessing((eos, vocab[eos]), (bos, vocab[bos]),
                                                      trim_offsets=False, add_prefix_space=False)
    return tok


def _clip_bpe_from_files(folder: Path, cfg: dict) -> Tokenizer:
    """CLIP BPE from vocab.json + merges.txt (FLUX.1-dev's tokenizer/ has no tokenizer.json)."""
    try:
        vocab, merges = BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    except Exception as e:
        raise TokenizerError(f"cannot read vocab.json/merges.txt in {folder}: {e}") from e
    return clip_bpe_tokenizer(vocab, merges,
                              bos=_token_content(cfg.get("bos_token")) or "<|startoftext|>",
                              eos=_token_content(cfg.get("eos_token")) or "<|endoftext|>",
                              unk=_token_content(cfg.get("unk_token")) or "<|endoftext|>")


def _model_unk_id(backend: Tokenizer) -> int | None:
    """The id the tokenizer model emits for text it cannot represent, if it has one."""
    try:
        model = json.loads(backend.model.__getstate__())
    except Exception:  # a model type without a JSON state: no unk known
        return None
    if isinstance(model.get("unk_id"), int):  # Unigram (T5)
        return model["unk_id"]
    unk = model.get("unk_token")  # BPE, WordLevel, WordPiece
    return backend.token_to_id(unk) if isinstance(unk, str) else None


@dataclass(frozen=True)
class TextTokenizer:
    """A loaded tokenizer without padding or truncation set; encode_padded adds both."""

    folder: Path | None
    backend: Tokenizer = field(repr=False)
    pad_id: int
    pad_token: str
    model_max_length: int | None
    unk_id: int | None = None  # None: read from the tokenizer model (Unigram unk_id / BPE unk_token)

    def __post_init__(self):
        if self.unk_id is None:
            object.__setattr__(self, "unk_id", _model_unk_id(self.backend))

    def ids(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Untruncated, unpadded token ids."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    @property
    def num_special_tokens(self) -> int:
        """Special tokens the post-processor adds to one sequence (T5: 1, CLIP: 2)."""
        return self.backend.num_special_tokens_to_add(False)

    def encode_padded(self, texts: str | Sequence[str], max_length: int) -> np.ndarray:
        """[B, max_length] int64, as transformers' padding="max_length", truncation=True."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        n_special = self.num_special_tokens
        if max_length <= n_special:
            raise TokenizerError(f"max_length {max_length} leaves no room for text ({n_special} special tokens)")
        out = np.full((len(texts), max_length), self.pad_id, dtype=np.int64)  # [B, L]
        for b, enc in enumerate(self.backend.encode_batch(texts, add_special_tokens=False)):
            # Same order as tokenizers' own truncation: cut content, then add special tokens.
            enc.truncate(max_length - n_special)
            ids = self.backend.post_process(enc, None, True).ids
            out[b, : len(ids)] = ids
        return out


def load_tokenizer(folder: str | Path) -> TextTokenizer:
    """Load a tokenizer folder (tokenizer.json, or vocab.json + merges.txt for CLIP BPE)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TokenizerError(f"tokenizer folder not found: {folder}")
    cfg = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}
    if (folder / "tokenizer.json").is_file():
        try:
            backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise TokenizerError(f"cannot load {folder / 'tokenizer.json'}: {e}") from e
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        backend = _clip_bpe_from_files(folder, cfg)
    else:
        raise TokenizerError(f"no tokenizer.json (or vocab.json + merges.txt) in {folder}")
    backend.no_padding()
    backend.no_truncation()
    pad = _token_content(cfg.get("pad_token"))
    if pad is None:
        pad = next((t for t in ("<pad>", "<|endoftext|>") if backend.token_to_id(t) is not None), None)
    pad_id = backend.token_to_id(pad) if pad is not None else None
    if pad_id is None:
        raise TokenizerError(f"tokenizer in {folder} has no usable pad token (pad_token={pad!r})")
    max_len = cfg.get("model_max_length")
    max_len = int(max_len) if isinstance(max_len, (int, float)) and 0 < max_len < 1e6 else None
    return TextTokenizer(folder, backend, int(pad_id), pad, max_len)


def _check_max_length(max_sequence_length: int) -> int:
    if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, (int, np.integer)) \
            or not 1 <= max_sequence_length <= T5_MAX_SEQUENCE_LENGTH:
        raise TokenizerError(f"max_sequence_length must be an integer in [1, {T5_MAX_SEQUENCE_LENGTH}],"
                             f" got {max_sequence_length!r}")
    return int(max_sequence_length)


def t5_input_ids(tok: TextTokenizer, prompts: str | Sequence[str],
                 max_sequence_length: int = T5_MAX_SEQUENCE_LENGTH) -> np.ndarray:
    """T5 encoder input ids [B, max_sequence_length] int64 (FluxPipeline._get_t5_prompt_embeds)."""
    return tok.encode_padded(prompts, _check_max_length(max_sequence_length))


def clip_input_ids(tok: TextTokenizer, prompts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
    """CLIP encoder input ids [B, 77] int64 for the pooled embedding
    (FluxPipeline._get_clip_prompt_embeds; length = the tokenizer's model_max_length)."""
    return tok.encode_padded(prompts, max_length or tok.model_max_length or CLIP_MAX_LENGTH)


@dataclass(frozen=True)
class EntitySpan:
    """Where an entity's tokens sit in the encoder's input: positions [start, end)."""

    entity: str  # as given
    matched: str  # the variant whose tokens were found (e.g. lower-cased)
    start: int
    end: int

    @property
    def positions(self) -> range:
        return range(self.start, self.end)


def _find_runs(haystack: Sequence[int], needle: Sequence[int]) -> list[int]:
    """Start of every occurrence of `needle` in `haystack` (overlapping ones included), ascending."""
    n = len(needle)
    needle = list(needle)
    first = needle[0]
    return [i for i in range(len(haystack) - n + 1) if haystack[i] == first and list(haystack[i:i + n]) == needle]


def _find_run(haystack: Sequence[int], needle: Sequence[int]) -> int:
    runs = _find_runs(haystack, needle)
    return runs[0] if runs else -1


def _variants(entity: str) -> list[str]:
    out: list[str] = []
    for v in (entity, entity.lower(), " " + entity, " " + entity.lower()):
        if v not in out:
            out.append(v)
    return out


def _has_content(tok: TextTokenizer, ids: Sequence[int]) -> bool:
    """Whether a token run carries text: some token that is neither unknown nor empty/whitespace."""
    return any(i != tok.unk_id and tok.backend.decode([i]).strip() for i in ids)


@dataclass(frozen=True)
class _Candidates:
    """Where one entity may go: the matched variant and its occurrences [start, end) in content ids."""

    entity: str
    variant: str
    occurrences: list[tuple[int, int]]  # all occurrences, ascending
    usable: list[tuple[int, int]]  # those the encoder keeps (not cut off by truncation)


def _candidates(tok: TextTokenizer, prompt: str, entity: str, content: list[int],
                prompt_offsets: list[tuple[int, int]], kept: int, max_len: int, offset: int) -> _Candidates:
    if not isinstance(entity, str) or not entity.strip():
        raise EntityError(f"empty entity {_short(entity, ECHO_LIMIT)} for prompt {_short(prompt)}")
    survives = False
    for variant in _variants(entity):
        run = tok.ids(variant, add_special_tokens=False)
        if not _has_content(tok, run):
            continue  # only unknown/empty tokens: would match any text the tokenizer cannot represent
        survives = True
        starts = _find_runs(content, run)
        if tok.unk_id is not None and tok.unk_id in run:
            # An unknown token matches any unknown text: keep only occurrences whose source text is
            # the entity itself (so "x🐱" does not match "x🐶").
            want = variant.strip().lower()
            starts = [s for s in starts
                      if prompt[prompt_offsets[s][0]:prompt_offsets[s + len(run) - 1][1]].strip().lower() == want]
        if starts:
            occ = [(s, s + len(run)) for s in starts]
            usable = [o for o in occ if o[1] <= kept]
            if not usable:
                start, end = occ[0]
                raise EntityError(f"entity {_short(entity, ECHO_LIMIT)} is cut off by truncation to {max_len} tokens in prompt"
                                  f" {_short(prompt)} (its tokens are at {start + offset}..{end + offset - 1})")
            return _Candidates(entity, variant, occ, usable)
    if not survives:
        enc = tok.backend.encode(entity, add_special_tokens=False)
        unk = tok.backend.id_to_token(tok.unk_id) if tok.unk_id is not None else None
        tokens = [unk if i == tok.unk_id else t for i, t in zip(enc.ids, enc.tokens)]
        what = f"only unknown or empty tokens {tokens}" if tokens else "no tokens"
        raise EntityError(f"entity {_short(entity, ECHO_LIMIT)} does not survive tokenization (the T5 tokenizer turns it into {what});"
                          f" name it with words the tokenizer knows, in prompt {_short(prompt)}")
    raise EntityError(f"entity {_short(entity, ECHO_LIMIT)} not found in prompt {_short(prompt)} (also tried lower-case"
                      " and a leading space)")


def _place(cands: list[_Candidates]) -> list[tuple[int, int]] | None:
    """One occurrence per entity, no two overlapping; the first such choice in the order
    (entity 1's earliest, then entity 2's earliest, ...), so the authors' first-occurrence rule
    holds whenever it is overlap-free. None when there is none (or the search is too large)."""
    chosen: list[tuple[int, int]] = []
    tries = 0

    def go(e: int) -> bool:
        nonlocal tries
        if e == len(cands):
            return True
        for s, t in cands[e].usable:
            tries += 1
            if tries > _MAX_PLACEMENT_TRIES:
                return False
            if all(t <= a or b <= s for a, b in chosen):
                chosen.append((s, t))
                if go(e + 1):
                    return True
                chosen.pop()
        return False

    return chosen if go(0) else None


def locate_entities(tok: TextTokenizer, prompt: str, entities: Sequence[str],
                    max_sequence_length: int = T5_MAX_SEQUENCE_LENGTH) -> list[EntitySpan]:
    """Token spans of `entities` in `prompt` as the T5 encoder sees it (docs/semantics.md).

    Each entity takes its first occurrence unless that overlaps another entity's; then the
    earliest overlap-free occurrences are chosen (logged). Raises EntityError for an empty
    entity, one that does not survive tokenization (only unknown tokens), one not found, one
    cut off by truncation, and entities that overlap wherever they are placed."""
    max_len = _check_max_length(max_sequence_length)
    if isinstance(entities, str):
        raise EntityError(f"entities must be a list of strings, got the string {_short(entities)}")
    enc = tok.backend.encode(prompt, add_special_tokens=False)
    content = enc.ids
    full = tok.ids(prompt, add_special_tokens=True)
    # Offset of the prompt's tokens inside the encoder sequence (0 for T5, 1 for a BOS prefix).
    offset = _find_run(full, content) if content else 0
    offset = max(offset, 0)
    kept = min(len(content), max_len - tok.num_special_tokens)  # content tokens the encoder keeps
    cands = [_candidates(tok, prompt, entity, content, enc.offsets, kept, max_len, offset) for entity in entities]
    placed = _place(cands)
    if placed is None:
        # No overlap-free choice exists, so the first occurrences overlap somewhere: name that pair.
        first = [c.usable[0] for c in cands]
        for i, (a0, a1) in enumerate(first):
            for j in range(i + 1, len(first)):
                b0, b1 = first[j]
                if a0 < b1 and b0 < a1:
                    raise EntityError(
                        f"entities {_short(cands[i].entity, ECHO_LIMIT)} and {_short(cands[j].entity, ECHO_LIMIT)}"
                        f" overlap in prompt {_short(prompt)}"
                        f" (tokens {a0 + offset}..{a1 + offset - 1} and {b0 + offset}..{b1 + offset - 1}) and no"
                        " other occurrences keep them apart")
        raise EntityError(f"entities {_short([c.entity for c in cands])} cannot be placed without overlap in prompt"
                          f" {_short(prompt)}")
    spans = []
    for c, (s, t) in zip(cands, placed):
        if len(c.occurrences) > 1:
            where = ", ".join(f"{a + offset}..{b + offset - 1}" for a, b in c.occurrences)
            k = c.occurrences.index((s, t)) + 1
            if k == 1:
                log.info("entity %r occurs %d times in prompt %s (tokens %s); using the first",
                         c.entity, len(c.occurrences), _short(prompt), where)
            else:
                log.warning("entity %r occurs %d times in prompt %s (tokens %s); using occurrence %d (tokens"
                            " %s) because the earlier ones overlap another entity", c.entity, len(c.occurrences),
                            _short(prompt), where, k, f"{s + offset}..{t + offset - 1}")
        spans.append(EntitySpan(c.entity, c.variant, s + offset, t + offset))
    return spans


def entity_tokens(tok: TextTokenizer, prompts: str | Sequence[str],
                  entities: Sequence[str] | Sequence[Sequence[str]],
                  num_slots: int = DEFAULT_ENTITY_SLOTS,
                  max_sequence_length: int = T5_MAX_SEQUENCE_LENGTH) -> np.ndarray:
    """entity_tokens [B, num_slots, max_sequence_length] float32: 1 where token t belongs to
    entity slot e. `entities` is one list per prompt, or one flat list shared by all prompts.
    Unused slots stay all-zero (inactive)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if isinstance(entities, str):
        raise EntityError(f"entities must be a list of strings, got the string {_short(entities)}")
    entities = list(entities)
    if not entities or all(isinstance(e, str) for e in entities):
        per_prompt = [entities] * len(prompts)
    else:
        per_prompt = [list(e) for e in entities]
        if len(per_prompt) != len(prompts):
            raise EntityError(f"got {len(per_prompt)} entity lists for {len(prompts)} prompts")
    max_len = _check_max_length(max_sequence_length)
    out = np.zeros((len(prompts), num_slots, max_len), dtype=np.float32)  # [B, E, T]
    for b, (prompt, ents) in enumerate(zip(prompts, per_prompt)):
        if len(ents) > num_slots:
            raise EntityError(f"{len(ents)} entities for prompt {_short(prompt)} but only {num_slots}"
                              " entity slots (set at export)")
        for e, span in enumerate(locate_entities(tok, prompt, ents, max_len)):
            out[b, e, span.start:span.end] = 1.0
    return out
