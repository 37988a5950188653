#!/usr/bin/env bash
# One-call GPU check (run from the repository root on a CUDA machine):
#   build the plugins with CMake, then scripts/gpu_check.py (correctness vs the reference op,
#   op timings vs cuDNN SDPA, FLUX step timings). Results: $OUT/{build.log,check.log,results.json,
#   results.md,gpu.txt}; a short table is printed last.
# Extra arguments go to gpu_check.py (e.g. --sections cases,timing --quick).
# Wheels in .whl/ (e.g. diffusers, absent from the GPU image) are installed to /tmp/site first.
set -uo pipefail
start=$(date +%s)
# DL_BUDGET: seconds the whole call may take (the checker skips what would not fit)
export DL_DEADLINE=$(( start + ${DL_BUDGET:-600} - 10 ))
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=$(command -v python3)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
if ls .whl/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# the repo as the `deleaker` namespace package without installing it
mkdir -p /tmp/dlpkg/deleaker
for d in runtime export benchmarks; do ln -sfn "$PWD/$d" "/tmp/dlpkg/deleaker/$d"; done
export PYTHONPATH=/tmp/dlpkg${PYTHONPATH:+:$PYTHONPATH}

t0=$(date +%s)
{ cmake -S . -B build -G Ninja -DDELEAKER_PYTHON="$PY" && cmake --build build -j "$(nproc)"; } > "$OUT/build.log" 2>&1
rc=$?
echo "build rc=$rc in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/build.log"
if [ $rc -ne 0 ]; then tail -60 "$OUT/build.log"; exit $rc; fi
grep -E "spill|registers" "$OUT/build.log" | sort | uniq -c | sort -rn | head -5
# Two processes, so a kernel fault in the correctness matrix cannot take the timings with it.
# Extra arguments replace this split (e.g. `--sections cases --quick`).
if [ $# -gt 0 ]; then runs=("$*"); else runs=("--sections lse,cases --tag a" "--sections timing,profile,flux --tag b"); fi
status=0
for r in "${runs[@]}"; do
  left=$(( DL_DEADLINE - $(date +%s) ))
  [ $left -lt 20 ] && { echo "no time left for: $r"; status=1; continue; }
  # the first of two runs (correctness) gets at most DL_CASES_S seconds, the rest is for timings
  if [ ${#runs[@]} -gt 1 ] && [ "$r" = "${runs[0]}" ] && [ $left -gt ${DL_CASES_S:-150} ]; then left=${DL_CASES_S:-150}; fi
  # shellcheck disable=SC2086
  DL_DEADLINE=$(( $(date +%s) + left )) timeout -k 5 $(( left + 5 )) "$PY" scripts/gpu_check.py --out "$OUT" $r 2>&1 \
    | tee -a "$OUT/check.log"
  rc=${PIPESTATUS[0]}
  [ $rc -ne 0 ] && { echo "gpu_check.py $r exited with $rc"; status=$rc; }
done
exit $status
