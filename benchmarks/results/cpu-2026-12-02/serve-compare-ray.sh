#!/usr/bin/env bash
# One Ray Serve replica vs the in-process Pipeline on the same batches (as serve-compare.sh, concurrency 16).
# Run from the repository root: bash benchmarks/results/cpu-2026-12-02/serve-compare-ray.sh
set -euo pipefail
OUT=${OUT:-$(dirname "$0")}
BIN=${BIN:-.venv/bin}
PORT=${PORT:-8791}
# the tiny offline model (random weights), named explicitly: the embedded default is the toy-world model
TINY=$($BIN/python -m deleaker.modeling.tiny_model)
SETTINGS='{"start_aggregating_from": 0, "start_intervention_from": 1, "do_smoothing": false}'
uptime > "$OUT/serve-compare-ray-load.txt"
RAY_AUTH_MODE=disabled $BIN/deleaker serve --model "$TINY" --ray --replicas 1 --port "$PORT" --max-batch 4 \
    > "$OUT/serve-compare-ray-server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1200); do grep -q "application running" "$OUT/serve-compare-ray-server.log" && break; sleep 0.5; done
$BIN/deleaker-bench --mode serve --url "http://127.0.0.1:$PORT" --requests 320 --concurrency 16 \
    --size 64x64 --steps 2 --prompt "a cat and a cheetah in a field" --entities cat,cheetah \
    --deleaker-settings "$SETTINGS" --compare --model "$TINY" --out "$OUT/serve-compare-ray-c16.jsonl" \
    | tee "$OUT/serve-compare-ray-c16-summary.txt"
uptime >> "$OUT/serve-compare-ray-load.txt"
