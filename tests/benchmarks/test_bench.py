"""deleaker-bench (benchmarks/): the CPU smoke benchmark through the CLI, and the pieces it is
built from (statistics, ratios, synthetic inputs, presets, report)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deleaker.benchmarks import cli, harness, measure, models as M, presets, report
from deleaker.runtime.config import DeLeakerConfig
from support.editing import editing_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_records(records, backend):
    """Every record carries the documented fields; each case has vanilla beside DeLeaker."""
    assert records, "no records written"
    for r in records:
        missing = [f for f in report.COMMON_FIELDS if f not in r]
        assert not missing, f"{r['label']}: missing {missing}"
        assert r["schema"] == "deleaker-bench/1"
        assert r["random_weights"] is True  # the tiny model is random: results must say so
        assert r["status"] == "ok", r["note"]
        missing = [f for f in report.OK_FIELDS if f not in r]
        assert not missing, f"{r['label']}: missing {missing}"
        assert 0 < r["step_p10_s"] <= r["step_median_s"] <= r["step_p90_s"]
        assert r["peak_host_mib"] > 0 and r["host_peak_scope"] in ("measurement", "process")
        assert r["peak_device_mib"] is None  # CPU run
        assert r["timer"] == "perf_counter"
        if r["mode"] == "e2e":
            assert all(f in r for f in report.E2E_FIELDS)
            assert r["seconds_per_image"] > 0 and r["images_per_s"] == pytest.approx(1 / r["seconds_per_image"])
            assert r["images_per_s"] == pytest.approx(1 / r["seconds_per_image"])
        else:
            assert len(r["step_samples_s"]) == r["runs"]
            assert r["images_per_s"] == pytest.approx(r["batch_size"] / (r["steps"] * r["step_median_s"]))
    cases = {}
    for r in records:
        cases.setdefault((r["mode"], r["width"], r["batch_size"]), []).append(r)
    for rows in cases.values():
        base = [r for r in rows if r["variant"] == "vanilla"]
        dl = [r for r in rows if r["variant"] == "deleaker"]
        assert len(base) == 1 and len(dl) == 1, [r["label"] for r in rows]
        assert base[0]["ratio_vs_vanilla"] == 1.0
        assert dl[0]["baseline"] == base[0]["label"]
        expect = ("seconds_per_image" if dl[0]["mode"] == "e2e" else "step_median_s")
        assert dl[0]["ratio_vs_vanilla"] == pytest.approx(dl[0][expect] / base[0][expect], rel=1e-3)
        # DeLeaker really intervened: some image tokens are inside each entity's (post-smoothing) mask
        cov = dl[0]["mask_coverage"]
        assert cov is not None and len(cov) == 2 and all(0 < c < 1 for c in cov)
    assert {r["backend"] for r in records} == {backend}


def _check_outputs(out, records):
    md = (out / "summary.md").read_text()
    assert report.TABLE_HEADER in md
    assert "**random_weights: true**" in md
    assert "2-core" in md or "-core CPU" in md
    assert md.count("\n| step |") + md.count("\n| e2e |") == len(records)
    png = (out / "plot.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_cli_smoke_torch_tiny_model(tiny_model_dir, tmp_path, capsys):
    out, prof = tmp_path / "bench", tmp_path / "prof"
    rc = cli.main(["--preset", "tiny", "--model", str(tiny_model_dir), "--resolution", "64", "--batch", "1,2",
                   "--warmup", "1", "--runs", "2", "--out", str(out), "--profile", str(prof), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    records = report.read_jsonl(out / "results.jsonl")
    # step and e2e (batched sessions): batch 1 and 2, vanilla + reference each
    assert sorted((r["mode"], r["batch_size"], r["label"]) for r in records) == [
        ("e2e", 1, "deleaker-reference"), ("e2e", 1, "vanilla"),
        ("e2e", 2, "deleaker-reference"), ("e2e", 2, "vanilla"),
        ("step", 1, "deleaker-reference"), ("step", 1, "vanilla"),
        ("step", 2, "deleaker-reference"), ("step", 2, "vanilla")]
    _check_records(records, "torch")
    assert all(r["model"] == str(tiny_model_dir) for r in records)
    step = [r for r in records if r["mode"] == "step"]
    assert {r["text_tokens"] for r in step} == {64} and {r["image_tokens"] for r in step} == {16}
    assert {r["step"] for r in step} == {0}  # tiny preset: windows open at block 0 -> step 0 is the busiest
    _check_outputs(out, records)
    # --profile: one chrome trace per measurement
    for r in records:
        trace = json.loads(open(r["profile_trace"]).read())
        assert trace["traceEvents"]


@pytest.fixture(scope="module")
def tiny_artifact(tiny_model_dir, tmp_path_factory):
    from deleaker.export.onnx_export import ExportSpec, export_artifact

    spec = ExportSpec(height=64, width=64, max_text_tokens=32,
                      deleaker=editing_config(num_steps=2, do_smoothing=True))
    return export_artifact(tiny_model_dir, tmp_path_factory.mktemp("art") / "tiny", spec)


@pytest.mark.slow  # exports the tiny model to ONNX first (about a minute on 2 cores)
def test_cli_smoke_onnxruntime_artifact(tiny_artifact, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "bench"
    rc = cli.main(["--preset", "tiny", "--artifact", str(tiny_artifact), "--backend", "onnxruntime",
                   "--resolution", "64", "--batch", "1", "--warmup", "1", "--runs", "2", "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    records = report.read_jsonl(out / "results.jsonl")
    assert sorted((r["mode"], r["label"]) for r in records) == [
        ("e2e", "deleaker"), ("e2e", "vanilla-inactive"), ("step", "deleaker"), ("step", "vanilla-inactive")]
    _check_records(records, "onnxruntime")
    assert {r["text_tokens"] for r in records} == {32}  # the artifact's T, not the preset's
    _check_outputs(out, records)


# ---------------------------------------------------------------------------------------------
# Pieces


def test_summarize_and_time_runs():
    s = measure.summarize([3.0, 1.0, 2.0, 4.0, 5.0])
    assert (s["median_s"], s["min_s"], s["max_s"], s["mean_s"]) == (3.0, 1.0, 5.0, 3.0)
    assert s["p10_s"] == pytest.approx(1.4) and s["p90_s"] == pytest.approx(4.6)
    calls = []
    samples, timer = measure.time_runs(lambda: calls.append(1), warmup=2, runs=3)
    assert len(calls) == 5 and len(samples) == 3 and timer == "perf_counter"
    with pytest.raises(ValueError):
        measure.time_runs(lambda: None, warmup=0, runs=0)


def test_peak_host_memory_sees_a_large_allocation():
    with measure.PeakMemory() as small:
        np.ones(1000)
    with measure.PeakMemory() as big:
        a = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        del a
    if big.host_scope == "measurement":  # resettable high-water mark: per-measurement peaks
        assert big.peak_host_mib - small.peak_host_mib > 48
    assert big.fields()["peak_device_mib"] is None


def test_interleaved_rounds_rotate_order():
    order = []
    vs = [harness.Variant(n, lambda: None, (lambda n=n: order.append(n))) for n in "abc"]
    harness.measure_interleaved(vs, warmup=1, runs=3)
    assert order == list("abc") + list("abc") + list("bca") + list("cab")
    assert all(len(v.samples) == 3 and v.memory is not None for v in vs)
    with pytest.raises(ValueError, match="warmup"):
        harness.measure_interleaved(vs, warmup=0, runs=1)
    # a variant that fails (e.g. out of memory) is reported, the others are still timed
    def boom():
        raise RuntimeError("CUDA out of memory\nmore lines")

    vs = [harness.Variant("a", lambda: None, lambda: None), harness.Variant("b", lambda: None, boom)]
    harness.measure_interleaved(vs, warmup=1, runs=2)
    assert len(vs[0].samples) == 2 and vs[1].samples == []
    assert vs[1].error == "RuntimeError: CUDA out of memory"


def test_add_ratios_groups_by_case():
    def rec(label, t, b=1, dev=None, status="ok"):
        return {"mode": "step", "backend": "torch", "label": label, "batch_size": b, "step_median_s": t,
                "peak_device_mib": dev, "status": status}

    rows = harness.add_ratios([rec("vanilla", 2.0, dev=100.0), rec("deleaker-reference", 3.0, dev=150.0),
                               rec("vanilla", 4.0, b=2), rec("deleaker-cuda", None, b=2, status="skipped")])
    assert [r["ratio_vs_vanilla"] for r in rows] == [1.0, 1.5, 1.0, None]
    assert rows[1]["extra_device_mib_vs_vanilla"] == 50.0 and rows[1]["baseline"] == "vanilla"
    # without stock vanilla (other backends), the inactive-slot run is the baseline
    rows = harness.add_ratios([rec("vanilla-inactive", 2.0), rec("deleaker", 5.0)])
    assert rows[1]["ratio_vs_vanilla"] == 2.5 and rows[1]["baseline"] == "vanilla-inactive"


def test_synthetic_entities_history_step_and_coverage():
    ent = M.synthetic_entity_tokens(2, 4, 16, 2)  # [B, E, T]
    assert ent.shape == (2, 4, 16)
    assert [list(np.flatnonzero(ent[0, e])) for e in range(4)] == [[3, 4], [8, 9], [], []]
    with pytest.raises(M.BenchError, match="slots"):
        M.synthetic_entity_tokens(1, 2, 64, 3)
    # FLUX.1-dev with the authors' windows: step 1 is the first where all 57 blocks update the
    # history and intervene (step 0 starts at block 12/18)
    assert M.busiest_step(DeLeakerConfig(num_steps=20).resolved(57)) == 1
    assert M.busiest_step(DeLeakerConfig(num_steps=20).resolved(4)) == 5  # tau 20..23
    hist = np.zeros((1, 4, 10), np.float32)
    hist[0, 0, :2] = 1  # two hot tokens: above mean + std
    hist[0, 1] = np.arange(10)  # mean 4.5 + std 3.03: tokens 8 and 9
    assert M.mask_coverage(hist, 2, beta1=1.0) == [0.2, 0.2]
    assert M.mask_coverage(hist, 2, beta1=0.0) == [0.2, 0.5]
    assert M.mask_coverage(np.zeros((1, 4, 10)), 2, 1.0) is None
    # post-smoothing, as the op edits: a 3x3 blob survives the opening, scattered hot tokens do not
    grid = np.zeros((1, 2, 12, 12), np.float32)
    grid[0, 0, 5:8, 5:8] = 1  # a 3x3 blob away from the border (closing grows and shrinks it back)
    grid[0, 1, ::4, ::4] = 1  # isolated tokens
    hist = grid.reshape(1, 2, 144)
    assert M.mask_coverage(hist, 2, 0.0, None, smoothing=False) == [round(9 / 144, 4), round(9 / 144, 4)]
    assert M.mask_coverage(hist, 2, 0.0, (12, 12), smoothing=True) == [round(9 / 144, 4), 0.0]


def test_fused_op_is_a_skip_with_a_reason_on_cpu():
    tr = M.random_flux_transformer("flux-dev", dtype=torch.float32, num_layers=1, num_single_layers=1,
                                   num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6),
                                   joint_attention_dim=32, pooled_projection_dim=16)
    rows = harness.bench_step_variants(tr, ("sdpa", "cuda"), height=32, width=32, text_tokens=16, warmup=1, runs=1)
    assert [r["status"] for r in rows] == ["ok", "skipped"]
    assert "CUDA" in rows[1]["note"] and rows[1]["ratio_vs_vanilla"] is None


def test_random_flux_dev_is_flux_dev_sized_and_built_in_dtype():
    # the anchor's model: FLUX.1-dev's 11.9B parameters, counted without allocating them
    n = M.random_model_bytes("flux-dev", torch.bfloat16) / 2
    assert 11.8e9 < n < 12.0e9
    tr = M.random_flux_transformer("flux-dev", dtype=torch.bfloat16, num_layers=1, num_single_layers=1,
                                   num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6),
                                   joint_attention_dim=32, pooled_projection_dim=16)
    assert {p.dtype for p in tr.parameters()} == {torch.bfloat16}
    assert tr.config.guidance_embeds is True and torch.get_default_dtype() == torch.float32


def test_anchor_preset_matches_performance_md():
    s = presets.get_preset("flux-dev-anchor")
    assert s.model == "random:flux-dev" and s.random_weights is True
    assert s.resolutions == ((512, 512), (1024, 1024)) and s.text_tokens == 512
    assert s.impls == ("sdpa", "reference", "cuda") and s.dtype == "bf16" and s.device == "cuda"
    assert {len(e) for e in s.entity_sets} == {2} and s.modes == ("step",)


def test_cli_parsing_and_errors(tmp_path, capsys):
    args = cli._parser().parse_args(["--preset", "tiny", "--resolution", "512,1024x768", "--batch", "1,4",
                                     "--entities", "cat,dog", "--entities", "cat,dog,fox", "--set", "k_strength=1.5"])
    spec = cli.spec_from_args(args)
    assert spec.resolutions == ((512, 512), (1024, 768)) and spec.batch_sizes == (1, 4)
    assert spec.entity_sets == (("cat", "dog"), ("cat", "dog", "fox"))
    assert dict(spec.deleaker_overrides)["k_strength"] == 1.5
    assert dict(spec.deleaker_overrides)["start_aggregating_from"] == 0  # the preset's, kept
    # an entity missing from the e2e prompt is refused before anything loads
    rc = cli.main(["--preset", "tiny", "--entities", "zebra,cat", "--out", str(tmp_path), "--quiet"])
    assert rc == 2 and "zebra" in capsys.readouterr().err
    rc = cli.main(["--resolution", "100", "--out", str(tmp_path), "--quiet"])
    assert rc == 2 and "multiples of 16" in capsys.readouterr().err
    rc = cli.main(["--backend", "onnxruntime", "--out", str(tmp_path), "--quiet"])
    assert rc == 2 and "--artifact" in capsys.readouterr().err


def test_summary_cites_notes_for_skipped_rows():
    base = {"mode": "step", "backend": "torch", "width": 64, "height": 64, "batch_size": 1, "entities": 2,
            "steps": 2, "random_weights": True, "env_cpu_cores": 2, "env_cpu": "x"}
    recs = [{**base, "label": "deleaker-cuda", "status": "skipped", "note": "no library"}]
    md = report.summary_markdown(recs)
    assert "skipped [1]" in md and "1. no library" in md and "**random_weights: true**" in md


@pytest.mark.gpu
def test_gpu_step_uses_cuda_events_and_reports_device_memory():
    tr = M.random_flux_transformer("flux-dev", device="cuda", dtype=torch.bfloat16, num_layers=1,
                                   num_single_layers=1, num_attention_heads=2, attention_head_dim=64,
                                   axes_dims_rope=(16, 24, 24), joint_attention_dim=64, pooled_projection_dim=32)
    rows = harness.bench_step_variants(tr, ("sdpa", "reference"), height=128, width=128, text_tokens=32,
                                       warmup=1, runs=3)
    for r in rows:
        assert r["status"] == "ok" and r["timer"] == "cuda_event"
        assert r["peak_device_mib"] >= r["device_resident_mib"] > 0
    assert rows[1]["ratio_vs_vanilla"] > 0 and rows[1]["extra_device_mib_vs_vanilla"] is not None


# ---------------------------------------------------------------------------------------------
# Planted entity structure (random weights) and the op's edit counters


def _small_flux(device="cpu", dtype=torch.float32):
    return M.random_flux_transformer("flux-dev", device=device, dtype=dtype, num_layers=1, num_single_layers=1,
                                     num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6),
                                     joint_attention_dim=32, pooled_projection_dim=16)


PLANT_CASE = dict(height=512, width=512, text_tokens=16, warmup=1, runs=1)  # 32 x 32 latent grid


def test_planted_mode_keeps_smoothed_masks_and_deleaker_edits():
    """flux-dev settings (smoothing on): on random weights the smoothed masks are empty; with
    the planted blocks (14% each: 12 x 12 of the 32 x 32 grid) they are the blocks, every
    block-call edits them, and the DeLeaker step's output differs from vanilla's."""
    from deleaker.runtime.config import preset

    cfg = preset("flux-dev")
    assert cfg.do_smoothing
    tr = _small_flux()
    plain = harness.bench_step_variants(tr, ("sdpa", "reference"), config=cfg, **PLANT_CASE)
    planted = harness.bench_step_variants(tr, ("sdpa", "reference"), config=cfg, plant=M.Plant(coverage=0.14),
                                          **PLANT_CASE)
    assert max(plain[1]["mask_coverage"]) <= 0.01  # random weights: the opening erases the masks
    assert plain[1]["edit_counters"]["masked_rows"][1] <= 10
    cov = planted[1]["mask_coverage"]
    assert len(cov) == 2 and all(0.12 <= c <= 0.16 for c in cov), cov  # target 144 / 1024 = 0.1406
    assert planted[1]["plant"] == {"coverage": 0.14, "boost": M.Plant().boost}
    assert planted[0]["plant"] == planted[1]["plant"] and plain[1]["plant"] is None  # vanilla planted alike
    counters = planted[1]["edit_counters"]
    assert counters["blocks"] == counters["edited_blocks"] == 2
    assert all(lo >= 120 and hi <= 160 for lo, hi in counters["mask_rows"].values()), counters
    assert counters["cut_pairs"] > 0
    # the step output: DeLeaker (reference op) vs vanilla, both planted
    dl, args = _planted_case_step(tr, cfg)
    outs = {}
    with M.PlantedHooks(tr, M.Plant(coverage=0.14), args[7], (32, 32), 2), torch.inference_mode():
        for impl in ("sdpa", "reference"):
            M.set_attention(dl, impl)
            outs[impl] = dl(*args)[0]
    with torch.inference_mode():
        M.set_attention(dl, "sdpa")
        unplanted = dl(*args)[0]
    rel = float((outs["reference"] - outs["sdpa"]).norm() / outs["sdpa"].norm())
    assert rel > 1e-2, rel  # DeLeaker edits change the step
    assert not torch.allclose(outs["sdpa"], unplanted)  # vanilla runs the planted model too


def test_plant_regions_and_errors():
    reg = M.plant_regions((32, 32), 4, 0.14)  # [E, I]
    assert reg.shape == (4, 1024) and reg.sum(1).tolist() == [144] * 4
    assert not (reg.sum(0) > 1).any()  # disjoint blocks
    grid = reg.view(4, 32, 32)
    rows = grid.any(2).nonzero()[:, 1]
    assert rows.min() >= 3 and rows.max() <= 28  # 3 tokens off the edge: the closing keeps the block
    from deleaker.modeling.reference_op import smooth_masks

    assert torch.equal(smooth_masks(reg, 32, 32), reg)
    with pytest.raises(M.BenchError, match="too small"):
        M.plant_regions((16, 16), 2, 0.14)
    with pytest.raises(M.BenchError, match="coverage"):
        M.Plant(coverage=0.5).validate(2)
    with pytest.raises(M.BenchError, match="plant_coverage"):
        presets.BenchSpec(plant_coverage=0.3).validate()


def test_flux_dev_presets_plant_by_default():
    for name in ("flux-dev-anchor", "flux-dev-batch"):
        spec = presets.get_preset(name)
        assert spec.plant_coverage == 0.14 and M.plant_for(spec) == M.Plant(coverage=0.14)
    assert presets.get_preset("tiny").plant_coverage is None and M.plant_for(presets.get_preset("tiny")) is None


def test_step_edit_counters_match_the_reference_op():
    """The counters deleaker-bench records (one extra forward after the timing) are the
    reference's own: the last block's rows per entity are the mask the returned history gives
    (mask_coverage, computed apart), and each block-call's values equal op_bench's counters
    of the same call."""
    from deleaker.benchmarks import op_bench as ob
    from deleaker.runtime.config import preset

    cfg = preset("flux-dev")
    tr = _small_flux()
    rows = harness.bench_step_variants(tr, ("sdpa", "reference"), config=cfg, plant=M.Plant(coverage=0.1),
                                       **PLANT_CASE)
    rec = rows[1]
    c = rec["edit_counters"]
    assert c["source"] == "reference" and c["fallback_rows"] is None
    assert "edit_counters" not in rows[0]  # vanilla has none
    last = c["last_block"][0]
    assert [last["mask_rows"][s] for s in (0, 1)] == [round(v * 1024) for v in rec["mask_coverage"]]
    assert last["masked_rows"] == sum(last["mask_rows"].values())  # disjoint blocks
    # every call's counters, recomputed directly from the op's inputs
    dl, args = _planted_case_step(tr, cfg)
    seen = []
    M.set_attention(dl, "reference")
    procs = [b.attn.processor for b in list(tr.transformer_blocks) + list(tr.single_transformer_blocks)]
    for p in procs:
        def op(*a, _op=p.op):
            _, _, recs = ob.reference_run(*a)
            seen.append(ob.reference_counters(a[3], recs))
            return _op(*a)
        p.op = op
    with M.PlantedHooks(tr, M.Plant(coverage=0.1), args[7], (32, 32), 2), torch.inference_mode():
        dl(*args)
    assert seen[-1] == [{**last, "mask_rows": {int(k): v for k, v in last["mask_rows"].items()}}]
    assert sum(s[0]["cut_pairs"] for s in seen) == c["cut_pairs"]
    with pytest.raises(M.BenchError, match="reference and cuda"):
        M.step_edit_counters(dl, "sdpa", args)


@pytest.mark.gpu
def test_gpu_fused_counters_equal_the_reference_counters():
    """On a GPU with the fused library: the fused op's counters (its debug path, after timing)
    equal the reference's on the planted step, plus its fallback rows."""
    tr = M.random_flux_transformer("flux-dev", device="cuda", dtype=torch.bfloat16, num_layers=1,
                                   num_single_layers=1, num_attention_heads=2, attention_head_dim=64,
                                   axes_dims_rope=(16, 24, 24), joint_attention_dim=64, pooled_projection_dim=32)
    rows = harness.bench_step_variants(tr, ("sdpa", "reference", "cuda"), height=512, width=512, text_tokens=32,
                                       warmup=1, runs=2, plant=M.Plant())
    ref, fused = rows[1], rows[2]
    if fused["status"] == "skipped":
        pytest.skip(fused["note"])
    assert ref["edit_counters"]["mask_rows"] == fused["edit_counters"]["mask_rows"]
    assert fused["edit_counters"]["source"] == "fused op debug path"
    assert fused["edit_counters"]["fallback_rows"] is not None
    assert all(0.12 <= c <= 0.16 for c in fused["mask_coverage"])


def test_broken_artifact_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text("{not json")
    assert cli.main(["--preset", "tiny", "--artifact", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deleaker-bench: error:") and "manifest.json" in err and len(err.splitlines()) == 1


def _planted_case_step(tr, cfg):
    """The DeLeaker model of `tr` and the positional step inputs the planted-mode cases time
    (512 px, 16 text tokens, 2 entities, the busiest step of `cfg`)."""
    dl = harness.as_deleaker_model(tr)
    cfg_r = harness.resolve_config(cfg, None, dl.blocks_per_step)
    arrays = M.step_arrays(batch=1, height=512, width=512, text_tokens=16, in_channels=tr.config.in_channels,
                           text_dim=32, pooled_dim=16, guidance=True, entities=2, slots=4,
                           step=M.busiest_step(cfg_r), config=cfg_r)
    return dl, M.torch_step_args(arrays, "cpu", torch.float32)


@pytest.mark.parametrize("extra, expect", [
    (["--model", "MISSING"], "model folder not found"),
    (["--impl", "sdpa,fast"], "unknown attention impl 'fast'"),
    (["--backend", "torch,nope"], "unknown backend 'nope'"),
    (["--device", "gpu"], "device must be cpu, cuda or cuda:N"),
    (["--model", "random:flux-pro", "--mode", "step"], "unknown random model 'random:flux-pro'"),
    (["--model", "random:flux-dev"], "is a transformer only"),
    (["--deleaker-preset", "bogus"], "unknown DeLeaker preset 'bogus'"),
    (["--set", "no_such_knob=1"], "no_such_knob"),
    (["--entity-slots", "1"], "do not fit 1 entity slots"),
    (["--text-tokens", "0"], "text-tokens must be >= 1"),
    (["--step", "-1"], "step must be >= 0"),
    (["--out", "FILE"], "exists and is not a folder"),
    (["--profile", "FILE"], "exists and is not a folder"),
])
def test_bad_input_writes_no_output(tmp_path, capsys, extra, expect):
    """Every option is checked before the output folder is made: one line, exit 2, nothing written."""
    (tmp_path / "file").write_text("x")
    extra = [str(tmp_path / "nope") if a == "MISSING" else str(tmp_path / "file") if a == "FILE" else a
             for a in extra]
    out = tmp_path / "bench"
    rc = cli.main(["--preset", "tiny", "--out", str(out), "--quiet", *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("deleaker-bench: error:") and err.count("\n") == 1 and expect in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and (tmp_path / "file").read_text() == "x"
