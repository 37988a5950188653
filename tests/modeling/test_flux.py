"""DeLeaker inside diffusers' FluxTransformer2DModel (modeling/flux.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers import transformer_flux

from deleaker.modeling.flux import DeLeakerFlux, blocks_per_step
from deleaker.modeling.reference_op import deleaker_attention_ref, settings_tensors
from deleaker.runtime.config import DeLeakerConfig

H_GRID, W_GRID, T, E = 6, 8, 7, 3  # non-square latent grid on purpose


def tiny_transformer(seed=0):
    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                  pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()


# windows open from the first block so two steps exercise history, masks and edits
EARLY = DeLeakerConfig(start_aggregating_from=0, start_intervention_from=1, stop_aggregating_at=7,
                       stop_intervention_at=100, do_smoothing=False, std_mul_image_image=0.5)


def step_inputs(B=2, seed=0, config=EARLY):
    g = torch.Generator().manual_seed(seed)
    I = H_GRID * W_GRID
    img_ids = torch.zeros(H_GRID, W_GRID, 3)
    img_ids[..., 1] = torch.arange(H_GRID)[:, None]
    img_ids[..., 2] = torch.arange(W_GRID)[None, :]
    ent = torch.zeros(B, E, T)  # [B, E, T]
    ent[:, 0, 1] = 1
    ent[:, 1, 3:5] = 1
    return dict(
        hidden_states=torch.randn(B, I, 16, generator=g),
        encoder_hidden_states=torch.randn(B, T, 24, generator=g),
        pooled_projections=torch.randn(B, 12, generator=g),
        timestep=torch.full((B,), 0.7),
        img_ids=img_ids.reshape(I, 3),
        txt_ids=torch.zeros(T, 3),
        guidance=torch.full((B,), 3.5),
        entity_tokens=ent,
        history=torch.zeros(B, E, I),
        grid=torch.tensor([H_GRID, W_GRID]),
        **dict(zip(("windows", "knobs", "rules"), settings_tensors([config.resolved(5)] * B))),
    )


def vanilla(model, x):
    keys = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
            "guidance")  # everything but DeLeaker's own inputs
    return model(**{k: x[k] for k in keys}, return_dict=False)[0]


@torch.no_grad()
def test_no_active_entity_is_stock_diffusers():
    stock = tiny_transformer()
    dl = DeLeakerFlux(copy.deepcopy(stock))
    x = step_inputs()
    x["entity_tokens"] = torch.zeros_like(x["entity_tokens"])
    out, hist = dl(**x, step=torch.tensor(1))
    torch.testing.assert_close(out, vanilla(stock, x), rtol=1e-5, atol=1e-5)
    assert torch.equal(hist, x["history"])


@torch.no_grad()
def test_entities_change_output_and_equal_layer_by_layer_reference(monkeypatch):
    stock = tiny_transformer()
    dl = DeLeakerFlux(copy.deepcopy(stock))
    assert dl.blocks_per_step == blocks_per_step(stock) == 5
    x = step_inputs()

    # Independent route: the stock processors, with diffusers' attention call replaced by the
    # reference op; the test itself threads the history and counts the block offsets.
    state = {}

    def dispatch(query, key, value, attn_mask=None, backend=None, parallel_config=None):
        offset = state["block"]
        state["block"] += 1
        out, state["hist"] = deleaker_attention_ref(query.transpose(1, 2), key.transpose(1, 2),
                                                    value.transpose(1, 2), x["entity_tokens"], state["hist"],
                                                    state["step"], x["grid"], x["windows"], x["knobs"], x["rules"],
                                                    block_offset=offset, blocks_per_step=5)
        return out.transpose(1, 2)

    hist_dl = hist_ref = x["history"]
    for step in range(2):
        out_dl, hist_dl = dl(**{**x, "history": hist_dl}, step=torch.tensor(step))
        state.update(block=0, hist=hist_ref, step=step)
        with monkeypatch.context() as m:
            m.setattr(transformer_flux, "dispatch_attention_fn", dispatch)
            out_ref = vanilla(stock, x)
        hist_ref = state["hist"]
        assert state["block"] == 5
        torch.testing.assert_close(out_dl, out_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hist_dl, hist_ref, rtol=1e-6, atol=1e-7)
    assert hist_dl[:, :2].abs().sum() > 0 and hist_dl[:, 2].abs().sum() == 0  # slot 3 inactive
    diff = (out_dl - vanilla(stock, x)).abs().max()
    assert diff > 1e-3, f"DeLeaker did not change the output (max diff {diff})"


def test_processor_without_inputs_is_a_clear_error():
    model = tiny_transformer()
    DeLeakerFlux(model)
    x = step_inputs()
    with pytest.raises(RuntimeError, match="without DeLeaker inputs"):
        vanilla(model, x)
