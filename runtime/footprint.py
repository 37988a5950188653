"""Memory and time estimate of one batch, checked before its session allocates anything.

The reference DeLeaker op (and the ONNX function that mirrors it) materialises the joint
attention of one sample as float32 [H, N, N] maps, N = T + I text + image tokens: the logits,
the probabilities and, while the rules are applied, a re-normalised copy and softmax's own
temporary (WORKSPACE_MAPS of them live at the peak). The fused CUDA op holds none. Around that:
the transformer's activations ([B, N, H*D] a few dozen times) and the VAE decoder's full-size
feature maps. The estimate is an upper bound meant to refuse what cannot fit, not a profile.

Time: the reference op's work grows with blocks x B x H x N^2 per step; SECONDS_PER_ELEMENT was
measured with the embedded model on a busy 2-core CPU (results/footprint/, which
names the command), so elsewhere it is a rough guide: after the first step of a long run the
pipeline also logs what the measured step time predicts.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

from .errors import FieldError
from .latents import PATCH, LatentGeometry

FLOAT32_BYTES = 4
WORKSPACE_MAPS = 4  # float32 [H, N, N] maps alive at the op's peak (reference op)
ACTIVATION_COPIES = 32  # [B, N, H*D] float32 tensors alive in one block (q, k, v, MLP 4x, residuals, ...)
VAE_COPIES = 4  # [B, C0, H, W] float32 feature maps alive in the decoder's last block
HEADROOM = 0.9  # use at most this share of the memory that is free now
SECONDS_PER_ELEMENT = 6e-8  # reference op, busy 2-core CPU, per attention-map element per block (see above)
LONG_RUN_SECONDS = 60.0  # runs estimated longer than this are announced in the log


class FootprintError(FieldError):
    """A request needs more memory than the device has free; the message says what would fit."""

    field = "size"


@dataclass(frozen=True)
class Footprint:
    """Estimated peak bytes of one batch and the seconds its steps take."""

    workspace_bytes: int  # the op's attention maps
    activation_bytes: int
    vae_bytes: int
    seconds: float | None  # None: the backend does not say enough to estimate

    @property
    def total_bytes(self) -> int:
        return self.workspace_bytes + self.activation_bytes + self.vae_bytes


def estimate(info, geo: LatentGeometry, batch: int, steps: int, fused: bool) -> Footprint:
    """Footprint of a batch of `batch` images of `geo` over `steps` steps on a model `info`
    (a ModelInfo); fused: the op keeps no [N, N] map (the CUDA kernels)."""
    H, D = info.attention_heads, info.attention_head_dim
    N = info.max_text_tokens + geo.image_seq_len
    workspace = 0 if fused or H is None else WORKSPACE_MAPS * H * N * N * FLOAT32_BYTES
    activations = 0 if H is None or D is None else ACTIVATION_COPIES * batch * N * H * D * FLOAT32_BYTES
    c0 = info.vae_base_channels
    vae = 0 if c0 is None else VAE_COPIES * batch * c0 * geo.height * geo.width * FLOAT32_BYTES
    seconds = None
    if H is not None and not fused:
        seconds = SECONDS_PER_ELEMENT * steps * info.blocks_per_step * batch * H * N * N
    return Footprint(workspace, activations, vae, seconds)


FREE_MEMORY_MAX_AGE_S = 0.5  # a reading of free memory is reused this long (a server checks every request)
_readings: dict[str, tuple[float, int | None]] = {}  # device kind -> (monotonic time, bytes)


def available_bytes(device, max_age_s: float = FREE_MEMORY_MAX_AGE_S) -> int | None:
    """Memory free now on `device` (a torch.device, "cpu", "cuda[:N]" or None): the GPU's free
    memory on CUDA (when torch can say), else the host's MemAvailable. None: unknown.
    A reading younger than max_age_s is reused: a server checks every request it admits, reading
    /proc/meminfo costs more than the rest of the check, and free memory moves slowly next to that."""
    key = str(device) if device is not None else "cpu"
    now = time.monotonic()
    seen = _readings.get(key)
    if seen is not None and now - seen[0] < max_age_s:
        return seen[1]
    free = _read_available(device)
    _readings[key] = (now, free)
    return free


def _read_available(device) -> int | None:
    kind = getattr(device, "type", None) or (str(device).split(":")[0] if device is not None else "cpu")
    if kind == "cuda":
        try:
            import torch

            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # no torch or no CUDA here: nothing to check against
            return None
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def largest_square_side(info, batch: int, steps: int, fused: bool, budget: int, max_side: int | None = None) -> int:
    """The largest square image side whose footprint fits `budget` bytes, in the model's own geometry
    (a multiple of its VAE scale factor x patch size, at most max_side); 0: none."""
    multiple = info.vae_scale_factor * PATCH  # pixels per image-token side
    geo = lambda k: LatentGeometry(k * multiple, k * multiple, info.vae_scale_factor,  # noqa: E731
                                   max_side=k * multiple)
    fits = lambda k: estimate(info, geo(k), batch, steps, fused).total_bytes <= budget  # noqa: E731
    top = None if max_side is None else max_side // multiple  # in units of `multiple`
    if top is not None and fits(top):
        return top * multiple
    lo, hi = 0, (1 << 10) if top is None else top
    while top is None and fits(hi):
        hi *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * multiple


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB"


def check(info, geo: LatentGeometry, batch: int, steps: int, fused: bool, device) -> Footprint:
    """The footprint, or FootprintError when it cannot fit in the memory free on `device`."""
    fp = estimate(info, geo, batch, steps, fused)
    free = available_bytes(device)
    if free is None or fp.total_bytes <= HEADROOM * free:
        return fp
    side = largest_fitting_side(info, batch, steps, fused, device, geo.max_side)
    where = "GPU" if "cuda" in str(device) else "host"
    fit = (f"the largest square size that fits this model now is {side}x{side}"
           + (f" at batch {batch}" if batch > 1 else "") if side else "no size fits at this batch")
    raise FootprintError(f"size {geo.width}x{geo.height} needs about {_gib(fp.total_bytes)} (the DeLeaker op's "
                         f"attention maps: {_gib(fp.workspace_bytes)}) but {_gib(free)} of {where} memory is free: "
                         f"{fit}" + ("" if fused else "; on a GPU the fused op (--attention cuda) keeps no attention "
                                                     "map"))


def largest_fitting_side(info, batch: int, steps: int, fused: bool, device, max_side: int | None = None
                         ) -> int | None:
    """The largest square side of model `info` that fits the memory free now on `device` (None:
    free memory unknown, so no limit but max_side)."""
    free = available_bytes(device)
    if free is None:
        return max_side
    return largest_square_side(info, batch, steps, fused, int(HEADROOM * free), max_side)


def describe_seconds(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{math.ceil(seconds)} s"
