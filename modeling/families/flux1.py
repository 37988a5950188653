"""FLUX.1 (FluxTransformer2DModel): 19 double + 38 single blocks, text first.

The adapter is modeling/flux.py (its processor and block order); this record makes it one
family among the others. Text: T5 (`tokenizer_2`), max_sequence_length tokens. Guidance:
distilled (FLUX.1-dev's guidance input; schnell has none); with true CFG (a negative prompt and
true_cfg_scale > 1) the negative branch runs the pipeline's own attention.
"""

from __future__ import annotations

from ..flux import DeLeakerAttnProcessor, attention_blocks
from .base import DISTILLED, Family

FAMILY = Family(
    module=__name__, pipeline_kwargs_name="joint_attention_kwargs",
    name="flux1", title="FLUX.1", transformer_class="FluxTransformer2DModel", pipeline_classes=("FluxPipeline",),
    layout="text_image", guidance=DISTILLED, text_encoder="T5-XXL (CLIP gives the pooled vector only)",
    kwargs_name="joint_attention_kwargs", preset="flux-dev",
    attention_modules=lambda t: [b.attn for b in attention_blocks(t)],
    processor=lambda m, attrs, op: DeLeakerAttnProcessor(attrs, op))
