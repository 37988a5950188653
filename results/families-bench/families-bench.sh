#!/usr/bin/env bash
# Makes families-bench.txt: deleaker-bench step mode on each family's tiny random folder, planted
# entities, the family's own preset and step count (so the busiest step aggregates history).
# Run from the repository root with the project installed: bash results/families-bench/families-bench.sh
set -euo pipefail
out=results/families-bench/families-bench.txt
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
{
  echo "# deleaker-bench step mode on the tiny family models (random weights: timing of the plumbing only)"
  echo "# machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $(date -u +%Y-%m-%d)"
  echo "# the cores were shared with other work while these ran: the times are upper bounds; the edit counters are exact"
  echo "# columns: mode | backend | size | T | B | E | S | variant | per step: median (p10-p90) | s / image | images/s | vs vanilla | peak host MiB | peak device MiB | mask coverage"
} > "$out"
for fs in "sd3 28" "qwenimage 50" "flux2 50"; do
  set -- $fs
  folder=$(python -m deleaker.modeling.tiny_model --family "$1")
  printf '\n$ deleaker-bench --model ~/.cache/deleaker/tiny-%s --mode step --resolution 512 --steps %s --impl sdpa,reference,inactive --plant-coverage 0.14 --threads 2 --no-plot --out bench-%s\n' "$1" "$2" "$1" >> "$out"
  deleaker-bench --model "$folder" --mode step --resolution 512 --steps "$2" --impl sdpa,reference,inactive \
    --plant-coverage 0.14 --threads 2 --no-plot --quiet --out "$tmp/$1"
  grep '^| step' "$tmp/$1/summary.md" >> "$out"
  python - "$tmp/$1/results.jsonl" >> "$out" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["impl"] == "reference":
        e = r["edit_counters"]
        e.pop("last_block", None)
        print("edit_counters (reference):", json.dumps(e, sort_keys=True), "| family", r["family"], "| layout",
              r["layout"], "| step", r["step"], "| mask_coverage", r["mask_coverage"])
PY
done
