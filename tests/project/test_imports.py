"""The layers import one way: runtime <- modeling (torch side) <- export <- {benchmarks, eval};
eval <- toyworld (the toy world measures with eval's outcome categories and judge registry);
benchmarks, eval and toyworld never import one another otherwise, and no module takes part in an
import cycle. Every import statement counts, function-level ones
included, and importlib.import_module with a literal name; backends and subcommands that live in
a higher layer reach the runtime only through entry points (pyproject.toml)."""

import ast
import tomllib
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("deleaker.runtime", "deleaker.modeling", "deleaker.export", "deleaker.benchmarks", "deleaker.eval",
          "deleaker.toyworld")
# layer -> the layers it may import (besides itself)
BELOW = {
    "deleaker.runtime": set(),
    "deleaker.modeling": {"deleaker.runtime"},
    "deleaker.export": {"deleaker.runtime", "deleaker.modeling"},
    "deleaker.benchmarks": {"deleaker.runtime", "deleaker.modeling", "deleaker.export"},
    "deleaker.eval": {"deleaker.runtime", "deleaker.modeling", "deleaker.export"},
    "deleaker.toyworld": {"deleaker.runtime", "deleaker.modeling", "deleaker.export", "deleaker.eval"},
}


def _modules() -> dict[str, Path]:
    """Module name -> file, from pyproject's package-dir mapping (the folders are not named as the packages)."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    mods = {}
    for pkg, folder in package_dir.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = path
    return mods


def _imports(name: str, path: Path, known: dict) -> set[str]:
    """The project modules `name` imports anywhere in its file."""
    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            targets = [node.args[0].value]
        for t in targets:
            if t.startswith("deleaker.") and (r := resolve(t)) and r != name:
                found.add(r)
    return found


def _layer(module: str) -> str:
    return next(prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + "."))


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def test_the_walk_finds_the_imports_it_must():
    """The walk itself: known edges of each kind (top-level, function-level, relative, across layers)."""
    g = _graph()
    assert len(g) > 80
    assert "deleaker.runtime.config" in g["deleaker.runtime.pipeline"]  # relative, top level
    assert "deleaker.export.onnx_export" in g["deleaker.export.verify"]  # relative, inside a function
    assert "deleaker.modeling.reference_op" in g["deleaker.export.onnx_export"]  # absolute, across layers
    assert "deleaker.modeling.reference_op" in g["deleaker.modeling.aoti_backend"]  # importlib.import_module


def test_imports_point_down_the_layers():
    assert set(BELOW) == set(LAYERS) == set(tomllib.loads((ROOT / "pyproject.toml").read_text())
                                            ["tool"]["setuptools"]["package-dir"])
    upward = sorted(f"{a} -> {b}" for a, targets in _graph().items() for b in targets
                    if _layer(b) != _layer(a) and _layer(b) not in BELOW[_layer(a)])
    assert not upward, "imports outside the layer order " + repr(BELOW) + ":\n" + "\n".join(upward)


# The runtime modules that may import the backend layer (runtime/backends): the pipeline (its
# session loop drives a Backend) and the entry points that load one by name. Everything below them
# (artifact, model_info, config, ...) is imported by the backends, never the other way round.
BACKEND_USERS = {"deleaker.runtime.pipeline", "deleaker.runtime.cli", "deleaker.runtime.serve.cli",
                 "deleaker.runtime.serve.loading"}


def test_only_the_pipeline_and_entry_points_import_the_backends():
    backends = "deleaker.runtime.backends"
    inside = lambda m: m == backends or m.startswith(backends + ".")  # noqa: E731
    found = sorted(f"{a} -> {b}" for a, targets in _graph().items() if a.startswith("deleaker.runtime.")
                   and not inside(a) and a not in BACKEND_USERS for b in targets if inside(b))
    assert not found, "runtime modules below the backend layer that import it:\n" + "\n".join(found)
    assert "deleaker.runtime.model_info" in _graph()["deleaker.runtime.artifact"]  # the walk sees the real edge


def test_no_import_cycles():
    g = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_runtime_names_no_module_of_a_higher_layer():
    """Not even in a string: backends and subcommands of higher layers are entry points."""
    for path in (ROOT / "runtime").rglob("*.py"):
        text = path.read_text()
        for prefix in LAYERS[1:]:
            assert prefix not in text, f"{path.relative_to(ROOT)} names {prefix}"
    groups = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    assert groups["deleaker.backends"]["torch"].startswith("deleaker.modeling.")
    assert groups["deleaker.commands"]["eval"].startswith("deleaker.eval.")
    assert groups["deleaker.judges"]["toyworld"].startswith("deleaker.toyworld.")


def test_eval_names_no_toyworld_module():
    """The toy world's judge reaches `deleaker eval` through the deleaker.judges entry point."""
    for path in (ROOT / "eval").rglob("*.py"):
        assert "deleaker.toyworld" not in path.read_text(), f"{path.relative_to(ROOT)} names deleaker.toyworld"
