"""Implementations of the DeLeakerAttention op, selectable by name.

Every entry has the reference op's calling convention (op contract v2, runtime/op_schema.py):
    fn(q, k, v, entity_tokens, history, step, grid, windows, knobs, rules, attrs: dict) -> (out, history_out)
with q, k, v [B, H, N, D] and attrs = {"block_offset", "blocks_per_step", "layout"} (layout may be
left out: text_image). Both call the one
torch op torch.ops.deleaker.attention: "reference" as defined by modeling/reference_op.py (the
oracle; its kernel serves every device until the fused library is loaded), "cuda" after loading
the fused kernel library (plugins/, modeling/cuda_op.py), which becomes the op's CUDA kernel: from
then on a call with CUDA tensors runs the fused kernels whichever name chose it.
"""

from __future__ import annotations

from typing import Callable

OpFn = Callable[..., tuple]


def _reference() -> OpFn:
    from .reference_op import call_op

    return call_op


class ImplUnavailable(ValueError):
    """The requested implementation cannot run here (the message says why and how to fix it)."""


def _cuda() -> OpFn:
    from . import cuda_op

    try:
        cuda_op.load()  # fail now, with the build hint, rather than inside the first block
    except cuda_op.CudaOpUnavailable as e:
        raise ImplUnavailable(str(e)) from e
    return cuda_op.call_op


_IMPLS: dict[str, Callable[[], OpFn]] = {"reference": _reference, "cuda": _cuda}
IMPL_NAMES = tuple(_IMPLS)


def get_op(name: str) -> OpFn:
    if name not in _IMPLS:
        raise ValueError(f"unknown DeLeaker attention implementation {name!r}; choose from {', '.join(_IMPLS)}")
    return _IMPLS[name]()
