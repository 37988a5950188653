"""What every artifact exporter (onnx, aoti) does around its models, in one place: export the
models of step_io.MODELS one at a time (one model's weights in memory at once), then write the
tokenizers and manifest.json into the folder that is about to be published."""

from __future__ import annotations

import gc
import logging
import shutil
from pathlib import Path
from typing import Callable

from deleaker.runtime import step_io
from deleaker.runtime.model_card import CARD_FILE

from . import manifest as mf

log = logging.getLogger("deleaker")

# model name -> (load it from the checkpoint, export it to a path)
Steps = dict[str, tuple[Callable[[], object], Callable[[object, Path], object]]]


def export_models(steps: Steps, folder: Path, suffix: str) -> dict:
    """Run each model's (load, export) in step_io.MODELS order into folder/NAME{suffix}; returns
    {name: what export returned} (an Exported record)."""
    exported = {}
    names = step_io.MODEL_NAMES
    for i, name in enumerate(names):
        log.info("[%d/%d] %s", i + 1, len(names), name)
        load, export = steps[name]
        model = load()
        exported[name] = export(model, folder / f"{name}{suffix}")
        del model
        gc.collect()  # free one model's weights before loading the next
    return exported


def write_tokenizers_and_manifest(folder: Path, ckpt, spec, exported: dict, opset: int | None,
                                  edit: Callable[[dict], None] | None = None, source: str | None = None) -> None:
    """The tokenizers (as transformers builds them, saved as tokenizer.json for the runtime's
    `tokenizers`-only loader; FLUX.1-dev's CLIP folder has none) and the manifest, which `edit`
    may complete (an exporter's own fields) before it is written. source: the checkpoint as the
    manifest names it (default: its absolute path)."""
    from deleaker.modeling.checkpoint import export_tokenizer

    tokenizers = {}
    for name in ("tokenizer", "tokenizer_2"):
        export_tokenizer(getattr(ckpt, name), folder / name)
        tokenizers[name] = name
    card = Path(ckpt.root) / CARD_FILE
    if card.is_file():  # the model's declared preset, size and words travel with its engines
        shutil.copyfile(card, folder / CARD_FILE)
    manifest = mf.build_manifest(ckpt=ckpt, spec=spec, exported=exported, tokenizers=tokenizers,
                                 source=source or str(ckpt.root), opset=opset)
    if edit is not None:
        edit(manifest)
    mf.write_manifest(folder, manifest)
