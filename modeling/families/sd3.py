"""SD3 / SD3.5 (SD3Transformer2DModel): every block one joint attention, image tokens first.

Joint sequence: [image (I) ; text (T)] (diffusers' JointAttnProcessor2_0 concatenates the
context after the sample), so the layout is image_text. The text is CLIP-L and CLIP-G (77 tokens,
features concatenated) followed by T5 (max_sequence_length tokens): an entity's tokens are its
run in the CLIP part (found with `tokenizer`, the CLIP-L one) and its run in the T5 part
(`tokenizer_3`, offset by 77). SD3.5 Medium's second, image-only attention (attn2) is not joint:
it keeps its own processor and is not a block of the clock. Guidance: classic CFG on one batch
[unconditional ; conditional]; DeLeaker edits the conditional rows (the unconditional rows get no
active entity slot, which the op computes as plain attention).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import CFG_BATCHED, Family, OpProcessor

CLIP_TOKENS = 77  # SD3's CLIP part of the joint text


class SD3DeLeakerProcessor(OpProcessor):
    """JointAttnProcessor2_0 with the op as its attention (same projections, norms, split)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, deleaker=None):
        if attention_mask is not None:
            raise NotImplementedError("attention masks are not supported with DeLeaker attention")
        B = hidden_states.shape[0]
        head_dim = attn.to_k.out_features // attn.heads

        def heads(x):  # [B, S, H*D] -> [B, S, H, D]
            return x.view(B, -1, attn.heads, head_dim)

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), \
            heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        eq, ek, ev = heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states)), \
            heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        # image first, then text: [B, I+T, H, D] (layout image_text)
        out = self.attend(torch.cat([query, eq], dim=1), torch.cat([key, ek], dim=1), torch.cat([value, ev], dim=1),
                          deleaker)
        img, txt = out[:, :hidden_states.shape[1]], out[:, hidden_states.shape[1]:]
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        img = attn.to_out[1](attn.to_out[0](img))
        return img, txt


def attention_modules(transformer) -> list:
    return [block.attn for block in transformer.transformer_blocks]


FAMILY = Family(
    module=__name__, pipeline_kwargs_name="joint_attention_kwargs",
    name="sd3", title="SD3 / SD3.5", transformer_class="SD3Transformer2DModel",
    pipeline_classes=("StableDiffusion3Pipeline",), layout="image_text", guidance=CFG_BATCHED,
    text_encoder="CLIP-L + CLIP-G (77 tokens) then T5-XXL", kwargs_name="joint_attention_kwargs", preset="sd3.5-large",
    attention_modules=attention_modules, processor=lambda m, attrs, op: SD3DeLeakerProcessor(attrs, op),
    step_inputs=lambda *a: step_inputs(*a))


def step_inputs(transformer, batch: int, grid: tuple[int, int], text_tokens: int, gen) -> dict:
    """Synthetic inputs of one step, as StableDiffusion3Pipeline passes them (timestep in [0, 1000])."""
    c, p = transformer.config, transformer.config.patch_size
    h, w = grid
    dtype = next(transformer.parameters()).dtype

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    return {"hidden_states": randn(batch, c.in_channels, h * p, w * p),  # [B, C, H, W] latents
            "encoder_hidden_states": randn(batch, text_tokens, c.joint_attention_dim),  # [B, T, Dt]
            "pooled_projections": randn(batch, c.pooled_projection_dim),  # [B, Dp]
            "timestep": torch.full((batch,), 500.0, dtype=dtype)}  # [B]


# ---- the diffusers drop-in's hooks (modeling/families/dropin.py) --------------------------------

def tokenizers(pipe, error) -> dict:
    """The CLIP-L tokenizer (positions 0..76) and, when the pipeline has T5, the T5 tokenizer."""
    from .text import text_tokenizer

    out = {"clip": text_tokenizer(pipe.tokenizer, "pipe.tokenizer", error)}
    if getattr(pipe, "tokenizer_3", None) is not None and getattr(pipe, "text_encoder_3", None) is not None:
        out["t5"] = text_tokenizer(pipe.tokenizer_3, "pipe.tokenizer_3", error)
    return out


def prompt_texts(a: dict) -> dict:
    """encode_prompt's arguments -> the texts each encoder saw (prompt_2/prompt_3 default to prompt)."""
    def listed(x):
        return [x] if isinstance(x, str) else list(x)

    prompt = listed(a["prompt"])
    return {"clip": prompt, "clip_g": listed(a.get("prompt_2") or prompt), "t5": listed(a.get("prompt_3") or prompt)}


def prompt_count(texts: dict) -> int:
    return len(texts["clip"])


def grid(transformer, kwargs) -> tuple[int, int]:
    """The latent token grid: hidden_states [B, C, H, W] in patches of patch_size."""
    hs = kwargs["hidden_states"]
    p = transformer.config.patch_size
    return hs.shape[-2] // p, hs.shape[-1] // p


def entity_tokens(toks: dict, texts: dict, entities: list, slots: int, T: int) -> np.ndarray:
    """[P, slots, T]: each entity's run in the CLIP part and in the T5 part of SD3's joint text.

    CLIP-G reads prompt_2 at the same positions as CLIP-L reads prompt; the entity runs are found
    in prompt (CLIP-L), which is the whole CLIP part when prompt_2 is the prompt."""
    from deleaker.runtime import tokens as tok

    out = np.zeros((len(texts["clip"]), slots, T), np.float32)  # [P, E, T]
    out[:, :, :CLIP_TOKENS] = tok.entity_tokens(toks["clip"], texts["clip"], entities, slots, CLIP_TOKENS)
    if "t5" in toks and T > CLIP_TOKENS:
        out[:, :, CLIP_TOKENS:] = tok.entity_tokens(toks["t5"], texts["t5"], entities, slots, T - CLIP_TOKENS)
    return out
