#!/bin/bash
# How long one full garbage collection holds the interpreter lock in a process that has loaded the
# tiny offline model (what `deleaker serve` holds), before and after freeze_loaded_objects (what the
# server's warm-up calls). Five processes, three full collections each way per process.
# Run from the repository root with the project's .venv active; writes gc-pauses.jsonl beside this.
# Machine: the 2-core development CPU (shared), torch 2.13.0+cpu, glibc 2.36, 2026-12-06.
set -euo pipefail
out=results/gc-pauses/gc-pauses.jsonl
: > "$out"
for run in 1 2 3 4 5; do
  python - >> "$out" <<'PY'
import gc, json, time
from deleaker.modeling.tiny_model import ensure_tiny_model
from deleaker.runtime import load_pipeline
from deleaker.runtime.gc_freeze import freeze_loaded_objects

pipe = load_pipeline(str(ensure_tiny_model()), progress=False)

def full_collection_s():
    t0 = time.perf_counter()
    gc.collect()
    return time.perf_counter() - t0

tracked = len(gc.get_objects())
before = [full_collection_s() for _ in range(3)]
said = freeze_loaded_objects()
after = [full_collection_s() for _ in range(3)]
print(json.dumps({"tracked_objects": tracked, "full_collection_s": before, "freeze": said,
                  "full_collection_after_freeze_s": after}))
PY
done
cat "$out"
