#!/usr/bin/env bash
# Server vs in-process Pipeline on the same batches, tiny model, 64x64, 2 steps, DeLeaker settings whose
# windows fall inside the 2 steps (so DeLeaker edits). Run from the repository root:
#   bash benchmarks/results/cpu-2026-12-01/serve-compare.sh
set -euo pipefail
OUT=benchmarks/results/cpu-2026-12-01
BIN=${BIN:-.venv/bin}
PORT=${PORT:-8790}
# the tiny offline model (random weights), named explicitly: the embedded default is the toy-world model
TINY=$($BIN/python -m deleaker.modeling.tiny_model)
SETTINGS='{"start_aggregating_from": 0, "start_intervention_from": 1, "do_smoothing": false}'
uptime > "$OUT/serve-compare-load.txt"
$BIN/deleaker serve --model "$TINY" --port "$PORT" --max-batch 4 > "$OUT/serve-compare-server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.5; done
for spec in "1 30" "4 80" "16 160"; do
  set -- $spec
  $BIN/deleaker-bench --mode serve --url "http://127.0.0.1:$PORT" --requests "$2" --concurrency "$1" \
      --size 64x64 --steps 2 --prompt "a cat and a cheetah in a field" --entities cat,cheetah \
      --deleaker-settings "$SETTINGS" --compare --model "$TINY" --out "$OUT/serve-compare-c$1.jsonl" \
      | tee "$OUT/serve-compare-c$1-summary.txt"
done
uptime >> "$OUT/serve-compare-load.txt"
