"""The import graph of the library folders: its cycles, and what ``kernels`` may import.

DESIGN.md: dependencies flow one way (``cli, app → evals, training → saekit → kernels``), with
no cycles, and ``kernels`` imports only torch and triton. The graph is read from the source with
``ast``, without importing anything: every ``import`` statement of every module in saekit/,
training/, evals/, kernels/, cli/ and app/, at module level and inside functions alike (a lazy import
still ties the two modules together). The folders take the names pyproject.toml's
``package-dir`` gives them (training/ is ``saekit.training``, and so on).

An edge goes to the module an import names: ``from saekit.kernels import screen`` is an edge
to ``saekit.kernels.screen``, ``from saekit.kernels import encode_topk`` one to the package
``saekit.kernels`` (its ``__init__``). The parent packages that Python initialises on the way
are not counted, nor are names resolved at run time (``importlib.import_module``).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"saekit": "saekit", "training": "saekit.training", "evals": "saekit.evals", "kernels": "saekit.kernels",
           "cli": "saekit.cli", "app": "saekit.app"}
KERNELS = "saekit.kernels"
KERNELS_MAY_IMPORT = {"torch", "triton"}  # besides the standard library and saekit.kernels itself

# Known import cycles: none remain (the seam redesign removed the last). A new cycle fails
# the test: break it rather than list it here.
KNOWN_MODULE_CYCLES: set[frozenset[str]] = set()  # strongly connected sets of modules
KNOWN_FOLDER_CYCLES: set[tuple[str, ...]] = set()  # elementary cycles among the folders, each from its smallest name


# ---- reading the graph ------------------------------------------------------------------------

def library_modules() -> dict[str, Path]:
    """Every module of the four folders by its installed name."""
    mods = {}
    for folder, pkg in FOLDERS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            mods[pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"] = path
    return mods


def imported_names(module: str, path: Path, known) -> list[tuple[str, int]]:
    """(dotted name, line) of everything ``module`` imports; ``from a import b`` gives
    ``a.b`` when that is a module in ``known``, else ``a``. Relative imports are resolved."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from .mod import x
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub if sub in known else base, node.lineno))
    return out


def internal_target(name: str, known) -> str | None:
    """The library module ``name`` lands in (its longest prefix in ``known``), if any."""
    parts = name.split(".")
    while parts and ".".join(parts) not in known:
        parts.pop()
    return ".".join(parts) or None


def import_graph() -> dict[str, dict[str, str]]:
    """module -> {imported library module: "path:line" of the first such import}."""
    mods = library_modules()
    graph = {}
    for module, path in mods.items():
        edges = graph.setdefault(module, {})
        for name, line in imported_names(module, path, mods):
            target = internal_target(name, mods)
            if target is not None and target != module:
                edges.setdefault(target, f"{path.relative_to(ROOT)}:{line}")
    return graph


# ---- cycles -------------------------------------------------------------------------------------

def strongly_connected(graph: dict[str, dict]) -> list[set[str]]:
    """Tarjan's strongly connected components (iterative, so no recursion limit)."""
    index, low, on_stack, stack, comps, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, successors = work[-1]
            w = next(successors, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(graph.get(w, ()))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                comps.append(comp)
    return comps


def cyclic_sets(graph: dict[str, dict]) -> set[frozenset[str]]:
    """The strongly connected sets of more than one node: every cycle lies in one."""
    return {frozenset(c) for c in strongly_connected(graph) if len(c) > 1}


def elementary_cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """Every cycle without a repeated node, as a tuple from its smallest node (small graphs)."""
    found = set()

    def walk(path):
        for nxt in graph.get(path[-1], ()):
            if nxt == path[0]:
                found.add(tuple(path))
            elif nxt > path[0] and nxt not in path:
                walk(path + [nxt])

    for start in graph:
        walk([start])
    return {c for c in found if len(c) > 1}


def one_cycle(graph: dict[str, dict[str, str]], nodes: frozenset[str], known=frozenset()) -> list[str]:
    """A shortest cycle within ``nodes`` through the smallest of them outside ``known`` (so
    through the new part of a cycle that grew), each step with the import that makes it."""
    start = min(nodes - known or nodes)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for nxt in graph[path[-1]]:
            if nxt == start:
                steps = path + [start]
                return [f"{a} -> {b} ({graph[a][b]})" for a, b in zip(steps, steps[1:])]
            if nxt in nodes and nxt not in seen:
                seen.add(nxt)
                paths.append(path + [nxt])
    return []


# `python -m saekit` runs saekit/__main__.py, which only calls the CLI: it is the command
# line's entry point, which no module imports, so it counts as part of the CLI's folder.
ENTRY_POINTS = {"saekit.__main__": "saekit.cli"}


def folder_of(module: str) -> str:
    if module in ENTRY_POINTS:
        return ENTRY_POINTS[module]
    return next((pkg for pkg in sorted(FOLDERS.values(), key=len, reverse=True)
                 if pkg != "saekit" and (module == pkg or module.startswith(pkg + "."))), "saekit")


def folder_graph(graph: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """folder -> {folder it imports: one import that does it}."""
    out = {pkg: {} for pkg in FOLDERS.values()}
    for module, edges in graph.items():
        for target, where in edges.items():
            a, b = folder_of(module), folder_of(target)
            if a != b:
                out[a].setdefault(b, f"{module} -> {target} ({where})")
    return out


# ---- the checks on the finders themselves ------------------------------------------------------

def test_cycle_finders_on_a_known_graph():
    g = {"a": {"b": ""}, "b": {"c": ""}, "c": {"a": ""}, "d": {"a": "", "e": ""}, "e": {"d": ""}, "f": {}}
    assert cyclic_sets(g) == {frozenset("abc"), frozenset("de")}
    assert elementary_cycles({k: set(v) for k, v in g.items()}) == {("a", "b", "c"), ("d", "e")}
    assert elementary_cycles({"x": {"y"}, "y": {"x", "z"}, "z": {"x"}}) == {("x", "y"), ("x", "y", "z")}


def test_the_graph_reads_every_kind_of_import():
    graph = import_graph()
    assert "saekit.sparsity" in graph["saekit.sae"]  # module level, absolute
    assert "saekit.kernels.screen" in graph["saekit.kernels.encoder"]  # `from . import screen`: relative
    assert "saekit.kernels.encoder_triton" in graph["saekit.kernels.encoder"]  # inside a function
    assert "saekit.training.run" in graph["saekit.training"]  # `from saekit.training import run`
    assert "saekit.kernels" in graph["saekit.sae"]  # `from saekit.kernels import <a name>`: the package


def test_the_folders_are_the_ones_pyproject_maps():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert {pkg: folder for pkg, folder in package_dir.items() if folder in FOLDERS} == \
        {pkg: folder for folder, pkg in FOLDERS.items()}


# ---- the project's graph ----------------------------------------------------------------------

def test_module_cycles_are_exactly_the_known_ones():
    graph = import_graph()
    found = cyclic_sets(graph)
    known = frozenset().union(*KNOWN_MODULE_CYCLES)
    new = [f"{sorted(c)}, e.g. " + "; ".join(one_cycle(graph, c, known)) for c in found - KNOWN_MODULE_CYCLES]
    gone = [sorted(c) for c in KNOWN_MODULE_CYCLES - found]
    assert not new, "new import cycle(s) among modules; break them (DESIGN.md: no cycles):\n" + "\n".join(new)
    assert not gone, f"these cycles are gone: remove them from KNOWN_MODULE_CYCLES: {gone}"


def test_folder_cycles_are_exactly_the_known_ones():
    folders = folder_graph(import_graph())
    found = elementary_cycles({a: set(b) for a, b in folders.items()})
    new = ["  " + " -> ".join(c) + ": " + "; ".join(folders[a][b] for a, b in zip(c, c[1:] + c[:1]))
           for c in sorted(found - KNOWN_FOLDER_CYCLES)]
    gone = sorted(KNOWN_FOLDER_CYCLES - found)
    assert not new, "new import cycle(s) among the folders; break them (DESIGN.md):\n" + "\n".join(new)
    assert not gone, f"these cycles are gone: remove them from KNOWN_FOLDER_CYCLES: {gone}"


def test_kernels_import_only_torch_triton_the_stdlib_and_themselves():
    mods = library_modules()
    outside, seen = [], set()
    for module, path in mods.items():
        if folder_of(module) != KERNELS:
            continue
        for name, line in imported_names(module, path, mods):
            top = name.split(".")[0]
            seen.add(top)
            if name == KERNELS or name.startswith(KERNELS + "."):
                continue
            if top not in KERNELS_MAY_IMPORT and top not in sys.stdlib_module_names:
                outside.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert {"torch", "triton"} <= seen  # the imports were read
    assert not outside, "kernels may import only torch, triton and the standard library:\n" + "\n".join(outside)


def test_the_kernels_folder_does_not_shadow_an_installed_kernels_package():
    """From the clone's root (``python -m saekit``, pytest, a notebook) the folder kernels/ is
    importable as a bare ``kernels``; transformers >= 5.25 imports Hugging Face's ``kernels``
    package and failed on finding this folder instead. A bare ``kernels`` import from the root
    must give the installed package; with none installed (simulated: the search past the
    root finds nothing), this folder, as before."""
    import importlib.metadata
    import subprocess
    import sys

    def run(code):
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return [Path(line) for line in r.stdout.split()]

    ours = ROOT / "kernels" / "__init__.py"
    theirs, saekit_kernels = run("import kernels, saekit.kernels as ours, saekit.models\n"
                                 "print(kernels.__file__); print(ours.__file__)")
    assert saekit_kernels == ours
    try:
        importlib.metadata.distribution("kernels")
        assert theirs.parent != ours.parent
    except importlib.metadata.PackageNotFoundError:
        assert theirs == ours
    hide = ("import importlib.machinery as m\n"
            "find = m.PathFinder.find_spec\n"
            "m.PathFinder.find_spec = classmethod(lambda cls, name, path=None, target=None: None "
            "if name == 'kernels' and path is not None else find(name, path, target))\n"
            "import kernels\nprint(kernels.__file__); print(kernels.encode_topk.__module__)")
    found, module = run(hide)
    assert found == ours and str(module) == "kernels.encoder"
