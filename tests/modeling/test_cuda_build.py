"""The CUDA sources compile (CPU CI): a broken kernel or adapter build fails here, not on a GPU.

Each .cu of plugins/deleaker_attention/src is compiled with `nvcc -c` for sm_90 (what the GPU
build uses), in parallel. The torch adapter is syntax-checked against the installed torch's
headers (a CPU torch build lacks one generated CUDA header; a stub stands in for it).
Skipped, with the reason, only where nvcc (or a C++ compiler / torch headers) is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KERNELS = REPO / "plugins" / "deleaker_attention"
ADAPTER = REPO / "plugins" / "torch_adapter" / "deleaker_torch.cpp"


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for cand in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        p = Path(cand) / "bin" / "nvcc"
        if cand and p.is_file():
            return str(p)
    return None


def test_kernel_sources_compile_for_sm90(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (install the CUDA toolkit to compile-check the kernels)")
    sources = sorted((KERNELS / "src").glob("*.cu"))
    assert sources, "no CUDA sources found"

    def compile_one(src: Path):
        cmd = [nvcc, "-std=c++17", "-O3", "-arch=sm_90", "-Xptxas", "-v", "-I", str(KERNELS / "include"),
               "-c", str(src), "-o", str(tmp_path / (src.stem + ".o"))]
        r = subprocess.run(cmd, capture_output=True, text=True)
        return src.name, r.returncode, r.stdout + r.stderr

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(compile_one, sources))
    failed = [(name, log) for name, rc, log in results if rc != 0]
    assert not failed, "\n\n".join(f"{name}:\n{log[-4000:]}" for name, log in failed)
    # a kernel that spills heavily to local memory is a performance bug worth failing on
    for name, _, log in results:
        for spill in re.findall(r"(\d+) bytes spill stores", log):
            assert int(spill) <= 64, f"{name}: {spill} bytes of register spills:\n{log[-2000:]}"


def test_torch_adapter_compiles(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    nvcc = _nvcc()
    if cxx is None or nvcc is None:
        pytest.skip("needs a C++ compiler and the CUDA toolkit headers")
    torch = pytest.importorskip("torch")
    from torch.utils import cpp_extension

    homes = [Path(nvcc).resolve().parents[1], Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")),
             Path("/usr/local/cuda")]
    cuda_inc = next((h / "include" for h in homes if (h / "include" / "cuda_runtime_api.h").is_file()), None)
    if cuda_inc is None:
        pytest.skip(f"CUDA headers (cuda_runtime_api.h) not found for {nvcc}")
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    # generated at torch build time, absent from CPU wheels; it only carries a build flag
    (stub / "cuda_cmake_macros.h").write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    std = "-std=c++20" if (major, minor) >= (2, 13) else "-std=c++17"
    cmd = [cxx, std, "-fsyntax-only", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           "-I", str(tmp_path / "stub"), "-I", str(KERNELS / "include"), "-I", str(cuda_inc)]
    for inc in cpp_extension.include_paths():
        cmd += ["-I", inc]
    r = subprocess.run(cmd + [str(ADAPTER)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


def test_cmake_configures_torch_adapter(tmp_path):
    """CMake's torch probe: a (fake) CUDA build of torch gives the adapter target the right ABI
    define and every include dir (a probe that split paths wrongly broke the first GPU build)."""
    cmake, nvcc = shutil.which("cmake"), _nvcc()
    if cmake is None or nvcc is None:
        pytest.skip("needs cmake and nvcc")
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\n"
                    "echo CUDA=13.0\n"
                    "echo INC=/opt/fake/torch/include:/opt/fake/torch/include/torch/csrc/api/include\n"
                    "echo LIB=/opt/fake/torch/lib\n"
                    "echo ABI=1\n"
                    "echo VER=2.11\n")
    fake.chmod(0o755)
    build = tmp_path / "build"
    env = {**os.environ, "CUDACXX": nvcc}
    r = subprocess.run([cmake, "-S", str(REPO), "-B", str(build), f"-DDELEAKER_PYTHON={fake}",
                        "-G", "Unix Makefiles"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "torch 2.11 (CUDA 13.0) -> building the torch adapter" in r.stdout
    flags = (build / "CMakeFiles" / "deleaker_torch.dir" / "flags.make").read_text()
    assert "-D_GLIBCXX_USE_CXX11_ABI=1" in flags
    assert "-I/opt/fake/torch/include " in flags and "-I/opt/fake/torch/include/torch/csrc/api/include" in flags
