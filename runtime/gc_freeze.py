"""Keep Python's cyclic garbage collector off the objects a long-lived process loaded once.

A process that holds a loaded model holds hundreds of thousands of Python objects (torch modules
and parameters, the tokenizers, the web stack). Python's oldest-generation collection walks every
one of them, holding the interpreter lock all the while, so the model thread and the event loop
both stop, and when one comes depends on the process's allocation history (docs/serving.md gives
the measured pause).

freeze_loaded_objects() collects once (garbage from loading is freed, not kept) and then moves every
object that exists into the permanent generation (gc.freeze), which collections skip. Frozen objects
are still freed by reference counting; only a reference cycle among them is never collected, so
call it once what lives as long as the process is loaded: `deleaker serve` calls it after its
warm-up. DELEAKER_GC_FREEZE=0 turns it off.
"""

from __future__ import annotations

import gc
import os

ENV = "DELEAKER_GC_FREEZE"


def freeze_loaded_objects() -> str:
    """Collect, then freeze every object that exists now; returns what it did, for the log."""
    if os.environ.get(ENV, "1") == "0":
        return f"left alone ({ENV}=0)"
    gc.collect()
    gc.freeze()
    return f"{gc.get_freeze_count()} objects frozen"
