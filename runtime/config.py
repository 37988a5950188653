"""DeLeaker configuration: every knob of deleaker-semantics.md section 2, with named presets.

Windows are in block-steps (tau = step * blocks_per_step + block_offset). Left as None, the
history stop (a1) and intervention stop (i1) are derived from the step count and the model's
blocks per step the way the authors' FLUX.1-dev defaults were (12 and 20 of 20 steps).
NormalisedWindows holds them as fractions of the run instead; carried_over() moves a config
to a model with other blocks per step through them (the other families' presets).
"""

from __future__ import annotations

import dataclasses
import math

from . import op_schema
from .errors import FieldError

# FLUX.1 block counts (19 double + 38 single blocks).
FLUX_BLOCKS_PER_STEP = 19 + 38
# The authors tuned the history window on 20 steps: the mask history stops after 12 of them.
_HISTORY_FRACTION = 12 / 20


# Limits of the op's settings types (the knobs travel as float32, the windows as int64).
FLOAT32_MAX = op_schema.FLOAT32_MAX
MAX_WINDOW = op_schema.MAX_WINDOW

_INTEGERS = ("num_steps",) + tuple(s.name for s in op_schema.SETTINGS if s.type == "int")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class ConfigError(FieldError):
    """A DeLeaker setting is invalid; the message says which and why."""

    field = "config"


class _DeLeakerConfigMethods:
    def resolved(self, blocks_per_step: int = FLUX_BLOCKS_PER_STEP) -> "ResolvedConfig":
        """Fix the windows for a model with `blocks_per_step` blocks and validate everything."""
        for name in _INTEGERS:
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise ConfigError(f"{name} must be an integer, got {v!r}")
        if blocks_per_step < 1:
            raise ConfigError(f"blocks_per_step must be >= 1, got {blocks_per_step}")
        if self.num_steps < 1:
            raise ConfigError(f"num_steps must be >= 1, got {self.num_steps}")
        # Derived stops never precede their starts: on a short run (or a small model) the history
        # then covers just block a0, and an intervention window past the run's end edits nothing.
        a1 = self.stop_aggregating_at
        if a1 is None:
            a1 = max(round(self.num_steps * _HISTORY_FRACTION) * blocks_per_step, self.start_aggregating_from + 1)
        i1 = self.stop_intervention_at
        if i1 is None:
            i1 = max(self.num_steps * blocks_per_step, self.start_intervention_from)
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values.update(stop_aggregating_at=a1, stop_intervention_at=i1, blocks_per_step=blocks_per_step)
        r = ResolvedConfig(**values)
        r.validate()
        return r

    def replace(self, **changes) -> "DeLeakerConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown DeLeaker setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)


class _ResolvedConfigMethods:
    def validate(self) -> None:
        by_type = {t: [s for s in op_schema.SETTINGS if s.type == t] for t in op_schema.PY_TYPES}
        for s in by_type["float"]:
            v = getattr(self, s.name)
            if not _is_number(v) or not math.isfinite(v) or abs(v) > s.maximum:
                raise ConfigError(f"{s.name} must be a finite number within float32 range (|x| <= {s.maximum:.4g}), "
                                  f"got {v!r}")
        for s in by_type["bool"]:
            v = getattr(self, s.name)
            if not isinstance(v, bool):  # "no" would be truthy and switch the rule on
                raise ConfigError(f"{s.name} must be True or False, got {v!r}")
        for s in by_type["int"]:
            v = getattr(self, s.name)
            if not isinstance(v, int) or isinstance(v, bool) or v > s.maximum:
                raise ConfigError(f"{s.name} must be an integer <= {s.maximum}, got {v!r}")
        for s in by_type["float"]:
            v = getattr(self, s.name)
            if s.minimum is not None and (v <= s.minimum if s.min_exclusive else v < s.minimum):
                raise ConfigError(f"{s.name} ({s.symbol}) must be {'>' if s.min_exclusive else '>='} {s.minimum}, "
                                  f"got {v}")
        starts = [s for s in by_type["int"] if s.minimum is not None]
        if any(getattr(self, s.name) < s.minimum for s in starts):
            floor = min(s.minimum for s in starts)
            raise ConfigError(f"window starts must be >= {floor} ("
                              + ", ".join(f"{s.name}={getattr(self, s.name)}" for s in starts) + ")")
        a0, a1 = self.start_aggregating_from, self.stop_aggregating_at
        i0, i1 = self.start_intervention_from, self.stop_intervention_at
        if a1 <= a0:
            raise ConfigError(f"stop_aggregating_at ({a1}) must be > start_aggregating_from ({a0})")
        if i1 < i0:
            raise ConfigError(f"stop_intervention_at ({i1}) must be >= start_intervention_from ({i0})")
        if i0 < a0:
            # Semantics section 4: blocks before a0 are plain attention, so the intervention
            # cannot start before the history does.
            raise ConfigError(f"start_intervention_from ({i0}) must be >= start_aggregating_from ({a0})")

    def intervenes_within(self, num_steps: int) -> bool:
        """Whether a run of num_steps steps reaches the intervention window at all."""
        return self.start_intervention_from <= num_steps * self.blocks_per_step - 1

    def settings(self) -> dict:
        """The op's per-sample settings {name: value} (names as in op_schema.SETTINGS)."""
        return {name: getattr(self, name) for name in op_schema.SETTING_NAMES}


# Both configs hold one field per op_schema.SETTINGS entry (its name, order, type and default),
# then the fields that are not op settings. Written out so readers and type checkers see them;
# op_schema stays the one source (tests/runtime/test_runtime_package.py fails when these drift from it).
@dataclasses.dataclass(frozen=True)
class DeLeakerConfig(_DeLeakerConfigMethods):
    """Every DeLeaker setting (op_schema.SETTINGS, with its default) and num_steps, the step count
    the derived windows (None: stop_aggregating_at, stop_intervention_at) are for."""

    # knobs (float32 on the op's side)
    std_mul_text: float = 1.0
    std_mul_image_image: float = 1.0
    k_strength: float = 1.2
    # windows in block-steps (None: derived from num_steps and the model's blocks per step)
    start_aggregating_from: int = 12
    stop_aggregating_at: int | None = None
    start_intervention_from: int = 18
    stop_intervention_at: int | None = None
    # rules
    use_history: bool = True
    do_smoothing: bool = True
    do_image_text_weakening: bool = True
    do_image_text_strengthening: bool = True
    do_image_image: bool = True
    do_text_text_weakening: bool = False
    # not an op setting: the step count the derived windows are for
    num_steps: int = 20


@dataclasses.dataclass(frozen=True)
class ResolvedConfig(_ResolvedConfigMethods):
    """A config with concrete windows for one model (every field set); what the op's settings
    tensors are packed from (op_schema.pack_settings)."""

    std_mul_text: float
    std_mul_image_image: float
    k_strength: float
    start_aggregating_from: int
    stop_aggregating_at: int
    start_intervention_from: int
    stop_intervention_at: int
    use_history: bool
    do_smoothing: bool
    do_image_text_weakening: bool
    do_image_text_strengthening: bool
    do_image_image: bool
    do_text_text_weakening: bool
    num_steps: int
    blocks_per_step: int


# ---- windows in normalised time ---------------------------------------------------------------
# The op counts windows in block-steps, which mean different moments on models with different
# blocks per step. Normalised time is the fraction of the run: block-step tau of a run of S steps
# on a model with n blocks per step is at t = tau / (S * n), and t maps back to round(t * S * n).
# The authors' windows were counted in FLUX.1's 57 blocks per step at 20 steps; other families
# get them carried over once, through normalised time, into their own block-steps.
WINDOW_NAMES = tuple(s.name for s in op_schema.settings_of("windows"))


@dataclasses.dataclass(frozen=True)
class NormalisedWindows:
    """The four windows as fractions of the run, in [0, 1] (a0, a1, i0, i1 of docs/semantics.md)."""

    start_aggregating_from: float
    stop_aggregating_at: float
    start_intervention_from: float
    stop_intervention_at: float

    def block_steps(self, num_steps: int, blocks_per_step: int) -> dict[str, int]:
        """{window: block-step} on a run of num_steps steps of a model with blocks_per_step blocks."""
        total = num_steps * blocks_per_step
        for name in WINDOW_NAMES:
            v = getattr(self, name)
            if not _is_number(v) or not 0 <= v <= 1:
                raise ConfigError(f"normalised window {name} must be a fraction of the run in [0, 1], got {v!r}")
        return {name: round(getattr(self, name) * total) for name in WINDOW_NAMES}


def normalised_windows(resolved: "ResolvedConfig") -> NormalisedWindows:
    """A resolved config's windows as fractions of its run (num_steps x blocks_per_step)."""
    total = resolved.num_steps * resolved.blocks_per_step
    return NormalisedWindows(**{name: min(getattr(resolved, name) / total, 1.0) for name in WINDOW_NAMES})


def carried_over(source: DeLeakerConfig, num_steps: int, blocks_per_step: int,
                 source_blocks_per_step: int = FLUX_BLOCKS_PER_STEP) -> DeLeakerConfig:
    """`source` (windows meant for a model with source_blocks_per_step) for a model with
    blocks_per_step at num_steps: same settings, windows at the same fractions of the run
    (a1 and i1 stay derived when `source` leaves them so; they already follow the run)."""
    frac = normalised_windows(source.resolved(source_blocks_per_step))
    moved = frac.block_steps(num_steps, blocks_per_step)
    keep = {n: None for n in ("stop_aggregating_at", "stop_intervention_at") if getattr(source, n) is None}
    return source.replace(num_steps=num_steps, **{**moved, **keep})


DEFAULT_PRESET = "flux-dev"  # settings of a model that names none (no card, no recorded artifact settings)

# Model families other than FLUX.1: (default steps of the family's pipeline, joint-attention blocks
# per step). Their presets are the authors' flux-dev settings carried over in normalised time.
FAMILY_PRESET_RUNS = {
    "sd3.5-large": (28, 38),  # SD3.5 Large: 38 joint blocks
    "sd3.5-medium": (40, 24),  # SD3.5 Medium: 24 joint blocks (its image-only attention is not joint)
    "qwen-image": (50, 60),  # Qwen-Image: 60 double-stream blocks
    "flux2-dev": (50, 8 + 48),  # FLUX.2 [dev]: 8 double + 48 single blocks
}

PRESETS: dict[str, DeLeakerConfig] = {
    # The authors' defaults, tuned for FLUX.1-dev at 20 steps.
    "flux-dev": DeLeakerConfig(num_steps=20),
    # FLUX.1-schnell runs 4 steps: same thresholds, windows scaled to 4 steps.
    "flux-schnell": DeLeakerConfig(num_steps=4),
    # The tests' tiny model has random weights: its attention maps are not spatially coherent,
    # so the 3x3 opening erases every mask. Same rules, no smoothing, so the demo shows an effect.
    "tiny": DeLeakerConfig(num_steps=20, do_smoothing=False),
    # The toy-world model (trained by toyworld/train.py, 5 blocks per step, 10 steps at 32x32): chosen by the
    # recorded sweep of docs/toyworld.md (windows from the first, second and third step; all rules,
    # W + S, W + X or W alone; strengths 1.2 and 2.0; no smoothing on its 8x8 token grid).
    "toyworld": DeLeakerConfig(num_steps=10, start_aggregating_from=5, start_intervention_from=7, k_strength=1.2,
                               do_smoothing=False, do_image_image=False),
}
PRESETS.update({name: carried_over(PRESETS["flux-dev"], steps, bps)
                for name, (steps, bps) in FAMILY_PRESET_RUNS.items()})


def preset(name: str, **overrides) -> DeLeakerConfig:
    """A named preset, optionally with some settings overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown DeLeaker preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    cfg = PRESETS[name]
    return cfg.replace(**overrides) if overrides else cfg
