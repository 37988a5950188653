"""Record short pilot runs of the training recipe and tabulate them (docs/toyworld.md, "v3 pilots").

    python -m deleaker.toyworld.pilots record --model DIR --eval EVAL --name NAME --out results/toyworld/v3-pilots
    python -m deleaker.toyworld.pilots table results/toyworld/v3-pilots
    python -m deleaker.toyworld.pilots raw --model DIR --out DIR2
    python -m deleaker.toyworld.pilots grid --model DIR --out grid.png [--colour red]

`record` keeps what a pilot showed in one small JSON: the recipe (DIR-training/train_config.json),
the transformer's step time (median of its loss CSV's per-step times), the wall time, and from
`evaluate --stage single` (and, if run, `--stage heldout`) in EVAL the vanilla rates with their
intervals, without per-image rows. `table` prints the markdown table of every recorded pilot. `raw` writes a copy of DIR whose
transformer holds the raw (not averaged) weights of its last checkpoint (DIR-training/state.pt):
in a pilot shorter than the EMA's horizon (1 / (1 - decay) steps) the EMA still carries the
first steps' weights. `grid` draws one colour's 25 one-object prompts (rows: textures, columns:
shapes) at image seeds 0 and 1 side by side, upscaled 4x, vanilla: whether the shape word or the
noise seed chooses the outline shows as columns that differ or rows of equal outlines.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

# recipe fields a pilot table shows (the rest are in each JSON)
SHOWN = {"steps": "steps", "heads": "heads", "batch": "batch", "vae_channels": "VAE", "single": "single",
         "anchored": "anchored", "snap": "snap"}


def step_seconds(curves: Path) -> float:
    """Median seconds per transformer step from the loss CSV's cumulative 'seconds' column."""
    t = np.array([float(r["seconds"]) for r in csv.DictReader(open(curves / "transformer_loss.csv"))])
    return float(np.median(np.diff(t))) if len(t) > 1 else float("nan")


def _vanilla(stage: dict) -> dict:
    rep = stage["report"]
    keep = ("leak", "clean", "all_present", "mixing", "fidelity_colour", "fidelity_texture", "fidelity_shape",
            "all_right")
    out = {"samples": rep["pairs"], "intervals": rep["intervals"],
           **{k: rep["vanilla"][k] for k in keep}, **{k + "_ci95": rep["vanilla"][k + "_ci95"] for k in keep}}
    ns = rep["named_share"]["vanilla"]
    if ns["n"] and ns["chance"]:
        out["named_share"] = ns  # wrong values that are the other entity's, vs the prompt-blind share (clustered z)
    return out


def record(model: Path, evaluated: Path, name: str, out: Path, note: str = "") -> Path:
    curves = model.parent / f"{model.name}-training"
    cfg = json.loads((curves / "train_config.json").read_text())
    row = {"name": name, "note": note, "recipe": cfg, "step_seconds": step_seconds(curves),
           "wall_seconds": cfg.get("wall_seconds")}
    for stage in ("single", "heldout"):
        f = evaluated / f"{stage}-torch.json"
        if f.exists():
            res = json.loads(f.read_text())
            row[stage] = {"command": res["command"], **_vanilla(res[stage])}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(row, indent=1) + "\n")
    return path


def raw_weights(model: Path, out: Path) -> Path:
    """A copy of `model` with the raw weights of its last checkpoint as its transformer."""
    import shutil

    import torch

    from .train import STATE_FILE, make_transformer, TrainConfig

    state = torch.load(model.parent / f"{model.name}-training" / STATE_FILE, weights_only=False)
    shutil.copytree(model, out, dirs_exist_ok=True)
    c = json.loads((model.parent / f"{model.name}-training" / "run.json").read_text())["config"]
    cfg = TrainConfig(**{**c, "vae_channels": tuple(c["vae_channels"]), "axes_dims_rope": tuple(c["axes_dims_rope"])})
    tr = make_transformer(cfg)
    tr.load_state_dict(state["model"])
    tr.save_pretrained(out / "transformer")
    return out


def grid(model: Path, out: Path, colour: str = "red", scale: int = 4) -> Path:
    from PIL import Image, ImageDraw

    from deleaker.runtime.backends import load_backend
    from deleaker.runtime.pipeline import GenerateRequest, Pipeline

    from . import world
    from .preset import SIZE, STEPS

    if colour not in world.COLOURS:
        raise ValueError(f"unknown colour {colour!r}; known: {', '.join(world.COLOURS)}")
    things = [world.Thing(colour, t, sh) for t in world.TEXTURES for sh in world.SHAPES]
    reqs = [GenerateRequest(prompt=world.caption_for([t]), entities=(t.phrase,), seed=seed, steps=STEPS, height=SIZE,
                            width=SIZE, deleaker=False) for t in things for seed in (0, 1)]
    images = [r.image for r in Pipeline(load_backend("torch", str(model), progress=False), max_batch=50).generate(reqs)]
    cell, pad, head = SIZE * scale, 4, 14
    cols, rows = len(world.SHAPES), len(world.TEXTURES)
    W, H = 70 + cols * (2 * cell + 3 * pad), head + rows * (cell + pad)
    im = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(im)
    for c, sh in enumerate(world.SHAPES):
        d.text((70 + c * (2 * cell + 3 * pad), 1), f"{sh} (seeds 0, 1)", fill=(0, 0, 0))
    for r, tex in enumerate(world.TEXTURES):
        d.text((2, head + r * (cell + pad) + cell // 2), tex, fill=(0, 0, 0))
        for c in range(cols):
            for k in range(2):
                x = 70 + c * (2 * cell + 3 * pad) + k * (cell + pad)
                img = images[2 * (r * cols + c) + k]
                im.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (x, head + r * (cell + pad)))
    im.save(out)
    return out


def _ci(d: dict, k: str) -> str:
    lo, hi = d[k + "_ci95"]
    return f"{d[k]:.2f} [{lo:.2f}, {hi:.2f}]"


def table(folder: Path) -> str:
    rows = ["| pilot | recipe | threads | s/step | wall | one object: all right | colour | texture | shape | two "
            "objects: wrong values from the other entity (chance 25%) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for f in sorted(folder.glob("*.json")):
        p = json.loads(f.read_text())
        r = p["recipe"]
        recipe = ", ".join(f"{label} {r[k]}" for k, label in SHOWN.items() if k in r)
        s = p.get("single")
        cells = [_ci(s, k) for k in ("all_right", "fidelity_colour", "fidelity_texture", "fidelity_shape")] if s \
            else ["-"] * 4
        h = p.get("heldout", {}).get("named_share")
        two = (f"{100 * h['share']:.1f}% of {h['n']} (clustered z {h['z']:+.1f}; {p['heldout']['samples']} pairs, all "
               f"present {p['heldout']['all_present']:.2f})" if h else "-")
        rows.append(f"| {p['name']} | {recipe} | {r.get('threads')} | {p['step_seconds']:.2f} | "
                    f"{p['wall_seconds'] / 60:.0f} min | "
                    + " | ".join(cells) + f" | {two} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deleaker.toyworld.pilots", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("--model", type=Path, required=True)
    rec.add_argument("--eval", type=Path, required=True, help="the --out of evaluate --stage single/heldout")
    rec.add_argument("--name", required=True)
    rec.add_argument("--note", default="")
    rec.add_argument("--out", type=Path, required=True)
    raw = sub.add_parser("raw")
    raw.add_argument("--model", type=Path, required=True)
    raw.add_argument("--out", type=Path, required=True)
    gr = sub.add_parser("grid")
    gr.add_argument("--model", type=Path, required=True)
    gr.add_argument("--out", type=Path, required=True)
    gr.add_argument("--colour", default="red")
    tab = sub.add_parser("table")
    tab.add_argument("folder", type=Path)
    args = ap.parse_args(argv)
    from deleaker.runtime.errors import run_reporting_errors

    def go() -> int:
        if args.cmd == "grid":
            import torch

            torch.set_num_threads(1)
            print(grid(args.model, args.out, args.colour))
            return 0
        if args.cmd == "raw":
            print(raw_weights(args.model, args.out))
            return 0
        if args.cmd == "record":
            if not (args.model.parent / f"{args.model.name}-training" / "train_config.json").is_file():
                raise ValueError(f"--model {args.model}: no finished training run beside it ({args.model.name}-training/"
                                 "train_config.json)")
            if not (args.eval / "single-torch.json").is_file():
                raise ValueError(f"--eval {args.eval}: no single-torch.json (run evaluate --stage single --out EVAL)")
            print(record(args.model, args.eval, args.name, args.out, args.note))
        else:
            if not args.folder.is_dir():
                raise ValueError(f"{args.folder} is not a folder of recorded pilots")
            print(table(args.folder))
        return 0

    return run_reporting_errors(ap.prog, go)


if __name__ == "__main__":
    raise SystemExit(main())
