"""An artifact's graphs against its manifest: the check a backend runs when it opens a graph, and
`deleaker-export verify` runs on the files.

Cheap: graph I/O only (names, dtypes, ranks, fixed dimensions), read from a session or the
graph's header. The expectations come from two places that must agree with the graph: the step's
I/O contract (step_io, with the manifest's entity slots E, text tokens T, CLIP length L and
channels C / Cl filled in) and the tensors the manifest recorded at export. Each disagreement is
one line; a backend logs every line and refuses the artifact with one error naming the first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from . import step_io
from .artifact import MANIFEST, Artifact, ArtifactError

log = logging.getLogger("deleaker")

# ONNX Runtime / ONNX element type names -> step_io dtype names
_TYPE_NAMES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool", "tensor(bfloat16)": "bfloat16"}


@dataclass(frozen=True)
class GraphTensor:
    name: str
    dtype: str  # step_io dtype name (float32, int64, ...)
    shape: tuple  # ints for fixed dimensions, anything else (a name, None) for free ones


def ort_tensors(args) -> list[GraphTensor]:
    """ONNX Runtime NodeArgs (session.get_inputs() / get_outputs()) -> GraphTensors."""
    return [GraphTensor(a.name, _TYPE_NAMES.get(a.type, a.type), tuple(a.shape or ())) for a in args]


def _fixed(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _known_dims(artifact: Artifact) -> dict[str, int]:
    m = artifact.model
    return {"E": m["entity_slots"], "T": m["max_text_tokens"], "L": m["clip_max_length"], "C": m["in_channels"],
            "Cl": m["latent_channels"]}


def mismatches(artifact: Artifact, name: str, inputs: list[GraphTensor], outputs: list[GraphTensor]) -> list[str]:
    """One line per disagreement between graph `name`'s I/O and what the manifest says of it."""
    model_io = next(m for m in step_io.MODELS if m.name == name)
    want_in = step_io.inputs_for(bool(artifact.model["guidance_embeds"])) if name == "transformer" else model_io.inputs
    dims = _known_dims(artifact)
    recorded = artifact.manifest.get("models", {}).get(name)
    recorded = recorded if isinstance(recorded, dict) else {}
    lines = []
    for kind, want, got in (("input", want_in, inputs), ("output", model_io.outputs, outputs)):
        have = {t.name: t for t in got}
        names = {t.name for t in want}
        for t in want:
            g = have.get(t.name)
            if g is None:
                lines.append(f"{name}: the graph has no {kind} {t.name!r} (it has {', '.join(sorted(have)) or 'none'})")
                continue
            if g.dtype != t.dtype:
                lines.append(f"{name}: {kind} {t.name} is {g.dtype} in the graph, the runtime feeds {t.dtype}")
            if len(g.shape) != len(t.shape):
                lines.append(f"{name}: {kind} {t.name} has {len(g.shape)} dimensions in the graph, "
                             f"expected {len(t.shape)} {list(t.shape)}")
                continue
            for axis, (gd, sym) in enumerate(zip(g.shape, t.shape)):
                want_dim = sym if isinstance(sym, int) else dims.get(sym)
                if want_dim is not None and _fixed(gd) and gd != want_dim:
                    what = {"E": "model.entity_slots", "T": "model.max_text_tokens", "L": "model.clip_max_length",
                            "C": "model.in_channels", "Cl": "model.latent_channels"}.get(sym, "the step contract")
                    lines.append(f"{name}: {kind} {t.name} axis {axis} ({sym}) is {gd} in the graph but {want_dim} "
                                 f"in {MANIFEST} ({what})")
        for extra in sorted(set(have) - names):
            lines.append(f"{name}: the graph has an {kind} {extra!r} the runtime does not feed or read")
        rec = recorded.get(f"{kind}s")
        if isinstance(rec, dict) and set(rec) != set(have):
            lines.append(f"{name}: {MANIFEST} records {kind}s {sorted(rec)} but the graph has {sorted(have)}")
    lines += _size_lines(artifact, name, {t.name: t for t in inputs}, {t.name: t for t in outputs})
    return lines


def _size_lines(artifact: Artifact, name: str, inputs: dict, outputs: dict) -> list[str]:
    """A graph that fixes its image size must fix one inside the manifest's profiles.image_side."""
    lo, hi = artifact.size_range
    f = artifact.model["vae_scale_factor"]
    sides = []
    if name == "vae_decoder":
        if (t := outputs.get("images")) is not None and len(t.shape) == 4:
            sides += [d for d in t.shape[2:] if _fixed(d)]
        if (t := inputs.get("latents")) is not None and len(t.shape) == 4:
            sides += [d * f for d in t.shape[2:] if _fixed(d)]
    return [f"{name}: the graph fixes an image side of {s} pixels, outside profiles.image_side [{lo}, {hi}] "
            f"in {MANIFEST}" for s in sides if not lo <= s <= hi]


def check_graph(artifact: Artifact, name: str, inputs: list[GraphTensor], outputs: list[GraphTensor],
                path=None) -> None:
    """Log every mismatch of graph `name` (one line each) and raise one ArtifactError naming the first."""
    lines = mismatches(artifact, name, inputs, outputs)
    if not lines:
        return
    for line in lines:
        log.error("artifact %s: %s", artifact.root, line)
    more = f" (and {len(lines) - 1} more, logged above)" if len(lines) > 1 else ""
    where = path if path is not None else artifact.root
    raise ArtifactError(f"{where} disagrees with {MANIFEST}: {lines[0]}{more}; re-export the artifact "
                        f"(`deleaker-export onnx --model CHECKPOINT --out {artifact.root}`)")
