"""The DeLeaker settings for the toy-world model (chosen by evaluate.py's recorded sweep).

The model has 2 double + 3 single blocks = 5 blocks per step and is sampled with STEPS steps;
windows are in block-steps (tau = step * 5 + block).
"""

from __future__ import annotations

from deleaker.runtime.config import DeLeakerConfig

BLOCKS_PER_STEP = 5
STEPS = 10
SIZE = 32  # pixels (16x16 image tokens)

TOYWORLD_PRESET = DeLeakerConfig(num_steps=STEPS, start_aggregating_from=0, start_intervention_from=3)
