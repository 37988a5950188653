"""Eval judges without an endpoint: strict answer parsing, the registry, LPIPS from local weights
(checked against an independent torch.nn build of lpips' AlexNet), the toy world's exact judge."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deleaker.eval import cli
from deleaker.eval.client import parse_json_answer
from deleaker.eval.judges.base import JudgeOptions, JudgeUnavailable, get_judge, judge_run
from deleaker.eval.judges.paper import VERDICT_SCHEMA, differences_schema, merge_differences
from deleaker.eval.report import summarize
from deleaker.eval.store import RunDir, append_jsonl


def test_strict_parsing():
    ok = parse_json_answer('{"verdict": "same", "reason": "equal"}', VERDICT_SCHEMA)
    assert ok.status == "ok" and ok.value["verdict"] == "same"
    fenced = parse_json_answer('```json\n{"verdict": "same", "reason": "r"}\n```', VERDICT_SCHEMA)
    assert fenced.status == "ok"
    for text, why in [("Image 2 is better.", "Expecting value"),
                      ('{"verdict": "image_2_better", "reason": "r"}', "must be one of"),
                      ('{"verdict": "same"}', "has no 'reason'"),
                      ('{"verdict": "same", "reason": "r", "score": 3}', "unexpected key"),
                      ('{"verdict": "same", "reason": 5}', "must be a string"),
                      ('Sure! {"verdict": "same", "reason": "r"}', "Expecting value")]:
        ans = parse_json_answer(text, VERDICT_SCHEMA)
        assert ans.status == "unparseable" and ans.raw == text and why in ans.error, (text, ans.error)
    schema = differences_schema(["cat", "dog"])
    assert parse_json_answer('{"differences": [{"entity": "cow", "feature": "x"}]}', schema).status == "unparseable"


def test_merge_differences():
    a = [{"entity": "cat", "feature": "Pointed ears"}, {"entity": "dog", "feature": "floppy ears"}]
    b = [{"entity": "cat", "feature": "pointed  ears"}, {"entity": "dog", "feature": "wet nose"}]
    assert [d["feature"] for d in merge_differences(a, b)] == ["Pointed ears", "floppy ears", "wet nose"]


def test_registry_and_unavailable_judges(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown judge 'nope'; available: lpips, paper, toyworld, vqascore"):
        get_judge("nope")
    with pytest.raises(JudgeUnavailable, match="--lpips-weights"):
        get_judge("lpips")(JudgeOptions())
    with pytest.raises(JudgeUnavailable, match="needs --endpoint"):
        get_judge("paper")(JudgeOptions())
    run = RunDir(tmp_path / "run").create()
    run.manifest.write_text("")
    assert cli.main(["--quiet", "judge", str(run.root), "--judge", "paper"]) == 2
    assert "need --endpoint and --model" in capsys.readouterr().err
    assert cli.main(["--quiet", "judge", str(tmp_path), "--judge", "lpips"]) == 2
    assert "not an eval run folder" in capsys.readouterr().err


# ---- LPIPS ------------------------------------------------------------------------------------

def _alexnet_features(torch):
    """torchvision's AlexNet.features layout, built independently of the judge's functional code."""
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2),
                         nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(3, 2))


def _lpips_reference(torch, features, lins, a, b):
    """lpips v0.1 forward (ScalingLayer, 5 ReLU taps, unit-normalize, squared diff, 1x1 conv, mean, sum)."""
    taps = (1, 4, 7, 9, 11)
    torch.set_grad_enabled(False)
    x = torch.from_numpy(np.stack([a, b])).permute(0, 3, 1, 2).float() / 127.5 - 1
    x = (x - torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)) / torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)
    outs = []
    for i, layer in enumerate(features):
        x = layer(x)
        if i in taps:
            outs.append(x)
    total = 0.0
    for f, w in zip(outs, lins):
        f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total += float(torch.nn.functional.conv2d((f[0:1] - f[1:2]) ** 2, w).mean())
    torch.set_grad_enabled(True)
    return total


def test_lpips_from_local_weights(tmp_path):
    torch = pytest.importorskip("torch")
    from deleaker.eval.judges.lpips import Lpips

    torch.manual_seed(0)
    feats = _alexnet_features(torch)
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, tmp_path / "alexnet-owt-7be5be79.pth")
    lins = [torch.rand(1, c, 1, 1) * 0.1 for c in (64, 192, 384, 256, 256)]  # lpips lins are non-negative
    torch.save({f"lin{k}.model.1.weight": w for k, w in enumerate(lins)}, tmp_path / "alex.pth")
    metric = Lpips(tmp_path)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    c = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    assert metric.distance(a, a) == 0.0
    d_ab, d_ac = metric.distance(a, b), metric.distance(a, c)
    assert d_ab == pytest.approx(_lpips_reference(torch, feats, lins, a, b), rel=1e-5)
    assert 0 < d_ab < d_ac  # a mild perturbation is closer than an unrelated image
    with pytest.raises(JudgeUnavailable, match="none of alex.pth"):
        (tmp_path / "alex.pth").unlink()
        Lpips(tmp_path)


# ---- toy world ----------------------------------------------------------------------------------

def _toy_run(tmp_path, pairs) -> RunDir:
    """A run folder holding toy-world pairs: pairs = [(vanilla image, deleaker image, entities)]."""
    run = RunDir(tmp_path / "run").create()
    for n, (v, d, ents) in enumerate(pairs):
        item = {"id": f"two_entities-{n}", "split": "two_entities", "prompt": " and ".join(ents),
                "entities": list(ents), "seed": n, "status": "ok", "refs": {}}
        for variant, img in (("vanilla", v), ("deleaker", d)):
            Image.fromarray(img).save(run.image(item["id"], variant))
            item[variant] = str(run.image(item["id"], variant).relative_to(run.root))
        append_jsonl(run.manifest, item)
    return run


def test_toyworld_judge(tmp_path):
    world = pytest.importorskip("deleaker.toyworld.world")
    pytest.importorskip("deleaker.toyworld.judge")
    from deleaker.toyworld.world import Thing, render_object

    circle, square = Thing("red", "plain", "circle"), Thing("blue", "striped", "square")
    entities = (circle.phrase, square.phrase)

    def scene(first: Thing) -> np.ndarray:
        canvas = np.full((64, 64, 3), world.BACKGROUND, np.uint8)
        render_object(canvas, first, 4, 6, 24)
        render_object(canvas, square, 36, 34, 24)
        return canvas

    clean = scene(circle)
    leaky = scene(Thing("blue", "plain", "circle"))  # the square's colour on the circle
    run = _toy_run(tmp_path, [(leaky, clean, entities), (clean, leaky, entities), (clean, clean, entities)])
    judge = get_judge("toyworld")(JudgeOptions())
    counts = judge_run(run, judge, concurrency=2, progress=False)
    assert counts == {"ok": 3, "unparseable": 0, "error": 0, "skipped": 0}
    got = {k: v["outcome"] for k, v in run.judged("toyworld").items()}
    assert got == {"two_entities-0": "mitigation_major", "two_entities-1": "degradation_major",
                   "two_entities-2": "no_change"}
    overall = summarize(run, "toyworld")[-1]
    assert overall.judged == 3 and round(overall.outcomes["mitigation_major"].value, 6) == round(100 / 3, 6)
    first = run.judged("toyworld")["two_entities-0"]  # the judge's own dicts are kept
    assert first["vanilla"]["leak"] is True and first["deleaker"]["leak"] is False
