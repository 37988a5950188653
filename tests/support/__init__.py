"""What the tests share (no tests here): golden outputs, the op verdict, a real `deleaker serve`
process, the bad-input audit's cases. Imported as `support.*` (tests/ is on sys.path: conftest.py)."""
