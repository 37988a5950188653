#!/usr/bin/env bash
# GPU verification on a machine that has only the repository (docs/performance.md, "Verifying on
# a GPU"). Two steps, each in the repository root:
#
#   benchmarks/gpu_verify.sh wheels            # here, with pip access: the wheels the GPU machine
#                                              # lacks, into .whl/ (git-ignored; carried along)
#   benchmarks/gpu_verify.sh run [ARGS...]     # there: install .whl/*.whl and this repo (offline),
#                                              # then python -m deleaker.benchmarks.gpu_verify ARGS
#
# `run` writes the stage folders to $OUT/gpu-verify (OUT: the folder whose files come back;
# default ./gpu-verify-out) and then, because only a few files may come back, packs them into
# $OUT/gpu-verify.tar.gz beside summary.md and summary.json (the folder is removed where OUT is set). ARGS go to gpu_verify unchanged:
# without --dry-run it is the GPU run and fails its stages where there is no GPU; --dry-run (the
# CPU run at tiny sizes) happens only when asked. PYTHON picks the interpreter (default python3).
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# diffusers is not on the GPU machine; importlib_metadata is its one requirement missing there
WHEELS=${WHEELS:-"diffusers==0.42.1 importlib_metadata==8.7.0"}

case "${1:-}" in
wheels)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
    # shellcheck disable=SC2086
    exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS
    ;;
run)
    shift
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || { echo "gpu_verify.sh: installing .whl/*.whl failed" >&2; exit 2; }
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    if ! "$PYTHON" -c "import deleaker.benchmarks.gpu_verify" 2>/dev/null; then
        # the package maps the repo's folders (pyproject.toml): an offline editable install
        "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
            || { echo "gpu_verify.sh: pip install -e . failed" >&2; exit 2; }
    fi
    dest=${OUT:-gpu-verify-out}
    mkdir -p "$dest"
    PYTHONUNBUFFERED=1 "$PYTHON" -m deleaker.benchmarks.gpu_verify --out "$dest/gpu-verify" "$@"
    rc=$?
    cp "$dest/gpu-verify/summary.md" "$dest/gpu-verify/summary.json" "$dest/" 2>/dev/null
    tar -czf "$dest/gpu-verify.tar.gz" -C "$dest" gpu-verify
    # on the device machine only a few files come back: the archive and the two summaries
    [ -n "${OUT:-}" ] && rm -rf "$dest/gpu-verify"
    exit $rc
    ;;
*)
    echo "usage: benchmarks/gpu_verify.sh wheels | run [--dry-run] [--only STAGE,...]" >&2
    exit 2
    ;;
esac
