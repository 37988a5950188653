"""Each family's adapter on a tiny random transformer of its diffusers class (modeling/families).

Per family: the DeLeaker processors with every entity slot inactive compute the family's own
attention (the op's plain attention in float32 vs diffusers' scaled-dot-product attention:
atol 1e-5 on outputs of O(1), while the edit moves them by more than 1e-3, asserted); with two
planted entities and the windows open, the op edits (the output moves, the history fills);
the layout each adapter declares is the one its processor feeds: every op call's edited rows are
the image-query rows at the place diffusers' own processor puts the image tokens (with a wrong
layout the op would edit text or reference rows). An unknown transformer class is refused in one line.
"""

from __future__ import annotations

import pytest
import torch

from deleaker.modeling.families import FAMILIES, UnsupportedModel, family_of, family_of_class, family_of_folder
from deleaker.modeling.flux import DeLeakerCall
from deleaker.modeling.reference_op import settings_tensors
from deleaker.runtime import op_schema
from deleaker.runtime.config import DeLeakerConfig

ATOL = 1e-5
B, T, H, W = 1, 7, 4, 4  # text tokens, latent token grid
E = 2


def _flux1():
    from diffusers import FluxTransformer2DModel

    m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                               guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    ids = torch.zeros(H * W, 3)
    ids[:, 1], ids[:, 2] = torch.arange(H * W) // W, torch.arange(H * W) % W
    return m, dict(hidden_states=torch.randn(B, H * W, 16), encoder_hidden_states=torch.randn(B, T, 32),
                   pooled_projections=torch.randn(B, 32), timestep=torch.full((B,), 0.5), img_ids=ids,
                   txt_ids=torch.zeros(T, 3)), H * W


def _sd3():
    from diffusers import SD3Transformer2DModel

    m = SD3Transformer2DModel(sample_size=2 * H, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                              pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16)
    return m, dict(hidden_states=torch.randn(B, 4, 2 * H, 2 * W), encoder_hidden_states=torch.randn(B, T, 32),
                   pooled_projections=torch.randn(B, 32), timestep=torch.full((B,), 500.0)), H * W


def _qwen():
    from diffusers import QwenImageTransformer2DModel

    m = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                    num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
    return m, dict(hidden_states=torch.randn(B, H * W, 16), encoder_hidden_states=torch.randn(B, T, 32),
                   timestep=torch.full((B,), 0.5), img_shapes=[(1, H, W)] * B), H * W


def _flux2(refs: int = 0):
    from diffusers import Flux2Transformer2DModel

    m = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=16,
                                axes_dims_rope=(4, 4, 4, 4))
    n = H * W
    ids = torch.zeros(1, n + refs, 4)
    ids[0, :n, 1], ids[0, :n, 2] = torch.arange(n) // W, torch.arange(n) % W
    ids[0, n:, 0] = 10  # reference tokens sit at another time coordinate, as Flux2Pipeline puts them
    ids[0, n:, 1] = torch.arange(refs) // W
    return m, dict(hidden_states=torch.randn(B, n + refs, 16), encoder_hidden_states=torch.randn(B, T, 32),
                   timestep=torch.full((B,), 0.5), img_ids=ids, txt_ids=torch.zeros(1, T, 4),
                   guidance=torch.full((B,), 3.5)), n


BUILDERS = {"flux1": _flux1, "sd3": _sd3, "qwenimage": _qwen, "flux2": _flux2}


def _call(family, transformer, I: int, planted: bool) -> DeLeakerCall:
    cfg = DeLeakerConfig(start_aggregating_from=0, start_intervention_from=0, do_smoothing=False,
                         num_steps=1).resolved(family.blocks_per_step(transformer))
    ent = torch.zeros(B, E, T)
    if planted:
        ent[:, 0, 1:3] = 1
        ent[:, 1, 4] = 1
    windows, knobs, rules = settings_tensors([cfg] * B)
    return DeLeakerCall(entity_tokens=ent, history=torch.zeros(B, E, I), step=torch.tensor(0),
                        grid=torch.tensor([H, W]), windows=windows, knobs=knobs, rules=rules)


# Where diffusers' processors put the image tokens in the joint sequence (read from their sources):
# (start, end) given T text tokens and I image tokens.
IMAGE_ROWS = {"flux1": lambda T, I: (T, T + I), "sd3": lambda T, I: (0, I), "qwenimage": lambda T, I: (T, T + I),
              "flux2": lambda T, I: (T, T + I)}


def _recording(op, calls: list):
    def run(q, k, v, *rest):
        out = op(q, k, v, *rest)
        calls.append((q.float(), k.float(), v.float(), out[0].float()))
        return out
    return run


def _run(name: str, calls: list | None = None, **build):
    torch.manual_seed(0)
    family = FAMILIES[name]
    transformer, inputs, I = BUILDERS[name](**build)
    transformer.eval()
    with torch.no_grad():
        stock = transformer(**inputs, return_dict=False)[0]
        for module, proc in zip(family.attention_modules(transformer), family.processors(transformer), strict=True):
            if calls is not None:
                proc.op = _recording(proc.op, calls)
            module.set_processor(proc)
        off = _call(family, transformer, I, planted=False)
        plain = transformer(**inputs, **family.call_kwargs(off), return_dict=False)[0]
        on = _call(family, transformer, I, planted=True)
        edited = transformer(**inputs, **family.call_kwargs(on), return_dict=False)[0]
    return family, stock, plain, edited, off, on


def _edited_rows(calls, I: int):
    """Per op call with planted entities: the rows whose output differs from plain attention."""
    rows = []
    for q, k, v, out in calls:
        plain = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
        rows.append(((out - plain).abs().amax(dim=(0, 1, 3)) > 1e-4).nonzero().flatten().tolist())
    return rows


@pytest.mark.parametrize("name", list(BUILDERS))
def test_adapter_is_the_family_attention_and_edits(name):
    calls = []
    family, stock, plain, edited, off, on = _run(name, calls)
    planted = calls[len(calls) // 2:]  # the second half: the call with planted entities
    lo, hi = IMAGE_ROWS[name](T, H * W)
    rows = _edited_rows(planted, H * W)
    assert all(r and lo <= min(r) and max(r) < hi for r in rows), (name, (lo, hi), rows)
    torch.testing.assert_close(plain, stock, atol=ATOL, rtol=1e-5)  # no active slot: the family's own attention
    assert off.history.abs().sum() == 0
    assert (edited - stock).abs().max() > 1e-3  # planted entities: the op edited
    assert on.history.abs().sum() > 0  # and the history filled
    assert family_of(_model(name)) is family


def test_flux2_reference_tokens_are_excluded():
    """FLUX.2 with reference-image tokens after the image: text_image_excluded, grid = the generated image only."""
    calls = []
    family, stock, plain, edited, off, on = _run("flux2", calls, refs=5)
    torch.testing.assert_close(plain, stock, atol=ATOL, rtol=1e-5)
    rows = _edited_rows(calls[len(calls) // 2:], H * W)
    assert all(r and T <= min(r) and max(r) < T + H * W for r in rows), rows  # never the reference rows
    assert (edited - stock).abs().max() > 1e-3 and on.history.shape == (B, E, H * W)


def _model(name):
    return BUILDERS[name]()[0]


def test_layouts_and_blocks():
    assert {n: f.layout for n, f in FAMILIES.items()} == {
        "flux1": "text_image", "sd3": "image_text", "qwenimage": "text_image", "flux2": "text_image_excluded"}
    t = _model("flux2")
    procs = FAMILIES["flux2"].processors(t)
    assert [type(p).__name__ for p in procs] == ["Flux2DeLeakerProcessor", "Flux2SingleDeLeakerProcessor"]
    assert [p.attrs for p in procs] == [op_schema.node_attributes(0, 2, 2), op_schema.node_attributes(1, 2, 2)]


def test_unsupported_transformer_is_one_line(tmp_path):
    with pytest.raises(UnsupportedModel) as e:
        family_of(torch.nn.Linear(2, 2))
    msg = str(e.value)
    assert "\n" not in msg and "Linear" in msg and "sd3 (SD3Transformer2DModel)" in msg
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text('{"_class_name": "HiDreamImageTransformer2DModel"}')
    with pytest.raises(UnsupportedModel, match="HiDreamImageTransformer2DModel; supported families: flux1"):
        family_of_folder(tmp_path)
    assert family_of_class("SD3Transformer2DModel").name == "sd3"
