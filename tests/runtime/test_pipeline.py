"""The runtime's denoising loop on the tiny model (torch backend)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deleaker.runtime.backends import load_backend
from deleaker.runtime.config import DeLeakerConfig
from deleaker.runtime import latents as lat
from deleaker.runtime.pipeline import GenerateRequest, Pipeline, RequestFailed
from support.editing import editing_config

# Windows open from the first steps, so 4 steps exercise history, masks and edits; no smoothing:
# on a 4x6 latent grid the 3x3 opening would erase the scattered masks of random weights.
EARLY = editing_config(num_steps=4)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return Pipeline(load_backend("torch", str(tiny_model_dir), progress=False), config=EARLY)


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
    assert a.history[:2].max() > 0 and np.all(a.history[2:] == 0)  # two active slots of four
    assert np.all(v.history == 0)


@torch.no_grad()
def test_vanilla_loop_matches_diffusers_flux_pipeline(pipe, tiny_model_dir):
    """Our tokenizers, scheduler, packing, encoders and VAE path vs diffusers' FluxPipeline."""
    from deleaker.modeling.checkpoint import open_checkpoint

    r = req(deleaker=False)
    ours = pipe.generate(r, progress=False)
    fp = open_checkpoint(tiny_model_dir).load_pipeline("float32")
    fp.set_progress_bar_config(disable=True)
    geo = lat.geometry(r.height, r.width)
    start = torch.from_numpy(lat.initial_latents(geo, r.seed, batch_size=1))  # [1, I, 64]
    theirs = fp(prompt=r.prompt, height=r.height, width=r.width, num_inference_steps=r.steps,
                guidance_scale=r.guidance_scale, latents=start, output_type="latent",
                max_sequence_length=pipe.backend.info.max_text_tokens).images
    np.testing.assert_allclose(ours.latents[None], theirs.numpy(), rtol=1e-4, atol=1e-4)


def test_request_validation(pipe):
    with pytest.raises(lat.LatentSizeError, match="multiples of 16"):
        pipe.check(req(height=70))
    from deleaker.runtime.tokens import EntityError
    with pytest.raises(EntityError, match="not found"):
        pipe.generate(req(entities=("cat", "zebra")), progress=False)
    for bad, match in [(dict(guidance_scale=float("nan")), "guidance_scale"), (dict(seed=-1), "seed"),
                       (dict(steps=0), "steps"), (dict(entities="cat"), "entities"), (dict(prompt=" "), "prompt")]:
        with pytest.raises(ValueError, match=match):
            pipe.check(req(**bad))


# Three requests that differ in everything a request may change: prompt, entity set (one has
# none), seed, guidance and DeLeaker settings (windows, strength, a rule switched off).
OTHER = DeLeakerConfig(start_aggregating_from=2, start_intervention_from=3, k_strength=1.5, num_steps=4,
                       do_smoothing=False, do_image_image=False)
MIXED = [
    req(),
    req(prompt="a dog and a bird by the river", entities=("dog", "bird"), seed=11, guidance_scale=2.0, config=OTHER),
    req(prompt="a horse in the snow", entities=(), seed=5),
]


def test_batch_equals_each_request_alone(pipe):
    batched = pipe.generate(MIXED)
    assert [r.batch_size for r in batched] == [3, 3, 3]
    for r, alone in zip(batched, (pipe.generate(q) for q in MIXED)):
        assert alone.batch_size == 1
        np.testing.assert_allclose(r.latents, alone.latents, rtol=0, atol=1e-5)
        np.testing.assert_allclose(r.history, alone.history, rtol=0, atol=1e-5)
    # the settings really differ per sample: the second request with the pipeline's settings is another image
    default_cfg = pipe.generate(req(prompt=MIXED[1].prompt, entities=MIXED[1].entities, seed=11, guidance_scale=2.0))
    assert np.abs(default_cfg.latents - batched[1].latents).max() > 1e-3


def test_batches_group_by_size_and_steps_and_respect_max_batch(tiny_model_dir, pipe):
    small = Pipeline(pipe.backend, config=EARLY, max_batch=2)
    reqs = [req(seed=s) for s in range(3)] + [req(height=32, width=32, seed=9), req(steps=2, seed=4)]
    out = small.generate(reqs)
    assert [r.batch_size for r in out] == [2, 2, 1, 1, 1]
    assert [r.request.seed for r in out] == [0, 1, 2, 9, 4]  # results in request order
    assert out[3].image.shape == (32, 32, 3)


def test_one_engine_serves_every_step_count_and_setting(pipe):
    """No re-installation of processors: the model is request-invariant."""
    model = pipe.backend.model
    procs = [b.attn.processor for b in model.transformer.transformer_blocks]
    for steps in (4, 20, 28):
        r = pipe.generate(req(steps=steps, height=32, width=32))
        assert r.latents.shape == (4, 64)
    pipe.generate(req(config=OTHER, height=32, width=32))
    assert pipe.backend.model is model and [b.attn.processor for b in model.transformer.transformer_blocks] == procs


def test_bad_requests_are_rejected_before_any_work(pipe):
    steps_seen = []
    bad = [req(), req(entities=("cat", "zebra")), req(height=70)]
    with pytest.raises(ValueError, match=r"request 1: .*zebra"):
        pipe.generate(bad, progress=lambda done, total: steps_seen.append(done))
    assert steps_seen == []  # nothing ran
    out = pipe.generate(bad, errors="return", progress=lambda done, total: steps_seen.append((done, total)))
    assert isinstance(out[1], RequestFailed) and "zebra" in out[1].message and out[1].index == 1
    assert isinstance(out[2], RequestFailed) and "multiples of 16" in out[2].message
    np.testing.assert_array_equal(out[0].latents, pipe.generate(req()).latents)  # the good one is unaffected
    assert steps_seen[-1] == (4, 4)


def test_concurrent_callers_get_the_serial_results(pipe):
    from concurrent.futures import ThreadPoolExecutor

    reqs = [req(seed=s, height=32, width=32, entities=("cat", "cheetah") if s % 2 else ()) for s in range(8)]
    serial = [pipe.generate(r) for r in reqs]
    with ThreadPoolExecutor(8) as ex:
        parallel = list(ex.map(pipe.generate, reqs))
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a.latents, b.latents)
        np.testing.assert_array_equal(a.image, b.image)


def test_png_bytes_round_trip(pipe):
    import io

    from PIL import Image

    r = pipe.generate(req(height=32, width=32))
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.png_bytes()))), r.image)


def test_step_count_defaults_to_the_pipelines_once(pipe):
    """steps=None takes the pipeline's step count (one default): the result says so, and equals the
    run that asked for that count. A request's own settings never change it (their num_steps is
    not a step count: the windows are resolved for the request's steps)."""
    alone = pipe.generate(req(steps=None, height=32, width=32))
    assert alone.request.steps == pipe.config.num_steps == EARLY.num_steps == 4
    np.testing.assert_array_equal(alone.image, pipe.generate(req(steps=4, height=32, width=32)).image)
    three = EARLY.replace(num_steps=3)
    assert pipe.generate(req(steps=None, config=three, height=32, width=32)).request.steps == 4
    assert pipe.generate(req(steps=2, config=three, height=32, width=32)).request.steps == 2
    with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 1000\]"):
        pipe.generate(req(steps=0))


def test_tokenization_is_cached_per_prompt_and_never_shared_mutably(pipe):
    """A server checks a request at admission and prepares it again in its batch: the second
    time the prompt's token arrays come from the cache. A vanilla request gets zeroed entity
    tokens without touching the cached ones, and a rejected prompt is not cached."""
    from deleaker.runtime import tokens as tok

    pipe._tokenized.cache_clear()
    req = GenerateRequest("a cat and a dog", entities=("cat", "dog"), steps=2, height=64, width=64)
    first = pipe._prepare(req, 0)
    second = pipe._prepare(req, 1)
    info = pipe._tokenized.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    assert second.entity_tokens is first.entity_tokens and not first.entity_tokens.flags.writeable
    vanilla = pipe._prepare(GenerateRequest("a cat and a dog", entities=("cat", "dog"), deleaker=False,
                                            steps=2, height=64, width=64), 2)
    assert not vanilla.entity_tokens.any() and first.entity_tokens.any()  # the cached copy is intact
    with pytest.raises(tok.EntityError):
        pipe._prepare(GenerateRequest("a cat and a dog", entities=("cow",), steps=2, height=64, width=64), 3)
    assert pipe._tokenized.cache_info().currsize == 1  # the error was not cached
    # a batch from cached arrays equals one tokenized afresh
    pipe._tokenized.cache_clear()
    fresh = pipe.generate(req, progress=False).image
    np.testing.assert_array_equal(pipe.generate(req, progress=False).image, fresh)
