#!/usr/bin/env bash
# Server vs in-process Pipeline on the same batches, tiny model, 64x64, 2 steps, DeLeaker settings whose
# windows fall inside the 2 steps (so DeLeaker edits). Five rounds; each round runs concurrency 1, 4, 16
# against one warm server, then the in-process Pipeline on the batch sizes the server ran (--compare).
# Run from the repository root:
#   bash benchmarks/results/cpu-2026-12-02/serve-compare.sh
set -euo pipefail
OUT=${OUT:-$(dirname "$0")}
BIN=${BIN:-.venv/bin}
PORT=${PORT:-8790}
ROUNDS=${ROUNDS:-5}
# the tiny offline model (random weights), named explicitly: the embedded default is the toy-world model
TINY=$($BIN/python -m deleaker.modeling.tiny_model)
SETTINGS='{"start_aggregating_from": 0, "start_intervention_from": 1, "do_smoothing": false}'
uptime > "$OUT/serve-compare-load.txt"
$BIN/deleaker serve --model "$TINY" --port "$PORT" --max-batch 4 > "$OUT/serve-compare-server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.5; done
bench() {  # concurrency requests [extra args]
  $BIN/deleaker-bench --mode serve --url "http://127.0.0.1:$PORT" --requests "$2" --concurrency "$1" \
      --size 64x64 --steps 2 --prompt "a cat and a cheetah in a field" --entities cat,cheetah \
      --deleaker-settings "$SETTINGS" "${@:3}"
}
bench 16 32 > /dev/null  # warm-up: first batches of every size the rounds use
: > "$OUT/serve-compare-summary.jsonl"
for round in $(seq "$ROUNDS"); do
  for spec in "1 40" "4 120" "16 320"; do
    set -- $spec
    bench "$1" "$2" --compare --model "$TINY" --out "$OUT/serve-compare-r$round-c$1.jsonl" \
      | python3 -c "import json,sys; s=json.load(sys.stdin)['summary']; print(json.dumps({'round': $round, 'concurrency': $1, **s}))" \
      | tee -a "$OUT/serve-compare-summary.jsonl"
  done
  uptime >> "$OUT/serve-compare-load.txt"
done
