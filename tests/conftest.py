"""Shared pytest fixtures and the one place `gpu` / `tensorrt` tests are skipped with their reason.

Keep this small: one fixture per shared resource.
"""

from __future__ import annotations

import functools
import os
import signal

import pytest
from hypothesis import HealthCheck, settings

# Property-based tests (Hypothesis): "ci" (the default) runs a few hundred examples per property,
# fast enough for `make test`; DELEAKER_HYPOTHESIS=long runs thousands, on demand.
settings.register_profile("ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("DELEAKER_HYPOTHESIS", "ci"))


@functools.cache
def _no_cuda_reason() -> str | None:
    try:
        import torch
    except ImportError as e:
        return f"needs a CUDA GPU (torch does not import: {e})"
    return None if torch.cuda.is_available() else "needs a CUDA GPU (torch sees none)"


@functools.cache
def _no_tensorrt_reason() -> str | None:
    from deleaker.runtime.backends.tensorrt_backend import TensorRTError, import_tensorrt

    try:
        import_tensorrt("this test")
    except TensorRTError as e:
        return str(e)
    return _no_cuda_reason()


def pytest_configure(config):
    """A runner started in the background (`cmd &`) ignores SIGINT, and the commands the tests
    start would inherit that: give the run Python's usual Ctrl-C handling, which children see as
    the default action (as a user's terminal gives them)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_runtest_setup(item):
    """`gpu` tests need CUDA; `tensorrt` tests need TensorRT 10+ and CUDA: skip with the reason."""
    if item.get_closest_marker("gpu") is not None and (why := _no_cuda_reason()):
        pytest.skip(why)
    if item.get_closest_marker("tensorrt") is not None and (why := _no_tensorrt_reason()):
        pytest.skip(why)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random-weight FLUX checkpoint (diffusers layout), built once per test session."""
    from deleaker.modeling.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-flux") / "model")


@pytest.fixture(scope="session")
def fused_op():
    """The fused CUDA op's library, loaded (only in `gpu` tests); skips with the reason it cannot load."""
    from deleaker.modeling import cuda_op

    try:
        return cuda_op.load()
    except cuda_op.CudaOpUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def tiny_h64_model_dir(tmp_path_factory):
    """The tiny checkpoint with head dim 64 (what the fused op's kernels take), built once."""
    from deleaker.modeling.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-h64") / "model", preset="tiny-h64")
