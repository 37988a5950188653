"""Rebuild the shipped artifact of the embedded default model from its shipped diffusers folder.

    python -m deleaker.export.embedded [--out DIR]      (also: make toyworld-artifact)

The default model ships as its diffusers folder (runtime/models/toyworld) and as the portable ONNX
artifact of that folder (runtime/models/toyworld-onnx), which the runtime loads when no model is
named (runtime/embedded.py). This is the one definition of how that artifact is made: the
`deleaker-export onnx` options below, the card copied as every export copies it, and the source
named by its path in the repository rather than this machine's. tests/runtime/test_embedded_artifact.py
exports again and compares with the shipped folder.
"""

from __future__ import annotations

import argparse
import logging
import sys

from deleaker.runtime.embedded import default_artifact_dir, default_model_dir

# `deleaker-export onnx` options of the shipped artifact: the card's 32x32 as the example size;
# sides 16-1024 (the server's default limits); --portable: standard ONNX only, so the same files
# run on ONNX Runtime and OpenVINO (docs/export.md); the card's preset is the default settings.
EXPORT_OPTIONS = ("--height", "32", "--width", "32", "--min-size", "16", "--max-size", "1024", "--portable")
SOURCE = "runtime/models/toyworld"  # how the manifest names the checkpoint (its place in the repository)


def export_default(out, force: bool = True):
    """Export the shipped diffusers folder into `out` exactly as the shipped artifact was made."""
    from .cli import export_spec, parse_args
    from .onnx_export import export_artifact

    args = parse_args(["onnx", "--model", str(default_model_dir()), "--out", str(out), *EXPORT_OPTIONS])
    return export_artifact(args.model, out, export_spec(args), force=force, source=SOURCE)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deleaker.export.embedded", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(default_artifact_dir()),
                   help="artifact folder (default: the shipped one, replaced)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="deleaker-export: %(message)s")
    from deleaker.modeling.libs import quiet_libraries

    from .cli import run_cli

    def go() -> int:
        quiet_libraries()
        export_default(args.out)
        return 0

    return run_cli(p.prog, go)


if __name__ == "__main__":
    sys.exit(main())
