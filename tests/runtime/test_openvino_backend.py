"""The openvino backend (runtime/backends/openvino_backend.py) on the shipped portable artifact of
the embedded model: the same session loop as ONNX Runtime, the same images.

Tolerance: both runtimes compute the same float32 graphs (encoders, 10 transformer steps, VAE) in
different orders. On the toy model the final latents differ by at most 1e-4 (measured 9.5e-5 on
this prompt's six requests), the history by 2e-8, the images by at most 1 pixel level; DeLeaker
moves the same latents by more than 1 (asserted), four orders of magnitude above the tolerance.
"""

from __future__ import annotations

from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

from deleaker.runtime import GenerateRequest, load_pipeline  # noqa: E402
from deleaker.runtime.backends import available_backends, load_backend  # noqa: E402
from deleaker.runtime.backends.openvino_backend import OpenVinoError  # noqa: E402
from deleaker.runtime.embedded import default_artifact_dir  # noqa: E402

PROMPT = "a red striped circle and a blue dotted square"
ENTITIES = ("red striped circle", "blue dotted square")
LATENT_ATOL = 5e-4
EXE = str(Path(sys.executable).parent / "deleaker")


@pytest.fixture(scope="module")
def pipes():
    return {b: load_pipeline(backend=b, threads=1) for b in ("onnxruntime", "openvino")}


def test_openvino_is_a_registered_backend():
    assert "openvino" in available_backends()


def test_openvino_matches_onnxruntime_on_the_default_model(pipes):
    assert pipes["openvino"].backend.name == "openvino" and pipes["onnxruntime"].backend.name == "onnxruntime"
    reqs = [GenerateRequest(PROMPT, entities=ENTITIES, seed=s, height=32, width=32, deleaker=d)
            for d in (False, True) for s in (0, 1, 2)]
    want, got = pipes["onnxruntime"].generate(reqs), pipes["openvino"].generate(reqs)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g.latents, w.latents, rtol=0, atol=LATENT_ATOL)
        np.testing.assert_allclose(g.history, w.history, rtol=0, atol=1e-6)
        assert np.abs(g.image.astype(np.int16) - w.image.astype(np.int16)).max() <= 1
    for vanilla, dl in zip(want[:3], want[3:]):  # the compared runs are ones where DeLeaker acts
        assert np.abs(dl.latents - vanilla.latents).max() > 1000 * LATENT_ATOL
        assert np.abs(dl.history).max() > 1e-3


def test_generate_with_backend_openvino_runs_the_default_artifact(tmp_path, pipes):
    out = tmp_path / "ov.png"
    r = subprocess.run([EXE, "generate", "--backend", "openvino", "--prompt", PROMPT, "--entities", ",".join(ENTITIES),
                        "--scale", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "openvino backend:" in r.stderr and "(10 steps, openvino," in r.stderr
    want = pipes["onnxruntime"].generate(GenerateRequest(PROMPT, entities=ENTITIES, height=32, width=32)).image
    got = np.asarray(Image.open(out))
    assert got.shape == (32, 32, 3) and np.abs(got.astype(np.int16) - want.astype(np.int16)).max() <= 1


def test_openvino_refuses_what_it_cannot_run():
    with pytest.raises(OpenVinoError, match="runs on the CPU; got device 'cuda'"):
        load_backend("openvino", str(default_artifact_dir()), device="cuda")
    with pytest.raises(OpenVinoError, match="pass --artifact DIR"):
        load_backend("openvino", None)
