"""The DeLeaker settings for the toy-world model (chosen by evaluate.py's recorded sweep).

The model has 2 double + 3 single blocks = 5 blocks per step and is sampled with STEPS steps;
windows are in block-steps (tau = step * 5 + block).
"""

from __future__ import annotations

from deleaker.runtime.config import PRESETS

BLOCKS_PER_STEP = 5
STEPS = 10
SIZE = 32  # pixels (8x8 image tokens through the factor-2 VAE)

# DeLeaker's three rules by the letters the sweep and the tables name them with
RULES = {"W": "do_image_text_weakening",  # cut image -> the other entity's words
         "S": "do_image_text_strengthening",  # strengthen image -> own words
         "X": "do_image_image"}  # cut image <-> image across entities

PRESET_NAME = "toyworld"
TOYWORLD_PRESET = PRESETS[PRESET_NAME]  # defined once, with the other presets
assert TOYWORLD_PRESET.num_steps == STEPS

# The demo's prompt (fixed before any result was seen; its values differ on every attribute).
DEMO_ENTITIES = ("red striped circle", "blue dotted square")
DEMO_PROMPT = "a red striped circle and a blue dotted square"
