"""Transformers and step inputs for timing: random FLUX-sized models, attention switching,
synthetic entity slots, mask coverage.

One DeLeakerFlux module serves every torch variant of a case: its processors are switched
between stock diffusers attention ("sdpa", the vanilla baseline), the reference op and the
fused CUDA op, so all variants run the same weights with the same inputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deleaker.modeling.flux import DeLeakerFlux, install_deleaker
from deleaker.runtime import latents as lat
from deleaker.runtime import op_schema, step_io
from deleaker.runtime.config import ResolvedConfig

from .errors import BenchError  # noqa: F401 - re-exported (M.BenchError)


# diffusers' FluxTransformer2DModel defaults are FLUX.1's sizes (19 + 38 blocks, 24 heads x 128,
# joint_attention_dim 4096, pooled 768); FLUX.1-dev adds guidance embeds, schnell has none.
RANDOM_MODELS = {
    "flux-dev": {"guidance_embeds": True},
    "flux-schnell": {"guidance_embeds": False},
}
RANDOM_PREFIX = "random:"

# impl -> what runs in every joint attention
IMPLS = ("sdpa", "reference", "cuda", "inactive")
IMPL_LABELS = {"sdpa": "vanilla", "reference": "deleaker-reference", "cuda": "deleaker-cuda",
               "inactive": "inactive-reference"}


# ---------------------------------------------------------------------------------------------
# Models


def random_flux_transformer(name: str = "flux-dev", device="cpu", dtype=torch.bfloat16, seed: int = 0,
                            **overrides):
    """A FLUX-sized FluxTransformer2DModel with random weights, built directly in `dtype` on
    `device` (no checkpoint, no fp32 copy: 12B parameters fit an 80 GB GPU only that way).
    `overrides` change the config (tests use a few blocks)."""
    from diffusers import FluxTransformer2DModel

    if name not in RANDOM_MODELS:
        raise BenchError(f"unknown random model {name!r}; choose from {', '.join(RANDOM_MODELS)}")
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in dtype (nn.Linear follows the default)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**{**RANDOM_MODELS[name], **overrides})
    finally:
        torch.set_default_dtype(prev)
    if any(p.dtype != dtype for p in model.parameters()):  # a diffusers version that fixes some dtypes
        model = model.to(dtype)
    return model.eval()


def random_model_bytes(name: str = "flux-dev", dtype=torch.bfloat16, **overrides) -> int:
    """Weight bytes of random_flux_transformer(name, dtype=dtype) (counted on the meta device)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**{**RANDOM_MODELS[name], **overrides})
    return sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()


def _check_fits(nbytes: int, device: torch.device, what: str) -> None:
    """A clear error instead of an out-of-memory crash half-way through building `what`."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            with open("/proc/meminfo") as f:
                free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration):
            return
    if nbytes > 0.9 * free:
        raise BenchError(f"{what} needs {nbytes / 2**30:.1f} GiB for its weights; {device} has "
                         f"{free / 2**30:.1f} GiB free")


def random_model_name(source: str) -> str:
    """`random:<name>` -> name (a known one)."""
    name = source[len(RANDOM_PREFIX):]
    if name not in RANDOM_MODELS:
        raise BenchError(f"unknown random model {source!r}; choose from "
                         f"{', '.join(RANDOM_PREFIX + n for n in RANDOM_MODELS)}")
    return name


def transformer_folder(source: str) -> Path:
    """The transformer folder of a diffusers-format FLUX folder (or the transformer folder itself)."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise BenchError(f"model folder not found: {source}")
    if (folder / "transformer" / "config.json").is_file():
        return folder / "transformer"
    if (folder / "config.json").is_file():
        return folder
    raise BenchError(f"{source} is not a diffusers FLUX folder (no transformer/config.json)")


def load_flux_transformer(source: str, device="cpu", dtype=torch.float32):
    """The transformer of a diffusers-format FLUX folder, or `random:<name>`."""
    if source.startswith(RANDOM_PREFIX):
        name = random_model_name(source)
        _check_fits(random_model_bytes(name, dtype), torch.device(device), source)
        return random_flux_transformer(name, device=device, dtype=dtype)
    from diffusers import FluxTransformer2DModel

    sub = transformer_folder(source)
    return FluxTransformer2DModel.from_pretrained(sub, torch_dtype=dtype, low_cpu_mem_usage=False).to(device).eval()


def torch_source(model: str | None) -> str:
    """The model folder the torch backend loads: `model`, or (None) the tiny offline model. The
    measurement tools default to the tiny model, whose 64-1024 px range and random weights make a
    smoke test of every mode; the product's default (the toy-world model) draws only 32x32."""
    if model is not None:
        return model
    from deleaker.modeling.tiny_model import ensure_tiny_model

    return str(ensure_tiny_model())


def weights_are_random(source: str | None) -> bool | None:
    """True for random:<name> and the tiny offline model; False for other model folders; from
    manifest.json for an artifact where it says; None when unknown."""
    if source is None:
        return True  # the measurement tools' default is the tiny offline model (torch_source)
    if source.startswith(RANDOM_PREFIX):
        return True
    folder = Path(source).expanduser()
    from deleaker.modeling.tiny_model import STAMP_FILE

    if (folder / STAMP_FILE).is_file():
        return True
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError):
            return None
        for d in (data, data.get("model") if isinstance(data.get("model"), dict) else {}):
            if isinstance(d.get("random_weights"), bool):
                return d["random_weights"]
            src = d.get("source_model") or d.get("source")
            if isinstance(src, str) and (Path(src) / STAMP_FILE).is_file():
                return True
        return None
    if (folder / "model_index.json").is_file() or (folder / "transformer").is_dir():
        return False
    return None


# ---------------------------------------------------------------------------------------------
# Attention switching


class StockAttnProcessor:
    """diffusers' FluxAttnProcessor that accepts (and ignores) DeLeakerFlux's per-call inputs,
    so the vanilla baseline runs through the same DeLeakerFlux.forward; history passes through."""

    def __init__(self):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        self.inner = FluxAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, deleaker=None):
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


def check_impl_available(impl: str, device: torch.device) -> str | None:
    """None when `impl` can run on `device`, else the reason it cannot (for a skip note)."""
    if impl not in IMPLS:
        raise BenchError(f"unknown attention impl {impl!r}; choose from {', '.join(IMPLS)}")
    if impl != "cuda":
        return None
    if device.type != "cuda":
        return "the fused DeLeaker op (impl cuda) needs a CUDA device"
    try:
        from deleaker.modeling import cuda_op

        cuda_op.load()  # finds and loads the built library (import alone does not)
    except Exception as e:  # noqa: BLE001 - any failure to load the library is a skip, with its message
        return f"fused DeLeaker op not available: {type(e).__name__}: {e}".strip()
    return None


def set_attention(model: DeLeakerFlux, impl: str) -> None:
    """Put `impl` on every joint attention of `model` (in place; the weights are untouched)."""
    blocks = list(model.transformer.transformer_blocks) + list(model.transformer.single_transformer_blocks)
    if impl == "sdpa":
        for block in blocks:
            block.attn.set_processor(StockAttnProcessor())
    else:
        op = "reference" if impl == "inactive" else impl
        install_deleaker(model.transformer, op)


def attention_impl(model: DeLeakerFlux) -> str:
    """What the first joint attention of `model` runs now: "sdpa" or the DeLeaker op's name."""
    proc = model.transformer.transformer_blocks[0].attn.processor
    return "sdpa" if isinstance(proc, StockAttnProcessor) else getattr(proc, "op_name", type(proc).__name__)


# ---------------------------------------------------------------------------------------------
# Inputs


def synthetic_entity_tokens(batch: int, slots: int, text_tokens: int, entities: int) -> np.ndarray:
    """[B, E, T] float32: active slot e covers tokens 3+5e and 4+5e (3..4, 8..9, 13..14, ...),
    two tokens per entity like a typical T5 word; slots >= entities stay inactive (all zero)."""
    if entities > slots:
        raise BenchError(f"{entities} entities do not fit {slots} entity slots")
    if entities and 5 * entities > text_tokens:
        raise BenchError(f"{entities} synthetic entities need >= {5 * entities} text tokens, got {text_tokens}")
    ent = np.zeros((batch, slots, text_tokens), np.float32)
    for e in range(entities):
        ent[:, e, 3 + 5 * e: 5 + 5 * e] = 1
    return ent


def busiest_step(cfg: ResolvedConfig) -> int:
    """The first step at which the most blocks both update the history and intervene (the
    heaviest DeLeaker step; e.g. step 1 with flux-dev on FLUX.1: all 57 blocks), else the
    first step with the most intervening blocks."""
    bps = cfg.blocks_per_step

    def score(s):
        taus = range(s * bps, (s + 1) * bps)
        both = sum(cfg.start_intervention_from <= t <= cfg.stop_intervention_at and
                   cfg.start_aggregating_from <= t < cfg.stop_aggregating_at for t in taus)
        intervening = sum(cfg.start_intervention_from <= t <= cfg.stop_intervention_at for t in taus)
        return both, intervening

    return max(range(cfg.num_steps), key=lambda s: (score(s), -s))


def step_arrays(*, batch: int, height: int, width: int, text_tokens: int, in_channels: int, text_dim: int,
                pooled_dim: int, guidance: bool, entities: int, slots: int, step: int, config: ResolvedConfig,
                seed: int = 0, vae_scale_factor: int = lat.VAE_SCALE_FACTOR) -> dict[str, np.ndarray]:
    """Synthetic inputs of one compiled transformer step (runtime/step_io.py), numpy.

    Random latents and text embeddings (seeded), a mid-schedule timestep, synthetic entity
    slots, a zero history (the state at the start of the history window) and `config` as every
    sample's DeLeaker settings."""
    geo = lat.geometry(height, width, vae_scale_factor)
    rng = np.random.default_rng(seed)
    x = {
        "hidden_states": rng.standard_normal((batch, geo.image_seq_len, in_channels), np.float32),  # [B, I, C]
        "encoder_hidden_states": rng.standard_normal((batch, text_tokens, text_dim), np.float32),  # [B, T, Dt]
        "pooled_projections": rng.standard_normal((batch, pooled_dim), np.float32),  # [B, Dp]
        "timestep": np.full((batch,), 0.5, np.float32),  # FluxPipeline passes t/1000
        "img_ids": lat.image_ids(geo.grid),  # [I, 3]
        "txt_ids": lat.text_ids(text_tokens),  # [T, 3]
        "entity_tokens": synthetic_entity_tokens(batch, slots, text_tokens, entities),  # [B, E, T]
        "history": np.zeros((batch, slots, geo.image_seq_len), np.float32),  # [B, E, I]
        "step": np.asarray(step, np.int64),
        "grid": np.asarray(geo.grid, np.int64),  # [2]
        **op_schema.pack_settings([config] * batch),  # windows [B, 4], knobs [B, 3], rules [B, 6]
    }
    if guidance:
        x["guidance"] = np.full((batch,), 3.5, np.float32)
    return x


# Step inputs that keep float32 whatever the model's dtype (DeLeaker's own state and settings).
FLOAT32_INPUTS = ("entity_tokens", "history", "knobs")


def torch_step_args(arrays: dict[str, np.ndarray], device, dtype) -> tuple:
    """Positional arguments of DeLeakerFlux.forward (step_io.INPUTS order) from step_arrays, on `device`."""
    def t(spec):
        if spec.name not in arrays:
            return None  # guidance of a model without guidance embedding
        dt = torch.long if spec.dtype == "int64" else torch.float32 if spec.name in FLOAT32_INPUTS else dtype
        return torch.from_numpy(np.ascontiguousarray(arrays[spec.name])).to(device, dt)

    return tuple(t(spec) for spec in step_io.INPUTS)


def mask_coverage(history: np.ndarray, entities: int, beta1: float, grid: tuple[int, int] | None = None,
                  smoothing: bool = False) -> list[float] | None:
    """Fraction of image tokens in each active entity's mask as the op forms it from a history
    [B, E, I] (semantics 4.1: threshold mean + beta1 * unbiased std, then the 3x3 open/close on the
    h x w `grid` when `smoothing`; mean over the batch). None when the history is all zero (no
    DeLeaker work reached it). With smoothing on random weights this is often 0: the masks the op
    would edit are empty."""
    from deleaker.modeling.reference_op import entity_masks, smooth_masks

    h = np.asarray(history, np.float32)[:, :entities]
    if entities == 0 or not np.any(h):
        return None
    masks = entity_masks(torch.from_numpy(h), beta1)  # [B, E, I] bool
    if smoothing:
        if grid is None:
            raise BenchError("mask_coverage with smoothing needs the latent grid (h, w)")
        masks = torch.stack([smooth_masks(m, *grid) for m in masks])
    return [round(float(v), 4) for v in masks.float().mean(-1).mean(0)]


# ---------------------------------------------------------------------------------------------
# Planted entity structure (random weights)


@dataclass(frozen=True)
class Plant:
    """Spatially coherent entity attention for random weights. With random weights the entity
    maps are spatial noise and the 3x3 opening erases every mask, so a DeLeaker step would edit
    nothing. Planted: entity e's direction u_e (a head dim that RoPE leaves unrotated) is set
    to a fixed value in the queries of one rectangular block of image tokens (`coverage` of the
    image each) and in the keys of e's text tokens, after the q/k norms, in every
    joint attention, so those queries attend to the entity (logit gain `boost`) and the masks
    the op forms, after smoothing, are those blocks. The hooks sit on the attention's q/k norms,
    which the stock processor and the DeLeaker processors all call: every variant, vanilla
    included, runs the same planted model."""

    coverage: float = 0.14  # share of the image tokens in each entity's block (two entities: ~28%)
    boost: float = 8.0  # logit gain between a planted query and key (e^8: ~3000x the weight)

    def validate(self, entities: int) -> None:
        if not 0 < self.coverage <= 0.25:
            raise BenchError(f"planted coverage must be in (0, 0.25] (one block per grid quadrant), "
                             f"got {self.coverage}")
        if self.boost <= 0:
            raise BenchError(f"planted boost must be > 0, got {self.boost}")
        if entities > 4:
            raise BenchError(f"planting places up to 4 entities (one per quadrant), got {entities}")


def plant_for(spec) -> Plant | None:
    """The Plant of a BenchSpec (plant_coverage None: no planting)."""
    if spec.plant_coverage is None:
        return None
    return Plant(coverage=spec.plant_coverage,
                 **({} if spec.plant_boost is None else {"boost": spec.plant_boost}))


def plant_regions(grid: tuple[int, int], entities: int, coverage: float) -> torch.Tensor:
    """[E, I] bool: entity e's block, a rectangle of sides sqrt(coverage) x the grid's in quadrant
    e (top-left, bottom-right, top-right, bottom-left), one token off the grid's centre lines.
    Every block keeps 3 tokens from the grid's edge: the closing's border rule (an erosion never
    eats from the edge) would otherwise grow it, and the masks would not be the blocks."""
    h, w = (int(x) for x in grid)
    bh, bw = max(3, round(h * coverage ** 0.5)), max(3, round(w * coverage ** 0.5))  # >= 3: survives the opening
    ys = (h // 2 - 1 - bh, h // 2 + 1)  # upper and lower quadrant
    xs = (w // 2 - 1 - bw, w // 2 + 1)
    if min(ys[0], xs[0]) < 3 or ys[1] + bh > h - 3 or xs[1] + bw > w - 3:
        raise BenchError(f"the {h}x{w} latent grid is too small for planted blocks of {coverage:.0%} "
                         f"(each needs 3 tokens of margin; use a larger image or a smaller coverage)")
    out = torch.zeros(entities, h, w, dtype=torch.bool)
    for e, (qy, qx) in enumerate([(0, 0), (1, 1), (0, 1), (1, 0)][:entities]):
        out[e, ys[qy]:ys[qy] + bh, xs[qx]:xs[qx] + bw] = True
    return out.reshape(entities, h * w)


class PlantedHooks:
    """Forward hooks that plant `Plant` on every joint attention of a FluxTransformer2DModel
    (see Plant). Use as a context manager or call remove()."""

    def __init__(self, transformer, plant: Plant, entity_tokens: torch.Tensor, grid: tuple[int, int], entities: int):
        plant.validate(entities)
        blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
        attn0 = blocks[0].attn
        free_dims = int(transformer.config.axes_dims_rope[0])  # RoPE axis 0: id 0 for every token, never rotated
        if entities > free_dims:
            raise BenchError(f"planting {entities} entities needs as many unrotated head dims; this model has "
                             f"{free_dims}")
        device = next(transformer.parameters()).device
        T = entity_tokens.shape[-1]
        amp = (plant.boost * attn0.head_dim ** 0.5) ** 0.5  # q.k / sqrt(d) gains boost
        regions = plant_regions(grid, entities, plant.coverage)  # [E, I]
        img_rows, img_dims, tok_rows, tok_dims = [], [], [], []
        for e in range(entities):  # u_e: unit vector on head dim e (inside the unrotated axis-0 dims)
            r = regions[e].nonzero().flatten()
            img_rows.append(r)
            img_dims.append(torch.full_like(r, e))
            t = (entity_tokens[0, e] > 0).nonzero().flatten().cpu()
            tok_rows.append(t)
            tok_dims.append(torch.full_like(t, e))
        ir, idim = torch.cat(img_rows).to(device), torch.cat(img_dims).to(device)
        tr, tdim = torch.cat(tok_rows).to(device), torch.cat(tok_dims).to(device)
        self.regions = regions
        self.handles = []

        def adder(rows, dims, offset):
            def hook(module, args, out):  # out [B, S, H, D]
                # set (not add) the u_e component: the token's own random component would make
                # the gain vary from row to row and leave holes in the block's mask
                out[:, rows + offset, :, dims] = amp
                return out
            return hook

        for block in blocks:
            attn = block.attn
            if attn.added_kv_proj_dim is not None:  # double block: image stream and text stream apart
                self.handles.append(attn.norm_q.register_forward_hook(adder(ir, idim, 0)))
                self.handles.append(attn.norm_added_k.register_forward_hook(adder(tr, tdim, 0)))
            else:  # single block: [text ; image] in one stream
                self.handles.append(attn.norm_q.register_forward_hook(adder(ir, idim, T)))
                self.handles.append(attn.norm_k.register_forward_hook(adder(tr, tdim, 0)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


# ---------------------------------------------------------------------------------------------
# Edit counters (read after timing, in one extra forward)


def _summarize_counters(per_call: list[list[dict]]) -> dict:
    """One step's counters from per block-call, per sample dicts (op_bench counters)."""
    edited = [c for call in per_call for c in call if c["edited"]]
    rows: dict[int, list[int]] = {}
    for c in edited:
        for s, n in c["mask_rows"].items():
            rows.setdefault(int(s), []).append(n)
    fallback = [c["fallback_rows"] for c in edited if "fallback_rows" in c]
    return {
        "blocks": len(per_call),
        "edited_blocks": sum(any(c["edited"] for c in call) for call in per_call),
        "mask_rows": {str(s): [min(v), max(v)] for s, v in sorted(rows.items())},  # [min, max] per slot
        "masked_rows": [min(c["masked_rows"] for c in edited), max(c["masked_rows"] for c in edited)] if edited else None,
        "cut_pairs": sum(c["cut_pairs"] for c in edited),
        "fallback_rows": sum(fallback) if fallback else None,
        "last_block": per_call[-1] if per_call else None,
    }


def step_edit_counters(model: DeLeakerFlux, impl: str, args: tuple) -> dict:
    """Run one more forward of `model` with `impl` ("reference" or "cuda") and collect, for every
    joint attention call, the op's edit counters (op_bench: rows per entity mask after smoothing,
    masked rows, rule-X cut pairs; for the fused op also its fallback rows, through its debug
    path). Meant for after the timing: it reruns each block's op with its intermediates."""
    from . import op_bench as ob

    if impl not in ("reference", "cuda"):
        raise BenchError(f"edit counters come from the DeLeaker impls reference and cuda, not {impl!r}")
    set_attention(model, impl)
    blocks = list(model.transformer.transformer_blocks) + list(model.transformer.single_transformer_blocks)
    per_call: list[list[dict]] = []

    def counting(op):
        def run(*args):  # the op's inputs, then the attribute dict (op_schema.split_call)
            if impl == "cuda":
                per_call.append(ob.op_counters(*args))
            else:
                inputs, _ = op_schema.split_call(args)
                _, _, recs = ob.reference_run(*args)
                per_call.append(ob.reference_counters(op_schema.named_inputs(inputs)["entity_tokens"], recs))
            return op(*args)
        return run

    procs = [b.attn.processor for b in blocks]
    originals = [p.op for p in procs]
    try:
        for p in procs:
            p.op = counting(p.op)
        with torch.inference_mode():
            model(*args)
    finally:
        for p, op in zip(procs, originals):
            p.op = op
    out = _summarize_counters(per_call)
    out["source"] = "fused op debug path" if impl == "cuda" else "reference"
    return out
