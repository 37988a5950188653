"""FLUX latents: size checks, 2x2 packing, position ids and seeded noise (numpy only).

Layout (diffusers' FluxPipeline, FLUX VAE with 8x downsampling and 16 latent channels):

    image           [B, 3, H, W]            H, W positive multiples of 16
    VAE latents     [B, 16, H/8, W/8]       "unpacked"
    packed latents  [B, (H/16)*(W/16), 64]  one token per 2x2 latent patch, row-major over the
                                            (h, w) = (H/16, W/16) token grid; channel index
                                            c*4 + dy*2 + dx
    img_ids         [I, 3]                  (0, row, col) per image token, I = h*w
    txt_ids         [T, 3]                  zeros

Size limit: each side is at most MAX_IMAGE_SIDE pixels unless the caller passes another max_side
(a backend with an exported size range passes its maximum). Checked before anything is
allocated: an absurd size is a one-line error, not gigabytes of noise and then a crash.

Noise: numpy's PCG64 generator, one generator per sample, standard normal float32 drawn in
the unpacked [16, H/8, W/8] layout and then packed (the order FluxPipeline draws in). Sample b
with seed s is the same array whatever else is in the batch. It is NOT bit-equal to
torch.randn with the same seed; use `latents=` style inputs for that (pack_latents of a
torch-drawn array).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import FieldError

# FLUX's VAE: 8x spatial compression, 16 latent channels; packing adds another factor 2.
VAE_SCALE_FACTOR = 8
LATENT_CHANNELS = 16
PATCH = 2
# Default upper bound on an image side in pixels: 4096 px is a 256 x 256 token grid (65536 image
# tokens, 16x the 4096 that FLUX.1's scheduler is configured for). Larger sizes need max_side.
MAX_IMAGE_SIDE = 4096


class LatentSizeError(FieldError):
    """Image size or latent shape does not fit FLUX's packing; the message says which."""

    field = "size"


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise LatentSizeError(f"{name} must be an integer number of pixels, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class LatentGeometry:
    """Shapes for one image size; validated on construction (`geometry(height, width)` is the
    usual way to build one)."""

    height: int  # image pixels
    width: int
    vae_scale_factor: int = VAE_SCALE_FACTOR
    latent_channels: int = LATENT_CHANNELS
    max_side: int = MAX_IMAGE_SIDE  # largest accepted height or width in pixels

    def __post_init__(self):
        height = _positive_int("height", self.height)
        width = _positive_int("width", self.width)
        max_side = _positive_int("max_side", self.max_side)
        # sizes are written WIDTHxHEIGHT, as the server's `size` is
        for side, v in (("height", height), ("width", width)):
            if v > max_side:
                raise LatentSizeError(
                    f"size {width}x{height}: {side} {v} is larger than the maximum image side of {max_side} pixels "
                    f"(max_side; default deleaker.runtime.latents.MAX_IMAGE_SIDE = {MAX_IMAGE_SIDE})")
        multiple = self.multiple
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise LatentSizeError(
                f"size {width}x{height}: width and height must be positive multiples of {multiple} pixels for this "
                f"model (one image token: VAE scale factor {self.vae_scale_factor} x patch {PATCH}); nearest valid: "
                f"{max(multiple, width // multiple * multiple)}x{max(multiple, height // multiple * multiple)}")

    @property
    def multiple(self) -> int:
        return self.vae_scale_factor * PATCH

    @property
    def latent_height(self) -> int:
        return self.height // self.vae_scale_factor

    @property
    def latent_width(self) -> int:
        return self.width // self.vae_scale_factor

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the image-token grid: (H/16, W/16) for FLUX."""
        return self.height // self.multiple, self.width // self.multiple

    @property
    def image_seq_len(self) -> int:
        h, w = self.grid
        return h * w

    @property
    def packed_channels(self) -> int:
        return self.latent_channels * PATCH * PATCH

    def latent_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        return (batch_size, self.latent_channels, self.latent_height, self.latent_width)

    def packed_shape(self, batch_size: int) -> tuple[int, int, int]:
        return (batch_size, self.image_seq_len, self.packed_channels)


def geometry(height: int, width: int, vae_scale_factor: int = VAE_SCALE_FACTOR,
             latent_channels: int = LATENT_CHANNELS, max_side: int | None = None) -> LatentGeometry:
    """Validated shapes for a `height` x `width` image: positive multiples of 16 for FLUX, each
    side at most `max_side` pixels (None: MAX_IMAGE_SIDE; a backend with an exported size range
    passes its maximum). Checks only: nothing is allocated.

    FluxPipeline silently rounds other sizes down; we refuse them so the caller knows the size
    it gets."""
    return LatentGeometry(height, width, vae_scale_factor, latent_channels,
                          MAX_IMAGE_SIDE if max_side is None else max_side)


def pack_latents(latents: np.ndarray) -> np.ndarray:
    """[B, C, H, W] -> [B, (H/2)*(W/2), C*4] (FluxPipeline._pack_latents)."""
    latents = np.asarray(latents)
    if latents.ndim != 4:
        raise LatentSizeError(f"expected latents [B, C, H, W], got shape {latents.shape}")
    b, c, h, w = latents.shape
    if h % PATCH or w % PATCH:
        raise LatentSizeError(f"latent height and width must be even to pack, got {h}x{w}")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2)
    x = x.transpose(0, 2, 4, 1, 3, 5)  # [B, h, w, C, 2, 2]
    return np.ascontiguousarray(x).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[B, h*w, C*4] -> [B, C, 2h, 2w] (FluxPipeline._unpack_latents); grid = (h, w)."""
    packed = np.asarray(packed)
    h, w = (int(v) for v in grid)
    if packed.ndim != 3:
        raise LatentSizeError(f"expected packed latents [B, I, C*4], got shape {packed.shape}")
    b, n, c4 = packed.shape
    if n != h * w or c4 % 4:
        raise LatentSizeError(f"packed latents {packed.shape} do not fit grid {h}x{w} with 2x2 patches")
    x = packed.reshape(b, h, w, c4 // 4, 2, 2)
    x = x.transpose(0, 3, 1, 4, 2, 5)  # [B, C, h, 2, w, 2]
    return np.ascontiguousarray(x).reshape(b, c4 // 4, h * 2, w * 2)


def image_ids(grid: tuple[int, int], dtype=np.float32) -> np.ndarray:
    """[h*w, 3]: (0, row, col) per image token (FluxPipeline._prepare_latent_image_ids)."""
    h, w = (int(v) for v in grid)
    ids = np.zeros((h, w, 3), dtype=np.float32)
    ids[..., 1] = np.arange(h, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(w, dtype=np.float32)[None, :]
    return ids.reshape(h * w, 3).astype(dtype)


def text_ids(num_tokens: int, dtype=np.float32) -> np.ndarray:
    """[T, 3] zeros (FluxPipeline.encode_prompt's text_ids)."""
    return np.zeros((int(num_tokens), 3), dtype=dtype)


def _seed_list(seeds: int | Sequence[int], batch_size: int | None) -> list[int]:
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        n = 1 if batch_size is None else batch_size
        return [int(seeds) + b for b in range(n)]
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise LatentSizeError("need at least one seed")
    if batch_size is not None and len(seeds) != batch_size:
        raise LatentSizeError(f"got {len(seeds)} seeds for batch size {batch_size}")
    return seeds


def make_noise(geo: LatentGeometry, seeds: int | Sequence[int], batch_size: int | None = None,
               dtype=np.float32) -> np.ndarray:
    """Unpacked noise [B, 16, H/8, W/8]. One PCG64 generator per sample: an int seed s with
    batch_size B gives seeds s, s+1, ..., s+B-1; a list gives one seed per sample."""
    out = [np.random.Generator(np.random.PCG64(s)).standard_normal(geo.latent_shape(1)[1:], dtype=np.float32)
           for s in _seed_list(seeds, batch_size)]
    return np.stack(out).astype(dtype, copy=False)  # [B, C, H/8, W/8]


def initial_latents(geo: LatentGeometry, seeds: int | Sequence[int], batch_size: int | None = None,
                    dtype=np.float32) -> np.ndarray:
    """Packed starting latents [B, I, 64]: make_noise, then pack_latents."""
    return pack_latents(make_noise(geo, seeds, batch_size, dtype))


def to_vae_latents(packed: np.ndarray, geo: LatentGeometry, scaling_factor: float,
                   shift_factor: float) -> np.ndarray:
    """Final packed latents -> the VAE decoder's input [B, 16, H/8, W/8] (FluxPipeline's
    unpack, then latents / scaling_factor + shift_factor)."""
    x = unpack_latents(packed, geo.grid)
    return x / np.asarray(scaling_factor, dtype=x.dtype) + np.asarray(shift_factor, dtype=x.dtype)
