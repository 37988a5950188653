"""deleaker-export onnx on the tiny model: the artifact, its graph, and ONNX Runtime vs PyTorch.

One artifact is exported per test session (about half a minute) and shared. It is exported
with external data for every model, so the external-data paths (checker by path, ORT loading)
are what the tests exercise. Op contract v2: the artifact bakes no DeLeaker setting in, so the
one transformer session serves every step count and every setting, mixed within a batch.

Tolerances: the ONNX graph and PyTorch compute the same float32 math in different orders;
one op differs by ~1e-7, one transformer step by ~1e-5 (measured ~5e-6), a whole loop of
8 steps by ~1e-5 (the scheduler is linear in the model output). atol 1e-4 is ~10x that and far
below the DeLeaker effect the tests require (> 1e-3).
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from deleaker.export import onnx_op  # noqa: E402
from deleaker.modeling.checkpoint import open_checkpoint  # noqa: E402
from deleaker.modeling.flux import DeLeakerFlux  # noqa: E402
from deleaker.export.onnx_export import ExportSpec, export_artifact, transformer_example  # noqa: E402
from deleaker.runtime import op_schema, step_io  # noqa: E402
from deleaker.runtime.artifact import FORMAT_VERSION, ArtifactError, load_artifact  # noqa: E402
from deleaker.runtime.config import DeLeakerConfig, preset  # noqa: E402

ATOL = 1e-4
BPS = 4  # the tiny model: 2 double + 2 single blocks
SPEC = ExportSpec(height=64, width=96, min_size=32, max_size=128, max_text_tokens=64, entity_slots=3,
                  external_data=True)  # default DeLeaker settings: the flux-dev preset, 20 steps
# Windows open early and no smoothing: on the tiny model's small grids (and random weights) the
# masks then fire, so "DeLeaker on" really differs from "off".
FIRING = DeLeakerConfig(num_steps=8, start_aggregating_from=2, start_intervention_from=3, do_smoothing=False)
# Another firing setting: other windows (5 steps), thresholds, alpha and rules.
FIRING_2 = DeLeakerConfig(num_steps=5, start_aggregating_from=1, start_intervention_from=2, do_smoothing=False,
                          std_mul_text=0.5, k_strength=2.0, do_image_image=False, do_text_text_weakening=True)


@pytest.fixture(scope="session")
def artifact_dir(tiny_model_dir, tmp_path_factory):
    return export_artifact(tiny_model_dir, tmp_path_factory.mktemp("onnx") / "artifact", SPEC)


def session(model):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------
# The artifact and the graph
# --------------------------------------------------------------------------------------------

def test_artifact_layout_and_manifest(artifact_dir, tiny_model_dir):
    art = load_artifact(artifact_dir)
    m = art.manifest
    assert m["format_version"] == FORMAT_VERSION == 2
    ckpt = open_checkpoint(tiny_model_dir)
    assert m["model"]["blocks_per_step"] == ckpt.blocks_per_step == BPS
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae_decoder"):
        path = art.path("onnxruntime", name)
        assert path.is_file()
        assert m["models"][name]["external_data"] == path.name + ".data"
        assert (path.parent / (path.name + ".data")).is_file()
    assert (artifact_dir / "tokenizer" / "tokenizer.json").is_file()
    assert (artifact_dir / "tokenizer_2" / "tokenizer.json").is_file()
    # every file is listed with its size (what the loader checks for truncation)
    listed = set(m["files"])
    on_disk = {p.relative_to(artifact_dir).as_posix() for p in artifact_dir.rglob("*") if p.is_file()}
    assert listed == on_disk - {"manifest.json"}
    # the transformer's tensors, as the exported graph has them: step_io's names, order and dynamic axes
    t = m["models"]["transformer"]
    assert tuple(t["inputs"]) == step_io.input_names(True)
    assert tuple(t["outputs"]) == step_io.OUTPUT_NAMES
    assert t["inputs"]["hidden_states"]["shape"] == ["batch", "image_tokens", 64]  # dynamic batch and size
    assert t["inputs"]["entity_tokens"]["shape"] == ["batch", 3, 64]
    assert t["inputs"]["windows"] == {"dtype": "int64", "shape": ["batch", 4]}
    assert t["inputs"]["knobs"] == {"dtype": "float32", "shape": ["batch", 3]}
    assert t["inputs"]["rules"] == {"dtype": "int64", "shape": ["batch", 6]}
    assert t["inputs"]["step"] == {"dtype": "int64", "shape": []}
    assert t["outputs"]["history_out"] == {"dtype": "float32", "shape": ["batch", 3, "image_tokens"]}
    # the default form: one op node per block with its function (docs/export.md, "Portable ONNX")
    assert (t["form"], t["runs_on"], t["op_nodes"]) == ("function", "onnxruntime; TensorRT with the deleaker plugin", BPS)
    # the default settings and the op contract; nothing step-count specific
    assert m["deleaker"] == {"config": dataclasses.asdict(preset("flux-dev")),
                             "op_version": op_schema.ONNX_OPSET_VERSION}
    assert art.default_config() == preset("flux-dev") == SPEC.deleaker
    assert m["profiles"]["batch"] == [1, 1, SPEC.max_batch]
    assert m["profiles"]["image_side"] == [32, 128]
    info = art.model_info()
    assert (info.entity_slots, info.max_text_tokens, info.size_range) == (3, 64, (32, 128))
    assert info.default_config == dataclasses.asdict(preset("flux-dev"))
    assert not hasattr(info, "deleaker_steps")


def test_transformer_graph_has_one_op_node_per_block(artifact_dir):
    path = load_artifact(artifact_dir).path("onnxruntime", "transformer")
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    nodes = [n for n in model.graph.node if onnx_op.is_op_node(n)]
    assert len(nodes) == BPS
    graph_inputs = {i.name for i in model.graph.input}
    offsets = []
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        # structural attributes only: no window, threshold or rule is baked into the node
        assert attrs.pop("plugin_namespace") == op_schema.PLUGIN_NAMESPACE.encode()
        assert attrs.pop("plugin_version") == op_schema.PLUGIN_VERSION.encode()
        assert attrs == op_schema.node_attributes(attrs["block_offset"], BPS)
        ins = list(node.input)
        assert len(ins) == len(op_schema.INPUTS)
        assert ins[3] == "entity_tokens" and ins[5:] == ["step", "grid", "windows", "knobs", "rules"]
        assert set(ins[5:]) <= graph_inputs  # the settings come straight from the step's inputs
        offsets.append(attrs["block_offset"])
    assert sorted(offsets) == list(range(BPS))
    # no attention left outside the op: the graph has no Softmax of its own
    assert not [n for n in model.graph.node if n.op_type == "Softmax"]
    (fn,) = model.functions
    assert (fn.domain, fn.name) == (op_schema.ONNX_DOMAIN, op_schema.OP_NAME)
    assert tuple(fn.input) == op_schema.INPUT_NAMES
    assert {d for d, _ in onnx_op.function_body_op_types(fn)} <= {""}
    assert {o.domain: o.version for o in model.opset_import}[op_schema.ONNX_DOMAIN] == op_schema.ONNX_OPSET_VERSION


# --------------------------------------------------------------------------------------------
# One step: transformer.onnx vs DeLeakerFlux, one session for every setting
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_transformer(tiny_model_dir):
    return open_checkpoint(tiny_model_dir).load_transformer("float32")


@pytest.fixture(scope="module")
def transformer_session(artifact_dir):
    return session(str(load_artifact(artifact_dir).path("onnxruntime", "transformer")))


def _step_inputs(transformer, configs, height, width, step, seed=0):
    torch.manual_seed(seed)
    x = transformer_example(transformer, ExportSpec(height=height, width=width, max_text_tokens=64, entity_slots=3,
                                                    min_size=16, max_size=4096), batch=len(configs), configs=configs)
    x["entity_tokens"][:, 2, 10:12] = 1  # three active slots (E=3 pairs)
    x["history"] = torch.rand(x["history"].shape) * 0.05
    x["step"] = torch.tensor(step)
    return x


def _ort_run(sess, x):
    return sess.run(None, {k: v.numpy() for k, v in x.items()})


@pytest.mark.parametrize("config_name", ["default", "firing"])
def test_one_step_matches_torch(transformer_session, tiny_transformer, config_name):
    """The same session for the artifact's default settings (20 steps) and for a firing setting (8 steps)."""
    if config_name == "default":
        cfg = SPEC.deleaker
        steps = (2, 4, 25)  # tau 8..11 (history only), 16..19 (crosses i0 = 18), 100.. (after i1 = 80)
    else:
        cfg, steps = FIRING, (1, 3)
    flux = DeLeakerFlux(copy.deepcopy(tiny_transformer))
    fired = 0
    for B, (height, width) in ((2, (64, 96)), (1, (128, 48))):  # dynamic batch and non-square sizes
        for step in steps:
            x = _step_inputs(tiny_transformer, [cfg] * B, height, width, step)
            with torch.no_grad():
                want, want_h = flux(**_flux_args(x))
                plain, _ = flux(**_flux_args({**x, "entity_tokens": torch.zeros_like(x["entity_tokens"])}))
            got, got_h = _ort_run(transformer_session, x)
            np.testing.assert_allclose(got, want.numpy(), atol=ATOL, rtol=ATOL)
            np.testing.assert_allclose(got_h, want_h.numpy(), atol=1e-6, rtol=1e-5)
            fired += float((want - plain).abs().max()) > 1e-3
    if config_name == "firing":
        assert fired == 4, "the DeLeaker edits never changed the output: the test would not catch errors"


def test_portable_form_has_no_reorder_for_text_image(artifact_dir, tiny_transformer, tmp_path):
    """FLUX.1's layout (text_image) is the canonical order: inlined per layout (what `--portable`
    writes), the graph has none of the body's reorder nodes (the gathers to the canonical order,
    the scatter back, the layout table), the general body's inlining has them in every block, and
    the outputs of one firing step are the function form's (the dropped gather is exact)."""
    import shutil

    from deleaker.export import onnx_portable

    src = load_artifact(artifact_dir).path("onnxruntime", "transformer")
    for f in src.parent.glob("transformer.onnx*"):  # the graph and its external data
        shutil.copy(f, tmp_path / f.name)
    model = onnx.load(str(src), load_external_data=False)

    def reorder(graph):  # named by the body (export/onnx_op.py); the inliner keeps the names as prefixes
        return sum(any(o.startswith(("dl_to_canonical", "dl_to_model_order", "dl_layouts")) for o in n.output)
                   for n in graph.node)

    general, portable = onnx_portable.inline_op(model), onnx_portable.inline_op(model, num_slots=SPEC.entity_slots)
    assert reorder(general.graph) == 5 * BPS and reorder(portable.graph) == 0
    print(f"portable transformer nodes: {len(general.graph.node)} with the general body, "
          f"{len(portable.graph.node)} per layout")
    outs = []
    for name, m in (("general", general), ("portable", portable)):
        onnx.save(m, str(tmp_path / f"{name}.onnx"))
        outs.append(session(str(tmp_path / f"{name}.onnx")))
    x = _step_inputs(tiny_transformer, [FIRING] * 2, 64, 96, 3)
    want = _ort_run(transformer_session_of(src), x)
    plain = _ort_run(outs[1], {**x, "entity_tokens": torch.zeros_like(x["entity_tokens"])})
    assert np.abs(want[0] - plain[0]).max() > 1e-3  # the step edits
    for sess in outs:
        for got, w in zip(_ort_run(sess, x), want):
            np.testing.assert_allclose(got, w, atol=1e-6, rtol=0)


def transformer_session_of(path):
    return session(str(path))


def _flux_args(x: dict) -> dict:
    """DeLeakerFlux.forward's arguments from step inputs (guidance None for models without it)."""
    return {**x, "guidance": x.get("guidance")}


def test_one_step_mixed_settings_batch_equals_each_alone(transformer_session, tiny_transformer):
    """One batch, three settings (two firing ones with different windows and knobs, the default not
    yet intervening): each sample gets what it gets alone, and what torch computes."""
    configs = [FIRING, FIRING_2, SPEC.deleaker]
    x = _step_inputs(tiny_transformer, configs, 64, 96, step=2, seed=4)  # tau 8..11: both FIRING inside
    got, got_h = _ort_run(transformer_session, x)
    flux = DeLeakerFlux(copy.deepcopy(tiny_transformer))
    with torch.no_grad():
        want, want_h = flux(**_flux_args(x))
    np.testing.assert_allclose(got, want.numpy(), atol=ATOL, rtol=ATOL)
    np.testing.assert_allclose(got_h, want_h.numpy(), atol=1e-6, rtol=1e-5)
    batched = {"img_ids", "txt_ids", "step", "grid"}
    for b in range(3):
        alone = {k: v if k in batched else v[b:b + 1] for k, v in x.items()}
        a, a_h = _ort_run(transformer_session, alone)
        np.testing.assert_allclose(got[b:b + 1], a, atol=ATOL, rtol=ATOL)
        np.testing.assert_allclose(got_h[b:b + 1], a_h, atol=1e-6, rtol=1e-5)
    # the settings are really per sample: sample 1 under sample 0's settings comes out different
    swapped = {**x, **{n: torch.cat([x[n][:1], x[n][:1], x[n][2:]]) for n in op_schema.SETTINGS_TENSORS}}
    other, _ = _ort_run(transformer_session, swapped)
    assert np.abs(other[1] - got[1]).max() > 1e-3
    np.testing.assert_allclose(other[0], got[0], atol=ATOL, rtol=ATOL)


# --------------------------------------------------------------------------------------------
# The whole loop: the public Pipeline API on onnxruntime vs torch
# --------------------------------------------------------------------------------------------

def test_generation_matches_torch_backend(artifact_dir, tiny_model_dir):
    """One artifact, requests with different step counts and settings in one call, DeLeaker on
    and off: the onnxruntime backend gives what the torch backend gives."""
    from deleaker.runtime.backends import load_backend
    from deleaker.runtime.pipeline import GenerateRequest, Pipeline

    backends = {"onnxruntime": load_backend("onnxruntime", str(artifact_dir), progress=False),
                "torch": load_backend("torch", str(tiny_model_dir), entity_slots=3, max_text_tokens=64, progress=False)}
    requests = [GenerateRequest(prompt="a cat and a cheetah in a field", entities=("cat", "cheetah"), seed=3,
                                steps=cfg.num_steps, height=64, width=96, deleaker=on, config=cfg)
                for cfg in (FIRING, FIRING_2) for on in (True, False)]
    results = {name: Pipeline(be, max_batch=4).generate(requests) for name, be in backends.items()}
    for i, req in enumerate(requests):
        o, t = results["onnxruntime"][i], results["torch"][i]
        np.testing.assert_allclose(o.latents, t.latents, atol=ATOL, rtol=ATOL, err_msg=str(req))
        np.testing.assert_allclose(o.history, t.history, atol=1e-6, rtol=1e-5, err_msg=str(req))
        # uint8 images: an error of ~1e-5 can flip a rounding by one level, never more
        assert np.abs(o.image.astype(int) - t.image).max() <= 1
        if not req.deleaker:
            assert np.abs(o.history).max() == 0
    for k in (0, 2):  # DeLeaker did something, for both settings
        assert np.abs(results["torch"][k].latents - results["torch"][k + 1].latents).max() > 1e-3
    assert backends["onnxruntime"].sessions_opened["transformer"] == 1  # one session served every request


@pytest.fixture(scope="module")
def golden_run(artifact_dir):
    from support import golden

    from deleaker.runtime.backends import load_backend
    from deleaker.runtime.pipeline import Pipeline

    return golden.generate(Pipeline(load_backend("onnxruntime", str(artifact_dir), progress=False), max_batch=2))


def test_golden_within_bound(golden_run):
    """The onnxruntime backend's output on the golden requests (tests/support/golden.py) within the bound of the recorded one."""
    from support import golden

    golden.check_bound("onnxruntime", golden_run)


def test_golden_digest(golden_run):
    """... and bit for bit, where the environment is the recorded one."""
    from support import golden

    golden.check_digest("onnxruntime", golden_run)


def test_one_artifact_serves_any_step_count_and_a_mixed_batch(artifact_dir, tiny_model_dir):
    """4, 20 and 28 steps and two settings from one transformer session, each equal to torch; a batch of
    three different requests (one without entities) equals each request run alone."""
    from deleaker.runtime.backends import load_backend
    from deleaker.runtime.pipeline import GenerateRequest, Pipeline

    ort_be = load_backend("onnxruntime", str(artifact_dir), progress=False)
    torch_be = load_backend("torch", str(tiny_model_dir), entity_slots=3, max_text_tokens=64, progress=False)
    ort_pipe, torch_pipe = Pipeline(ort_be, max_batch=4), Pipeline(torch_be, max_batch=4)
    base = dict(prompt="a cat and a cheetah in a field", entities=("cat", "cheetah"), seed=1, height=32, width=32)
    reqs = [GenerateRequest(**base, steps=n, config=cfg) for n in (4, 20, 28) for cfg in (FIRING, FIRING_2)]
    for r in reqs:
        o, t = ort_pipe.generate(r), torch_pipe.generate(r)
        np.testing.assert_allclose(o.latents, t.latents, atol=ATOL, rtol=ATOL, err_msg=str(r))
    mixed = [GenerateRequest(**{**base, "seed": 3}, steps=6, config=FIRING),
             GenerateRequest(prompt="a dog and a bird by the river", entities=("dog", "bird"), seed=11, steps=6,
                             height=32, width=32, guidance_scale=2.0, config=FIRING_2),
             GenerateRequest(prompt="a horse in the snow", seed=5, steps=6, height=32, width=32)]
    batched = ort_pipe.generate(mixed)
    assert [r.batch_size for r in batched] == [3, 3, 3]
    for b, r in zip(batched, mixed):
        alone = ort_pipe.generate(r)
        np.testing.assert_allclose(b.latents, alone.latents, rtol=0, atol=1e-5, err_msg=str(r))
        np.testing.assert_allclose(b.history, alone.history, rtol=0, atol=1e-5, err_msg=str(r))
    assert ort_be.sessions_opened["transformer"] == 1


# --------------------------------------------------------------------------------------------
# The runtime from the artifact alone, and bad input
# --------------------------------------------------------------------------------------------

BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'diffusers', 'transformers', 'onnx', 'onnxscript', 'polygraphy'}:
            raise ImportError('blocked in this test: ' + name)
sys.meta_path.insert(0, Block())
"""


def _run(code: str, timeout: int = 300):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def test_generate_from_artifact_without_torch(artifact_dir, tmp_path):
    """`deleaker generate --artifact` in a process where importing torch, diffusers or onnx raises."""
    out = tmp_path / "cat.png"
    code = BLOCKER + f"""
try:  # the blocker must work, or the test proves nothing
    import torch
    raise SystemExit('blocker failed')
except ImportError:
    pass
from deleaker.runtime.cli import main
rc = main(['generate', '--artifact', {str(artifact_dir)!r}, '--prompt', 'a cat and a cheetah in a field',
           '--entities', 'cat,cheetah', '--height', '64', '--width', '96', '--compare', '--quiet',
           '--out', {str(out)!r}])
assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'onnx')], 'heavy import'
raise SystemExit(rc)
"""
    r = _run(code)
    assert r.returncode == 0, r.stderr[-3000:]
    from PIL import Image

    img = Image.open(out)
    assert img.height >= 64 and img.width >= 2 * 96  # vanilla | DeLeaker side by side


def _copy(artifact_dir, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(artifact_dir, dst)
    return dst


def _generate(artifact, tmp_path, *extra, prompt="a cat and a cheetah in a field", entities="cat,cheetah"):
    from deleaker.runtime.cli import main

    out = tmp_path / "x.png"
    args = ["generate", "--artifact", str(artifact), "--prompt", prompt, "--entities", entities, "--height", "64",
            "--width", "96", "--quiet", "--out", str(out), *extra]
    return main(args), out


def _edit_manifest(root, fn):
    p = root / "manifest.json"
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(m))


@pytest.mark.parametrize("problem", ["format_version", "v1_artifact", "missing_file", "truncated_file",
                                     "no_manifest"])
def test_bad_artifact_is_a_clear_error(artifact_dir, tmp_path, capsys, problem):
    art = _copy(artifact_dir, tmp_path)
    if problem == "format_version":
        _edit_manifest(art, lambda m: m.update(format_version=99))
        expect = ["format version 99", "reads version 2", "re-export"]
    elif problem == "missing_file":
        (art / "vae_decoder.onnx").unlink()
        expect = ["missing vae_decoder.onnx", "copy it again or re-export"]
    elif problem == "v1_artifact":
        _edit_manifest(art, lambda m: m.update(format_version=1))
        expect = ["format version 1", "DeLeaker settings baked into the graph", "reads version 2",
                  f"re-export it with `deleaker-export onnx --model CHECKPOINT --out {art}`"]
    elif problem == "truncated_file":
        data = art / "transformer.onnx.data"
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size // 2)
        expect = ["transformer.onnx.data", "truncated"]
    else:
        (art / "manifest.json").unlink()
        expect = ["not a deleaker artifact", "deleaker-export onnx"]
    rc, out = _generate(art, tmp_path)
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert err.count("\n") == 1 and err.startswith("deleaker: error:"), err
    for word in expect:
        assert word in err, (word, err)


@pytest.mark.parametrize("problem", ["v1", "op_version", "unknown_setting"])
def test_loader_rejects_old_or_foreign_manifests(artifact_dir, tmp_path, problem):
    """load_artifact itself (what every backend calls): one line naming the version and the command."""
    art = _copy(artifact_dir, tmp_path)
    if problem == "v1":
        _edit_manifest(art, lambda m: m.update(format_version=1))
        expect = "has format version 1 (DeLeaker settings baked into the graph, op contract v1)"
    elif problem == "op_version":
        _edit_manifest(art, lambda m: m["deleaker"].update(op_version=1))
        expect = "DeLeakerAttention op version 1, this deleaker runs version 2"
    else:
        _edit_manifest(art, lambda m: m["deleaker"]["config"].update(window_size=3))
        expect = "unknown fields ['window_size']"
    with pytest.raises(ArtifactError) as exc:
        load_artifact(art)
    msg = str(exc.value)
    assert "\n" not in msg and expect in msg, msg
    assert f"`deleaker-export onnx --model CHECKPOINT --out {art}`" in msg, msg


@pytest.mark.parametrize("problem", ["too_many_entities", "size_outside_range", "prompt_too_long"])
def test_bad_request_is_a_clear_error(artifact_dir, tmp_path, capsys, problem):
    kw, extra = {}, []
    if problem == "too_many_entities":
        kw = dict(prompt="a cat, a dog, a fox and a cow", entities="cat,dog,fox,cow")
        expect = ["4 entities", "3 entity slots"]
    elif problem == "size_outside_range":
        extra = ["--height", "256"]
        expect = ["height 256", "outside the exported range [32, 128]", "re-export"]
    else:
        kw = dict(prompt="a cat and a cheetah in a field " + "with a red ball " * 30)
        expect = ["64", "tokens"]
    rc, out = _generate(artifact_dir, tmp_path, *extra, **kw)
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists(), err
    for word in expect:
        assert word in err, (word, err)


# --------------------------------------------------------------------------------------------
# deleaker-export verify
# --------------------------------------------------------------------------------------------

def _verify_lines(out: str, checks) -> int:
    for check, output in checks:
        line = next(ln for ln in out.splitlines() if ln.startswith(check) and f" {output} " in ln)
        assert "max_abs" in line and "mean_abs" in line and line.endswith("PASS"), line
    return sum(1 for ln in out.splitlines() if ln.endswith("PASS"))


def test_verify_op_and_step_pass(artifact_dir, tiny_model_dir, capsys):
    from deleaker.export.cli import main

    rc = main(["verify", str(artifact_dir), "--model", str(tiny_model_dir), "--checks", "op,step", "--height", "64",
               "--width", "96", "--steps", "8", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    n = _verify_lines(out, (("op", "out"), ("op", "history_out"), ("step", "noise_pred"), ("step", "history_out")))
    # op: 3 taus x 2 outputs; step: 3 steps x 2 outputs
    assert n == 12 and f"verify: {n}/{n} outputs within tolerance" in out


def test_verify_loop_passes(artifact_dir, tiny_model_dir, capsys):
    from deleaker.export.cli import main

    rc = main(["verify", str(artifact_dir), "--model", str(tiny_model_dir), "--checks", "loop", "--height", "64",
               "--width", "96", "--steps", "4", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    n = _verify_lines(out, (("loop", "latents"), ("loop", "history")))
    assert n == 4 and f"verify: {n}/{n} outputs within tolerance" in out


def test_verify_fails_past_tolerance(artifact_dir, tiny_model_dir, capsys):
    from deleaker.export.cli import main

    rc = main(["verify", str(artifact_dir), "--model", str(tiny_model_dir), "--checks", "op", "--atol", "0",
               "--rtol", "0", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 1 and out.splitlines()[-1].startswith("verify: ") and "FAILED:" in out and "op/out" in out


def test_verify_corrupt_onnx_is_one_line_error(artifact_dir, tiny_model_dir, tmp_path, capsys):
    """transformer.onnx replaced by random bytes of the same size (so the size check passes)."""
    from deleaker.export.cli import main

    art = _copy(artifact_dir, tmp_path)
    path = art / "transformer.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))
    rc = main(["verify", str(art), "--model", str(tiny_model_dir), "--checks", "op", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("deleaker-export: error:") and err.count("\n") == 1, err
    assert "transformer.onnx is not a readable ONNX model" in err and "re-export" in err, err


# --------------------------------------------------------------------------------------------
# Other transformer variants: no guidance input (FLUX.1-schnell), half-precision weights
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,guidance", [("fp32", False), ("fp16", True), ("bf16", True)])
def test_transformer_variants(tmp_path, dtype, guidance):
    from diffusers import FluxTransformer2DModel

    from deleaker.export.onnx_export import TransformerStep, export_transformer
    from deleaker.modeling.checkpoint import resolve_dtype

    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12,
                                guidance_embeds=guidance, axes_dims_rope=(4, 6, 6)).eval()
    cfg = DeLeakerConfig(start_aggregating_from=0, start_intervention_from=1, stop_aggregating_at=7,
                         stop_intervention_at=100, do_smoothing=False)
    spec = ExportSpec(height=64, width=96, min_size=32, max_size=128, max_text_tokens=7, entity_slots=2, dtype=dtype)
    ref = TransformerStep(DeLeakerFlux(copy.deepcopy(tr).to(resolve_dtype(dtype))), resolve_dtype(dtype), guidance)
    ex = export_transformer(tr, tmp_path / "t.onnx", spec)
    onnx.checker.check_model(str(tmp_path / "t.onnx"), full_check=True)
    assert ("guidance" in ex.inputs) == guidance
    # float32 I/O whatever the weights: the casts are inside the graph
    assert {v["dtype"] for v in ex.inputs.values()} == {"float32", "int64"}
    assert ex.outputs["noise_pred"]["dtype"] == "float32"
    assert ex.inputs["hidden_states"]["shape"] == ["batch", "image_tokens", 16]
    if dtype == "bf16":
        return  # ONNX Runtime's CPU provider has no bfloat16 MatMul: a GPU/TensorRT artifact
    assert tuple(ex.inputs) == step_io.input_names(guidance)
    x = transformer_example(tr, spec, batch=2, configs=[cfg, cfg.replace(k_strength=2.0, do_image_image=False)])
    x["step"] = torch.tensor(1)
    with torch.no_grad():
        want, want_h = ref(**x)
    got, got_h = session(str(tmp_path / "t.onnx")).run(None, {k: v.numpy() for k, v in x.items()})
    # fp16: both sides round activations to fp16 at different points: ~1e-3 relative
    tol = ATOL if dtype == "fp32" else 5e-3
    np.testing.assert_allclose(got, want.numpy(), atol=tol * float(want.abs().max()), rtol=tol)
    np.testing.assert_allclose(got_h, want_h.numpy(), atol=1e-3 if dtype == "fp16" else 1e-6, rtol=1e-3)


def test_runtime_side_imports_nothing_heavy():
    """The artifact reader and the backend module import with torch, onnx and onnxruntime blocked."""
    code = BLOCKER.replace("'onnx', 'onnxscript', 'polygraphy'", "'onnx', 'onnxscript', 'polygraphy', 'onnxruntime'")
    r = _run(code + "import deleaker.runtime.artifact, deleaker.runtime.backends.onnxruntime_backend\n"
                    "try:\n    import onnxruntime\nexcept ImportError:\n    print('ok')\n")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_openvino_backend_refuses_the_function_form(artifact_dir, tmp_path, capsys):
    """OpenVINO cannot convert the DeLeakerAttention node: the openvino backend says which form it
    runs and how to export it, in one line, before compiling anything."""
    pytest.importorskip("openvino")
    from deleaker.runtime.backends import load_backend
    from deleaker.runtime.backends.openvino_backend import OpenVinoError
    from deleaker.runtime.cli import main

    with pytest.raises(OpenVinoError, match="holds the function form.*deleaker-export onnx --portable"):
        load_backend("openvino", str(artifact_dir))
    out = tmp_path / "x.png"
    assert main(["generate", "--artifact", str(artifact_dir), "--backend", "openvino", "--prompt", "a cat and a dog",
                 "--height", "64", "--width", "64", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the openvino backend runs the portable form" in err[0] and not out.exists()
