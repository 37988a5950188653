"""ONNX export of one denoising step of a model family's transformer with DeLeaker attention.

modeling/families gives each family's DeLeaker processors; FamilyStep installs them and makes the
transformer one pure step: (the transformer's tensor inputs, entity_tokens, history, step, grid,
windows, knobs, rules) -> (the transformer's output, history_out), the op inputs as in
runtime/step_io.py. export_step traces it with torch.onnx.export (dynamo) where every joint
attention becomes one deleaker::DeLeakerAttention node carrying the family's `layout`, and
attaches the op's function body (export/onnx_op.py), so ONNX Runtime runs it with no plugin.
Shapes are those of the example inputs (static); FLUX.1's full artifact (export/onnx_export.py)
is the one with dynamic shapes, text encoders and VAE. Running a pipeline's steps on the exported
file: modeling/families/onnx_step.py (OnnxStepRunner); the artifact around it:
export/family_artifact.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deleaker.modeling.families import Family
from deleaker.modeling.families.onnx_step import OP_INPUTS, OnnxStepRunner  # noqa: F401 (the runner lives with the runtime side)
from deleaker.modeling.flux import DeLeakerCall

from . import onnx_export


class FamilyStep(nn.Module):
    """A family's transformer with its DeLeaker processors, as one step (see the module docstring).
    `static`: non-tensor transformer arguments baked into the trace (Qwen-Image's img_shapes)."""

    def __init__(self, transformer: nn.Module, family: Family, static: dict | None = None, op_name: str = "reference"):
        super().__init__()
        self.transformer = transformer
        self.family = family
        self.static = dict(static or {})
        for module, proc in zip(family.attention_modules(transformer), family.processors(transformer, op_name),
                                strict=True):
            module.set_processor(proc)

    def forward(self, entity_tokens, history, step, grid, windows, knobs, rules, **inputs):
        call = DeLeakerCall(entity_tokens=entity_tokens, history=history, step=step, grid=grid, windows=windows,
                            knobs=knobs, rules=rules)
        out = self.transformer(**inputs, **self.static, **self.family.call_kwargs(call), return_dict=False)[0]
        return out, call.history


def export_step(step: FamilyStep, example: dict, path: str | Path) -> Path:
    """Trace `step` on `example` (its forward's keyword arguments) into the ONNX file `path`.
    Qwen-Image's complex rotary embedding is precomputed for the example's shapes first
    (modeling/families/qwenimage.py: export_ready), since ONNX has no complex type."""
    path = Path(path)
    if step.family.name == "qwenimage":
        from deleaker.modeling.families.qwenimage import export_ready

        export_ready(step.transformer, step.static, example)
    num_slots = int(example["entity_tokens"].shape[1])
    step.eval()  # a trace of inference: no dropout, and no training-mode warning from the exporter
    with torch.no_grad(), onnx_export._quiet_exporter():
        program = torch.onnx.export(step, (), kwargs=example, dynamo=True, output_names=["out", "history_out"],
                                    custom_translation_table=onnx_export.translation_table(), optimize=True,
                                    verbose=False)
    onnx_export._attach_op_function(program, num_slots)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(path)
    return path
