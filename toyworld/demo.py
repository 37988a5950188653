"""The toy-world demo: the card's example prompt at seeds 0..N-1, vanilla above DeLeaker, every
cell judged, the cells whose tag changed outlined, and beside the grid the held-out leak and
clean rates with their 95% intervals.

    python -m deleaker.toyworld.demo --out demo.png [--seeds 32] [--model DIR | --artifact DIR]
                                     [--prompt ... --entities ...] [--heldout RESULTS.json]

Each image goes through the runtime (Pipeline, the toyworld preset) on the embedded model's
exported artifact and the onnxruntime backend, as `deleaker generate` runs it (no torch); --model
runs a diffusers folder on the torch backend instead. The exact judge (numpy and scipy) tags
every cell leak / clean / missing / flawed, and the counts are logged. The seeds are 0..N-1, fixed
before any image was drawn, not picked. The chart reads a held-out stage's results file
(`python -m deleaker.toyworld.evaluate --stage heldout ...`); by default the committed one of the
embedded model, when this runs from a clone of the repository.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from deleaker.runtime.embedded import default_artifact_dir

from . import judge as J
from .preset import DEMO_ENTITIES, DEMO_PROMPT, SIZE, STEPS, TOYWORLD_PRESET
from .report import score

log = logging.getLogger("deleaker.toyworld")

SEEDS = 32
PER_ROW = 8  # seeds per row pair (vanilla above DeLeaker)
SCALE = 3  # each 32 px image drawn 3x (nearest neighbour): 96 px on screen
# the held-out measurement of the embedded model (a clone of the repository has it; a wheel does not)
HELDOUT = Path(__file__).resolve().parents[1] / "results" / "toyworld" / "stages" / "heldout-torch.json"
# outline colours of a seed whose tag changed: to clean / from clean / between two errors
FIXED, REGRESSED, MOVED = (0, 150, 0), (220, 0, 0), (230, 150, 0)
TAG_COLOURS = {"leak": (200, 0, 0), "clean": (0, 120, 0), "missing": (90, 90, 90), "flawed": (150, 100, 0)}


def change(before: str, after: str):
    """The outline of a seed whose tag went from `before` (vanilla) to `after` (DeLeaker), None if unchanged."""
    if before == after:
        return None
    return FIXED if after == "clean" else REGRESSED if before == "clean" else MOVED


def image_tag(image: np.ndarray, entities) -> str:
    """leak / missing / clean / flawed, as the held-out report tags an image (report.score)."""
    return score(J.judge(image, entities), J.parse_entities(entities))["tag"]


def grid(vanilla: list[np.ndarray], deleaker: list[np.ndarray], tags: list[tuple[str, str]], seeds: list[int],
         title: str, chart=None):
    """The seeds in row pairs of PER_ROW (vanilla above DeLeaker), each cell [H, W, 3] uint8 upscaled
    SCALE x with its tag under it; a changed seed's two cells outlined. `chart`: a PIL image put right."""
    from PIL import Image, ImageDraw

    s = SIZE * SCALE
    pad, text_h, left, head = 6, 14, 70, 34
    cols = min(PER_ROW, len(seeds))
    blocks = -(-len(seeds) // cols)
    W = left + cols * (s + pad) + pad
    H = head + blocks * (2 * (s + text_h + pad) + 2 * pad)
    cw, ch = (chart.size if chart is not None else (0, 0))
    out = Image.new("RGB", (W + cw, max(H, ch + head)), (255, 255, 255))
    d = ImageDraw.Draw(out)
    d.text((pad, 2), title, fill=(0, 0, 0))
    d.text((pad, 17), "outlined: tag changed (green: now clean, red: was clean, orange: one error to another)",
           fill=(60, 60, 60))
    for i, seed in enumerate(seeds):
        b, c = divmod(i, cols)
        x = left + c * (s + pad)
        top = head + b * (2 * (s + text_h + pad) + 2 * pad)
        for row, (images, label) in enumerate(((vanilla, "vanilla"), (deleaker, "DeLeaker"))):
            y = top + row * (s + text_h + pad)
            if c == 0:
                d.text((pad, y + s // 2 - 6), label, fill=(0, 0, 0))
            out.paste(Image.fromarray(images[i]).resize((s, s), Image.NEAREST), (x, y))
            t = tags[i][row]
            d.text((x, y + s + 1), f"{seed}: {t}", fill=TAG_COLOURS[t])
        if (colour := change(*tags[i])) is not None:
            d.rectangle((x - 3, top - 3, x + s + 2, top + 2 * s + text_h + pad + 2), outline=colour, width=3)
    if chart is not None:
        out.paste(chart, (W, head))
    return out


def chart(report: dict, title: str):
    """Bars of the held-out leak and clean rates, vanilla and DeLeaker, with their 95% intervals (PIL)."""
    from PIL import Image, ImageDraw

    w, h, base, top, x0 = 330, 300, 250, 30, 40
    im = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(im)
    d.text((8, 2), title, fill=(0, 0, 0))
    d.line((x0, top, x0, base), fill=(0, 0, 0))
    d.line((x0, base, w - 10, base), fill=(0, 0, 0))
    for v in (0.0, 0.5, 1.0):
        y = base - v * (base - top)
        d.text((6, y - 6), f"{v:.1f}", fill=(0, 0, 0))
        d.line((x0 - 3, y, x0, y), fill=(0, 0, 0))
    colours = {"vanilla": (150, 150, 150), "deleaker": (42, 111, 219)}
    for g, metric in enumerate(("leak", "clean")):
        gx = x0 + 20 + g * 140
        for j, arm in enumerate(("vanilla", "deleaker")):
            v, (lo, hi) = report[arm][metric], report[arm][metric + "_ci95"]
            x = gx + j * 55
            y = lambda q: base - q * (base - top)  # noqa: E731
            d.rectangle((x, y(v), x + 40, base), fill=colours[arm])
            d.line((x + 20, y(hi), x + 20, y(lo)), fill=(0, 0, 0), width=2)
            d.line((x + 14, y(hi), x + 26, y(hi)), fill=(0, 0, 0))
            d.line((x + 14, y(lo), x + 26, y(lo)), fill=(0, 0, 0))
            d.text((x + 2, y(v) - 14), f"{v:.2f}", fill=(0, 0, 0))
        d.text((gx + 30, base + 4), metric, fill=(0, 0, 0))
    d.rectangle((x0 + 10, base + 24, x0 + 20, base + 34), fill=colours["vanilla"])
    d.text((x0 + 24, base + 24), "vanilla", fill=(0, 0, 0))
    d.rectangle((x0 + 100, base + 24, x0 + 110, base + 34), fill=colours["deleaker"])
    d.text((x0 + 114, base + 24), "DeLeaker", fill=(0, 0, 0))
    return im


def heldout_report(path: Path) -> dict:
    """The report of a held-out stage's results file (evaluate --stage heldout), or a one-line error."""
    try:
        data = json.loads(path.read_text())
        return data["heldout"]["report"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--heldout {path}: not a held-out stage's results file ({type(e).__name__}: {e})") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deleaker.toyworld.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output PNG")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--artifact", type=Path, default=default_artifact_dir(),
                     help="toy-world artifact (onnxruntime backend; default: the embedded one)")
    src.add_argument("--model", type=Path, help="toy-world diffusers folder (torch backend), e.g. runtime/models/toyworld")
    ap.add_argument("--prompt", default=DEMO_PROMPT)
    ap.add_argument("--entities", default=",".join(DEMO_ENTITIES), help="comma-separated phrases of the prompt")
    ap.add_argument("--seeds", type=int, default=SEEDS, help=f"draw seeds 0..N-1 (default {SEEDS})")
    ap.add_argument("--heldout", type=Path, default=None,
                    help="a held-out stage's results file for the chart (default: the embedded model's, if present)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from deleaker.runtime.errors import run_reporting_errors

    return run_reporting_errors(ap.prog, lambda: _demo(args))


def _demo(args) -> int:
    if args.out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file, got {args.out}")
    if not args.out.parent.is_dir():
        raise ValueError(f"output folder {args.out.parent} does not exist")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if not 1 <= args.seeds <= 256:
        raise ValueError(f"--seeds must be 1..256, got {args.seeds}")
    entities = tuple(e.strip() for e in args.entities.split(",") if e.strip())
    J.parse_entities(entities)  # toy-world phrases, or a one-line error before loading anything
    heldout = args.heldout if args.heldout is not None else HELDOUT if HELDOUT.is_file() else None
    report = heldout_report(heldout) if heldout is not None else None
    from deleaker.runtime.backends import load_backend
    from deleaker.runtime.pipeline import GenerateRequest, Pipeline

    if args.model is not None:
        import torch

        torch.set_num_threads(args.threads)
        backend = load_backend("torch", str(args.model), progress=False)
    else:
        backend = load_backend("onnxruntime", str(args.artifact), threads=args.threads)
    pipe = Pipeline(backend, config=TOYWORLD_PRESET, max_batch=16)
    seeds = list(range(args.seeds))
    reqs = [GenerateRequest(prompt=args.prompt, entities=entities, seed=s, steps=STEPS, height=SIZE, width=SIZE,
                            deleaker=d) for d in (False, True) for s in seeds]
    results = pipe.generate(reqs, progress=False)  # vanilla then DeLeaker, batched
    n = len(seeds)
    van, dl = [r.image for r in results[:n]], [r.image for r in results[n:]]
    tags = [(image_tag(a, entities), image_tag(b, entities)) for a, b in zip(van, dl)]
    plot = None
    if report is not None:
        plot = chart(report, f"held-out pairs: {report['pairs']} (95% CI)")
    else:
        log.info("no held-out results file (%s): the picture has the grid only; pass --heldout", HELDOUT)
    title = f"{args.prompt}  (seeds 0-{n - 1}, fixed; top: vanilla, bottom: DeLeaker; exact judge's tags)"
    image = grid(van, dl, tags, seeds, title, plot)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(args.out)
    for label, row in (("vanilla", [t[0] for t in tags]), ("DeLeaker", [t[1] for t in tags])):
        log.info("%-8s %s", label, ", ".join(f"{row.count(k)} {k}" for k in ("leak", "clean", "missing", "flawed")))
    moves = {}
    for a, b in tags:
        if a != b:
            moves[f"{a} -> {b}"] = moves.get(f"{a} -> {b}", 0) + 1
    fixed = sum(b == "clean" and a != "clean" for a, b in tags)
    regressed = sum(a == "clean" and b != "clean" for a, b in tags)
    log.info("tag changed in %d of %d seeds (outlined): %d now clean, %d no longer clean; %s", sum(moves.values()), n,
             fixed, regressed, ", ".join(f"{k}: {v}" for k, v in sorted(moves.items())) or "none")
    if report is not None:
        v, d = report["vanilla"], report["deleaker"]
        log.info("held-out (%s, %d pairs): leak %.3f -> %.3f, clean %.3f -> %.3f", heldout, report["pairs"],
                 v["leak"], d["leak"], v["clean"], d["clean"])
    log.info("wrote %s (%dx%d px)", args.out, *image.size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
