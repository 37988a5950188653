"""The fused CUDA DeLeakerAttention op (plugins/, built with CMake): the CUDA kernel of the one
torch op, torch.ops.deleaker.attention (op contract v2, runtime/op_schema.py).

    from deleaker.modeling import cuda_op
    cuda_op.load()   # once: after this, torch.ops.deleaker.attention on CUDA tensors runs the fused kernels
    out, history_out = cuda_op.call_op(q, k, v, entity_tokens, history, step, grid, windows, knobs, rules,
                                       {"block_offset": b, "blocks_per_step": n})

The library libdeleaker_torch.so is looked for in $DELEAKER_PLUGIN_DIR, then in <repo>/build.
Loading it adds the CUDA kernel of deleaker::attention (whose schema and CPU reference kernel come
from modeling/reference_op.py, imported first) and the ops torch.ops.deleaker_cuda.{attention_ex,
attention_debug, workspace_layout} (implementation switches and intermediates, for tests and
benchmarks; see plugins/torch_adapter/deleaker_torch.cpp). q, k, v must be CUDA float16/bfloat16
tensors [B, H, T+I, D] with D in {64, 128}; step, grid, windows, knobs and rules may be CPU or
CUDA tensors (on CUDA they are read on the device: no host synchronisation, CUDA-graph safe).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from deleaker.runtime import op_schema

LIBRARY_NAME = "libdeleaker_torch.so"
_REPO = Path(__file__).resolve().parents[1]
BUILD_HINT = ("build it with `cmake -S . -B build && cmake --build build -j` (or `make plugin`) in the "
              "repository on a machine with nvcc and a CUDA build of torch, or point DELEAKER_PLUGIN_DIR "
              "at the folder holding " + LIBRARY_NAME)

# plain attention pass: where out and its log-sum-exp come from before the DeLeaker kernels run
PLAIN_BACKENDS = {"auto": 0, "own": 1, "flash": 2, "cudnn": 3, "efficient": 4}
# edited rows: "delta" corrects the plain rows by the changed columns only (exact fallback for
# rows that lose most of their mass); "full" recomputes every edited row over all columns
EDIT_MODES = {"delta": 0, "full": 1}
# implementation switches of the library (dl_params_t; bit i of attention_ex's `impl`), all on by
# default; each selects a faster path with the same math (docs/fused-op.md). Switching one off
# gives back the earlier path (for A/B timings, or if a GPU check shows a problem).
IMPL_SWITCHES = ("row_order", "keep_g", "x_split", "fixed_gather")

_loaded: Path | None = None


class CudaOpUnavailable(RuntimeError):
    """The fused CUDA op cannot be used here; the message says why and how to fix it."""


def library_path() -> Path | None:
    """Where the built adapter library is, or None."""
    candidates = []
    env = os.environ.get("DELEAKER_PLUGIN_DIR")
    if env:
        candidates.append(Path(env) / LIBRARY_NAME)
    candidates += [_REPO / "build" / LIBRARY_NAME, _REPO / "build" / "plugins" / LIBRARY_NAME]
    return next((p for p in candidates if p.is_file()), None)


def load() -> Path:
    """Load the adapter library once (idempotent). Raises CudaOpUnavailable with a how-to."""
    global _loaded
    if _loaded is not None:
        return _loaded
    path = library_path()
    if path is None:
        raise CudaOpUnavailable(f"the fused DeLeaker CUDA op library ({LIBRARY_NAME}) is not built: {BUILD_HINT}")
    if not torch.cuda.is_available():
        raise CudaOpUnavailable(f"{path} needs a CUDA GPU, and torch sees none")
    # the op's schema (and CPU kernel) must exist before the library adds its CUDA kernel
    from . import reference_op  # noqa: F401

    try:
        torch.ops.load_library(str(path))
    except OSError as e:  # wrong torch / CUDA runtime: the message names the missing symbol or file
        raise CudaOpUnavailable(f"could not load {path}: {e}; rebuild it against this torch: {BUILD_HINT}") from e
    _loaded = path
    _register_fakes()
    return path


def available() -> bool:
    try:
        load()
    except CudaOpUnavailable:
        return False
    return True


def _register_fakes() -> None:
    # shapes only, so torch.compile / export can trace through attention_ex (deleaker::attention
    # has its own, from reference_op)
    def fake(q, k, v, entity_tokens, history, *rest):
        return torch.empty_like(q), torch.empty_like(history, dtype=torch.float32)

    for name in ("attention_ex",):
        try:
            torch.library.register_fake(f"deleaker_cuda::{name}")(fake)
        except RuntimeError:  # already registered (library loaded twice)
            pass


def _as_tensor(x, dtype=torch.int64) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=dtype)


_TORCH_DTYPES = {"int64": torch.int64, "float32": torch.float32}


def _op_args(*args) -> list:
    """Positional arguments of the op from the attention_ops convention (op_schema.INPUTS in order,
    then the attribute dict): plain Python / numpy values of the int64 / float32 inputs become
    tensors of the schema's dtype, the attributes ints in op_schema.ATTRIBUTES order."""
    inputs, attrs = op_schema.split_call(args)
    tensors = [x if t.dtype not in _TORCH_DTYPES else _as_tensor(x, _TORCH_DTYPES[t.dtype])
               for t, x in zip(op_schema.INPUTS, inputs)]
    return [*tensors, *op_schema.attribute_values(attrs)]


def impl_bits(impl: dict | None) -> int:
    """attention_ex's `impl` argument: -1 (library defaults) for None, else one bit per switch
    (switches not named stay on)."""
    if impl is None:
        return -1
    unknown = set(impl) - set(IMPL_SWITCHES)
    if unknown:
        raise ValueError(f"impl: unknown switches {sorted(unknown)}; known: {', '.join(IMPL_SWITCHES)}")
    return sum(1 << i for i, name in enumerate(IMPL_SWITCHES) if impl.get(name, True))


def deleaker_attention_cuda(q, k, v, entity_tokens, history, step, grid, windows, knobs, rules, *,
                            block_offset: int, blocks_per_step: int, plain: str = "auto", edit: str = "delta",
                            impl: dict | None = None):
    """Fused DeLeaker attention. Same inputs, attributes and outputs as deleaker_attention_ref.
    plain / edit: see PLAIN_BACKENDS / EDIT_MODES; impl: implementation switches ({name: bool},
    names in IMPL_SWITCHES; None: all on). The defaults call torch.ops.deleaker.attention itself."""
    load()
    if plain not in PLAIN_BACKENDS:
        raise ValueError(f"plain must be one of {', '.join(PLAIN_BACKENDS)}, got {plain!r}")
    if edit not in EDIT_MODES:
        raise ValueError(f"edit must be one of {', '.join(EDIT_MODES)}, got {edit!r}")
    args = _op_args(q, k, v, entity_tokens, history, step, grid, windows, knobs, rules,
                    {"block_offset": block_offset, "blocks_per_step": blocks_per_step})
    bits = impl_bits(impl)
    if plain == "auto" and edit == "delta" and bits == -1:
        return torch.ops.deleaker.attention(*args)
    return torch.ops.deleaker_cuda.attention_ex(*args, PLAIN_BACKENDS[plain], EDIT_MODES[edit], bits)


def call_op(*args):
    """attention_ops calling convention (as reference_op.call_op): the op's inputs, then the
    attributes as one dict."""
    load()
    return torch.ops.deleaker.attention(*_op_args(*args))


INFO_FIELDS = ("tau_lo", "tau_hi", "need_p", "hist_update", "intervene", "n_active", "n_rows", "n_tt", "npairs",
               "n_fallback", "error")  # dl_sample_info_t, int32 words


def debug_run(q, k, v, entity_tokens, history, step, grid, windows, knobs, rules, *, block_offset: int,
              blocks_per_step: int, plain: str = "auto", edit: str = "delta", impl: dict | None = None) -> dict:
    """Run the op and return its intermediates (for tests): out, history_out, per-sample info,
    masks [B, E, I] bool, the masked rows and the image-image cut set as [B, I, I] bool
    (materialised here, for small checks only)."""
    load()
    args = _op_args(q, k, v, entity_tokens, history, step, grid, windows, knobs, rules,
                    {"block_offset": block_offset, "blocks_per_step": blocks_per_step})
    out, hist_out, ws = torch.ops.deleaker_cuda.attention_debug(*args, PLAIN_BACKENDS[plain], EDIT_MODES[edit],
                                                                impl_bits(impl))
    B, H, N, D = q.shape
    E, T = entity_tokens.shape[1:]
    I = N - T
    own_lse = plain == "own"
    lay = torch.ops.deleaker_cuda.workspace_layout(B, H, T, I, D, E, 1 if own_lse else 0)
    info_off, masks_off, rows_off, cut_off, p_off, total, cut_words, info_stride = lay
    infos = []
    for b in range(B):
        lo = info_off + b * info_stride
        raw = ws[lo: lo + 4 * len(INFO_FIELDS)].view(torch.int32).tolist()
        d = dict(zip(INFO_FIELDS, raw))
        d["tau"] = d.pop("tau_lo") + (d.pop("tau_hi") << 32)
        infos.append(d)
    masks = ws[masks_off: masks_off + B * E * I].view(B, E, I).bool()
    p = ws[p_off: p_off + B * E * I * 4].view(torch.float32).view(B, E, I)
    rows = ws[rows_off: rows_off + B * I * 4].view(torch.int32).view(B, I).long()
    cutw = ws[cut_off: cut_off + B * I * cut_words * 4].view(torch.int32).view(B, I, cut_words)
    cut = torch.zeros(B, I, I, dtype=torch.bool, device=q.device)
    for b in range(B):
        n = infos[b]["n_rows"]
        if n == 0 or not infos[b]["intervene"]:
            continue
        idx = torch.arange(n, device=q.device)
        bits = (cutw[b, :n, idx // 32] >> (idx % 32)) & 1  # [n, n]: masked-row index x masked-column index
        r = rows[b, :n]
        cut[b][r[:, None], r[None, :]] = bits.bool()
    return dict(out=out, history_out=hist_out, info=infos, masks=masks, entity_p=p, rows=rows, cut=cut)
