"""A family pipeline's DeLeaker transformer steps run in ONNX Runtime on an exported step.

OnnxStepRunner, installed on a pipeline that has DeLeaker installed
(modeling/diffusers_integration.install), replaces the transformer's forward for calls that carry
DeLeaker inputs by a session on a step exported with export/family_onnx.py (which returns the
output and the history); calls without DeLeaker inputs (Qwen-Image's negative branch, DeLeaker
off) stay torch. The step has static shapes: an input of another shape is refused in one line
naming both (for the text, both token counts) before the session runs; a call with fewer entity
slots than the step's gets inactive ones added (and dropped again from the returned history).
remove() restores the torch forward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from . import family_of

OP_INPUTS = ("entity_tokens", "history", "step", "grid", "windows", "knobs", "rules")


def cpu_session(path: str | Path, threads: int | None = None, providers: list[str] | None = None):
    """An ONNX Runtime session on `path` (CPU provider unless given; intra-op threads if given): the
    one the families' exported step and components run in."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


class StepShapeError(ValueError):
    """A transformer call of another shape than the exported step's (one line)."""


class OnnxStepRunner:
    """See the module docstring. on_step(call, history): after each step run in ONNX Runtime, with
    the DeLeakerCall it ran and the history it returned (for counting what the op did)."""

    def __init__(self, pipe, path: str | Path, threads: int | None = None,
                 on_step: Callable | None = None):
        self.session = cpu_session(path, threads)
        self.shapes = {i.name: tuple(i.shape) for i in self.session.get_inputs()}
        self.names = list(self.shapes)
        self.transformer = pipe.transformer
        self.family = family_of(self.transformer)
        self.on_step = on_step
        self._torch_forward = self.transformer.forward
        self.calls = 0  # transformer calls run in ONNX Runtime
        self.transformer.forward = self._forward

    def _forward(self, *args, **kwargs):
        call = (kwargs.get(self.family.kwargs_name) or {}).get("deleaker")
        if call is None or args or kwargs.get("return_dict", True):  # pipelines call return_dict=False
            return self._torch_forward(*args, **kwargs)
        feeds = {**kwargs, **{k: getattr(call, k) for k in OP_INPUTS}}
        slots, want = int(call.entity_tokens.shape[1]), int(self.shapes["entity_tokens"][1])
        if slots < want:  # the step's extra slots stay inactive (zero entity tokens, zero history)
            pad = lambda t: torch.cat([t, t.new_zeros(t.shape[0], want - slots, *t.shape[2:])], dim=1)  # noqa: E731
            feeds["entity_tokens"], feeds["history"] = pad(call.entity_tokens), pad(call.history)
        self.check(feeds)
        out, history = self.session.run(None, {n: feeds[n].detach().cpu().numpy() for n in self.names})
        call.history = torch.from_numpy(history[:, :slots])
        self.calls += 1
        if self.on_step is not None:
            self.on_step(call, call.history)
        return (torch.from_numpy(out),)

    def check(self, feeds: dict) -> None:
        """Every input the step takes, at the shape it was exported for (one line otherwise)."""
        for name, want in self.shapes.items():
            if name not in feeds or feeds[name] is None:
                raise StepShapeError(f"the transformer call has no {name}, an input of the exported step")
            got = tuple(feeds[name].shape)
            if got == want:
                continue
            if name == "encoder_hidden_states" and len(got) == len(want) == 3 and got[::2] == want[::2]:
                raise StepShapeError(f"the step was exported for {want[1]} text tokens, this prompt gives {got[1]} "
                                     f"({self.family.title}: export with a prompt of this token length)")
            if name == "entity_tokens" and len(got) == 3 and got[1] > want[1]:
                raise StepShapeError(f"{got[1]} entity slots but the step was exported with {want[1]} "
                                     f"(--entity-slots)")
            raise StepShapeError(f"{name} has shape {list(got)}, the step was exported for {list(want)} (static "
                                 f"shapes: the same size, batch and guidance as the export)")

    def remove(self) -> None:
        self.transformer.forward = self._torch_forward
