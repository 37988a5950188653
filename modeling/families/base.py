"""What a model family's adapter tells DeLeaker: the one record every family module fills in.

A family is a transformer architecture of diffusers (FLUX.1, SD3/3.5, Qwen-Image, FLUX.2). The
op is the same for all of them; what differs is where its inputs come from:
- which attention modules are joint (text + image) attentions, in block-offset order, so the
  block-step clock tau = step * blocks_per_step + offset counts them;
- the layout of their joint sequence (runtime/op_schema.py LAYOUTS);
- the attention processor that computes q, k, v as the family's own processor does and calls
  the op instead of scaled-dot-product attention;
- where an entity's text tokens are: the tokenizer(s), prompt template and offsets;
- the guidance structure, so DeLeaker edits the conditional branch only;
- the default preset (runtime/config.py PRESETS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from deleaker.runtime import op_schema

from ..attention_ops import get_op

# Guidance structures (docs/models.md). DeLeaker edits the conditional prediction in each:
DISTILLED = "distilled"  # one transformer call per step, guidance as an input (FLUX.1-dev, FLUX.2-dev)
CFG_BATCHED = "cfg-batched"  # one call per step on [unconditional ; conditional] rows (SD3/3.5)
CFG_SEPARATE = "cfg-separate"  # two calls per step, conditional then unconditional (Qwen-Image true CFG)


class OpProcessor:
    """Base of the families' DeLeaker processors: holds the node attributes and the op, and runs
    the op on q, k, v given as [B, N, H, D] in the model's order (returns [B, N, H*D])."""

    def __init__(self, attrs: dict, op_name: str = "reference"):
        self.attrs = attrs  # op_schema.node_attributes(offset, blocks_per_step, layout)
        self.op_name = op_name
        self.op = get_op(op_name)

    def attend(self, query, key, value, deleaker):
        if deleaker is None:
            raise RuntimeError(f"{type(self).__name__} called without DeLeaker inputs (joint_attention_kwargs"
                               f"['deleaker'])")
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # [B, H, N, D], the op's layout
        d = deleaker
        out, d.history = self.op(q, k, v, d.entity_tokens, d.history, d.step, d.grid, d.windows, d.knobs, d.rules,
                                 self.attrs)
        return out.transpose(1, 2).flatten(2, 3).to(query.dtype)  # [B, N, H*D]


@dataclass(frozen=True)
class Family:
    """One supported model family (see the module docstring)."""

    module: str  # the adapter module (its diffusers drop-in hooks: modeling/families/dropin.py)
    name: str  # registry key, e.g. "sd3"
    title: str  # e.g. "SD3 / SD3.5"
    transformer_class: str  # diffusers class name of its transformer
    pipeline_classes: tuple[str, ...]  # diffusers pipelines the drop-in installs into
    layout: str  # op_schema.LAYOUT_NAMES entry
    guidance: str  # DISTILLED, CFG_BATCHED or CFG_SEPARATE
    text_encoder: str  # what the joint attention's text tokens come from (docs)
    preset: str  # runtime/config.py PRESETS name for real checkpoints
    kwargs_name: str  # the transformer's forward argument that reaches the attention processors
    pipeline_kwargs_name: str  # the pipeline __call__ argument a DeLeaker request travels in
    # transformer -> its joint attention modules (diffusers Attention), in block-offset order
    attention_modules: Callable[[torch.nn.Module], list]
    # (attention module, attrs, op_name) -> the DeLeaker processor of that joint attention
    processor: Callable[[object, dict, str], object]
    # (transformer, batch, (h, w) token grid, text tokens, torch.Generator) -> synthetic forward
    # kwargs of one denoising step (benchmarks' step mode); None: the family has its own step path
    step_inputs: Callable[..., dict] | None = None

    def call_kwargs(self, call) -> dict:
        """Transformer forward kwargs that hand `call` (a DeLeakerCall) to every DeLeaker processor."""
        return {self.kwargs_name: {"deleaker": call}}

    @property
    def layout_code(self) -> int:
        return op_schema.layout_code(self.layout)

    def blocks_per_step(self, transformer) -> int:
        return len(self.attention_modules(transformer))

    def processors(self, transformer, op_name: str = "reference") -> list:
        """One DeLeaker processor per attention_modules() entry, with its block offset and the layout."""
        modules = self.attention_modules(transformer)
        return [self.processor(m, op_schema.node_attributes(offset, len(modules), self.layout_code), op_name)
                for offset, m in enumerate(modules)]
