"""`deleaker-export onnx` rejects bad requests with one line and exit code 2, before any export work."""

from __future__ import annotations

import pytest

from deleaker.export.cli import main


@pytest.mark.parametrize("case", ["not_a_checkpoint", "out_not_empty", "size_not_multiple", "range_inverted",
                                  "example_outside_range", "unknown_preset", "text_too_long", "zero_slots"])
def test_export_rejects_bad_requests(tiny_model_dir, tmp_path, capsys, case):
    out = tmp_path / "artifact"
    args = ["onnx", "--model", str(tiny_model_dir), "--out", str(out), "--height", "64", "--width", "64", "--quiet"]
    if case == "not_a_checkpoint":
        args[2] = str(tmp_path)
        expect = "model_index.json"
    elif case == "out_not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        expect = "not empty; pass --force"
    elif case == "size_not_multiple":
        args += ["--height", "100"]
        expect = "height must be a positive multiple of 16, got 100"
    elif case == "range_inverted":
        args += ["--min-size", "128", "--max-size", "32"]
        expect = "--min-size 128 is larger than --max-size 32"
    elif case == "example_outside_range":
        args += ["--min-size", "128", "--max-size", "256"]
        expect = "must lie in the size range [128, 256]"
    elif case == "unknown_preset":
        args += ["--preset", "flux-pro"]
        expect = "unknown DeLeaker preset 'flux-pro'"
    elif case == "text_too_long":
        args += ["--max-text-tokens", "4096"]
        expect = "--max-text-tokens 4096 exceeds"
    else:
        args += ["--entity-slots", "0"]
        expect = "--entity-slots must be >= 1"
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("deleaker-export: error:") and err.count("\n") == 1, err
    assert expect in err, err
    if case == "out_not_empty":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # untouched
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".artifact.tmp-")]  # no temp folder left


def test_steps_option_is_gone(tiny_model_dir, tmp_path, capsys):
    """An artifact serves every step count: there is no --steps to bake one in."""
    with pytest.raises(SystemExit) as exc:
        main(["onnx", "--model", str(tiny_model_dir), "--out", str(tmp_path / "a"), "--steps", "8"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --steps 8" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_default_size_range_covers_generate_defaults(tiny_model_dir, tmp_path):
    """`deleaker-export onnx --model M --out A` with no size flags records a range that holds
    `deleaker generate`'s default size, so `deleaker generate --artifact A` needs no size flags."""
    from deleaker.export.cli import export_spec, parse_args
    from deleaker.runtime.model_card import DEFAULT_SIDE

    spec = export_spec(parse_args(["onnx", "--model", str(tiny_model_dir), "--out", str(tmp_path / "a")]))
    spec.validate()
    assert spec.size_range == (64, 1024)
    lo, hi = spec.size_range
    assert lo <= DEFAULT_SIDE <= hi  # generate's default height and width
    # an example size outside the default range widens it instead of failing
    wide = export_spec(parse_args(["onnx", "--model", str(tiny_model_dir), "--out", str(tmp_path / "a"),
                                   "--height", "32", "--width", "2048"]))
    wide.validate()
    assert wide.size_range == (32, 2048)


def _tree(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


@pytest.mark.parametrize("where", ["is_model", "inside_model", "contains_model", "is_a_file", "under_a_file",
                                   "not_an_artifact"])
def test_out_that_would_lose_data_is_refused(tiny_model_dir, tmp_path, capsys, where):
    """--out that is, lies inside or contains the --model folder is refused (even with --force), before
    any work: the checkpoint stays byte for byte as it was."""
    import shutil

    model = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_model_dir, model)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "letter.txt").write_text("mine")
    out, expect = {
        "is_model": (model, "is the --model folder"),
        "inside_model": (model / "artifact", "lies inside the --model folder"),
        "contains_model": (tmp_path / "models", "contains the --model folder"),
        "is_a_file": (tmp_path / "notes.txt", "exists and is not a folder"),
        "under_a_file": (tmp_path / "notes.txt" / "artifact", "is a file, not a folder"),
        "not_an_artifact": (tmp_path / "docs", "is not an artifact folder (no manifest.json); --force only replaces"),
    }[where]
    before = _tree(tmp_path)
    rc = main(["onnx", "--model", str(model), "--out", str(out), "--force", "--height", "64", "--width", "64"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("deleaker-export: error:") and err.count("\n") == 1, err
    assert expect in err, err
    assert _tree(tmp_path) == before  # nothing written, nothing replaced
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_aoti_out_inside_model_is_refused(tiny_model_dir, capsys):
    rc = main(["aoti", "--model", str(tiny_model_dir), "--out", str(tiny_model_dir / "aoti"), "--force",
               "--height", "64", "--width", "64"])
    err = capsys.readouterr().err
    assert rc == 2 and "lies inside the --model folder" in err and err.count("\n") == 1, err
    assert not (tiny_model_dir / "aoti").exists()


def test_long_stage_reports_elapsed_time(caplog):
    """A stage logs its start, then an elapsed-time line per period until it ends, then stops."""
    import logging
    import time

    from deleaker.export.progress import stage

    with caplog.at_level(logging.INFO, logger="deleaker"):
        with stage("compiling x", every=0.05):
            time.sleep(0.3)
        n = len(caplog.records)
        time.sleep(0.15)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "compiling x ..."
    still = [m for m in lines[1:] if m.startswith("  ... still compiling x (")]
    assert len(still) >= 2 and len(still) == len(lines) - 1, lines
    assert len(caplog.records) == n  # no line after the stage ended


def test_interrupt_is_one_line_and_exit_130(capsys):
    """The CLIs (deleaker-export, deleaker-bench, deleaker eval) report Ctrl-C as one line, exit 130,
    after the work's own clean-up ran."""
    from deleaker.export.cli import run_cli

    cleaned = []

    def work():
        try:
            raise KeyboardInterrupt
        finally:
            cleaned.append(True)

    assert run_cli("deleaker-bench", work) == 130
    assert capsys.readouterr().err == "deleaker-bench: interrupted\n" and cleaned == [True]
