"""`deleaker generate --model DIR` on the tiny SD3, Qwen-Image and FLUX.2 folders (torch backend).

The family path (modeling/families/generate.py) runs the folder's own diffusers pipeline with
DeLeaker installed through the family adapter. Checks per family: with DeLeaker off the PNG the
command writes is the stock pipeline's image bit for bit (same prompt, seed, size, steps and
guidance); on, the op's edit counters are non-zero (calls inside the intervention window, image
rows under the entity masks rebuilt from the history each call returned) with the `tiny` preset
(no smoothing: the tiny models' 4x4 grids would be erased by its opening), the history fills for
both entities, and the image moves. An unsupported transformer class is refused in one line
before anything loads.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from deleaker.modeling.tiny_model import build_tiny_family
from deleaker.runtime.cli import main

PROMPT, STEPS, SIDE = "a cat and a cheetah in a field", 20, 64


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {}


def _folder(name, folders, tmp_path_factory):
    if name not in folders:
        folders[name] = build_tiny_family(tmp_path_factory.mktemp(f"gen-{name}") / "model", name)
    return folders[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd3", "qwenimage", "flux2"])
def test_generate_off_is_stock_and_on_edits(name, folders, tmp_path_factory, tmp_path, caplog):
    from deleaker.modeling.families import FAMILIES
    from deleaker.modeling.families.generate import guidance_kwargs, load

    folder = _folder(name, folders, tmp_path_factory)
    base = ["generate", "--model", str(folder), "--prompt", PROMPT, "--entities", "cat,cheetah", "--steps",
            str(STEPS), "--height", str(SIDE), "--width", str(SIDE), "--preset", "tiny", "--scale", "1"]
    off, on = tmp_path / "off.png", tmp_path / "on.png"
    assert main(base + ["--no-deleaker", "--out", str(off)]) == 0
    with caplog.at_level(logging.INFO, logger="deleaker"):
        assert main(base + ["--out", str(on)]) == 0
    line = next(r.getMessage() for r in caplog.records if "DeLeaker attention calls" in r.getMessage())
    print(f"{name}: {line}")

    _, pipe = load(folder)
    with torch.no_grad():  # the family's stock pipeline, DeLeaker never installed
        stock = pipe(prompt=PROMPT, height=SIDE, width=SIDE, num_inference_steps=STEPS,
                     generator=torch.Generator("cpu").manual_seed(0), output_type="pil",
                     **guidance_kwargs(FAMILIES[name], 3.5)).images[0]
    stock = np.asarray(stock.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(Image.open(off).convert("RGB")), stock)

    calls, intervening, rows = (int(line.split(" DeLeaker attention calls")[0].split()[-1]),
                                int(line.split(", ")[1].split()[0]), int(line.split(", ")[2].split()[0]))
    assert calls == STEPS * FAMILIES[name].blocks_per_step(pipe.transformer)
    assert intervening > 0 and rows > 0 and "history filled for ['cat', 'cheetah']" in line
    assert np.abs(np.asarray(Image.open(on).convert("RGB")).astype(int) - stock).max() > 0


def test_unsupported_transformer_refused_in_one_line(tmp_path, capsys):
    other = tmp_path / "other"
    (other / "transformer").mkdir(parents=True)
    (other / "transformer" / "config.json").write_text('{"_class_name": "HiDreamImageTransformer2DModel"}')
    assert main(["generate", "--model", str(other), "--prompt", "a cat and a dog", "--entities", "cat,dog",
                 "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "does not support the transformer HiDreamImageTransformer2DModel" in err
    assert "supported families: flux1 (FluxTransformer2DModel)" in err and not (tmp_path / "x.png").exists()


def test_other_backend_refused_for_a_family(folders, tmp_path_factory, tmp_path, capsys):
    folder = _folder("sd3", folders, tmp_path_factory)
    assert main(["generate", "--model", str(folder), "--prompt", PROMPT, "--backend", "onnxruntime",
                 "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "torch backend only" in err
