"""`deleaker generate`: outputs, and one-line errors with nothing half-written."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deleaker.runtime.cli import main
from deleaker.runtime.images import GAP, LABEL_HEIGHT

PROMPT = "a cat and a cheetah in a field"


def test_generate_writes_png_quickly(tiny_model_dir, tmp_path):
    out = tmp_path / "one.png"
    t0 = time.perf_counter()
    # the installed console script, as a user runs it
    r = subprocess.run([str(Path(sys.executable).parent / "deleaker"), "generate", "--model", str(tiny_model_dir),
                        "--prompt", PROMPT, "--entities", "cat,cheetah", "--out", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (256, 256)
    print(f"deleaker generate (20 steps, 256x256, tiny model) took {seconds:.1f}s")
    assert seconds < 60  # the bound for this CPU; the measured figure is printed above


def test_compare_writes_both_images_in_one_file(tiny_model_dir, tmp_path):
    out = tmp_path / "both.png"
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", PROMPT, "--entities", "cat,cheetah",
                 "--steps", "4", "--height", "64", "--width", "96", "--compare", "--out", str(out), "--quiet"]) == 0
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    # 64 px images are enlarged 2x (to 128 px), GAP apart, labels in a strip beneath both
    assert img.shape == (128 + LABEL_HEIGHT, 2 * 192 + GAP, 3)
    left, right = img[:128, :192], img[:128, 192 + GAP:]
    for panel in (left, right):
        # nearest: every 2x2 block is one model pixel (smoothing would blend neighbours)
        assert (panel[0::2, 0::2] == panel[1::2, 1::2]).all() and (panel[0::2, 0::2] == panel[0::2, 1::2]).all()
    assert (img[:128, 192:192 + GAP] == 255).all()  # the gap is white: the panels do not touch
    strip = img[128:]
    assert (strip < 128).any()  # the labels are drawn beneath the images ...
    for x0, x1 in ((0, 192), (192 + GAP, 2 * 192 + GAP)):  # ... one per panel, inside its width
        assert (strip[:, x0:x1] < 128).any()
    assert (strip[:, 192:192 + GAP] == 255).all()  # no label crosses into the gap (no overlap)


def test_compare_progress_bar_counts_the_pairs_steps(tiny_model_dir, tmp_path):
    """A 4-step pair runs as one session of 2 images: the bar reads 4/4 and says 2 images x 4 steps."""
    r = subprocess.run([str(Path(sys.executable).parent / "deleaker"), "generate", "--model", str(tiny_model_dir),
                        "--prompt", PROMPT, "--entities", "cat,cheetah", "--steps", "4", "--height", "32",
                        "--width", "32", "--compare", "--out", str(tmp_path / "p.png")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # the bar's total is the session's 4 steps (tqdm redraws at most every 0.1 s: the last count drawn may be lower)
    assert "2 images x 4 steps" in r.stderr and re.search(r" \d/4 \[", r.stderr) and "/8 [" not in r.stderr, r.stderr


@pytest.mark.parametrize("extra, message", [
    (["--entities", "cat,zebra"], "entity 'zebra' not found"),
    (["--entities", "cat,a cat"], "overlap"),
    (["--entities", "cat,cheetah,field,a,and"], "only 4 entity slots"),
    (["--height", "100"], "multiples of 16"),
    (["--preset", "nope"], "unknown DeLeaker preset"),
    (["--model", "NOT_A_CHECKPOINT"], "not a diffusers checkpoint"),
    (["--out", "missing_dir/x.png"], "does not exist"),
    (["--prompt", PROMPT + " with a red ball" * 200], "T5 tokens"),
    (["--guidance", "nan"], "guidance_scale must be a finite number"),
    (["--guidance", "inf"], "guidance_scale must be a finite number"),
    (["--guidance", "-1"], "guidance_scale must be a finite number in [0, "),
    (["--seed", "-1"], "seed must be an integer"),
    (["--steps", "0"], "steps must be an integer"),
    (["--height", "100000"], "maximum image side"),
    (["--prompt", "a 🐱 and a cheetah", "--entities", "🐱,cheetah"], "does not survive tokenization"),
    pytest.param(["--attention", "cuda"], "--device cuda", marks=pytest.mark.skipif(
        __import__("torch").cuda.is_available(), reason="a GPU is present: the fused op may well load")),
])
def test_bad_input_one_line_error_no_file(tiny_model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "x.png"
    args = ["generate", "--model", str(tiny_model_dir), "--prompt", PROMPT, "--entities", "cat,cheetah",
            "--steps", "2", "--height", "64", "--width", "64", "--out", str(out), "--quiet"]
    for flag, value in zip(extra[::2], extra[1::2]):
        if value == "NOT_A_CHECKPOINT":
            value = str(tmp_path / "not_a_model")  # an existing folder that is not a FLUX checkpoint
            (tmp_path / "not_a_model").mkdir()
        if value.startswith("missing_dir"):
            value = str(tmp_path / value)
        i = args.index(flag) if flag in args else None
        if i is None:
            args += [flag, value]
        else:
            args[i + 1] = value
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deleaker: error:") and message in err, err
    assert len(err.splitlines()) == 1, err
    assert list(tmp_path.glob("*.png")) == [] and list(tmp_path.glob(".deleaker-*")) == []


def test_one_token_grid_runs_quietly(tiny_model_dir, tmp_path):
    """16x16 px is a 1x1 token grid: the unbiased std of one value is undefined, and nothing may
    be printed about it under --quiet (the masks are simply empty)."""
    out = tmp_path / "one.png"
    r = subprocess.run([str(Path(sys.executable).parent / "deleaker"), "generate", "--model", str(tiny_model_dir),
                        "--prompt", PROMPT, "--entities", "cat,cheetah", "--height", "16", "--width", "16",
                        "--steps", "8", "--preset", "tiny", "--quiet", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert Image.open(out).size == (128, 128)  # 16 px is too small to see: written 8x larger, pixel for pixel


def test_help_shows_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one line per option
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "else flux-dev)" in out and "(default: 3.5)" in out and "(default: None)" not in out


def test_no_prompt_draws_the_cards_example(tmp_path, caplog):
    """`deleaker generate --out x.png` on the embedded default draws its card's example (logged);
    a model folder with no card still needs --prompt, in one line, with no file written."""
    import logging

    out = tmp_path / "first.png"
    with caplog.at_level(logging.INFO, logger="deleaker"):
        assert main(["generate", "--out", str(out), "--quiet"]) == 0
    assert "no --prompt: the model card's example 'a red striped circle and a blue dotted square'" in caplog.text
    assert Image.open(out).size == (128, 128)  # 32x32 written 4x


def test_no_prompt_without_a_card_is_one_line(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["generate", "--model", str(tiny_model_dir), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "deleaker: error: --prompt is required: this model's folder has no card with an example prompt", err
    assert not out.exists()
