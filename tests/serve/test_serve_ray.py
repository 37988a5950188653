"""`deleaker serve --ray --replicas 2`: the Ray Serve application answers like the Pipeline alone,
overflows with the JSON error shape, listens on loopback only, and drains on SIGTERM."""

from __future__ import annotations

import base64
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install -e '.[ray]')")
pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")

from support.serve import EARLY, SIZE, STEPS, ServerProcess, listening_addresses, metric, png_pixels  # noqa: E402

from deleaker.runtime.backends import load_backend  # noqa: E402
from deleaker.runtime.pipeline import GenerateRequest, Pipeline  # noqa: E402
from deleaker.runtime.serve.client import GENERATE_PATH as GEN  # noqa: E402

pytestmark = pytest.mark.slow  # starting Ray and two replicas takes a minute or more on two cores


def test_ray_serve_two_replicas_same_images_json_overflow_loopback_and_drain(tiny_model_dir, tmp_path):
    pipe = Pipeline(load_backend("torch", str(tiny_model_dir), progress=False))
    server = ServerProcess(["--ray", "--replicas", "2", "--cpus-per-replica", "0.5", "--model", str(tiny_model_dir),
                            "--max-batch", "2", "--max-wait-ms", "200", "--steps", str(STEPS),
                            "--default-size", SIZE, "--max-queue", "4"], tmp_path / "ray.log",
                           env={"RAY_AUTH_MODE": "disabled"},
                           ready_timeout_s=400)
    try:
        deadline = time.monotonic() + 300
        while "application running" not in server.log_text() and time.monotonic() < deadline:
            time.sleep(0.5)  # /health answers once the first replica is up; wait for both
        bodies = [{"prompt": "a cat and a dog", "entities": ["cat", "dog"], "seed": s, "deleaker_settings": EARLY}
                  for s in range(4)] + [{"prompt": "a red car and a bird", "entities": ["car", "bird"], "seed": 9,
                                         "deleaker": False}]
        with ThreadPoolExecutor(len(bodies)) as ex:
            responses = list(ex.map(lambda b: httpx.post(server.url + GEN, json=b,
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
        bad = httpx.post(server.url + GEN, json={"prompt": "a cat", "entities": ["zebra"]},
                         timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "entities"

        # Ray itself listens on loopback only (the proxy on --host, 127.0.0.1 here)
        loopback = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
        wide = {(ip, port) for ip, port in listening_addresses(server.proc.pid) if ip not in loopback}
        assert not wide, f"listening beyond loopback: {sorted(wide)}"

        # 16 slow requests at once: each replica takes 2 running + 4 queued, the rest get 429 in the JSON
        # shape with Retry-After; SIGTERM while the accepted ones run: each gets its 200 or a JSON 503
        slow = {"prompt": "a cat", "entities": [], "steps": 30}
        with ThreadPoolExecutor(16) as ex:
            pending = [ex.submit(_post, server.url, {**slow, "seed": s}) for s in range(16)]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and metric(_metrics(server.url), "deleaker_running_images") == 0:
                time.sleep(0.1)
            server.proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in pending]
        print("\nstatus per request under SIGTERM:", [a[0] for a in answers])
        assert all(status in (200, 429, 503) for status, _, _ in answers), answers  # 0: dropped without an answer
        for status, body, headers in answers:
            if status != 200:
                assert body["error"]["code"] in ("queue_full", "unavailable"), body
            if status == 429:
                assert int(headers["retry-after"]) >= 1
        assert sum(a[0] == 429 for a in answers) >= 1 and sum(a[0] == 200 for a in answers) >= 4, answers
        assert server.proc.wait(180) == 0
    finally:
        server.stop(timeout_s=120)


def _post(url: str, body: dict):
    try:
        r = httpx.post(url + GEN, json=body, timeout=300)
    except httpx.HTTPError as e:
        return 0, str(e), {}
    try:
        payload = r.json()
    except ValueError:
        payload = {"error": {"code": f"not JSON: {r.text[:100]!r}"}}
    return r.status_code, payload if r.status_code != 200 else None, dict(r.headers)


def _metrics(url: str) -> str:
    try:
        return httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return ""


def test_ray_cuda_on_a_machine_without_gpus_is_refused_in_one_line(tiny_model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = subprocess.run([sys.executable, "-m", "deleaker.runtime.serve.cli", "--ray", "--device", "cuda", "--model",
                        str(tiny_model_dir)], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "RAY_AUTH_MODE": "disabled"})
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("deleaker serve:")]
    assert r.returncode == 2 and lines and "GPUs" in lines[-1] and "--device cpu" in lines[-1], r.stderr
