"""The torch backend's output on the golden requests (tests/golden.py), bit for bit."""

from __future__ import annotations

import golden

from deleaker.runtime.backends import load_backend
from deleaker.runtime.pipeline import Pipeline


def test_torch_golden_digest(tiny_model_dir):
    golden.check("torch", Pipeline(load_backend("torch", str(tiny_model_dir), device="cpu"), max_batch=2))
