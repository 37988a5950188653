"""Shared pytest fixtures. Keep this small: one fixture per shared resource."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random-weight FLUX checkpoint (diffusers layout), built once per test session."""
    from deleaker.export.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-flux") / "model")
