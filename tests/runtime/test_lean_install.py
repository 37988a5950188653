"""`pip install 'deleaker[onnx,serve]'` without torch: the embedded default generates and serves.

The test builds a fresh virtual environment with no network: deleaker as the wheel pip builds
from this checkout (so the package data, the shipped artifact included, is what a wheel ships),
and the dependency closure of deleaker's base, `onnx` and `serve` requirements, read from the
installed distributions' metadata and linked in from this environment's site-packages. Nothing
else: torch, diffusers and transformers are not in the closure (asserted), so `import torch`
fails there and a code path that imported it would fail the command.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import tomllib
import signal
import subprocess
import sys
import time
import venv
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deleaker.benchmarks.serve_process import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXTRAS = ("onnx", "serve")
TORCH_SIDE = {"torch", "diffusers", "transformers"}
PROMPT = "a red striped circle and a blue dotted square"
ENTITIES = "red striped circle,blue dotted square"


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def dependency_closure(extras=EXTRAS) -> dict[str, metadata.Distribution]:
    """deleaker's requirements with `extras`, and theirs (no extras of dependencies), recursively:
    the distributions pip would install for deleaker[extras], as installed here."""
    from packaging.requirements import Requirement

    out: dict[str, metadata.Distribution] = {}
    todo = []
    for r in metadata.requires("deleaker") or []:
        req = Requirement(r)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
            assert _name(r) != "deleaker", f"{r}: an extra that names another extra of deleaker"
            todo.append(req)
    while todo:
        req = todo.pop()
        name = _name(req.name)
        if name in out:
            continue
        dist = metadata.distribution(req.name)
        out[name] = dist
        for r in dist.requires or []:
            sub = Requirement(r)
            if sub.marker is None or sub.marker.evaluate({"extra": ""}):
                todo.append(sub)
    return out


def _link_into(dist: metadata.Distribution, site: Path) -> None:
    """Every top-level file or folder of an installed distribution, linked into `site`."""
    base = Path(dist.locate_file(""))
    tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")} - {"__pycache__"}
    for top in sorted(tops):
        src, dst = base / top, site / top
        if src.exists() and not dst.exists():
            dst.symlink_to(src, target_is_directory=src.is_dir())


@pytest.fixture(scope="module")
def lean_env(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("lean")
    closure = dependency_closure()
    assert not TORCH_SIDE & set(closure), sorted(TORCH_SIDE & set(closure))
    assert {"onnxruntime", "numpy", "fastapi", "uvicorn"} <= set(closure)
    # the wheel, built from a copy of the sources (a build in the checkout would leave build/ there)
    src = tmp / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    for folder in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values():
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "results", "*.egg-info"))
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--wheel-dir", str(wheels), str(src)], check=True, capture_output=True, timeout=300)
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    for dist in closure.values():
        _link_into(dist, site)
    # pip from this environment installs the wheel (and its console scripts) into the new one
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                    *map(str, wheels.glob("deleaker-*.whl"))], check=True, capture_output=True, timeout=300)
    r = subprocess.run([str(py), "-c", "import torch"], capture_output=True, text=True)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    return env_dir


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "OMP_NUM_THREADS": "1"}


def test_generate_without_torch(lean_env, tmp_path):
    out = tmp_path / "default.png"
    r = subprocess.run([str(lean_env / "bin" / "deleaker"), "generate", "--prompt", PROMPT, "--entities", ENTITIES,
                        "--out", str(out)], capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "(10 steps, onnxruntime, 24 T5 text tokens)" in r.stderr
    im = np.asarray(Image.open(out))
    # 32x32 written 4x pixel for pixel (the CLI enlarges images under 128 px); a drawn image, not a flat one
    assert im.shape == (128, 128, 3) and im.std() > 5
    # the installed package is the wheel's, not this checkout
    where = subprocess.run([str(lean_env / "bin" / "python"), "-c", "import deleaker.runtime as r; print(r.__file__)"],
                           capture_output=True, text=True, env=_env(), cwd=tmp_path).stdout
    assert str(lean_env) in where


def test_serve_without_torch(lean_env, tmp_path):
    import httpx

    from deleaker.runtime.serve.client import GENERATE_PATH

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([str(lean_env / "bin" / "deleaker"), "serve", "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(0.3)
        r = httpx.post(url + GENERATE_PATH, timeout=120, json={"prompt": PROMPT, "entities": ENTITIES.split(",")})
        assert r.status_code == 200, r.text
        png = base64.b64decode(r.json()["data"][0]["b64_json"])
        assert Image.open(io.BytesIO(png)).size == (32, 32)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
