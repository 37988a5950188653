"""Weight dtypes by name: the short names flags take (--dtype fp32|fp16|bf16) and what each
stands for. The one table; the torch side turns a name into a torch dtype with
modeling/checkpoint.py's resolve_dtype. Lean: no torch here."""

from __future__ import annotations

WEIGHT_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # short name -> full name
# other spellings a caller may give (full names, torch's and numpy's)
DTYPE_ALIASES = {**{full: short for short, full in WEIGHT_DTYPES.items()}, "float": "fp32", "half": "fp16"}
