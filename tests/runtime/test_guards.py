"""Bad input caught up front, in one line: request types, options checked before a model loads,
float32 limits, broken artifact manifests and scheduler configs, and the --compare note."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from deleaker.runtime.artifact import ArtifactError, load_artifact
from deleaker.runtime.cli import main
from deleaker.runtime.config import ConfigError, DeLeakerConfig
from deleaker.runtime.pipeline import GenerateRequest, RequestError, check_request, load_pipeline
from deleaker.runtime.scheduler import FlowMatchEuler, SchedulerError

PROMPT = "a cat and a cheetah in a field"


def _req(**kw):
    base = dict(prompt=PROMPT, entities=("cat", "cheetah"), steps=2, height=32, width=32)
    base.update(kw)
    return GenerateRequest(**base)


@pytest.mark.parametrize("kw, message", [
    (dict(deleaker="no"), "deleaker must be True or False, got str 'no'"),
    (dict(deleaker=1), "deleaker must be True or False, got int"),
    (dict(guidance_scale=1e38), "guidance_scale must be a finite number in [0, 3.403e+35]"),
    (dict(guidance_scale=True), "guidance_scale"),
    (dict(prompt="\ud800 cat"), "prompt is not valid Unicode"),
    (dict(entities={"cat": 1}), "entities must be a list"),
    (dict(config=DeLeakerConfig(k_strength=1e39)), "k_strength must be a finite number within float32 range"),
    (dict(config=DeLeakerConfig(do_smoothing="no")), "do_smoothing must be True or False"),
    (dict(config=DeLeakerConfig(start_intervention_from=2 ** 40)), "start_intervention_from must be an integer <="),
    (dict(config=DeLeakerConfig(start_aggregating_from=1.5)), "start_aggregating_from must be an integer"),
])
def test_request_checks_need_no_model(kw, message):
    with pytest.raises(ValueError) as exc:
        check_request(_req(**kw))
    assert message in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


def test_guidance_limit_is_the_float32_one():
    check_request(_req(guidance_scale=3e35))  # x 1000 is still finite in float32
    with pytest.raises(RequestError):
        check_request(_req(guidance_scale=float(np.finfo(np.float32).max) / 999))


def test_load_pipeline_checks_options_before_loading():
    """A folder that does not exist would fail the load: the option errors must come first."""
    missing = "/nonexistent/flux"
    with pytest.raises(ValueError, match="device must be cpu, cuda or cuda:N, got 'tpu'"):
        load_pipeline(missing, device="tpu")
    with pytest.raises(ConfigError, match="config must be a DeLeakerConfig, got str"):
        load_pipeline(missing, config="flux-dev")
    with pytest.raises(ValueError, match="max_batch must be a positive integer"):
        load_pipeline(missing, max_batch=0)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return load_pipeline(str(tiny_model_dir), progress=False)


def test_api_types(pipe):
    with pytest.raises(RequestError, match="requests must be a GenerateRequest or a list of them, got dict"):
        pipe.generate({"prompt": PROMPT})
    with pytest.raises(RequestError, match="deleaker must be True or False"):
        pipe.generate(_req(deleaker="no"))
    # entities=None is documented as "no entities"
    r = pipe.generate(_req(entities=None, steps=1, height=16, width=16))
    assert r.request.entities == () and r.image.shape == (16, 16, 3)


def test_non_finite_latents_are_an_error_not_a_black_image(pipe, monkeypatch):
    """A model that overflows gives NaN latents: the pipeline refuses them instead of writing black."""
    be = pipe.backend
    real = be.start_session

    def nan_session(inputs):
        s = real(inputs)
        step = s.step

        def poisoned(i):
            step(i)
            s.x = s.x * float("nan")
        s.step = poisoned
        return s
    monkeypatch.setattr(be, "start_session", nan_session)
    with pytest.raises(ValueError, match="denoised latents hold NaN or inf"):
        pipe.generate(_req(steps=1, height=16, width=16))


@pytest.mark.parametrize("extra, message", [
    (["--device", "tpu"], "device must be cpu, cuda or cuda:N, got 'tpu'"),
    (["--steps", "0"], "steps must be an integer in [1, 1000]"),
    (["--steps", "1001"], "steps must be an integer in [1, 1000]"),
    (["--guidance", "1e38"], "guidance_scale must be a finite number in"),
    (["--prompt", "\udcff"], "prompt is not valid Unicode"),
])
def test_generate_checks_options_before_loading(tmp_path, capsys, extra, message):
    """--model names a folder that does not exist: the option's error must come first."""
    out = tmp_path / "x.png"
    args = ["generate", "--model", str(tmp_path / "no-model"), "--prompt", PROMPT, "--entities", "cat,cheetah",
            "--out", str(out), "--quiet", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deleaker: error:") and message in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_generate_checks_the_models_size_rule_before_loading(tmp_path, capsys, monkeypatch):
    """The size rule is the model's own (the embedded model: multiples of 4 pixels, VAE factor 2 x patch 2),
    read from its folder before the weights load: the error comes without loading anything."""
    import deleaker.runtime.backends as backends

    monkeypatch.setattr(backends, "load_backend", lambda *a, **k: pytest.fail("loaded a model"))
    out = tmp_path / "x.png"
    assert main(["generate", "--prompt", "a red plain circle", "--height", "30", "--width", "40", "--out", str(out),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("deleaker: error: size 40x30: width and height must be positive multiples of 4 pixels for this "
                   "model (one image token: VAE scale factor 2 x patch 2); nearest valid: 40x28"), err
    assert list(tmp_path.iterdir()) == []


def _manifest(tmp_path, edit):
    m = {"format": "deleaker-artifact", "format_version": 2,
         "model": {"in_channels": 64, "latent_channels": 16, "vae_scale_factor": 8, "vae_scaling_factor": 0.36,
                   "vae_shift_factor": 0.11, "max_text_tokens": 64, "clip_max_length": 77, "entity_slots": 3,
                   "guidance_embeds": True, "blocks_per_step": 4,
                   "scheduler_config": dict(FlowMatchEuler.flux_dev().config.to_dict())},
         "models": {}, "backends": {"onnxruntime": {}}, "files": {}, "tokenizers": {}, "profiles": {"image_side": [32, 128]},
         "deleaker": {"config": {}, "op_version": 2}}
    edit(m)
    root = tmp_path / "art"
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps(m))
    return root


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["model"].pop("in_channels"), "model.in_channels is missing"),
    (lambda m: m["model"].update(entity_slots="3"), "model.entity_slots must be a positive integer, got '3'"),
    (lambda m: m["model"]["scheduler_config"].update(shift="three"),
     "model.scheduler_config: scheduler option shift must be a finite number, got 'three'"),
    (lambda m: m["profiles"].update(image_side=[64]), "profiles.image_side must be [min, max]"),
])
def test_broken_manifest_is_one_line_naming_file_and_field(tmp_path, capsys, edit, message):
    root = _manifest(tmp_path, edit)
    with pytest.raises(ArtifactError) as exc:
        load_artifact(root)
    msg = str(exc.value)
    assert message in msg and str(root / "manifest.json") in msg and "\n" not in msg, msg
    out = tmp_path / "x.png"
    assert main(["generate", "--artifact", str(root), "--prompt", PROMPT, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_checkpoint_scheduler_config_with_a_string_shift(tiny_model_dir, tmp_path, capsys):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, ckpt)
    p = ckpt / "scheduler" / "scheduler_config.json"
    cfg = json.loads(p.read_text())
    cfg["shift"] = "3.0"
    p.write_text(json.dumps(cfg))
    out = tmp_path / "x.png"
    assert main(["generate", "--model", str(ckpt), "--prompt", PROMPT, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(p) in err and "shift must be a finite number, got '3.0'" in err, err
    with pytest.raises(SchedulerError):
        FlowMatchEuler.from_config({"use_dynamic_shifting": "yes"})


def test_compare_says_when_deleaker_edited_nothing(tiny_model_dir, tmp_path, caplog):
    """--compare on the random-weight tiny model: the flux-dev preset smooths every mask away, the
    images are equal, and the log line says so (README: `--preset tiny` turns smoothing off)."""
    out = tmp_path / "both.png"
    with caplog.at_level(logging.INFO, logger="deleaker"):
        assert main(["generate", "--model", str(tiny_model_dir), "--prompt", PROMPT, "--entities", "cat,cheetah",
                     "--steps", "8", "--height", "32", "--width", "32", "--compare", "--out", str(out),
                     "--quiet"]) == 0
    lines = [r.getMessage() for r in caplog.records if "DeLeaker vs vanilla" in r.getMessage()]
    assert lines and "max 0" in lines[0] and "DeLeaker edited nothing here" in lines[0] and "smoothing" in lines[0], lines
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deleaker"):
        assert main(["generate", "--model", str(tiny_model_dir), "--prompt", PROMPT, "--entities", "cat,cheetah",
                     "--steps", "8", "--height", "32", "--width", "32", "--compare", "--preset", "tiny",
                     "--out", str(out), "--quiet"]) == 0
    lines = [r.getMessage() for r in caplog.records if "DeLeaker vs vanilla" in r.getMessage()]
    assert lines and "edited nothing" not in lines[0], lines
