"""`deleaker-export verify ARTIFACT --model FAMILYDIR` for a model family's step artifact.

Two checks, each against the torch model of the source folder, DeLeaker on, settings the
artifact's default (for `--steps` steps):
  step  transformer.onnx in ONNX Runtime vs FamilyStep (the family's transformer with its DeLeaker
        processors, reference op) on the inputs of one DeLeaker transformer call captured from the
        torch pipeline, a step inside the intervention window: as captured (entities active, history
        from the steps before) and with every slot inactive; outputs `out` and `history_out`;
  loop  the family pipeline with its DeLeaker steps run by ONNX Runtime on the artifact
        (OnnxStepRunner), and its text encoder(s) and VAE decoder too where the artifact holds
        them (modeling/families/onnx_components.py), vs the torch pipeline, same seed: the final
        image on [0, 1] pixels.
An edit row per check shows DeLeaker edited: the step's output with active entities against
inactive slots, the loop's image against the stock pipeline's (DeLeaker off); each must exceed
EDIT_FACTOR x the check's atol, and the step's history must be non-zero, so parity cannot pass on
a step that edits nothing. Tolerances are tighter than FLUX.1's (export/verify.py TOLERANCES):
both sides float32 on the CPU, measured differences ~1e-6, while the tiny models' edits are >= 3e-4.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deleaker.runtime.config import DeLeakerConfig

from .verify import OutputResult

log = logging.getLogger("deleaker")

CHECKS = ("step", "loop")
# (atol, rtol); loop: [0, 1] pixels. Both sides float32 on the CPU; measured on the tiny models <= 2.1e-6
# (results/families-artifact/), so 1e-5 leaves 5x; real checkpoints (more blocks) may need --atol.
TOLERANCES = {"step": (1e-5, 1e-5), "loop": (1e-5, 0.0)}
EDIT_FACTOR = 10


@dataclass(frozen=True)
class EditResult:
    """How much DeLeaker moved an output (it must move it by more than `minimum`)."""

    check: str
    against: str
    max_abs: float
    minimum: float
    history_sum: float | None = None

    @property
    def passed(self) -> bool:
        return self.max_abs > self.minimum and (self.history_sum is None or self.history_sum > 0)

    @property
    def output(self) -> str:
        return "edit"

    def line(self) -> str:
        hist = f", history sum {self.history_sum:.3e}" if self.history_sum is not None else ""
        return (f"{self.check:5} {'edit vs ' + self.against:22} {'edit':12} max_abs {self.max_abs:.3e}{hist}  "
                f"(must exceed {self.minimum:g}{' and history > 0' if self.history_sum is not None else ''})  "
                f"{'PASS' if self.passed else 'FAIL'}")


def _row(check: str, feed: str, output: str, got: np.ndarray, want: np.ndarray, atol: float, rtol: float):
    d = np.abs(got.astype(np.float64) - want.astype(np.float64))
    rel = d / np.maximum(np.abs(want.astype(np.float64)), 1e-12)
    passed = bool(np.all(d <= atol + rtol * np.abs(want)))
    return OutputResult(check, feed, output, float(d.max()), float(d.mean()), float(rel.max()), float(rel.mean()),
                        atol, rtol, passed)


def window_step(config, steps: int, bps: int) -> int:
    """A step whose blocks edit with history masks: the middle one of those the windows allow."""
    from deleaker.modeling.families.generate import intervenes

    def editing(n: int) -> list[int]:
        cfg = config.replace(num_steps=n).resolved(bps)
        return [s for s in range(n) if any(intervenes(cfg, 2, s * bps + o) for o in range(bps))]

    edit = editing(steps)
    if not edit:
        enough = next((n for n in range(steps + 1, 1001) if editing(n)), None)
        raise ValueError(f"the artifact's default settings edit at no step of {steps} ({bps} joint attentions per "
                         f"step), so verify could not show an edit" +
                         (f": pass --steps {enough} or more" if enough else ""))
    return edit[len(edit) // 2]


def verify_family(artifact_dir: str | Path, model_dir: str | Path, checks=None, steps: int | None = None,
                  prompt: str | None = None, entities: tuple | None = None, atol: float | None = None,
                  rtol: float | None = None, seed: int = 0, report=print) -> list:
    """Run the checks; `report` gets one line per row. Returns every row (OutputResult and EditResult)."""
    from deleaker.modeling.families.generate import load, run
    from deleaker.modeling.families.onnx_step import cpu_session
    from deleaker.runtime.family_artifact import load_family_artifact

    from .family_artifact import capture, pad_slots
    from .family_onnx import FamilyStep

    checks = tuple(checks or CHECKS)
    if set(checks) - set(CHECKS):
        raise ValueError(f"unknown check(s) {sorted(set(checks) - set(CHECKS))} for a family step artifact; choose "
                         f"from {', '.join(CHECKS)}")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    art = load_family_artifact(artifact_dir)
    family_name = art.family
    t0 = time.perf_counter()
    family, pipe = load(model_dir)
    if family.name != family_name or type(pipe.transformer).__name__ != art.transformer_class:
        raise ValueError(f"{model_dir} is a {family.title} folder; the artifact is a {art.family_title} step")
    bps = family.blocks_per_step(pipe.transformer)
    if bps != art.blocks_per_step:
        raise ValueError(f"{model_dir} has {bps} joint attentions per step, the artifact {art.blocks_per_step}: not "
                         f"the folder it was exported from")
    config = DeLeakerConfig(**art.deleaker["config"])
    steps = steps or config.num_steps
    example = art.example
    prompt = prompt or example["prompt"]
    entities = tuple(entities or example["entities"])
    k = window_step(config, steps, bps)  # before any work: settings that edit nowhere cannot be verified
    kw = dict(prompt=prompt, entities=entities, height=art.height, width=art.width, steps=steps,
              guidance=example["guidance"], config=config, seed=seed)
    report(f"{art.family_title} step artifact {art.root}: {art.height}x{art.width}, batch {art.batch}, "
           f"{art.text_tokens} text tokens, {bps} DeLeakerAttention nodes ({art.layout}); {steps} steps, preset "
           f"{art.deleaker['preset']}, entities {','.join(entities)} (torch from {Path(model_dir).resolve()}, "
           f"loaded in {time.perf_counter() - t0:.1f}s)")
    calls, static, (torch_image, _) = capture(pipe, family, every=True, **kw)  # the torch loop, DeLeaker on
    rows = []
    tol = {c: (atol if atol is not None else TOLERANCES[c][0], rtol if rtol is not None else TOLERANCES[c][1])
           for c in CHECKS}
    if "loop" in checks:
        a, r = tol["loop"]
        run_kw = dict(seed=seed, steps=steps, height=art.height, width=art.width, guidance=example["guidance"],
                      config=config, output_type="np")
        standins = None
        if art.components is not None:  # the artifact's text encoder(s) and VAE decoder too
            from deleaker.modeling.families.onnx_components import install_components

            standins = install_components(pipe, art.components[0])
        try:
            onnx_image, counters = run(pipe, family, prompt, entities, step_file=art.step_path, **run_kw)
        finally:
            if standins is not None:
                standins.remove()
        stock, _ = run(pipe, family, prompt, entities, deleaker=False, **run_kw)
        new = [_row("loop", "DeLeaker on", "image", onnx_image, torch_image, a, r),
               EditResult("loop", "DeLeaker off", float(np.abs(onnx_image - stock).max()), EDIT_FACTOR * a)]
        onnx = f" and {', '.join(art.components[1])}" if art.components is not None else ""
        report(f"loop  ONNX Runtime ran {counters.calls // bps} DeLeaker steps{onnx}: {counters.line(entities)}")
        for row in new:
            report(row.line())
        rows += new
    if "step" in checks:
        a, r = tol["step"]
        ex = pad_slots(calls[k], art.entity_slots)
        inactive = {**ex, "entity_tokens": torch.zeros_like(ex["entity_tokens"])}
        step = FamilyStep(pipe.transformer, family, static).eval()  # the torch side: reference op
        sess = cpu_session(art.step_path)
        names = [i.name for i in sess.get_inputs()]
        outs = {}
        for feed, x in ((f"step {k} active", ex), (f"step {k} inactive", inactive)):
            got = sess.run(None, {n: x[n].numpy() for n in names})
            with torch.no_grad():
                want = [t.numpy() for t in step(**x)]
            outs[feed] = want
            new = [_row("step", feed, name, g, w, a, r) for name, g, w in zip(("out", "history_out"), got, want)]
            for row in new:
                report(row.line())
            rows += new
        (on, hist), (off, _) = outs.values()
        edit = EditResult("step", "inactive slots", float(np.abs(on - off).max()), EDIT_FACTOR * a,
                          float(np.abs(hist).sum()))
        report(edit.line())
        rows.append(edit)
    return rows
