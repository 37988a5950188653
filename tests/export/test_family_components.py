"""The families' text encoders and VAE decoders exported to ONNX (export/family_components.py) and
run in ONNX Runtime inside the family's own diffusers pipeline (modeling/families/onnx_components.py).

Tolerances (float32 on both sides; the differences are reduction orders, measured 1e-8 to 4e-6):
- each component's outputs within 1e-4 x the reference's largest magnitude. A wrong output is
  far outside it: the neighbouring hidden layer differs by more than 100x the tolerance
  (asserted), and so does the exporter's own translation of a fully masked attention row (a
  left-padded token), which family_components replaces by torch's zero row (asserted on
  Qwen2.5-VL below);
- the pipeline's image within 1e-4 on [0, 1] pixels, the tolerance of the families' ONNX step
  (tests/modeling/test_family_onnx.py).
The torch components are made to raise before the stand-ins are installed, so the pipeline's
image comes from ONNX Runtime alone; remove() gives the torch image back bit for bit.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from deleaker.export import family_components
from deleaker.export.family_components import export_components
from deleaker.modeling.families.onnx_components import MANIFEST, ComponentError
from deleaker.modeling.families.onnx_components import install_components
from deleaker.modeling.tiny_model import ensure_tiny_family

pytest.importorskip("onnxruntime")

REL = 1e-4  # component outputs, relative to the reference's largest magnitude
PIXELS = 1e-4  # pipeline image, [0, 1] pixels
PROMPT = "a cat and a cheetah in a field"


def _pipeline_class(family):
    from diffusers import Flux2Pipeline, QwenImagePipeline, StableDiffusion3Pipeline

    return {"sd3": StableDiffusion3Pipeline, "qwenimage": QwenImagePipeline, "flux2": Flux2Pipeline}[family]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (torch pipeline, folder of exported components), exported once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            pipe = _pipeline_class(family).from_pretrained(str(ensure_tiny_family(family)), dtype=torch.float32)
            pipe.set_progress_bar_config(disable=True)
            folder = tmp_path_factory.mktemp(family)
            comps = export_components(pipe, folder)
            assert all(c.reason is None for c in comps), [(c.name, c.reason) for c in comps]
            cache[family] = (pipe, folder)
        return cache[family]

    return get


def _err(name, got, want) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    err = float(np.abs(got - want).max())
    scale = float(np.abs(want).max())
    print(f"  {name}: max |onnx - torch| = {err:.2e} (largest |torch| {scale:.2f})")
    assert err <= REL * max(scale, 1.0), name
    return err


def _check_layer_is_distinguishable(name, states, k, tol):
    """The neighbouring hidden layer differs by far more than the tolerance: a wrong index fails."""
    gap = float((states[k] - states[k - 1]).abs().max())
    assert gap > 100 * tol, (name, k, gap, tol)


def _vae_inputs(vae, video, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    if video:
        return torch.randn(2, vae.config.z_dim, 1, h, w, generator=g)
    return torch.randn(2, vae.config.latent_channels, h, w, generator=g)


def _compare_vae(pipe, standin, video):
    for h, w in ((8, 8), (6, 10)):  # the example's latent size, and another (the export is dynamic in h, w)
        z = _vae_inputs(pipe.vae, video, h, w)
        with torch.no_grad():
            want = pipe.vae.decode(z, return_dict=False)[0]
        _err(f"vae {list(z.shape)}", standin.decode(z).sample, want)


def _compare_sd3(pipe, standins):
    for name, tok in (("text_encoder", pipe.tokenizer), ("text_encoder_2", pipe.tokenizer_2)):
        ids = tok([PROMPT, "a dog"], padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt").input_ids  # [2, 77]
        with torch.no_grad():
            want = getattr(pipe, name)(ids, output_hidden_states=True)
        got = standins[name](ids, output_hidden_states=True)
        _err(f"{name} [0] (text_embeds)", got[0], want[0])
        _err(f"{name} hidden_states[-2]", got.hidden_states[-2], want.hidden_states[-2])
        _check_layer_is_distinguishable(name, want.hidden_states, len(want.hidden_states) - 2, REL)
    ids = pipe.tokenizer_3([PROMPT, "a dog"], padding="max_length", max_length=256, truncation=True,
                           return_tensors="pt").input_ids  # [2, 256]
    with torch.no_grad():
        want = pipe.text_encoder_3(ids)[0]
    _err("text_encoder_3 [0]", standins["text_encoder_3"](ids)[0], want)
    _compare_vae(pipe, standins["vae"], video=False)


def _compare_decoder_lm(pipe, standin, layers, ids, mask):
    with torch.no_grad():
        want = pipe.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                                 use_cache=False).hidden_states
    got = standin(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for k in layers:
        scale = float(want[k].abs().max())
        _err(f"text_encoder hidden_states[{k}] {list(ids.shape)}", got[k], want[k])
        _check_layer_is_distinguishable("text_encoder", want, k, REL * max(scale, 1.0))


def _compare_qwen(pipe, standins):
    template = pipe.prompt_template_encode
    tokens = pipe.tokenizer([template.format(PROMPT), template.format(" ")], padding=True, return_tensors="pt")
    assert tokens.attention_mask.min() == 0  # two lengths: a right-padded row
    _compare_decoder_lm(pipe, standins["text_encoder"], (-1,), tokens.input_ids, tokens.attention_mask)
    _compare_vae(pipe, standins["vae"], video=True)


def _compare_flux2(pipe, standins):
    g = torch.Generator().manual_seed(0)
    for length in (512, 300):  # the exported length, and a shorter call (padded on the right by the stand-in)
        ids = torch.randint(3, 700, (2, length), generator=g)
        mask = torch.ones(2, length, dtype=torch.int64)
        mask[1, : length // 2] = 0  # left padding, as Flux2Pipeline's tokenizer pads
        _compare_decoder_lm(pipe, standins["text_encoder"], (10, 20, 30), ids, mask)
    _compare_vae(pipe, standins["vae"], video=False)
    bn = standins["vae"].bn
    assert torch.equal(bn.running_mean, pipe.vae.bn.running_mean)
    assert torch.equal(bn.running_var, pipe.vae.bn.running_var)


COMPARE = {"sd3": _compare_sd3, "qwenimage": _compare_qwen, "flux2": _compare_flux2}
FAMILY_PARAMS = ["sd3", "qwenimage", pytest.param("flux2", marks=pytest.mark.slow)]


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_components_match_torch(family, exported):
    pipe, folder = exported(family)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["family"] == family
    print(f"\n{family}: " + ", ".join(f"{c['name']} {c['inputs']}" for c in manifest["components"]))
    handle = install_components(pipe, folder)
    standins = dict(handle.standins)
    handle.remove()  # the pipeline holds its torch components again: the reference
    for name, module in handle.originals.items():
        assert getattr(pipe, name) is module and isinstance(module, torch.nn.Module)
    COMPARE[family](pipe, standins)


def _pipeline_kwargs(family):
    kw = dict(prompt=PROMPT, height=64, width=64, num_inference_steps=2, output_type="np")
    if family == "qwenimage":  # true CFG: the negative prompt " " has another length than the prompt
        kw.update(negative_prompt=" ", true_cfg_scale=4.0)
    if family == "flux2":  # a shorter padded length than the exported 512
        kw.update(max_sequence_length=300)
    return kw


def _raise(name):
    def forbidden(*args, **kwargs):
        raise AssertionError(f"the torch {name} was called")

    return forbidden


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_pipeline_with_standins_matches_torch(family, exported, monkeypatch):
    pipe, folder = exported(family)
    kw = _pipeline_kwargs(family)

    def image():
        return pipe(**kw, generator=torch.Generator().manual_seed(0)).images

    want = image()
    originals = {name: getattr(pipe, name) for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")
                 if getattr(pipe, name, None) is not None}
    with monkeypatch.context() as m:
        for name, module in originals.items():  # the torch components must not run
            m.setattr(module, "forward", _raise(name))
            if name == "vae":
                m.setattr(module, "decode", _raise("vae.decode"))
        handle = install_components(pipe, folder)
        assert set(handle.standins) == set(originals)
        got = image()
        calls = {name: s.calls for name, s in handle.standins.items()}
        handle.remove()
    err = float(np.abs(got - want).max())
    print(f"\n{family}: image max |onnx components - torch| = {err:.2e} on [0, 1] pixels; stand-in calls {calls}")
    assert err <= PIXELS
    assert all(calls.values()), calls
    np.testing.assert_array_equal(image(), want)  # the torch components are back

    # a pipeline loaded without its torch text encoders and VAE at all (what an artifact holds)
    bare = _pipeline_class(family).from_pretrained(str(ensure_tiny_family(family)), dtype=torch.float32,
                                                   **{name: None for name in originals})
    bare.set_progress_bar_config(disable=True)
    install_components(bare, folder)
    got = bare(**kw, generator=torch.Generator().manual_seed(0)).images
    err = float(np.abs(got - want).max())
    print(f"{family}: loaded without torch encoders/VAE: image max |onnx components - torch| = {err:.2e}")
    assert err <= PIXELS


def test_standins_refuse_what_was_not_exported(exported):
    pipe, folder = exported("sd3")
    handle = install_components(pipe, folder)
    try:
        clip, t5, vae = handle.standins["text_encoder"], handle.standins["text_encoder_3"], handle.standins["vae"]
        with pytest.raises(ComponentError, match=r"input_ids of shape \[1, 80\] does not fit .*\['batch', 77\]"):
            clip(torch.zeros(1, 80, dtype=torch.int64))
        out = clip(torch.zeros(1, 77, dtype=torch.int64), output_hidden_states=True)
        with pytest.raises(ComponentError, match=r"hidden_states\[-3\] was not exported \(exported: \[1\] of 3\)"):
            out.hidden_states[-3]
        with pytest.raises(ComponentError, match="only the VAE decoder was exported"):
            vae.encode(torch.zeros(1, 3, 64, 64))
        with pytest.raises(ComponentError, match=r"latents of shape \[1, 4, 8, 8\] does not fit"):
            vae.decode(torch.zeros(1, 4, 8, 8))
        # the pipeline asked for another T5 length than the exported 256: one line naming it
        with pytest.raises(ComponentError, match=r"text_encoder_3: input_ids of shape \[1, 128\] .*\['batch', 256\]"):
            pipe(PROMPT, height=64, width=64, num_inference_steps=1, max_sequence_length=128, output_type="np")
        assert t5.calls == 0
    finally:
        handle.remove()

    other, _ = exported("qwenimage")
    with pytest.raises(ComponentError, match=r"holds sd3 components; this pipeline is qwenimage"):
        install_components(other, folder)

    qwen = install_components(other, exported("qwenimage")[1])
    try:
        lm = qwen.standins["text_encoder"]
        with pytest.raises(ComponentError, match=r"input_ids of shape \[1, 1059\] does not fit .*\['batch', 1058\]"):
            lm(input_ids=torch.zeros(1, 1059, dtype=torch.int64))
    finally:
        qwen.remove()
    other.vae_scale_factor = 16  # as if built without its VAE for a VAE of another scale
    try:
        with pytest.raises(ComponentError, match=r"built for vae_scale_factor 16 .* the exported VAE's is 8"):
            install_components(other, exported("qwenimage")[1])
    finally:
        other.vae_scale_factor = 8
    assert type(other.vae).__name__ == "AutoencoderKLQwenImage"  # refused before anything was swapped


@pytest.mark.slow
def test_fully_masked_rows_follow_torch(exported, tmp_path, monkeypatch):
    """torch's SDPA gives a query row whose keys are all masked (a left-padded token) a zero
    output; the exporter's translation does not. Without family_components' fix the padded
    positions' states miss by far more than the tolerance; with it they are within it."""
    pipe, folder = exported("qwenimage")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 700, (2, 40), generator=g)
    mask = torch.ones(2, 40, dtype=torch.int64)
    mask[1, :10] = 0  # left padding
    with torch.no_grad():
        want = pipe.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    tol = REL * max(float(want.abs().max()), 1.0)

    def last(folder):
        handle = install_components(pipe, folder)
        try:
            return handle.standins["text_encoder"](input_ids=ids, attention_mask=mask).hidden_states[-1]
        finally:
            handle.remove()

    fixed = float((last(folder) - want).abs().max())
    monkeypatch.setattr(family_components, "_sdpa_zero_masked_rows", contextlib.nullcontext)
    export_components(pipe, tmp_path, text_tokens=64, names=("text_encoder",))
    unfixed = last(tmp_path) - want
    print(f"\nleft-padded rows: fixed export {fixed:.2e}, exporter's own translation "
          f"{float(unfixed[1, :10].abs().max()):.2e} (real tokens {float(unfixed[1, 10:].abs().max()):.2e}); "
          f"tolerance {tol:.1e}")
    assert fixed <= tol
    assert float(unfixed[1, :10].abs().max()) > 100 * tol
