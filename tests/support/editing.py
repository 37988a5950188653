"""The DeLeaker settings the tests run the tiny models with (no tests here): the history from
block-step 0 and the edit from block-step 1, smoothing off, so DeLeaker edits something even in
a run of one or two steps. The values are benchmarks/presets.EDITING_SETTINGS, which the
measurement tools run with for the same reason."""

from __future__ import annotations

from deleaker.benchmarks.presets import EDITING_SETTINGS
from deleaker.runtime.config import DeLeakerConfig


def editing_settings(**changes) -> dict:
    """EDITING_SETTINGS with `changes` (e.g. num_steps), as DeLeakerConfig keywords."""
    return {**EDITING_SETTINGS, **changes}


def editing_config(**changes) -> DeLeakerConfig:
    """A DeLeakerConfig of editing_settings(**changes)."""
    return DeLeakerConfig(**editing_settings(**changes))
