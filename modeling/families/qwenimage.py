"""Qwen-Image (QwenImageTransformer2DModel): all blocks double-stream, text first.

Joint sequence: [text (T) ; image (I)] (QwenDoubleStreamAttnProcessor2_0), layout text_image.
The text is Qwen2.5-VL's hidden states of the prompt inside the pipeline's chat template, with
the template's first `prompt_template_encode_start_idx` (34) tokens dropped: an entity's tokens
are its run among the prompt's tokens, at the prompt's place in the templated sequence minus
the dropped ones. Guidance: true CFG as two transformer calls per step (conditional, then the
negative prompt); DeLeaker edits the conditional call, the negative one runs the pipeline's own
attention. A padded text batch (prompts of different token lengths) carries an attention mask,
which the op does not take: one prompt per call, or prompts of equal length.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import CFG_SEPARATE, Family, OpProcessor


class QwenDeLeakerProcessor(OpProcessor):
    """QwenDoubleStreamAttnProcessor2_0 with the op as its attention."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None, deleaker=None):
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        if attention_mask is not None or encoder_hidden_states_mask is not None:
            raise NotImplementedError("DeLeaker attention takes no attention mask: Qwen-Image masks a padded text "
                                      "batch; run one prompt per call (or prompts of equal token length)")
        head_dim = attn.inner_dim // attn.heads
        iq, ik, iv = (f(hidden_states).unflatten(-1, (-1, head_dim)) for f in (attn.to_q, attn.to_k, attn.to_v))
        tq, tk, tv = (f(encoder_hidden_states).unflatten(-1, (-1, head_dim))
                      for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_q is not None:
            iq = attn.norm_q(iq)
        if attn.norm_k is not None:
            ik = attn.norm_k(ik)
        if attn.norm_added_q is not None:
            tq = attn.norm_added_q(tq)
        if attn.norm_added_k is not None:
            tk = attn.norm_added_k(tk)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            iq, ik = (_rope(x, img_freqs, apply_rotary_emb_qwen) for x in (iq, ik))
            tq, tk = (_rope(x, txt_freqs, apply_rotary_emb_qwen) for x in (tq, tk))
        # text first: [B, T+I, H, D] (layout text_image)
        out = self.attend(torch.cat([tq, iq], dim=1), torch.cat([tk, ik], dim=1), torch.cat([tv, iv], dim=1),
                          deleaker)
        T = encoder_hidden_states.shape[1]
        txt, img = out[:, :T], out[:, T:]
        img = attn.to_out[0](img.contiguous())
        if len(attn.to_out) > 1:
            img = attn.to_out[1](img)
        return img, attn.to_add_out(txt.contiguous())


def _rope(x, freqs, apply_complex):
    """Qwen's rotary embedding: diffusers' complex form, or the same rotation in real arithmetic
    when freqs is view_as_real of it ([S, D/2, 2], see RealRope: ONNX has no complex type)."""
    if freqs.is_complex():
        return apply_complex(x, freqs, use_real=False)
    c, s = freqs[None, :, None, :, 0], freqs[None, :, None, :, 1]  # [1, S, 1, D/2]
    x0, x1 = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)  # [B, S, H, D/2]: (real, imag) pairs
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(3).type_as(x)


class RealRope(torch.nn.Module):
    """A transformer's pos_embed for one fixed image shape and text length, precomputed, as real
    tensors: what the DeLeaker processors take for export (QwenEmbedRope computes complex ones)."""

    def __init__(self, pos_embed, img_shapes, text_len: int):
        super().__init__()
        with torch.no_grad():
            img, txt = pos_embed(img_shapes, max_txt_seq_len=text_len, device=torch.device("cpu"))
        self.register_buffer("img", torch.view_as_real(img).contiguous(), persistent=False)  # [I, D/2, 2]
        self.register_buffer("txt", torch.view_as_real(txt).contiguous(), persistent=False)  # [T, D/2, 2]

    def forward(self, *args, **kwargs):
        return self.img, self.txt


def export_ready(transformer, static: dict, example: dict) -> None:
    """Make the transformer traceable to ONNX for these static arguments (fixed img_shapes and text length)."""
    transformer.pos_embed = RealRope(transformer.pos_embed, static["img_shapes"],
                                     example["encoder_hidden_states"].shape[1])


FAMILY = Family(
    module=__name__, pipeline_kwargs_name="attention_kwargs",
    name="qwenimage", title="Qwen-Image", transformer_class="QwenImageTransformer2DModel",
    pipeline_classes=("QwenImagePipeline",), layout="text_image", guidance=CFG_SEPARATE,
    text_encoder="Qwen2.5-VL (chat template, first 34 tokens dropped)", kwargs_name="attention_kwargs",
    preset="qwen-image",
    attention_modules=lambda t: [b.attn for b in t.transformer_blocks],
    processor=lambda m, attrs, op: QwenDeLeakerProcessor(attrs, op), step_inputs=lambda *a: step_inputs(*a))


def step_inputs(transformer, batch: int, grid: tuple[int, int], text_tokens: int, gen) -> dict:
    """Synthetic inputs of one step, as QwenImagePipeline passes them (packed latents, timestep in [0, 1],
    one image shape per sample; no text mask: one prompt length)."""
    c = transformer.config
    h, w = grid
    dtype = next(transformer.parameters()).dtype
    return {"hidden_states": torch.randn(batch, h * w, c.in_channels, generator=gen).to(dtype),  # [B, I, C]
            "encoder_hidden_states": torch.randn(batch, text_tokens, c.joint_attention_dim,
                                                 generator=gen).to(dtype),  # [B, T, Dt]
            "timestep": torch.full((batch,), 0.5, dtype=dtype),  # [B]
            "img_shapes": [[(1, h, w)]] * batch}


# ---- the diffusers drop-in's hooks (modeling/families/dropin.py) --------------------------------

def tokenizers(pipe, error) -> dict:
    """The pipeline's tokenizer, its prompt template and how many leading template tokens it drops."""
    from .text import text_tokenizer

    return {"text": text_tokenizer(pipe.tokenizer, "pipe.tokenizer", error), "template": pipe.prompt_template_encode,
            "drop": int(pipe.prompt_template_encode_start_idx), "error": error}


def prompt_texts(a: dict) -> dict:
    prompt = a["prompt"]
    return {"prompt": [prompt] if isinstance(prompt, str) else list(prompt)}


def prompt_count(texts: dict) -> int:
    return len(texts["prompt"])


def grid(transformer, kwargs) -> tuple[int, int]:
    """img_shapes: one [(frames, h, w)] per sample (already in patches); one image shape only."""
    shapes = kwargs.get("img_shapes")
    first = shapes[0] if shapes else None
    first = list(first) if isinstance(first, list) else [first]
    if not shapes or len(first) != 1 or first[0] is None or first[0][0] != 1:
        raise ValueError(f"DeLeaker needs one image shape per sample in img_shapes, got {shapes!r}")
    return int(first[0][1]), int(first[0][2])


def entity_tokens(toks: dict, texts: dict, entities: list, slots: int, T: int) -> np.ndarray:
    """[P, slots, T]: each entity's run among the prompt's tokens, at the prompt's place in the
    templated sequence less the dropped template tokens."""
    from deleaker.runtime import tokens as tok

    tt, template, drop = toks["text"], toks["template"], toks["drop"]
    prefix, suffix = template.split("{}")
    prefix_ids = tt.ids(prefix, add_special_tokens=False)
    out = np.zeros((len(texts["prompt"]), slots, T), np.float32)  # [P, E, T]
    for b, prompt in enumerate(texts["prompt"]):
        ents = entities if all(isinstance(e, str) for e in entities) else list(entities[b])
        if len(ents) > slots:
            raise tok.EntityError(f"{len(ents)} entities for one prompt but only {slots} entity slots")
        prompt_ids = tt.ids(prompt, add_special_tokens=False)
        if tt.ids(template.format(prompt), add_special_tokens=False)[:len(prefix_ids) + len(prompt_ids)] != \
                prefix_ids + prompt_ids:
            raise toks["error"]("the tokenizer does not keep the prompt's tokens apart from the template's; "
                                "DeLeaker cannot place the entities")
        shift = len(prefix_ids) - drop  # prompt token j is at joint text position j + shift
        for e, span in enumerate(tok.locate_entities(tt, prompt, ents, tok.T5_MAX_SEQUENCE_LENGTH)):
            if span.end + shift > T:
                raise tok.EntityError(f"entity {span.entity!r} is beyond the {T} text tokens the transformer sees")
            out[b, e, span.start + shift:span.end + shift] = 1.0
    return out
