"""DeLeaker inside a user's own diffusers FluxPipeline: install once, call the pipeline as usual.

    from deleaker.modeling.diffusers_integration import DeLeaker, install, remove

    install(pipe)                                   # pipe: a diffusers FluxPipeline
    image = pipe("a cat and a cheetah in a field",
                 joint_attention_kwargs={"deleaker": DeLeaker(entities=("cat", "cheetah"))}).images[0]
    remove(pipe)                                    # the pipeline is exactly vanilla again

What `install` changes, all undone by `remove`:
  processors    each joint attention's processor becomes a switch: the pipeline's own processor
                for calls without DeLeaker, modeling/flux.py's DeLeakerAttnProcessor (the
                reference op, or the fused op on CUDA) for calls with it;
  two hooks     on pipe.transformer (forward pre/post hooks): per call they hold the entity
                tokens, the step counter (transformer calls of this pipeline call), the grid,
                the settings and the history, which starts at zero every call and is carried
                block to block and step to step;
  encode_prompt an instance attribute wrapping the pipeline's own method, so a call's prompts
                (prompt_2 if given: the T5 text) and num_images_per_prompt are known; entity
                tokens are located with the pipeline's own tokenizer_2.
The pipeline's own __call__ does everything else (latents, scheduler, callbacks, output types).
DeLeaker's step is the index of the transformer call within the pipeline call, and its windows
are resolved for len(pipe.scheduler.timesteps) calls, so a scheduler swapped in by the user is
followed. With true CFG (negative prompt, true_cfg_scale > 1), DeLeaker edits the conditional
branch; the negative branch runs the pipeline's own attention.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from deleaker.runtime import tokens as tok
from deleaker.runtime.config import DEFAULT_PRESET, DeLeakerConfig, preset
from deleaker.runtime.dtypes import DTYPE_ALIASES
from deleaker.runtime.step_io import DEFAULT_ENTITY_SLOTS

from .flux import DeLeakerCall, attention_blocks, blocks_per_step, deleaker_processors
from .families.text import Encoded, record_encode_prompt, text_tokenizer
from .reference_op import settings_tensors

log = logging.getLogger("deleaker")

KEY = "deleaker"  # the joint_attention_kwargs key (also the DeLeaker processor's keyword)
_ATTR = "_deleaker_installation"  # where the installation lives on the pipeline


class IntegrationError(ValueError):
    """DeLeaker cannot be installed on, or run with, this pipeline call; the message says why."""


@dataclass(frozen=True)
class DeLeaker:
    """One call's DeLeaker request: joint_attention_kwargs={"deleaker": DeLeaker(...)}.

    entities: words of the prompt (one tuple shared by every prompt, or one tuple per prompt);
    config: settings (None: the installation's); enabled=False: the pipeline's own attention."""

    entities: Sequence[str] | Sequence[Sequence[str]] = ()
    config: DeLeakerConfig | None = None
    enabled: bool = True


class _Switch:
    """A joint attention's processor: the pipeline's own without DeLeaker inputs, DeLeaker's with them."""

    def __init__(self, original, deleaker_processor):
        self.original = original
        self.deleaker = deleaker_processor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 deleaker: DeLeakerCall | None = None):
        if deleaker is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        return self.deleaker(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                             deleaker=deleaker)


@dataclass
class _Call:
    """The DeLeaker state of one pipeline call."""

    encoded: Encoded
    negatives: list  # encoder_hidden_states of the true-CFG negative branch (runs vanilla)
    inputs: DeLeakerCall | None = None  # None: this call runs the pipeline's own attention
    num_steps: int = 0
    step: int = 0
    steps: torch.Tensor | None = field(default=None, repr=False)


def _t5_prompts(a: dict) -> list[str]:
    """encode_prompt's arguments -> the prompts T5 saw (prompt_2 defaults to prompt)."""
    text = a.get("prompt_2") or a.get("prompt")
    return [text] if isinstance(text, str) else list(text)


def _default_op(transformer) -> str:
    """The reference op on CPU, the fused op on CUDA (checked to fit, in one line)."""
    p = next(transformer.parameters())
    if p.device.type != "cuda":
        return "reference"
    from .torch_backend import _check_fused_op_fits

    full = str(p.dtype).replace("torch.", "")
    name = DTYPE_ALIASES.get(full, full)  # the short name (fp16, bf16) the fused op's check speaks
    _check_fused_op_fits(transformer.config, str(p.device), name)
    return "cuda"


class Installation:
    """DeLeaker installed on one FluxPipeline (install() makes it, remove() undoes it)."""

    def __init__(self, pipe, config: DeLeakerConfig | None = None, op: str | None = None):
        transformer = getattr(pipe, "transformer", None)
        if transformer is None or not hasattr(transformer, "single_transformer_blocks"):
            raise IntegrationError(f"DeLeaker installs into a FLUX pipeline (a FluxTransformer2DModel transformer); "
                                   f"got {type(pipe).__name__} with {type(transformer).__name__}")
        if getattr(pipe, _ATTR, None) is not None:
            raise IntegrationError("DeLeaker is already installed on this pipeline; remove(pipe) first")
        self.config = config if config is not None else preset(DEFAULT_PRESET)
        if not isinstance(self.config, DeLeakerConfig):
            raise IntegrationError(f"config must be a DeLeakerConfig, got {type(self.config).__name__}")
        self.pipe = pipe
        self.transformer = transformer
        self.blocks_per_step = blocks_per_step(transformer)
        self.config.resolved(self.blocks_per_step)  # a bad default fails now, not in the first call
        self.t5 = text_tokenizer(getattr(pipe, "tokenizer_2", None), "pipe.tokenizer_2", IntegrationError)
        self.op = op or _default_op(transformer)
        self.default: DeLeaker | None = None  # what calls without joint_attention_kwargs["deleaker"] get
        self._pending: list[Encoded] = []
        self._call: _Call | None = None
        blocks = attention_blocks(transformer)
        self._originals = [b.attn.processor for b in blocks]
        for block, original, proc in zip(blocks, self._originals, deleaker_processors(transformer, self.op),
                                         strict=True):
            block.attn.set_processor(_Switch(original, proc))
        self._hooks = [transformer.register_forward_pre_hook(self._before, with_kwargs=True),
                       transformer.register_forward_hook(self._after, with_kwargs=True)]
        record_encode_prompt(pipe, _t5_prompts, self._pending)
        setattr(pipe, _ATTR, self)

    # -- per call settings ---------------------------------------------------------------------

    @contextlib.contextmanager
    def settings(self, entities=(), config: DeLeakerConfig | None = None, enabled: bool = True):
        """Calls inside the block without joint_attention_kwargs["deleaker"] use these settings."""
        before, self.default = self.default, DeLeaker(tuple(entities), config, enabled)
        try:
            yield self.default
        finally:
            self.default = before

    def remove(self) -> None:
        for block, original in zip(attention_blocks(self.transformer), self._originals, strict=True):
            block.attn.set_processor(original)
        for h in self._hooks:
            h.remove()
        vars(self.pipe).pop("encode_prompt", None)  # the class's own method again
        vars(self.pipe).pop(_ATTR, None)
        self._pending, self._call = [], None

    # -- the hooks ----------------------------------------------------------------------------

    def _start(self, request: DeLeaker | None, encoded: Encoded, hidden_states, img_ids, ehs) -> DeLeakerCall | None:
        """The DeLeaker inputs of a new pipeline call (None: run the pipeline's own attention)."""
        if request is not None and not isinstance(request, DeLeaker):
            raise IntegrationError(f'joint_attention_kwargs["{KEY}"] must be a DeLeaker(...), got '
                                   f"{type(request).__name__}")
        if request is None or not request.enabled:
            return None
        num_steps = len(self.pipe.scheduler.timesteps)
        base = request.config if request.config is not None else self.config
        if not isinstance(base, DeLeakerConfig):
            raise IntegrationError(f"DeLeaker config must be a DeLeakerConfig, got {type(base).__name__}")
        cfg = base.replace(num_steps=num_steps).resolved(self.blocks_per_step)
        B, I = hidden_states.shape[:2]
        T = ehs.shape[1]
        entities = request.entities
        if isinstance(entities, str):
            raise IntegrationError(f"entities must be a list of words, got the string {entities!r}")
        if encoded.texts is None:
            if any(len(e) for e in entities):
                raise IntegrationError("DeLeaker finds the entities in the prompt text: call the pipeline with "
                                       "prompt= (or prompt_2=), or with prompt_embeds= made by this pipeline's "
                                       "encode_prompt(prompt)")
            prompts = [""] * (B // encoded.per_prompt)
        else:
            prompts = encoded.texts
        if len(prompts) * encoded.per_prompt != B:
            raise IntegrationError(f"{len(prompts)} prompts x {encoded.per_prompt} images per prompt but the "
                                   f"transformer got a batch of {B}")
        flat = all(isinstance(e, str) for e in entities)
        slots = max([DEFAULT_ENTITY_SLOTS] + ([len(entities)] if flat else [len(e) for e in entities]))
        ent = tok.entity_tokens(self.t5, prompts, list(entities), slots, T) if encoded.texts is not None \
            else np.zeros((len(prompts), slots, T), np.float32)  # [P, E, T]
        ent = np.repeat(ent, encoded.per_prompt, axis=0)  # FluxPipeline's order: each prompt's images together
        rows = img_ids[:, 1]
        h = int(rows.max().item()) + 1
        if I % h or img_ids.shape[0] != I:
            raise IntegrationError(f"cannot read the token grid from img_ids {tuple(img_ids.shape)} for {I} tokens")
        dev = hidden_states.device
        windows, knobs, rules = settings_tensors([cfg] * B, dev)
        self._call.num_steps = num_steps
        self._call.steps = torch.arange(num_steps, dtype=torch.long, device=dev)
        return DeLeakerCall(entity_tokens=torch.from_numpy(ent).to(dev), history=torch.zeros(B, slots, I, device=dev),
                            step=self._call.steps[0], grid=torch.tensor([h, I // h], dtype=torch.long, device=dev),
                            windows=windows, knobs=knobs, rules=rules)

    def _before(self, module, args, kwargs):
        jak = dict(kwargs.get("joint_attention_kwargs") or {})
        request = jak.pop(KEY, self.default)
        ehs = kwargs.get("encoder_hidden_states")
        if self._pending:  # the first transformer call after encode_prompt: a new pipeline call
            # the encode_prompt call that made these embeddings; with prompt_embeds= from an earlier
            # pipe.encode_prompt(prompt), that call (it has the text)
            made = [e for e in self._pending if e.embeds is ehs]
            match = next((e for e in made if e.texts is not None), made[0] if made else None)
            if match is None:  # embeddings not from this pipeline's encode_prompt (e.g. a direct transformer call)
                match = Encoded(None, 1, ehs)
            self._call = _Call(match, [e.embeds for e in self._pending if e.embeds is not ehs])
            self._pending.clear()  # the list encode_prompt appends to (text.record_encode_prompt)
            hs, img_ids = kwargs.get("hidden_states", args[0] if args else None), kwargs.get("img_ids")
            if request is not None and (hs is None or img_ids is None or ehs is None):
                raise IntegrationError("DeLeaker reads hidden_states, encoder_hidden_states and img_ids from the "
                                       "transformer's keyword arguments, as FluxPipeline passes them")
            self._call.inputs = self._start(request, match, hs, img_ids, ehs)
        call = self._call
        if call is None or call.inputs is None or any(ehs is n for n in call.negatives):
            return args, {**kwargs, "joint_attention_kwargs": jak}  # the pipeline's own attention
        if call.step >= call.num_steps:
            raise IntegrationError(f"transformer call {call.step + 1} of a {call.num_steps}-step schedule: DeLeaker "
                                   f"counts one transformer call per scheduler timestep")
        call.inputs.step = call.steps[call.step]
        return args, {**kwargs, "joint_attention_kwargs": {**jak, KEY: call.inputs}}

    def _after(self, module, args, kwargs, output):
        d = (kwargs.get("joint_attention_kwargs") or {}).get(KEY)
        if isinstance(d, DeLeakerCall):
            self._call.step += 1  # d.history now holds this step's history (the next step's input)
        return None

    @property
    def history(self) -> torch.Tensor | None:
        """The last DeLeaker call's history [B, E, I] (None if it ran without DeLeaker)."""
        return None if self._call is None or self._call.inputs is None else self._call.inputs.history


def install(pipe, config: DeLeakerConfig | None = None, op: str | None = None):
    """Install DeLeaker into a diffusers pipeline of a supported family (modeling/families): a
    FluxPipeline here, the other families through modeling/families/dropin.py. config: default
    settings (the family's preset); op: "reference" or "cuda" (default: the transformer's device
    decides for FLUX.1; the reference op for the other families, whose layouts the fused kernels
    do not take). An unsupported transformer is refused in one line naming the families."""
    from .families import UnsupportedModel, family_of
    from .families.dropin import FamilyInstallation

    transformer = getattr(pipe, "transformer", None)
    try:
        family = family_of(transformer)
    except UnsupportedModel as e:
        raise IntegrationError(f"{type(pipe).__name__}: {e}") from None
    if family.name == "flux1":
        return Installation(pipe, config, op)
    if getattr(pipe, _ATTR, None) is not None:
        raise IntegrationError("DeLeaker is already installed on this pipeline; remove(pipe) first")
    return FamilyInstallation(pipe, family, config, op or "reference", IntegrationError, DeLeaker, KEY, _ATTR)


def remove(pipe) -> None:
    """Undo install(pipe): processors, hooks and encode_prompt are the pipeline's own again."""
    inst = getattr(pipe, _ATTR, None)
    if inst is None:
        raise IntegrationError("DeLeaker is not installed on this pipeline")
    inst.remove()
