"""ONNX export: the DeLeaker FLUX transformer step, the CLIP and T5 text encoders, the VAE decoder.

The transformer is traced with torch.onnx.export (dynamo) around `DeLeakerFlux`, with every
joint attention the custom op torch.ops.deleaker.attention. A custom translation turns each
such call into ONE node `deleaker::DeLeakerAttention` (op contract v2: the per-sample settings
windows/knobs/rules are inputs, only block_offset/blocks_per_step/layout are attributes, plus
plugin_namespace/plugin_version for TensorRT); the exporter would inline a local function, so
the FunctionProto with the op's standard-ONNX body (export/onnx_op.py) is attached to the model
afterwards. ONNX Runtime then runs the model with no plugin; TensorRT binds the plugin.

The step's inputs, outputs and dynamic axes are runtime/step_io.py's. No DeLeaker setting is
baked into the graph: one artifact serves every step count and every setting (they are the
step's windows/knobs/rules inputs, one row per sample).

Every exported graph takes and returns float32/int64 tensors whatever the weights' dtype (the
casts are inside the graph), so the runtime never converts dtypes. Batch and image size are
dynamic; the text length T and the entity slots E are fixed at export.

`export_artifact` writes a whole artifact directory (see export/manifest.py for its manifest);
`deleaker-export onnx` (export/cli.py) is its command line.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from deleaker.runtime import op_schema, step_io
from deleaker.runtime.config import DeLeakerConfig
from deleaker.runtime.dtypes import WEIGHT_DTYPES

from . import onnx_op, onnx_portable
from .manifest import DEFAULT_MAX_SIZE, DEFAULT_MIN_SIZE
from .artifact_writer import export_models, write_tokenizers_and_manifest
from .out_folder import check_out, publish, temp_folder
from .progress import stage
from deleaker.modeling import reference_op  # noqa: F401  (registers torch.ops.deleaker.attention)
from deleaker.modeling.checkpoint import resolve_dtype

log = logging.getLogger("deleaker")

# torch 2.13's exporter emits opset 20; the op's function body is built for the same opset.
OPSET = 20
# protobuf's hard limit is 2 GiB; above this many weight bytes a model goes to external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

# Bounds of the exported dynamic dimensions (torch.export needs finite ones; ONNX Runtime does not care).
_DIM_MAX = {step_io.BATCH: 1024, step_io.IMAGE_TOKENS: 1 << 20}


class ExportError(ValueError):
    """An export request cannot be carried out; the message says why and what to change."""


@dataclass(frozen=True)
class ExportSpec:
    """What to export: sizes (pixels), text length, entity slots, dtypes, default DeLeaker settings."""

    height: int = 1024  # the example (and TensorRT "opt") image size
    width: int = 1024
    # image side range the artifact accepts (pixels); None: DEFAULT_MIN_SIZE / DEFAULT_MAX_SIZE,
    # widened to include height/width
    min_size: int | None = None
    max_size: int | None = None
    max_batch: int = 4  # upper end of the manifest's batch profile (TensorRT); ONNX Runtime takes any batch
    max_text_tokens: int = 512  # T5 sequence length T (fixed)
    entity_slots: int = 4  # E (fixed)
    dtype: str = "fp32"  # transformer weights
    encoder_dtype: str = "fp32"  # CLIP, T5, VAE weights (T5 overflows in fp16)
    external_data: bool | None = None  # weights in a .data file beside each .onnx; None: above ~2 GB only
    # transformer.onnx with every DeLeakerAttention node inlined into standard ops (export/onnx_portable.py)
    portable: bool = False
    # the artifact's DEFAULT settings (manifest), for requests that bring none; nothing is baked in
    deleaker: DeLeakerConfig = field(default_factory=DeLeakerConfig)

    def validate(self, multiple: int = 16) -> None:
        for name in ("dtype", "encoder_dtype"):
            if getattr(self, name) not in WEIGHT_DTYPES:
                raise ExportError(f"{name} must be one of {', '.join(WEIGHT_DTYPES)}, got {getattr(self, name)!r}")
        for name in ("height", "width", "min_size", "max_size"):
            v = getattr(self, name)
            if v is not None and (v <= 0 or v % multiple):
                raise ExportError(f"{name.replace('_', '-')} must be a positive multiple of {multiple}, got {v}")
        lo, hi = self.size_range
        if lo > hi:
            raise ExportError(f"--min-size {lo} is larger than --max-size {hi}")
        for side in (self.height, self.width):
            if not lo <= side <= hi:
                raise ExportError(f"the example size {self.height}x{self.width} must lie in the size range "
                                  f"[{lo}, {hi}]")
        if self.entity_slots < 1:
            raise ExportError(f"--entity-slots must be >= 1, got {self.entity_slots}")
        if self.max_text_tokens < 1:
            raise ExportError(f"--max-text-tokens must be >= 1, got {self.max_text_tokens}")
        if self.max_batch < 1:
            raise ExportError(f"max batch must be >= 1, got {self.max_batch}")

    @property
    def size_range(self) -> tuple[int, int]:
        lo = self.min_size if self.min_size is not None else min(DEFAULT_MIN_SIZE, self.height, self.width)
        hi = self.max_size if self.max_size is not None else max(DEFAULT_MAX_SIZE, self.height, self.width)
        return lo, hi


# --------------------------------------------------------------------------------------------
# The op: one custom-domain node per call
# --------------------------------------------------------------------------------------------

def _onnx_op_schema():
    """An onnx OpSchema for the node (not registered globally): the exporter's onnxscript tracer
    needs one to tell inputs from attributes."""
    from onnx.defs import OpSchema

    types = {"float": "T", "float32": "tensor(float)", "int64": "tensor(int64)"}
    param = OpSchema.FormalParameter
    A = OpSchema.AttrType
    attrs = [OpSchema.Attribute(a.name, A.INT, a.doc) for a in op_schema.ATTRIBUTES]
    attrs += [OpSchema.Attribute(n, A.STRING, "TensorRT plugin binding", required=False)
              for n in onnx_op.PLUGIN_ATTRIBUTES]
    return OpSchema(op_schema.OP_NAME, op_schema.ONNX_DOMAIN, op_schema.ONNX_OPSET_VERSION,
                    "DeLeaker attention (deleaker-semantics.md)",
                    inputs=[param(t.name, types[t.dtype], t.doc) for t in op_schema.INPUTS],
                    outputs=[param(t.name, types[t.dtype], t.doc) for t in op_schema.OUTPUTS],
                    type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "q/k/v/out")],
                    attributes=attrs)


def translation_table() -> dict:
    """custom_translation_table for torch.onnx.export: torch.ops.deleaker.attention -> one node."""
    from onnxscript.values import Op, Opset

    node_op = Op(Opset(op_schema.ONNX_DOMAIN, op_schema.ONNX_OPSET_VERSION), op_schema.OP_NAME, _onnx_op_schema())

    n_inputs = len(op_schema.INPUTS)

    def deleaker_attention(*args):
        # torch.ops.deleaker.attention(q, k, v, ent, hist, step, grid, windows, knobs, rules,
        #                              block_offset, blocks_per_step, layout): tensors first, then attributes
        # attributes at their default (layout text_image) may be left out of the traced call
        inputs, attrs = args[:n_inputs], args[n_inputs:]
        if len(attrs) > len(op_schema.ATTRIBUTE_NAMES):
            raise TypeError(f"{op_schema.OP_NAME}: {len(attrs)} attributes, the op has "
                            f"{len(op_schema.ATTRIBUTE_NAMES)}")
        given = dict(zip(op_schema.ATTRIBUTE_NAMES, attrs))
        values = dict(zip(op_schema.ATTRIBUTE_NAMES, op_schema.attribute_values(given)))
        return node_op(*inputs, **values, plugin_namespace=op_schema.PLUGIN_NAMESPACE,
                       plugin_version=op_schema.PLUGIN_VERSION)

    return {torch.ops.deleaker.attention.default: deleaker_attention}


def _attach_op_function(program, num_slots: int) -> None:
    """Add the DeLeakerAttention FunctionProto to an exported program (in its IR, before saving)."""
    import onnx_ir as ir

    opset = program.model.opset_imports.get("", OPSET)
    fn = ir.serde.deserialize_function(onnx_op.make_function(num_slots, opset))
    program.model.functions[fn.identifier()] = fn
    program.model.opset_imports[op_schema.ONNX_DOMAIN] = op_schema.ONNX_OPSET_VERSION


# --------------------------------------------------------------------------------------------
# Wrappers with float32 I/O
# --------------------------------------------------------------------------------------------

class TransformerStep(nn.Module):
    """DeLeakerFlux with float32 I/O (weights may be fp16/bf16; casts are in the graph).

    forward takes step_io.INPUTS by name (guidance only for guidance-distilled models) and
    returns step_io.OUTPUTS: (noise_pred [B, I, C], history_out [B, E, I])."""

    def __init__(self, flux: nn.Module, dtype: torch.dtype, guidance: bool):
        super().__init__()
        self.flux = flux
        self.dtype = dtype
        self.guidance = guidance

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                entity_tokens, history, step, grid, windows, knobs, rules, guidance=None):
        d = self.dtype
        noise, hist = self.flux(hidden_states.to(d), encoder_hidden_states.to(d), pooled_projections.to(d),
                                timestep.to(d), img_ids, txt_ids, guidance.to(d) if self.guidance else None,
                                entity_tokens, history, step, grid, windows, knobs, rules)
        return noise.float(), hist


class ClipPooled(nn.Module):
    """CLIP text encoder -> pooled embedding [B, Dp] (what FLUX uses of CLIP)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.enc = text_encoder

    def forward(self, input_ids):
        return self.enc(input_ids, output_hidden_states=False).pooler_output.float()


class T5Embeds(nn.Module):
    """T5 encoder -> last hidden state [B, T, Dt]."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.enc = text_encoder

    def forward(self, input_ids):
        return self.enc(input_ids, output_hidden_states=False)[0].float()


class VaeDecode(nn.Module):
    """VAE decoder: already scaled/shifted latents [B, 16, H/8, W/8] -> image [B, 3, H, W] in ~[-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.dtype = next(vae.parameters()).dtype

    def forward(self, latents):
        return self.vae.decode(latents.to(self.dtype), return_dict=False)[0].float()


# --------------------------------------------------------------------------------------------
# Export of one model
# --------------------------------------------------------------------------------------------

@dataclass
class Exported:
    """One exported ONNX file and what the manifest says about it."""

    file: str  # relative to the artifact directory
    inputs: dict  # name -> {"dtype": ..., "shape": [int | str]}
    outputs: dict
    external_data: str | None
    seconds: float
    extra: dict = field(default_factory=dict)


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + \
        sum(b.numel() * b.element_size() for b in module.buffers())


_IR_DTYPES = {"FLOAT": "float32", "FLOAT16": "float16", "BFLOAT16": "bfloat16", "INT64": "int64",
              "INT32": "int32", "BOOL": "bool"}


def _io_spec(values) -> dict:
    """{name: {"dtype": numpy-style name, "shape": [int or symbolic name]}} of graph inputs/outputs."""
    out = {}
    for v in values:
        shape = [d if isinstance(d, int) else str(d) for d in v.shape] if v.shape is not None else None
        dtype = _IR_DTYPES.get(v.dtype.name, v.dtype.name.lower()) if v.dtype is not None else None
        out[v.name] = {"dtype": dtype, "shape": shape}
    return out


def _to(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """module in dtype (no-op, and no diffusers warning, when it already is)."""
    p = next(module.parameters(), None)
    return module if p is None or p.dtype == dtype else module.to(dtype)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs its progress at WARNING level through `torch.onnx`; keep it out of the way."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def _export(module: nn.Module, kwargs: dict, dynamic_shapes: dict, output_names: list[str], path: Path,
            external_data: bool | None, translation: dict | None = None, after=None) -> Exported:
    t0 = time.perf_counter()
    external = _param_bytes(module) > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
    with torch.no_grad(), _quiet_exporter(), warnings.catch_warnings():
        # harmless exporter chatter: dim names deduplicated, pytree deprecation, diffusers' casts
        warnings.filterwarnings("ignore", message=r".*axis name.*will not be used")
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        with stage(f"exporting {path.name} (torch.onnx.export)"):
            program = torch.onnx.export(module, (), kwargs=kwargs, dynamic_shapes=dynamic_shapes, dynamo=True,
                                        output_names=output_names, custom_translation_table=translation,
                                        optimize=True, verbose=False)
    if after is not None:
        after(program)
    graph = program.model.graph
    for node in graph.all_nodes():
        # the exporter's per-node Python stack trace names this machine's files: without it the
        # same checkpoint and library versions give the same bytes wherever the export runs
        node.metadata_props.pop(STACK_TRACE_KEY, None)
    inputs, outputs = _io_spec(graph.inputs), _io_spec(graph.outputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with stage(f"saving {path.name}"):
        program.save(path, external_data=external)
    data = path.name + ".data"
    seconds = time.perf_counter() - t0
    del program
    log.info("exported %s in %.1fs%s", path.name, seconds, " (external data)" if external else "")
    return Exported(file=path.name, inputs=inputs, outputs=outputs,
                    external_data=data if external and (path.parent / data).exists() else None, seconds=seconds)


def transformer_example(transformer, spec: ExportSpec, batch: int = 2, configs=None) -> dict:
    """Example inputs of the step at spec's size, in step_io.INPUTS order (guidance only for
    guidance-distilled models). batch 2 by default: a dynamic dim must not trace as 1.
    configs: one DeLeakerConfig/ResolvedConfig per sample (default: spec.deleaker for all)."""
    from deleaker.modeling.flux import blocks_per_step

    cfg = transformer.config
    h, w = spec.height // 16, spec.width // 16
    I, T, E = h * w, spec.max_text_tokens, spec.entity_slots
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    ent = torch.zeros(batch, E, T)
    ent[:, 0, 1] = 1  # two active slots, so the example traces the op like a real call
    if E > 1:
        ent[:, 1, 3:5] = 1
    configs = list(configs) if configs is not None else [spec.deleaker] * batch
    if len(configs) != batch:
        raise ValueError(f"transformer_example: {len(configs)} configs for a batch of {batch}")
    resolved = [c.resolved(blocks_per_step(transformer)) if isinstance(c, DeLeakerConfig) else c for c in configs]
    windows, knobs, rules = reference_op.settings_tensors(resolved)  # [B, 4], [B, 3], [B, 6]
    values = dict(
        hidden_states=torch.randn(batch, I, cfg.in_channels),  # [B, I, C]
        encoder_hidden_states=torch.randn(batch, T, cfg.joint_attention_dim),  # [B, T, Dt]
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim),  # [B, Dp]
        timestep=torch.full((batch,), 0.5),
        img_ids=img_ids.reshape(I, 3),
        txt_ids=torch.zeros(T, 3),
        guidance=torch.full((batch,), 3.5),
        entity_tokens=ent,  # [B, E, T]
        history=torch.zeros(batch, E, I),  # [B, E, I]
        step=torch.tensor(0, dtype=torch.int64),
        grid=torch.tensor([h, w], dtype=torch.int64),
        windows=windows, knobs=knobs, rules=rules,
    )
    names = step_io.input_names(bool(cfg.guidance_embeds))
    return {name: values[name] for name in names}


def step_dynamic_shapes(guidance: bool) -> dict:
    """torch.export dynamic_shapes of the step, from step_io (one Dim object per symbolic name)."""
    dims = {name: torch.export.Dim(name, min=1, max=_DIM_MAX[name]) for name in step_io.DYNAMIC_DIMS}
    out = {}
    for t in step_io.inputs_for(guidance):
        axes = t.dynamic_axes()
        out[t.name] = {axis: dims[name] for axis, name in axes.items()} or None
    return out


def export_transformer(transformer, path: Path, spec: ExportSpec) -> Exported:
    """The DeLeaker step (runtime/step_io.py I/O) with every joint attention one DeLeakerAttention node.

    `transformer` is a diffusers FluxTransformer2DModel; DeLeaker processors are installed on it.
    No DeLeaker setting is baked in: they are the step's windows/knobs/rules inputs.
    """
    from deleaker.modeling.flux import DeLeakerFlux

    spec.validate()
    dtype = resolve_dtype(spec.dtype)
    guidance = bool(transformer.config.guidance_embeds)
    flux = DeLeakerFlux(_to(transformer, dtype).eval())
    step = TransformerStep(flux, dtype, guidance).eval()
    kwargs = transformer_example(transformer, spec)
    dyn = step_dynamic_shapes(guidance)
    bps = flux.blocks_per_step

    def finish(program):
        # every joint attention must have become one op node (none left as plain attention), fed
        # by the graph's own settings inputs
        graph = program.model.graph
        nodes = [node for node in graph if (node.domain, node.op_type) == (op_schema.ONNX_DOMAIN, op_schema.OP_NAME)]
        if len(nodes) != bps:
            raise ExportError(f"the exported graph has {len(nodes)} {op_schema.OP_NAME} nodes for {bps} blocks; "
                              f"the DeLeaker processor did not reach every attention")
        graph_inputs = {v.name: v for v in graph.inputs}
        for node in nodes:
            settings = [v.name if v is not None else None for v in node.inputs][-len(op_schema.SETTINGS_TENSORS):]
            if tuple(settings) != op_schema.SETTINGS_TENSORS or any(n not in graph_inputs for n in settings):
                raise ExportError(f"{op_schema.OP_NAME} node {node.name} takes {settings} as its settings, not "
                                  f"the graph inputs {list(op_schema.SETTINGS_TENSORS)}")
        _attach_op_function(program, spec.entity_slots)

    ex = _export(step, kwargs, dyn, list(step_io.OUTPUT_NAMES), path, spec.external_data, translation_table(),
                 after=finish)
    if spec.portable:
        form = onnx_portable.make_portable(path, spec.entity_slots)
    else:
        import onnx

        form = onnx_portable.manifest_entries(onnx.load(str(path), load_external_data=False).graph,
                                              onnx_portable.FUNCTION)
    ex.extra = {"blocks_per_step": bps, **form}
    return ex


def export_clip(text_encoder, path: Path, spec: ExportSpec, max_length: int = 77) -> Exported:
    enc = ClipPooled(_to(text_encoder, resolve_dtype(spec.encoder_dtype))).eval()
    ids = torch.zeros(2, max_length, dtype=torch.int64)
    ids[:, -1] = text_encoder.config.eos_token_id
    io = step_io.TEXT_ENCODER
    return _export(enc, {io.input: ids}, {io.input: {0: torch.export.Dim("batch", min=1, max=1024)}},
                   [io.output], path, spec.external_data)


def export_t5(text_encoder, path: Path, spec: ExportSpec) -> Exported:
    enc = T5Embeds(_to(text_encoder, resolve_dtype(spec.encoder_dtype))).eval()
    ids = torch.ones(2, spec.max_text_tokens, dtype=torch.int64)
    io = step_io.TEXT_ENCODER_2
    return _export(enc, {io.input: ids}, {io.input: {0: torch.export.Dim("batch", min=1, max=1024)}},
                   [io.output], path, spec.external_data)


def export_vae_decoder(vae, path: Path, spec: ExportSpec) -> Exported:
    dec = VaeDecode(_to(vae, resolve_dtype(spec.encoder_dtype))).eval()
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    z = torch.randn(2, vae.config.latent_channels, spec.height // f, spec.width // f)
    dim_h = torch.export.Dim("latent_height", min=2, max=4096)
    dim_w = torch.export.Dim("latent_width", min=2, max=4096)
    io = step_io.VAE_DECODER
    return _export(dec, {io.input: z}, {io.input: {0: torch.export.Dim("batch", min=1, max=1024), 2: dim_h, 3: dim_w}},
                   [io.output], path, spec.external_data)


# --------------------------------------------------------------------------------------------
# The artifact directory
# --------------------------------------------------------------------------------------------

def export_artifact(model_dir: str | Path, out_dir: str | Path, spec: ExportSpec | None = None,
                    force: bool = False, source: str | None = None) -> Path:
    """Export a diffusers-format FLUX folder into an artifact directory (manifest.json + ONNX + tokenizers).
    source: how the manifest names the checkpoint (default: its absolute path).

    Components are loaded and exported one at a time, so peak memory is about one component's
    weights plus the exporter's working set.
    """
    from deleaker.modeling.checkpoint import open_checkpoint

    ckpt = open_checkpoint(model_dir)
    spec = spec or ExportSpec()
    if spec.max_text_tokens > ckpt.max_sequence_length:
        raise ExportError(f"--max-text-tokens {spec.max_text_tokens} exceeds what {ckpt.root.name}'s T5 tokenizer "
                          f"allows ({ckpt.max_sequence_length})")
    spec.validate(multiple=ckpt.vae_scale_factor * 2)
    spec.deleaker.resolved(ckpt.blocks_per_step)  # a bad DeLeaker setting fails before any work
    out = check_out(out_dir, {"--model": ckpt.root}, force)
    tmp = temp_folder(out)
    t0 = time.perf_counter()
    try:
        tdtype = resolve_dtype(spec.dtype)
        edtype = resolve_dtype(spec.encoder_dtype)
        steps = {
            "transformer": (lambda: ckpt.load_transformer(tdtype), lambda m, p: export_transformer(m, p, spec)),
            "text_encoder": (lambda: ckpt.load_text_encoder(edtype),
                             lambda m, p: export_clip(m, p, spec, ckpt.clip_max_length)),
            "text_encoder_2": (lambda: ckpt.load_text_encoder_2(edtype), lambda m, p: export_t5(m, p, spec)),
            "vae_decoder": (lambda: ckpt.load_vae(edtype), lambda m, p: export_vae_decoder(m, p, spec)),
        }
        exported = export_models(steps, tmp, ".onnx")
        write_tokenizers_and_manifest(tmp, ckpt, spec, exported, OPSET, source=source)
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("artifact written to %s in %.1fs", out, time.perf_counter() - t0)
    return out
