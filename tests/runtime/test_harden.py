"""Models and artifacts that lie, text the checks missed, bodies that crashed the parser, outputs
written into inputs: each refused with one line (and nothing computed or written)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from support.input_audit import Scratch, _broken_model, write_io_artifact
from deleaker.runtime.cli import main

PROMPT = "a cat and a cheetah in a field"


def _broken(tmp_path, tiny_model_dir, how) -> Path:
    _broken_model(how)(tmp_path, Scratch(tmp_path, tiny_model_dir))
    return tmp_path / "model"


@pytest.mark.parametrize("how, message", [
    ("swapped encoder weights", "text_encoder: weights do not match CLIPTextModel: model.safetensors lacks"),
    ("swapped encoder folders", "text_encoder: .*config.json describes architectures \\['T5EncoderModel'\\]"),
    ("transformer tensor missing", "transformer: weights do not match FluxTransformer2DModel: "
                                   "diffusion_pytorch_model.safetensors lacks 1 of the model's tensors: "),
    ("transformer file cut short", "transformer: diffusion_pytorch_model.safetensors is truncated"),
])
def test_broken_model_folder_is_refused_fast_before_any_step(tmp_path, tiny_model_dir, how, message):
    """A folder that would load 'with warnings' (random weights) is refused in one line, in well
    under 5 s, before a backend exists (so before any step)."""
    from deleaker.modeling.checkpoint import CheckpointError, load_checkpoint
    from deleaker.runtime import load_pipeline

    model = _broken(tmp_path, tiny_model_dir, how)
    load_checkpoint(tiny_model_dir)  # imports and library warm-up out of the timing
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=message) as exc:
        load_pipeline(str(model), progress=False)
    seconds = time.perf_counter() - t0
    assert "\n" not in str(exc.value) and str(model) in str(exc.value)
    assert seconds < 5.0, f"refused after {seconds:.2f}s"
    print(f"{how}: refused in {seconds:.2f}s: {str(exc.value)[:160]}")


def test_weight_mismatch_names_at_most_three_tensors(tmp_path, tiny_model_dir):
    from deleaker.modeling.checkpoint import CheckpointError, load_checkpoint

    model = _broken(tmp_path, tiny_model_dir, "swapped encoder weights")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(model)
    msg = str(exc.value)
    assert "(+33 more)" in msg and "(+18 more)" in msg  # 36 missing, 21 unexpected: three named each


def test_dtype_kind_mismatch_is_refused(tmp_path, tiny_model_dir):
    """A float weight stored as integers loads silently cast; strict loading names it."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from deleaker.modeling.checkpoint import CheckpointError, open_checkpoint

    model = tmp_path / "model"
    Scratch(tmp_path, tiny_model_dir).model_copy(tmp_path)
    f = model / "vae" / "diffusion_pytorch_model.safetensors"
    t = load_file(f)
    key = sorted(t)[0]
    t[key] = t[key].astype(np.int32)
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"stores 1 tensor\\(s\\) in a dtype the model cannot take: {key} I32"):
        open_checkpoint(model).load_vae()


def test_cli_broken_model_exits_2_with_one_line(tmp_path, tiny_model_dir, capsys):
    model = _broken(tmp_path, tiny_model_dir, "transformer tensor missing")
    out = tmp_path / "x.png"
    rc = main(["generate", "--model", str(model), "--prompt", PROMPT, "--entities", "cat,cheetah", "--steps", "2",
               "--height", "32", "--width", "32", "--out", str(out), "--quiet"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ": error:" in ln]
    assert rc == 2 and len(err) == 1 and "lacks 1 of the model's tensors" in err[0] and not out.exists()


def test_nan_at_the_first_step_names_the_model_and_the_step(tiny_model_dir, monkeypatch):
    from deleaker.runtime import GenerateRequest, load_pipeline

    pipe = load_pipeline(str(tiny_model_dir), progress=False)
    be = pipe.backend
    real = be.start_session
    steps_run = []

    def nan_session(inputs):
        s = real(inputs)
        step = s.step

        def poisoned(i):
            step(i)
            steps_run.append(i)
            s.x = s.x * float("nan")
        s.step = poisoned
        return s
    monkeypatch.setattr(be, "start_session", nan_session)
    with pytest.raises(ValueError, match=f"NaN or inf after step 1 of 5 .*model {tiny_model_dir} gives non-finite"):
        pipe.generate(GenerateRequest(prompt=PROMPT, steps=5, height=16, width=16))
    assert steps_run == [0]  # stopped after the first step, not after all five


# -- artifacts whose manifest lies ----------------------------------------------------------------


@pytest.mark.parametrize("edit, graph, message", [
    (lambda m: m["model"].update(entity_slots=3), {}, "entity_tokens axis 1 \\(E\\) is 4 in the graph but 3"),
    (lambda m: m["model"].update(max_text_tokens=32), {}, "axis 1 \\(T\\) is 64 in the graph but 32"),
    (lambda m: m["backends"]["onnxruntime"].update(text_encoder="text_encoder_2.onnx",
                                                   text_encoder_2="text_encoder.onnx"), {},
     "text_encoder: input input_ids axis 1 \\(L\\) is 64 in the graph but 77"),
    (lambda m: m["backends"]["onnxruntime"].update(transformer="../outside.onnx"), {},
     "backends.onnxruntime.transformer '../outside.onnx' points outside the artifact folder"),
    (lambda m: m["files"].update({"/etc/passwd": 1}), {}, "must be a relative path inside the artifact"),
])
def test_artifact_that_disagrees_with_its_graphs_is_refused_at_open(tmp_path, tiny_model_dir, edit, graph, message,
                                                                    caplog):
    from deleaker.runtime.artifact import ArtifactError
    from deleaker.runtime.backends import load_backend

    (tmp_path / "outside.onnx").write_bytes(b"not read")
    art = write_io_artifact(tmp_path / "art", tiny_model_dir, graph, edit)
    with pytest.raises(ArtifactError, match=message) as exc:
        load_backend("onnxruntime", str(art))
    assert "\n" not in str(exc.value)


def test_matching_io_artifact_opens_and_each_mismatch_is_one_log_line(tmp_path, tiny_model_dir, caplog):
    from deleaker.runtime.artifact import ArtifactError
    from deleaker.runtime.backends import load_backend

    be = load_backend("onnxruntime", str(write_io_artifact(tmp_path / "ok", tiny_model_dir)))
    assert set(be.models) == {"transformer", "text_encoder", "text_encoder_2", "vae_decoder"}
    art = write_io_artifact(tmp_path / "bad", tiny_model_dir, {}, lambda m: m["model"].update(entity_slots=3))
    with caplog.at_level("ERROR", logger="deleaker"), pytest.raises(ArtifactError, match="and 2 more, logged above"):
        load_backend("onnxruntime", str(art))
    assert len([r for r in caplog.records if "(E) is 4 in the graph but 3" in r.getMessage()]) == 3


def test_verify_runs_the_same_graph_check(tmp_path, tiny_model_dir):
    from deleaker.export.verify import check_graphs
    from deleaker.runtime.artifact import ArtifactError, load_artifact

    check_graphs(load_artifact(write_io_artifact(tmp_path / "ok", tiny_model_dir)))
    art = write_io_artifact(tmp_path / "bad", tiny_model_dir, {}, lambda m: m["model"].update(entity_slots=3))
    with pytest.raises(ArtifactError, match="entity_tokens axis 1 \\(E\\) is 4 in the graph but 3"):
        check_graphs(load_artifact(art))


# -- prompt text policy -----------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, named", [
    ("a red striped circle \U0001F600", "U+1F600"),
    ("a red striped circle!", "U+0021"),
    ("a red striped circle; a blue dotted square", "U+003B"),
    ("a red striped circle ,a blue dotted square", "U+002C"),
    ("a red \u202e striped circle", "U+202E"),
    ("a red striped circle 2", "'2'"),
])
def test_default_model_checks_every_character(tmp_path, capsys, prompt, named):
    out = tmp_path / "x.png"
    rc = main(["generate", "--prompt", prompt, "--out", str(out), "--quiet", "--steps", "1"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ": error:" in ln]
    assert rc == 2 and len(err) == 1 and named in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("text, code", [("\u202e", "U+202E"), ("\u2066", "U+2066"), ("\x07", "U+0007"),
                                        ("\x1b[31m", "U+001B"), ("\x85", "U+0085")])
def test_any_model_refuses_control_and_bidi_characters(text, code):
    from deleaker.runtime import GenerateRequest
    from deleaker.runtime.pipeline import check_request

    with pytest.raises(ValueError, match=f"prompt holds a .*character {re.escape(code)}"):
        check_request(GenerateRequest(prompt=f"a cat {text} and a cheetah"))
    with pytest.raises(ValueError, match=f"entity 1 .* holds a .*character {re.escape(code)}"):
        check_request(GenerateRequest(prompt="a cat and a cheetah", entities=("cat", f"chee{text}tah")))
    check_request(GenerateRequest(prompt="a cat\tand a\ncheetah"))  # tab and line breaks are white space


def test_entity_echo_is_bounded(tiny_model_dir):
    from deleaker.runtime import GenerateRequest, load_pipeline

    pipe = load_pipeline(str(tiny_model_dir), progress=False)
    with pytest.raises(ValueError) as exc:
        pipe.check(GenerateRequest(prompt=PROMPT, entities=("cat", "z" * 50_000), steps=1, height=16, width=16))
    assert len(str(exc.value)) < 400


# -- HTTP body parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [9, 200, 5_000, 30_000])
def test_deep_json_is_a_400_naming_the_body(depth):
    from deleaker.runtime.serve.app import parse_body
    from deleaker.runtime.serve.schema import FieldError

    raw = b'{"prompt": "a cat", "user": ' + b"[" * depth + b"]" * depth + b"}"
    with pytest.raises(FieldError) as exc:
        parse_body(raw, "application/json")
    assert exc.value.field == "body" and "nest" in str(exc.value)


# -- outputs ----------------------------------------------------------------------------------------


def test_eval_out_in_the_model_folder_is_refused(tmp_path, tiny_model_dir, capsys):
    from deleaker.eval.cli import main as eval_main

    model = tmp_path / "model"
    Scratch(tmp_path, tiny_model_dir).model_copy(tmp_path)
    before = sorted(p.relative_to(model) for p in model.rglob("*"))
    for out in (model, model / "vae" / "run"):
        rc = eval_main(["--quiet", "run", "--model", str(model), "--steps", "1", "--height", "32", "--width", "32",
                        "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and "the --model / --artifact folder" in err, err
    assert sorted(p.relative_to(model) for p in model.rglob("*")) == before


def test_generate_out_inside_the_model_is_refused(tmp_path, tiny_model_dir, capsys):
    model = tmp_path / "model"
    Scratch(tmp_path, tiny_model_dir).model_copy(tmp_path)
    rc = main(["generate", "--model", str(model), "--prompt", PROMPT, "--out", str(model / "x.png"), "--quiet"])
    assert rc == 2 and "lies inside the --model folder" in capsys.readouterr().err
    assert not (model / "x.png").exists()


def test_bench_out_is_the_model_folder_refused(tmp_path, tiny_model_dir, capsys):
    from deleaker.benchmarks.cli import main as bench_main

    rc = bench_main(["--model", str(tiny_model_dir), "--out", str(tiny_model_dir / "bench"), "--quiet"])
    assert rc == 2 and "lies inside the --model folder" in capsys.readouterr().err
    assert not (tiny_model_dir / "bench").exists()


def test_longest_valid_out_name_is_written_and_fsynced(tmp_path, monkeypatch):
    """A 255-byte file name works (the temp name no longer grows with it); file and folder are fsynced."""
    import numpy as np

    from deleaker.runtime import outputs
    from deleaker.runtime.images import save_png

    synced = []
    real = os.fsync
    monkeypatch.setattr(outputs.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    path = tmp_path / ("x" * 251 + ".png")
    save_png(np.zeros((4, 4, 3), np.uint8), path)
    assert path.is_file() and sorted(os.listdir(tmp_path)) == [path.name]
    assert any(s.endswith(".deleaker-tmp-" + s.rsplit("-", 2)[-2] + "-" + s.rsplit("-", 1)[-1]) for s in synced[:1])
    assert synced[-1] == str(tmp_path)


def test_export_temp_folder_names_fit_beside_any_name(tmp_path):
    from deleaker.export.out_folder import publish, temp_folder

    out = tmp_path / ("a" * 255)
    tmp = temp_folder(out)
    assert len(tmp.name.encode()) < 100
    (tmp / "manifest.json").write_text("{}")
    publish(tmp, out)
    assert (out / "manifest.json").is_file()


# -- the Python API ---------------------------------------------------------------------------------


def test_load_pipeline_of_a_number_is_a_value_error():
    from deleaker.runtime import load_pipeline

    with pytest.raises(ValueError, match="model must be a folder path"):
        load_pipeline(123)
    with pytest.raises(ValueError, match="artifact must be a folder path"):
        load_pipeline(artifact=4.5)


def test_generate_progress_must_be_a_bool_or_callable(tiny_model_dir):
    from deleaker.runtime import GenerateRequest, load_pipeline

    pipe = load_pipeline(str(tiny_model_dir), progress=False)
    with pytest.raises(ValueError, match="progress must be None, True/False or a callable"):
        pipe.generate(GenerateRequest(prompt=PROMPT, steps=1, height=16, width=16), progress="yes")
