"""The runtime package stays lean, and the op contract doc matches the schema module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from deleaker.runtime import op_schema

ROOT = Path(__file__).resolve().parents[2]

BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {BLOCKED}:
            raise ImportError('blocked in this test: ' + name)
sys.meta_path.insert(0, Block())
"""


def run_blocked(code: str, blocked=("torch", "diffusers", "transformers", "onnx", "onnxruntime", "tensorrt")):
    prog = BLOCKER.replace("{BLOCKED}", repr(set(blocked))) + code
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120)


def test_runtime_imports_without_heavy_libraries():
    r = run_blocked("import deleaker.runtime.config, deleaker.runtime.op_schema, deleaker.runtime.pipeline, "
                    "deleaker.runtime.cli, deleaker.runtime.backends, deleaker.runtime.tokens, "
                    "deleaker.runtime.scheduler, deleaker.runtime.latents, deleaker.runtime.images; print('ok')")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    assert run_blocked("import torch").returncode != 0  # the blocker itself works


def test_op_contract_doc_is_generated_from_schema():
    doc = (ROOT / "docs" / "op-contract.md").read_text()
    assert doc == op_schema.markdown(), "regenerate: python -m deleaker.runtime.op_schema > docs/op-contract.md"


def test_config_fields_are_the_op_schema_settings():
    """The configs' fields are written out (runtime/config.py); op_schema.SETTINGS stays the one
    source: each setting's name, order, type and default (its type too) must equal the schema's."""
    import dataclasses
    import typing

    from deleaker.runtime.config import DeLeakerConfig, ResolvedConfig

    def fields(cls):
        hints = typing.get_type_hints(cls)
        return [(f.name, hints[f.name], f.default, type(f.default)) for f in dataclasses.fields(cls)]

    kind = {s.name: op_schema.PY_TYPES[s.type] for s in op_schema.SETTINGS}
    missing = dataclasses.MISSING
    assert fields(DeLeakerConfig) == [
        (s.name, kind[s.name] if s.default is not None else kind[s.name] | None, s.default, type(s.default))
        for s in op_schema.SETTINGS] + [("num_steps", int, 20, int)]
    assert fields(ResolvedConfig) == [(s.name, kind[s.name], missing, type(missing)) for s in op_schema.SETTINGS] + [
        ("num_steps", int, missing, type(missing)), ("blocks_per_step", int, missing, type(missing))]


def test_backends_come_from_entry_points_only(monkeypatch):
    """The registry is the `deleaker.backends` entry-point group: the installed ones, and any other
    distribution's, found the same way (here a stand-in distribution registering `mine`)."""
    from importlib.metadata import EntryPoint

    import pytest

    import deleaker.runtime.backends as backends

    assert backends.available_backends() == ["aoti", "onnxruntime", "openvino", "tensorrt", "torch"]
    assert backends.backend_class("onnxruntime").__name__ == "OnnxRuntimeBackend"
    mine = EntryPoint("mine", "deleaker.runtime.backends.onnxruntime_backend:OnnxRuntimeBackend", backends.GROUP)
    monkeypatch.setattr(backends, "entry_points", lambda group: [mine] if group == backends.GROUP else [])
    assert backends.available_backends() == ["mine"]
    assert backends.backend_class("mine").__name__ == "OnnxRuntimeBackend"
    with pytest.raises(backends.BackendError, match="unknown backend 'torch'; available: mine"):
        backends.backend_class("torch")
