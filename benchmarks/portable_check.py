"""The two transformer forms (export/onnx_portable.py) on one generation: agreement and step time.

    python -m deleaker.benchmarks.portable_check --function ART --portable ART [--steps 8]

ART folders are `deleaker-export onnx` artifacts of one checkpoint, without and with --portable.
Runs the same requests through the public Pipeline three ways: ONNX Runtime on the function
form, ONNX Runtime on the portable form, the openvino backend (CPU, f32) on the portable form
(encoders, transformer and VAE compiled by OpenVINO), and prints the largest latent and history
differences from the first, and the mean seconds per denoising step of each.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np

from deleaker.runtime.config import DeLeakerConfig
from deleaker.runtime.errors import run_reporting_errors
from deleaker.runtime.pipeline import GenerateRequest, Pipeline

# windows open early and no smoothing: on the tiny model the masks fire (DeLeaker edits the image)
FIRING = dict(start_aggregating_from=2, start_intervention_from=3, do_smoothing=False)


def openvino_pipeline(artifact: str, threads: int | None = None) -> Pipeline:
    """A Pipeline over the openvino backend (every model of the portable artifact compiled by OpenVINO)."""
    from deleaker.runtime.backends.openvino_backend import OpenVinoBackend

    return Pipeline(OpenVinoBackend.load(artifact, threads=threads))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m deleaker.benchmarks.portable_check", description=__doc__.split("\n")[0])
    p.add_argument("--function", required=True, help="artifact exported without --portable")
    p.add_argument("--portable", required=True, help="artifact exported with --portable")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=64, help="image height and width")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    def go() -> int:
        from deleaker.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

        cfg = DeLeakerConfig(num_steps=args.steps, **FIRING)
        reqs = [GenerateRequest("a cat and a cheetah in a field", entities=("cat", "cheetah"), steps=args.steps,
                                height=args.size, width=args.size, config=cfg),
                GenerateRequest("a dog and a bird", entities=("dog", "bird"), seed=3, steps=args.steps,
                                height=args.size, width=args.size, config=cfg, deleaker=False)]
        engines = {"onnxruntime/function": Pipeline(OnnxRuntimeBackend.load(args.function, threads=args.threads)),
                   "onnxruntime/portable": Pipeline(OnnxRuntimeBackend.load(args.portable, threads=args.threads)),
                   "openvino/portable": openvino_pipeline(args.portable, args.threads)}
        ref = None
        for name, pipe in engines.items():
            pipe.generate(reqs[:1])  # warm-up
            t0 = time.perf_counter()
            out = pipe.generate(reqs)
            total = time.perf_counter() - t0
            step = float(np.mean([s for r in out[:1] for s in r.step_seconds]))
            if ref is None:
                ref = out
            dl = max(float(np.abs(a.latents - b.latents).max()) for a, b in zip(out, ref))
            dh = max(float(np.abs(a.history - b.history).max()) for a, b in zip(out, ref))
            print(f"{name:22} step {step * 1e3:8.2f} ms  generation {total:6.2f} s  max |latents - "
                  f"onnxruntime/function| {dl:.2e}  max |history - ...| {dh:.2e}", flush=True)
        off = engines["onnxruntime/function"].generate(dataclasses.replace(reqs[0], deleaker=False))
        print(f"{len(reqs)} requests in one batch (DeLeaker on, off), {args.steps} steps, {args.size}x{args.size}; "
              f"DeLeaker's effect on the first: max |on - off| latents {np.abs(off.latents - ref[0].latents).max():.2e}")
        return 0

    return run_reporting_errors("portable_check", go, False)


if __name__ == "__main__":
    sys.exit(main())
