"""freeze_loaded_objects (runtime/gc_freeze.py): what a long-lived process loaded leaves the
garbage collector's walks, garbage from loading is freed first, and DELEAKER_GC_FREEZE=0 turns it off."""

from __future__ import annotations

import gc
import weakref

from deleaker.runtime.gc_freeze import ENV, freeze_loaded_objects


class _Node:
    pass


def test_freezes_what_exists_after_collecting_garbage(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    cycle = _Node()
    cycle.self = cycle  # garbage only the cyclic collector frees
    gone = weakref.ref(cycle)
    del cycle
    kept = [_Node()]  # tracked and alive: frozen
    try:
        said = freeze_loaded_objects()
        assert gone() is None  # collected before the freeze, not kept forever
        # the message reports the count at the freeze; a thread another test left behind may add to
        # or free from the permanent generation before this line reads it (a few objects of ~10^6)
        n = int(said.removesuffix(" objects frozen"))
        assert said == f"{n} objects frozen" and n > 0 and abs(gc.get_freeze_count() - n) <= n // 1000
        assert not any(o is kept for o in gc.get_objects())  # the frozen are outside every generation
    finally:
        gc.unfreeze()  # give this test process its heap back
    assert any(o is kept for o in gc.get_objects())


def test_off_with_the_environment_variable(monkeypatch):
    monkeypatch.setenv(ENV, "0")
    assert freeze_loaded_objects() == f"left alone ({ENV}=0)"
    assert gc.get_freeze_count() == 0
