"""Flow-match Euler scheduler with FLUX's resolution-dependent shift (numpy only).

Reproduces what diffusers' FluxPipeline does with FlowMatchEulerDiscreteScheduler (diffusers
0.42), bit for bit in float32:

    sigmas    = linspace(1.0, 1/S, S) (float64) -> float32      (FluxPipeline's default)
    mu        = calculate_shift(image_seq_len, ...)              (python floats)
    sigmas    = exp(mu) / (exp(mu) + (1/sigmas - 1) ** 1.0)      (use_dynamic_shifting, float32)
              | shift * sigmas / (1 + (shift - 1) * sigmas)      (static shift, e.g. schnell)
    timesteps = sigmas * num_train_timesteps                     (float32, S values)
    sigmas    = [sigmas..., 0.0]                                 (S + 1 values)
    step i:     x_next = x + (sigmas[i+1] - sigmas[i]) * v       (float32 state: euler_update)

The transformer is fed `timesteps[i] / 1000` (FluxPipeline divides by 1000; see model_timesteps).
The expressions below are written exactly like diffusers' so numpy rounds the same way.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

_CLASS_NAME = "FlowMatchEulerDiscreteScheduler"

# scheduler/scheduler_config.json of FLUX.1-dev (FLUX.1-schnell: shift 1.0, no dynamic shifting).
FLUX_DEV_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": _CLASS_NAME,
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

# diffusers options this scheduler does not implement, with the value that means "off".
# FLUX checkpoints leave all of them off; a checkpoint that turns one on gets a clear error
# instead of a silently different schedule.
_UNSUPPORTED_OFF = {
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "stochastic_sampling": False,
    "use_flow_sigmas": False,
}


_KIND_WORDS = {"bool": "true or false", "int": "an integer", "float": "a finite number", "str": "a string"}


class SchedulerError(ValueError):
    """The scheduler config or a call is invalid; the message says which and why."""


@dataclass(frozen=True)
class FlowMatchEulerConfig:
    """The diffusers FlowMatchEulerDiscreteScheduler knobs FLUX uses (defaults = diffusers')."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"  # or "linear"

    def validate(self) -> None:
        # a config file may hold anything: a string shift would fail deep inside the schedule
        for f in dataclasses.fields(self):
            v, kind = getattr(self, f.name), f.type
            if kind == "bool":
                ok = isinstance(v, bool)
            elif kind == "int":
                ok = isinstance(v, int) and not isinstance(v, bool)
            elif kind == "float":
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            else:
                ok = isinstance(v, str)
            if not ok:
                raise SchedulerError(f"scheduler option {f.name} must be {_KIND_WORDS[kind]}, got {v!r}")
        if self.num_train_timesteps < 1:
            raise SchedulerError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        if self.time_shift_type not in ("exponential", "linear"):
            raise SchedulerError(f"time_shift_type must be 'exponential' or 'linear', got {self.time_shift_type!r}")
        if self.use_dynamic_shifting and self.max_image_seq_len == self.base_image_seq_len:
            raise SchedulerError("max_image_seq_len must differ from base_image_seq_len for dynamic shifting")

    def to_dict(self) -> dict[str, Any]:
        return {"_class_name": _CLASS_NAME, **dataclasses.asdict(self)}


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu for the dynamic shift: linear in the image token count (FluxPipeline.calculate_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    mu = image_seq_len * m + b
    return mu


def euler_update(x, dt, v):
    """The denoising loop's Euler step, x_next = x + dt * v with dt = sigmas[i+1] - sigmas[i].

    Written once for every backend: x and v are float32 arrays on the backend's device (numpy
    arrays or torch tensors alike) and dt a float32 scalar (or a [1] tensor). In float32 this is
    FlowMatchEulerDiscreteScheduler.step bit for bit (tests/runtime/test_scheduler.py).
    """
    return x + dt * v


def step_tables(model_timesteps: np.ndarray, sigmas: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """Every per-step value of one loop, moved to the device once and indexed by the step there:

        timestep [S, B] float32  the transformer's timestep input (timesteps / 1000, per sample)
        step     [S]    int64    the step index the DeLeaker op reads
        dt       [S]    float32  sigmas[i+1] - sigmas[i], the Euler update's step
    """
    ts = np.asarray(model_timesteps, np.float32)
    sig = np.asarray(sigmas, np.float32)
    return {"timestep": np.repeat(ts[:, None], batch_size, axis=1), "step": np.arange(ts.shape[0], dtype=np.int64),
            "dt": sig[1:] - sig[:-1]}


@dataclass(frozen=True)
class Schedule:
    """One denoising schedule: a value, so one scheduler serves any number of concurrent loops."""

    sigmas: np.ndarray  # [S+1] float32, ending in 0
    timesteps: np.ndarray  # [S] float32 in [0, num_train_timesteps]

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def model_timesteps(self) -> np.ndarray:
        """The transformer's timestep input for every step: timesteps / 1000, [S] float32."""
        return self.timesteps / np.float32(1000)

    def tables(self, batch_size: int) -> dict[str, np.ndarray]:
        """step_tables of this schedule for a batch of `batch_size`."""
        return step_tables(self.model_timesteps(), self.sigmas, batch_size)


class FlowMatchEuler:
    """Flow-match Euler sampler; `schedule()` makes a schedule (a value), which a loop runs:

        sched = FlowMatchEuler.from_config(json.load(open("scheduler_config.json")))
        t = sched.schedule(num_steps, image_seq_len).tables(batch_size)
        for i in range(num_steps):
            v = model(x, t["timestep"][i], ...)
            x = euler_update(x, t["dt"][i], v)

    (the backends' sessions run this loop on their device: runtime/backends/base.py).

    The scheduler keeps no per-run state: one instance serves concurrent callers.
    """

    def __init__(self, config: FlowMatchEulerConfig | None = None):
        self.config = config or FlowMatchEulerConfig()
        self.config.validate()
    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "FlowMatchEuler":
        """From a diffusers scheduler_config.json dict. Keys starting with '_' and keys this
        class does not know are ignored (as diffusers does); options it cannot honour raise."""
        cls_name = config.get("_class_name", _CLASS_NAME)
        if cls_name != _CLASS_NAME:
            raise SchedulerError(f"scheduler config is for {cls_name}, expected {_CLASS_NAME}")
        for key, off in _UNSUPPORTED_OFF.items():
            if config.get(key, off) != off:
                raise SchedulerError(f"scheduler option {key}={config[key]!r} is not supported (FLUX leaves it off)")
        names = {f.name for f in dataclasses.fields(FlowMatchEulerConfig)}
        kwargs = {k: v for k, v in config.items() if k in names}
        # diffusers allows base_shift/max_shift None (only read with dynamic shifting).
        for key in ("base_shift", "max_shift"):
            if kwargs.get(key, 0.0) is None:
                kwargs.pop(key)
        return cls(FlowMatchEulerConfig(**kwargs))

    @classmethod
    def flux_dev(cls) -> "FlowMatchEuler":
        return cls.from_config(FLUX_DEV_SCHEDULER_CONFIG)

    def mu(self, image_seq_len: int) -> float:
        c = self.config
        return calculate_shift(image_seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)

    def timesteps(self, num_steps: int, image_seq_len: int,
                  sigmas: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Schedule for `num_steps` steps on `image_seq_len` image tokens ((H/16)*(W/16)).

        Returns (sigmas [S+1] float32 ending in 0, timesteps [S] float32 in [0, 1000]).
        `sigmas` overrides FluxPipeline's default linspace(1, 1/S, S) before shifting, as the
        pipeline's `sigmas=` argument does.
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
            raise SchedulerError(f"num_steps must be a positive integer, got {num_steps!r}")
        if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, (int, np.integer)) or image_seq_len < 1:
            raise SchedulerError(f"image_seq_len must be a positive integer, got {image_seq_len!r}")
        c = self.config
        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        elif len(sigmas) != num_steps:
            raise SchedulerError(f"got {len(sigmas)} sigmas for {num_steps} steps")
        # Same expressions, same order, same dtypes as FlowMatchEulerDiscreteScheduler.set_timesteps.
        s = np.array(sigmas).astype(np.float32)
        if c.use_dynamic_shifting:
            mu = self.mu(int(image_seq_len))
            if c.time_shift_type == "exponential":
                s = math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)
            else:
                s = mu / (mu + (1 / s - 1) ** 1.0)
        else:
            s = c.shift * s / (1 + (c.shift - 1) * s)
        s = np.asarray(s, dtype=np.float32)
        timesteps = s * np.float32(c.num_train_timesteps)  # [S]
        full = np.concatenate([s, np.zeros(1, np.float32)])  # [S+1]
        return full, timesteps

    def schedule(self, num_steps: int, image_seq_len: int, sigmas: Sequence[float] | None = None) -> Schedule:
        """timesteps() as a Schedule value."""
        full, timesteps = self.timesteps(num_steps, image_seq_len, sigmas)
        return Schedule(sigmas=full, timesteps=timesteps)
