"""DeLeaker inside diffusers' FluxTransformer2DModel, as a pure per-step function.

diffusers' extension point for attention is the processor: we install a DeLeaker processor on
every double and single block (the model code itself is untouched). The per-call DeLeaker
inputs (entity tokens, history, step, grid and the per-sample settings) travel in a small `DeLeakerCall` object through
`joint_attention_kwargs`; it is created per forward, so `DeLeakerFlux.forward` is a pure
function of its inputs: (latents, ..., history) -> (noise_pred, history_out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections  # diffusers' own q/k/v path
from torch import nn

from deleaker.runtime import op_schema

from .attention_ops import get_op


@dataclass
class DeLeakerCall:
    """Inputs of one transformer step, threaded block to block (history is replaced each block)."""

    entity_tokens: torch.Tensor  # [B, E, T] float32
    history: torch.Tensor  # [B, E, I] float32
    step: torch.Tensor  # int64 scalar
    grid: torch.Tensor  # [2] int64
    windows: torch.Tensor  # [B, 4] int64 (op_schema.SETTINGS)
    knobs: torch.Tensor  # [B, 3] float32
    rules: torch.Tensor  # [B, 6] int64


class DeLeakerAttnProcessor:
    """Drop-in for diffusers' FluxAttnProcessor whose attention is the DeLeakerAttention op."""

    def __init__(self, attrs: dict, op_name: str = "reference"):
        self.attrs = attrs  # structural op attributes (op_schema.ATTRIBUTES)
        self.op_name = op_name
        self.op = get_op(op_name)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, deleaker: DeLeakerCall | None = None):
        if deleaker is None:
            raise RuntimeError("DeLeakerAttnProcessor called without DeLeaker inputs; run the model "
                               "through deleaker.modeling.flux.DeLeakerFlux")
        if attention_mask is not None:
            raise NotImplementedError("attention masks are not supported with DeLeaker attention")
        query, key, value, enc_q, enc_k, enc_v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))  # [B, S, H, D]
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:  # double block: prepend the text stream
            enc_q = attn.norm_added_q(enc_q.unflatten(-1, (-1, attn.head_dim)))
            enc_k = attn.norm_added_k(enc_k.unflatten(-1, (-1, attn.head_dim)))
            enc_v = enc_v.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([enc_q, query], dim=1)
            key = torch.cat([enc_k, key], dim=1)
            value = torch.cat([enc_v, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # [B, T+I, H, D] -> [B, H, T+I, D], the op's layout
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        d = deleaker
        out, d.history = self.op(q, k, v, d.entity_tokens, d.history, d.step, d.grid, d.windows, d.knobs, d.rules,
                                 self.attrs)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)  # [B, T+I, H*D]

        if encoder_hidden_states is None:
            return out
        text_len = encoder_hidden_states.shape[1]
        enc_out, img_out = out[:, :text_len], out[:, text_len:]
        img_out = attn.to_out[1](attn.to_out[0](img_out.contiguous()))
        enc_out = attn.to_add_out(enc_out.contiguous())
        return img_out, enc_out


def blocks_per_step(transformer) -> int:
    return len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)


def attention_blocks(transformer) -> list:
    """Every block with a joint attention, in block-offset order (double blocks first: b = j,
    then n_double + j)."""
    return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)


def deleaker_processors(transformer, op_name: str = "reference") -> list[DeLeakerAttnProcessor]:
    """One DeLeaker processor per attention_blocks() entry, each with its block offset."""
    bps = blocks_per_step(transformer)
    return [DeLeakerAttnProcessor(op_schema.node_attributes(offset, bps), op_name) for offset in range(bps)]


def install_deleaker(transformer, op_name: str = "reference") -> int:
    """Put a DeLeaker processor on every joint attention, with its block offset. Returns blocks per step.

    Nothing request-dependent is baked in: windows and settings arrive per call (op contract v2).
    """
    for block, proc in zip(attention_blocks(transformer), deleaker_processors(transformer, op_name), strict=True):
        block.attn.set_processor(proc)
    return blocks_per_step(transformer)


class DeLeakerFlux(nn.Module):
    """One denoising step of FLUX with DeLeaker attention: the compiled transformer's I/O
    (deleaker.runtime.step_io): hidden_states [B, I, C], encoder_hidden_states [B, T, Dt],
    pooled_projections [B, Dp], timestep [B], img_ids [I, 3], txt_ids [T, 3], guidance [B] or None,
    entity_tokens [B, E, T], history [B, E, I], step (int64 scalar), grid [2] int64,
    windows [B, 4], knobs [B, 3], rules [B, 6] -> (noise_pred [B, I, C], history_out [B, E, I]).
    """

    def __init__(self, transformer, op_name: str = "reference"):
        super().__init__()
        self.transformer = transformer
        self.op_name = op_name
        self.blocks_per_step = install_deleaker(transformer, op_name)

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance, entity_tokens, history, step, grid, windows, knobs, rules):
        call = DeLeakerCall(entity_tokens=entity_tokens, history=history, step=step, grid=grid, windows=windows,
                            knobs=knobs, rules=rules)
        noise_pred = self.transformer(
            hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids, txt_ids=txt_ids,
            guidance=guidance, joint_attention_kwargs={"deleaker": call}, return_dict=False)[0]
        return noise_pred, call.history
