"""The step artifact of a model family (SD3, Qwen-Image, FLUX.2) on its tiny model: `deleaker-export
onnx --model FAMILYDIR`, `deleaker-export verify`, `deleaker generate --artifact` (export/family_artifact.py,
export/family_verify.py, modeling/families/generate.py, runtime/family_artifact.py).

SD3 carries the end-to-end command case: export (step, text encoders and VAE), verify passes with DeLeaker's edit shown (the
verify's tolerances are tighter than the edit: export/family_verify.py), and the PNG generated
from the artifact is the torch path's PNG (pixel levels 0-255: ONNX Runtime and torch differ by
~1e-6 on [0, 1] pixels, so at most one level where a value sits on a rounding boundary). Qwen-Image
and FLUX.2 get the cheaper check: export, then verify (step and loop). Bad inputs are one line.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from deleaker.export.cli import main as export_main
from deleaker.modeling.tiny_model import build_tiny_family
from deleaker.runtime.cli import main as generate_main

pytest.importorskip("onnxruntime")
PROMPT, ENTITIES, SIDE = "a cat and a cheetah in a field", "cat,cheetah", 64
_FOLDERS: dict = {}


def _folder(name, tmp_path_factory):
    if name not in _FOLDERS:
        _FOLDERS[name] = build_tiny_family(tmp_path_factory.mktemp(f"fam-{name}") / "model", name)
    return _FOLDERS[name]


_ARTIFACTS: dict = {}
# FLUX.2's Mistral text encoder is the slowest export here (tests/export/test_family_components.py
# checks it): its artifact is the step alone, the text encoders and VAE staying in torch
STEP_ONLY = {"flux2"}


def _export(name, tmp_path_factory):
    if name not in _ARTIFACTS:
        out = tmp_path_factory.mktemp(f"art-{name}") / "art"
        extra = ["--step-only"] if name in STEP_ONLY else []
        assert export_main(["onnx", "--model", str(_folder(name, tmp_path_factory)), "--out", str(out), "--height",
                            str(SIDE), "--width", str(SIDE), "--preset", "tiny", *extra]) == 0
        _ARTIFACTS[name] = out
    return _ARTIFACTS[name]


@pytest.fixture(scope="module")
def sd3_artifact(tmp_path_factory):
    return _export("sd3", tmp_path_factory)


def _one_line_error(capsys, rc, *expect, prog="deleaker"):
    err = capsys.readouterr().err
    assert rc == 2, err
    # the last line is the error; before it only diffusers' loading progress bar, where the pipeline loaded
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"{prog}: error:") and "Traceback" not in err, err
    for e in expect:
        assert e in line, err


@pytest.mark.slow
def test_sd3_export_verify_and_generate_from_the_artifact(sd3_artifact, tmp_path_factory, tmp_path, capsys, caplog):
    folder = _folder("sd3", tmp_path_factory)
    m = json.loads((sd3_artifact / "manifest.json").read_text())
    assert (m["format"], m["family"], m["transformer_class"]) == ("deleaker-family-step", "sd3",
                                                                 "SD3Transformer2DModel")
    assert m["source_model"] == str(folder.resolve()) and (m["height"], m["width"], m["batch"]) == (64, 64, 2)
    assert m["files"]["transformer.onnx"] == (sd3_artifact / "transformer.onnx").stat().st_size
    assert m["inputs"]["encoder_hidden_states"]["shape"][1] == m["text_tokens"] == 77 + 256
    assert m["deleaker"]["preset"] == "tiny" and m["producer"]["onnxruntime"]
    names = ["text_encoder", "text_encoder_2", "text_encoder_3", "vae"]
    assert m["components"] == {"folder": "components", "onnxruntime": names}
    assert all(m["files"][f"components/{n}.onnx"] > 0 for n in names) and "components/components.json" in m["files"]

    capsys.readouterr()
    assert export_main(["verify", str(sd3_artifact), "--model", str(folder)]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "verify: 5/5 outputs within tolerance; DeLeaker edited in 2/2 checks" in out
    assert out.count("edit vs") == 2 and "FAIL" not in out

    base = ["generate", "--prompt", PROMPT, "--entities", ENTITIES, "--scale", "1"]
    onnx_png, torch_png = tmp_path / "onnx.png", tmp_path / "torch.png"
    with caplog.at_level(logging.INFO, logger="deleaker"):
        assert generate_main(base + ["--artifact", str(sd3_artifact), "--out", str(onnx_png)]) == 0
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert f"ONNX Runtime runs the DeLeaker steps, {', '.join(names)} from {sd3_artifact.resolve()}" in log
    assert "torch runs the scheduler from" in log
    counted = next(r.getMessage() for r in caplog.records if "DeLeaker attention calls" in r.getMessage())
    assert "40 DeLeaker attention calls, 22 intervening" in counted and "history filled for ['cat', 'cheetah']" in counted
    assert generate_main(base + ["--model", str(folder), "--preset", "tiny", "--height", "64", "--out",
                                 str(torch_png)]) == 0
    a, b = (np.asarray(Image.open(p).convert("RGB")).astype(int) for p in (onnx_png, torch_png))
    assert a.shape == (64, 64, 3) and np.abs(a - b).max() <= 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwenimage", "flux2"])
def test_export_then_verify(name, tmp_path_factory, capsys):
    art = _export(name, tmp_path_factory)
    capsys.readouterr()
    assert export_main(["verify", str(art), "--model", str(_folder(name, tmp_path_factory))]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "verify: 5/5 outputs within tolerance; DeLeaker edited in 2/2 checks" in out
    loop = next(line for line in out.splitlines() if line.startswith("loop  ONNX Runtime ran"))
    # Qwen-Image's text encoder and VAE ran in ONNX Runtime in the loop check; the --step-only artifact's in torch
    assert ("and text_encoder, vae:" in loop) == (name not in STEP_ONLY), loop


@pytest.mark.slow
def test_qwen_prompt_of_another_token_length_is_one_line(tmp_path_factory, tmp_path, capsys):
    art = _export("qwenimage", tmp_path_factory)
    text_tokens = json.loads((art / "manifest.json").read_text())["text_tokens"]
    rc = generate_main(["generate", "--artifact", str(art), "--prompt", "a small cat and a big cheetah in a green field",
                        "--entities", ENTITIES, "--out", str(tmp_path / "x.png")])
    _one_line_error(capsys, rc, f"exported for {text_tokens} text tokens, this prompt gives")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_bad_inputs_are_one_line(sd3_artifact, tmp_path_factory, tmp_path, capsys):
    from deleaker.runtime.artifact import ArtifactError, load_artifact

    base = ["generate", "--prompt", PROMPT, "--entities", ENTITIES]
    # another size: refused before loading
    rc = generate_main(base + ["--artifact", str(sd3_artifact), "--height", "128", "--out", str(tmp_path / "x.png")])
    _one_line_error(capsys, rc, "exported for 64x64 images", "not 128x128")
    # the FLUX.1 reader
    with pytest.raises(ArtifactError) as e:
        load_artifact(sd3_artifact)
    assert "\n" not in str(e.value) and "is a sd3 step artifact (deleaker-family-step), not a FLUX.1 artifact" in \
        str(e.value)
    # a missing source folder
    moved = tmp_path / "moved"
    shutil.copytree(sd3_artifact, moved)
    m = json.loads((moved / "manifest.json").read_text())
    m["source_model"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(m))
    rc = generate_main(base + ["--artifact", str(moved), "--out", str(tmp_path / "x.png")])
    _one_line_error(capsys, rc, f"runs on its source folder {tmp_path / 'gone'}", "which is missing")
    # options that do not apply to a family step artifact: refused before any work
    folder = _folder("sd3", tmp_path_factory)
    for option, why in ((["--dtype", "fp16"], "--dtype does not apply"),
                        (["--max-batch", "2"], "--max-batch does not apply"),
                        (["--min-size", "64"], "--min-size/--max-size does not apply"),
                        (["--portable"], "--portable does not apply")):
        out = tmp_path / "never"
        rc = export_main(["onnx", "--model", str(folder), "--out", str(out), *option])
        _one_line_error(capsys, rc, why, "SD3 / SD3.5 step artifact", prog="deleaker-export")
        assert not out.exists()
    # --step-only is a family option: FLUX.1's artifact always holds its encoders and VAE
    from deleaker.modeling.tiny_model import ensure_tiny_model

    out = tmp_path / "never"
    rc = export_main(["onnx", "--model", str(ensure_tiny_model()), "--out", str(out), "--step-only"])
    _one_line_error(capsys, rc, "--step-only applies to a model family's step artifact", prog="deleaker-export")
    assert not out.exists()
