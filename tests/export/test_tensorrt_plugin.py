"""The TensorRT plugin's sources, generated field header and CMake detection (CPU CI).

- deleaker_fields.h equals what `python -m deleaker.runtime.op_schema_c` renders from runtime/op_schema.py;
- the plugin compiles to an object against TensorRT headers given in $DELEAKER_TRT_INCLUDE
  (a folder holding NvInferRuntime.h; skipped with the reason when unset) and exports TensorRT's
  plugin-library entry points;
- the CMake detection module reports why it skips, and finds TensorRT when pointed at it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from deleaker.runtime import op_schema, op_schema_c

REPO = Path(__file__).resolve().parents[2]
PLUGIN_DIR = REPO / "plugins" / "tensorrt"
SOURCE = PLUGIN_DIR / "deleaker_trt_plugin.cpp"
FIND_MODULE = PLUGIN_DIR / "FindDeleakerTensorRT.cmake"


def test_fields_header_is_generated_from_op_schema():
    text = (PLUGIN_DIR / "deleaker_fields.h").read_text(encoding="utf-8")
    assert text == op_schema_c.render_fields(), f"deleaker_fields.h is stale: run {op_schema_c.COMMAND}"


def test_fields_header_lists_the_schema_in_order():
    text = (PLUGIN_DIR / "deleaker_fields.h").read_text(encoding="utf-8")
    names = re.search(r"kDlInputNames\[\] = \{(.*?)\};", text).group(1)
    assert [n.strip().strip('"') for n in names.split(",")] == list(op_schema.INPUT_NAMES)
    attrs = re.search(r"kDlAttrNames\[\] = \{(.*?)\};", text).group(1)
    assert [n.strip().strip('"') for n in attrs.split(",")] == list(op_schema.ATTRIBUTE_NAMES)
    assert f'#define DL_TRT_PLUGIN_VERSION "{op_schema.PLUGIN_VERSION}"' in text
    assert f'#define DL_TRT_PLUGIN_NAMESPACE "{op_schema.PLUGIN_NAMESPACE}"' in text
    ranks = re.search(r"kDlInputRanks\[DL_NUM_INPUTS\] = \{(.*?)\};", text).group(1)
    assert [int(r) for r in ranks.split(",")] == [4, 4, 4, 3, 3, 0, 1, 2, 2, 2]


def test_generator_check_mode_detects_a_stale_header(tmp_path):
    for rel, text in op_schema_c.render().items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text, encoding="utf-8")
    stale = tmp_path / op_schema_c.FIELDS_HEADER
    stale.write_text(op_schema_c.render_fields().replace('"blocks_per_step"', '"blocks"'), encoding="utf-8")
    assert op_schema_c.main(["--check", "--root", str(tmp_path)]) == 1
    assert op_schema_c.main(["--root", str(tmp_path)]) == 0 and op_schema_c.main(["--check", "--root", str(tmp_path)]) == 0


def test_plugin_compiles_against_tensorrt_headers(tmp_path):
    inc = os.environ.get("DELEAKER_TRT_INCLUDE")
    if not inc:
        pytest.skip("set DELEAKER_TRT_INCLUDE to a folder with TensorRT 10+ headers (NvInferRuntime.h), e.g. "
                    "include/ of github.com/NVIDIA/TensorRT, to compile-check the plugin")
    if not (Path(inc) / "NvInferRuntime.h").is_file():
        pytest.fail(f"DELEAKER_TRT_INCLUDE={inc} has no NvInferRuntime.h")
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler found")
    cuda_inc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
    if not (cuda_inc / "cuda_runtime_api.h").is_file():
        pytest.skip(f"CUDA headers not found in {cuda_inc} (set CUDA_HOME)")
    obj = tmp_path / "plugin.o"
    cmd = [cxx, "-std=c++17", "-fPIC", "-Wall", "-Wextra", "-Werror", "-Wno-deprecated-declarations",
           "-isystem", inc, "-isystem", str(cuda_inc), "-I", str(REPO / "plugins" / "deleaker_attention" / "include"),
           "-I", str(PLUGIN_DIR), "-c", str(SOURCE), "-o", str(obj)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-6000:]}"
    nm = shutil.which("nm")
    if nm:
        syms = subprocess.run([nm, "--defined-only", str(obj)], capture_output=True, text=True).stdout
        for entry in ("getCreators", "setLoggerFinder"):
            assert re.search(rf"\bT {entry}$", syms, re.M), f"{entry} is not an exported C symbol"


def _cmake_find(tmp_path, **defs) -> str:
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not found")
    env = {k: v for k, v in os.environ.items() if k != "TensorRT_ROOT"}
    args = [cmake] + [f"-D{k}={v}" for k, v in defs.items()] + ["-P", str(FIND_MODULE)]
    r = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout + r.stderr


def test_cmake_skips_with_the_reason_without_tensorrt(tmp_path):
    if Path("/usr/include/x86_64-linux-gnu/NvInferRuntime.h").exists() or Path("/usr/include/NvInferRuntime.h").exists():
        pytest.skip("TensorRT is installed system-wide here")
    out = _cmake_find(tmp_path, TensorRT_ROOT=tmp_path / "none")
    assert "skipping the TensorRT plugin: TensorRT headers (NvInferRuntime.h) not found" in out
    assert "TensorRT_ROOT" in out


def test_cmake_finds_headers_and_library(tmp_path):
    inc = tmp_path / "trt" / "include"
    lib = tmp_path / "trt" / "lib"
    inc.mkdir(parents=True)
    lib.mkdir()
    (inc / "NvInferRuntime.h").write_text("/* stand-in */\n")
    (inc / "NvInferVersion.h").write_text("#define TRT_MAJOR_ENTERPRISE 10\n#define TRT_MINOR_ENTERPRISE 7\n"
                                          "#define NV_TENSORRT_MAJOR TRT_MAJOR_ENTERPRISE\n")
    out = _cmake_find(tmp_path, TensorRT_INCLUDE_DIR=inc, TensorRT_LIB_DIR=lib)
    assert "not libnvinfer" in out  # headers alone are not enough to build and link
    (lib / "libnvinfer.so").write_bytes(b"")
    out = _cmake_find(tmp_path, TensorRT_ROOT=tmp_path / "trt")
    assert "deleaker: TensorRT 10.7" in out
    (inc / "NvInferVersion.h").write_text("#define NV_TENSORRT_MAJOR 8\n#define NV_TENSORRT_MINOR 6\n")
    out = _cmake_find(tmp_path, TensorRT_ROOT=tmp_path / "trt")
    assert "older than 10" in out
