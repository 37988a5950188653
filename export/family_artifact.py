"""`deleaker-export onnx --model FAMILYDIR`: the step artifact of a model family other than FLUX.1.

One pipeline call of the family's own diffusers pipeline at the requested size (DeLeaker on,
the family's guidance, as `deleaker generate --model` calls it) is stopped at its first DeLeaker
transformer call; that call's inputs are the example export/family_onnx.py exports FamilyStep
from (static shapes). The artifact is transformer.onnx, the text encoder(s) and VAE decoder in
components/ (export/family_components.py; --step-only leaves them out) and manifest.json
(runtime/family_artifact.py); the scheduler, tokenizers and the torch transformer (for calls
without DeLeaker) stay in the source folder, which the manifest names. Qwen-Image's text length follows the prompt (its pipeline does
not pad): the artifact serves prompts of the exported token count; others are refused in one line
(modeling/families/onnx_step.py).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

import torch

from deleaker.modeling.families import family_of_folder
from deleaker.modeling.families.onnx_step import OP_INPUTS
from deleaker.runtime import op_schema
from deleaker.runtime.artifact import FAMILY_FORMAT
from deleaker.runtime.config import preset
from deleaker.runtime.family_artifact import COMPONENTS_DIR, FAMILY_FORMAT_VERSION, STEP_FILE
from deleaker.runtime.step_io import DEFAULT_ENTITY_SLOTS

from .manifest import _versions, write_manifest
from .onnx_export import OPSET
from .out_folder import check_out, publish, temp_folder
from .progress import stage

log = logging.getLogger("deleaker")

DEFAULT_SIDE = 256  # as `deleaker generate --model` on a family folder
EXAMPLE_PROMPT, EXAMPLE_ENTITIES = "a cat and a cheetah in a field", ("cat", "cheetah")


class FamilyExportError(ValueError):
    """A family export request that cannot be carried out (one line)."""


class _Captured(Exception):
    pass


def capture(pipe, family, *, prompt: str, entities: tuple, height: int, width: int, steps: int, guidance: float,
            config, seed: int = 0, every: bool = False, step_file=None):
    """Run the family pipeline with DeLeaker on and record the DeLeaker transformer calls' inputs:
    ([{the call's tensor kwargs and op inputs, cloned}], static non-tensor args, the run's result).
    every=False stops the run at the first such call (the result is then None)."""
    from deleaker.modeling.families.generate import run

    calls, static = [], {}
    forward = pipe.transformer.forward

    def grab(*args, **kwargs):
        call = (kwargs.get(family.kwargs_name) or {}).get("deleaker")
        if call is not None:
            calls.append({**{k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v)},
                          **{k: getattr(call, k).clone() for k in OP_INPUTS}})
            static.update({k: v for k, v in kwargs.items() if k == "img_shapes"})  # Qwen-Image's, baked in
            if not every:
                raise _Captured
        return forward(*args, **kwargs)

    pipe.transformer.forward = grab
    result = None
    try:
        result = run(pipe, family, prompt, entities, seed=seed, steps=steps, height=height, width=width,
                     guidance=guidance, config=config, output_type="np", step_file=step_file)
    except _Captured:
        pass
    finally:
        pipe.transformer.forward = forward
    if not calls:
        raise FamilyExportError(f"{family.title}: the pipeline made no DeLeaker transformer call (are the entities in "
                                f"the prompt?)")
    return calls, static, result


def pad_slots(example: dict, slots: int) -> dict:
    """The example with `slots` entity slots (the extra ones inactive: zero tokens, zero history)."""
    have = int(example["entity_tokens"].shape[1])
    if slots == have:
        return example
    pad = lambda t: torch.cat([t, t.new_zeros(t.shape[0], slots - have, *t.shape[2:])], dim=1)  # noqa: E731
    return {**example, "entity_tokens": pad(example["entity_tokens"]), "history": pad(example["history"])}


def graph_io(path: Path) -> tuple[dict, dict, int, set]:
    """(inputs, outputs as {name: {dtype, shape}}, DeLeakerAttention node count, their layouts)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def tensors(values):
        return {v.name: {"dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                         "shape": [d.dim_value if d.HasField("dim_value") else d.dim_param
                                   for d in v.type.tensor_type.shape.dim]} for v in values}

    nodes = [n for n in model.graph.node if (n.domain, n.op_type) == (op_schema.ONNX_DOMAIN, op_schema.OP_NAME)]
    layouts = {onnx.helper.get_attribute_value(a) for n in nodes for a in n.attribute if a.name == "layout"}
    return tensors(model.graph.input), tensors(model.graph.output), len(nodes), layouts


def export_family_artifact(model_dir: str | Path, out_dir: str | Path, *, height: int | None, width: int | None,
                           entity_slots: int, preset_name: str | None, guidance: float = 3.5,
                           prompt: str = EXAMPLE_PROMPT, entities: tuple = EXAMPLE_ENTITIES,
                           force: bool = False, components: bool = True) -> Path:
    from deleaker.export.family_onnx import FamilyStep, export_step
    from deleaker.modeling.families.generate import load

    family = family_of_folder(model_dir)
    if family.name == "flux1":
        raise FamilyExportError("FLUX.1 folders export the full artifact (export/onnx_export.py)")
    height = height or DEFAULT_SIDE
    width = width or height
    if entity_slots < DEFAULT_ENTITY_SLOTS:
        raise FamilyExportError(f"--entity-slots must be >= {DEFAULT_ENTITY_SLOTS} for a {family.title} step (the "
                                f"drop-in gives every call at least {DEFAULT_ENTITY_SLOTS}), got {entity_slots}")
    if len(entities) > entity_slots:
        raise FamilyExportError(f"{len(entities)} example entities but --entity-slots {entity_slots}")
    name = preset_name or family.preset
    config = preset(name)  # an unknown preset is one line, before loading
    source = Path(model_dir).expanduser().resolve()
    out = check_out(out_dir, {"--model": source}, force)
    t0 = time.perf_counter()
    family, pipe = load(source)
    log.info("loaded %s (%s) from %s in %.1fs", family.title, type(pipe).__name__, source, time.perf_counter() - t0)
    t = time.perf_counter()
    (example,), static, _ = capture(pipe, family, prompt=prompt, entities=tuple(entities), height=height, width=width,
                                    steps=config.num_steps, guidance=guidance, config=config)
    example = pad_slots(example, entity_slots)
    B, T = (int(x) for x in example["encoder_hidden_states"].shape[:2])
    I = int(example["history"].shape[-1])
    log.info("captured the first DeLeaker transformer call at %dx%d in %.1fs: batch %d, %d text tokens, %d image "
             "tokens, %d entity slots (guidance %s: %s)", height, width, time.perf_counter() - t, B, T, I,
             entity_slots, guidance, family.guidance)
    tmp = temp_folder(out)
    try:
        t = time.perf_counter()
        with stage(f"exporting one {family.title} step ({type(pipe.transformer).__name__}) to ONNX"):
            step = FamilyStep(pipe.transformer, family, static).eval()
            export_step(step, example, tmp / STEP_FILE)
        seconds = time.perf_counter() - t
        inputs, outputs, nodes, layouts = graph_io(tmp / STEP_FILE)
        bps = family.blocks_per_step(pipe.transformer)
        if nodes != bps or layouts != {family.layout_code}:
            raise FamilyExportError(f"the exported step has {nodes} DeLeakerAttention nodes with layouts {layouts}; "
                                    f"expected {bps} with {family.layout} ({family.layout_code})")
        size = sum(p.stat().st_size for p in tmp.iterdir())
        log.info("exported %s in %.1fs: %d DeLeakerAttention nodes (one per joint attention), layout %s, %.1f MB",
                 STEP_FILE, seconds, nodes, family.layout, size / 2**20)
        exported = []
        if components:  # the text encoder(s) and VAE decoder, for ONNX Runtime stand-ins at generation
            from .family_components import export_components

            t = time.perf_counter()
            with stage(f"exporting the {family.title} text encoder(s) and VAE decoder to ONNX"):
                done = export_components(pipe, tmp / COMPONENTS_DIR, height=height, width=width)
            exported = [c.name for c in done if not c.reason]
            kept = {c.name: c.reason for c in done if c.reason}
            log.info("exported %s to %s/ in %.1fs%s", ", ".join(exported) or "no component", COMPONENTS_DIR,
                     time.perf_counter() - t, "".join(f"; {n} stays torch ({r})" for n, r in kept.items()))
        manifest = {
            "format": FAMILY_FORMAT, "format_version": FAMILY_FORMAT_VERSION, "kind": "family-step",
            "producer": {"name": "deleaker-export", "onnx_opset": OPSET, **_versions()},
            "family": family.name, "family_title": family.title,
            "transformer_class": type(pipe.transformer).__name__, "pipeline_class": type(pipe).__name__,
            "source_model": str(source), "layout": family.layout, "guidance_structure": family.guidance,
            "height": height, "width": width, "text_tokens": T, "image_tokens": I, "batch": B,
            "entity_slots": entity_slots, "blocks_per_step": bps,
            "example": {"prompt": prompt, "entities": list(entities), "guidance": guidance},
            "deleaker": {"preset": name, "config": dataclasses.asdict(config),
                         "op_version": op_schema.ONNX_OPSET_VERSION},
            "steps": {"onnxruntime": STEP_FILE}, "inputs": inputs, "outputs": outputs,
            "components": {"folder": COMPONENTS_DIR, "onnxruntime": exported} if components else None,
            "export_seconds": round(seconds, 2), "files": {},
        }
        write_manifest(tmp, manifest)
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s step artifact written to %s in %.1fs", family.title, out, time.perf_counter() - t0)
    return out

