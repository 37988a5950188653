"""SLIM-format loader: every kind of bad record is reported (where + why) and skipped; every format
reads the same records; the shipped sample loads cleanly."""

from __future__ import annotations

import csv
import json

import pytest

from deleaker.eval import cli
from deleaker.eval.data import SAMPLE, SLIM_SPLITS, DataError, entity_in_prompt, load_records

GOOD = [
    {"prompt": "A cat and a dog on a sofa", "entities": ["cat", "dog"], "seed": 1, "dataset": "two_entities",
     "model": "FLUX.1-dev", "leakage": True},
    {"prompt": "An owl, a crow and a duck", "entities": ["owl", "crow", "duck"], "seed": 2,
     "dataset": "animal_triplets", "model": "FLUX.1-dev", "leakage": False},
    {"prompt": "Lemons, a pear and an apple", "entities": ["lemon", "pear", "apple"], "seed": 3,
     "dataset": "fruit_n_veg_triplets", "model": "FLUX.1-dev", "leakage": None},
]
# (row, expected reason fragment)
BAD = [
    ({"prompt": "a cat and a dog", "entities": ["cat", "cow"], "seed": 1, "dataset": "two_entities"},
     "entity 'cow' does not occur in the prompt"),
    ({"prompt": "a bobcat and a dog", "entities": ["cat", "dog"], "seed": 1, "dataset": "two_entities"},
     "entity 'cat' does not occur"),
    ({"prompt": "a cat and a dog", "entities": ["cat", "dog"], "dataset": "two_entities"}, "missing seed"),
    ({"prompt": "a cat and a dog", "entities": ["cat", "dog"], "seed": "x1", "dataset": "two_entities"},
     "seed must be an integer"),
    ({"prompt": "a cat and a dog", "entities": ["cat", "dog"], "seed": -4, "dataset": "two_entities"},
     "seed must be in"),
    ({"prompt": "a cat and a dog", "entities": ["cat", "dog"], "seed": 1.5, "dataset": "two_entities"},
     "seed must be an integer"),
    ({"prompt": "", "entities": ["cat", "dog"], "seed": 1, "dataset": "two_entities"}, "missing or empty prompt"),
    ({"entities": ["cat", "dog"], "seed": 1, "dataset": "two_entities"}, "missing or empty prompt"),
    ({"prompt": "a cat and a dog", "seed": 1, "dataset": "two_entities"}, "missing entities"),
    ({"prompt": "a cat and a dog", "entities": ["cat"], "seed": 1, "dataset": "two_entities"},
     "needs at least 2 entities"),
    ({"prompt": "a cat and a cat", "entities": ["cat", "Cat"], "seed": 1, "dataset": "two_entities"},
     "listed twice"),
    ({"prompt": "a cat and a dog", "entities": ["cat", " "], "seed": 1, "dataset": "two_entities"},
     "empty entity"),
    ({"prompt": "a cat and a dog", "entities": [1, 2], "seed": 1, "dataset": "two_entities"},
     "entities must be a list of strings"),
    ({"prompt": "a cat and a dog", "entities": ["cat", "dog"], "seed": 1}, "no split"),
    ({"prompt": "a cat and a dog", "entities": ["cat", "dog"], "seed": 1, "dataset": "two_entities",
      "leakage": "maybe"}, "leakage flag must be a boolean"),
    (dict(GOOD[0]), "duplicate of"),  # same split, prompt, entities and seed as the first good row
]


def _jsonl(path, rows, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(extra_lines))
    return path


def test_bad_records_reported_one_by_one(tmp_path, caplog):
    path = _jsonl(tmp_path / "d.jsonl", GOOD + [row for row, _ in BAD], ["{not json\n", "[1, 2]\n"])
    res = load_records(path)
    assert [r.prompt for r in res.records] == [g["prompt"] for g in GOOD]
    assert len(res.problems) == len(BAD) + 2
    for problem, (_, reason) in zip(res.problems, BAD):
        assert reason in problem.reason, (problem, reason)
    n = len(GOOD)
    assert [p.where for p in res.problems[:2]] == [f"d.jsonl:{n + 1}", f"d.jsonl:{n + 2}"]
    assert "not valid JSON" in res.problems[-2].reason and "expected an object" in res.problems[-1].reason
    assert "duplicate of d.jsonl:1" in res.problems[len(BAD) - 1].reason
    assert sum("skipped record" in r.message for r in caplog.records) == len(BAD) + 2


def test_records_fields(tmp_path):
    recs = load_records(_jsonl(tmp_path / "d.jsonl", GOOD)).records
    assert [r.split for r in recs] == list(SLIM_SPLITS)
    assert recs[0].entities == ("cat", "dog") and recs[0].seed == 1 and recs[0].leakage is True
    assert recs[1].leakage is False and recs[2].leakage is None and recs[0].model == "FLUX.1-dev"
    assert len({r.item_id for r in recs}) == 3
    assert load_records(tmp_path / "d.jsonl", splits=["animal_triplets"]).records == [recs[1]]
    with pytest.raises(DataError, match="no records in split"):
        load_records(tmp_path / "d.jsonl", splits=["nope"])


def test_entity_matching():
    assert entity_in_prompt("cat", "Two Cats play") and entity_in_prompt("sea lion", "a sea lion and a seal")
    assert not entity_in_prompt("cat", "a bobcat") and not entity_in_prompt("dog", "a hotdog stand")


def test_formats_agree(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    want = load_records(_jsonl(tmp_path / "d.jsonl", GOOD)).records
    key = [(r.prompt, r.entities, r.seed, r.split, r.leakage) for r in want]

    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(GOOD[0]))
        w.writeheader()
        for g in GOOD:
            w.writerow({**g, "entities": json.dumps(g["entities"]), "leakage": "" if g["leakage"] is None
                        else str(g["leakage"]).lower()})
    rows = [{**g, "image": b"\x89PNG not read"} for g in GOOD]  # the image column is skipped
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    # HF hub layout: one parquet file per split, the split from the file name
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    for g in GOOD:
        row = {k: v for k, v in g.items() if k != "dataset"}
        pq.write_table(pa.Table.from_pylist([row]), hub / f"{g['dataset']}-00000-of-00001.parquet")
    for src in (tmp_path / "d.csv", tmp_path / "d.parquet"):
        got = load_records(src)
        assert not got.problems and [(r.prompt, r.entities, r.seed, r.split, r.leakage) for r in got.records] == key
    hub_recs = load_records(tmp_path / "hub").records
    assert sorted((r.prompt, r.split) for r in hub_recs) == sorted((r.prompt, r.split) for r in want)


def test_saved_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({s: datasets.Dataset.from_list(
        [{k: v for k, v in g.items() if k != "leakage"} | {"leakage": bool(g["leakage"])}
         for g in GOOD if g["dataset"] == s]) for s in SLIM_SPLITS})
    dd.save_to_disk(str(tmp_path / "slim"))
    got = load_records(tmp_path / "slim")
    assert not got.problems and sorted(r.prompt for r in got.records) == sorted(g["prompt"] for g in GOOD)
    # a split column that disagrees with the split it is stored in is a bad record
    bad = datasets.DatasetDict({"two_entities": datasets.Dataset.from_list([{**GOOD[1], "leakage": False}])})
    bad.save_to_disk(str(tmp_path / "bad"))
    assert "split column says 'animal_triplets'" in load_records(tmp_path / "bad").problems[0].reason


def test_whole_source_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unknown dataset format"):
        load_records(tmp_path / "d.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .parquet files"):
        load_records(tmp_path / "empty")


def test_shipped_sample(capsys):
    res = load_records()
    assert res.problems == []
    counts = {s: sum(r.split == s for r in res.records) for s in SLIM_SPLITS}
    assert sum(counts.values()) >= 60 and all(n >= 15 for n in counts.values())
    assert all(len(r.entities) == (2 if r.split == "two_entities" else 3) for r in res.records)
    assert SAMPLE.exists() and cli.main(["check"]) == 0
    assert "64 usable record(s)" in capsys.readouterr().out


def test_check_command_lists_problems(tmp_path, capsys):
    path = _jsonl(tmp_path / "d.jsonl", GOOD + [BAD[0][0]])
    assert cli.main(["--quiet", "check", "--dataset", str(path)]) == 1
    assert "bad record d.jsonl:4: entity 'cow' does not occur" in capsys.readouterr().out
    assert cli.main(["--quiet", "check", "--dataset", str(tmp_path / "nope.csv")]) == 2
    assert "deleaker eval: error: dataset not found" in capsys.readouterr().err
