"""SLIM-format records: loader for local files and the sample shipped with the package.

SLIM (Semantic Leakage in IMages) rows have the columns image, prompt, entities, seed, dataset
(the split: two_entities, animal_triplets, fruit_n_veg_triplets), model, leakage. Sources, all local
(nothing is downloaded):
  - a folder written by `datasets.Dataset(Dict).save_to_disk` (needs the `datasets` package),
  - a .parquet file, or a folder of them (split from the column, else from the file name),
  - a .jsonl file (one JSON object a line) or a .csv file.
A bad record is reported (where + why) and skipped; nothing is repaired or guessed.
The `image` column is not read: `deleaker eval run` regenerates every image from prompt and seed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

log = logging.getLogger("deleaker.eval")

SLIM_SPLITS = ("two_entities", "animal_triplets", "fruit_n_veg_triplets")
SAMPLE = Path(__file__).parent / "sample" / "slim_sample.jsonl"
_SPLIT_COLUMNS = ("dataset", "split")  # SLIM names the split column `dataset`


class DataError(ValueError):
    """The dataset as a whole cannot be read (missing file, unknown format, missing library)."""


@dataclass(frozen=True)
class Record:
    prompt: str
    entities: tuple[str, ...]
    seed: int
    split: str
    model: str = ""  # the model SLIM's own image was made with (informative only)
    leakage: bool | None = None  # SLIM's flag for its own image; None: not given
    where: str = ""  # source location, for messages

    @property
    def item_id(self) -> str:
        """Stable, file-name-safe id of this (prompt, entities, seed) in this split."""
        key = json.dumps([self.split, self.prompt, list(self.entities), self.seed])
        return f"{self.split}-{hashlib.sha1(key.encode()).hexdigest()[:10]}-s{self.seed}"


@dataclass(frozen=True)
class Problem:
    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class LoadResult:
    records: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


class _Bad(Exception):
    """One record is unusable; the message says why."""


def _entities(value: Any) -> tuple[str, ...]:
    if value is None:
        raise _Bad("missing entities")
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                raise _Bad(f"entities {value!r} is not a valid JSON list") from None
        else:
            value = text.split(",") if text else []
    if not isinstance(value, (list, tuple)) or not all(isinstance(e, str) for e in value):
        raise _Bad(f"entities must be a list of strings, got {value!r}")
    ents = tuple(e.strip() for e in value)
    if any(not e for e in ents):
        raise _Bad(f"empty entity in {list(value)!r}")
    if len(ents) < 2:
        raise _Bad(f"needs at least 2 entities, got {list(ents)!r}")
    seen = set()
    for e in ents:
        if e.lower() in seen:
            raise _Bad(f"entity {e!r} is listed twice")
        seen.add(e.lower())
    return ents


def _seed(value: Any) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _Bad("missing seed")
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise _Bad(f"seed must be an integer, got {value!r}")
    try:
        seed = int(value.strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise _Bad(f"seed must be an integer, got {value!r}") from None
    if not 0 <= seed < 2**63:
        raise _Bad(f"seed must be in [0, 2^63), got {seed}")
    return seed


def _leakage(value: Any) -> bool | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    raise _Bad(f"leakage flag must be a boolean, got {value!r}")


def entity_in_prompt(entity: str, prompt: str) -> bool:
    """Whole-word start match, case-insensitive ('cat' matches 'Cats', not 'bobcat')."""
    return re.search(r"(?<!\w)" + re.escape(entity), prompt, re.IGNORECASE) is not None


def parse_record(row: dict, where: str, split: str | None = None) -> Record:
    """One raw row -> Record, or _Bad with the reason."""
    if not isinstance(row, dict):
        raise _Bad(f"expected an object, got {type(row).__name__}")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _Bad("missing or empty prompt")
    ents = _entities(row.get("entities"))
    for e in ents:
        if not entity_in_prompt(e, prompt):
            raise _Bad(f"entity {e!r} does not occur in the prompt {prompt!r}")
    seed = _seed(row.get("seed"))
    row_split = next((row[c] for c in _SPLIT_COLUMNS if row.get(c) not in (None, "")), None)
    if row_split is not None and split is not None and row_split != split:
        raise _Bad(f"split column says {row_split!r} but the record is in split {split!r}")
    split = row_split or split
    if not isinstance(split, str) or not split:
        raise _Bad("no split: give a `dataset` (or `split`) column")
    model = row.get("model") or ""
    if not isinstance(model, str):
        raise _Bad(f"model must be a string, got {model!r}")
    return Record(prompt=prompt.strip(), entities=ents, seed=seed, split=split, model=model,
                  leakage=_leakage(row.get("leakage")), where=where)


# ---- sources: each yields (where, split_or_None, row) ------------------------------------------

def _jsonl_rows(path: Path) -> Iterator[tuple[str, str | None, Any]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path.name}:{n}", None, json.loads(line)
            except ValueError as e:
                yield f"{path.name}:{n}", None, _Bad(f"not valid JSON ({e})")


def _csv_rows(path: Path) -> Iterator[tuple[str, str | None, Any]]:
    with open(path, encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.DictReader(f), 2):  # line 1 is the header
            yield f"{path.name}:{n}", None, row


def _parquet_rows(path: Path, split: str | None) -> Iterator[tuple[str, str | None, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading parquet needs pyarrow: pip install 'deleaker[eval]'") from None
    try:
        pf = pq.ParquetFile(path)
        columns = [c for c in pf.schema_arrow.names if c != "image"]  # images are regenerated
        table = pf.read(columns=columns)
    except Exception as e:  # pyarrow raises its own exception types
        raise DataError(f"cannot read parquet file {path}: {e}") from e
    for n, row in enumerate(table.to_pylist()):
        yield f"{path.name}[{n}]", split, row


def _split_from_name(path: Path) -> str | None:
    """HF hub layout: data/two_entities-00000-of-00001.parquet -> two_entities."""
    stem = path.name.split("-")[0].split(".")[0]
    return stem if stem in SLIM_SPLITS else None


def _hf_rows(folder: Path) -> Iterator[tuple[str, str | None, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{folder} is a Hugging Face dataset folder; reading it needs the `datasets` "
                        "package (pip install datasets), or export it to parquet/jsonl") from None
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:  # datasets raises assorted types
        raise DataError(f"cannot load the dataset saved in {folder}: {e}") from e
    parts = ds.items() if isinstance(ds, datasets.DatasetDict) else [(None, ds)]
    for split, part in parts:
        part = part.remove_columns([c for c in part.column_names if c == "image"])
        for n, row in enumerate(part):
            yield f"{split or folder.name}[{n}]", split, row


def _rows(path: Path) -> Iterator[tuple[str, str | None, Any]]:
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            yield from _hf_rows(path)
            return
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise DataError(f"{path} holds no saved dataset (dataset_dict.json/state.json) and no .parquet files")
        for f in files:
            yield from _parquet_rows(f, _split_from_name(f))
        return
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_rows(path)
    elif suffix == ".csv":
        yield from _csv_rows(path)
    elif suffix == ".parquet":
        yield from _parquet_rows(path, _split_from_name(path))
    else:
        raise DataError(f"unknown dataset format {path.name!r}: use a saved HF dataset folder, .parquet, .jsonl "
                        "or .csv")


def load_records(source: str | Path | None = None, splits: Iterable[str] | None = None) -> LoadResult:
    """Read every record of `source` (default: the shipped sample); bad ones go to .problems."""
    path = Path(source) if source is not None else SAMPLE
    if not path.exists():
        raise DataError(f"dataset not found: {path}")
    wanted = set(splits) if splits else None
    out = LoadResult()
    first_seen: dict[str, str] = {}
    for where, split, row in _rows(path):
        try:
            if isinstance(row, _Bad):
                raise row
            rec = parse_record(row, where, split)
            if rec.item_id in first_seen:
                raise _Bad(f"duplicate of {first_seen[rec.item_id]} (same split, prompt, entities and seed)")
        except _Bad as e:
            out.problems.append(Problem(where, str(e)))
            log.warning("skipped record %s: %s", where, e)
            continue
        first_seen[rec.item_id] = where
        if wanted is None or rec.split in wanted:
            out.records.append(rec)
    if wanted:
        missing = wanted - {r.split for r in out.records}
        if missing:
            raise DataError(f"no records in split(s) {', '.join(sorted(missing))}")
    return out
