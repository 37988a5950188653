"""The compiled models' I/O, defined once: the transformer step, both text encoders, the VAE decoder.

Names, dtypes, symbolic shapes and dynamic axes of one denoising step of the DeLeaker
transformer, and of the three other models an artifact holds (MODELS, one ModelIO each); the
exporters (dynamic shapes, input and output names), the manifest, every backend, verify and the
benchmarks read them from here. The DeLeaker op's own settings inputs (windows, knobs,
rules) come from op_schema, so the step and the op cannot drift apart.

    inputs:  hidden_states [B, I, C], encoder_hidden_states [B, T, Dt], pooled_projections [B, Dp],
             timestep [B], img_ids [I, 3], txt_ids [T, 3], guidance [B] (guidance-distilled models),
             entity_tokens [B, E, T], history [B, E, I], step [], grid [2],
             windows [B, 4], knobs [B, 3], rules [B, 6]
    outputs: noise_pred [B, I, C], history_out [B, E, I]
    text_encoder (CLIP):  input_ids [B, L] int64 -> pooled_projections [B, Dp]
    text_encoder_2 (T5):  input_ids [B, T] int64 -> encoder_hidden_states [B, T, Dt]
    vae_decoder:          latents [B, Cl, h, w] (scaled and shifted) -> images [B, 3, H, W] in [-1, 1]
"""

from __future__ import annotations

from dataclasses import dataclass

from . import op_schema

# Defaults every layer shares (docs/architecture.md): entity slots E and text tokens T.
DEFAULT_ENTITY_SLOTS = 4
DEFAULT_TEXT_TOKENS = 512

# Symbolic dimension names; dynamic ones are listed in DYNAMIC_DIMS.
BATCH, IMAGE_TOKENS = "batch", "image_tokens"
DYNAMIC_DIMS = (BATCH, IMAGE_TOKENS)


@dataclass(frozen=True)
class StepTensor:
    name: str
    dtype: str  # numpy dtype name: "float32" or "int64"
    shape: tuple  # ints or symbolic names (BATCH, IMAGE_TOKENS, "C", "T", ...)
    doc: str
    optional: bool = False  # only for some models (guidance: guidance-distilled only)

    def dynamic_axes(self) -> dict[int, str]:
        """{axis: name} of the axes that vary between calls of one engine."""
        return {i: d for i, d in enumerate(self.shape) if d in DYNAMIC_DIMS}


_B, _I = BATCH, IMAGE_TOKENS

INPUTS = (
    StepTensor("hidden_states", "float32", (_B, _I, "C"), "packed latents"),
    StepTensor("encoder_hidden_states", "float32", (_B, "T", "Dt"), "T5 embeddings"),
    StepTensor("pooled_projections", "float32", (_B, "Dp"), "pooled CLIP embedding"),
    StepTensor("timestep", "float32", (_B,), "sigma-scaled timestep / 1000"),
    StepTensor("img_ids", "float32", (_I, 3), "image token positions (RoPE)"),
    StepTensor("txt_ids", "float32", ("T", 3), "text token positions (zeros)"),
    StepTensor("guidance", "float32", (_B,), "guidance scale (guidance-distilled models)", optional=True),
    StepTensor("entity_tokens", "float32", (_B, "E", "T"), "entity slots (all zero: plain attention)"),
    StepTensor("history", "float32", (_B, "E", _I), "DeLeaker mask history"),
    StepTensor("step", "int64", (), "denoising step index"),
    StepTensor("grid", "int64", (2,), "latent token grid (h, w)"),
) + tuple(
    StepTensor(t.name, op_schema._SETTINGS_DTYPES[t.name].__name__, (_B, op_schema.settings_width(t.name)),
               t.doc)
    for t in op_schema.INPUTS if t.name in op_schema.SETTINGS_TENSORS
)

OUTPUTS = (
    StepTensor("noise_pred", "float32", (_B, _I, "C"), "velocity prediction"),
    StepTensor("history_out", "float32", (_B, "E", _I), "updated DeLeaker history"),
)

INPUT_NAMES = tuple(t.name for t in INPUTS)
OUTPUT_NAMES = tuple(t.name for t in OUTPUTS)
# Inputs that stay fixed for a whole generation (set once per session).
STATIC_INPUTS = ("encoder_hidden_states", "pooled_projections", "img_ids", "txt_ids", "guidance", "entity_tokens",
                 "grid") + op_schema.SETTINGS_TENSORS
# Inputs that change every step.
LOOP_INPUTS = ("hidden_states", "timestep", "history", "step")


@dataclass(frozen=True)
class ModelIO:
    """One compiled model of an artifact: its name (the artifact's file stem) and its tensors."""

    name: str
    inputs: tuple[StepTensor, ...]
    outputs: tuple[StepTensor, ...]

    @property
    def input(self) -> str:
        """The name of the only input (encoders, VAE decoder)."""
        (t,) = self.inputs
        return t.name

    @property
    def output(self) -> str:
        """The name of the only output (encoders, VAE decoder)."""
        (t,) = self.outputs
        return t.name


TRANSFORMER = ModelIO("transformer", INPUTS, OUTPUTS)
TEXT_ENCODER = ModelIO(
    "text_encoder",
    (StepTensor("input_ids", "int64", (_B, "L"), "CLIP token ids (L = 77)"),),
    (StepTensor("pooled_projections", "float32", (_B, "Dp"), "pooled CLIP embedding"),),
)
TEXT_ENCODER_2 = ModelIO(
    "text_encoder_2",
    (StepTensor("input_ids", "int64", (_B, "T"), "T5 token ids"),),
    (StepTensor("encoder_hidden_states", "float32", (_B, "T", "Dt"), "T5 embeddings"),),
)
VAE_DECODER = ModelIO(
    "vae_decoder",
    (StepTensor("latents", "float32", (_B, "Cl", "h", "w"), "unpacked latents, scaled and shifted for the VAE"),),
    (StepTensor("images", "float32", (_B, 3, "H", "W"), "decoded images in [-1, 1]"),),
)
MODELS = (TRANSFORMER, TEXT_ENCODER, TEXT_ENCODER_2, VAE_DECODER)
MODEL_NAMES = tuple(m.name for m in MODELS)
# what Backend.encode returns: the two encoders' outputs, which are transformer inputs
ENCODER_OUTPUTS = (TEXT_ENCODER_2.output, TEXT_ENCODER.output)


def inputs_for(guidance_embeds: bool) -> tuple[StepTensor, ...]:
    """The step's inputs for a model with or without guidance embedding."""
    return tuple(t for t in INPUTS if guidance_embeds or t.name != "guidance")


def input_names(guidance_embeds: bool) -> tuple[str, ...]:
    return tuple(t.name for t in inputs_for(guidance_embeds))


def by_name(name: str) -> StepTensor:
    for t in INPUTS + OUTPUTS:
        if t.name == name:
            return t
    raise KeyError(name)
