"""deleaker-bench step mode on the model families other than FLUX.1 (benchmarks/family_step.py),
on each family's tiny random model (modeling/tiny_model.py --family).

Per family, with planted entities on the op's q and k at the family layout's image and text rows
and the family's own preset (smoothing on): the DeLeaker row's masks are the planted blocks (mask
coverage equal to the planted share per entity, which an empty or misplaced mask would miss), every
block of the step intervenes with rows for both entities (the edit counters, read in one more
forward after the timing), and vanilla (the family's stock processors) and the inactive op sit
beside it with ratios. A family folder is refused in one line for e2e mode and the fused op, and an
unsupported transformer class in one line naming the supported ones, before any loading.
"""

from __future__ import annotations

import json

import pytest

from deleaker.benchmarks import cli
from deleaker.benchmarks import models as M
from deleaker.benchmarks.family_step import bench_family_step_variants, load_family_transformer, model_family
from deleaker.modeling.tiny_model import ensure_tiny_family

# (family, --steps): each family preset's own step count, so the busiest step aggregates history
FAMILIES = [("sd3", 28), ("qwenimage", 50), ("flux2", 50)]


def _planted_share(side: int, coverage: float) -> float:
    grid = (side // 16, side // 16)
    return float(M.plant_regions(grid, 2, coverage)[0].float().mean())


def _check_rows(ec: dict, planted: int, blocks: int) -> None:
    """The step's edit counters: every block edited; each entity's mask, in every call, inside its
    planted block and most of it (the first block's masks come from its own probabilities only, a
    few edge rows short of the block); rule X cut pairs between the two blocks."""
    assert ec["source"] == "reference" and ec["blocks"] == ec["edited_blocks"] == blocks, ec
    assert set(ec["mask_rows"]) == {"0", "1"}
    assert all(0.75 * planted <= lo <= hi <= planted for lo, hi in ec["mask_rows"].values()), (ec, planted)
    assert ec["cut_pairs"] > 0 and ec["fallback_rows"] is None


@pytest.mark.slow
def test_cli_step_mode_on_a_family_folder(tmp_path, capsys):
    """The whole command on the tiny SD3 folder: records, summary, the op's work proven."""
    folder = ensure_tiny_family("sd3")
    out = tmp_path / "bench"
    code = cli.main(["--model", str(folder), "--mode", "step", "--resolution", "512", "--steps", "28",
                     "--impl", "sdpa,reference,inactive", "--plant-coverage", "0.14", "--warmup", "1", "--runs", "2",
                     "--threads", "2", "--no-plot", "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = {r["label"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert set(rows) == {"vanilla", "deleaker-reference", "inactive-reference"}
    assert all(r["status"] == "ok" and r["family"] == "sd3" and r["layout"] == "image_text" for r in rows.values())
    assert all(r["random_weights"] is True for r in rows.values())  # the tiny folder says so
    dl = rows["deleaker-reference"]
    assert dl["ratio_vs_vanilla"] == pytest.approx(dl["step_median_s"] / rows["vanilla"]["step_median_s"], rel=1e-3)
    share = _planted_share(512, 0.14)
    assert dl["mask_coverage"] == pytest.approx([share, share], abs=1e-3)
    ec = dl["edit_counters"]
    _check_rows(ec, round(share * 1024), 2)  # tiny SD3: 2 joint blocks, both in the window
    assert "| deleaker-reference |" in (out / "summary.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("name,steps", FAMILIES)
def test_planted_step_edits_on_every_family(name, steps):
    folder = ensure_tiny_family(name)
    family = model_family(str(folder))
    assert family.name == name
    tr = load_family_transformer(str(folder), family)
    rows = bench_family_step_variants(tr, family, ("sdpa", "reference", "inactive"), height=256, width=256,
                                      steps=steps, warmup=1, runs=1, plant=M.Plant(coverage=0.05))
    by = {r["impl"]: r for r in rows}
    assert all(r["status"] == "ok" for r in rows), [r["note"] for r in rows]
    share = _planted_share(256, 0.05)
    assert by["reference"]["mask_coverage"] == pytest.approx([share, share], abs=1e-3)
    ec = by["reference"]["edit_counters"]
    _check_rows(ec, round(share * 256), family.blocks_per_step(tr))
    assert by["reference"]["note"] == ""
    assert by["inactive"]["mask_coverage"] is None and by["sdpa"]["ratio_vs_vanilla"] == 1.0
    # the family's stock processors are back after the run
    assert all(type(m.processor).__module__.startswith("diffusers") for m in family.attention_modules(tr))


@pytest.mark.slow
def test_a_step_outside_the_history_window_says_why_its_masks_are_empty():
    """At 28 steps the qwen-image preset stops aggregating before it intervenes: the busiest step
    intervenes on a zero history; the record says so instead of a silent empty result."""
    folder = ensure_tiny_family("qwenimage")
    family = model_family(str(folder))
    tr = load_family_transformer(str(folder), family)
    rows = bench_family_step_variants(tr, family, ("sdpa", "reference"), height=256, width=256, steps=28, warmup=1,
                                      runs=1, plant=M.Plant(coverage=0.05))
    dl = next(r for r in rows if r["impl"] == "reference")
    assert dl["edit_counters"]["edited_blocks"] == 2 and dl["edit_counters"]["mask_rows"] == {"0": [0, 0], "1": [0, 0]}
    assert "does not aggregate history" in dl["note"]


@pytest.mark.parametrize("extra,message", [
    (["--mode", "e2e"], "e2e mode times FLUX.1's runtime pipeline"),
    (["--impl", "sdpa,cuda"], "impl cuda (the fused op) is checked on FLUX.1 only"),
])
def test_family_folder_refusals_are_one_line(tmp_path, capsys, extra, message):
    folder = ensure_tiny_family("sd3")
    code = cli.main(["--model", str(folder), "--out", str(tmp_path / "b"), "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "b").exists()


def test_unsupported_transformer_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "m" / "transformer").mkdir(parents=True)
    (tmp_path / "m" / "transformer" / "config.json").write_text(json.dumps({"_class_name": "FooTransformer2DModel"}))
    code = cli.main(["--model", str(tmp_path / "m"), "--out", str(tmp_path / "b"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "FooTransformer2DModel" in err and "SD3Transformer2DModel" in err and "Flux2Transformer2DModel" in err
