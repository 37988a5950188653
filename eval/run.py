"""`deleaker eval run`: vanilla and DeLeaker images of every record and seed, plus reference images.

Both images of an item come from the same seed through the same engine (vanilla = every entity
slot inactive). Reference images (one per entity: a prompt naming the entity alone, fixed seed)
feed the paper judge's "visual differences from references" question; they are cached in RUN/refs.
Requests go to the batched Pipeline in chunks; after each chunk its items are written (atomic
PNGs, then one manifest line each), so an interrupted run resumes where it stopped. An item whose
requests fail is recorded with the error and retried by the next run; the others go on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from deleaker.runtime.outputs import check_output

from .data import Record, load_records
from .store import RunDir, append_jsonl, atomic_write

log = logging.getLogger("deleaker.eval")

REF_TEMPLATE = "a photo of {article} {entity}"
# for a model whose card limits its words (the toy world's): the entity alone, in the model's words
PLAIN_REF_TEMPLATE = "{article} {entity}"


def reference_prompt(entity: str, card=None) -> str:
    """The prompt of an entity's reference image; `card` (the model's ModelCard) picks the plain
    template when the photo template's words are outside the model's vocabulary."""
    article = "an" if entity[:1].lower() in "aeiou" else "a"
    prompt = REF_TEMPLATE.format(article=article, entity=entity)
    if card is not None and card.unknown_words(prompt):
        prompt = PLAIN_REF_TEMPLATE.format(article=article, entity=entity)
    return prompt


@dataclass(frozen=True)
class RunSettings:
    """What the images depend on; a resumed run must match the stored settings exactly."""

    dataset: str
    source: str | None  # model folder (torch) or artifact folder (onnxruntime); None: tiny model
    backend: str = "torch"
    preset: str = "flux-dev"
    steps: int | None = None  # None: the preset's num_steps (resolved before the run starts)
    height: int = 512
    width: int = 512
    guidance: float = 3.5
    ref_seed: int = 0
    device: str = "cpu"
    dtype: str = "fp32"
    splits: tuple[str, ...] = ()  # empty: every split

    def identity(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("device")  # where it runs does not change what is asked for
        d["splits"] = list(self.splits)
        d["ref_template"] = REF_TEMPLATE
        return d


def check_settings(settings: RunSettings, batch: int) -> None:
    """What can be checked before loading anything (one-line ValueErrors); the loaded pipeline
    checks the rest (the model's size range, the settings against its blocks) before any output."""
    import math

    from deleaker.runtime.backends import backend_class
    from deleaker.runtime.config import preset
    from deleaker.runtime.pipeline import MAX_STEPS

    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"--batch must be an integer >= 1, got {batch!r}")
    preset(settings.preset)  # unknown preset: one line
    if settings.steps is not None and (isinstance(settings.steps, bool) or not isinstance(settings.steps, int)
                                       or not 1 <= settings.steps <= MAX_STEPS):
        raise ValueError(f"--steps must be in [1, {MAX_STEPS}], got {settings.steps}")
    for name, side in (("--height", settings.height), ("--width", settings.width)):
        # the size rule is the model's own (runtime/request.py): the loaded pipeline checks it before any output
        if isinstance(side, bool) or not isinstance(side, int) or side < 1:
            raise ValueError(f"{name} must be a positive number of pixels, got {side!r}")
    if not math.isfinite(settings.guidance) or settings.guidance < 0:
        raise ValueError(f"--guidance must be a finite number >= 0, got {settings.guidance}")
    backend_class(settings.backend)  # unknown or not installed
    if settings.backend != "torch" and settings.dtype != "fp32":
        raise ValueError(f"--dtype applies to the torch backend; the {settings.backend} backend runs what was exported")
    if settings.source is not None and not Path(settings.source).expanduser().is_dir():
        raise FileNotFoundError(f"{settings.source} is not a folder (--model / --artifact)")


def _check_resume(run: RunDir, settings: RunSettings) -> None:
    """An existing run folder must have been made with the same settings (nothing is written here)."""
    if run.root.exists() and not run.root.is_dir():
        raise ValueError(f"--out {run.root} exists and is not a folder")
    if not run.settings.exists():
        return
    want = settings.identity()
    try:
        have = json.loads(run.settings.read_text())
    except ValueError as e:
        raise ValueError(f"{run.settings} is not valid JSON ({e}); use a new --out folder") from None
    diff = [k for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
    if diff:
        k = diff[0]
        raise ValueError(f"{run.root} was made with {k}={have.get(k)!r}, not {want.get(k)!r}; resume with the "
                         "same settings or use a new --out folder")


def _entry(rec: Record, status: str, **kw) -> dict:
    return {"id": rec.item_id, "split": rec.split, "prompt": rec.prompt, "entities": list(rec.entities),
            "seed": rec.seed, "status": status, **kw}


def pending_items(run: RunDir, records: list[Record], references: bool = True) -> list[Record]:
    """The records still to generate: not done, or (references: True) done without their reference images."""
    done = run.items()
    out = []
    for rec in records:
        e = done.get(rec.item_id)
        if e and e["status"] == "ok" and run.image(rec.item_id, "vanilla").exists() \
                and run.image(rec.item_id, "deleaker").exists() \
                and (not references or all(run.ref(x).exists() for x in rec.entities)):
            continue
        out.append(rec)
    return out


def run_generation(settings: RunSettings, out: str, batch: int = 2, progress: bool = True,
                   on_item: Callable[[dict], None] | None = None, pipeline=None, references: bool = True) -> dict:
    """Generate what is missing in `out`; returns counts {ok, error, skipped, problems}.

    references: make the reference images (only the judges with `reads_references` read them:
    `deleaker eval run --judge` decides); a later run with them on adds them to the items done.

    on_item(entry) is called after each manifest line is written. pipeline: an existing
    Pipeline to use (else one is built from settings).
    """
    # Everything is checked, and the model loaded, before the run folder is made or touched:
    # a bad option leaves nothing behind (and blocks no later run in that folder).
    check_settings(settings, batch)
    if settings.steps is None:  # the run folder records the step count it ran
        from deleaker.runtime.config import preset

        settings = dataclasses.replace(settings, steps=preset(settings.preset).num_steps)
    loaded = load_records(settings.dataset, settings.splits or None)
    if loaded.problems:
        log.warning("%d bad record(s) skipped (listed above)", len(loaded.problems))
    if not loaded.records:
        raise ValueError(f"no usable records in {settings.dataset}")
    run = RunDir(out)
    # a dataset file's own folder is no input: runs may live beside the file, never on it or around it
    check_output(out, {"--model / --artifact": settings.source, "--dataset": settings.dataset}, folder=True)
    _check_resume(run, settings)
    todo = pending_items(run, loaded.records, references)
    counts = {"ok": 0, "error": 0, "skipped": len(loaded.records) - len(todo), "problems": len(loaded.problems)}
    log.info("%d item(s) in %s: %d done before, %d to generate", len(loaded.records), settings.dataset,
             counts["skipped"], len(todo))
    if not todo:
        return counts
    pipe = pipeline or _pipeline(settings, batch)
    from deleaker.runtime.pipeline import GenerateRequest, RequestFailed

    base = GenerateRequest(prompt="-", steps=settings.steps, height=settings.height, width=settings.width,
                           guidance_scale=settings.guidance)
    # the run's own settings on this model (size range, steps, windows for its blocks); a prompt's
    # own problems (too long, entity not found) stay per-item errors
    card = pipe.backend.info.card
    probe = next((e for rec in loaded.records for e in rec.entities), "object")
    pipe.check(dataclasses.replace(base, prompt=reference_prompt(probe, card), deleaker=False))
    run.create()
    new_settings = not run.settings.exists()
    if new_settings:
        atomic_write(run.settings, (json.dumps(settings.identity(), indent=2) + "\n").encode())
    try:
        return _generate_items(run, settings, pipe, base, todo, counts, batch, progress, on_item, RequestFailed,
                               references)
    except Exception:
        # failed before its first item (an interrupt keeps a resumable folder): no half-made folder
        if new_settings and not run.manifest.exists():
            run.undo_create()
            run.settings.unlink(missing_ok=True)
        raise


def _generate_items(run: RunDir, settings: RunSettings, pipe, base, todo: list[Record], counts: dict, batch: int,
                    progress: bool, on_item, RequestFailed, references: bool = True) -> dict:
    # reference images first: items need them, and they are shared between items
    ref_errors: dict[str, str] = {}
    missing = sorted({e for rec in todo for e in rec.entities if not run.ref(e).exists()}) if references else []
    if not references:
        log.info("no reference images: the chosen judges read none")
    card = pipe.backend.info.card  # a model that knows only its own words gets plain reference prompts
    for i in tqdm(range(0, len(missing), batch), desc="reference images", unit="batch", disable=not progress):
        chunk = missing[i:i + batch]
        reqs = [dataclasses.replace(base, prompt=reference_prompt(e, card), seed=settings.ref_seed, deleaker=False)
                for e in chunk]
        for e, res in zip(chunk, _generate(pipe, reqs)):
            if isinstance(res, RequestFailed):
                ref_errors[e] = res.message
                log.error("reference image for %r failed: %s", e, res.message)
            else:
                atomic_write(run.ref(e), res.png_bytes())

    per_chunk = max(1, batch // 2)  # two requests (vanilla, DeLeaker) per item
    bar = tqdm(total=len(todo), desc="items", unit="item", disable=not progress)
    try:
        for i in range(0, len(todo), per_chunk):
            chunk = todo[i:i + per_chunk]
            ready = [r for r in chunk if not any(e in ref_errors for e in r.entities)]
            reqs = [dataclasses.replace(base, prompt=r.prompt, entities=r.entities, seed=r.seed, deleaker=d)
                    for r in ready for d in (False, True)]
            t0 = time.perf_counter()
            results = _generate(pipe, reqs) if reqs else []
            seconds = round(time.perf_counter() - t0, 3)
            by_id = {r.item_id: results[2 * k:2 * k + 2] for k, r in enumerate(ready)}
            for rec in chunk:
                entry = _finish(run, rec, by_id.get(rec.item_id), ref_errors, seconds, RequestFailed)
                append_jsonl(run.manifest, entry)
                counts[entry["status"]] += 1
                if entry["status"] == "error":
                    log.error("item %s failed: %s", rec.item_id, entry["error"])
                bar.update(1)
                if on_item is not None:
                    on_item(entry)
    finally:
        bar.close()
    log.info("generated %d item(s), %d failed (recorded in %s; rerun to retry them)", counts["ok"],
             counts["error"], run.manifest)
    return counts


def _finish(run: RunDir, rec: Record, results, ref_errors: dict, seconds: float, failed_type) -> dict:
    bad_refs = [e for e in rec.entities if e in ref_errors]
    if bad_refs:
        return _entry(rec, "error", error=f"reference image for {bad_refs[0]!r} failed: {ref_errors[bad_refs[0]]}")
    failures = [r.message for r in results if isinstance(r, failed_type)]
    if failures:
        return _entry(rec, "error", error=failures[0])
    for variant, res in zip(("vanilla", "deleaker"), results):
        atomic_write(run.image(rec.item_id, variant), res.png_bytes())
    return _entry(rec, "ok", vanilla=str(run.image(rec.item_id, "vanilla").relative_to(run.root)),
                  deleaker=str(run.image(rec.item_id, "deleaker").relative_to(run.root)),
                  refs={e: str(run.ref(e).relative_to(run.root)) for e in rec.entities if run.ref(e).exists()},
                  seconds=seconds)


def _generate(pipe, reqs: list) -> list:
    """Invalid requests come back as RequestFailed; a failure of the whole call fails each request."""
    from deleaker.runtime.pipeline import RequestFailed

    try:
        return pipe.generate(reqs, errors="return")
    except (ValueError, RuntimeError, MemoryError) as e:
        log.error("a batch of %d request(s) failed: %s", len(reqs), e)
        return [RequestFailed(i, r, f"{type(e).__name__}: {e}") for i, r in enumerate(reqs)]


def _pipeline(settings: RunSettings, batch: int):
    from deleaker.runtime.backends import load_backend
    from deleaker.runtime.config import preset
    from deleaker.runtime.pipeline import Pipeline

    cfg = preset(settings.preset)
    options = dict(device=settings.device, progress=False)
    if settings.backend == "torch":
        options["dtype"] = settings.dtype
    elif settings.dtype != "fp32":
        raise ValueError(f"--dtype applies to the torch backend; the {settings.backend} backend runs what was exported")
    source = settings.source
    if source is None:  # the eval tools' default: the tiny offline model (see docs/eval.md)
        from deleaker.modeling.tiny_model import ensure_tiny_model

        source = str(ensure_tiny_model())
    backend = load_backend(settings.backend, source, **options)
    return Pipeline(backend, config=cfg, max_batch=batch)
