"""The package's shape, read from its source (``ast``; nothing is imported or run).

- No import circle between ``jaxinf`` modules. Every ``import`` counts, at the
  top of a module or inside a function: a circle broken only by importing late
  is still a circle in the layering.
- No module over :data:`MAX_LINES` lines (one job per module).

The graph has one node per module file (a package is its ``__init__.py``). An
import names the modules it executes: ``import a.b`` and ``from a.b import c``
name ``a.b``, or ``a.b.c`` when ``c`` is itself a module. A submodule's import
also runs its packages' ``__init__``, but that edge is left out: a package that
gathers its own submodules is not a circle of layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "jaxinf"
MAX_LINES = 600


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` under ``root/package``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _base(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: set[str]) -> dict[str, int]:
    """The package's modules that ``module`` imports anywhere in its source -> line of the first such import."""
    found: dict[str, int] = {}

    def add(name: str, line: int) -> None:
        while name and name not in modules:  # `import jaxinf.a.b` where b is an attribute: jaxinf.a
            name = name.rpartition(".")[0]
        if name and name != module:
            found.setdefault(name, line)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, path, node)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in modules else base, node.lineno)
    return found


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, dict[str, int]]:
    """Module -> {imported module: line} over every module of ``package``."""
    files = module_files(root, package)
    return {m: imports_of(m, p, set(files)) for m, p in files.items()}


def find_circle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import circle ``[a, b, ..., a]`` of ``graph``, or None (depth-first search, visiting in name order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, {})):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def describe_circle(circle: list[str], graph: dict[str, dict[str, int]]) -> str:
    """``a (line 12) -> b (line 40) -> a``: each step with the line of the import that makes it."""
    steps = [f"{a} (line {graph[a][b]})" for a, b in zip(circle, circle[1:])]
    return " -> ".join(steps + [circle[-1]])


def test_no_import_circle():
    graph = import_graph()
    assert "jaxinf.pipeline" in graph and graph["jaxinf.pipeline"], "the graph reads the package's imports"
    circle = find_circle(graph)
    assert circle is None, f"import circle: {describe_circle(circle, graph)}"


def test_a_circle_is_found(tmp_path):
    """The check itself: a circle made through a function-level, relative import is named."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import c\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    (pkg / "d.py").write_text("from pkg import a\n")
    graph = import_graph(tmp_path, "pkg")
    circle = find_circle(graph)
    assert circle == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    assert describe_circle(circle, graph) == "pkg.a (line 1) -> pkg.sub.b (line 2) -> pkg.c (line 1) -> pkg.a"
    del graph["pkg.c"]["pkg.a"]
    assert find_circle(graph) is None


def _oversized() -> dict[str, int]:
    sizes = {m: len(p.read_text().splitlines()) for m, p in module_files().items()}
    return {m: n for m, n in sorted(sizes.items()) if n > MAX_LINES}


def test_module_sizes():
    over = _oversized()
    message = f"modules over {MAX_LINES} lines: " + ", ".join(f"{m} ({n})" for m, n in over.items())
    assert not over, message


LAYERS = [
    ("base", ("errors", "atomic", "faults", "hostenv")),
    ("sharding", ("sharding",)),
    ("engine", ("engine",)),
    ("models", ("models",)),
    ("data", ("data",)),
    ("config", ("config",)),
    ("run", ("run",)),
    ("analysis", ("analysis",)),
    ("pipeline", ("pipeline",)),
    ("around", ("validate", "demo", "interop")),
    ("commands", ("cli", "__main__")),
]
"""The package's layers, bottom up (docs/architecture.md): a module imports only its own layer and those below.
Each layer is a folder of the package (``jaxinf/sharding/``, ``jaxinf/engine/``, ``jaxinf/run/``, ...) except
the base modules, the pipeline and the command line, which sit at its root. The engine (the method's
arithmetic, its stages and programs, the per-batch loop) sits on ``sharding`` and ``base`` alone, so
``from jaxinf.engine import stages`` is the library without config files, run directories or checkpoints. A module
is in the layer of the longest entry naming it or a package above it."""


def layer_of(module: str) -> int | None:
    """The index in :data:`LAYERS` of ``module`` (None for the package itself); raises for a module in no layer."""
    name = module.partition(".")[2]
    if not name:
        return None
    found = [
        (len(p), i) for i, (_, entries) in enumerate(LAYERS) for p in entries if name == p or name.startswith(p + ".")
    ]
    assert found, f"{module} is in no layer of tests/test_layering.py LAYERS"
    return max(found)[1]


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    """Every import of a module from a higher layer, as ``a (layer) imports b (layer) (line n)``."""
    out = []
    for m in sorted(graph):
        for n, line in sorted(graph[m].items()):
            lm, ln = layer_of(m), layer_of(n)
            if lm is not None and ln is not None and ln > lm:
                out.append(f"{m} ({LAYERS[lm][0]}) imports {n} ({LAYERS[ln][0]}) (line {line})")
    return out


def test_no_import_goes_up_a_layer():
    graph = import_graph()
    up = upward_imports(graph)
    assert not up, "imports that go up a layer: " + "; ".join(up)


def test_an_upward_import_is_found():
    """The check itself: the engine importing the run directory is named."""
    graph = {
        "jaxinf.engine.stages": {"jaxinf.run.store": 12},
        "jaxinf.run.store": {"jaxinf.engine.capture": 3},
        "jaxinf.engine.capture": {},
    }
    assert upward_imports(graph) == ["jaxinf.engine.stages (engine) imports jaxinf.run.store (run) (line 12)"]


def test_the_library_api_loads_no_run_directory_code():
    """Importing the engine (as a library user does) loads no Orbax, run directory, config or checkpoint code."""
    import subprocess
    import sys

    code = (
        "import sys, jaxinf.engine.stages, jaxinf.engine.programs, jaxinf.engine.loop\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'orbax' or m.startswith(('jaxinf.run', 'jaxinf.config'))\n"
        "             or m in ('jaxinf.pipeline', 'jaxinf.cli'))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


ROOT_MODULES = {"errors", "atomic", "faults", "hostenv", "pipeline", "cli", "__main__"}
"""The only modules at the package's root: the base, the pipeline and the command line (DESIGN.md's
layout). Everything else lives in the folder of its layer."""


def test_folders_are_layers():
    """Each layer is one folder (or, for the entries of :data:`ROOT_MODULES`, the root): a new module in the wrong
    place, or a folder no layer declares, is named."""
    root = sorted(m.split(".")[1] for m, p in module_files().items() if m.count(".") == 1 and p.name != "__init__.py")
    assert set(root) == ROOT_MODULES, f"modules at the root of jaxinf/: {root}; expected {sorted(ROOT_MODULES)}"
    declared = {e for _, entries in LAYERS for e in entries}
    folders = sorted({m.split(".")[1] for m, p in module_files().items() if p.name == "__init__.py" and "." in m})
    undeclared = [f for f in folders if f not in declared]
    assert not undeclared, f"folders of jaxinf/ in no layer of LAYERS: {undeclared}"


def test_the_readme_engine_example_runs():
    """The README's "engine in twenty lines" is the library API a reader copies first: it runs as written."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The engine in twenty lines") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```")]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["scores"].total.shape == (1, 2)
