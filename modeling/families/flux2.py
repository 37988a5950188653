"""FLUX.2 (Flux2Transformer2DModel): double blocks then single (parallel) blocks, text first,
reference-image tokens after the generated image's.

Joint sequence: [text (T) ; image (I) ; reference images (X)]: Flux2Pipeline appends the
reference latents to the noisy ones in the image stream, so the layout is text_image_excluded
(I = h * w of the generated image, from the grid; the rest of the image stream is excluded).
Text: Mistral Small 3.1 hidden states of the chat-templated prompt. Guidance: distilled
(FLUX.2 [dev] has a guidance input), one branch, which DeLeaker edits.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import DISTILLED, Family, OpProcessor


def _rope(query, key, image_rotary_emb):
    from diffusers.models.embeddings import apply_rotary_emb

    if image_rotary_emb is None:
        return query, key
    return (apply_rotary_emb(query, image_rotary_emb, sequence_dim=1),
            apply_rotary_emb(key, image_rotary_emb, sequence_dim=1))


class Flux2DeLeakerProcessor(OpProcessor):
    """Flux2AttnProcessor (double blocks) with the op as its attention."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 deleaker=None):
        from diffusers.models.transformers.transformer_flux2 import _get_qkv_projections

        if attention_mask is not None:
            raise NotImplementedError("attention masks are not supported with DeLeaker attention")
        query, key, value, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        eq, ek, ev = (x.unflatten(-1, (-1, attn.head_dim)) for x in (eq, ek, ev))
        eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        query, key = torch.cat([eq, query], dim=1), torch.cat([ek, key], dim=1)
        value = torch.cat([ev, value], dim=1)
        query, key = _rope(query, key, image_rotary_emb)
        out = self.attend(query, key, value, deleaker)
        T = encoder_hidden_states.shape[1]
        txt, img = out[:, :T], out[:, T:]
        return attn.to_out[1](attn.to_out[0](img)), attn.to_add_out(txt)


class Flux2SingleDeLeakerProcessor(OpProcessor):
    """Flux2ParallelSelfAttnProcessor (single blocks: [text ; image] already one stream)."""

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None, deleaker=None):
        if attention_mask is not None:
            raise NotImplementedError("attention masks are not supported with DeLeaker attention")
        hidden_states = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in qkv.chunk(3, dim=-1))
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key = _rope(query, key, image_rotary_emb)
        out = self.attend(query, key, value, deleaker)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


def attention_modules(transformer) -> list:
    return [b.attn for b in transformer.transformer_blocks] + [b.attn for b in transformer.single_transformer_blocks]


def _processor(module, attrs: dict, op_name: str = "reference"):
    """Single blocks fuse q, k, v with the MLP input (to_qkv_mlp_proj); double blocks do not."""
    cls = Flux2SingleDeLeakerProcessor if hasattr(module, "to_qkv_mlp_proj") else Flux2DeLeakerProcessor
    return cls(attrs, op_name)


FAMILY = Family(
    module=__name__, pipeline_kwargs_name="attention_kwargs",
    name="flux2", title="FLUX.2", transformer_class="Flux2Transformer2DModel", pipeline_classes=("Flux2Pipeline",),
    layout="text_image_excluded", guidance=DISTILLED, text_encoder="Mistral Small 3.1 (chat template)",
    kwargs_name="joint_attention_kwargs", preset="flux2-dev", attention_modules=attention_modules, processor=_processor,
    step_inputs=lambda *a: step_inputs(*a))


def step_inputs(transformer, batch: int, grid: tuple[int, int], text_tokens: int, gen) -> dict:
    """Synthetic inputs of one step, as Flux2Pipeline passes them for text to image (no reference
    images; position ids (t, h, w, l): the image's tokens at t = 0, the text's along l)."""
    c = transformer.config
    h, w = grid
    dtype = next(transformer.parameters()).dtype
    img_ids = torch.zeros(batch, h * w, 4)  # [B, I, 4]
    img_ids[..., 1], img_ids[..., 2] = torch.arange(h * w) // w, torch.arange(h * w) % w
    txt_ids = torch.zeros(batch, text_tokens, 4)  # [B, T, 4]
    txt_ids[..., 3] = torch.arange(text_tokens)
    out = {"hidden_states": torch.randn(batch, h * w, c.in_channels, generator=gen).to(dtype),  # [B, I, C]
           "encoder_hidden_states": torch.randn(batch, text_tokens, c.joint_attention_dim,
                                                generator=gen).to(dtype),  # [B, T, Dt]
           "timestep": torch.full((batch,), 0.5, dtype=dtype), "img_ids": img_ids, "txt_ids": txt_ids}
    if c.guidance_embeds:
        out["guidance"] = torch.full((batch,), 4.0, dtype=dtype)  # [B]
    return out


# ---- the diffusers drop-in's hooks (modeling/families/dropin.py) --------------------------------

def tokenizers(pipe, error) -> dict:
    """The pipeline's chat-template tokenizer (FLUX.2 [dev]: a PixtralProcessor; its text tokenizer
    finds the entity runs) and its system message."""
    from .text import text_tokenizer

    chat = pipe.tokenizer
    return {"chat": chat, "text": text_tokenizer(getattr(chat, "tokenizer", chat), "pipe.tokenizer", error),
            "system": pipe.system_message, "error": error}


def prompt_texts(a: dict) -> dict:
    prompt = a["prompt"] if a["prompt"] is not None else ""
    return {"prompt": [prompt] if isinstance(prompt, str) else list(prompt)}


def prompt_count(texts: dict) -> int:
    return len(texts["prompt"])


def grid(transformer, kwargs) -> tuple[int, int]:
    """The generated image's token grid from img_ids [B, N, 4] (t, h, w, l): its tokens have t = 0,
    reference-image tokens (after them) a later t."""
    ids = kwargs["img_ids"]
    ids = ids[0] if ids.dim() == 3 else ids
    own = ids[ids[:, 0] == 0]
    h, w = int(own[:, 1].max()) + 1, int(own[:, 2].max()) + 1
    if h * w != own.shape[0]:
        raise ValueError(f"cannot read the image's token grid from img_ids {tuple(kwargs['img_ids'].shape)}")
    return h, w


def entity_tokens(toks: dict, texts: dict, entities: list, slots: int, T: int) -> np.ndarray:
    """[P, slots, T]: each entity's run among the prompt's tokens, at the prompt's place in the
    chat-templated, padded sequence of T tokens the text encoder reads (as Flux2Pipeline builds it)."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    from deleaker.runtime import tokens as tok

    tt = toks["text"]
    out = np.zeros((len(texts["prompt"]), slots, T), np.float32)  # [P, E, T]
    for b, prompt in enumerate(texts["prompt"]):
        ents = entities if all(isinstance(e, str) for e in entities) else list(entities[b])
        if len(ents) > slots:
            raise tok.EntityError(f"{len(ents)} entities for one prompt but only {slots} entity slots")
        seen = toks["chat"].apply_chat_template(
            format_input(prompts=[prompt], system_message=toks["system"]), add_generation_prompt=False,
            tokenize=True, return_dict=True, padding="max_length", truncation=True, max_length=T)["input_ids"][0]
        seen = [int(i) for i in seen]
        run = tt.ids(prompt.replace("[IMG]", ""), add_special_tokens=False)
        start = next((s for s in range(len(seen) - len(run) + 1) if seen[s:s + len(run)] == run), None)
        if start is None:
            raise toks["error"](f"the prompt's tokens are not whole in the {T} tokens the text encoder reads "
                                f"(truncated, or the chat template merges them); DeLeaker cannot place the entities")
        for e, span in enumerate(tok.locate_entities(tt, prompt, ents, tok.T5_MAX_SEQUENCE_LENGTH)):
            out[b, e, span.start + start:span.end + start] = 1.0
    return out
