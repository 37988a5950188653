"""Fixed requests on the tiny model and digests of what they generate, recorded per backend in
golden_digests.json: a change to the denoising loop that should not change the output is checked
against them bit for bit.

Two requests, one batch, 64x64, 4 steps: one with two entities and DeLeaker windows that open
within the 4 steps (so the digest covers edited output), one vanilla.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from deleaker.runtime.config import DeLeakerConfig
from deleaker.runtime.pipeline import GenerateRequest

DIGESTS_FILE = Path(__file__).with_name("golden_digests.json")
STEPS = 4
EDITING = DeLeakerConfig(num_steps=STEPS, start_aggregating_from=0, start_intervention_from=1, do_smoothing=False)
REQUESTS = (
    GenerateRequest("a cat and a cheetah in a field", entities=("cat", "cheetah"), seed=7, steps=STEPS, height=64,
                    width=64, config=EDITING),
    GenerateRequest("a dog and a bird on a hill", seed=3, steps=STEPS, height=64, width=64, deleaker=False),
)


def digest(results) -> str:
    """sha256 over the images' uint8 bytes, in request order."""
    h = hashlib.sha256()
    for r in results:
        h.update(np.ascontiguousarray(r.image, np.uint8).tobytes())
    return h.hexdigest()


def state_digest(results) -> str:
    """sha256 over the final latents and history (float32 bytes): finer than the images' rounding."""
    h = hashlib.sha256()
    for r in results:
        h.update(np.ascontiguousarray(r.latents, np.float32).tobytes())
        h.update(np.ascontiguousarray(r.history, np.float32).tobytes())
    return h.hexdigest()


def check(backend: str, pipe) -> None:
    """Generate REQUESTS in one batch on `pipe` and compare with the digests recorded for `backend`."""
    results = pipe.generate(list(REQUESTS))
    assert all(r.batch_size == 2 for r in results), "the golden requests must run as one batch"
    # the digest must cover DeLeaker's edit: the entity request's history is filled, the vanilla one's not
    assert np.abs(results[0].history).max() > 0, "DeLeaker did not edit the entity request"
    assert np.abs(results[1].history).max() == 0
    got = {"images": digest(results), "state": state_digest(results)}
    recorded = json.loads(DIGESTS_FILE.read_text()).get(backend)
    assert recorded == got, f"{backend}: golden digests changed: recorded {recorded}, got {got}"
