"""Golden output: fixed requests on the tiny model, the images they generate recorded as PNGs.

Two requests, one batch, 64x64, 4 steps: one with two entities and DeLeaker windows that open
within the 4 steps (so the output covers edited steps), one vanilla. For each backend the images
(tests/golden/<backend>-<i>.png) and the loop's final latents (<backend>-latents.npy) are
recorded and checked two ways:

- within BOUND of the recorded ones (check_bound): what another CPU's vector code paths, a thread
  count or a BLAS moves is far inside it, a change to the denoising loop is not (see BOUND);
- bit for bit (check_digest): sha256 over the uint8 images, recorded with the environment that
  made them (tests/golden_digests.json: CPU features, library versions); skipped, with the difference
  as the reason, on any other environment.

    python tests/support/golden.py record [--backend torch onnxruntime aoti]   # after an intended change
    python tests/support/golden.py dump --backend torch --out A.npz           # this environment's output
    python tests/support/golden.py spread A.npz B.npz ... [--out rows.json]    # differences from the first
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parents[1]  # tests/
if str(HERE) not in sys.path:  # run as a script: `support` is a package of tests/
    sys.path.insert(0, str(HERE))

from deleaker.runtime.pipeline import GenerateRequest, Pipeline  # noqa: E402
from support.editing import editing_config  # noqa: E402

DIGESTS_FILE = HERE / "golden_digests.json"
IMAGES_DIR = HERE / "golden"
SPREAD_FILE = IMAGES_DIR / "spread.json"  # the measured spread the bound is set against (raw output)
BACKENDS = ("torch", "onnxruntime", "aoti")
STEPS = 4
EDITING = editing_config(num_steps=STEPS)
REQUESTS = (
    GenerateRequest("a cat and a cheetah in a field", entities=("cat", "cheetah"), seed=7, steps=STEPS, height=64,
                    width=64, config=EDITING),
    GenerateRequest("a dog and a bird on a hill", seed=3, steps=STEPS, height=64, width=64, deleaker=False),
)
# What the exact digest depends on besides the code: the vector code paths (torch's dispatch
# level, and the CPU features onnxruntime's and the BLAS's kernels pick by) and the releases.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile")
LIBRARIES = ("torch", "onnxruntime", "onnx", "numpy", "diffusers", "transformers", "tokenizers", "safetensors")


@dataclasses.dataclass(frozen=True)
class Difference:
    """How far one run's images and latents are from another's, over all requests."""

    image_max: int  # uint8 levels
    image_values: int  # values (pixel x channel) that differ at all
    image_total: int
    latents_max: float
    latents_mean: float

    def __str__(self) -> str:
        return (f"images: max |difference| {self.image_max} levels, {self.image_values} of {self.image_total} values "
                f"differ; latents: max |difference| {self.latents_max:.3g}, mean {self.latents_mean:.3g}")


@dataclasses.dataclass(frozen=True)
class Bound:
    image_max: int
    image_fraction: float  # of the values, that may differ
    latents_max: float

    def admits(self, d: Difference) -> bool:
        return (d.image_max <= self.image_max and d.image_values <= self.image_fraction * d.image_total
                and d.latents_max <= self.latents_max)

    def __str__(self) -> str:
        return (f"images max {self.image_max} level(s) on at most {self.image_fraction:.1%} of the values, "
                f"latents max {self.latents_max:g}")


# Measured spread (tests/golden/spread.json; the commands are in tests/golden/README.md): the same
# code, the tiny model and artifacts rebuilt in each environment. torch with 1 or 2 threads and
# its kernels at AVX-512, AVX2 or no vector code (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS,
# ONEDNN_MAX_CPU_ISA; at AVX2 the torch digest is the one the AVX2-only machine got); onnxruntime
# 1.32 with 1 or 2 threads, graph optimisations all, basic or none, onnxruntime 1.31.1, and the
# artifact exported at AVX2; AOTInductor generating AVX2 instead of AVX-512 code. At most 1 level
# on 3 of 24576 image values; latents at most 7.2e-7 apart, mean at most 7.7e-8 (their values
# reach 3.7). On this tiny model DeLeaker's edit is small next to the uint8 rounding: a rule
# switched off moves the latents by 3e-4 but flips only ~15 image values by one level, not far
# from what a CPU change flips; so the latents (float32, recorded next to the PNGs) carry the
# tight bound, 14x the spread, and the images a looser one that a decoder change or a gross
# loop change breaks. tests/runtime/test_golden.py shows the loop changes the bound rejects (one Euler
# step's dt off by 0.1%: latents 3e-4 to 6e-4 away; each of four rules switched off: 3e-4 to
# 2e-3) and says which one it cannot see.
SPREAD = {"image_max": 1, "image_values": 3, "latents_max": 7.15e-7, "latents_mean": 7.67e-8}
BOUND = Bound(image_max=1, image_fraction=0.001, latents_max=1e-5)


def difference(a: "Golden", b: "Golden") -> Difference:
    ia = np.stack(a.images).astype(np.int16)
    ib = np.stack(b.images).astype(np.int16)
    if ia.shape != ib.shape:
        raise ValueError(f"image shapes differ: {ia.shape} vs {ib.shape}")
    di = np.abs(ia - ib)
    dl = np.abs(np.stack(a.latents).astype(np.float64) - np.stack(b.latents))
    return Difference(int(di.max()), int(np.count_nonzero(di)), int(di.size), float(dl.max()), float(dl.mean()))


@dataclasses.dataclass
class Golden:
    """What the golden requests gave: uint8 images [H, W, 3] and the loop's final latents [I, C], per request."""

    images: list[np.ndarray]
    latents: list[np.ndarray]


def generate(pipe: Pipeline, requests=REQUESTS) -> Golden:
    """The golden requests (or variants of them) in one batch on `pipe`."""
    results = pipe.generate(list(requests))
    assert all(r.batch_size == 2 for r in results), "the golden requests must run as one batch"
    if requests is REQUESTS:  # they must cover DeLeaker's edit: the entity request's history is filled
        assert np.abs(results[0].history).max() > 0, "DeLeaker did not edit the entity request"
        assert np.abs(results[1].history).max() == 0
    return Golden([np.ascontiguousarray(r.image, np.uint8) for r in results],
                  [np.asarray(r.latents, np.float32) for r in results])


def digest(images) -> str:
    """sha256 over the images' uint8 bytes, in request order."""
    h = hashlib.sha256()
    for im in images:
        h.update(np.ascontiguousarray(im, np.uint8).tobytes())
    return h.hexdigest()


def image_path(backend: str, i: int) -> Path:
    return IMAGES_DIR / f"{backend}-{i}.png"


def latents_path(backend: str) -> Path:
    return IMAGES_DIR / f"{backend}-latents.npy"


def recorded(backend: str) -> Golden:
    """The images and latents recorded for `backend`."""
    images = [np.asarray(Image.open(image_path(backend, i)).convert("RGB")) for i in range(len(REQUESTS))]
    return Golden(images, list(np.load(latents_path(backend))))


def environment() -> dict:
    """What the exact digest depends on besides the code."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    env = {"machine": platform.machine(), "cpu_flags": [f for f in CPU_FLAGS if f in flags]}
    try:
        import torch

        env["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except ImportError:
        pass
    for lib in LIBRARIES:
        try:
            env[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            pass
    return env


def check_bound(backend: str, got: Golden) -> Difference:
    """Assert `got` is within BOUND of what was recorded for `backend`; the difference."""
    d = difference(got, recorded(backend))
    assert BOUND.admits(d), (f"{backend}: the golden output moved beyond the bound ({BOUND}): {d}; if the change "
                             f"is intended, `python tests/support/golden.py record --backend {backend}`")
    return d


def digest_mismatch_reason(backend: str) -> str | None:
    """Why the exact digest cannot be compared here (the environment differs from the recorded one), or None."""
    rec = json.loads(DIGESTS_FILE.read_text())[backend]["environment"]
    here = environment()
    diff = [f"{k} {rec.get(k)} (here {here.get(k)})" for k in sorted(set(rec) | set(here)) if rec.get(k) != here.get(k)]
    return f"{backend}: the digest was recorded on another environment: {'; '.join(diff)}" if diff else None


def check_digest(backend: str, got: Golden) -> None:
    """Assert the images equal the recorded ones bit for bit; skip where the environment is not the recorded one."""
    import pytest

    if why := digest_mismatch_reason(backend):
        pytest.skip(why)
    want = json.loads(DIGESTS_FILE.read_text())[backend]["digest"]
    assert digest(got.images) == want, (f"{backend}: the golden image digest changed on the recorded environment "
                                        f"(recorded {want[:12]}, got {digest(got.images)[:12]}); "
                                        f"{difference(got, recorded(backend))}")


# --------------------------------------------------------------------------------------------
# Recording and measuring (the command line)
# --------------------------------------------------------------------------------------------

def build_pipeline(backend: str, work: Path, threads: int | None = None, ort_opt: str | None = None) -> Pipeline:
    """A fresh tiny model in `work`, exported for `backend` as its tests export it; its Pipeline."""
    from deleaker.modeling.tiny_model import build_tiny_model
    from deleaker.runtime.backends import load_backend

    model = work / "model"
    if not model.is_dir():  # a work folder is reused: measurements of one artifact under several runtimes
        build_tiny_model(model)
    if backend == "torch":
        return Pipeline(load_backend("torch", str(model), device="cpu"), max_batch=2)
    if backend == "onnxruntime":
        from deleaker.export.onnx_export import export_artifact

        sys.path.insert(0, str(HERE / "export"))
        from test_onnx_export import SPEC  # the artifact tests/export/test_onnx_export.py checks

        art = work / "onnx"
        if not art.is_dir():
            export_artifact(model, art, SPEC)
        if ort_opt:  # measuring: another graph-optimisation level (fusions change the float order)
            import onnxruntime as ort

            level = getattr(ort.GraphOptimizationLevel, f"ORT_{ort_opt.upper()}")

            class Options(ort.SessionOptions):
                def __init__(self):
                    super().__init__()
                    self.graph_optimization_level = level

            ort.SessionOptions = Options
        return Pipeline(load_backend("onnxruntime", str(art), threads=threads, progress=False), max_batch=2)
    if backend == "aoti":
        from deleaker.export import cli as export_cli
        from deleaker.modeling.aoti_backend import AotiBackend

        sys.path.insert(0, str(HERE / "export"))
        from test_aoti import AOTI_ARGS

        out = work / "aoti"
        if not out.is_dir() and export_cli.main(["aoti", "--model", str(model), "--out", str(out), *AOTI_ARGS]) != 0:
            raise SystemExit("aoti export failed")
        return Pipeline(AotiBackend.load(str(out), device="cpu"), max_batch=2)
    raise SystemExit(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")


def _record(backends, work: str | None) -> None:
    IMAGES_DIR.mkdir(exist_ok=True)
    digests = json.loads(DIGESTS_FILE.read_text()) if DIGESTS_FILE.exists() else {}
    for backend in backends:
        with tempfile.TemporaryDirectory() as tmp:
            g = generate(build_pipeline(backend, Path(work or tmp)))
        for i, im in enumerate(g.images):
            Image.fromarray(im).save(image_path(backend, i), optimize=True)
        np.save(latents_path(backend), np.stack(g.latents))
        digests[backend] = {"digest": digest(g.images), "environment": environment()}
        print(f"{backend}: recorded {len(g.images)} images and their latents, digest {digests[backend]['digest'][:12]}")
    DIGESTS_FILE.write_text(json.dumps(digests, indent=1) + "\n")


def _dump(backend: str, out: str, threads: int | None, ort_opt: str | None, work: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        g = generate(build_pipeline(backend, Path(work or tmp), threads, ort_opt))
    np.savez(out, images=np.stack(g.images), latents=np.stack(g.latents), environment=json.dumps(environment()))
    print(f"{backend}: {out} digest {digest(g.images)[:12]} ({json.dumps(environment())})")


def _spread(files, out: str | None, backend: str | None) -> None:
    runs = {f: np.load(f) for f in files}

    def golden_of(f):
        return Golden(list(runs[f]["images"]), list(runs[f]["latents"]))

    rows = []
    for f in files[1:]:
        d = difference(golden_of(f), golden_of(files[0]))
        rows.append({"a": Path(files[0]).stem, "b": Path(f).stem, **dataclasses.asdict(d),
                     "environment_a": json.loads(str(runs[files[0]]["environment"])),
                     "environment_b": json.loads(str(runs[f]["environment"]))})
        print(f"{Path(files[0]).stem} vs {Path(f).stem}: {d}")
    if out:  # {backend: rows}, this backend's rows replaced
        path = Path(out)
        table = json.loads(path.read_text()) if path.exists() else {}
        table[backend or "unnamed"] = rows
        path.write_text(json.dumps(table, indent=1) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record", help="regenerate the recorded images and digests")
    rec.add_argument("--backend", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    rec.add_argument("--work", help="keep the tiny model and artifacts here, and reuse them if there")
    dump = sub.add_parser("dump", help="this environment's golden images into an .npz")
    dump.add_argument("--backend", required=True, choices=BACKENDS)
    dump.add_argument("--out", required=True)
    dump.add_argument("--threads", type=int, default=None, help="onnxruntime's intra-op threads")
    dump.add_argument("--ort-opt", choices=("enable_all", "enable_extended", "enable_basic", "disable_all"),
                      help="onnxruntime's graph optimisation level (default: onnxruntime's, all)")
    dump.add_argument("--work", help="keep the tiny model and artifact here, and reuse them if there")
    spread = sub.add_parser("spread", help="max/mean |difference| of dumps against the first")
    spread.add_argument("files", nargs="+")
    spread.add_argument("--out", help="write the rows here (JSON, under --backend)")
    spread.add_argument("--backend", choices=BACKENDS)
    a = ap.parse_args(argv)
    if a.cmd == "record":
        _record(a.backend, a.work)
    elif a.cmd == "dump":
        _dump(a.backend, a.out, a.threads, a.ort_opt, a.work)
    else:
        _spread(a.files, a.out, a.backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
