"""runtime/latents.py against diffusers' FluxPipeline packing and position ids (exact)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from deleaker.runtime import latents as lat


@pytest.mark.parametrize("height, width", [(16, 16), (32, 48), (512, 512), (1024, 768), (80, 1360)])
def test_pack_and_ids_match_diffusers(height, width):
    geo = lat.geometry(height, width)
    b = 2
    x = torch.randn(geo.latent_shape(b), generator=torch.Generator().manual_seed(0))  # [B, 16, H/8, W/8]
    ref = FluxPipeline._pack_latents(x, b, 16, geo.latent_height, geo.latent_width)
    packed = lat.pack_latents(x.numpy())
    assert packed.shape == geo.packed_shape(b) == (b, (height // 16) * (width // 16), 64)
    np.testing.assert_array_equal(packed, ref.numpy())

    ref_unpacked = FluxPipeline._unpack_latents(ref, height, width, 8)
    np.testing.assert_array_equal(lat.unpack_latents(packed, geo.grid), ref_unpacked.numpy())
    np.testing.assert_array_equal(lat.unpack_latents(packed, geo.grid), x.numpy())  # round trip

    h, w = geo.grid
    ref_ids = FluxPipeline._prepare_latent_image_ids(b, h, w, "cpu", torch.float32)
    ids = lat.image_ids(geo.grid)
    assert ids.shape == (h * w, 3) and ids.dtype == np.float32
    np.testing.assert_array_equal(ids, ref_ids.numpy())
    assert geo.image_seq_len == h * w


def test_pack_layout_is_patch_major():
    # token (r, c) holds latent pixels (2r+dy, 2c+dx) at channel index ch*4 + dy*2 + dx
    x = np.arange(2 * 4 * 6, dtype=np.float32).reshape(1, 2, 4, 6)
    p = lat.pack_latents(x)
    assert p.shape == (1, 2 * 3, 8)
    r, c, ch, dy, dx = 1, 2, 1, 1, 0
    assert p[0, r * 3 + c, ch * 4 + dy * 2 + dx] == x[0, ch, 2 * r + dy, 2 * c + dx]


def test_text_ids_are_zeros():
    t = lat.text_ids(7)
    assert t.shape == (7, 3) and t.dtype == np.float32 and not t.any()


@pytest.mark.parametrize("height, width", [(0, 16), (16, -16), (500, 512), (512, 24), (15, 15)])
def test_invalid_sizes_are_clear_errors(height, width):
    with pytest.raises(lat.LatentSizeError, match="positive multiples of 16"):
        lat.geometry(height, width)


@pytest.mark.parametrize("bad", [512.0, "512", None, True])
def test_non_integer_sizes_are_errors(bad):
    with pytest.raises(lat.LatentSizeError, match="integer"):
        lat.geometry(bad, 512)


@pytest.mark.parametrize("height, width, side", [(100000, 100000, "height"), (512, 4112, "width"),
                                                 (10 ** 30, 16, "height")])
def test_too_large_sizes_fail_before_any_allocation(height, width, side):
    tracemalloc.start()
    try:
        with pytest.raises(lat.LatentSizeError) as ei:
            lat.initial_latents(lat.geometry(height, width), seeds=0)  # would be 10 GB of noise at 100000 px
        with pytest.raises(lat.LatentSizeError):
            lat.LatentGeometry(height, width)  # no way round the check
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2 ** 20, f"{peak} bytes allocated before the size error"
    msg = str(ei.value)
    assert "\n" not in msg and f"{side} " in msg and f"maximum image side of {lat.MAX_IMAGE_SIDE} pixels" in msg
    assert "max_side" in msg and "MAX_IMAGE_SIDE" in msg


def test_max_side_is_overridable():
    assert lat.MAX_IMAGE_SIDE == 4096
    assert lat.geometry(4096, 4096).grid == (256, 256)  # the default limit itself is accepted
    with pytest.raises(lat.LatentSizeError, match="maximum image side of 4096"):
        lat.geometry(4096 + 16, 16)
    assert lat.geometry(8192, 16, max_side=8192).grid == (512, 1)  # e.g. an artifact exported up to 8192
    with pytest.raises(lat.LatentSizeError, match="width 1024 is larger than the maximum image side of 512"):
        lat.geometry(512, 1024, max_side=512)  # a smaller exported range is stricter
    with pytest.raises(lat.LatentSizeError, match="max_side must be an integer"):
        lat.geometry(512, 512, max_side=4096.0)


def test_shape_errors():
    with pytest.raises(lat.LatentSizeError, match="even"):
        lat.pack_latents(np.zeros((1, 16, 3, 4)))
    with pytest.raises(lat.LatentSizeError, match=r"\[B, C, H, W\]"):
        lat.pack_latents(np.zeros((16, 4, 4)))
    with pytest.raises(lat.LatentSizeError, match="grid"):
        lat.unpack_latents(np.zeros((1, 6, 64)), (2, 2))


def test_noise_is_seeded_per_sample():
    geo = lat.geometry(64, 32)
    a = lat.make_noise(geo, 5)
    assert a.shape == (1, 16, 8, 4) and a.dtype == np.float32
    np.testing.assert_array_equal(a, lat.make_noise(geo, 5))  # deterministic
    batch = lat.make_noise(geo, [7, 5, 9])
    np.testing.assert_array_equal(batch[1], a[0])  # a sample does not depend on its batch
    np.testing.assert_array_equal(lat.make_noise(geo, 7, batch_size=2), lat.make_noise(geo, [7, 8]))
    assert not np.array_equal(batch[0], batch[2])
    # the documented generator: numpy PCG64 standard normal in the unpacked layout
    np.testing.assert_array_equal(a[0], np.random.Generator(np.random.PCG64(5)).standard_normal((16, 8, 4),
                                                                                                dtype=np.float32))
    assert abs(float(lat.make_noise(geo, 0, batch_size=8).std()) - 1.0) < 0.05
    packed = lat.initial_latents(geo, [7, 5, 9])
    np.testing.assert_array_equal(packed, lat.pack_latents(batch))
    with pytest.raises(lat.LatentSizeError, match="2 seeds for batch size 3"):
        lat.make_noise(geo, [1, 2], batch_size=3)


def test_to_vae_latents_matches_pipeline_formula():
    geo = lat.geometry(32, 64)
    packed = np.random.default_rng(0).standard_normal(geo.packed_shape(1)).astype(np.float32)
    ref = FluxPipeline._unpack_latents(torch.from_numpy(packed), 32, 64, 8)
    ref = (ref / 0.3611) + 0.1159
    np.testing.assert_allclose(lat.to_vae_latents(packed, geo, 0.3611, 0.1159), ref.numpy(), rtol=1e-6, atol=1e-6)


# --- the size error at the entry points (runtime/errors.py) -------------------------------------

def _too_large() -> int:
    lat.geometry(100000, 100000)
    return 0


@pytest.mark.parametrize("debug", [False, True])
def test_size_error_exit_code_2_with_and_without_debug(capsys, monkeypatch, debug):
    from deleaker.runtime.errors import run_reporting_errors

    monkeypatch.delenv("DELEAKER_DEBUG", raising=False)
    assert run_reporting_errors("deleaker", _too_large, debug=debug) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("deleaker: error: size 100000x100000: height 100000 is larger than the maximum image side")
    assert ("Traceback (most recent call last)" in err) == debug  # --debug adds the traceback, same exit code
    monkeypatch.setenv("DELEAKER_DEBUG", "1")
    assert run_reporting_errors("deleaker", _too_large) == 2
    assert "Traceback" in capsys.readouterr().err


def test_bugs_are_not_reported_as_bad_input():
    from deleaker.runtime.errors import run_reporting_errors

    def bug() -> int:
        raise RuntimeError("internal")

    with pytest.raises(RuntimeError, match="internal"):
        run_reporting_errors("deleaker", bug)


def test_cli_rejects_huge_size_quickly(tiny_model_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "deleaker"
    for extra in ([], ["--debug"]):
        proc = subprocess.run([str(exe), "generate", "--model", str(tiny_model_dir), "--prompt", "a cat and a dog",
                               "--entities", "cat,dog", "--height", "100000", "--width", "100000", "--quiet",
                               "--out", str(tmp_path / "x.png"), *extra],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.splitlines()[-1].startswith("deleaker: error: size 100000x100000: height 100000 is larger than")
        assert ("Traceback" in proc.stderr) == bool(extra)
        assert not (tmp_path / "x.png").exists()
