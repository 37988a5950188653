"""DeLeaker installed into a diffusers pipeline of a family other than FLUX.1 (SD3/3.5, Qwen-Image, FLUX.2).

modeling/diffusers_integration.py's install(pipe) comes here for those families (FLUX.1 keeps its
own Installation there); the user-facing calls are the same:

    install(pipe)
    image = pipe(prompt, joint_attention_kwargs={"deleaker": DeLeaker(entities=("cat", "cheetah"))}).images[0]
    remove(pipe)

What `install` changes, all undone by `remove`: each joint attention's processor becomes a
switch (the pipeline's own processor for calls without DeLeaker inputs, the family's DeLeaker
processor with them); two hooks on pipe.transformer hold one call's DeLeaker inputs and carry the
history block to block and step to step; pipe.encode_prompt is wrapped so a call's prompt text
and images per prompt are known. Guidance (modeling/families/base.py): with CFG on one batch
[unconditional ; conditional] (SD3) only the conditional rows get entity tokens, so the
unconditional rows compute plain attention inside the same op call; with true CFG as a separate
negative-prompt call (Qwen-Image) that call runs the pipeline's own attention and is not counted
as a step; a skip-layer-guidance call
(SD3's extra transformer call per step) runs the pipeline's own attention and is not counted.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field

import numpy as np
import torch

from deleaker.runtime.config import DeLeakerConfig, preset
from deleaker.runtime.step_io import DEFAULT_ENTITY_SLOTS

from ..flux import DeLeakerCall
from ..reference_op import settings_tensors
from .base import CFG_BATCHED, CFG_SEPARATE, Family
from .text import Encoded, record_encode_prompt


class _Switch:
    """A joint attention's processor: the pipeline's own without DeLeaker inputs, DeLeaker's with them.
    Arguments pass through unchanged. diffusers hands a processor only the keyword arguments its
    __call__ signature names, so each switch presents its DeLeaker processor's signature (the
    family processor's parameters plus `deleaker`): see _switch."""

    def __init__(self, original, deleaker_processor):
        self.original = original
        self.deleaker = deleaker_processor

    def __call__(self, attn, *args, deleaker: DeLeakerCall | None = None, **kwargs):
        if deleaker is None:
            return self.original(attn, *args, **kwargs)
        return self.deleaker(attn, *args, deleaker=deleaker, **kwargs)


def _switch(original, deleaker_processor) -> _Switch:
    def call(self, *args, **kwargs):
        return _Switch.__call__(self, *args, **kwargs)

    call.__signature__ = inspect.signature(type(deleaker_processor).__call__)
    cls = type(f"DeLeakerSwitch_{type(deleaker_processor).__name__}", (_Switch,), {"__call__": call})
    return cls(original, deleaker_processor)


@dataclass
class _Call:
    encoded: Encoded
    negatives: list  # embeddings of a separate negative-prompt call (CFG_SEPARATE): those calls run stock
    inputs: DeLeakerCall | None = None
    num_steps: int = 0
    step: int = 0
    steps: torch.Tensor | None = field(default=None, repr=False)


class FamilyInstallation:
    """DeLeaker installed on one pipeline of `family` (see the module docstring)."""

    def __init__(self, pipe, family: Family, config: DeLeakerConfig | None, op: str, error, request_type,
                 key: str, attr: str):
        self.hooks = importlib.import_module(family.module)  # the adapter module's drop-in hooks
        self.pipe, self.family, self.error, self.request_type, self.key, self.attr = \
            pipe, family, error, request_type, key, attr
        self.transformer = pipe.transformer
        self.config = config if config is not None else preset(family.preset)
        if not isinstance(self.config, DeLeakerConfig):
            raise error(f"config must be a DeLeakerConfig, got {type(self.config).__name__}")
        self.blocks_per_step = family.blocks_per_step(self.transformer)
        self.config.resolved(self.blocks_per_step)  # a bad default fails now
        self.tokenizers = self.hooks.tokenizers(pipe, error)
        self.op = op
        self.default = None
        self._pending: list[Encoded] = []
        self._call: _Call | None = None
        modules = family.attention_modules(self.transformer)
        self._originals = [m.processor for m in modules]
        for m, original, proc in zip(modules, self._originals, family.processors(self.transformer, op), strict=True):
            m.set_processor(_switch(original, proc))
        self._hooks = [self.transformer.register_forward_pre_hook(self._before, with_kwargs=True),
                       self.transformer.register_forward_hook(self._after, with_kwargs=True)]
        record_encode_prompt(pipe, self.hooks.prompt_texts, self._pending)
        setattr(pipe, attr, self)

    def remove(self) -> None:
        for m, original in zip(self.family.attention_modules(self.transformer), self._originals, strict=True):
            m.set_processor(original)
        for h in self._hooks:
            h.remove()
        vars(self.pipe).pop("encode_prompt", None)
        vars(self.pipe).pop(self.attr, None)
        self._pending, self._call = [], None

    @property
    def history(self) -> torch.Tensor | None:
        """The last DeLeaker call's history [B, E, I] (None if it ran without DeLeaker)."""
        return None if self._call is None or self._call.inputs is None else self._call.inputs.history

    # -- the hooks ----------------------------------------------------------------------------

    def _start(self, request, encoded: Encoded, kwargs) -> DeLeakerCall | None:
        if request is not None and not isinstance(request, self.request_type):
            raise self.error(f'joint_attention_kwargs["{self.key}"] must be a DeLeaker(...), got '
                             f"{type(request).__name__}")
        if request is None or not request.enabled:
            return None
        entities = request.entities
        if isinstance(entities, str):
            raise self.error(f"entities must be a list of words, got the string {entities!r}")
        if encoded.texts is None:
            raise self.error("DeLeaker finds the entities in the prompt text: call the pipeline with prompt=")
        num_steps = len(self.pipe.scheduler.timesteps)
        base = request.config if request.config is not None else self.config
        if not isinstance(base, DeLeakerConfig):
            raise self.error(f"DeLeaker config must be a DeLeakerConfig, got {type(base).__name__}")
        cfg = base.replace(num_steps=num_steps).resolved(self.blocks_per_step)
        ehs = kwargs["encoder_hidden_states"]
        if kwargs.get("encoder_hidden_states_mask") is not None:
            raise self.error(f"DeLeaker's attention takes no mask, and {self.family.title} masks a batch of prompts of "
                             f"different token lengths: give one prompt per call (or prompts of equal length)")
        B, T = ehs.shape[:2]
        h, w = self.hooks.grid(self.transformer, kwargs)
        prompts = self.hooks.prompt_count(encoded.texts)
        n = prompts * encoded.per_prompt
        if self.family.guidance == CFG_BATCHED and B == 2 * n:
            cond = slice(n, 2 * n)  # [unconditional ; conditional]
        elif B == n:
            cond = slice(0, n)
        else:
            raise self.error(f"{prompts} prompts x {encoded.per_prompt} images per prompt but the transformer got a "
                             f"batch of {B}")
        flat = all(isinstance(e, str) for e in entities)
        slots = max([DEFAULT_ENTITY_SLOTS] + ([len(entities)] if flat else [len(e) for e in entities]))
        ent = np.zeros((B, slots, T), np.float32)  # [B, E, T]; unconditional rows stay inactive
        ent[cond] = np.repeat(self.hooks.entity_tokens(self.tokenizers, encoded.texts, list(entities), slots, T),
                              encoded.per_prompt, axis=0)
        dev = ehs.device
        windows, knobs, rules = settings_tensors([cfg] * B, dev)
        self._call.num_steps = num_steps
        self._call.steps = torch.arange(num_steps, dtype=torch.long, device=dev)
        return DeLeakerCall(entity_tokens=torch.from_numpy(ent).to(dev),
                            history=torch.zeros(B, slots, h * w, device=dev), step=self._call.steps[0],
                            grid=torch.tensor([h, w], dtype=torch.long, device=dev), windows=windows, knobs=knobs,
                            rules=rules)

    def _before(self, module, args, kwargs):
        name = self.family.kwargs_name
        jak = dict(kwargs.get(name) or {})
        request = jak.pop(self.key, self.default)
        if kwargs.get("skip_layers") is not None:  # SD3 skip-layer guidance: the pipeline's own attention
            return args, {**kwargs, name: jak}
        ehs = kwargs.get("encoder_hidden_states")
        if self._pending:  # the first transformer call after encode_prompt: a new pipeline call
            if ehs is None:
                raise self.error("DeLeaker reads the transformer's inputs from its keyword arguments, as the "
                                 "pipeline passes them")
            # the call whose embeddings these are (CFG_SEPARATE: the others are the negative prompt's);
            # CFG_BATCHED pipelines concatenate [negative ; positive], so the first call is the prompt's
            match = next((e for e in self._pending if e.embeds is ehs), self._pending[0])
            negatives = [e.embeds for e in self._pending if e is not match] if self.family.guidance == CFG_SEPARATE \
                else []
            self._call = _Call(match, negatives)
            self._pending.clear()  # the list encode_prompt appends to (text.record_encode_prompt)
            self._call.inputs = self._start(request, match, kwargs)
        call = self._call
        if call is None or call.inputs is None or any(ehs is n for n in call.negatives):
            return args, {**kwargs, name: jak}
        if call.step >= call.num_steps:
            raise self.error(f"transformer call {call.step + 1} of a {call.num_steps}-step schedule: DeLeaker "
                             f"counts one transformer call per scheduler timestep")
        call.inputs.step = call.steps[call.step]
        return args, {**kwargs, name: {**jak, self.key: call.inputs}}

    def _after(self, module, args, kwargs, output):
        d = (kwargs.get(self.family.kwargs_name) or {}).get(self.key)
        if isinstance(d, DeLeakerCall):
            self._call.step += 1
        return None
