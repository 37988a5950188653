"""The small interface every backend implements, so the denoising loop is written once.

A backend is a loaded model (text encoders, the DeLeaker transformer step, the VAE decoder). For
each batch of requests the pipeline starts a session: the backend moves the batch's inputs to
its device once (token ids, noise, entity slots, per-sample settings, the whole schedule), then
every `step(i)` runs the transformer and the Euler update there, without crossing to the host.
The host sees only the final latents and history (`result()`), and the decoded images.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..model_info import ModelInfo
from ..scheduler import euler_update, step_tables
from .options import BackendOption


@dataclass(frozen=True)
class SessionInputs:
    """One batch, everything a session needs, as host arrays (moved to the device once).

    static: the step's inputs that stay fixed for the whole loop (step_io.STATIC_INPUTS, guidance
    only for guidance-distilled models); clip_ids [B, 77] and t5_ids [B, T] int64 are encoded by
    the session on its device.
    """

    clip_ids: np.ndarray  # [B, 77] int64
    t5_ids: np.ndarray  # [B, T] int64
    static: dict  # name -> array (entity_tokens, grid, img_ids, txt_ids, guidance, windows, knobs, rules)
    latents: np.ndarray  # [B, I, C] float32 initial noise
    history: np.ndarray  # [B, E, I] float32 (zeros)
    timesteps: np.ndarray  # [S] float32: the transformer's timestep input per step (t / 1000)
    sigmas: np.ndarray  # [S+1] float32 (the Euler step i goes from sigmas[i] to sigmas[i+1])

    @property
    def batch_size(self) -> int:
        return int(self.latents.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


class Session(abc.ABC):
    """The device-resident state of one batch's denoising loop; the loop itself is written here once.

    At the start the session encodes the prompts and moves everything to the device: the static
    inputs (`feeds`), the latents `x` and `history`, and the whole schedule as per-step tables
    (scheduler.step_tables: timestep [S, B], step [S], dt [S]). `step(i)` runs the transformer
    on device buffers and the Euler update (scheduler.euler_update) there. A backend supplies
    only its buffers and its transformer call: `encode`, `put`, `transformer` and `fetch` (or,
    where the step is one fused device program, `advance`).
    """

    error: type[Exception] = ValueError  # the backend's one-line error

    def __init__(self, inputs: SessionInputs, entity_slots: int):
        E = entity_slots
        if inputs.history.ndim != 3 or inputs.history.shape[1] != E:
            raise self.error(f"history must be [B, {E}, I] for this model ({E} entity slots); "
                             f"got {inputs.history.shape}")
        self.num_steps = inputs.num_steps
        # encoder_hidden_states [B, T, Dt], pooled_projections [B, Dp], then entity_tokens, grid, ids, settings
        self.feeds = self.encode(inputs.clip_ids, inputs.t5_ids)
        self.feeds.update({n: self.put(n, v) for n, v in inputs.static.items()})
        tables = step_tables(inputs.timesteps, inputs.sigmas, inputs.batch_size)
        self.tables = {n: self.put_table(n, v) for n, v in tables.items()}
        self.x = self.put("hidden_states", inputs.latents)  # [B, I, C] float32: the Euler state
        self.history = self.put("history", inputs.history)  # [B, E, I]
        self.done = 0  # steps run

    def step(self, i: int) -> None:
        """Run step i: transformer (history threaded through) and the Euler update, on the device."""
        if not 0 <= i < self.num_steps:
            raise IndexError(f"step {i} out of range for a {self.num_steps}-step session")
        self.x, self.history = self.advance(i)
        self.done = i + 1

    def advance(self, i: int):
        """Step i from the current state: (latents, history) after it, on the device."""
        noise, history = self.transformer(self.x, self.tables["timestep"][i], self.history, self.tables["step"][i])
        return euler_update(self.x, self.tables["dt"][i], noise), history

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(latents [B, I, C], history [B, E, I]) float32 on the host, after the last step."""
        return self.fetch(self.x), self.fetch(self.history)

    # -- what a backend supplies -----------------------------------------------------------------

    @abc.abstractmethod
    def encode(self, clip_ids: np.ndarray, t5_ids: np.ndarray) -> dict:
        """Host token ids -> {"encoder_hidden_states", "pooled_projections"} on the device."""

    @abc.abstractmethod
    def put(self, name: str, value: np.ndarray):
        """A host array for the step input `name` (step_io) -> its device buffer."""

    def put_table(self, name: str, table: np.ndarray):
        """A per-step table (step_tables) -> a device buffer whose [i] is step i's value."""
        return self.put(name, table)

    def transformer(self, x, timestep, history, step):
        """One transformer call on device buffers -> (noise_pred float32, history_out)."""
        raise NotImplementedError(f"{type(self).__name__} runs its step in advance()")

    @abc.abstractmethod
    def fetch(self, value) -> np.ndarray:
        """A device buffer -> a float32 host array."""


class Backend(abc.ABC):
    """A loaded model: text encoders, one DeLeaker transformer step, VAE decoder.

    Sessions of one backend share its buffers, so the pipeline runs one session at a time per
    backend (it holds `lock` around a session); every other method is safe to call anytime.

    What a backend is, every backend class declares as data (the runtime, the commands and the
    benchmarks ask these, never a backend's name; tests/runtime/test_backend_contract.py checks each
    registered class declares them itself): `devices`, `options`, `fused_attention`,
    `torch_tensors` and `attention_impls` below. A loaded one also says where it runs (`device`)
    and, where it chose one at load, its weights' dtype (`dtype`).
    """

    name: ClassVar[str] = "?"  # its entry-point name (pyproject.toml, deleaker.backends)
    devices: ClassVar[tuple[str, ...]] = ()  # the device kinds it runs on (options.DEVICE_KINDS)
    options: ClassVar[tuple[BackendOption, ...]] = ()  # the command-line options its load() takes
    # the attention holds no [T+I, T+I] map (fused kernels): the memory estimate, runtime/footprint.py;
    # a backend whose op is chosen at load sets it on the instance
    fused_attention: bool = False
    # its device buffers are torch tensors: torch's CUDA timers and memory counters see its work
    torch_tensors: ClassVar[bool] = False
    # attention implementations a benchmark may switch the loaded model between (() : fixed at load)
    attention_impls: ClassVar[tuple[str, ...]] = ()
    device: object = "cpu"  # where the loaded model runs: "cpu", "cuda[:N]", or a torch.device
    dtype: object = ""  # the weights' dtype where the backend chose it at load ("": as exported)
    info: ModelInfo

    @property
    def lock(self) -> threading.Lock:
        lock = self.__dict__.get("_session_lock")
        if lock is None:
            lock = self.__dict__.setdefault("_session_lock", threading.Lock())
        return lock

    @abc.abstractmethod
    def encode_prompt(self, clip_ids: np.ndarray, t5_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """clip_ids [B, 77], t5_ids [B, T] int64 -> (prompt_embeds [B, T, Dt], pooled [B, Dp]) float32."""

    @abc.abstractmethod
    def start_session(self, inputs: SessionInputs) -> Session:
        """Move one batch to the device and return its session."""

    @abc.abstractmethod
    def decode(self, vae_latents: np.ndarray) -> np.ndarray:
        """vae_latents [B, 16, H/8, W/8] (already scaled and shifted) -> images [B, 3, H, W] in [-1, 1]."""
