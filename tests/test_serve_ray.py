"""`deleaker serve --ray --replicas 2`: the Ray Serve application answers like the Pipeline alone."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'deleaker[ray]')")
pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")

from test_serve_support import EARLY, SIZE, STEPS, ServerProcess, png_pixels  # noqa: E402

from deleaker.runtime.backends import load_backend  # noqa: E402
from deleaker.runtime.pipeline import GenerateRequest, Pipeline  # noqa: E402

pytestmark = pytest.mark.slow  # starting Ray and two replicas takes a minute or more on two cores


def test_ray_serve_two_replicas_same_images(tiny_model_dir, tmp_path):
    pipe = Pipeline(load_backend("torch", str(tiny_model_dir), progress=False))
    server = ServerProcess(["--ray", "--replicas", "2", "--cpus-per-replica", "0.5", "--model", str(tiny_model_dir),
                            "--max-batch", "2", "--max-wait-ms", "200", "--steps", str(STEPS),
                            "--default-size", SIZE], tmp_path / "ray.log", env={"RAY_AUTH_MODE": "disabled"},
                           ready_timeout_s=400)
    try:
        bodies = [{"prompt": "a cat and a dog", "entities": ["cat", "dog"], "seed": s, "deleaker_settings": EARLY}
                  for s in range(4)] + [{"prompt": "a red car and a bird", "entities": ["car", "bird"], "seed": 9,
                                         "deleaker": False}]
        with ThreadPoolExecutor(len(bodies)) as ex:
            responses = list(ex.map(lambda b: httpx.post(server.url + "/v1/images/generations", json=b,
                                                         timeout=300), bodies))
        for body, r in zip(bodies, responses):
            assert r.status_code == 200, r.text
            got = png_pixels(base64.b64decode(r.json()["data"][0]["b64_json"])).astype(int)
            req = GenerateRequest(prompt=body["prompt"], entities=tuple(body["entities"]), seed=body["seed"],
                                  steps=STEPS, height=64, width=64, deleaker=body.get("deleaker", True),
                                  config=pipe.config.replace(**body["deleaker_settings"])
                                  if "deleaker_settings" in body else None)
            alone = pipe.generate(req, progress=False).image.astype(int)
            # as in test_serve: a batch may round one pixel level differently on the CPU, nothing more
            assert np.abs(got - alone).max() <= 1 and (got != alone).mean() < 1e-3, body
        bad = httpx.post(server.url + "/v1/images/generations", json={"prompt": "a cat", "entities": ["zebra"]},
                         timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "entities"
    finally:
        server.stop(timeout_s=120)
