"""FLUX.2 (Flux2Transformer2DModel): double blocks then single (parallel) blocks, text first,
reference-image tokens after the generated image's.

Joint sequence: [text (T) ; image (I) ; reference images (X)]: Flux2Pipeline appends the
reference latents to the noisy ones in the image stream, so the layout is text_image_excluded
(I = h * w of the generated image, from the grid; the rest of the image stream is excluded).
Text: Mistral Small 3.1 hidden states of the chat-templated prompt. Guidance: distilled
(FLUX.2 [dev] has a guidance input), one branch, which DeLeaker edits.
"""

from __future__ import annotations

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
    name="flux2", title="FLUX.2", transformer_class="Flux2Transformer2DModel", pipeline_classes=("Flux2Pipeline",),
    layout="text_image_excluded", guidance=DISTILLED, text_encoder="Mistral Small 3.1 (chat template)",
    kwargs_name="joint_attention_kwargs", preset="flux2-dev", attention_modules=attention_modules, processor=_processor)
