"""DeLeaker installed into the tiny SD3 checkpoint's own StableDiffusion3Pipeline (modeling/families).

The tiny SD3 model (python -m deleaker.modeling.tiny_model --family sd3) is loaded by diffusers'
StableDiffusion3Pipeline.from_pretrained, like a real SD3.5 folder. Checks: DeLeaker off (no
request, enabled=False, and after remove) is bit-identical to the stock pipeline (the switch
hands every call to the pipeline's own processor); on, the masks fire on the conditional rows
only (history filled there, zero on the unconditional rows of the CFG batch) and the image moves
by far more than float noise; an unknown pipeline is refused in one line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deleaker.modeling import diffusers_integration as di
from deleaker.runtime.config import DeLeakerConfig

STEPS, H, W = 3, 64, 64
PROMPT = "a cat and a cheetah in a field"
EARLY = DeLeakerConfig(start_aggregating_from=0, start_intervention_from=1, num_steps=STEPS, do_smoothing=False)


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    from deleaker.modeling.tiny_model import build_tiny_family

    return build_tiny_family(tmp_path_factory.mktemp("tiny-sd3") / "model", "sd3")


@pytest.fixture(scope="module")
def sd3(sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def _run(pipe, **kw):
    return pipe(PROMPT, height=H, width=W, num_inference_steps=STEPS, guidance_scale=5.0, max_sequence_length=16,
                generator=torch.Generator().manual_seed(0), output_type="np", **kw).images


def test_off_is_stock_and_on_edits_the_conditional_branch(sd3):
    stock = _run(sd3)
    inst = di.install(sd3, config=EARLY)
    try:
        np.testing.assert_array_equal(_run(sd3), stock)  # installed, no request
        np.testing.assert_array_equal(_run(sd3, joint_attention_kwargs={"deleaker": di.DeLeaker(
            ("cat", "cheetah"), enabled=False)}), stock)
        edited = _run(sd3, joint_attention_kwargs={"deleaker": di.DeLeaker(("cat", "cheetah"))})
        hist = inst.history  # [2, E, I]: the CFG batch [unconditional ; conditional]
        assert hist.shape[0] == 2 and hist[0].abs().sum() == 0 and hist[1, :2].abs().sum() > 0
        assert hist[1, 2:].abs().sum() == 0  # unused slots stay inactive
        assert np.abs(edited - stock).max() > 1e-3
    finally:
        di.remove(sd3)
    np.testing.assert_array_equal(_run(sd3), stock)  # removed: the stock pipeline again


def test_entity_not_in_prompt_and_unknown_pipeline_are_one_line(sd3):
    from deleaker.runtime.tokens import EntityError

    di.install(sd3, config=EARLY)
    try:
        with pytest.raises(EntityError, match="zebra"):
            _run(sd3, joint_attention_kwargs={"deleaker": di.DeLeaker(("cat", "zebra"))})
        with pytest.raises(di.IntegrationError, match="already installed"):
            di.install(sd3)
    finally:
        di.remove(sd3)

    class Other:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(di.IntegrationError) as e:
        di.install(Other())
    assert "\n" not in str(e.value) and "supported families: flux1 (FluxTransformer2DModel)" in str(e.value)
