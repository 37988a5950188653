"""The memory and time estimate (runtime/footprint.py), and a request that cannot fit refused
before anything is allocated for it."""

from __future__ import annotations

import resource
import tracemalloc

import pytest

from deleaker.runtime import footprint
from deleaker.runtime.backends.base import ModelInfo
from deleaker.runtime.latents import geometry
from deleaker.runtime.pipeline import GenerateRequest, load_pipeline

# The embedded tiny model's sizes: 2 heads of 16, 512 T5 tokens, 4 blocks per step, VAE base 16 channels.
TINY = ModelInfo(name="tiny", in_channels=64, latent_channels=16, vae_scale_factor=8, vae_scaling_factor=0.36,
                 vae_shift_factor=0.11, max_text_tokens=512, clip_max_length=77, entity_slots=4,
                 guidance_embeds=True, blocks_per_step=4, attention_heads=2, attention_head_dim=16,
                 vae_base_channels=16)


def test_workspace_is_the_reference_ops_attention_maps():
    # 4096 px: 256 x 256 image tokens + 512 text tokens; one float32 [2, N, N] map is the 35 GB
    # allocation the reference op failed on.
    N = 512 + 256 * 256
    fp = footprint.estimate(TINY, geometry(4096, 4096), batch=1, steps=20, fused=False)
    assert fp.workspace_bytes == footprint.WORKSPACE_MAPS * 2 * N * N * 4
    assert 34e9 < fp.workspace_bytes / footprint.WORKSPACE_MAPS < 36e9
    assert fp.vae_bytes == footprint.VAE_COPIES * 16 * 4096 * 4096 * 4
    # the fused op holds no map; time is not estimated for it
    fused = footprint.estimate(TINY, geometry(4096, 4096), batch=1, steps=20, fused=True)
    assert fused.workspace_bytes == 0 and fused.seconds is None
    # time is linear in steps and batch, quadratic in tokens
    a = footprint.estimate(TINY, geometry(256, 256), batch=1, steps=10, fused=False).seconds
    b = footprint.estimate(TINY, geometry(256, 256), batch=2, steps=20, fused=False).seconds
    assert b == pytest.approx(4 * a)
    # a model that does not say its heads is not estimated (nothing refused)
    unknown = ModelInfo(**{**TINY.__dict__, "attention_heads": None, "attention_head_dim": None,
                           "vae_base_channels": None})
    assert footprint.estimate(unknown, geometry(4096, 4096), 1, 20, False).total_bytes == 0


def test_largest_square_side_fits_and_the_next_does_not():
    budget = 2 * 2 ** 30
    side = footprint.largest_square_side(TINY, batch=1, steps=8, fused=False, budget=budget)
    assert side % 16 == 0 and side > 0
    fits = lambda s: footprint.estimate(TINY, geometry(s, s, max_side=s), 1, 8, False).total_bytes <= budget  # noqa: E731
    assert fits(side) and not fits(side + 16)


def test_check_refuses_and_names_the_size_that_fits(monkeypatch):
    monkeypatch.setattr(footprint, "available_bytes", lambda device: 4 * 2 ** 30)
    with pytest.raises(footprint.FootprintError) as exc:
        footprint.check(TINY, geometry(2048, 2048), 1, 20, False, "cpu")
    msg = str(exc.value)
    side = footprint.largest_square_side(TINY, 1, 20, False, int(footprint.HEADROOM * 4 * 2 ** 30))
    assert f"the largest square size that fits this model now is {side}x{side}" in msg and "4.0 GiB of host memory" in msg, msg
    assert footprint.check(TINY, geometry(256, 256), 1, 20, False, "cpu").total_bytes > 0


def test_available_bytes_reads_the_host():
    free = footprint.available_bytes("cpu", max_age_s=0)
    assert free is not None and 0 < free <= __import__("os").sysconf("SC_PHYS_PAGES") * 4096 * 2


def test_a_free_memory_reading_is_reused_only_while_young(monkeypatch):
    reads = []
    monkeypatch.setattr(footprint, "_readings", {})
    monkeypatch.setattr(footprint, "_read_available", lambda device: reads.append(device) or 1000 * len(reads))
    assert footprint.available_bytes("cpu", max_age_s=60) == 1000
    assert footprint.available_bytes("cpu", max_age_s=60) == 1000  # reused
    assert footprint.available_bytes("cuda:0", max_age_s=60) == 2000  # each device has its own reading
    assert footprint.available_bytes("cpu", max_age_s=0) == 3000  # too old: read again
    assert reads == ["cpu", "cuda:0", "cpu"]


def test_a_request_that_cannot_fit_is_refused_before_allocating(tiny_model_dir):
    """4096 x 4096 on the tiny model needs ~140 GB of attention maps: refused in one line, with
    the process's peak memory (Python heap and resident set) barely moving."""
    pipe = load_pipeline(str(tiny_model_dir), progress=False)
    req = GenerateRequest("a cat and a cheetah in a field", entities=("cat", "cheetah"), steps=2, height=4096,
                          width=4096)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
    tracemalloc.start()
    try:
        with pytest.raises(footprint.FootprintError) as exc:
            pipe.generate(req)
        _, heap_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    msg = str(exc.value)
    assert "\n" not in msg and "4096x4096 needs about" in msg and "the largest square size that fits this model now is" in msg, msg
    print(f"heap peak {heap_peak / 2 ** 20:.2f} MiB, resident set grew {(rss1 - rss0) / 2 ** 20:.1f} MiB")
    assert heap_peak < 8 * 2 ** 20, heap_peak  # below the request's noise alone (16 x 512 x 512 float32 = 16 MiB)
    assert rss1 - rss0 < 256 * 2 ** 20, rss1 - rss0  # one attention map would be 35 GB
    with pytest.raises(footprint.FootprintError):
        pipe.check(req)
