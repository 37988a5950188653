"""`deleaker eval run` and `check` refuse bad input in one line (exit 2) before any output: no
run folder is made, an existing one is left as it was, and the corrected rerun goes ahead."""

from __future__ import annotations

import json

import pytest

from deleaker.eval import cli
from deleaker.eval.run import RunSettings, run_generation
from deleaker.eval.store import RunDir

ROWS = [{"prompt": "a cat and a dog on a sofa", "entities": ["cat", "dog"], "seed": 1, "dataset": "two_entities"}]


@pytest.fixture()
def dataset(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _args(dataset, model, out, *extra):
    return ["--quiet", "run", "--dataset", str(dataset), "--model", str(model), "--preset", "tiny", "--steps", "1",
            "--height", "64", "--width", "64", "--out", str(out), *extra]


@pytest.mark.parametrize("bad, expect", [
    (["--steps", "0"], "--steps must be in [1, 1000], got 0"),
    (["--steps", "1001"], "--steps must be in [1, 1000], got 1001"),
    (["--height", "17"], "multiples of 16"),
    (["--preset", "bogus"], "unknown DeLeaker preset 'bogus'"),
    (["--batch", "0"], "--batch must be an integer >= 1"),
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--backend", "nope"], "unknown backend 'nope'"),
    (["--model", "MISSING"], "is not a folder"),
])
def test_bad_option_writes_nothing_and_the_rerun_works(tiny_model_dir, dataset, tmp_path, capsys, bad, expect):
    out = tmp_path / "runs" / "r"
    args = _args(dataset, tiny_model_dir, out, *bad)
    if "MISSING" in bad:
        args[args.index("MISSING")] = str(tmp_path / "no-model")
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("deleaker eval: error:") and err.count("\n") == 1 and expect in err, err
    assert not (tmp_path / "runs").exists()  # nothing made, not even the parent folder
    if bad[0] in ("--steps", "--preset"):  # the corrected command runs in the same --out
        assert cli.main(_args(dataset, tiny_model_dir, out)) == 0, capsys.readouterr().err
        assert len(RunDir(out).items()) == 1


def test_failed_start_leaves_no_half_made_folder(tiny_model_dir, dataset, tmp_path):
    """An error after the folder is made but before the first item (here: the engine breaks) removes
    what this run made; an existing --out folder keeps its own files."""
    from deleaker.runtime.pipeline import load_pipeline

    class Broken:
        def __init__(self, pipe):
            self.pipe, self.backend = pipe, pipe.backend

        def check(self, req):
            return self.pipe.check(req)

        def generate(self, *a, **k):
            raise OSError("disk full")

    settings = RunSettings(dataset=str(dataset), source=str(tiny_model_dir), preset="tiny", steps=1, height=64,
                           width=64)
    pipe = Broken(load_pipeline(str(tiny_model_dir)))
    with pytest.raises(OSError, match="disk full"):
        run_generation(settings, str(tmp_path / "new" / "run"), progress=False, pipeline=pipe)
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(OSError, match="disk full"):
        run_generation(settings, str(mine), progress=False, pipeline=pipe)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_resume_with_other_settings_is_refused_before_loading(tiny_model_dir, dataset, tmp_path, capsys):
    out = tmp_path / "r"
    assert cli.main(_args(dataset, tiny_model_dir, out)) == 0
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
    assert cli.main(_args(dataset, tiny_model_dir, out, "--steps", "2")) == 2
    err = capsys.readouterr().err
    assert "was made with steps=1, not 2" in err and err.count("\n") == 1, err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def test_out_that_is_a_file_is_refused(tiny_model_dir, dataset, tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("x")
    assert cli.main(_args(dataset, tiny_model_dir, out)) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert out.read_text() == "x"


@pytest.mark.parametrize("content, expect", [("", "has no usable records (it is empty)"),
                                             ("\n\n", "has no usable records (it is empty)"),
                                             ('{"prompt": "x"}\n', "has no usable records (1 bad, listed above)")])
def test_check_without_usable_records_fails(tmp_path, capsys, content, expect):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    assert cli.main(["--quiet", "check", "--dataset", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and expect in captured.err, captured.err
    assert "usable record(s):" not in captured.out


@pytest.mark.parametrize("bad", [["--concurrency", "0"], ["--retries", "-1"], ["--timeout", "0"]])
def test_judge_limits_checked_for_every_judge(tmp_path, capsys, bad):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.jsonl").write_text("")
    assert cli.main(["--quiet", "judge", str(run), "--judge", "lpips", *bad]) == 2
    err = capsys.readouterr().err
    assert "--concurrency must be >= 1" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in run.iterdir()) == ["manifest.jsonl"]
