"""DeLeaker configuration: every knob of deleaker-semantics.md section 2, with named presets.

Windows are in block-steps (tau = step * blocks_per_step + block_offset). Left as None, the
history stop (a1) and intervention stop (i1) are derived from the step count and the model's
blocks per step the way the authors' FLUX.1-dev defaults were (12 and 20 of 20 steps).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

# FLUX.1 block counts (19 double + 38 single blocks).
FLUX_BLOCKS_PER_STEP = 19 + 38
# The authors tuned the history window on 20 steps: the mask history stops after 12 of them.
_HISTORY_FRACTION = 12 / 20


# The op reads the knobs as float32 and the windows as int64 (op_schema.pack_settings): a value
# past float32 would become inf there, so it is refused here.
FLOAT32_MAX = 3.4028234663852886e38
MAX_WINDOW = 2 ** 31 - 1  # block-steps; far past any run (1000 steps x 57 blocks is 57000)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class ConfigError(ValueError):
    """A DeLeaker setting is invalid; the message says which and why."""


@dataclass(frozen=True)
class DeLeakerConfig:
    std_mul_text: float = 1.0  # beta1: entity-mask threshold mean + beta1 * std
    std_mul_image_image: float = 1.0  # beta2: image-image cut threshold
    k_strength: float = 1.2  # alpha: multiplier on own-entity image->text logits
    start_aggregating_from: int = 12  # a0
    stop_aggregating_at: int | None = None  # a1; None: derived from steps
    start_intervention_from: int = 18  # i0
    stop_intervention_at: int | None = None  # i1 (inclusive); None: derived from steps
    use_history: bool = True
    do_smoothing: bool = True
    do_image_text_weakening: bool = True
    do_image_text_strengthening: bool = True
    do_image_image: bool = True
    do_text_text_weakening: bool = False
    num_steps: int = 20  # the step count the derived windows are for

    def resolved(self, blocks_per_step: int = FLUX_BLOCKS_PER_STEP) -> "ResolvedConfig":
        """Fix the windows for a model with `blocks_per_step` blocks and validate everything."""
        for name in ("num_steps", "start_aggregating_from", "start_intervention_from", "stop_aggregating_at",
                     "stop_intervention_at"):
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
        r = ResolvedConfig(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in
               ("stop_aggregating_at", "stop_intervention_at")},
            stop_aggregating_at=a1,
            stop_intervention_at=i1,
            blocks_per_step=blocks_per_step,
        )
        r.validate()
        return r

    def replace(self, **changes) -> "DeLeakerConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown DeLeaker setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ResolvedConfig:
    """A config with concrete windows for one model; what the op's attributes are made from."""

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

    def validate(self) -> None:
        for name in ("std_mul_text", "std_mul_image_image", "k_strength"):
            v = getattr(self, name)
            if not _is_number(v) or not math.isfinite(v) or abs(v) > FLOAT32_MAX:
                raise ConfigError(f"{name} must be a finite number within float32 range (|x| <= {FLOAT32_MAX:.4g}), "
                                  f"got {v!r}")
        for name in ("use_history", "do_smoothing", "do_image_text_weakening", "do_image_text_strengthening",
                     "do_image_image", "do_text_text_weakening"):
            v = getattr(self, name)
            if not isinstance(v, bool):  # "no" would be truthy and switch the rule on
                raise ConfigError(f"{name} must be True or False, got {v!r}")
        for name in ("start_aggregating_from", "stop_aggregating_at", "start_intervention_from",
                     "stop_intervention_at"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v > MAX_WINDOW:
                raise ConfigError(f"{name} must be an integer <= {MAX_WINDOW}, got {v!r}")
        if self.std_mul_text < 0:
            raise ConfigError(f"std_mul_text (beta1) must be >= 0, got {self.std_mul_text}")
        if self.std_mul_image_image < 0:
            raise ConfigError(f"std_mul_image_image (beta2) must be >= 0, got {self.std_mul_image_image}")
        if self.k_strength <= 0:
            raise ConfigError(f"k_strength (alpha) must be > 0, got {self.k_strength}")
        a0, a1 = self.start_aggregating_from, self.stop_aggregating_at
        i0, i1 = self.start_intervention_from, self.stop_intervention_at
        if a0 < 0 or i0 < 0:
            raise ConfigError(f"window starts must be >= 0 (start_aggregating_from={a0}, "
                              f"start_intervention_from={i0})")
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
        from .op_schema import SETTING_NAMES

        return {name: getattr(self, name) for name in SETTING_NAMES}


PRESETS: dict[str, DeLeakerConfig] = {
    # The authors' defaults, tuned for FLUX.1-dev at 20 steps.
    "flux-dev": DeLeakerConfig(num_steps=20),
    # FLUX.1-schnell runs 4 steps: same thresholds, windows scaled to 4 steps.
    "flux-schnell": DeLeakerConfig(num_steps=4),
    # The embedded tiny model has random weights: its attention maps are not spatially coherent,
    # so the 3x3 opening erases every mask. Same rules, no smoothing, so the demo shows an effect.
    "tiny": DeLeakerConfig(num_steps=20, do_smoothing=False),
    # The toy-world model (export/toyworld, 5 blocks per step, 10 steps at 32x32): chosen by the
    # recorded sweep of docs/toyworld.md (the authors' windows scaled to 5 blocks per step).
    "toyworld": DeLeakerConfig(num_steps=10, start_aggregating_from=1, start_intervention_from=2, k_strength=2.0,
                               do_smoothing=False),
}


def preset(name: str, **overrides) -> DeLeakerConfig:
    """A named preset, optionally with some settings overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown DeLeaker preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    cfg = PRESETS[name]
    return cfg.replace(**overrides) if overrides else cfg
