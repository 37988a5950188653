"""DeLeaker installed into the tiny SD3 and Qwen-Image checkpoints' own diffusers pipelines.

Each tiny model (python -m deleaker.modeling.tiny_model --family sd3|qwenimage) is loaded by its
pipeline class's from_pretrained, like a real checkpoint folder, and run with classifier-free
guidance (SD3: one batch [unconditional ; conditional]; Qwen-Image: true CFG, a separate
negative-prompt call per step). Checks: DeLeaker off (no request, enabled=False, and after
remove) is bit-identical to the stock pipeline (the switch hands every call to the pipeline's own
processor); on, the masks fire on the conditional branch only (history filled there; SD3's
unconditional rows stay zero; Qwen-Image's negative calls are not counted as steps) and the
image moves by more than 100x the float noise of the op's path (DeLeaker on with no entity: the
op's float32 attention instead of SDPA, < 1e-5 on [0, 1] pixels) and by more than 1e-4; an
unknown pipeline is refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deleaker.modeling import diffusers_integration as di
from support.editing import editing_config

STEPS, H, W = 3, 64, 64
PROMPT = "a cat and a cheetah in a field"
EARLY = editing_config(num_steps=STEPS)


# family: (pipeline class, the call's guidance arguments, the kwargs argument that reaches the processors)
FAMILIES = {
    "sd3": ("StableDiffusion3Pipeline", dict(guidance_scale=5.0, max_sequence_length=16), "joint_attention_kwargs"),
    "qwenimage": ("QwenImagePipeline", dict(negative_prompt="blurry", true_cfg_scale=4.0), "attention_kwargs"),
    "flux2": ("Flux2Pipeline", dict(guidance_scale=4.0, max_sequence_length=64), "attention_kwargs"),
}
_PIPES: dict = {}


def _pipe(name, tmp_path_factory):
    if name not in _PIPES:
        import diffusers

        from deleaker.modeling.tiny_model import build_tiny_family

        folder = build_tiny_family(tmp_path_factory.mktemp(f"tiny-{name}") / "model", name)
        pipe = getattr(diffusers, FAMILIES[name][0]).from_pretrained(str(folder), dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        _PIPES[name] = pipe
    return _PIPES[name]


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return _pipe("sd3", tmp_path_factory)


@torch.no_grad()
def _run(pipe, request=None, name="sd3"):
    from deleaker.modeling.families import FAMILIES as REGISTRY

    _, guidance, key = FAMILIES[name]
    assert key == REGISTRY[name].pipeline_kwargs_name
    extra = {} if request is None else {key: {"deleaker": request}}
    return pipe(prompt=PROMPT, height=H, width=W, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                output_type="np", **guidance, **extra).images


@pytest.mark.parametrize("name", list(FAMILIES))
def test_off_is_stock_and_on_edits_the_conditional_branch(name, tmp_path_factory):
    pipe = _pipe(name, tmp_path_factory)
    stock = _run(pipe, name=name)
    inst = di.install(pipe, config=EARLY)
    try:
        np.testing.assert_array_equal(_run(pipe, name=name), stock)  # installed, no request
        np.testing.assert_array_equal(_run(pipe, di.DeLeaker(("cat", "cheetah"), enabled=False), name), stock)
        inactive = _run(pipe, di.DeLeaker(()), name)  # the op in every block, no entity: its float noise only
        edited = _run(pipe, di.DeLeaker(("cat", "cheetah")), name)
        hist = inst.history  # [B, E, I]
        cond = hist[-1]  # SD3: [unconditional ; conditional]; Qwen-Image: the conditional call's batch
        assert cond[:2].abs().sum() > 0 and cond[2:].abs().sum() == 0  # two live slots, unused ones inactive
        if name == "sd3":
            assert hist.shape[0] == 2 and hist[0].abs().sum() == 0
        else:  # Qwen-Image: the negative calls ran stock, uncounted; FLUX.2: one branch
            assert hist.shape[0] == 1 and inst._call.step == STEPS
        noise = np.abs(inactive - stock).max()
        assert noise < 1e-5 and np.abs(edited - stock).max() > max(1e-4, 100 * noise)
    finally:
        di.remove(pipe)
    np.testing.assert_array_equal(_run(pipe, name=name), stock)  # removed: the stock pipeline again


def test_qwen_padded_prompt_batch_is_one_line(tmp_path_factory):
    pipe = _pipe("qwenimage", tmp_path_factory)
    di.install(pipe, config=EARLY)
    try:
        with pytest.raises(di.IntegrationError, match="give one prompt per call"), torch.no_grad():
            pipe(prompt=[PROMPT, "a dog"], height=H, width=W, num_inference_steps=STEPS,
                 attention_kwargs={"deleaker": di.DeLeaker(("cat",))}, output_type="np")
    finally:
        di.remove(pipe)


def test_entity_not_in_prompt_and_unknown_pipeline_are_one_line(sd3):
    from deleaker.runtime.tokens import EntityError

    di.install(sd3, config=EARLY)
    try:
        with pytest.raises(EntityError, match="zebra"):
            _run(sd3, di.DeLeaker(("cat", "zebra")))
        with pytest.raises(di.IntegrationError, match="already installed"):
            di.install(sd3)
    finally:
        di.remove(sd3)

    class Other:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(di.IntegrationError) as e:
        di.install(Other())
    assert "\n" not in str(e.value) and "supported families: flux1 (FluxTransformer2DModel)" in str(e.value)


def test_deleaker_generate_refuses_another_family_in_one_line(sd3):
    """The FLUX.1 runtime (deleaker generate, export) is pointed at the drop-in, before any weight loads."""
    from deleaker.modeling.checkpoint import CheckpointError, open_checkpoint

    folder = Path(sd3.transformer.config._name_or_path).parent  # the checkpoint folder
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(folder)
    assert "\n" not in str(e.value) and "SD3 / SD3.5 runs through the diffusers drop-in" in str(e.value)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_entity_positions_are_the_entity_tokens_the_transformer_sees(name, tmp_path_factory):
    """The positions DeLeaker marks hold the entity's token ids in the sequence the text encoder
    embeds, at the index the transformer sees them (SD3: CLIP part then T5 part; Qwen-Image: the
    templated prompt less its first 34 tokens)."""
    from deleaker.modeling.families import FAMILIES as REGISTRY
    from deleaker.modeling.families import flux2, qwenimage, sd3

    pipe = _pipe(name, tmp_path_factory)
    hooks = {"sd3": sd3, "qwenimage": qwenimage, "flux2": flux2}[name]
    toks = hooks.tokenizers(pipe, di.IntegrationError)
    texts = hooks.prompt_texts({"prompt": PROMPT})
    if name == "sd3":
        clip = pipe.tokenizer(PROMPT, padding="max_length", max_length=77).input_ids
        t5 = pipe.tokenizer_3(PROMPT, padding="max_length", max_length=16).input_ids
        seen, want = clip + t5, {"cat": [pipe.tokenizer(" cat", add_special_tokens=False).input_ids,
                                         pipe.tokenizer_3("cat", add_special_tokens=False).input_ids],
                                 "cheetah": [pipe.tokenizer("cheetah", add_special_tokens=False).input_ids,
                                             pipe.tokenizer_3("cheetah", add_special_tokens=False).input_ids]}
    elif name == "qwenimage":
        seen = pipe.tokenizer(pipe.prompt_template_encode.format(PROMPT)).input_ids[34:]
        want = {"cat": [pipe.tokenizer(" cat").input_ids], "cheetah": [pipe.tokenizer(" cheetah").input_ids]}
    else:  # the padded chat-templated ids Flux2Pipeline gives its text encoder
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        seen = pipe.tokenizer.apply_chat_template(format_input([PROMPT], pipe.system_message), tokenize=True,
                                                  return_dict=True, padding="max_length", truncation=True,
                                                  max_length=64)["input_ids"][0]
        want = {"cat": [pipe.tokenizer(" cat", add_special_tokens=False).input_ids],
                "cheetah": [pipe.tokenizer(" cheetah", add_special_tokens=False).input_ids]}
    ent = hooks.entity_tokens(toks, texts, ["cat", "cheetah"], 4, len(seen))[0]  # [E, T]
    assert REGISTRY[name].layout in ("image_text", "text_image", "text_image_excluded")
    for e, word in enumerate(("cat", "cheetah")):
        marked = [seen[i] for i in ent[e].nonzero()[0]]
        assert marked == [i for run in want[word] for i in run], (word, marked)
    assert ent[2:].sum() == 0


def test_flux2_reference_image_tokens_are_excluded(tmp_path_factory):
    """FLUX.2 with a reference image: its tokens follow the generated image's in the joint sequence
    (layout text_image_excluded); the grid and the history cover the generated image only."""
    from PIL import Image

    pipe = _pipe("flux2", tmp_path_factory)
    ref = Image.fromarray((np.random.RandomState(0).rand(H, W, 3) * 255).astype(np.uint8))

    @torch.no_grad()
    def run(request=None):
        extra = {} if request is None else {"attention_kwargs": {"deleaker": request}}
        return pipe(prompt=PROMPT, image=[ref], height=H, width=W, num_inference_steps=STEPS, guidance_scale=4.0,
                    max_sequence_length=64, generator=torch.Generator().manual_seed(0), output_type="np",
                    **extra).images

    stock = run()
    inst = di.install(pipe, config=EARLY)
    try:
        np.testing.assert_array_equal(run(), stock)
        inactive = run(di.DeLeaker(()))
        edited = run(di.DeLeaker(("cat", "cheetah")))
        assert tuple(inst.history.shape) == (1, 4, (H // 16) * (W // 16))  # the generated image's tokens only
        assert inst.history[0, :2].abs().sum() > 0
        noise = np.abs(inactive - stock).max()
        assert noise < 1e-5 and np.abs(edited - stock).max() > max(1e-4, 100 * noise)
    finally:
        di.remove(pipe)


@pytest.mark.parametrize("name", ["sd3", "qwenimage"])
def test_family_generate_command(name, tmp_path_factory, tmp_path, capsys):
    """python -m deleaker.modeling.families: the folder's own pipeline with DeLeaker, a PNG, one line."""
    from deleaker.modeling.families.__main__ import main

    folder = Path(_pipe(name, tmp_path_factory).transformer.config._name_or_path).parent
    out = tmp_path / "x.png"
    # 20 steps: the preset's windows (carried over from FLUX.1-dev) start inside the run on 2 blocks per step
    assert main(["--model", str(folder), "--prompt", PROMPT, "--entities", "cat,cheetah", "--out", str(out),
                 "--steps", "20", "--size", "64", "64"]) == 0
    assert out.stat().st_size > 0 and "DeLeaker edited for entities ['cat', 'cheetah']" in capsys.readouterr().out
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(
        '{"_class_name": "HiDreamImagePipeline", "transformer": ["diffusers", "HiDreamImageTransformer2DModel"]}')
    assert main(["--model", str(tmp_path / "other"), "--prompt", "a cat", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "does not support the transformer HiDreamImageTransformer2DModel" in err


def test_tiny_model_command_for_a_family(tmp_path, capsys):
    """python -m deleaker.modeling.tiny_model --family F --out DIR builds that family's folder and prints it."""
    from deleaker.modeling import tiny_model

    assert tiny_model.main(["--family", "sd3", "--out", str(tmp_path / "m")]) == 0
    assert capsys.readouterr().out.strip() == str((tmp_path / "m").resolve())
    assert json.loads((tmp_path / "m" / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    with pytest.raises(SystemExit):  # a flux1 size preset with another family: an argparse error
        tiny_model.main(["--family", "sd3", "--preset", "small"])
    assert "--family sd3 has one size" in capsys.readouterr().err
