"""The `torch` backend: a diffusers-format FLUX folder run eagerly with DeLeaker processors.

The development and comparison backend: the reference op (or the fused CUDA op when built)
inside diffusers' own FluxTransformer2DModel, transformers' CLIP/T5 encoders and diffusers'
AutoencoderKL. Weights load from disk only.

Two options make the step faster on a GPU (docs/compiled.md):
  cuda_graphs  capture one step (transformer + Euler update) per (batch, image size) in a CUDA
               graph on first use and replay it every step of every later session of that
               shape (default: on for CUDA with the fused op; the reference op reads the step
               and grid on the host, which a graph cannot capture, so it runs eagerly);
  compile      torch.compile the DeLeaker step (the op stays one opaque call: its fake
               implementation gives the compiler the shapes).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from deleaker.runtime import step_io
from deleaker.runtime.backends.base import Backend, Session, SessionInputs
from deleaker.runtime.backends.options import ATTENTION, COMPILE, CUDA_GRAPHS, DTYPE, BackendOption
from deleaker.runtime.config import DeLeakerConfig
from deleaker.runtime.dtypes import WEIGHT_DTYPES
from deleaker.runtime.model_card import card_config, read_card
from deleaker.runtime.model_info import ModelInfo
from deleaker.runtime.scheduler import euler_update
from deleaker.runtime.step_io import DEFAULT_ENTITY_SLOTS

from .checkpoint import load_checkpoint, resolve_dtype
from .flux import DeLeakerFlux, blocks_per_step
from .libs import quiet_libraries

log = logging.getLogger("deleaker")

_TORCH_DTYPES = {"float32": torch.float32, "int64": torch.long}


# What the fused kernels support (plugins/deleaker_attention/include/deleaker_attention.h).
FUSED_HEAD_DIMS = (64, 128)
FUSED_DTYPES = ("fp16", "bf16")


def _check_fused_op_fits(tcfg, device: str, dtype: str) -> None:
    """Fail at load, in one line, rather than inside the first attention block."""
    if not device.startswith("cuda"):
        raise ValueError("--attention cuda runs on a GPU: add --device cuda")
    if dtype not in FUSED_DTYPES:
        raise ValueError(f"the fused op takes fp16 or bf16 activations; got dtype {dtype} (use --dtype bf16)")
    if tcfg.attention_head_dim not in FUSED_HEAD_DIMS:
        raise ValueError(f"the fused op supports head sizes {FUSED_HEAD_DIMS}; this model's is "
                         f"{tcfg.attention_head_dim} (use --attention reference)")


class CompileError(ValueError):
    """The step cannot be compiled correctly here; the message says why."""


def check_op_layout(device: str = "cpu") -> None:
    """The DeLeaker op's kernel and its fake must agree on the output's memory layout.

    torch.compile and AOTInductor lay out everything after the op from the fake's strides (the
    joint attention passes q as a transposed view); a kernel returning another layout would be
    read as garbage by the compiled code, silently. Checked on the kernel `device` dispatches to.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .reference_op import settings_tensors

    on_gpu = device.startswith("cuda")
    B, H, T, I, D, E = 1, 2, 3, 4, 64 if on_gpu else 8, 2  # a head size the fused kernels take, if loaded
    dtype = torch.bfloat16 if on_gpu else torch.float32
    # [B, H, N, D] as the processor passes it: a transposed view of [B, N, H, D]
    q = torch.randn(B, T + I, H, D, device=device, dtype=dtype).transpose(1, 2)
    ent = torch.zeros(B, E, T, device=device)  # [B, E, T]
    hist = torch.zeros(B, E, I, device=device)  # [B, E, I]
    windows, knobs, rules = settings_tensors([DeLeakerConfig().resolved(1)], device)
    args = (q, q, q, ent, hist, torch.tensor(0, device=device), torch.tensor([2, 2], device=device),
            windows, knobs, rules, 0, 1)
    with torch.no_grad():
        real = torch.ops.deleaker.attention(*args)[0]
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = torch.ops.deleaker.attention(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                  for a in args))[0]
    if tuple(real.stride()) != tuple(fake.stride()):
        raise CompileError(f"torch.ops.deleaker.attention's {device} kernel returns strides {tuple(real.stride())} "
                           f"but its fake implementation says {tuple(fake.stride())}: compiled code would misread the "
                           f"op's output; the kernel must return q's memory layout (as the fused CUDA kernel does)")


def run_transformer(step_fn, feeds: dict, x, timestep, history, step):
    """One call of the DeLeaker step on device tensors (step_io names) -> (noise_pred float32, history_out)."""
    f = {**feeds, "timestep": timestep, "history": history, "step": step}
    noise, history = step_fn(hidden_states=x.to(f["encoder_hidden_states"].dtype),
                             **{n: f.get(n) for n in step_io.INPUT_NAMES if n != "hidden_states"})
    return noise.float(), history  # the Euler state stays in float32 (FlowMatchEuler)


class StepGraph:
    """One denoising step (transformer + Euler update) of one (batch, image size), captured in a
    CUDA graph over static buffers: the step's inputs, the state (x, history), the schedule tables
    (up to `capacity` steps) and a step counter, all on the device. A replay reads step i's
    timestep and dt by indexing the tables with the counter and advances the counter, so no
    value crosses from the host during the loop."""

    WARMUP = 2  # eager runs on a side stream before capture (allocator and library handles settle)

    def __init__(self, step_fn, like: "TorchSession", capacity: int):
        self.step_fn = step_fn
        self.capacity = capacity
        self.feeds = {k: torch.empty_like(v) for k, v in like.feeds.items()}
        self.x = torch.empty_like(like.x)  # [B, I, C] float32
        self.history = torch.empty_like(like.history)  # [B, E, I]
        # timestep [cap, B], dt [cap]: the session's tables, room for `capacity` steps
        self.tables = {k: torch.zeros((capacity, *like.tables[k].shape[1:]), dtype=like.tables[k].dtype,
                                      device=like.x.device) for k in ("timestep", "dt")}
        self.counter = torch.zeros((), dtype=torch.long, device=like.x.device)  # the step index, on the device
        self.graph = None

    def load(self, session: "TorchSession") -> None:
        """Copy a session's inputs, state and schedule into the static buffers (device to device)."""
        for k, v in session.feeds.items():
            self.feeds[k].copy_(v)
        self.x.copy_(session.x)
        self.history.copy_(session.history)
        S = session.num_steps
        for k, table in self.tables.items():
            table[:S].copy_(session.tables[k])
        self.counter.zero_()

    def body(self) -> None:
        i = self.counter.view(1)
        t = self.tables["timestep"].index_select(0, i)[0]  # [B]
        dt = self.tables["dt"].index_select(0, i)  # [1]
        noise, history = run_transformer(self.step_fn, self.feeds, self.x, t, self.history, self.counter)
        self.x.copy_(euler_update(self.x, dt, noise))
        self.history.copy_(history)
        self.counter.add_(1)

    def capture(self, session: "TorchSession") -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                self.body()
        torch.cuda.current_stream().wait_stream(side)
        self.load(session)  # the warm-up advanced the state: start again from the session's
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.body()
        self.graph = graph

    def seek(self, i: int, steps: torch.Tensor) -> None:
        """Set the counter to step i from the session's device-side step indices (no host value)."""
        self.counter.copy_(steps[i])

    def replay(self) -> None:
        self.graph.replay()


# the step inputs the transformer reads in the model's dtype (the rest keep their step_io dtype)
_MODEL_DTYPE_INPUTS = ("img_ids", "txt_ids", "guidance", "timestep")


class TorchSession(Session):
    """One batch on the torch device: every input, the schedule and the state stay there."""

    def __init__(self, backend: "TorchBackend", inputs: SessionInputs):
        self.backend = backend
        self.model = backend.model
        self.step_fn = backend.step_fn
        self.grid_hw = tuple(int(v) for v in inputs.static["grid"])  # (h, w) on the host: the graph cache key
        with torch.no_grad():
            super().__init__(inputs, backend.info.entity_slots)
            self.graph = backend.step_graph(self) if backend.cuda_graphs else None  # None: eager steps

    def encode(self, clip_ids, t5_ids):
        be = self.backend
        embeds, pooled = be.encode_on_device(be._t(clip_ids, torch.long), be._t(t5_ids, torch.long))
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}  # [B, T, Dt], [B, Dp]

    def put(self, name, value):
        dtype = self.backend.dtype if name in _MODEL_DTYPE_INPUTS else _TORCH_DTYPES[step_io.by_name(name).dtype]
        return self.backend._t(value, dtype)

    def put_table(self, name, table):
        return self.put(name, table) if name != "dt" else self.backend._t(table, torch.float32)

    def transformer(self, x, timestep, history, step):
        return run_transformer(self.step_fn, self.feeds, x, timestep, history, step)

    @torch.no_grad()
    def advance(self, i: int):
        if self.graph is None:
            return super().advance(i)
        if i != self.done:
            self.graph.seek(i, self.tables["step"])
        self.graph.replay()
        return self.graph.x, self.graph.history

    def fetch(self, value):
        return value.float().cpu().numpy()


def graphs_wanted(requested: bool | None, device: torch.device, op: str) -> bool:
    """Whether the backend captures CUDA graphs: `requested` (None: the default) where capture is
    possible, with one log line saying why not where it was asked for and is not."""
    if requested not in (None, True, False):
        raise ValueError(f"cuda_graphs must be True, False or None (default), got {requested!r}")
    if requested is False:
        return False
    if device.type != "cuda":
        why = f"the device is {device.type}, not CUDA"
    elif op != "cuda":
        why = (f"the {op} op reads the step and grid on the host, which a graph cannot capture "
               f"(the fused op, op='cuda', reads them on the device)")
    else:
        return True
    if requested:
        log.warning("CUDA graphs off: %s; the step runs eagerly", why)
    return False


class TorchBackend(Backend):
    name = "torch"
    devices = ("cpu", "cuda")
    options = (BackendOption(ATTENTION, "op"), BackendOption(DTYPE, "dtype"),
               BackendOption(CUDA_GRAPHS, "cuda_graphs", {"auto": None, "on": True, "off": False}),
               BackendOption(COMPILE, "compile"))
    fused_attention = False  # set at load: True for the fused op (op "cuda")
    torch_tensors = True
    attention_impls = ("sdpa", "reference", "cuda")  # stock attention, the reference op, the fused op

    def __init__(self, ckpt, device: str = "cpu", op: str = "reference", entity_slots: int = DEFAULT_ENTITY_SLOTS,
                 max_text_tokens: int | None = None, cuda_graphs: bool | None = None, compile: bool = False):
        self.device = torch.device(device)
        self.ckpt = ckpt
        self.dtype = ckpt.dtype
        self.text_encoder = ckpt.text_encoder.to(self.device).eval()
        self.text_encoder_2 = ckpt.text_encoder_2.to(self.device).eval()
        self.vae = ckpt.vae.to(self.device).eval()
        self.model = DeLeakerFlux(ckpt.transformer.to(self.device).eval(), op_name=op)
        if compile not in (True, False):
            raise ValueError(f"compile must be True or False, got {compile!r}")
        if compile:
            check_op_layout(str(self.device))  # before any compiled step can misread the op
        # the step as called by sessions: the module, or torch.compile of it (compiled on first call per shape)
        self.step_fn = torch.compile(self.model) if compile else self.model
        self.compiled = compile
        self.cuda_graphs = graphs_wanted(cuda_graphs, self.device, op)
        self._graphs: dict[tuple, StepGraph | None] = {}  # (batch, grid h, grid w) -> captured step (None: failed)
        log.info("torch backend: %s on %s, op %s%s%s", ckpt.path, self.device, op, ", compiled" if compile else "",
                 ", CUDA graphs" if self.cuda_graphs else "")
        tcfg = ckpt.transformer.config
        card = read_card(ckpt.path)  # None for a plain FLUX folder
        self.info = ModelInfo(
            name=str(ckpt.path), in_channels=tcfg.in_channels, latent_channels=ckpt.vae.config.latent_channels,
            vae_scale_factor=2 ** (len(ckpt.vae.config.block_out_channels) - 1),
            vae_scaling_factor=float(ckpt.vae.config.scaling_factor),
            vae_shift_factor=float(ckpt.vae.config.shift_factor or 0.0),
            max_text_tokens=max_text_tokens or ckpt.max_sequence_length, clip_max_length=ckpt.clip_max_length,
            entity_slots=entity_slots, guidance_embeds=bool(tcfg.guidance_embeds),
            blocks_per_step=blocks_per_step(ckpt.transformer), scheduler_config=dict(ckpt.scheduler_config),
            tokenizer_dir=str(ckpt.tokenizer_dir), tokenizer_2_dir=str(ckpt.tokenizer_2_dir),
            attention_heads=int(tcfg.num_attention_heads), attention_head_dim=int(tcfg.attention_head_dim),
            vae_base_channels=int(ckpt.vae.config.block_out_channels[0]),
            card=card, default_config=card_config(card))
        self.fused_attention = op == "cuda"  # the fused kernels hold no [T+I, T+I] map (runtime/footprint.py)

    @classmethod
    def load(cls, source: str | None = None, *, device: str = "cpu", dtype: str = "fp32", op: str = "reference",
             progress: bool = True, **kw) -> "TorchBackend":
        from deleaker.runtime.pipeline import check_device

        check_device(device)  # before anything loads; torch.device("tpu") raises a RuntimeError traceback
        if source is None:
            from deleaker.runtime.embedded import default_model_dir

            source = str(default_model_dir())
            log.info("using the embedded toy-world model at %s (it knows only its world's words; docs/toyworld.md)",
                     source)
        quiet_libraries()
        if dtype not in WEIGHT_DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(WEIGHT_DTYPES)}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but torch sees no CUDA GPU")
        ckpt = load_checkpoint(source, dtype=resolve_dtype(dtype))
        if op == "cuda":
            _check_fused_op_fits(ckpt.transformer.config, device, dtype)
        return cls(ckpt, device=device, op=op, **kw)

    def _t(self, x: np.ndarray, dtype=None) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device, dtype or self.dtype)

    def encode_on_device(self, clip_ids: torch.Tensor, t5_ids: torch.Tensor):
        """Token ids on the device -> (prompt_embeds [B, T, Dt], pooled [B, Dp]) on the device, model dtype."""
        pooled = self.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        embeds = self.text_encoder_2(t5_ids, output_hidden_states=False)[0]
        return embeds.to(self.dtype), pooled.to(self.dtype)

    @torch.no_grad()
    def encode_prompt(self, clip_ids, t5_ids):
        embeds, pooled = self.encode_on_device(self._t(clip_ids, torch.long), self._t(t5_ids, torch.long))
        return embeds.float().cpu().numpy(), pooled.float().cpu().numpy()

    def start_session(self, inputs: SessionInputs) -> TorchSession:
        return TorchSession(self, inputs)

    @torch.no_grad()
    def step_graph(self, session: TorchSession) -> StepGraph | None:
        """The captured step for this session's (batch, size), loaded with its inputs; captured on
        first use and reused by every later session of that shape. None: eager (capture failed)."""
        B, (h, w) = session.x.shape[0], session.grid_hw
        key = (B, h, w)
        S = session.num_steps
        graph = self._graphs.get(key, False)
        if graph is None:
            return None
        if graph is False or graph.capacity < S:
            graph = StepGraph(self.step_fn, session, capacity=max(S, 64))
            graph.load(session)
            try:
                graph.capture(session)
            except RuntimeError as e:  # e.g. an op that synchronises with the host
                log.warning("CUDA graph capture failed for batch %d, %dx%d tokens (%s); this shape runs eagerly",
                            B, h, w, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
                self._graphs[key] = None
                return None
            self._graphs[key] = graph
            log.info("captured a CUDA graph of the step for batch %d, %dx%d image tokens (up to %d steps)", B, h, w,
                     graph.capacity)
            return graph  # capture left the buffers loaded with this session
        graph.load(session)
        return graph

    @torch.no_grad()
    def decode(self, vae_latents):
        return self.vae.decode(self._t(vae_latents), return_dict=False)[0].float().cpu().numpy()
