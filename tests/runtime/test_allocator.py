"""Host allocator tuning (runtime/allocator.py): applied by load_backend on glibc, left alone when
the user tuned malloc or turned it off, and it removes the page-fault storm of the tiny model's
batches without changing an image (measured in fresh processes, which is where it matters)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from deleaker.benchmarks import allocator_check

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="the tuning applies to glibc's malloc only")
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "DELEAKER_MALLOC_TUNING"}


def _state_after_load(tiny_model_dir, **env) -> str:
    code = ("from deleaker.runtime.backends import load_backend\n"
            "from deleaker.runtime.allocator import tune_host_allocator\n"
            f"load_backend('torch', {str(tiny_model_dir)!r}, progress=False)\n"
            "print(tune_host_allocator())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**CLEAN_ENV, **env},
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@glibc
def test_load_backend_tunes_unless_told_otherwise(tiny_model_dir):
    assert _state_after_load(tiny_model_dir) == "tuned"
    assert _state_after_load(tiny_model_dir, DELEAKER_MALLOC_TUNING="0") == "off (DELEAKER_MALLOC_TUNING=0)"
    assert _state_after_load(tiny_model_dir, MALLOC_TOP_PAD_="1048576") == "left as the environment set it"
    assert _state_after_load(tiny_model_dir, GLIBC_TUNABLES="glibc.malloc.trim_threshold=1") == \
        "left as the environment set it"


@glibc
def test_tuning_removes_the_fault_storm_and_changes_no_image(tiny_model_dir, monkeypatch):
    for k in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(k)
    rows = allocator_check.run(str(tiny_model_dir), runs=1, seconds=1.0, size=64, batch=4, say=lambda _: None)
    tuned, plain = (next(r for r in rows if r["env"].endswith(v)) for v in ("=1", "=0"))
    assert tuned["tuning"] == "tuned" and plain["tuning"].startswith("off")
    assert tuned["image_sum"] == plain["image_sum"] and tuned["edited"] == plain["edited"] == 4
    per_batch = [r["minor_faults"] / r["batches"] for r in (tuned, plain)]
    # measured: about 40 faults per batch tuned against 20,000-50,000 untuned
    assert per_batch[0] * 20 < per_batch[1], per_batch
    assert json.dumps(allocator_check.summary(rows))  # the summary the docs quote is serialisable
