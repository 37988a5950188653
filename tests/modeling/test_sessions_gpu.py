"""Device-resident sessions on a GPU: no host<->device copy inside the denoising loop.

Marked `gpu` (tests/conftest.py skips them with the reason where torch sees no CUDA device; the
`fused_op` fixture where the fused library is not built). The CPU side of the session contract (batching, settings per sample, concurrency) is
tests/runtime/test_pipeline.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


def _fused_backend(model_dir, **options):
    from deleaker.runtime.backends import load_backend

    return load_backend("torch", str(model_dir), device="cuda", dtype="bf16", op="cuda", progress=False, **options)


def _memcpy_events(fn) -> list[str]:
    """Names of host<->device copies the CUDA profiler sees while fn() runs."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if "Memcpy" in e.name and ("HtoD" in e.name or "DtoH" in e.name)]


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_steady_steps_copy_nothing_between_host_and_device(fused_op, tiny_h64_model_dir, cuda_graphs):
    from support.editing import editing_config
    from deleaker.runtime.pipeline import GenerateRequest, Pipeline

    be = _fused_backend(tiny_h64_model_dir, cuda_graphs=cuda_graphs)
    cfg = editing_config()
    pipe = Pipeline(be, config=cfg)
    reqs = [GenerateRequest("a cat and a cheetah in a field", entities=("cat", "cheetah"), seed=s, steps=6,
                            height=128, width=128) for s in range(2)]
    batch = [pipe._prepare(r, i) for i, r in enumerate(reqs)]
    session = be.start_session(pipe._session_inputs(batch))
    session.step(0)  # warm-up (and capture, with graphs)
    copies = _memcpy_events(lambda: [session.step(i) for i in range(1, 6)])
    assert copies == [], copies
    x, hist = session.result()
    assert np.isfinite(x).all() and hist[:, :2].max() > 0  # it ran, with DeLeaker's history filled


def test_batched_images_per_second_are_reported(fused_op, tiny_h64_model_dir):
    """The session loop at batch 1, 2 and 4 (tiny model: a functional check that batching raises
    throughput; FLUX.1-dev-sized figures come from `deleaker-bench --mode e2e --batch 1,2,4`)."""
    import time

    from deleaker.runtime.pipeline import GenerateRequest, Pipeline

    pipe = Pipeline(_fused_backend(tiny_h64_model_dir), max_batch=4)
    rates = {}
    for b in (1, 2, 4):
        reqs = [GenerateRequest("a cat and a cheetah in a field", entities=("cat", "cheetah"), seed=s, steps=8,
                                height=256, width=256) for s in range(b)]
        pipe.generate(reqs)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = pipe.generate(reqs)
        rates[b] = b / (time.perf_counter() - t0)
        assert [r.batch_size for r in out] == [b] * b
    print("images/s by batch size:", {b: round(r, 2) for b, r in rates.items()})
    assert rates[4] > rates[1]
