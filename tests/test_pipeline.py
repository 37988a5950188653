"""The runtime's denoising loop on the tiny model (torch backend)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deleaker.runtime.backends import load_backend
from deleaker.runtime.config import DeLeakerConfig
from deleaker.runtime import latents as lat
from deleaker.runtime.pipeline import GenerateRequest, Pipeline

# Windows open from the first steps, so 4 steps exercise history, masks and edits; no smoothing:
# on a 4x6 latent grid the 3x3 opening would erase the scattered masks of random weights.
EARLY = DeLeakerConfig(start_aggregating_from=0, start_intervention_from=1, num_steps=4, do_smoothing=False)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return Pipeline(load_backend("torch", str(tiny_model_dir), deleaker_config=EARLY, progress=False))


def req(**kw):
    base = dict(prompt="a cat and a cheetah in a field", entities=("cat", "cheetah"), seed=3, steps=4,
                height=64, width=96)
    base.update(kw)
    return GenerateRequest(**base)


def test_deterministic_and_deleaker_changes_the_result(pipe):
    a = pipe.generate(req(), progress=False)
    b = pipe.generate(req(), progress=False)
    v = pipe.generate(req(deleaker=False), progress=False)
    assert a.images.shape == (1, 64, 96, 3) and a.images.dtype == np.uint8
    np.testing.assert_array_equal(a.latents, b.latents)
    assert np.abs(a.latents - v.latents).max() > 1e-4
    assert a.history[0, :2].max() > 0 and np.all(a.history[0, 2:] == 0)  # two active slots of four
    assert np.all(v.history == 0)


@torch.no_grad()
def test_vanilla_loop_matches_diffusers_flux_pipeline(pipe, tiny_model_dir):
    """Our tokenizers, scheduler, packing, encoders and VAE path vs diffusers' FluxPipeline."""
    from deleaker.export.checkpoint import open_checkpoint

    r = req(deleaker=False)
    ours = pipe.generate(r, progress=False)
    fp = open_checkpoint(tiny_model_dir).load_pipeline("float32")
    fp.set_progress_bar_config(disable=True)
    geo = lat.geometry(r.height, r.width)
    start = torch.from_numpy(lat.initial_latents(geo, r.seed, batch_size=1))  # [1, I, 64]
    theirs = fp(prompt=r.prompt, height=r.height, width=r.width, num_inference_steps=r.steps,
                guidance_scale=r.guidance_scale, latents=start, output_type="latent",
                max_sequence_length=pipe.backend.info.max_text_tokens).images
    np.testing.assert_allclose(ours.latents, theirs.numpy(), rtol=1e-4, atol=1e-4)


def test_request_validation(pipe):
    with pytest.raises(lat.LatentSizeError, match="multiples of 16"):
        pipe.check(req(height=70))
    from deleaker.runtime.tokens import EntityError
    with pytest.raises(EntityError, match="not found"):
        pipe.generate(req(entities=("cat", "zebra")), progress=False)
